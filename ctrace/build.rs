//! Builds the eBPF object for the architecture user space is built for, so
//! the binary embeds the programs it loads: one file to copy to a router.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");
    if env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        // Lets `cargo check`/clippy run without bpf-linker. The binary then
        // refuses to trace and says how to build it properly.
        let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
        fs::write(out.join("ctrace-ebpf"), [])?;
        return Ok(());
    }
    // The object is built by the toolchain building user space unless told
    // otherwise: bpf-linker has to match that toolchain's LLVM either way.
    println!("cargo::rerun-if-env-changed=CTRACE_EBPF_TOOLCHAIN");
    println!("cargo::rerun-if-env-changed=RUSTUP_TOOLCHAIN");
    let toolchain = env::var("CTRACE_EBPF_TOOLCHAIN")
        .or_else(|_| env::var("RUSTUP_TOOLCHAIN"))
        .map_err(|_| {
            anyhow::anyhow!(
                "no toolchain for the eBPF object: build with `cargo xtask build`, \
                 or set CTRACE_EBPF_TOOLCHAIN (or use rustup's `cargo +TOOLCHAIN`)"
            )
        })?;
    // aya-build watches the eBPF crate; the types it shares with user space
    // live in ctrace-common, and a stale object would disagree with them.
    println!("cargo::rerun-if-changed=../ctrace-common/src");
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../ctrace-ebpf");
    let root = root.to_str().expect("utf-8 path");
    println!("cargo::rerun-if-env-changed={VERBOSE_ENV}");
    let verbose = env::var_os(VERBOSE_ENV).is_some_and(|v| v == "1");
    let log = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("ebpf-build.log");
    let (built, output) = with_stdout_in(&log, || {
        aya_build::build_ebpf(
            [aya_build::Package {
                name: "ctrace-ebpf",
                root_dir: root,
                ..Default::default()
            }],
            aya_build::Toolchain::Custom(&toolchain),
        )
    })?;
    // aya-build echoes every line of the eBPF build as a cargo warning:
    // forty lines of progress on every build. Cargo's directives pass;
    // the progress is shown when the build failed, or when asked.
    for line in output.lines() {
        match line
            .strip_prefix("cargo::warning=")
            .or_else(|| line.strip_prefix("cargo:warning="))
        {
            Some(_) if built.is_ok() && !verbose => {}
            _ => println!("{line}"),
        }
    }
    built?;
    strip_debug_info()
}

/// Drops the object's DWARF sections, which are most of its size (and so a
/// third of a router binary): aya relocates against BTF (`.BTF`,
/// `.BTF.ext`, line info included), never against DWARF, and llvm-objcopy's
/// `--strip-debug` leaves those sections alone. The objcopy is the one
/// rustc ships in its sysroot, so no other tool is needed.
fn strip_debug_info() -> anyhow::Result<()> {
    use std::process::Command;
    let object = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("ctrace-ebpf");
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(&rustc).args(["--print", "sysroot"]).output()?;
    anyhow::ensure!(sysroot.status.success(), "rustc --print sysroot failed");
    let host = env::var("HOST")?;
    let objcopy = PathBuf::from(String::from_utf8(sysroot.stdout)?.trim())
        .join("lib/rustlib")
        .join(host)
        .join("bin/rust-objcopy");
    let before = fs::metadata(&object)?.len();
    let status = Command::new(&objcopy)
        .arg("--strip-debug")
        .arg(&object)
        .status()
        .map_err(|e| anyhow::anyhow!("running {}: {e}", objcopy.display()))?;
    anyhow::ensure!(
        status.success(),
        "{} --strip-debug failed",
        objcopy.display()
    );
    let after = fs::metadata(&object)?.len();
    anyhow::ensure!(after > 0 && after <= before, "stripping left {after} bytes");
    Ok(())
}

/// Set to 1 to see the eBPF build's progress (`cargo xtask build -v`).
const VERBOSE_ENV: &str = "CTRACE_EBPF_BUILD_VERBOSE";

/// Runs `f` with this process's stdout (where a build script speaks to
/// cargo) sent to `log`, and returns what it wrote there.
fn with_stdout_in<T>(log: &std::path::Path, f: impl FnOnce() -> T) -> anyhow::Result<(T, String)> {
    use std::{io::Write as _, os::fd::AsRawFd as _};
    let file = fs::File::create(log)?;
    std::io::stdout().flush()?;
    // SAFETY: plain descriptor calls on this process's own descriptors;
    // stdout is flushed around the swap, so nothing buffered crosses it.
    let saved = unsafe { libc::dup(1) };
    if saved < 0 || unsafe { libc::dup2(file.as_raw_fd(), 1) } < 0 {
        anyhow::bail!(
            "redirecting the build script's stdout: {}",
            std::io::Error::last_os_error()
        );
    }
    let out = f();
    let _ = std::io::stdout().flush();
    // SAFETY: as above; `saved` is ours and closed once restored.
    unsafe {
        libc::dup2(saved, 1);
        libc::close(saved);
    }
    Ok((out, fs::read_to_string(log)?))
}
