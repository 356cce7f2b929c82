//! NDJSON on stdout: one object per line, for scripts. Every line is a
//! [`Line`] of record.rs, the types `report` reads back; the schema is
//! part of the interface (docs/output.md): add fields, never rename them.
use std::io::Write;

use super::{Sink, Snapshot};
use crate::{
    aggregate::{DropRecord, FlowEntry},
    connects::ConnectFailure,
    event::tcp_flags_str,
    readings::Counters,
    record::{
        Correlation, FlowLine, FlowTag, KernelLog, Line, NetnsLine, OccupancyLine, SinkErrors,
        Summary,
    },
    table::{TableView, TimeToFull, stat_fields},
    tier::DropSight,
};

pub struct JsonSink<W: Write> {
    out: W,
}

impl<W: Write> JsonSink<W> {
    pub fn new(out: W) -> Self {
        JsonSink { out }
    }
}

/// Writes one record as a line.
pub fn write_line(out: &mut impl Write, line: &Line) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, line)?;
    out.write_all(b"\n")?;
    out.flush()
}

/// The summary record of a snapshot.
pub fn summary(s: &Snapshot<'_>) -> Summary {
    Summary {
        time: s.time,
        is_final: s.is_final,
        elapsed_s: s.elapsed.as_secs_f64(),
        strategy: s.strategy,
        lost_events: s.counters.lost_events,
        netfilter_drops: s.counters.netfilter_drops,
        undecoded: s.counters.undecoded,
        netns: s.tables.iter().map(netns_line).collect(),
        drops: s.groups.clone(),
        evictions: s.evictions.clone(),
        occupancy: s
            .occupancy
            .iter()
            .map(|(inode, kept, b)| OccupancyLine::of(*inode, *kept, b))
            .collect(),
        evicted_total: s.counters.evictions,
        gc_evicted_total: s.counters.gc_evictions,
        agreement: s.agreement.clone(),
        top_flows: s.top_flows.iter().map(|f| flow_line(f)).collect(),
        flows_forgotten: s.flows_forgotten,
        detail_held_back: s.held_back.clone(),
        totals_map_full: s.counters.totals_full,
        stale_probe_state: s.counters.stale_state,
        capabilities: s.caps,
        kernel_log: s.kernel_log.as_ref().map(kernel_log),
        connects: s.connect_counters.map(|_| s.connects.clone()),
        connect_counters: s.connect_counters,
        correlation: s
            .caps
            .filter(|c| c.drops == DropSight::Correlated)
            .map(|_| correlation(&s.counters)),
        devices: s.devices.clone(),
        warnings: s.device_warnings.clone(),
        netns_left_out: s.netns_left_out as u64,
        sink_errors: s
            .sink_health
            .iter()
            .map(|h| {
                let e = SinkErrors {
                    errors: h.errors,
                    failing: h.failing.clone(),
                };
                (h.name.to_string(), e)
            })
            .collect(),
        filling: s.filling.clone(),
        filling_overruns: s.filling_overruns,
        filling_listened: s.filling_listened,
        filling_unattributed: s.filling_unattributed,
    }
}

fn netns_line(t: &TableView) -> NetnsLine {
    NetnsLine {
        inode: t.inode,
        name: t.name.clone(),
        pod: t.names.pod.clone(),
        processes: t.names.processes.clone(),
        count: t.entries,
        max: t.max,
        fill_pct: round2(t.fill()),
        insert_rate: round2(t.insert_rate),
        drop_rate: round2(t.drop_rate),
        time_to_full_s: match t.time_to_full {
            TimeToFull::Full => Some(0),
            TimeToFull::In(d) => Some(d.as_secs()),
            TimeToFull::NotGrowing | TimeToFull::Unknown => None,
        },
        stats: stat_fields(&t.stats)
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        rates: t
            .rates
            .iter()
            .map(|(k, v)| (k.to_string(), round2(*v)))
            .collect(),
        table_source: Some(t.source),
    }
}

fn flow_line(f: &FlowEntry) -> FlowLine {
    let mut first = crate::record::Drop::from(&f.first);
    // Every flag the flow's dropped packets carried, not only the first's.
    first.tcp_flags = tcp_flags_str(f.tcp_flags);
    FlowLine {
        kind: FlowTag::Flow,
        first,
        packets: f.packets(),
        last_seen: f.last_seen,
    }
}

fn correlation(c: &Counters) -> Correlation {
    Correlation {
        opened: c.tc_opened,
        passed: c.tc_passed,
        repeated: c.tc_repeated,
        judged_dropped: c.tc_judged,
        pending: c.tc_pending,
        not_judged_map_full: c.tc_pending_full,
        not_judged_key_clash: c.tc_key_clash,
        not_judged_unknown_device: c.tc_unknown_device,
        skipped_encapsulated: c.tc_encapsulated,
        unattributed: c.tc_unattributed,
    }
}

fn kernel_log(t: &crate::kernel::kmsg::Tally) -> KernelLog {
    KernelLog {
        table_full: t.table_full,
        lines: t.lines,
        suppressed: t.suppressed,
        last_at: t.last_at_usec.map(crate::kernel::kmsg::boot_to_wall),
        by_netns: t
            .by_netns
            .iter()
            .map(|(ns, n)| (ns.to_string(), *n))
            .collect(),
        overwritten: t.overwritten,
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

impl<W: Write> Sink for JsonSink<W> {
    fn dropped_flow(&mut self, rec: &DropRecord) -> std::io::Result<()> {
        write_line(&mut self.out, &Line::Drop(rec.into()))
    }

    fn connect_failure(&mut self, rec: &ConnectFailure) -> std::io::Result<()> {
        write_line(&mut self.out, &Line::ConnectFailure(rec.into()))
    }

    fn summary(&mut self, snap: &Snapshot<'_>) -> std::io::Result<()> {
        write_line(&mut self.out, &Line::Summary(Box::new(summary(snap))))
    }
}
