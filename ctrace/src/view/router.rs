//! The router view: packets conntrack dropped (or that never left, on a
//! correlating tier), settled against conntrack's own counters, labelled
//! with a cause and a service; the tables' fill and who occupies them; the
//! kernel log's witnesses.
//!
//! It owns the drop tier's event source, the table monitor, the ledger, the
//! flow detail, occupancy and the kernel log. Ring-buffer readiness feeds
//! [`RouterView::drain`]; the watcher's timer drives [`RouterView::tick`].
//! Each settlement reads the kernel's drop totals and, right after, the
//! counters of the namespaces they moved in; the ledger turns both into
//! per-service, per-cause totals, and the flows announced since are
//! labelled with the cause their class got.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;

use super::{WatchConfig, settlement::Settlement};
use crate::{
    aggregate::{Aggregator, DropRecord, EvictionGroup, FlowEntry},
    cause::{Cause, evidence},
    event::{DropEvent, EntryChange, EntryEvent, Flow, KernelEvent},
    filling::{FillingMeter, NewEntryFeed},
    kernel::{
        KernelFacts,
        kmsg::{KmsgReader, TableFullWitness, Tally},
    },
    ledger::{Agreement, DropGroup, Ledger},
    loader::LoadOptions,
    netlink::ctnetlink::Announced,
    netns::NetNs,
    occupancy::{Breakdown, Kept, OccupancyTracker},
    pods::PodAddresses,
    readings::Counters,
    services::Catalog,
    sink::{Sink, Snapshot},
    source::EventSource,
    strategy,
    table::{TableMonitor, TableView},
    tier::Tier,
};

/// Settlements read every row of the kernel's totals; under a flood the
/// ring wakes the pipeline far more often than that is worth.
const SETTLE_EVERY: Duration = Duration::from_millis(25);

pub struct RouterView {
    source: EventSource,
    monitor: TableMonitor,
    ledger: Ledger,
    agg: Aggregator,
    catalog: Catalog,
    settlement: Settlement,
    /// Drained drop events waiting for the settlement that labels them.
    pending: Vec<DropEvent>,
    last_settle: Option<Instant>,
    /// Packets in the kernel's totals per namespace at the last settlement:
    /// only namespaces whose totals moved need their counters read.
    settled_packets: HashMap<u64, u64>,
    /// Kernel flow-map entries older than this were already considered.
    late_cutoff_ns: u64,
    occupancy: Option<Occupancy>,
    /// The pods of this node behind flows' addresses.
    pods: PodAddresses,
    /// New entries per second by source and service, per interval.
    filling: FillingMeter,
    /// ctnetlink's new-entry announcements, for tiers with neither insert
    /// events nor passed flows of their own (or `--ctnetlink-events`).
    new_entries: Option<NewEntryFeed>,
    /// The tc tier's passed flows it could not attribute, once they feed
    /// the meter.
    filling_unattributed: Option<u64>,
    /// The kernel log, read for table-full lines since start; None when
    /// /dev/kmsg cannot be opened.
    kmsg: Option<KernelLog>,
}

/// What the router view saw, for callers that judge a run (the lab, tests).
#[derive(Default)]
pub struct RouterOutcome {
    pub counters: Counters,
    pub groups: Vec<DropGroup>,
    pub evictions: Vec<EvictionGroup>,
    pub agreement: Vec<Agreement>,
    pub tables: Vec<TableView>,
    pub flows: Vec<FlowEntry>,
    pub occupancy: Vec<(u64, Kept, Breakdown)>,
}

/// A periodic re-dump waits at least this many times as long as the last
/// one took, so that re-dumps take at most 1% of a core whatever the
/// table's size: the kernel formats every entry of every dump, about
/// 0.4 s of a core for 200,000 entries, which every 10 s (the default
/// period) was 4% of one. Wall time, not CPU time: on a busy machine a
/// dump takes longer, and backing off then is the point.
const DUMP_COST_RATIO: u32 = 100;

/// Who holds the entries: a baseline dump, then kept by insert/delete
/// events on tiers that have them, or by ctnetlink's NEW and DESTROY
/// announcements where it has them, else re-dumped periodically.
struct Occupancy {
    tracker: OccupancyTracker,
    every: Duration,
    last_dump: Option<Instant>,
    /// How long the last periodic pass over every table took.
    last_cost: Duration,
    /// Namespaces whose last dump failed: retried with the next periodic
    /// pass, not every tick, or a table that keeps failing would be
    /// re-dumped every second outside the budget.
    failed: HashSet<u64>,
    lost_at_dump: u64,
    hz: u32,
}

/// The kernel log as a witness: new records since start, summed.
struct KernelLog {
    reader: KmsgReader,
    tally: Tally,
    witnesses: Vec<TableFullWitness>,
}

impl RouterView {
    /// Probes the drop tiers, attaches the chosen one, and takes the first
    /// sample of every table, which later drops are measured against.
    pub fn start(
        cfg: &WatchConfig,
        facts: &KernelFacts,
        opts: &LoadOptions<'_>,
    ) -> anyhow::Result<RouterView> {
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

        let mut monitor = TableMonitor::new(cfg.netns.clone());
        monitor.set_host_root(&cfg.host_root);
        monitor.discover();
        let mut ledger = Ledger::new(source.tier().caps, opts.services.names.clone());
        for inode in monitor.inodes() {
            ledger.baseline(inode, monitor.latest(inode));
        }
        let occupancy = cfg.occupancy_every.map(|every| Occupancy {
            tracker: OccupancyTracker::new(cfg.catalog.clone()),
            every,
            last_dump: None,
            last_cost: Duration::ZERO,
            failed: HashSet::new(),
            lost_at_dump: 0,
            hz: facts.hz.max(1),
        });
        let kmsg = match KmsgReader::open() {
            Ok(reader) => Some(KernelLog {
                reader,
                tally: Tally::default(),
                witnesses: Vec::new(),
            }),
            Err(e) => {
                log::info!("no kernel log witness: {e:#}");
                None
            }
        };
        log::info!(
            "tracing with strategy {} on kernel {}",
            source.tier().strategy,
            facts.release
        );
        // Tiers without insert events learn new entries from ctnetlink,
        // subscribed now: an entry made before the subscription is never
        // announced. Not by default on a tier that counts the flows it saw
        // pass: that witness costs no message per entry in the packet's
        // path, which the announcements do (a point and more of a
        // handshake-only connection rate in the bench).
        let caps = source.tier().caps;
        let subscribe = cfg.ctnetlink_events.unwrap_or(!caps.passed_flows);
        let new_entries = (!caps.entry_events && subscribe).then(|| {
            let mut feed = NewEntryFeed::new(cfg.announcements_per_s, cfg.interval);
            feed.sync(&monitor.inodes());
            feed
        });
        Ok(RouterView {
            settlement: Settlement::for_source(&source),
            source,
            monitor,
            ledger,
            agg: Aggregator::new(cfg.max_flows),
            catalog: cfg.catalog.clone(),
            pending: Vec::new(),
            last_settle: None,
            settled_packets: HashMap::new(),
            late_cutoff_ns: 0,
            occupancy,
            pods: PodAddresses::new(&cfg.host_root),
            filling: FillingMeter::default(),
            filling_unattributed: None,
            new_entries,
            kmsg,
        })
    }

    pub fn tier(&self) -> Tier {
        self.source.tier()
    }

    /// Watches one more namespace's table (the lab's router, which it
    /// names), from a first sample on.
    pub fn watch(&mut self, ns: &NetNs, name: &str) -> anyhow::Result<()> {
        self.monitor.watch(ns, name)?;
        self.ledger
            .baseline(ns.inode(), self.monitor.latest(ns.inode()));
        Ok(())
    }

    /// Returns when a ring buffer has something, or when a listening
    /// window of ctnetlink's announcements ends (then [`drain`](Self::drain)
    /// closes it).
    pub async fn readable(&mut self) -> anyhow::Result<()> {
        match self.new_entries.as_ref().and_then(NewEntryFeed::deadline) {
            Some(at) => tokio::select! {
                r = self.source.readable() => r,
                _ = tokio::time::sleep_until(at.into()) => Ok(()),
            },
            None => self.source.readable().await,
        }
    }

    pub fn resync_clock(&mut self) {
        self.source.resync_clock();
    }

    /// Drains both rings; entry events update occupancy at once, drop
    /// events wait for the next settlement (now, if one is due or `force`).
    pub fn drain(&mut self, sinks: &mut [Box<dyn Sink>], force: bool) -> anyhow::Result<()> {
        if self.new_entries.as_ref().is_some_and(NewEntryFeed::due) {
            self.take_announcements();
            if let Some(feed) = self.new_entries.as_mut() {
                feed.close_windows();
            }
        }
        let mut events = Vec::new();
        self.source.drain(&mut events);
        let due = self
            .last_settle
            .is_none_or(|at| at.elapsed() >= SETTLE_EVERY);
        let swept = self
            .settlement
            .sweep_if_due(&mut self.source, &mut self.monitor, &mut events);
        self.take(events);
        let decision = self
            .settlement
            .decide(swept, !self.pending.is_empty(), due, force);
        if decision.settle {
            self.settle(sinks, decision.all)?;
        }
        Ok(())
    }

    /// Sorts drained events: drops wait for a settlement, entry changes
    /// keep occupancy; namespaces outside `--netns` are left out.
    fn take(&mut self, events: Vec<KernelEvent>) {
        for e in events {
            match e {
                KernelEvent::Drop(d) if self.monitor.wants(d.flow.netns) => self.pending.push(d),
                KernelEvent::Entry(e) if self.monitor.wants(e.flow.netns) => self.entry_changed(&e),
                KernelEvent::Drop(_) | KernelEvent::Entry(_) => {}
            }
        }
    }

    /// Reads the kernel's totals, then the counters of every namespace
    /// they moved in (all of them when `all`), settles the ledger, and
    /// labels and reports the flows announced since the last settlement.
    fn settle(&mut self, sinks: &mut [Box<dyn Sink>], all: bool) -> anyhow::Result<()> {
        self.last_settle = Some(Instant::now());
        let rows = self.source.totals();
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
            // Rows first, counters right after: see ledger.rs.
            let Some(stats) = self.settlement.counters(ns, &mut self.monitor) else {
                continue;
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

    fn entry_changed(&mut self, e: &EntryEvent) {
        // Without every insert/delete probe, events would keep a one-sided
        // count between dumps (inserts without their deletes): dumps alone
        // keep occupancy then.
        if !self.tier().caps.entry_events {
            return;
        }
        if e.change == EntryChange::Inserted {
            count_new_entries(
                (&mut self.filling, &mut self.pods, &self.catalog),
                e.flow.netns,
                e.flow.src.ip(),
                (e.flow.proto, e.flow.dst.port()),
                1,
            );
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
    /// been inserts or deletes). The period stretches to 100 times the last
    /// pass's time after lost events too: they come with storms, when a
    /// re-dump costs the most, and the output gives the breakdown's age.
    fn refresh_occupancy(&mut self, lost_events: u64, is_final: bool) {
        let events_tier = self.tier().caps.entry_events;
        let Some(occ) = self.occupancy.as_mut() else {
            return;
        };
        let all_due = match occ.last_dump {
            None => true,
            Some(_) if is_final => !events_tier,
            Some(at) => {
                at.elapsed() >= occ.every.max(occ.last_cost * DUMP_COST_RATIO)
                    && (!events_tier || lost_events > occ.lost_at_dump)
            }
        };
        let started = Instant::now();
        if all_due {
            occ.failed.clear();
        }
        let mut dumped = false;
        // Namespaces whose entries ctnetlink announces are re-dumped on
        // the same period: with nf_conntrack_events=2 (the default) an
        // entry made while nobody listened carries no event cache and never
        // announces its end, so events alone would keep it forever. They
        // keep the breakdown current between dumps.
        for inode in self.monitor.inodes() {
            if !all_due && (occ.tracker.source(inode).is_some() || occ.failed.contains(&inode)) {
                continue;
            }
            let Some(reader) = self.monitor.reader(inode) else {
                continue;
            };
            if let Err(e) = occ.tracker.baseline_from(inode, reader) {
                log::debug!("netns {inode}: occupancy dump failed: {e:#}");
                occ.failed.insert(inode);
            }
            dumped = true;
        }
        if all_due || (dumped && occ.last_dump.is_none()) {
            occ.last_dump = Some(Instant::now());
            occ.last_cost = started.elapsed();
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

    fn occupancy_views(&self, tables: &[TableView]) -> Vec<(u64, Kept, Breakdown)> {
        let Some(occ) = self.occupancy.as_ref() else {
            return vec![];
        };
        tables
            .iter()
            .filter_map(|t| {
                let b = occ.tracker.breakdown(t.inode)?;
                let announced = self
                    .new_entries
                    .as_ref()
                    .is_some_and(|f| f.keeps_occupancy(t.inode));
                let source = match occ.tracker.source(t.inode)? {
                    // Dumps every period still: see refresh_occupancy.
                    _ if announced => Kept::DumpAndAnnouncements,
                    crate::occupancy::Source::Events => Kept::Events,
                    _ if self.tier().caps.entry_events => Kept::DumpAndEvents,
                    _ => Kept::PeriodicDump,
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
            pods: self.pods.flow(&flow),
            cause,
            evidence: why,
            tcp_flags,
            strategy: self.tier().strategy,
        };
        if self.agg.observe(rec.clone(), mono_ns) {
            for s in sinks.iter_mut() {
                s.dropped_flow(&rec).context("writing output")?;
            }
        }
        Ok(())
    }

    /// A tick: the last verdicts when final, settlements, flows whose
    /// events were lost, evictions, occupancy and the kernel log. Returns
    /// the kernel side's counters.
    pub fn tick(
        &mut self,
        sinks: &mut [Box<dyn Sink>],
        is_final: bool,
    ) -> anyhow::Result<Counters> {
        let filter = self.monitor.filter().clone();
        self.source.maintain(|i| filter.matches(i));
        if is_final {
            let mut last = Vec::new();
            self.settlement.finish(&mut self.source, &mut last);
            self.take(last);
        }
        self.drain(sinks, true)?;
        let counts = self.source.flow_counts();
        // Flows the map holds but no event announced: their event was lost
        // (ring buffer full). Their packets are in the totals already; the
        // detail learns of them now.
        let clock = self.source.clock();
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
        let (evicted, complete) = self.source.evicted_counts();
        let catalog = &self.catalog;
        self.agg
            .update_evictions(&evicted, complete, |proto, port| {
                catalog.lookup(proto, port).map(str::to_string)
            });
        let counters = self.source.counters()?;
        // The dump before the roll that opens the next listening windows:
        // a dump blocks this loop for up to a second of a full table, and
        // a window cannot close while it runs.
        self.refresh_occupancy(counters.lost_events, is_final);
        self.measure_filling();
        self.read_kernel_log();
        Ok(counters)
    }

    /// Takes what ctnetlink announced since the last call (on tiers
    /// without insert events): new entries for the filling-now meter, and
    /// both kinds for occupancy between dumps.
    fn take_announcements(&mut self) {
        let Some(feed) = self.new_entries.as_mut() else {
            return;
        };
        let (filling, pods, catalog) = (&mut self.filling, &mut self.pods, &self.catalog);
        let mut occ = self.occupancy.as_mut();
        feed.drain(&mut |ns, what, e, whole| {
            if what == Announced::New {
                count_new_entries(
                    (&mut *filling, &mut *pods, catalog),
                    ns,
                    e.src,
                    (crate::event::Proto::from_number(e.proto), e.dport),
                    1,
                );
            }
            // Occupancy between dumps (the tracker ignores namespaces
            // it has no baseline for yet), from whole intervals only: a
            // sample would keep the ends of entries it never saw made.
            if whole && let Some(occ) = occ.as_deref_mut() {
                match what {
                    Announced::New => occ.tracker.insert(ns, e),
                    Announced::Destroyed => occ.tracker.remove(ns, e),
                }
            }
        });
    }

    /// Closes the interval of the filling-now meter, after taking what
    /// ctnetlink announced (on tiers without insert events).
    fn measure_filling(&mut self) {
        if let Some(feed) = self.new_entries.as_mut() {
            feed.sync(&self.monitor.inodes());
        }
        self.take_announcements();
        // The tc tier's own witness, for every namespace whose entries
        // ctnetlink is not announcing to ctrace (by default none on this
        // tier; a router without ctnetlink has none at all): every flow
        // that passed made an entry. Read every time, so that its deltas
        // stay per interval.
        if let Some((passed, missed)) = self.source.passed() {
            let feed = self.new_entries.as_ref();
            let mut used = false;
            for (ns, p) in passed {
                if feed.is_some_and(|f| f.feeds(ns)) || !self.monitor.wants(ns) {
                    continue;
                }
                used = true;
                count_new_entries(
                    (&mut self.filling, &mut self.pods, &self.catalog),
                    ns,
                    p.src,
                    (p.proto, p.dport),
                    p.flows,
                );
            }
            if used || self.filling_unattributed.is_some() {
                self.filling_unattributed = Some(missed);
            }
        }
        let listened = match self.new_entries.as_mut() {
            Some(feed) => feed.roll(),
            None => HashMap::new(),
        };
        self.filling.roll(&listened);
    }

    /// The view's share of a summary, with the counters its tick returned.
    pub fn fill<'a>(&'a self, snap: &mut Snapshot<'a>, counters: Counters) {
        let tables = self.monitor.views(&self.ledger.netns_with_drops());
        let (devices, device_warnings) = self.source.devices();
        let tier = self.tier();
        snap.strategy = Some(tier.strategy);
        snap.caps = Some(tier.caps);
        snap.counters = counters;
        snap.occupancy = self.occupancy_views(&tables);
        snap.tables = tables;
        snap.groups = self.ledger.groups();
        snap.evictions = self.agg.evictions(|n| self.monitor.wants(n));
        snap.agreement = self.ledger.agreement();
        snap.top_flows = self.agg.top_flows(10);
        snap.flows_forgotten = self.agg.forgotten();
        snap.held_back = self
            .ledger
            .held_back()
            .into_iter()
            .filter(|h| self.monitor.wants(h.netns))
            .collect();
        snap.kernel_log = self.kmsg.as_ref().map(|k| k.tally.clone());
        snap.devices = devices;
        snap.device_warnings = device_warnings;
        snap.netns_left_out = self.monitor.left_out();
        snap.filling = self.filling.rows().to_vec();
        snap.filling_overruns = self.new_entries.as_ref().map(NewEntryFeed::overruns);
        snap.filling_listened = self
            .new_entries
            .as_ref()
            .and_then(NewEntryFeed::least_share);
        snap.filling_unattributed = self.filling_unattributed;
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

    /// Forgets namespaces that vanished: their kernel rows, ledger, flows
    /// and occupancy.
    pub fn forget(&mut self) {
        let before: Vec<u64> = self.monitor.inodes();
        self.monitor
            .discover_preferring(&self.ledger.netns_with_drops());
        let alive: BTreeSet<u64> = self.monitor.inodes().into_iter().collect();
        let gone: Vec<u64> = before.into_iter().filter(|i| !alive.contains(i)).collect();
        if gone.is_empty() {
            return;
        }
        log::info!("namespaces gone: {gone:?}");
        self.source.forget_netns(&gone);
        self.ledger.retain(|ns| !gone.contains(&ns));
        self.agg.retain_netns(|ns| !gone.contains(&ns));
        self.filling.forget(&gone);
        if let Some(occ) = self.occupancy.as_mut() {
            for ns in &gone {
                occ.tracker.forget(*ns);
            }
        }
    }

    /// The state right now, without waiting for a tick.
    pub fn outcome(&self) -> anyhow::Result<RouterOutcome> {
        let tables = self.monitor.views(&self.ledger.netns_with_drops());
        Ok(RouterOutcome {
            counters: self.source.counters()?,
            groups: self.ledger.groups(),
            evictions: self.agg.evictions(|n| self.monitor.wants(n)),
            agreement: self.ledger.agreement(),
            occupancy: self.occupancy_views(&tables),
            tables,
            flows: self.agg.flows().cloned().collect(),
        })
    }
}

/// `n` new entries of namespace `ns` from `src` toward a protocol and
/// port, counted by the filling meter under their service and source pod,
/// whichever witness saw them (insert events, ctnetlink, passed flows).
/// The view's fields, not the view: the ctnetlink drain holds the
/// occupancy beside them.
fn count_new_entries(
    (filling, pods, catalog): (&mut FillingMeter, &mut PodAddresses, &Catalog),
    ns: u64,
    src: std::net::IpAddr,
    (proto, dport): (crate::event::Proto, u16),
    n: u64,
) {
    let service = catalog.lookup(proto, dport);
    let pod = pods.pod(src);
    filling.new_entries(ns, src, service, pod.as_deref(), n);
}
