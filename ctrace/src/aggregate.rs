//! Per-flow detail: which flows were dropped, with their packet counts,
//! for "who exactly" and the top flows. Bounded: at most `cap` flows are
//! kept, the least recently seen forgotten first. The per-service totals
//! users act on do not live here but in the ledger (`ledger.rs`), which
//! a forgotten flow cannot change.
//!
//! A flow is one flow however many of its packets were dropped: a SYN sent
//! four times is one flow and four packets. Packet counts come from the
//! kernel's per-flow map; a flow the kernel's LRU evicted (and counts
//! afresh when it comes back) keeps what was read before.
use std::{
    collections::{BTreeMap, HashMap},
    time::SystemTime,
};

use crate::{
    cause::Cause,
    event::{Clock, Flow, Proto},
    readings::{EvictedKey, Evictor, FlowCount},
    tier::Strategy,
};

/// A dropped flow at first sighting, attributed. Written as the JSON
/// `drop` record (the record module's `Drop`; docs/output.md, "JSON output"),
/// the one shape every sink shares.
#[derive(Clone, Debug)]
pub struct DropRecord {
    pub time: SystemTime,
    pub flow: Flow,
    pub service: Option<String>,
    /// The pods of this node behind the source and destination addresses.
    pub pods: crate::pods::FlowPods,
    pub cause: Cause,
    pub evidence: &'static str,
    pub tcp_flags: u8,
    pub strategy: Strategy,
}

#[derive(Clone, Debug)]
pub struct FlowEntry {
    pub first: DropRecord,
    pub last_seen: SystemTime,
    /// When ctrace last heard of the flow, for forgetting the oldest.
    touched: u64,
    pub tcp_flags: u8,
    /// Packets counted by earlier incarnations of this flow in the kernel map.
    carried: u64,
    /// The kernel map's count for the current incarnation.
    current: u64,
    current_first_ns: u64,
}

impl FlowEntry {
    pub fn packets(&self) -> u64 {
        // A flow is never seen with fewer packets than the one that made it
        // known, even before the first map read.
        (self.carried + self.current).max(1)
    }
}

/// Entries evicted before their time, per (netns, service, proto, who):
/// whose connections made room for new ones.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct EvictionGroup {
    pub netns: u64,
    pub service: Option<String>,
    pub proto: Proto,
    pub entries: u64,
    pub by: Evictor,
}

/// Default number of flows kept in detail.
pub const DEFAULT_MAX_FLOWS: usize = 10_000;

/// Running eviction total of one kernel map key. The map is LRU: a key it
/// dropped and re-created restarts from zero, and what was read before is
/// carried forward.
struct EvictionCount {
    service: Option<String>,
    last: u64,
    total: u64,
    /// Consecutive reads the key was absent from: the map evicted it.
    absent: u8,
}

/// What eviction totals are grouped by in the output.
type EvictionGroupKey = (u64, Option<String>, Proto, Evictor);

pub struct Aggregator {
    flows: HashMap<Flow, FlowEntry>,
    cap: usize,
    clock: u64,
    /// Flows dropped from the detail to stay within `cap`.
    forgotten: u64,
    evictions: HashMap<EvictedKey, EvictionCount>,
    /// Totals of keys the kernel map let go, so that early drops across
    /// ever new ports keep `evictions` as small as the kernel map.
    settled_evictions: HashMap<EvictionGroupKey, u64>,
}

impl Aggregator {
    /// Keeps at most `cap` flows in detail.
    pub fn new(cap: usize) -> Self {
        Aggregator {
            flows: HashMap::new(),
            cap: cap.max(1),
            clock: 0,
            forgotten: 0,
            evictions: HashMap::new(),
            settled_evictions: HashMap::new(),
        }
    }

    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Forgets the least recently seen flows once the detail has grown an
    /// eighth past its cap: amortized, so a flood costs O(log n) a flow.
    fn trim(&mut self) {
        if self.flows.len() <= self.cap + self.cap / 8 {
            return;
        }
        let mut ages: Vec<u64> = self.flows.values().map(|e| e.touched).collect();
        let excess = self.flows.len() - self.cap;
        let (_, cutoff, _) = ages.select_nth_unstable(excess - 1);
        let cutoff = *cutoff;
        let before = self.flows.len();
        self.flows.retain(|_, e| e.touched > cutoff);
        self.forgotten += (before - self.flows.len()) as u64;
    }

    /// Forgets flows of namespaces that no longer exist.
    pub fn retain_netns(&mut self, alive: impl Fn(u64) -> bool) {
        self.flows.retain(|f, _| alive(f.netns));
        self.evictions.retain(|k, _| alive(k.netns));
        self.settled_evictions.retain(|k, _| alive(k.0));
    }

    pub fn is_known(&self, flow: &Flow) -> bool {
        self.flows.contains_key(flow)
    }

    /// Records a first sighting. Returns false when the flow was already
    /// known (the kernel evicted and re-created it), in which case its
    /// count so far is carried forward and nothing new is reported.
    pub fn observe(&mut self, rec: DropRecord, mono_ns: u64) -> bool {
        let now = self.tick();
        match self.flows.get_mut(&rec.flow) {
            Some(e) => {
                e.touched = now;
                if mono_ns > e.current_first_ns {
                    e.carried += e.current;
                    e.current = 0;
                    e.current_first_ns = mono_ns;
                }
                e.last_seen = e.last_seen.max(rec.time);
                false
            }
            None => {
                self.flows.insert(
                    rec.flow,
                    FlowEntry {
                        touched: now,
                        last_seen: rec.time,
                        tcp_flags: rec.tcp_flags,
                        carried: 0,
                        current: 0,
                        current_first_ns: mono_ns,
                        first: rec,
                    },
                );
                self.trim();
                true
            }
        }
    }

    /// Folds in the kernel map's current counts.
    pub fn update_counts(&mut self, counts: &HashMap<Flow, FlowCount>, clock: &Clock) {
        for (flow, c) in counts {
            let Some(e) = self.flows.get_mut(flow) else {
                continue;
            };
            if c.last_ns > 0 && clock.wall(c.last_ns) > e.last_seen {
                self.clock += 1;
                e.touched = self.clock;
            }
            if c.first_ns > e.current_first_ns {
                // A newer incarnation than the one we counted.
                e.carried += e.current;
                e.current_first_ns = c.first_ns;
            }
            e.current = e.current.max(c.packets);
            e.tcp_flags |= c.tcp_flags;
            e.last_seen = e.last_seen.max(clock.wall(c.last_ns));
        }
    }

    pub fn flows(&self) -> impl Iterator<Item = &FlowEntry> {
        self.flows.values()
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// The flows with the most dropped packets.
    pub fn top_flows(&self, n: usize) -> Vec<&FlowEntry> {
        let mut v: Vec<&FlowEntry> = self.flows.values().collect();
        v.sort_by(|a, b| {
            b.packets()
                .cmp(&a.packets())
                .then(b.last_seen.cmp(&a.last_seen))
        });
        v.truncate(n);
        v
    }

    /// Folds in the kernel's eviction counts: every key the map holds, of
    /// every namespace, when `complete`; `service` names a port.
    pub fn update_evictions(
        &mut self,
        counts: &[(EvictedKey, u64)],
        complete: bool,
        service: impl Fn(Proto, u16) -> Option<String>,
    ) {
        // Only a complete read shows which keys the map let go.
        if complete {
            for e in self.evictions.values_mut() {
                e.absent = e.absent.saturating_add(1);
            }
        }
        for (key, n) in counts {
            let e = self.evictions.entry(*key).or_insert_with(|| EvictionCount {
                service: service(key.proto, key.dport),
                last: 0,
                total: 0,
                absent: 0,
            });
            e.total += if *n >= e.last { n - e.last } else { *n };
            e.last = *n;
            e.absent = 0;
        }
        // Absent twice, not once: a walk of a map being written can miss a
        // key, and forgetting a live key's last count would count it again.
        // A key the map re-creates later counts from zero, as it does there.
        let settled = &mut self.settled_evictions;
        self.evictions.retain(|k, e| {
            if e.absent < 2 {
                return true;
            }
            *settled
                .entry((k.netns, e.service.take(), k.proto, k.by))
                .or_default() += e.total;
            false
        });
    }

    /// Per (netns, service, proto, evictor) eviction totals of the
    /// namespaces `wanted` picks, biggest first.
    pub fn evictions(&self, wanted: impl Fn(u64) -> bool) -> Vec<EvictionGroup> {
        let mut by: BTreeMap<(u64, Option<&str>, Proto, Evictor), u64> = BTreeMap::new();
        for (k, e) in self.evictions.iter().filter(|(k, _)| wanted(k.netns)) {
            *by.entry((k.netns, e.service.as_deref(), k.proto, k.by))
                .or_default() += e.total;
        }
        let settled = self.settled_evictions.iter().filter(|(k, _)| wanted(k.0));
        for ((netns, service, proto, evictor), n) in settled {
            *by.entry((*netns, service.as_deref(), *proto, *evictor))
                .or_default() += n;
        }
        let mut v: Vec<EvictionGroup> = by
            .into_iter()
            .map(|((netns, service, proto, by), entries)| EvictionGroup {
                netns,
                service: service.map(str::to_string),
                proto,
                by,
                entries,
            })
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.entries));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn flow(sport: u16, dport: u16, proto: Proto) -> Flow {
        Flow {
            netns: 7,
            proto,
            src: SocketAddr::new("10.10.0.3".parse().unwrap(), sport),
            dst: SocketAddr::new("10.10.1.2".parse().unwrap(), dport),
        }
    }

    fn rec(f: Flow, service: Option<&str>) -> DropRecord {
        DropRecord {
            time: SystemTime::UNIX_EPOCH,
            flow: f,
            service: service.map(str::to_string),
            pods: Default::default(),
            cause: Cause::TableFull,
            evidence: "test",
            tcp_flags: 2,
            strategy: Strategy::Tracepoint,
        }
    }

    fn count(packets: u64, first_ns: u64) -> FlowCount {
        FlowCount {
            packets,
            first_ns,
            last_ns: first_ns + 10,
            tcp_flags: 2,
            class: 0,
        }
    }

    #[test]
    fn retransmitted_syn_is_one_flow_four_packets() {
        let mut a = Aggregator::new(10);
        let f = flow(40000, 2380, Proto::Tcp);
        assert!(a.observe(rec(f, Some("etcd-peer")), 100));
        a.update_counts(&HashMap::from([(f, count(4, 100))]), &Clock::new());
        let top = a.top_flows(10);
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].packets(), 4);
    }

    #[test]
    fn detail_is_bounded_and_keeps_the_recent_flows() {
        let mut a = Aggregator::new(100);
        for p in 0..10_000u16 {
            a.observe(rec(flow(p, 22, Proto::Tcp), Some("ssh")), u64::from(p));
            assert!(a.flow_count() <= 100 + 100 / 8);
        }
        assert_eq!(a.forgotten() + a.flow_count() as u64, 10_000);
        assert!(a.is_known(&flow(9_999, 22, Proto::Tcp)));
        assert!(!a.is_known(&flow(0, 22, Proto::Tcp)));
    }

    #[test]
    fn evicted_flow_keeps_its_count() {
        let mut a = Aggregator::new(10);
        let f = flow(40000, 4420, Proto::Tcp);
        a.observe(rec(f, Some("nvme-tcp")), 100);
        a.update_counts(&HashMap::from([(f, count(3, 100))]), &Clock::new());
        // The kernel evicted the flow, then saw it again: a second event.
        assert!(!a.observe(rec(f, Some("nvme-tcp")), 500));
        a.update_counts(&HashMap::from([(f, count(2, 500))]), &Clock::new());
        assert_eq!(a.flows().next().unwrap().packets(), 5);
        assert_eq!(a.flow_count(), 1);
    }

    #[test]
    fn evictions_group_by_service_and_survive_the_lru() {
        let mut a = Aggregator::new(10);
        let key = |dport| EvictedKey {
            netns: 7,
            proto: Proto::Udp,
            dport,
            by: Evictor::EarlyDrop,
        };
        let name = |_: Proto, port: u16| (port == 53).then(|| "dns".to_string());
        a.update_evictions(&[(key(53), 3), (key(5353), 1)], true, name);
        a.update_evictions(&[(key(53), 5)], true, name);
        // The map dropped the key and counted afresh: 5 read before, 2 now.
        a.update_evictions(&[(key(53), 2)], true, name);
        let v = a.evictions(|_| true);
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].service.as_deref(), v[0].entries), (Some("dns"), 7));
        assert_eq!((v[1].service.as_deref(), v[1].entries), (None, 1));
    }

    #[test]
    fn evictions_on_ever_new_ports_keep_the_detail_bounded() {
        let mut a = Aggregator::new(10);
        let key = |dport| EvictedKey {
            netns: 7,
            proto: Proto::Tcp,
            dport,
            by: Evictor::EarlyDrop,
        };
        let name = |_: Proto, port: u16| (port == 22).then(|| "ssh".to_string());
        // The kernel map holds 4 keys at a time: ssh, and three ports that
        // change with every read.
        for read in 0..1000u16 {
            let mut counts = vec![(key(22), u64::from(read) + 1)];
            counts.extend((0..3).map(|i| (key(10_000 + read * 3 + i), 2)));
            a.update_evictions(&counts, true, name);
            assert!(a.evictions.len() <= 4 * 3, "{}", a.evictions.len());
        }
        let v = a.evictions(|_| true);
        assert_eq!(v.len(), 2, "{v:?}");
        let total = |s: Option<&str>| {
            v.iter()
                .find(|g| g.service.as_deref() == s)
                .unwrap()
                .entries
        };
        assert_eq!(total(Some("ssh")), 1000);
        assert_eq!(total(None), 1000 * 3 * 2);
        // A namespace that is gone takes its settled totals along.
        a.retain_netns(|_| false);
        assert!(a.evictions(|_| true).is_empty());
    }

    #[test]
    fn an_incomplete_read_of_the_eviction_map_forgets_nothing() {
        let mut a = Aggregator::new(10);
        let key = EvictedKey {
            netns: 7,
            proto: Proto::Udp,
            dport: 53,
            by: Evictor::EarlyDrop,
        };
        let name = |_: Proto, _: u16| Some("dns".to_string());
        a.update_evictions(&[(key, 5)], true, name);
        // Two walks cut short miss the key, which the map still holds.
        a.update_evictions(&[], false, name);
        a.update_evictions(&[], false, name);
        a.update_evictions(&[(key, 6)], true, name);
        assert_eq!(a.evictions(|_| true)[0].entries, 6, "counted once");
        assert!(
            a.evictions(|n| n != 7).is_empty(),
            "output picks namespaces"
        );
    }
}
