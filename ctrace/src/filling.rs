//! Who is filling a table now: new entries per second, per namespace, by
//! source prefix (/24, /64), by source pod and by service, over the last
//! interval. The answer to "who is filling it right now" during an
//! incident, where the insert rate alone says only how fast.
//!
//! New entries come from the tier's insert events where it has them, else
//! from the flows the tc tier's programs saw pass, else from ctnetlink's
//! NEW event group ([`NewEntryFeed`]): no dump, and what the kernel could
//! not queue is counted, never silent.
use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    conntrack::Entry,
    netlink::ctnetlink::{Announced, NewEntries},
    netns::NetNs,
};

/// Entries per (namespace, dimension) shown.
pub const TOP: usize = 10;
/// Distinct keys counted per (namespace, dimension) in one interval; a
/// storm of random sources folds the rest into [`OTHER`].
const MAX_KEYS: usize = 4096;
/// The key that past [`MAX_KEYS`] collects the rest.
pub const OTHER: &str = "(other)";
/// New entries read from one namespace's feed per call: a storm's
/// announcements beyond it wait for the next call or overrun (counted).
const DRAIN_MAX: usize = 65_536;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum FillBy {
    /// The source address's /24 (IPv4) or /64 (IPv6).
    SrcPrefix,
    /// The pod of this node with the source address.
    SrcPod,
    /// The catalog's name for the destination port (`other` if none).
    Service,
}

impl FillBy {
    pub const ALL: [FillBy; 3] = [FillBy::SrcPrefix, FillBy::SrcPod, FillBy::Service];

    pub fn name(self) -> &'static str {
        match self {
            FillBy::SrcPrefix => "src_prefix",
            FillBy::SrcPod => "src_pod",
            FillBy::Service => "service",
        }
    }
}

/// One of the top new-entry makers of a namespace in the last interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct FillingRow {
    pub netns: u64,
    pub by: FillBy,
    pub key: String,
    /// New entries per second over the interval.
    pub per_s: f64,
    /// Its part of all new entries of the namespace in the interval.
    pub share: f64,
}

/// New entries counted since the last [`FillingMeter::roll`].
pub struct FillingMeter {
    counts: HashMap<(u64, FillBy), HashMap<String, u64>>,
    totals: HashMap<u64, u64>,
    /// Where the interval began: at start, then at each roll, so that
    /// rates times intervals add up to the entries.
    since: Instant,
    latest: Vec<FillingRow>,
}

impl Default for FillingMeter {
    fn default() -> Self {
        FillingMeter {
            counts: HashMap::new(),
            totals: HashMap::new(),
            since: Instant::now(),
            latest: Vec::new(),
        }
    }
}

impl FillingMeter {
    /// One new entry of namespace `netns` from `src`.
    pub fn new_entry(&mut self, netns: u64, src: IpAddr, service: Option<&str>, pod: Option<&str>) {
        self.new_entries(netns, src, service, pod, 1);
    }

    /// `n` new entries of namespace `netns` from `src`.
    pub fn new_entries(
        &mut self,
        netns: u64,
        src: IpAddr,
        service: Option<&str>,
        pod: Option<&str>,
        n: u64,
    ) {
        *self.totals.entry(netns).or_default() += n;
        self.count(netns, FillBy::SrcPrefix, &prefix(src), n);
        self.count(netns, FillBy::Service, service.unwrap_or("other"), n);
        if let Some(pod) = pod {
            self.count(netns, FillBy::SrcPod, pod, n);
        }
    }

    fn count(&mut self, netns: u64, by: FillBy, key: &str, n: u64) {
        let keys = self.counts.entry((netns, by)).or_default();
        if let Some(c) = keys.get_mut(key) {
            *c += n;
        } else if keys.len() < MAX_KEYS {
            keys.insert(key.to_string(), n);
        } else {
            *keys.entry(OTHER.to_string()).or_default() += n;
        }
    }

    /// Closes the interval: the top keys of each namespace and dimension
    /// become [`FillingMeter::rows`], and counting starts again. The
    /// namespaces of `listened` were counted for only so many seconds of
    /// the interval: their rates are per second of that.
    pub fn roll(&mut self, listened: &HashMap<u64, f64>) {
        let now = Instant::now();
        let interval = (now - self.since).as_secs_f64().max(1e-3);
        self.since = now;
        let mut rows = Vec::new();
        for ((netns, by), keys) in self.counts.drain() {
            let secs = listened
                .get(&netns)
                .copied()
                .filter(|s| *s >= 1e-3)
                .unwrap_or(interval);
            let total = self.totals.get(&netns).copied().unwrap_or(0).max(1) as f64;
            let mut keys: Vec<(String, u64)> = keys.into_iter().collect();
            keys.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            rows.extend(keys.into_iter().take(TOP).map(|(key, n)| FillingRow {
                netns,
                by,
                key,
                per_s: round2(n as f64 / secs),
                share: round2(n as f64 / total),
            }));
        }
        self.totals.clear();
        rows.sort_by(|a, b| {
            (a.netns, a.by)
                .cmp(&(b.netns, b.by))
                .then(b.per_s.total_cmp(&a.per_s))
        });
        self.latest = rows;
    }

    /// The last closed interval's tops.
    pub fn rows(&self) -> &[FillingRow] {
        &self.latest
    }

    pub fn forget(&mut self, gone: &[u64]) {
        self.latest.retain(|r| !gone.contains(&r.netns));
        self.counts.retain(|(ns, _), _| !gone.contains(ns));
        self.totals.retain(|ns, _| !gone.contains(ns));
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// `10.10.0.0/24` or `fd10::/64`.
pub fn prefix(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
            format!("{net}/64")
        }
    }
}

/// ctnetlink's entry announcements (new and destroyed) for every watched
/// namespace, each listened to within a budget (see [`Window`]).
pub struct NewEntryFeed {
    feeds: HashMap<u64, Feed>,
    /// Announcements per second and namespace the kernel is let build;
    /// None: every one.
    budget: Option<u32>,
    /// The watcher's tick, which windows are a share of.
    interval: Duration,
    /// Subscribed, but `nf_conntrack_events` is 0 there: nothing comes.
    silent: std::collections::HashSet<u64>,
    /// Namespaces that could not be subscribed (no ctnetlink there), and
    /// when they were last tried.
    failed: HashMap<u64, Instant>,
    /// Announcements the kernel dropped in namespaces no longer watched.
    overruns_gone: u64,
}

struct Feed {
    entries: NewEntries,
    window: Window,
    /// `entries.overruns` when the interval began.
    overruns_before: u64,
}

/// Announcements per second and namespace that ctrace lets the kernel
/// build by default. The kernel builds a netlink message for every new and
/// every ended entry while anyone listens, in the packet's path: at 75,000
/// new connections a second that cost the bench's router a tenth of its
/// rate, read or not. Above the budget a namespace is listened to for the
/// first part of each interval only, and its rates are scaled from that
/// sample.
pub const DEFAULT_BUDGET: u32 = 2_000;

/// The least share of an interval listened to, however fast entries come.
const MIN_SHARE: f64 = 0.01;
/// How often a feed that listens for the whole interval under a budget is
/// read: a storm that starts then is cut off once the interval's budget
/// has come, not announced in full until the interval ends.
pub const CHECK_EVERY: Duration = Duration::from_millis(100);

/// When one namespace's feed listens: from the start of each interval, for
/// `share` of it.
#[derive(Clone, Debug, PartialEq)]
struct Window {
    share: f64,
    /// Listening since; None once it left the groups for the interval.
    since: Option<Instant>,
    /// When to leave the groups; None: the whole interval.
    until: Option<Instant>,
    /// Listened so far in this interval.
    listened: Duration,
    /// Listened from the start of the interval without a break so far:
    /// announcements then tell every change, and may keep occupancy.
    whole: bool,
    /// Entries announced in this interval.
    entries_seen: u64,
    /// When it was last read in this interval.
    checked: Instant,
}

impl Window {
    fn new(now: Instant) -> Window {
        Window {
            share: 1.0,
            since: Some(now),
            until: None,
            listened: Duration::ZERO,
            whole: true,
            entries_seen: 0,
            checked: now,
        }
    }

    /// Closes the listening span at `now`.
    fn close(&mut self, now: Instant) {
        if let Some(since) = self.since.take() {
            self.listened += now.saturating_duration_since(since);
        }
        self.until = None;
        self.whole = false;
    }
}

/// The share of the next interval to listen to, after `entries`
/// announcements in `listened` seconds of a window of `share` (`overran`:
/// the kernel dropped some, so there were more).
fn next_share(share: f64, entries: u64, listened: f64, overran: bool, budget: Option<u32>) -> f64 {
    let Some(budget) = budget else {
        return 1.0;
    };
    if listened <= 0.0 {
        return share;
    }
    let rate = entries as f64 / listened;
    let mut next = if rate <= f64::from(budget) {
        1.0
    } else {
        f64::from(budget) / rate
    };
    if overran {
        next = next.min(share / 2.0);
    }
    next.clamp(MIN_SHARE, 1.0)
}

impl NewEntryFeed {
    const RETRY: Duration = Duration::from_secs(60);

    /// `budget`: announcements per second and namespace the kernel is let
    /// build (None: all); `interval`: the tick [`roll`](Self::roll) is
    /// called on.
    pub fn new(budget: Option<u32>, interval: Duration) -> NewEntryFeed {
        NewEntryFeed {
            feeds: HashMap::new(),
            budget,
            interval,
            silent: Default::default(),
            failed: HashMap::new(),
            overruns_gone: 0,
        }
    }

    /// Subscribes to the namespaces of `watched` that have no feed yet,
    /// and drops those no longer watched.
    pub fn sync(&mut self, watched: &[u64]) {
        let gone: Vec<u64> = self
            .feeds
            .keys()
            .filter(|ns| !watched.contains(ns))
            .copied()
            .collect();
        for ns in gone {
            if let Some(f) = self.feeds.remove(&ns) {
                self.overruns_gone += f.entries.overruns;
            }
            self.silent.remove(&ns);
        }
        self.failed.retain(|ns, _| watched.contains(ns));
        let missing: Vec<u64> = watched
            .iter()
            .filter(|ns| !self.feeds.contains_key(ns))
            .filter(|ns| {
                self.failed
                    .get(ns)
                    .is_none_or(|t| t.elapsed() >= Self::RETRY)
            })
            .copied()
            .collect();
        if missing.is_empty() {
            return;
        }
        let paths: HashMap<u64, PathBuf> = crate::netns::discover()
            .map(|all| all.into_iter().map(|i| (i.inode, i.path)).collect())
            .unwrap_or_default();
        for ns in missing {
            let sub = paths
                .get(&ns)
                .ok_or_else(|| anyhow::anyhow!("not found"))
                .and_then(|p| NetNs::open(p))
                // The path named a task's namespace at discovery; a task
                // that exited since may have left its number to another.
                .and_then(|n| {
                    anyhow::ensure!(n.inode() == ns, "moved to another namespace");
                    let events = n.run(|| {
                        std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_events")
                    });
                    let silent = matches!(events, Ok(Ok(v)) if v.trim() == "0");
                    if silent {
                        log::warn!(
                            "netns {ns}: net.netfilter.nf_conntrack_events is 0: conntrack \
                             announces no entries there, so who is filling its table comes \
                             from the tc tier alone (if it runs) and occupancy from \
                             periodic dumps"
                        );
                    }
                    Ok((NewEntries::subscribe(Some(&n))?, silent))
                });
            match sub {
                Ok((entries, silent)) => {
                    log::debug!("netns {ns}: entry events subscribed");
                    self.failed.remove(&ns);
                    self.feeds.insert(
                        ns,
                        Feed {
                            entries,
                            // Not from the start of this interval: not whole.
                            window: Window {
                                whole: false,
                                ..Window::new(Instant::now())
                            },
                            overruns_before: 0,
                        },
                    );
                    if silent {
                        self.silent.insert(ns);
                    }
                }
                Err(e) => {
                    log::debug!("netns {ns}: no new-entry events: {e:#}");
                    self.failed.insert(ns, Instant::now());
                }
            }
        }
    }

    /// Every entry announced since the last call, new or destroyed, with
    /// its namespace, and whether that namespace was listened to for the
    /// whole interval (only then do the announcements tell every change).
    pub fn drain(&mut self, f: &mut dyn FnMut(u64, Announced, &Entry, bool)) {
        for (ns, feed) in &mut self.feeds {
            let whole = feed.window.whole;
            match feed
                .entries
                .drain(DRAIN_MAX, &mut |what, e| f(*ns, what, e, whole))
            {
                Ok(n) => {
                    log::trace!("netns {ns}: {n} entries announced");
                    feed.window.entries_seen += n as u64;
                }
                Err(e) => log::debug!("netns {ns}: entry events: {e:#}"),
            }
        }
    }

    /// Closes the interval (call after [`drain`](Self::drain)): the
    /// seconds each namespace was listened to in it, for its rates; then
    /// every feed listens again, for the share of the next interval its
    /// rate allows.
    pub fn roll(&mut self) -> HashMap<u64, f64> {
        let interval = self.interval;
        let now = Instant::now();
        let mut listened = HashMap::new();
        for (ns, feed) in &mut self.feeds {
            let w = &mut feed.window;
            let whole = w.whole;
            w.close(now);
            let secs = w.listened.as_secs_f64();
            let overran = feed.entries.overruns > feed.overruns_before;
            feed.overruns_before = feed.entries.overruns;
            let entries = std::mem::take(&mut w.entries_seen);
            let share = next_share(w.share, entries, secs, overran, self.budget);
            if share < 1.0 && (w.share >= 1.0 || (share - w.share).abs() > 0.25 * w.share) {
                log::debug!(
                    "netns {ns}: {entries} announcements in {secs:.3} s: listening to {:.1}% \
                     of each interval",
                    share * 100.0
                );
            }
            log::trace!("netns {ns}: {entries} announcements in {secs:.3} s");
            listened.insert(*ns, secs);
            if !whole || w.share < 1.0 || share < 1.0 {
                // Rejoin (a no-op if still joined).
                if let Err(e) = feed.entries.listen(true) {
                    log::debug!("netns {ns}: rejoining entry events: {e:#}");
                }
            }
            *w = Window {
                share,
                until: (share < 1.0).then(|| now + interval.mul_f64(share)),
                ..Window::new(now)
            };
        }
        listened
    }

    /// When a feed must next be read and its window maybe closed: the end
    /// of a sampled window, or the next check of a whole one under a
    /// budget.
    pub fn deadline(&self) -> Option<Instant> {
        self.feeds
            .values()
            .filter(|f| f.window.since.is_some())
            .filter_map(|f| match f.window.until {
                Some(until) => Some(until),
                None => self.budget.map(|_| f.window.checked + CHECK_EVERY),
            })
            .min()
    }

    /// Whether [`deadline`](Self::deadline) has come: read the feeds
    /// ([`drain`](Self::drain)), then [`close_windows`](Self::close_windows).
    pub fn due(&self) -> bool {
        self.deadline().is_some_and(|d| d <= Instant::now())
    }

    /// Leaves the groups of every feed whose window has ended, or whose
    /// interval's budget has come already (call after a drain, which
    /// counts them).
    pub fn close_windows(&mut self) {
        let now = Instant::now();
        let interval = self.interval.as_secs_f64();
        for (ns, feed) in &mut self.feeds {
            let w = &mut feed.window;
            if w.since.is_none() {
                continue;
            }
            let ended = w.until.is_some_and(|u| u <= now);
            let spent = self
                .budget
                .is_some_and(|b| w.entries_seen as f64 >= f64::from(b) * interval);
            w.checked = now;
            if !(ended || spent) {
                continue;
            }
            w.close(now);
            log::trace!(
                "netns {ns}: window closed after {:?}, {} announcements",
                w.listened,
                w.entries_seen
            );
            if let Err(e) = feed.entries.listen(false) {
                log::debug!("netns {ns}: leaving entry events: {e:#}");
            }
        }
    }

    /// The least share of the last interval any namespace was listened to
    /// (1: every announcement was read); None without feeds.
    pub fn least_share(&self) -> Option<f64> {
        self.feeds
            .values()
            .map(|f| f.window.share)
            .min_by(f64::total_cmp)
    }

    /// Whether every announcement of `netns` is read (no sample), so that
    /// they keep its occupancy between dumps.
    pub fn keeps_occupancy(&self, netns: u64) -> bool {
        self.feeds(netns) && self.feeds[&netns].window.share >= 1.0
    }

    /// Whether namespace `netns`'s entries are announced here.
    pub fn feeds(&self, netns: u64) -> bool {
        self.feeds.contains_key(&netns) && !self.silent.contains(&netns)
    }

    /// Times the kernel dropped announcements: the rates are a sample then.
    pub fn overruns(&self) -> u64 {
        self.overruns_gone + self.feeds.values().map(|f| f.entries.overruns).sum::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_share_keeps_announcements_within_the_budget() {
        // Under the budget, or without one: every announcement.
        assert_eq!(next_share(1.0, 1_500, 1.0, false, Some(2_000)), 1.0);
        assert_eq!(next_share(0.1, 75_000, 1.0, true, None), 1.0);
        // 75,000 a second: listen for 2,000 of them.
        let s = next_share(1.0, 75_000, 1.0, false, Some(2_000));
        assert!((s - 2_000.0 / 75_000.0).abs() < 1e-9, "{s}");
        // The rate is per second listened, not per interval.
        let s = next_share(0.1, 7_500, 0.1, false, Some(2_000));
        assert!((s - 2_000.0 / 75_000.0).abs() < 1e-9, "{s}");
        // The kernel dropped some: there were more than counted.
        assert_eq!(next_share(0.5, 100, 0.5, true, Some(2_000)), 0.25);
        // Never below the floor; nothing heard keeps the share.
        assert_eq!(next_share(1.0, 10_000_000, 1.0, false, Some(10)), MIN_SHARE);
        assert_eq!(next_share(0.3, 0, 0.0, false, Some(10)), 0.3);
        assert_eq!(next_share(0.1, 0, 0.1, false, Some(10)), 1.0);
        // It comes back up when the rate falls: a storm that resumes is
        // cut off by close_windows once the interval's budget has come.
        assert_eq!(next_share(0.02, 10, 0.02, false, Some(2_000)), 1.0);
    }

    #[test]
    fn sampled_namespaces_rate_per_second_listened() {
        let mut m = FillingMeter::default();
        let a: IpAddr = "10.20.1.2".parse().unwrap();
        m.new_entries(7, a, Some("ssh"), None, 50);
        m.new_entries(8, a, Some("ssh"), None, 50);
        std::thread::sleep(Duration::from_millis(20));
        m.roll(&HashMap::from([(7, 0.25)]));
        let rate = |ns| {
            m.rows()
                .iter()
                .find(|r| r.netns == ns && r.by == FillBy::Service)
                .unwrap()
                .per_s
        };
        assert_eq!(rate(7), 200.0);
        // Not sampled: per second of the whole interval (20 ms or more).
        assert!(rate(8) <= 2_500.0 && rate(8) > 200.0, "{}", rate(8));
    }

    #[test]
    fn tops_rank_by_rate_and_fold_what_is_past_the_bound() {
        let mut m = FillingMeter::default();
        let a: IpAddr = "10.20.1.2".parse().unwrap();
        let b: IpAddr = "10.20.2.2".parse().unwrap();
        for _ in 0..30 {
            m.new_entry(7, a, Some("ssh"), Some("default/web-a"));
        }
        for _ in 0..10 {
            m.new_entry(7, b, None, None);
        }
        m.roll(&HashMap::new());
        let top = |by| {
            m.rows()
                .iter()
                .find(|r| r.netns == 7 && r.by == by)
                .cloned()
                .unwrap()
        };
        assert_eq!(top(FillBy::SrcPrefix).key, "10.20.1.0/24");
        assert_eq!(top(FillBy::SrcPrefix).share, 0.75);
        assert_eq!(top(FillBy::SrcPod).key, "default/web-a");
        assert_eq!(top(FillBy::Service).key, "ssh");
        // A storm of distinct sources: bounded keys, the rest folded.
        for i in 0..(MAX_KEYS as u32 + 500) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8)));
            m.new_entry(8, ip, None, None);
        }
        assert_eq!(m.counts[&(8, FillBy::SrcPrefix)].len(), MAX_KEYS + 1);
        m.roll(&HashMap::new());
        let other = m
            .rows()
            .iter()
            .find(|r| r.netns == 8 && r.key == OTHER)
            .unwrap();
        assert!(other.share > 0.0, "{other:?}");
        assert_eq!(
            m.rows()
                .iter()
                .filter(|r| r.netns == 8 && r.by == FillBy::SrcPrefix)
                .count(),
            TOP
        );
        assert_eq!(
            prefix("fd10:1:2:3:4::9".parse().unwrap()),
            "fd10:1:2:3::/64"
        );
    }
}
