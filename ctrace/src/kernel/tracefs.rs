//! tracefs discovery and tracepoint `format` files.
//!
//! Raw tracepoint records have a layout that changes between kernels: skb's
//! `kfree_skb` gained `reason` in 5.17 and `rx_sk` in 6.x (moving `protocol`
//! and `reason`), and the numbering of `enum skb_drop_reason` shifts as
//! reasons are added. The kernel describes the exact layout and the enum
//! labels of the running kernel in `events/<category>/<name>/format`, so we
//! read offsets from there instead of hard-coding them.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};

/// Where tracefs lives on modern kernels (4.1+).
const TRACEFS: &str = "/sys/kernel/tracing";
/// Where it lived before, as a debugfs subdirectory; still populated for compatibility.
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// Where tracefs is mounted: /sys/kernel/tracing, else
/// /sys/kernel/debug/tracing, checked via /proc/self/mountinfo (fs type
/// "tracefs"), or None.
///
/// Checking the mount table rather than the directory matters: an unmounted
/// /sys/kernel/tracing still exists as an empty directory.
pub fn mounted_root() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    root_from_mountinfo(&mountinfo)
}

/// Mount tracefs at /sys/kernel/tracing if no tracefs is mounted at either
/// usual place, and return the root. The caller arranges for this to happen in
/// a private mount namespace; this function only mounts.
pub fn ensure_mounted() -> Result<PathBuf> {
    if let Some(root) = mounted_root() {
        return Ok(root);
    }
    let target = CString::new(TRACEFS).expect("no NUL in path");
    let fstype = CString::new("tracefs").expect("no NUL in name");
    // The flags systemd uses for its tracefs mount: tracefs holds no devices or programs.
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the
    // call; a null `data` means no mount options.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        let hint = match err.raw_os_error() {
            Some(libc::EPERM) => " (mounting needs CAP_SYS_ADMIN)",
            Some(libc::ENODEV) => " (this kernel has no tracefs: CONFIG_TRACING is off)",
            Some(libc::ENOENT) => " (the mount point is missing: is sysfs mounted?)",
            _ => "",
        };
        return Err(err).with_context(|| format!("mounting tracefs at {TRACEFS}{hint}"));
    }
    Ok(PathBuf::from(TRACEFS))
}

/// The tracefs root according to a mountinfo table (see proc(5)).
fn root_from_mountinfo(mountinfo: &str) -> Option<PathBuf> {
    // Mounts can stack on one mount point; only the last one listed is
    // visible, so a tracefs hidden under e.g. a tmpfs does not count.
    let mut visible: Vec<(String, bool)> = Vec::new();
    for line in mountinfo.lines() {
        // "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw": the
        // mount point is field 5, the fs type follows the "-" separator,
        // after a variable number of optional fields.
        let mut fields = line.split(' ');
        let Some(mount_point) = fields.nth(4) else {
            continue;
        };
        let Some(fstype) = fields.skip_while(|f| *f != "-").nth(1) else {
            continue;
        };
        let mount_point = unescape_mountinfo(mount_point);
        let is_tracefs = fstype == "tracefs";
        match visible.iter_mut().find(|(mp, _)| *mp == mount_point) {
            Some(entry) => entry.1 = is_tracefs,
            None => visible.push((mount_point, is_tracefs)),
        }
    }
    [TRACEFS, DEBUGFS_TRACING]
        .into_iter()
        .find(|root| visible.iter().any(|(mp, tracefs)| mp == root && *tracefs))
        .map(PathBuf::from)
}

/// Undoes mountinfo's octal escapes (`\040` for space etc.).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(octal) = bytes.get(i + 1..i + 4)
            && octal.iter().all(|b| (b'0'..=b'7').contains(b))
        {
            // Three octal digits; the kernel only escapes bytes, so this fits in a u8.
            let value = octal.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One field of a tracepoint record, as the format file describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    /// The declaration without the name; array suffixes stay with the type,
    /// e.g. "void *", "enum skb_drop_reason", "char[16]", "__data_loc char[]".
    pub c_type: String,
    /// Byte offset in the raw record, common_* header included.
    pub offset: u32,
    pub size: u32,
    pub signed: bool,
}

/// A parsed `events/<category>/<name>/format` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFormat {
    pub category: String,
    pub name: String,
    /// The event id, as found in `perf_event_attr.config` and `common_type`.
    pub id: u32,
    /// All fields, the common_* header first, in file order.
    pub fields: Vec<Field>,
    /// The `print fmt:` line after the label, verbatim.
    pub print_fmt: String,
}

impl EventFormat {
    /// Reads and parses `<root>/events/<category>/<name>/format`.
    pub fn read(root: &Path, category: &str, name: &str) -> Result<EventFormat> {
        let path = root.join("events").join(category).join(name).join("format");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
                "tracepoint {category}:{name} does not exist on this kernel ({} is missing)",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Self::parse(category, name, &text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Parses the text of a format file for the event `category:name`.
    pub fn parse(category: &str, name: &str, text: &str) -> Result<EventFormat> {
        let mut id = None;
        let mut fields = Vec::new();
        let mut print_fmt = None;
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("name:") {
                let found = rest.trim();
                ensure!(
                    found == name,
                    "format file is for event `{found}`, expected `{name}`"
                );
            } else if let Some(rest) = line.strip_prefix("ID:") {
                let rest = rest.trim();
                id = Some(
                    rest.parse::<u32>()
                        .with_context(|| format!("bad event ID `{rest}`"))?,
                );
            } else if let Some(rest) = line.strip_prefix("print fmt:") {
                print_fmt = Some(rest.trim().to_owned());
            } else if line.starts_with("field") {
                fields.push(parse_field(line).with_context(|| format!("bad field line `{line}`"))?);
            }
        }
        let id = id.ok_or_else(|| anyhow!("event {category}:{name}: no `ID:` line"))?;
        ensure!(!fields.is_empty(), "event {category}:{name}: no fields");
        Ok(EventFormat {
            category: category.to_owned(),
            name: name.to_owned(),
            id,
            fields,
            print_fmt: print_fmt.unwrap_or_default(),
        })
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// For a field printed with `__print_symbolic(REC->field, { 12,
    /// "NETFILTER_DROP" }, ...)`, the number whose label is `label`. The
    /// kfree_skb print fmt of 6.x kernels uses this for `reason`, which makes
    /// it a second source for drop reason numbers when BTF is unavailable.
    pub fn symbolic_value(&self, field: &str, label: &str) -> Option<u64> {
        let mut rest = self.print_fmt.as_str();
        while let Some(at) = rest.find("__print_symbolic") {
            rest = &rest[at + "__print_symbolic".len()..];
            // Also covers __print_symbolic_u64, whose arguments are the same.
            let args_start = rest.find('(')?;
            let (args, after) = split_parenthesized(&rest[args_start..])?;
            rest = after;
            let mut args = split_top_level(args, ',');
            let value_expr = args.next()?.trim();
            // Only a plain `REC->field`: for an expression of the field (shifts,
            // masks) the table's numbers are not raw field values.
            if strip_outer_parens(value_expr).strip_prefix("REC->") != Some(field) {
                continue;
            }
            for pair in args {
                if let Some((value, name)) = parse_symbol_pair(pair)
                    && name == label
                {
                    return Some(value);
                }
            }
        }
        None
    }
}

/// Parses `field:<decl>;\toffset:N;\tsize:N;\tsigned:N;`.
fn parse_field(line: &str) -> Result<Field> {
    let mut decl = None;
    let (mut offset, mut size, mut signed) = (None, None, false);
    for part in line.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once(':')
            .ok_or_else(|| anyhow!("`{part}` is not key:value"))?;
        let value = value.trim();
        let number = || {
            value
                .parse::<u32>()
                .with_context(|| format!("bad {key} `{value}`"))
        };
        match key.trim() {
            // "field special:" marks a few legacy ftrace-internal fields.
            "field" | "field special" => decl = Some(value),
            "offset" => offset = Some(number()?),
            "size" => size = Some(number()?),
            // Very old kernels had no signed: column; unsigned is the safe default.
            "signed" => signed = number()? != 0,
            _ => {} // Tolerate columns added by future kernels.
        }
    }
    let decl = decl.ok_or_else(|| anyhow!("no field: declaration"))?;
    let (c_type, name) = split_declaration(decl)?;
    Ok(Field {
        name,
        c_type,
        offset: offset.ok_or_else(|| anyhow!("no offset"))?,
        size: size.ok_or_else(|| anyhow!("no size"))?,
        signed,
    })
}

/// Splits a C declaration into (type, name): "char name[16]" -> ("char[16]",
/// "name"), "__data_loc char[] name" -> ("__data_loc char[]", "name"),
/// "void * skbaddr" -> ("void *", "skbaddr").
fn split_declaration(decl: &str) -> Result<(String, String)> {
    let decl = decl.trim();
    let (base, array) = match decl
        .strip_suffix(']')
        .and_then(|d| d.rfind('[').map(|i| (d, i)))
    {
        Some((d, i)) => (d[..i].trim_end(), &decl[i..]),
        None => (decl, ""),
    };
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let name_start = base.trim_end_matches(is_ident).len();
    let name = &base[name_start..];
    let c_type = base[..name_start].trim_end();
    ensure!(
        !name.is_empty() && !c_type.is_empty(),
        "cannot split `{decl}` into type and name"
    );
    Ok((format!("{c_type}{array}"), name.to_owned()))
}

/// For text starting with '(', the contents up to the matching ')' and the
/// text after it. Parentheses inside string literals are ignored.
fn split_parenthesized(text: &str) -> Option<(&str, &str)> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '(' => depth += 1,
            ')' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some((&text[1..i], &text[i + 1..]));
                }
            }
            _ => {}
        }
    }
    None
}

/// Splits on `sep` outside parentheses, braces and string literals.
fn split_top_level(text: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut pieces = Vec::new();
    let (mut depth, mut in_string, mut escaped, mut start) = (0i32, false, false, 0);
    for (i, c) in text.char_indices() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '(' | '{' => depth += 1,
            ')' | '}' => depth -= 1,
            _ if c == sep && depth == 0 => {
                pieces.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    pieces.push(&text[start..]);
    pieces.into_iter()
}

fn strip_outer_parens(mut expr: &str) -> &str {
    while let Some(inner) = expr.strip_prefix('(').and_then(|e| e.strip_suffix(')')) {
        // "(a) & (b)" starts and ends with parens that don't match each other.
        if split_parenthesized(expr).is_none_or(|(_, after)| !after.is_empty()) {
            break;
        }
        expr = inner.trim();
    }
    expr
}

/// Parses `{ 12, "NETFILTER_DROP" }` into (12, "NETFILTER_DROP"). Values are
/// decimal or 0x-hex; negative ones are returned as their two's complement.
fn parse_symbol_pair(pair: &str) -> Option<(u64, &str)> {
    let inner = pair.trim().strip_prefix('{')?.strip_suffix('}')?;
    let (value, label) = inner.split_once(',')?;
    let label = label.trim().strip_prefix('"')?.strip_suffix('"')?;
    let value = value.trim();
    let value = if let Some(hex) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        u64::from_str_radix(hex, 16).ok()?
    } else if value.starts_with('-') {
        // Parsed with its sign: negating the digits overflows for i64::MIN,
        // and would let "--5" through as 5.
        value.parse::<i64>().ok()? as u64
    } else {
        value.parse().ok()?
    };
    Some((value, label))
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStrExt;

    use super::*;

    /// The escaping the kernel applies to mountinfo paths (show_mountinfo -> mangle).
    fn escape_mountinfo(path: &Path) -> String {
        path.as_os_str()
            .as_bytes()
            .iter()
            .map(|&b| match b {
                b' ' | b'\t' | b'\n' | b'\\' => format!("\\{b:03o}"),
                _ => char::from(b).to_string(),
            })
            .collect()
    }

    const COMMON: &str = "\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;
";

    fn kfree_skb_6_18() -> String {
        format!(
            "name: kfree_skb\nID: 1519\nformat:\n{COMMON}
\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;
\tfield:void * rx_sk;\toffset:24;\tsize:8;\tsigned:0;
\tfield:unsigned short protocol;\toffset:32;\tsize:2;\tsigned:0;
\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;

print fmt: \"skbaddr=%p rx_sk=%p protocol=%u location=%pS reason: %s\", REC->skbaddr, REC->rx_sk, REC->protocol, REC->location, __print_symbolic(REC->reason, {{ 1, \"NOT_SPECIFIED\" }}, {{ 2, \"NO_SOCKET\" }}, {{ 12, \"NETFILTER_DROP\" }}, {{ 2147483647, \"MAX\" }})
"
        )
    }

    fn kfree_skb_6_1() -> String {
        format!(
            "name: kfree_skb\nID: 1401\nformat:\n{COMMON}
\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned short protocol;\toffset:24;\tsize:2;\tsigned:0;
\tfield:enum skb_drop_reason reason;\toffset:28;\tsize:4;\tsigned:0;

print fmt: \"skbaddr=%p protocol=%u location=%p reason: %s\", REC->skbaddr, REC->protocol, REC->location, __print_symbolic(REC->reason, {{ 1, \"NOT_SPECIFIED\" }}, {{ 2, \"NO_SOCKET\" }}, {{ 6, \"TCP_CSUM\" }}, {{ 7, \"NETFILTER_DROP\" }}, {{ 8, \"OTHERHOST\" }}, {{ 0x45, \"MAX\" }})
"
        )
    }

    fn kfree_skb_5_10() -> String {
        format!(
            "name: kfree_skb\nID: 1245\nformat:\n{COMMON}
\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned short protocol;\toffset:24;\tsize:2;\tsigned:0;

print fmt: \"skbaddr=%p protocol=%u location=%p\", REC->skbaddr, REC->protocol, REC->location
"
        )
    }

    fn at(format: &EventFormat, name: &str) -> (u32, u32) {
        let f = format
            .field(name)
            .unwrap_or_else(|| panic!("no field {name}"));
        (f.offset, f.size)
    }

    #[test]
    fn kfree_skb_6_18_layout_and_reasons() {
        let f = EventFormat::parse("skb", "kfree_skb", &kfree_skb_6_18()).unwrap();
        assert_eq!(
            (f.category.as_str(), f.name.as_str(), f.id),
            ("skb", "kfree_skb", 1519)
        );
        assert_eq!(f.fields.len(), 9);
        assert_eq!(at(&f, "skbaddr"), (8, 8));
        assert_eq!(at(&f, "location"), (16, 8));
        assert_eq!(at(&f, "rx_sk"), (24, 8));
        assert_eq!(at(&f, "protocol"), (32, 2));
        assert_eq!(at(&f, "reason"), (36, 4));
        let reason = f.field("reason").unwrap();
        assert_eq!(reason.c_type, "enum skb_drop_reason");
        assert!(!reason.signed);
        assert_eq!(f.field("skbaddr").unwrap().c_type, "void *");
        let pid = f.field("common_pid").unwrap();
        assert_eq!(
            (pid.c_type.as_str(), pid.offset, pid.signed),
            ("int", 4, true)
        );
        assert!(f.print_fmt.starts_with("\"skbaddr=%p rx_sk=%p"));
        assert!(f.print_fmt.ends_with("\"MAX\" })"));
        assert_eq!(f.symbolic_value("reason", "NETFILTER_DROP"), Some(12));
        assert_eq!(f.symbolic_value("reason", "NOT_SPECIFIED"), Some(1));
        assert_eq!(f.symbolic_value("reason", "MAX"), Some(2147483647));
        assert_eq!(f.symbolic_value("reason", "NO_SUCH_REASON"), None);
        assert_eq!(f.symbolic_value("protocol", "NETFILTER_DROP"), None);
    }

    #[test]
    fn kfree_skb_6_1_layout_and_reasons() {
        let f = EventFormat::parse("skb", "kfree_skb", &kfree_skb_6_1()).unwrap();
        assert!(f.field("rx_sk").is_none());
        assert_eq!(at(&f, "skbaddr"), (8, 8));
        assert_eq!(at(&f, "location"), (16, 8));
        assert_eq!(at(&f, "protocol"), (24, 2));
        assert_eq!(at(&f, "reason"), (28, 4));
        assert_eq!(f.symbolic_value("reason", "NETFILTER_DROP"), Some(7));
        assert_eq!(f.symbolic_value("reason", "MAX"), Some(0x45));
    }

    #[test]
    fn kfree_skb_before_5_17_has_no_reason() {
        let f = EventFormat::parse("skb", "kfree_skb", &kfree_skb_5_10()).unwrap();
        assert_eq!(f.id, 1245);
        assert_eq!(at(&f, "skbaddr"), (8, 8));
        assert_eq!(at(&f, "location"), (16, 8));
        assert_eq!(at(&f, "protocol"), (24, 2));
        assert!(f.field("reason").is_none());
        assert_eq!(f.symbolic_value("reason", "NETFILTER_DROP"), None);
    }

    #[test]
    fn array_and_data_loc_field_names() {
        let text = "name: sched_process_exec\nID: 7\nformat:\n\
            \tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
            \tfield:__data_loc char[] filename;\toffset:24;\tsize:4;\tsigned:0;\n\
            \tfield:u8 saddr[4];\toffset:28;\tsize:4;\tsigned:0;\n\
            \tfield:const char * name;\toffset:32;\tsize:8;\tsigned:0;\n\
            \tfield special:unsigned long args[6];\toffset:40;\tsize:48;\n";
        let f = EventFormat::parse("test", "sched_process_exec", text).unwrap();
        let types: Vec<(&str, &str)> = f
            .fields
            .iter()
            .map(|f| (f.name.as_str(), f.c_type.as_str()))
            .collect();
        assert_eq!(
            types,
            [
                ("comm", "char[16]"),
                ("filename", "__data_loc char[]"),
                ("saddr", "u8[4]"),
                ("name", "const char *"),
                ("args", "unsigned long[6]"),
            ]
        );
        assert_eq!(at(&f, "args"), (40, 48));
        assert!(!f.field("args").unwrap().signed);
    }

    #[test]
    fn symbolic_value_needs_the_plain_field() {
        let mut f = EventFormat::parse("skb", "kfree_skb", &kfree_skb_6_18()).unwrap();
        f.print_fmt = "\"%s %s\", __print_symbolic((((REC->reason) >> 13) & (8 - 1)), { 1, \"X\" }), \
                       __print_symbolic((REC->reason), { 3, \"Y\" }), \
                       __print_symbolic_u64(REC->big, { 0xffffffffffffffff, \"ALL\" }, { -1, \"NEG\" })"
            .to_owned();
        assert_eq!(f.symbolic_value("reason", "X"), None);
        assert_eq!(f.symbolic_value("reason", "Y"), Some(3));
        assert_eq!(f.symbolic_value("big", "ALL"), Some(u64::MAX));
        assert_eq!(f.symbolic_value("big", "NEG"), Some(u64::MAX));
    }

    #[test]
    fn negative_symbol_values() {
        let mut f = EventFormat::parse("skb", "kfree_skb", &kfree_skb_6_18()).unwrap();
        f.print_fmt = "\"%s\", __print_symbolic(REC->reason, { -9223372036854775808, \"MIN\" }, \
                       { --9223372036854775808, \"DOUBLE\" }, { --5, \"TWICE\" })"
            .to_owned();
        assert_eq!(f.symbolic_value("reason", "MIN"), Some(1 << 63));
        assert_eq!(f.symbolic_value("reason", "DOUBLE"), None);
        assert_eq!(f.symbolic_value("reason", "TWICE"), None);
    }

    #[test]
    fn parse_errors() {
        let no_id = "name: x\nformat:\n\tfield:int a;\toffset:0;\tsize:4;\tsigned:1;\n";
        let e = format!("{:#}", EventFormat::parse("c", "x", no_id).unwrap_err());
        assert!(e.contains("no `ID:` line"), "{e}");
        let bad = "name: x\nID: 1\nformat:\n\tfield:int a;\toffset:zero;\tsize:4;\n";
        let e = format!("{:#}", EventFormat::parse("c", "x", bad).unwrap_err());
        assert!(e.contains("bad offset `zero`"), "{e}");
        let e = format!(
            "{:#}",
            EventFormat::parse("c", "y", &kfree_skb_6_1()).unwrap_err()
        );
        assert!(e.contains("expected `y`"), "{e}");
    }

    #[test]
    fn missing_tracepoint_is_named() {
        let e = EventFormat::read(Path::new("/nonexistent"), "skb", "kfree_skb").unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("tracepoint skb:kfree_skb does not exist on this kernel"),
            "{e}"
        );
    }

    #[test]
    fn mountinfo_lookup() {
        let line = |id: u32, mp: &str, fstype: &str| {
            format!(
                "{id} 1 0:{id} / {} rw,relatime shared:{id} - {fstype} {fstype} rw\n",
                escape_mountinfo(Path::new(mp))
            )
        };
        let sys = line(20, "/sys", "sysfs");
        let debug = line(21, "/sys/kernel/debug", "debugfs");
        let old = line(22, DEBUGFS_TRACING, "tracefs");
        let new = line(23, TRACEFS, "tracefs");
        let hidden = line(24, TRACEFS, "tmpfs");

        assert_eq!(root_from_mountinfo(&sys), None);
        assert_eq!(
            root_from_mountinfo(&(sys.clone() + &debug + &old)),
            Some(DEBUGFS_TRACING.into())
        );
        assert_eq!(
            root_from_mountinfo(&(sys.clone() + &old + &new)),
            Some(TRACEFS.into())
        );
        assert_eq!(root_from_mountinfo(&(sys.clone() + &new + &hidden)), None);
        assert_eq!(
            root_from_mountinfo(&(sys.clone() + &new + &hidden + &old)),
            Some(DEBUGFS_TRACING.into())
        );
        // Optional fields vary in number; the type is found after "-".
        let no_optional = format!("30 1 0:30 / {TRACEFS} rw - tracefs tracefs rw\n");
        assert_eq!(root_from_mountinfo(&no_optional), Some(TRACEFS.into()));
        let spaced = line(31, "/mnt/trace fs", "tracefs");
        assert!(spaced.contains("\\040"));
        assert_eq!(unescape_mountinfo("/mnt/trace\\040fs"), "/mnt/trace fs");
        assert_eq!(root_from_mountinfo(&spaced), None);
    }

    #[test]
    fn host_kfree_skb_format() {
        let Some(root) = mounted_root() else {
            eprintln!("skipping: tracefs is not mounted (mount -t tracefs tracefs {TRACEFS})");
            return;
        };
        let f = EventFormat::read(&root, "skb", "kfree_skb").unwrap();
        eprintln!("kfree_skb id {} fields {:?}", f.id, f.fields);
        assert!(f.id > 0);
        assert_eq!(f.field("common_type").map(|c| c.offset), Some(0));
        assert!(f.field("skbaddr").is_some());
        assert!(f.field("location").is_some());
        if f.field("reason").is_some() {
            let drop = f.symbolic_value("reason", "NETFILTER_DROP");
            eprintln!("NETFILTER_DROP = {drop:?}");
            assert!(drop.is_some_and(|v| v > 0));
        }
        // Already mounted, so this must not mount again.
        assert_eq!(ensure_mounted().unwrap(), root);
        let e = format!(
            "{:#}",
            EventFormat::read(&root, "skb", "no_such_event").unwrap_err()
        );
        assert!(e.contains("does not exist on this kernel"), "{e}");
    }
}
