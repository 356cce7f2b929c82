//! Output sinks. They only consume: every decision (cause, service, totals)
//! is made upstream, so the live view, plain lines and NDJSON can never
//! disagree. A Prometheus exporter or an incident recorder is one more
//! implementation of [`Sink`].
pub mod guard;
pub mod json;
pub mod live;
pub mod plain;
pub mod prometheus;
pub mod record;
pub mod text_format;

use std::time::{Duration, SystemTime};

use crate::{
    aggregate::{DropRecord, EvictionGroup, FlowEntry},
    connects::{ConnectCounters, ConnectFailure, ConnectRow},
    ledger::{Agreement, DropGroup, Trust},
    readings::Counters,
    table::{TableView, TimeToFull},
    tier::{Capabilities, Strategy},
};

/// Everything a periodic or final report shows.
pub struct Snapshot<'a> {
    pub time: SystemTime,
    pub elapsed: Duration,
    /// None where no drop tier runs (`ctrace status`, `--side node`).
    pub strategy: Option<Strategy>,
    /// None where no drop tier runs.
    pub caps: Option<Capabilities>,
    pub counters: Counters,
    pub tables: Vec<TableView>,
    /// Per namespace: how the breakdown is kept, and the breakdown.
    pub occupancy: Vec<(u64, crate::occupancy::Kept, crate::occupancy::Breakdown)>,
    pub groups: Vec<DropGroup>,
    pub evictions: Vec<EvictionGroup>,
    /// The self-check, per namespace.
    pub agreement: Vec<Agreement>,
    pub top_flows: Vec<&'a FlowEntry>,
    /// Flows dropped from the bounded detail (totals keep them).
    pub flows_forgotten: u64,
    /// New flows the kernel's detail budget never announced.
    pub held_back: Vec<crate::ledger::HeldBack>,
    /// Table-full witnesses in the kernel log since start; None when
    /// /dev/kmsg cannot be read (or nothing traces, as in `ctrace status`).
    pub kernel_log: Option<crate::kernel::kmsg::Tally>,
    /// The node view: this host's connection attempts per namespace and
    /// service, and its own losses; None when it is off.
    pub connects: Vec<ConnectRow>,
    pub connect_counters: Option<ConnectCounters>,
    /// A device-hooking tier (tc): every device of the watched namespaces,
    /// hooked or not and why, and what it cannot see.
    pub devices: Vec<crate::readings::DeviceChoice>,
    pub device_warnings: Vec<String>,
    /// Outputs that failed and were kept going (recording, textfile).
    pub sink_health: Vec<guard::SinkHealth>,
    /// Namespaces not watched: past `table::MAX_TABLES`, without drops.
    pub netns_left_out: usize,
    /// Who made the most new entries per namespace in the last interval.
    pub filling: Vec<crate::filling::FillingRow>,
    /// Times ctnetlink dropped new-entry announcements (the tops are a
    /// sample then); None where insert events feed them.
    pub filling_overruns: Option<u64>,
    pub filling_listened: Option<f64>,
    /// Passed flows the tc tier could not attribute to an opener.
    pub filling_unattributed: Option<u64>,
    pub is_final: bool,
}

impl Snapshot<'_> {
    /// A snapshot of nothing traced: what `status` and tests fill in.
    pub fn idle(time: SystemTime, elapsed: Duration) -> Self {
        Snapshot {
            time,
            elapsed,
            strategy: None,
            caps: None,
            counters: Counters::default(),
            tables: vec![],
            occupancy: vec![],
            groups: vec![],
            evictions: vec![],
            agreement: vec![],
            top_flows: vec![],
            held_back: vec![],
            flows_forgotten: 0,
            kernel_log: None,
            connects: vec![],
            connect_counters: None,
            devices: vec![],
            device_warnings: vec![],
            sink_health: vec![],
            netns_left_out: 0,
            filling: vec![],
            filling_overruns: None,
            filling_listened: None,
            filling_unattributed: None,
            is_final: false,
        }
    }
}

/// The self-check in words, for the live view and plain lines.
pub fn agreement_text(a: &Agreement) -> String {
    let ratio = a
        .ratio
        .map_or_else(|| "-".to_string(), |r| format!("{r:.3}"));
    let trust = match a.trust {
        Trust::Exact => "exact tier, counters agree",
        Trust::Disagrees => {
            "EXACT TIER DISAGREES with conntrack's counters: causes inferred until it agrees"
        }
        Trust::Inferred => "causes inferred from conntrack's counters",
        Trust::NoCounters => "conntrack's counters unreadable",
    };
    let mut t = format!(
        "self-check: {} of conntrack's {} drops attributed (ratio {ratio}); {trust}",
        a.attributed, a.kernel
    );
    if a.unseen > 0 {
        t += &format!("; {} never seen by ctrace", a.unseen);
    }
    t
}

pub trait Sink {
    /// A dropped flow, at first sighting.
    fn dropped_flow(&mut self, rec: &DropRecord) -> std::io::Result<()>;
    /// A failed connection attempt of this host (node view), as it ends.
    /// Sinks that show only totals take them from the summary.
    fn connect_failure(&mut self, _rec: &ConnectFailure) -> std::io::Result<()> {
        Ok(())
    }
    /// Every interval, and once more at exit with `is_final`.
    fn summary(&mut self, snap: &Snapshot<'_>) -> std::io::Result<()>;
    /// Failures so far, for sinks that outlive them ([`guard::Guarded`]).
    fn health(&self) -> Option<guard::SinkHealth> {
        None
    }
}

pub use crate::event::rfc3339;

pub fn ttf_text(t: TimeToFull) -> String {
    match t {
        TimeToFull::Full => "FULL".into(),
        TimeToFull::In(d) if d.as_secs() >= 86400 * 3 => "days".into(),
        TimeToFull::In(d) => {
            humantime::format_duration(Duration::from_secs(d.as_secs().max(1))).to_string()
        }
        TimeToFull::NotGrowing => "not growing".into(),
        TimeToFull::Unknown => "-".into(),
    }
}

/// "4026532301 (router) pod kube-system/etcd-0 [etcd]": the inode, and
/// every name people know the namespace by.
pub fn netns_label(t: &TableView) -> String {
    // Every name here is someone else's text: a netns file name, a pod,
    // process names any user can set.
    use crate::text::terminal;
    let mut l = match &t.name {
        Some(n) => format!("{} ({})", t.inode, terminal(n)),
        None => t.inode.to_string(),
    };
    if let Some(pod) = &t.names.pod {
        l += &format!(" pod {}", terminal(pod));
    }
    if !t.names.processes.is_empty() {
        let names: Vec<String> = t.names.processes.iter().map(|p| terminal(p)).collect();
        l += &format!(" [{}]", names.join(","));
    }
    l
}

/// An address and port, with the pod of this node that has the address
/// ("10.244.1.7:43122 (pod default/web-0)"); the pod's name is someone
/// else's text.
pub fn endpoint_text(
    addr: std::net::SocketAddr,
    pod: Option<&str>,
    service: Option<&str>,
) -> String {
    let names: Vec<String> = [("pod", pod), ("svc", service)]
        .into_iter()
        .filter_map(|(what, name)| Some(format!("{what} {}", crate::text::terminal(name?))))
        .collect();
    if names.is_empty() {
        addr.to_string()
    } else {
        format!("{addr} ({})", names.join(", "))
    }
}

/// A service name (from the catalog, or the user's files) for a terminal
/// or a plain line; flows no service claims are `other`.
pub fn service_text(service: Option<&str>) -> String {
    crate::text::terminal(service.unwrap_or("other"))
}
