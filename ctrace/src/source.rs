//! The event source: a loaded program set and the maps it fills, whatever
//! tier loaded it. Programs stay attached exactly as long as this value
//! lives: nothing is pinned, so the kernel detaches them when ctrace exits,
//! however it exits.
use std::{collections::HashMap, time::Duration};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
};
use ctrace_common::{EvictKey, FlowKey, FlowStats, TotalCount, TotalKey, counter, evicted_by};
use tokio::io::unix::AsyncFd;

use crate::{
    event::{self, Clock, Flow, KernelEvent},
    judge::Judge,
    services::KernelIndex,
    strategy,
    tier::Tier,
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

/// What every tier's programs are loaded with.
#[derive(Clone)]
pub struct LoadOptions<'a> {
    pub services: &'a KernelIndex,
    pub kernel_log: bool,
    /// `ctrace_common::test_flags`; 0 outside tests.
    pub test_flags: u32,
    /// tc tier: interfaces to hook (empty: every non-loopback one).
    pub ifaces: Vec<String>,
    /// tc tier: flows held at once while their fate is open.
    pub pending_flows: u32,
    /// tc tier: how long an opening packet may take to leave or be answered.
    pub judge_window: Duration,
    /// tc tier: TCX or clsact; None to probe.
    pub tc_attach: Option<strategy::tc::AttachMode>,
    /// The node view's tracepoint and socket layout, when it loads.
    pub node_layout: Option<ctrace_common::connect::Layout>,
}

impl<'a> LoadOptions<'a> {
    pub const DEFAULT_PENDING_FLOWS: u32 = 32768;
    pub const DEFAULT_JUDGE_WINDOW: Duration = Duration::from_secs(1);

    pub fn new(services: &'a KernelIndex) -> Self {
        LoadOptions {
            services,
            kernel_log: false,
            test_flags: 0,
            ifaces: Vec::new(),
            pending_flows: Self::DEFAULT_PENDING_FLOWS,
            judge_window: Self::DEFAULT_JUDGE_WINDOW,
            tc_attach: None,
            node_layout: None,
        }
    }
}

/// Loads the object with this kernel's layout and fills the service map;
/// every tier starts here and then loads and attaches its own programs.
pub fn load(
    layout: &ctrace_common::KernelLayout,
    opts: &LoadOptions<'_>,
) -> anyhow::Result<(Ebpf, Option<KernelLogger>)> {
    load_with(layout, opts, without_node_maps)
}

/// The kernel allocates every map of a loaded object, used or not, and the
/// object holds both sides' maps: each load shrinks the other side's to
/// the smallest sizes the kernel accepts (a page for ring buffers).
pub fn without_node_maps(loader: &mut aya::EbpfLoader<'_>) {
    loader
        .map_max_entries("CONNECTING", 1)
        .map_max_entries("CONNECT_TOTALS", 1)
        .map_max_entries("CONNECT_EVENTS", page_size());
}

/// See [`without_node_maps`]: what the node side leaves of the router's.
pub fn without_router_maps(loader: &mut aya::EbpfLoader<'_>) {
    for name in [
        "FLOWS",
        "TOTALS",
        "EVICTED",
        "DEPTHS",
        "FRAMES",
        "VERDICTS",
        "PENDING",
        "UDP_TUPLES",
    ] {
        loader.map_max_entries(name, 1);
    }
    loader
        .map_max_entries("EVENTS", page_size())
        .map_max_entries("ENTRIES", page_size());
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(n).unwrap_or(4096)
}

/// [`load`], with a tier's own loader settings (map sizes, BTF).
pub fn load_with(
    layout: &ctrace_common::KernelLayout,
    opts: &LoadOptions<'_>,
    tier_settings: impl FnOnce(&mut aya::EbpfLoader<'_>),
) -> anyhow::Result<(Ebpf, Option<KernelLogger>)> {
    let layout = ctrace_common::KernelLayout {
        test_flags: opts.test_flags,
        ..*layout
    };
    let kernel_log = opts.kernel_log;
    let services = u32::try_from(opts.services.ports.len().max(1)).context("service map size")?;
    // aya-log's level gate: 0 silences every log site in the programs.
    let log_level: u8 = if kernel_log { 0xff } else { 0 };
    let mut loader = aya::EbpfLoader::new();
    loader
        .map_max_entries("SERVICES", services)
        .override_global("LAYOUT", &layout, true)
        .override_global("AYA_LOG_LEVEL", &log_level, false);
    if let Some(l) = &opts.node_layout {
        loader.override_global("CONNECT_LAYOUT", l, true);
    }
    tier_settings(&mut loader);
    let mut ebpf = loader.load(object()?).context("loading the eBPF object")?;
    {
        let map = ebpf
            .map_mut("SERVICES")
            .context("map SERVICES missing from the eBPF object")?;
        let mut map: BpfHashMap<_, u32, u16> = BpfHashMap::try_from(map)?;
        for (key, index) in &opts.services.ports {
            map.insert(key, index, 0)
                .context("filling the kernel's service map")?;
        }
    }
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
    pub gc_evictions: u64,
    pub inserts: u64,
    pub deletes: u64,
    pub alloc_failures: u64,
    /// Packets the kernel's totals map had no room for.
    pub totals_full: u64,
    /// Entry/return state found stale (a missed kretprobe) and reset.
    pub stale_state: u64,
    /// tc tier: flows opened on ingress, passed, repeated opening packets,
    /// and opening packets never judged (map full, key clash).
    pub tc_opened: u64,
    pub tc_passed: u64,
    pub tc_repeated: u64,
    pub tc_pending_full: u64,
    pub tc_key_clash: u64,
    /// tc tier, from user space's sweeps: flows pending now, judged
    /// dropped so far, and pending flows no watched interface owns.
    pub tc_pending: u64,
    pub tc_judged: u64,
    pub tc_unattributed: u64,
}

/// A flow's packet count as the kernel map holds it now.
#[derive(Clone, Copy, Debug)]
pub struct FlowCount {
    pub packets: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub tcp_flags: u8,
    /// `ctrace_common::class` bits of the flow's first packet.
    pub class: u8,
}

/// Who evicted an entry early.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Evictor {
    EarlyDrop,
    Gc,
}

/// The kernel's eviction count for one (netns, protocol, port, evictor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EvictedKey {
    pub netns: u64,
    pub proto: crate::event::Proto,
    pub dport: u16,
    pub by: Evictor,
}

/// One row of the kernel's drop totals, summed over CPUs: cumulative since
/// ctrace started, never reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelTotal {
    pub netns: u64,
    pub service: u16,
    pub proto: crate::event::Proto,
    pub class: u8,
    pub packets: u64,
    pub flows: u64,
}

pub struct EventSource {
    tier: Tier,
    /// Drops (EVENTS) and entry changes (ENTRIES), kept apart in the kernel
    /// so that a flood of the latter cannot crowd out the former.
    drops: AsyncFd<RingBuf<MapData>>,
    entries: AsyncFd<RingBuf<MapData>>,
    flows: PerCpuHashMap<MapData, FlowKey, FlowStats>,
    totals: PerCpuHashMap<MapData, TotalKey, TotalCount>,
    evicted: PerCpuHashMap<MapData, EvictKey, u64>,
    counters: PerCpuArray<MapData, u64>,
    clock: Clock,
    /// Events drained early (to forget a namespace's), handed out next.
    held: Vec<KernelEvent>,
    undecodable: u64,
    logger: Option<KernelLogger>,
    /// tc tier: where the programs are attached, and the verdicts.
    tc: Option<(strategy::tc::Hooks, Judge)>,
    last_sweep: Option<std::time::Instant>,
    // Keeps the programs loaded and attached; dropped last.
    ebpf: Ebpf,
}

impl Drop for EventSource {
    fn drop(&mut self) {
        // clsact filters outlive the process unless removed, and only from
        // inside their namespace; TCX links just close.
        if let Some((hooks, _)) = self.tc.as_mut() {
            hooks.detach_all();
        }
    }
}

impl EventSource {
    pub fn new(mut ebpf: Ebpf, tier: Tier, logger: Option<KernelLogger>) -> anyhow::Result<Self> {
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
        let totals = PerCpuHashMap::try_from(take(&mut ebpf, "TOTALS")?)?;
        let evicted = PerCpuHashMap::try_from(take(&mut ebpf, "EVICTED")?)?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, "COUNTERS")?)?;
        Ok(EventSource {
            tier,
            drops,
            entries,
            flows,
            totals,
            evicted,
            counters,
            clock: Clock::new(),
            held: Vec::new(),
            undecodable: 0,
            logger,
            tc: None,
            last_sweep: None,
            ebpf,
        })
    }

    /// Makes this the tc tier's source: drops come from `judge`'s sweeps.
    pub fn with_tc(mut self, hooks: strategy::tc::Hooks, judge: Judge) -> Self {
        self.tc = Some((hooks, judge));
        self
    }

    /// The tc tier's hooks, for output.
    pub fn tc_hooks(&self) -> Option<&strategy::tc::Hooks> {
        self.tc.as_ref().map(|(h, _)| h)
    }

    pub fn judge_counts(&self) -> Option<crate::judge::JudgeCounts> {
        self.tc.as_ref().map(|(_, j)| j.counts())
    }

    /// Periodic upkeep: the tc tier hooks interfaces that appeared in the
    /// namespaces `wanted` picks.
    pub fn maintain(&mut self, wanted: impl Fn(&crate::netns::NetNsInfo) -> bool) {
        if let Some((hooks, _)) = self.tc.as_mut() {
            hooks.refresh(&mut self.ebpf, wanted, false);
        }
    }

    /// Hooks every interface of the namespaces `wanted` picks now (tc).
    pub fn attach_now(&mut self, wanted: impl Fn(&crate::netns::NetNsInfo) -> bool) {
        if let Some((hooks, _)) = self.tc.as_mut() {
            hooks.refresh(&mut self.ebpf, wanted, true);
        }
    }

    /// The tc tier's judging horizon: counters sampled this long ago match
    /// the drops judged now. Zero for the other tiers.
    pub fn verdict_delay(&self) -> Duration {
        self.tc
            .as_ref()
            .map(|(_, j)| j.window())
            .unwrap_or(Duration::ZERO)
    }

    /// tc tier: whether a sweep is due.
    pub fn sweep_due(&self) -> bool {
        self.tc.is_some()
            && self
                .last_sweep
                .is_none_or(|at| at.elapsed() >= crate::judge::SWEEP_EVERY)
    }

    /// tc tier: judges what the pending map holds, up to `horizon`
    /// (CLOCK_MONOTONIC); `flush` at exit judges everything.
    pub fn sweep(&mut self, horizon: u64, out: &mut Vec<KernelEvent>, flush: bool) {
        let Some((hooks, judge)) = self.tc.as_mut() else {
            return;
        };
        self.last_sweep = Some(std::time::Instant::now());
        let now = event::monotonic_ns();
        judge.sweep(now, horizon, &self.clock, |i| hooks.netns_of(i), out, flush);
    }

    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// Whether drop locations tell nft rule drops apart, once probed.
    pub fn set_drop_location(&mut self, usable: bool) {
        self.tier.caps.drop_location = usable;
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Re-reads the wall clock's offset from the monotonic one: a router
    /// without an RTC starts before NTP has set the time.
    pub fn resync_clock(&mut self) {
        self.clock = Clock::new();
    }

    /// Waits until a ring buffer has something, or `readable` is polled
    /// again by a select with a timer.
    pub async fn readable(&mut self) -> anyhow::Result<()> {
        if self.tc.is_some() {
            // Nothing arrives by ring on the tc tier: wake for the sweep.
            tokio::time::sleep(crate::judge::SWEEP_EVERY).await;
            return Ok(());
        }
        let mut guard = tokio::select! {
            g = self.drops.readable_mut() => g?,
            g = self.entries.readable_mut() => g?,
        };
        guard.clear_ready();
        Ok(())
    }

    /// Moves every pending event of both rings into `out`, drops first.
    pub fn drain(&mut self, out: &mut Vec<KernelEvent>) {
        out.append(&mut self.held);
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
        let judge = self.judge_counts().unwrap_or_default();
        Ok(Counters {
            // A correlating tier announces flows without a ring buffer;
            // the ones it could not announce are its lost events.
            lost_events: sum(counter::LOST_EVENTS)? + judge.unannounced,
            tc_pending: judge.pending,
            tc_judged: judge.judged,
            tc_unattributed: judge.unattributed,
            netfilter_drops: sum(counter::NETFILTER_DROPS)?,
            undecoded: sum(counter::UNDECODED)? + self.undecodable,
            flow_map_errors: sum(counter::FLOW_MAP_ERRORS)?,
            evictions: sum(counter::EVICTIONS)?,
            gc_evictions: sum(counter::GC_EVICTIONS)?,
            inserts: sum(counter::INSERTS)?,
            deletes: sum(counter::DELETES)?,
            alloc_failures: sum(counter::ALLOC_FAILURES)?,
            totals_full: sum(counter::TOTALS_FULL)?,
            stale_state: sum(counter::STALE_STATE)?,
            tc_opened: sum(counter::TC_OPENED)?,
            tc_passed: sum(counter::TC_PASSED)?,
            tc_repeated: sum(counter::TC_REPEATED)?,
            tc_pending_full: sum(counter::TC_PENDING_FULL)?,
            tc_key_clash: sum(counter::TC_KEY_CLASH)?,
        })
    }

    /// The kernel's drop totals, every row.
    pub fn totals(&self) -> Vec<KernelTotal> {
        if let Some((_, judge)) = self.tc.as_ref() {
            return judge.totals();
        }
        self.totals
            .iter()
            // A key removed between key and value lookups reappears at the
            // next read with its count intact: counts are never reset.
            .filter_map(Result::ok)
            .map(|(k, per_cpu)| KernelTotal {
                netns: u64::from(k.netns),
                service: k.service,
                proto: crate::event::Proto::from_number(k.proto),
                class: k.class,
                packets: per_cpu.iter().map(|c| c.packets).sum(),
                flows: per_cpu.iter().map(|c| c.flows).sum(),
            })
            .collect()
    }

    /// Drops everything the kernel side holds of namespaces that no longer
    /// exist (totals rows, flows, queued events), so that a host that
    /// churns namespaces (pods) does not fill the maps.
    pub fn forget_netns(&mut self, gone: &[u64]) {
        let of_gone = |netns: u32| gone.contains(&u64::from(netns));
        remove_keys(&mut self.totals, |k: &TotalKey| of_gone(k.netns));
        if let Some((_, judge)) = self.tc.as_mut() {
            judge.forget_netns(gone);
        }
        remove_keys(&mut self.flows, |k: &FlowKey| of_gone(k.netns));
        let mut queued = Vec::new();
        self.drain(&mut queued);
        queued.retain(|e| {
            let netns = match e {
                KernelEvent::Drop(d) => d.flow.netns,
                KernelEvent::Entry(e) => e.flow.netns,
            };
            !gone.contains(&netns)
        });
        self.held.extend(queued);
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
                    by: if k.by == evicted_by::GC {
                        Evictor::Gc
                    } else {
                        Evictor::EarlyDrop
                    },
                };
                (n > 0).then_some((key, n))
            })
            .collect()
    }

    /// Current per-flow counts from the kernel's LRU map.
    pub fn flow_counts(&mut self) -> HashMap<Flow, FlowCount> {
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
                class: 0,
            };
            for s in per_cpu.iter().filter(|s| s.packets > 0) {
                c.packets += s.packets;
                if s.first_ns < c.first_ns {
                    c.first_ns = s.first_ns;
                    c.class = s.flags;
                }
                c.last_ns = c.last_ns.max(s.last_ns);
                c.tcp_flags |= s.tcp_flags;
            }
            if c.packets > 0 {
                out.insert(flow, c);
            }
        }
        if let Some((_, judge)) = self.tc.as_mut() {
            judge.flow_counts(&mut out);
        }
        out
    }
}

/// Removes the keys `doomed` picks from a per-CPU hash map. Keys are
/// collected first: deleting while iterating would restart the walk.
fn remove_keys<K: aya::Pod, V: aya::Pod>(
    map: &mut PerCpuHashMap<MapData, K, V>,
    doomed: impl Fn(&K) -> bool,
) {
    let keys: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| doomed(k))
        .collect();
    for k in keys {
        let _ = map.remove(&k);
    }
}
