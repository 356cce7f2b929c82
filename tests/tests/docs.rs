//! The documentation's internal links hold: every relative link from the
//! README and docs/ names a file of the repository, and every `#anchor`
//! a heading of its target (as GitHub spells heading anchors). Links that
//! leave the repository (the web, the workspace's shared incidents) are
//! not checked here.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// The pages: the README and every Markdown file under docs/.
fn pages() -> Vec<PathBuf> {
    let root = repo();
    let mut pages = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            pages.push(p);
        }
    }
    pages.sort();
    pages
}

/// Text outside fenced code blocks: `](` in code is not a link.
fn prose(text: &str) -> String {
    let mut fenced = false;
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The targets of `[text](target)` links.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        if let Some(end) = rest.find(')') {
            out.push(rest[..end].trim().to_string());
            rest = &rest[end..];
        }
    }
    out
}

/// GitHub's anchor for a heading: lower case, punctuation other than `-`
/// and `_` dropped, spaces to `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    prose(text)
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect()
}

#[test]
fn internal_links_name_files_and_headings_that_exist() {
    let root = repo();
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for link in links(&prose(&text)) {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            let (file, fragment) = match link.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (link.as_str(), None),
            };
            let target = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            let Ok(target) = target.canonicalize() else {
                // Outside the repository (the workspace's incidents) a
                // clean clone has nothing to check against.
                if !normalized(&page.parent().unwrap().join(file)).starts_with(&root) {
                    continue;
                }
                broken.push(format!("{}: {link}: no such file", page.display()));
                continue;
            };
            if !target.starts_with(&root) {
                continue;
            }
            checked += 1;
            if let Some(a) = fragment {
                let there = std::fs::read_to_string(&target).unwrap_or_default();
                if !anchors(&there).contains(a) {
                    broken.push(format!(
                        "{}: {link}: no heading with anchor #{a} in {}",
                        page.display(),
                        target.display()
                    ));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(
        checked >= 10,
        "only {checked} internal links found: is the parser blind?"
    );
}

/// `a/b/../c` as `a/c`, without touching the file system.
fn normalized(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

#[test]
fn the_anchor_rule_is_githubs() {
    assert_eq!(
        anchor("Privileges and exit codes"),
        "privileges-and-exit-codes"
    );
    assert_eq!(
        anchor("How a drop's cause is decided"),
        "how-a-drops-cause-is-decided"
    );
    assert_eq!(
        anchor("Output: the live view, JSON"),
        "output-the-live-view-json"
    );
    assert_eq!(links("see [a](b.md#c) and [d](e)"), ["b.md#c", "e"]);
}
