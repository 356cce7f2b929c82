//! The tc tier's verdicts: which pending flows were dropped on this host.
//!
//! The kernel side holds each flow's opening packet in `PENDING` until it
//! leaves or is answered. Here, every sweep reads the map once:
//! - a flow still pending `window` after its first packet is judged
//!   dropped, reported once, and counted in per-(netns, service, proto)
//!   totals that, like the other tiers' kernel totals, only ever grow;
//! - its later packets (retransmitted SYNs, retried queries) are added to
//!   the totals once they, too, are older than the window, so that the
//!   ledger settles them against the `drop` counter of their own time;
//! - entries are deleted once quiet for `linger` (a retransmission after
//!   that is a new flow), sooner when the map runs over half full.
//!
//! Memory: the judged set is bounded by the map's capacity.
use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use ctrace_common::{
    FlowKey, class,
    tc::{MatchKey, Pending, state},
};

use crate::{
    event::{Clock, DropEvent, Flow, KernelEvent, Proto},
    readings::{CorrelationCounts, FlowCount, KernelTotal},
    services::KernelIndex,
};

/// Quiet time after which an entry is forgotten: TCP's first SYN
/// retransmissions come at 1, 3 and 7 s.
const LINGER: Duration = Duration::from_secs(10);
/// Under pressure (map over half full), quiet entries go sooner.
const LINGER_UNDER_PRESSURE: Duration = Duration::from_secs(2);
/// Flows announced one by one per sweep, at most: like a ring buffer's
/// room for a burst.
const ANNOUNCE_PER_SWEEP: usize = 4096;
/// Judged flows whose counts one read of the detail takes, at most.
const FLOW_COUNTS_PER_READ: usize = 8192;
/// How often the map is read.
pub const SWEEP_EVERY: Duration = Duration::from_millis(200);

/// A flow judged dropped and still in the map. Compact: a storm keeps as
/// many of these as the map has room for.
struct Judged {
    /// The flow as the kernel side keyed it (`netns` unused).
    key: FlowKey,
    netns: u64,
    service: u16,
    /// Packets already added to the totals.
    counted: u32,
    /// Packets a sweep at `seen_ns` had seen: how many had arrived by then,
    /// when retransmissions keep `last_ns` younger than any horizon (Linux
    /// 6.18 retries SYNs every second).
    seen_ns: u64,
    seen_packets: u32,
    /// `counted` changed since the detail last read it.
    dirty: bool,
    first_ns: u64,
    last_ns: u64,
    tcp_flags: u8,
}

pub struct Judge {
    map: BpfHashMap<MapData, MatchKey, Pending>,
    capacity: u32,
    window_ns: u64,
    judged: HashMap<MatchKey, Judged>,
    /// Cumulative totals by (netns, service, proto).
    totals: HashMap<(u64, u16, u8), (u64, u64)>,
    counts: CorrelationCounts,
    unattributed: HashSet<MatchKey>,
    /// Names judged flows' services: the tc programs leave that to user
    /// space, a hash lookup less per opening packet.
    services: KernelIndex,
}

impl Judge {
    /// `capacity`: the map's size, as loaded.
    pub fn new(
        ebpf: &mut Ebpf,
        window: Duration,
        capacity: u32,
        services: KernelIndex,
    ) -> anyhow::Result<Judge> {
        let map = ebpf
            .take_map("PENDING")
            .context("map PENDING missing from the eBPF object")?;
        Ok(Judge {
            map: BpfHashMap::try_from(map)?,
            capacity,
            window_ns: u64::try_from(window.as_nanos()).unwrap_or(u64::MAX),
            judged: HashMap::new(),
            totals: HashMap::new(),
            counts: CorrelationCounts::default(),
            unattributed: HashSet::new(),
            services,
        })
    }

    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns)
    }

    pub fn counts(&self) -> CorrelationCounts {
        self.counts
    }

    /// Reads the map once at monotonic time `now_ns`, judging what happened
    /// before `horizon` (at most `now_ns` minus the window): the caller
    /// passes the time of the counter sample these verdicts settle against,
    /// so packets and the counter rises they caused are counted together.
    /// Flows judged now are appended to `out`; `netns_of` names the
    /// namespace of a key's slot. `flush`: the last sweep, when every pending
    /// flow and packet counts.
    pub fn sweep(
        &mut self,
        now_ns: u64,
        horizon: u64,
        clock: &Clock,
        netns_of: impl Fn(u32) -> Option<u64>,
        out: &mut Vec<KernelEvent>,
        flush: bool,
    ) {
        let horizon = horizon.min(now_ns.saturating_sub(self.window_ns));
        let pressure = self.capacity > 0 && self.counts.pending * 2 > u64::from(self.capacity);
        let linger = if pressure {
            LINGER_UNDER_PRESSURE
        } else {
            LINGER
        };
        let linger_ns = u64::try_from(linger.as_nanos()).unwrap_or(u64::MAX);
        let window_ns = self.window_ns;
        let mut doomed = Vec::new();
        let mut present = HashSet::with_capacity(self.judged.len());
        let mut held = 0u64;
        let mut announced = 0usize;
        // Streamed, never collected: under a storm the map holds as many
        // flows as it has room for.
        let self_capacity = self.capacity;
        let Judge {
            map,
            judged,
            totals,
            counts,
            unattributed,
            services,
            ..
        } = self;
        // The kernel deletes flows that pass while this walks the map, and
        // a walk whose last key was deleted starts over from the first
        // bucket: each key is taken once, and the walk is bounded.
        let mut walked: HashSet<MatchKey> = HashSet::new();
        let bound = 2 * self_capacity.max(1) as usize;
        for (key, p) in map.iter().filter_map(Result::ok) {
            if walked.len() >= bound {
                break;
            }
            if !walked.insert(key) {
                continue;
            }
            held += 1;
            let quiet = now_ns.saturating_sub(p.last_ns) > linger_ns.max(window_ns);
            if let Some(j) = judged.get_mut(&key) {
                present.insert(key);
                j.last_ns = p.last_ns;
                j.tcp_flags |= p.tcp_flags;
                // Later packets count once they are older than the horizon:
                // all of them once the last is, else as many as a sweep
                // at least that old had seen.
                let by_horizon = if p.last_ns < horizon || flush {
                    p.packets
                } else if j.seen_ns <= horizon {
                    j.seen_packets
                } else {
                    j.counted
                };
                if j.seen_ns <= horizon && j.seen_packets != p.packets {
                    (j.seen_ns, j.seen_packets) = (now_ns, p.packets);
                }
                if by_horizon > j.counted {
                    let t = totals.entry((j.netns, j.service, j.key.proto)).or_default();
                    t.0 += u64::from(by_horizon - j.counted);
                    j.counted = by_horizon;
                    j.dirty = true;
                }
                if quiet {
                    doomed.push(key);
                }
                continue;
            }
            match p.state {
                state::PASSED => {
                    if now_ns.saturating_sub(p.last_ns) > window_ns {
                        doomed.push(key);
                    }
                }
                _ if p.first_ns < horizon || (flush && p.first_ns < now_ns) => {
                    let netns = netns_of(key.slot);
                    let flow = netns.and_then(|ns| {
                        let mut k = p.flow;
                        k.netns = u32::try_from(ns).unwrap_or(0);
                        Flow::from_key(&k).map(|f| Flow { netns: ns, ..f })
                    });
                    let Some(flow) = flow else {
                        present.insert(key);
                        if unattributed.insert(key) {
                            counts.unattributed += 1;
                        }
                        if quiet {
                            doomed.push(key);
                        }
                        continue;
                    };
                    let service = services.index_of(p.flow.proto, p.flow.dport);
                    let counted = if p.last_ns < horizon || flush {
                        p.packets
                    } else {
                        1
                    };
                    let t = totals
                        .entry((flow.netns, service, p.flow.proto))
                        .or_default();
                    t.0 += u64::from(counted);
                    t.1 += 1;
                    counts.judged += 1;
                    // The totals above count every flow; the detail is
                    // bounded like a ring buffer's burst.
                    if announced < ANNOUNCE_PER_SWEEP {
                        announced += 1;
                        out.push(KernelEvent::Drop(DropEvent {
                            time: clock.wall(p.first_ns),
                            mono_ns: p.first_ns,
                            flow,
                            tcp_flags: p.tcp_flags,
                            class: class::NOT_FORWARDED,
                            reason: 0,
                            tier: crate::tier::Strategy::Tc,
                        }));
                    } else {
                        counts.unannounced += 1;
                    }
                    judged.insert(
                        key,
                        Judged {
                            key: p.flow,
                            netns: flow.netns,
                            service,
                            counted,
                            first_ns: p.first_ns,
                            last_ns: p.last_ns,
                            tcp_flags: p.tcp_flags,
                            seen_ns: now_ns,
                            seen_packets: p.packets,
                            dirty: true,
                        },
                    );
                    present.insert(key);
                }
                _ => {}
            }
        }
        counts.pending = held;
        for key in &doomed {
            let _ = map.remove(key);
            judged.remove(key);
            unattributed.remove(key);
        }
        // Removed by someone else (a namespace forgotten): nothing to keep.
        judged.retain(|k, _| present.contains(k));
        unattributed.retain(|k| present.contains(k));
        if judged.capacity() > 4 * judged.len().max(1024) {
            judged.shrink_to_fit();
        }
    }

    /// Cumulative totals, in the shape of the kernel totals of the other
    /// tiers.
    pub fn totals(&self) -> Vec<KernelTotal> {
        self.totals
            .iter()
            .map(
                |(&(netns, service, proto), &(packets, flows))| KernelTotal {
                    netns,
                    service,
                    proto: Proto::from_number(proto),
                    class: class::NOT_FORWARDED,
                    packets,
                    flows,
                    held_back: 0,
                },
            )
            .collect()
    }

    /// Packet counts of the judged flows whose count moved since the last
    /// call, for the flow detail.
    pub fn flow_counts(&mut self, out: &mut HashMap<Flow, FlowCount>) {
        let dirty = self.judged.values_mut().filter(|j| j.dirty);
        // The detail keeps a bounded number of flows; a storm's counts reach
        // it over a few reads instead of one huge one.
        for j in dirty.take(FLOW_COUNTS_PER_READ) {
            j.dirty = false;
            let Some(flow) = Flow::from_key(&j.key) else {
                continue;
            };
            out.insert(
                Flow {
                    netns: j.netns,
                    ..flow
                },
                FlowCount {
                    packets: u64::from(j.counted),
                    first_ns: j.first_ns,
                    last_ns: j.last_ns,
                    tcp_flags: j.tcp_flags,
                    class: class::NOT_FORWARDED,
                },
            );
        }
    }

    /// Forgets namespaces that no longer exist.
    pub fn forget_netns(&mut self, gone: &[u64]) {
        self.totals.retain(|(ns, _, _), _| !gone.contains(ns));
        let keys: Vec<MatchKey> = self
            .judged
            .iter()
            .filter(|(_, j)| gone.contains(&j.netns))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            let _ = self.map.remove(&k);
            self.judged.remove(&k);
        }
    }
}
