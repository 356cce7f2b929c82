//! Kernel symbols: which functions exist (and can be probed), and where
//! they lie in kernel text. Read from `/proc/kallsyms` and tracefs's
//! `available_filter_functions`, never assumed from a version number.
use std::{collections::HashMap, fs, path::Path};

use anyhow::Context as _;

pub struct Kallsyms {
    /// Text symbols by exact name (clones keep their `.isra.0` suffix).
    text: HashMap<String, u64>,
    /// Every text symbol address, sorted: a function ends where the next
    /// symbol starts.
    starts: Vec<u64>,
}

impl Kallsyms {
    pub fn read() -> anyhow::Result<Kallsyms> {
        let text = fs::read_to_string("/proc/kallsyms").context("reading /proc/kallsyms")?;
        Ok(Self::parse(&text))
    }

    pub fn parse(text: &str) -> Kallsyms {
        let mut syms = HashMap::new();
        let mut starts = Vec::new();
        for line in text.lines() {
            let mut f = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            if !matches!(kind, "t" | "T" | "w" | "W") {
                continue;
            }
            let addr = u64::from_str_radix(addr, 16).unwrap_or(0);
            syms.entry(name.to_string()).or_insert(addr);
            if addr != 0 {
                starts.push(addr);
            }
        }
        starts.sort_unstable();
        starts.dedup();
        Kallsyms {
            text: syms,
            starts,
        }
    }

    /// The function exists under exactly this name.
    pub fn has(&self, name: &str) -> bool {
        self.text.contains_key(name)
    }

    /// Compiler clones of `name` (`name.isra.0`, `name.constprop.0`): the
    /// function exists, but callers may call the clone instead.
    pub fn clones(&self, name: &str) -> Vec<&str> {
        let prefix = format!("{name}.");
        let mut v: Vec<&str> = self
            .text
            .keys()
            .filter(|k| k.starts_with(&prefix))
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

/// Functions ftrace (and so kprobes at their entry) can attach to; None when
/// tracefs or the function tracer is absent.
pub fn available_filter_functions(tracefs: &Path) -> Option<std::collections::HashSet<String>> {
    let text = fs::read_to_string(tracefs.join("available_filter_functions")).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
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
ffffffff81300000 D some_data
";

    #[test]
    fn ranges_end_at_the_next_text_symbol() {
        let k = Kallsyms::parse(TEXT);
        assert_eq!(
            k.range("nf_hook_slow"),
            Some((0xffffffff81100000, 0xffffffff81100200))
        );
        assert!(k.range("early_drop").is_none(), "last symbol has no end");
        assert!(k.has("early_drop"));
        assert!(!k.has("__nf_conntrack_alloc"));
        assert_eq!(
            k.clones("__nf_conntrack_alloc"),
            ["__nf_conntrack_alloc.isra.0"]
        );
        assert!(!k.has("some_data"));
    }

    #[test]
    fn hidden_addresses_give_no_range() {
        let k = Kallsyms::parse("0000000000000000 T nf_hook_slow\n0000000000000000 T x\n");
        assert!(k.has("nf_hook_slow"));
        assert!(k.range("nf_hook_slow").is_none());
    }
}
