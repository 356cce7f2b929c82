//! NDJSON on stdout: one object per line, for scripts. The schema is part of
//! the interface (docs/output.md, "JSON output"); add keys, never rename them.
use std::io::Write;

use serde_json::{Map, Value, json};

use super::{Sink, Snapshot, rfc3339};
use crate::{
    aggregate::DropRecord,
    connects::ConnectFailure,
    event::tcp_flags_str,
    record::Line,
    table::{TimeToFull, stat_fields},
};

pub struct JsonSink<W: Write> {
    out: W,
}

impl<W: Write> JsonSink<W> {
    pub fn new(out: W) -> Self {
        JsonSink { out }
    }

    fn line(&mut self, v: &Value) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, v)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}

pub fn drop_json(rec: &DropRecord) -> Value {
    serde_json::to_value(Line::Drop(rec.into())).unwrap_or_default()
}

pub fn connect_failure_json(rec: &ConnectFailure) -> Value {
    serde_json::to_value(Line::ConnectFailure(rec.into())).unwrap_or_default()
}

pub fn summary_json(s: &Snapshot<'_>) -> Value {
    let netns: Vec<Value> = s
        .tables
        .iter()
        .map(|t| {
            let stats: Map<String, Value> = stat_fields(&t.stats)
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            let rates: Map<String, Value> = t
                .rates
                .iter()
                .map(|(k, v)| (k.to_string(), json!(round2(*v))))
                .collect();
            json!({
                "inode": t.inode,
                "name": t.name,
                "pod": t.names.pod,
                "processes": t.names.processes,
                "count": t.entries,
                "max": t.max,
                "fill_pct": round2(t.fill()),
                "insert_rate": round2(t.insert_rate),
                "drop_rate": round2(t.drop_rate),
                "time_to_full_s": match t.time_to_full {
                    TimeToFull::Full => json!(0),
                    TimeToFull::In(d) => json!(d.as_secs()),
                    _ => Value::Null,
                },
                "stats": stats,
                "rates": rates,
                "table_source": t.source,
            })
        })
        .collect();
    let top_flows: Vec<Value> = s
        .top_flows
        .iter()
        .map(|f| {
            let mut v = drop_json(&f.first);
            v["type"] = json!("flow");
            v["packets"] = json!(f.packets());
            v["last_seen"] = json!(rfc3339(f.last_seen));
            v["tcp_flags"] = json!(tcp_flags_str(f.tcp_flags));
            v
        })
        .collect();
    let occupancy: Vec<Value> = s
        .occupancy
        .iter()
        .map(|(inode, source, b)| {
            let mut v = crate::occupancy::breakdown_json(b);
            v["inode"] = json!(inode);
            v["source"] = json!(source);
            v
        })
        .collect();
    json!({
        "type": "summary",
        "time": rfc3339(s.time),
        "final": s.is_final,
        "elapsed_s": s.elapsed.as_secs_f64(),
        "strategy": s.strategy.map(|st| st.name()),
        "lost_events": s.counters.lost_events,
        "netfilter_drops": s.counters.netfilter_drops,
        "undecoded": s.counters.undecoded,
        "netns": netns,
        "drops": s.groups,
        "evictions": s.evictions,
        "occupancy": occupancy,
        "evicted_total": s.counters.evictions,
        "gc_evicted_total": s.counters.gc_evictions,
        "agreement": s.agreement,
        "top_flows": top_flows,
        "flows_forgotten": s.flows_forgotten,
        "detail_held_back": s.held_back,
        "totals_map_full": s.counters.totals_full,
        "stale_probe_state": s.counters.stale_state,
        "capabilities": s.caps,
        "kernel_log": s.kernel_log.as_ref().map(kernel_log_json),
        "connects": s.connect_counters.map(|_| &s.connects),
        "connect_counters": s.connect_counters,
        "correlation": s
            .caps
            .filter(|c| c.drops == crate::tier::DropSight::Correlated)
            .map(|_| correlation_json(&s.counters)),
        "devices": s.devices,
        "warnings": s.device_warnings,
        "netns_left_out": s.netns_left_out,
        "sink_errors": s
            .sink_health
            .iter()
            .map(|h| (h.name.to_string(), json!({"errors": h.errors, "failing": h.failing})))
            .collect::<serde_json::Map<_, _>>(),
    })
}

/// A correlating tier's bookkeeping: every opening packet is either held
/// (then passed or judged) or counted as never judged.
pub fn correlation_json(c: &crate::readings::Counters) -> Value {
    json!({
        "opened": c.tc_opened,
        "passed": c.tc_passed,
        "repeated": c.tc_repeated,
        "judged_dropped": c.tc_judged,
        "pending": c.tc_pending,
        "not_judged_map_full": c.tc_pending_full,
        "not_judged_key_clash": c.tc_key_clash,
        "not_judged_unknown_device": c.tc_unknown_device,
        "skipped_encapsulated": c.tc_encapsulated,
        "unattributed": c.tc_unattributed,
    })
}

/// The kernel log's table-full witnesses: `{"table_full","lines",
/// "suppressed","last_at","by_netns":{"<inode>":lines},"overwritten"}`.
pub fn kernel_log_json(t: &crate::kernel::kmsg::Tally) -> Value {
    let by_netns: Map<String, Value> = t
        .by_netns
        .iter()
        .map(|(ns, n)| (ns.to_string(), json!(n)))
        .collect();
    json!({
        "table_full": t.table_full,
        "lines": t.lines,
        "suppressed": t.suppressed,
        "last_at": t.last_at_usec.map(|u| rfc3339(crate::kernel::kmsg::boot_to_wall(u))),
        "by_netns": by_netns,
        "overwritten": t.overwritten,
    })
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

impl<W: Write> Sink for JsonSink<W> {
    fn dropped_flow(&mut self, rec: &DropRecord) -> std::io::Result<()> {
        self.line(&drop_json(rec))
    }

    fn connect_failure(&mut self, rec: &ConnectFailure) -> std::io::Result<()> {
        self.line(&connect_failure_json(rec))
    }

    fn summary(&mut self, snap: &Snapshot<'_>) -> std::io::Result<()> {
        self.line(&summary_json(snap))
    }
}
