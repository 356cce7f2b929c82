//! `cargo xtask`: the project's own build and test tooling.
//!
//! Everything a fresh machine lacks is installed here, idempotently: the
//! pinned toolchain with rust-src, and bpf-linker built against that
//! toolchain's own libLLVM (bitcode from LLVM N cannot be read by a linker
//! built on LLVM N-1, and no prebuilt binary can be downloaded here).
//!
//! xtask itself builds with whatever toolchain `cargo` finds (the
//! machine's default), and runs every other cargo command on the pinned
//! one. A rust-toolchain.toml would make rustup demand the pinned toolchain
//! before xtask could install it, and rustup's auto-install is often off
//! (RUSTUP_AUTO_INSTALL=0), so `cargo xtask` on a fresh machine would fail.
use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod cross;
mod image;
mod package;
mod vm;

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Seconds each fuzz target runs in `cargo xtask test`.
const TEST_FUZZ_SECS: u64 = 15;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, set up and test ctrace.")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent; says what it skipped).
    Setup,
    /// Build the eBPF object and the release binary that embeds it.
    Build {
        /// Target triple for user space, e.g. aarch64-unknown-linux-musl.
        #[arg(long)]
        target: Option<String>,
        /// Show the eBPF build's progress (shown anyway when it fails).
        #[arg(short, long)]
        verbose: bool,
    },
    /// Build, then run `ctrace lab` (root needed). Extra args go to the lab.
    Lab {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then run every test: unit tests and the end-to-end suite
    /// against this machine's kernel (root needed for the latter).
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
        /// Skip the VM matrix after the host tests (also: CTRACE_SKIP_VM=1).
        #[arg(long)]
        no_vm: bool,
        #[command(flatten)]
        vm: vm::VmArgs,
    },
    /// Run the end-to-end suite inside VMs booted on Debian kernels and on
    /// an OpenWrt-configured kernel built here (x86_64 and aarch64, qemu
    /// TCG), once per strategy; root needed.
    VmTest {
        #[command(flatten)]
        vm: vm::VmArgs,
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Benchmarks (root): ctrace's cost as ratios against a baseline taken
    /// in the same run; prints a table, writes target/bench/results.json.
    Bench,
    /// The DaemonSet's image: an OCI archive for linux/amd64 and
    /// linux/arm64 (target/image/), made without a container daemon and
    /// checked with skopeo.
    Image,
    /// Installable packages in target/package/: OpenWrt .ipk per
    /// architecture label, Debian .deb for amd64 and arm64; each read back
    /// and checked (members, control fields, modes, conffiles, ELF), the
    /// .debs by lintian.
    Package,
    /// cargo fmt --check and clippy -D warnings over the workspace.
    Lint,
    /// Build the fuzz targets (fuzz/) with libFuzzer, AddressSanitizer and
    /// coverage instrumentation, and run each for a bounded time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 20)]
        secs: u64,
        /// Only these targets (default: every [[bin]] in fuzz/Cargo.toml).
        targets: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Cmd::Setup => setup().map(|_| ()),
        Cmd::Build { target, verbose } => {
            if verbose {
                // SAFETY: single-threaded here, before any child is spawned.
                unsafe { env::set_var("CTRACE_EBPF_BUILD_VERBOSE", "1") };
            }
            build(target.as_deref()).map(|_| ())
        }
        Cmd::Lab { args } => lab(&args),
        Cmd::Bench => bench(),
        Cmd::Test { filter, no_vm, vm } => test(filter.as_deref()).and_then(|()| {
            // A filter asks for some tests, not the whole run.
            if filter.is_some() || env::var_os("CTRACE_SKIP_FUZZ").is_some_and(|v| v == "1") {
                step("skipping the fuzz targets (a test filter, or CTRACE_SKIP_FUZZ=1)");
            } else {
                fuzz(TEST_FUZZ_SECS, &[])?;
            }
            if no_vm || env::var_os("CTRACE_SKIP_VM").is_some_and(|v| v == "1") {
                step("skipping the VM matrix (--no-vm or CTRACE_SKIP_VM=1)");
                Ok(())
            } else {
                vm::run(&vm, filter.as_deref())?;
                // The VM matrix built both musl binaries: the image costs
                // only its assembly and skopeo's check now, and the
                // packages the armv7, mipsel and mips builds (Zig and
                // cargo-zigbuild installed once) and their checks
                // (structure, size, lintian, each router binary under
                // qemu-user). A filtered run asked for some tests only.
                if filter.is_some() {
                    return Ok(());
                }
                image::image()?;
                package::package().map(|_| ())
            }
        }),
        Cmd::VmTest { vm, filter } => vm::run(&vm, filter.as_deref()),
        Cmd::Image => image::image().map(|_| ()),
        Cmd::Package => package::package().map(|_| ()),
        Cmd::Lint => lint(),
        Cmd::Fuzz { secs, targets } => fuzz(secs, &targets),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn step(what: &str) {
    eprintln!("\x1b[1mxtask:\x1b[0m {what}");
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The toolchain pinned in the workspace manifest,
/// `[workspace.metadata.ctrace] toolchain = "…"`.
fn toolchain() -> anyhow::Result<String> {
    let manifest = workspace_root().join("Cargo.toml");
    let text = fs::read_to_string(&manifest)?;
    text.lines()
        .skip_while(|l| l.trim() != "[workspace.metadata.ctrace]")
        .find_map(|l| l.trim().strip_prefix("toolchain"))
        .and_then(|l| l.split('"').nth(1))
        .map(str::to_string)
        .with_context(|| {
            format!(
                "no toolchain under [workspace.metadata.ctrace] in {}",
                manifest.display()
            )
        })
}

/// `cargo` on the pinned toolchain. RUSTUP_TOOLCHAIN rather than `+tc`:
/// it reaches every rustc and cargo the build starts in turn (build
/// scripts, aya-build's nested cargo), and it overrides the variable
/// rustup set for xtask itself.
fn cargo(tc: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.env("RUSTUP_TOOLCHAIN", tc);
    cmd
}

/// Where bpf-linker for this toolchain lives. Outside the work tree, so a
/// fresh clone on the same machine reuses it; keyed by toolchain so a
/// toolchain bump builds a matching linker.
fn tools_dir(toolchain: &str) -> PathBuf {
    tools_base().join(format!("bpf-linker-{BPF_LINKER_VERSION}-rust-{toolchain}"))
}

/// Where built tools are kept across clones (bpf-linker, cargo-zigbuild).
fn tools_base() -> PathBuf {
    env::var_os("CTRACE_TOOLS")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ctrace")))
        .unwrap_or_else(|| PathBuf::from("/var/tmp/ctrace"))
}

struct Tools {
    toolchain: String,
    bin: PathBuf,
}

/// Installs the pinned toolchain and the components we use, if missing.
fn ensure_toolchain() -> anyhow::Result<String> {
    let tc = toolchain()?;
    let have = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if have.lines().any(|l| l.starts_with(&tc)) {
        step(&format!("toolchain {tc}: present"));
    } else {
        step(&format!("toolchain {tc}: installing"));
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            &tc,
            "--profile",
            "minimal",
            "--component",
            "rust-src,rustfmt,clippy",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        &tc,
    ]))?;
    if components.lines().any(|l| l.starts_with("rust-src")) {
        step("rust-src: present");
    } else {
        step("rust-src: installing");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", &tc]))?;
    }
    Ok(tc)
}

fn setup() -> anyhow::Result<Tools> {
    let tc = ensure_toolchain()?;
    let dir = tools_dir(&tc);
    let linker = dir.join("bin/bpf-linker");
    if linker.exists() {
        step(&format!(
            "bpf-linker {BPF_LINKER_VERSION}: present ({})",
            linker.display()
        ));
    } else {
        install_bpf_linker(&tc, &dir)?;
    }
    Ok(Tools {
        toolchain: tc,
        bin: dir.join("bin"),
    })
}

fn install_bpf_linker(tc: &str, dir: &Path) -> anyhow::Result<()> {
    let verbose = output(
        Command::new("rustc")
            .arg(format!("+{tc}"))
            .args(["--version", "--verbose"]),
    )?;
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc does not report its LLVM version")?
        .to_string();
    let sysroot = PathBuf::from(
        output(
            Command::new("rustc")
                .arg(format!("+{tc}"))
                .args(["--print", "sysroot"]),
        )?
        .trim(),
    );
    // The real shared library, not the libLLVM-N-rust-*.so linker script
    // beside it, which lld rejects.
    let libllvm = fs::read_dir(sysroot.join("lib"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{llvm_major}")))
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.{llvm_major}* in {}",
                sysroot.join("lib").display()
            )
        })?;
    step(&format!(
        "bpf-linker {BPF_LINKER_VERSION}: building against {} (LLVM {llvm_major}); takes a few minutes, once",
        libllvm.display()
    ));
    let prefix = dir.join("llvm");
    fs::create_dir_all(prefix.join("lib"))?;
    for name in [
        libllvm.file_name().unwrap().to_os_string(),
        OsString::from("libLLVM.so"),
    ] {
        let link = prefix.join("lib").join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)?;
    }
    let started = Instant::now();
    run(Command::new("cargo")
        .arg(format!("+{tc}"))
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{llvm_major}"))
        .arg("--root")
        .arg(dir)
        .env("LLVM_PREFIX", &prefix)
        .current_dir(env::temp_dir()))?;
    step(&format!(
        "bpf-linker built in {:.0}s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The environment every build of ours gives cargo: the pinned toolchain,
/// bpf-linker on PATH, and RUSTC_BOOTSTRAP for `-Z build-std=core` on that
/// stable toolchain.
fn cargo_env<'a>(cmd: &'a mut Command, tools: &Tools) -> &'a mut Command {
    cmd.env("RUSTUP_TOOLCHAIN", &tools.toolchain)
        .env("PATH", path_with(&tools.bin))
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CTRACE_EBPF_TOOLCHAIN", &tools.toolchain)
}

fn path_with(bin: &Path) -> OsString {
    let mut paths = vec![bin.to_path_buf()];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    env::join_paths(paths).expect("valid PATH")
}

/// `cargo SUBCOMMAND` set up for `target` (None: the host): the pinned
/// toolchain and its tools, the target's standard library (added with
/// rustup, else built from rust-src with the C runtime of `cross`), and
/// cargo-zigbuild for the targets whose C runtime comes from Zig. The
/// release binary and the e2e test executable the VMs run are built the
/// same way.
fn target_cargo(tools: &Tools, subcommand: &str, target: Option<&str>) -> anyhow::Result<Command> {
    let mut build_std = false;
    if let Some(t) = target {
        let installed = output(Command::new("rustup").args([
            "target",
            "list",
            "--installed",
            "--toolchain",
            &tools.toolchain,
        ]))?;
        if !installed.lines().any(|l| l == t) {
            step(&format!("adding target {t}"));
            let added = output(Command::new("rustup").args([
                "target",
                "add",
                t,
                "--toolchain",
                &tools.toolchain,
            ]));
            match added {
                Ok(_) => {}
                Err(e) if cross::supported(t) => {
                    // rustup's own first line says why (its backtrace follows).
                    let why = e.to_string();
                    let why = why
                        .lines()
                        .find(|l| l.contains("error:"))
                        .unwrap_or("failed")
                        .trim();
                    step(&format!(
                        "rustup target add {t}: {why}; building the standard library from rust-src"
                    ));
                    if !cross::uses_zig(t) {
                        cross::prepare(&tools.toolchain, t)?;
                    }
                    build_std = true;
                }
                Err(e) => return Err(e),
            }
        }
    }
    let zig = target
        .filter(|t| cross::uses_zig(t))
        .map(|_| cross::prepare_zig(&tools.toolchain))
        .transpose()?;
    let mut cmd = match (&zig, subcommand) {
        (Some(_), "build") => {
            let mut c = Command::new("cargo");
            c.arg("zigbuild");
            c
        }
        // cargo has no alias for cargo-zigbuild's other subcommands;
        // `rustup run` gives it the toolchain's environment as cargo's
        // proxy would (the build script's rust-objcopy needs its libLLVM).
        (Some(_), _) => {
            let mut c = Command::new("rustup");
            c.args(["run", &tools.toolchain, "cargo-zigbuild", subcommand]);
            c
        }
        (None, _) => {
            let mut c = Command::new("cargo");
            c.arg(subcommand);
            c
        }
    };
    cmd.current_dir(workspace_root())
        .env_remove("AYA_BUILD_SKIP");
    cargo_env(&mut cmd, tools);
    if let Some(z) = &zig {
        // Through cargo (rustup's proxy sets up the toolchain's libraries
        // for the build script's rust-objcopy), with the pinned
        // cargo-zigbuild first on PATH.
        let mut paths = vec![z.bin.clone(), tools.bin.clone()];
        paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
        cmd.env("PATH", env::join_paths(paths)?)
            .env("PYTHONPATH", &z.pythonpath);
    }
    if let Some(t) = target {
        cmd.args(["--target", t]);
    }
    if build_std {
        cmd.arg("-Zbuild-std=std,panic_abort")
            .env("RUSTC_BOOTSTRAP", "1");
        if subcommand == "test" {
            // The test harness unwinds whatever the profile says, and the
            // profile's panic=abort would have cargo build the standard
            // library a second time for the other units: two `core`s in
            // one build ("duplicate lang item").
            cmd.env("CARGO_PROFILE_RELEASE_PANIC", "unwind");
        }
    }
    Ok(cmd)
}

/// Builds the release binary (eBPF object embedded). Returns its path.
fn build(target: Option<&str>) -> anyhow::Result<PathBuf> {
    let tools = setup()?;
    let root = workspace_root();
    let mut cmd = target_cargo(&tools, "build", target)?;
    step(&format!(
        "building ctrace{}",
        target.map(|t| format!(" for {t}")).unwrap_or_default()
    ));
    let started = Instant::now();
    // Routers (32- and 64-bit ARM, MIPS) have a few MiB of flash for
    // everything: their builds use the size-optimised profile, leave out the
    // lab (feature `lab`), and must fit 4 MiB. The VMs run these same
    // binaries.
    let router = target.is_some_and(is_router_target);
    let profile = if router { "router" } else { "release" };
    cmd.args([
        "--profile",
        profile,
        "--package",
        "ctrace",
        "--bin",
        "ctrace",
    ]);
    if router {
        cmd.arg("--no-default-features");
    }
    run(&mut cmd)?;
    let bin = match target {
        Some(t) => root.join("target").join(t).join(profile).join("ctrace"),
        None => root.join("target/release/ctrace"),
    };
    let size = fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    step(&format!(
        "built {} ({:.1} MiB) in {:.0}s",
        bin.display(),
        size as f64 / 1048576.0,
        started.elapsed().as_secs_f64()
    ));
    const ROUTER_LIMIT: u64 = 4 << 20;
    if router && size > ROUTER_LIMIT {
        bail!(
            "{} is {:.1} MiB: over the 4 MiB a router build may take",
            bin.display(),
            size as f64 / 1048576.0
        );
    }
    Ok(bin)
}

/// Targets built for routers' flash rather than for hosts.
pub(crate) fn is_router_target(target: &str) -> bool {
    ["arm", "aarch64", "mips"]
        .iter()
        .any(|isa| target.starts_with(isa))
}

fn lab(args: &[String]) -> anyhow::Result<()> {
    let bin = build(None)?;
    step("running ctrace lab");
    run(Command::new(&bin).arg("lab").args(args))
}

/// The router builds (for their sizes), the release binary, then the
/// bench harness (tests/src/bin/bench.rs) against it.
fn bench() -> anyhow::Result<()> {
    if !is_root() {
        bail!("cargo xtask bench builds namespaces and loads programs: run it as root");
    }
    let started = Instant::now();
    for t in [
        "aarch64-unknown-linux-musl",
        "armv7-unknown-linux-musleabihf",
    ] {
        build(Some(t))?;
    }
    let bin = build(None)?;
    // The peer the snapshot is compared with.
    vm::apt::Host::new().ensure_installed("conntrack")?;
    let root = workspace_root();
    step("building the bench harness");
    let tc = ensure_toolchain()?;
    run(cargo(&tc)
        .args(["build", "--release", "-p", "ctrace-tests", "--bin", "bench"])
        .current_dir(&root)
        .env("AYA_BUILD_SKIP", "1"))?;
    step("running the benchmarks (about an hour)");
    run(Command::new(root.join("target/release/bench"))
        .current_dir(&root)
        .env("CTRACE_BIN", &bin))?;
    step(&format!(
        "bench done in {:.0}s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Debian packages the host tests use.
/// nftables and iptables write kube-proxy's rules as kube-proxy's own
/// tools would, for the Service-name tests.
/// systemd-nspawn boots a throwaway systemd for the Debian unit's test.
const TEST_PACKAGES: [&str; 6] = [
    "prometheus",
    "prometheus-node-exporter",
    "python3-yaml",
    "nftables",
    "iptables",
    "systemd-container",
];

fn test(filter: Option<&str>) -> anyhow::Result<()> {
    let bin = build(None)?;
    let root = workspace_root();
    if is_root() {
        // What the exporter's tests scrape with and lint against: a real
        // Prometheus, node_exporter and promtool; PyYAML for the
        // manifests' offline checks; nft and iptables-nft for kube-proxy's
        // rules.
        let host = vm::apt::Host::new();
        for pkg in TEST_PACKAGES {
            host.ensure_installed(pkg)?;
        }
    } else {
        step("not root: the end-to-end tests will say they cannot run and skip");
    }
    step("running unit and end-to-end tests");
    let mut cmd = cargo(&toolchain()?);
    cmd.arg("test")
        .current_dir(&root)
        // Unit tests need no eBPF object; the end-to-end tests run the
        // release binary built above, which has it.
        .env("AYA_BUILD_SKIP", "1")
        .env("CTRACE_BIN", &bin)
        .arg("--");
    if let Some(f) = filter {
        cmd.arg(f);
    }
    // The end-to-end tests share one kernel: its BPF programs, the global
    // nf_conntrack_max. One at a time keeps their ground truth clean.
    cmd.arg("--test-threads=1");
    run(&mut cmd)
}

fn lint() -> anyhow::Result<()> {
    let tc = ensure_toolchain()?;
    let root = workspace_root();
    run(cargo(&tc)
        .args(["fmt", "--all", "--check"])
        .current_dir(&root))?;
    run(cargo(&tc)
        .args(["clippy", "--all-targets", "--", "-D", "warnings"])
        .current_dir(&root)
        .env("AYA_BUILD_SKIP", "1"))?;
    // What router builds compile: without the lab.
    run(cargo(&tc)
        .args([
            "clippy",
            "--package",
            "ctrace",
            "--no-default-features",
            "--",
            "-D",
            "warnings",
        ])
        .current_dir(&root)
        .env("AYA_BUILD_SKIP", "1"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// The flags cargo-fuzz passes for libFuzzer (inline 8-bit counters, PC
/// table, comparison tracing), with AddressSanitizer and overflow checks.
/// Applied to the fuzz workspace only, and with an explicit --target so
/// build scripts and proc macros are built without them.
const FUZZ_RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing -Zsanitizer=address -Cdebug-assertions -Coverflow-checks \
    -Cforce-frame-pointers";

/// The fuzz targets named in fuzz/Cargo.toml.
fn fuzz_targets(manifest: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        fs::read_to_string(manifest).with_context(|| format!("reading {}", manifest.display()))?;
    let mut targets = Vec::new();
    let mut in_bin = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(v) = line.strip_prefix("name") {
            if let Some(name) = v.split('"').nth(1) {
                targets.push(name.to_string());
            }
        }
    }
    Ok(targets)
}

/// Builds the fuzz targets without cargo-fuzz (RUSTC_BOOTSTRAP lets the
/// pinned stable toolchain take -Zsanitizer) and runs each for `secs`
/// seconds from the committed seeds (fuzz/seeds/<target>) plus what
/// earlier runs found (fuzz/corpus/<target>, not committed). A crash
/// fails with the input saved under fuzz/artifacts/<target>/.
fn fuzz(secs: u64, only: &[String]) -> anyhow::Result<()> {
    let tc = ensure_toolchain()?;
    let dir = workspace_root().join("fuzz");
    let manifest = dir.join("Cargo.toml");
    let all = fuzz_targets(&manifest)?;
    for t in only {
        if !all.contains(t) {
            bail!("no fuzz target {t:?}; there are {}", all.join(", "));
        }
    }
    let targets: Vec<&String> = all
        .iter()
        .filter(|t| only.is_empty() || only.contains(t))
        .collect();
    let host = output(Command::new("rustc").arg(format!("+{tc}")).arg("-vV"))?
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
        .context("rustc -vV names no host")?;
    step(&format!("building fuzz targets for {host}"));
    let started = Instant::now();
    let flags: String = FUZZ_RUSTFLAGS
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    run(cargo(&tc)
        .args([
            "build",
            "--release",
            "--bins",
            "--target",
            &host,
            "--manifest-path",
        ])
        .arg(&manifest)
        .current_dir(&dir)
        .env("RUSTFLAGS", flags)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", dir.join("target"))
        // The parsers need no eBPF object.
        .env("AYA_BUILD_SKIP", "1"))?;
    step(&format!(
        "fuzz targets built in {:.0}s",
        started.elapsed().as_secs_f64()
    ));
    for t in targets {
        let bin = dir.join("target").join(&host).join("release").join(t);
        let corpus = dir.join("corpus").join(t);
        let seeds = dir.join("seeds").join(t);
        let artifacts = dir.join("artifacts").join(t);
        fs::create_dir_all(&corpus)?;
        fs::create_dir_all(&artifacts)?;
        step(&format!("fuzzing {t} for {secs}s"));
        let out = Command::new(&bin)
            .arg(format!("-max_total_time={secs}"))
            .arg("-print_final_stats=1")
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg(&corpus)
            .arg(&seeds)
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let log_path = artifacts.join("last-run.log");
        fs::write(&log_path, log.as_bytes())?;
        let stat = |name: &str| {
            log.lines()
                .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| "?".into())
        };
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            for l in tail.into_iter().rev() {
                eprintln!("  {l}");
            }
            bail!(
                "fuzz target {t} failed ({}); input saved under {}, log in {}",
                out.status,
                artifacts.display(),
                log_path.display()
            );
        }
        step(&format!(
            "fuzz {t}: {} executions ({}/s), {} new corpus units, no crash",
            stat("number_of_executed_units"),
            stat("average_exec_per_sec"),
            stat("new_units_added"),
        ));
    }
    Ok(())
}
