//! Aggregation: dropped flows, their packet counts and the per-service
//! totals that answer "whose connections are failing".
//!
//! A flow is counted once however many of its packets were dropped: a SYN
//! sent four times is one flow and four packets. Packet counts come from the
//! kernel's per-flow map; user space carries them forward, so a flow that
//! the kernel's LRU evicts (and counts afresh if it comes back) keeps its
//! total.
use std::{
    collections::{BTreeMap, HashMap},
    time::SystemTime,
};

use crate::{
    cause::Cause,
    event::{Clock, Flow, Proto},
    source::{EvictedKey, FlowCount},
    strategy::Strategy,
};

/// A dropped flow at first sighting, attributed.
#[derive(Clone, Debug)]
pub struct DropRecord {
    pub time: SystemTime,
    pub flow: Flow,
    pub service: Option<String>,
    pub cause: Cause,
    pub evidence: &'static str,
    pub tcp_flags: u8,
    pub strategy: Strategy,
}

#[derive(Clone, Debug)]
pub struct FlowEntry {
    pub first: DropRecord,
    pub last_seen: SystemTime,
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

/// Totals for one (service, cause, protocol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropGroup {
    pub netns: u64,
    pub service: Option<String>,
    pub cause: Cause,
    pub proto: Proto,
    pub flows: u64,
    pub packets: u64,
}

/// Entries early_drop evicted, per (netns, service, proto): whose
/// connections made room for new ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvictionGroup {
    pub netns: u64,
    pub service: Option<String>,
    pub proto: Proto,
    pub entries: u64,
}

/// Running eviction total of one kernel map key. The map is LRU: a key it
/// dropped and re-created restarts from zero, and what was read before is
/// carried forward.
struct EvictionCount {
    service: Option<String>,
    last: u64,
    total: u64,
}

#[derive(Default)]
pub struct Aggregator {
    flows: HashMap<Flow, FlowEntry>,
    evictions: HashMap<EvictedKey, EvictionCount>,
}

impl Aggregator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_known(&self, flow: &Flow) -> bool {
        self.flows.contains_key(flow)
    }

    /// Records a first sighting. Returns false when the flow was already
    /// known (the kernel evicted and re-created it), in which case its
    /// count so far is carried forward and nothing new is reported.
    pub fn observe(&mut self, rec: DropRecord, mono_ns: u64) -> bool {
        match self.flows.get_mut(&rec.flow) {
            Some(e) => {
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
                        last_seen: rec.time,
                        tcp_flags: rec.tcp_flags,
                        carried: 0,
                        current: 0,
                        current_first_ns: mono_ns,
                        first: rec,
                    },
                );
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

    /// Per (netns, service, cause, proto) totals, biggest first.
    pub fn groups(&self) -> Vec<DropGroup> {
        type Key<'a> = (u64, Option<&'a str>, Cause, Proto);
        let mut by: BTreeMap<Key<'_>, (u64, u64)> = BTreeMap::new();
        for e in self.flows.values() {
            let k = (
                e.first.flow.netns,
                e.first.service.as_deref(),
                e.first.cause,
                e.first.flow.proto,
            );
            let v = by.entry(k).or_default();
            v.0 += 1;
            v.1 += e.packets();
        }
        let mut groups: Vec<DropGroup> = by
            .into_iter()
            .map(
                |((netns, service, cause, proto), (flows, packets))| DropGroup {
                    netns,
                    service: service.map(str::to_string),
                    cause,
                    proto,
                    flows,
                    packets,
                },
            )
            .collect();
        groups.sort_by(|a, b| b.flows.cmp(&a.flows).then(b.packets.cmp(&a.packets)));
        groups
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

    /// Folds in the kernel's eviction counts; `service` names a port.
    pub fn update_evictions(
        &mut self,
        counts: &[(EvictedKey, u64)],
        service: impl Fn(Proto, u16) -> Option<String>,
    ) {
        for (key, n) in counts {
            let e = self.evictions.entry(*key).or_insert_with(|| EvictionCount {
                service: service(key.proto, key.dport),
                last: 0,
                total: 0,
            });
            e.total += if *n >= e.last { n - e.last } else { *n };
            e.last = *n;
        }
    }

    /// Per (netns, service, proto) eviction totals, biggest first.
    pub fn evictions(&self) -> Vec<EvictionGroup> {
        let mut by: BTreeMap<(u64, Option<&str>, Proto), u64> = BTreeMap::new();
        for (k, e) in &self.evictions {
            *by.entry((k.netns, e.service.as_deref(), k.proto))
                .or_default() += e.total;
        }
        let mut v: Vec<EvictionGroup> = by
            .into_iter()
            .map(|((netns, service, proto), entries)| EvictionGroup {
                netns,
                service: service.map(str::to_string),
                proto,
                entries,
            })
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.entries));
        v
    }

    /// Namespaces that have drops.
    pub fn netns_with_drops(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.flows.keys().map(|f| f.netns).collect();
        v.sort_unstable();
        v.dedup();
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
            has_ct: false,
            table_full: false,
        }
    }

    #[test]
    fn retransmitted_syn_is_one_flow_four_packets() {
        let mut a = Aggregator::new();
        let f = flow(40000, 2380, Proto::Tcp);
        assert!(a.observe(rec(f, Some("etcd-peer")), 100));
        a.update_counts(&HashMap::from([(f, count(4, 100))]), &Clock::new());
        let g = a.groups();
        assert_eq!(g.len(), 1);
        assert_eq!((g[0].flows, g[0].packets), (1, 4));
        assert_eq!(g[0].service.as_deref(), Some("etcd-peer"));
    }

    #[test]
    fn groups_split_by_service_and_proto() {
        let mut a = Aggregator::new();
        for p in 0..3 {
            a.observe(rec(flow(40000 + p, 22, Proto::Tcp), Some("ssh")), 1);
        }
        a.observe(rec(flow(50000, 53, Proto::Udp), Some("dns")), 1);
        a.observe(rec(flow(50001, 9999, Proto::Tcp), None), 1);
        let g = a.groups();
        assert_eq!(g[0].service.as_deref(), Some("ssh"));
        assert_eq!(g[0].flows, 3);
        assert_eq!(g.iter().map(|g| g.flows).sum::<u64>(), 5);
        assert!(
            g.iter()
                .any(|g| g.service.is_none() && g.proto == Proto::Tcp)
        );
    }

    #[test]
    fn evicted_flow_keeps_its_count() {
        let mut a = Aggregator::new();
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
        let mut a = Aggregator::new();
        let key = |dport| EvictedKey {
            netns: 7,
            proto: Proto::Udp,
            dport,
        };
        let name = |_: Proto, port: u16| (port == 53).then(|| "dns".to_string());
        a.update_evictions(&[(key(53), 3), (key(5353), 1)], name);
        a.update_evictions(&[(key(53), 5)], name);
        // The map dropped the key and counted afresh: 5 read before, 2 now.
        a.update_evictions(&[(key(53), 2)], name);
        let v = a.evictions();
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].service.as_deref(), v[0].entries), (Some("dns"), 7));
        assert_eq!((v[1].service.as_deref(), v[1].entries), (None, 1));
    }
}
