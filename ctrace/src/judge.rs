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
    collections::{HashMap, HashSet, VecDeque},
    time::Duration,
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use ctrace_common::{
    class,
    tc::{MatchKey, Pending, state},
};

use crate::{
    event::{Clock, DropEvent, Flow, KernelEvent, Proto, Tier},
    source::{FlowCount, KernelTotal},
};

/// Quiet time after which an entry is forgotten: TCP's first SYN
/// retransmissions come at 1, 3 and 7 s.
const LINGER: Duration = Duration::from_secs(10);
/// Under pressure (map over half full), quiet entries go sooner.
const LINGER_UNDER_PRESSURE: Duration = Duration::from_secs(2);
/// How often the map is read.
pub const SWEEP_EVERY: Duration = Duration::from_millis(200);

/// A flow judged dropped and still in the map.
struct Judged {
    flow: Flow,
    service: u16,
    /// Packets already added to the totals.
    counted: u32,
    /// (sweep time, packets seen by then), newest last: how many packets
    /// had arrived by a given time, when retransmissions keep `last_ns`
    /// younger than any horizon (Linux 6.18 retries SYNs every second).
    seen: VecDeque<(u64, u32)>,
    first_ns: u64,
    last_ns: u64,
    tcp_flags: u8,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JudgeCounts {
    /// Entries in the map at the last sweep.
    pub pending: u64,
    /// Flows judged dropped.
    pub judged: u64,
    /// Pending flows whose interface no watched namespace owns (or two do):
    /// not attributed.
    pub unattributed: u64,
}

pub struct Judge {
    map: BpfHashMap<MapData, MatchKey, Pending>,
    capacity: u32,
    window_ns: u64,
    judged: HashMap<MatchKey, Judged>,
    /// Cumulative totals by (netns, service, proto).
    totals: HashMap<(u64, u16, u8), (u64, u64)>,
    counts: JudgeCounts,
    unattributed: HashSet<MatchKey>,
}

impl Judge {
    /// `capacity`: the map's size, as loaded.
    pub fn new(ebpf: &mut Ebpf, window: Duration, capacity: u32) -> anyhow::Result<Judge> {
        let map = ebpf
            .take_map("PENDING")
            .context("map PENDING missing from the eBPF object")?;
        Ok(Judge {
            map: BpfHashMap::try_from(map)?,
            capacity,
            window_ns: u64::try_from(window.as_nanos()).unwrap_or(u64::MAX),
            judged: HashMap::new(),
            totals: HashMap::new(),
            counts: JudgeCounts::default(),
            unattributed: HashSet::new(),
        })
    }

    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns)
    }

    pub fn counts(&self) -> JudgeCounts {
        self.counts
    }

    /// Reads the map once at monotonic time `now_ns`, judging what happened
    /// before `horizon` (at most `now_ns` minus the window): the caller
    /// passes the time of the counter sample these verdicts settle against,
    /// so packets and the counter rises they caused are counted together.
    /// Flows judged now are appended to `out`; `netns_of` names the
    /// namespace of an ifindex. `flush`: the last sweep, when every pending
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
        let entries: Vec<(MatchKey, Pending)> = self.map.iter().filter_map(Result::ok).collect();
        self.counts.pending = entries.len() as u64;
        let pressure = self.capacity > 0 && entries.len() as u64 * 2 > u64::from(self.capacity);
        let linger = if pressure {
            LINGER_UNDER_PRESSURE
        } else {
            LINGER
        };
        let linger_ns = u64::try_from(linger.as_nanos()).unwrap_or(u64::MAX);
        let mut doomed = Vec::new();
        let mut present = HashSet::with_capacity(self.judged.len());
        for (key, p) in entries {
            let quiet = now_ns.saturating_sub(p.last_ns) > linger_ns.max(self.window_ns);
            if let Some(j) = self.judged.get_mut(&key) {
                present.insert(key);
                j.last_ns = p.last_ns;
                j.tcp_flags |= p.tcp_flags;
                if j.seen.back().is_none_or(|&(_, n)| n != p.packets) {
                    j.seen.push_back((now_ns, p.packets));
                }
                // Later packets count once they are older than the horizon.
                let by_horizon = if p.last_ns < horizon || flush {
                    p.packets
                } else {
                    let mut n = j.counted;
                    while let Some(&(at, seen)) = j.seen.front() {
                        if at > horizon {
                            break;
                        }
                        n = n.max(seen);
                        j.seen.pop_front();
                    }
                    n
                };
                if by_horizon > j.counted {
                    let t = self
                        .totals
                        .entry((j.flow.netns, j.service, j.flow.proto.number()))
                        .or_default();
                    t.0 += u64::from(by_horizon - j.counted);
                    j.counted = by_horizon;
                }
                if quiet {
                    doomed.push(key);
                }
                continue;
            }
            match p.state {
                state::PASSED => {
                    if now_ns.saturating_sub(p.last_ns) > self.window_ns {
                        doomed.push(key);
                    }
                }
                _ if p.first_ns < horizon || (flush && p.first_ns < now_ns) => {
                    let netns = netns_of(p.ifindex);
                    let flow = netns.and_then(|ns| {
                        let mut k = p.flow;
                        k.netns = u32::try_from(ns).unwrap_or(0);
                        Flow::from_key(&k).map(|f| Flow { netns: ns, ..f })
                    });
                    let Some(flow) = flow else {
                        if self.unattributed.insert(key) {
                            self.counts.unattributed += 1;
                        }
                        if quiet {
                            doomed.push(key);
                        }
                        continue;
                    };
                    let counted = if p.last_ns < horizon || flush {
                        p.packets
                    } else {
                        1
                    };
                    let t = self
                        .totals
                        .entry((flow.netns, p.service, p.flow.proto))
                        .or_default();
                    t.0 += u64::from(counted);
                    t.1 += 1;
                    self.counts.judged += 1;
                    out.push(KernelEvent::Drop(DropEvent {
                        time: clock.wall(p.first_ns),
                        mono_ns: p.first_ns,
                        flow,
                        tcp_flags: p.tcp_flags,
                        class: class::NOT_FORWARDED,
                        reason: 0,
                        tier: Tier::Tc,
                    }));
                    self.judged.insert(
                        key,
                        Judged {
                            flow,
                            service: p.service,
                            counted,
                            first_ns: p.first_ns,
                            last_ns: p.last_ns,
                            tcp_flags: p.tcp_flags,
                            seen: VecDeque::from([(now_ns, p.packets)]),
                        },
                    );
                    present.insert(key);
                }
                _ => {}
            }
        }
        for key in &doomed {
            let _ = self.map.remove(key);
            self.judged.remove(key);
            self.unattributed.remove(key);
        }
        // Removed by someone else (a namespace forgotten): nothing to keep.
        self.judged.retain(|k, _| present.contains(k));
        self.unattributed
            .retain(|k| present.contains(k) || !doomed.contains(k));
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
                },
            )
            .collect()
    }

    /// Packet counts of the judged flows still held, for the flow detail.
    pub fn flow_counts(&self, out: &mut HashMap<Flow, FlowCount>) {
        for j in self.judged.values() {
            out.insert(
                j.flow,
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
            .filter(|(_, j)| gone.contains(&j.flow.netns))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            let _ = self.map.remove(&k);
            self.judged.remove(&k);
        }
    }
}
