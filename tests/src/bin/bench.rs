//! `cargo xtask bench`: what ctrace costs, as ratios against a baseline
//! measured in the same run (absolute times on shared machines are noise).
//!
//! 1. Hot path: TCP connections per second through the lab router without
//!    ctrace and with it, alternating, per usable strategy, with an empty
//!    router table and with 200,000 entries in it.
//! 2. Drop storm: distinct SYNs into a full table; the kernel's `drop`
//!    delta against ctrace's table-full packets, ctrace's CPU and RSS.
//! 3. Snapshot: a 262,144-entry table read by ctrace's ctnetlink dump and
//!    procfs parser, and by `conntrack -L` (the peer), each in a process of
//!    its own for its peak RSS.
//! 4. Footprint: RSS idle (empty table, full table), BPF map memory, time
//!    from start to attached, router binary sizes.
//!
//! Writes target/bench/results.json and prints a table. `bench --overhead
//! [FILTER]` measures only the rates (FILTER as in `200k/tc`, or several,
//! comma-separated; `tc$` is the rows whose names end so);
//! CTRACE_BENCH_ROUNDS sets their rounds, CTRACE_BENCH_ECHO=1 echoes
//! ctrace's stderr (with RUST_LOG, its logs). Ctrl-C, SIGTERM or SIGHUP
//! stop it with the sysctls it changed put back and its ctrace stopped.
use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ctrace::{
    conntrack::procfs::ProcConntrack,
    lab::{SysctlGuard, topology, topology::Topology, traffic},
    netlink::ctnetlink::CtSocket,
    netns::NetNs,
};
use serde_json::{Value, json};

const MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
const BENCH_PORT: u16 = 7001;
const WORKERS: usize = 4;
const FACTS_ENV: &str = ctrace::kernel::found::DIR_ENV;
/// An interface name no lab namespace has: `--iface` with it hooks none of
/// the router's devices.
const UNHOOKED_IFACE: &str = "ctrace-none0";
/// Distinct SYNs of the storm: the figure issue 17's CPU target is set for.
const STORM_SYNS: u64 = 600_000;
/// Connects that failed (timed out or refused) during rate measurements:
/// a rate is only a rate of the connections that went through.
// usize: the tests crate also builds for 32-bit targets without 64-bit
// atomics (the VMs run its e2e suite there).
static FAILED: AtomicUsize = AtomicUsize::new(0);

fn ctrace_bin() -> PathBuf {
    ctrace_tests::ctrace_bin()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The bench's own directory for what its ctrace runs keep (a recording,
/// kernel facts): made by mkdtemp, so its name is fresh and its mode 0700,
/// and removed when the bench ends. Fixed names under /tmp were guessable.
static SCRATCH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn scratch() -> anyhow::Result<&'static Path> {
    if let Some(d) = SCRATCH.get() {
        return Ok(d);
    }
    use std::os::unix::ffi::OsStringExt as _;
    let mut template = std::env::temp_dir()
        .join("ctrace-bench-XXXXXX")
        .into_os_string()
        .into_vec();
    template.push(0);
    // SAFETY: a NUL-terminated buffer, which mkdtemp rewrites in place.
    if unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) }.is_null() {
        return Err(std::io::Error::last_os_error()).context("making the bench's directory");
    }
    template.pop();
    Ok(SCRATCH.get_or_init(|| PathBuf::from(std::ffi::OsString::from_vec(template))))
}

/// Removes the bench's directory, if it made one.
fn remove_scratch() {
    if let Some(d) = SCRATCH.get() {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Removes the bench's directory when `main` returns, whichever way.
struct ScratchRemoved;

impl Drop for ScratchRemoved {
    fn drop(&mut self) {
        remove_scratch();
    }
}

/// The signals [`restore_sysctls_on_signal`] takes.
fn ending_signals() -> libc::sigset_t {
    // SAFETY: a signal set on the stack, filled by the libc calls that own
    // its layout.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Ctrl-C, SIGTERM and SIGHUP end the bench only after the sysctls it
/// changed (`nf_conntrack_max`, `kernel.bpf_stats_enabled`) are put back:
/// a killed run left the machine's limit at 1,048,576. Blocked before any
/// thread is made (threads inherit the mask) and taken by one thread.
fn restore_sysctls_on_signal() -> anyhow::Result<()> {
    let set = ending_signals();
    // SAFETY: the set built above.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    std::thread::Builder::new()
        .name("bench-signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: the set built above, blocked in every thread.
            unsafe { libc::sigwait(&set, &mut sig) };
            // Held until the exit: no stage sets a sysctl after this.
            let _restored = ctrace::lab::restore_all();
            remove_scratch();
            eprintln!("bench: signal {sig}: sysctls put back, stopping");
            std::process::exit(128 + sig);
        })?;
    Ok(())
}

/// A command whose process starts with the signals the bench blocks
/// unblocked again (a mask is inherited across exec: ctrace would never
/// see the SIGINT that stops it).
fn child(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    // SAFETY: sigprocmask is async-signal-safe; the set is built before
    // the fork.
    unsafe {
        let set = ending_signals();
        cmd.pre_exec(move || {
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    cmd
}

/// A ctrace process watching one namespace; SIGINT on drop.
struct Running {
    child: Child,
    attached_after: Duration,
    stdout: std::sync::mpsc::Receiver<String>,
}

impl Running {
    fn start(strategy: Option<&str>, netns: u64, extra: &[&str]) -> anyhow::Result<Running> {
        Self::start_env(strategy, netns, extra, &[])
    }

    fn start_env(
        strategy: Option<&str>,
        netns: u64,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> anyhow::Result<Running> {
        let mut cmd = child(ctrace_bin());
        // SAFETY: prctl and getppid are async-signal-safe. SIGINT, ctrace's
        // clean stop, if the bench dies first (this runs on the main
        // thread, whose end is the process's); a bench already gone before
        // the prctl fails the spawn instead (an errno: nothing may
        // allocate after the fork).
        let bench = std::process::id() as libc::pid_t;
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != bench {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        cmd.envs(env.iter().copied());
        cmd.args(["watch", "--json", "--netns", &netns.to_string()])
            .args(extra);
        if let Some(s) = strategy {
            cmd.args(["--strategy", s]);
        }
        let started = Instant::now();
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let err = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let echo = std::env::var_os("CTRACE_BENCH_ECHO").is_some();
            for l in err.lines().map_while(Result::ok) {
                if echo {
                    eprintln!("  | {l}");
                }
                let _ = tx.send(l);
            }
        });
        let out = BufReader::new(child.stdout.take().unwrap());
        let (otx, stdout) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                let _ = otx.send(l);
            }
        });
        loop {
            let l = rx
                .recv_timeout(Duration::from_secs(60))
                .context("ctrace did not start")?;
            if l.contains("(Ctrl-C to stop)") {
                break;
            }
        }
        Ok(Running {
            attached_after: started.elapsed(),
            child,
            stdout,
        })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the first summary: ctrace has read every table once (the
    /// start-up occupancy dump, a second of CPU for a full table), so what
    /// is measured next is tracing, not starting. Returns the summary.
    fn first_summary(&self) -> anyhow::Result<Value> {
        loop {
            let l = self
                .stdout
                .recv_timeout(Duration::from_secs(60))
                .context("ctrace wrote no summary")?;
            let v: Value = serde_json::from_str(&l)?;
            if v["type"] == "summary" {
                return Ok(v);
            }
        }
    }

    /// Stops it; the final summary.
    fn stop(mut self) -> anyhow::Result<Value> {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid(), libc::SIGINT) };
        self.child.wait()?;
        let mut last = Value::Null;
        for l in self.stdout.try_iter() {
            let v: Value = serde_json::from_str(&l)?;
            if v["type"] == "summary" {
                last = v;
            }
        }
        Ok(last)
    }
}

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime) are 12 and 13 after the name.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// `f`'s result and the seconds it took.
fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
    let t0 = Instant::now();
    let r = f()?;
    Ok((r, t0.elapsed().as_secs_f64()))
}

/// CPU seconds the whole machine spent busy so far: /proc/stat's user,
/// nice, system, irq and softirq, without idle, iowait and steal (time a
/// noisy neighbour took).
fn busy_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (at(0) + at(1) + at(2) + at(5) + at(6)) / hz
}

/// A measured connection rate.
#[derive(Clone, Copy)]
struct Rate {
    /// Connections per second of wall time.
    per_s: f64,
    /// Connections per busy CPU second of the whole machine: what they
    /// cost, ctrace's share included, and less moved than the wall-time
    /// rate by a neighbour taking the CPUs.
    per_cpu_s: f64,
}

/// Connections per second from the clients to a server through the
/// router, over `secs`.
fn connection_rate(topo: &Topology, secs: f64) -> anyhow::Result<Rate> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = vec![];
    for w in 0..WORKERS {
        let (stop, done) = (stop.clone(), done.clone());
        let src = topology::CLIENTS_V4[w % topology::CLIENTS_V4.len()];
        workers.push(topo.clients.spawn("bench-client", move || {
            let to = SocketAddr::from((topology::SERVER_V4, BENCH_PORT));
            while !stop.load(Ordering::Relaxed) {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None);
                let Ok(s) = s else { continue };
                let _ = s.bind(&SocketAddr::from((src, 0)).into());
                // RST on close: no TIME_WAIT to exhaust the ports.
                let _ = s.set_linger(Some(Duration::ZERO));
                if s.connect_timeout(&to.into(), Duration::from_secs(1))
                    .is_ok()
                {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        })?);
    }
    let (t0, cpu0, n0) = (
        Instant::now(),
        busy_cpu_secs(),
        done.load(Ordering::Relaxed),
    );
    std::thread::sleep(Duration::from_secs_f64(secs));
    let n = done.load(Ordering::Relaxed) - n0;
    let dt = t0.elapsed().as_secs_f64();
    let cpu = busy_cpu_secs() - cpu0;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    Ok(Rate {
        per_s: n as f64 / dt,
        per_cpu_s: n as f64 / cpu.max(1e-3),
    })
}

/// Accepts and closes at once, on as many threads as there are clients,
/// with a backlog deep enough that the server is never what drops a SYN.
fn server(ns: &NetNs) -> anyhow::Result<()> {
    let l: TcpListener = ns.run(|| -> std::io::Result<TcpListener> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, BENCH_PORT)).into())?;
        s.listen(4096)?;
        Ok(s.into())
    })??;
    for _ in 0..WORKERS {
        let l = l.try_clone()?;
        std::thread::spawn(move || while l.accept().is_ok() {});
    }
    Ok(())
}

/// Fills the router's table with `n` synthetic ASSURED entries.
fn fill(topo: &Topology, n: u64) -> anyhow::Result<()> {
    traffic::fill_table(
        &topo.router,
        n,
        std::net::IpAddr::V4(topology::SERVER_V4),
        |_| {},
    )?;
    Ok(())
}

fn probe() -> anyhow::Result<Value> {
    let out = child(ctrace_bin()).args(["probe", "--json"]).output()?;
    serde_json::from_slice(&out.stdout).context("ctrace probe --json")
}

fn usable_strategies() -> anyhow::Result<Vec<String>> {
    Ok(probe()?["strategies"]
        .as_array()
        .context("probe: no strategies")?
        .iter()
        .filter(|s| s["usable"] == true)
        .filter_map(|s| s["strategy"].as_str().map(str::to_string))
        .collect())
}

fn node_view_usable() -> anyhow::Result<bool> {
    Ok(probe()?["node_view"]["usable"] == true)
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// First and third quartiles of sorted `v`.
fn quartiles(v: &[f64]) -> (f64, f64) {
    let at = |q: f64| {
        if v.is_empty() {
            return f64::NAN;
        }
        let i = q * (v.len() - 1) as f64;
        let (lo, hi) = (i.floor() as usize, i.ceil() as usize);
        v[lo] + (v[hi] - v[lo]) * (i - lo as f64)
    };
    (at(0.25), at(0.75))
}

/// Each of ctrace's loaded programs (summed over its instances): the
/// kernel's own run count and run time, while `kernel.bpf_stats_enabled`
/// is on. Noise on a shared machine moves rates; it barely moves these.
fn program_costs() -> serde_json::Map<String, Value> {
    let mut by_name: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for p in aya::programs::loaded_programs().filter_map(Result::ok) {
        let Some(name) = p.name_as_str().filter(|n| n.starts_with("ctrace_")) else {
            continue;
        };
        let e = by_name.entry(name.to_string()).or_default();
        e.0 += p.run_count();
        e.1 += u64::try_from(p.run_time().as_nanos()).unwrap_or(u64::MAX);
    }
    by_name
        .into_iter()
        .filter(|(_, (runs, _))| *runs > 0)
        .map(|(n, (runs, ns))| {
            (
                n,
                json!({"runs": runs, "run_time_ns": ns, "ns_per_run": ns as f64 / runs as f64}),
            )
        })
        .collect()
}

/// What runs beside the measured connections.
#[derive(Clone, Copy)]
enum Traced<'a> {
    /// Nothing: the control row, the harness's own bias.
    No,
    /// ctrace, with this `--strategy` (None: its default).
    By(Option<&'a str>),
}

/// `only`: run just the variants whose `COND/VARIANT` name contains one of
/// its comma-separated items, or ends with an item written `ITEM$`
/// (`bench --overhead FILTER`, for working on one tier's cost).
fn overhead(
    rounds: usize,
    secs: f64,
    strategies: &[String],
    only: Option<&str>,
) -> anyhow::Result<Value> {
    let mut out = serde_json::Map::new();
    let settle = Duration::from_millis(
        std::env::var("CTRACE_BENCH_SETTLE_MS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
    );
    for (cond, entries) in [("empty", 0u64), ("200k", 200_000)] {
        let topo = Topology::build()?;
        server(&topo.servers)?;
        if entries > 0 {
            fill(&topo, entries)?;
        }
        let router = topo.router.inode();
        // Each drop tier alone (the router view), then the node view alone:
        // it traces every TCP socket's handshake, the clients' and the
        // server's in this bench, so its cost is its own row.
        // First the control: the baseline against itself, no ctrace. Its
        // ratio is the harness's own bias, which every row below shares.
        let mut variants: Vec<(String, Traced, &[&str])> =
            vec![("control".into(), Traced::No, &[][..])];
        variants.extend(strategies.iter().map(|s| {
            (
                s.clone(),
                Traced::By(Some(s.as_str())),
                &["--side", "router"][..],
            )
        }));
        // Each tier with ctnetlink's announcements and without: what the
        // kernel's message per entry made and ended costs. On tracepoint
        // and tc one of the two is the tier's default (on unless it counts
        // its own passed flows), so that configuration is measured twice
        // and the gap between the two is the bench's own spread; a tier
        // with insert events never subscribes, and both rows are its
        // default.
        const ANNOUNCEMENT_VARIANTS: [(&str, &[&str]); 2] = [
            (
                "ctnetlink_events",
                &["--side", "router", "--ctnetlink-events"],
            ),
            (
                "no_ctnetlink_events",
                &["--side", "router", "--no-ctnetlink-events"],
            ),
        ];
        for s in strategies {
            for (name, args) in ANNOUNCEMENT_VARIANTS {
                variants.push((format!("{s}_{name}"), Traced::By(Some(s.as_str())), args));
            }
        }
        // The tc tier's process without its classifiers on the router's
        // devices (`--iface` names none there; only its tick device keeps
        // TCX on machine-wide): what the tc row costs beyond it is the
        // packet path's. 200,000 entries, 21 rounds: 0.994, 0.992 and
        // 0.988 against tc's 0.963, 0.965 and 0.960 in the same hour.
        if strategies.iter().any(|s| s == "tc") {
            variants.push((
                "tc_unhooked".into(),
                Traced::By(Some("tc")),
                &["--side", "router", "--iface", UNHOOKED_IFACE][..],
            ));
        }
        if node_view_usable()? {
            variants.push((
                "node_view".into(),
                Traced::By(None),
                &["--side", "node"][..],
            ));
        }
        for (s, strategy, side) in &variants {
            let name = format!("{cond}/{s}");
            // `…NAME$`: the rows whose names end so.
            let picked = |f: &str| match f.strip_suffix('$') {
                Some(end) => name.ends_with(end),
                None => name.contains(f),
            };
            if only.is_some_and(|f| !f.split(',').filter(|f| !f.is_empty()).any(picked)) {
                continue;
            }
            // Every measurement starts from the same table: the measured
            // connections' own entries go (RST-closed entries linger 10 s,
            // and a second measurement would otherwise run against the
            // first one's), the fill stays.
            let reset = || -> anyhow::Result<()> {
                CtSocket::open(Some(&topo.router))?.flush()?;
                if entries > 0 {
                    fill(&topo, entries)?;
                }
                Ok(())
            };
            // --occupancy-every 2s: re-dumps as often as ctrace lets
            // them, which is 100 times as long as the last dump took (about
            // 43 s for 200,000 entries). A round of 1.5 s after the
            // start-up dump sees none; `--paths` runs one ctrace for
            // minutes, and its CPU share carries the re-dumps' cost.
            let mut extra = vec!["--occupancy-every", "2s"];
            extra.extend_from_slice(side);
            let (mut ratios, mut base, mut cpu) = (vec![], vec![], vec![]);
            let mut per_cpu = vec![];
            // A baseline on each side of every measurement with ctrace: its
            // ratio is against their mean, so a machine that speeds up or
            // slows down across a round (shared hosts drift by a few
            // percent over seconds) does not read as ctrace's cost. Each
            // baseline after a round is the one before the next.
            let mut before = connection_rate(&topo, secs)?;
            reset()?;
            for _ in 0..rounds {
                let b = match strategy {
                    Traced::No => connection_rate(&topo, secs)?,
                    Traced::By(strategy) => {
                        let t = Running::start(*strategy, router, &extra)?;
                        // Tracing, not starting: the start-up dump is done.
                        t.first_summary()?;
                        // CTRACE_BENCH_SETTLE_MS: wait longer, for telling
                        // a start-up's aftermath from the steady cost.
                        std::thread::sleep(settle);
                        let cpu0 = cpu_secs(t.pid());
                        let (b, dt) = timed(|| connection_rate(&topo, secs))?;
                        // ctrace's own share of the machine while measured.
                        cpu.push((cpu_secs(t.pid()) - cpu0, dt));
                        let last = t.stop()?;
                        if std::env::var_os("CTRACE_BENCH_ECHO").is_some() {
                            eprintln!("  | final summary: {last}");
                        }
                        b
                    }
                };
                reset()?;
                let after = connection_rate(&topo, secs)?;
                reset()?;
                let a = Rate {
                    per_s: (before.per_s + after.per_s) / 2.0,
                    per_cpu_s: (before.per_cpu_s + after.per_cpu_s) / 2.0,
                };
                before = after;
                base.push(a.per_s);
                ratios.push(b.per_s / a.per_s);
                per_cpu.push(b.per_cpu_s / a.per_cpu_s);
            }
            let (lo, hi) = ratios
                .iter()
                .fold((f64::MAX, f64::MIN), |(l, h), r| (l.min(*r), h.max(*r)));
            let m = median(&mut ratios);
            let (q1, q3) = quartiles(&ratios);
            let failed = FAILED.swap(0, Ordering::Relaxed);
            // Summed over the rounds, not a median of rounds: /proc counts
            // CPU time in clock ticks (10 ms), 0.7% of a 1.5 s round.
            let cpu = cpu.iter().map(|c| c.0).sum::<f64>() / cpu.iter().map(|c| c.1).sum::<f64>();
            let per_cpu_m = median(&mut per_cpu);
            let (pc1, pc3) = quartiles(&per_cpu);
            // One more round with the kernel's own accounting on: its two
            // clock reads per program run would bias the ratios above.
            let programs = match strategy {
                Traced::No => Default::default(),
                Traced::By(strategy) => {
                    let t = Running::start(*strategy, router, &extra)?;
                    t.first_summary()?;
                    let programs = {
                        let _stats = SysctlGuard::set(BPF_STATS, "1")?;
                        connection_rate(&topo, secs)?;
                        program_costs()
                    };
                    t.stop()?;
                    reset()?;
                    programs
                }
            };
            FAILED.swap(0, Ordering::Relaxed);
            eprintln!(
                "bench: overhead {cond} {s}: ratio {m:.3} (quartiles {q1:.3}..{q3:.3}, range \
                 {lo:.3}..{hi:.3}, {rounds} rounds); per CPU second {per_cpu_m:.3} (quartiles \
                 {pc1:.3}..{pc3:.3}); ctrace CPU {:.1}% of a core, {failed} failed connects; \
                 per run: {}",
                cpu * 100.0,
                programs
                    .iter()
                    .map(|(n, v)| format!("{n} {:.0} ns", v["ns_per_run"].as_f64().unwrap_or(0.0)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            out.insert(
                format!("{cond}/{s}"),
                json!({
                    "overhead_ratio": m,
                    "q1": q1,
                    "q3": q3,
                    "min": lo,
                    "max": hi,
                    "ratios": ratios,
                    "baseline_conn_per_s": median(&mut base),
                    "rounds": rounds,
                    "ctrace_cpu_share": cpu,
                    "per_cpu_ratio": per_cpu_m,
                    "per_cpu_q1": pc1,
                    "per_cpu_q3": pc3,
                    "per_cpu_ratios": per_cpu,
                    "failed_connects": failed,
                    "programs": programs,
                }),
            );
        }
    }
    Ok(Value::Object(out))
}

/// The tc tier's cost in the packet's path, without its process's: two
/// identical labs, one router watched by one ctrace (`--strategy tc
/// --netns`, hooking that router's devices only) and one not, measured in
/// alternation (1 s each, the order swapped every round) while it runs,
/// and again without it for the labs' own difference. ctrace's CPU falls
/// on both labs alike, so it is left out of the ratio and printed beside
/// it. Rounds are a second each, not a restart of ctrace, so there can
/// be many: the spread of a 9-round overhead row hides a 3% cost, this
/// one does not.
/// Rounds of `paths`: a second each, so many fit.
const PATHS_ROUNDS: usize = 30;

fn paths(rounds: usize, entries: u64, extra: &[&str]) -> anyhow::Result<Value> {
    // Each router holds `entries` of its own: the limit is machine-wide,
    // the count per namespace.
    let _max = (entries > 0)
        .then(|| SysctlGuard::set(MAX, "1048576"))
        .transpose()?;
    let watched = Topology::build()?;
    server(&watched.servers)?;
    let twin = Topology::build()?;
    server(&twin.servers)?;
    // Every round starts from the same tables: the measured connections'
    // own entries go, the fill stays.
    let reset = || -> anyhow::Result<()> {
        for t in [&watched, &twin] {
            CtSocket::open(Some(&t.router))?.flush()?;
            if entries > 0 {
                fill(t, entries)?;
            }
        }
        Ok(())
    };
    reset()?;
    // `pid`: a ctrace whose CPU to add up over the measured seconds
    // only, not over the resets between them (refilling a router's table
    // is kernel work in this process, and ctrace is idle through it).
    let alternate = |label: &str, pid: Option<i32>| -> anyhow::Result<(Value, f64)> {
        let mut r = vec![];
        let (mut cpu, mut secs) = (0.0, 0.0);
        for i in 0..rounds {
            let cpu0 = pid.map_or(0.0, cpu_secs);
            let t0 = Instant::now();
            let (w, u) = if i % 2 == 0 {
                let u = connection_rate(&twin, 1.0)?.per_s;
                (connection_rate(&watched, 1.0)?.per_s, u)
            } else {
                let w = connection_rate(&watched, 1.0)?.per_s;
                (w, connection_rate(&twin, 1.0)?.per_s)
            };
            secs += t0.elapsed().as_secs_f64();
            cpu += pid.map_or(0.0, cpu_secs) - cpu0;
            reset()?;
            r.push(w / u);
        }
        let m = median(&mut r);
        let (q1, q3) = quartiles(&r);
        eprintln!(
            "bench: paths, {entries} entries, {label}: watched/unwatched {m:.3} (quartiles \
             {q1:.3}..{q3:.3})"
        );
        Ok((
            json!({"ratio": m, "q1": q1, "q3": q3, "ratios": r}),
            cpu / secs.max(f64::EPSILON),
        ))
    };
    let (before, _) = alternate("without ctrace", None)?;
    // The router view alone, as in the overhead rows: the node view's
    // programs would fire on both labs' handshakes and count in ctrace's
    // CPU here.
    let mut args = vec!["--side", "router"];
    args.extend_from_slice(extra);
    let t = Running::start(Some("tc"), watched.router.inode(), &args)?;
    t.first_summary()?;
    let cpu0 = cpu_secs(t.pid());
    let ((with, cpu_measured), dt) = timed(|| alternate("with ctrace", Some(t.pid())))?;
    // Over the whole run too: periodic work (a re-dump every 43 s of a
    // 200,000-entry table) falls in a measured second or a reset by
    // chance, and over minutes the whole run's share is what it costs.
    // The larger of the two is charged.
    let cpu_overall = (cpu_secs(t.pid()) - cpu0) / dt;
    let cpu = cpu_measured.max(cpu_overall);
    t.stop()?;
    let (after, _) = alternate("without ctrace, after", None)?;
    let base = (before["ratio"].as_f64().unwrap_or(f64::NAN)
        + after["ratio"].as_f64().unwrap_or(f64::NAN))
        / 2.0;
    let ratio = with["ratio"].as_f64().unwrap_or(f64::NAN) / base;
    // The machine is saturated while it measures (busy CPU = every CPU),
    // so what ctrace's process takes is capacity the labs lose.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let charged = ratio * (1.0 - cpu / cpus);
    eprintln!(
        "bench: paths, {entries} entries: the tc tier's packet path {ratio:.3} of the rate; \
         ctrace's process {:.1}% of a core while measured, {:.1}% over the run \
         ({charged:.3} with the larger charged to {cpus} CPUs)",
        cpu_measured * 100.0,
        cpu_overall * 100.0
    );
    Ok(json!({
        "rounds": rounds,
        "entries": entries,
        "path_ratio": ratio,
        "q1": with["q1"].as_f64().unwrap_or(f64::NAN) / base,
        "q3": with["q3"].as_f64().unwrap_or(f64::NAN) / base,
        "with_process_charged": charged,
        "ctrace_cpu_share": cpu,
        "ctrace_cpu_share_measured": cpu_measured,
        "ctrace_cpu_share_overall": cpu_overall,
        "without": [before, after],
        "with": with,
    }))
}

fn storm(count: u64) -> anyhow::Result<Value> {
    let _max = SysctlGuard::set(MAX, "262144")?;
    let topo = Topology::build()?;
    fill(&topo, 262_144 + 16)?;
    let router = topo.router.inode();
    // As a router runs it: serving metrics and recording besides.
    // A directory of its own (ctrace makes it 0700), in the bench's.
    let rec_dir = scratch()?.join("storm");
    let rec = rec_dir.join("recording.ndjson");
    let rec_arg = rec.display().to_string();
    let t = Running::start(
        None,
        router,
        &[
            "--interval",
            "500ms",
            "--metrics",
            "0",
            "--record",
            &rec_arg,
        ],
    )?;
    t.first_summary()?;
    std::thread::sleep(Duration::from_millis(500));
    let before = CtSocket::open(Some(&topo.router))?.stats()?.drop;
    let cpu0 = cpu_secs(t.pid());
    let t0 = Instant::now();
    let flood = traffic::syn_flood(
        &topo.clients,
        topology::CLIENTS_V4[0],
        topology::SERVER_V4,
        count,
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs(t.pid()) - cpu0;
    let hwm = ctrace_tests::status_kib(t.pid(), "VmHWM").unwrap_or(0);
    let kernel = CtSocket::open(Some(&topo.router))?.stats()?.drop - before;
    let last = t.stop()?;
    let recorded = std::fs::metadata(&rec).map(|m| m.len()).unwrap_or(0);
    let _ = std::fs::remove_dir_all(&rec_dir);
    let ctrace: u64 = last["drops"]
        .as_array()
        .map(|g| {
            g.iter()
                .filter(|g| g["cause"] == "table_full" && g["netns"] == router)
                .filter_map(|g| g["packets"].as_u64())
                .sum()
        })
        .unwrap_or(0);
    let rate = flood.sent as f64 / flood.elapsed.as_secs_f64();
    eprintln!("bench: storm {rate:.0} SYN/s, kernel {kernel}, ctrace {ctrace}");
    Ok(json!({
        "syns": flood.sent,
        "storm_syn_per_s": rate,
        "kernel_drop_delta": kernel,
        "ctrace_table_full_packets": ctrace,
        "ratio": ctrace as f64 / kernel.max(1) as f64,
        "lost_events": last["lost_events"],
        "ctrace_cpu_share": cpu / wall,
        "ctrace_peak_rss_kib": hwm,
        "strategy": last["strategy"],
        "recording_bytes": recorded,
    }))
}

/// One reading of the table in a process of its own: (seconds, peak RSS
/// KiB, entries).
fn snapshot_child(how: &str, ns: &NetNs) -> anyhow::Result<(f64, u64, u64)> {
    let ns_path = format!("/proc/{}/fd/{}", std::process::id(), ns.fd().as_raw_fd());
    let mut cmd = match how {
        "conntrack" => {
            let mut c = child("nsenter");
            c.arg(format!("--net={ns_path}")).args([
                "sh",
                "-c",
                // The count, then conntrack's own peak RSS from GNU time
                // (forked by time, which is small: its ru_maxrss is its own).
                "t=$(mktemp); n=$(/usr/bin/time -f %M -o $t conntrack -L 2>/dev/null | wc -l); \
                 echo $n $(tail -1 $t); rm -f $t",
            ]);
            c
        }
        _ => {
            let mut c = child(std::env::current_exe()?);
            c.args(["--snapshot", how, &ns_path]);
            c
        }
    };
    let t0 = Instant::now();
    let child = cmd.stdout(Stdio::piped()).spawn()?;
    let pid = child.id() as i32;
    let mut out = String::new();
    child.stdout.unwrap().read_to_string(&mut out)?;
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let secs = t0.elapsed().as_secs_f64();
    let mut words = out
        .split_whitespace()
        .map(|w| w.parse::<u64>().unwrap_or(0));
    let (n, rss) = (words.next().unwrap_or(0), words.next().unwrap_or(0));
    Ok((secs, rss, n))
}

fn snapshot() -> anyhow::Result<Value> {
    let _max = SysctlGuard::set(MAX, "262144")?;
    let topo = Topology::build()?;
    fill(&topo, 262_144)?;
    let have_conntrack = child("conntrack").arg("--version").output().is_ok();
    let mut out = serde_json::Map::new();
    let mut ways = vec!["ctnetlink", "procfs"];
    if have_conntrack {
        ways.push("conntrack");
    }
    for how in ways {
        let (mut t, mut r) = (vec![], vec![]);
        let mut n = 0;
        for _ in 0..3 {
            let (secs, rss, entries) = snapshot_child(how, &topo.router)?;
            t.push(secs);
            r.push(rss as f64);
            n = entries;
        }
        eprintln!(
            "bench: snapshot {how}: {:.3}s, {} entries",
            median(&mut t.clone()),
            n
        );
        out.insert(
            how.into(),
            json!({"secs": median(&mut t), "peak_rss_kib": median(&mut r), "entries": n}),
        );
    }
    if have_conntrack {
        for how in ["ctnetlink", "procfs"] {
            let ratio_t =
                out[how]["secs"].as_f64().unwrap() / out["conntrack"]["secs"].as_f64().unwrap();
            let ratio_m = out[how]["peak_rss_kib"].as_f64().unwrap()
                / out["conntrack"]["peak_rss_kib"].as_f64().unwrap();
            out.insert(
                format!("{how}_vs_conntrack"),
                json!({"time_ratio": ratio_t, "rss_ratio": ratio_m}),
            );
        }
    }
    Ok(Value::Object(out))
}

/// The child side of [`snapshot_child`]: reads the table and prints the
/// entry count.
fn snapshot_main(how: &str, ns_path: &str) -> anyhow::Result<()> {
    let ns = NetNs::open(Path::new(ns_path))?;
    let mut n = 0u64;
    match how {
        "ctnetlink" => {
            CtSocket::open(Some(&ns))?.dump(&mut |_| n += 1)?;
        }
        "procfs" => {
            ProcConntrack::open(Some(&ns))?.dump(&mut |_| n += 1)?;
        }
        other => bail!("unknown snapshot reader {other}"),
    }
    // Its own peak: wait4's ru_maxrss would include the parent's memory
    // copied at fork.
    let hwm = ctrace_tests::status_kib(std::process::id() as i32, "VmHWM").unwrap_or(0);
    println!("{n} {hwm}");
    Ok(())
}

fn footprint() -> anyhow::Result<Value> {
    let _max = SysctlGuard::set(MAX, "262144")?;
    let topo = Topology::build()?;
    let router = topo.router.inode();
    let (mut attach, mut first, mut idle) = (vec![], vec![], vec![]);
    let mut maps = 0;
    // The first start of a boot runs the drop-site experiment; later ones
    // reuse what it found (ctrace::kernel::found).
    let scratch = scratch()?;
    let facts = |tag: &str| scratch.join(format!("facts-{tag}"));
    // Names in the bench's fresh directory: none is there before.
    let kept = facts("kept");
    Running::start_env(None, router, &[], &[(FACTS_ENV, &kept)])?.stop()?;
    for i in 0..3 {
        let fresh = facts(&i.to_string());
        let t = Running::start_env(None, router, &[], &[(FACTS_ENV, &fresh)])?;
        first.push(t.attached_after.as_secs_f64());
        t.stop()?;
        let _ = std::fs::remove_dir_all(&fresh);
        let t = Running::start_env(None, router, &[], &[(FACTS_ENV, &kept)])?;
        attach.push(t.attached_after.as_secs_f64());
        std::thread::sleep(Duration::from_secs(2));
        idle.push(ctrace_tests::status_kib(t.pid(), "VmRSS").unwrap_or(0) as f64);
        maps = ctrace_tests::map_bytes(t.pid());
        t.stop()?;
    }
    fill(&topo, 262_144)?;
    let t = Running::start(None, router, &["--occupancy-every", "1s"])?;
    std::thread::sleep(Duration::from_secs(4));
    let full = ctrace_tests::status_kib(t.pid(), "VmRSS").unwrap_or(0);
    t.stop()?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut sizes = serde_json::Map::new();
    for target in [
        "aarch64-unknown-linux-musl",
        "armv7-unknown-linux-musleabihf",
    ] {
        let p = root.join("target").join(target).join("router/ctrace");
        if let Ok(m) = std::fs::metadata(&p) {
            sizes.insert(target.into(), json!(m.len()));
        }
    }
    let _ = std::fs::remove_dir_all(&kept);
    Ok(json!({
        "time_to_attached_s": median(&mut attach),
        "time_to_attached_first_start_s": median(&mut first),
        "rss_idle_empty_kib": median(&mut idle),
        "rss_idle_262144_entries_kib": full,
        "bpf_map_bytes": maps,
        "router_binary_bytes": sizes,
    }))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    // A child of the snapshot rows: its peak RSS is the measure, and it
    // changes no sysctl, so it gets no signal thread.
    if args.get(1).map(String::as_str) == Some("--snapshot") {
        return snapshot_main(&args[2], &args[3]);
    }
    restore_sysctls_on_signal()?;
    let _scratch = ScratchRemoved;
    if args.get(1).map(String::as_str) == Some("--footprint") {
        println!("{}", serde_json::to_string_pretty(&footprint()?)?);
        return Ok(());
    }
    // The storm alone, for working on its cost: `bench --storm [SYNS]`.
    if args.get(1).map(String::as_str) == Some("--storm") {
        let syns = args.get(2).map_or(Ok(STORM_SYNS), |s| s.parse())?;
        println!("{}", serde_json::to_string_pretty(&storm(syns)?)?);
        return Ok(());
    }
    // A lab router holding N entries, kept until killed, for profiling
    // ctrace by hand against a large table: `bench --hold N`. Prints the
    // router's namespace inode (ctrace --netns takes it).
    if args.get(1).map(String::as_str) == Some("--hold") {
        let n: u64 = args.get(2).context("--hold needs a count")?.parse()?;
        // Kept until a signal, which puts nf_conntrack_max back (see
        // restore_sysctls_on_signal).
        let _max = SysctlGuard::set(MAX, "1048576")?;
        let topo = Topology::build()?;
        let made = traffic::fill_table(
            &topo.router,
            n,
            std::net::IpAddr::V4(topology::SERVER_V4),
            |_| {},
        )?;
        if made.created < n {
            eprintln!(
                "bench: --hold: the table took {} of {n} entries",
                made.created
            );
        }
        println!("{}", topo.router.inode());
        loop {
            std::thread::park();
        }
    }
    // The per-packet path of the tc tier alone, both routers holding
    // ENTRIES of their own: `bench --paths [--entries N] [CTRACE ARGS]`.
    if args.get(1).map(String::as_str) == Some("--paths") {
        let rounds = std::env::var("CTRACE_BENCH_ROUNDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(PATHS_ROUNDS);
        let (entries, extra) = match args.get(2).map(String::as_str) {
            Some("--entries") => (
                args.get(3)
                    .context("--entries needs a count")?
                    .parse()
                    .context("--entries")?,
                &args[4.min(args.len())..],
            ),
            _ => (0, &args[2..]),
        };
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&paths(rounds, entries, &extra)?)?
        );
        return Ok(());
    }
    let out_path = PathBuf::from(
        std::env::var("CTRACE_BENCH_OUT").unwrap_or_else(|_| "target/bench/results.json".into()),
    );
    let rounds: usize = std::env::var("CTRACE_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        // Enough interleaved rounds that the quartiles show the spread and
        // the median holds still.
        .unwrap_or(9);
    let strategies = usable_strategies()?;
    eprintln!("bench: strategies usable here: {strategies:?}");
    let _max = SysctlGuard::set(MAX, "1048576")?;
    // The rates alone, for working on one tier's cost:
    // `bench --overhead [FILTER]`, FILTER as in "200k/tc".
    if args.get(1).map(String::as_str) == Some("--overhead") {
        let r = overhead(rounds, 1.5, &strategies, args.get(2).map(String::as_str))?;
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let started = Instant::now();
    let results = json!({
        "machine": {
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        },
        "overhead": overhead(rounds, 1.5, &strategies, None)?,
        "tc_paths": if strategies.iter().any(|s| s == "tc") {
            json!({
                "empty": paths(PATHS_ROUNDS, 0, &[])?,
                "200k": paths(PATHS_ROUNDS, 200_000, &[])?,
            })
        } else {
            Value::Null
        },
        "storm": storm(STORM_SYNS)?,
        "snapshot": snapshot()?,
        "footprint": footprint()?,
    });
    let mut results = results;
    results["wall_s"] = json!(started.elapsed().as_secs_f64());
    if let Some(d) = out_path.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&out_path, serde_json::to_string_pretty(&results)?)?;
    print_table(&results);
    eprintln!("bench: wrote {}", out_path.display());
    Ok(())
}

fn print_table(r: &Value) {
    println!("| measure | value |\n| --- | --- |");
    if let Some(o) = r["overhead"].as_object() {
        for (k, v) in o {
            let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            let programs: Vec<String> = v["programs"]
                .as_object()
                .map(|p| {
                    p.iter()
                        .map(|(n, c)| {
                            format!("{n} {:.0} ns", c["ns_per_run"].as_f64().unwrap_or(0.0))
                        })
                        .collect()
                })
                .unwrap_or_default();
            // The control and the unhooked process are yardsticks, not
            // ctrace as it runs.
            let goal = if k.ends_with("/control") || k.ends_with("_unhooked") {
                ""
            } else {
                " (goal >= 0.97)"
            };
            println!(
                "| overhead_ratio {k}{goal} | {:.3} (quartiles {:.3}..{:.3}, range {:.3}..{:.3}, {} rounds; baseline {:.0} conn/s); per CPU second {:.3} (quartiles {:.3}..{:.3}); per run: {} |",
                f("overhead_ratio"),
                f("q1"),
                f("q3"),
                f("min"),
                f("max"),
                v["rounds"],
                f("baseline_conn_per_s"),
                f("per_cpu_ratio"),
                f("per_cpu_q1"),
                f("per_cpu_q3"),
                programs.join(", ")
            );
        }
    }
    for (cond, p) in ["empty", "200k"].map(|c| (c, &r["tc_paths"][c])) {
        if p.is_null() {
            continue;
        }
        let f = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| tc packet path {cond}, watched/unwatched twin labs under one ctrace ({} rounds) | {:.3} (quartiles {:.3}..{:.3}); {:.3} with ctrace's {:.1}% of a core charged |",
            p["rounds"],
            f("path_ratio"),
            f("q1"),
            f("q3"),
            f("with_process_charged"),
            f("ctrace_cpu_share") * 100.0
        );
    }
    let s = &r["storm"];
    println!(
        "| storm: {} SYN/s, ctrace/kernel table-full packets (goal 1.000) | {:.3} ({} / {}), lost events {}, ctrace CPU {:.0}%, peak RSS {} KiB |",
        s["storm_syn_per_s"].as_f64().unwrap_or(0.0) as u64,
        s["ratio"].as_f64().unwrap_or(f64::NAN),
        s["ctrace_table_full_packets"],
        s["kernel_drop_delta"],
        s["lost_events"],
        s["ctrace_cpu_share"].as_f64().unwrap_or(0.0) * 100.0,
        s["ctrace_peak_rss_kib"]
    );
    if let Some(o) = r["snapshot"].as_object() {
        for (k, v) in o {
            println!("| snapshot {k} | {v} |");
        }
    }
    if let Some(o) = r["footprint"].as_object() {
        for (k, v) in o {
            println!("| {k} | {v} |");
        }
    }
    println!(
        "| whole run | {:.0} s |",
        r["wall_s"].as_f64().unwrap_or(0.0)
    );
}
