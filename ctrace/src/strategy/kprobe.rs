//! The kprobe tier: kprobes and kretprobes on conntrack's own functions.
//!
//! Distro kernels (Debian, most others, OpenWrt builds with KPROBES) ship
//! conntrack as a module; its types are then described by the module's split
//! BTF (`/sys/kernel/btf/nf_conntrack`), read on top of vmlinux's.
//!
//! The failed allocation makes a table-full drop certain. `early_drop`,
//! `nf_ct_delete` and the confirm paths add evictions, inserts and deletes.
//! The kfree_skb tracepoint is attached too when it can be, for drops that
//! are not the table's (rules, invalid state); the programs make sure a
//! table-full packet is reported once.
use std::{collections::HashSet, fs, path::Path};

use anyhow::{Context as _, bail};
use aya::programs::{KProbe, ProgramType};
use ctrace_common::KernelLayout;

use super::program_type_loads;
use crate::{
    kernel::{KernelFacts, btf::Btf},
    source::EventSource,
    strategy::{Strategy, tracepoint},
};

/// (program, kernel function, required). Without the required ones the tier
/// cannot tell a table-full drop; the others add detail.
const PROBES: &[(&str, &str, bool)] = &[
    ("ctrace_ct_in", "nf_conntrack_in", true),
    ("ctrace_ct_in_ret", "nf_conntrack_in", true),
    ("ctrace_ct_alloc_ret", "__nf_conntrack_alloc", true),
    ("ctrace_early_drop", "early_drop", false),
    ("ctrace_early_drop_ret", "early_drop", false),
    ("ctrace_ct_delete", "nf_ct_delete", false),
    ("ctrace_ct_confirm", "__nf_conntrack_confirm", false),
    ("ctrace_ct_confirm_ret", "__nf_conntrack_confirm", false),
    (
        "ctrace_ct_hash_insert",
        "nf_conntrack_hash_check_insert",
        false,
    ),
    (
        "ctrace_ct_hash_insert_ret",
        "nf_conntrack_hash_check_insert",
        false,
    ),
];

const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe";

/// Functions the kernel can probe right now: conntrack's are only there
/// once the module is loaded.
fn kallsyms() -> anyhow::Result<HashSet<String>> {
    let text = fs::read_to_string("/proc/kallsyms").context("reading /proc/kallsyms")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .map(|s| s.split('.').next().unwrap_or(s).to_string())
        .collect())
}

/// Where struct nf_conn is described: the module's BTF when conntrack is a
/// module, vmlinux's when it is built in.
pub fn conntrack_btf(vmlinux: &Btf) -> anyhow::Result<Btf> {
    if Path::new("/sys/kernel/btf/nf_conntrack").exists() {
        Btf::module("nf_conntrack", vmlinux)
    } else {
        Ok(vmlinux.clone())
    }
}

/// The skb/net part as the tracepoint tier reads it (the tracepoint's own
/// fields only when the tracepoint is usable), plus struct nf_conn.
pub fn layout(facts: &KernelFacts) -> anyhow::Result<(KernelLayout, bool)> {
    let vmlinux = facts.btf.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut l, with_tracepoint) = match tracepoint::layout(facts) {
        Ok(l) => (l, true),
        Err(e) => {
            log::info!("kprobe tier without the kfree_skb tracepoint: {e:#}");
            (tracepoint::skb_layout(vmlinux)?, false)
        }
    };
    let ct = conntrack_btf(vmlinux)?;
    let off = |path: &str| ct.member_offset(path);
    l.tier = u32::from(ctrace_common::tier::KPROBE);
    l.ct_tuple = off("nf_conn.tuplehash")? + off("nf_conntrack_tuple_hash.tuple")?;
    l.ct_net = off("nf_conn.ct_net")? + off("possible_net_t.net")?;
    l.ct_status = off("nf_conn.status")?;
    l.ct_timeout = off("nf_conn.timeout")?;
    l.ct_tcp_state = off("nf_conn.proto")? + off("ip_ct_tcp.state")?;
    l.tuple_src_u3 = off("nf_conntrack_tuple.src")? + off("nf_conntrack_man.u3")?;
    l.tuple_src_port = off("nf_conntrack_tuple.src")? + off("nf_conntrack_man.u")?;
    l.tuple_l3num = off("nf_conntrack_tuple.src")? + off("nf_conntrack_man.l3num")?;
    l.tuple_dst_u3 = off("nf_conntrack_tuple.dst.u3")?;
    l.tuple_dst_port = off("nf_conntrack_tuple.dst.u")?;
    l.tuple_protonum = off("nf_conntrack_tuple.dst.protonum")?;
    Ok((l, with_tracepoint))
}

pub fn probe(facts: &KernelFacts) -> anyhow::Result<String> {
    if !Path::new(KPROBE_PMU).exists() {
        bail!("no kprobe PMU in /sys/bus/event_source/devices (CONFIG_KPROBES off)");
    }
    let syms = kallsyms()?;
    let missing: Vec<&str> = PROBES
        .iter()
        .filter(|(_, f, required)| *required && !syms.contains(*f))
        .map(|(_, f, _)| *f)
        .collect();
    if !missing.is_empty() {
        bail!(
            "conntrack functions not in /proc/kallsyms: {} (nf_conntrack not loaded?)",
            missing.join(", ")
        );
    }
    let (_, with_tp) = layout(facts)?;
    program_type_loads(ProgramType::KProbe, "kprobe")?;
    let absent: Vec<&str> = PROBES
        .iter()
        .filter(|(_, f, _)| !syms.contains(*f))
        .map(|(_, f, _)| *f)
        .collect();
    let mut why = String::from(
        "kretprobe on __nf_conntrack_alloc inside nf_conntrack_in: table-full drops are certain",
    );
    if !absent.is_empty() {
        why += &format!("; not probeable here (inlined?): {}", absent.join(", "));
    }
    if !with_tp {
        why += "; no kfree_skb tracepoint, so only table-full drops are seen";
    }
    Ok(why)
}

pub fn start(facts: &KernelFacts, kernel_log: bool) -> anyhow::Result<EventSource> {
    let (layout, with_tracepoint) = layout(facts)?;
    log::debug!("kernel layout: {layout:?}");
    let syms = kallsyms()?;
    let (mut ebpf, logger) = crate::source::load(&layout, kernel_log)?;
    for (name, function, required) in PROBES {
        if !syms.contains(*function) {
            if *required {
                bail!("{function} is not in /proc/kallsyms");
            }
            log::warn!("{function} cannot be probed on this kernel; {name} skipped");
            continue;
        }
        let program: &mut KProbe = ebpf
            .program_mut(name)
            .with_context(|| format!("the eBPF object has no {name}"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("the verifier rejected {name}"))?;
        if let Err(e) = program.attach(function, 0) {
            if *required {
                return Err(e).with_context(|| format!("attaching {name} to {function}"));
            }
            log::warn!("attaching {name} to {function}: {e}");
        }
    }
    if with_tracepoint {
        tracepoint::attach(&mut ebpf)?;
    }
    EventSource::new(ebpf, Strategy::Kprobe, logger)
}
