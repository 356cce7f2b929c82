//! Harness for ctrace's end-to-end tests.
//!
//! The tests drive the real `ctrace` binary (built by `cargo xtask build`,
//! found through `CTRACE_BIN`) against the running kernel. Namespaces,
//! traffic and ground truth come from `ctrace::lab`, in Rust, so the same
//! suite can run inside a minimal VM with nothing but busybox and the
//! static binaries.
use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

pub mod openwrt;
pub mod pppoe;

use ctrace::{
    lab::{LAB_SERVICES, topology::Topology, traffic},
    netlink::ctnetlink::CtSocket,
};
use serde_json::Value;

/// True when the test may run; otherwise says why on stderr.
pub fn privileged() -> bool {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: this end-to-end test needs root (namespaces, eBPF, ctnetlink)");
        return false;
    }
    true
}

/// True when ctnetlink works here (stock OpenWrt often lacks
/// nf_conntrack_netlink); otherwise says why the test is skipped. Tests that
/// fill tables or read counters over ctnetlink need it; the tc tier's tests
/// use procfs and real connections instead.
pub fn ctnetlink() -> bool {
    static AVAILABLE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let r = AVAILABLE.get_or_init(|| {
        let ns = ctrace::netlink::rtnetlink::new_netns().map_err(|e| format!("{e:#}"))?;
        ctrace::netlink::ctnetlink::CtSocket::open(Some(&ns))
            .map(drop)
            .map_err(|e| format!("{e:#}"))
    });
    match r {
        Ok(()) => true,
        Err(e) => {
            eprintln!("SKIPPED: needs ctnetlink ({e}); the tc/procfs tests cover this kernel");
            false
        }
    }
}

/// Whether `out`, of a `ctrace lab` run, is a router build saying it left
/// the lab out (exit 3, and why): the lab's tests then have nothing to run.
pub fn lab_left_out(out: &std::process::Output) -> bool {
    let left_out = out.status.code() == Some(3)
        && String::from_utf8_lossy(&out.stderr).contains("this build leaves the lab out");
    if left_out {
        eprintln!(
            "SKIPPED: {} is a router build, without the lab",
            ctrace_bin().display()
        );
    }
    left_out
}

/// The strategy under test: `CTRACE_TEST_STRATEGY` (the VM matrix runs the
/// suite once per strategy), else whatever `auto` picks.
pub fn strategy() -> Option<String> {
    std::env::var("CTRACE_TEST_STRATEGY")
        .ok()
        .filter(|s| !s.is_empty() && s != "auto")
}

pub fn ctrace_bin() -> PathBuf {
    let bin = std::env::var_os("CTRACE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/ctrace")
        });
    assert!(
        bin.exists(),
        "{} does not exist: build it with `cargo xtask build` (or run `cargo xtask test`)",
        bin.display()
    );
    bin
}

/// A copy of the binary that an unprivileged user can execute: the checkout
/// may sit under a directory nobody else can enter (/root is 0700 on
/// Debian). Removed when dropped.
pub struct ReachableBin {
    dir: PathBuf,
    pub path: PathBuf,
}

impl ReachableBin {
    pub fn new() -> ReachableBin {
        use std::os::unix::fs::PermissionsExt as _;
        static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("ctrace-reachable-{}-{serial}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctrace");
        std::fs::copy(ctrace_bin(), &path).unwrap();
        let open = std::fs::Permissions::from_mode(0o755);
        std::fs::set_permissions(&dir, open.clone()).unwrap();
        std::fs::set_permissions(&path, open).unwrap();
        ReachableBin { dir, path }
    }
}

impl Default for ReachableBin {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ReachableBin {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `ctrace watch --json`, its NDJSON collected as it comes.
pub struct Tracer {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    records: Vec<Value>,
    log: Vec<String>,
}

impl Tracer {
    /// Starts ctrace and waits until it says it is tracing.
    pub fn start(args: &[&str]) -> Tracer {
        Self::start_with(args, strategy().as_deref(), &[])
    }

    /// Starts ctrace on `strategy` (None: auto), with extra environment.
    pub fn start_with(args: &[&str], strategy: Option<&str>, env: &[(&str, &str)]) -> Tracer {
        Self::spawn(args, strategy, env, |_| true)
    }

    /// Starts ctrace and keeps only its summaries: a storm of minutes
    /// announces millions of flows, more than a test should hold.
    pub fn start_summaries_only(args: &[&str]) -> Tracer {
        Self::spawn(args, strategy().as_deref(), &[], |l| {
            l.contains(r#""type":"summary""#)
        })
    }

    fn spawn(
        args: &[&str],
        strategy: Option<&str>,
        env: &[(&str, &str)],
        keep: fn(&str) -> bool,
    ) -> Tracer {
        let mut cmd = Command::new(ctrace_bin());
        cmd.arg("watch").arg("--json").args(args);
        // The router view unless a test asks for the node view: loading
        // both for every test costs minutes in the emulated VMs.
        if !args.contains(&"--side") {
            cmd.args(["--side", "router"]);
        }
        if let Some(s) = strategy {
            cmd.args(["--strategy", s]);
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning ctrace");
        let (tx, lines) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if keep(&l) {
                    let _ = tx.send(l);
                }
            }
        });
        let (etx, stderr) = mpsc::channel();
        let err = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for l in err.lines().map_while(Result::ok) {
                let _ = etx.send(l);
            }
        });
        let mut t = Tracer {
            child,
            lines,
            stderr,
            records: vec![],
            log: vec![],
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match t.stderr.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => {
                    let ready = l.contains("(Ctrl-C to stop)");
                    t.log.push(l);
                    if ready {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = t.child.wait();
                    panic!(
                        "ctrace exited before tracing ({status:?}):\n{}",
                        t.log.join("\n")
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "ctrace did not start in 60s:\n{}",
                t.log.join("\n")
            );
        }
        t
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `signal`, waits for exit and returns every NDJSON record.
    pub fn stop_with(mut self, signal: i32) -> (Vec<Value>, std::process::ExitStatus) {
        let status = self.finish(signal);
        (std::mem::take(&mut self.records), status)
    }

    /// SIGINT: the normal way to stop, which prints the final summary.
    pub fn stop(self) -> Vec<Value> {
        self.stop_with_stderr().0
    }

    /// [`Tracer::stop`], with every line ctrace wrote to stderr.
    pub fn stop_with_stderr(mut self) -> (Vec<Value>, Vec<String>) {
        let status = self.finish(libc::SIGINT);
        assert!(status.success(), "ctrace exited with {status}");
        (
            std::mem::take(&mut self.records),
            std::mem::take(&mut self.log),
        )
    }

    fn finish(&mut self, signal: i32) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.pid(), signal) };
        let status = self.child.wait().expect("waiting for ctrace");
        // The readers may still be forwarding the last lines (the final
        // summary): take everything until they reach the end of the pipes.
        let deadline = Instant::now() + Duration::from_secs(10);
        let rest = |rx: &mpsc::Receiver<String>| -> Vec<String> {
            let mut v = Vec::new();
            while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                v.push(l);
            }
            v
        };
        for l in rest(&self.lines) {
            self.records
                .push(serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")));
        }
        let log = rest(&self.stderr);
        self.log.extend(log);
        eprintln!("ctrace stderr:\n{}", self.log.join("\n"));
        status
    }
}

pub fn drops(records: &[Value]) -> Vec<&Value> {
    records.iter().filter(|r| r["type"] == "drop").collect()
}

pub fn final_summary(records: &[Value]) -> &Value {
    records
        .iter()
        .rev()
        .find(|r| r["type"] == "summary" && r["final"] == true)
        .expect("ctrace printed no final summary")
}

/// (flows, packets) per (service, cause) in one namespace, from a summary.
pub fn totals(
    summary: &Value,
    netns: u64,
) -> std::collections::BTreeMap<(String, String), (u64, u64)> {
    let mut m = std::collections::BTreeMap::new();
    for d in summary["drops"].as_array().unwrap() {
        if d["netns"].as_u64() != Some(netns) {
            continue;
        }
        let service = d["service"].as_str().unwrap_or("other").to_string();
        let cause = d["cause"].as_str().unwrap().to_string();
        let e = m.entry((service, cause)).or_insert((0, 0));
        e.0 += d["flows"].as_u64().unwrap();
        e.1 += d["packets"].as_u64().unwrap();
    }
    m
}

/// IDs of the ctrace programs loaded now. Tests compare ID sets, never
/// counts: an earlier test's programs may still be on their way out (their
/// release is deferred), and a count would mistake them for this run's.
pub fn ctrace_program_ids() -> std::collections::BTreeSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("ctrace_")))
        .map(|p| p.id())
        .collect()
}

/// Names of loaded BPF programs that are ctrace's.
pub fn ctrace_programs() -> Vec<String> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| p.name_as_str().map(str::to_string))
        .filter(|n| n.starts_with("ctrace_"))
        .collect()
}

/// Bytes of BPF maps a process holds (fdinfo's memlock of map fds).
pub fn map_bytes(pid: i32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter(|t| t.contains("map_type:"))
        .filter_map(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// A `/proc/PID/status` field in KiB (VmRSS, VmHWM).
pub fn status_kib(pid: i32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The self-check of one namespace from a summary.
pub fn agreement(summary: &Value, netns: u64) -> Option<&Value> {
    summary["agreement"]
        .as_array()?
        .iter()
        .find(|a| a["netns"].as_u64() == Some(netns))
}

pub const MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

pub fn global_max() -> u64 {
    std::fs::read_to_string(MAX)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A lab whose router table is full of ASSURED entries, listeners up.
pub struct FullLab {
    pub topo: Topology,
    _listeners: traffic::Listeners,
}

/// The documented memory bound (docs/memory-and-performance.md, "Memory") for a table of
/// `entries` and the default flow cap, in MiB.
pub fn memory_bound_mib(entries: u64) -> f64 {
    ctrace::MEMORY_BASE_MIB
        + entries as f64 * ctrace::MEMORY_PER_TABLE_ENTRY_BYTES / (1024.0 * 1024.0)
        + ctrace::aggregate::DEFAULT_MAX_FLOWS as f64 * ctrace::MEMORY_PER_FLOW_BYTES
            / (1024.0 * 1024.0)
}

pub fn full_lab() -> FullLab {
    let topo = Topology::build().expect("building namespaces");
    let tcp: Vec<u16> = LAB_SERVICES
        .iter()
        .filter(|s| s.1 == ctrace::event::Proto::Tcp)
        .map(|s| s.2)
        .collect();
    let listeners = traffic::Listeners::start(&topo.servers, &tcp, &[53]).unwrap();
    let fill = traffic::fill_table(
        &topo.router,
        global_max() + 16,
        std::net::IpAddr::V4(ctrace::lab::topology::SERVER_V4),
        |_| {},
    )
    .unwrap();
    assert!(fill.refused_full > 0, "the table never filled: {fill:?}");
    eprintln!(
        "filled {} entries in {:.2}s",
        fill.created,
        fill.elapsed.as_secs_f64()
    );
    FullLab {
        topo,
        _listeners: listeners,
    }
}

pub fn conntrack_drops(ns: &ctrace::netns::NetNs) -> u64 {
    CtSocket::open(Some(ns)).unwrap().stats().unwrap().drop
}
