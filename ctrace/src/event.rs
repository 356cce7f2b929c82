//! Decoding: raw records from the kernel become typed flows and events.
//! Everything after this module works with these types, never with the
//! `#[repr(C)]` wire structs.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, SystemTime},
};

use ctrace_common as wire;

use crate::tier::Strategy;

/// New entries one opener made toward one port since the last read, as
/// the tc tier counts the flows it saw pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Passed {
    pub slot: u32,
    pub src: IpAddr,
    pub proto: Proto,
    pub dport: u16,
    pub flows: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Sctp,
    Other(u8),
}

impl Proto {
    pub fn from_number(n: u8) -> Self {
        match n {
            wire::IPPROTO_TCP => Proto::Tcp,
            wire::IPPROTO_UDP => Proto::Udp,
            wire::IPPROTO_ICMP => Proto::Icmp,
            wire::IPPROTO_ICMPV6 => Proto::Icmpv6,
            wire::IPPROTO_SCTP => Proto::Sctp,
            n => Proto::Other(n),
        }
    }

    /// The name used in output and in service specs.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Icmpv6 => "icmpv6",
            Proto::Sctp => "sctp",
            Proto::Other(_) => "other",
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => wire::IPPROTO_TCP,
            Proto::Udp => wire::IPPROTO_UDP,
            Proto::Icmp => wire::IPPROTO_ICMP,
            Proto::Icmpv6 => wire::IPPROTO_ICMPV6,
            Proto::Sctp => wire::IPPROTO_SCTP,
            Proto::Other(n) => n,
        }
    }

    pub fn has_ports(self) -> bool {
        matches!(self, Proto::Tcp | Proto::Udp | Proto::Sctp)
    }
}

impl serde::Serialize for Proto {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

#[cfg(test)]
impl schemars::JsonSchema for Proto {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Proto".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "The IP protocol; `other` for any protocol without a name here.",
            "type": "string",
            "enum": ["tcp", "udp", "icmp", "icmpv6", "sctp", "other"],
        })
    }
}

impl<'de> serde::Deserialize<'de> for Proto {
    /// The names [`Proto::name`] writes; `other` reads as protocol 0, the
    /// number being what output leaves out.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(match s.as_ref() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "icmp" => Proto::Icmp,
            "icmpv6" => Proto::Icmpv6,
            "sctp" => Proto::Sctp,
            "other" => Proto::Other(0),
            other => {
                return Err(serde::de::Error::unknown_variant(
                    other,
                    &["tcp", "udp", "icmp", "icmpv6", "sctp", "other"],
                ));
            }
        })
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One flow in one network namespace, as conntrack's original direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    pub netns: u64,
    pub proto: Proto,
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

impl Flow {
    pub fn from_key(key: &wire::FlowKey) -> Option<Flow> {
        let (src, dst) = match key.family {
            wire::AF_INET => {
                let a = |b: &[u8; 16]| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
                (a(&key.src), a(&key.dst))
            }
            wire::AF_INET6 => (
                IpAddr::V6(Ipv6Addr::from(key.src)),
                IpAddr::V6(Ipv6Addr::from(key.dst)),
            ),
            _ => return None,
        };
        let proto = Proto::from_number(key.proto);
        // Ports of portless protocols would only confuse: ICMP's type/code
        // are carried in them by the kernel side, not shown as ports.
        let (sport, dport) = if proto.has_ports() {
            (key.sport, key.dport)
        } else {
            (0, 0)
        };
        Some(Flow {
            netns: u64::from(key.netns),
            proto,
            src: SocketAddr::new(src, sport),
            dst: SocketAddr::new(dst, dport),
        })
    }

    pub fn family_number(&self) -> u8 {
        if self.src.is_ipv4() {
            wire::AF_INET
        } else {
            wire::AF_INET6
        }
    }

    pub fn family(&self) -> &'static str {
        if self.src.is_ipv4() { "ipv4" } else { "ipv6" }
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} -> {}", self.proto, self.src, self.dst)
    }
}

/// Which tier's hook produced a kernel event, from the wire's tier number.
fn strategy_from_wire(t: u8) -> Option<Strategy> {
    match t {
        wire::tier::TRACEPOINT => Some(Strategy::Tracepoint),
        wire::tier::KPROBE => Some(Strategy::Kprobe),
        _ => None,
    }
}

/// What happened to a conntrack entry (kprobe tier).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntryChange {
    /// early_drop threw it out to make room.
    Evicted,
    /// The garbage collector reaped it before it expired (above 95% fill).
    GcEvicted,
    Inserted,
    Deleted,
    InsertFailed,
}

/// An entry event: the entry's original tuple and state.
#[derive(Clone, Debug)]
pub struct EntryEvent {
    pub time: SystemTime,
    pub mono_ns: u64,
    pub change: EntryChange,
    pub flow: Flow,
    /// The tuple's port fields as the kernel holds them; for ICMP the echo
    /// id and type<<8|code, which `flow` does not show but which tell
    /// entries apart.
    pub raw_ports: (u16, u16),
    pub status: u32,
    pub timeout_jiffies: u32,
    pub tcp_state: u8,
    pub zone: u16,
    pub tier: Strategy,
}

impl EntryEvent {
    /// The entry as a table read would list it. The probes do not read
    /// its id or mark: 0, as for an entry without them.
    pub fn entry(&self, hz: u32) -> crate::conntrack::Entry {
        let (sport, dport) = self.raw_ports;
        crate::conntrack::Entry {
            family: self.flow.family_number(),
            proto: self.flow.proto.number(),
            src: self.flow.src.ip(),
            dst: self.flow.dst.ip(),
            sport,
            dport,
            tcp_state: (self.flow.proto == Proto::Tcp).then_some(self.tcp_state),
            status: self.status,
            timeout_secs: self.timeout_jiffies / hz.max(1),
            id: 0,
            zone: self.zone,
            mark: 0,
        }
    }
}

/// Anything the kernel side reports.
#[derive(Clone, Debug)]
pub enum KernelEvent {
    Drop(DropEvent),
    Entry(EntryEvent),
}

/// The first dropped packet of a flow.
#[derive(Clone, Debug)]
pub struct DropEvent {
    pub time: SystemTime,
    /// Kernel CLOCK_MONOTONIC, for ordering against table samples.
    pub mono_ns: u64,
    pub flow: Flow,
    pub tcp_flags: u8,
    /// What the kernel side saw of it (`ctrace_common::class` bits); the
    /// ledger turns the class into a cause.
    pub class: u8,
    pub reason: u32,
    pub tier: Strategy,
}

/// Kernel timestamps are CLOCK_MONOTONIC; output wants wall-clock time.
/// The offset is taken when made: re-make it periodically, since the wall
/// clock may be set (NTP on a router without an RTC) while ctrace runs.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    boot_wall: SystemTime,
}

impl Clock {
    pub fn new() -> Self {
        let now = SystemTime::now();
        Clock {
            boot_wall: now - Duration::from_nanos(monotonic_ns()),
        }
    }

    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        self.boot_wall + Duration::from_nanos(mono_ns)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// The same clock as bpf_ktime_get_ns().
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A wall-clock time as every output writes it: RFC 3339, milliseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Decodes one ring-buffer record. None for records this build does not
/// understand (short, or from a newer kernel side), which the caller counts.
pub fn decode(bytes: &[u8], clock: &Clock) -> Option<KernelEvent> {
    if bytes.len() < size_of::<wire::Event>() {
        return None;
    }
    // SAFETY: length checked; Event is Pod, read_unaligned copes with any
    // alignment of the ring-buffer slot.
    let raw: wire::Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let flow = Flow::from_key(&raw.key)?;
    let tier = strategy_from_wire(raw.tier)?;
    let time = clock.wall(raw.ts_ns);
    let change = match raw.kind {
        wire::kind::DROP => {
            return Some(KernelEvent::Drop(DropEvent {
                time,
                mono_ns: raw.ts_ns,
                flow,
                tcp_flags: raw.tcp_flags,
                class: raw.flags,
                reason: raw.reason,
                tier,
            }));
        }
        wire::kind::EVICT => EntryChange::Evicted,
        wire::kind::INSERT => EntryChange::Inserted,
        wire::kind::DELETE => EntryChange::Deleted,
        wire::kind::INSERT_FAILED => EntryChange::InsertFailed,
        wire::kind::GC_EVICT => EntryChange::GcEvicted,
        _ => return None,
    };
    Some(KernelEvent::Entry(EntryEvent {
        time,
        mono_ns: raw.ts_ns,
        change,
        flow,
        raw_ports: (raw.key.sport, raw.key.dport),
        status: raw.ct_status,
        timeout_jiffies: raw.ct_timeout_jiffies,
        tcp_state: raw.ct_tcp_state,
        zone: raw.ct_zone,
        tier,
    }))
}

/// "SYN", "SYN|ACK", ... for display.
pub fn tcp_flags_str(flags: u8) -> String {
    const NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
    let set: Vec<&str> = (0..8)
        .filter(|b| flags & (1 << b) != 0)
        .map(|b| NAMES[b])
        .collect();
    set.join("|")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key4() -> wire::FlowKey {
        let mut k = wire::FlowKey {
            family: wire::AF_INET,
            proto: wire::IPPROTO_TCP,
            sport: 40000,
            dport: 2380,
            netns: 4026532000,
            ..Default::default()
        };
        k.src[..4].copy_from_slice(&[10, 10, 0, 3]);
        k.dst[..4].copy_from_slice(&[10, 10, 1, 2]);
        k
    }

    fn bytes_of(e: &wire::Event) -> Vec<u8> {
        // SAFETY: Event is repr(C) plain data.
        unsafe {
            std::slice::from_raw_parts(
                (e as *const wire::Event).cast::<u8>(),
                size_of::<wire::Event>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decodes_ipv4_tcp_syn() {
        let raw = wire::Event {
            ts_ns: 5_000_000_000,
            key: key4(),
            kind: wire::kind::DROP,
            tier: wire::tier::TRACEPOINT,
            tcp_flags: 0x02,
            flags: 0,
            reason: 12,
            ..Default::default()
        };
        let Some(KernelEvent::Drop(e)) = decode(&bytes_of(&raw), &Clock::new()) else {
            panic!("not a drop")
        };
        assert_eq!(e.class, 0);
        assert_eq!(e.flow.src.to_string(), "10.10.0.3:40000");
        assert_eq!(e.flow.dst.to_string(), "10.10.1.2:2380");
        assert_eq!(e.flow.proto, Proto::Tcp);
        assert_eq!(e.flow.family(), "ipv4");
        assert_eq!(e.flow.netns, 4026532000);
        assert_eq!(tcp_flags_str(e.tcp_flags), "SYN");
    }

    #[test]
    fn decodes_ipv6_with_brackets_and_icmp_without_ports() {
        let mut k = key4();
        k.family = wire::AF_INET6;
        k.src = "fd10::3".parse::<Ipv6Addr>().unwrap().octets();
        k.dst = "fd10:1::2".parse::<Ipv6Addr>().unwrap().octets();
        let f = Flow::from_key(&k).unwrap();
        assert_eq!(f.src.to_string(), "[fd10::3]:40000");
        assert_eq!(f.family(), "ipv6");
        k.proto = wire::IPPROTO_ICMPV6;
        let f = Flow::from_key(&k).unwrap();
        assert_eq!(f.proto, Proto::Icmpv6);
        assert_eq!(f.dst.port(), 0);
        k.family = 99;
        assert!(Flow::from_key(&k).is_none());
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        let clock = Clock::new();
        assert!(decode(&[0u8; 10], &clock).is_none());
        let raw = wire::Event {
            kind: 200,
            key: key4(),
            tier: 1,
            ..Default::default()
        };
        assert!(decode(&bytes_of(&raw), &clock).is_none());
    }

    #[test]
    fn decodes_entry_events() {
        let raw = wire::Event {
            key: key4(),
            kind: wire::kind::EVICT,
            tier: wire::tier::KPROBE,
            ct_status: 0x8,
            ct_timeout_jiffies: 250,
            ..Default::default()
        };
        let Some(KernelEvent::Entry(e)) = decode(&bytes_of(&raw), &Clock::new()) else {
            panic!("not an entry event")
        };
        assert_eq!(e.change, EntryChange::Evicted);
        assert_eq!(e.tier, Strategy::Kprobe);
        assert_eq!(e.flow.dst.port(), 2380);
    }

    #[test]
    fn flags_render() {
        assert_eq!(tcp_flags_str(0x12), "SYN|ACK");
        assert_eq!(tcp_flags_str(0), "");
    }
}
