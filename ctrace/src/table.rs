//! Table pressure: each network namespace's conntrack fill, statistics and
//! their rates, sampled from inside the namespace over ctnetlink, or, where
//! ctnetlink is missing (stock OpenWrt ships nf_conntrack_netlink as a
//! separate package), from conntrack's procfs files ([`TableReader`]).
//!
//! The limit (`nf_conntrack_max`) is global but the count is per namespace,
//! so "how full" is always asked per namespace. Namespaces are discovered,
//! not listed: `/run/netns` and every task's `/proc/*/task/*/ns/net`.
use std::{
    collections::{BTreeMap, VecDeque},
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    conntrack::{SOURCE_ENV, SourceChoice, Stats, TableReader, TableSource, procfs::ProcConntrack},
    event::monotonic_ns,
    netlink::ctnetlink::CtSocket,
    netns::{self, NetNs},
};

/// Opens `ns`'s conntrack: ctnetlink if it answers there, else procfs (per
/// `choice`). The error names both failures when neither works. The
/// second value is why ctnetlink was passed over, when procfs is used in
/// `Auto`.
pub fn open_reader(
    ns: &NetNs,
    choice: SourceChoice,
) -> anyhow::Result<(TableReader, Option<String>)> {
    let procfs = || -> anyhow::Result<TableReader> { Ok(Box::new(ProcConntrack::open(Some(ns))?)) };
    let ctnetlink = || -> anyhow::Result<TableReader> { Ok(Box::new(CtSocket::open(Some(ns))?)) };
    match choice {
        SourceChoice::Ctnetlink => Ok((ctnetlink()?, None)),
        SourceChoice::Procfs => Ok((procfs()?, None)),
        SourceChoice::Auto => match ctnetlink() {
            Ok(r) => Ok((r, None)),
            Err(ct) => match procfs() {
                Ok(r) => Ok((r, Some(format!("{ct:#}")))),
                Err(p) => Err(p).context(format!(
                    "conntrack is readable neither over ctnetlink ({ct:#}) nor in procfs"
                )),
            },
        },
    }
}

/// Samples kept per namespace: enough for rates, time-to-full and for
/// finding the sample that precedes any pending drop.
const HISTORY: usize = 64;
/// Growth of the count over this window feeds the time-to-full estimate.
const TREND_WINDOW_NS: u64 = 10_000_000_000;

#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub mono_ns: u64,
    pub stats: Stats,
}

/// The statistics as (name, value) pairs, in the order conntrack -S prints them.
pub fn stat_fields(s: &Stats) -> [(&'static str, u64); 10] {
    [
        ("found", s.found),
        ("invalid", s.invalid),
        ("insert", s.insert),
        ("insert_failed", s.insert_failed),
        ("drop", s.drop),
        ("early_drop", s.early_drop),
        ("error", s.error),
        ("search_restart", s.search_restart),
        ("clash_resolve", s.clash_resolve),
        ("chaintoolong", s.chaintoolong),
    ]
}

/// When the table will be full at the current growth, if it is growing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TimeToFull {
    Full,
    In(Duration),
    NotGrowing,
    Unknown,
}

/// One namespace's table, as shown to the user.
#[derive(Clone, Debug)]
pub struct TableView {
    pub inode: u64,
    pub name: Option<String>,
    /// Where the numbers were read.
    pub source: TableSource,
    pub entries: u64,
    pub max: u64,
    pub stats: Stats,
    /// Per-second rates over the last sampling interval, same order as
    /// [`stat_fields`].
    pub rates: Vec<(&'static str, f64)>,
    pub insert_rate: f64,
    pub drop_rate: f64,
    pub time_to_full: TimeToFull,
    /// The pod and processes inside (filled in by [`TableMonitor::views`]).
    pub names: crate::pods::NetnsNames,
}

impl TableView {
    pub fn fill(&self) -> f64 {
        if self.max == 0 {
            0.0
        } else {
            self.entries as f64 * 100.0 / self.max as f64
        }
    }
}

struct Table {
    name: Option<String>,
    reader: TableReader,
    history: VecDeque<Sample>,
}

impl Table {
    fn latest(&self) -> Option<&Sample> {
        self.history.back()
    }

    fn view(&self, inode: u64) -> Option<TableView> {
        let last = self.history.back()?;
        let prev = self.history.iter().rev().nth(1).unwrap_or(last);
        let dt = (last.mono_ns.saturating_sub(prev.mono_ns)) as f64 / 1e9;
        let rate = |a: u64, b: u64| {
            if dt > 0.0 {
                a.saturating_sub(b) as f64 / dt
            } else {
                0.0
            }
        };
        let rates: Vec<_> = stat_fields(&last.stats)
            .iter()
            .zip(stat_fields(&prev.stats).iter())
            .map(|((name, now), (_, before))| (*name, rate(*now, *before)))
            .collect();
        Some(TableView {
            inode,
            name: self.name.clone(),
            source: self.reader.source(),
            entries: last.stats.entries,
            max: last.stats.max,
            stats: last.stats,
            insert_rate: rate(last.stats.insert, prev.stats.insert),
            drop_rate: rate(last.stats.drop, prev.stats.drop),
            rates,
            time_to_full: self.time_to_full(),
            names: Default::default(),
        })
    }

    /// Linear extrapolation of the count over the trend window. Crude, but
    /// the question an operator asks is "minutes or days?", and this
    /// answers it.
    fn time_to_full(&self) -> TimeToFull {
        let Some(last) = self.history.back() else {
            return TimeToFull::Unknown;
        };
        if last.stats.max > 0 && last.stats.entries >= last.stats.max {
            return TimeToFull::Full;
        }
        let since = last.mono_ns.saturating_sub(TREND_WINDOW_NS);
        let Some(first) = self.history.iter().find(|s| s.mono_ns >= since) else {
            return TimeToFull::Unknown;
        };
        let dt = last.mono_ns.saturating_sub(first.mono_ns) as f64 / 1e9;
        if dt < 0.5 {
            return TimeToFull::Unknown;
        }
        let growth = (last.stats.entries as f64 - first.stats.entries as f64) / dt;
        if growth <= 0.0 || last.stats.max == 0 {
            return TimeToFull::NotGrowing;
        }
        let left = (last.stats.max - last.stats.entries) as f64;
        TimeToFull::In(Duration::from_secs_f64(left / growth))
    }
}

/// Which namespaces the user asked for: inode numbers, `/run/netns` names
/// or paths to namespace files.
#[derive(Clone, Debug, Default)]
pub struct NetnsFilter {
    specs: Vec<String>,
}

impl NetnsFilter {
    pub fn new(specs: Vec<String>) -> Self {
        NetnsFilter { specs }
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Checks every spec against the namespaces that exist now, and turns
    /// paths into inode numbers: a typo must fail before anything is
    /// loaded, not watch nothing.
    pub fn resolve(self) -> anyhow::Result<NetnsFilter> {
        if self.specs.is_empty() {
            return Ok(self);
        }
        let known = netns::discover()?;
        let mut specs = Vec::new();
        for s in self.specs {
            if let Ok(inode) = s.parse::<u64>() {
                if !known.iter().any(|i| i.inode == inode) {
                    anyhow::bail!(
                        "--netns {s}: no network namespace has inode {s} (`ctrace status` lists them)"
                    );
                }
                specs.push(s);
            } else if s.contains('/') {
                let ns = NetNs::open(std::path::Path::new(&s))
                    .map_err(|e| anyhow::anyhow!("--netns {s}: not a network namespace: {e:#}"))?;
                specs.push(ns.inode().to_string());
            } else {
                if !known.iter().any(|i| i.name.as_deref() == Some(s.as_str())) {
                    anyhow::bail!(
                        "--netns {s}: no namespace named `{s}` in /run/netns (`ip netns list`)"
                    );
                }
                specs.push(s);
            }
        }
        Ok(NetnsFilter { specs })
    }

    pub fn matches(&self, info: &netns::NetNsInfo) -> bool {
        self.specs.is_empty()
            || self.specs.iter().any(|s| {
                s.parse::<u64>().ok() == Some(info.inode)
                    || info.name.as_deref() == Some(s.as_str())
                    || info.path.as_os_str() == s.as_str()
            })
    }

    pub fn matches_inode(&self, inode: u64, known: &BTreeMap<u64, Option<String>>) -> bool {
        self.specs.is_empty()
            || self.specs.iter().any(|s| {
                s.parse::<u64>().ok() == Some(inode)
                    || known
                        .get(&inode)
                        .is_some_and(|n| n.as_deref() == Some(s.as_str()))
            })
    }
}

/// All namespaces' tables, sampled on demand.
pub struct TableMonitor {
    filter: NetnsFilter,
    tables: BTreeMap<u64, Table>,
    /// Namespaces seen but whose table cannot be read (neither ctnetlink
    /// nor procfs), with why.
    unreadable: BTreeMap<u64, String>,
    names: BTreeMap<u64, Option<String>>,
    choice: SourceChoice,
    /// The switch to procfs was logged at warning level once already.
    told_procfs: bool,
    namer: crate::pods::Namer,
    /// ctrace's own namespace (the host's, usually): shown even while idle,
    /// as node_exporter shows it.
    own: Option<u64>,
    /// At most this many namespaces are watched (each holds a socket and
    /// makes metric series), save those with drops; see [`MAX_TABLES`].
    cap: usize,
    /// Namespaces the cap left unwatched at the last discovery.
    left_out: usize,
}

/// Namespaces watched at most: a node with a thousand pods fits, and a
/// user who makes namespaces by the thousand cannot make ctrace hold a
/// socket and metric series for each. Namespaces with drops are watched
/// beyond it; the rest are counted (`netns_left_out`).
pub const MAX_TABLES: usize = 1024;

impl TableMonitor {
    /// Sources as `CTRACE_TABLE_SOURCE` says (see [`SourceChoice`]); an
    /// invalid value is warned about and taken as `auto`.
    pub fn new(filter: NetnsFilter) -> Self {
        let choice = SourceChoice::from_env().unwrap_or_else(|e| {
            log::warn!("{e:#}; using auto");
            SourceChoice::Auto
        });
        Self::with_source(filter, choice)
    }

    pub fn with_source(filter: NetnsFilter, choice: SourceChoice) -> Self {
        TableMonitor {
            filter,
            tables: BTreeMap::new(),
            unreadable: BTreeMap::new(),
            names: BTreeMap::new(),
            choice,
            told_procfs: false,
            namer: crate::pods::Namer::new("/"),
            own: NetNs::current().ok().map(|ns| ns.inode()),
            cap: MAX_TABLES,
            left_out: 0,
        }
    }

    /// Namespaces the cap left unwatched at the last discovery.
    pub fn left_out(&self) -> usize {
        self.left_out
    }

    /// Opens a namespace's reader and says, once per run at warning level
    /// (then at debug), when it had to fall back to procfs.
    fn open_reader(&mut self, ns: &NetNs) -> anyhow::Result<TableReader> {
        let (reader, why) = open_reader(ns, self.choice)?;
        if reader.source() == TableSource::Procfs {
            let why = why.map_or_else(
                || format!("{SOURCE_ENV}=procfs"),
                |w| format!("ctnetlink unavailable: {w}"),
            );
            let msg = format!(
                "netns {}: reading conntrack from procfs (/proc/net/stat/nf_conntrack, \
                 /proc/net/nf_conntrack) instead of ctnetlink ({why}); occupancy is re-read \
                 periodically",
                ns.inode()
            );
            if std::mem::replace(&mut self.told_procfs, true) {
                log::debug!("{msg}");
            } else {
                log::warn!("{msg}");
            }
        }
        Ok(reader)
    }

    pub fn filter(&self) -> &NetnsFilter {
        &self.filter
    }

    /// Finds namespaces that appeared, forgets ones that vanished.
    /// Read processes, cgroups and the kubelet's pod directories under
    /// `root` instead of `/` (a container with the host's mounted there).
    pub fn set_host_root(&mut self, root: &std::path::Path) {
        self.namer = crate::pods::Namer::new(root);
    }

    pub fn discover(&mut self) {
        self.discover_preferring(&[]);
    }

    /// [`TableMonitor::discover`], watching the namespaces in `priority`
    /// (those with drops) even past the cap.
    pub fn discover_preferring(&mut self, priority: &[u64]) {
        self.namer.refresh();
        let found = match netns::discover() {
            Ok(f) => f,
            Err(e) => {
                log::warn!("netns discovery failed: {e:#}");
                return;
            }
        };
        let wanted: Vec<_> = found
            .into_iter()
            .filter(|i| self.filter.matches(i))
            .collect();
        let mut alive = BTreeMap::new();
        let known: std::collections::HashSet<u64> = wanted.iter().map(|i| i.inode).collect();
        let priority: std::collections::HashSet<u64> = priority.iter().copied().collect();
        // Those gone no longer take room.
        self.tables.retain(|inode, _| known.contains(inode));
        self.left_out = 0;
        for info in &wanted {
            alive.insert(info.inode, info.name.clone());
            if self.tables.contains_key(&info.inode) || self.unreadable.contains_key(&info.inode) {
                continue;
            }
            // Namespaces with drops get past the cap, up to twice it: the
            // kernel's totals hold drops of at most 8192 rows anyway.
            let room = if priority.contains(&info.inode) {
                2 * self.cap
            } else {
                self.cap
            };
            if self.tables.len() >= room {
                self.left_out += 1;
                continue;
            }
            let opened = NetNs::open(&info.path).and_then(|ns| self.open_reader(&ns));
            match opened {
                Ok(reader) => {
                    log::debug!(
                        "watching conntrack in netns {} over {}",
                        info.inode,
                        reader.source().name()
                    );
                    self.tables.insert(
                        info.inode,
                        Table {
                            name: info.name.clone(),
                            reader,
                            history: VecDeque::new(),
                        },
                    );
                    self.sample(info.inode);
                }
                Err(e) => {
                    log::debug!("netns {}: {e:#}", info.inode);
                    self.unreadable.insert(info.inode, format!("{e:#}"));
                }
            }
        }
        self.unreadable.retain(|inode, _| alive.contains_key(inode));
        self.names = alive;
    }

    /// Adds a namespace the caller holds open (the lab's own), without
    /// waiting for discovery to find it.
    pub fn watch(&mut self, ns: &NetNs, name: &str) -> anyhow::Result<()> {
        let reader = self.open_reader(ns)?;
        self.names.insert(ns.inode(), Some(name.to_string()));
        self.tables.insert(
            ns.inode(),
            Table {
                name: Some(name.to_string()),
                reader,
                history: VecDeque::new(),
            },
        );
        self.sample(ns.inode());
        Ok(())
    }

    pub fn wants(&self, inode: u64) -> bool {
        self.filter.matches_inode(inode, &self.names)
    }

    pub fn knows(&self, inode: u64) -> bool {
        self.tables.contains_key(&inode)
    }

    pub fn name(&self, inode: u64) -> Option<&str> {
        self.names.get(&inode).and_then(|n| n.as_deref())
    }

    /// The namespace's reader, for dumps.
    pub fn reader(&mut self, inode: u64) -> Option<&mut TableReader> {
        self.tables.get_mut(&inode).map(|t| &mut t.reader)
    }

    /// Where the namespace's table is read, if it can be.
    pub fn source(&self, inode: u64) -> Option<TableSource> {
        self.tables.get(&inode).map(|t| t.reader.source())
    }

    /// Namespaces whose tables can be read.
    pub fn inodes(&self) -> Vec<u64> {
        self.tables.keys().copied().collect()
    }

    /// Reads the namespace's statistics now; None when it cannot.
    pub fn sample(&mut self, inode: u64) -> Option<Stats> {
        let t = self.tables.get_mut(&inode)?;
        match t.reader.stats() {
            Ok(stats) => {
                if t.history.len() == HISTORY {
                    t.history.pop_front();
                }
                t.history.push_back(Sample {
                    mono_ns: monotonic_ns(),
                    stats,
                });
                Some(stats)
            }
            Err(e) => {
                log::debug!("netns {inode}: reading conntrack stats: {e:#}");
                None
            }
        }
    }

    pub fn sample_all(&mut self) {
        let inodes: Vec<u64> = self.tables.keys().copied().collect();
        for inode in inodes {
            self.sample(inode);
        }
    }

    /// The newest kept sample of a namespace taken at or before `mono_ns`
    /// (CLOCK_MONOTONIC).
    pub fn sampled_by(&self, inode: u64, mono_ns: u64) -> Option<Sample> {
        let t = self.tables.get(&inode)?;
        t.history
            .iter()
            .rev()
            .find(|s| s.mono_ns <= mono_ns)
            .copied()
    }

    /// The newest statistics of a namespace.
    pub fn latest(&self, inode: u64) -> Option<Stats> {
        self.tables.get(&inode)?.latest().map(|s| s.stats)
    }

    /// Namespaces whose conntrack is in use (anything counted at all), plus
    /// those in `always` (namespaces with drops).
    pub fn views(&self, always: &[u64]) -> Vec<TableView> {
        self.tables
            .iter()
            .filter(|(inode, t)| {
                always.contains(inode)
                    || self.own == Some(**inode)
                    || t.latest().is_some_and(|s| {
                        s.stats.entries > 0 || stat_fields(&s.stats).iter().any(|(_, v)| *v > 0)
                    })
            })
            .filter_map(|(inode, t)| t.view(*inode))
            .map(|mut v| {
                v.names = self.namer.get(v.inode);
                v
            })
            .collect()
    }

    pub fn unreadable(&self) -> &BTreeMap<u64, String> {
        &self.unreadable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::ctnetlink::{CtEntry, CtSocket};
    use crate::netns::skip_unless_root;
    use ctrace_common::IPPROTO_UDP;

    /// Past the cap, new namespaces are counted, not watched, unless they
    /// have drops.
    #[test]
    fn namespaces_past_the_cap_are_counted_not_watched() {
        if skip_unless_root("namespaces_past_the_cap_are_counted_not_watched") {
            return;
        }
        let spaces: Vec<NetNs> = (0..5)
            .map(|_| crate::netlink::rtnetlink::new_netns().unwrap())
            .collect();
        // A thread in each, so that discovery (which looks at tasks) finds
        // them; they end when `anchors` drops.
        let anchors: Vec<_> = spaces
            .iter()
            .map(|ns| {
                let (tx, rx) = std::sync::mpsc::channel::<()>();
                let h = ns
                    .spawn("cap-test", move || {
                        let _ = rx.recv();
                    })
                    .unwrap();
                (tx, h)
            })
            .collect();
        let inodes: Vec<String> = spaces.iter().map(|n| n.inode().to_string()).collect();
        let filter = NetnsFilter::new(inodes).resolve().unwrap();
        let mut m = TableMonitor::with_source(filter, SourceChoice::Auto);
        m.cap = 3;
        m.discover();
        assert_eq!((m.inodes().len(), m.left_out()), (3, 2));
        let outside: Vec<u64> = spaces
            .iter()
            .map(NetNs::inode)
            .filter(|i| !m.knows(*i))
            .collect();
        m.discover_preferring(&outside[..1]);
        assert_eq!((m.inodes().len(), m.left_out()), (4, 1));
        assert!(m.knows(outside[0]));
        for (tx, h) in anchors {
            drop(tx);
            h.join().unwrap();
        }
    }

    /// A monitor told to use procfs samples a namespace like one using
    /// ctnetlink, says so in its views, and its JSON carries it.
    #[test]
    fn table_monitor_on_procfs_says_so() {
        if skip_unless_root("table_monitor_on_procfs_says_so") {
            return;
        }
        let ns = crate::netlink::rtnetlink::new_netns().unwrap();
        let mut ct = CtSocket::open(Some(&ns)).unwrap();
        let created = ct
            .create_batch(&mut (0..10u16).map(|i| {
                CtEntry::assured(
                    IPPROTO_UDP,
                    "10.1.0.1".parse().unwrap(),
                    1000 + i,
                    "10.1.0.2".parse().unwrap(),
                    53,
                    60,
                )
            }))
            .unwrap();
        assert_eq!(created.created, 10);
        let mut by_proc = TableMonitor::with_source(NetnsFilter::default(), SourceChoice::Procfs);
        by_proc.watch(&ns, "p").unwrap();
        let mut by_nl = TableMonitor::with_source(NetnsFilter::default(), SourceChoice::Ctnetlink);
        by_nl.watch(&ns, "n").unwrap();
        assert_eq!(by_proc.source(ns.inode()), Some(TableSource::Procfs));
        assert_eq!(by_nl.source(ns.inode()), Some(TableSource::Ctnetlink));
        let (p, n) = (by_proc.views(&[]), by_nl.views(&[]));
        assert_eq!((p.len(), n.len()), (1, 1));
        assert_eq!(p[0].source, TableSource::Procfs);
        assert_eq!((p[0].entries, p[0].max), (10, n[0].max));
        assert_eq!(p[0].stats, n[0].stats);
        assert_eq!(
            serde_json::to_value(p[0].source).unwrap(),
            serde_json::json!("procfs")
        );
    }

    #[test]
    fn table_source_choice_from_env_values() {
        // Only the parsing: the variable itself is process-wide.
        assert_eq!(SourceChoice::parse(None).unwrap(), SourceChoice::Auto);
        assert_eq!(SourceChoice::parse(Some("")).unwrap(), SourceChoice::Auto);
        assert_eq!(
            SourceChoice::parse(Some("procfs")).unwrap(),
            SourceChoice::Procfs
        );
        assert_eq!(
            SourceChoice::parse(Some("ctnetlink")).unwrap(),
            SourceChoice::Ctnetlink
        );
        let e = format!("{:#}", SourceChoice::parse(Some("netlink")).unwrap_err());
        assert!(e.contains("CTRACE_TABLE_SOURCE=\"netlink\""), "{e}");
    }
}
