//! Router targets whose standard library rustup does not offer for the
//! pinned toolchain on this machine (32-bit ARM: `rustup target add
//! armv7-unknown-linux-musleabihf` fails with "unavailable for download";
//! MIPS is tier 3 and has no prebuilt standard library at all).
//!
//! The standard library is then built from rust-src (`-Zbuild-std`), and
//! the C runtime comes from one of two places:
//! - ARM: Debian. Musl's crt objects and `libc.a` (`musl-dev:armhf`, which
//!   needs the armhf architecture added to dpkg) and libgcc's
//!   `crtbegin.o`/`crtend.o` and unwinder (`libgcc-12-dev-armhf-cross`),
//!   put where rust-std would have shipped its `self-contained` runtime.
//! - MIPS: Zig, which bundles musl and LLVM's libunwind for both byte
//!   orders, driven by cargo-zigbuild. Debian has no big-endian MIPS port,
//!   and its mipsel musl and libgcc are hard-float (`-mfpxx`) while Rust's
//!   MIPS musl targets are soft-float, as OpenWrt's userland is; its libgcc
//!   unwinder also wants glibc's `_dl_find_object`. The flags these
//!   targets link with are in `.cargo/config.toml`.
use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{output, run, step};

/// What a target needs from Debian, and where its files land.
struct Runtime {
    deb_arch: &'static str,
    musl_dir: &'static str,
    gcc_dir: &'static str,
    packages: &'static [&'static str],
}

fn runtime(target: &str) -> Option<Runtime> {
    match target {
        "armv7-unknown-linux-musleabihf" | "arm-unknown-linux-musleabihf" => Some(Runtime {
            deb_arch: "armhf",
            musl_dir: "/usr/lib/arm-linux-musleabihf",
            gcc_dir: "/usr/lib/gcc-cross/arm-linux-gnueabihf/12",
            packages: &["musl-dev:armhf", "libgcc-12-dev-armhf-cross"],
        }),
        _ => None,
    }
}

/// Whether `target` can be built with `-Zbuild-std` here.
pub fn supported(target: &str) -> bool {
    runtime(target).is_some() || uses_zig(target)
}

/// Targets whose C runtime and linker come from Zig.
pub fn uses_zig(target: &str) -> bool {
    matches!(
        target,
        "mips-unknown-linux-musl" | "mipsel-unknown-linux-musl"
    )
}

/// The Zig release (Python's registry ships it as `ziglang`) and the
/// cargo-zigbuild that drives it, both pinned.
const ZIGLANG_VERSION: &str = "0.17.1";
const ZIGBUILD_VERSION: &str = "0.24.1";

/// Zig and the cargo-zigbuild that drives it, both kept under xtask's
/// tools directory.
pub struct Zig {
    /// The directory of the pinned `cargo-zigbuild`, put first on PATH.
    pub bin: std::path::PathBuf,
    /// The `ziglang` package's directory, for PYTHONPATH: cargo-zigbuild
    /// finds Zig as `python3 -m ziglang`.
    pub pythonpath: std::path::PathBuf,
}

/// Installs Zig and cargo-zigbuild when missing. Zig goes into a directory
/// of its own (`pip install --target`), never into a Python environment:
/// Debian's is externally managed, and the host's Python stays as it was.
pub fn prepare_zig(toolchain: &str) -> anyhow::Result<Zig> {
    let pythonpath = crate::tools_base().join(format!("ziglang-{ZIGLANG_VERSION}"));
    let zig = output(
        Command::new("python3")
            .args(["-m", "ziglang", "version"])
            .env("PYTHONPATH", &pythonpath),
    );
    if zig.is_ok_and(|v| v.trim() == ZIGLANG_VERSION) {
        step(&format!("zig {ZIGLANG_VERSION}: present"));
    } else {
        if output(Command::new("python3").args(["-m", "pip", "--version"])).is_err() {
            crate::vm::apt::Host::new().ensure_installed("python3-pip")?;
        }
        step(&format!(
            "zig {ZIGLANG_VERSION}: installing into {}",
            pythonpath.display()
        ));
        let _ = fs::remove_dir_all(&pythonpath);
        run(Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("--target")
            .arg(&pythonpath)
            .arg(format!("ziglang=={ZIGLANG_VERSION}"))
            .env("PIP_ROOT_USER_ACTION", "ignore"))?;
    }
    let root = crate::tools_base().join(format!("cargo-zigbuild-{ZIGBUILD_VERSION}"));
    let bin = root.join("bin");
    if bin.join("cargo-zigbuild").exists() {
        step(&format!("cargo-zigbuild {ZIGBUILD_VERSION}: present"));
    } else {
        step(&format!(
            "cargo-zigbuild {ZIGBUILD_VERSION}: building, once"
        ));
        run(Command::new("cargo")
            .args([
                "install",
                "--quiet",
                "--locked",
                "cargo-zigbuild",
                "--version",
            ])
            .arg(ZIGBUILD_VERSION)
            .arg("--root")
            .arg(&root)
            .env("RUSTUP_TOOLCHAIN", toolchain)
            .current_dir(std::env::temp_dir()))?;
    }
    Ok(Zig { bin, pythonpath })
}

/// Puts the C runtime for `target` where rustc looks for it, installing
/// the Debian packages it comes from if needed.
pub fn prepare(toolchain: &str, target: &str) -> anyhow::Result<()> {
    let rt = runtime(target).with_context(|| format!("no C runtime known for {target}"))?;
    let sysroot =
        output(Command::new("rustc").args([&format!("+{toolchain}"), "--print", "sysroot"]))?;
    let dir = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(target)
        .join("lib/self-contained");
    if dir.join("libc.a").exists() {
        step(&format!(
            "C runtime for {target}: present ({})",
            dir.display()
        ));
        return Ok(());
    }
    let installed = |pkg: &str| {
        output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", pkg]))
            .is_ok_and(|s| s.trim() == "installed")
    };
    if rt.packages.iter().any(|p| !installed(p)) {
        let arches = output(Command::new("dpkg").arg("--print-foreign-architectures"))?;
        if !arches.lines().any(|a| a == rt.deb_arch) {
            step(&format!(
                "adding dpkg architecture {} (for musl's {} runtime)",
                rt.deb_arch, rt.deb_arch
            ));
            run(Command::new("dpkg").args(["--add-architecture", rt.deb_arch]))?;
        }
        step("apt-get update");
        crate::vm::apt::update_host_lists()?;
        for p in rt.packages {
            step(&format!("{p}: installing"));
            run(Command::new("apt-get")
                .args(["-q", "-y", "install", p])
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
        }
    }
    fs::create_dir_all(&dir)?;
    let copy = |from: &str, to: &str| -> anyhow::Result<()> {
        let from = Path::new(from);
        if !from.exists() {
            bail!(
                "{} is missing after installing {:?}",
                from.display(),
                rt.packages
            );
        }
        fs::copy(from, dir.join(to))
            .with_context(|| format!("copying {} into {}", from.display(), dir.display()))?;
        Ok(())
    };
    for f in ["crt1.o", "crti.o", "crtn.o", "rcrt1.o", "Scrt1.o"] {
        copy(&format!("{}/{f}", rt.musl_dir), f)?;
    }
    for f in ["crtbegin.o", "crtend.o", "crtbeginS.o", "crtendS.o"] {
        copy(&format!("{}/{f}", rt.gcc_dir), f)?;
    }
    // std links -lunwind for backtraces; libgcc's unwinder is the ARM EHABI
    // one the target expects. libc.a last: its presence marks completion.
    copy(&format!("{}/libgcc_eh.a", rt.gcc_dir), "libunwind.a")?;
    copy(&format!("{}/libc.a", rt.musl_dir), "libc.a")?;
    step(&format!(
        "C runtime for {target}: installed in {}",
        dir.display()
    ));
    Ok(())
}
