//! The event source: a loaded program set and the maps it fills, whatever
//! tier loaded it. Programs stay attached exactly as long as this value
//! lives: nothing is pinned, so the kernel detaches them when ctrace exits,
//! however it exits.
use std::collections::HashMap;

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
};
use ctrace_common::{EvictKey, FlowKey, FlowStats, counter};
use tokio::io::unix::AsyncFd;

use crate::{
    event::{self, Clock, Flow, KernelEvent},
    strategy::Strategy,
};

/// The programs, built by ctrace/build.rs for the target architecture.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ctrace-ebpf"));

pub fn object() -> anyhow::Result<&'static [u8]> {
    if OBJECT.is_empty() {
        bail!(
            "this ctrace was built without its eBPF programs (AYA_BUILD_SKIP); build it with `cargo xtask build`"
        );
    }
    Ok(OBJECT)
}

/// Forwards the programs' aya-log records to the `log` crate.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Loads the object with this kernel's layout; every tier starts here and
/// then loads and attaches its own programs.
pub fn load(
    layout: &ctrace_common::KernelLayout,
    kernel_log: bool,
) -> anyhow::Result<(Ebpf, Option<KernelLogger>)> {
    let mut ebpf = aya::EbpfLoader::new()
        .override_global("LAYOUT", layout, true)
        // aya-log's level gate: 0 silences every log site in the programs.
        .override_global(
            "AYA_LOG_LEVEL",
            &(if kernel_log { 0xffu8 } else { 0u8 }),
            false,
        )
        .load(object()?)
        .context("loading the eBPF object")?;
    let logger = kernel_logger(&mut ebpf, kernel_log);
    Ok((ebpf, logger))
}

fn kernel_logger(ebpf: &mut Ebpf, enabled: bool) -> Option<KernelLogger> {
    if !enabled {
        return None;
    }
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            log::warn!("kernel-side logging unavailable: {e}");
            None
        }
    }
}

/// Kernel-side counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub lost_events: u64,
    pub netfilter_drops: u64,
    pub undecoded: u64,
    pub flow_map_errors: u64,
    /// Kprobe tier only: conntrack's own decisions.
    pub evictions: u64,
    pub inserts: u64,
    pub deletes: u64,
    pub alloc_failures: u64,
}

/// A flow's packet count as the kernel map holds it now.
#[derive(Clone, Copy, Debug)]
pub struct FlowCount {
    pub packets: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub tcp_flags: u8,
    pub has_ct: bool,
    pub table_full: bool,
}

/// The kernel's eviction count for one (netns, protocol, port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EvictedKey {
    pub netns: u64,
    pub proto: crate::event::Proto,
    pub dport: u16,
}

pub struct EventSource {
    strategy: Strategy,
    /// Drops (EVENTS) and entry changes (ENTRIES), kept apart in the kernel
    /// so that a flood of the latter cannot crowd out the former.
    drops: AsyncFd<RingBuf<MapData>>,
    entries: AsyncFd<RingBuf<MapData>>,
    flows: PerCpuHashMap<MapData, FlowKey, FlowStats>,
    evicted: PerCpuHashMap<MapData, EvictKey, u64>,
    counters: PerCpuArray<MapData, u64>,
    clock: Clock,
    undecodable: u64,
    logger: Option<KernelLogger>,
    // Keeps the programs loaded and attached; dropped last.
    _ebpf: Ebpf,
}

impl EventSource {
    pub fn new(
        mut ebpf: Ebpf,
        strategy: Strategy,
        logger: Option<KernelLogger>,
    ) -> anyhow::Result<Self> {
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
        };
        let ring = |ebpf: &mut Ebpf, name: &str| -> anyhow::Result<AsyncFd<RingBuf<MapData>>> {
            let ring = RingBuf::try_from(take(ebpf, name)?)?;
            // SAFETY: the RingBuf owns its fd and lives inside the AsyncFd,
            // so the fd stays open and the same for the AsyncFd's lifetime.
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("registering ring buffer {name} with tokio: {e}"))
        };
        let drops = ring(&mut ebpf, "EVENTS")?;
        let entries = ring(&mut ebpf, "ENTRIES")?;
        let flows = PerCpuHashMap::try_from(take(&mut ebpf, "FLOWS")?)?;
        let evicted = PerCpuHashMap::try_from(take(&mut ebpf, "EVICTED")?)?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, "COUNTERS")?)?;
        Ok(EventSource {
            strategy,
            drops,
            entries,
            flows,
            evicted,
            counters,
            clock: Clock::new(),
            undecodable: 0,
            logger,
            _ebpf: ebpf,
        })
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Waits until a ring buffer has something, or `readable` is polled
    /// again by a select with a timer.
    pub async fn readable(&mut self) -> anyhow::Result<()> {
        let mut guard = tokio::select! {
            g = self.drops.readable_mut() => g?,
            g = self.entries.readable_mut() => g?,
        };
        guard.clear_ready();
        Ok(())
    }

    /// Moves every pending event of both rings into `out`, drops first.
    pub fn drain(&mut self, out: &mut Vec<KernelEvent>) {
        for ring in [self.drops.get_mut(), self.entries.get_mut()] {
            while let Some(item) = ring.next() {
                match event::decode(&item, &self.clock) {
                    Some(e) => out.push(e),
                    None => self.undecodable += 1,
                }
            }
        }
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }

    pub fn counters(&self) -> anyhow::Result<Counters> {
        let sum = |i: u32| -> anyhow::Result<u64> {
            Ok(self
                .counters
                .get(&i, 0)
                .context("reading COUNTERS")?
                .iter()
                .sum())
        };
        Ok(Counters {
            lost_events: sum(counter::LOST_EVENTS)?,
            netfilter_drops: sum(counter::NETFILTER_DROPS)?,
            undecoded: sum(counter::UNDECODED)? + self.undecodable,
            flow_map_errors: sum(counter::FLOW_MAP_ERRORS)?,
            evictions: sum(counter::EVICTIONS)?,
            inserts: sum(counter::INSERTS)?,
            deletes: sum(counter::DELETES)?,
            alloc_failures: sum(counter::ALLOC_FAILURES)?,
        })
    }

    /// Current eviction counts from the kernel's LRU map (kprobe tier;
    /// empty elsewhere).
    pub fn evicted_counts(&self) -> Vec<(EvictedKey, u64)> {
        self.evicted
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, per_cpu)| {
                let n: u64 = per_cpu.iter().sum();
                let key = EvictedKey {
                    netns: u64::from(k.netns),
                    proto: crate::event::Proto::from_number(k.proto),
                    dport: k.dport,
                };
                (n > 0).then_some((key, n))
            })
            .collect()
    }

    /// Current per-flow counts from the kernel's LRU map.
    pub fn flow_counts(&self) -> HashMap<Flow, FlowCount> {
        let mut out = HashMap::new();
        for entry in self.flows.iter() {
            // Entries can be evicted between key and value lookups; such a
            // flow simply shows up at the next read, or is carried by the
            // totals user space already holds.
            let Ok((key, per_cpu)) = entry else { continue };
            let Some(flow) = Flow::from_key(&key) else {
                continue;
            };
            let mut c = FlowCount {
                packets: 0,
                first_ns: u64::MAX,
                last_ns: 0,
                tcp_flags: 0,
                has_ct: false,
                table_full: false,
            };
            for s in per_cpu.iter().filter(|s| s.packets > 0) {
                c.packets += s.packets;
                c.first_ns = c.first_ns.min(s.first_ns);
                c.last_ns = c.last_ns.max(s.last_ns);
                c.tcp_flags |= s.tcp_flags;
                c.has_ct |= s.flags & ctrace_common::EVENT_F_HAS_CT != 0;
                c.table_full |= s.flags & ctrace_common::EVENT_F_TABLE_FULL != 0;
            }
            if c.packets > 0 {
                out.insert(flow, c);
            }
        }
        out
    }
}
