//! `--record FILE`: the event stream on disk, for `ctrace report`.
//!
//! The lines are the NDJSON sink's (drop records and summaries, which carry
//! the table samples, occupancy, evictions and the self-check), after one
//! header line per file. Written through a buffer that is flushed at every
//! summary, so a crash loses at most one interval. Bounded: past
//! `max_bytes` the file is rotated (FILE -> FILE.1 -> … -> FILE.<keep>),
//! each file starting with its own header, so any one of them can be
//! reported on alone.
use std::{
    ffi::{OsStr, OsString},
    fs::{self, File},
    io::{BufWriter, Write as _},
    path::Path,
};

use super::{Sink, Snapshot, rfc3339};
use crate::{
    aggregate::DropRecord,
    files,
    record::{Header, Line, SCHEMA_VERSION},
};

/// Where `--record` without a file writes (see [`files::run_dir`]).
pub const DEFAULT_PATH: &str = concat!(files::run_dir!(), "/recording.ndjson");
/// Recordings hold who talked to whom: readable by their owner only.
const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;
pub const DEFAULT_MAX_BYTES: u64 = 16 << 20;
pub const DEFAULT_KEEP: u32 = 3;

pub struct RecordSink {
    /// The recording's directory, held open: rotation and new files go
    /// through it, never through the path again.
    dir: files::OwnDir,
    name: OsString,
    max_bytes: u64,
    keep: u32,
    out: BufWriter<File>,
    written: u64,
    /// A write failed (ENOSPC, say) and may have left half a line: the
    /// next write starts a new file rather than append after it.
    torn: bool,
    /// Facts for the header, measured once.
    header: Header,
}

impl RecordSink {
    /// Creates `path` fresh; a recording an earlier run left there is
    /// rotated away first rather than overwritten. Its directory must be
    /// one only this user can write (made 0700 if missing): the rotated
    /// names are fixed, and elsewhere another account could plant them.
    pub fn create(path: &Path, max_bytes: u64, keep: u32) -> std::io::Result<RecordSink> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
        let dir = files::OwnDir::open(dir, DIR_MODE)?;
        let header = Header {
            version: SCHEMA_VERSION,
            ctrace: Some(env!("CARGO_PKG_VERSION").to_string()),
            host: hostname(),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|s| s.trim().to_string()),
            conntrack_entry_bytes: crate::kernel::conntrack_entry_bytes(),
            buckets: fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_buckets")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok()),
            started: None,
        };
        rotate(&dir, name, keep)?;
        let mut sink = RecordSink {
            out: BufWriter::new(dir.create_new(name, FILE_MODE)?),
            dir,
            name: name.to_os_string(),
            max_bytes,
            keep,
            written: 0,
            torn: false,
            header,
        };
        sink.write_header()?;
        Ok(sink)
    }

    fn write_header(&mut self) -> std::io::Result<()> {
        let line = Line::Recording(Header {
            started: Some(rfc3339(std::time::SystemTime::now())),
            ..self.header.clone()
        });
        self.line(&line)
    }

    /// Writes one record; tests also write other JSON.
    fn line(&mut self, v: &impl serde::Serialize) -> std::io::Result<()> {
        let mut text = serde_json::to_vec(v)?;
        text.push(b'\n');
        let full = self.written > 0 && self.written + text.len() as u64 > self.max_bytes;
        if self.torn || full {
            self.next_file()?;
        }
        let wrote = self.out.write_all(&text);
        self.torn = wrote.is_err();
        wrote?;
        self.written += text.len() as u64;
        Ok(())
    }

    /// Rotates and starts a new file with its header. After a failed
    /// write, what the buffer still holds is dropped, not appended to
    /// the half line before it.
    fn next_file(&mut self) -> std::io::Result<()> {
        if !self.torn {
            self.out.flush()?;
        }
        rotate(&self.dir, &self.name, self.keep)?;
        let file = self.dir.create_new(&self.name, FILE_MODE)?;
        let old = std::mem::replace(&mut self.out, BufWriter::new(file));
        drop(old.into_parts());
        self.written = 0;
        self.torn = false;
        self.write_header()
    }
}

/// FILE.<keep-1> -> FILE.<keep>, …, FILE -> FILE.1; the oldest falls off.
/// Names that are missing are skipped, so a rotation that failed halfway
/// (a full disk) is finished by the next one, never shifts history twice.
fn rotate(dir: &files::OwnDir, name: &OsStr, keep: u32) -> std::io::Result<()> {
    let numbered = |n: u32| {
        let mut p = name.to_os_string();
        p.push(format!(".{n}"));
        p
    };
    if !dir.exists(name) {
        return Ok(());
    }
    if keep == 0 {
        return dir.remove(name);
    }
    for n in (1..keep).rev() {
        let from = numbered(n);
        if dir.exists(&from) {
            dir.rename(&from, &numbered(n + 1))?;
        }
    }
    dir.rename(name, &numbered(1))
}

fn hostname() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
}

impl Sink for RecordSink {
    fn dropped_flow(&mut self, rec: &DropRecord) -> std::io::Result<()> {
        self.line(&Line::Drop(rec.into()))
    }

    fn connect_failure(&mut self, rec: &crate::connects::ConnectFailure) -> std::io::Result<()> {
        self.line(&Line::ConnectFailure(rec.into()))
    }

    fn summary(&mut self, snap: &Snapshot<'_>) -> std::io::Result<()> {
        self.line(&Line::Summary(Box::new(super::json::summary(snap))))?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::HEADER_TYPE;
    use serde_json::json;

    /// A link planted where the recording goes, in a directory another
    /// account can write (as anyone can make /tmp/ctrace): start is
    /// refused, and the link's target is never touched.
    #[test]
    fn a_planted_link_is_never_followed() {
        let Some(dir) = files::tests::foreign_dir("record") else {
            return;
        };
        let victim = dir.with_extension("victim");
        fs::write(&victim, "precious\n").unwrap();
        let path = dir.join("recording.ndjson");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let refused = RecordSink::create(&path, 1 << 20, 2)
            .err()
            .map(|e| e.to_string());
        let kept = fs::read_to_string(&victim).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        fs::remove_file(&victim).unwrap();
        assert_eq!(kept, "precious\n");
        let refused = refused.expect("a directory another user owns is refused");
        assert!(refused.contains("owned by uid 65534"), "{refused}");
    }

    #[test]
    fn a_recording_is_its_owners_alone() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = std::env::temp_dir().join(format!("ctrace-mode-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("r.ndjson");
        drop(RecordSink::create(&path, 1 << 20, 1).unwrap());
        // A second run rotates the first one's file away, never reopens it.
        drop(RecordSink::create(&path, 1 << 20, 1).unwrap());
        let modes =
            [&dir, &path, &dir.join("r.ndjson.1")].map(|p| fs::metadata(p).unwrap().mode() & 0o777);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(modes, [0o700, 0o600, 0o600]);
    }

    /// A rotation that failed halfway (FILE already moved, no new one
    /// made) is not repeated: history is not shifted a second time.
    #[test]
    fn a_rotation_without_a_current_file_shifts_nothing() {
        let dir = std::env::temp_dir().join(format!("ctrace-rot-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let own = files::OwnDir::open(&dir, DIR_MODE).unwrap();
        fs::write(dir.join("r.ndjson.1"), "older\n").unwrap();
        rotate(&own, OsStr::new("r.ndjson"), 3).unwrap();
        let kept = fs::read_to_string(dir.join("r.ndjson.1")).unwrap();
        let shifted = dir.join("r.ndjson.2").exists();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!((kept.as_str(), shifted), ("older\n", false));
    }

    #[test]
    fn rotation_keeps_the_newest_files() {
        let dir = std::env::temp_dir().join(format!("ctrace-rotate-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.ndjson");
        let mut s = RecordSink::create(&path, 400, 2).unwrap();
        for i in 0..40 {
            s.line(
                &json!({"type": "x", "i": i, "pad": "0123456789012345678901234567890123456789"}),
            )
            .unwrap();
        }
        s.out.flush().unwrap();
        let names: Vec<_> = ["r.ndjson", "r.ndjson.1", "r.ndjson.2", "r.ndjson.3"]
            .iter()
            .map(|n| dir.join(n).exists())
            .collect();
        let first = fs::read_to_string(dir.join("r.ndjson.1")).unwrap();
        let total: u64 = ["r.ndjson", "r.ndjson.1", "r.ndjson.2"]
            .iter()
            .map(|n| fs::metadata(dir.join(n)).unwrap().len())
            .sum();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(names, [true, true, true, false]);
        // Every file is a recording on its own, and none outgrew the cap.
        let head: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
        assert_eq!(head["type"], HEADER_TYPE);
        assert!(total <= 3 * 400, "{total}");
    }
}
