//! The VM's root file system: a gzip'd cpio (newc) archive with busybox,
//! the e2e test executable, the kernel's modules, /init, and ctrace's
//! OpenWrt package installed as opkg would (its data archive unpacked at
//! the root: /usr/sbin/ctrace, /etc/init.d/ctrace, /etc/config/ctrace).
//!
//! Images are cached under a hash of everything that goes in, so a rerun
//! with unchanged binaries boots at once, and any change (a rebuilt
//! binary, another kernel, a new /init) builds a fresh one. Older images
//! of the same kernel are deleted then: each is several MiB.
use std::{
    collections::hash_map::DefaultHasher,
    fs,
    hash::Hasher as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use super::{Arch, Binaries, kernel::Prepared};
use crate::{run, step};

/// The guest's PID 1.
const INIT: &str = include_str!("init.sh");
/// Bump when the archive's layout changes in a way the inputs do not show.
const FORMAT: &str = "ctrace-vm-initramfs-2";

pub fn build(
    cache: &Path,
    arch: Arch,
    kernel: &Prepared,
    bins: &Binaries,
) -> anyhow::Result<PathBuf> {
    // (path in the archive, source file, mode)
    let mut files: Vec<(String, PathBuf, u32)> = vec![
        ("bin/busybox".into(), bins.busybox.clone(), 0o755),
        ("bin/e2e".into(), bins.e2e.clone(), 0o755),
    ];
    let mut order = String::new();
    for m in &kernel.modules {
        let name = m
            .file_name()
            .context("module path")?
            .to_string_lossy()
            .into_owned();
        order.push_str(name.trim_end_matches(".ko"));
        order.push('\n');
        files.push((format!("lib/modules/{name}"), m.clone(), 0o644));
    }

    let mut h = DefaultHasher::new();
    for part in [FORMAT, arch.name(), &kernel.id, INIT, &order] {
        h.write(part.as_bytes());
        h.write_u8(0);
    }
    h.write(
        &fs::read(&bins.package).with_context(|| format!("reading {}", bins.package.display()))?,
    );
    for (dest, src, mode) in &files {
        h.write(dest.as_bytes());
        h.write_u32(*mode);
        h.write(&fs::read(src).with_context(|| format!("reading {}", src.display()))?);
    }
    let dir = cache.join("initramfs");
    fs::create_dir_all(&dir)?;
    let prefix = format!("{}-", kernel.id);
    let image = dir.join(format!("{prefix}{:016x}.cpio.gz", h.finish()));
    if image.exists() {
        step(&format!("initramfs: cached ({})", image.display()));
        return Ok(image);
    }

    step(&format!("initramfs: building {}", image.display()));
    let stage = dir.join(format!("{prefix}stage"));
    let _ = fs::remove_dir_all(&stage);
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "etc/ctrace-vm",
        "lib/modules",
    ] {
        fs::create_dir_all(stage.join(d))?;
    }
    let put = |dest: &str, bytes: &[u8], mode: u32| -> anyhow::Result<()> {
        let p = stage.join(dest);
        fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    put("init", INIT.as_bytes(), 0o755)?;
    put("etc/ctrace-vm/modules", order.as_bytes(), 0o644)?;
    for (dest, src, mode) in &files {
        put(dest, &fs::read(src)?, *mode)?;
    }
    // opkg's install: the outer archive's data.tar.gz, unpacked at the root
    // with the modes it carries.
    pipeline(
        "opkg-install",
        r#"tar -xzOf "$1" ./data.tar.gz | tar -xz --no-same-owner -C "$2""#,
        &bins.package,
        &stage,
    )?;
    // Sorted names make the archive depend only on its contents; -R 0:0
    // makes everything root's, whoever built it.
    let partial = image.with_extension("partial");
    pipeline(
        "mkinitramfs",
        r#"cd "$1" && find . -mindepth 1 -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet | gzip -6 >"$2""#,
        &stage,
        &partial,
    )?;
    fs::rename(&partial, &image)?;
    fs::remove_dir_all(&stage)?;

    // Older images for this kernel are dead weight now.
    for e in fs::read_dir(&dir)?.filter_map(Result::ok) {
        let p = e.path();
        let n = e.file_name().to_string_lossy().into_owned();
        if p != image && n.starts_with(&prefix) && n.ends_with(".cpio.gz") {
            let _ = fs::remove_file(&p);
        }
    }
    let size = fs::metadata(&image)?.len();
    step(&format!("initramfs: {:.1} MiB", size as f64 / 1048576.0));
    Ok(image)
}

/// Runs a shell pipeline that fails if any of its commands does, with its
/// two paths as `$1` and `$2` (never spliced into the script).
fn pipeline(name: &str, script: &str, one: &Path, two: &Path) -> anyhow::Result<()> {
    run(Command::new("bash")
        .args(["-o", "pipefail", "-c", script, name])
        .arg(one)
        .arg(two))
}
