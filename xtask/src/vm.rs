//! `cargo xtask vm-test`: ctrace's end-to-end suite on other kernels.
//!
//! This machine's kernel cannot run every hook strategy (no kprobes,
//! fentry forbidden by lockdown) and is one kernel among the many ctrace
//! meets in the field. So the suite also runs inside throwaway VMs: on
//! Debian's own cloud kernels for x86_64 and arm64, and on kernels built
//! here with OpenWrt's BPF-relevant configuration for those two and for
//! the routers' 32-bit ARM and MIPS (both byte orders):
//!
//! 1. host packages: qemu, cpio, busybox-static, and for the OpenWrt rows
//!    the kernel source, build tools and cross compilers (apt, idempotent);
//! 2. the matrix: the newest package of every cloud kernel series apt
//!    offers per architecture, resolved at run time (names change), plus
//!    one OpenWrt-configured kernel per architecture (`openwrt.rs`: no
//!    BTF, no kprobes, no BPF on tracepoints);
//! 3. per architecture: ctrace's `.ipk` (built and checked as `cargo
//!    xtask package` does), the e2e test executable built like ctrace for
//!    that target, and a static busybox (`busybox.rs`);
//! 4. per kernel: its image and the conntrack/nf_tables/veth modules
//!    (dependencies from each module's own `.modinfo`), packed with
//!    busybox, the test executable and the package's unpacked data
//!    archive into an initramfs whose /init runs the suite once per pass
//!    and prints markers on the serial console;
//! 5. qemu (TCG: KVM does not work here), `--jobs` VMs at a time, each
//!    booted as soon as it is prepared while the next ones are prepared
//!    beside it at the lowest CPU priority, console streamed and logged, a
//!    timeout per VM, then a table kernel x arch x strategy.
//!
//! Everything downloaded or built is cached under `$CTRACE_CACHE` (default
//! `~/.cache/ctrace/vm`): kernels per arch and version (the OpenWrt ones
//! keyed by their config fragments and source version), the extracted
//! modules, busybox, and initramfs images keyed by a hash of their inputs.
pub mod apt;
mod busybox;
mod initramfs;
mod kernel;
mod modinfo;
mod openwrt;
mod qemu;
mod report;

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};

use crate::{setup, step};

/// Options shared by `vm-test` and the VM part of `test`.
#[derive(Args, Debug, Clone)]
pub struct VmArgs {
    /// Kernel to test, repeatable: a series (`6.1`, `6.12`), a Debian kernel
    /// ABI (`6.1.0-56`, `6.12.117+deb12`), a package version (`6.1.192-2`),
    /// or `openwrt` for the kernel built here from linux-source-6.12 with
    /// OpenWrt's BPF-relevant configuration. Default: the newest kernel of
    /// every cloud series apt offers, and `openwrt`. (The environment
    /// variable takes a comma-separated list.)
    #[arg(
        long = "kernel",
        env = "CTRACE_VM_KERNELS",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub kernels: Vec<String>,
    /// Guest architecture, repeatable. Default: all five (Debian's kernels
    /// exist for x86_64 and aarch64 only; armv7, mipsel and mips have the
    /// OpenWrt-configured row alone).
    #[arg(
        long = "arch",
        env = "CTRACE_VM_ARCHES",
        value_delimiter = ',',
        value_enum,
        value_name = "ARCH"
    )]
    pub arches: Vec<Arch>,
    /// Strategies to run the suite with on every Debian kernel, one run
    /// each (space or comma separated). `auto` lets ctrace pick: kprobe on
    /// Debian's kernels (each VM's report shows the probe), so a forced
    /// kprobe run would repeat it.
    #[arg(long, env = "CTRACE_VM_STRATEGIES", default_value = "auto")]
    pub strategies: String,
    /// Passes that only some Debian rows run, as `SERIES/ARCH=PASS`
    /// (repeatable; PASS is a strategy, or `STRATEGY=FILTER` for only some
    /// tests). By default the oldest kernel proves the tiers auto does not
    /// pick there, once per architecture: the whole suite forced onto
    /// tracepoint, and on x86_64 the tc tests onto tc (6.1 has no TCX:
    /// the clsact path, which the OpenWrt rows, 6.12 with TCX, do not
    /// take). The host's own kernel runs the suite on tracepoint too.
    #[arg(
        long = "pass",
        env = "CTRACE_VM_PASSES",
        value_delimiter = ',',
        default_value = "6.1/x86_64=tracepoint,6.1/x86_64=tc=tc::,6.1/aarch64=tracepoint",
        value_name = "SERIES/ARCH=PASS"
    )]
    pub passes: Vec<String>,
    /// Strategies for the OpenWrt-configured kernel, where fexit, kprobe
    /// and tracepoint programs cannot load.
    #[arg(long, env = "CTRACE_VM_OPENWRT_STRATEGIES", default_value = "auto tc")]
    pub openwrt_strategies: String,
    /// Wall-clock limit per VM, in seconds; qemu is killed after it.
    #[arg(
        long = "vm-timeout",
        env = "CTRACE_VM_TIMEOUT",
        default_value_t = 1800,
        value_name = "SECS"
    )]
    pub vm_timeout: u64,
    /// Limit for one run of the suite inside a VM, in seconds, so that a
    /// hang in one strategy still leaves the others their results. The
    /// longest run measured, the whole suite on Debian's 6.12 arm64 kernel,
    /// takes about 530 s.
    #[arg(
        long = "run-timeout",
        env = "CTRACE_VM_RUN_TIMEOUT",
        default_value_t = 900,
        value_name = "SECS"
    )]
    pub run_timeout: u64,
    /// Set the VMs' nf_conntrack_max (default: the kernel's own, 65536 for
    /// 2 GiB of guest memory).
    #[arg(long = "ct-max", env = "CTRACE_VM_CT_MAX", value_name = "N")]
    pub ct_max: Option<u64>,
    /// RUST_LOG for ctrace inside the VMs (e.g. `debug`), to see why a run
    /// failed; a failing test prints ctrace's stderr.
    #[arg(long = "ctrace-log", env = "CTRACE_VM_LOG", value_name = "FILTER")]
    pub ctrace_log: Option<String>,
    /// SYNs the flood test sends in each VM (TCG is ~20x slower than the
    /// host, where it sends 600,000).
    #[arg(
        long = "flood",
        env = "CTRACE_VM_FLOOD",
        default_value_t = 40_000,
        value_name = "N"
    )]
    pub flood: u64,
    /// Guest memory in MiB. Full conntrack tables need room.
    #[arg(
        long = "vm-memory",
        env = "CTRACE_VM_MEMORY",
        default_value_t = 2048,
        value_name = "MIB"
    )]
    pub memory: u32,
    /// VMs booted side by side. Each runs on one host thread (TCG), and
    /// much of a guest's time is the suite's real-time waits, so two keep
    /// a two-core machine busy; the builds before them run alone.
    #[arg(
        long = "jobs",
        env = "CTRACE_VM_JOBS",
        default_value_t = 2,
        value_name = "N"
    )]
    pub jobs: usize,
    /// Print what passing tests wrote too (libtest's --show-output): the
    /// flood's figures, skipped parts.
    #[arg(
        long = "show-output",
        env = "CTRACE_VM_SHOW_OUTPUT",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub show_output: bool,
    /// Only resolve and print the matrix; boot nothing.
    #[arg(long)]
    pub list: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Arch {
    #[value(name = "x86_64")]
    X86_64,
    #[value(name = "aarch64")]
    Aarch64,
    /// 32-bit ARM (OpenWrt's armsr/armv7 on QEMU's virt machine).
    #[value(name = "armv7")]
    Armv7,
    /// Little-endian MIPS32 (QEMU's malta board, OpenWrt's mipsel_24kc).
    #[value(name = "mipsel")]
    Mipsel,
    /// Big-endian MIPS32 (malta, OpenWrt's mips_24kc).
    #[value(name = "mips")]
    Mips,
}

impl Arch {
    pub const ALL: [Arch; 5] = [
        Arch::X86_64,
        Arch::Aarch64,
        Arch::Armv7,
        Arch::Mipsel,
        Arch::Mips,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
            Arch::Armv7 => "armv7",
            Arch::Mipsel => "mipsel",
            Arch::Mips => "mips",
        }
    }
    /// Debian's name for it (package names, apt's architecture). Debian 12
    /// has no big-endian MIPS port: `mips` names no packages.
    pub fn deb(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
            Arch::Armv7 => "armhf",
            Arch::Mipsel => "mipsel",
            Arch::Mips => "mips",
        }
    }
    pub fn musl_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-musl",
            Arch::Aarch64 => "aarch64-unknown-linux-musl",
            Arch::Armv7 => "armv7-unknown-linux-musleabihf",
            Arch::Mipsel => "mipsel-unknown-linux-musl",
            Arch::Mips => "mips-unknown-linux-musl",
        }
    }
    /// The OpenWrt architecture label of the `.ipk` whose binary the VMs
    /// of this architecture run.
    pub fn openwrt_label(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64_generic",
            Arch::Armv7 => "arm_cortex-a7_neon-vfpv4",
            Arch::Mipsel => "mipsel_24kc",
            Arch::Mips => "mips_24kc",
        }
    }
    /// Whether Debian ships cloud kernels for it. The 32-bit router
    /// architectures get only the OpenWrt-configured row: what runs there
    /// is OpenWrt.
    pub fn has_debian_kernels(self) -> bool {
        matches!(self, Arch::X86_64 | Arch::Aarch64)
    }
    /// The host package that provides this architecture's qemu.
    fn qemu_package(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86",
            Arch::Aarch64 | Arch::Armv7 => "qemu-system-arm",
            Arch::Mipsel | Arch::Mips => "qemu-system-mips",
        }
    }
}

/// Root of everything this module caches.
fn cache_dir() -> PathBuf {
    env::var_os("CTRACE_CACHE")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ctrace/vm")))
        .unwrap_or_else(|| PathBuf::from("/var/tmp/ctrace/vm"))
}

/// What goes into one architecture's VMs.
struct Binaries {
    /// The OpenWrt package whose data archive is unpacked into the root
    /// file system, as opkg would install it: ctrace runs as shipped.
    package: PathBuf,
    e2e: PathBuf,
    busybox: PathBuf,
}

/// `auto tracepoint` or `auto,tracepoint` -> the words.
fn strategy_list(s: &str) -> Vec<String> {
    s.split([' ', ','])
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

pub fn run(args: &VmArgs, filter: Option<&str>) -> anyhow::Result<()> {
    let started = Instant::now();
    let strategies = strategy_list(&args.strategies);
    if strategies.is_empty() {
        bail!("--strategies is empty");
    }
    for p in &args.passes {
        match p.split_once('=') {
            Some((row, pass)) if row.contains('/') && !pass.is_empty() => {}
            _ => bail!("--pass `{p}`: expected SERIES/ARCH=PASS, such as 6.1/x86_64=tracepoint"),
        }
    }
    let openwrt_strategies = strategy_list(&args.openwrt_strategies);
    if openwrt_strategies.is_empty() {
        bail!("--openwrt-strategies is empty");
    }
    let strategies_for = |k: &kernel::Kernel| match k.origin {
        kernel::Origin::Debian => {
            let mut s = strategies.clone();
            let row = format!("{}/{}=", k.series, k.arch.name());
            for pass in args.passes.iter().filter_map(|p| p.strip_prefix(&row)) {
                if !s.iter().any(|have| have == pass) {
                    s.push(pass.to_string());
                }
            }
            s
        }
        kernel::Origin::OpenWrt { .. } => openwrt_strategies.clone(),
    };
    // `--kernel openwrt` selects the kernel built here, the other names
    // Debian's; only openwrt names mean no Debian kernel at all.
    let debian_names: Vec<String> = args
        .kernels
        .iter()
        .filter(|n| !openwrt::is_name(n))
        .cloned()
        .collect();
    let want_debian = args.kernels.is_empty() || !debian_names.is_empty();
    let want_openwrt = args.kernels.is_empty() || args.kernels.iter().any(|n| openwrt::is_name(n));
    if let Some(f) = filter
        && (f.is_empty() || f.contains(char::is_whitespace))
    {
        // It travels on the kernel command line, split at whitespace.
        bail!("test filter `{f}`: must be one word inside a VM");
    }
    let cache = cache_dir();
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let mut arches = args.arches.clone();
    if arches.is_empty() {
        arches = Arch::ALL.to_vec();
    }
    arches.sort();
    arches.dedup();

    step(&format!("vm-test: cache {}", cache.display()));
    let host = apt::Host::new();
    for pkg in ["cpio", "busybox-static"]
        .into_iter()
        .chain(arches.iter().map(|a| a.qemu_package()))
    {
        host.ensure_installed(pkg)?;
    }
    if want_openwrt {
        for pkg in openwrt::HOST_PACKAGES.iter().copied().chain(
            arches
                .iter()
                .filter_map(|&a| openwrt::cross(&host, a).map(|(_, pkg)| pkg)),
        ) {
            host.ensure_installed(pkg)?;
        }
    }

    // The matrix first: a missing kernel should fail before minutes of builds.
    let mut matrix = vec![];
    for &arch in &arches {
        if want_debian && arch.has_debian_kernels() {
            let apt = apt::Apt::for_arch(&host, arch, &cache)?;
            matrix.extend(kernel::resolve(&apt, arch, &debian_names, &cache)?);
        }
        if want_openwrt {
            matrix.extend(openwrt::resolve(&host, arch, &args.kernels)?);
        }
    }
    step("vm-test matrix:");
    for k in &matrix {
        let from = match &k.origin {
            kernel::Origin::Debian => k.package.clone(),
            kernel::Origin::OpenWrt { source_version } => {
                format!("built from {} {source_version}", k.package)
            }
        };
        eprintln!(
            "    {:<8} {:<6} {} ({from}); strategies: {}",
            k.arch.name(),
            k.series,
            k.version,
            strategies_for(k).join(" ")
        );
    }
    if args.list {
        return Ok(());
    }

    // The VMs boot as soon as each is ready, `--jobs` at a time, while the
    // rest is prepared beside them at the lowest CPU priority: two TCG
    // guests leave about a third of the machine idle (their suites wait on
    // real time), which the builds (router kernels, the 32-bit binaries)
    // now fill instead of running before the first boot. The Debian rows
    // come first: they run longest and need only the x86_64 and aarch64
    // binaries.
    let mut order: Vec<&kernel::Kernel> = matrix.iter().collect();
    order.sort_by_key(|k| {
        (
            matches!(k.origin, kernel::Origin::OpenWrt { .. }),
            std::cmp::Reverse(strategies_for(k).len()),
        )
    });
    let queue = BootQueue::default();
    let done = std::sync::Mutex::new(vec![]);
    let prepared = std::thread::scope(|scope| {
        // The preparing thread owns `host`; the rest it borrows.
        let (queue, done, cache) = (&queue, &done, &cache);
        for _ in 0..args.jobs.max(1) {
            scope.spawn(|| boot_from(queue, done));
        }
        let finished = |r: report::VmReport| done.lock().expect("results").push(r);
        let preparing = scope.spawn(move || {
            let mut lowered = false;
            let mut per_arch: std::collections::BTreeMap<
                Arch,
                (apt::Apt, Result<Binaries, String>),
            > = Default::default();
            for k in order {
                let arch = k.arch;
                if let std::collections::btree_map::Entry::Vacant(slot) = per_arch.entry(arch) {
                    let apt = apt::Apt::for_arch(&host, arch, cache)?;
                    let bins = binaries(&host, &apt, arch, cache).map_err(|e| {
                        step(&format!("{}: {e:#}", arch.name()));
                        format!("building the {} binaries failed: {e:#}", arch.name())
                    });
                    slot.insert((apt, bins));
                }
                let (apt, bins) = &per_arch[&arch];
                let strategies = strategies_for(k);
                let prep_started = Instant::now();
                let report = report::VmReport {
                    kernel: k.clone(),
                    strategies: strategies.clone(),
                    wall: Duration::ZERO,
                    outcome: report::Outcome::default(),
                };
                let bins = match bins {
                    Ok(b) => b,
                    // Reported with the other rows' results, not instead.
                    Err(e) => {
                        finished(report::VmReport {
                            outcome: report::Outcome::failed_to_start(e.clone()),
                            ..report
                        });
                        continue;
                    }
                };
                let prepared = match k.origin {
                    kernel::Origin::Debian => kernel::prepare(&host, apt, k, cache),
                    kernel::Origin::OpenWrt { .. } => openwrt::prepare(&host, k, cache),
                };
                let boot = prepared.and_then(|prepared| {
                    let image = initramfs::build(cache, arch, &prepared, bins)?;
                    Ok(qemu::Boot {
                        arch,
                        kernel: prepared.vmlinuz,
                        initrd: image,
                        append: cmdline(arch, &strategies, filter, args),
                        memory_mib: memory_mib(arch, args.memory),
                        smp: smp(arch, &k.origin),
                        single_thread: args.jobs > 1,
                        timeout: Duration::from_secs(args.vm_timeout),
                        log: cache
                            .join("logs")
                            .join(format!("{}-{}.log", arch.name(), k.version)),
                        label: format!("{} {}", k.version, arch.name()),
                    })
                });
                let report = report::VmReport {
                    wall: prep_started.elapsed(),
                    ..report
                };
                match boot {
                    Ok(boot) => {
                        queue.push(report, boot);
                        if !lowered {
                            lowered = true;
                            yield_to_vms();
                        }
                    }
                    Err(e) => finished(report::VmReport {
                        outcome: report::Outcome::failed_to_start(format!("{e:#}")),
                        ..report
                    }),
                }
            }
            Ok::<_, anyhow::Error>(())
        });
        let prepared = preparing
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("preparing the VMs panicked")));
        // Whatever happened, the jobs stop once the queue is empty.
        queue.close();
        prepared
    });
    prepared?;
    let mut outcomes = done.into_inner().expect("results");
    // The table in matrix order, whatever order the VMs ran in.
    outcomes.sort_by_key(|r| {
        matrix
            .iter()
            .position(|k| k.arch == r.kernel.arch && k.version == r.kernel.version)
    });
    let ok = report::print(&outcomes, started.elapsed());
    if !ok {
        bail!(
            "some VM runs failed (table above; console logs in {})",
            cache.join("logs").display()
        );
    }
    Ok(())
}

/// Prepared VMs waiting for a free job, in the order they were prepared;
/// closed once no more will come.
#[derive(Default)]
struct BootQueue {
    state: std::sync::Mutex<(
        std::collections::VecDeque<(report::VmReport, qemu::Boot)>,
        bool,
    )>,
    pushed: std::sync::Condvar,
}

impl BootQueue {
    fn push(&self, report: report::VmReport, boot: qemu::Boot) {
        self.state
            .lock()
            .expect("queue")
            .0
            .push_back((report, boot));
        self.pushed.notify_one();
    }

    fn close(&self) {
        self.state.lock().expect("queue").1 = true;
        self.pushed.notify_all();
    }

    /// The next VM to boot; None once the queue is closed and empty.
    fn pop(&self) -> Option<(report::VmReport, qemu::Boot)> {
        let mut state = self.state.lock().expect("queue");
        loop {
            if let Some(next) = state.0.pop_front() {
                return Some(next);
            }
            if state.1 {
                return None;
            }
            state = self.pushed.wait(state).expect("queue");
        }
    }
}

/// One job: boots VMs from `queue` until it is closed and empty, and
/// reports each into `done`.
fn boot_from(queue: &BootQueue, done: &std::sync::Mutex<Vec<report::VmReport>>) {
    while let Some((report, boot)) = queue.pop() {
        let outcome = qemu::run(&boot)
            .map(|console| {
                let mut o = report::parse(&console.lines, console.timed_out, console.status_note);
                o.qemu = Some(console.wall);
                o
            })
            .unwrap_or_else(|e| report::Outcome::failed_to_start(format!("{e:#}")));
        let wall = report.wall + outcome.qemu.unwrap_or_default();
        done.lock().expect("results").push(report::VmReport {
            wall,
            outcome,
            ..report
        });
    }
}

/// The package, the e2e executable and busybox for `arch`.
fn binaries(
    host: &apt::Host,
    apt: &apt::Apt,
    arch: Arch,
    cache: &Path,
) -> anyhow::Result<Binaries> {
    Ok(Binaries {
        package: crate::package::openwrt_package(
            arch.openwrt_label(),
            &crate::workspace_root().join("target/package-vm"),
        )?,
        e2e: build_e2e(arch.musl_target())?,
        busybox: busybox::busybox(host, apt, arch, cache)?,
    })
}

/// Lowers the calling thread to the lowest CPU priority (nice 19), and
/// with it every process it starts from now on: the builds that run beside
/// the VMs take only what the guests leave idle. Linux keeps the nice
/// value per thread, so the boot jobs' threads and their qemus keep theirs.
fn yield_to_vms() {
    unsafe extern "C" {
        fn setpriority(which: i32, who: u32, prio: i32) -> i32;
    }
    const PRIO_PROCESS: i32 = 0;
    // SAFETY: `who` 0 names the calling thread; no memory is passed.
    if unsafe { setpriority(PRIO_PROCESS, 0, 19) } != 0 {
        step(&format!(
            "could not lower the builds' CPU priority ({}); they share the CPU with the VMs evenly",
            std::io::Error::last_os_error()
        ));
    }
}

/// qemu's `-smp`: two CPUs. SeaBIOS's MP table lists one CPU per socket,
/// and an x86 kernel without ACPI (the OpenWrt-configured one) finds its
/// CPUs there, so that one gets two sockets; everything else keeps qemu's
/// default topology.
fn smp(arch: Arch, origin: &kernel::Origin) -> &'static str {
    match (arch, origin) {
        (Arch::X86_64, kernel::Origin::OpenWrt { .. }) => "2,sockets=2,cores=1,threads=1",
        // A 24Kc has one core and no MT: one CPU, as the routers have.
        (Arch::Mipsel | Arch::Mips, _) => "1",
        _ => "2",
    }
}

/// Guest memory: what was asked, within what the board can give. A
/// 32-bit malta kernel without HIGHMEM (OpenWrt's has none) sees at most
/// 256 MiB, the most such a router has too.
fn memory_mib(arch: Arch, asked: u32) -> u32 {
    match arch {
        Arch::Mipsel | Arch::Mips => asked.min(256),
        _ => asked,
    }
}

/// The guest's kernel command line. The suite's parameters ride along as
/// dotted `ctrace.*` words: the kernel keeps them in /proc/cmdline for
/// /init and does not pass dotted words on as init's arguments, and the
/// initramfs stays independent of them (one image serves every setting).
fn cmdline(arch: Arch, strategies: &[String], filter: Option<&str>, args: &VmArgs) -> String {
    let console = match arch {
        Arch::X86_64 | Arch::Mipsel | Arch::Mips => "ttyS0",
        Arch::Aarch64 | Arch::Armv7 => "ttyAMA0",
    };
    // panic=-1 reboots at once on a panic, and -no-reboot turns that into
    // qemu exiting: a crashed guest costs seconds, not the whole timeout.
    let mut s = format!(
        "console={console} panic=-1 quiet ctrace.strategies={} ctrace.run_timeout={} ctrace.flood={}",
        strategies.join(","),
        args.run_timeout,
        args.flood
    );
    if let Some(n) = args.ct_max {
        s.push_str(&format!(" ctrace.ct_max={n}"));
    }
    if let Some(l) = &args.ctrace_log {
        s.push_str(&format!(" ctrace.log={l}"));
    }
    if let Some(f) = filter {
        s.push_str(&format!(" ctrace.filter={f}"));
    }
    if args.show_output {
        s.push_str(" ctrace.show_output=1");
    }
    s
}

/// Builds the e2e test executable for `target` and returns its path,
/// taken from cargo's own report (the file name carries a hash).
fn build_e2e(target: &str) -> anyhow::Result<PathBuf> {
    let tools = setup()?;
    step(&format!("building the e2e test executable for {target}"));
    let started = Instant::now();
    // Set up as ctrace's own build for this target (standard library,
    // C runtime, Zig), AYA_BUILD_SKIP unset too, although the test
    // executable never loads the eBPF object it then embeds (it runs
    // CTRACE_BIN): ctrace's build script reruns whenever AYA_BUILD_SKIP
    // flips, and both ctrace builds for this target would then be redone
    // on every run (~1 min per architecture).
    let mut cmd = crate::target_cargo(&tools, "test", Some(target))?;
    cmd.args([
        "--package",
        "ctrace-tests",
        "--test",
        "e2e",
        "--no-run",
        "--release",
    ])
    // JSON on stdout for us, human diagnostics on stderr for people.
    .arg("--message-format=json-render-diagnostics")
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed with {}", out.status);
    }
    let exe = test_executable(&String::from_utf8_lossy(&out.stdout), "e2e")
        .context("cargo reported no e2e test executable")?;
    step(&format!(
        "built {} in {:.0}s",
        exe.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(exe)
}

/// The executable of test target `name` in cargo's JSON messages: the
/// `compiler-artifact` whose profile says `test: true`.
fn test_executable(json_lines: &str, name: &str) -> Option<PathBuf> {
    json_lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| {
            m["reason"] == "compiler-artifact"
                && m["profile"]["test"] == true
                && m["target"]["name"] == name
        })
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

/// Writes `bytes` to `path` through a temporary file, so that an
/// interrupted run never leaves a truncated file that looks cached.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("partial");
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_test_executable_in_cargo_json() {
        let json = r#"{"reason":"compiler-artifact","target":{"name":"ctrace","kind":["lib"]},"profile":{"test":false},"executable":null}
{"reason":"compiler-artifact","target":{"name":"e2e","kind":["test"]},"profile":{"test":true},"executable":"/t/e2e-0123"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            test_executable(json, "e2e"),
            Some(PathBuf::from("/t/e2e-0123"))
        );
        assert_eq!(test_executable(json, "other"), None);
    }

    #[test]
    fn cmdline_carries_the_suite_parameters() {
        let args = VmArgs {
            kernels: vec![],
            arches: vec![],
            strategies: String::new(),
            openwrt_strategies: String::new(),
            passes: vec![],
            vm_timeout: 1,
            run_timeout: 300,
            ct_max: Some(4096),
            ctrace_log: Some("debug".into()),
            memory: 2048,
            jobs: 1,
            flood: 1000,
            show_output: false,
            list: false,
        };
        let s = cmdline(
            Arch::Aarch64,
            &["auto".into(), "kprobe".into()],
            Some("ipv6"),
            &args,
        );
        assert_eq!(
            s,
            "console=ttyAMA0 panic=-1 quiet ctrace.strategies=auto,kprobe ctrace.run_timeout=300 \
             ctrace.flood=1000 ctrace.ct_max=4096 ctrace.log=debug ctrace.filter=ipv6"
        );
    }
}
