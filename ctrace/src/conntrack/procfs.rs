//! Conntrack through procfs, for kernels without ctnetlink.
//!
//! Stock OpenWrt builds nf_conntrack with NF_CONNTRACK_PROCFS but often
//! without nf_conntrack_netlink (a separate package). There the same facts
//! come from text files, all of them per network namespace:
//!
//! - `/proc/net/stat/nf_conntrack`: a header line naming the columns, then
//!   one row of hex numbers per possible CPU (see [`parse_stat`]);
//! - `/proc/sys/net/netfilter/nf_conntrack_count` and `nf_conntrack_max`;
//! - `/proc/net/nf_conntrack`: one line per entry (see [`parse_line`]).
//!
//! `/proc/net` is a link to `/proc/self/net`, and `self` is the thread
//! group leader, not the calling thread: a thread that entered another
//! namespace must open `/proc/thread-self/net/...` to see that namespace's
//! files. `/proc/sys/net` resolves against the opening thread's namespace.
//! An open file stays bound to the namespace it was opened in, so
//! [`ProcConntrack`] opens everything once, from a thread inside, and
//! re-reads from offset 0 afterwards.
use std::{
    fs::File,
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context, Result, bail};

use super::{Entry, IPS_ASSURED, IPS_CONFIRMED, IPS_OFFLOAD, IPS_SEEN_REPLY, Stats};
use crate::netns::NetNs;
use ctrace_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP};

pub const STAT_FILE: &str = "/proc/thread-self/net/stat/nf_conntrack";
pub const TABLE_FILE: &str = "/proc/thread-self/net/nf_conntrack";
pub const COUNT_FILE: &str = "/proc/sys/net/netfilter/nf_conntrack_count";
pub const MAX_FILE: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

/// IPS_HW_OFFLOAD (bit 15): "[HW_OFFLOAD]" on the line.
pub const IPS_HW_OFFLOAD: u32 = 1 << 15;

/// Longest `/proc/net/nf_conntrack` line accepted. Real lines are under
/// 400 bytes even with accounting, a security context and zones; a longer
/// one is skipped as malformed, so a bad file cannot make the reader buffer
/// without bound.
pub const MAX_LINE: usize = 4096;

/// Which `Stats` field a statistics column fills.
///
/// Column names differ by kernel version (`searched` and `delete_list`
/// were dropped, `clashres` and `chainlength` came later), so columns are
/// found by name, never by position. Columns that only procfs has are not
/// kept: `searched`, `new`, `ignore`, `delete`, `delete_list` (zero or
/// gone on current kernels) and the expectation counters `expect_new`,
/// `expect_create`, `expect_delete` (ctnetlink reports those in a
/// separate message that ctrace does not read either). The one field only
/// ctnetlink has is `max`, which procfs gives as the `nf_conntrack_max`
/// sysctl instead.
fn stat_field<'a>(s: &'a mut Stats, column: &str) -> Option<&'a mut u64> {
    Some(match column {
        "found" => &mut s.found,
        "invalid" => &mut s.invalid,
        "insert" => &mut s.insert,
        "insert_failed" => &mut s.insert_failed,
        "drop" => &mut s.drop,
        "early_drop" => &mut s.early_drop,
        // ctnetlink's CTA_STATS_ERROR is the same counter (st->error).
        "icmp_error" => &mut s.error,
        "search_restart" => &mut s.search_restart,
        "clashres" => &mut s.clash_resolve,
        "chainlength" => &mut s.chaintoolong,
        _ => return None,
    })
}

/// Parses `/proc/net/stat/nf_conntrack` into the statistics ctnetlink
/// gives: counters summed over the per-CPU rows. `entries` is the
/// namespace's count, printed in every row rather than per CPU, so it is
/// taken from the first row; `max` is left 0 (see [`ProcConntrack::stats`]).
pub fn parse_stat(text: &[u8]) -> Result<Stats> {
    let text = std::str::from_utf8(text).context("conntrack statistics are not text")?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .context("conntrack statistics are empty")?
        .split_ascii_whitespace()
        .collect();
    let mut probe = Stats::default();
    if !header
        .iter()
        .any(|c| *c == "entries" || stat_field(&mut probe, c).is_some())
    {
        bail!("conntrack statistics header names no known column: {header:?}");
    }
    let mut s = Stats::default();
    let mut rows = 0usize;
    for (i, line) in lines.enumerate() {
        let values: Vec<&str> = line.split_ascii_whitespace().collect();
        if values.len() != header.len() {
            bail!(
                "conntrack statistics row {} has {} columns, the header {}",
                i + 1,
                values.len(),
                header.len()
            );
        }
        for (column, value) in header.iter().zip(&values) {
            let v = u64::from_str_radix(value, 16).with_context(|| {
                format!(
                    "conntrack statistics row {}, column {column}: {value:?}",
                    i + 1
                )
            })?;
            if *column == "entries" {
                if rows == 0 {
                    s.entries = v;
                }
            } else if let Some(field) = stat_field(&mut s, column) {
                *field = field.saturating_add(v);
            }
        }
        rows += 1;
    }
    if rows == 0 {
        bail!("conntrack statistics have a header but no per-CPU rows");
    }
    Ok(s)
}

/// A sysctl's single number.
pub fn parse_number(text: &[u8]) -> Result<u64> {
    let t = std::str::from_utf8(text)
        .ok()
        .map(str::trim)
        .context("sysctl value is not text")?;
    t.parse()
        .with_context(|| format!("sysctl value {t:?} is not a number"))
}

/// conntrack's TCP state names (`tcp_conntrack_names`), in TCP_CONNTRACK_* order.
const TCP_STATES: [&str; 10] = [
    "NONE",
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "TIME_WAIT",
    "CLOSE",
    "SYN_SENT2",
];

fn parse_u16(key: &str, v: &str) -> Result<u16> {
    v.parse()
        .with_context(|| format!("{key}={v:?} is not a 16-bit number"))
}

fn parse_u8(key: &str, v: &str) -> Result<u8> {
    v.parse()
        .with_context(|| format!("{key}={v:?} is not an 8-bit number"))
}

/// GRE keys print as `0x%x` of a 16-bit value.
fn parse_hex_u16(key: &str, v: &str) -> Result<u16> {
    let digits = v
        .strip_prefix("0x")
        .with_context(|| format!("{key}={v:?} lacks 0x"))?;
    u16::from_str_radix(digits, 16).with_context(|| format!("{key}={v:?} is not a 16-bit number"))
}

fn parse_addr(key: &str, v: &str, v4: bool) -> Result<IpAddr> {
    // %pI6 prints all eight groups with leading zeros, which the standard
    // parser accepts like any other form.
    let a = if v4 {
        IpAddr::V4(
            v.parse::<Ipv4Addr>()
                .with_context(|| format!("{key}={v:?} is not an IPv4 address"))?,
        )
    } else {
        IpAddr::V6(
            v.parse::<Ipv6Addr>()
                .with_context(|| format!("{key}={v:?} is not an IPv6 address"))?,
        )
    };
    Ok(a)
}

/// Parses one line of `/proc/net/nf_conntrack` (the kernel's
/// `ct_seq_show`) into the entry a ctnetlink dump gives for it:
///
/// ```text
/// ipv4     2 tcp      6 431999 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=40000 dport=22
///     src=10.0.0.2 dst=10.0.0.1 sport=22 dport=40000 [ASSURED] mark=0 zone=3 use=2
/// ```
///
/// (one line). After the family and protocol come: the seconds left (absent
/// for offloaded entries), the protocol's state (TCP, SCTP, DCCP), the
/// original tuple, `zone-orig=`, `packets= bytes=` with accounting on,
/// `[UNREPLIED]`, the reply tuple, `zone-reply=`, accounting again,
/// `[HW_OFFLOAD]`, `[OFFLOAD]` or `[ASSURED]`, then `mark=`, `secctx=`,
/// `zone=`, `delta-time=` and `use=`, each only where configured and set.
///
/// What procfs does not show, and so differs from a ctnetlink dump: the
/// entry id (0 here), the status bits beyond IPS_CONFIRMED (every listed
/// entry is in the table), IPS_SEEN_REPLY, IPS_ASSURED and the offload
/// bits, and for offloaded entries their timeout (0, as ctnetlink reports
/// none either), their TCP state (None) and whether they are assured (the
/// kernel prints `[OFFLOAD]` instead of `[ASSURED]`). As in the dump, ICMP
/// and ICMPv6 entries carry the echo identifier in `sport` and `type << 8
/// | code` in `dport`, GRE entries their keys, and protocols without ports
/// zeros. A zone that applies to one direction only (`zone-orig=`,
/// `zone-reply=`) is the entry's zone, as in the dump.
///
/// `Ok(None)` for families other than IPv4 and IPv6; a line that does not
/// have this shape is an error.
pub fn parse_line(line: &[u8]) -> Result<Option<Entry>> {
    let line = std::str::from_utf8(line).context("conntrack line is not text")?;
    let mut tokens = line.split_ascii_whitespace();
    let mut next = |what: &str| {
        tokens
            .next()
            .with_context(|| format!("conntrack line ends before its {what}: {line:?}"))
    };
    next("family name")?;
    let family = next("family number")?;
    let v4 = match family {
        "2" => true,
        "10" => false,
        f => {
            f.parse::<u16>()
                .with_context(|| format!("conntrack family {f:?} is not a number"))?;
            return Ok(None);
        }
    };
    next("protocol name")?;
    let proto = next("protocol number")?;
    let proto: u8 = proto
        .parse()
        .with_context(|| format!("conntrack protocol {proto:?} is not an 8-bit number"))?;

    let mut e = Entry {
        family: if v4 {
            libc::AF_INET as u8
        } else {
            libc::AF_INET6 as u8
        },
        proto,
        src: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        sport: 0,
        dport: 0,
        tcp_state: None,
        status: IPS_CONFIRMED | IPS_SEEN_REPLY,
        timeout_secs: 0,
        id: 0,
        zone: 0,
        mark: 0,
    };
    let (mut src, mut dst) = (None, None);
    let (mut icmp_type, mut icmp_code) = (0u8, 0u8);
    let (mut zone, mut zone_orig, mut zone_reply) = (None, None, None);
    // The reply tuple starts at the second `src=`: everything of the tuple
    // is taken from the original direction only.
    let mut reply = false;
    let mut bare = 0usize;
    for t in tokens {
        if let Some(flag) = t.strip_prefix('[') {
            match flag.strip_suffix(']') {
                Some("UNREPLIED") => e.status &= !IPS_SEEN_REPLY,
                Some("ASSURED") => e.status |= IPS_ASSURED,
                Some("OFFLOAD") => e.status |= IPS_OFFLOAD,
                Some("HW_OFFLOAD") => e.status |= IPS_OFFLOAD | IPS_HW_OFFLOAD,
                // Flags a later kernel may add say nothing we use.
                _ => {}
            }
            continue;
        }
        let Some((key, value)) = t.split_once('=') else {
            // Before the tuple: the timeout (a number), then the state.
            if src.is_some() {
                bail!("conntrack line has a stray word {t:?} after its tuple: {line:?}");
            }
            bare += 1;
            if bare == 1 && t.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
                // %ld; never negative on current kernels, clamped if so.
                let secs: i64 = t
                    .parse()
                    .with_context(|| format!("conntrack timeout {t:?} is not a number"))?;
                e.timeout_secs = u32::try_from(secs.max(0)).unwrap_or(u32::MAX);
            } else if proto == IPPROTO_TCP {
                let state = TCP_STATES
                    .iter()
                    .position(|s| *s == t)
                    .with_context(|| format!("unknown TCP state {t:?}: {line:?}"))?;
                e.tcp_state = Some(state as u8);
            }
            // Another protocol's state (SCTP, DCCP) has no field here.
            continue;
        };
        if key == "src" {
            if src.is_some() {
                reply = true;
            } else {
                src = Some(parse_addr(key, value, v4)?);
            }
            continue;
        }
        match key {
            "zone" => zone = Some(parse_u16(key, value)?),
            "zone-orig" => zone_orig = Some(parse_u16(key, value)?),
            "zone-reply" => zone_reply = Some(parse_u16(key, value)?),
            "mark" => {
                e.mark = value
                    .parse()
                    .with_context(|| format!("mark={value:?} is not a 32-bit number"))?
            }
            _ if reply => {}
            "dst" => dst = Some(parse_addr(key, value, v4)?),
            "sport" => e.sport = parse_u16(key, value)?,
            "dport" => e.dport = parse_u16(key, value)?,
            "id" => e.sport = parse_u16(key, value)?,
            "type" => icmp_type = parse_u8(key, value)?,
            "code" => icmp_code = parse_u8(key, value)?,
            "srckey" => e.sport = parse_hex_u16(key, value)?,
            "dstkey" => e.dport = parse_hex_u16(key, value)?,
            // packets, bytes, secctx, delta-time, use, and
            // whatever a later kernel adds.
            _ => {}
        }
    }
    match (src, dst) {
        (Some(s), Some(d)) => {
            e.src = s;
            e.dst = d;
        }
        _ => bail!("conntrack line lacks a source or destination address: {line:?}"),
    }
    if matches!(proto, IPPROTO_ICMP | IPPROTO_ICMPV6) {
        e.dport = u16::from_be_bytes([icmp_type, icmp_code]);
    }
    // As ctnetlink: `zone=` when the zone covers both directions,
    // `zone-orig=` or `zone-reply=` when it covers that direction only.
    e.zone = zone.or(zone_orig).or(zone_reply).unwrap_or(0);
    Ok(Some(e))
}

/// What a pass over `/proc/net/nf_conntrack` found besides the entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LineReport {
    /// Entries handed on.
    pub entries: u64,
    /// Lines of families other than IPv4/IPv6.
    pub other_families: u64,
    /// Lines skipped as malformed or longer than [`MAX_LINE`].
    pub malformed: u64,
    /// Why the first of them was skipped.
    pub first_error: Option<String>,
}

/// Streams `/proc/net/nf_conntrack`-formatted lines from `input`, calling
/// `f` once per entry. Memory is one line buffer of at most [`MAX_LINE`]
/// bytes whatever the table size. A malformed line is skipped and counted,
/// not fatal: one line a later kernel prints differently must not cost the
/// whole table. Read errors are errors.
pub fn for_each_entry(input: &mut dyn BufRead, f: &mut dyn FnMut(&Entry)) -> Result<LineReport> {
    let mut report = LineReport::default();
    let mut line: Vec<u8> = Vec::with_capacity(512);
    // True while skipping the rest of an over-long line.
    let mut overlong = false;
    loop {
        let buf = match input.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading conntrack entries"),
        };
        if buf.is_empty() {
            break;
        }
        let (chunk, consumed, ends) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        if !overlong {
            if line.len() + chunk.len() > MAX_LINE {
                overlong = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        input.consume(consumed);
        if ends {
            finish_line(&mut line, &mut overlong, &mut report, f);
        }
    }
    if !line.is_empty() || overlong {
        finish_line(&mut line, &mut overlong, &mut report, f);
    }
    Ok(report)
}

fn finish_line(
    line: &mut Vec<u8>,
    overlong: &mut bool,
    report: &mut LineReport,
    f: &mut dyn FnMut(&Entry),
) {
    if std::mem::take(overlong) {
        report.malformed += 1;
        report
            .first_error
            .get_or_insert_with(|| format!("conntrack line longer than {MAX_LINE} bytes"));
    } else if !line.iter().all(u8::is_ascii_whitespace) {
        match parse_line(line) {
            Ok(Some(e)) => {
                report.entries += 1;
                f(&e);
            }
            Ok(None) => report.other_families += 1,
            Err(e) => {
                report.malformed += 1;
                report.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    line.clear();
}

/// Reads a whole small file from its start into `buf`.
fn reread(file: &mut File, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_end(buf)?;
    Ok(())
}

/// One namespace's conntrack files, opened from inside it.
#[derive(Debug)]
pub struct ProcConntrack {
    inode: u64,
    stat: File,
    table: Option<File>,
    count: Option<File>,
    max: Option<File>,
    buf: Vec<u8>,
}

impl super::TableRead for ProcConntrack {
    fn source(&self) -> super::TableSource {
        super::TableSource::Procfs
    }
    fn stats(&mut self) -> Result<Stats> {
        ProcConntrack::stats(self)
    }
    fn dump(&mut self, f: &mut dyn FnMut(&Entry)) -> Result<u64> {
        ProcConntrack::dump(self, f)
    }
}

impl ProcConntrack {
    /// Opens the files of `ns` (the calling thread's for None). The
    /// statistics file must exist; the table and the sysctls are used when
    /// they can be opened (the count then comes from the statistics, the
    /// limit from this process's own namespace: it is global anyway).
    pub fn open(ns: Option<&NetNs>) -> Result<ProcConntrack> {
        let open_all = || -> Result<ProcConntrack> {
            let opt = |p: &str| match File::open(p) {
                Ok(f) => Some(f),
                Err(e) => {
                    log::debug!("{p}: {e}");
                    None
                }
            };
            Ok(ProcConntrack {
                inode: NetNs::current()?.inode(),
                stat: File::open(STAT_FILE).with_context(|| {
                    format!("opening {STAT_FILE} (needs nf_conntrack with NF_CONNTRACK_PROCFS)")
                })?,
                table: opt(TABLE_FILE),
                count: opt(COUNT_FILE),
                max: opt(MAX_FILE),
                buf: Vec::with_capacity(4096),
            })
        };
        let mut p = match ns {
            Some(ns) => ns.run(open_all)??,
            None => open_all()?,
        };
        if p.max.is_none() {
            p.max = File::open(MAX_FILE).ok();
        }
        // Fail now, named, rather than on the first sample.
        p.stats()?;
        Ok(p)
    }

    /// The namespace the files belong to.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// The same statistics `CtSocket::stats` (ctnetlink)
    /// gives (see [`parse_stat`] for which columns map where).
    pub fn stats(&mut self) -> Result<Stats> {
        let inode = self.inode;
        reread(&mut self.stat, &mut self.buf)
            .with_context(|| format!("reading {STAT_FILE} of netns {inode}"))?;
        let mut s =
            parse_stat(&self.buf).with_context(|| format!("{STAT_FILE} of netns {inode}"))?;
        if let Some(f) = self.count.as_mut() {
            reread(f, &mut self.buf)
                .with_context(|| format!("reading {COUNT_FILE} of netns {inode}"))?;
            s.entries = parse_number(&self.buf).context(COUNT_FILE)?;
        }
        if let Some(f) = self.max.as_mut() {
            reread(f, &mut self.buf)
                .with_context(|| format!("reading {MAX_FILE} of netns {inode}"))?;
            s.max = parse_number(&self.buf).context(MAX_FILE)?;
        }
        Ok(s)
    }

    /// Streams the namespace's table, like
    /// `CtSocket::dump` (ctnetlink): `f` once per entry,
    /// returns how many. The kernel walks its hash table without a
    /// snapshot, as for a dump, so entries that come or go meanwhile may or
    /// may not be listed.
    pub fn dump(&mut self, f: &mut dyn FnMut(&Entry)) -> Result<u64> {
        let inode = self.inode;
        let file = self
            .table
            .as_mut()
            .with_context(|| format!("{TABLE_FILE} of netns {inode} could not be opened"))?;
        file.seek(SeekFrom::Start(0))
            .with_context(|| format!("rewinding {TABLE_FILE} of netns {inode}"))?;
        // 64 KiB: a few hundred lines per read() of a seq_file.
        let mut input = BufReader::with_capacity(64 << 10, &*file);
        let report = for_each_entry(&mut input, f)
            .with_context(|| format!("{TABLE_FILE} of netns {inode}"))?;
        if report.malformed > 0 {
            log::warn!(
                "{TABLE_FILE} of netns {inode}: skipped {} malformed lines, the first: {}",
                report.malformed,
                report.first_error.as_deref().unwrap_or("?")
            );
        }
        Ok(report.entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::{TCP_CONNTRACK_ESTABLISHED, TCP_CONNTRACK_SYN_SENT};
    use ctrace_common::{IPPROTO_GRE, IPPROTO_SCTP, IPPROTO_UDP};
    use std::{path::Path, time::Instant};

    /// This host's 6.18 header and an older one (4.x: `searched`,
    /// `delete_list`), two CPUs each.
    const STAT_6_18: &str = "\
entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
00000014  00000001 00000002 00000000 00000003 00000000 00000000 00000000 00000004 00000005 00000006 00000007 00000008  00000000 00000000 00000000 00000009
00000014  00000010 00000020 00000000 00000030 00000000 00000000 00000001 00000040 00000050 00000060 00000070 00000080  00000001 00000002 00000003 00000090
";
    const STAT_4_19: &str = "\
entries  searched found new invalid ignore delete delete_list insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
0000002a  00000000 00000001 00000000 00000002 00000000 00000000 00000000 00000003 00000000 0000ffff 00000000 00000000  00000000 00000000 00000000 00000000
";

    #[test]
    fn procfs_stat_sums_cpus_by_column_name() {
        let s = parse_stat(STAT_6_18.as_bytes()).unwrap();
        assert_eq!(
            s,
            Stats {
                entries: 0x14,
                max: 0,
                found: 0x22,
                invalid: 0x33,
                insert: 0x44,
                insert_failed: 0x55,
                drop: 0x66,
                early_drop: 0x77,
                error: 0x88,
                search_restart: 0x99,
                clash_resolve: 0x11,
                chaintoolong: 1,
            }
        );
        let old = parse_stat(STAT_4_19.as_bytes()).unwrap();
        assert_eq!((old.entries, old.drop, old.found), (42, 0xffff, 1));
        assert_eq!((old.clash_resolve, old.chaintoolong), (0, 0));
    }

    #[test]
    fn procfs_stat_rejects_what_it_cannot_read() {
        for (bad, why) in [
            ("", "empty"),
            ("entries drop\n", "no per-CPU rows"),
            ("a b c\n1 2 3\n", "no known column"),
            ("entries drop\n1\n", "1 columns"),
            ("entries drop\n1 zz\n", "column drop"),
            ("entries drop\n1 11111111111111111\n", "column drop"),
        ] {
            let e = format!("{:#}", parse_stat(bad.as_bytes()).unwrap_err());
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(parse_stat(b"\xff\n").is_err());
        assert_eq!(parse_number(b"262144\n").unwrap(), 262_144);
        assert!(parse_number(b"x").is_err());
    }

    fn one(line: &str) -> Entry {
        parse_line(line.as_bytes())
            .unwrap_or_else(|e| panic!("{line}: {e:#}"))
            .unwrap_or_else(|| panic!("{line}: not an entry"))
    }

    #[test]
    fn procfs_lines_of_each_kind() {
        let tcp = one(
            "ipv4     2 tcp      6 431999 ESTABLISHED src=10.20.0.1 dst=10.20.0.200 sport=1024 \
             dport=2380 src=10.20.0.200 dst=10.20.0.1 sport=2380 dport=1024 [ASSURED] mark=7 \
             zone=3 use=2",
        );
        assert_eq!(tcp.family, libc::AF_INET as u8);
        assert_eq!(tcp.proto, IPPROTO_TCP);
        assert_eq!(tcp.src, "10.20.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(tcp.dst, "10.20.0.200".parse::<IpAddr>().unwrap());
        assert_eq!((tcp.sport, tcp.dport), (1024, 2380));
        assert_eq!(tcp.tcp_state, Some(TCP_CONNTRACK_ESTABLISHED));
        assert_eq!(tcp.status, IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED);
        assert_eq!((tcp.timeout_secs, tcp.mark, tcp.zone), (431_999, 7, 3));

        let udp = one(
            "ipv4     2 udp      17 29 src=10.10.0.1 dst=10.96.0.10 sport=1025 dport=53 \
             packets=1 bytes=60 [UNREPLIED] src=10.96.0.10 dst=10.10.0.1 sport=53 dport=1025 \
             packets=0 bytes=0 mark=0 secctx=system_u:object_r:unlabeled_t:s0 delta-time=3 use=1",
        );
        assert_eq!((udp.proto, udp.sport, udp.dport), (IPPROTO_UDP, 1025, 53));
        assert_eq!(udp.status, IPS_CONFIRMED, "unreplied, not assured");
        assert_eq!((udp.timeout_secs, udp.tcp_state), (29, None));

        let icmp = one(
            "ipv4     2 icmp     1 29 src=10.0.0.1 dst=10.0.0.2 type=8 code=0 id=4660 \
             src=10.0.0.2 dst=10.0.0.1 type=0 code=0 id=4660 mark=0 use=1",
        );
        assert_eq!(
            (icmp.sport, icmp.dport),
            (4660, 0x0800),
            "id; type << 8 | code"
        );

        // %pI6 prints every group in full.
        let v6 = one(
            "ipv6     10 tcp      6 299 SYN_SENT src=fd00:0001:0002:0003:0000:0000:0000:0001 \
             dst=fd00:0009:0000:0000:0000:0000:0000:0001 sport=1025 dport=9999 [UNREPLIED] \
             src=fd00:0009:0000:0000:0000:0000:0000:0001 dst=fd00:0001:0002:0003:0000:0000:0000:0001 \
             sport=9999 dport=1025 zone-orig=5 mark=0 use=1",
        );
        assert_eq!(v6.family, libc::AF_INET6 as u8);
        assert_eq!(v6.src, "fd00:1:2:3::1".parse::<IpAddr>().unwrap());
        assert_eq!(v6.tcp_state, Some(TCP_CONNTRACK_SYN_SENT));
        assert_eq!(
            v6.zone, 5,
            "an original-direction zone counts, as in the dump"
        );
        let reply_zoned = one(
            "ipv4     2 udp      17 29 src=10.0.0.1 dst=10.0.0.2 sport=1 dport=2 [UNREPLIED] \
             src=10.0.0.2 dst=10.0.0.1 sport=2 dport=1 zone-reply=11 mark=0 use=1",
        );
        assert_eq!(
            (reply_zoned.zone, reply_zoned.sport, reply_zoned.dport),
            (11, 1, 2),
            "a reply-direction zone counts, as in the dump"
        );

        let icmp6 = one(
            "ipv6     10 icmpv6   58 29 src=fd00:0000:0000:0000:0000:0000:0000:0001 \
             dst=fd00:0000:0000:0000:0000:0000:0000:0002 type=128 code=0 id=7 \
             src=fd00:0000:0000:0000:0000:0000:0000:0002 dst=fd00:0000:0000:0000:0000:0000:0000:0001 \
             type=129 code=0 id=7 mark=0 use=1",
        );
        assert_eq!((icmp6.sport, icmp6.dport), (7, 128 << 8));

        let gre = one(
            "ipv4     2 gre      47 179 timeout=180, stream_timeout=18000 src=10.0.0.1 dst=10.0.0.2 \
             srckey=0x1 dstkey=0x2 src=10.0.0.2 dst=10.0.0.1 srckey=0x2 dstkey=0x1 mark=0 use=1",
        );
        assert_eq!((gre.proto, gre.sport, gre.dport), (IPPROTO_GRE, 1, 2));

        let sctp = one(
            "ipv4     2 sctp     132 210 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=5000 dport=38412 \
             src=10.0.0.2 dst=10.0.0.1 sport=38412 dport=5000 [ASSURED] mark=0 use=1",
        );
        assert_eq!(
            (sctp.proto, sctp.tcp_state, sctp.dport),
            (IPPROTO_SCTP, None, 38412)
        );

        // A protocol without a tracker: the generic one, no ports.
        let other = one(
            "ipv4     2 unknown  89 599 src=10.0.0.1 dst=224.0.0.5 [UNREPLIED] src=224.0.0.5 \
             dst=10.0.0.1 mark=0 zone-reply=9 use=1",
        );
        assert_eq!(
            (other.proto, other.sport, other.dport, other.zone),
            (89, 0, 0, 9)
        );

        // Offloaded: no timeout and no state; [OFFLOAD] instead of [ASSURED].
        let off = one(
            "ipv4     2 tcp      6 src=10.0.0.1 dst=10.0.0.2 sport=1 dport=443 src=10.0.0.2 \
             dst=10.0.0.1 sport=443 dport=1 [OFFLOAD] mark=0 use=3",
        );
        assert_eq!((off.timeout_secs, off.tcp_state), (0, None));
        assert_eq!(off.status, IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_OFFLOAD);
        let hw = one(
            "ipv4     2 udp      17 src=10.0.0.1 dst=10.0.0.2 sport=1 dport=53 src=10.0.0.2 \
             dst=10.0.0.1 sport=53 dport=1 [HW_OFFLOAD] use=3",
        );
        assert_eq!(hw.status & IPS_HW_OFFLOAD, IPS_HW_OFFLOAD);

        assert_eq!(
            parse_line(b"unknown  7 tcp      6 10 src=1 dst=2 use=1").unwrap(),
            None,
            "another family"
        );
    }

    #[test]
    fn procfs_malformed_lines_are_errors() {
        for bad in [
            "",
            "ipv4",
            "ipv4     2 tcp",
            "ipv4     x tcp      6 10 src=1.2.3.4 dst=1.2.3.4",
            "ipv4     2 tcp      600 10 src=1.2.3.4 dst=1.2.3.4",
            "ipv4     2 tcp      6 10 BOGUS src=1.2.3.4 dst=1.2.3.4",
            "ipv4     2 tcp      6 10 src=1.2.3.4",
            "ipv4     2 tcp      6 10 src=fd00::1 dst=1.2.3.4",
            "ipv6     10 tcp      6 10 src=1.2.3.4 dst=1.2.3.4",
            "ipv4     2 tcp      6 10 src=1.2.3.4 dst=1.2.3.4 sport=70000",
            "ipv4     2 gre      47 10 src=1.2.3.4 dst=1.2.3.4 srckey=1",
            "ipv4     2 tcp      6 10 src=1.2.3.4 dst=1.2.3.4 stray",
            "ipv4     2 tcp      6 10 src=1.2.3.4 dst=1.2.3.4 mark=-1",
        ] {
            assert!(parse_line(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(parse_line(b"ipv4 2 tcp 6 1 src=1.2.3.4 dst=\xff").is_err());
    }

    #[test]
    fn procfs_reader_skips_bad_and_overlong_lines() {
        let good = "ipv4     2 udp      17 29 src=10.0.0.1 dst=10.0.0.2 sport=1 dport=53 \
                    [UNREPLIED] src=10.0.0.2 dst=10.0.0.1 sport=53 dport=1 mark=0 use=1";
        let long = format!("ipv4 2 udp 17 1 {}", "x=y ".repeat(MAX_LINE));
        let text = format!(
            "{good}\n\ngarbage\n{long}\nunknown  7 x 1 src=1 dst=2\n{good}\n{long}\n{good}"
        );
        // A tiny buffer exercises lines split across reads.
        let mut input = BufReader::with_capacity(7, text.as_bytes());
        let mut seen = Vec::new();
        let r = for_each_entry(&mut input, &mut |e| seen.push(*e)).unwrap();
        assert_eq!(r.entries, 3);
        assert_eq!(r.other_families, 1);
        assert_eq!(r.malformed, 3, "{r:?}");
        assert!(r.first_error.unwrap().contains("garbage"));
        assert!(seen.iter().all(|e| e.dport == 53));
    }

    /// One generated line of a kind and size a busy router's table holds.
    fn generated_line(i: u32) -> String {
        let (a, b) = ((i >> 8) & 0xff, i & 0xff);
        match i % 10 {
            0..7 => format!(
                "ipv4     2 udp      17 {} src=10.10.{a}.{b} dst=10.96.0.10 sport={} dport=53 \
                 [UNREPLIED] src=10.96.0.10 dst=10.10.{a}.{b} sport=53 dport={} mark=0 use=2\n",
                i % 60,
                1024 + i % 60_000,
                1024 + i % 60_000
            ),
            7..9 => format!(
                "ipv4     2 tcp      6 {} ESTABLISHED src=10.20.{a}.{b} dst=10.20.0.200 sport={} \
                 dport=2380 src=10.20.0.200 dst=10.20.{a}.{b} sport=2380 dport={} [ASSURED] \
                 mark=0 use=2\n",
                431_999 - i % 1000,
                1024 + i % 60_000,
                1024 + i % 60_000
            ),
            _ => format!(
                "ipv6     10 tcp      6 119 SYN_SENT src=fd00:0001:0002:0003:0000:0000:{a:04x}:{b:04x} \
                 dst=fd00:0009:0000:0000:0000:0000:0000:0001 sport={} dport=9999 [UNREPLIED] \
                 src=fd00:0009:0000:0000:0000:0000:0000:0001 \
                 dst=fd00:0001:0002:0003:0000:0000:{a:04x}:{b:04x} sport=9999 dport={} mark=0 use=2\n",
                1024 + i % 60_000,
                1024 + i % 60_000
            ),
        }
    }

    /// Parse time of a full 262,144-entry table's worth of lines, from a
    /// generated file. Run alone with --nocapture for the number.
    #[test]
    fn procfs_parse_time_of_262144_lines() {
        const N: u32 = 262_144;
        let path = std::env::temp_dir().join(format!("ctrace-procfs-{}.txt", std::process::id()));
        {
            let mut out = io::BufWriter::new(File::create(&path).unwrap());
            for i in 0..N {
                io::Write::write_all(&mut out, generated_line(i).as_bytes()).unwrap();
            }
        }
        let bytes = std::fs::metadata(&path).unwrap().len();
        let file = File::open(&path).unwrap();
        let mut input = BufReader::with_capacity(64 << 10, file);
        let (mut udp, mut assured) = (0u64, 0u64);
        let start = Instant::now();
        let r = for_each_entry(&mut input, &mut |e| {
            udp += u64::from(e.proto == IPPROTO_UDP);
            assured += u64::from(e.status & IPS_ASSURED != 0);
        })
        .unwrap();
        let took = start.elapsed();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(r.entries, u64::from(N), "{r:?}");
        assert_eq!(r.malformed, 0, "{r:?}");
        assert_eq!(udp, u64::from(N) / 10 * 7 + 4, "i % 10 < 7");
        assert_eq!(assured, u64::from(N) / 10 * 2);
        eprintln!(
            "procfs: parsed {N} lines ({:.1} MiB) in {:.1} ms ({:.0} ns/line)",
            bytes as f64 / (1 << 20) as f64,
            took.as_secs_f64() * 1e3,
            took.as_nanos() as f64 / f64::from(N)
        );
    }

    #[test]
    fn procfs_reads_this_namespace() {
        // No root needed: reading our own namespace's files is allowed.
        if !Path::new(STAT_FILE).exists() {
            eprintln!("skipping: no {STAT_FILE} (NF_CONNTRACK_PROCFS off)");
            return;
        }
        let mut p = ProcConntrack::open(None).unwrap();
        let s = p.stats().unwrap();
        assert!(s.max > 0, "{s:?}");
        let n = p.dump(&mut |_| {}).unwrap();
        // Twice: the files are re-read from the start.
        assert_eq!(p.stats().unwrap().max, s.max);
        let again = p.dump(&mut |_| {}).unwrap();
        eprintln!("this namespace: {s:?}; {n} then {again} entries listed");
    }
}
