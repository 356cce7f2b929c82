//! The `openwrt` rows of the VM matrix: a kernel built here from Debian's
//! `linux-source-6.12` with the BPF-relevant configuration of a stock
//! OpenWrt kernel (no BTF, no kprobes, no BPF on tracepoints, no ftrace,
//! no perf events where the architecture allows; bpf() and tc), for
//! x86_64, arm64, 32-bit ARM (QEMU's virt, as OpenWrt's armsr) and MIPS
//! of both byte orders (QEMU's malta, OpenWrt's own QEMU target),
//! cross-compiled with Debian's gcc for each.
//!
//! The configuration is `make tinyconfig` plus the fragments in
//! `openwrt/` (common, then the architecture's), merged with
//! `scripts/kconfig/merge_config.sh`, then `make olddefconfig`; every line
//! of the fragments is then checked in the resulting `.config`, and the
//! build fails naming those that did not stick.
//!
//! The kernel image and the modules the guest loads are cached under
//! `kernels/<debarch>/openwrt-<release>_<key>` in the VM cache, keyed by
//! the fragments, the source package's version, the architecture and the
//! build recipe: a second run boots at once.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use super::{
    Arch,
    apt::Host,
    kernel::{self, Kernel, Origin, Prepared},
};
use crate::step;

const COMMON: &str = include_str!("openwrt/common.config");
const X86_64: &str = include_str!("openwrt/x86_64.config");
const AARCH64: &str = include_str!("openwrt/aarch64.config");
const ARMV7: &str = include_str!("openwrt/armv7.config");
const MALTA: &str = include_str!("openwrt/malta.config");
const MIPSEL: &str = include_str!("openwrt/mipsel.config");
const MIPS: &str = include_str!("openwrt/mips.config");
/// Bump when the build recipe changes in a way the inputs do not show.
const RECIPE: &str = "ctrace-vm-openwrt-1";

/// OpenWrt 25.12 ships 6.12; Debian packages its source as this.
pub const SOURCE_PACKAGE: &str = "linux-source-6.12";
const SERIES: &str = "6.12";
/// `--kernel openwrt` (or `openwrt-6.12`, `openwrt-6.12.<sublevel>`).
pub const NAME: &str = "openwrt";

/// Host packages the build needs (the cross compiler comes on top, per
/// architecture: `cross`).
pub const HOST_PACKAGES: &[&str] = &[
    SOURCE_PACKAGE,
    "build-essential",
    "bc",
    "bison",
    "flex",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
    // depmod, for modules_install.
    "kmod",
];

/// What the guest loads: clsact and the BPF classifier and action, the
/// tc tier's needs. nf_conntrack_netlink is built (`=m`) but neither
/// shipped nor loaded: a router without kmod-nf-conntrack-netlink has no
/// ctnetlink. Conntrack, nf_tables and veth are built in.
const MODULES: &[&str] = &["sch_ingress", "cls_bpf", "act_bpf", "pppoe"];

/// At most two jobs: the machine is shared and has two cores.
const MAX_JOBS: usize = 2;

/// Whether `--kernel NAME` means the OpenWrt-configured kernel.
pub fn is_name(name: &str) -> bool {
    name == NAME || name.starts_with(&format!("{NAME}-"))
}

/// The architecture's fragments, merged in this order after `COMMON`.
fn fragments(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::X86_64 => &[X86_64],
        Arch::Aarch64 => &[AARCH64],
        Arch::Armv7 => &[ARMV7],
        Arch::Mipsel => &[MALTA, MIPSEL],
        Arch::Mips => &[MALTA, MIPS],
    }
}

/// The kernel's (and busybox's) ARCH=.
pub fn kernel_arch(arch: Arch) -> &'static str {
    target(arch).0
}

/// The kernel's ARCH=, the image target and where the build leaves it.
fn target(arch: Arch) -> (&'static str, &'static str, &'static str) {
    match arch {
        Arch::X86_64 => ("x86", "bzImage", "arch/x86/boot/bzImage"),
        Arch::Aarch64 => ("arm64", "Image", "arch/arm64/boot/Image"),
        Arch::Armv7 => ("arm", "zImage", "arch/arm/boot/zImage"),
        // malta boots the ELF image itself.
        Arch::Mipsel | Arch::Mips => ("mips", "vmlinux", "vmlinux"),
    }
}

/// CROSS_COMPILE prefix and the Debian package that provides it, when
/// `arch` is not the host's.
pub fn cross(host: &Host, arch: Arch) -> Option<(&'static str, &'static str)> {
    (host.deb_arch() != arch.deb()).then_some(match arch {
        Arch::X86_64 => ("x86_64-linux-gnu-", "gcc-x86-64-linux-gnu"),
        Arch::Aarch64 => ("aarch64-linux-gnu-", "gcc-aarch64-linux-gnu"),
        Arch::Armv7 => ("arm-linux-gnueabihf-", "gcc-arm-linux-gnueabihf"),
        Arch::Mipsel => ("mipsel-linux-gnu-", "gcc-mipsel-linux-gnu"),
        // Debian has no big-endian MIPS port, but it has the cross compiler.
        Arch::Mips => ("mips-linux-gnu-", "gcc-mips-linux-gnu"),
    })
}

/// The OpenWrt kernel row for `arch`, if `names` asks for it (no names:
/// the default matrix, which includes it). Needs `SOURCE_PACKAGE`
/// installed: its version names the row and keys the cache.
pub fn resolve(host: &Host, arch: Arch, names: &[String]) -> anyhow::Result<Option<Kernel>> {
    let ours: Vec<&String> = names.iter().filter(|n| is_name(n)).collect();
    if !names.is_empty() && ours.is_empty() {
        return Ok(None);
    }
    let source_version = host
        .installed_version(SOURCE_PACKAGE)
        .with_context(|| format!("{SOURCE_PACKAGE} is not installed"))?;
    // 6.12.118-1~deb12u1 -> 6.12.118
    let upstream = source_version
        .split_once(':')
        .map_or(source_version.as_str(), |(_, v)| v)
        .split('-')
        .next()
        .unwrap_or_default()
        .to_string();
    let version = format!("{NAME}-{upstream}");
    for n in ours {
        if *n != NAME && *n != format!("{NAME}-{SERIES}") && *n != version {
            bail!(
                "no kernel matches `{n}`: the OpenWrt-configured kernel is built from \
                 {SOURCE_PACKAGE} {source_version}; select it with `{NAME}`, \
                 `{NAME}-{SERIES}` or `{version}`"
            );
        }
    }
    Ok(Some(Kernel {
        arch,
        series: SERIES.into(),
        abi: version.clone(),
        package: SOURCE_PACKAGE.into(),
        version,
        origin: Origin::OpenWrt { source_version },
    }))
}

/// 64-bit FNV-1a: a cache key that stays the same across Rust releases
/// (a cold build costs minutes; std's hasher promises no stability).
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Where `k` is cached: keyed by everything that decides its build.
fn dir(k: &Kernel, cache: &Path) -> anyhow::Result<PathBuf> {
    let Origin::OpenWrt { source_version } = &k.origin else {
        bail!("{} is not an OpenWrt kernel", k.version);
    };
    let mut parts = vec![RECIPE, k.arch.name(), source_version, COMMON];
    parts.extend(fragments(k.arch));
    let key = fnv1a(&parts);
    Ok(cache
        .join("kernels")
        .join(k.arch.deb())
        .join(format!("{}_{key:016x}", k.abi)))
}

const COMPLETE: &str = ".complete";

/// Builds `k` once; later runs use the cache.
pub fn prepare(host: &Host, k: &Kernel, cache: &Path) -> anyhow::Result<Prepared> {
    let dir = dir(k, cache)?;
    let id = format!(
        "{}-{}",
        k.arch.deb(),
        dir.file_name().unwrap_or_default().to_string_lossy()
    );
    if dir.join(COMPLETE).exists() {
        step(&format!(
            "kernel {} {}: cached ({})",
            k.arch.name(),
            k.version,
            dir.display()
        ));
        return kernel::prepared(&dir, id);
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let work = cache
        .join("build")
        .join(format!("{}-{}", NAME, k.arch.deb()));
    let log = cache
        .join("logs")
        .join(format!("build-{}-{}.log", k.arch.name(), k.version));
    let started = Instant::now();
    let r = build(host, k, &work, &dir, &log);
    // The tree is ~1.5 GB of source and objects: never kept.
    let _ = fs::remove_dir_all(&work);
    if let Err(e) = r {
        let _ = fs::remove_dir_all(&dir);
        let tail = fs::read_to_string(&log)
            .map(|s| {
                let lines: Vec<&str> = s.lines().collect();
                lines[lines.len().saturating_sub(30)..].join("\n")
            })
            .unwrap_or_default();
        if !tail.is_empty() {
            eprintln!("--- last lines of {} ---\n{tail}\n---", log.display());
        }
        return Err(e.context(format!(
            "building the {} kernel for {} (log: {})",
            k.version,
            k.arch.name(),
            log.display()
        )));
    }
    let secs = started.elapsed().as_secs_f64();
    fs::write(dir.join("build-secs"), format!("{secs:.0}\n"))?;
    fs::write(dir.join(COMPLETE), "")?;
    step(&format!(
        "kernel {} {}: built in {secs:.0}s ({})",
        k.arch.name(),
        k.version,
        dir.display()
    ));
    // Builds for older fragments or sources are dead weight now.
    if let Some(parent) = dir.parent() {
        for e in fs::read_dir(parent)?.filter_map(Result::ok) {
            let n = e.file_name().to_string_lossy().into_owned();
            if e.path() != dir && n.starts_with(&format!("{NAME}-")) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    kernel::prepared(&dir, id)
}

fn build(host: &Host, k: &Kernel, work: &Path, dir: &Path, log: &Path) -> anyhow::Result<()> {
    let tarball = Path::new("/usr/src").join(format!("{SOURCE_PACKAGE}.tar.xz"));
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(work)?;
    if let Some(d) = log.parent() {
        fs::create_dir_all(d)?;
    }
    fs::write(log, "")?;
    let (karch, image_target, image_path) = target(k.arch);
    let cross = cross(host, k.arch);
    let jobs = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_JOBS);
    step(&format!(
        "kernel {} {}: building from {} with the OpenWrt fragment (make -j{jobs}{}; log: {})",
        k.arch.name(),
        k.version,
        tarball.display(),
        cross.map_or(String::new(), |(p, _)| format!(", CROSS_COMPILE={p}")),
        log.display()
    ));

    let phase = |what: &str, cmd: &mut Command| -> anyhow::Result<()> {
        let t = Instant::now();
        let out = fs::OpenOptions::new().append(true).open(log)?;
        let status = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .status()
            .with_context(|| format!("running {cmd:?}"))?;
        if !status.success() {
            bail!("{what}: {cmd:?} failed with {status}");
        }
        step(&format!("  {what}: {:.0}s", t.elapsed().as_secs_f64()));
        Ok(())
    };

    phase(
        "unpacking the source",
        Command::new("tar")
            .arg("-xJf")
            .arg(&tarball)
            .arg("-C")
            .arg(work),
    )?;
    let src = work.join(SOURCE_PACKAGE);
    let obj = work.join("obj");
    fs::create_dir_all(&obj)?;
    let make = || {
        let mut c = Command::new("make");
        c.arg("-C")
            .arg(&src)
            .arg(format!("O={}", obj.display()))
            .arg(format!("ARCH={karch}"));
        if let Some((prefix, _)) = cross {
            c.arg(format!("CROSS_COMPILE={prefix}"));
        }
        // A clean environment for kbuild: no ARCH/CROSS_COMPILE/KCONFIG_*
        // of the caller's leaking in.
        c.env_remove("KCONFIG_CONFIG").env_remove("LOCALVERSION");
        c
    };

    // Configuration: tinyconfig, the fragments, olddefconfig, check.
    let mut fragment_files = vec![];
    for (i, text) in [COMMON].iter().chain(fragments(k.arch)).enumerate() {
        let f = work.join(format!("fragment-{i}.config"));
        fs::write(&f, text)?;
        fragment_files.push(f);
    }
    phase("make tinyconfig", make().arg("tinyconfig"))?;
    phase(
        "merging the fragments",
        Command::new("sh")
            .arg(src.join("scripts/kconfig/merge_config.sh"))
            .arg("-m")
            .arg("-O")
            .arg(&obj)
            .arg(obj.join(".config"))
            .args(&fragment_files)
            .current_dir(&src)
            .env("ARCH", karch),
    )?;
    phase("make olddefconfig", make().arg("olddefconfig"))?;
    let config = fs::read_to_string(obj.join(".config"))?;
    let wanted = [COMMON]
        .iter()
        .chain(fragments(k.arch))
        .copied()
        .collect::<Vec<_>>()
        .join("\n");
    let missed = check_config(&wanted, &config);
    if !missed.is_empty() {
        bail!(
            "these options of the OpenWrt fragment did not stick after olddefconfig \
             (unmet dependencies, or forced by the architecture):\n  {}",
            missed.join("\n  ")
        );
    }
    fs::write(dir.join("config"), &config)?;
    step("  every option of the fragment is set as wanted");

    phase(
        &format!("make {image_target} modules"),
        make()
            .arg(format!("-j{jobs}"))
            .args([image_target, "modules"]),
    )?;
    let staged = work.join("modules-install");
    phase(
        "make modules_install",
        make()
            .arg(format!("INSTALL_MOD_PATH={}", staged.display()))
            .arg("INSTALL_MOD_STRIP=1")
            .arg("modules_install"),
    )?;
    fs::copy(obj.join(image_path), dir.join("vmlinuz"))
        .with_context(|| format!("copying {image_path}"))?;
    kernel::collect_modules(host, &staged, MODULES, dir)?;
    fs::write(
        dir.join("source"),
        format!(
            "{SOURCE_PACKAGE} {}\n",
            match &k.origin {
                Origin::OpenWrt { source_version } => source_version.as_str(),
                Origin::Debian => "",
            }
        ),
    )?;
    let size = fs::metadata(dir.join("vmlinuz"))?.len();
    step(&format!(
        "  {image_target}: {:.1} MiB",
        size as f64 / 1048576.0
    ));
    Ok(())
}

/// The fragment lines that `config` (a full .config) does not honour:
/// `CONFIG_X=v` must appear as such; `# CONFIG_X is not set` is honoured
/// by that line or by the symbol's absence (its dependencies unmet), and
/// broken by any `CONFIG_X=` line.
fn check_config(fragment: &str, config: &str) -> Vec<String> {
    let mut missed = vec![];
    let value = |sym: &str| {
        config
            .lines()
            .find_map(|l| l.strip_prefix(sym)?.strip_prefix('='))
    };
    for line in fragment.lines().map(str::trim) {
        if let Some(sym) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" is not set"))
            .filter(|s| s.starts_with("CONFIG_"))
        {
            if let Some(v) = value(sym) {
                missed.push(format!("{line} (is {sym}={v})"));
            }
        } else if line.starts_with("CONFIG_") {
            let (sym, want) = line.split_once('=').unwrap_or((line, ""));
            match value(sym) {
                Some(v) if v == want => {}
                Some(v) => missed.push(format!("{line} (is {sym}={v})")),
                None => missed.push(format!("{line} (is not set)")),
            }
        }
    }
    missed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_check_names_what_did_not_stick() {
        let fragment = "# why\nCONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\n# CONFIG_D is not set\nCONFIG_E=y\n";
        let config = "CONFIG_A=y\nCONFIG_B=y\nCONFIG_C=y\n# CONFIG_E is not set\nCONFIG_AB=y\n";
        assert_eq!(
            check_config(fragment, config),
            [
                "CONFIG_B=m (is CONFIG_B=y)",
                "# CONFIG_C is not set (is CONFIG_C=y)",
                "CONFIG_E=y (is not set)"
            ]
        );
    }

    #[test]
    fn fragments_say_what_the_rows_are_about() {
        // The point of these rows.
        for line in [
            "CONFIG_BPF_SYSCALL=y",
            "CONFIG_BPF_JIT=y",
            "CONFIG_BPF_UNPRIV_DEFAULT_OFF=y",
            "# CONFIG_DEBUG_INFO is not set",
            "# CONFIG_KPROBES is not set",
            "# CONFIG_BPF_EVENTS is not set",
            "# CONFIG_FTRACE is not set",
            "CONFIG_NET_CLS_BPF=m",
            "CONFIG_NET_SCH_INGRESS=m",
            "CONFIG_NET_XGRESS=y",
            "CONFIG_NF_CONNTRACK_PROCFS=y",
            "CONFIG_NF_CT_NETLINK=m",
            "CONFIG_BRIDGE=y",
            "CONFIG_VLAN_8021Q=y",
            "CONFIG_PPPOE=m",
        ] {
            assert!(COMMON.lines().any(|l| l == line), "{line}");
        }
        assert!(
            AARCH64
                .lines()
                .any(|l| l == "# CONFIG_PERF_EVENTS is not set")
        );
    }

    #[test]
    fn names() {
        assert!(is_name("openwrt") && is_name("openwrt-6.12") && !is_name("6.12"));
        assert_ne!(fnv1a(&["a", "b"]), fnv1a(&["ab"]));
        assert_eq!(fnv1a(&[]), 0xcbf2_9ce4_8422_2325);
    }
}
