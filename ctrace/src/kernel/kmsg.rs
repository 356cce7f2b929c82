//! The kernel log as a third witness of a full table.
//!
//! When `__nf_conntrack_alloc` finds the table full and `early_drop()`
//! frees nothing, the kernel logs, rate-limited by `net_ratelimit()` (10
//! lines per 5 s by default, `net.core.message_burst`/`message_cost`):
//!
//! ```text
//! nf_conntrack: nf_conntrack: table full, dropping packet
//! nf_conntrack: nf_conntrack: table full in netns 4026532481, dropping packet
//! net_ratelimit: 1234 callbacks suppressed
//! ```
//!
//! The first `nf_conntrack: ` is the file's `pr_fmt`, the second part of
//! the message; kernels since 2025 name the namespace unless it is the
//! initial one, older ones never do (and older still print the prefix
//! once). The limiter reports what it suppressed at its next use after the
//! interval, naming itself (`net_ratelimit`, or the calling function for
//! `pr_*_ratelimited`).
//!
//! This needs neither BPF nor ctnetlink, so it works on any router with
//! `/dev/kmsg`. It is not per namespace: `/dev/kmsg` shows the whole
//! machine's log, and only lines that name a namespace say whose table it
//! was. The suppressed count belongs to a limiter shared by every
//! `net_ratelimit()` user, so it is credited to a full table only when a
//! table-full line shows the limiter was busy with one (see [`Witnesses`]).
use std::{
    fs::File,
    io::{self, Read, Seek, SeekFrom},
    os::unix::fs::OpenOptionsExt,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};

pub const KMSG: &str = "/dev/kmsg";

/// A record's text is at most 1 KiB plus its dictionary; the kernel
/// refuses a read() into a buffer too small for the whole record (EINVAL).
const RECORD_BUF: usize = 16 << 10;

/// One `/dev/kmsg` record: `<prio>,<seq>,<usec>,<flags>[,...];<message>`,
/// then continuation lines (` KEY=value`, the record's dictionary), which
/// are not kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// Syslog facility << 3 | level.
    pub prio: u32,
    pub seq: u64,
    /// printk's clock (local_clock: time since boot, without suspend), µs.
    pub at_usec: u64,
    /// `-`, or `c`/`+` for pieces of a continued line.
    pub flags: char,
    /// The first line of the message, with the kernel's `\xNN` escapes as is.
    pub message: &'a str,
}

/// Parses one record as a read() of `/dev/kmsg` returns it.
pub fn parse_record(raw: &[u8]) -> Result<Record<'_>> {
    let text = std::str::from_utf8(raw).context("kmsg record is not UTF-8")?;
    let (prefix, rest) = text
        .split_once(';')
        .with_context(|| format!("kmsg record without ';': {:?}", truncated(text)))?;
    // The message is the first line; continuation lines start with a space.
    let message = rest.split('\n').next().unwrap_or("");
    let mut fields = prefix.split(',');
    let mut field = |what: &str| {
        fields
            .next()
            .filter(|f| !f.is_empty())
            .with_context(|| format!("kmsg record lacks its {what}: {:?}", truncated(prefix)))
    };
    let prio = field("priority")?;
    let prio: u32 = prio
        .parse()
        .with_context(|| format!("kmsg priority {prio:?}"))?;
    let seq = field("sequence number")?;
    let seq: u64 = seq
        .parse()
        .with_context(|| format!("kmsg sequence number {seq:?}"))?;
    let at = field("timestamp")?;
    let at_usec: u64 = at
        .parse()
        .with_context(|| format!("kmsg timestamp {at:?}"))?;
    let flags = field("flags")?;
    let mut chars = flags.chars();
    let flag = chars.next().unwrap_or('-');
    if chars.next().is_some() {
        bail!("kmsg flags {flags:?} are not one character");
    }
    // Later fields (caller=T123 with CONFIG_PRINTK_CALLER) are not used.
    Ok(Record {
        prio,
        seq,
        at_usec,
        flags: flag,
        message,
    })
}

fn truncated(s: &str) -> &str {
    let end = s.char_indices().nth(80).map_or(s.len(), |(i, _)| i);
    &s[..end]
}

/// What a message says, as far as a full table is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// conntrack's table-full warning; the namespace when it is named.
    TableFull {
        netns: Option<u64>,
    },
    /// `<limiter>: N callbacks suppressed`.
    Suppressed {
        limiter: &'a str,
        count: u64,
    },
    Other,
}

/// Limiters whose suppressed callbacks may be table-full warnings:
/// `net_warn_ratelimited` goes through `net_ratelimit()`; the others are
/// what the report would say if a kernel used `pr_warn_ratelimited`.
const CONNTRACK_LIMITERS: [&str; 3] = ["net_ratelimit", "nf_conntrack", "__nf_conntrack_alloc"];

/// Classifies one message (a [`Record::message`]).
pub fn classify(message: &str) -> Message<'_> {
    if let Some(m) = message.strip_prefix("nf_conntrack: ") {
        // The pr_fmt prefix and the message's own: once or twice.
        let m = m.strip_prefix("nf_conntrack: ").unwrap_or(m);
        if let Some(rest) = m.strip_prefix("table full") {
            if rest == ", dropping packet" {
                return Message::TableFull { netns: None };
            }
            if let Some(n) = rest
                .strip_prefix(" in netns ")
                .and_then(|r| r.strip_suffix(", dropping packet"))
                .and_then(|n| n.parse().ok())
            {
                return Message::TableFull { netns: Some(n) };
            }
        }
    }
    if let Some((limiter, count)) = message
        .strip_suffix(" callbacks suppressed")
        .and_then(|m| m.rsplit_once(": "))
        && let Ok(count) = count.parse()
        && !limiter.is_empty()
    {
        return Message::Suppressed { limiter, count };
    }
    Message::Other
}

/// Evidence from the kernel log that a table was full: one table-full
/// line, and/or callbacks its rate limiter suppressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableFullWitness {
    /// printk's clock of the record, µs since boot (see [`Record::at_usec`]).
    pub at_usec: u64,
    /// The record's sequence number.
    pub seq: u64,
    /// The namespace the line names; None for the initial namespace on
    /// kernels that name the others, and for every line on older kernels.
    pub netns: Option<u64>,
    /// Table-full lines: 1, or 0 for a suppressed report alone.
    pub lines: u64,
    /// Callbacks suppressed before this line, credited to the full table.
    /// They are from the limiter's previous window, whichever namespace
    /// they came from: `netns` is this line's, not theirs.
    pub suppressed: u64,
}

impl TableFullWitness {
    /// Packets the kernel log says it dropped for a full table: each line
    /// is one, each suppressed callback (likely) one more.
    pub fn count(&self) -> u64 {
        self.lines + self.suppressed
    }

    /// The record's wall-clock time, from printk's clock. printk uses
    /// local_clock(), which runs close to CLOCK_MONOTONIC; good to a few
    /// milliseconds, not to the microsecond.
    pub fn wall_time(&self) -> SystemTime {
        boot_to_wall(self.at_usec)
    }
}

/// Wall-clock time of a moment on printk's clock.
pub fn boot_to_wall(at_usec: u64) -> SystemTime {
    let now_mono = crate::event::monotonic_ns() / 1000;
    let ago = Duration::from_micros(now_mono.saturating_sub(at_usec));
    SystemTime::now()
        .checked_sub(ago)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Turns records, in order, into witnesses.
///
/// A `callbacks suppressed` report is printed by the first call after the
/// limiter's interval, right before that call's own message: when that
/// message is a table-full line, both are one witness (`lines` 1,
/// `suppressed` N). Otherwise the report stands alone, and counts only if
/// a table-full line was seen since the limiter's previous report (the
/// suppressed window was then, at least partly, conntrack's). Either way
/// it is an upper bound: the limiter is shared by every `net_ratelimit()`
/// user, and a busy one shares the window.
#[derive(Debug, Default)]
pub struct Witnesses {
    /// A report waiting for the record after it.
    pending: Option<Pending>,
    /// A table-full line was seen since the last report.
    full_since_report: bool,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    at_usec: u64,
    seq: u64,
    count: u64,
}

impl Witnesses {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one record's message; witnesses it completes go to `out`.
    pub fn feed(&mut self, r: &Record<'_>, out: &mut Vec<TableFullWitness>) {
        match classify(r.message) {
            Message::TableFull { netns } => {
                let suppressed = self.pending.take().map_or(0, |p| p.count);
                self.full_since_report = true;
                out.push(TableFullWitness {
                    at_usec: r.at_usec,
                    seq: r.seq,
                    netns,
                    lines: 1,
                    suppressed,
                });
            }
            Message::Suppressed { limiter, count } if CONNTRACK_LIMITERS.contains(&limiter) => {
                self.settle_pending(out);
                self.pending = Some(Pending {
                    at_usec: r.at_usec,
                    seq: r.seq,
                    count,
                });
            }
            // Another message between a report and its caller's message is
            // rare but possible (printk from another CPU).
            Message::Suppressed { .. } | Message::Other => self.settle_pending(out),
        }
    }

    /// Nothing more to read for now: a report whose window held a
    /// table-full line need not wait for the next record.
    pub fn flush(&mut self, out: &mut Vec<TableFullWitness>) {
        if self.full_since_report {
            self.settle_pending(out);
        }
    }

    fn settle_pending(&mut self, out: &mut Vec<TableFullWitness>) {
        let Some(p) = self.pending.take() else {
            return;
        };
        if std::mem::take(&mut self.full_since_report) {
            out.push(TableFullWitness {
                at_usec: p.at_usec,
                seq: p.seq,
                netns: None,
                lines: 0,
                suppressed: p.count,
            });
        }
    }
}

/// Witnesses in a saved log, records one per line as `cat /dev/kmsg`
/// prints them; continuation lines (starting with a space) are skipped. For tests,
/// fuzzing and reading saved logs; malformed records are skipped.
pub fn witnesses_in(text: &[u8]) -> Vec<TableFullWitness> {
    let mut w = Witnesses::new();
    let mut out = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        if line.first() == Some(&b' ') || line.is_empty() {
            continue;
        }
        if let Ok(r) = parse_record(line) {
            w.feed(&r, &mut out);
        }
    }
    w.flush(&mut out);
    out
}

/// Reads new `/dev/kmsg` records without blocking.
pub struct KmsgReader {
    file: File,
    buf: Vec<u8>,
    witnesses: Witnesses,
    /// Records the kernel overwrote before they were read (EPIPE).
    overwritten: u64,
    malformed: u64,
}

impl KmsgReader {
    /// Opens `/dev/kmsg` at its end: only records logged from now on are
    /// seen. Needs CAP_SYSLOG where `kernel.dmesg_restrict` is set.
    pub fn open() -> Result<KmsgReader> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(KMSG)
            .with_context(|| format!("opening {KMSG}"))?;
        // SEEK_END on /dev/kmsg moves to the next record to be logged.
        file.seek(SeekFrom::End(0))
            .with_context(|| format!("seeking to the end of {KMSG}"))?;
        Ok(KmsgReader {
            file,
            buf: vec![0; RECORD_BUF],
            witnesses: Witnesses::new(),
            overwritten: 0,
            malformed: 0,
        })
    }

    /// Reads every record logged since the last call and appends the
    /// table-full witnesses among them to `out`. Returns at once when
    /// there are none.
    pub fn poll(&mut self, out: &mut Vec<TableFullWitness>) -> Result<()> {
        loop {
            match self.file.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => match parse_record(&self.buf[..n]) {
                    Ok(r) => self.witnesses.feed(&r, out),
                    Err(e) => {
                        self.malformed += 1;
                        log::debug!("{KMSG}: {e:#}");
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The ring wrapped past our position; the next read starts
                // at the oldest record left.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => self.overwritten += 1,
                Err(e) => return Err(e).with_context(|| format!("reading {KMSG}")),
            }
        }
        self.witnesses.flush(out);
        Ok(())
    }

    /// Times the kernel overwrote records before they were read.
    pub fn overwritten(&self) -> u64 {
        self.overwritten
    }

    pub fn malformed(&self) -> u64 {
        self.malformed
    }
}

/// Witnesses summed up, for the sinks.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    /// Table-full drops the log shows: lines plus suppressed callbacks.
    pub table_full: u64,
    pub lines: u64,
    pub suppressed: u64,
    /// printk clock of the latest witness, µs since boot.
    pub last_at_usec: Option<u64>,
    /// Lines per namespace, where the line names it.
    pub by_netns: std::collections::BTreeMap<u64, u64>,
    /// Times records were lost to the ring wrapping.
    pub overwritten: u64,
}

impl Tally {
    pub fn add(&mut self, w: &TableFullWitness) {
        self.table_full += w.count();
        self.lines += w.lines;
        self.suppressed += w.suppressed;
        self.last_at_usec = Some(self.last_at_usec.unwrap_or(0).max(w.at_usec));
        if let Some(ns) = w.netns {
            *self.by_netns.entry(ns).or_default() += w.lines;
        }
    }

    /// "kernel log: table full ×N, last at <time>" (the live and plain
    /// line), or None when the log showed nothing.
    pub fn text(&self) -> Option<String> {
        let at = self.last_at_usec?;
        let mut t = format!(
            "kernel log: table full ×{}, last at {}",
            self.table_full,
            crate::event::rfc3339(boot_to_wall(at))
        );
        if self.suppressed > 0 {
            t += &format!(
                " ({} lines, {} suppressed by the rate limit)",
                self.lines, self.suppressed
            );
        }
        if !self.by_netns.is_empty() {
            let ns: Vec<String> = self
                .by_netns
                .iter()
                .map(|(ns, n)| format!("{ns}: {n}"))
                .collect();
            t += &format!("; lines by netns {}", ns.join(", "));
        }
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmsg_records_parse() {
        let r = parse_record(
            b"4,1201,5817263512,-;nf_conntrack: nf_conntrack: table full, dropping packet\n",
        )
        .unwrap();
        assert_eq!(
            r,
            Record {
                prio: 4,
                seq: 1201,
                at_usec: 5_817_263_512,
                flags: '-',
                message: "nf_conntrack: nf_conntrack: table full, dropping packet",
            }
        );
        // More prefix fields, and dictionary lines after the message.
        let r = parse_record(
            b"6,339,5140900,c,caller=T1;usb 1-1: new device\n SUBSYSTEM=usb\n DEVICE=c189:1\n",
        )
        .unwrap();
        assert_eq!((r.flags, r.message), ('c', "usb 1-1: new device"));
        for bad in [
            &b"no semicolon"[..],
            b"4,1,2;short",
            b"x,1,2,-;m",
            b"4,1,2,--;m",
            b"4,,2,-;m",
            b"\xff;",
        ] {
            assert!(
                parse_record(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn kmsg_messages_classify() {
        use Message::*;
        for (m, want) in [
            (
                "nf_conntrack: nf_conntrack: table full, dropping packet",
                TableFull { netns: None },
            ),
            (
                "nf_conntrack: table full, dropping packet",
                TableFull { netns: None },
            ),
            (
                "nf_conntrack: nf_conntrack: table full in netns 4026532481, dropping packet",
                TableFull {
                    netns: Some(4_026_532_481),
                },
            ),
            (
                "net_ratelimit: 1234 callbacks suppressed",
                Suppressed {
                    limiter: "net_ratelimit",
                    count: 1234,
                },
            ),
            (
                "__nf_conntrack_alloc: 3 callbacks suppressed",
                Suppressed {
                    limiter: "__nf_conntrack_alloc",
                    count: 3,
                },
            ),
            (
                "nf_conntrack: table full in netns x, dropping packet",
                Other,
            ),
            ("nf_conntrack: default automatic helper assignment", Other),
            ("net_ratelimit: many callbacks suppressed", Other),
            (": 3 callbacks suppressed", Other),
            ("", Other),
        ] {
            assert_eq!(classify(m), want, "{m}");
        }
    }

    const LOG: &str = "\
4,100,1000000,-;nf_conntrack: nf_conntrack: table full in netns 7, dropping packet
4,101,1000100,-;nf_conntrack: nf_conntrack: table full in netns 7, dropping packet
6,102,2000000,-;eth0: link up
 SUBSYSTEM=net
4,103,6000000,-;net_ratelimit: 500 callbacks suppressed
4,104,6000001,-;nf_conntrack: nf_conntrack: table full in netns 7, dropping packet
4,105,12000000,-;net_ratelimit: 40 callbacks suppressed
6,106,12000001,-;something else
4,107,30000000,-;net_ratelimit: 9 callbacks suppressed
6,108,30000001,-;unrelated
4,109,31000000,-;nf_conntrack: nf_conntrack: table full, dropping packet
4,110,40000000,-;net_ratelimit: 2 callbacks suppressed
";

    #[test]
    fn kmsg_witnesses_credit_suppressed_callbacks() {
        let w = witnesses_in(LOG.as_bytes());
        let brief: Vec<_> = w
            .iter()
            .map(|w| (w.seq, w.netns, w.lines, w.suppressed))
            .collect();
        assert_eq!(
            brief,
            [
                (100, Some(7), 1, 0),
                (101, Some(7), 1, 0),
                // The report right before a table-full line: one witness.
                (104, Some(7), 1, 500),
                // Alone, after a window that held a table-full line.
                (105, None, 0, 40),
                // 107: its window held no table-full line, nor did the
                // next record: not credited.
                (109, None, 1, 0),
                // The last report: flushed at the end, its window held 109.
                (110, None, 0, 2),
            ]
        );
        let mut t = Tally::default();
        w.iter().for_each(|w| t.add(w));
        assert_eq!((t.table_full, t.lines, t.suppressed), (546, 4, 542));
        assert_eq!(t.by_netns.get(&7), Some(&3));
        assert_eq!(t.last_at_usec, Some(40_000_000));
        let text = t.text().unwrap();
        assert!(
            text.starts_with("kernel log: table full ×546, last at "),
            "{text}"
        );
        assert!(text.contains("(4 lines, 542 suppressed"), "{text}");
        assert!(text.contains("lines by netns 7: 3"), "{text}");
        assert_eq!(Tally::default().text(), None);
    }

    #[test]
    fn kmsg_reader_starts_at_the_end() {
        let mut r = match KmsgReader::open() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skipping: {e:#}");
                return;
            }
        };
        let mut out = Vec::new();
        r.poll(&mut out).unwrap();
        // Whatever the log held before is behind us; a second poll is
        // immediate and finds nothing new unless the kernel logs meanwhile.
        r.poll(&mut out).unwrap();
        assert!(out.iter().all(|w| w.count() > 0));
    }

    /// A real table-full drop in a fresh namespace reaches the log and the
    /// reader: the table is filled with ASSURED entries (which early_drop
    /// spares) and a new UDP flow is sent to loopback. The rate limit is
    /// machine-wide, so another flood may have used it up: the test keeps
    /// sending for a while and also accepts a suppressed-callbacks witness.
    #[test]
    #[cfg(feature = "lab")]
    fn kmsg_reader_sees_a_real_table_full() {
        use crate::{
            lab::traffic,
            netlink::{ctnetlink::CtSocket, nftables},
            netns::skip_unless_root,
        };
        use std::net::{Ipv4Addr, UdpSocket};
        if skip_unless_root("kmsg_reader_sees_a_real_table_full") {
            return;
        }
        let Ok(mut reader) = KmsgReader::open() else {
            eprintln!("skipping: {KMSG} not readable");
            return;
        };
        let ns = crate::netlink::rtnetlink::new_netns().unwrap();
        nftables::enable_conntrack(&ns).unwrap();
        let max = CtSocket::open(Some(&ns)).unwrap().stats().unwrap().max;
        if max == 0 || max > 1 << 20 {
            eprintln!("skipping: nf_conntrack_max = {max}");
            return;
        }
        let fill =
            traffic::fill_table(&ns, max + 1, Ipv4Addr::new(10, 99, 0, 1).into(), |_| {}).unwrap();
        assert!(fill.refused_full > 0, "{fill:?}");
        let started = std::time::Instant::now();
        let mut seen = Vec::new();
        let mut port = 20_000u16;
        while started.elapsed() < Duration::from_secs(12) {
            ns.run(|| {
                let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
                // Dropped by conntrack on the way out: EPERM, expected.
                let _ = s.send_to(b"x", (Ipv4Addr::LOCALHOST, 9));
            })
            .unwrap();
            port += 1;
            reader.poll(&mut seen).unwrap();
            if seen.iter().any(|w| w.netns.is_none_or(|n| n == ns.inode())) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let drops = CtSocket::open(Some(&ns)).unwrap().stats().unwrap().drop;
        eprintln!(
            "netns {}: conntrack drop={drops}; witnesses after {:.1} s: {seen:?}",
            ns.inode(),
            started.elapsed().as_secs_f64()
        );
        assert!(drops > 0);
        assert!(
            seen.iter()
                .any(|w| w.netns.is_none_or(|n| n == ns.inode()) && w.count() > 0),
            "{seen:?}"
        );
    }
}
