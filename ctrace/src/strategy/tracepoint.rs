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
    kernel::{KernelFacts, kallsyms::Kallsyms, tracefs::EventFormat},
    loader::LoadOptions,
    source::EventSource,
    tier::{Capabilities, DropSight, Strategy, Tier},
};

/// What this tier sees: drops at their free, causes from counters and,
/// where the kernel records it, the free's location.
pub fn capabilities(layout: &KernelLayout) -> Capabilities {
    Capabilities {
        exact_verdicts: false,
        entry_events: false,
        drop_location: layout.tp_location != 0 && layout.nft_chain_end != 0,
        gc_evictions: false,
        fd_scoped_cleanup: true,
        needs_btf: true,
        drops: DropSight::Direct,
    }
}

const CATEGORY: &str = "skb";
const EVENT: &str = "kfree_skb";
const PROGRAM: &str = "ctrace_kfree_skb";

/// Where the tracepoint record and the kernel structs keep what we read,
/// on this kernel. The reason field moved between 6.1 (offset 28,
/// NETFILTER_DROP = 7) and 6.18 (offset 36, = 12); kernels before 5.17 have
/// none, and there netfilter drops cannot be told from others at all.
pub fn layout(facts: &KernelFacts) -> anyhow::Result<KernelLayout> {
    let btf = facts.btf.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
    btf.require_64bit_pointers("the tracepoint tier")?;
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
    // BTF names the enumerator; the print format is the fallback for a
    // kernel whose BTF lacks the enum.
    let netfilter_drop = match btf.enum_value("skb_drop_reason", "SKB_DROP_REASON_NETFILTER_DROP") {
        Ok(v) => u32::try_from(v).context("NETFILTER_DROP out of range")?,
        Err(btf_err) => format
            .symbolic_value("reason", "NETFILTER_DROP")
            .map(|v| v as u32)
            .with_context(|| format!("no NETFILTER_DROP drop reason ({btf_err:#})"))?,
    };
    let mut layout = KernelLayout {
        tp_skbaddr: skbaddr.offset,
        tp_reason: reason.offset,
        netfilter_drop,
        ..skb_layout(btf)?
    };
    add_location(&mut layout, &format);
    Ok(layout)
}

/// Where kfree_skb was called from tells who dropped: `nft_do_chain` (an
/// nftables rule or policy, on kernels that free nft drops there) or
/// `nf_hook_slow` (a hook's NF_DROP: conntrack, iptables, older nft).
/// Needs the record's `location` and readable symbol addresses; without
/// either, the evidence is simply not used.
fn add_location(layout: &mut KernelLayout, format: &EventFormat) {
    let Some(location) = format.field("location").filter(|f| f.size == 8) else {
        return;
    };
    let Ok(syms) = Kallsyms::read(&["nf_hook_slow", "nft_do_chain"]) else {
        return;
    };
    let (Some(hook), Some(nft)) = (syms.range("nf_hook_slow"), syms.range("nft_do_chain")) else {
        log::debug!("no drop-location evidence: nf_hook_slow or nft_do_chain has no address");
        return;
    };
    layout.tp_location = location.offset;
    (layout.hook_slow_start, layout.hook_slow_end) = hook;
    (layout.nft_chain_start, layout.nft_chain_end) = nft;
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
         cause of each drop is inferred from conntrack's counters{}",
        l.tp_reason,
        l.netfilter_drop,
        location_note(&l)
    ))
}

pub fn location_note(l: &KernelLayout) -> &'static str {
    if l.tp_location != 0 {
        "; kfree_skb records where a packet was freed (nft_do_chain or nf_hook_slow): \
         `watch` checks at start whether this kernel frees nftables drops in nft_do_chain"
    } else {
        "; no drop-location evidence (no `location` field or no symbol addresses)"
    }
}

/// Probes, with the programs attached, whether this kernel frees an
/// nftables rule's drop inside `nft_do_chain` (mainline 6.7 on, and
/// Debian's 6.1.192 too: found out, not assumed): one SYN to 127.0.0.1:9
/// in a throwaway namespace whose raw-priority chain drops it, then a look
/// at the class the kernel side counted it under. The namespace vanishes with this
/// function. Any failure (no nf_tables, say) means "no".
pub fn kernel_frees_nft_drops_in_nft_do_chain(source: &mut EventSource) -> bool {
    use crate::netlink::{nftables, rtnetlink};
    let probe = || -> anyhow::Result<(u64, u8)> {
        let ns = rtnetlink::new_netns()?;
        nftables::drop_tcp_dport_before_conntrack(&ns, 9)?;
        ns.run(|| {
            let to = std::net::SocketAddr::from(([127, 0, 0, 1], 9));
            let _ =
                std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_millis(150));
        })?;
        let classes = source
            .totals()
            .iter()
            .filter(|r| r.netns == ns.inode())
            .fold(0u8, |acc, r| acc | r.class);
        Ok((ns.inode(), classes))
    };
    match probe() {
        Ok((inode, classes)) => {
            source.forget_netns(&[inode]);
            let in_chain = classes & ctrace_common::class::AT_NFT_CHAIN != 0;
            log::info!(
                "drop location: an nftables drop was freed in {}",
                if in_chain {
                    "nft_do_chain: rule drops are told apart"
                } else if classes != 0 {
                    "nf_hook_slow: this kernel does not tell rule drops by location"
                } else {
                    "an unseen place: location evidence unused"
                }
            );
            in_chain
        }
        Err(e) => {
            log::info!("drop location not probed ({e:#}): location evidence unused");
            false
        }
    }
}

pub fn start(facts: &KernelFacts, opts: &LoadOptions<'_>) -> anyhow::Result<EventSource> {
    let layout = layout(facts)?;
    log::debug!("kernel layout: {layout:?}");
    let (mut ebpf, logger) = crate::loader::load(&layout, opts)?;
    attach(&mut ebpf)?;
    let tier = Tier {
        strategy: Strategy::Tracepoint,
        caps: capabilities(&layout),
    };
    EventSource::new(ebpf, tier, logger)
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
