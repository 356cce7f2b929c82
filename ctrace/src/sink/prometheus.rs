//! Prometheus exposition of every summary: conntrack's gauges and
//! statistics per namespace, and ctrace's own series.
//!
//! Every series is `ctrace_`: node_exporter exports the host namespace's
//! `node_nf_conntrack_*` itself, and the same names from two jobs (or a
//! `--textfile` beside its collector) would clash. No label is one the
//! Prometheus Operator sets on every target (`pod`, `namespace`, `node`,
//! `container`, `service`, `endpoint`, `instance`, `job`), which it would
//! rename to `exported_*`: a catalog service is `service_name`, a
//! Kubernetes pod `k8s_namespace` and `k8s_pod`.
//!
//! The text is rendered once per interval, from the same snapshot the other
//! sinks see, and published as one immutable buffer. Scrapes (the HTTP
//! endpoint) and the textfile only ever copy that buffer, so a slow or
//! hostile scraper can never hold up tracing, and every scrape of one
//! interval sees the same numbers.
//!
//! Labels are bounded by construction: namespace, service (catalog names or
//! "other"), cause, protocol, conntrack state; never an address, a port or
//! free text such as process names.
use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use super::{
    Sink, Snapshot,
    text_format::{self, FamilyHandle, Kind},
};
use crate::{
    aggregate::DropRecord,
    filling::FillBy,
    ledger::Trust,
    table::{TimeToFull, stat_fields},
    tier::Strategy,
};
use bytes::Bytes;

/// The statistics node_exporter's conntrack collector reads (plus the
/// deprecated, always-zero `ignore`), as counters of ctrace's own.
const CONNTRACK_STATS: [&str; 7] = [
    "found",
    "invalid",
    "insert",
    "insert_failed",
    "drop",
    "early_drop",
    "search_restart",
];

/// Service label of flows and entries the catalog has no name for.
const NO_SERVICE: &str = "other";

/// The newest exposition text, shared with the HTTP endpoint.
#[derive(Clone, Default)]
pub struct Exposition(Arc<Mutex<Bytes>>);

impl Exposition {
    /// What a scrape returns: empty until the first summary.
    pub fn latest(&self) -> Bytes {
        self.0.lock().map(|b| b.clone()).unwrap_or_default()
    }

    fn publish(&self, text: Bytes) {
        if let Ok(mut b) = self.0.lock() {
            *b = text;
        }
    }
}

/// node_exporter runs as its own user: it must be able to read the file.
pub const TEXTFILE_MODE: u32 = 0o644;

pub struct PrometheusSink {
    exposition: Option<Exposition>,
    /// node_exporter's textfile collector reads `*.prom` files in a
    /// directory; the file is replaced atomically (rename) each interval.
    textfile: Option<PathBuf>,
}

impl PrometheusSink {
    pub fn new(exposition: Option<Exposition>, textfile: Option<PathBuf>) -> Self {
        PrometheusSink {
            exposition,
            textfile,
        }
    }

    fn write_textfile(&self, text: &[u8]) -> std::io::Result<()> {
        let Some(path) = &self.textfile else {
            return Ok(());
        };
        // The collector must never read half a file, and its directory is
        // often another account's: see files::replace.
        crate::files::replace(path, text, TEXTFILE_MODE)
    }
}

impl Sink for PrometheusSink {
    fn dropped_flow(&mut self, _rec: &DropRecord) -> std::io::Result<()> {
        // Counted in the totals of the next summary; flows are not labels.
        Ok(())
    }

    fn summary(&mut self, snap: &Snapshot<'_>) -> std::io::Result<()> {
        let text = Bytes::from(render(snap).map_err(std::io::Error::other)?);
        // The endpoint first: a textfile that cannot be written must not
        // leave scrapes with stale numbers.
        if let Some(e) = &self.exposition {
            e.publish(text.clone());
        }
        self.write_textfile(&text)
    }
}

/// Families are registered as they are made; every one of them is filled
/// from the snapshot alone.
#[derive(Default)]
struct Families(text_format::Families);

impl Families {
    fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> text_format::Result<FamilyHandle> {
        self.0.register(Kind::Gauge, name, help, labels)
    }

    fn float(&self, name: &str, help: &str, labels: &[&str]) -> text_format::Result<FamilyHandle> {
        self.0.register(Kind::Gauge, name, help, labels)
    }

    fn counter(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> text_format::Result<FamilyHandle> {
        self.0.register(Kind::Counter, name, help, labels)
    }
}

/// Totals ctrace reports only grow; rows of a snapshot that share a label
/// set (protocols without a name of their own) add up.
fn set_counter(c: &FamilyHandle, labels: &[&str], total: u64) {
    c.with_label_values(labels).add(total);
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The exposition text of one snapshot.
pub fn render(s: &Snapshot<'_>) -> text_format::Result<Vec<u8>> {
    let f = Families::default();
    conntrack_series(&f, s)?;
    ctrace_series(&f, s)?;
    Ok(f.0.render()?.into_bytes())
}

fn conntrack_series(f: &Families, s: &Snapshot<'_>) -> text_format::Result<()> {
    let entries = f.gauge(
        "ctrace_conntrack_entries",
        "Number of currently allocated flow entries for connection tracking.",
        &["netns"],
    )?;
    let limit = f.gauge(
        "ctrace_conntrack_entries_limit",
        "Maximum size of connection tracking table.",
        &["netns"],
    )?;
    let stats = CONNTRACK_STATS
        .iter()
        .map(|name| {
            f.counter(
                &format!("ctrace_conntrack_stat_{name}_total"),
                &format!("conntrack's `{name}` statistic, summed over CPUs."),
                &["netns"],
            )
            .map(|g| (*name, g))
        })
        .collect::<text_format::Result<Vec<_>>>()?;
    for t in &s.tables {
        let ns = t.inode.to_string();
        entries
            .with_label_values(&[&ns])
            .set(gauge_value(t.entries));
        limit.with_label_values(&[&ns]).set(gauge_value(t.max));
        for (name, v) in stat_fields(&t.stats) {
            if let Some((_, g)) = stats.iter().find(|(n, _)| *n == name) {
                set_counter(g, &[&ns], v);
            }
        }
    }
    Ok(())
}

/// The node view, labelled as the drop series are, so that a dashboard can
/// put "the router dropped etcd-peer SYNs" beside "the nodes' etcd-peer
/// connects timed out".
fn connect_series(f: &Families, s: &Snapshot<'_>) -> text_format::Result<()> {
    let Some(c) = s.connect_counters else {
        return Ok(());
    };
    let labels = ["netns", "service_name", "proto"];
    let attempts = f.counter(
        "ctrace_connect_attempts_total",
        "Outgoing TCP connection attempts of this host (sockets that entered SYN_SENT).",
        &labels,
    )?;
    let established = f.counter(
        "ctrace_connect_established_total",
        "Outgoing attempts that completed the handshake.",
        &labels,
    )?;
    let failures = f.counter(
        "ctrace_connect_failures_total",
        "Outgoing attempts that failed, by how: timeout (no answer), refused (RST), unreachable (ICMP error), aborted (the application gave up first).",
        &["netns", "service_name", "proto", "outcome"],
    )?;
    let syn_retransmits = f.counter(
        "ctrace_connect_syn_retransmits_total",
        "SYNs of outgoing attempts that had to be retransmitted.",
        &labels,
    )?;
    let synack_retransmits = f.counter(
        "ctrace_synack_retransmits_total",
        "SYN-ACKs this host's listeners retransmitted, by the listener's service: clients that did not complete the handshake.",
        &labels,
    )?;
    for r in &s.connects {
        let ns = r.netns.to_string();
        let v = [
            &ns,
            r.service.as_deref().unwrap_or(NO_SERVICE),
            r.proto.name(),
        ];
        set_counter(&attempts, &v, r.attempts);
        set_counter(&established, &v, r.established);
        set_counter(&syn_retransmits, &v, r.syn_retransmits);
        set_counter(&synack_retransmits, &v, r.synack_retransmits);
        for (outcome, n) in r.failures() {
            set_counter(&failures, &[v[0], v[1], v[2], outcome.name()], n);
        }
    }
    let lost = f.counter(
        "ctrace_connect_lost_records_total",
        "Failed-attempt records the ring buffer had no room for (the counters above still count them).",
        &[],
    )?;
    set_counter(&lost, &[], c.lost_events);
    Ok(())
}

fn ctrace_series(f: &Families, s: &Snapshot<'_>) -> text_format::Result<()> {
    let sink_errors = f.counter(
        "ctrace_sink_errors_total",
        "Writes an output (the recording, the textfile) failed or skipped while failing; tracing goes on.",
        &["sink"],
    )?;
    for h in &s.sink_health {
        set_counter(&sink_errors, &[h.name], h.errors);
    }
    let left_out = f.gauge(
        "ctrace_netns_left_out",
        "Network namespaces not watched: ctrace watches at most 1024 (those with drops always); narrow with --netns.",
        &[],
    )?;
    left_out.with_label_values(&[]).set(s.netns_left_out as i64);
    let info = f.gauge(
        "ctrace_build_info",
        "ctrace's version; always 1.",
        &["version"],
    )?;
    info.with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1_i64);
    let strategy = f.gauge(
        "ctrace_strategy",
        "1 for the hook strategy ctrace traces with, 0 for the others.",
        &["strategy"],
    )?;
    for st in Strategy::ALL {
        strategy
            .with_label_values(&[st.name()])
            .set(i64::from(Some(st) == s.strategy));
    }
    f.float(
        "ctrace_last_update_timestamp_seconds",
        "When ctrace rendered these numbers (Unix time).",
        &[],
    )?
    .with_label_values(&[])
    .set(
        s.time
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
    );

    let filling = f.float(
        "ctrace_filling_new_entries_per_second",
        "New conntrack entries per second in the last interval, for the top 10 source pods and services (by: src_pod, service) per namespace: who is filling the table now. Source prefixes are in the JSON only: addresses are no labels.",
        &["netns", "by", "key"],
    )?;
    for r in s.filling.iter().filter(|r| r.by != FillBy::SrcPrefix) {
        filling
            .with_label_values(&[&r.netns.to_string(), r.by.name(), &r.key])
            .set(r.per_s);
    }
    if let Some(n) = s.filling_overruns {
        let c = f.counter(
            "ctrace_filling_overruns_total",
            "Times ctnetlink dropped new-entry announcements: the filling rates are a sample meanwhile.",
            &[],
        )?;
        set_counter(&c, &[], n);
    }
    if let Some(share) = s.filling_listened {
        let g = f.float(
            "ctrace_filling_listened_ratio",
            "Least share of the last interval that ctnetlink's announcements were listened to in any watched namespace: below 1, new entries came faster than --announcements-per-s and the filling rates are scaled from that sample.",
            &[],
        )?;
        g.with_label_values(&[]).set(share);
    }
    if let Some(n) = s.filling_unattributed {
        let c = f.counter(
            "ctrace_filling_unattributed_total",
            "New entries the tc tier saw pass but could not attribute to an opener (too many distinct openers between reads): the filling rates are a sample meanwhile.",
            &[],
        )?;
        set_counter(&c, &[], n);
    }

    let netns_info = f.gauge(
        "ctrace_netns_info",
        "Names of a network namespace: its /run/netns name and its Kubernetes pod; always 1. Its processes are in the JSON summary (free text is no label).",
        &["netns", "netns_name", "k8s_namespace", "k8s_pod"],
    )?;
    let ttf = f.float(
        "ctrace_conntrack_time_to_full_seconds",
        "Seconds until the table is full at its current growth (0: full now); absent when it is not growing.",
        &["netns"],
    )?;
    let fill = f.float(
        "ctrace_conntrack_fill_ratio",
        "Entries over nf_conntrack_max.",
        &["netns"],
    )?;
    for t in &s.tables {
        let ns = t.inode.to_string();
        let (k8s_namespace, k8s_pod) = t
            .names
            .pod
            .as_deref()
            .and_then(|p| p.split_once('/'))
            .unwrap_or(("", ""));
        netns_info
            .with_label_values(&[&ns, t.name.as_deref().unwrap_or(""), k8s_namespace, k8s_pod])
            .set(1_i64);
        fill.with_label_values(&[&ns]).set(t.fill() / 100.0);
        match t.time_to_full {
            TimeToFull::Full => ttf.with_label_values(&[&ns]).set(0.0),
            TimeToFull::In(d) => ttf.with_label_values(&[&ns]).set(d.as_secs_f64()),
            TimeToFull::NotGrowing | TimeToFull::Unknown => {}
        }
    }

    let labels = ["netns", "service_name", "cause", "proto"];
    let packets = f.counter(
        "ctrace_drops_packets_total",
        "Packets netfilter dropped, by the cause ctrace attributed and the service of the flow.",
        &labels,
    )?;
    let flows = f.counter(
        "ctrace_drops_flows_total",
        "Distinct flows netfilter dropped packets of, by cause and service.",
        &labels,
    )?;
    for g in &s.groups {
        let v = [
            &g.netns.to_string(),
            g.service.as_deref().unwrap_or(NO_SERVICE),
            g.cause.name(),
            g.proto.name(),
        ];
        set_counter(&packets, &v, g.packets);
        set_counter(&flows, &v, g.flows);
    }

    let evictions = f.counter(
        "ctrace_evictions_total",
        "Entries conntrack evicted before their time to make room (by early_drop or by the garbage collector above 95% fill), by whose they were.",
        &["netns", "service_name", "proto", "by"],
    )?;
    for e in &s.evictions {
        let by = match e.by {
            crate::readings::Evictor::EarlyDrop => "early_drop",
            crate::readings::Evictor::Gc => "gc",
        };
        set_counter(
            &evictions,
            &[
                &e.netns.to_string(),
                e.service.as_deref().unwrap_or(NO_SERVICE),
                e.proto.name(),
                by,
            ],
            e.entries,
        );
    }

    let by_service = f.gauge(
        "ctrace_occupancy_entries",
        "Entries in the table by the service of their destination port.",
        &["netns", "service_name"],
    )?;
    let by_state = f.gauge(
        "ctrace_occupancy_tcp_state_entries",
        "TCP entries in the table by conntrack state.",
        &["netns", "state"],
    )?;
    let unreplied = f.gauge(
        "ctrace_occupancy_unreplied_entries",
        "Entries nothing ever answered.",
        &["netns"],
    )?;
    // The gauges above are as old as this where no events keep them: a
    // large table's re-dumps are spaced 100 times their own time apart.
    let dump_age = f.gauge(
        "ctrace_occupancy_dump_age_seconds",
        "Seconds since the table dump the occupancy gauges started from.",
        &["netns"],
    )?;
    for (inode, _, b) in &s.occupancy {
        let ns = inode.to_string();
        for (service, n) in &b.by_service {
            by_service
                .with_label_values(&[&ns, service])
                .set(gauge_value(*n));
        }
        for (state, n) in &b.by_tcp_state {
            by_state
                .with_label_values(&[&ns, state])
                .set(gauge_value(*n));
        }
        unreplied
            .with_label_values(&[&ns])
            .set(gauge_value(b.unreplied));
        dump_age
            .with_label_values(&[&ns])
            .set(gauge_value(b.dump_age_s));
    }

    connect_series(f, s)?;

    let kernel = f.counter(
        "ctrace_selfcheck_kernel_drops_total",
        "conntrack's own `drop` count since ctrace started watching the namespace.",
        &["netns"],
    )?;
    let attributed = f.counter(
        "ctrace_selfcheck_attributed_drops_total",
        "Of those, the packets ctrace attributed to a cause conntrack counts.",
        &["netns"],
    )?;
    let trust = f.gauge(
        "ctrace_selfcheck_trust",
        "1 for the self-check's current verdict on the namespace (exact, disagrees, inferred, no_counters), 0 for the others.",
        &["netns", "trust"],
    )?;
    // One series per sampled namespace from the start, at zero until a
    // drop: an alert on its increase then sees the first drop too.
    let table_full = f.counter(
        "ctrace_table_full_drops_total",
        "Packets dropped because the namespace's conntrack table was full (all services).",
        &["netns"],
    )?;
    for t in &s.tables {
        let n = s
            .agreement
            .iter()
            .find(|a| a.netns == t.inode)
            .map_or(0, |a| a.table_full);
        set_counter(&table_full, &[&t.inode.to_string()], n);
    }
    for a in &s.agreement {
        let ns = a.netns.to_string();
        set_counter(&kernel, &[&ns], a.kernel);
        set_counter(&attributed, &[&ns], a.attributed);
        for (t, name) in [
            (Trust::Exact, "exact"),
            (Trust::Disagrees, "disagrees"),
            (Trust::Inferred, "inferred"),
            (Trust::NoCounters, "no_counters"),
        ] {
            trust
                .with_label_values(&[&ns, name])
                .set(i64::from(a.trust == t));
        }
    }

    let c = &s.counters;
    for (name, help, v) in [
        (
            "ctrace_lost_events_total",
            "Events the kernel could not hand to ctrace (ring buffer full); totals still count their packets.",
            c.lost_events,
        ),
        (
            "ctrace_totals_map_full_total",
            "Packets the kernel's totals map had no room for.",
            c.totals_full,
        ),
        (
            "ctrace_flows_forgotten_total",
            "Dropped flows ctrace stopped keeping in detail (totals keep them).",
            s.flows_forgotten,
        ),
    ] {
        set_counter(&f.counter(name, help, &[])?, &[], v);
    }
    let held_back = f.counter(
        "ctrace_detail_held_back_flows_total",
        "New dropped flows the kernel's detail budget (--detail-budget) kept out of drop records and top flows; their packets are in the drop totals.",
        &["netns", "service_name"],
    )?;
    for h in &s.held_back {
        let ns = h.netns.to_string();
        set_counter(
            &held_back,
            &[&ns, h.service.as_deref().unwrap_or(NO_SERVICE)],
            h.flows,
        );
    }
    Ok(())
}

/// Namespaces a snapshot names, for tests and the live view.
pub fn namespaces(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| l.starts_with("ctrace_conntrack_entries{"))
        .filter_map(|l| l.split("netns=\"").nth(1)?.split('"').next())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::symlink};

    use super::*;

    /// node_exporter's textfile directory belongs to its own account,
    /// which can plant links at FILE and at any fixed name beside it.
    #[test]
    fn textfile_links_are_replaced_never_followed() {
        let Some(dir) = crate::files::tests::foreign_dir("textfile") else {
            return;
        };
        let victims = [dir.with_extension("v1"), dir.with_extension("v2")];
        for v in &victims {
            fs::write(v, "precious\n").unwrap();
        }
        let file = dir.join("ctrace.prom");
        symlink(&victims[0], &file).unwrap();
        symlink(&victims[1], dir.join("ctrace.prom.tmp")).unwrap();
        let sink = PrometheusSink::new(None, Some(file.clone()));
        sink.write_textfile(b"ctrace_up 1\n").unwrap();
        let kept: Vec<String> = victims
            .iter()
            .map(|v| fs::read_to_string(v).unwrap())
            .collect();
        let written = fs::symlink_metadata(&file).map(|m| m.is_file());
        let text = fs::read_to_string(&file).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        for v in &victims {
            fs::remove_file(v).unwrap();
        }
        assert_eq!(kept, ["precious\n", "precious\n"]);
        assert_eq!(written.ok(), Some(true));
        assert_eq!(text, "ctrace_up 1\n");
    }
}
