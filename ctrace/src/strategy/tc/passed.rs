//! Who opens new entries, from the flows the tc tier saw pass: on a router
//! without ctnetlink (stock OpenWrt ships none), the only witness of who
//! is filling the table.
//!
//! The kernel counts passed flows per (slot, opener, protocol, destination
//! port) in an LRU map; each read turns the counts into deltas since the
//! last. A key the map let go between two reads takes its count with it:
//! what the deltas miss against the TC_PASSED counter is returned as
//! unattributed, never dropped silently.
use std::{collections::HashMap, net::IpAddr};

use aya::maps::{MapData, PerCpuHashMap};
use ctrace_common::{AF_INET, tc::PassedKey};

use crate::event::{Passed, Proto};

pub struct PassedFlows {
    map: PerCpuHashMap<MapData, PassedKey, u64>,
    last: HashMap<PassedKey, u64>,
    /// Passed flows the deltas have accounted for since the start.
    seen: u64,
}

impl PassedFlows {
    pub fn new(map: PerCpuHashMap<MapData, PassedKey, u64>) -> PassedFlows {
        PassedFlows {
            map,
            last: HashMap::new(),
            seen: 0,
        }
    }

    /// The deltas since the last read, and how many passed flows they have
    /// missed since the start. `passed_total` is the TC_PASSED counter,
    /// read just before: the kernel counts a flow here before it bumps
    /// that, so the deltas may run a little ahead of it, never behind.
    pub fn read(&mut self, passed_total: u64) -> (Vec<Passed>, u64) {
        let entries = crate::kernel::map_batch::per_cpu_entries(&self.map).unwrap_or_else(|e| {
            log::debug!("batch lookup of PASSED_BY failed ({e}): reading it key by key");
            self.map
                .iter()
                .filter_map(Result::ok)
                .map(|(k, v)| (k, v.iter().copied().collect()))
                .collect()
        });
        let mut now = HashMap::with_capacity(entries.len());
        let mut out = Vec::new();
        for (key, per_cpu) in entries {
            let count: u64 = per_cpu.iter().sum();
            // Smaller than last time: evicted and counted anew since.
            let before = self.last.get(&key).copied().filter(|&b| b <= count);
            let delta = count - before.unwrap_or(0);
            now.insert(key, count);
            if delta > 0 {
                out.push(Passed {
                    slot: key.slot,
                    src: ip_of(&key),
                    proto: Proto::from_number(key.proto),
                    dport: key.dport,
                    flows: delta,
                });
            }
        }
        self.last = now;
        self.seen += out.iter().map(|p| p.flows).sum::<u64>();
        (out, passed_total.saturating_sub(self.seen))
    }
}

fn ip_of(key: &PassedKey) -> IpAddr {
    if key.family == AF_INET {
        IpAddr::from([key.src[0], key.src[1], key.src[2], key.src[3]])
    } else {
        IpAddr::from(key.src)
    }
}
