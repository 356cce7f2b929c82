//! Conntrack as ctrace knows it, however it was read: a table's
//! statistics ([`Stats`]), its entries ([`Entry`]) and their vocabulary
//! (status bits, TCP states), and a namespace's [`TableReader`], which
//! reads them over ctnetlink (the netlink module: wire encoding and
//! sockets) or from procfs ([`procfs`]).
pub mod procfs;

use std::net::IpAddr;

// linux/netfilter/nf_conntrack_common.h: enum ip_conntrack_status
pub const IPS_EXPECTED: u32 = 1 << 0;
pub const IPS_SEEN_REPLY: u32 = 1 << 1;
/// Only entries without this bit are candidates for early drop when the
/// table is full.
pub const IPS_ASSURED: u32 = 1 << 2;
/// ctnetlink confirms an entry it creates before applying CTA_STATUS, and
/// refuses (EBUSY) a status that would clear this bit, so creation always
/// sends it.
pub const IPS_CONFIRMED: u32 = 1 << 3;
pub const IPS_SRC_NAT: u32 = 1 << 4;
pub const IPS_DST_NAT: u32 = 1 << 5;
pub const IPS_DYING: u32 = 1 << 9;
pub const IPS_FIXED_TIMEOUT: u32 = 1 << 10;
pub const IPS_OFFLOAD: u32 = 1 << 14;

// linux/netfilter/nf_conntrack_tcp.h: enum tcp_conntrack
pub const TCP_CONNTRACK_NONE: u8 = 0;
pub const TCP_CONNTRACK_SYN_SENT: u8 = 1;
pub const TCP_CONNTRACK_SYN_RECV: u8 = 2;
pub const TCP_CONNTRACK_ESTABLISHED: u8 = 3;
pub const TCP_CONNTRACK_FIN_WAIT: u8 = 4;
pub const TCP_CONNTRACK_CLOSE_WAIT: u8 = 5;
pub const TCP_CONNTRACK_LAST_ACK: u8 = 6;
pub const TCP_CONNTRACK_TIME_WAIT: u8 = 7;
pub const TCP_CONNTRACK_CLOSE: u8 = 8;
pub const TCP_CONNTRACK_SYN_SENT2: u8 = 9;

/// Conntrack counters of one network namespace. `entries` and `max` are
/// gauges; the rest are counters since the namespace was created, summed
/// over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    pub max: u64,
    pub found: u64,
    pub invalid: u64,
    pub insert: u64,
    pub insert_failed: u64,
    pub drop: u64,
    pub early_drop: u64,
    pub error: u64,
    pub search_restart: u64,
    pub clash_resolve: u64,
    pub chaintoolong: u64,
}

/// One conntrack entry as a table dump (`CtSocket::dump` (ctnetlink)) reports it, in
/// its original direction.
///
/// Ports are conntrack's own tuple fields, host byte order: TCP, UDP,
/// UDP-Lite, SCTP and DCCP ports; GRE keys. ICMP and ICMPv6 have no ports;
/// their tuple is the echo identifier and the type and code, so for them
/// `sport` is the identifier and `dport` is `type << 8 | code` (an echo
/// request, 8/0, reads 0x0800). That keeps two pings between the same hosts
/// apart, and `sport` is what ctnetlink's `CtEntry` takes as the identifier. Protocols
/// left to the generic tracker report 0 for both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// AF_INET or AF_INET6.
    pub family: u8,
    /// IP protocol number.
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// TCP_CONNTRACK_*, for TCP entries.
    pub tcp_state: Option<u8>,
    /// IPS_* bits.
    pub status: u32,
    /// Seconds left before the entry expires, as of the dump (0 for entries
    /// with no timeout, e.g. offloaded ones).
    pub timeout_secs: u32,
    /// conntrack's entry id (CTA_ID): unique among live entries, reused
    /// after deletion.
    pub id: u32,
    /// Conntrack zone, 0 for the default zone. A zone that applies to one
    /// direction only is reported too.
    pub zone: u16,
    /// ct mark, 0 when unset.
    pub mark: u32,
}

/// conntrack's name for a TCP_CONNTRACK_* state, as `conntrack -L` prints it.
pub fn tcp_state_name(state: u8) -> &'static str {
    match state {
        TCP_CONNTRACK_NONE => "NONE",
        TCP_CONNTRACK_SYN_SENT => "SYN_SENT",
        TCP_CONNTRACK_SYN_RECV => "SYN_RECV",
        TCP_CONNTRACK_ESTABLISHED => "ESTABLISHED",
        TCP_CONNTRACK_FIN_WAIT => "FIN_WAIT",
        TCP_CONNTRACK_CLOSE_WAIT => "CLOSE_WAIT",
        TCP_CONNTRACK_LAST_ACK => "LAST_ACK",
        TCP_CONNTRACK_TIME_WAIT => "TIME_WAIT",
        TCP_CONNTRACK_CLOSE => "CLOSE",
        TCP_CONNTRACK_SYN_SENT2 => "SYN_SENT2",
        _ => "UNKNOWN",
    }
}

/// Where a namespace's statistics and entries come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub enum TableSource {
    Ctnetlink,
    /// /proc/net/stat/nf_conntrack, the nf_conntrack_count and _max
    /// sysctls, and /proc/net/nf_conntrack.
    Procfs,
}

impl TableSource {
    pub fn name(self) -> &'static str {
        match self {
            TableSource::Ctnetlink => "ctnetlink",
            TableSource::Procfs => "procfs",
        }
    }
}

/// Which sources to try, from `CTRACE_TABLE_SOURCE` (`auto`, the default:
/// ctnetlink, else procfs; `ctnetlink`; `procfs`). Forcing procfs shows
/// what a router without ctnetlink would, on a machine that has it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SourceChoice {
    #[default]
    Auto,
    Ctnetlink,
    Procfs,
}

pub const SOURCE_ENV: &str = "CTRACE_TABLE_SOURCE";

impl SourceChoice {
    pub fn from_env() -> anyhow::Result<SourceChoice> {
        Self::parse(std::env::var(SOURCE_ENV).ok().as_deref())
    }

    /// A value of `CTRACE_TABLE_SOURCE`; None or empty means `auto`.
    pub fn parse(value: Option<&str>) -> anyhow::Result<SourceChoice> {
        match value {
            None | Some("") | Some("auto") => Ok(SourceChoice::Auto),
            Some("ctnetlink") => Ok(SourceChoice::Ctnetlink),
            Some("procfs") => Ok(SourceChoice::Procfs),
            Some(other) => {
                anyhow::bail!("{SOURCE_ENV}={other:?}: expected auto, ctnetlink or procfs")
            }
        }
    }
}

/// A namespace's conntrack statistics and entries, read one way or another:
/// the same [`Stats`] and [`Entry`] either way.
pub trait TableRead: std::fmt::Debug + Send {
    fn source(&self) -> TableSource;
    fn stats(&mut self) -> anyhow::Result<Stats>;
    /// Streams every entry of the table to `f`; returns how many.
    fn dump(&mut self, f: &mut dyn FnMut(&Entry)) -> anyhow::Result<u64>;
}

/// An open reader of either kind.
pub type TableReader = Box<dyn TableRead>;
