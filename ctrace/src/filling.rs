//! Who is filling a table now: new entries per second, per namespace, by
//! source prefix (/24, /64), by source pod and by service, over the last
//! interval. The answer to "who is filling it right now" during an
//! incident, where the insert rate alone says only how fast.
//!
//! New entries come from the tier's insert events where it has them, else
//! from ctnetlink's NEW event group ([`NewEntryFeed`]): no dump, and what
//! the kernel could not queue is counted, never silent.
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
    /// become [`FillingMeter::rows`], and counting starts again.
    pub fn roll(&mut self) {
        let now = Instant::now();
        let secs = (now - self.since).as_secs_f64().max(1e-3);
        self.since = now;
        let mut rows = Vec::new();
        for ((netns, by), keys) in self.counts.drain() {
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
/// namespace.
#[derive(Default)]
pub struct NewEntryFeed {
    feeds: HashMap<u64, NewEntries>,
    /// Subscribed, but `nf_conntrack_events` is 0 there: nothing comes.
    silent: std::collections::HashSet<u64>,
    /// Namespaces that could not be subscribed (no ctnetlink there), and
    /// when they were last tried.
    failed: HashMap<u64, Instant>,
    /// Announcements the kernel dropped in namespaces no longer watched.
    overruns_gone: u64,
}

impl NewEntryFeed {
    const RETRY: Duration = Duration::from_secs(60);

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
                self.overruns_gone += f.overruns;
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
                Ok((f, silent)) => {
                    log::debug!("netns {ns}: entry events subscribed");
                    self.failed.remove(&ns);
                    self.feeds.insert(ns, f);
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
    /// its namespace.
    pub fn drain(&mut self, f: &mut dyn FnMut(u64, Announced, &Entry)) {
        for (ns, feed) in &mut self.feeds {
            match feed.drain(DRAIN_MAX, &mut |what, e| f(*ns, what, e)) {
                Ok(n) => log::trace!("netns {ns}: {n} entries announced"),
                Err(e) => log::debug!("netns {ns}: entry events: {e:#}"),
            }
        }
    }

    /// Whether namespace `netns`'s entries are announced here.
    pub fn feeds(&self, netns: u64) -> bool {
        self.feeds.contains_key(&netns) && !self.silent.contains(&netns)
    }

    /// Times the kernel dropped announcements: the rates are a sample then.
    pub fn overruns(&self) -> u64 {
        self.overruns_gone + self.feeds.values().map(|f| f.overruns).sum::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        m.roll();
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
        m.roll();
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
