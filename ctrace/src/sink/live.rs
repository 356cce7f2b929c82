//! The live view for a terminal: redrawn in place every interval. Plain ANSI
//! (home, clear) rather than a TUI framework: the view is read-only, and on
//! a router every dependency costs flash.
use std::{collections::BTreeMap, io::Write};

use super::{Sink, Snapshot, agreement_text, netns_label, rfc3339, ttf_text};
use crate::{aggregate::DropRecord, cause::Cause, event::tcp_flags_str};

const TOP: usize = 10;

pub struct LiveSink<W: Write> {
    out: W,
}

impl<W: Write> LiveSink<W> {
    pub fn new(out: W) -> Self {
        LiveSink { out }
    }
}

/// The whole screen as text, so the lab and tests can print or inspect it.
pub fn render(s: &Snapshot<'_>) -> String {
    let mut o = String::new();
    let w = |o: &mut String, line: String| {
        o.push_str(&line);
        o.push('\n');
    };
    w(
        &mut o,
        format!(
            "ctrace — conntrack pressure   {}   strategy: {}   up {}s{}",
            rfc3339(s.time),
            s.strategy.map_or("none (node view only)", |st| st.name()),
            s.elapsed.as_secs(),
            if s.is_final { "   (final)" } else { "" }
        ),
    );
    w(&mut o, String::new());
    if s.tables.is_empty() && s.strategy.is_some() {
        w(
            &mut o,
            "no network namespace with active conntrack found".into(),
        );
    }
    // Drops per namespace and cause, for the headers.
    let mut by_ns: BTreeMap<u64, BTreeMap<Cause, (u64, u64)>> = BTreeMap::new();
    for g in &s.groups {
        let e = by_ns
            .entry(g.netns)
            .or_default()
            .entry(g.cause)
            .or_default();
        e.0 += g.flows;
        e.1 += g.packets;
    }
    for t in &s.tables {
        let causes = by_ns
            .get(&t.inode)
            .map(|m| {
                m.iter()
                    .map(|(c, (f, p))| format!("{c}: {f} flows/{p} pkts"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_else(|| "none".into());
        let bar = fill_bar(t.fill());
        w(
            &mut o,
            format!(
                "netns {}{}",
                netns_label(t),
                match t.source {
                    crate::conntrack::TableSource::Procfs => "   (read from procfs: no ctnetlink)",
                    crate::conntrack::TableSource::Ctnetlink => "",
                }
            ),
        );
        w(
            &mut o,
            format!(
                "  table {bar} {}/{} ({:.1}%)   inserts {:.1}/s   drops {:.1}/s   full in: {}",
                t.entries,
                t.max,
                t.fill(),
                t.insert_rate,
                t.drop_rate,
                ttf_text(t.time_to_full)
            ),
        );
        w(&mut o, format!("  dropped: {causes}"));
        if let Some(a) = s.agreement.iter().find(|a| a.netns == t.inode) {
            w(&mut o, format!("  {}", agreement_text(a)));
        }
        if let Some((_, source, b)) = s.occupancy.iter().find(|(i, _, _)| *i == t.inode) {
            // Re-dumps of a large table are spaced out (100 times their
            // own time): say how old the last one is. Events alone keep
            // an `events` breakdown, whose dump is long past and moot.
            let age = match source {
                crate::occupancy::Kept::Events => String::new(),
                _ => format!(", dumped {}s ago in {:.2}s", b.dump_age_s, b.dump_s),
            };
            w(&mut o, format!("  occupied by ({source}{age}):"));
            for line in crate::occupancy::render_top(b, 4) {
                w(&mut o, format!("    {line}"));
            }
        }
        for line in filling_lines(s, t.inode) {
            w(&mut o, line);
        }
        w(
            &mut o,
            format!(
                "  stats: drop={} early_drop={} insert_failed={} invalid={} insert={} found={}",
                t.stats.drop,
                t.stats.early_drop,
                t.stats.insert_failed,
                t.stats.invalid,
                t.stats.insert,
                t.stats.found
            ),
        );
    }
    if let Some(k) = &s.kernel_log {
        w(
            &mut o,
            k.text()
                .unwrap_or_else(|| "kernel log: no table-full line since start".into()),
        );
    }
    if s.connect_counters.is_some() {
        for line in connects_panel(s) {
            w(&mut o, line);
        }
    }
    if s.strategy.is_none() {
        return o;
    }
    w(&mut o, String::new());
    w(&mut o, "TOP DROPPED SERVICES".into());
    w(
        &mut o,
        format!(
            "  {:<16} {:<11} {:<7} {:>8} {:>9}",
            "SERVICE", "CAUSE", "PROTO", "FLOWS", "PACKETS"
        ),
    );
    for g in s.groups.iter().take(TOP) {
        w(
            &mut o,
            format!(
                "  {:<16} {:<11} {:<7} {:>8} {:>9}",
                super::service_text(g.service.as_deref()),
                g.cause.name(),
                g.proto.name(),
                g.flows,
                g.packets
            ),
        );
    }
    if !s.evictions.is_empty() {
        w(&mut o, String::new());
        w(
            &mut o,
            "EVICTED EARLY (whose entries made room: early_drop, or the GC above 95% fill)".into(),
        );
        for e in s.evictions.iter().take(TOP) {
            w(
                &mut o,
                format!(
                    "  {:<16} {:<7} {:>8} entries  by {}",
                    super::service_text(e.service.as_deref()),
                    e.proto.name(),
                    e.entries,
                    match e.by {
                        crate::readings::Evictor::EarlyDrop => "early_drop",
                        crate::readings::Evictor::Gc => "gc",
                    }
                ),
            );
        }
    }
    w(&mut o, String::new());
    w(&mut o, "TOP DROPPED FLOWS".into());
    w(
        &mut o,
        format!(
            "  {:<14} {:<5} {:<28} {:<28} {:>5} {:<8} {:<12} {:<12}",
            "SERVICE", "PROTO", "SRC", "DST", "PKTS", "FLAGS", "FIRST", "LAST"
        ),
    );
    for f in &s.top_flows {
        w(
            &mut o,
            format!(
                "  {:<14} {:<5} {:<28} {:<28} {:>5} {:<8} {:<12} {:<12}",
                super::service_text(f.first.service.as_deref()),
                f.first.flow.proto.name(),
                super::endpoint_text(f.first.flow.src, f.first.pods.src.as_deref(), None),
                super::endpoint_text(
                    f.first.flow.dst,
                    f.first.pods.dst.as_deref(),
                    f.first.pods.dst_service.as_deref()
                ),
                f.packets(),
                tcp_flags_str(f.tcp_flags),
                clock_time(f.first.time),
                clock_time(f.last_seen),
            ),
        );
    }
    w(&mut o, String::new());
    w(
        &mut o,
        format!(
            "events lost: {} (totals unaffected)   netfilter drops seen: {}   undecoded: {}   \
             flows forgotten from detail: {}",
            s.counters.lost_events,
            s.counters.netfilter_drops,
            s.counters.undecoded,
            s.flows_forgotten
        ),
    );
    let held_back: u64 = s.held_back.iter().map(|h| h.flows).sum();
    if held_back > 0 {
        w(
            &mut o,
            format!(
                "detail held back: {held_back} new flows past the per-CPU budget \
                 (--detail-budget; totals count them)"
            ),
        );
    }
    if s.caps
        .is_some_and(|c| c.drops == crate::tier::DropSight::Correlated)
    {
        let c = &s.counters;
        w(
            &mut o,
            format!(
                "opening packets: {} flows held, {} passed, {} judged dropped, {} pending; \
                 not judged: {} (map full) + {} (key clash) + {} (unknown device); \
                 {} tagged/PPPoE frames left to their upper device",
                c.tc_opened,
                c.tc_passed,
                c.tc_judged,
                c.tc_pending,
                c.tc_pending_full,
                c.tc_key_clash,
                c.tc_unknown_device,
                c.tc_encapsulated
            ),
        );
        let hooked: Vec<String> = s
            .devices
            .iter()
            .filter(|d| d.hooked)
            .map(|d| format!("{}@{}", crate::text::terminal(&d.name), d.netns))
            .collect();
        w(&mut o, format!("hooked: {}", hooked.join(" ")));
        for warning in &s.device_warnings {
            w(
                &mut o,
                format!("WARNING: {}", crate::text::terminal(warning)),
            );
        }
    }
    if s.netns_left_out > 0 {
        w(
            &mut o,
            format!(
                "{} namespaces not watched: ctrace watches at most {} (those with drops always); narrow with --netns",
                s.netns_left_out,
                crate::table::MAX_TABLES
            ),
        );
    }
    if s.counters.totals_full > 0 {
        w(
            &mut o,
            format!(
                "WARNING: {} dropped packets found the kernel's totals map full \
                 (too many namespaces x services); they are in no service's total",
                s.counters.totals_full
            ),
        );
    }
    o
}

/// This host's own connection attempts per service, failing ones first:
/// what a node sees of a router that drops its SYNs.
fn connects_panel(s: &Snapshot<'_>) -> Vec<String> {
    let mut o = vec![
        String::new(),
        "FAILING CONNECTIONS (this host's outgoing TCP attempts; SYN-ACK retx: incoming)".into(),
        format!(
            "  {:<14} {:<11} {:>8} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>8} {:>10}",
            "SERVICE",
            "NETNS",
            "ATTEMPTS",
            "ESTAB",
            "FAILED",
            "TIMEOUT",
            "REFUSED",
            "UNREACH",
            "ABORTED",
            "SYN-RETX",
            "SYNACK-RTX"
        ),
    ];
    let mut rows: Vec<_> = s.connects.iter().collect();
    rows.sort_by_key(|r| {
        std::cmp::Reverse((
            r.failed,
            r.syn_retransmits + r.synack_retransmits,
            r.attempts,
        ))
    });
    for r in rows.iter().take(TOP) {
        o.push(format!(
            "  {:<14} {:<11} {:>8} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>8} {:>10}",
            super::service_text(r.service.as_deref()),
            r.netns,
            r.attempts,
            r.established,
            r.failed,
            r.timeouts,
            r.refused,
            r.unreachable,
            r.aborted,
            r.syn_retransmits,
            r.synack_retransmits
        ));
    }
    if rows.is_empty() {
        o.push("  no connection attempt since start".into());
    }
    if let Some(c) = s
        .connect_counters
        .filter(|c| c.lost_events + c.untracked > 0)
    {
        o.push(format!(
            "  failure records lost: {} (counts unaffected); outcomes without timing: {}",
            c.lost_events, c.untracked
        ));
    }
    o
}

fn clock_time(t: std::time::SystemTime) -> String {
    // HH:MM:SS.mmm of the RFC 3339 stamp: the date is in the header.
    let s = rfc3339(t);
    s.get(11..23).unwrap_or(&s).to_string()
}

fn fill_bar(pct: f64) -> String {
    let n = ((pct / 5.0).round() as usize).min(20);
    format!("[{}{}]", "#".repeat(n), ".".repeat(20 - n))
}

impl<W: Write> Sink for LiveSink<W> {
    fn dropped_flow(&mut self, _rec: &DropRecord) -> std::io::Result<()> {
        // Shown in the next redraw.
        Ok(())
    }

    fn summary(&mut self, snap: &Snapshot<'_>) -> std::io::Result<()> {
        // Home + clear, then the frame: one write so the terminal never
        // shows half a frame.
        let frame = format!("\x1b[H\x1b[2J{}", render(snap));
        self.out.write_all(frame.as_bytes())?;
        self.out.flush()
    }
}

/// "filling now by src_pod: default/web-a 40.0/s (80%)  …": the top three
/// new-entry makers of each kind in the last interval.
fn filling_lines(s: &Snapshot<'_>, inode: u64) -> Vec<String> {
    let mut lines = Vec::new();
    for by in crate::filling::FillBy::ALL {
        let top: Vec<String> = s
            .filling
            .iter()
            .filter(|r| r.netns == inode && r.by == by)
            .take(3)
            .map(|r| {
                format!(
                    "{} {:.1}/s ({:.0}%)",
                    crate::text::terminal(&r.key),
                    r.per_s,
                    r.share * 100.0
                )
            })
            .collect();
        if !top.is_empty() {
            lines.push(format!(
                "  filling now by {}: {}",
                by.name(),
                top.join("  ")
            ));
        }
    }
    if let Some(n) = s.filling_overruns.filter(|n| *n > 0) {
        lines.push(format!(
            "  (ctnetlink dropped new-entry announcements {n} times: the rates above are a sample)"
        ));
    }
    if let Some(share) = s.filling_listened.filter(|s| *s < 1.0) {
        lines.push(format!(
            "  (new entries come faster than --announcements-per-s: ctnetlink listened to for \
             {:.0}% of the interval, the rates above are scaled from that sample)",
            share * 100.0
        ));
    }
    if let Some(n) = s.filling_unattributed.filter(|n| *n > 0) {
        lines.push(format!(
            "  ({n} new entries since start passed too many distinct openers to attribute: \
             the rates above are a sample)"
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::{
        conntrack::TableSource,
        ledger::{Agreement, Trust},
        table::{TableView, TimeToFull},
        tier::Strategy,
    };

    #[test]
    fn a_disagreeing_exact_tier_is_said_plainly() {
        let table = TableView {
            inode: 7,
            name: None,
            source: TableSource::Ctnetlink,
            entries: 100,
            max: 100,
            stats: Default::default(),
            rates: vec![],
            insert_rate: 0.0,
            drop_rate: 5.0,
            time_to_full: TimeToFull::Full,
            names: Default::default(),
        };
        let render_with = |trust| {
            render(&Snapshot {
                strategy: Some(Strategy::Kprobe),
                tables: vec![table.clone()],
                agreement: vec![Agreement {
                    netns: 7,
                    attributed: 10,
                    kernel: 40,
                    ratio: Some(0.25),
                    table_full: 10,
                    unseen: 30,
                    trust,
                }],
                ..Snapshot::idle(SystemTime::UNIX_EPOCH, Duration::from_secs(1))
            })
        };
        let out = render_with(Trust::Disagrees);
        let line = out
            .lines()
            .find(|l| l.contains("self-check"))
            .unwrap_or_else(|| panic!("no self-check line:\n{out}"));
        for part in [
            "10 of conntrack's 40 drops attributed (ratio 0.250)",
            "EXACT TIER DISAGREES",
            "causes inferred until it agrees",
            "30 never seen",
        ] {
            assert!(line.contains(part), "{part:?} missing: {line}");
        }
        assert!(!render_with(Trust::Exact).contains("DISAGREES"));
    }

    /// Process names are anyone's: one that sets the terminal's title and
    /// forges a line must reach the screen as escapes.
    #[test]
    fn hostile_process_names_reach_the_screen_escaped() {
        let table = TableView {
            inode: 7,
            name: Some("a\nb".into()),
            source: TableSource::Ctnetlink,
            entries: 1,
            max: 100,
            stats: Default::default(),
            rates: vec![],
            insert_rate: 0.0,
            drop_rate: 0.0,
            time_to_full: TimeToFull::NotGrowing,
            names: crate::pods::NetnsNames {
                pod: Some("kube-system/x\x1b[2J".into()),
                processes: vec!["ssh\x1b]0;owned\x07\nctrace: FAKE".into()],
            },
        };
        let plain_table = table.clone();
        let out = render(&Snapshot {
            tables: vec![table],
            device_warnings: vec!["w\x1bx".into()],
            ..Snapshot::idle(SystemTime::UNIX_EPOCH, Duration::from_secs(1))
        });
        // The view's own cursor and colour sequences are the only ESCs.
        let theirs = ["\x1b]0;", "\x1b[2J", "\nctrace: FAKE", "\x07", "a\nb"];
        for t in theirs {
            assert!(!out.contains(t), "{t:?} reached the screen raw:\n{out:?}");
        }
        assert!(
            out.contains("ssh\\x1b]0;owned\\x07\\x0actrace: FAKE"),
            "{out:?}"
        );
        assert!(out.contains("pod kube-system/x\\x1b[2J"), "{out:?}");
        // The label plain lines and `status` print.
        let label = crate::sink::netns_label(&plain_table);
        assert_eq!(
            label,
            "7 (a\\x0ab) pod kube-system/x\\x1b[2J [ssh\\x1b]0;owned\\x07\\x0actrace: FAKE]"
        );
    }
}
