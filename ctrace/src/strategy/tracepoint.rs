//! The tracepoint tier: `kfree_skb`, filtered to NETFILTER_DROP, attached
//! as a raw tracepoint whose arguments are typed from BTF.
//!
//! Available wherever tracepoints and BTF are (this host, which forbids
//! fentry and has no kprobes). It sees drops after the fact, so the cause is
//! inferred in user space (see `cause`). A raw tracepoint needs no tracefs:
//! it runs with CAP_BPF and CAP_PERFMON alone, where tracefs is root's.
use anyhow::{Context as _, bail};
use aya::programs::{ProgramType, RawTracePoint};
use ctrace_common::KernelLayout;

use super::program_type_loads;
use crate::{
    kernel::{KernelFacts, kallsyms::Kallsyms},
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
        drop_location: layout.tp_location_arg != 0 && layout.nft_chain_end != 0,
        gc_evictions: false,
        fd_scoped_cleanup: true,
        needs_btf: true,
        drops: DropSight::Direct,
        passed_flows: false,
    }
}

const TRACEPOINT: &str = "kfree_skb";
const PROGRAM: &str = "ctrace_kfree_skb";
/// The program reads arguments 0 to 2 only (see `tp_arg` there).
const MAX_ARG: usize = 2;

/// Where the tracepoint's arguments and the kernel structs keep what we
/// read, on this kernel: `kfree_skb(skb, location, reason[, rx_sk])` since
/// 5.17; before, there is no reason and netfilter drops cannot be told from
/// other frees. NETFILTER_DROP's value changes as reasons are added (7 on
/// 6.1, 12 on 6.18).
pub fn layout(facts: &KernelFacts) -> anyhow::Result<KernelLayout> {
    let btf = facts.btf.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
    btf.require_64bit_pointers("the tracepoint tier")?;
    let args = btf.tracepoint_args(TRACEPOINT)?;
    let position = |what: &str| args.iter().position(|a| a == what);
    let skb = position("struct sk_buff *")
        .with_context(|| format!("kfree_skb has no struct sk_buff * argument: {args:?}"))?;
    let Some(reason) = position("enum skb_drop_reason") else {
        bail!(
            "kfree_skb has no drop reason on this kernel (added in 5.17): netfilter drops \
             cannot be told from other frees"
        );
    };
    if skb.max(reason) > MAX_ARG {
        bail!("kfree_skb's arguments are in an order ctrace does not read: {args:?}");
    }
    let netfilter_drop = btf
        .enum_value("skb_drop_reason", "SKB_DROP_REASON_NETFILTER_DROP")
        .context("no NETFILTER_DROP drop reason")?;
    let mut layout = KernelLayout {
        tp_skb_arg: skb as u32 + 1,
        tp_reason_arg: reason as u32 + 1,
        netfilter_drop: u32::try_from(netfilter_drop).context("NETFILTER_DROP out of range")?,
        ..skb_layout(btf)?
    };
    // The location is the free's caller: the untyped pointer after the skb.
    let location = args
        .iter()
        .enumerate()
        .skip(skb + 1)
        .find(|(_, a)| *a == "void *")
        .map(|(i, _)| i)
        .filter(|&i| i <= MAX_ARG);
    if let Some(i) = location {
        add_location(&mut layout, i);
    }
    Ok(layout)
}

/// Where kfree_skb was called from tells who dropped: `nft_do_chain` (an
/// nftables rule or policy, on kernels that free nft drops there) or
/// `nf_hook_slow` (a hook's NF_DROP: conntrack, iptables, older nft).
/// Needs readable symbol addresses; without them, the evidence is simply
/// not used.
fn add_location(layout: &mut KernelLayout, arg: usize) {
    let Ok(syms) = Kallsyms::read(&["nf_hook_slow", "nft_do_chain"]) else {
        return;
    };
    let (Some(hook), Some(nft)) = (syms.range("nf_hook_slow"), syms.range("nft_do_chain")) else {
        log::debug!("no drop-location evidence: nf_hook_slow or nft_do_chain has no address");
        return;
    };
    layout.tp_location_arg = arg as u32 + 1;
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
    program_type_loads(ProgramType::RawTracePoint, "raw tracepoint")?;
    Ok(format!(
        "raw tracepoint kfree_skb, arguments from BTF (skb #{}, reason #{}, NETFILTER_DROP = {}); \
         sk_buff layout from BTF; no tracefs needed; cause of each drop is inferred from \
         conntrack's counters{}",
        l.tp_skb_arg,
        l.tp_reason_arg,
        l.netfilter_drop,
        location_note(&l)
    ))
}

pub fn location_note(l: &KernelLayout) -> &'static str {
    if l.tp_location_arg != 0 {
        "; kfree_skb records where a packet was freed (nft_do_chain or nf_hook_slow): \
         `watch` checks at start whether this kernel frees nftables drops in nft_do_chain"
    } else {
        "; no drop-location evidence (no `location` argument or no symbol addresses)"
    }
}

/// Probes, with the programs attached, whether this kernel frees an
/// nftables rule's drop inside `nft_do_chain` (mainline 6.7 on, and
/// Debian's 6.1.192 too: found out, not assumed): one SYN to 127.0.0.1:9
/// in a throwaway namespace whose raw-priority chain drops it, then a look
/// at the class the kernel side counted it under. The namespace vanishes with this
/// function. None when it could not run (no nf_tables, say), which means
/// "no" for this start.
pub fn kernel_frees_nft_drops_in_nft_do_chain(source: &mut EventSource) -> Option<bool> {
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
            Some(in_chain)
        }
        Err(e) => {
            log::info!("drop location not probed ({e:#}): location evidence unused");
            None
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
    let program: &mut RawTracePoint = ebpf
        .program_mut(PROGRAM)
        .context("the eBPF object has no kfree_skb program")?
        .try_into()?;
    program
        .load()
        .context("the verifier rejected the kfree_skb program")?;
    program
        .attach(TRACEPOINT)
        .context("attaching to raw tracepoint kfree_skb")?;
    Ok(())
}
