//! Reading recordings back (`watch --record`): the header, drop records and
//! summaries, as the record types (record.rs) they were written from. A line that is not
//! JSON, or not a record ctrace writes, ends the reading of its file; where
//! is kept and told, and what came before is still reported on.
use std::{
    fmt, fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::record::{self, HEADER_TYPE, Header};

/// Where a recording stopped making sense.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub file: PathBuf,
    pub line: usize,
    pub why: String,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: recording broken here ({})",
            self.file.display(),
            self.line,
            self.why
        )
    }
}

/// One record of a recording, handed over as it is read.
pub enum Record {
    Summary(Box<record::Summary>),
    Drop(Box<record::Drop>),
}

/// What reading a recording found besides its records, which are streamed
/// (a recording can be gigabytes, and is anyone's).
#[derive(Debug, Default)]
pub struct Recording {
    pub files: Vec<PathBuf>,
    /// The first file's header.
    pub header: Header,
    /// Records read.
    pub summaries: usize,
    pub drops: usize,
    /// The first break; lines after it in the same file were not read.
    pub broken: Option<Broken>,
}

/// No line ctrace writes comes near this (a summary of a thousand
/// namespaces is a few hundred KiB); longer is a broken recording, not a
/// reason to hold the file in memory.
pub const MAX_LINE: usize = 2 << 20;

#[derive(Deserialize)]
struct Tag {
    #[serde(rename = "type")]
    ty: String,
}

impl Recording {
    /// Reads `files` in order, handing each record to `each`. Fails only
    /// when nothing can be reported: a file that is missing, or that is
    /// not a recording from its first line, or no summary at all.
    pub fn read(files: &[PathBuf], each: &mut dyn FnMut(Record)) -> anyhow::Result<Recording> {
        let mut rec = Recording {
            files: files.to_vec(),
            ..Recording::default()
        };
        for (i, path) in files.iter().enumerate() {
            let f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            rec.read_file(path, BufReader::new(f), i == 0, each)?;
        }
        rec.finish()
    }

    /// Reads one recording from `input` as [`Recording::read`] reads a
    /// single file; `file` is what messages call it.
    pub fn from_reader(
        file: &Path,
        input: impl BufRead,
        each: &mut dyn FnMut(Record),
    ) -> anyhow::Result<Recording> {
        let mut rec = Recording {
            files: vec![file.to_path_buf()],
            ..Recording::default()
        };
        rec.read_file(file, input, true, each)?;
        rec.finish()
    }

    fn finish(self) -> anyhow::Result<Recording> {
        if self.summaries == 0 {
            match &self.broken {
                Some(b) => bail!("{b}; no summary before it, nothing to report"),
                None => bail!(
                    "no summary in {}: ctrace writes one per interval (--interval), was it stopped at once?",
                    self.files
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
        Ok(self)
    }

    fn read_file(
        &mut self,
        path: &Path,
        mut input: impl BufRead,
        first: bool,
        each: &mut dyn FnMut(Record),
    ) -> anyhow::Result<()> {
        let mut buf = Vec::new();
        let head = match next_line(&mut input, &mut buf)
            .with_context(|| format!("reading {}", path.display()))?
        {
            None => bail!("{} is empty, not a ctrace recording", path.display()),
            Some(Err(why)) => bail!("{}:1: not a ctrace recording ({why})", path.display()),
            Some(Ok(l)) => l,
        };
        let is_header = serde_json::from_str::<Tag>(head).is_ok_and(|t| t.ty == HEADER_TYPE);
        if !is_header {
            bail!(
                "{}:1: not a ctrace recording (a recording starts with a {{\"type\":\"{HEADER_TYPE}\"}} line; `watch --record` writes them)",
                path.display()
            );
        }
        let header: Header = serde_json::from_str(head)
            .with_context(|| format!("{}:1: recording header", path.display()))?;
        header
            .check_version()
            .map_err(|why| anyhow::anyhow!("{}:1: {why}", path.display()))?;
        if first {
            self.header = header;
        }
        let mut lineno = 1;
        loop {
            lineno += 1;
            let broken = |why: String| Broken {
                file: path.to_path_buf(),
                line: lineno,
                why,
            };
            let line = match next_line(&mut input, &mut buf) {
                Ok(None) => return Ok(()),
                Ok(Some(Ok(l))) => l,
                Ok(Some(Err(why))) => {
                    self.broken.get_or_insert(broken(why));
                    return Ok(());
                }
                Err(e) => {
                    self.broken.get_or_insert(broken(e.to_string()));
                    return Ok(());
                }
            };
            match take(line) {
                Ok(Some(r)) => {
                    match r {
                        Record::Summary(_) => self.summaries += 1,
                        Record::Drop(_) => self.drops += 1,
                    }
                    each(r);
                }
                Ok(None) => {}
                Err(why) => {
                    self.broken.get_or_insert(broken(why));
                    return Ok(());
                }
            }
        }
    }
}

/// The next line of `input` in `buf`, without its `\n` (or `\r\n`), as
/// `BufRead::lines` gives it; `Some(Err)` for a line past [`MAX_LINE`] or
/// not UTF-8; None at the end.
fn next_line<'b>(
    input: &mut impl BufRead,
    buf: &'b mut Vec<u8>,
) -> std::io::Result<Option<Result<&'b str, String>>> {
    buf.clear();
    let n = std::io::Read::take(&mut *input, MAX_LINE as u64 + 1).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    } else if buf.len() > MAX_LINE {
        return Ok(Some(Err(format!(
            "a line longer than {} MiB, more than ctrace writes",
            MAX_LINE >> 20
        ))));
    }
    Ok(Some(std::str::from_utf8(buf).map_err(|_| {
        "stream did not contain valid UTF-8".to_string()
    })))
}

/// One line as a record; None for one the report does not use.
fn take(line: &str) -> Result<Option<Record>, String> {
    let tag: Tag = serde_json::from_str(line).map_err(|e| {
        if e.is_eof() {
            "the line ends mid-record: the file was cut short".to_string()
        } else {
            format!("not JSON: {e}")
        }
    })?;
    Ok(match tag.ty.as_str() {
        "summary" => Some(Record::Summary(Box::new(
            serde_json::from_str(line).map_err(|e| format!("summary: {e}"))?,
        ))),
        "drop" => Some(Record::Drop(Box::new(
            serde_json::from_str(line).map_err(|e| format!("drop record: {e}"))?,
        ))),
        // A rotated set read as one, or a record type from a newer ctrace.
        HEADER_TYPE => None,
        other => {
            log::debug!("skipping a `{}` record", crate::text::terminal(other));
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ctrace-rec-{}-{name}", std::process::id()));
        fs::write(&p, text).unwrap();
        p
    }

    const HEAD: &str = r#"{"type":"recording","version":1,"conntrack_entry_bytes":256}"#;
    const SUMMARY: &str = r#"{"type":"summary","time":"2026-12-03T01:00:00.000Z","final":false,"netns":[{"inode":7,"count":10,"max":20,"stats":{"drop":0}}]}"#;

    #[test]
    fn a_cut_short_recording_says_where() {
        let p = write("cut", &format!("{HEAD}\n{SUMMARY}\n{}\n", &SUMMARY[..40]));
        let r = Recording::read(std::slice::from_ref(&p), &mut |_| {}).unwrap();
        fs::remove_file(&p).unwrap();
        assert_eq!(r.summaries, 1);
        let b = r.broken.unwrap();
        assert_eq!(b.line, 3);
        assert!(b.why.contains("cut short"), "{b}");
    }

    #[test]
    fn any_reader_reads_as_a_file() {
        let text = format!("{HEAD}\n{SUMMARY}\nnot json\n");
        let r = Recording::from_reader(Path::new("piped"), text.as_bytes(), &mut |_| {}).unwrap();
        assert_eq!(r.summaries, 1);
        assert_eq!(
            r.broken.unwrap().to_string().split(": ").next(),
            Some("piped:3")
        );
        let e = Recording::from_reader(Path::new("piped"), &b""[..], &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("piped is empty"), "{e}");
    }

    #[test]
    fn garbage_is_not_a_recording() {
        let p = write("garbage", "hello\n");
        let e = Recording::read(std::slice::from_ref(&p), &mut |_| {}).unwrap_err();
        fs::remove_file(&p).unwrap();
        assert!(e.to_string().contains(":1: not a ctrace recording"), "{e}");
    }

    #[test]
    fn a_corrupt_line_mid_file() {
        let p = write(
            "mid",
            &format!("{HEAD}\n{SUMMARY}\n{{\"type\":\"summary\",\"time\":12}}\n{SUMMARY}\n"),
        );
        let r = Recording::read(std::slice::from_ref(&p), &mut |_| {}).unwrap();
        fs::remove_file(&p).unwrap();
        assert_eq!(r.summaries, 1);
        let b = r.broken.unwrap();
        assert_eq!(b.line, 3);
        assert!(b.why.starts_with("summary:"), "{b}");
        assert_eq!(r.header.conntrack_entry_bytes, Some(256));
    }

    /// `report /dev/zero`: an endless line is cut at the cap and told as
    /// broken, never held whole.
    #[test]
    fn an_endless_line_is_cut() {
        use std::io::Read as _;
        let zeros = std::io::BufReader::new(std::io::repeat(0).take(64 << 20));
        let e = Recording::from_reader(Path::new("zero"), zeros, &mut |_| {}).unwrap_err();
        assert!(
            e.to_string()
                .contains("zero:1: not a ctrace recording (a line longer than"),
            "{e}"
        );
        let endless = std::io::Cursor::new(format!("{HEAD}\n{SUMMARY}\n"))
            .chain(std::io::repeat(b'x').take(64 << 20));
        let r = Recording::from_reader(
            Path::new("x"),
            std::io::BufReader::new(endless),
            &mut |_| {},
        )
        .unwrap();
        let b = r.broken.unwrap();
        assert_eq!(b.line, 3);
        assert!(b.why.contains("longer than 2 MiB"), "{b}");
    }
}
