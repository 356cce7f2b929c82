//! Kernel symbols: which functions exist (and can be probed), and where
//! they lie in kernel text. Read from `/proc/kallsyms` and tracefs's
//! `available_filter_functions`, never assumed from a version number.
use std::{
    collections::HashMap,
    fs,
    io::{BufRead as _, BufReader},
    path::Path,
};

use anyhow::Context as _;

/// The symbols asked for: /proc/kallsyms holds ~200,000 lines, and a router
/// has no memory to spare for all their names.
pub struct Kallsyms {
    /// Wanted text symbols and their clones by exact name (clones keep
    /// their `.isra.0` suffix).
    text: HashMap<String, u64>,
    /// Every text symbol address, sorted: a function ends where the next
    /// symbol starts.
    starts: Vec<u64>,
}

impl Kallsyms {
    /// Reads the symbols named in `wanted` (and their clones).
    pub fn read(wanted: &[&str]) -> anyhow::Result<Kallsyms> {
        let f = fs::File::open("/proc/kallsyms").context("reading /proc/kallsyms")?;
        let lines = BufReader::new(f).lines().map_while(Result::ok);
        Ok(Self::parse(lines, wanted))
    }

    pub fn parse<S: AsRef<str>>(lines: impl Iterator<Item = S>, wanted: &[&str]) -> Kallsyms {
        let mut syms = HashMap::new();
        let mut starts = Vec::new();
        for line in lines {
            let line = line.as_ref();
            let mut f = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            if !matches!(kind, "t" | "T" | "w" | "W") {
                continue;
            }
            let addr = u64::from_str_radix(addr, 16).unwrap_or(0);
            let base = name.split('.').next().unwrap_or(name);
            if wanted.contains(&base) {
                syms.entry(name.to_string()).or_insert(addr);
            }
            if addr != 0 {
                starts.push(addr);
            }
        }
        starts.sort_unstable();
        starts.dedup();
        Kallsyms { text: syms, starts }
    }

    /// The function exists under exactly this name.
    pub fn has(&self, name: &str) -> bool {
        self.text.contains_key(name)
    }

    /// Compiler clones of `name` (`name.isra.0`, `name.constprop.0`,
    /// `name.part.0`): the function exists, but callers may call the clone
    /// instead. `name.cold` is not one: it is the function's own unlikely
    /// code, jumped to from inside it, and returns through its frame.
    pub fn clones(&self, name: &str) -> Vec<&str> {
        let prefix = format!("{name}.");
        let mut v: Vec<&str> = self
            .text
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .filter(|k| !k[prefix.len()..].split('.').any(|part| part == "cold"))
            .map(String::as_str)
            .collect();
        v.sort_unstable();
        v
    }

    /// [start, end) of a function in kernel text; None when the symbol is
    /// absent or its address hidden (kptr_restrict).
    pub fn range(&self, name: &str) -> Option<(u64, u64)> {
        let start = *self.text.get(name)?;
        if start == 0 {
            return None;
        }
        let i = self.starts.partition_point(|a| *a <= start);
        let end = *self.starts.get(i)?;
        Some((start, end))
    }
}

/// Which of `wanted` ftrace (and so kprobes at their entry) can attach to;
/// None when tracefs or the function tracer is absent.
pub fn available_filter_functions(
    tracefs: &Path,
    wanted: &[&str],
) -> Option<std::collections::HashSet<String>> {
    let f = fs::File::open(tracefs.join("available_filter_functions")).ok()?;
    Some(
        BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| {
                let name = l.split_whitespace().next()?;
                wanted.contains(&name).then(|| name.to_string())
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
ffffffff81000000 T _stext
ffffffff81100000 T nf_hook_slow
ffffffff81100200 T nf_hook_slow_list
ffffffff81200000 t __nf_conntrack_alloc.isra.0 [nf_conntrack]
ffffffff81200400 t early_drop [nf_conntrack]
ffffffff81200800 t early_drop.cold [nf_conntrack]
ffffffff81300000 D some_data
";

    #[test]
    fn ranges_end_at_the_next_text_symbol() {
        let k = Kallsyms::parse(
            TEXT.lines(),
            &[
                "nf_hook_slow",
                "early_drop",
                "__nf_conntrack_alloc",
                "some_data",
            ],
        );
        assert_eq!(
            k.range("nf_hook_slow"),
            Some((0xffffffff81100000, 0xffffffff81100200))
        );
        assert_eq!(
            k.range("early_drop"),
            Some((0xffffffff81200400, 0xffffffff81200800))
        );
        assert!(k.has("early_drop"));
        assert!(k.clones("early_drop").is_empty(), ".cold is no clone");
        assert!(!k.has("__nf_conntrack_alloc"));
        assert_eq!(
            k.clones("__nf_conntrack_alloc"),
            ["__nf_conntrack_alloc.isra.0"]
        );
        assert!(!k.has("some_data"));
    }

    #[test]
    fn hidden_addresses_give_no_range() {
        let k = Kallsyms::parse(
            "0000000000000000 T nf_hook_slow\n0000000000000000 T x\n".lines(),
            &["nf_hook_slow"],
        );
        assert!(k.has("nf_hook_slow"));
        assert!(k.range("nf_hook_slow").is_none());
    }
}
