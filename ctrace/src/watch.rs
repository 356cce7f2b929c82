//! The tracing pipeline: kernel -> decode -> settle (ledger) -> label ->
//! aggregate -> sinks.
//!
//! One task drives it. Ring-buffer readiness wakes it for new flows; a
//! timer drives table sampling and summaries. Each settlement reads the
//! kernel's drop totals and, right after, the counters of the namespaces
//! they moved in; the ledger turns both into per-service, per-cause totals,
//! and the flows announced since are labelled with the cause their class
//! got. First sightings reach the sinks within a settlement (at most
//! `SETTLE_EVERY` after they were drained).
use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    pin::pin,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;

use crate::{
    aggregate::{Aggregator, DropRecord, EvictionGroup, FlowEntry},
    cause::{Cause, evidence},
    connects::{ConnectRow, ConnectView, Side},
    event::{DropEvent, EntryChange, EntryEvent, Flow, KernelEvent},
    kernel::KernelFacts,
    kernel::kmsg::{KmsgReader, TableFullWitness, Tally},
    ledger::{Agreement, DropGroup, Ledger},
    loader::LoadOptions,
    occupancy::{Breakdown, OccupancyTracker},
    readings::Counters,
    services::{Catalog, KernelIndex},
    sink::{Sink, Snapshot},
    source::EventSource,
    strategy::{self, Choice},
    table::{NetnsFilter, TableMonitor, TableView},
    tier::Strategy,
};

/// Settlements read every row of the kernel's totals; under a flood the
/// ring wakes the pipeline far more often than that is worth.
const SETTLE_EVERY: Duration = Duration::from_millis(25);
/// How often the wall clock's offset is re-read.
const CLOCK_RESYNC: Duration = Duration::from_secs(60);

pub struct WatchConfig {
    pub strategy: Choice,
    /// How often to re-dump tables for occupancy when no event tier keeps
    /// it current; None turns occupancy off.
    pub occupancy_every: Option<Duration>,
    pub interval: Duration,
    pub catalog: Catalog,
    pub netns: NetnsFilter,
    pub kernel_log: bool,
    /// Flows kept in detail.
    pub max_flows: usize,
    /// New flows each CPU announces per `interval` (0: no limit).
    pub detail_budget: u32,
    /// `ctrace_common::test_flags`.
    pub test_flags: u32,
    /// Kernel functions to treat as not probeable (tests).
    pub refused_probes: Vec<String>,
    /// tc tier: `--iface`, `--pending-flows`, `--judge-window`.
    pub ifaces: Vec<String>,
    pub pending_flows: u32,
    pub judge_window: Duration,
    pub tc_attach: Option<crate::loader::TcAttachMode>,
    /// Where /proc and /var/log/pods are read to name namespaces.
    pub host_root: std::path::PathBuf,
    /// `--side`: the router view (drops, tables), the node view (this
    /// host's connection attempts), or both. None: both, the node view
    /// only where this kernel can run it.
    pub side: Option<Side>,
    /// Namespaces whose connection attempts the node view reports; None:
    /// the same as `netns`.
    pub connect_netns: Option<NetnsFilter>,
}

/// What a finished run saw, for callers that judge it (the lab, tests).
pub struct Outcome {
    /// None when the router view was off (`--side node`).
    pub strategy: Option<Strategy>,
    pub counters: Counters,
    pub groups: Vec<DropGroup>,
    pub evictions: Vec<EvictionGroup>,
    pub agreement: Vec<Agreement>,
    pub tables: Vec<TableView>,
    pub flows: Vec<FlowEntry>,
    pub occupancy: Vec<(u64, &'static str, Breakdown)>,
    pub connects: Vec<ConnectRow>,
}

/// Who holds the entries: a baseline dump, then kept by insert/delete
/// events on tiers that have them, else re-dumped periodically.
struct Occupancy {
    tracker: OccupancyTracker,
    every: Duration,
    last_dump: Option<Instant>,
    lost_at_dump: u64,
    hz: u32,
}

pub struct Watcher {
    /// The router view's drop tier; None with `--side node`.
    source: Option<EventSource>,
    /// The node view; None with `--side router`.
    connects: Option<NodeView>,
    monitor: TableMonitor,
    ledger: Ledger,
    agg: Aggregator,
    catalog: Catalog,
    interval: Duration,
    /// Drained drop events waiting for the settlement that labels them.
    pending: Vec<DropEvent>,
    last_settle: Option<Instant>,
    /// Packets in the kernel's totals per namespace at the last settlement:
    /// only namespaces whose totals moved need their counters read.
    settled_packets: HashMap<u64, u64>,
    /// Kernel flow-map entries older than this were already considered.
    late_cutoff_ns: u64,
    last_clock_sync: Instant,
    started: Instant,
    occupancy: Option<Occupancy>,
    /// The final sweep judged every pending flow: settle against now.
    flushed: bool,
    /// Correlating tiers: the counter sample per namespace that the latest
    /// sweep's verdicts settle against.
    verdict_samples: HashMap<u64, crate::table::Sample>,
    /// The kernel log, read for table-full lines since start; None when
    /// /dev/kmsg cannot be opened.
    kmsg: Option<KernelLog>,
}

/// The node view and the namespaces it reports.
struct NodeView {
    view: ConnectView,
    filter: NetnsFilter,
    /// Namespaces by inode with their /run/netns names, for the filter;
    /// refreshed every tick.
    names: std::collections::BTreeMap<u64, Option<String>>,
    /// Per namespace: its events at the last tick, and since when they
    /// have not moved.
    activity: HashMap<u64, (u64, Instant)>,
}

impl NodeView {
    /// Rows of a namespace that is gone from every scan and has not moved
    /// for this long are dropped, so that pods coming and going cannot fill
    /// the kernel's totals map. (A namespace held only by a descriptor is
    /// invisible to the scan, hence the grace.)
    const FORGET_IDLE: Duration = Duration::from_secs(300);

    fn wants(&self, inode: u64) -> bool {
        self.filter.matches_inode(inode, &self.names)
    }

    fn rows(&self) -> Vec<ConnectRow> {
        let mut rows = self.view.rows();
        rows.retain(|r| self.wants(r.netns));
        rows
    }

    fn forget_idle_vanished(&mut self) {
        let Ok(alive) = crate::netns::discover() else {
            return;
        };
        self.names = alive.into_iter().map(|i| (i.inode, i.name)).collect();
        let mut events: HashMap<u64, u64> = HashMap::new();
        for r in self.view.rows() {
            *events.entry(r.netns).or_default() +=
                r.attempts + r.syn_retransmits + r.synack_retransmits + r.established + r.failed;
        }
        let now = Instant::now();
        self.activity.retain(|ns, _| events.contains_key(ns));
        let mut gone = Vec::new();
        for (ns, n) in events {
            let a = self.activity.entry(ns).or_insert((n, now));
            if a.0 != n {
                *a = (n, now);
            } else if !self.names.contains_key(&ns) && a.1.elapsed() >= Self::FORGET_IDLE {
                gone.push(ns);
            }
        }
        if !gone.is_empty() {
            log::info!("node view: forgetting idle namespaces that are gone: {gone:?}");
            self.view.forget_netns(&gone);
        }
    }
}

/// The kernel log as a witness: new records since start, summed.
struct KernelLog {
    reader: KmsgReader,
    tally: Tally,
    witnesses: Vec<TableFullWitness>,
}

/// SIGINT/SIGTERM, caught from the moment this is made: install it before
/// telling anyone we are running, or an early signal kills us without the
/// final summary.
pub struct Shutdown {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Shutdown {
    pub fn install() -> anyhow::Result<Shutdown> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Shutdown {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    pub async fn wait(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

enum Wake {
    Stop,
    Events(anyhow::Result<()>),
    Connects(anyhow::Result<()>),
    Tick,
}

/// Waits on a view's ring buffer; a view that is off never wakes.
async fn readable<T>(
    view: Option<&mut T>,
    wait: impl AsyncFnOnce(&mut T) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    match view {
        Some(v) => wait(v).await,
        None => std::future::pending().await,
    }
}

impl Watcher {
    /// Probes the kernel, picks and attaches a strategy, and takes the
    /// first sample of every table, which later drops are measured against.
    pub fn start(cfg: WatchConfig, facts: &KernelFacts) -> anyhow::Result<Watcher> {
        let index: KernelIndex = cfg.catalog.kernel_index()?;
        let opts = LoadOptions {
            kernel_log: cfg.kernel_log,
            test_flags: cfg.test_flags,
            refused_probes: cfg.refused_probes.clone(),
            ifaces: cfg.ifaces.clone(),
            pending_flows: cfg.pending_flows,
            judge_window: cfg.judge_window,
            tc_attach: cfg.tc_attach,
            detail_budget: cfg.detail_budget,
            detail_window: cfg.interval,
            ..LoadOptions::new(&index)
        };
        let side = cfg.side.unwrap_or(Side::Both);
        // The router view first: its start-up experiment (a dropped SYN
        // in a throwaway namespace) must not reach the node view as a
        // failed connection of this host.
        let source = if side.router() {
            Some(Self::start_router(&cfg, facts, &opts)?)
        } else {
            None
        };
        let node = if side.node() {
            match ConnectView::start(facts, &opts) {
                Ok(view) => Some(view),
                Err(e) if cfg.side.is_none() => {
                    log::warn!(
                        "node view left out: {} (the router view runs; --side router \
                         silences this)",
                        crate::error::render(&e, false)
                    );
                    None
                }
                Err(e) => {
                    return Err(e.context(
                        "starting the node view (this host's connection attempts; \
                         --side router runs without it)",
                    ));
                }
            }
        } else {
            None
        };
        let connects = if let Some(view) = node {
            Some(NodeView {
                view,
                filter: cfg
                    .connect_netns
                    .clone()
                    .unwrap_or_else(|| cfg.netns.clone()),
                names: crate::netns::discover()
                    .map(|all| all.into_iter().map(|i| (i.inode, i.name)).collect())
                    .unwrap_or_default(),
                activity: HashMap::new(),
            })
        } else {
            None
        };
        let mut monitor = TableMonitor::new(cfg.netns);
        monitor.set_host_root(&cfg.host_root);
        if source.is_some() {
            monitor.discover();
        }
        // Without the router view nothing is ever settled: the ledger stays
        // empty, whatever it is told the tier sees.
        let caps = source.as_ref().map_or_else(
            || crate::strategy::tracepoint::capabilities(&Default::default()),
            |s| s.tier().caps,
        );
        let mut ledger = Ledger::new(caps, index.names.clone());
        for inode in monitor.inodes() {
            ledger.baseline(inode, monitor.latest(inode));
        }
        let occupancy = cfg
            .occupancy_every
            .filter(|_| source.is_some())
            .map(|every| Occupancy {
                tracker: OccupancyTracker::new(cfg.catalog.clone()),
                every,
                last_dump: None,
                lost_at_dump: 0,
                hz: facts.hz.max(1),
            });
        let kmsg = match source.as_ref().map(|_| KmsgReader::open()) {
            Some(Ok(reader)) => Some(KernelLog {
                reader,
                tally: Tally::default(),
                witnesses: Vec::new(),
            }),
            Some(Err(e)) => {
                log::info!("no kernel log witness: {e:#}");
                None
            }
            None => None,
        };
        match &source {
            Some(s) => log::info!(
                "tracing with strategy {} on kernel {}",
                s.tier().strategy,
                facts.release
            ),
            None => log::info!("node view only on kernel {}", facts.release),
        }
        Ok(Watcher {
            source,
            connects,
            monitor,
            ledger,
            agg: Aggregator::new(cfg.max_flows),
            catalog: cfg.catalog,
            interval: cfg.interval,
            pending: Vec::new(),
            last_settle: None,
            settled_packets: HashMap::new(),
            late_cutoff_ns: 0,
            last_clock_sync: Instant::now(),
            started: Instant::now(),
            occupancy,
            flushed: false,
            verdict_samples: HashMap::new(),
            kmsg,
        })
    }

    /// Probes the drop tiers, then starts the chosen one.
    fn start_router(
        cfg: &WatchConfig,
        facts: &KernelFacts,
        opts: &LoadOptions<'_>,
    ) -> anyhow::Result<EventSource> {
        let verdicts = strategy::probe(facts);
        for v in &verdicts {
            log::debug!(
                "strategy {}: usable={} ({})",
                v.strategy,
                v.usable,
                v.reason
            );
        }
        let chosen = strategy::select(cfg.strategy, &verdicts)?;
        let mut source = strategy::start(chosen, facts, opts)
            .with_context(|| format!("starting the {chosen} strategy"))?;
        log::debug!("tier capabilities: {:?}", source.tier().caps);
        let filter = cfg.netns.clone();
        source.attach_now(|i| filter.matches(i));
        Ok(source)
    }

    pub fn monitor_mut(&mut self) -> &mut TableMonitor {
        &mut self.monitor
    }

    /// Starts the ledger of a namespace the caller added to the monitor.
    pub fn baseline(&mut self, inode: u64) {
        self.ledger.baseline(inode, self.monitor.latest(inode));
    }

    /// Whether this host's connection attempts are traced (`--side`).
    pub fn has_node_view(&self) -> bool {
        self.connects.is_some()
    }

    /// The drop tier; None without the router view.
    pub fn strategy(&self) -> Option<Strategy> {
        self.tier().map(|t| t.strategy)
    }

    fn tier(&self) -> Option<crate::tier::Tier> {
        self.source.as_ref().map(EventSource::tier)
    }

    /// The router view's source, for the steps that run only with it.
    fn src(&self) -> &EventSource {
        self.source
            .as_ref()
            .expect("router steps run only with the router view")
    }

    fn src_mut(&mut self) -> &mut EventSource {
        self.source
            .as_mut()
            .expect("router steps run only with the router view")
    }

    /// Runs until `stop` resolves, then drains what is left and reports
    /// once more with `is_final`.
    pub async fn run(
        &mut self,
        sinks: &mut [Box<dyn Sink>],
        stop: impl Future<Output = ()>,
    ) -> anyhow::Result<Outcome> {
        let mut stop = pin!(stop);
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; the start sample was just taken
        loop {
            let wake = tokio::select! {
                _ = &mut stop => Wake::Stop,
                r = readable(self.source.as_mut(), async |s| s.readable().await) => Wake::Events(r),
                r = readable(self.connects.as_mut(), async |n| n.view.readable().await) => {
                    Wake::Connects(r)
                }
                _ = tick.tick() => Wake::Tick,
            };
            match wake {
                Wake::Stop => break,
                Wake::Events(r) => {
                    r?;
                    self.process_events(sinks, false)?;
                }
                Wake::Connects(r) => {
                    r?;
                    self.process_connects(sinks)?;
                }
                Wake::Tick => self.periodic(sinks, false)?,
            }
        }
        self.periodic(sinks, true)?;
        self.outcome()
    }

    /// Drains both rings; entry events update occupancy at once, drop
    /// events wait for the next settlement (now, if one is due or `force`).
    fn process_events(&mut self, sinks: &mut [Box<dyn Sink>], force: bool) -> anyhow::Result<()> {
        let Some(source) = self.source.as_mut() else {
            return Ok(());
        };
        let mut events = Vec::new();
        source.drain(&mut events);
        let correlating = !source.verdict_delay().is_zero();
        let swept = correlating && source.sweep_due();
        if swept {
            self.sweep(&mut events);
        }
        for e in events {
            match e {
                KernelEvent::Drop(d) if self.monitor.wants(d.flow.netns) => self.pending.push(d),
                KernelEvent::Drop(_) => {}
                KernelEvent::Entry(e) if self.monitor.wants(e.flow.netns) => self.entry_changed(&e),
                KernelEvent::Entry(_) => {}
            }
        }
        let due = self
            .last_settle
            .is_none_or(|at| at.elapsed() >= SETTLE_EVERY);
        let settle = if correlating {
            // Only right after a sweep: credit carried over one settlement
            // must meet the packets of the next sweep, not an empty tick.
            swept
        } else {
            force || (due && !self.pending.is_empty())
        };
        if settle {
            self.settle(sinks, force || correlating)?;
        }
        Ok(())
    }

    /// Reads the kernel's totals, then the counters of every namespace
    /// they moved in (all of them when `all`), settles the ledger, and
    /// labels and reports the flows announced since the last settlement.
    fn settle(&mut self, sinks: &mut [Box<dyn Sink>], all: bool) -> anyhow::Result<()> {
        self.last_settle = Some(Instant::now());
        let rows = self.src().totals();
        let mut packets: HashMap<u64, u64> = HashMap::new();
        for r in &rows {
            *packets.entry(r.netns).or_default() += r.packets;
        }
        let mut moved: BTreeSet<u64> = packets
            .iter()
            .filter(|(ns, n)| self.settled_packets.get(ns) != Some(n) && self.monitor.wants(**ns))
            .map(|(ns, _)| *ns)
            .collect();
        self.settled_packets = packets;
        moved.extend(self.pending.iter().map(|d| d.flow.netns));
        if moved.iter().any(|ns| !self.monitor.knows(*ns)) {
            // Namespaces with drops are watched even past the cap.
            let with_drops: Vec<u64> = moved.iter().copied().collect();
            self.monitor.discover_preferring(&with_drops);
        }
        if all {
            moved.extend(self.monitor.inodes());
        }
        for ns in moved {
            if !self.monitor.wants(ns) {
                continue;
            }
            // Rows first, counters right after: see ledger.rs. A tier that
            // judges drops a window after they happen settles them against
            // the counters of that time; the last settlement flushes all.
            let stats = if self.src().verdict_delay().is_zero() || self.flushed {
                self.monitor.sample(ns)
            } else {
                match self.verdict_samples.get(&ns) {
                    Some(s) => Some(s.stats),
                    // No sample old enough yet: its verdicts wait too.
                    None => continue,
                }
            };
            let ns_rows: Vec<_> = rows.iter().filter(|r| r.netns == ns).copied().collect();
            log::debug!(
                "settle netns {ns}: {} packets in totals, drop counter {:?}",
                ns_rows.iter().map(|r| r.packets).sum::<u64>(),
                stats.map(|s| s.drop)
            );
            self.ledger.settle(ns, &ns_rows, stats);
        }
        let pending = std::mem::take(&mut self.pending);
        for d in pending {
            self.report(sinks, d.flow, d.class, d.tcp_flags, d.time, d.mono_ns)?;
        }
        Ok(())
    }

    /// A correlating tier's sweep. Its verdicts lag the drops by its
    /// window, so each namespace settles them against the newest counter
    /// sample at least a window old, and the sweep judges only what
    /// happened before the oldest of those samples (less a guard for the
    /// ingress hook running just before conntrack counts): a packet is
    /// never counted before the counter rise it caused, and a rise counted
    /// early waits one settlement for its packet.
    fn sweep(&mut self, events: &mut Vec<KernelEvent>) {
        const GUARD_NS: u64 = 20_000_000;
        self.monitor.sample_all();
        let now = crate::event::monotonic_ns();
        let delay = u64::try_from(self.src().verdict_delay().as_nanos()).unwrap_or(u64::MAX);
        let target = now.saturating_sub(delay);
        self.verdict_samples = self
            .monitor
            .inodes()
            .into_iter()
            .filter_map(|ns| Some((ns, self.monitor.sampled_by(ns, target)?)))
            .collect();
        let horizon = self
            .verdict_samples
            .values()
            .map(|s| s.mono_ns)
            .min()
            .unwrap_or(target)
            .saturating_sub(GUARD_NS);
        self.src_mut().sweep(horizon, events, false);
    }

    fn entry_changed(&mut self, e: &EntryEvent) {
        // Without every insert/delete probe, events would keep a one-sided
        // count between dumps (inserts without their deletes): dumps alone
        // keep occupancy then.
        if !self.tier().is_some_and(|t| t.caps.entry_events) {
            return;
        }
        let Some(occ) = self.occupancy.as_mut() else {
            return;
        };
        let entry = e.entry(occ.hz);
        match e.change {
            EntryChange::Inserted => occ.tracker.insert(e.flow.netns, &entry),
            EntryChange::Evicted | EntryChange::GcEvicted | EntryChange::Deleted => {
                occ.tracker.remove(e.flow.netns, &entry)
            }
            EntryChange::InsertFailed => {}
        }
    }

    /// Re-dumps tables when occupancy is due: every period (and for the
    /// final report) on tiers without entry events; on event tiers only for
    /// namespaces not yet baselined, and after lost events (which may have
    /// been inserts or deletes).
    fn refresh_occupancy(&mut self, lost_events: u64, is_final: bool) {
        let events_tier = self.tier().is_some_and(|t| t.caps.entry_events);
        let Some(occ) = self.occupancy.as_mut() else {
            return;
        };
        let all_due = match occ.last_dump {
            None => true,
            Some(_) if is_final => !events_tier,
            Some(at) => {
                at.elapsed() >= occ.every && (!events_tier || lost_events > occ.lost_at_dump)
            }
        };
        let mut dumped = false;
        for inode in self.monitor.inodes() {
            if !all_due && occ.tracker.source(inode).is_some() {
                continue;
            }
            let Some(reader) = self.monitor.reader(inode) else {
                continue;
            };
            if let Err(e) = occ.tracker.baseline_from(inode, reader) {
                log::debug!("netns {inode}: occupancy dump failed: {e:#}");
            }
            dumped = true;
        }
        if all_due || (dumped && occ.last_dump.is_none()) {
            occ.last_dump = Some(Instant::now());
            occ.lost_at_dump = lost_events;
        }
        if dumped {
            // A dump builds the new breakdown beside the old one: hand the
            // old one's pages back, or glibc may keep them and resident
            // memory steps up by a breakdown's size (megabytes for a large
            // table) for good.
            crate::kernel::return_freed_memory();
        }
    }

    fn occupancy_views(&self, tables: &[TableView]) -> Vec<(u64, &'static str, Breakdown)> {
        let Some(occ) = self.occupancy.as_ref() else {
            return vec![];
        };
        tables
            .iter()
            .filter_map(|t| {
                let b = occ.tracker.breakdown(t.inode)?;
                let source = match occ.tracker.source(t.inode)? {
                    crate::occupancy::Source::Events => "events",
                    _ if self.tier().is_some_and(|t| t.caps.entry_events) => "dump+events",
                    _ => "periodic_dump",
                };
                Some((t.inode, source, b))
            })
            .collect()
    }

    /// Labels a flow with the cause its class got in the latest settlement
    /// and reports it if it is new to the detail.
    fn report(
        &mut self,
        sinks: &mut [Box<dyn Sink>],
        flow: Flow,
        class: u8,
        tcp_flags: u8,
        time: SystemTime,
        mono_ns: u64,
    ) -> anyhow::Result<()> {
        let (cause, why) = self
            .ledger
            .label(flow.netns, class)
            .unwrap_or((Cause::Unknown, evidence::NO_BASELINE));
        let rec = DropRecord {
            time,
            flow,
            service: self
                .catalog
                .lookup(flow.proto, flow.dst.port())
                .map(str::to_string),
            cause,
            evidence: why,
            tcp_flags,
            strategy: self.src().tier().strategy,
        };
        if self.agg.observe(rec.clone(), mono_ns) {
            for s in sinks.iter_mut() {
                s.dropped_flow(&rec).context("writing output")?;
            }
        }
        Ok(())
    }

    /// Labels and reports the failed connection attempts the node view
    /// has announced since the last call.
    fn process_connects(&mut self, sinks: &mut [Box<dyn Sink>]) -> anyhow::Result<()> {
        let Some(node) = self.connects.as_mut() else {
            return Ok(());
        };
        let mut failures = Vec::new();
        node.view.drain(&mut failures);
        for mut f in failures {
            if !node.wants(f.flow.netns) {
                continue;
            }
            f.service = self
                .catalog
                .lookup(f.flow.proto, f.flow.dst.port())
                .map(str::to_string);
            for s in sinks.iter_mut() {
                s.connect_failure(&f).context("writing output")?;
            }
        }
        Ok(())
    }

    fn periodic(&mut self, sinks: &mut [Box<dyn Sink>], is_final: bool) -> anyhow::Result<()> {
        if self.last_clock_sync.elapsed() >= CLOCK_RESYNC {
            if let Some(s) = self.source.as_mut() {
                s.resync_clock();
            }
            if let Some(n) = self.connects.as_mut() {
                n.view.resync_clock();
            }
            self.last_clock_sync = Instant::now();
        }
        self.forget_vanished();
        self.process_connects(sinks)?;
        let counters = match self.source.is_some() {
            true => self.router_periodic(sinks, is_final)?,
            false => Counters::default(),
        };
        let tables = self.monitor.views(&self.ledger.netns_with_drops());
        let occupancy = self.occupancy_views(&tables);
        let (connects, connect_counters) = match self.connects.as_mut() {
            Some(n) => (n.rows(), Some(n.view.counters()?)),
            None => (Vec::new(), None),
        };
        let (devices, device_warnings) = self
            .source
            .as_ref()
            .map(|s| s.devices())
            .unwrap_or_default();
        let snap = Snapshot {
            time: SystemTime::now(),
            elapsed: self.started.elapsed(),
            strategy: self.strategy(),
            caps: self.tier().map(|t| t.caps),
            counters,
            tables,
            occupancy,
            groups: self.ledger.groups(),
            evictions: self.agg.evictions(|n| self.monitor.wants(n)),
            agreement: self.ledger.agreement(),
            top_flows: self.agg.top_flows(10),
            flows_forgotten: self.agg.forgotten(),
            held_back: self
                .ledger
                .held_back()
                .into_iter()
                .filter(|h| self.monitor.wants(h.netns))
                .collect(),
            kernel_log: self.kmsg.as_ref().map(|k| k.tally.clone()),
            connects,
            connect_counters,
            devices,
            device_warnings,
            sink_health: sinks.iter().filter_map(|s| s.health()).collect(),
            netns_left_out: self.monitor.left_out(),
            is_final,
        };
        for s in sinks.iter_mut() {
            s.summary(&snap).context("writing output")?;
        }
        Ok(())
    }

    /// The router view's share of a tick: the last sweep when final,
    /// settlements, flows whose events were lost, evictions, occupancy and
    /// the kernel log. Returns the kernel side's counters.
    fn router_periodic(
        &mut self,
        sinks: &mut [Box<dyn Sink>],
        is_final: bool,
    ) -> anyhow::Result<Counters> {
        let filter = self.monitor.filter().clone();
        self.src_mut().maintain(|i| filter.matches(i));
        if is_final {
            self.flushed = true;
            let mut last = Vec::new();
            self.src_mut().sweep(u64::MAX, &mut last, true);
            self.pending
                .extend(last.into_iter().filter_map(|e| match e {
                    KernelEvent::Drop(d) if self.monitor.wants(d.flow.netns) => Some(d),
                    _ => None,
                }));
        }
        self.process_events(sinks, true)?;
        let counts = self.src_mut().flow_counts();
        // Flows the map holds but no event announced: their event was lost
        // (ring buffer full). Their packets are in the totals already; the
        // detail learns of them now.
        let clock = self.src().clock();
        let cutoff = self.late_cutoff_ns;
        let mut late: Vec<(Flow, crate::readings::FlowCount)> = counts
            .iter()
            .filter(|(f, c)| {
                c.first_ns > cutoff && !self.agg.is_known(f) && self.monitor.wants(f.netns)
            })
            .map(|(f, c)| (*f, *c))
            .collect();
        self.late_cutoff_ns = counts.values().map(|c| c.first_ns).max().unwrap_or(cutoff);
        late.sort_by_key(|(_, c)| c.first_ns);
        for (flow, c) in late {
            self.report(
                sinks,
                flow,
                c.class,
                c.tcp_flags,
                clock.wall(c.first_ns),
                c.first_ns,
            )?;
        }
        self.agg.update_counts(&counts, &clock);
        // Every namespace's keys: which the map let go is told by their
        // absence, and a namespace `--netns` misses for one discovery must
        // not look like that. The output picks the watched ones.
        let (evicted, complete) = self.src().evicted_counts();
        let catalog = &self.catalog;
        self.agg
            .update_evictions(&evicted, complete, |proto, port| {
                catalog.lookup(proto, port).map(str::to_string)
            });
        let counters = self.src().counters()?;
        self.refresh_occupancy(counters.lost_events, is_final);
        self.read_kernel_log();
        Ok(counters)
    }

    /// Adds the kernel log's new table-full witnesses to the tally; lines
    /// that name a namespace outside `--netns` are left out.
    fn read_kernel_log(&mut self) {
        let Some(k) = self.kmsg.as_mut() else {
            return;
        };
        k.witnesses.clear();
        if let Err(e) = k.reader.poll(&mut k.witnesses) {
            log::warn!("kernel log no longer readable: {e:#}");
            self.kmsg = None;
            return;
        }
        for w in &k.witnesses {
            if w.netns.is_none_or(|ns| self.monitor.wants(ns)) {
                k.tally.add(w);
            }
        }
        k.tally.overwritten = k.reader.overwritten();
    }

    /// Forgets namespaces that vanished: their kernel rows, ledger,
    /// flows and occupancy.
    fn forget_vanished(&mut self) {
        if let Some(n) = self.connects.as_mut() {
            n.forget_idle_vanished();
        }
        let Some(source) = self.source.as_mut() else {
            return;
        };
        let before: Vec<u64> = self.monitor.inodes();
        self.monitor
            .discover_preferring(&self.ledger.netns_with_drops());
        let alive: HashMap<u64, ()> = self.monitor.inodes().into_iter().map(|i| (i, ())).collect();
        let gone: Vec<u64> = before
            .into_iter()
            .filter(|i| !alive.contains_key(i))
            .collect();
        if gone.is_empty() {
            return;
        }
        log::info!("namespaces gone: {gone:?}");
        source.forget_netns(&gone);
        self.ledger.retain(|ns| !gone.contains(&ns));
        self.agg.retain_netns(|ns| !gone.contains(&ns));
        if let Some(occ) = self.occupancy.as_mut() {
            for ns in &gone {
                occ.tracker.forget(*ns);
            }
        }
    }

    /// The state right now, without waiting for a tick.
    pub fn outcome(&self) -> anyhow::Result<Outcome> {
        let tables = self.monitor.views(&self.ledger.netns_with_drops());
        Ok(Outcome {
            strategy: self.strategy(),
            counters: match &self.source {
                Some(s) => s.counters()?,
                None => Counters::default(),
            },
            groups: self.ledger.groups(),
            evictions: self.agg.evictions(|n| self.monitor.wants(n)),
            agreement: self.ledger.agreement(),
            occupancy: self.occupancy_views(&tables),
            tables,
            flows: self.agg.flows().cloned().collect(),
            connects: self
                .connects
                .as_ref()
                .map(NodeView::rows)
                .unwrap_or_default(),
        })
    }
}
