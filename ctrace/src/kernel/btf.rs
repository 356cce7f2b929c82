//! A minimal reader for the running kernel's BTF (BPF Type Format).
//!
//! Struct layouts (`sk_buff`, `net_device`, `nf_conn`, ...) and enum values
//! (`skb_drop_reason`) move between kernel versions and configs. Reading them
//! from `/sys/kernel/btf` at start-up lets one ctrace binary follow whatever
//! kernel it runs on, instead of carrying per-version offset tables. We only
//! need member offsets and sizes, enum values and "does this function exist",
//! so a small reader is simpler than a dependency.
//!
//! Layout reference: Documentation/bpf/btf.rst and include/uapi/linux/btf.h.
//! Module BTF (`/sys/kernel/btf/<module>`) is "split" BTF: its type ids and
//! string offsets continue where vmlinux's end, and its types refer freely to
//! vmlinux types, so it is only meaningful layered on top of the base.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail, ensure};

const BTF_MAGIC: u16 = 0xeb9f;
/// The original header; newer kernels may append fields, announced via `hdr_len`.
const MIN_HEADER_LEN: usize = 24;
/// `struct btf_type`: name_off, info, size/type.
const TYPE_LEN: usize = 12;
const SYSFS_BTF: &str = "/sys/kernel/btf";

// BTF_KIND_* from include/uapi/linux/btf.h.
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Bound on typedef/qualifier chains and anonymous-member nesting. Real kernel
/// BTF needs a handful; the bound only keeps corrupt (cyclic) BTF from hanging us.
const MAX_DEPTH: usize = 64;

/// Type information of the running kernel (vmlinux), optionally with one or
/// more module BTF blobs layered on top.
///
/// Cloning is cheap: the parsed blobs are shared.
#[derive(Clone)]
pub struct Btf {
    /// Base first; each later layer is split BTF continuing the previous one.
    layers: Vec<Arc<Layer>>,
}

/// One BTF blob: vmlinux, or a module's split blob.
struct Layer {
    data: Vec<u8>,
    /// Byte offset in `data` of each type record; entry `i` is type id `first_id + i`.
    type_offsets: Vec<u32>,
    first_id: u32,
    /// The string section, as a range of `data`.
    strs: Range<usize>,
    /// String offset at which this layer's strings start: 0 for the base, the
    /// accumulated string length of the layers below for split BTF.
    str_base: u32,
    /// Names of the kinds we look up by name -> type ids, in id order. Built once
    /// so lookups don't rescan the ~150k types of vmlinux.
    by_name: HashMap<Box<str>, Vec<u32>>,
}

/// A view of one type record (header plus its kind-specific trailing data).
#[derive(Clone, Copy)]
struct Type<'a> {
    id: u32,
    rec: &'a [u8],
}

/// `struct btf_member`, with the offset already decoded.
#[derive(Clone, Copy)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    /// Non-zero only for bitfields described with the struct's kind_flag.
    bitfield_size: u32,
}

/// A member found by name, possibly inside anonymous structs/unions.
struct Found {
    /// Relative to the start of the struct searched.
    bit_offset: u64,
    type_id: u32,
    bitfield_size: u32,
}

fn read_u32(data: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(data[at..at + 4].try_into().expect("4-byte slice"))
}

/// Bytes following the 12-byte header of a type of this kind, or None for a
/// kind this reader doesn't know (guessing would silently misparse everything after it).
fn trailing_len(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => vlen * 12,
        KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
        _ => return None,
    })
}

fn kind_name(kind: u32) -> &'static str {
    match kind {
        0 => "void",
        KIND_INT => "int",
        KIND_PTR => "pointer",
        KIND_ARRAY => "array",
        KIND_STRUCT => "struct",
        KIND_UNION => "union",
        KIND_ENUM => "enum",
        KIND_FWD => "forward declaration",
        KIND_TYPEDEF => "typedef",
        KIND_VOLATILE => "volatile",
        KIND_CONST => "const",
        KIND_RESTRICT => "restrict",
        KIND_FUNC => "function",
        KIND_FUNC_PROTO => "function prototype",
        KIND_VAR => "variable",
        KIND_DATASEC => "data section",
        KIND_FLOAT => "float",
        KIND_DECL_TAG => "decl tag",
        KIND_TYPE_TAG => "type tag",
        KIND_ENUM64 => "enum64",
        _ => "unknown kind",
    }
}

/// Kinds worth indexing by name: the ones the public lookups start from, plus
/// INT so the pointer size can be derived from `long`.
fn indexed_kind(kind: u32) -> bool {
    matches!(
        kind,
        KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_TYPEDEF | KIND_FUNC | KIND_ENUM64
    )
}

fn is_composite(kind: u32) -> bool {
    kind == KIND_STRUCT || kind == KIND_UNION
}

impl<'a> Type<'a> {
    fn u32_at(&self, at: usize) -> u32 {
        read_u32(self.rec, at)
    }
    fn name_off(&self) -> u32 {
        self.u32_at(0)
    }
    fn info(&self) -> u32 {
        self.u32_at(4)
    }
    fn kind(&self) -> u32 {
        (self.info() >> 24) & 0x1f
    }
    fn vlen(&self) -> usize {
        (self.info() & 0xffff) as usize
    }
    fn kind_flag(&self) -> bool {
        self.info() >> 31 != 0
    }
    /// The size for INT/STRUCT/UNION/ENUM/ENUM64/FLOAT/DATASEC, the referenced
    /// type id for PTR/TYPEDEF/qualifiers/FUNC/FUNC_PROTO/VAR/TAGs.
    fn size_or_type(&self) -> u32 {
        self.u32_at(8)
    }
    /// The `i`th u32 of the trailing data.
    fn trailing(&self, i: usize) -> u32 {
        self.u32_at(TYPE_LEN + 4 * i)
    }

    fn members(self) -> impl Iterator<Item = Member> + 'a {
        // With kind_flag set on a struct/union, member offsets pack the bitfield
        // size into the top 8 bits; without it they are plain bit offsets.
        let packed = self.kind_flag();
        (0..self.vlen()).map(move |i| {
            let raw = self.trailing(3 * i + 2);
            let (bit_offset, bitfield_size) = if packed {
                (raw & 0x00ff_ffff, raw >> 24)
            } else {
                (raw, 0)
            };
            Member {
                name_off: self.trailing(3 * i),
                type_id: self.trailing(3 * i + 1),
                bit_offset,
                bitfield_size,
            }
        })
    }

    /// (name_off, value) of each enumerator of an ENUM or ENUM64.
    fn enumerators(self) -> impl Iterator<Item = (u32, i64)> + 'a {
        // kind_flag marks a signed enum (since 6.0; older BTF always has it
        // clear and only ever had small values where the distinction is moot).
        let signed = self.kind_flag();
        let wide = self.kind() == KIND_ENUM64;
        (0..self.vlen()).map(move |i| {
            if wide {
                let lo = u64::from(self.trailing(3 * i + 1));
                let hi = u64::from(self.trailing(3 * i + 2));
                // Unsigned values above i64::MAX wrap; no kernel enum we read is that big.
                (self.trailing(3 * i), (hi << 32 | lo) as i64)
            } else {
                let raw = self.trailing(2 * i + 1);
                let value = if signed {
                    i64::from(raw as i32)
                } else {
                    i64::from(raw)
                };
                (self.trailing(2 * i), value)
            }
        })
    }
}

impl Layer {
    /// Validates the header and walks the type section once, recording where
    /// each type starts. The name index is filled in by the caller, because
    /// split BTF names may live in the base's string section.
    fn parse(data: Vec<u8>, first_id: u32, str_base: u32) -> Result<Layer> {
        ensure!(
            data.len() >= MIN_HEADER_LEN,
            "BTF blob is {} bytes, shorter than the {MIN_HEADER_LEN}-byte header",
            data.len()
        );
        let magic = u16::from_ne_bytes([data[0], data[1]]);
        if magic == BTF_MAGIC.swap_bytes() {
            bail!(
                "BTF magic is byte-swapped ({magic:#06x}): the blob was generated for a machine of the other endianness"
            );
        }
        ensure!(
            magic == BTF_MAGIC,
            "not BTF: magic is {magic:#06x}, expected {BTF_MAGIC:#06x}"
        );
        let version = data[2];
        ensure!(
            version == 1,
            "unsupported BTF version {version} (only 1 is known)"
        );

        let hdr_len = read_u32(&data, 4) as usize;
        ensure!(
            (MIN_HEADER_LEN..=data.len()).contains(&hdr_len),
            "BTF header length {hdr_len} is out of range for a {}-byte blob",
            data.len()
        );
        // Section offsets count from the end of the header, whatever its length.
        let section = |name: &str, off_at: usize| -> Result<Range<usize>> {
            let off = read_u32(&data, off_at) as usize;
            let len = read_u32(&data, off_at + 4) as usize;
            let start = hdr_len + off;
            let end = start + len;
            ensure!(
                end <= data.len(),
                "BTF {name} section ({off}+{len} after the header) runs past the end of the {}-byte blob",
                data.len()
            );
            Ok(start..end)
        };
        let types = section("type", 8)?;
        let strs = section("string", 16)?;

        let str_bytes = &data[strs.clone()];
        if str_base == 0 {
            // Offset 0 is the empty name of anonymous types.
            ensure!(
                str_bytes.first() == Some(&0),
                "BTF string section must start with an empty string"
            );
        }
        // Terminated sections mean every name lookup finds its NUL in bounds.
        ensure!(
            str_bytes.last().is_none_or(|&b| b == 0),
            "BTF string section is not NUL-terminated"
        );
        ensure!(
            u32::try_from(str_bytes.len())
                .ok()
                .and_then(|len| str_base.checked_add(len))
                .is_some(),
            "BTF string section too large"
        );

        let mut type_offsets = Vec::with_capacity(types.len() / 16);
        let mut pos = types.start;
        while pos < types.end {
            let id = first_id as usize + type_offsets.len();
            ensure!(
                pos + TYPE_LEN <= types.end,
                "type id {id}: record truncated at the end of the type section"
            );
            let info = read_u32(&data, pos + 4);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let extra = trailing_len(kind, vlen).ok_or_else(|| {
                anyhow!(
                    "type id {id}: unknown BTF kind {kind} (this reader knows kinds 1..={KIND_ENUM64}); \
                     the kernel's BTF is newer than ctrace"
                )
            })?;
            let end = pos + TYPE_LEN + extra;
            ensure!(
                end <= types.end,
                "type id {id} ({}, vlen {vlen}): record runs past the end of the type section",
                kind_name(kind)
            );
            type_offsets.push(u32::try_from(pos).context("BTF blob larger than 4 GiB")?);
            pos = end;
        }
        ensure!(
            u32::try_from(type_offsets.len())
                .ok()
                .and_then(|n| first_id.checked_add(n))
                .is_some(),
            "BTF type ids overflow u32"
        );

        Ok(Layer {
            data,
            type_offsets,
            first_id,
            strs,
            str_base,
            by_name: HashMap::new(),
        })
    }

    /// One past the last type id of this layer: the first id of a split layer on top.
    fn end_id(&self) -> u32 {
        self.first_id + self.type_offsets.len() as u32
    }

    /// One past the last string offset of this layer.
    fn str_end(&self) -> u32 {
        self.str_base + self.strs.len() as u32
    }

    fn ty(&self, id: u32) -> Type<'_> {
        let start = self.type_offsets[(id - self.first_id) as usize] as usize;
        let info = read_u32(&self.data, start + 4);
        let extra = trailing_len((info >> 24) & 0x1f, (info & 0xffff) as usize)
            .expect("kind validated at parse time");
        Type {
            id,
            rec: &self.data[start..start + TYPE_LEN + extra],
        }
    }

    /// The string at an offset local to this layer's string section.
    fn local_str(&self, off: u32) -> Result<&str> {
        let bytes = &self.data[self.strs.clone()];
        let start = off as usize;
        ensure!(
            start < bytes.len(),
            "BTF string offset {} is out of range",
            self.str_base + off
        );
        let len = bytes[start..]
            .iter()
            .position(|&b| b == 0)
            .expect("string section is NUL-terminated");
        std::str::from_utf8(&bytes[start..start + len])
            .with_context(|| format!("BTF string at offset {} is not UTF-8", self.str_base + off))
    }
}

/// Resolves a string offset against a stack of layers (base first): each
/// layer owns offsets from its `str_base` up.
fn find_str<'a>(layers: impl DoubleEndedIterator<Item = &'a Layer>, off: u32) -> Result<&'a str> {
    let mut layers = layers.rev();
    let layer = layers
        .find(|l| off >= l.str_base)
        .ok_or_else(|| anyhow!("BTF string offset {off} is out of range"))?;
    layer.local_str(off - layer.str_base)
}

impl Btf {
    /// Parses base BTF, normally vmlinux's.
    pub fn from_bytes(data: Vec<u8>) -> Result<Btf> {
        // Id 0 is void and never stored, so the first record is id 1.
        Self::stack(Vec::new(), Layer::parse(data, 1, 0)?)
    }

    /// Parses a module's split BTF, whose type ids and string offsets continue
    /// after `base`'s and whose types refer to base types. Lookups on the result
    /// see base and module types alike.
    pub fn from_split_bytes(data: Vec<u8>, base: &Btf) -> Result<Btf> {
        let top = base.top();
        let layer = Layer::parse(data, top.end_id(), top.str_end())?;
        Self::stack(base.layers.clone(), layer)
    }

    /// The running kernel's own BTF.
    pub fn vmlinux() -> Result<Btf> {
        let path = format!("{SYSFS_BTF}/vmlinux");
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
                "{path} is missing: this kernel has no BTF (it needs CONFIG_DEBUG_INFO_BTF=y), \
                 so struct offsets cannot be looked up"
            ),
            Err(e) => return Err(e).with_context(|| format!("reading {path}")),
        };
        Self::from_bytes(data).with_context(|| format!("parsing {path}"))
    }

    /// BTF of a loaded module, e.g. `nf_conntrack`. Only loadable modules have
    /// their own file; for built-in code the types are already in vmlinux.
    pub fn module(name: &str, base: &Btf) -> Result<Btf> {
        ensure!(
            !name.is_empty() && !name.contains('/') && name != "." && name != "..",
            "invalid module name {name:?}"
        );
        let path = Path::new(SYSFS_BTF).join(name);
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
                "{} is missing: module {name} is not loaded, is built into vmlinux (then use the \
                 vmlinux BTF), or was built without CONFIG_DEBUG_INFO_BTF_MODULES",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Self::from_split_bytes(data, base)
            .with_context(|| format!("parsing {} on top of vmlinux BTF", path.display()))
    }

    /// Byte offset of a member path such as "sk_buff.dev", "net_device.nd_net.net",
    /// "net.ns.inum" or "sock.__sk_common.skc_net.net".
    ///
    /// The first component names a struct or union (or a typedef of one); each
    /// further component is a member of the previous one. Members are also
    /// found inside anonymous structs/unions, because the kernel hides many
    /// fields there (most of `sk_buff`, e.g. `dev`, `sk` and the `headers`
    /// struct_group), and their offsets are summed. Typedefs and qualifiers
    /// are followed; pointers are not (that would need a memory read, which is
    /// the BPF program's job). Bitfields and offsets that are not whole bytes
    /// are errors, as a BPF program can't read them with a plain load.
    pub fn member_offset(&self, path: &str) -> Result<u32> {
        self.resolve(path).map(|(offset, _)| offset)
    }

    /// Size in bytes of the member at `path` (resolved as in [`Btf::member_offset`]),
    /// e.g. "sk_buff.network_header" -> 2, so reads use the right width.
    pub fn member_size(&self, path: &str) -> Result<u32> {
        let (_, type_id) = self.resolve(path)?;
        self.type_size(type_id)
            .with_context(|| format!("size of `{path}`"))
    }

    /// Size of a struct or union (or a typedef of one).
    pub fn struct_size(&self, name: &str) -> Result<u32> {
        let root = self
            .composites_named(name)?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("no struct or union named `{name}` in kernel BTF"))?;
        Ok(root.size_or_type())
    }

    /// Value of `enumerator` in the enum (ENUM or ENUM64) named `enum_name`,
    /// e.g. ("skb_drop_reason", "SKB_DROP_REASON_NETFILTER_DROP"), whose value
    /// changes as reasons are added.
    pub fn enum_value(&self, enum_name: &str, enumerator: &str) -> Result<i64> {
        let mut seen_enum = false;
        for id in self.ids_named(enum_name) {
            let ty = self.ty(id)?;
            if !matches!(ty.kind(), KIND_ENUM | KIND_ENUM64) {
                continue;
            }
            seen_enum = true;
            for (name_off, value) in ty.enumerators() {
                if self.name(name_off)? == enumerator {
                    return Ok(value);
                }
            }
        }
        if seen_enum {
            bail!("enum {enum_name} has no enumerator {enumerator} on this kernel")
        }
        bail!("no enum named `{enum_name}` in kernel BTF")
    }

    /// The arguments a raw tracepoint hands its programs, in order, as
    /// "struct sk_buff *", "void *", "enum skb_drop_reason", "int": from the
    /// `btf_trace_<name>` typedef the kernel declares for every tracepoint,
    /// whose first parameter (the probe's own data) raw tracepoints omit.
    pub fn tracepoint_args(&self, name: &str) -> Result<Vec<String>> {
        let typedef = format!("btf_trace_{name}");
        let id = self
            .ids_named(&typedef)
            .find(|&id| self.ty(id).is_ok_and(|t| t.kind() == KIND_TYPEDEF))
            .ok_or_else(|| anyhow!("no tracepoint `{name}` in kernel BTF (no {typedef})"))?;
        let ptr = self.skip_modifiers(self.ty(id)?.size_or_type())?;
        ensure!(
            ptr.kind() == KIND_PTR,
            "{typedef} is not a function pointer"
        );
        let proto = self.skip_modifiers(ptr.size_or_type())?;
        ensure!(
            proto.kind() == KIND_FUNC_PROTO,
            "{typedef} does not point to a function prototype"
        );
        (1..proto.vlen())
            .map(|i| self.describe_ref(proto.trailing(2 * i + 1)))
            .collect()
    }

    /// A C-like spelling of the type `id` refers to, qualifiers and
    /// typedefs of pointers' targets included as the kernel wrote them.
    fn describe_ref(&self, id: u32) -> Result<String> {
        if id == 0 {
            return Ok("void".into());
        }
        let ty = self.skip_modifiers(id)?;
        Ok(match ty.kind() {
            KIND_PTR => format!("{} *", self.describe_ref(ty.size_or_type())?),
            KIND_STRUCT => format!("struct {}", self.name(ty.name_off())?),
            KIND_UNION => format!("union {}", self.name(ty.name_off())?),
            KIND_ENUM | KIND_ENUM64 => format!("enum {}", self.name(ty.name_off())?),
            _ => self.name(ty.name_off())?.to_string(),
        })
    }

    /// Whether the kernel has a function of this name in BTF: fentry/fexit can
    /// only attach to functions BTF describes (inlined or static-and-elided
    /// functions are absent).
    pub fn has_func(&self, name: &str) -> bool {
        self.ids_named(name)
            .any(|id| self.ty(id).is_ok_and(|ty| ty.kind() == KIND_FUNC))
    }

    /// Wraps a freshly parsed layer (its name index still empty) on top of
    /// `below` and indexes its names.
    fn stack(below: Vec<Arc<Layer>>, mut layer: Layer) -> Result<Btf> {
        let mut by_name: HashMap<Box<str>, Vec<u32>> = HashMap::new();
        for id in layer.first_id..layer.end_id() {
            let ty = layer.ty(id);
            if !indexed_kind(ty.kind()) || ty.name_off() == 0 {
                continue;
            }
            let layers = below.iter().map(|l| &**l).chain(std::iter::once(&layer));
            let name =
                find_str(layers, ty.name_off()).with_context(|| format!("name of type id {id}"))?;
            match by_name.get_mut(name) {
                Some(ids) => ids.push(id),
                None => {
                    by_name.insert(name.into(), vec![id]);
                }
            }
        }
        layer.by_name = by_name;
        let mut layers = below;
        layers.push(Arc::new(layer));
        Ok(Btf { layers })
    }

    fn top(&self) -> &Layer {
        self.layers.last().expect("a Btf has at least one layer")
    }

    fn ty(&self, id: u32) -> Result<Type<'_>> {
        ensure!(id != 0, "type id 0 is void");
        let layer = self
            .layers
            .iter()
            .rev()
            .find(|l| id >= l.first_id)
            .filter(|l| id < l.end_id())
            .ok_or_else(|| anyhow!("type id {id} is out of range"))?;
        Ok(layer.ty(id))
    }

    fn name(&self, off: u32) -> Result<&str> {
        find_str(self.layers.iter().map(|l| &**l), off)
    }

    /// A readable name for error messages, e.g. "struct sk_buff" or "anonymous union".
    fn describe(&self, ty: Type<'_>) -> String {
        match self.name(ty.name_off()) {
            Ok("") | Err(_) => format!("anonymous {}", kind_name(ty.kind())),
            Ok(name) => format!("{} {name}", kind_name(ty.kind())),
        }
    }

    /// Indexed type ids with this name, base layer first (lowest id first).
    fn ids_named<'s>(&'s self, name: &'s str) -> impl Iterator<Item = u32> + 's {
        self.layers
            .iter()
            .flat_map(move |l| l.by_name.get(name).into_iter().flatten().copied())
    }

    /// Follows typedefs and qualifiers, which never change layout, to the type that does.
    fn skip_modifiers(&self, mut id: u32) -> Result<Type<'_>> {
        for _ in 0..MAX_DEPTH {
            let ty = self.ty(id)?;
            match ty.kind() {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_type();
                }
                _ => return Ok(ty),
            }
        }
        bail!("type id {id}: typedef/qualifier chain deeper than {MAX_DEPTH}; BTF looks corrupt")
    }

    /// Structs and unions named `name`, falling back to typedefs of one (e.g.
    /// `possible_net_t`). Forward declarations are skipped: they have no layout.
    fn composites_named(&self, name: &str) -> Result<Vec<Type<'_>>> {
        let mut found = Vec::new();
        for id in self.ids_named(name) {
            let ty = self.ty(id)?;
            if is_composite(ty.kind()) {
                found.push(ty);
            }
        }
        if found.is_empty() {
            for id in self.ids_named(name) {
                let ty = self.ty(id)?;
                if ty.kind() == KIND_TYPEDEF {
                    let target = self.skip_modifiers(ty.size_or_type())?;
                    if is_composite(target.kind()) {
                        found.push(target);
                    }
                }
            }
        }
        Ok(found)
    }

    /// (byte offset, type id) of the member at `path`.
    fn resolve(&self, path: &str) -> Result<(u32, u32)> {
        let mut parts = path.split('.');
        let root = parts.next().unwrap_or_default();
        let members: Vec<&str> = parts.collect();
        ensure!(
            !root.is_empty() && !members.is_empty() && members.iter().all(|m| !m.is_empty()),
            "bad member path `{path}`: expected `struct.member[.member...]`"
        );
        let candidates = self.composites_named(root)?;
        ensure!(
            !candidates.is_empty(),
            "no struct or union named `{root}` in kernel BTF (looking up `{path}`)"
        );
        // Deduplicated kernel BTF has one definition per name, but if a struct
        // does appear twice, the first that has the whole path wins.
        let mut first_err = None;
        for root_ty in candidates {
            match self.walk(root_ty, root, &members) {
                Ok(found) => return Ok(found),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.expect("at least one candidate was tried"))
    }

    fn walk(&self, root: Type<'_>, root_name: &str, members: &[&str]) -> Result<(u32, u32)> {
        let mut bits = 0u64;
        let mut parent = root;
        // The declared type of the last member, typedefs intact, for member_size.
        let mut type_id = root.id;
        let mut walked = root_name.to_owned();
        for (i, &name) in members.iter().enumerate() {
            if i > 0 {
                ensure!(
                    is_composite(parent.kind()),
                    "`{walked}` is a {}, not a struct or union, so it has no member `{name}` \
                     (member paths do not follow pointers)",
                    kind_name(parent.kind()),
                );
            }
            let found = self.find_member(parent, name)?.ok_or_else(|| {
                anyhow!(
                    "`{walked}` ({}) has no member `{name}`, not even inside its anonymous structs/unions",
                    self.describe(parent)
                )
            })?;
            walked.push('.');
            walked.push_str(name);
            let target = self.skip_modifiers(found.type_id)?;
            if let Some(width) = self.bitfield_width(&found, target) {
                bail!("`{walked}` is a {width}-bit bitfield; BPF cannot read it with a plain load");
            }
            bits += found.bit_offset;
            type_id = found.type_id;
            parent = target;
        }
        ensure!(
            bits.is_multiple_of(8),
            "`{walked}` starts at bit {bits}, which is not byte aligned"
        );
        let offset = u32::try_from(bits / 8).with_context(|| format!("`{walked}` offset"))?;
        Ok((offset, type_id))
    }

    /// Finds `name` among the members of a struct/union, descending into
    /// anonymous struct/union members (C forbids the same name at two places
    /// in that flattened namespace, so the first hit is the only one).
    fn find_member(&self, parent: Type<'_>, name: &str) -> Result<Option<Found>> {
        self.find_member_in(parent, name, 0, &mut HashSet::new())
    }

    /// `fruitless` holds the anonymous members' types already searched in
    /// vain. Corrupt BTF can make one type the anonymous member of many at
    /// every level; searched again each time, that costs exponential time.
    fn find_member_in(
        &self,
        parent: Type<'_>,
        name: &str,
        depth: usize,
        fruitless: &mut HashSet<u32>,
    ) -> Result<Option<Found>> {
        ensure!(
            depth < MAX_DEPTH,
            "anonymous members nested deeper than {MAX_DEPTH} in {}; BTF looks corrupt",
            self.describe(parent)
        );
        for m in parent.members() {
            let member_name = self.name(m.name_off)?;
            if member_name == name {
                return Ok(Some(Found {
                    bit_offset: u64::from(m.bit_offset),
                    type_id: m.type_id,
                    bitfield_size: m.bitfield_size,
                }));
            }
            if member_name.is_empty() {
                let inner = self.skip_modifiers(m.type_id)?;
                if !is_composite(inner.kind()) || fruitless.contains(&inner.id) {
                    continue;
                }
                match self.find_member_in(inner, name, depth + 1, fruitless)? {
                    Some(mut found) => {
                        found.bit_offset += u64::from(m.bit_offset);
                        return Ok(Some(found));
                    }
                    None => {
                        fruitless.insert(inner.id);
                    }
                }
            }
        }
        Ok(None)
    }

    /// Width in bits if the member is a bitfield. Newer BTF encodes that in the
    /// member offset (struct kind_flag); older BTF used an INT type whose bit
    /// count is smaller than its byte size or which carries a bit offset.
    fn bitfield_width(&self, found: &Found, target: Type<'_>) -> Option<u32> {
        if found.bitfield_size != 0 {
            return Some(found.bitfield_size);
        }
        if target.kind() == KIND_INT {
            let encoding = target.trailing(0);
            let bits = encoding & 0xff;
            let bit_offset = (encoding >> 16) & 0xff;
            if bit_offset != 0 || u64::from(bits) != u64::from(target.size_or_type()) * 8 {
                return Some(bits);
            }
        }
        None
    }

    /// Size in bytes of a type, following typedefs/qualifiers and multiplying out arrays.
    fn type_size(&self, id: u32) -> Result<u32> {
        let mut count = 1u64;
        let mut id = id;
        for _ in 0..MAX_DEPTH {
            let ty = self.skip_modifiers(id)?;
            let size = match ty.kind() {
                KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT => {
                    ty.size_or_type()
                }
                KIND_PTR => self.pointer_size(),
                KIND_ARRAY => {
                    // struct btf_array { type, index_type, nelems }
                    count = count.saturating_mul(u64::from(ty.trailing(2)));
                    id = ty.trailing(0);
                    continue;
                }
                kind => bail!("{} has no size ({})", self.describe(ty), kind_name(kind)),
            };
            return count
                .checked_mul(u64::from(size))
                .and_then(|bytes| u32::try_from(bytes).ok())
                .context("size overflows u32");
        }
        bail!("type id {id}: arrays nested deeper than {MAX_DEPTH}; BTF looks corrupt")
    }

    /// BTF does not record pointer width; like libbpf, take it from `long`,
    /// which is pointer-sized on every Linux ABI.
    pub fn pointer_size(&self) -> u32 {
        ["long unsigned int", "long int"]
            .iter()
            .flat_map(|name| self.ids_named(name))
            .filter_map(|id| self.ty(id).ok())
            .find(|ty| ty.kind() == KIND_INT)
            .map_or(size_of::<usize>() as u32, |ty| ty.size_or_type())
    }

    /// The programs read kernel pointers as 64-bit values: on a kernel with
    /// smaller ones every struct read would go wrong, so `reader` refuses.
    pub fn require_64bit_pointers(&self, reader: &str) -> anyhow::Result<()> {
        let size = self.pointer_size();
        anyhow::ensure!(
            size == 8,
            "this kernel has {size}-byte pointers; {reader} reads kernel pointers as 64-bit \
             values and would misread every struct (32-bit kernels are not supported by it)"
        );
        Ok(())
    }
}

impl fmt::Debug for Btf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Btf")
            .field("layers", &self.layers.len())
            .field("types", &(self.top().end_id() - 1))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Assembles BTF blobs by hand so the parser is tested against known bytes.
    struct Builder {
        types: Vec<u8>,
        strs: Vec<u8>,
        next_id: u32,
        str_base: u32,
    }

    impl Builder {
        fn base() -> Builder {
            Builder {
                types: Vec::new(),
                strs: vec![0],
                next_id: 1,
                str_base: 0,
            }
        }

        fn split(base_next_id: u32, base_str_len: u32) -> Builder {
            Builder {
                types: Vec::new(),
                strs: Vec::new(),
                next_id: base_next_id,
                str_base: base_str_len,
            }
        }

        fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() && self.str_base == 0 {
                return 0;
            }
            let off = self.str_base + self.strs.len() as u32;
            self.strs.extend_from_slice(s.as_bytes());
            self.strs.push(0);
            off
        }

        fn add(
            &mut self,
            name: &str,
            kind: u32,
            flag: bool,
            vlen: u32,
            st: u32,
            extra: &[u32],
        ) -> u32 {
            let name_off = self.str(name);
            let info = (u32::from(flag) << 31) | (kind << 24) | vlen;
            for word in [name_off, info, st].iter().chain(extra) {
                self.types.extend_from_slice(&word.to_ne_bytes());
            }
            self.next_id += 1;
            self.next_id - 1
        }

        /// Members as (name, type, raw offset word).
        fn composite(
            &mut self,
            kind: u32,
            name: &str,
            flag: bool,
            size: u32,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let mut extra = Vec::new();
            for &(n, t, off) in members {
                extra.extend([self.str(n), t, off]);
            }
            self.add(name, kind, flag, members.len() as u32, size, &extra)
        }

        fn finish(self, hdr_len: u32) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&BTF_MAGIC.to_ne_bytes());
            out.extend_from_slice(&[1, 0]);
            let type_len = self.types.len() as u32;
            for word in [hdr_len, 0, type_len, type_len, self.strs.len() as u32] {
                out.extend_from_slice(&word.to_ne_bytes());
            }
            out.resize(hdr_len as usize, 0);
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strs);
            out
        }
    }

    struct Fixture {
        bytes: Vec<u8>,
        next_id: u32,
        str_len: u32,
        int: u32,
        outer: u32,
    }

    /// struct inner { int a; int b; };
    /// typedef const struct inner inner_t;
    /// struct outer {                  // kind_flag set: offsets carry bitfield sizes
    ///     int first;                  // 0
    ///     union {                     // 4
    ///         unsigned char *p;
    ///         struct { int deep; int deeper; };
    ///     };
    ///     int flags:3;                // bit 96
    ///     inner_t in;                 // 16
    ///     unsigned char arr[4];       // 24
    ///     struct inner *ptr;          // 32
    /// };                              // size 40
    /// typedef struct outer outer_t;
    /// struct old { int a; int bf:3 /* old-style INT bitfield */; unsigned char odd /* bit 68 */; };
    /// enum color { RED = 0, GREEN = 5, NEG = -3 }; // signed
    /// enum big : u64 { HUGE = 0x1_0000_0002 };
    /// int do_thing(void);  struct fwdonly;
    fn fixture(hdr_len: u32) -> Fixture {
        let mut b = Builder::base();
        let int = b.add("int", KIND_INT, false, 0, 4, &[1 << 24 | 32]);
        let uchar = b.add("unsigned char", KIND_INT, false, 0, 1, &[8]);
        let long = b.add("long unsigned int", KIND_INT, false, 0, 8, &[64]);
        let inner = b.composite(
            KIND_STRUCT,
            "inner",
            false,
            8,
            &[("a", int, 0), ("b", int, 32)],
        );
        let const_inner = b.add("", KIND_CONST, false, 0, inner, &[]);
        let inner_t = b.add("inner_t", KIND_TYPEDEF, false, 0, const_inner, &[]);
        let uchar_ptr = b.add("", KIND_PTR, false, 0, uchar, &[]);
        let inner_ptr = b.add("", KIND_PTR, false, 0, inner, &[]);
        let arr = b.add("", KIND_ARRAY, false, 0, 0, &[uchar, long, 4]);
        let anon_struct = b.composite(
            KIND_STRUCT,
            "",
            false,
            8,
            &[("deep", int, 0), ("deeper", int, 32)],
        );
        let anon_union = b.composite(
            KIND_UNION,
            "",
            false,
            8,
            &[("p", uchar_ptr, 0), ("", anon_struct, 0)],
        );
        let outer = b.composite(
            KIND_STRUCT,
            "outer",
            true,
            40,
            &[
                ("first", int, 0),
                ("", anon_union, 32),
                ("flags", int, 3 << 24 | 96),
                ("in", inner_t, 128),
                ("arr", arr, 192),
                ("ptr", inner_ptr, 256),
            ],
        );
        b.add("outer_t", KIND_TYPEDEF, false, 0, outer, &[]);
        let int3 = b.add("int", KIND_INT, false, 0, 4, &[1 << 24 | 3]);
        b.composite(
            KIND_STRUCT,
            "old",
            false,
            12,
            &[("a", int, 0), ("bf", int3, 32), ("odd", uchar, 68)],
        );
        let mut color = Vec::new();
        for (n, v) in [("RED", 0i32), ("GREEN", 5), ("NEG", -3)] {
            color.extend([b.str(n), v as u32]);
        }
        b.add("color", KIND_ENUM, true, 3, 4, &color);
        let huge = b.str("HUGE");
        b.add("big", KIND_ENUM64, false, 1, 8, &[huge, 2, 1]);
        let proto = b.add("", KIND_FUNC_PROTO, false, 0, int, &[]);
        b.add("do_thing", KIND_FUNC, false, 1, proto, &[]);
        b.add("fwdonly", KIND_FWD, false, 0, 0, &[]);
        let next_id = b.next_id;
        let str_len = b.strs.len() as u32;
        Fixture {
            bytes: b.finish(hdr_len),
            next_id,
            str_len,
            int,
            outer,
        }
    }

    #[test]
    fn member_offsets_through_anonymous_members_and_typedefs() {
        let btf = Btf::from_bytes(fixture(24).bytes).unwrap();
        assert_eq!(btf.member_offset("outer.first").unwrap(), 0);
        assert_eq!(btf.member_offset("outer.p").unwrap(), 4);
        assert_eq!(btf.member_offset("outer.deep").unwrap(), 4);
        assert_eq!(btf.member_offset("outer.deeper").unwrap(), 8);
        assert_eq!(btf.member_offset("outer.in").unwrap(), 16);
        assert_eq!(btf.member_offset("outer.in.b").unwrap(), 20);
        assert_eq!(btf.member_offset("outer.arr").unwrap(), 24);
        assert_eq!(btf.member_offset("outer.ptr").unwrap(), 32);
        assert_eq!(btf.member_offset("outer_t.in.a").unwrap(), 16);
        assert_eq!(btf.struct_size("outer").unwrap(), 40);
        assert_eq!(btf.struct_size("outer_t").unwrap(), 40);
        assert_eq!(btf.struct_size("inner").unwrap(), 8);
    }

    #[test]
    fn a_32bit_kernel_is_refused_by_name() {
        let btf = Btf::from_bytes(fixture(24).bytes).unwrap();
        btf.require_64bit_pointers("the tracepoint tier").unwrap();
        let mut b = Builder::base();
        b.add("long unsigned int", KIND_INT, false, 0, 4, &[32]);
        let btf = Btf::from_bytes(b.finish(24)).unwrap();
        let err = format!(
            "{:#}",
            btf.require_64bit_pointers("the node view").unwrap_err()
        );
        assert!(
            err.contains("4-byte pointers")
                && err.contains("the node view")
                && err.contains("32-bit"),
            "{err}"
        );
    }

    #[test]
    fn member_sizes() {
        let btf = Btf::from_bytes(fixture(24).bytes).unwrap();
        assert_eq!(btf.member_size("outer.first").unwrap(), 4);
        assert_eq!(btf.member_size("outer.p").unwrap(), 8);
        assert_eq!(btf.member_size("outer.in").unwrap(), 8);
        assert_eq!(btf.member_size("outer.arr").unwrap(), 4);
        assert_eq!(btf.member_size("outer.ptr").unwrap(), 8);
    }

    #[test]
    fn lookup_errors_name_what_is_missing() {
        let btf = Btf::from_bytes(fixture(24).bytes).unwrap();
        let err = |path: &str| format!("{:#}", btf.member_offset(path).unwrap_err());

        assert!(err("nosuch.x").contains("no struct or union named `nosuch`"));
        assert!(err("outer.nope").contains("`outer` (struct outer) has no member `nope`"));
        assert!(err("outer.in.zz").contains("`outer.in` (struct inner) has no member `zz`"));
        assert!(err("outer.ptr.a").contains("`outer.ptr` is a pointer, not a struct or union"));
        assert!(err("outer.flags").contains("3-bit bitfield"));
        assert!(err("old.bf").contains("3-bit bitfield"));
        assert!(err("old.odd").contains("not byte aligned"));
        assert!(err("outer").contains("bad member path"));
        assert!(err("outer..first").contains("bad member path"));
        assert!(err("fwdonly.x").contains("no struct or union named `fwdonly`"));
        assert!(btf.struct_size("fwdonly").is_err());
        assert_eq!(btf.member_offset("old.a").unwrap(), 0);
    }

    #[test]
    fn enums_and_funcs() {
        let btf = Btf::from_bytes(fixture(24).bytes).unwrap();
        assert_eq!(btf.enum_value("color", "GREEN").unwrap(), 5);
        assert_eq!(btf.enum_value("color", "NEG").unwrap(), -3);
        assert_eq!(btf.enum_value("big", "HUGE").unwrap(), 0x1_0000_0002);
        let e = format!("{:#}", btf.enum_value("color", "BLUE").unwrap_err());
        assert!(e.contains("enum color has no enumerator BLUE"), "{e}");
        let e = format!("{:#}", btf.enum_value("outer", "X").unwrap_err());
        assert!(e.contains("no enum named `outer`"), "{e}");
        assert!(btf.has_func("do_thing"));
        assert!(!btf.has_func("outer"));
        assert!(!btf.has_func("nope"));
    }

    #[test]
    fn longer_header_is_honoured() {
        let btf = Btf::from_bytes(fixture(32).bytes).unwrap();
        assert_eq!(btf.member_offset("outer.deeper").unwrap(), 8);
    }

    #[test]
    fn split_btf_sees_base_and_own_types() {
        let base_fx = fixture(24);
        let base = Btf::from_bytes(base_fx.bytes.clone()).unwrap();

        let mut b = Builder::split(base_fx.next_id, base_fx.str_len);
        let holder = b.composite(
            KIND_STRUCT,
            "mod_struct",
            false,
            48,
            &[("o", base_fx.outer, 0), ("tail", base_fx.int, 320)],
        );
        // A member named by a base string, as deduplicated module BTF does.
        let strs = &base_fx.bytes[base_fx.bytes.len() - base_fx.str_len as usize..];
        let name_a = strs.windows(3).position(|w| w == b"\0a\0").unwrap() as u32 + 1;
        let extra = [name_a, base_fx.int, 0];
        b.add("mod_small", KIND_STRUCT, false, 1, 4, &extra);
        let val = b.str("MOD_X");
        b.add("mod_enum", KIND_ENUM, false, 1, 4, &[val, 7]);
        let proto = b.add("", KIND_FUNC_PROTO, false, 0, 0, &[]);
        b.add("mod_func", KIND_FUNC, false, 0, proto, &[]);
        assert_eq!(holder, base_fx.next_id);

        let split = Btf::from_split_bytes(b.finish(24), &base).unwrap();
        assert_eq!(split.member_offset("mod_struct.o.in.b").unwrap(), 20);
        assert_eq!(split.member_offset("mod_struct.o.deeper").unwrap(), 8);
        assert_eq!(split.member_offset("mod_struct.tail").unwrap(), 40);
        assert_eq!(split.member_offset("mod_small.a").unwrap(), 0);
        assert_eq!(split.struct_size("mod_struct").unwrap(), 48);
        assert_eq!(split.member_offset("outer.in.b").unwrap(), 20);
        assert_eq!(split.enum_value("mod_enum", "MOD_X").unwrap(), 7);
        assert_eq!(split.enum_value("color", "GREEN").unwrap(), 5);
        assert!(split.has_func("mod_func"));
        assert!(split.has_func("do_thing"));
        // The base is unchanged by layering.
        assert!(!base.has_func("mod_func"));
    }

    #[test]
    fn array_sizes_that_overflow_are_errors() {
        let mut b = Builder::base();
        let int = b.add("int", KIND_INT, false, 0, 4, &[1 << 24 | 32]);
        let mut arr = int;
        for _ in 0..3 {
            arr = b.add("", KIND_ARRAY, false, 0, 0, &[arr, int, u32::MAX]);
        }
        b.composite(KIND_STRUCT, "s", false, 4, &[("huge", arr, 0)]);
        let btf = Btf::from_bytes(b.finish(24)).unwrap();
        let e = format!("{:#}", btf.member_size("s.huge").unwrap_err());
        assert!(e.contains("size overflows u32"), "{e}");
    }

    #[test]
    fn shared_anonymous_members_are_searched_once() {
        // Each level holds the level below twice: 2^48 paths down to `leaf`.
        let mut b = Builder::base();
        let int = b.add("int", KIND_INT, false, 0, 4, &[1 << 24 | 32]);
        let mut level = b.composite(KIND_STRUCT, "", false, 4, &[("leaf", int, 0)]);
        for _ in 0..48 {
            level = b.composite(KIND_UNION, "", false, 4, &[("", level, 0), ("", level, 0)]);
        }
        b.composite(
            KIND_STRUCT,
            "top",
            false,
            8,
            &[("", level, 0), ("last", int, 32)],
        );
        let btf = Btf::from_bytes(b.finish(24)).unwrap();
        assert_eq!(btf.member_offset("top.leaf").unwrap(), 0);
        assert_eq!(btf.member_offset("top.last").unwrap(), 4);
        let e = format!("{:#}", btf.member_offset("top.nope").unwrap_err());
        assert!(e.contains("has no member `nope`"), "{e}");
    }

    #[test]
    fn rejects_malformed_blobs() {
        let good = fixture(24).bytes;
        let err = |bytes: Vec<u8>| format!("{:#}", Btf::from_bytes(bytes).unwrap_err());

        let mut swapped = good.clone();
        swapped.swap(0, 1);
        assert!(err(swapped).contains("byte-swapped"));

        let mut bad_magic = good.clone();
        bad_magic[0] = 0;
        assert!(err(bad_magic).contains("not BTF"));

        assert!(err(good[..10].to_vec()).contains("shorter than"));
        assert!(err(good[..good.len() - 1].to_vec()).contains("runs past the end"));

        // Turn the first type (INT "int") into kind 25.
        let mut unknown = good.clone();
        let info = read_u32(&unknown, 24 + 4) & !(0x1f << 24) | (25 << 24);
        unknown[28..32].copy_from_slice(&info.to_ne_bytes());
        assert!(err(unknown).contains("unknown BTF kind 25"));
    }

    /// The running kernel's BTF, or None (with a note) where it isn't available.
    fn host_vmlinux() -> Option<Btf> {
        if !Path::new(SYSFS_BTF).join("vmlinux").exists() {
            eprintln!("skipping: {SYSFS_BTF}/vmlinux is missing on this host");
            return None;
        }
        let start = std::time::Instant::now();
        let btf = Btf::vmlinux().unwrap();
        eprintln!("parsed vmlinux BTF ({btf:?}) in {:?}", start.elapsed());
        Some(btf)
    }

    #[test]
    fn host_vmlinux_types_the_kfree_skb_tracepoint() {
        let Some(btf) = host_vmlinux() else { return };
        let args = btf.tracepoint_args("kfree_skb").unwrap();
        eprintln!("kfree_skb: {args:?}");
        assert_eq!(
            args[..3],
            ["struct sk_buff *", "void *", "enum skb_drop_reason"],
            "{args:?}"
        );
        let e = format!("{:#}", btf.tracepoint_args("no_such_event").unwrap_err());
        assert!(e.contains("no btf_trace_no_such_event"), "{e}");
    }

    #[test]
    fn host_vmlinux_has_what_ctrace_needs() {
        let Some(btf) = host_vmlinux() else { return };
        let skb_size = btf.struct_size("sk_buff").unwrap();
        for member in ["_nfct", "head", "data", "network_header", "dev", "sk"] {
            let path = format!("sk_buff.{member}");
            let offset = btf.member_offset(&path).unwrap();
            let size = btf.member_size(&path).unwrap();
            eprintln!("{path}: offset {offset} size {size}");
            assert!(
                offset < skb_size,
                "{path} at {offset} beyond sk_buff size {skb_size}"
            );
        }
        assert_eq!(btf.member_size("sk_buff.network_header").unwrap(), 2);
        assert_eq!(
            btf.member_size("sk_buff.dev").unwrap(),
            size_of::<usize>() as u32
        );
        for path in [
            "net_device.nd_net.net",
            "net.ns.inum",
            "sock.__sk_common.skc_net.net",
        ] {
            let offset = btf.member_offset(path).unwrap();
            eprintln!("{path}: offset {offset}");
        }
        assert_eq!(btf.member_size("net.ns.inum").unwrap(), 4);
        let drop = btf
            .enum_value("skb_drop_reason", "SKB_DROP_REASON_NETFILTER_DROP")
            .unwrap();
        eprintln!("SKB_DROP_REASON_NETFILTER_DROP = {drop}");
        assert!(drop > 0);
        assert!(btf.has_func("__nf_conntrack_alloc"));
        assert!(!btf.has_func("sk_buff"));
        let e = format!(
            "{:#}",
            btf.member_offset("sk_buff.no_such_member").unwrap_err()
        );
        assert!(e.contains("no member `no_such_member`"), "{e}");
    }

    #[test]
    fn host_module_btf_parses_as_split() {
        let Some(base) = host_vmlinux() else { return };
        let modules: Vec<String> = std::fs::read_dir(SYSFS_BTF)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| name != "vmlinux")
            .collect();
        if modules.is_empty() {
            eprintln!("skipping: no module BTF under {SYSFS_BTF} (everything is built in)");
        }
        for name in &modules {
            let btf = Btf::module(name, &base).unwrap();
            // Base types stay visible through the module layer.
            assert!(btf.struct_size("sk_buff").is_ok(), "{name}");
        }
        if modules.iter().any(|m| m == "nf_conntrack") {
            let ct = Btf::module("nf_conntrack", &base).unwrap();
            assert!(ct.member_offset("nf_conn.ct_general").is_ok());
        } else {
            eprintln!("no {SYSFS_BTF}/nf_conntrack: conntrack is built in or not loaded");
        }
        let e = format!(
            "{:#}",
            Btf::module("ctrace_no_such_module", &base).unwrap_err()
        );
        assert!(e.contains("is missing"), "{e}");
    }
}
