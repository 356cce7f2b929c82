//! `ctrace report`: what a recording says happened, and what to change.
//!
//! Everything is computed from the recording alone (it may be read on
//! another machine, days later): the table samples, the cumulative drop
//! totals in every summary, the first-sighting drop records, occupancy
//! breakdowns and the header's facts about the kernel.
pub mod advice;
pub mod recording;
pub mod render;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime},
};

use crate::record::OccupancyLine as Occupancy;
pub use recording::Recording;
use render::{Block, Plot};

use crate::{sink::rfc3339, text};

/// One namespace's story.
#[derive(Debug, Default)]
pub struct NetnsStory {
    pub inode: u64,
    pub label: String,
    /// (seconds since start, entries, max)
    pub timeline: Vec<(f64, u64, u64)>,
    pub peak: u64,
    pub peak_at: Option<SystemTime>,
    pub max: u64,
    /// Occupancy breakdown with the most entries.
    pub occupancy: Option<Occupancy>,
    /// Flows refused for a full table (ctrace's attribution).
    pub table_full_flows: u64,
    pub table_full_packets: u64,
}

/// Drops of one (service, cause) over the recording.
#[derive(Debug, Default)]
pub struct Affected {
    pub service: String,
    pub cause: String,
    pub flows: u64,
    pub packets: u64,
    pub first: Option<SystemTime>,
    pub last: Option<SystemTime>,
}

pub struct Report {
    pub title: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub namespaces: Vec<NetnsStory>,
    pub affected: Vec<Affected>,
    /// Per service: (seconds since start, packets dropped in the interval).
    pub drops_over_time: BTreeMap<String, Vec<(f64, f64)>>,
    /// New entries per second over time per source pod (else prefix).
    pub filling_over_time: BTreeMap<String, Vec<(f64, f64)>>,
    pub evicted: u64,
    pub gc_evicted: u64,
    /// (service, by, entries) summed over namespaces.
    pub evictions: Vec<(String, String, u64)>,
    pub lost_events: u64,
    /// (netns, attributed, kernel, trust) from the last summary.
    pub agreement: Vec<(u64, u64, u64, String)>,
    pub strategy: Option<String>,
    /// Dropped flows (first sightings) per (pod, end, cause), most first:
    /// the pods of the traced node behind the addresses.
    pub pods: Vec<(String, &'static str, String, u64)>,
    /// (netns, kind, key, peak new entries/s, when), highest first.
    pub filling: Vec<(u64, &'static str, String, f64, SystemTime)>,
    pub left_out: LeftOut,
    pub blocks: Vec<Block>,
}

const NO_SERVICE: &str = "other";

fn secs(t: SystemTime, start: SystemTime) -> f64 {
    t.duration_since(start).unwrap_or_default().as_secs_f64()
}

/// Bounds that keep a report's memory independent of the recording's size
/// and of how often names change in it: a recording is anyone's file.
const MAX_NAMESPACES: usize = 64;
const MAX_SERVICES: usize = 256;
/// (service or namespace, cause, proto, …) combinations kept.
const MAX_GROUPS: usize = 4096;
/// Points per plotted line: pairs are merged (their peak kept) beyond it.
const MAX_POINTS: usize = 240;
/// Lines in the filling-over-time plot: more would be unreadable.
const MAX_FILL_SERIES: usize = 8;
/// Keys kept per occupancy breakdown (the report shows five).
const MAX_BREAKDOWN_KEYS: usize = 64;
/// Where services past [`MAX_SERVICES`] are counted.
const MORE_SERVICES: &str = "(more services)";

/// What the bounds left out, said in the report.
#[derive(Debug, Default)]
pub struct LeftOut {
    pub namespaces: u64,
    pub services: u64,
    pub groups: u64,
}

/// Folds records into a report as they are read: memory grows with the
/// namespaces, services and points kept, all bounded, never with the file.
#[derive(Default)]
pub struct Builder {
    start: Option<SystemTime>,
    end: Option<SystemTime>,
    namespaces: BTreeMap<u64, NetnsStory>,
    services: BTreeSet<String>,
    /// Cumulative totals only grow; the largest value seen is the total
    /// (a namespace that vanished drops out of later summaries).
    groups: BTreeMap<(u64, String, String, String), (u64, u64)>,
    first_rise: BTreeMap<(String, String), SystemTime>,
    last_rise: BTreeMap<(String, String), SystemTime>,
    /// First sightings, from drop records.
    sighted: BTreeMap<(String, String), Option<(SystemTime, SystemTime)>>,
    /// First sightings per (pod, end, cause).
    pods: BTreeMap<(String, &'static str, String), u64>,
    /// Who filled the tables: per (netns, kind, key), the highest rate of
    /// new entries an interval saw, and when.
    filling: BTreeMap<(u64, &'static str, String), (f64, Option<SystemTime>)>,
    per_service_prev: BTreeMap<String, u64>,
    drops_over_time: BTreeMap<String, Vec<(f64, f64)>>,
    /// New entries per second over time, per source pod (or source prefix
    /// where no pod is named), for the first [`MAX_FILL_SERIES`] seen.
    filling_over_time: BTreeMap<String, Vec<(f64, f64)>>,
    evictions: BTreeMap<(u64, String, String, String), u64>,
    agreement: BTreeMap<u64, (u64, u64, u64, String)>,
    evicted: u64,
    gc_evicted: u64,
    lost: u64,
    strategy: Option<String>,
    left_out: LeftOut,
}

/// The entry for `key`, made if there is room for one more; None (and
/// counted) if not.
fn admit<'m, K: Ord, V: Default>(
    map: &'m mut BTreeMap<K, V>,
    key: K,
    cap: usize,
    left_out: &mut u64,
) -> Option<&'m mut V> {
    if map.len() >= cap && !map.contains_key(&key) {
        *left_out += 1;
        return None;
    }
    Some(map.entry(key).or_default())
}

/// Halves a line's points when it grows past [`MAX_POINTS`], keeping each
/// pair's peak.
fn thin<T: Copy>(points: &mut Vec<T>, peak: impl Fn(&T, &T) -> T) {
    if points.len() > MAX_POINTS {
        *points = points
            .chunks(2)
            .map(|c| c.iter().skip(1).fold(c[0], |a, b| peak(&a, b)))
            .collect();
    }
}

/// A name as kept: no longer than any name is shown
/// ([`text::MAX_CHARS`]), so that kept names cannot hold megabytes each.
fn short(s: &str) -> String {
    s.chars().take(text::MAX_CHARS + 1).collect()
}

/// An occupancy breakdown with each map cut to its largest keys (the
/// total still counts them all).
fn bounded(o: &Occupancy) -> Occupancy {
    let top = |m: &BTreeMap<String, u64>| -> BTreeMap<String, u64> {
        let mut v: Vec<_> = m.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1));
        v.into_iter()
            .take(MAX_BREAKDOWN_KEYS)
            .map(|(k, n)| (short(k), *n))
            .collect()
    };
    Occupancy {
        inode: o.inode,
        source: o.source,
        total: o.total,
        by_service: top(&o.by_service),
        by_proto: top(&o.by_proto),
        by_tcp_state: top(&o.by_tcp_state),
        by_src_prefix: top(&o.by_src_prefix),
        by_timeout: top(&o.by_timeout),
        assured: o.assured,
        unreplied: o.unreplied,
        dump_age_s: o.dump_age_s,
        dump_s: o.dump_s,
    }
}

impl Builder {
    pub fn add(&mut self, r: recording::Record) {
        match r {
            recording::Record::Summary(s) => self.summary(&s),
            recording::Record::Drop(d) => self.drop(&d),
        }
    }

    /// A service name as kept: its own (cut to what is shown) while there
    /// is room, else counted under [`MORE_SERVICES`].
    fn service(&mut self, s: Option<&str>) -> String {
        let s = &short(s.unwrap_or(NO_SERVICE));
        if self.services.contains(s) {
            return s.to_string();
        }
        if self.services.len() < MAX_SERVICES {
            self.services.insert(s.to_string());
            return s.to_string();
        }
        self.left_out.services += 1;
        MORE_SERVICES.to_string()
    }

    /// One point per filling series: pods where any are named, else
    /// source prefixes, summed over namespaces; a zero for series without
    /// a row, so lines fall.
    fn filling_points(&mut self, x: f64, rows: &[crate::filling::FillingRow]) {
        use crate::filling::FillBy;
        let with_pods = rows.iter().any(|r| r.by == FillBy::SrcPod);
        let mut now: BTreeMap<String, f64> = BTreeMap::new();
        for r in rows {
            let name = match r.by {
                FillBy::SrcPod => format!("pod {}", short(&r.key)),
                FillBy::SrcPrefix if !with_pods => format!("from {}", short(&r.key)),
                _ => continue,
            };
            *now.entry(name).or_default() += r.per_s;
        }
        for (name, per_s) in &now {
            if !self.filling_over_time.contains_key(name)
                && self.filling_over_time.len() >= MAX_FILL_SERIES
            {
                self.left_out.groups += 1;
                continue;
            }
            self.filling_over_time
                .entry(name.clone())
                .or_default()
                .push((x, *per_s));
        }
        for (name, series) in self.filling_over_time.iter_mut() {
            if !now.contains_key(name) {
                series.push((x, 0.0));
            }
            thin(series, |a, b| (a.0, a.1.max(b.1)));
        }
    }

    fn summary(&mut self, s: &crate::record::Summary) {
        let start = *self.start.get_or_insert(s.time);
        self.end = Some(self.end.map_or(s.time, |e| e.max(s.time)));
        let x = secs(s.time, start);
        self.filling_points(x, &s.filling);
        for r in &s.filling {
            let key = (r.netns, r.by.name(), short(&r.key));
            let Some(peak) = admit(
                &mut self.filling,
                key,
                MAX_GROUPS,
                &mut self.left_out.groups,
            ) else {
                continue;
            };
            if peak.1.is_none() || r.per_s > peak.0 {
                *peak = (r.per_s, Some(s.time));
            }
        }
        for n in &s.netns {
            let Some(st) = admit(
                &mut self.namespaces,
                n.inode,
                MAX_NAMESPACES,
                &mut self.left_out.namespaces,
            ) else {
                continue;
            };
            st.inode = n.inode;
            st.label = match (&n.name, &n.pod) {
                (_, Some(pod)) => format!("{} (pod {})", n.inode, short(pod)),
                (Some(name), None) => format!("{} ({})", n.inode, short(name)),
                (None, None) => n.inode.to_string(),
            };
            if !n.processes.is_empty() {
                let names: Vec<String> = n.processes.iter().take(8).map(|p| short(p)).collect();
                st.label += &format!(" [{}]", names.join(", "));
            }
            st.timeline.push((x, n.count, n.max));
            thin(&mut st.timeline, |a, b| {
                if fill(b.1, b.2) > fill(a.1, a.2) {
                    (a.0, b.1, b.2)
                } else {
                    *a
                }
            });
            st.max = st.max.max(n.max);
            if n.count > st.peak || st.peak_at.is_none() {
                st.peak = n.count;
                st.peak_at = Some(s.time);
            }
        }
        for o in &s.occupancy {
            if let Some(st) = self.namespaces.get_mut(&o.inode)
                && st.occupancy.as_ref().is_none_or(|b| o.total > b.total)
            {
                st.occupancy = Some(bounded(o));
            }
        }
        let mut per_service: BTreeMap<String, u64> = BTreeMap::new();
        for g in &s.drops {
            let service = self.service(g.service.as_deref());
            let key = (
                g.netns,
                service.clone(),
                g.cause.name().to_string(),
                g.proto.name().to_string(),
            );
            let Some(e) = admit(&mut self.groups, key, MAX_GROUPS, &mut self.left_out.groups)
            else {
                continue;
            };
            let rose = g.packets > e.1;
            *e = (e.0.max(g.flows), e.1.max(g.packets));
            let sc = (service.clone(), g.cause.name().to_string());
            if rose {
                self.last_rise.insert(sc.clone(), s.time);
                self.first_rise.entry(sc).or_insert(s.time);
            }
            let t = per_service.entry(service).or_default();
            *t = t.saturating_add(g.packets);
        }
        for (service, total) in &per_service {
            let prev = self.per_service_prev.get(service).copied().unwrap_or(0);
            self.drops_over_time
                .entry(service.clone())
                .or_default()
                .push((x, total.saturating_sub(prev) as f64));
        }
        // Services without drops this interval: a zero, so lines fall.
        for (service, series) in self.drops_over_time.iter_mut() {
            if !per_service.contains_key(service) {
                series.push((x, 0.0));
            }
            thin(series, |a, b| (a.0, a.1.max(b.1)));
        }
        self.per_service_prev = per_service;
        for e in &s.evictions {
            let service = self.service(e.service.as_deref());
            let key = (
                e.netns,
                service,
                e.proto.name().to_string(),
                e.by.name().to_string(),
            );
            if let Some(v) = admit(
                &mut self.evictions,
                key,
                MAX_GROUPS,
                &mut self.left_out.groups,
            ) {
                *v = (*v).max(e.entries);
            }
        }
        self.evicted = self.evicted.max(s.evicted_total);
        self.gc_evicted = self.gc_evicted.max(s.gc_evicted_total);
        self.lost = self.lost.max(s.lost_events);
        // The latest word on each namespace, including ones that vanished
        // before the end (a lab's, a deleted pod's).
        for a in &s.agreement {
            if let Some(v) = admit(
                &mut self.agreement,
                a.netns,
                MAX_NAMESPACES,
                &mut self.left_out.namespaces,
            ) {
                *v = (a.netns, a.attributed, a.kernel, a.trust.name().to_string());
            }
        }
        if let Some(strategy) = s.strategy {
            self.strategy = Some(strategy.name().to_string());
        }
    }

    /// First sightings date a drop to the packet.
    fn drop(&mut self, d: &crate::record::Drop) {
        let key = (
            self.service(d.service.as_deref()),
            d.cause.name().to_string(),
        );
        if let Some(v) = admit(
            &mut self.sighted,
            key,
            MAX_GROUPS,
            &mut self.left_out.groups,
        ) {
            *v = Some(v.map_or((d.time, d.time), |(f, l)| (f.min(d.time), l.max(d.time))));
        }
        for (pod, end) in [
            (&d.src_pod, "source pod"),
            (&d.dst_pod, "destination pod"),
            (&d.dst_service, "destination Service"),
        ] {
            let Some(pod) = pod else {
                continue;
            };
            let key = (short(pod), end, d.cause.name().to_string());
            if let Some(n) = admit(&mut self.pods, key, MAX_GROUPS, &mut self.left_out.groups) {
                *n = n.saturating_add(1);
            }
        }
    }

    pub fn finish(self, rec: &Recording) -> Report {
        let Builder {
            start,
            end,
            namespaces: mut ns_map,
            groups,
            first_rise,
            last_rise,
            sighted,
            pods,
            filling,
            drops_over_time,
            filling_over_time,
            evictions,
            agreement,
            evicted,
            gc_evicted,
            lost,
            strategy,
            left_out,
            ..
        } = self;
        let start = start.unwrap_or(SystemTime::UNIX_EPOCH);
        let end = end.unwrap_or(start);
        let mut affected: BTreeMap<(String, String), Affected> = BTreeMap::new();
        for ((netns, service, cause, _), (flows, packets)) in &groups {
            let a = affected
                .entry((service.clone(), cause.clone()))
                .or_insert_with(|| Affected {
                    service: service.clone(),
                    cause: cause.clone(),
                    ..Affected::default()
                });
            // Recordings are untrusted input: counts saturate, never wrap.
            a.flows = a.flows.saturating_add(*flows);
            a.packets = a.packets.saturating_add(*packets);
            if cause == "table_full"
                && let Some(st) = ns_map.get_mut(netns)
            {
                st.table_full_flows = st.table_full_flows.saturating_add(*flows);
                st.table_full_packets = st.table_full_packets.saturating_add(*packets);
            }
        }
        // The summaries bound a drop to the interval where a total rose.
        for (key, a) in affected.iter_mut() {
            let seen = sighted.get(key).copied().flatten();
            let times = [
                seen.map(|s| s.0),
                seen.map(|s| s.1),
                first_rise.get(key).copied(),
                last_rise.get(key).copied(),
            ];
            a.first = times.iter().flatten().min().copied();
            a.last = times.iter().flatten().max().copied();
        }
        let mut affected: Vec<Affected> = affected.into_values().collect();
        affected.sort_by_key(|a| std::cmp::Reverse(a.packets));

        let mut ev: BTreeMap<(String, String), u64> = BTreeMap::new();
        for ((_, service, _, by), n) in evictions {
            let t = ev.entry((service, by)).or_default();
            *t = t.saturating_add(n);
        }
        let mut filling: Vec<_> = filling
            .into_iter()
            .filter_map(|((ns, by, key), (peak, at))| Some((ns, by, key, peak, at?)))
            .collect();
        filling.sort_by(|a, b| b.3.total_cmp(&a.3));
        let mut pods: Vec<_> = pods
            .into_iter()
            .map(|((p, e, c), n)| (p, e, c, n))
            .collect();
        pods.sort_by_key(|p| std::cmp::Reverse(p.3));
        let mut evictions: Vec<_> = ev.into_iter().map(|((s, b), n)| (s, b, n)).collect();
        evictions.sort_by_key(|e| std::cmp::Reverse(e.2));
        // Everything below that came from the recording is escaped as it
        // goes into a block (md): a recording is anyone's text.
        let title = format!(
            "ctrace report: {}{}",
            md(rec.header.host.as_deref().unwrap_or("unknown host")),
            rec.header
                .kernel
                .as_deref()
                .map(|k| format!(", Linux {}", md(k)))
                .unwrap_or_default()
        );
        let mut r = Report {
            title,
            start,
            end,
            namespaces: ns_map.into_values().collect(),
            affected,
            drops_over_time,
            filling_over_time,
            evicted,
            gc_evicted,
            evictions,
            lost_events: lost,
            agreement: agreement.into_values().collect(),
            strategy,
            pods,
            filling,
            left_out,
            blocks: vec![],
        };
        r.blocks = r.compose(rec);
        r
    }
}

impl Report {
    /// Reads `files` (oldest first) into a report, streaming.
    pub fn read(files: &[std::path::PathBuf]) -> anyhow::Result<(Report, Recording)> {
        let mut b = Builder::default();
        let rec = Recording::read(files, &mut |r| b.add(r))?;
        Ok((b.finish(&rec), rec))
    }

    /// One recording from `input`, as [`Report::read`] reads a file.
    pub fn from_reader(
        file: &std::path::Path,
        input: impl std::io::BufRead,
    ) -> anyhow::Result<(Report, Recording)> {
        let mut b = Builder::default();
        let rec = Recording::from_reader(file, input, &mut |r| b.add(r))?;
        Ok((b.finish(&rec), rec))
    }

    /// The namespace the advice is about: the one that refused flows for a
    /// full table, else the fullest.
    pub fn main_namespace(&self) -> Option<&NetnsStory> {
        self.namespaces.iter().max_by(|a, b| {
            (a.table_full_flows, fill(a.peak, a.max))
                .partial_cmp(&(b.table_full_flows, fill(b.peak, b.max)))
                .unwrap_or(std::cmp::Ordering::Equal)
        })
    }

    fn compose(&self, rec: &Recording) -> Vec<Block> {
        let mut b = vec![Block::Heading(1, self.title.clone())];
        let span = self.end.duration_since(self.start).unwrap_or_default();
        b.push(Block::Para(format!(
            "Recording of {} ({} summaries, {} drop records) from {} to {} ({}), traced with strategy {}.",
            rec.files
                .iter()
                .map(|p| format!("`{}`", p.display()))
                .collect::<Vec<_>>()
                .join(", "),
            rec.summaries,
            rec.drops,
            rfc3339(self.start),
            rfc3339(self.end),
            humantime::format_duration(Duration::from_secs(span.as_secs())),
            md(self.strategy.as_deref().unwrap_or("?"))
        )));
        if let Some(broken) = &rec.broken {
            b.push(Block::Para(format!(
                "**Warning:** {}. This report covers what came before.",
                md(&broken.to_string())
            )));
        }

        let mut findings = vec![];
        for ns in &self.namespaces {
            findings.push(format!(
                "netns {}: peak **{} of {} entries ({:.1}%)** at {}{}",
                md(&ns.label),
                ns.peak,
                ns.max,
                fill(ns.peak, ns.max),
                ns.peak_at.map(rfc3339).unwrap_or_default(),
                if ns.table_full_flows > 0 {
                    format!(
                        "; **{} flows ({} packets) refused because the table was full**",
                        ns.table_full_flows, ns.table_full_packets
                    )
                } else {
                    String::new()
                }
            ));
        }
        let names: BTreeSet<&str> = self
            .affected
            .iter()
            .filter(|a| a.cause == "table_full")
            .map(|a| a.service.as_str())
            .collect();
        if !names.is_empty() {
            findings.push(format!(
                "services that lost connections to the full table: **{}**",
                names.into_iter().map(md).collect::<Vec<_>>().join(", ")
            ));
        }
        b.push(Block::Heading(2, "Summary".into()));
        b.push(Block::Bullets(findings));

        b.push(Block::Heading(2, "Timeline".into()));
        b.push(Block::Plot(Plot {
            title: "Table fill over time".into(),
            y_label: "% of nf_conntrack_max".into(),
            y_max: Some(100.0),
            series: self
                .namespaces
                .iter()
                .map(|ns| {
                    (
                        format!("netns {}", plot_name(&ns.label)),
                        ns.timeline
                            .iter()
                            .map(|(x, c, m)| (*x, fill(*c, *m)))
                            .collect(),
                    )
                })
                .collect(),
        }));
        if !self.filling_over_time.is_empty() {
            b.push(Block::Plot(Plot {
                title: "Who filled the tables over time".into(),
                y_label: "new entries per second".into(),
                y_max: None,
                series: self
                    .filling_over_time
                    .iter()
                    .map(|(s, p)| (plot_name(s), p.clone()))
                    .collect(),
            }));
        }
        if !self.drops_over_time.is_empty() {
            b.push(Block::Plot(Plot {
                title: "Drops by service over time".into(),
                y_label: "packets dropped per interval".into(),
                y_max: None,
                series: self
                    .drops_over_time
                    .iter()
                    .map(|(s, p)| (plot_name(s), p.clone()))
                    .collect(),
            }));
        }

        b.push(Block::Heading(2, "Affected services".into()));
        if self.affected.is_empty() {
            b.push(Block::Para("No drops were recorded.".into()));
        } else {
            b.push(Block::Table {
                head: [
                    "service",
                    "cause",
                    "flows",
                    "packets",
                    "first drop",
                    "last drop",
                ]
                .map(String::from)
                .to_vec(),
                rows: self
                    .affected
                    .iter()
                    .map(|a| {
                        vec![
                            md(&a.service),
                            md(&a.cause),
                            a.flows.to_string(),
                            a.packets.to_string(),
                            a.first.map(rfc3339).unwrap_or_default(),
                            a.last.map(rfc3339).unwrap_or_default(),
                        ]
                    })
                    .collect(),
            });
        }

        b.push(Block::Heading(
            2,
            "Who occupied the table at its peak".into(),
        ));
        for ns in &self.namespaces {
            let Some(o) = ns.occupancy.as_ref().filter(|o| o.total > 0) else {
                if ns.peak > 0 {
                    b.push(Block::Para(format!(
                        "netns {}: no breakdown was recorded with entries in it (tables are re-read every --occupancy-every, 10 s by default, or 100 times as long as the last read took, where no kprobe tier keeps them current).",
                        md(&ns.label)
                    )));
                }
                continue;
            };
            b.push(Block::Para(format!(
                "netns {}: breakdown of {} entries ({} assured, {} never answered).",
                md(&ns.label),
                o.total,
                o.assured,
                o.unreplied
            )));
            b.push(Block::Table {
                head: ["by", "top groups (entries, share)"]
                    .map(String::from)
                    .to_vec(),
                rows: [
                    ("service", &o.by_service),
                    ("TCP state", &o.by_tcp_state),
                    ("source prefix", &o.by_src_prefix),
                    ("remaining timeout", &o.by_timeout),
                ]
                .iter()
                .map(|(name, m)| vec![name.to_string(), top(m, o.total, 5)])
                .collect(),
            });
        }

        if !self.filling.is_empty() {
            b.push(Block::Heading(2, "Who filled the tables".into()));
            b.push(Block::Para(
                "New entries per second at their highest interval, by source prefix, source pod and service (each interval's top 10 per namespace).".into(),
            ));
            b.push(Block::Table {
                head: ["netns", "by", "key", "peak new entries/s", "at"]
                    .map(String::from)
                    .to_vec(),
                rows: self
                    .filling
                    .iter()
                    .take(20)
                    .map(|(ns, by, key, peak, at)| {
                        vec![
                            ns.to_string(),
                            (*by).to_string(),
                            md(key),
                            format!("{peak:.1}"),
                            rfc3339(*at),
                        ]
                    })
                    .collect(),
            });
        }

        if !self.pods.is_empty() {
            b.push(Block::Heading(
                2,
                "Pods and Services behind dropped flows".into(),
            ));
            b.push(Block::Para(
                "The pods of the traced node whose addresses dropped flows came from or went to, and the Services (from kube-proxy's rules) they were addressed to; first sightings. hostNetwork pods share the node's addresses and are not named.".into(),
            ));
            b.push(Block::Table {
                head: ["pod or Service", "as", "cause", "flows"]
                    .map(String::from)
                    .to_vec(),
                rows: self
                    .pods
                    .iter()
                    .take(20)
                    .map(|(pod, end, cause, n)| {
                        vec![md(pod), (*end).to_string(), md(cause), n.to_string()]
                    })
                    .collect(),
            });
        }

        b.push(Block::Heading(2, "Evictions".into()));
        b.push(Block::Para(format!(
            "{} entries evicted by early_drop to make room, {} by the garbage collector above 95% fill (no kernel statistic counts the latter).",
            self.evicted, self.gc_evicted
        )));
        if !self.evictions.is_empty() {
            b.push(Block::Table {
                head: ["service", "by", "entries"].map(String::from).to_vec(),
                rows: self
                    .evictions
                    .iter()
                    .take(10)
                    .map(|(s, by, n)| vec![md(s), md(by), n.to_string()])
                    .collect(),
            });
        }

        b.push(Block::Heading(2, "How far to trust this".into()));
        let mut q = vec![format!(
            "lost events: {} (totals still count their packets: they are kept in the kernel)",
            self.lost_events
        )];
        for (ns, attributed, kernel, trust) in &self.agreement {
            q.push(format!(
                "netns {ns}: ctrace attributed {attributed} of conntrack's {kernel} drops ({})",
                md(trust)
            ));
        }
        let LeftOut {
            namespaces,
            services,
            groups,
        } = self.left_out;
        if namespaces + services + groups > 0 {
            q.push(format!(
                "the report keeps {MAX_NAMESPACES} namespaces, {MAX_SERVICES} services and {MAX_GROUPS} groups: {namespaces} namespace, {services} service and {groups} group readings beyond those were left out (services past the limit are counted as {MORE_SERVICES})"
            ));
        }
        b.push(Block::Bullets(q));

        b.push(Block::Heading(2, "Recommendations".into()));
        b.extend(advice::advise(self, &rec.header));
        b
    }

    pub fn markdown(&self) -> String {
        render::markdown(&self.blocks)
    }

    pub fn html(&self) -> String {
        render::html(&self.title, &self.blocks)
    }
}

/// A series name from the recording, for a plot: sparklines sit in a
/// Markdown code block, which only a line starting with backticks could
/// end, so there are none.
fn plot_name(s: &str) -> String {
    text::terminal(s).replace('`', "'")
}

/// Text from the recording, shown as itself in Markdown and HTML.
fn md(s: &str) -> String {
    text::markdown(s)
}

pub fn fill(count: u64, max: u64) -> f64 {
    if max == 0 {
        0.0
    } else {
        count as f64 * 100.0 / max as f64
    }
}

/// "dns 700 (70%), etcd-peer 200 (20%), …"
fn top(m: &BTreeMap<String, u64>, total: u64, n: usize) -> String {
    let mut v: Vec<_> = m.iter().filter(|(_, c)| **c > 0).collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    let mut parts: Vec<String> = v
        .iter()
        .take(n)
        .map(|(k, c)| format!("{} {c} ({:.0}%)", md(k), fill(**c, total)))
        .collect();
    if v.len() > n {
        parts.push(format!("{} more", v.len() - n));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recording made to attack whoever reports on it: a source prefix
    /// key that is a shell command, counts at u64::MAX.
    #[test]
    fn a_hostile_recording_yields_no_command_it_wrote() {
        let summary = serde_json::json!({
            "type": "summary",
            "time": "2026-12-04T12:00:00Z",
            "final": true,
            "netns": [{"inode": 1, "count": 1000, "max": 1000}],
            "drops": [{"netns": 1, "service": "ssh", "cause": "table_full", "proto": "tcp",
                       "flows": u64::MAX, "packets": u64::MAX}],
            "occupancy": [{"inode": 1, "total": 1000, "by_src_prefix": {
                "10.0.0.0/8;touch /tmp/x;#": 400, "10.1.0.0/16": 600}}],
        });
        let drop = serde_json::json!({
            "type": "drop", "time": "2026-12-04T12:00:00Z", "netns": 1, "cause": "table_full",
            "evidence": "count_at_max", "family": "ipv4", "src": "10.0.0.1:1", "dst": "10.0.0.2:22",
            "service": "ssh", "proto": "tcp", "tcp_flags": "S", "strategy": "tc",
            "flows": u64::MAX, "packets": u64::MAX,
        });
        let text = format!(
            "{{\"type\":\"recording\",\"version\":1}}\n{drop}\n{drop}\n{summary}\n{summary}\n"
        );
        let (r, _) =
            Report::from_reader(std::path::Path::new("r.ndjson"), text.as_bytes()).unwrap();
        let md = r.markdown();
        let commands: Vec<&str> = md
            .lines()
            .filter(|l| l.starts_with("nft ") || l.starts_with("sysctl "))
            .collect();
        assert!(commands.iter().all(|l| !l.contains("touch")), "{md}");
        assert!(
            commands
                .iter()
                .any(|l| l.contains("ip saddr { 10.1.0.0/16 }")),
            "{md}"
        );
        assert!(md.contains("were left out"), "{md}");
        assert!(!md.contains("nf_conntrack_max=0"), "{md}");
        assert!(md.contains("no limit is advised"), "{md}");
    }
}

#[cfg(test)]
mod hostile_names {
    use super::*;

    /// Names in a recording written to restyle, link or break the report.
    #[test]
    fn names_show_as_themselves_in_markdown_and_html() {
        let evil = "```x`y|z\n# h1 [a](http://e) <script>alert(1)</script>\u{1b}[31m";
        let huge = "s".repeat(64 << 10);
        let summary = serde_json::json!({
            "type": "summary", "time": "2026-12-04T12:00:00Z", "final": true,
            "netns": [{"inode": 1, "count": 10, "max": 1000, "processes": [evil]}],
            "drops": [
                {"netns": 1, "service": evil, "cause": "table_full", "proto": "tcp", "flows": 1, "packets": 1},
                {"netns": 1, "service": huge, "cause": "table_full", "proto": "tcp", "flows": 1, "packets": 1},
            ],
        });
        let header = serde_json::json!({"type": "recording", "version": 1, "host": evil});
        let text = format!("{header}\n{summary}\n");
        let (r, _) =
            Report::from_reader(std::path::Path::new("r.ndjson"), text.as_bytes()).unwrap();
        let md = r.markdown();
        assert!(!md.contains('\u{1b}'), "raw ESC in the Markdown");
        // Code blocks show text as it is: look outside them, and make
        // sure none is ended early.
        let mut outside = String::new();
        let mut fenced = false;
        for line in md.lines() {
            if line.starts_with("```") {
                assert!(
                    fenced || line.len() > 3,
                    "a name closed a code block: {line}"
                );
                fenced = !fenced;
            } else if !fenced {
                outside += line;
                outside.push('\n');
            }
        }
        for raw in ["<script>", "[a](http", "\n# h1", "x`y"] {
            assert!(!outside.contains(raw), "{raw:?} raw in:\n{md}");
        }
        assert!(md.contains("\\<script\\>"), "{md}");
        let html = r.html();
        assert!(!html.contains("<script"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    }
}
