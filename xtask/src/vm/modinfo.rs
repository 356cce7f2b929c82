//! A kernel module's `.modinfo` section, read straight from the ELF file.
//!
//! This is what `modinfo -F depends` prints, without needing kmod on the
//! host and for modules of any architecture (64- and 32-bit, either byte
//! order: the MIPS rows' big-endian malta included). The section is a run of NUL-terminated `key=value`
//! strings.
use anyhow::{Context as _, bail};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ModInfo {
    /// Modules whose symbols this one uses: they must be loaded first.
    pub depends: Vec<String>,
    /// `softdep=pre: a b`: modules modprobe would load first if it can.
    pub softdep_pre: Vec<String>,
}

pub fn parse(elf: &[u8]) -> anyhow::Result<ModInfo> {
    let section = section(elf, ".modinfo")?.context("no .modinfo section")?;
    let mut info = ModInfo::default();
    for entry in section.split(|&b| b == 0).filter(|e| !e.is_empty()) {
        let entry = String::from_utf8_lossy(entry);
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        match key {
            "depends" => info.depends.extend(
                value
                    .split(',')
                    .filter(|d| !d.is_empty())
                    .map(str::to_string),
            ),
            "softdep" => {
                // "pre: a b post: c": the words after `pre:` up to the next
                // `post:`.
                let mut pre = false;
                for w in value.split_whitespace() {
                    match w {
                        "pre:" => pre = true,
                        "post:" => pre = false,
                        m if pre => info.softdep_pre.push(m.to_string()),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

/// The bytes of the section called `name` in an ELF file of either class
/// and byte order.
fn section<'a>(elf: &'a [u8], name: &str) -> anyhow::Result<Option<&'a [u8]>> {
    if elf.get(..4) != Some(b"\x7fELF") {
        bail!("not an ELF file");
    }
    // e_ident[EI_CLASS]: 1 = 32-bit, 2 = 64-bit; e_ident[EI_DATA]: 1 =
    // little-endian, 2 = big-endian.
    let wide = match elf.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => bail!("unknown ELF class"),
    };
    let big = match elf.get(5) {
        Some(1) => false,
        Some(2) => true,
        _ => bail!("unknown ELF byte order"),
    };
    let int = |o: usize, n: usize| -> anyhow::Result<usize> {
        let b = elf.get(o..o + n).context("truncated ELF")?;
        let v = if big {
            b.iter().fold(0u64, |v, &x| v << 8 | u64::from(x))
        } else {
            b.iter().rev().fold(0u64, |v, &x| v << 8 | u64::from(x))
        };
        usize::try_from(v).context("ELF offset out of range")
    };
    // (e_shoff, its width, e_shentsize) and, per section header,
    // (sh_offset, sh_size) with the width of an address.
    let (shoff, entsize_at, off_at, size_at, w) = if wide {
        (int(0x28, 8)?, 0x3a, 24, 32, 8)
    } else {
        (int(0x20, 4)?, 0x2e, 16, 20, 4)
    };
    let shentsize = int(entsize_at, 2)?;
    let shnum = int(entsize_at + 2, 2)?;
    let shstrndx = int(entsize_at + 4, 2)?;
    let header = |i: usize| -> anyhow::Result<(usize, usize, usize)> {
        let h = shoff + i * shentsize;
        Ok((int(h, 4)?, int(h + off_at, w)?, int(h + size_at, w)?))
    };
    let bytes = |off: usize, size: usize| elf.get(off..off.checked_add(size)?);
    let (_, str_off, str_size) = header(shstrndx)?;
    let names = bytes(str_off, str_size).context("section names out of bounds")?;
    for i in 0..shnum {
        let (n, off, size) = header(i)?;
        let sec_name = names
            .get(n..)
            .and_then(|s| s.split(|&b| b == 0).next())
            .unwrap_or_default();
        if sec_name == name.as_bytes() {
            return Ok(Some(bytes(off, size).context("section out of bounds")?));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF of either class and byte order: header, a .modinfo
    /// and a .shstrtab, three section headers (null, .modinfo, .shstrtab).
    fn elf_of(wide: bool, big: bool, modinfo: &[u8]) -> Vec<u8> {
        let put = |f: &mut Vec<u8>, at: usize, v: u64, n: usize| {
            let b = if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            let b = if big { &b[8 - n..] } else { &b[..n] };
            f[at..at + n].copy_from_slice(b);
        };
        // (header size, e_shoff, its width, e_shentsize, section header
        // size, sh_offset, sh_size)
        let (ehsize, shoff_at, w, entsize_at, shsize, off_at, size_at) = if wide {
            (64, 0x28, 8, 0x3a, 64, 24, 32)
        } else {
            (52, 0x20, 4, 0x2e, 40, 16, 20)
        };
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let mut f = vec![0u8; ehsize];
        f[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 1 + wide as u8, 1 + big as u8]);
        let mi_off = f.len();
        f.extend_from_slice(modinfo);
        let st_off = f.len();
        f.extend_from_slice(shstrtab);
        let shoff = f.len();
        put(&mut f, shoff_at, shoff as u64, w);
        put(&mut f, entsize_at, shsize as u64, 2);
        put(&mut f, entsize_at + 2, 3, 2);
        put(&mut f, entsize_at + 4, 2, 2);
        for (name, off, size) in [
            (0, 0, 0),
            (1, mi_off, modinfo.len()),
            (10, st_off, shstrtab.len()),
        ] {
            let h = f.len();
            f.resize(h + shsize, 0);
            put(&mut f, h, name, 4);
            put(&mut f, h + off_at, off as u64, w);
            put(&mut f, h + size_at, size as u64, w);
        }
        f
    }

    /// 64-bit little-endian, as x86_64 and arm64 modules are.
    fn elf(modinfo: &[u8]) -> Vec<u8> {
        elf_of(true, false, modinfo)
    }

    #[test]
    fn reads_depends_and_soft_dependencies() {
        let m = elf(b"license=GPL\0depends=nf_conntrack,nfnetlink\0softdep=pre: crc32c post: x\0name=nft_ct\0");
        let info = parse(&m).unwrap();
        assert_eq!(info.depends, ["nf_conntrack", "nfnetlink"]);
        assert_eq!(info.softdep_pre, ["crc32c"]);
        let none = parse(&elf(b"depends=\0")).unwrap();
        assert!(none.depends.is_empty());
    }

    #[test]
    fn reads_32_bit_big_endian_modules() {
        let info = parse(&elf_of(
            false,
            true,
            b"depends=ppp_generic,pppox\0name=pppoe\0",
        ))
        .unwrap();
        assert_eq!(info.depends, ["ppp_generic", "pppox"]);
    }

    #[test]
    fn rejects_what_is_not_a_module() {
        assert!(parse(b"#!/bin/sh").is_err());
        assert!(parse(&elf(b"")).is_ok_and(|i| i == ModInfo::default()));
    }
}
