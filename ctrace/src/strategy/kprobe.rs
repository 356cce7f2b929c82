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
use std::{collections::HashSet, path::Path};

use anyhow::{Context as _, bail};
use aya::programs::{KProbe, ProgramType};
use ctrace_common::KernelLayout;

use super::program_type_loads;
use crate::{
    kernel::{
        KernelFacts,
        btf::Btf,
        kallsyms::{Kallsyms, available_filter_functions},
    },
    loader::LoadOptions,
    source::EventSource,
    strategy::tracepoint,
    tier::{Capabilities, DropSight, Strategy, Tier},
};

/// (program, kernel function, required). Without the required ones the tier
/// cannot tell a table-full drop; the others add detail.
const PROBES: &[(&str, &str, bool)] = &[
    ("ctrace_ct_in", "nf_conntrack_in", true),
    ("ctrace_ct_in_ret", "nf_conntrack_in", true),
    ("ctrace_ct_alloc_ret", "__nf_conntrack_alloc", true),
    ("ctrace_early_drop", "early_drop", false),
    ("ctrace_early_drop_ret", "early_drop", false),
    ("ctrace_gc_worker", "gc_worker", false),
    ("ctrace_gc_worker_ret", "gc_worker", false),
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

/// Functions whose probes, together, keep occupancy current by events.
const ENTRY_EVENT_FUNCTIONS: &[&str] = &[
    "nf_ct_delete",
    "__nf_conntrack_confirm",
    "nf_conntrack_hash_check_insert",
];

const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe";

/// Which functions can be probed so that the probe fires for every call.
/// A function must exist under its exact name: a compiler clone
/// (`.isra.0`, `.constprop.0`) means some or all callers call the clone, and
/// a probe on the original would attach and never fire. Where tracefs lists
/// `available_filter_functions`, the function must be there too (it is
/// absent when inlined everywhere or marked notrace).
struct Probeable {
    syms: Kallsyms,
    ftrace: Option<HashSet<String>>,
}

impl Probeable {
    fn read(facts: &KernelFacts) -> anyhow::Result<Probeable> {
        let functions: Vec<&str> = PROBES.iter().map(|p| p.1).collect();
        Ok(Probeable {
            syms: Kallsyms::read(&functions)?,
            ftrace: facts
                .tracefs
                .as_ref()
                .ok()
                .and_then(|t| available_filter_functions(t, &functions)),
        })
    }

    /// Ok, or why a probe on `function` would not see every call.
    fn check(&self, function: &str) -> Result<(), String> {
        if !self.syms.has(function) {
            let clones = self.syms.clones(function);
            return Err(if clones.is_empty() {
                format!("{function} is not in /proc/kallsyms (nf_conntrack not loaded, or inlined)")
            } else {
                format!(
                    "{function} exists only as compiler clones ({}); a probe on it would never fire",
                    clones.join(", ")
                )
            });
        }
        if !self.syms.clones(function).is_empty() {
            return Err(format!(
                "{function} also has compiler clones ({}); calls to them would be missed",
                self.syms.clones(function).join(", ")
            ));
        }
        if let Some(ftrace) = &self.ftrace
            && !ftrace.contains(function)
        {
            return Err(format!(
                "{function} is not in available_filter_functions (inlined or notrace)"
            ));
        }
        Ok(())
    }
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
    vmlinux.require_64bit_pointers("the kprobe tier")?;
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
    // Only with CONFIG_NF_CONNTRACK_ZONES; entries are then keyed by zone
    // too (OVS/OVN), and occupancy must match dumps that carry it.
    l.ct_zone = off("nf_conn.zone").map_or(0, |z| z + off("nf_conntrack_zone.id").unwrap_or(0));
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
    let probeable = Probeable::read(facts)?;
    let mut required_missing = Vec::new();
    for (_, f, required) in PROBES {
        if *required && let Err(why) = probeable.check(f) {
            required_missing.push(why);
        }
    }
    required_missing.dedup();
    if !required_missing.is_empty() {
        bail!("{}", required_missing.join("; "));
    }
    let (l, with_tp) = layout(facts)?;
    program_type_loads(ProgramType::KProbe, "kprobe")?;
    let mut absent: Vec<String> = PROBES
        .iter()
        .filter_map(|(_, f, _)| probeable.check(f).err())
        .collect();
    absent.dedup();
    let mut why = String::from(
        "kretprobe on __nf_conntrack_alloc inside nf_conntrack_in: table-full drops are certain",
    );
    if !absent.is_empty() {
        why += &format!("; without: {}", absent.join("; "));
    }
    if with_tp {
        why += tracepoint::location_note(&l);
    } else {
        why += "; no kfree_skb tracepoint, so only conntrack's own drops are seen";
    }
    Ok(why)
}

pub fn start(facts: &KernelFacts, opts: &LoadOptions<'_>) -> anyhow::Result<EventSource> {
    let (layout, with_tracepoint) = layout(facts)?;
    log::debug!("kernel layout: {layout:?}");
    let probeable = Probeable::read(facts)?;
    let (mut ebpf, logger) = crate::loader::load(&layout, opts)?;
    let mut attached: HashSet<&str> = HashSet::new();
    for (name, function, required) in PROBES {
        let refused = opts
            .refused_probes
            .iter()
            .any(|f| f == function)
            .then(|| format!("{function} refused (--test-refuse-probe)"));
        if let Err(why) = refused.map_or_else(|| probeable.check(function), Err) {
            if *required {
                bail!("{why}");
            }
            log::warn!("{why}; {name} skipped");
            continue;
        }
        let program: &mut KProbe = ebpf
            .program_mut(name)
            .with_context(|| format!("the eBPF object has no {name}"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("the verifier rejected {name}"))?;
        match program.attach(function, 0) {
            Ok(_) => {
                attached.insert(name);
            }
            Err(e) if *required => {
                return Err(e).with_context(|| format!("attaching {name} to {function}"));
            }
            Err(e) => log::warn!("attaching {name} to {function}: {e}"),
        }
    }
    if with_tracepoint {
        tracepoint::attach(&mut ebpf)?;
    }
    let all_attached = |functions: &[&str]| {
        PROBES
            .iter()
            .filter(|(_, f, _)| functions.contains(f))
            .all(|(name, _, _)| attached.contains(name))
    };
    let entry_events = all_attached(ENTRY_EVENT_FUNCTIONS);
    if !entry_events {
        let missing: Vec<&str> = ENTRY_EVENT_FUNCTIONS
            .iter()
            .copied()
            .filter(|f| !all_attached(&[f]))
            .collect();
        log::warn!(
            "no probe on {}: occupancy is kept by periodic dumps (with ctnetlink's announcements in between, where it has them) instead of insert/delete events",
            missing.join(", ")
        );
    }
    let tier = Tier {
        strategy: Strategy::Kprobe,
        caps: Capabilities {
            exact_verdicts: true,
            entry_events,
            drop_location: with_tracepoint && tracepoint::capabilities(&layout).drop_location,
            gc_evictions: all_attached(&["gc_worker", "nf_ct_delete"]),
            fd_scoped_cleanup: true,
            needs_btf: true,
            drops: DropSight::Direct,
            passed_flows: false,
        },
    };
    EventSource::new(ebpf, tier, logger)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `probe` says of a function a probe would attach to but never
    /// (or not always) fire on.
    #[test]
    fn functions_a_probe_would_miss_are_refused_with_the_reason() {
        let kallsyms = "\
ffffffff81200000 t __nf_conntrack_alloc.isra.0 [nf_conntrack]
ffffffff81200400 t early_drop [nf_conntrack]
ffffffff81200800 t early_drop.constprop.0 [nf_conntrack]
ffffffff81200c00 t nf_conntrack_in [nf_conntrack]
ffffffff81201000 t gc_worker [nf_conntrack]
ffffffff81201400 t nf_ct_delete [nf_conntrack]
";
        let wanted: Vec<&str> = PROBES.iter().map(|p| p.1).collect();
        let dir = std::env::temp_dir().join(format!("ctrace-ftrace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // gc_worker is in kallsyms but not traceable (inlined into its
        // only caller, or notrace): a kprobe there may never fire.
        std::fs::write(
            dir.join("available_filter_functions"),
            "nf_conntrack_in [nf_conntrack]\nnf_ct_delete [nf_conntrack]\nearly_drop [nf_conntrack]\n",
        )
        .unwrap();
        let p = Probeable {
            syms: Kallsyms::parse(kallsyms.lines(), &wanted),
            ftrace: available_filter_functions(&dir, &wanted),
        };
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(p.check("nf_conntrack_in"), Ok(()));
        assert_eq!(p.check("nf_ct_delete"), Ok(()));
        let why = |f: &str| p.check(f).unwrap_err();
        assert!(
            why("__nf_conntrack_alloc")
                .contains("only as compiler clones (__nf_conntrack_alloc.isra.0)"),
            "{}",
            why("__nf_conntrack_alloc")
        );
        assert!(
            why("early_drop").contains("also has compiler clones"),
            "{}",
            why("early_drop")
        );
        assert!(
            why("gc_worker").contains("not in available_filter_functions"),
            "{}",
            why("gc_worker")
        );
        assert!(why("__nf_conntrack_confirm").contains("not in /proc/kallsyms"));
    }
}
