//! The records ctrace writes (NDJSON on stdout, recordings) and reads back
//! (`report`): one set of serde types for both sides, tagged by `type`, so
//! writer and reader cannot drift apart. Causes, protocols, strategies and
//! outcomes stay enums on both sides; a line with a value ctrace never
//! writes is refused as a whole.
#[cfg(test)]
mod reference;

use std::{collections::BTreeMap, time::SystemTime};

use serde::{Deserialize, Serialize};

use crate::{
    aggregate::{DropRecord, EvictionGroup},
    cause::Cause,
    connects::{ConnectCounters, ConnectFailure, ConnectRow, Outcome},
    conntrack::TableSource,
    event::Proto,
    filling::FillingRow,
    ledger::{Agreement, DropGroup, HeldBack},
    occupancy::{Breakdown, Kept},
    readings::DeviceChoice,
    strategy::Verdict,
    tier::{Capabilities, Strategy},
};

/// `type` of a recording's first line.
pub const HEADER_TYPE: &str = "recording";
/// The recording format. A reader takes every version up to its own (older
/// ones lack fields, which read as absent) and refuses newer ones by name.
pub const SCHEMA_VERSION: u32 = 1;

/// One NDJSON line: the typed record under its `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub enum Line {
    Recording(Header),
    Drop(Drop),
    ConnectFailure(ConnectFailureLine),
    Summary(Box<Summary>),
    /// `ctrace status --json`: a summary of the tables, nothing traced.
    Status(Box<Summary>),
    /// `ctrace probe --json`: what this kernel can run.
    Probe(Probe),
}

/// A recording file's first line: what it is and what was measured once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct Header {
    pub version: u32,
    pub ctrace: Option<String>,
    pub host: Option<String>,
    pub kernel: Option<String>,
    /// What one table entry costs this kernel, for sizing advice.
    pub conntrack_entry_bytes: Option<u64>,
    pub buckets: Option<u64>,
    pub started: Option<String>,
}

impl Header {
    /// The header's version is one this ctrace reads; else why not.
    pub fn check_version(&self) -> Result<(), String> {
        if self.version > SCHEMA_VERSION {
            return Err(format!(
                "recording format version {} is newer than this ctrace reads ({SCHEMA_VERSION}); \
                 report it with the ctrace that wrote it ({})",
                self.version,
                self.ctrace.as_deref().unwrap_or("unknown version")
            ));
        }
        Ok(())
    }
}

/// A dropped flow at first sighting (`"type":"drop"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct Drop {
    #[serde(with = "rfc3339")]
    #[cfg_attr(test, schemars(with = "String"))]
    pub time: SystemTime,
    pub netns: u64,
    pub cause: Cause,
    pub evidence: String,
    pub family: Family,
    pub proto: Proto,
    pub src: String,
    pub dst: String,
    pub service: Option<String>,
    /// `namespace/name` of the pod of this node with the source address;
    /// null when it is no pod's (hostNetwork pods share the node's).
    #[serde(default)]
    pub src_pod: Option<String>,
    /// The same for the destination address.
    #[serde(default)]
    pub dst_pod: Option<String>,
    /// `namespace/name:port` of the Kubernetes Service the destination
    /// address and port are, from kube-proxy's rules on this node; null
    /// when they are none (or the rules cannot be read: see `probe`).
    #[serde(default)]
    pub dst_service: Option<String>,
    pub tcp_flags: String,
    pub strategy: Strategy,
}

/// A failed connection attempt of this host (`"type":"connect_failure"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct ConnectFailureLine {
    #[serde(with = "rfc3339")]
    #[cfg_attr(test, schemars(with = "String"))]
    pub time: SystemTime,
    pub netns: u64,
    pub family: Family,
    pub proto: Proto,
    pub src: String,
    pub dst: String,
    pub service: Option<String>,
    /// `namespace/name` of the pod of this node with the source address.
    #[serde(default)]
    pub src_pod: Option<String>,
    /// The same for the destination address.
    #[serde(default)]
    pub dst_pod: Option<String>,
    /// The Kubernetes Service the destination is, as in drop records.
    #[serde(default)]
    pub dst_service: Option<String>,
    pub outcome: Outcome,
    pub syn_retransmits: Option<u32>,
    pub elapsed_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    fn of(ip: std::net::IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::Ipv4
        } else {
            Family::Ipv6
        }
    }
}

impl From<&DropRecord> for Drop {
    fn from(r: &DropRecord) -> Drop {
        Drop {
            time: r.time,
            netns: r.flow.netns,
            cause: r.cause,
            evidence: r.evidence.to_string(),
            family: Family::of(r.flow.src.ip()),
            proto: r.flow.proto,
            src: r.flow.src.to_string(),
            dst: r.flow.dst.to_string(),
            service: r.service.clone(),
            src_pod: r.pods.src.as_deref().map(str::to_string),
            dst_pod: r.pods.dst.as_deref().map(str::to_string),
            dst_service: r.pods.dst_service.as_deref().map(str::to_string),
            tcp_flags: crate::event::tcp_flags_str(r.tcp_flags),
            strategy: r.strategy,
        }
    }
}

impl From<&ConnectFailure> for ConnectFailureLine {
    fn from(f: &ConnectFailure) -> ConnectFailureLine {
        ConnectFailureLine {
            time: f.time,
            netns: f.flow.netns,
            family: Family::of(f.flow.src.ip()),
            proto: f.flow.proto,
            src: f.flow.src.to_string(),
            dst: f.flow.dst.to_string(),
            service: f.service.clone(),
            src_pod: f.pods.src.as_deref().map(str::to_string),
            dst_pod: f.pods.dst.as_deref().map(str::to_string),
            dst_service: f.pods.dst_service.as_deref().map(str::to_string),
            outcome: f.outcome,
            syn_retransmits: f.syn_retransmits,
            elapsed_ms: f.elapsed.map(|d| d.as_millis() as u64),
        }
    }
}

/// Every interval, and once more at exit (`"type":"summary"`): the
/// tables, what was dropped and why, who occupies the tables, the
/// self-check, the node view, and ctrace's own losses. Fields added after
/// a recording was written read as empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct Summary {
    #[serde(with = "rfc3339")]
    #[cfg_attr(test, schemars(with = "String"))]
    pub time: SystemTime,
    /// The summary written at exit.
    #[serde(rename = "final", default)]
    pub is_final: bool,
    #[serde(default)]
    pub elapsed_s: f64,
    /// The drop tier; null without the router view.
    #[serde(default)]
    pub strategy: Option<Strategy>,
    /// Ring-buffer events lost (their totals are kept in the kernel).
    #[serde(default)]
    pub lost_events: u64,
    #[serde(default)]
    pub netfilter_drops: u64,
    /// Ring records this build could not decode.
    #[serde(default)]
    pub undecoded: u64,
    /// One per watched namespace.
    #[serde(default)]
    pub netns: Vec<NetnsLine>,
    /// Attributed totals per (netns, service, cause, proto).
    #[serde(default)]
    pub drops: Vec<DropGroup>,
    /// Entries evicted early, per (netns, service, proto, evictor).
    #[serde(default)]
    pub evictions: Vec<EvictionGroup>,
    /// Who holds each table's entries.
    #[serde(default)]
    pub occupancy: Vec<OccupancyLine>,
    #[serde(default)]
    pub evicted_total: u64,
    #[serde(default)]
    pub gc_evicted_total: u64,
    /// The self-check per namespace: ctrace's attributions against
    /// conntrack's own drop counter.
    #[serde(default)]
    pub agreement: Vec<Agreement>,
    /// The ten flows with the most dropped packets.
    #[serde(default)]
    pub top_flows: Vec<FlowLine>,
    /// Flows dropped from the bounded detail (the totals keep them).
    #[serde(default)]
    pub flows_forgotten: u64,
    /// New flows the kernel's detail budget did not announce, per
    /// (netns, service): in the totals, never in `drop` records.
    #[serde(default)]
    pub detail_held_back: Vec<HeldBack>,
    /// Packets the kernel's totals map had no room for.
    #[serde(default)]
    pub totals_map_full: u64,
    #[serde(default)]
    pub stale_probe_state: u64,
    /// What the drop tier can see; null without the router view.
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    /// Table-full lines in the kernel log since start; null when it cannot
    /// be read.
    #[serde(default)]
    pub kernel_log: Option<KernelLog>,
    /// The node view's rows; null when it is off.
    #[serde(default)]
    pub connects: Option<Vec<ConnectRow>>,
    #[serde(default)]
    pub connect_counters: Option<ConnectCounters>,
    /// A correlating tier's bookkeeping; null on other tiers.
    #[serde(default)]
    pub correlation: Option<Correlation>,
    /// A device-hooking tier: every device of the watched namespaces.
    #[serde(default)]
    pub devices: Vec<DeviceChoice>,
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Namespaces not watched: past the cap, without drops.
    #[serde(default)]
    pub netns_left_out: u64,
    /// Outputs that failed and were kept going, by name.
    #[serde(default)]
    pub sink_errors: BTreeMap<String, SinkErrors>,
    /// Who is filling each table now: the top new-entry makers of the
    /// last interval per namespace, by source prefix, source pod and
    /// service.
    #[serde(default)]
    pub filling: Vec<FillingRow>,
    /// Times ctnetlink dropped new-entry announcements (`filling` is a
    /// sample then); null where announcements do not feed it (insert
    /// events, or the tc tier's passed flows).
    #[serde(default)]
    pub filling_overruns: Option<u64>,
    /// The least share of the last interval that ctnetlink's announcements
    /// were listened to in any watched namespace: 1 when every one was
    /// read; below 1 (`--announcements-per-s` reached) the rates are scaled
    /// from that sample. Null where announcements do not feed `filling`.
    #[serde(default)]
    pub filling_listened: Option<f64>,
    /// New entries the tc tier saw pass but could not attribute to an
    /// opener (its per-opener map let them go before they were read), since
    /// start; null on other tiers and where ctnetlink feeds `filling`.
    #[serde(default)]
    pub filling_unattributed: Option<u64>,
}

/// One namespace's table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct NetnsLine {
    pub inode: u64,
    /// Its /run/netns name.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub pod: Option<String>,
    #[serde(default)]
    pub processes: Vec<String>,
    /// Entries now.
    pub count: u64,
    /// `nf_conntrack_max`.
    pub max: u64,
    #[serde(default)]
    pub fill_pct: f64,
    /// Per second, over the last interval.
    #[serde(default)]
    pub insert_rate: f64,
    #[serde(default)]
    pub drop_rate: f64,
    /// At the current rates; 0 when full, null when not growing.
    #[serde(default)]
    pub time_to_full_s: Option<u64>,
    /// conntrack's statistics, summed over CPUs, by their `conntrack -S`
    /// names.
    #[serde(default)]
    pub stats: BTreeMap<String, u64>,
    /// The same, per second over the last interval.
    #[serde(default)]
    pub rates: BTreeMap<String, f64>,
    /// Where the numbers were read (absent from early recordings).
    #[serde(default)]
    pub table_source: Option<TableSource>,
}

/// Who holds one table's entries. Each `by_*` object maps a name to its
/// entries; the counts carry the order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct OccupancyLine {
    pub inode: u64,
    /// How the breakdown is kept current (absent from early recordings).
    #[serde(default)]
    pub source: Option<Kept>,
    pub total: u64,
    #[serde(default)]
    pub by_service: BTreeMap<String, u64>,
    #[serde(default)]
    pub by_proto: BTreeMap<String, u64>,
    #[serde(default)]
    pub by_tcp_state: BTreeMap<String, u64>,
    #[serde(default)]
    pub assured: u64,
    #[serde(default)]
    pub unreplied: u64,
    /// Sources by /24 (IPv4) and /64 (IPv6).
    #[serde(default)]
    pub by_src_prefix: BTreeMap<String, u64>,
    /// Entries by the time they have left.
    #[serde(default)]
    pub by_timeout: BTreeMap<String, u64>,
    /// Seconds since the dump the breakdown started from; with
    /// `periodic_dump` it is this old (absent from early recordings).
    #[serde(default)]
    pub dump_age_s: Option<u64>,
    /// How long that dump took, in seconds. A periodic re-dump waits at
    /// least 100 times as long (absent from early recordings).
    #[serde(default)]
    pub dump_s: Option<f64>,
}

impl OccupancyLine {
    /// The breakdown's lists become objects of name to count: JSON objects
    /// are unordered, the counts carry the order.
    pub fn of(inode: u64, kept: Kept, b: &Breakdown) -> OccupancyLine {
        let obj = |items: &[(String, u64)]| items.iter().cloned().collect();
        OccupancyLine {
            inode,
            source: Some(kept),
            total: b.total,
            by_service: obj(&b.by_service),
            by_proto: obj(&b.by_proto),
            by_tcp_state: obj(&b.by_tcp_state),
            assured: b.assured,
            unreplied: b.unreplied,
            by_src_prefix: obj(&b.by_src_prefix),
            by_timeout: obj(&b.by_timeout),
            dump_age_s: Some(b.dump_age_s),
            dump_s: Some(b.dump_s),
        }
    }
}

/// A flow of `top_flows`: its first drop record, then what came after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct FlowLine {
    #[serde(rename = "type")]
    pub kind: FlowTag,
    #[serde(flatten)]
    pub first: Drop,
    pub packets: u64,
    #[serde(with = "rfc3339")]
    #[cfg_attr(test, schemars(with = "String"))]
    pub last_seen: SystemTime,
}

/// `"type":"flow"` inside `top_flows`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub enum FlowTag {
    #[default]
    Flow,
}

/// The kernel log's table-full witnesses since start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(default)]
pub struct KernelLog {
    /// Table-full drops the log shows: lines plus suppressed callbacks.
    pub table_full: u64,
    pub lines: u64,
    pub suppressed: u64,
    #[serde(default, with = "rfc3339::option")]
    #[cfg_attr(test, schemars(with = "Option<String>"))]
    pub last_at: Option<SystemTime>,
    /// Lines per namespace inode (a JSON key, so a string), where the line
    /// names it.
    #[serde(default)]
    pub by_netns: BTreeMap<String, u64>,
    /// Times records were lost to the log's ring wrapping.
    #[serde(default)]
    pub overwritten: u64,
}

/// A correlating tier's bookkeeping: every opening packet is either held
/// (then passed or judged) or counted as never judged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(default)]
pub struct Correlation {
    pub opened: u64,
    pub passed: u64,
    pub repeated: u64,
    pub judged_dropped: u64,
    pub pending: u64,
    pub not_judged_map_full: u64,
    pub not_judged_key_clash: u64,
    pub not_judged_unknown_device: u64,
    pub skipped_encapsulated: u64,
    /// Pending flows no watched interface owns.
    pub unattributed: u64,
}

/// An output that failed and was kept going.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(default)]
pub struct SinkErrors {
    /// Writes that failed or were skipped while it was failing.
    pub errors: u64,
    /// The last failure, while it has not written since.
    pub failing: Option<String>,
}

/// What this kernel can run (`"type":"probe"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct Probe {
    /// The running kernel's release.
    pub kernel: String,
    /// Whether kernel BTF (/sys/kernel/btf/vmlinux) was read.
    pub btf: bool,
    /// The tier `--strategy auto` takes; null when none can run.
    pub auto: Option<Strategy>,
    /// Every drop tier, in order of preference, and why (not).
    pub strategies: Vec<Verdict>,
    pub node_view: Usable,
    /// This namespace's devices and whether the tc tier would hook them.
    pub tc_devices: Devices,
    /// Whether kube-proxy's rules name Services (`dst_service`), and from
    /// which of its modes.
    #[serde(default = "Usable::unknown")]
    pub k8s_services: Usable,
}

/// Whether something can run here, and why (not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct Usable {
    pub usable: bool,
    pub reason: String,
}

impl Usable {
    /// What a probe line from before the field was added reads as.
    fn unknown() -> Usable {
        Usable {
            usable: false,
            reason: "not probed".into(),
        }
    }
}

/// The devices, or why they could not be listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub enum Devices {
    Listed(Vec<DeviceChoice>),
    Unlisted { error: String },
}

/// Times as RFC 3339 (UTC, milliseconds), as every record carries them.
pub mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::event::rfc3339(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }

    /// The same for an optional time (null when absent).
    pub mod option {
        use std::time::SystemTime;

        use serde::{Deserialize as _, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => super::serialize(t, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<SystemTime>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|s| humantime::parse_rfc3339(&s).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn roundtrip(line: &Line) {
        let text = serde_json::to_string(line).unwrap();
        let back: Line = serde_json::from_str(&text).unwrap();
        assert_eq!(&back, line, "{text}");
    }

    #[test]
    fn every_record_type_reads_back_as_written() {
        let time = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_800_000_123);
        roundtrip(&Line::Recording(Header {
            version: SCHEMA_VERSION,
            ctrace: Some("0.1.0".into()),
            host: Some("router".into()),
            kernel: Some("6.12.118".into()),
            conntrack_entry_bytes: Some(320),
            buckets: Some(65536),
            started: Some(crate::event::rfc3339(time)),
        }));
        for (cause, proto, strategy) in [
            (Cause::TableFull, Proto::Tcp, Strategy::Tracepoint),
            (Cause::Rule, Proto::Udp, Strategy::Tc),
            (Cause::Invalid, Proto::Icmpv6, Strategy::Kprobe),
        ] {
            roundtrip(&Line::Drop(Drop {
                time,
                netns: 4026531840,
                cause,
                evidence: "count_at_max".into(),
                family: Family::Ipv4,
                proto,
                src: "10.10.0.3:51117".into(),
                dst: "10.10.1.2:2380".into(),
                service: Some("etcd-peer".into()),
                src_pod: Some("default/client-0".into()),
                dst_pod: None,
                dst_service: Some("kube-system/etcd:peer".into()),
                tcp_flags: "S".into(),
                strategy,
            }));
        }
        for outcome in [Outcome::Timeout, Outcome::Refused, Outcome::Aborted] {
            roundtrip(&Line::ConnectFailure(ConnectFailureLine {
                time,
                netns: 1,
                family: Family::Ipv6,
                proto: Proto::Tcp,
                src: "[fd10::2]:43671".into(),
                dst: "[fd10::1]:22".into(),
                service: None,
                src_pod: None,
                dst_pod: Some("kube-system/etcd-0".into()),
                dst_service: None,
                outcome,
                syn_retransmits: Some(1),
                elapsed_ms: None,
            }));
        }
    }

    /// A summary with every part present, so that each type on its path
    /// is written and read back.
    fn full_summary(time: SystemTime) -> Summary {
        use crate::{
            ledger::Trust,
            readings::Evictor,
            tier::{Capabilities, DropSight},
        };
        let drop = Drop {
            time,
            netns: 7,
            cause: Cause::TableFull,
            evidence: "count_at_max".into(),
            family: Family::Ipv4,
            proto: Proto::Tcp,
            src: "10.10.0.3:51117".into(),
            dst: "10.10.1.2:2380".into(),
            service: Some("etcd-peer".into()),
            src_pod: Some("default/client-0".into()),
            dst_pod: Some("kube-system/etcd-0".into()),
            dst_service: Some("kube-system/etcd:peer".into()),
            tcp_flags: "S".into(),
            strategy: Strategy::Kprobe,
        };
        let counts = |k: &str| BTreeMap::from([(k.to_string(), 3u64)]);
        let mut row = ConnectRow::new(7, Some("ssh".into()), Proto::Tcp);
        row.attempts = 5;
        row.timeouts = 2;
        Summary {
            time,
            is_final: true,
            elapsed_s: 12.5,
            strategy: Some(Strategy::Tc),
            lost_events: 1,
            netfilter_drops: 2,
            undecoded: 3,
            netns: vec![NetnsLine {
                inode: 7,
                name: Some("router".into()),
                pod: Some("kube-system/etcd-0".into()),
                processes: vec!["etcd".into()],
                count: 10,
                max: 20,
                fill_pct: 50.0,
                insert_rate: 0.25,
                drop_rate: 1.5,
                time_to_full_s: Some(0),
                stats: counts("drop"),
                rates: BTreeMap::from([("drop".to_string(), 0.5)]),
                table_source: Some(TableSource::Procfs),
            }],
            drops: vec![DropGroup {
                netns: 7,
                service: None,
                cause: Cause::Clash,
                proto: Proto::Udp,
                flows: 1,
                packets: 2,
            }],
            evictions: vec![EvictionGroup {
                netns: 7,
                service: Some("dns".into()),
                proto: Proto::Udp,
                entries: 4,
                by: Evictor::Gc,
            }],
            occupancy: vec![OccupancyLine {
                inode: 7,
                source: Some(Kept::DumpAndEvents),
                total: 10,
                by_service: counts("dns"),
                by_proto: counts("udp"),
                by_tcp_state: counts("SYN_SENT"),
                assured: 1,
                unreplied: 9,
                by_src_prefix: counts("10.10.0.0/24"),
                by_timeout: counts("<10s"),
                dump_age_s: Some(3),
                dump_s: Some(0.25),
            }],
            evicted_total: 4,
            gc_evicted_total: 4,
            agreement: vec![Agreement {
                netns: 7,
                attributed: 2,
                kernel: 2,
                ratio: Some(1.0),
                table_full: 2,
                unseen: 0,
                trust: Trust::Disagrees,
            }],
            top_flows: vec![FlowLine {
                kind: FlowTag::Flow,
                first: drop,
                packets: 3,
                last_seen: time,
            }],
            flows_forgotten: 5,
            detail_held_back: vec![HeldBack {
                netns: 7,
                service: Some("ssh".into()),
                flows: 6,
            }],
            totals_map_full: 7,
            stale_probe_state: 8,
            capabilities: Some(Capabilities {
                exact_verdicts: false,
                entry_events: false,
                drop_location: true,
                gc_evictions: false,
                fd_scoped_cleanup: true,
                needs_btf: false,
                drops: DropSight::Correlated,
                passed_flows: true,
            }),
            kernel_log: Some(KernelLog {
                table_full: 3,
                lines: 2,
                suppressed: 1,
                last_at: Some(time),
                by_netns: BTreeMap::from([("7".to_string(), 2)]),
                overwritten: 0,
            }),
            connects: Some(vec![row]),
            connect_counters: Some(ConnectCounters {
                lost_events: 1,
                untracked: 2,
                totals_full: 3,
                undecodable: 4,
            }),
            correlation: Some(Correlation {
                opened: 9,
                judged_dropped: 3,
                ..Correlation::default()
            }),
            devices: vec![DeviceChoice {
                netns: 7,
                name: "br-lan".into(),
                ifindex: 3,
                hooked: true,
                why: "bridge".into(),
            }],
            warnings: vec!["a warning".into()],
            netns_left_out: 2,
            sink_errors: BTreeMap::from([(
                "record".to_string(),
                SinkErrors {
                    errors: 1,
                    failing: Some("disk full".into()),
                },
            )]),
            filling: vec![FillingRow {
                netns: 7,
                by: crate::filling::FillBy::SrcPod,
                key: "default/web-a".into(),
                per_s: 40.5,
                share: 0.75,
            }],
            filling_overruns: Some(0),
            filling_listened: Some(1.0),
            filling_unattributed: Some(0),
        }
    }

    #[test]
    fn summaries_read_back_as_written() {
        let time = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_800_000_123);
        roundtrip(&Line::Summary(Box::new(full_summary(time))));
        roundtrip(&Line::Status(Box::new(full_summary(time))));
        for tc_devices in [
            Devices::Listed(full_summary(time).devices),
            Devices::Unlisted {
                error: "no namespace".into(),
            },
        ] {
            roundtrip(&Line::Probe(Probe {
                kernel: "6.12.118".into(),
                btf: true,
                auto: Some(Strategy::Kprobe),
                strategies: vec![Verdict {
                    strategy: Strategy::Fexit,
                    usable: false,
                    reason: "not built".into(),
                }],
                node_view: Usable {
                    usable: true,
                    reason: "tcp tracepoints".into(),
                },
                tc_devices,
                k8s_services: Usable {
                    usable: false,
                    reason: "no kube-proxy rules".into(),
                },
            }));
        }
        // The report reads a summary line on its own, untagged.
        let text = serde_json::to_string(&Line::Summary(Box::new(full_summary(time)))).unwrap();
        let back: Summary = serde_json::from_str(&text).unwrap();
        assert_eq!(back, full_summary(time));
        // Top flows keep their `"type":"flow"` beside the drop's fields.
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["top_flows"][0]["type"], "flow", "{v}");
        assert_eq!(v["top_flows"][0]["dst"], "10.10.1.2:2380", "{v}");
    }

    /// A summary from before a field existed still reads: what it lacks
    /// is empty.
    #[test]
    fn an_early_summary_reads_with_what_it_has() {
        let early = r#"{"type":"summary","time":"2026-12-03T01:00:00.000Z",
            "netns":[{"inode":7,"count":10,"max":20}],
            "occupancy":[{"inode":7,"total":3}],
            "correlation":{"opened":3,"passed":1},"kernel_log":{"lines":1},
            "sink_errors":{"record":{"errors":2}}}"#;
        let Line::Summary(s) = serde_json::from_str::<Line>(early).unwrap() else {
            panic!("not a summary");
        };
        assert_eq!(s.netns[0].count, 10);
        assert_eq!(s.netns[0].table_source, None);
        assert_eq!(s.occupancy[0].source, None);
        assert!(s.detail_held_back.is_empty() && s.connects.is_none());
        // Nested parts from before their fields existed read too.
        assert_eq!(s.correlation.as_ref().map(|c| c.opened), Some(3));
        assert_eq!(s.kernel_log.as_ref().map(|k| k.lines), Some(1));
        assert_eq!(s.sink_errors["record"].errors, 2);
    }

    #[test]
    fn values_ctrace_never_writes_are_refused() {
        let drop = r#"{"type":"drop","time":"2026-12-04T00:00:00Z","netns":1,"cause":"boom",
            "evidence":"x","family":"ipv4","proto":"tcp","src":"a","dst":"b","service":null,
            "tcp_flags":"S","strategy":"tc"}"#;
        let e = serde_json::from_str::<Line>(drop).unwrap_err().to_string();
        assert!(e.contains("boom"), "{e}");
    }

    #[test]
    fn newer_recordings_are_refused_by_name() {
        let old = Header {
            version: 0,
            ..Header::default()
        };
        assert!(old.check_version().is_ok());
        let newer = Header {
            version: SCHEMA_VERSION + 1,
            ctrace: Some("9.0.0".into()),
            ..Header::default()
        };
        let e = newer.check_version().unwrap_err();
        assert!(
            e.contains("newer than this ctrace reads") && e.contains("9.0.0"),
            "{e}"
        );
    }
}
