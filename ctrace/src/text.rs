//! Text ctrace did not write (process names, pod and namespace names,
//! interface and service names, anything read back from a recording) on
//! its way to a terminal, a plain log line or Markdown.
//!
//! Any user can set its process name to bytes that move the cursor,
//! retitle the terminal or start a new log line; a recording can be made
//! by anyone. JSON, HTML and Prometheus escape by their own rules; these
//! functions are for the rest.
use std::fmt::Write as _;

/// Longer names are cut (with `…`): no name from the system is this long
/// (comm is 15 bytes, a pod name 253), and a width taken from a hostile
/// one must stay printable.
pub const MAX_CHARS: usize = 256;

/// Control characters (C0, DEL, C1), the bidirectional overrides that
/// reorder what a terminal shows, and the backslash that starts an escape
/// are written as escapes; the result is at most [`MAX_CHARS`] shown
/// characters plus the escapes' own length.
pub fn terminal(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_CHARS));
    for (i, c) in s.chars().enumerate() {
        if i == MAX_CHARS {
            out.push('…');
            break;
        }
        match c {
            '\\' => out.push_str("\\\\"),
            c if c.is_control() && u32::from(c) <= 0xff => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if c.is_control() || is_bidi_control(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// [`terminal`], then every character Markdown could read as markup
/// (code spans, emphasis, links and images, raw HTML and entities,
/// headings) backslash-escaped, so the text shows as itself. `_` stays:
/// inside a word it is no markup, and names like `table_full` stay
/// readable in a terminal. A table cell escapes `|` on top of this (the
/// report's renderer does).
pub fn markdown(s: &str) -> String {
    let safe = terminal(s);
    let mut out = String::with_capacity(safe.len());
    for c in safe.chars() {
        if matches!(
            c,
            '\\' | '`' | '*' | '[' | ']' | '<' | '>' | '!' | '#' | '~' | '&'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_bidi_characters_never_pass_raw() {
        let comm = "ssh\x1b]0;pwned\x07\nFAKE LOG LINE\u{202e}\u{85}";
        let t = terminal(comm);
        assert!(
            !t.chars().any(|c| c.is_control() || is_bidi_control(c)),
            "{t:?}"
        );
        assert_eq!(t, "ssh\\x1b]0;pwned\\x07\\x0aFAKE LOG LINE\\u{202e}\\x85");
        assert_eq!(
            terminal("a\\x1b"),
            "a\\\\x1b",
            "a literal backslash stays distinct"
        );
        assert_eq!(terminal("etcd-peer"), "etcd-peer");
    }

    #[test]
    fn long_names_are_cut() {
        let long = "x".repeat(64 << 10);
        let t = terminal(&long);
        assert_eq!(t.chars().count(), MAX_CHARS + 1);
        assert!(t.ends_with('…'));
    }

    #[test]
    fn markdown_shows_markup_as_itself() {
        assert_eq!(
            markdown("`x` **b** [l](http://e) <img> # h\n"),
            "\\`x\\` \\*\\*b\\*\\* \\[l\\](http://e) \\<img\\> \\# h\\\\x0a"
        );
        assert_eq!(markdown("kube-apiserver"), "kube-apiserver");
    }
}
