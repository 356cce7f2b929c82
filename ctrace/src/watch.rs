//! The tracing pipeline: kernel -> decode -> attribute -> aggregate -> sinks.
//!
//! One task drives it. Ring-buffer readiness wakes it for new flows; a
//! timer drives table sampling and summaries. A drop is attributed as soon
//! as the namespace's conntrack counters have been sampled after it, which
//! the pipeline does right away, so first sightings reach the sinks within
//! a netlink round trip.
use std::{
    collections::BTreeSet,
    future::Future,
    pin::pin,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;

use crate::{
    aggregate::{Aggregator, DropGroup, DropRecord, EvictionGroup, FlowEntry},
    cause::{self, Seen},
    event::{EntryChange, EntryEvent, Flow, KernelEvent},
    kernel::KernelFacts,
    netlink::ctnetlink::CtDumpEntry,
    occupancy::{Breakdown, OccupancyTracker},
    services::Catalog,
    sink::{Sink, Snapshot},
    source::{Counters, EventSource},
    strategy::{self, Choice, Strategy},
    table::{NetnsFilter, TableMonitor, TableView},
};

pub struct WatchConfig {
    pub strategy: Choice,
    /// How often to re-dump tables for occupancy when no event tier keeps
    /// it current; None turns occupancy off.
    pub occupancy_every: Option<Duration>,
    pub interval: Duration,
    pub catalog: Catalog,
    pub netns: NetnsFilter,
    pub kernel_log: bool,
}

/// What a finished run saw, for callers that judge it (the lab, tests).
pub struct Outcome {
    pub strategy: Strategy,
    pub counters: Counters,
    pub groups: Vec<DropGroup>,
    pub evictions: Vec<EvictionGroup>,
    pub tables: Vec<TableView>,
    pub flows: Vec<FlowEntry>,
    pub occupancy: Vec<(u64, &'static str, Breakdown)>,
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
    source: EventSource,
    monitor: TableMonitor,
    agg: Aggregator,
    catalog: Catalog,
    interval: Duration,
    pending: Vec<KernelEvent>,
    started: Instant,
    occupancy: Option<Occupancy>,
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
    Tick,
}

impl Watcher {
    /// Probes the kernel, picks and attaches a strategy, and takes the
    /// first sample of every table, which later drops are measured against.
    pub fn start(cfg: WatchConfig, facts: &KernelFacts) -> anyhow::Result<Watcher> {
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
        let source = strategy::start(chosen, facts, cfg.kernel_log)
            .with_context(|| format!("starting the {chosen} strategy"))?;
        let mut monitor = TableMonitor::new(cfg.netns);
        monitor.discover();
        let occupancy = cfg.occupancy_every.map(|every| Occupancy {
            tracker: OccupancyTracker::new(cfg.catalog.clone()),
            every,
            last_dump: None,
            lost_at_dump: 0,
            hz: facts.hz.max(1),
        });
        log::info!("tracing with strategy {chosen} on kernel {}", facts.release);
        Ok(Watcher {
            source,
            monitor,
            agg: Aggregator::new(),
            catalog: cfg.catalog,
            interval: cfg.interval,
            pending: Vec::new(),
            started: Instant::now(),
            occupancy,
        })
    }

    pub fn monitor_mut(&mut self) -> &mut TableMonitor {
        &mut self.monitor
    }

    pub fn strategy(&self) -> Strategy {
        self.source.strategy()
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
                r = self.source.readable() => Wake::Events(r),
                _ = tick.tick() => Wake::Tick,
            };
            match wake {
                Wake::Stop => break,
                Wake::Events(r) => {
                    r?;
                    self.process_events(sinks)?;
                }
                Wake::Tick => self.periodic(sinks, false)?,
            }
        }
        self.periodic(sinks, true)?;
        self.outcome()
    }

    fn process_events(&mut self, sinks: &mut [Box<dyn Sink>]) -> anyhow::Result<()> {
        self.source.drain(&mut self.pending);
        let monitor = &self.monitor;
        self.pending.retain(|e| monitor.wants(flow_of(e).netns));
        if self.pending.is_empty() {
            return Ok(());
        }
        let namespaces: BTreeSet<u64> = self.pending.iter().map(|e| flow_of(e).netns).collect();
        if namespaces.iter().any(|ns| !self.monitor.knows(*ns)) {
            self.monitor.discover();
        }
        // A sample after the drops is the other half of their evidence.
        for ns in &namespaces {
            self.monitor.sample(*ns);
        }
        let pending = std::mem::take(&mut self.pending);
        let exact = self.exact();
        for e in pending {
            match e {
                KernelEvent::Drop(d) => {
                    let seen = Seen {
                        has_ct: d.has_ct,
                        alloc_failed: d.table_full,
                        exact,
                    };
                    self.attribute(sinks, d.flow, seen, d.tcp_flags, d.time, d.mono_ns)?;
                }
                KernelEvent::Entry(e) => self.entry_changed(&e),
            }
        }
        Ok(())
    }

    /// Tiers that watch conntrack's allocations know every table-full drop
    /// for certain, so they need no inference for the others either.
    fn exact(&self) -> bool {
        self.source.strategy() == Strategy::Kprobe
    }

    fn entry_changed(&mut self, e: &EntryEvent) {
        let Some(occ) = self.occupancy.as_mut() else {
            return;
        };
        let (sport, dport) = e.raw_ports;
        let entry = CtDumpEntry {
            family: e.flow.family_number(),
            proto: e.flow.proto.number(),
            src: e.flow.src.ip(),
            dst: e.flow.dst.ip(),
            sport,
            dport,
            tcp_state: (e.flow.proto == crate::event::Proto::Tcp).then_some(e.tcp_state),
            status: e.status,
            timeout_secs: e.timeout_jiffies / occ.hz,
            id: 0,
            zone: 0,
            mark: 0,
        };
        match e.change {
            EntryChange::Inserted => occ.tracker.insert(e.flow.netns, &entry),
            EntryChange::Evicted | EntryChange::Deleted => occ.tracker.remove(e.flow.netns, &entry),
            EntryChange::InsertFailed => {}
        }
    }

    /// Re-dumps tables when occupancy is due: every period (and for the
    /// final report) on tiers without entry events; on event tiers only for
    /// namespaces not yet baselined, and after lost events (which may have
    /// been inserts or deletes).
    fn refresh_occupancy(&mut self, lost_events: u64, is_final: bool) {
        let events_tier = self.exact();
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
            let Some(sock) = self.monitor.socket(inode) else {
                continue;
            };
            if let Err(e) = occ.tracker.baseline(inode, sock) {
                log::debug!("netns {inode}: occupancy dump failed: {e:#}");
            }
            dumped = true;
        }
        if all_due || (dumped && occ.last_dump.is_none()) {
            occ.last_dump = Some(Instant::now());
            occ.lost_at_dump = lost_events;
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
                    "events" => "events",
                    _ if self.exact() => "dump+events",
                    _ => "periodic_dump",
                };
                Some((t.inode, source, b))
            })
            .collect()
    }

    fn attribute(
        &mut self,
        sinks: &mut [Box<dyn Sink>],
        flow: Flow,
        seen: Seen,
        tcp_flags: u8,
        time: SystemTime,
        mono_ns: u64,
    ) -> anyhow::Result<()> {
        let evidence = self.monitor.evidence(flow.netns, mono_ns);
        let (cause, why) = cause::classify(seen, evidence.as_ref());
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
            strategy: self.source.strategy(),
        };
        if self.agg.observe(rec.clone(), mono_ns) {
            for s in sinks.iter_mut() {
                s.dropped_flow(&rec).context("writing output")?;
            }
        }
        Ok(())
    }

    fn periodic(&mut self, sinks: &mut [Box<dyn Sink>], is_final: bool) -> anyhow::Result<()> {
        self.process_events(sinks)?;
        self.monitor.discover();
        self.monitor.sample_all();
        let counts = self.source.flow_counts();
        // Flows the map holds but no event announced: their event was lost
        // (ring buffer full). They still count, attributed now.
        let clock = self.source.clock();
        let mut late: Vec<(Flow, crate::source::FlowCount)> = counts
            .iter()
            .filter(|(f, _)| !self.agg.is_known(f) && self.monitor.wants(f.netns))
            .map(|(f, c)| (*f, *c))
            .collect();
        late.sort_by_key(|(_, c)| c.first_ns);
        let exact = self.exact();
        for (flow, c) in late {
            let seen = Seen {
                has_ct: c.has_ct,
                alloc_failed: c.table_full,
                exact,
            };
            self.attribute(
                sinks,
                flow,
                seen,
                c.tcp_flags,
                clock.wall(c.first_ns),
                c.first_ns,
            )?;
        }
        self.agg.update_counts(&counts, &clock);
        let mut evicted = self.source.evicted_counts();
        evicted.retain(|(k, _)| self.monitor.wants(k.netns));
        let catalog = &self.catalog;
        self.agg.update_evictions(&evicted, |proto, port| {
            catalog.lookup(proto, port).map(str::to_string)
        });
        let counters = self.source.counters()?;
        self.refresh_occupancy(counters.lost_events, is_final);
        let tables = self.monitor.views(&self.agg.netns_with_drops());
        let occupancy = self.occupancy_views(&tables);
        let snap = Snapshot {
            time: SystemTime::now(),
            elapsed: self.started.elapsed(),
            strategy: self.source.strategy(),
            counters,
            tables,
            occupancy,
            groups: self.agg.groups(),
            evictions: self.agg.evictions(),
            top_flows: self.agg.top_flows(10),
            is_final,
        };
        for s in sinks.iter_mut() {
            s.summary(&snap).context("writing output")?;
        }
        Ok(())
    }

    /// The state right now, without waiting for a tick.
    pub fn outcome(&self) -> anyhow::Result<Outcome> {
        let tables = self.monitor.views(&self.agg.netns_with_drops());
        Ok(Outcome {
            strategy: self.source.strategy(),
            counters: self.source.counters()?,
            groups: self.agg.groups(),
            evictions: self.agg.evictions(),
            occupancy: self.occupancy_views(&tables),
            tables,
            flows: self.agg.flows().cloned().collect(),
        })
    }
}

fn flow_of(e: &KernelEvent) -> &Flow {
    match e {
        KernelEvent::Drop(d) => &d.flow,
        KernelEvent::Entry(e) => &e.flow,
    }
}
