//! The records ctrace writes (NDJSON on stdout, recordings) and reads back
//! (`report`): one set of serde types for both sides, tagged by `type`, so
//! writer and reader cannot drift apart. Causes, protocols, strategies and
//! outcomes stay enums on both sides; a line with a value ctrace never
//! writes is refused as a whole.
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::{
    aggregate::DropRecord, cause::Cause, connects::ConnectFailure, connects::Outcome, event::Proto,
    tier::Strategy,
};

/// `type` of a recording's first line.
pub const HEADER_TYPE: &str = "recording";
/// The recording format. A reader takes every version up to its own (older
/// ones lack fields, which read as absent) and refuses newer ones by name.
pub const SCHEMA_VERSION: u32 = 1;

/// One NDJSON line: the typed record under its `type`. Summaries are not
/// typed yet: they are written from the snapshot and read by the report's
/// own view of them (`report::recording::Summary`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line {
    Recording(Header),
    Drop(Drop),
    ConnectFailure(ConnectFailureLine),
}

/// A recording file's first line: what it is and what was measured once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
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
pub struct Drop {
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    pub netns: u64,
    pub cause: Cause,
    pub evidence: String,
    pub family: Family,
    pub proto: Proto,
    pub src: String,
    pub dst: String,
    pub service: Option<String>,
    pub tcp_flags: String,
    pub strategy: Strategy,
}

/// A failed connection attempt of this host (`"type":"connect_failure"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectFailureLine {
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    pub netns: u64,
    pub family: Family,
    pub proto: Proto,
    pub src: String,
    pub dst: String,
    pub service: Option<String>,
    pub outcome: Outcome,
    pub syn_retransmits: Option<u32>,
    pub elapsed_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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
            outcome: f.outcome,
            syn_retransmits: f.syn_retransmits,
            elapsed_ms: f.elapsed.map(|d| d.as_millis() as u64),
        }
    }
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
                outcome,
                syn_retransmits: Some(1),
                elapsed_ms: None,
            }));
        }
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
