//! Service specs and catalog files: each line of the bytes as a
//! `--service` spec, the whole as a `--services-file`, and the kernel's
//! port index of what was read.
//!
//! Why the assertions hold: every spec error quotes the spec; a file error
//! is the first line whose spec (comment and blanks stripped) fails, named
//! FILE:LINE; a spec's ports belong to it when it is the last spec claiming
//! them; Display writes the spec syntax back; the index maps each port to
//! the service lookup names for it, never more ports than the kernel map
//! holds.
#![no_main]

use std::path::Path;

use ctrace::{
    event::Proto,
    services::{Catalog, MAX_KERNEL_PORTS, ServiceSpec},
};
use ctrace_common::service_key;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut first_bad = None;
    for (n, line) in text.lines().enumerate() {
        match line.parse::<ServiceSpec>() {
            Ok(spec) => check_spec(&spec),
            Err(e) => assert!(format!("{e:#}").contains(line), "{e:#} for {line:?}"),
        }
        let spec = line.split('#').next().unwrap_or("").trim();
        if first_bad.is_none() && !spec.is_empty() && spec.parse::<ServiceSpec>().is_err() {
            first_bad = Some(n + 1);
        }
    }

    let mut catalog = Catalog::default();
    match (
        catalog.add_text(Path::new("services.conf"), &text),
        first_bad,
    ) {
        (Ok(()), None) => {}
        (Err(e), Some(n)) => {
            let e = format!("{e:#}");
            assert!(e.contains(&format!("services.conf:{n}: ")), "{e}");
        }
        (r, n) => panic!("add_text gave {r:?}, but the first bad line is {n:?}"),
    }
    if let Some(last) = catalog.specs().last() {
        for r in &last.ranges {
            for &p in &r.protos {
                assert_eq!(catalog.lookup(p, r.first), Some(last.name.as_str()));
                assert_eq!(catalog.lookup(p, r.last), Some(last.name.as_str()));
            }
        }
    }

    match catalog.kernel_index() {
        Ok(index) => {
            assert!(index.ports.len() <= MAX_KERNEL_PORTS);
            assert_eq!(index.name(0), None);
            for &(key, i) in &index.ports {
                let (proto, port) = ((key >> 16) as u8, key as u16);
                assert_eq!(service_key(proto, port), key);
                let name = index.name(i).expect("every index names a service");
                assert_eq!(catalog.lookup(Proto::from_number(proto), port), Some(name));
            }
        }
        Err(e) => assert!(e.to_string().contains("narrow"), "{e}"),
    }
});

fn check_spec(spec: &ServiceSpec) {
    assert!(!spec.name.is_empty());
    assert_eq!(
        spec.to_string().parse::<ServiceSpec>().ok().as_ref(),
        Some(spec)
    );
    let mut alone = Catalog::default();
    alone.add(spec.clone());
    for r in &spec.ranges {
        assert!(0 < r.first && r.first <= r.last);
        for &p in &r.protos {
            assert_eq!(alone.lookup(p, r.first), Some(spec.name.as_str()));
            assert_eq!(alone.lookup(p, r.last), Some(spec.name.as_str()));
        }
    }
}
