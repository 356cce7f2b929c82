//! Plain lines, for a pipe or a log file: one line per dropped flow, and a
//! few lines per interval.
use std::io::Write;

use super::{Sink, Snapshot, netns_label, rfc3339, ttf_text};
use crate::{aggregate::DropRecord, connects::ConnectFailure, event::tcp_flags_str};

pub struct PlainSink<W: Write> {
    out: W,
    /// The kernel log's table-full count last printed: a line only when it
    /// moved (and at the end).
    kernel_log_shown: u64,
}

impl<W: Write> PlainSink<W> {
    pub fn new(out: W) -> Self {
        PlainSink {
            out,
            kernel_log_shown: 0,
        }
    }
}

pub fn drop_line(rec: &DropRecord) -> String {
    let flags = tcp_flags_str(rec.tcp_flags);
    format!(
        "{} DROP netns={} cause={} service={} {} {} -> {}{}",
        rfc3339(rec.time),
        rec.flow.netns,
        rec.cause,
        super::service_text(rec.service.as_deref()),
        rec.flow.proto,
        super::endpoint_text(rec.flow.src, rec.pods.src.as_deref(), None),
        super::endpoint_text(
            rec.flow.dst,
            rec.pods.dst.as_deref(),
            rec.pods.dst_service.as_deref()
        ),
        if flags.is_empty() {
            String::new()
        } else {
            format!(" [{flags}]")
        },
    )
}

pub fn connect_failure_line(rec: &ConnectFailure) -> String {
    format!(
        "{} CONNECT_FAILED netns={} outcome={} service={} {} {} -> {} syn_retransmits={} elapsed_ms={}",
        rfc3339(rec.time),
        rec.flow.netns,
        rec.outcome.name(),
        super::service_text(rec.service.as_deref()),
        rec.flow.proto,
        super::endpoint_text(rec.flow.src, rec.pods.src.as_deref(), None),
        super::endpoint_text(
            rec.flow.dst,
            rec.pods.dst.as_deref(),
            rec.pods.dst_service.as_deref()
        ),
        rec.syn_retransmits
            .map_or_else(|| "?".into(), |n| n.to_string()),
        rec.elapsed
            .map_or_else(|| "?".into(), |d| d.as_millis().to_string()),
    )
}

impl<W: Write> Sink for PlainSink<W> {
    fn connect_failure(&mut self, rec: &ConnectFailure) -> std::io::Result<()> {
        writeln!(self.out, "{}", connect_failure_line(rec))?;
        self.out.flush()
    }

    fn dropped_flow(&mut self, rec: &DropRecord) -> std::io::Result<()> {
        writeln!(self.out, "{}", drop_line(rec))?;
        self.out.flush()
    }

    fn summary(&mut self, s: &Snapshot<'_>) -> std::io::Result<()> {
        let what = if s.is_final { "FINAL" } else { "TABLE" };
        for t in &s.tables {
            writeln!(
                self.out,
                "{} {what} netns={} count={}/{} ({:.1}%) inserts/s={:.1} drops/s={:.1} full_in={} source={}",
                rfc3339(s.time),
                netns_label(t),
                t.entries,
                t.max,
                t.fill(),
                t.insert_rate,
                t.drop_rate,
                ttf_text(t.time_to_full),
                t.source.name(),
            )?;
        }
        if s.is_final {
            for g in &s.groups {
                writeln!(
                    self.out,
                    "{} FINAL drops netns={} service={} cause={} proto={} flows={} packets={}",
                    rfc3339(s.time),
                    g.netns,
                    super::service_text(g.service.as_deref()),
                    g.cause,
                    g.proto,
                    g.flows,
                    g.packets
                )?;
            }
        }
        if s.is_final {
            for e in &s.evictions {
                writeln!(
                    self.out,
                    "{} FINAL evicted netns={} service={} proto={} entries={} by={}",
                    rfc3339(s.time),
                    e.netns,
                    super::service_text(e.service.as_deref()),
                    e.proto,
                    e.entries,
                    serde_json::to_value(e.by)
                        .unwrap_or_default()
                        .as_str()
                        .unwrap_or("?")
                )?;
            }
        }
        for a in &s.agreement {
            if s.is_final || a.trust == crate::ledger::Trust::Disagrees {
                writeln!(
                    self.out,
                    "{} {what} netns={} {}",
                    rfc3339(s.time),
                    a.netns,
                    super::agreement_text(a)
                )?;
            }
        }
        if let Some(k) = &s.kernel_log
            && (k.table_full != self.kernel_log_shown || s.is_final)
            && let Some(text) = k.text()
        {
            self.kernel_log_shown = k.table_full;
            writeln!(self.out, "{} {what} {text}", rfc3339(s.time))?;
        }
        // Services whose attempts fail, every interval; all of them at the end.
        for r in s.connects.iter().filter(|r| r.failed > 0 || s.is_final) {
            writeln!(
                self.out,
                "{} {what} CONNECTS netns={} service={} attempts={} established={} failed={} \
                 timeouts={} refused={} unreachable={} aborted={} syn_retransmits={} \
                 synack_retransmits={}",
                rfc3339(s.time),
                r.netns,
                super::service_text(r.service.as_deref()),
                r.attempts,
                r.established,
                r.failed,
                r.timeouts,
                r.refused,
                r.unreachable,
                r.aborted,
                r.syn_retransmits,
                r.synack_retransmits
            )?;
        }
        if s.counters.lost_events > 0 || s.is_final {
            writeln!(
                self.out,
                "{} {what} strategy={} lost_events={} netfilter_drops={}",
                rfc3339(s.time),
                s.strategy.map_or("none", |st| st.name()),
                s.counters.lost_events,
                s.counters.netfilter_drops
            )?;
        }
        self.out.flush()
    }
}
