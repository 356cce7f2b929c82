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

    /// A minimal ELF: header, a .modinfo and a .shstrtab, three section
    /// headers (null, .modinfo, .shstrtab).
    fn elf(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let mut f = vec![0u8; 64];
        f[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let mi_off = f.len();
        f.extend_from_slice(modinfo);
        let st_off = f.len();
        f.extend_from_slice(shstrtab);
        let shoff = f.len();
        f[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        f[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        f[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        f[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        for (name, off, size) in [
            (0u32, 0usize, 0usize),
            (1, mi_off, modinfo.len()),
            (10, st_off, shstrtab.len()),
        ] {
            let mut h = [0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            f.extend_from_slice(&h);
        }
        f
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

    /// The same, 32-bit big-endian (a `mips` module).
    fn elf32be(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let mut f = vec![0u8; 52];
        f[..6].copy_from_slice(b"\x7fELF\x01\x02");
        let mi_off = f.len();
        f.extend_from_slice(modinfo);
        let st_off = f.len();
        f.extend_from_slice(shstrtab);
        let shoff = f.len();
        f[0x20..0x24].copy_from_slice(&(shoff as u32).to_be_bytes());
        f[0x2e..0x30].copy_from_slice(&40u16.to_be_bytes());
        f[0x30..0x32].copy_from_slice(&3u16.to_be_bytes());
        f[0x32..0x34].copy_from_slice(&2u16.to_be_bytes());
        for (name, off, size) in [
            (0u32, 0usize, 0usize),
            (1, mi_off, modinfo.len()),
            (10, st_off, shstrtab.len()),
        ] {
            let mut h = [0u8; 40];
            h[..4].copy_from_slice(&name.to_be_bytes());
            h[16..20].copy_from_slice(&(off as u32).to_be_bytes());
            h[20..24].copy_from_slice(&(size as u32).to_be_bytes());
            f.extend_from_slice(&h);
        }
        f
    }

    #[test]
    fn reads_32_bit_big_endian_modules() {
        let info = parse(&elf32be(b"depends=ppp_generic,pppox\0name=pppoe\0")).unwrap();
        assert_eq!(info.depends, ["ppp_generic", "pppox"]);
    }

    #[test]
    fn rejects_what_is_not_a_module() {
        assert!(parse(b"#!/bin/sh").is_err());
        assert!(parse(&elf(b"")).is_ok_and(|i| i == ModInfo::default()));
    }
}
