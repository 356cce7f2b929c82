//! /proc/net/stat/nf_conntrack: any bytes give statistics or an error.
#![no_main]

use ctrace::conntrack::procfs::{parse_number, parse_stat};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = parse_stat(data) {
        // Summing saturates; it never wraps below a single row's value.
        assert!(s.max == 0, "the statistics file has no limit column");
    }
    let _ = parse_number(data);
});
