//! ctnetlink (nfnetlink subsystem 1): conntrack table statistics, and bulk
//! creation of entries to put a table under pressure.
//!
//! Statistics are per network namespace (the one the socket lives in) except
//! the maximum, which is the global net.netfilter.nf_conntrack_max: every
//! namespace's count is checked against that same limit.
use std::io;
use std::net::IpAddr;

use anyhow::{Context, Result, bail};

use super::{MsgBuilder, NETLINK_NETFILTER, NLM_F_CREATE, NLM_F_EXCL, NlError, NlSocket, Notice};
use crate::conntrack::{
    Entry, IPS_ASSURED, IPS_CONFIRMED, IPS_DYING, IPS_EXPECTED, IPS_SEEN_REPLY, Stats,
    TCP_CONNTRACK_ESTABLISHED, TCP_CONNTRACK_SYN_SENT2,
};
use crate::netns::NetNs;
use ctrace_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP};
use std::net::{Ipv4Addr, Ipv6Addr};

use super::{Attr, Msg};

// linux/netfilter/nfnetlink.h
pub const NFNETLINK_V0: u8 = 0;
pub const NFNL_SUBSYS_CTNETLINK: u8 = 1;
pub const NFGENMSG_LEN: usize = 4;

// linux/netfilter/nfnetlink_conntrack.h: enum cntl_msg_types
pub const IPCTNL_MSG_CT_NEW: u8 = 0;
/// The multicast group of new entries (enum nfnetlink_groups).
pub const NFNLGRP_CONNTRACK_NEW: u32 = 1;
/// The multicast group of entries that went (deleted, expired, evicted).
pub const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;
pub const IPCTNL_MSG_CT_GET: u8 = 1;
pub const IPCTNL_MSG_CT_DELETE: u8 = 2;
pub const IPCTNL_MSG_CT_GET_CTRZERO: u8 = 3;
pub const IPCTNL_MSG_CT_GET_STATS_CPU: u8 = 4;
pub const IPCTNL_MSG_CT_GET_STATS: u8 = 5;
pub const IPCTNL_MSG_CT_GET_DYING: u8 = 6;
pub const IPCTNL_MSG_CT_GET_UNCONFIRMED: u8 = 7;

// enum ctattr_type
pub const CTA_TUPLE_ORIG: u16 = 1;
pub const CTA_TUPLE_REPLY: u16 = 2;
pub const CTA_STATUS: u16 = 3;
pub const CTA_PROTOINFO: u16 = 4;
pub const CTA_TIMEOUT: u16 = 7;
pub const CTA_MARK: u16 = 8;
pub const CTA_USE: u16 = 11;
pub const CTA_ID: u16 = 12;
pub const CTA_ZONE: u16 = 18;
// enum ctattr_tuple
pub const CTA_TUPLE_IP: u16 = 1;
pub const CTA_TUPLE_PROTO: u16 = 2;
pub const CTA_TUPLE_ZONE: u16 = 3;
// enum ctattr_ip
pub const CTA_IP_V4_SRC: u16 = 1;
pub const CTA_IP_V4_DST: u16 = 2;
pub const CTA_IP_V6_SRC: u16 = 3;
pub const CTA_IP_V6_DST: u16 = 4;
// enum ctattr_l4proto
pub const CTA_PROTO_NUM: u16 = 1;
pub const CTA_PROTO_SRC_PORT: u16 = 2;
pub const CTA_PROTO_DST_PORT: u16 = 3;
pub const CTA_PROTO_ICMP_ID: u16 = 4;
pub const CTA_PROTO_ICMP_TYPE: u16 = 5;
pub const CTA_PROTO_ICMP_CODE: u16 = 6;
pub const CTA_PROTO_ICMPV6_ID: u16 = 7;
pub const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
pub const CTA_PROTO_ICMPV6_CODE: u16 = 9;
// enum ctattr_protoinfo, ctattr_protoinfo_tcp
pub const CTA_PROTOINFO_TCP: u16 = 1;
pub const CTA_PROTOINFO_TCP_STATE: u16 = 1;
// enum ctattr_stats_cpu
pub const CTA_STATS_FOUND: u16 = 2;
pub const CTA_STATS_INVALID: u16 = 4;
pub const CTA_STATS_INSERT: u16 = 8;
pub const CTA_STATS_INSERT_FAILED: u16 = 9;
pub const CTA_STATS_DROP: u16 = 10;
pub const CTA_STATS_EARLY_DROP: u16 = 11;
pub const CTA_STATS_ERROR: u16 = 12;
pub const CTA_STATS_SEARCH_RESTART: u16 = 13;
pub const CTA_STATS_CLASH_RESOLVE: u16 = 14;
pub const CTA_STATS_CHAIN_TOOLONG: u16 = 15;
// enum ctattr_stats_global
pub const CTA_STATS_GLOBAL_ENTRIES: u16 = 1;
pub const CTA_STATS_GLOBAL_MAX_ENTRIES: u16 = 2;

const ICMP_ECHO: u8 = 8;
const ICMP_ECHOREPLY: u8 = 0;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// nlmsg_type of a ctnetlink message.
pub const fn ct_msg_type(msg: u8) -> u16 {
    ((NFNL_SUBSYS_CTNETLINK as u16) << 8) | msg as u16
}

/// struct nfgenmsg. `res_id` is big-endian on the wire (a CPU number in
/// per-CPU statistics, 0 in requests).
pub fn nfgenmsg(family: u8, res_id: u16) -> [u8; NFGENMSG_LEN] {
    let id = res_id.to_be_bytes();
    [family, NFNETLINK_V0, id[0], id[1]]
}

/// One conntrack entry to create. The reply tuple is the mirror of the
/// original one (no NAT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    /// AF_INET or AF_INET6; must match both addresses.
    pub family: u8,
    /// IP protocol number. For ICMP/ICMPv6 the entry is an echo exchange
    /// with `sport` as its identifier. Otherwise the ports are sent: TCP,
    /// UDP, UDP-Lite, SCTP and DCCP use them, GRE takes them as its keys,
    /// and protocols left to the generic tracker ignore them (so entries
    /// differing only in ports are duplicates there).
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// TCP state (TCP_CONNTRACK_*), TCP only.
    pub tcp_state: Option<u8>,
    /// IPS_* bits. IPS_CONFIRMED is added when sending (see there);
    /// IPS_EXPECTED and IPS_DYING cannot be requested.
    pub status: u32,
    pub timeout_secs: u32,
}

impl CtEntry {
    /// An entry as an established, replied-to flow leaves it: assured (so
    /// the kernel will not early-drop it to make room), TCP ESTABLISHED for
    /// TCP. Family follows the addresses.
    pub fn assured(
        proto: u8,
        src: IpAddr,
        sport: u16,
        dst: IpAddr,
        dport: u16,
        timeout_secs: u32,
    ) -> CtEntry {
        CtEntry {
            family: if src.is_ipv4() {
                libc::AF_INET as u8
            } else {
                libc::AF_INET6 as u8
            },
            proto,
            src,
            dst,
            sport,
            dport,
            tcp_state: (proto == IPPROTO_TCP).then_some(TCP_CONNTRACK_ESTABLISHED),
            status: IPS_ASSURED | IPS_SEEN_REPLY | IPS_CONFIRMED,
            timeout_secs,
        }
    }

    fn validate(&self) -> Result<()> {
        let v4 = match self.family as i32 {
            libc::AF_INET => true,
            libc::AF_INET6 => false,
            f => bail!("family {f} is neither AF_INET nor AF_INET6"),
        };
        if self.src.is_ipv4() != v4 || self.dst.is_ipv4() != v4 {
            bail!(
                "addresses {} -> {} do not match family {}",
                self.src,
                self.dst,
                self.family
            );
        }
        if self.status & (IPS_EXPECTED | IPS_DYING) != 0 {
            bail!(
                "status {:#x}: IPS_EXPECTED and IPS_DYING cannot be set on creation",
                self.status
            );
        }
        if self.tcp_state.is_some() && self.proto != IPPROTO_TCP {
            bail!("TCP state given for protocol {}", self.proto);
        }
        if let Some(state) = self.tcp_state
            && state > TCP_CONNTRACK_SYN_SENT2
        {
            bail!("TCP state {state} is out of range");
        }
        Ok(())
    }

    /// Appends the IPCTNL_MSG_CT_NEW payload. Runs once per entry of a
    /// table fill, so it allocates nothing.
    fn encode(&self, m: &mut MsgBuilder) {
        m.header(&nfgenmsg(self.family, 0));
        self.tuple(m, CTA_TUPLE_ORIG, false, None);
        self.tuple(m, CTA_TUPLE_REPLY, true, None);
        m.be32(CTA_TIMEOUT, self.timeout_secs);
        m.be32(CTA_STATUS, self.status | IPS_CONFIRMED);
        if let Some(state) = self.tcp_state {
            m.nested(CTA_PROTOINFO, |m| {
                m.nested(CTA_PROTOINFO_TCP, |m| {
                    m.u8(CTA_PROTOINFO_TCP_STATE, state);
                });
            });
        }
    }

    /// `zone`: a zone for this direction only (CTA_TUPLE_ZONE).
    fn tuple(&self, m: &mut MsgBuilder, ty: u16, reply: bool, zone: Option<u16>) {
        let (src, dst, sport, dport) = if reply {
            (self.dst, self.src, self.dport, self.sport)
        } else {
            (self.src, self.dst, self.sport, self.dport)
        };
        m.nested(ty, |m| {
            m.nested(CTA_TUPLE_IP, |m| match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    m.bytes(CTA_IP_V4_SRC, &s.octets())
                        .bytes(CTA_IP_V4_DST, &d.octets());
                }
                (s, d) => {
                    m.bytes(CTA_IP_V6_SRC, &v6_octets(s))
                        .bytes(CTA_IP_V6_DST, &v6_octets(d));
                }
            });
            m.nested(CTA_TUPLE_PROTO, |m| {
                m.u8(CTA_PROTO_NUM, self.proto);
                match self.proto {
                    IPPROTO_ICMP => {
                        let ty = if reply { ICMP_ECHOREPLY } else { ICMP_ECHO };
                        m.be16(CTA_PROTO_ICMP_ID, self.sport)
                            .u8(CTA_PROTO_ICMP_TYPE, ty)
                            .u8(CTA_PROTO_ICMP_CODE, 0);
                    }
                    IPPROTO_ICMPV6 => {
                        let ty = if reply {
                            ICMPV6_ECHO_REPLY
                        } else {
                            ICMPV6_ECHO_REQUEST
                        };
                        m.be16(CTA_PROTO_ICMPV6_ID, self.sport)
                            .u8(CTA_PROTO_ICMPV6_TYPE, ty)
                            .u8(CTA_PROTO_ICMPV6_CODE, 0);
                    }
                    _ => {
                        m.be16(CTA_PROTO_SRC_PORT, sport)
                            .be16(CTA_PROTO_DST_PORT, dport);
                    }
                }
            });
            if let Some(zone) = zone {
                m.be16(CTA_TUPLE_ZONE, zone);
            }
        });
    }
}

/// Validation has already matched both addresses to the family.
fn v6_octets(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

/// Outcome of [`CtSocket::create_batch`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateReport {
    pub created: u64,
    /// Failures per errno, sorted by errno: ENOMEM means the table was full
    /// (and nothing could be early-dropped), EEXIST a duplicate tuple.
    pub failed: Vec<(i32, u64)>,
    /// The first failure as text, with the kernel's extended ack if any.
    pub first_error: Option<String>,
}

impl CreateReport {
    pub fn failures(&self, errno: i32) -> u64 {
        self.failed
            .iter()
            .find(|(e, _)| *e == errno)
            .map_or(0, |(_, n)| *n)
    }
}

/// A ctnetlink socket, bound to one network namespace.
#[derive(Debug)]
pub struct CtSocket(NlSocket);

impl CtSocket {
    /// Opens a socket in `ns` (the calling thread's for None) and checks that
    /// ctnetlink answers there, so a missing nf_conntrack_netlink or missing
    /// privilege shows up here, named, not on first use.
    pub fn open(ns: Option<&NetNs>) -> Result<CtSocket> {
        let mut sock = NlSocket::open(NETLINK_NETFILTER, ns)
            .map(CtSocket)
            .map_err(explain_unavailable)?;
        sock.global_stats().map_err(explain_unavailable)?;
        Ok(sock)
    }

    /// The underlying socket, for ctnetlink requests this type does not wrap
    /// (dumps of the table, deletes).
    pub fn socket(&mut self) -> &mut NlSocket {
        &mut self.0
    }

    /// (entries, max) from IPCTNL_MSG_CT_GET_STATS.
    fn global_stats(&mut self) -> Result<(u64, u64)> {
        let mut msg = MsgBuilder::new(ct_msg_type(IPCTNL_MSG_CT_GET_STATS), 0);
        msg.header(&nfgenmsg(libc::AF_UNSPEC as u8, 0));
        let (mut entries, mut max) = (None, None);
        self.0
            .request(msg, |m| {
                if m.ty != ct_msg_type(IPCTNL_MSG_CT_GET_STATS) {
                    return Ok(());
                }
                for a in m.attrs(NFGENMSG_LEN)? {
                    let a = a?;
                    match a.ty {
                        CTA_STATS_GLOBAL_ENTRIES => entries = Some(u64::from(a.be32()?)),
                        CTA_STATS_GLOBAL_MAX_ENTRIES => max = Some(u64::from(a.be32()?)),
                        _ => {}
                    }
                }
                Ok(())
            })
            .context("IPCTNL_MSG_CT_GET_STATS")?;
        match (entries, max) {
            (Some(e), Some(m)) => Ok((e, m)),
            _ => bail!("IPCTNL_MSG_CT_GET_STATS: answer lacks the entry count or maximum"),
        }
    }

    /// Table size and limit (IPCTNL_MSG_CT_GET_STATS) and the per-CPU
    /// counters (IPCTNL_MSG_CT_GET_STATS_CPU dump) summed, for the namespace
    /// the socket lives in. Two round trips; cheap enough to poll every
    /// second.
    pub fn stats(&mut self) -> Result<Stats> {
        let (entries, max) = self.global_stats()?;
        let mut s = Stats {
            entries,
            max,
            ..Stats::default()
        };
        let mut msg = MsgBuilder::new(ct_msg_type(IPCTNL_MSG_CT_GET_STATS_CPU), 0);
        msg.header(&nfgenmsg(libc::AF_UNSPEC as u8, 0));
        self.0
            .dump(msg, |m| {
                if m.ty != ct_msg_type(IPCTNL_MSG_CT_GET_STATS_CPU) {
                    return Ok(());
                }
                for a in m.attrs(NFGENMSG_LEN)? {
                    let a = a?;
                    let field = match a.ty {
                        CTA_STATS_FOUND => &mut s.found,
                        CTA_STATS_INVALID => &mut s.invalid,
                        CTA_STATS_INSERT => &mut s.insert,
                        CTA_STATS_INSERT_FAILED => &mut s.insert_failed,
                        CTA_STATS_DROP => &mut s.drop,
                        CTA_STATS_EARLY_DROP => &mut s.early_drop,
                        CTA_STATS_ERROR => &mut s.error,
                        CTA_STATS_SEARCH_RESTART => &mut s.search_restart,
                        CTA_STATS_CLASH_RESOLVE => &mut s.clash_resolve,
                        CTA_STATS_CHAIN_TOOLONG => &mut s.chaintoolong,
                        _ => continue,
                    };
                    *field += u64::from(a.be32()?);
                }
                Ok(())
            })
            .context("IPCTNL_MSG_CT_GET_STATS_CPU dump")?;
        Ok(s)
    }

    /// Creates conntrack entries in batches (IPCTNL_MSG_CT_NEW with
    /// NLM_F_CREATE|NLM_F_EXCL), counting failures by errno instead of
    /// stopping at the first: filling a table to its limit is the point.
    ///
    /// An invalid entry (family not matching its addresses, ...) stops the
    /// run with an error naming it; the entries before it have been
    /// submitted by then.
    pub fn create_batch(
        &mut self,
        entries: &mut dyn Iterator<Item = CtEntry>,
    ) -> Result<CreateReport> {
        let mut batch = self.0.batch();
        for (i, entry) in entries.enumerate() {
            if let Err(e) = entry.validate() {
                batch.flush()?;
                let done = batch.report();
                return Err(e).context(format!(
                    "conntrack entry #{i} {entry:?} (the {} entries before it were submitted, {} created)",
                    done.sent,
                    done.succeeded()
                ));
            }
            batch
                .push(
                    ct_msg_type(IPCTNL_MSG_CT_NEW),
                    NLM_F_CREATE | NLM_F_EXCL,
                    |m| entry.encode(m),
                )
                .with_context(|| format!("conntrack entry #{i} {entry:?}"))?;
        }
        let report = batch.finish().context("creating conntrack entries")?;
        Ok(CreateReport {
            created: report.succeeded(),
            first_error: report.first_error.as_ref().map(NlError::to_string),
            failed: report.failed,
        })
    }
}

impl Entry {
    /// Decodes one IPCTNL_MSG_CT_NEW message, as the kernel sends for every
    /// entry of a dump (and in conntrack event notifications). `Ok(None)` for
    /// entries this code has no tuple for (a family other than IPv4/IPv6);
    /// malformed attributes are errors.
    pub fn from_msg(m: &Msg<'_>) -> Result<Option<Entry>> {
        let family = m.header(NFGENMSG_LEN)?[0];
        let v4 = match i32::from(family) {
            libc::AF_INET => true,
            libc::AF_INET6 => false,
            _ => return Ok(None),
        };
        let mut e = Entry {
            family,
            proto: 0,
            src: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            sport: 0,
            dport: 0,
            tcp_state: None,
            status: 0,
            timeout_secs: 0,
            id: 0,
            zone: 0,
            mark: 0,
        };
        let (mut have_tuple, mut top_zone, mut orig_zone, mut reply_zone) =
            (false, None, None, None);
        for a in m.attrs(NFGENMSG_LEN)? {
            let a = a?;
            match a.ty {
                CTA_TUPLE_ORIG => {
                    orig_zone = e.parse_orig_tuple(&a, v4)?;
                    have_tuple = true;
                }
                CTA_TUPLE_REPLY => {
                    if let Some(z) = a.nested().find(CTA_TUPLE_ZONE)? {
                        reply_zone = Some(z.be16()?);
                    }
                }
                CTA_STATUS => e.status = a.be32()?,
                CTA_TIMEOUT => e.timeout_secs = a.be32()?,
                CTA_ID => e.id = a.be32()?,
                CTA_MARK => e.mark = a.be32()?,
                CTA_ZONE => top_zone = Some(a.be16()?),
                CTA_PROTOINFO => {
                    if let Some(tcp) = a.nested().find(CTA_PROTOINFO_TCP)?
                        && let Some(state) = tcp.nested().find(CTA_PROTOINFO_TCP_STATE)?
                    {
                        e.tcp_state = Some(state.u8()?);
                    }
                }
                _ => {}
            }
        }
        if !have_tuple {
            bail!(
                "conntrack entry id {} without an original tuple (CTA_TUPLE_ORIG)",
                e.id
            );
        }
        // CTA_ZONE when the zone covers both directions, CTA_TUPLE_ZONE in
        // the tuple of the one direction it covers otherwise. The kernel
        // side reads the zone's id whatever its direction: keyed alike.
        e.zone = top_zone.or(orig_zone).or(reply_zone).unwrap_or(0);
        Ok(Some(e))
    }

    /// Fills addresses, protocol and ports from CTA_TUPLE_ORIG; returns its
    /// CTA_TUPLE_ZONE if any.
    fn parse_orig_tuple(&mut self, tuple: &Attr<'_>, v4: bool) -> Result<Option<u16>> {
        let mut zone = None;
        let (mut src, mut dst) = (None, None);
        let (mut icmp_type, mut icmp_code) = (0u8, 0u8);
        for a in tuple.nested() {
            let a = a?;
            match a.ty {
                CTA_TUPLE_IP => {
                    for ip in a.nested() {
                        let ip = ip?;
                        match (ip.ty, v4) {
                            (CTA_IP_V4_SRC, true) => {
                                src = Some(IpAddr::from(Ipv4Addr::from(ip.be32()?)));
                            }
                            (CTA_IP_V4_DST, true) => {
                                dst = Some(IpAddr::from(Ipv4Addr::from(ip.be32()?)));
                            }
                            (CTA_IP_V6_SRC, false) => {
                                src = Some(IpAddr::from(v6_from(&ip)?));
                            }
                            (CTA_IP_V6_DST, false) => {
                                dst = Some(IpAddr::from(v6_from(&ip)?));
                            }
                            _ => {}
                        }
                    }
                }
                CTA_TUPLE_PROTO => {
                    for p in a.nested() {
                        let p = p?;
                        match p.ty {
                            CTA_PROTO_NUM => self.proto = p.u8()?,
                            CTA_PROTO_SRC_PORT => self.sport = p.be16()?,
                            CTA_PROTO_DST_PORT => self.dport = p.be16()?,
                            CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => self.sport = p.be16()?,
                            CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE => icmp_type = p.u8()?,
                            CTA_PROTO_ICMP_CODE | CTA_PROTO_ICMPV6_CODE => icmp_code = p.u8()?,
                            _ => {}
                        }
                    }
                }
                CTA_TUPLE_ZONE => zone = Some(a.be16()?),
                _ => {}
            }
        }
        if matches!(self.proto, IPPROTO_ICMP | IPPROTO_ICMPV6) {
            self.dport = u16::from_be_bytes([icmp_type, icmp_code]);
        }
        match (src, dst) {
            (Some(s), Some(d)) => {
                self.src = s;
                self.dst = d;
            }
            _ => bail!(
                "conntrack entry (family {}, protocol {}) lacks a source or destination address",
                self.family,
                self.proto
            ),
        }
        Ok(zone)
    }
}

fn v6_from(a: &Attr<'_>) -> Result<Ipv6Addr> {
    let octets: [u8; 16] = a.payload.try_into().map_err(|_| {
        anyhow::anyhow!(
            "IPv6 address attribute of {} bytes, expected 16",
            a.payload.len()
        )
    })?;
    Ok(Ipv6Addr::from(octets))
}

impl crate::conntrack::TableRead for CtSocket {
    fn source(&self) -> crate::conntrack::TableSource {
        crate::conntrack::TableSource::Ctnetlink
    }
    fn stats(&mut self) -> Result<Stats> {
        CtSocket::stats(self)
    }
    fn dump(&mut self, f: &mut dyn FnMut(&Entry)) -> Result<u64> {
        CtSocket::dump(self, f)
    }
}

impl CtSocket {
    /// Streams the whole table of the socket's namespace, IPv4 and IPv6
    /// (IPCTNL_MSG_CT_GET, NLM_F_DUMP, family AF_UNSPEC), calling `f` once
    /// per entry as each datagram arrives: memory stays at one receive
    /// buffer whatever the table size. Returns how many entries `f` saw.
    ///
    /// The kernel walks its hash table without a snapshot, so entries
    /// created or deleted during the dump may or may not be reported, and
    /// when the entry a datagram ended on is deleted before the next read,
    /// the kernel restarts that hash bucket and repeats the entries before
    /// it. Callers that need exact counts key entries by tuple.
    ///
    /// A malformed message is an error (after the dump has been read to its
    /// end, so the socket stays usable); `f` is not called after it.
    pub fn dump(&mut self, f: &mut dyn FnMut(&Entry)) -> Result<u64> {
        let mut msg = MsgBuilder::new(ct_msg_type(IPCTNL_MSG_CT_GET), 0);
        // AF_UNSPEC: ctnetlink filters by family only when one is given.
        msg.header(&nfgenmsg(libc::AF_UNSPEC as u8, 0));
        let (mut seen, mut skipped) = (0u64, 0u64);
        self.0
            .dump(msg, |m| {
                if m.ty != ct_msg_type(IPCTNL_MSG_CT_NEW) {
                    return Ok(());
                }
                match Entry::from_msg(m)? {
                    Some(e) => {
                        seen += 1;
                        f(&e);
                    }
                    None => skipped += 1,
                }
                Ok(())
            })
            .context("IPCTNL_MSG_CT_GET dump of the conntrack table")?;
        if skipped > 0 {
            log::debug!(
                "conntrack dump: skipped {skipped} entries of families other than IPv4/IPv6"
            );
        }
        Ok(seen)
    }

    /// Empties the namespace's table (IPCTNL_MSG_CT_DELETE without a
    /// tuple, every family), as `conntrack -F` does.
    pub fn flush(&mut self) -> Result<()> {
        let mut msg = MsgBuilder::new(ct_msg_type(IPCTNL_MSG_CT_DELETE), 0);
        msg.header(&nfgenmsg(libc::AF_UNSPEC as u8, 0));
        self.0
            .request_ack(msg)
            .context("flushing the conntrack table")
    }

    /// Deletes the entry whose original tuple is `entry`'s (default zone),
    /// IPCTNL_MSG_CT_DELETE. Fails with ENOENT ([`NlError`]) when there is
    /// none.
    pub fn delete(&mut self, entry: &CtEntry) -> Result<()> {
        entry.validate()?;
        let mut msg = MsgBuilder::new(ct_msg_type(IPCTNL_MSG_CT_DELETE), 0);
        msg.header(&nfgenmsg(entry.family, 0));
        entry.tuple(&mut msg, CTA_TUPLE_ORIG, false, None);
        self.0
            .request_ack(msg)
            .with_context(|| format!("deleting conntrack entry {entry:?}"))
    }
}

/// Adds the likely cause to errors that mean "no ctnetlink here".
fn explain_unavailable(err: anyhow::Error) -> anyhow::Error {
    let errno = NlError::errno_of(&err).or_else(|| {
        err.chain()
            .find_map(|e| e.downcast_ref::<io::Error>())
            .and_then(io::Error::raw_os_error)
    });
    match errno {
        // No nfnetlink at all (EPROTONOSUPPORT), or nfnetlink without the
        // conntrack subsystem: nfnetlink answers EINVAL for a subsystem
        // nobody registered.
        Some(libc::EPROTONOSUPPORT | libc::ENOENT | libc::EINVAL | libc::EOPNOTSUPP) => err
            .context(
                "ctnetlink is not available: the kernel needs nf_conntrack_netlink \
             (modprobe nf_conntrack_netlink, or CONFIG_NF_CT_NETLINK)",
            ),
        Some(libc::EPERM) => {
            err.context("ctnetlink needs CAP_NET_ADMIN over the network namespace")
        }
        _ => err.context("opening a ctnetlink socket"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::{Msgs, NLMSG_HDRLEN};
    use crate::netns::skip_unless_root;
    use ctrace_common::{IPPROTO_GRE, IPPROTO_SCTP, IPPROTO_UDP};
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Instant;

    fn host_conntrack_max() -> u64 {
        std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// The i-th of up to 2^20 distinct IPv4 TCP tuples.
    fn fill_entry(i: u32) -> CtEntry {
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + (i >> 4));
        CtEntry::assured(
            IPPROTO_TCP,
            src.into(),
            1024 + (i & 15) as u16,
            Ipv4Addr::new(10, 201, 0, 1).into(),
            80,
            600,
        )
    }

    #[test]
    fn netlink_ctnetlink_encodes_a_tcp_entry() {
        let e = fill_entry(17);
        let mut m = MsgBuilder::new(ct_msg_type(IPCTNL_MSG_CT_NEW), 0);
        e.encode(&mut m);
        let msg = Msgs::new(m.as_bytes()).next().unwrap().unwrap();
        assert_eq!(msg.ty, 0x0100);
        assert_eq!(msg.header(4).unwrap(), &[libc::AF_INET as u8, 0, 0, 0]);
        let top: Vec<_> = msg
            .attrs(NFGENMSG_LEN)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let types: Vec<u16> = top.iter().map(|a| a.ty).collect();
        assert_eq!(
            types,
            [
                CTA_TUPLE_ORIG,
                CTA_TUPLE_REPLY,
                CTA_TIMEOUT,
                CTA_STATUS,
                CTA_PROTOINFO
            ]
        );
        let reply = top[1].nested();
        let ip = reply.find(CTA_TUPLE_IP).unwrap().unwrap().nested();
        assert_eq!(
            ip.find(CTA_IP_V4_SRC).unwrap().unwrap().payload,
            &[10, 201, 0, 1]
        );
        assert_eq!(
            ip.find(CTA_IP_V4_DST).unwrap().unwrap().payload,
            &[10, 200, 0, 1]
        );
        let proto = reply.find(CTA_TUPLE_PROTO).unwrap().unwrap().nested();
        assert_eq!(proto.find(CTA_PROTO_NUM).unwrap().unwrap().u8().unwrap(), 6);
        assert_eq!(
            proto
                .find(CTA_PROTO_SRC_PORT)
                .unwrap()
                .unwrap()
                .be16()
                .unwrap(),
            80
        );
        assert_eq!(
            proto
                .find(CTA_PROTO_DST_PORT)
                .unwrap()
                .unwrap()
                .be16()
                .unwrap(),
            1025
        );
        assert_eq!(top[2].be32().unwrap(), 600);
        assert_eq!(
            top[3].be32().unwrap(),
            IPS_ASSURED | IPS_SEEN_REPLY | IPS_CONFIRMED
        );
        let tcp = top[4]
            .nested()
            .find(CTA_PROTOINFO_TCP)
            .unwrap()
            .unwrap()
            .nested();
        assert_eq!(
            tcp.find(CTA_PROTOINFO_TCP_STATE)
                .unwrap()
                .unwrap()
                .u8()
                .unwrap(),
            TCP_CONNTRACK_ESTABLISHED
        );
        // A table fill sends ~130 bytes per entry.
        assert!(m.len() < 160 + NLMSG_HDRLEN, "{}", m.len());
    }

    #[test]
    fn netlink_ctnetlink_rejects_inconsistent_entries() {
        let mut e = fill_entry(0);
        e.family = libc::AF_INET6 as u8;
        assert!(e.validate().is_err());
        let mut e = fill_entry(0);
        e.proto = IPPROTO_UDP;
        assert!(e.validate().unwrap_err().to_string().contains("TCP state"));
        let mut e = fill_entry(0);
        e.tcp_state = Some(42);
        assert!(e.validate().is_err());
        let mut e = fill_entry(0);
        e.status |= IPS_DYING;
        assert!(e.validate().is_err());
        let mut e = fill_entry(0);
        e.family = 7;
        assert!(e.validate().is_err());
    }

    #[test]
    fn netlink_ctnetlink_stats_and_small_batch() {
        if skip_unless_root("netlink_ctnetlink_stats_and_small_batch") {
            return;
        }
        let ns = crate::netlink::rtnetlink::new_netns().unwrap();
        let mut ct = CtSocket::open(Some(&ns)).unwrap();
        let before = ct.stats().unwrap();
        assert_eq!(before.entries, 0);
        assert_eq!(before.max, host_conntrack_max());

        let v6 = |n: u16| IpAddr::from(Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, n));
        let v4 = |n: u8| IpAddr::from(Ipv4Addr::new(10, 199, 0, n));
        let mut udp = CtEntry::assured(IPPROTO_UDP, v6(1), 5353, v6(2), 53, 30);
        udp.status = 0; // unreplied, early-droppable; IPS_CONFIRMED is implied
        let entries = [
            CtEntry::assured(IPPROTO_TCP, v4(1), 40000, v4(2), 443, 120),
            CtEntry::assured(IPPROTO_TCP, v6(1), 40000, v6(2), 443, 120),
            udp,
            CtEntry::assured(IPPROTO_ICMP, v4(1), 77, v4(2), 0, 30),
            CtEntry::assured(IPPROTO_ICMPV6, v6(1), 77, v6(2), 0, 30),
            CtEntry::assured(IPPROTO_SCTP, v4(1), 5000, v4(2), 5001, 30),
            CtEntry::assured(IPPROTO_GRE, v4(1), 1, v4(2), 2, 30), // keys 1 and 2
            CtEntry::assured(IPPROTO_UDP, v4(1), 1, v4(2), 2, 30), // same ports, other protocol
            // Duplicates of the first two.
            CtEntry::assured(IPPROTO_TCP, v4(1), 40000, v4(2), 443, 120),
            CtEntry::assured(IPPROTO_TCP, v6(1), 40000, v6(2), 443, 120),
        ];
        let report = ct.create_batch(&mut entries.iter().copied()).unwrap();
        assert_eq!(report.created, 8, "{report:?}");
        assert_eq!(report.failed, vec![(libc::EEXIST, 2)]);
        assert!(report.first_error.as_deref().unwrap().starts_with("EEXIST"));

        let after = ct.stats().unwrap();
        assert_eq!(after.entries, 8);
        assert_eq!(after.max, before.max);

        // The socket keeps working in its namespace from another thread, and
        // the host's table was not touched.
        let from_thread = std::thread::spawn(move || ct.stats().unwrap().entries)
            .join()
            .unwrap();
        assert_eq!(from_thread, 8);

        let mut bad = entries[0];
        bad.dst = v6(9);
        let mut ct = CtSocket::open(Some(&ns)).unwrap();
        let e = ct
            .create_batch(&mut [entries[0], entries[5], bad].into_iter())
            .unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("conntrack entry #2"), "{text}");
        assert!(
            text.contains("2 entries before it were submitted, 0 created"),
            "{text}"
        );
    }

    /// Fills a fresh namespace's table to nf_conntrack_max (262,144 here)
    /// and checks the kernel's view of it. Run with --nocapture for timing.
    #[test]
    fn netlink_ctnetlink_fill_table_to_max() {
        if skip_unless_root("netlink_ctnetlink_fill_table_to_max") {
            return;
        }
        let ns = crate::netlink::rtnetlink::new_netns().unwrap();
        let mut ct = CtSocket::open(Some(&ns)).unwrap();
        let max = ct.stats().unwrap().max;
        assert_eq!(max, host_conntrack_max());
        if max == 0 || max > 1 << 20 {
            eprintln!("skipping fill: nf_conntrack_max = {max} (0 or too large for a unit test)");
            return;
        }
        let max32 = max as u32;

        let start = Instant::now();
        let report = ct.create_batch(&mut (0..max32).map(fill_entry)).unwrap();
        let took = start.elapsed();
        eprintln!(
            "ctnetlink fill: {} entries in {:.3} s ({:.0} entries/s)",
            report.created,
            took.as_secs_f64(),
            report.created as f64 / took.as_secs_f64()
        );
        assert_eq!(report.created, max, "{report:?}");
        assert!(report.failed.is_empty(), "{report:?}");

        let stats = ct.stats().unwrap();
        assert_eq!(stats.entries, report.created);
        assert_eq!(stats.max, host_conntrack_max());

        // Full, and every entry assured: nothing to early-drop, so ENOMEM.
        let one_more = ct
            .create_batch(&mut std::iter::once(fill_entry(max32)))
            .unwrap();
        assert_eq!(one_more.created, 0);
        assert_eq!(one_more.failed, vec![(libc::ENOMEM, 1)], "{one_more:?}");
        // A duplicate is found before allocation: EEXIST even when full.
        let dup = ct
            .create_batch(&mut std::iter::once(fill_entry(0)))
            .unwrap();
        assert_eq!(dup.failed, vec![(libc::EEXIST, 1)]);
        // Many failures in one go are all accounted for.
        let many = ct
            .create_batch(&mut (max32 + 1..max32 + 20_001).map(fill_entry))
            .unwrap();
        assert_eq!(many.created, 0);
        assert_eq!(many.failures(libc::ENOMEM), 20_000, "{many:?}");
        assert_eq!(ct.stats().unwrap().entries, max);
    }
}

#[cfg(test)]
mod dump_tests {
    use super::*;
    use crate::conntrack::{TCP_CONNTRACK_SYN_SENT, TCP_CONNTRACK_TIME_WAIT, tcp_state_name};
    use crate::netlink::{Msgs, NLM_F_CREATE, NLM_F_EXCL};
    use crate::netns::skip_unless_root;
    use ctrace_common::{IPPROTO_GRE, IPPROTO_SCTP, IPPROTO_UDP};
    use std::time::Instant;

    fn v4(n: u8) -> IpAddr {
        Ipv4Addr::new(10, 198, 0, n).into()
    }

    fn v6(n: u16) -> IpAddr {
        Ipv6Addr::new(0xfd98, 0, 0, 0, 0, 0, 0, n).into()
    }

    /// What the kernel sends for `e` in a dump, built with our own encoder
    /// plus the attributes only the kernel adds.
    fn kernel_msg(e: &CtEntry, extra: impl FnOnce(&mut MsgBuilder)) -> Vec<u8> {
        let mut m = MsgBuilder::new(ct_msg_type(IPCTNL_MSG_CT_NEW), 0);
        e.encode(&mut m);
        extra(&mut m);
        m.check().unwrap();
        m.as_bytes().to_vec()
    }

    fn parse(bytes: &[u8]) -> Result<Option<Entry>> {
        Entry::from_msg(&Msgs::new(bytes).next().unwrap().unwrap())
    }

    #[test]
    fn netlink_ctnetlink_dump_entry_decodes_every_field() {
        let e = CtEntry::assured(IPPROTO_TCP, v4(1), 40000, v4(2), 2380, 432_000);
        let bytes = kernel_msg(&e, |m| {
            m.be32(CTA_ID, 0xdead_beef)
                .be16(CTA_ZONE, 7)
                .be32(CTA_MARK, 0x42)
                .be32(CTA_USE, 1);
        });
        let d = parse(&bytes).unwrap().unwrap();
        assert_eq!(
            d,
            Entry {
                family: libc::AF_INET as u8,
                proto: IPPROTO_TCP,
                src: v4(1),
                dst: v4(2),
                sport: 40000,
                dport: 2380,
                tcp_state: Some(TCP_CONNTRACK_ESTABLISHED),
                status: IPS_ASSURED | IPS_SEEN_REPLY | IPS_CONFIRMED,
                timeout_secs: 432_000,
                id: 0xdead_beef,
                zone: 7,
                mark: 0x42,
            }
        );

        // IPv6 UDP, unreplied; no zone or mark attributes means 0.
        let mut u = CtEntry::assured(IPPROTO_UDP, v6(1), 5353, v6(2), 53, 30);
        u.status = 0;
        let d = parse(&kernel_msg(&u, |_| {})).unwrap().unwrap();
        assert_eq!(d.family, libc::AF_INET6 as u8);
        assert_eq!((d.src, d.dst, d.sport, d.dport), (v6(1), v6(2), 5353, 53));
        assert_eq!(d.status, IPS_CONFIRMED);
        assert_eq!((d.tcp_state, d.zone, d.mark, d.id), (None, 0, 0, 0));

        // ICMP: identifier in sport, type/code in dport.
        let i = CtEntry::assured(IPPROTO_ICMP, v4(1), 77, v4(2), 0, 30);
        let d = parse(&kernel_msg(&i, |_| {})).unwrap().unwrap();
        assert_eq!((d.sport, d.dport), (77, u16::from(ICMP_ECHO) << 8));
        let i = CtEntry::assured(IPPROTO_ICMPV6, v6(1), 78, v6(2), 0, 30);
        let d = parse(&kernel_msg(&i, |_| {})).unwrap().unwrap();
        assert_eq!(
            (d.sport, d.dport),
            (78, u16::from(ICMPV6_ECHO_REQUEST) << 8)
        );
    }

    /// A dumped UDP entry 10.0.0.1:1 -> 10.0.0.2:2 whose zone covers one
    /// direction only: CTA_TUPLE_ZONE in that direction's tuple.
    fn dump_with_tuple_zones(orig: Option<u16>, reply: Option<u16>) -> Entry {
        let mut m = MsgBuilder::new(ct_msg_type(IPCTNL_MSG_CT_NEW), 0);
        m.header(&nfgenmsg(libc::AF_INET as u8, 0));
        let tuple = |m: &mut MsgBuilder, zone: Option<u16>| {
            m.nested(CTA_TUPLE_IP, |m| {
                m.bytes(CTA_IP_V4_SRC, &[10, 0, 0, 1])
                    .bytes(CTA_IP_V4_DST, &[10, 0, 0, 2]);
            })
            .nested(CTA_TUPLE_PROTO, |m| {
                m.u8(CTA_PROTO_NUM, IPPROTO_UDP)
                    .be16(CTA_PROTO_SRC_PORT, 1)
                    .be16(CTA_PROTO_DST_PORT, 2);
            });
            if let Some(z) = zone {
                m.be16(CTA_TUPLE_ZONE, z);
            }
        };
        m.nested(CTA_TUPLE_ORIG, |m| tuple(m, orig));
        m.nested(CTA_TUPLE_REPLY, |m| tuple(m, reply));
        parse(m.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn netlink_ctnetlink_dump_entry_zone_of_the_original_direction() {
        let d = dump_with_tuple_zones(Some(9), None);
        assert_eq!(d.zone, 9);
    }

    #[test]
    fn netlink_ctnetlink_dump_entry_zone_of_the_reply_direction() {
        let d = dump_with_tuple_zones(None, Some(11));
        assert_eq!((d.zone, d.sport, d.dport), (11, 1, 2));
    }

    #[test]
    fn netlink_ctnetlink_dump_entry_rejects_malformed() {
        // No original tuple.
        let mut m = MsgBuilder::new(ct_msg_type(IPCTNL_MSG_CT_NEW), 0);
        m.header(&nfgenmsg(libc::AF_INET as u8, 0))
            .be32(CTA_STATUS, IPS_CONFIRMED);
        let err = parse(m.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("CTA_TUPLE_ORIG"), "{err}");
        // A wrong-size status.
        let e = CtEntry::assured(IPPROTO_TCP, v4(1), 1, v4(2), 2, 3);
        let bytes = kernel_msg(&e, |m| {
            m.u16(CTA_ID, 1);
        });
        assert!(parse(&bytes).is_err());
        // An IPv6 address of the wrong size.
        let mut m = MsgBuilder::new(ct_msg_type(IPCTNL_MSG_CT_NEW), 0);
        m.header(&nfgenmsg(libc::AF_INET6 as u8, 0));
        m.nested(CTA_TUPLE_ORIG, |m| {
            m.nested(CTA_TUPLE_IP, |m| {
                m.bytes(CTA_IP_V6_SRC, &[0; 4])
                    .bytes(CTA_IP_V6_DST, &[0; 16]);
            });
        });
        assert!(parse(m.as_bytes()).is_err());
        // Another family is skipped, not an error.
        let mut m = MsgBuilder::new(ct_msg_type(IPCTNL_MSG_CT_NEW), 0);
        m.header(&nfgenmsg(7, 0));
        assert_eq!(parse(m.as_bytes()).unwrap(), None);
    }

    #[test]
    fn netlink_ctnetlink_tcp_state_names() {
        assert_eq!(tcp_state_name(TCP_CONNTRACK_ESTABLISHED), "ESTABLISHED");
        assert_eq!(tcp_state_name(TCP_CONNTRACK_TIME_WAIT), "TIME_WAIT");
        assert_eq!(tcp_state_name(TCP_CONNTRACK_SYN_SENT2), "SYN_SENT2");
        assert_eq!(tcp_state_name(200), "UNKNOWN");
    }

    /// Entries created over ctnetlink come back from a dump, IPv4 and IPv6
    /// in one AF_UNSPEC dump, with every field as created.
    #[test]
    fn netlink_ctnetlink_dump_round_trips_created_entries() {
        if skip_unless_root("netlink_ctnetlink_dump_round_trips_created_entries") {
            return;
        }
        let ns = crate::netlink::rtnetlink::new_netns().unwrap();
        let mut ct = CtSocket::open(Some(&ns)).unwrap();
        assert_eq!(ct.dump(&mut |_| panic!("fresh table")).unwrap(), 0);

        let mut dns = CtEntry::assured(IPPROTO_UDP, v4(1), 5353, v4(2), 53, 30);
        dns.status = 0; // unreplied: IPS_CONFIRMED only
        let mut syn = CtEntry::assured(IPPROTO_TCP, v6(1), 40001, v6(2), 9999, 120);
        syn.status = 0;
        syn.tcp_state = Some(TCP_CONNTRACK_SYN_SENT);
        let created = [
            CtEntry::assured(IPPROTO_TCP, v4(1), 40000, v4(2), 2380, 432_000),
            syn,
            dns,
            CtEntry::assured(IPPROTO_ICMP, v4(1), 77, v4(2), 0, 30),
            CtEntry::assured(IPPROTO_ICMPV6, v6(1), 78, v6(2), 0, 30),
            CtEntry::assured(IPPROTO_SCTP, v6(1), 5000, v6(2), 5001, 30),
            CtEntry::assured(IPPROTO_GRE, v4(1), 1, v4(2), 2, 30),
        ];
        let report = ct.create_batch(&mut created.iter().copied()).unwrap();
        assert_eq!(report.created, created.len() as u64, "{report:?}");

        // One entry in zone 7 with a mark, which CtEntry cannot express.
        let zoned = CtEntry::assured(IPPROTO_UDP, v4(3), 1000, v4(4), 53, 30);
        let mut m = MsgBuilder::new(ct_msg_type(IPCTNL_MSG_CT_NEW), NLM_F_CREATE | NLM_F_EXCL);
        zoned.encode(&mut m);
        m.be16(CTA_ZONE, 7).be32(CTA_MARK, 0x42);
        ct.socket().request_ack(m).unwrap();
        // And one whose zone covers the reply direction only.
        let reply_zoned = CtEntry::assured(IPPROTO_UDP, v4(5), 1001, v4(6), 53, 30);
        let mut m = MsgBuilder::new(ct_msg_type(IPCTNL_MSG_CT_NEW), NLM_F_CREATE | NLM_F_EXCL);
        m.header(&nfgenmsg(reply_zoned.family, 0));
        reply_zoned.tuple(&mut m, CTA_TUPLE_ORIG, false, None);
        reply_zoned.tuple(&mut m, CTA_TUPLE_REPLY, true, Some(11));
        m.be32(CTA_TIMEOUT, reply_zoned.timeout_secs)
            .be32(CTA_STATUS, reply_zoned.status | IPS_CONFIRMED);
        ct.socket().request_ack(m).unwrap();

        let mut dumped = Vec::new();
        let n = ct.dump(&mut |e| dumped.push(*e)).unwrap();
        assert_eq!(n, created.len() as u64 + 2);
        assert_eq!(dumped.len() as u64, n);
        // The kernel side keys entries by the zone's id whatever its
        // direction; the dump and procfs must read it alike.
        let by_procfs = crate::conntrack::procfs::ProcConntrack::open(Some(&ns))
            .and_then(|mut p| {
                let mut zone = None;
                p.dump(&mut |e| {
                    if e.sport == reply_zoned.sport && e.src == reply_zoned.src {
                        zone = Some(e.zone);
                    }
                })?;
                Ok(zone)
            })
            .unwrap();
        let by_dump = dumped
            .iter()
            .find(|d| d.sport == reply_zoned.sport && d.src == reply_zoned.src)
            .map(|d| d.zone);
        assert_eq!((by_dump, by_procfs), (Some(11), Some(11)));
        for c in created.iter().chain([&zoned]) {
            let d = dumped
                .iter()
                .find(|d| d.proto == c.proto && d.src == c.src && d.sport == c.sport)
                .unwrap_or_else(|| panic!("{c:?} not in the dump: {dumped:#?}"));
            assert_eq!(d.family, c.family, "{d:?}");
            assert_eq!(d.dst, c.dst, "{d:?}");
            let dport = match c.proto {
                IPPROTO_ICMP => u16::from(ICMP_ECHO) << 8,
                IPPROTO_ICMPV6 => u16::from(ICMPV6_ECHO_REQUEST) << 8,
                _ => c.dport,
            };
            assert_eq!(d.dport, dport, "{d:?}");
            assert_eq!(d.tcp_state, c.tcp_state, "{d:?}");
            assert_eq!(
                d.status & (IPS_ASSURED | IPS_SEEN_REPLY | IPS_CONFIRMED),
                c.status | IPS_CONFIRMED,
                "{d:?}"
            );
            assert!(
                d.timeout_secs <= c.timeout_secs && d.timeout_secs + 5 >= c.timeout_secs,
                "{d:?} vs {c:?}"
            );
            assert_ne!(d.id, 0, "{d:?}");
            let (zone, mark) = if c == &zoned { (7, 0x42) } else { (0, 0) };
            assert_eq!((d.zone, d.mark), (zone, mark), "{d:?}");
        }
        // Entry ids are distinct.
        let mut ids: Vec<u32> = dumped.iter().map(|d| d.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), dumped.len());
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

    /// (user, system) CPU seconds of the calling thread.
    fn thread_cpu() -> (f64, f64) {
        // SAFETY: zeroed rusage is a valid out-parameter.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: ru is live and of the right type.
        assert_eq!(
            unsafe { libc::getrusage(libc::RUSAGE_THREAD, &raw mut ru) },
            0
        );
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        (secs(ru.ru_utime), secs(ru.ru_stime))
    }

    /// Dumps a table filled to nf_conntrack_max (262,144 here) without
    /// keeping the entries. Run alone with --nocapture for the timing and
    /// the peak-RSS delta (other tests running beside it share the process).
    #[test]
    fn netlink_ctnetlink_dump_streams_a_full_table() {
        if skip_unless_root("netlink_ctnetlink_dump_streams_a_full_table") {
            return;
        }
        let ns = crate::netlink::rtnetlink::new_netns().unwrap();
        let mut ct = CtSocket::open(Some(&ns)).unwrap();
        let max = ct.stats().unwrap().max;
        if max == 0 || max > 1 << 20 {
            eprintln!("skipping dump: nf_conntrack_max = {max} (0 or too large for a unit test)");
            return;
        }
        // Half TCP, half UDP.
        let fill = |i: u32| {
            let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 196, 0, 0)) + (i >> 4));
            let tcp = i.is_multiple_of(2);
            CtEntry::assured(
                if tcp { IPPROTO_TCP } else { IPPROTO_UDP },
                src.into(),
                1024 + (i & 15) as u16,
                v4(1),
                53,
                3600,
            )
        };
        let report = ct.create_batch(&mut (0..max as u32).map(fill)).unwrap();
        assert_eq!(report.created, max, "{report:?}");

        // Reset the peak so VmHWM measures this dump only.
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
        let (rss_before, _) = rss_kib();
        let cpu_before = thread_cpu();
        let start = Instant::now();
        let (mut tcp, mut udp, mut assured) = (0u64, 0u64, 0u64);
        let n = ct
            .dump(&mut |e| {
                match e.proto {
                    IPPROTO_TCP => tcp += 1,
                    IPPROTO_UDP => udp += 1,
                    _ => {}
                }
                assured += u64::from(e.status & IPS_ASSURED != 0);
            })
            .unwrap();
        let took = start.elapsed();
        let cpu_after = thread_cpu();
        let (_, peak) = rss_kib();
        eprintln!(
            "ctnetlink dump: {n} entries in {:.3} s ({:.0} entries/s; CPU user {:.3} s, \
             system {:.3} s), peak RSS +{} KiB",
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64(),
            cpu_after.0 - cpu_before.0,
            cpu_after.1 - cpu_before.1,
            peak.saturating_sub(rss_before)
        );
        assert_eq!(n, max);
        assert_eq!((tcp, udp, assured), (max / 2, max / 2, max));
    }
}

/// What an announcement says happened to an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Announced {
    New,
    Destroyed,
}

/// Entries of one namespace as ctnetlink announces them (its NEW and
/// DESTROY event groups), without dumping: what tiers without insert and
/// delete events learn new entries, and occupancy between dumps, from.
pub struct NewEntries {
    sock: NlSocket,
    /// Times the kernel dropped announcements (ENOBUFS): a sample then.
    pub overruns: u64,
    /// Messages that did not decode, skipped.
    pub undecodable: u64,
}

impl NewEntries {
    pub fn subscribe(ns: Option<&NetNs>) -> Result<NewEntries> {
        let sock = NlSocket::open(NETLINK_NETFILTER, ns)?;
        let mut feed = NewEntries {
            sock,
            overruns: 0,
            undecodable: 0,
        };
        feed.listen(true)?;
        Ok(feed)
    }

    /// Joins (`on`) or leaves both groups. While nobody in the namespace
    /// listens, the kernel builds no announcement, and with
    /// `nf_conntrack_events=2` (the default) new entries get no event
    /// cache either; what was queued stays readable.
    pub fn listen(&mut self, on: bool) -> Result<()> {
        for group in [NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY] {
            if on {
                self.sock.join_group(group)?;
            } else {
                self.sock.leave_group(group)?;
            }
        }
        Ok(())
    }

    /// Hands every entry announced since the last call to `f`; at most
    /// `max` messages, whatever they hold, so a storm cannot hold the
    /// caller (the rest wait, or overrun and are counted). A message that
    /// does not decode is skipped and counted, never a reason to stop.
    pub fn drain(&mut self, max: usize, f: &mut dyn FnMut(Announced, &Entry)) -> Result<usize> {
        let (mut read, mut entries) = (0, 0);
        while read < max {
            match self.sock.next_notice()? {
                Notice::Empty => break,
                Notice::Overrun => self.overruns += 1,
                Notice::Foreign => read += 1,
                Notice::Messages(msgs) => {
                    for m in msgs {
                        read += 1;
                        let Ok(m) = m else {
                            self.undecodable += 1;
                            break;
                        };
                        let what = if m.ty == ct_msg_type(IPCTNL_MSG_CT_NEW) {
                            Announced::New
                        } else if m.ty == ct_msg_type(IPCTNL_MSG_CT_DELETE) {
                            Announced::Destroyed
                        } else {
                            continue;
                        };
                        match Entry::from_msg(&m) {
                            Ok(Some(e)) => {
                                entries += 1;
                                f(what, &e);
                            }
                            Ok(None) => {}
                            Err(_) => self.undecodable += 1,
                        }
                    }
                }
            }
        }
        Ok(entries)
    }
}
