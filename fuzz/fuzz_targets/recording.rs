//! Recordings (`watch --record`, read back by `report`): the bytes as one
//! recording file.
//!
//! Why the assertions hold: a recording fails only when it is empty, its
//! first line is not a header (named FILE:1, also when that line is not
//! UTF-8 or too long), or it has no summary; a break is told at the first
//! line that does not read, so the lines before it read cleanly on their
//! own and that line alone after the header breaks. At most one record a
//! line is streamed, and the counts are the records streamed.
#![no_main]

use std::path::Path;

use ctrace::report::{
    Recording,
    recording::{Broken, Record},
};
use libfuzzer_sys::fuzz_target;

const FILE: &str = "rec.ndjson";

fuzz_target!(|data: &[u8]| {
    let lines = lines(data);
    let mut streamed = (0, 0);
    let read = Recording::from_reader(Path::new(FILE), data, &mut |r| match r {
        Record::Summary(_) => streamed.0 += 1,
        Record::Drop(_) => streamed.1 += 1,
    });
    let broken_at = match read {
        Ok(rec) => {
            assert!(rec.summaries > 0);
            assert!(rec.summaries + rec.drops < lines.len());
            assert_eq!((rec.summaries, rec.drops), streamed);
            rec.broken.map(|b: Broken| {
                assert_eq!(b.file, Path::new(FILE));
                b.line
            })
        }
        Err(e) => {
            let e = format!("{e:#}");
            if lines.is_empty() {
                assert!(e.contains(&format!("{FILE} is empty")), "{e}");
                return;
            }
            if std::str::from_utf8(lines[0]).is_err() {
                assert!(e.starts_with(&format!("{FILE}:1: ")), "{e}");
                return;
            }
            if e.starts_with(&format!("{FILE}:1: ")) {
                return;
            }
            if e.starts_with(&format!("no summary in {FILE}")) {
                None
            } else {
                let (n, _) = e
                    .strip_prefix(&format!("{FILE}:"))
                    .and_then(|rest| rest.split_once(": recording broken here"))
                    .unwrap_or_else(|| panic!("names no line: {e}"));
                Some(n.parse::<usize>().expect("a line number"))
            }
        }
    };
    if let Some(n) = broken_at {
        assert!(
            (2..=lines.len()).contains(&n),
            "line {n} of {}",
            lines.len()
        );
        // The header and the lines before the break read cleanly...
        match Recording::from_reader(Path::new(FILE), &file(&lines[..n - 1])[..], &mut |_| {}) {
            Ok(rec) => assert!(rec.broken.is_none()),
            Err(e) => assert!(format!("{e:#}").starts_with("no summary in"), "{e:#}"),
        }
        // ...and the line alone after the header breaks there.
        let alone = file(&[lines[0], lines[n - 1]]);
        let line2 = match Recording::from_reader(Path::new(FILE), &alone[..], &mut |_| {}) {
            Ok(rec) => rec.broken.map(|b| b.line),
            Err(e) => format!("{e:#}")
                .contains(&format!("{FILE}:2: recording broken here"))
                .then_some(2),
        };
        assert_eq!(line2, Some(2));
    }
});

/// The lines `BufRead::lines` yields, each with any '\r' before its '\n'.
fn lines(data: &[u8]) -> Vec<&[u8]> {
    let mut lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    lines
}

/// Lines as a file again, each ended by '\n' so that an empty last line
/// stays a line.
fn file(lines: &[&[u8]]) -> Vec<u8> {
    lines
        .iter()
        .flat_map(|l| l.iter().chain(b"\n"))
        .copied()
        .collect()
}
