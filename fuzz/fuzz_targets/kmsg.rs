//! /dev/kmsg: one record as read() returns it, and the bytes as a saved log
//! of records one per line.
#![no_main]

use ctrace::kernel::kmsg::{Tally, classify, parse_record, witnesses_in};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = parse_record(data) {
        let _ = classify(r.message);
        assert!(!r.message.contains('\n'));
    }
    let mut tally = Tally::default();
    for w in witnesses_in(data) {
        assert!(w.lines <= 1);
        assert!(w.count() >= w.lines);
        tally.add(&w);
    }
    assert_eq!(tally.table_full, tally.lines + tally.suppressed);
    assert_eq!(tally.text().is_some(), tally.last_at_usec.is_some());
});
