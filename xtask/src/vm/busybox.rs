//! The guests' busybox: /init's shell and tools, and the few commands the
//! e2e suite runs (nsenter, setpriv, zcat).
//!
//! Debian's `busybox-static` of the guest's architecture where Debian has a
//! port: the host's own, or the package downloaded. Big-endian MIPS has
//! none since Debian 11, but Debian 12 still has its cross compiler
//! (gcc-mips-linux-gnu, with a static glibc): there busybox is built here
//! from the same Debian source, with busybox's defaults and static.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use super::{
    Arch,
    apt::{self, Apt, Host},
    openwrt,
};
use crate::{run, step};

/// A static busybox for `arch`, cached under `cache`.
pub fn busybox(host: &Host, apt: &Apt, arch: Arch, cache: &Path) -> anyhow::Result<PathBuf> {
    if !apt.foreign {
        host.ensure_installed("busybox-static")?;
        return Ok(PathBuf::from("/bin/busybox"));
    }
    let dir = cache.join("busybox").join(arch.deb());
    let bin = dir.join("busybox");
    if bin.exists() {
        step(&format!(
            "busybox for {}: cached ({})",
            arch.name(),
            bin.display()
        ));
        return Ok(bin);
    }
    if arch == Arch::Mips {
        return from_source(host, arch, cache, &bin);
    }
    apt.ensure_lists()?;
    let found = apt.search("^busybox-static$")?;
    let Some((pkg, version)) = found.first() else {
        bail!("apt offers no busybox-static for {}", arch.deb());
    };
    step(&format!(
        "busybox for {}: downloading {pkg} {version}",
        arch.name()
    ));
    let tmp = dir.join("download");
    let _ = fs::remove_dir_all(&tmp);
    let deb = apt.download(pkg, version, &tmp)?;
    let x = tmp.join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x))?;
    let from = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| x.join(p))
        .find(|p| p.exists())
        .with_context(|| format!("no busybox binary in {}", deb.display()))?;
    super::write_atomic(&bin, &fs::read(&from)?)?;
    let _ = fs::remove_dir_all(&tmp);
    Ok(bin)
}

/// Builds busybox for `arch` from Debian's source with Debian's cross
/// compiler, and caches it at `bin`.
fn from_source(host: &Host, arch: Arch, cache: &Path, bin: &Path) -> anyhow::Result<PathBuf> {
    let (prefix, compiler) = openwrt::cross(host, arch)
        .with_context(|| format!("no cross compiler known for {}", arch.name()))?;
    host.ensure_installed(compiler)?;
    // The compiler only recommends the target's C library headers, and
    // packages go in without recommends: without them gcc's limits.h falls
    // through to the host's /usr/include and the build stops there.
    host.ensure_installed(&format!("libc6-dev-{}-cross", arch.deb()))?;
    let karch = openwrt::kernel_arch(arch);
    let work = cache.join("build").join(format!("busybox-{}", arch.deb()));
    let started = Instant::now();
    let tree = apt::source(host, cache, "busybox", &work)?;
    step(&format!(
        "busybox for {}: Debian has no port; building its source with {prefix}gcc",
        arch.name()
    ));
    let make = |what: &[&str]| {
        let mut c = Command::new("make");
        c.arg(format!("ARCH={karch}"))
            .arg(format!("CROSS_COMPILE={prefix}"))
            .args(what)
            .current_dir(&tree);
        c
    };
    run(&mut make(&["defconfig"]))?;
    // Static, like busybox-static. tc(8) is left out: busybox 1.35's does
    // not build against newer kernel headers, and nothing here uses it.
    let config = tree.join(".config");
    let text = fs::read_to_string(&config)?
        .replace("# CONFIG_STATIC is not set", "CONFIG_STATIC=y")
        .replace("CONFIG_TC=y", "# CONFIG_TC is not set");
    fs::write(&config, text)?;
    run(make(&["oldconfig"]).stdin(std::process::Stdio::null()))?;
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
    run(&mut make(&[&format!("-j{jobs}"), "busybox"]))?;
    if let Some(d) = bin.parent() {
        fs::create_dir_all(d)?;
    }
    super::write_atomic(bin, &fs::read(tree.join("busybox"))?)?;
    let _ = fs::remove_dir_all(&work);
    step(&format!(
        "busybox for {}: built in {:.0}s ({})",
        arch.name(),
        started.elapsed().as_secs_f64(),
        bin.display()
    ));
    Ok(bin.to_path_buf())
}
