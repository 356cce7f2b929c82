//! tracefs `events/<category>/<name>/format` files: the bytes as a format
//! file of the event its `name:` line announces, then every field looked
//! up and every quoted label of the print fmt tried as a symbolic value of
//! every field.
//!
//! Why the assertions hold: a parsed format has its `ID:` and at least one
//! field, each named by a C identifier found in the text and typed by what
//! precedes it; `field` finds a field of that name; a symbolic value is
//! only found for a `REC->field` of the print fmt, under a label quoted
//! there.
#![no_main]

use ctrace::kernel::tracefs::EventFormat;
use libfuzzer_sys::fuzz_target;

/// Keeps fields × labels (each a scan of the print fmt) bounded.
const MAX_TRIED: usize = 8;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let name = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("name:"))
        .map_or("kfree_skb", str::trim);
    let Ok(f) = EventFormat::parse("skb", name, &text) else {
        return;
    };
    assert_eq!(f.name, name);
    assert!(!f.fields.is_empty());
    for field in &f.fields {
        assert!(!field.name.is_empty());
        assert!(
            field
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        );
        assert!(!field.c_type.is_empty());
        assert!(text.contains(&field.name));
        assert_eq!(f.field(&field.name).map(|g| &g.name), Some(&field.name));
    }
    let labels: Vec<&str> = f
        .print_fmt
        .split('"')
        .skip(1)
        .step_by(2)
        .take(MAX_TRIED)
        .collect();
    for field in f.fields.iter().take(MAX_TRIED) {
        for label in &labels {
            if f.symbolic_value(&field.name, label).is_some() {
                assert!(f.print_fmt.contains(&format!("\"{label}\"")));
                assert!(f.print_fmt.contains(&format!("REC->{}", field.name)));
            }
        }
    }
    let _ = f.symbolic_value("reason", "NETFILTER_DROP");
});
