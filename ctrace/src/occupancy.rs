//! Table occupancy: who holds the entries of a conntrack table.
//!
//! When a table fills, its count says only *that* it is full. The operator
//! needs *who* fills it: a DNS flood of unreplied UDP entries, established
//! TCP flows sitting out conntrack's 5-day timeout, intra-cluster traffic
//! that should have been NOTRACKed. [`OccupancyTracker`] keeps one compact
//! record per entry of each namespace's table and aggregates them into a
//! [`Breakdown`] on demand: by service, protocol, TCP state, source prefix
//! and remaining timeout.
//!
//! The records come from a full ctnetlink dump (the baseline), then from
//! insert/delete events where an event tier delivers them, or from periodic
//! re-dumps where none does.
//!
//! Memory: a record is a 64-bit fingerprint of the entry's key and 16 bytes
//! of facts, 24 bytes in the hash table plus its control byte and spare
//! capacity: about 13 MiB for 262,144 entries (see
//! [`OccupancyTracker::approx_bytes`]). The fingerprint is a keyed SipHash
//! with a per-process random key, so nobody outside can aim tuples at a
//! collision; two live entries share one by chance with probability about
//! n²/2⁶⁵ (2⁻²⁹ for a full 262,144-entry table), and the cost of that is
//! one entry counted once instead of twice.
use std::{
    collections::{HashMap, hash_map::RandomState},
    hash::{BuildHasher, BuildHasherDefault, Hash, Hasher},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::OnceLock,
    time::{Duration, Instant},
};

use ctrace_common::IPPROTO_TCP;

use crate::{
    conntrack::{self, IPS_ASSURED, IPS_SEEN_REPLY, TableReader, tcp_state_name},
    event::Proto,
    netlink::ctnetlink::CtSocket,
    services::Catalog,
};

/// Source prefixes listed in [`Breakdown::by_src_prefix`].
pub const TOP_PREFIXES: usize = 10;
/// IPv4 sources are grouped by /24, IPv6 sources by /64.
pub const V4_PREFIX_LEN: u8 = 24;
pub const V6_PREFIX_LEN: u8 = 64;

/// Remaining-timeout buckets: (label, upper bound in seconds, exclusive).
const TIMEOUT_BUCKETS: [(&str, u64); 5] = [
    ("<1m", 60),
    ("1m-10m", 600),
    ("10m-1h", 3600),
    ("1h-1d", 86_400),
    (">=1d", u64::MAX),
];

/// A table whose hash map holds more than this many slots per live entry
/// after a baseline gives the memory back.
const SHRINK_RATIO: usize = 4;
const SHRINK_MIN_CAPACITY: usize = 4096;

/// Breakdown of one namespace's table.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Breakdown {
    pub total: u64,
    /// Catalog service of the destination port (`services::Catalog::lookup`),
    /// else "other"; sorted by count, largest first.
    pub by_service: Vec<(String, u64)>,
    /// "tcp", "udp", "icmp", "icmpv6", "sctp", "other" (`event::Proto::name`);
    /// sorted by count.
    pub by_proto: Vec<(String, u64)>,
    /// TCP entries by conntrack state ("ESTABLISHED", "SYN_SENT", ...);
    /// sorted by count.
    pub by_tcp_state: Vec<(String, u64)>,
    /// Entries with IPS_ASSURED: a full table's early drop spares them, so
    /// new flows fail instead (the GC may still drop closing TCP ones).
    pub assured: u64,
    /// Entries without IPS_SEEN_REPLY: nothing ever answered.
    pub unreplied: u64,
    /// The [`TOP_PREFIXES`] source prefixes holding most entries, IPv4 by
    /// /24 ("10.10.0.0/24"), IPv6 by /64 ("fd00:1::/64"); sorted by count.
    pub by_src_prefix: Vec<(String, u64)>,
    /// Remaining timeout: "<1m", "1m-10m", "10m-1h", "1h-1d", ">=1d", always
    /// all five, in that order.
    pub by_timeout: Vec<(String, u64)>,
    /// Seconds since the dump the breakdown started from. Events and
    /// announcements keep it current after that; without them it is this
    /// old, and a large table is re-dumped less often than a small one.
    pub dump_age_s: u64,
    /// How long that dump took, in seconds: the kernel's formatting of
    /// every entry and this process's reading of it.
    pub dump_s: f64,
}

/// What one conntrack entry contributes to a breakdown: 16 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Record {
    /// The source prefix: an IPv4 /24 network in the low 32 bits, or the
    /// upper 64 bits of an IPv6 address ([`bits::V6`] tells which).
    prefix: u64,
    /// When the timeout runs out, in whole seconds since the tracker's epoch.
    deadline: u32,
    /// Destination port, for the service lookup; 0 for protocols whose
    /// ports no catalog entry can name.
    dport: u16,
    proto: u8,
    /// TCP state in the low nibble ([`bits::NO_STATE`] for none), flags above.
    bits: u8,
}

mod bits {
    pub const STATE_MASK: u8 = 0x0f;
    pub const NO_STATE: u8 = 0x0f;
    pub const V6: u8 = 0x10;
    pub const ASSURED: u8 = 0x20;
    pub const SEEN_REPLY: u8 = 0x40;
}

impl Record {
    fn new(e: &conntrack::Entry, now: u32) -> Record {
        let (prefix, v6) = match e.src {
            IpAddr::V4(a) => (u64::from(u32::from(a) & 0xffff_ff00), 0),
            IpAddr::V6(a) => ((u128::from(a) >> 64) as u64, bits::V6),
        };
        let state = match e.tcp_state {
            Some(s) if s < bits::NO_STATE => s,
            _ => bits::NO_STATE,
        };
        let mut b = state | v6;
        if e.status & IPS_ASSURED != 0 {
            b |= bits::ASSURED;
        }
        if e.status & IPS_SEEN_REPLY != 0 {
            b |= bits::SEEN_REPLY;
        }
        Record {
            prefix,
            deadline: now.saturating_add(e.timeout_secs),
            dport: if Proto::from_number(e.proto).has_ports() {
                e.dport
            } else {
                0
            },
            proto: e.proto,
            bits: b,
        }
    }
}

/// "10.10.0.0/24" or "fd00:1::/64" for a [`Record::prefix`].
fn prefix_label(v6: bool, prefix: u64) -> String {
    if v6 {
        let net = Ipv6Addr::from(u128::from(prefix) << 64);
        format!("{net}/{V6_PREFIX_LEN}")
    } else {
        let net = Ipv4Addr::from(prefix as u32);
        format!("{net}/{V4_PREFIX_LEN}")
    }
}

/// What identifies an entry: its original tuple and zone, as conntrack
/// itself keys it.
#[derive(Hash)]
struct Key {
    family: u8,
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    zone: u16,
}

/// The map's keys are already keyed SipHash outputs: hash them as they are.
#[derive(Default)]
struct Fingerprint(u64);

impl Hasher for Fingerprint {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are ever hashed; this keeps the trait complete.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Records = HashMap<u64, Record, BuildHasherDefault<Fingerprint>>;

/// How a namespace's breakdown is current.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// As of the last baseline dump; nothing applied since.
    Dump,
    /// Events applied since the last baseline.
    Events,
}

/// How a breakdown shown in a summary is kept current.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub enum Kept {
    /// Insert and delete events since the first dump.
    #[serde(rename = "events")]
    Events,
    /// A dump not yet followed by events, on a tier that has them.
    #[serde(rename = "dump+events")]
    DumpAndEvents,
    /// Dumps every period: the tier has no entry events.
    #[serde(rename = "periodic_dump")]
    PeriodicDump,
    /// Dumps every period, and ctnetlink's NEW and DESTROY announcements
    /// applied in between.
    #[serde(rename = "dump+announcements")]
    DumpAndAnnouncements,
}

impl Kept {
    pub fn name(self) -> &'static str {
        match self {
            Kept::Events => "events",
            Kept::DumpAndEvents => "dump+events",
            Kept::PeriodicDump => "periodic_dump",
            Kept::DumpAndAnnouncements => "dump+announcements",
        }
    }
}

impl std::fmt::Display for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

struct Table {
    records: Records,
    source: Source,
    /// The breakdown's parts that do not age, kept until the records
    /// change: each summary would otherwise hash every record of a
    /// 200,000-entry table twice, where between dumps nothing changed it
    /// (the tc tier by default, without announcements).
    tally: OnceLock<Breakdown>,
    /// When the last dump began, in seconds since the tracker's epoch: the
    /// records' deadlines are as of then.
    dumped_at: u32,
    /// What the last dump cost in wall time, shown so that a stretched
    /// re-dump period explains itself.
    dump_took: Duration,
}

/// Keeps each namespace's occupancy current: a baseline from a full ctnetlink dump, then incremental
/// updates from insert/delete events (the kprobe/fexit tiers will deliver those later), and — where no event
/// tier exists — periodic re-dumps. Keyed per entry so deletes of unknown entries and double inserts are harmless.
///
/// Events for a namespace that has no baseline yet are ignored: its first
/// dump will contain what they describe. Run the baseline before applying
/// the events queued while it ran, so that a delete seen during the dump
/// is applied after the dump reported the entry.
///
/// Remaining timeouts age: each record keeps the moment its timeout runs
/// out, as of when it was dumped or inserted, and [`breakdown`](Self::breakdown)
/// subtracts the time since. Conntrack pushes an entry's timeout back with
/// every packet of the flow, which neither a dump nor insert/delete events
/// show, so between dumps the remaining timeouts shown are lower bounds: a
/// busy flow keeps its entry longer than it says.
pub struct OccupancyTracker {
    catalog: Catalog,
    epoch: Instant,
    keys: RandomState,
    tables: HashMap<u64, Table>,
}

impl OccupancyTracker {
    pub fn new(catalog: Catalog) -> Self {
        OccupancyTracker {
            catalog,
            epoch: Instant::now(),
            keys: RandomState::new(),
            tables: HashMap::new(),
        }
    }

    /// Full dump of `ns`'s table (replaces what was known for that inode). Returns entries seen.
    ///
    /// Entries the kernel reports twice (it repeats part of a hash bucket
    /// when the entry a datagram ended on is deleted meanwhile) are counted
    /// twice in the return value and once in the breakdown. On error what
    /// was known for `inode` is forgotten: a half-read table would mislead.
    pub fn baseline(&mut self, inode: u64, sock: &mut CtSocket) -> anyhow::Result<u64> {
        let expected = sock.stats().map_or(0, |s| s.entries);
        self.refill(inode, headroom(expected), |f| sock.dump(f))
    }

    /// [`baseline`](Self::baseline) from whichever source the table
    /// monitor reads the namespace with: ctnetlink, or procfs where
    /// ctnetlink is missing (the same entries, see
    /// [`crate::conntrack::procfs::parse_line`] for what procfs leaves out).
    pub fn baseline_from(&mut self, inode: u64, reader: &mut TableReader) -> anyhow::Result<u64> {
        let expected = reader.stats().map_or(0, |s| s.entries);
        self.refill(inode, headroom(expected), |f| reader.dump(f))
    }

    /// [`baseline`](Self::baseline) from any source of a full table: `dump`
    /// hands every entry to its argument and returns how many it handed.
    pub fn baseline_with(
        &mut self,
        inode: u64,
        dump: impl FnOnce(&mut dyn FnMut(&conntrack::Entry)) -> anyhow::Result<u64>,
    ) -> anyhow::Result<u64> {
        self.refill(inode, 0, dump)
    }

    fn refill(
        &mut self,
        inode: u64,
        expected: usize,
        dump: impl FnOnce(&mut dyn FnMut(&conntrack::Entry)) -> anyhow::Result<u64>,
    ) -> anyhow::Result<u64> {
        let now = self.now_secs();
        let OccupancyTracker { keys, tables, .. } = self;
        // Refill in place: the map keeps its capacity, so a periodic re-dump
        // of a big table does not hold two copies at once.
        let table = tables.entry(inode).or_insert_with(|| Table {
            records: Records::default(),
            source: Source::Dump,
            tally: OnceLock::new(),
            dumped_at: now,
            dump_took: Duration::ZERO,
        });
        table.tally.take();
        table.records.clear();
        table.records.reserve(expected);
        let started = Instant::now();
        let outcome = dump(&mut |e| {
            table
                .records
                .insert(fingerprint(keys, e), Record::new(e, now));
        });
        match outcome {
            Ok(seen) => {
                table.source = Source::Dump;
                table.dumped_at = now;
                table.dump_took = started.elapsed();
                let r = &mut table.records;
                if r.capacity() > SHRINK_MIN_CAPACITY && r.capacity() > r.len() * SHRINK_RATIO {
                    r.shrink_to_fit();
                }
                Ok(seen)
            }
            Err(e) => {
                tables.remove(&inode);
                Err(e)
            }
        }
    }

    /// Incremental updates (from kernel events): key them by orig tuple + zone.
    ///
    /// Inserting an entry already known replaces its record (a newer state or
    /// timeout); ignored for a namespace without a baseline.
    pub fn insert(&mut self, inode: u64, e: &conntrack::Entry) {
        let now = self.now_secs();
        let key = fingerprint(&self.keys, e);
        if let Some(t) = self.tables.get_mut(&inode) {
            t.records.insert(key, Record::new(e, now));
            t.tally.take();
            t.source = Source::Events;
        }
    }

    /// Removes an entry by its original tuple and zone (the rest of `e` is
    /// not looked at); unknown entries and namespaces without a baseline are
    /// ignored.
    pub fn remove(&mut self, inode: u64, e: &conntrack::Entry) {
        let fp = fingerprint(&self.keys, e);
        if let Some(t) = self.tables.get_mut(&inode) {
            t.records.remove(&fp);
            t.tally.take();
            t.source = Source::Events;
        }
    }

    pub fn breakdown(&self, inode: u64) -> Option<Breakdown> {
        self.breakdown_at(inode, self.now_secs())
    }

    /// Whether the breakdown is a dump's, or kept by events since one.
    pub fn source(&self, inode: u64) -> Option<Source> {
        self.tables.get(&inode).map(|t| t.source)
    }

    /// Drops what is known about a namespace (it vanished).
    pub fn forget(&mut self, inode: u64) {
        self.tables.remove(&inode);
    }

    /// Namespaces with a baseline.
    pub fn inodes(&self) -> impl Iterator<Item = u64> + '_ {
        self.tables.keys().copied()
    }

    /// Entries known for `inode`.
    pub fn len(&self, inode: u64) -> Option<usize> {
        self.tables.get(&inode).map(|t| t.records.len())
    }

    /// Heap held by the records of every namespace, from the hash tables'
    /// capacities (slots plus control bytes), in bytes.
    pub fn approx_bytes(&self) -> usize {
        let slot = size_of::<(u64, Record)>() + 1;
        self.tables
            .values()
            .map(|t| {
                let cap = t.records.capacity();
                // hashbrown keeps 1/8 of its buckets free: buckets =
                // capacity * 8 / 7 rounded up to a power of two.
                let buckets = if cap == 0 {
                    0
                } else {
                    (cap * 8 / 7).next_power_of_two()
                };
                buckets * slot
            })
            .sum::<usize>()
            + self.tables.capacity() * (size_of::<(u64, Table)>() + 1)
    }

    fn now_secs(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    fn breakdown_at(&self, inode: u64, now: u32) -> Option<Breakdown> {
        let table = self.tables.get(&inode)?;
        let mut b = table
            .tally
            .get_or_init(|| self.tally(&table.records))
            .clone();
        // Remaining timeouts age with every call; a pass without hashing.
        let mut by_timeout = [0u64; TIMEOUT_BUCKETS.len()];
        for r in table.records.values() {
            let left = u64::from(r.deadline.saturating_sub(now));
            let bucket = TIMEOUT_BUCKETS
                .iter()
                .position(|(_, below)| left < *below)
                .unwrap_or(TIMEOUT_BUCKETS.len() - 1);
            by_timeout[bucket] += 1;
        }
        b.by_timeout = TIMEOUT_BUCKETS
            .iter()
            .zip(by_timeout)
            .map(|((label, _), n)| (label.to_string(), n))
            .collect();
        b.dump_age_s = u64::from(now.saturating_sub(table.dumped_at));
        b.dump_s = table.dump_took.as_secs_f64();
        Some(b)
    }

    /// The parts of a breakdown that do not age (`by_timeout` left empty).
    fn tally(&self, records: &Records) -> Breakdown {
        let mut by_port: HashMap<(u8, u16), u64> = HashMap::new();
        let mut by_proto = [0u64; 256];
        let mut by_state = [0u64; 16];
        let mut by_prefix: HashMap<(bool, u64), u64> = HashMap::new();
        let (mut assured, mut unreplied) = (0u64, 0u64);
        for r in records.values() {
            *by_port.entry((r.proto, r.dport)).or_default() += 1;
            by_proto[usize::from(r.proto)] += 1;
            if r.proto == IPPROTO_TCP {
                by_state[usize::from(r.bits & bits::STATE_MASK)] += 1;
            }
            assured += u64::from(r.bits & bits::ASSURED != 0);
            unreplied += u64::from(r.bits & bits::SEEN_REPLY == 0);
            *by_prefix
                .entry((r.bits & bits::V6 != 0, r.prefix))
                .or_default() += 1;
        }

        let mut services: HashMap<&str, u64> = HashMap::new();
        for ((proto, dport), n) in by_port {
            let name = self
                .catalog
                .lookup(Proto::from_number(proto), dport)
                .unwrap_or("other");
            *services.entry(name).or_default() += n;
        }
        let mut protos: HashMap<&str, u64> = HashMap::new();
        for (p, &n) in by_proto.iter().enumerate() {
            if n > 0 {
                *protos
                    .entry(Proto::from_number(p as u8).name())
                    .or_default() += n;
            }
        }
        // NO_STATE (TCP without protocol info) reads "UNKNOWN".
        let states = by_state
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(s, &n)| (tcp_state_name(s as u8).to_string(), n));
        let mut prefixes: Vec<((bool, u64), u64)> = by_prefix.into_iter().collect();
        // Largest first, then by address for a stable order among equals.
        prefixes.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        prefixes.truncate(TOP_PREFIXES);
        let by_src_prefix = prefixes
            .into_iter()
            .map(|((v6, prefix), n)| (prefix_label(v6, prefix), n))
            .collect();

        Breakdown {
            total: records.len() as u64,
            by_service: sorted(services.into_iter().map(|(k, n)| (k.to_string(), n))),
            by_proto: sorted(protos.into_iter().map(|(k, n)| (k.to_string(), n))),
            by_tcp_state: sorted(states),
            assured,
            unreplied,
            by_src_prefix,
            by_timeout: Vec::new(),
            dump_age_s: 0,
            dump_s: 0.0,
        }
    }
}

/// Slots to reserve before a dump of a table holding `entries`: sizing the
/// map up front spares it the growth steps, each of which briefly holds
/// the old and the new map (1.5 times the final size at peak). A failed
/// count (0) only loses that.
fn headroom(entries: u64) -> usize {
    let n = usize::try_from(entries).unwrap_or(0);
    n + n / 16
}

fn fingerprint(keys: &RandomState, e: &conntrack::Entry) -> u64 {
    keys.hash_one(Key {
        family: e.family,
        proto: e.proto,
        src: e.src,
        dst: e.dst,
        sport: e.sport,
        dport: e.dport,
        zone: e.zone,
    })
}

/// Count first (largest first), then name.
fn sorted(items: impl Iterator<Item = (String, u64)>) -> Vec<(String, u64)> {
    let mut v: Vec<_> = items.collect();
    v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

/// Short lines for a terminal view, each listing its `n` largest groups
/// and what the rest hold ("services  dns 70.0% (183500)  etcd-peer 20.0%
/// (52429)  rest 10.0% (26215)"). Percentages are of the whole table.
pub fn render_top(b: &Breakdown, n: usize) -> Vec<String> {
    if b.total == 0 {
        return vec!["0 entries".to_string()];
    }
    let pct = |count: u64| count as f64 * 100.0 / b.total as f64;
    // `whole`: what the groups of this line add up to when all are listed.
    let line = |label: &str, items: &[(String, u64)], n: usize, whole: u64| {
        let mut s = label.to_string();
        let mut shown = 0;
        for (name, count) in items.iter().filter(|(_, c)| *c > 0).take(n.max(1)) {
            s.push_str(&format!("  {name} {:.1}% ({count})", pct(*count)));
            shown += count;
        }
        let rest = whole.saturating_sub(shown);
        if rest > 0 {
            s.push_str(&format!("  rest {:.1}% ({rest})", pct(rest)));
        }
        s
    };
    let sum = |items: &[(String, u64)]| items.iter().map(|(_, c)| c).sum::<u64>();
    let mut lines = vec![
        format!(
            "{} entries  assured {:.1}% ({})  unreplied {:.1}% ({})",
            b.total,
            pct(b.assured),
            b.assured,
            pct(b.unreplied),
            b.unreplied
        ),
        line("services", &b.by_service, n, b.total),
        line("protocols", &b.by_proto, n, b.total),
    ];
    if !b.by_tcp_state.is_empty() {
        lines.push(line("tcp states", &b.by_tcp_state, n, sum(&b.by_tcp_state)));
    }
    lines.push(line("sources", &b.by_src_prefix, n, b.total));
    // Buckets in their own order, all of them: a histogram, not a top list.
    lines.push(line(
        "expires in",
        &b.by_timeout,
        TIMEOUT_BUCKETS.len(),
        b.total,
    ));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::{
        IPS_CONFIRMED, TCP_CONNTRACK_ESTABLISHED, TCP_CONNTRACK_SYN_SENT, TCP_CONNTRACK_TIME_WAIT,
    };
    use crate::netlink::ctnetlink::CtEntry;
    use crate::netns::skip_unless_root;
    use ctrace_common::{IPPROTO_ICMP, IPPROTO_UDP};
    use serde_json::json;
    use std::time::Instant;

    const AF_INET: u8 = libc::AF_INET as u8;
    const AF_INET6: u8 = libc::AF_INET6 as u8;
    const UNREPLIED: u32 = IPS_CONFIRMED;
    const ASSURED: u32 = IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED;

    #[allow(clippy::too_many_arguments)]
    fn entry(
        proto: u8,
        src: IpAddr,
        sport: u16,
        dst: IpAddr,
        dport: u16,
        tcp_state: Option<u8>,
        status: u32,
        timeout_secs: u32,
    ) -> conntrack::Entry {
        conntrack::Entry {
            family: if src.is_ipv4() { AF_INET } else { AF_INET6 },
            proto,
            src,
            dst,
            sport,
            dport,
            tcp_state,
            status,
            timeout_secs,
            id: 0,
            zone: 0,
            mark: 0,
        }
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        Ipv4Addr::new(a, b, c, d).into()
    }

    fn v6(segments: [u16; 8]) -> IpAddr {
        Ipv6Addr::from(segments).into()
    }

    /// `n` entries of the known mix: 70% dns udp/53 unreplied from two /24s,
    /// 20% etcd-peer tcp/2380 established and assured with a 5-day timeout,
    /// 10% tcp/9999 SYN_SENT from an IPv6 /64.
    fn mix(i: u32, n: u32) -> conntrack::Entry {
        let dns = n * 7 / 10;
        let etcd = n * 2 / 10;
        let sport = 1024 + (i % 60_000) as u16;
        let hi = (i / 60_000) as u8;
        if i < dns {
            let c = (i % 2) as u8; // 10.10.0.0/24 and 10.10.1.0/24
            entry(
                IPPROTO_UDP,
                v4(10, 10, c, 1 + hi),
                sport,
                v4(10, 96, 0, 10),
                53,
                None,
                UNREPLIED,
                50,
            )
        } else if i < dns + etcd {
            entry(
                IPPROTO_TCP,
                v4(10, 20, 0, 1 + hi),
                sport,
                v4(10, 20, 0, 200),
                2380,
                Some(TCP_CONNTRACK_ESTABLISHED),
                ASSURED,
                432_000,
            )
        } else {
            entry(
                IPPROTO_TCP,
                v6([0xfd00, 1, 2, 3, 0, 0, u16::from(hi), 1]),
                sport,
                v6([0xfd00, 9, 0, 0, 0, 0, 0, 1]),
                9999,
                Some(TCP_CONNTRACK_SYN_SENT),
                UNREPLIED,
                300,
            )
        }
    }

    /// The entry to create over ctnetlink that dumps as `e` (zone 0).
    fn to_create(e: conntrack::Entry) -> CtEntry {
        CtEntry {
            family: e.family,
            proto: e.proto,
            src: e.src,
            dst: e.dst,
            sport: e.sport,
            dport: e.dport,
            tcp_state: e.tcp_state,
            status: e.status,
            timeout_secs: e.timeout_secs,
        }
    }

    fn load(t: &mut OccupancyTracker, inode: u64, entries: &[conntrack::Entry]) -> u64 {
        t.baseline_with(inode, |f| {
            entries.iter().for_each(f);
            Ok(entries.len() as u64)
        })
        .unwrap()
    }

    fn get(items: &[(String, u64)], name: &str) -> u64 {
        items.iter().find(|(k, _)| k == name).map_or(0, |(_, n)| *n)
    }

    /// Checks a breakdown of `mix(.., n)` exactly, or within `tolerance`
    /// (a fraction of n) for the proportions.
    fn check_mix(b: &Breakdown, n: u64, tolerance: f64) {
        let near = |got: u64, want: u64, what: &str| {
            let slack = (n as f64 * tolerance).ceil() as u64;
            assert!(
                got.abs_diff(want) <= slack,
                "{what}: {got}, want {want} ± {slack}: {b:#?}"
            );
        };
        let (dns, etcd) = (n * 7 / 10, n * 2 / 10);
        let other = n - dns - etcd;
        near(b.total, n, "total");
        assert_eq!(
            b.by_service
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>(),
            ["dns", "etcd-peer", "other"]
        );
        near(get(&b.by_service, "dns"), dns, "dns");
        near(get(&b.by_service, "etcd-peer"), etcd, "etcd-peer");
        near(get(&b.by_service, "other"), other, "other");
        assert_eq!(b.by_proto.len(), 2, "{:?}", b.by_proto);
        near(get(&b.by_proto, "udp"), dns, "udp");
        near(get(&b.by_proto, "tcp"), etcd + other, "tcp");
        assert_eq!(b.by_tcp_state.len(), 2, "{:?}", b.by_tcp_state);
        near(get(&b.by_tcp_state, "ESTABLISHED"), etcd, "ESTABLISHED");
        near(get(&b.by_tcp_state, "SYN_SENT"), other, "SYN_SENT");
        near(b.assured, etcd, "assured");
        near(b.unreplied, dns + other, "unreplied");
        // The two DNS halves hold equal shares, so which one leads depends
        // on which entries the kernel's GC early-dropped: the list must be
        // ordered by count and hold exactly these prefixes, ties either way.
        assert!(
            b.by_src_prefix.windows(2).all(|w| w[0].1 >= w[1].1),
            "not ordered by count: {:?}",
            b.by_src_prefix
        );
        let mut prefixes: Vec<_> = b.by_src_prefix.iter().map(|(k, _)| k.as_str()).collect();
        prefixes.sort_unstable();
        assert_eq!(
            prefixes,
            [
                "10.10.0.0/24",
                "10.10.1.0/24",
                "10.20.0.0/24",
                "fd00:1:2:3::/64"
            ]
        );
        near(
            get(&b.by_src_prefix, "10.10.0.0/24"),
            dns / 2,
            "10.10.0.0/24",
        );
        near(
            get(&b.by_src_prefix, "10.10.1.0/24"),
            dns / 2,
            "10.10.1.0/24",
        );
        near(get(&b.by_src_prefix, "10.20.0.0/24"), etcd, "10.20.0.0/24");
        near(
            get(&b.by_src_prefix, "fd00:1:2:3::/64"),
            other,
            "fd00:1:2:3::/64",
        );
        let labels: Vec<_> = b.by_timeout.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(labels, ["<1m", "1m-10m", "10m-1h", "1h-1d", ">=1d"]);
        near(get(&b.by_timeout, "<1m"), dns, "<1m");
        near(get(&b.by_timeout, "1m-10m"), other, "1m-10m");
        assert_eq!(
            get(&b.by_timeout, "10m-1h") + get(&b.by_timeout, "1h-1d"),
            0
        );
        near(get(&b.by_timeout, ">=1d"), etcd, ">=1d");
    }

    #[test]
    fn occupancy_breaks_down_a_known_mix() {
        let mut t = OccupancyTracker::new(Catalog::with_defaults());
        assert!(t.breakdown(1).is_none());
        assert_eq!(t.source(1), None);
        let entries: Vec<_> = (0..1000).map(|i| mix(i, 1000)).collect();
        assert_eq!(load(&mut t, 1, &entries), 1000);
        check_mix(&t.breakdown(1).unwrap(), 1000, 0.0);
        assert_eq!(t.source(1), Some(Source::Dump));
        assert_eq!(t.len(1), Some(1000));
        assert!(t.breakdown(2).is_none(), "other namespaces are separate");

        // A user catalog names what the built-ins call "other".
        let mut catalog = Catalog::with_defaults();
        catalog.add("jobs=tcp/9999".parse().unwrap());
        let mut t = OccupancyTracker::new(catalog);
        load(&mut t, 1, &entries);
        let b = t.breakdown(1).unwrap();
        assert_eq!(get(&b.by_service, "jobs"), 100);
        assert_eq!(get(&b.by_service, "other"), 0);
    }

    #[test]
    fn occupancy_portless_protocols_and_missing_tcp_state() {
        let mut t = OccupancyTracker::new(Catalog::with_defaults());
        let a = v4(192, 0, 2, 1);
        let b = v4(192, 0, 2, 2);
        let entries = [
            // Echo requests 8/0 with identifiers 1 and 2: two entries.
            entry(IPPROTO_ICMP, a, 1, b, 0x0800, None, ASSURED, 30),
            entry(IPPROTO_ICMP, a, 2, b, 0x0800, None, ASSURED, 30),
            // ICMP type/code 0x0035 must not read as dns.
            entry(IPPROTO_ICMP, a, 3, b, 53, None, ASSURED, 30),
            // GRE goes to the generic "other" protocol.
            entry(47, a, 1, b, 53, None, ASSURED, 30),
            // TCP without protocol info.
            entry(IPPROTO_TCP, a, 1, b, 22, None, UNREPLIED, 30),
        ];
        load(&mut t, 7, &entries);
        let bd = t.breakdown(7).unwrap();
        assert_eq!(bd.total, 5);
        assert_eq!(get(&bd.by_proto, "icmp"), 3);
        assert_eq!(get(&bd.by_proto, "other"), 1);
        assert_eq!(get(&bd.by_service, "dns"), 0);
        assert_eq!(get(&bd.by_service, "ssh"), 1);
        assert_eq!(get(&bd.by_service, "other"), 4);
        assert_eq!(bd.by_tcp_state, [("UNKNOWN".to_string(), 1)]);
        assert_eq!(bd.by_src_prefix, [("192.0.2.0/24".to_string(), 5)]);
    }

    #[test]
    fn occupancy_counts_kept_between_summaries_follow_every_change() {
        let mut t = OccupancyTracker::new(Catalog::with_defaults());
        let syn = |sport| {
            entry(
                IPPROTO_TCP,
                v4(10, 0, 0, 1),
                sport,
                v4(10, 0, 0, 2),
                22,
                Some(TCP_CONNTRACK_SYN_SENT),
                UNREPLIED,
                120,
            )
        };
        load(&mut t, 5, &[syn(1)]);
        assert_eq!(t.breakdown(5).unwrap().total, 1);
        // A re-dump, an insert and a delete each change what is kept.
        load(&mut t, 5, &[syn(1), syn(2)]);
        assert_eq!(t.breakdown(5).unwrap().by_service, [("ssh".into(), 2)]);
        t.insert(5, &syn(3));
        assert_eq!(t.breakdown(5).unwrap().unreplied, 3);
        t.remove(5, &syn(1));
        let bd = t.breakdown(5).unwrap();
        assert_eq!((bd.total, bd.unreplied), (2, 2));
        assert_eq!(get(&bd.by_timeout, "1m-10m"), 2);
    }

    #[test]
    fn occupancy_updates_are_keyed_per_entry() {
        let mut t = OccupancyTracker::new(Catalog::with_defaults());
        let (a, b) = (v4(10, 0, 0, 1), v4(10, 0, 0, 2));
        let syn = entry(
            IPPROTO_TCP,
            a,
            40000,
            b,
            2380,
            Some(TCP_CONNTRACK_SYN_SENT),
            UNREPLIED,
            120,
        );

        // The tuple and zone a delete names; the rest does not matter.
        let key = |proto: u8, sport: u16, zone: u16| conntrack::Entry {
            proto,
            sport,
            zone,
            status: 0,
            ..syn
        };

        // No baseline yet: events are ignored, the dump will cover them.
        t.insert(5, &syn);
        t.remove(5, &key(IPPROTO_TCP, 40000, 0));
        assert!(t.breakdown(5).is_none());
        assert_eq!(t.source(5), None);

        load(&mut t, 5, &[]);
        assert_eq!(t.breakdown(5).unwrap().total, 0);
        assert_eq!(t.source(5), Some(Source::Dump));

        t.insert(5, &syn);
        t.insert(5, &syn); // double insert
        assert_eq!(t.source(5), Some(Source::Events));
        let bd = t.breakdown(5).unwrap();
        assert_eq!((bd.total, bd.unreplied, bd.assured), (1, 1, 0));

        // The same tuple again with a newer state replaces the record.
        let mut est = syn;
        est.tcp_state = Some(TCP_CONNTRACK_ESTABLISHED);
        est.status = ASSURED;
        est.timeout_secs = 432_000;
        t.insert(5, &est);
        let bd = t.breakdown(5).unwrap();
        assert_eq!((bd.total, bd.unreplied, bd.assured), (1, 0, 1));
        assert_eq!(bd.by_tcp_state, [("ESTABLISHED".to_string(), 1)]);
        assert_eq!(get(&bd.by_timeout, ">=1d"), 1);

        // Same tuple in another zone, or the reverse direction: other entries.
        let mut zoned = syn;
        zoned.zone = 3;
        t.insert(5, &zoned);
        let mut reverse = syn;
        (reverse.src, reverse.dst, reverse.sport, reverse.dport) = (b, a, 2380, 40000);
        t.insert(5, &reverse);
        assert_eq!(t.breakdown(5).unwrap().total, 3);

        // Unknown deletes are harmless; a delete needs the exact key.
        t.remove(5, &key(IPPROTO_TCP, 40001, 0));
        t.remove(5, &key(IPPROTO_UDP, 40000, 0));
        t.remove(5, &key(IPPROTO_TCP, 40000, 9));
        t.remove(6, &key(IPPROTO_TCP, 40000, 0));
        assert_eq!(t.breakdown(5).unwrap().total, 3);
        t.remove(5, &key(IPPROTO_TCP, 40000, 0));
        t.remove(5, &key(IPPROTO_TCP, 40000, 0)); // twice
        t.remove(5, &key(IPPROTO_TCP, 40000, 3));
        let bd = t.breakdown(5).unwrap();
        assert_eq!(bd.total, 1);
        assert_eq!(
            bd.by_service,
            [("other".to_string(), 1)],
            "reverse: dport 40000"
        );

        // A new baseline replaces everything and is "dump" again.
        load(&mut t, 5, &[syn]);
        assert_eq!(t.source(5), Some(Source::Dump));
        let bd = t.breakdown(5).unwrap();
        assert_eq!(bd.total, 1);
        assert_eq!(bd.by_tcp_state, [("SYN_SENT".to_string(), 1)]);

        t.forget(5);
        assert!(t.breakdown(5).is_none());
        assert_eq!(t.inodes().count(), 0);
    }

    #[test]
    fn occupancy_duplicates_in_a_dump_count_once() {
        let mut t = OccupancyTracker::new(Catalog::with_defaults());
        let entries: Vec<_> = (0..100).map(|i| mix(i, 100)).collect();
        let twice: Vec<_> = entries.iter().chain(&entries[..30]).copied().collect();
        assert_eq!(load(&mut t, 1, &twice), 130, "entries seen");
        check_mix(&t.breakdown(1).unwrap(), 100, 0.0);
    }

    #[test]
    fn occupancy_failed_baseline_forgets_the_namespace() {
        let mut t = OccupancyTracker::new(Catalog::with_defaults());
        let entries: Vec<_> = (0..100).map(|i| mix(i, 100)).collect();
        load(&mut t, 1, &entries);
        let err = t
            .baseline_with(1, |f| {
                f(&entries[0]);
                anyhow::bail!("socket went away")
            })
            .unwrap_err();
        assert_eq!(err.to_string(), "socket went away");
        assert!(t.breakdown(1).is_none());
        assert_eq!(t.source(1), None);
    }

    #[test]
    fn occupancy_remaining_timeouts_age() {
        let mut t = OccupancyTracker::new(Catalog::with_defaults());
        let (a, b) = (v4(10, 0, 0, 1), v4(10, 0, 0, 2));
        let with_timeout =
            |sport: u16, secs: u32| entry(IPPROTO_UDP, a, sport, b, 53, None, UNREPLIED, secs);
        let now = t.now_secs();
        // One per bucket, each well inside it.
        let entries = [
            with_timeout(1, 30),
            with_timeout(2, 300),
            with_timeout(3, 2400),
            with_timeout(4, 43_200),
            with_timeout(5, 432_000),
        ];
        load(&mut t, 1, &entries);
        let counts = |b: Breakdown| b.by_timeout.iter().map(|(_, n)| *n).collect::<Vec<_>>();
        assert_eq!(counts(t.breakdown_at(1, now).unwrap()), [1, 1, 1, 1, 1]);
        // 4 days later: the 5-day entry has one day left at most.
        assert_eq!(
            counts(t.breakdown_at(1, now + 4 * 86_400 + 10).unwrap()),
            [4, 0, 0, 1, 0]
        );
        // 20 minutes later: the 30-second and 5-minute entries are past
        // their deadlines (still counted until deleted), the 40-minute one
        // has 20 left. An insert now with 5 minutes left is past it then too.
        t.insert(1, &with_timeout(6, 300));
        assert_eq!(counts(t.breakdown_at(1, now).unwrap()), [1, 2, 1, 1, 1]);
        assert_eq!(
            counts(t.breakdown_at(1, now + 20 * 60).unwrap()),
            [3, 0, 1, 1, 1]
        );
        // A bucket's bound belongs to the bucket above: a minute left is
        // "1m-10m", a second later it is "<1m". Read against the second the
        // insert took (the others are far from their bounds).
        let at = loop {
            let at = t.now_secs();
            t.insert(1, &with_timeout(7, 60));
            if t.now_secs() == at {
                break at;
            }
        };
        assert_eq!(counts(t.breakdown_at(1, at).unwrap()), [1, 3, 1, 1, 1]);
        assert_eq!(counts(t.breakdown_at(1, at + 1).unwrap()), [2, 2, 1, 1, 1]);
    }

    #[test]
    fn occupancy_top_prefixes() {
        let mut t = OccupancyTracker::new(Catalog::with_defaults());
        let mut entries = Vec::new();
        // 15 /24s holding 1..=15 entries each, and one IPv6 /64 with 20.
        for net in 1..=15u8 {
            for host in 0..net {
                entries.push(entry(
                    IPPROTO_UDP,
                    v4(172, 16, net, host),
                    1000,
                    v4(8, 8, 8, 8),
                    53,
                    None,
                    UNREPLIED,
                    30,
                ));
            }
        }
        for h in 0..20 {
            entries.push(entry(
                IPPROTO_UDP,
                v6([0x2001, 0xdb8, 0, 7, 0xffff, 0, 0, h]),
                1000,
                v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 53]),
                53,
                None,
                UNREPLIED,
                30,
            ));
        }
        load(&mut t, 1, &entries);
        let b = t.breakdown(1).unwrap();
        assert_eq!(b.by_src_prefix.len(), TOP_PREFIXES);
        assert_eq!(b.by_src_prefix[0], ("2001:db8:0:7::/64".to_string(), 20));
        assert_eq!(b.by_src_prefix[1], ("172.16.15.0/24".to_string(), 15));
        assert_eq!(b.by_src_prefix[9], ("172.16.7.0/24".to_string(), 7));
    }

    #[test]
    fn occupancy_json_and_terminal_lines() {
        let mut t = OccupancyTracker::new(Catalog::with_defaults());
        let entries: Vec<_> = (0..1000).map(|i| mix(i, 1000)).collect();
        load(&mut t, 1, &entries);
        let b = t.breakdown(1).unwrap();

        let j =
            serde_json::to_value(crate::record::OccupancyLine::of(1, Kept::Events, &b)).unwrap();
        assert_eq!(j["total"], 1000);
        assert_eq!(j["by_service"]["dns"], 700);
        assert_eq!(j["by_service"]["etcd-peer"], 200);
        assert_eq!(j["by_service"]["other"], 100);
        assert_eq!(j["by_proto"]["udp"], 700);
        assert_eq!(j["by_tcp_state"]["ESTABLISHED"], 200);
        assert_eq!(j["assured"], 200);
        assert_eq!(j["unreplied"], 800);
        assert_eq!(j["by_src_prefix"]["fd00:1:2:3::/64"], 100);
        assert_eq!(j["by_timeout"][">=1d"], 200);
        assert_eq!(j["by_timeout"]["1h-1d"], 0);
        // The derived serialization keeps the order, as pairs.
        let derived = serde_json::to_value(&b).unwrap();
        assert_eq!(derived["by_service"][0], json!(["dns", 700]));

        let lines = render_top(&b, 2);
        assert_eq!(
            lines[0],
            "1000 entries  assured 20.0% (200)  unreplied 80.0% (800)"
        );
        assert_eq!(
            lines[1],
            "services  dns 70.0% (700)  etcd-peer 20.0% (200)  rest 10.0% (100)"
        );
        assert_eq!(lines[2], "protocols  udp 70.0% (700)  tcp 30.0% (300)");
        assert_eq!(
            lines[3],
            "tcp states  ESTABLISHED 20.0% (200)  SYN_SENT 10.0% (100)"
        );
        assert_eq!(
            lines[4],
            "sources  10.10.0.0/24 35.0% (350)  10.10.1.0/24 35.0% (350)  rest 30.0% (300)"
        );
        assert_eq!(
            lines[5],
            "expires in  <1m 70.0% (700)  1m-10m 10.0% (100)  >=1d 20.0% (200)"
        );
        assert_eq!(lines.len(), 6);
        assert_eq!(render_top(&Breakdown::default(), 3), ["0 entries"]);
    }

    /// Resident and peak resident set of this process, KiB.
    fn rss_kib() -> (u64, u64) {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// 262,144 entries: well under 40 MB of records, and a breakdown that
    /// does not take long. Run alone with --nocapture for the numbers.
    #[test]
    fn occupancy_memory_of_a_full_table() {
        assert_eq!(size_of::<Record>(), 16);
        assert_eq!(size_of::<(u64, Record)>(), 24);
        const N: u32 = 262_144;
        let (rss_before, _) = rss_kib();
        let mut t = OccupancyTracker::new(Catalog::with_defaults());
        let seen = t
            .baseline_with(1, |f| {
                for i in 0..N {
                    f(&mix(i, N));
                }
                Ok(u64::from(N))
            })
            .unwrap();
        assert_eq!(seen, u64::from(N));
        let (rss_after, _) = rss_kib();
        let start = Instant::now();
        let b = t.breakdown(1).unwrap();
        let took = start.elapsed();
        check_mix(&b, u64::from(N), 0.0);
        eprintln!(
            "occupancy: {N} records, {:.1} MiB by capacity, RSS +{:.1} MiB; breakdown in {:.1} ms",
            t.approx_bytes() as f64 / (1 << 20) as f64,
            rss_after.saturating_sub(rss_before) as f64 / 1024.0,
            took.as_secs_f64() * 1e3
        );
        assert!(t.approx_bytes() < 16 << 20, "{}", t.approx_bytes());

        // A table that drained gives the memory back at its next baseline.
        load(&mut t, 1, &[mix(0, 1)]);
        assert!(t.approx_bytes() < 64 << 10, "{}", t.approx_bytes());
    }

    /// A fresh namespace filled to nf_conntrack_max (262,144 here) with the
    /// known mix: baseline time, memory, breakdown. Run alone with
    /// --nocapture for the numbers.
    #[test]
    fn occupancy_baseline_of_a_full_table() {
        if skip_unless_root("occupancy_baseline_of_a_full_table") {
            return;
        }
        let ns = crate::netlink::rtnetlink::new_netns().unwrap();
        let mut ct = CtSocket::open(Some(&ns)).unwrap();
        let max = ct.stats().unwrap().max;
        if max == 0 || max > 1 << 20 {
            eprintln!("skipping: nf_conntrack_max = {max} (0 or too large for a unit test)");
            return;
        }
        let n = max as u32;
        let report = ct
            .create_batch(&mut (0..n).map(|i| to_create(mix(i, n))))
            .unwrap();
        assert_eq!(report.created, max, "{report:?}");

        let (rss_before, _) = rss_kib();
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
        let mut t = OccupancyTracker::new(Catalog::with_defaults());
        let start = Instant::now();
        let seen = t.baseline(ns.inode(), &mut ct).unwrap();
        let took = start.elapsed();
        let (rss_after, peak) = rss_kib();
        let start = Instant::now();
        let b = t.breakdown(ns.inode()).unwrap();
        let took_breakdown = start.elapsed();
        // Above 95% of the maximum the kernel's GC worker early-drops
        // unassured entries (the UDP and SYN_SENT part of the mix) while
        // the table is filled and dumped, so the dump sees between what is
        // left afterwards and what was created.
        let left = ct.stats().unwrap().entries;
        assert!(
            left <= seen && seen <= max,
            "dump saw {seen}, {left} left of {max}"
        );
        check_mix(&b, max, 0.01);
        // A second baseline refills the same map: no growth.
        let start = Instant::now();
        t.baseline(ns.inode(), &mut ct).unwrap();
        let took_again = start.elapsed();
        let (rss_again, peak_again) = rss_kib();
        eprintln!(
            "occupancy baseline: {seen} entries in {:.3} s (again: {:.3} s), breakdown {:.1} ms; \
             records {:.1} MiB by capacity; RSS +{:.1} MiB (peak +{:.1} MiB), after a \
             second baseline +{:.1} MiB (peak +{:.1} MiB)",
            took.as_secs_f64(),
            took_again.as_secs_f64(),
            took_breakdown.as_secs_f64() * 1e3,
            t.approx_bytes() as f64 / (1 << 20) as f64,
            rss_after.saturating_sub(rss_before) as f64 / 1024.0,
            peak.saturating_sub(rss_before) as f64 / 1024.0,
            rss_again.saturating_sub(rss_before) as f64 / 1024.0,
            peak_again.saturating_sub(rss_before) as f64 / 1024.0,
        );
        for line in render_top(&b, 3) {
            eprintln!("  {line}");
        }
        assert!(t.approx_bytes() < 16 << 20, "{}", t.approx_bytes());
    }

    /// A fresh namespace filled over ctnetlink with a known mix; the
    /// tracker's baseline must find it, then follow removes and inserts.
    #[test]
    fn occupancy_baseline_of_a_known_mix_in_a_namespace() {
        if skip_unless_root("occupancy_baseline_of_a_known_mix_in_a_namespace") {
            return;
        }
        const N: u32 = 20_000;
        let ns = crate::netlink::rtnetlink::new_netns().unwrap();
        let mut ct = CtSocket::open(Some(&ns)).unwrap();
        let report = ct
            .create_batch(&mut (0..N).map(|i| to_create(mix(i, N))))
            .unwrap();
        assert_eq!(report.created, u64::from(N), "{report:?}");

        let mut t = OccupancyTracker::new(Catalog::with_defaults());
        let start = Instant::now();
        let seen = t.baseline(ns.inode(), &mut ct).unwrap();
        eprintln!(
            "occupancy baseline: {seen} entries in {:.3} s",
            start.elapsed().as_secs_f64()
        );
        assert_eq!(seen, u64::from(N));
        assert_eq!(t.source(ns.inode()), Some(Source::Dump));
        let b = t.breakdown(ns.inode()).unwrap();
        check_mix(&b, u64::from(N), 0.01);
        // The kernel kept the status each entry was created with: nothing
        // above what was asked, so the counts are exact, not just within 1%.
        assert_eq!(b.assured, u64::from(N) * 2 / 10);
        assert_eq!(b.unreplied, u64::from(N) * 8 / 10);
        for line in render_top(&b, 3) {
            eprintln!("  {line}");
        }

        // Events: an etcd-peer entry goes, a TIME_WAIT one comes, in the
        // kernel and in the tracker, and a fresh dump agrees.
        let gone = mix(N * 7 / 10, N);
        assert_eq!(gone.dport, 2380);
        ct.delete(&to_create(gone)).unwrap();
        let again = ct.delete(&to_create(gone)).unwrap_err();
        assert_eq!(
            crate::netlink::NlError::errno_of(&again),
            Some(libc::ENOENT)
        );
        t.remove(ns.inode(), &gone);
        let came = entry(
            IPPROTO_TCP,
            v4(10, 30, 0, 1),
            5555,
            v4(10, 30, 0, 2),
            22,
            Some(TCP_CONNTRACK_TIME_WAIT),
            ASSURED,
            120,
        );
        assert_eq!(
            ct.create_batch(&mut std::iter::once(to_create(came)))
                .unwrap()
                .created,
            1
        );
        t.insert(ns.inode(), &came);
        assert_eq!(t.source(ns.inode()), Some(Source::Events));
        let by_events = t.breakdown(ns.inode()).unwrap();
        assert_eq!(by_events.total, u64::from(N));
        assert_eq!(
            get(&by_events.by_service, "etcd-peer"),
            u64::from(N) * 2 / 10 - 1
        );
        assert_eq!(get(&by_events.by_service, "ssh"), 1);
        assert_eq!(get(&by_events.by_tcp_state, "TIME_WAIT"), 1);
        assert_eq!(get(&by_events.by_src_prefix, "10.30.0.0/24"), 1);

        t.baseline(ns.inode(), &mut ct).unwrap();
        assert_eq!(t.source(ns.inode()), Some(Source::Dump));
        let by_dump = t.breakdown(ns.inode()).unwrap();
        assert_eq!(by_dump.by_service, by_events.by_service);
        assert_eq!(by_dump.by_tcp_state, by_events.by_tcp_state);
        assert_eq!(by_dump.by_src_prefix, by_events.by_src_prefix);
        assert_eq!(
            (by_dump.assured, by_dump.unreplied),
            (by_events.assured, by_events.unreplied)
        );
    }

    /// The same table read over ctnetlink and over procfs: the same
    /// statistics, the same entries (as far as procfs shows them) and so
    /// the same breakdown. Filled to 75% of the limit, below the 95% at
    /// which the GC starts evicting unassured entries between the reads.
    /// Run alone with --nocapture for the timings.
    #[test]
    fn occupancy_procfs_matches_ctnetlink() {
        use crate::conntrack::procfs::IPS_HW_OFFLOAD;
        use crate::conntrack::{IPS_OFFLOAD, SourceChoice, TableSource};
        use ctrace_common::{IPPROTO_GRE, IPPROTO_ICMPV6, IPPROTO_SCTP};
        if skip_unless_root("occupancy_procfs_matches_ctnetlink") {
            return;
        }
        let ns = crate::netlink::rtnetlink::new_netns().unwrap();
        let mut ct = CtSocket::open(Some(&ns)).unwrap();
        let max = ct.stats().unwrap().max;
        if max < 1000 {
            eprintln!("skipping: nf_conntrack_max = {max}");
            return;
        }
        let n = (max * 3 / 4).min(196_608) as u32;
        let (a, b) = (v4(10, 40, 0, 1), v4(10, 40, 0, 2));
        let (a6, b6) = (
            v6([0xfd00, 0, 0, 0, 0, 0, 0, 1]),
            v6([0xfd00, 0, 0, 0, 0, 0, 0, 2]),
        );
        // One of each kind the mix lacks: ICMP and ICMPv6 echoes (the
        // identifier in sport), GRE keys, SCTP ports, a protocol left to
        // the generic tracker (OSPF, no ports).
        let extras = [
            entry(IPPROTO_ICMP, a, 4660, b, 0x0800, None, UNREPLIED, 30),
            entry(IPPROTO_ICMPV6, a6, 7, b6, 128 << 8, None, ASSURED, 30),
            entry(IPPROTO_GRE, a, 1, b, 2, None, ASSURED, 180),
            entry(IPPROTO_SCTP, a, 5000, b, 38412, None, UNREPLIED, 10),
            entry(89, a, 0, v4(224, 0, 0, 5), 0, None, UNREPLIED, 600),
        ];
        let report = ct
            .create_batch(&mut (0..n).map(|i| mix(i, n)).chain(extras).map(to_create))
            .unwrap();
        assert_eq!(report.created, u64::from(n) + 5, "{report:?}");

        let (mut netlink, _) = crate::table::open_reader(&ns, SourceChoice::Ctnetlink).unwrap();
        let (mut procfs, _) = crate::table::open_reader(&ns, SourceChoice::Procfs).unwrap();
        assert_eq!(procfs.source(), TableSource::Procfs);
        assert_eq!(netlink.stats().unwrap(), procfs.stats().unwrap());

        // What procfs shows of an entry: no id, status only as its flags,
        // timeouts read a moment apart.
        let shown = |e: &conntrack::Entry| {
            let mut e = *e;
            e.id = 0;
            e.status &= IPS_ASSURED | IPS_SEEN_REPLY | IPS_OFFLOAD | IPS_HW_OFFLOAD;
            let t = e.timeout_secs;
            e.timeout_secs = 0;
            (e, t)
        };
        let read = |r: &mut TableReader| {
            let mut v = Vec::new();
            let start = Instant::now();
            r.dump(&mut |e| v.push(shown(e))).unwrap();
            let took = start.elapsed();
            v.sort_by_key(|(e, _)| (e.family, e.proto, e.src, e.dst, e.sport, e.dport));
            (v, took)
        };
        let both = Instant::now();
        let (by_netlink, t_netlink) = read(&mut netlink);
        let (by_procfs, t_procfs) = read(&mut procfs);
        // An entry's two readings are at most both dumps apart; on a
        // loaded machine that can be seconds, so the bound is measured,
        // plus one second for each reading's rounding.
        let apart = both.elapsed().as_secs() + 2;
        assert_eq!(by_netlink.len(), n as usize + 5);
        assert_eq!(by_netlink.len(), by_procfs.len());
        for ((x, tx), (y, ty)) in by_netlink.iter().zip(&by_procfs) {
            assert_eq!(x, y);
            assert!(
                u64::from(tx.abs_diff(*ty)) <= apart,
                "{x:?}: timeout {tx} vs {ty}, read at most {apart} s apart"
            );
        }
        drop((by_netlink, by_procfs));

        let mut t = OccupancyTracker::new(Catalog::with_defaults());
        let start = Instant::now();
        let seen = t.baseline_from(1, &mut procfs).unwrap();
        let took_baseline = start.elapsed();
        t.baseline_from(2, &mut netlink).unwrap();
        assert_eq!(seen, u64::from(n) + 5);
        let (p, c) = (t.breakdown(1).unwrap(), t.breakdown(2).unwrap());
        assert_eq!(p.total, c.total);
        assert_eq!(p.by_service, c.by_service);
        assert_eq!(p.by_proto, c.by_proto);
        assert_eq!(p.by_tcp_state, c.by_tcp_state);
        assert_eq!((p.assured, p.unreplied), (c.assured, c.unreplied));
        assert_eq!(p.by_src_prefix, c.by_src_prefix);
        assert_eq!(p.by_timeout, c.by_timeout);
        assert_eq!(get(&p.by_proto, "icmp"), 1);
        assert_eq!(get(&p.by_proto, "sctp"), 1);
        eprintln!(
            "{} entries: dump over ctnetlink {:.3} s, read from procfs {:.3} s; procfs \
             baseline {:.3} s",
            seen,
            t_netlink.as_secs_f64(),
            t_procfs.as_secs_f64(),
            took_baseline.as_secs_f64()
        );
        for line in render_top(&p, 3) {
            eprintln!("  {line}");
        }
    }
}
