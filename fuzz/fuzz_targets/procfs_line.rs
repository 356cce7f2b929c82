//! /proc/net/nf_conntrack: one line, and the same bytes as a whole file
//! streamed through a small buffer (lines split across reads).
#![no_main]

use std::io::BufReader;

use ctrace::conntrack::procfs::{MAX_LINE, for_each_entry, parse_line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let single = parse_line(data);
    let mut input = BufReader::with_capacity(13, data);
    let mut seen = 0u64;
    let report = for_each_entry(&mut input, &mut |e| {
        seen += 1;
        assert!(e.family == libc_af(false) || e.family == libc_af(true));
    })
    .expect("reading from memory cannot fail");
    assert_eq!(report.entries, seen);
    let lines = data.split(|&b| b == b'\n').count() as u64;
    assert!(report.entries + report.other_families + report.malformed <= lines);
    // A file of one line without a newline is that line.
    if !data.contains(&b'\n') && data.len() <= MAX_LINE {
        match single {
            Ok(Some(_)) => assert_eq!(report.entries, 1),
            Ok(None) => assert_eq!(report.other_families, 1),
            Err(_) => assert!(report.malformed == 1 || data.iter().all(u8::is_ascii_whitespace)),
        }
    }
});

fn libc_af(v6: bool) -> u8 {
    if v6 { 10 } else { 2 }
}
