//! The tracepoint tier: `skb:kfree_skb`, filtered to NETFILTER_DROP.
//!
//! Available wherever tracepoints and BTF are (this host, which forbids
//! fentry and has no kprobes). It sees drops after the fact, so the cause is
//! inferred in user space (see `cause`).
use anyhow::{Context as _, bail};
use aya::programs::{ProgramType, TracePoint};
use ctrace_common::KernelLayout;

use super::program_type_loads;
use crate::{
    kernel::{KernelFacts, tracefs::EventFormat},
    source::EventSource,
    strategy::Strategy,
};

const CATEGORY: &str = "skb";
const EVENT: &str = "kfree_skb";
const PROGRAM: &str = "ctrace_kfree_skb";

/// Where the tracepoint record and the kernel structs keep what we read,
/// on this kernel. The reason field moved between 6.1 (offset 28,
/// NETFILTER_DROP = 7) and 6.18 (offset 36, = 12); kernels before 5.17 have
/// none, and there netfilter drops cannot be told from others at all.
pub fn layout(facts: &KernelFacts) -> anyhow::Result<KernelLayout> {
    let tracefs = facts.tracefs.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
    let format = EventFormat::read(tracefs, CATEGORY, EVENT)?;
    let skbaddr = format
        .field("skbaddr")
        .context("skb:kfree_skb has no skbaddr field")?;
    let Some(reason) = format.field("reason") else {
        bail!(
            "skb:kfree_skb has no `reason` field on this kernel (added in 5.17): \
             netfilter drops cannot be told from other frees"
        );
    };
    if skbaddr.size != 8 || reason.size != 4 {
        bail!(
            "skb:kfree_skb fields have unexpected sizes (skbaddr {}, reason {})",
            skbaddr.size,
            reason.size
        );
    }
    let btf = facts.btf.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
    // BTF names the enumerator; the print format is the fallback for a
    // kernel whose BTF lacks the enum.
    let netfilter_drop = match btf.enum_value("skb_drop_reason", "SKB_DROP_REASON_NETFILTER_DROP") {
        Ok(v) => u32::try_from(v).context("NETFILTER_DROP out of range")?,
        Err(btf_err) => format
            .symbolic_value("reason", "NETFILTER_DROP")
            .map(|v| v as u32)
            .with_context(|| format!("no NETFILTER_DROP drop reason ({btf_err:#})"))?,
    };
    Ok(KernelLayout {
        tp_skbaddr: skbaddr.offset,
        tp_reason: reason.offset,
        netfilter_drop,
        ..skb_layout(btf)?
    })
}

/// sk_buff, net_device, sock and net offsets: what decoding a packet and
/// finding its namespace takes, whichever hook hands us the skb.
pub fn skb_layout(btf: &crate::kernel::btf::Btf) -> anyhow::Result<KernelLayout> {
    let off = |path: &str| btf.member_offset(path);
    Ok(KernelLayout {
        skb_nfct: off("sk_buff._nfct")?,
        skb_head: off("sk_buff.head")?,
        skb_network_header: off("sk_buff.network_header")?,
        skb_dev: off("sk_buff.dev")?,
        skb_sk: off("sk_buff.sk")?,
        dev_net: off("net_device.nd_net")? + off("possible_net_t.net")?,
        sk_net: off("sock.__sk_common")? + off("sock_common.skc_net")? + off("possible_net_t.net")?,
        net_inum: off("net.ns")? + off("ns_common.inum")?,
        tier: u32::from(ctrace_common::tier::TRACEPOINT),
        ..KernelLayout::default()
    })
}

pub fn probe(facts: &KernelFacts) -> anyhow::Result<String> {
    let l = layout(facts)?;
    program_type_loads(ProgramType::TracePoint, "tracepoint")?;
    Ok(format!(
        "skb:kfree_skb has reason at offset {} (NETFILTER_DROP = {}); sk_buff layout from BTF; \
         cause of each drop is inferred from conntrack's counters",
        l.tp_reason, l.netfilter_drop
    ))
}

pub fn start(facts: &KernelFacts, kernel_log: bool) -> anyhow::Result<EventSource> {
    let layout = layout(facts)?;
    log::debug!("kernel layout: {layout:?}");
    let (mut ebpf, logger) = crate::source::load(&layout, kernel_log)?;
    attach(&mut ebpf)?;
    EventSource::new(ebpf, Strategy::Tracepoint, logger)
}

/// Loads and attaches the kfree_skb program (the kprobe tier uses it too).
pub fn attach(ebpf: &mut aya::Ebpf) -> anyhow::Result<()> {
    let program: &mut TracePoint = ebpf
        .program_mut(PROGRAM)
        .context("the eBPF object has no kfree_skb program")?
        .try_into()?;
    program
        .load()
        .context("the verifier rejected the kfree_skb program")?;
    program
        .attach(CATEGORY, EVENT)
        .context("attaching to skb:kfree_skb")?;
    Ok(())
}
