//! The event source: a loaded program set and the maps it fills, whatever
//! tier loaded it. Programs stay attached exactly as long as this value
//! lives: nothing is pinned, so the kernel detaches them when ctrace exits,
//! however it exits.
use std::{collections::HashMap, time::Duration};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
};
use ctrace_common::{EvictKey, FlowKey, FlowStats, TotalCount, TotalKey, counter, evicted_by};
use tokio::io::unix::AsyncFd;

use crate::{
    event::{self, Clock, Flow, KernelEvent, Passed},
    loader::KernelLogger,
    netns::NetNsInfo,
    readings::{
        CorrelationCounts, Counters, DeviceChoice, EvictedKey, Evictor, FlowCount, KernelTotal,
    },
    tier::Tier,
};

/// What a tier that sees drops by correlation, not in the act (tc), adds to
/// the source: its programs hold flows whose fate is still open, and it
/// judges them from user space. The source drives it on its schedule and
/// hands its verdicts on like ring-buffer drops; its totals stand in for
/// the kernel's.
pub trait Correlator: Send {
    /// Hooks what appeared in the namespaces `wanted` picks; `now` at start
    /// (otherwise it may wait for its own rescan period).
    fn attach(&mut self, ebpf: &mut Ebpf, wanted: &dyn Fn(&NetNsInfo) -> bool, now: bool);
    /// How long a flow may wait for its verdict: the counters sampled this
    /// long ago match the drops judged now.
    fn window(&self) -> Duration;
    /// How often verdicts are due.
    fn period(&self) -> Duration;
    /// Judges what happened before `horizon` (CLOCK_MONOTONIC) into `out`;
    /// `flush`, at exit, judges everything.
    fn judge(&mut self, horizon: u64, clock: &Clock, out: &mut Vec<KernelEvent>, flush: bool);
    fn counts(&self) -> CorrelationCounts;
    /// Cumulative drop totals, as the kernel's totals map holds them on the
    /// other tiers.
    fn totals(&self) -> Vec<KernelTotal>;
    /// Adds per-flow counts of the flows it judged dropped.
    fn flow_counts(&mut self, out: &mut HashMap<Flow, FlowCount>);
    fn forget_netns(&mut self, gone: &[u64]);
    /// The devices it decided on, hooked or not, and why.
    fn devices(&self) -> Vec<DeviceChoice> {
        Vec::new()
    }
    /// What it cannot see, in words.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }
    /// Removes what would outlive the process (clsact filters).
    fn detach(&mut self);
    /// New flows that passed since the last call, by namespace, opener
    /// and port, and how many the per-opener counts missed since the
    /// start; None for tiers that do not see flows pass. `passed_total`:
    /// the kernel's TC_PASSED counter.
    fn passed(&mut self, _passed_total: u64) -> Option<(Vec<(u64, Passed)>, u64)> {
        None
    }
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
    /// A correlating tier's judge of what its maps hold.
    correlator: Option<Box<dyn Correlator>>,
    last_sweep: Option<std::time::Instant>,
    /// Whether the kernel takes batch lookups (5.6+); cleared at the
    /// first refusal.
    batch_reads: bool,
    // Keeps the programs loaded and attached; dropped last.
    ebpf: Ebpf,
}

impl Drop for EventSource {
    fn drop(&mut self) {
        if let Some(c) = self.correlator.as_mut() {
            c.detach();
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
            correlator: None,
            last_sweep: None,
            batch_reads: true,
            ebpf,
        })
    }

    /// Makes this a correlating tier's source: drops come from its verdicts.
    pub fn with_correlator(mut self, correlator: Box<dyn Correlator>) -> Self {
        self.correlator = Some(correlator);
        self
    }

    /// A device-hooking tier's choices and warnings (empty elsewhere).
    pub fn devices(&self) -> (Vec<DeviceChoice>, Vec<String>) {
        self.correlator
            .as_ref()
            .map(|c| (c.devices(), c.warnings()))
            .unwrap_or_default()
    }

    fn correlation_counts(&self) -> CorrelationCounts {
        self.correlator
            .as_ref()
            .map(|c| c.counts())
            .unwrap_or_default()
    }

    /// Periodic upkeep: a correlating tier hooks what appeared in the
    /// namespaces `wanted` picks.
    pub fn maintain(&mut self, wanted: impl Fn(&NetNsInfo) -> bool) {
        if let Some(c) = self.correlator.as_mut() {
            c.attach(&mut self.ebpf, &wanted, false);
        }
    }

    /// Hooks everything of the namespaces `wanted` picks now.
    pub fn attach_now(&mut self, wanted: impl Fn(&NetNsInfo) -> bool) {
        if let Some(c) = self.correlator.as_mut() {
            c.attach(&mut self.ebpf, &wanted, true);
        }
    }

    /// A correlating tier's judging horizon: counters sampled this long ago
    /// match the drops judged now. Zero for tiers that see drops directly.
    pub fn verdict_delay(&self) -> Duration {
        self.correlator
            .as_ref()
            .map_or(Duration::ZERO, |c| c.window())
    }

    /// Whether a correlating tier's verdicts are due.
    pub fn sweep_due(&self) -> bool {
        self.correlator
            .as_ref()
            .is_some_and(|c| self.last_sweep.is_none_or(|at| at.elapsed() >= c.period()))
    }

    /// A correlating tier's verdicts on what happened up to `horizon`
    /// (CLOCK_MONOTONIC); `flush` at exit judges everything.
    pub fn sweep(&mut self, horizon: u64, out: &mut Vec<KernelEvent>, flush: bool) {
        let Some(c) = self.correlator.as_mut() else {
            return;
        };
        self.last_sweep = Some(std::time::Instant::now());
        c.judge(horizon, &self.clock, out, flush);
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
        if let Some(c) = self.correlator.as_ref() {
            // Nothing arrives by ring on a correlating tier: wake for the
            // verdicts.
            tokio::time::sleep(c.period()).await;
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

    /// See [`Correlator::passed`].
    pub fn passed(&mut self) -> Option<(Vec<(u64, Passed)>, u64)> {
        // The counter first: see `PassedFlows::read`.
        let total = self
            .counters
            .get(&counter::TC_PASSED, 0)
            .ok()?
            .iter()
            .sum::<u64>();
        self.correlator.as_mut()?.passed(total)
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
        let judge = self.correlation_counts();
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
            tc_unknown_device: sum(counter::TC_UNKNOWN_DEVICE)?,
            tc_encapsulated: sum(counter::TC_ENCAPSULATED)?,
        })
    }

    /// The kernel's drop totals, every row.
    pub fn totals(&self) -> Vec<KernelTotal> {
        if let Some(c) = self.correlator.as_ref() {
            return c.totals();
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
                held_back: per_cpu.iter().map(|c| c.held_back).sum(),
            })
            .collect()
    }

    /// Drops everything the kernel side holds of namespaces that no longer
    /// exist (totals rows, flows, queued events), so that a host that
    /// churns namespaces (pods) does not fill the maps.
    pub fn forget_netns(&mut self, gone: &[u64]) {
        let of_gone = |netns: u32| gone.contains(&u64::from(netns));
        remove_keys(&mut self.totals, |k: &TotalKey| of_gone(k.netns));
        if let Some(c) = self.correlator.as_mut() {
            c.forget_netns(gone);
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
    /// empty elsewhere), and whether the walk saw every key: a lookup that
    /// failed mid-walk leaves keys out that are still there.
    pub fn evicted_counts(&self) -> (Vec<(EvictedKey, u64)>, bool) {
        let mut complete = true;
        let counts = self
            .evicted
            .iter()
            .filter_map(|r| {
                complete &= r.is_ok();
                r.ok()
            })
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
            .collect();
        (counts, complete)
    }

    /// Current per-flow counts from the kernel's LRU map.
    pub fn flow_counts(&mut self) -> HashMap<Flow, FlowCount> {
        let mut out = HashMap::new();
        let batch = self
            .batch_reads
            .then(|| crate::kernel::map_batch::per_cpu_entries(&self.flows))
            .and_then(|r| {
                r.inspect_err(|e| {
                    log::debug!("batch lookup of the flow map failed ({e}): reading it key by key")
                })
                .ok()
            });
        self.batch_reads = batch.is_some();
        // Key by key, entries can be evicted between key and value lookups;
        // such a flow simply shows up at the next read, or is carried by the
        // totals user space already holds.
        let entries = batch.unwrap_or_else(|| {
            self.flows
                .iter()
                .filter_map(Result::ok)
                .map(|(k, v)| (k, v.iter().copied().collect()))
                .collect()
        });
        for (key, per_cpu) in entries {
            // Held back by the detail budget: counted in the totals,
            // never detail (reading them as lost events would undo the
            // budget).
            if per_cpu.iter().any(|s| s.held_back != 0) {
                continue;
            }
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
        if let Some(c) = self.correlator.as_mut() {
            c.flow_counts(&mut out);
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
