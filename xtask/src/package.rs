//! `cargo xtask package`: installable packages in `target/package/`.
//!
//! - OpenWrt `.ipk` (opkg, OpenWrt 24.10), one per architecture label: a
//!   gzipped tar of `debian-binary`, `data.tar.gz` and `control.tar.gz`,
//!   as OpenWrt's own ipkg-build makes them. The same static binary serves
//!   every label of its ISA. The service is a procd script reading UCI
//!   (`/etc/config/ctrace`, a conffile that sysupgrade keeps).
//! - Debian `.deb` for amd64 and arm64, made by dpkg-deb, with a hardened
//!   systemd unit, checked by lintian.
//!
//! Every package is read back after it is written: archive members,
//! control fields, modes, conffiles, and the ELF class, byte order and
//! machine of its binary. Archives are reproducible (sorted, mtime 0,
//! owner 0).
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

use crate::{build, image::tar, output, run, step, workspace_root};

/// (OpenWrt architecture label, Rust target). Several labels of one ISA
/// share a binary: it is static and built for the ISA's baseline.
const IPK_ARCHES: [(&str, &str); 7] = [
    ("aarch64_cortex-a53", "aarch64-unknown-linux-musl"),
    ("aarch64_generic", "aarch64-unknown-linux-musl"),
    ("arm_cortex-a7_neon-vfpv4", "armv7-unknown-linux-musleabihf"),
    ("arm_cortex-a9", "armv7-unknown-linux-musleabihf"),
    // ramips (mt7621 and kin): little-endian; ath79: big-endian.
    ("mipsel_24kc", "mipsel-unknown-linux-musl"),
    ("mips_24kc", "mips-unknown-linux-musl"),
    ("x86_64", "x86_64-unknown-linux-musl"),
];

/// (Debian architecture, Rust target).
const DEB_ARCHES: [(&str, &str); 2] = [
    ("amd64", "x86_64-unknown-linux-musl"),
    ("arm64", "aarch64-unknown-linux-musl"),
];

/// Before kernel 6.6 the tc tier attaches through clsact and cls_bpf;
/// from 6.6 (OpenWrt 24.10) TCX links need no module, and the packages
/// are small.
const IPK_DEPENDS: &str = "kmod-sched-core, kmod-sched-bpf";
const MAINTAINER: &str = "ctrace developers <ctrace@example.invalid>";
const SUMMARY: &str = "conntrack pressure tracer: table-full drops, live, by flow and service";
const DESCRIPTION: &str = "ctrace traces the connection-tracking table with eBPF: every \
packet dropped because the table was full, the flow and service it belonged to, who \
occupies the table and who is filling it now. It serves Prometheus metrics and records \
for a post-incident report.";

/// One written package and what it must hold.
pub struct Package {
    pub path: PathBuf,
    pub arch: String,
    pub size: u64,
}

pub fn package() -> anyhow::Result<Vec<Package>> {
    let root = workspace_root();
    let version = crate::image::version()?;
    let out = root.join("target/package");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let mut made = Vec::new();
    let mut bins = std::collections::BTreeMap::new();
    for (_, target) in IPK_ARCHES.iter().chain(DEB_ARCHES.iter()) {
        if !bins.contains_key(target) {
            bins.insert(*target, build(Some(target))?);
        }
    }
    for (label, target) in IPK_ARCHES {
        let p = ipk(&root, &out, &version, label, &bins[target])?;
        check_ipk(&p, &version, label, target)?;
        made.push(p);
    }
    for (arch, target) in DEB_ARCHES {
        let p = deb(&root, &out, &version, arch, &bins[target])?;
        check_deb(&p, &version, arch, target)?;
        made.push(p);
    }
    step("packages:");
    println!("  {:<48} {:<26} {:>10}", "file", "arch", "bytes");
    for p in &made {
        println!(
            "  {:<48} {:<26} {:>10}",
            p.path.file_name().unwrap_or_default().to_string_lossy(),
            p.arch,
            p.size
        );
    }
    Ok(made)
}

/// The `.ipk` of one OpenWrt architecture label, written to `out` and
/// checked as `package` checks it: what the VM rows install into their
/// root file systems.
pub fn openwrt_package(label: &str, out: &Path) -> anyhow::Result<PathBuf> {
    let (_, target) = IPK_ARCHES
        .iter()
        .find(|(l, _)| *l == label)
        .with_context(|| format!("no OpenWrt package is built for `{label}`"))?;
    let version = crate::image::version()?;
    let bin = build(Some(target))?;
    fs::create_dir_all(out)?;
    let p = ipk(&workspace_root(), out, &version, label, &bin)?;
    check_ipk(&p, &version, label, target)?;
    step(&format!("{}: {} bytes", p.path.display(), p.size));
    Ok(p.path)
}

fn put(stage: &Path, rel: &str, from: &Path, mode: u32) -> anyhow::Result<()> {
    let to = stage.join(rel);
    fs::create_dir_all(to.parent().expect("a path with a parent"))?;
    fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
    fs::set_permissions(&to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Files of `from` (deploy/…) into the package: (path in the package,
/// file in `from`, mode).
fn put_all(stage: &Path, from: &Path, files: &[(&str, &str, u32)]) -> anyhow::Result<()> {
    for (rel, file, mode) in files {
        put(stage, rel, &from.join(file), *mode)?;
    }
    Ok(())
}

fn write(stage: &Path, rel: &str, text: &str, mode: u32) -> anyhow::Result<()> {
    let to = stage.join(rel);
    fs::create_dir_all(to.parent().expect("a path with a parent"))?;
    fs::write(&to, text)?;
    fs::set_permissions(&to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn gzip(file: &Path) -> anyhow::Result<PathBuf> {
    run(Command::new("gzip").args(["-n", "-9", "-f"]).arg(file))?;
    let mut gz = file.as_os_str().to_owned();
    gz.push(".gz");
    Ok(gz.into())
}

/// Bytes under `dir`, in KiB as opkg and dpkg count them.
fn installed_kib(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        total += if m.is_dir() {
            installed_kib(&e.path())? * 1024
        } else {
            m.len()
        };
    }
    Ok(total.div_ceil(1024))
}

/// OpenWrt's default maintainer scripts: enable (and start) the service on
/// install, stop and disable it on removal; nothing when building an image
/// (IPKG_INSTROOT set).
const POSTINST: &str = "#!/bin/sh\n\
[ \"${IPKG_NO_SCRIPT}\" = \"1\" ] && exit 0\n\
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n\
. ${IPKG_INSTROOT}/lib/functions.sh\n\
default_postinst $0 $@\n";
const PRERM: &str = "#!/bin/sh\n\
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n\
. ${IPKG_INSTROOT}/lib/functions.sh\n\
default_prerm $0 $@\n";

fn ipk(root: &Path, out: &Path, version: &str, label: &str, bin: &Path) -> anyhow::Result<Package> {
    let work = out.join(format!("work-{label}"));
    let data = work.join("data");
    let control = work.join("control");
    put(&data, "usr/sbin/ctrace", bin, 0o755)?;
    put_all(
        &data,
        &root.join("deploy/openwrt"),
        &[
            ("etc/init.d/ctrace", "ctrace.init", 0o755),
            ("etc/config/ctrace", "ctrace.config", 0o600),
        ],
    )?;
    write(
        &control,
        "control",
        &format!(
            "Package: ctrace\nVersion: {version}-r1\nDepends: {IPK_DEPENDS}\n\
             License: {}\nLicenseFiles: LICENSE-MIT LICENSE-APACHE\nSection: net\n\
             Maintainer: {MAINTAINER}\nArchitecture: {label}\nInstalled-Size: {}\n\
             Description: {SUMMARY}\n{}",
            env!("CARGO_PKG_LICENSE"),
            installed_kib(&data)? * 1024,
            description(),
        ),
        0o644,
    )?;
    write(&control, "conffiles", "/etc/config/ctrace\n", 0o644)?;
    write(&control, "postinst", POSTINST, 0o755)?;
    write(&control, "prerm", PRERM, 0o755)?;
    write(&work, "debian-binary", "2.0\n", 0o644)?;
    tar(&data, &["."], &work.join("data.tar"))?;
    gzip(&work.join("data.tar"))?;
    tar(&control, &["."], &work.join("control.tar"))?;
    gzip(&work.join("control.tar"))?;
    let path = out.join(format!("ctrace_{version}-r1_{label}.ipk"));
    let outer = work.join("outer.tar");
    tar(
        &work,
        &["./debian-binary", "./data.tar.gz", "./control.tar.gz"],
        &outer,
    )?;
    fs::rename(gzip(&outer)?, &path)?;
    fs::remove_dir_all(&work)?;
    Ok(Package {
        size: fs::metadata(&path)?.len(),
        path,
        arch: label.to_string(),
    })
}

/// Shipped in the .deb, as Debian packages carry theirs. The router
/// builds (arm64) are static executables; the amd64 build is a static PIE.
const LINTIAN_OVERRIDES: &str = "\
# One static musl binary, the eBPF programs embedded, runs on any
# distribution's kernel without a C library of the host's: static on
# purpose.
ctrace: statically-linked-binary [usr/sbin/ctrace]
";

/// The Debian unit: see deploy/debian/ctrace.service for why each setting
/// is there.
fn deb(root: &Path, out: &Path, version: &str, arch: &str, bin: &Path) -> anyhow::Result<Package> {
    let stage = out.join(format!("work-{arch}"));
    put(&stage, "usr/sbin/ctrace", bin, 0o755)?;
    put_all(
        &stage,
        &root.join("deploy/debian"),
        &[
            ("lib/systemd/system/ctrace.service", "ctrace.service", 0o644),
            ("etc/default/ctrace", "ctrace.default", 0o644),
            ("usr/share/doc/ctrace/copyright", "copyright", 0o644),
        ],
    )?;
    // A native package's changelog, as lintian expects it.
    write(
        &stage,
        "usr/share/doc/ctrace/changelog",
        &format!(
            "ctrace ({version}) unstable; urgency=medium\n\n  * Packaged by cargo xtask package.\n\n \
             -- {MAINTAINER}  Fri, 04 Dec 2026 00:00:00 +0000\n"
        ),
        0o644,
    )?;
    gzip(&stage.join("usr/share/doc/ctrace/changelog"))?;
    write(
        &stage,
        "usr/share/lintian/overrides/ctrace",
        LINTIAN_OVERRIDES,
        0o644,
    )?;
    generated_docs(root, &stage)?;
    write(
        &stage,
        "DEBIAN/control",
        &format!(
            "Package: ctrace\nVersion: {version}\nArchitecture: {arch}\n\
             Maintainer: {MAINTAINER}\nInstalled-Size: {}\nSection: net\nPriority: optional\n\
             Description: {SUMMARY}\n{}",
            installed_kib(&stage)?,
            description(),
        ),
        0o644,
    )?;
    write(&stage, "DEBIAN/conffiles", "/etc/default/ctrace\n", 0o644)?;
    let path = out.join(format!("ctrace_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&path)
        .env("SOURCE_DATE_EPOCH", source_date_epoch(root)))?;
    fs::remove_dir_all(&stage)?;
    Ok(Package {
        size: fs::metadata(&path)?.len(),
        path,
        arch: arch.to_string(),
    })
}

/// The extended description as control files want it: lines of at most
/// 72 characters, each after one space.
fn description() -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in DESCRIPTION.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > 72 {
            out.push_str(&format!(" {line}\n"));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push_str(&format!(" {line}\n"));
    out
}

/// The last commit's time: dpkg-deb clamps every file's mtime to it, so
/// the same commit gives the same package, with dates lintian accepts
/// (it calls the epoch itself "ancient").
fn source_date_epoch(root: &Path) -> String {
    output(
        Command::new("git")
            .args(["log", "-1", "--format=%ct"])
            .current_dir(root),
    )
    .map(|s| s.trim().to_string())
    .ok()
    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
    // 2026-12-04, for a tree without git.
    .unwrap_or_else(|| "1796342400".to_string())
}

/// The man page and shell completions, from the CLI's own definition.
fn generated_docs(root: &Path, stage: &Path) -> anyhow::Result<()> {
    let tc = crate::toolchain()?;
    let generated = stage.join("gen");
    run(crate::cargo(&tc)
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "ctrace",
            "--features",
            "docgen",
            "--bin",
            "ctrace-docgen",
            "--",
        ])
        .arg(&generated)
        .current_dir(root)
        .env("AYA_BUILD_SKIP", "1"))?;
    for (from, to) in [
        ("ctrace.8", "usr/share/man/man8/ctrace.8"),
        (
            "ctrace.bash",
            "usr/share/bash-completion/completions/ctrace",
        ),
        ("_ctrace", "usr/share/zsh/vendor-completions/_ctrace"),
        (
            "ctrace.fish",
            "usr/share/fish/vendor_completions.d/ctrace.fish",
        ),
    ] {
        put(stage, to, &generated.join(from), 0o644)?;
    }
    gzip(&stage.join("usr/share/man/man8/ctrace.8"))?;
    fs::remove_dir_all(&generated)?;
    Ok(())
}

/// Members of a tar archive (`tar -t`), gzipped or not.
fn members(archive: &Path) -> anyhow::Result<Vec<String>> {
    Ok(output(Command::new("tar").arg("-tf").arg(archive))?
        .lines()
        .map(str::to_string)
        .collect())
}

/// `(mode, path)` of each member, from `tar -tv`.
fn modes(archive: &Path) -> anyhow::Result<Vec<(String, String)>> {
    Ok(output(Command::new("tar").arg("-tvf").arg(archive))?
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let mode = f.next()?.to_string();
            Some((mode, f.last()?.to_string()))
        })
        .collect())
}

/// The ELF class, byte order and machine a Rust target's binary must have.
fn expected_elf(target: &str) -> (u8, u8, u16) {
    match target.split('-').next().unwrap_or_default() {
        "x86_64" => (2, 1, 62),
        "aarch64" => (2, 1, 183),
        "armv7" => (1, 1, 40),
        "mipsel" => (1, 1, 8),
        "mips" => (1, 2, 8),
        other => panic!("no ELF facts for {other}"),
    }
}

/// An ELF header's class, byte order and machine; None for anything else.
fn elf_ident(head: &[u8]) -> Option<(u8, u8, u16)> {
    if head.len() < 20 || &head[..4] != b"\x7fELF" {
        return None;
    }
    let machine = match head[5] {
        1 => u16::from_le_bytes([head[18], head[19]]),
        2 => u16::from_be_bytes([head[18], head[19]]),
        _ => return None,
    };
    Some((head[4], head[5], machine))
}

/// The binary is an executable for `target`, and (`embedded_bpf`) the
/// eBPF object embedded in it has the target's byte order (bpfeb for
/// big-endian MIPS): the kernel loads programs of its own.
fn check_binary(bin: &Path, target: &str, embedded_bpf: bool) -> anyhow::Result<()> {
    let bytes = fs::read(bin)?;
    let want = expected_elf(target);
    let got = elf_ident(&bytes);
    ensure!(
        got == Some(want),
        "{}: ELF (class, data, machine) {got:?}; {target} needs {want:?}",
        bin.display()
    );
    if embedded_bpf {
        const EM_BPF: u16 = 247;
        let found: Vec<u8> = (1..bytes.len())
            .filter_map(|at| elf_ident(&bytes[at..]))
            .filter(|&(class, _, machine)| class == 2 && machine == EM_BPF)
            .map(|(_, data, _)| data)
            .collect();
        ensure!(
            found == [want.1],
            "{}: embedded eBPF objects of byte order {found:?}; {target} needs exactly one of {}",
            bin.display(),
            want.1
        );
    }
    Ok(())
}

fn check_ipk(p: &Package, version: &str, label: &str, target: &str) -> anyhow::Result<()> {
    let dir = p.path.with_extension("check");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let outer = members(&p.path)?;
    ensure!(
        outer == ["./debian-binary", "./data.tar.gz", "./control.tar.gz"],
        "{}: outer members {outer:?}",
        p.path.display()
    );
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&p.path)
        .arg("-C")
        .arg(&dir))?;
    ensure!(fs::read_to_string(dir.join("debian-binary"))? == "2.0\n");
    let data = modes(&dir.join("data.tar.gz"))?;
    for (want_mode, want_path) in [
        ("-rwxr-xr-x", "./usr/sbin/ctrace"),
        ("-rwxr-xr-x", "./etc/init.d/ctrace"),
        ("-rw-------", "./etc/config/ctrace"),
    ] {
        ensure!(
            data.iter().any(|(m, f)| m == want_mode && f == want_path),
            "{}: no {want_path} with mode {want_mode} in {data:?}",
            p.path.display()
        );
    }
    let control_dir = dir.join("control");
    fs::create_dir_all(&control_dir)?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(dir.join("control.tar.gz"))
        .arg("-C")
        .arg(&control_dir))?;
    let control = fs::read_to_string(control_dir.join("control"))?;
    for field in [
        "Package: ctrace\n".to_string(),
        format!("Version: {version}-r1\n"),
        format!("Architecture: {label}\n"),
        format!("Depends: {IPK_DEPENDS}\n"),
        format!("License: {}\n", env!("CARGO_PKG_LICENSE")),
        "Maintainer: ".into(),
        "Description: ".into(),
    ] {
        ensure!(
            control.contains(&field),
            "{}: control lacks {field:?}: {control}",
            p.path.display()
        );
    }
    ensure!(
        fs::read_to_string(control_dir.join("conffiles"))? == "/etc/config/ctrace\n",
        "conffiles"
    );
    let data_dir = dir.join("data");
    fs::create_dir_all(&data_dir)?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(dir.join("data.tar.gz"))
        .arg("-C")
        .arg(&data_dir))?;
    let bin = data_dir.join("usr/sbin/ctrace");
    check_binary(&bin, target, true)?;
    if crate::is_router_target(target) {
        ensure!(
            p.size <= IPK_LIMIT,
            "{}: {} bytes, over the {IPK_LIMIT} a router package may take",
            p.path.display(),
            p.size
        );
        run_emulated(&bin, target)?;
    }
    fs::remove_dir_all(&dir)?;
    Ok(())
}

/// What a router package may weigh: a 16 MB flash holds the firmware too.
const IPK_LIMIT: u64 = 1_310_720;

/// Runs a packaged router binary under qemu-user: it starts, knows its
/// version, probes (qemu-user answers bpf(2) with ENOSYS, so every tier is
/// explained as unavailable: exit 3 is expected) and says the lab was left
/// out.
fn run_emulated(bin: &Path, target: &str) -> anyhow::Result<()> {
    let qemu = match target.split('-').next().unwrap_or_default() {
        "armv7" => "qemu-arm-static".to_string(),
        isa => format!("qemu-{isa}-static"),
    };
    crate::vm::apt::Host::new().ensure_installed("qemu-user-static")?;
    let version = output(Command::new(&qemu).arg(bin).arg("--version"))?;
    ensure!(
        version.trim() == format!("ctrace {}", env!("CARGO_PKG_VERSION")),
        "{target}: --version said {version:?}"
    );
    let probe = Command::new(&qemu).arg(bin).arg("probe").output()?;
    let said = String::from_utf8_lossy(&probe.stdout);
    ensure!(
        matches!(probe.status.code(), Some(0 | 3)) && said.contains("auto picks"),
        "{target}: probe under {qemu}: {}\n{said}\n{}",
        probe.status,
        String::from_utf8_lossy(&probe.stderr)
    );
    let lab = Command::new(&qemu).arg(bin).arg("lab").output()?;
    ensure!(
        lab.status.code() == Some(3)
            && String::from_utf8_lossy(&lab.stderr).contains("leaves the lab out"),
        "{target}: lab under {qemu}: {} {}",
        lab.status,
        String::from_utf8_lossy(&lab.stderr)
    );
    step(&format!(
        "{target}: runs under {qemu} ({}, probe exit {}, lab left out)",
        version.trim(),
        probe.status.code().unwrap_or(-1)
    ));
    Ok(())
}

fn check_deb(p: &Package, version: &str, arch: &str, target: &str) -> anyhow::Result<()> {
    let field = |name: &str| -> anyhow::Result<String> {
        Ok(
            output(Command::new("dpkg-deb").arg("-f").arg(&p.path).arg(name))?
                .trim()
                .to_string(),
        )
    };
    ensure!(field("Package")? == "ctrace");
    ensure!(
        field("Version")? == version,
        "Version {}",
        field("Version")?
    );
    ensure!(field("Architecture")? == arch);
    let listing = output(Command::new("dpkg-deb").arg("-c").arg(&p.path))?;
    for (want_mode, want_path) in [
        ("-rwxr-xr-x", "./usr/sbin/ctrace"),
        ("-rw-r--r--", "./lib/systemd/system/ctrace.service"),
        ("-rw-r--r--", "./etc/default/ctrace"),
        ("-rw-r--r--", "./usr/share/man/man8/ctrace.8.gz"),
        (
            "-rw-r--r--",
            "./usr/share/bash-completion/completions/ctrace",
        ),
        ("-rw-r--r--", "./usr/share/zsh/vendor-completions/_ctrace"),
        (
            "-rw-r--r--",
            "./usr/share/fish/vendor_completions.d/ctrace.fish",
        ),
        ("-rw-r--r--", "./usr/share/doc/ctrace/copyright"),
    ] {
        ensure!(
            listing
                .lines()
                .any(|l| l.starts_with(want_mode) && l.ends_with(want_path)),
            "{}: no {want_path} with mode {want_mode}:\n{listing}",
            p.path.display()
        );
    }
    let dir = p.path.with_extension("check");
    let _ = fs::remove_dir_all(&dir);
    run(Command::new("dpkg-deb").arg("-x").arg(&p.path).arg(&dir))?;
    check_binary(&dir.join("usr/sbin/ctrace"), target, false)?;
    run(Command::new("dpkg-deb")
        .arg("-e")
        .arg(&p.path)
        .arg(dir.join("DEBIAN")))?;
    ensure!(
        fs::read_to_string(dir.join("DEBIAN/conffiles"))? == "/etc/default/ctrace\n",
        "conffiles"
    );
    fs::remove_dir_all(&dir)?;
    lintian(&p.path)
}

/// lintian, with every tag it may still raise explained in
/// deploy/debian/lintian.md; an error, or a warning not
/// explained there, fails the check.
fn lintian(deb: &Path) -> anyhow::Result<()> {
    crate::vm::apt::Host::new().ensure_installed("lintian")?;
    let out = Command::new("lintian")
        .args([
            "--no-cfg",
            "--display-level",
            ">=warning",
            "--tag-display-limit",
            "0",
        ])
        .arg(deb)
        .output()
        .context("running lintian")?;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let explained = fs::read_to_string(workspace_root().join("deploy/debian/lintian.md"))?;
    let mut unexplained = Vec::new();
    for line in said.lines() {
        // "E: ctrace: tag-name detail" / "W: ctrace: tag-name detail"
        let mut f = line.split_whitespace();
        let (Some(level), _, Some(tag)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if level == "E:" || !explained.contains(&format!("`{tag}`")) {
            unexplained.push(line.to_string());
        }
    }
    if !unexplained.is_empty() {
        bail!("lintian on {}:\n{}", deb.display(), unexplained.join("\n"));
    }
    step(&format!(
        "lintian {}: no errors, {} explained warnings",
        deb.file_name().unwrap_or_default().to_string_lossy(),
        said.lines().filter(|l| l.starts_with("W:")).count()
    ));
    Ok(())
}
