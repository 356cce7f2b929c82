//! `ctrace report` on any bytes: the report and both renderings.
//!
//! Why the assertions hold: text from the recording reaches the Markdown
//! only through `text::markdown` (control characters escaped) and the
//! HTML only through its escaping, so neither can carry a raw control
//! character or a tag the recording wrote; and every count saturates.
#![no_main]

use std::path::Path;

use ctrace::report::Report;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((report, _)) = Report::from_reader(Path::new("rec.ndjson"), data) else {
        return;
    };
    let md = report.markdown();
    assert!(
        md.chars().all(|c| c == '\n' || !c.is_control()),
        "a raw control character in the Markdown"
    );
    let html = report.html();
    assert!(!html.contains("<script"), "a tag from the recording in the HTML");
    assert!(html.chars().all(|c| c == '\n' || !c.is_control()));
});
