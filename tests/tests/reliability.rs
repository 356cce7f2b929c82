//! Reliability: what ctrace leaves behind when it is stopped at any moment,
//! what it needs and says about privileges, and two tracers at once. These
//! run on the host only (the VM matrix runs the e2e suite), in bounded
//! time.
use std::{
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ctrace::lab::{topology, traffic};
use ctrace_tests::{
    Tracer, conntrack_drops, ctrace_bin, ctrace_programs, final_summary, full_lab, privileged,
};

/// Waits for the kernel to free ctrace's programs (their release after the
/// last file descriptor closes is deferred).
fn programs_gone(within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let left = ctrace_programs();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The child's exit status, or None (the child killed) if it has not
/// exited within `limit`: a test fails instead of hanging the suite.
fn wait_at_most(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A cheap pseudo-random sequence, seeded from the clock and printed, so a
/// failing run can be replayed by setting CTRACE_TEST_SEED.
fn rng() -> impl FnMut() -> u64 {
    let seed = std::env::var("CTRACE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("CTRACE_TEST_SEED={seed}");
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

#[test]
fn signals_at_random_moments_of_a_storm_leave_no_program_behind() {
    if !privileged() || !ctrace_tests::ctnetlink() {
        return;
    }
    // The kernel frees the programs of the test before this one a little
    // after its ctrace exits; any other ctrace on the machine (another
    // test run) makes this test meaningless, and it says so.
    let left = programs_gone(Duration::from_secs(10));
    assert!(
        left.is_empty(),
        "ctrace programs loaded before the test (another ctrace running?): {left:?}"
    );
    let lab = full_lab();
    let router = lab.topo.router.inode().to_string();
    let mut next = rng();
    let signals = [libc::SIGINT, libc::SIGTERM, libc::SIGKILL];
    let runs: u64 = std::env::var("CTRACE_TEST_SIGNAL_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    for run in 0..runs {
        let signal = signals[(next() % 3) as usize];
        let mut cmd = Command::new(ctrace_bin());
        cmd.args(["watch", "--json", "--netns", &router, "--interval", "200ms"]);
        if let Some(s) = ctrace_tests::strategy() {
            cmd.args(["--strategy", &s]);
        }
        // A shell starts a background job with SIGINT ignored, and the
        // child inherits that until ctrace installs its own handler: an
        // early SIGINT would be lost, as it is for any program run that way.
        // This test is about Ctrl-C as a terminal sends it, so the child
        // starts with SIGINT at its default, whoever runs the suite.
        // SAFETY: signal(2) is async-signal-safe, as pre_exec requires.
        let mut child = unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            })
        }
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        // A storm of distinct SYNs into the full table meanwhile.
        let clients = lab.topo.clients.try_clone().unwrap();
        let storm = std::thread::spawn(move || {
            traffic::syn_flood(
                &clients,
                topology::CLIENTS_V4[0],
                topology::SERVER_V4,
                20_000,
            )
        });
        // Anywhere from loading the programs to tracing at full speed.
        std::thread::sleep(Duration::from_millis(next() % 2500));
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = wait_at_most(&mut child, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("run {run}: ctrace outlived signal {signal} by 60 s"));
        storm.join().unwrap().unwrap();
        let left = programs_gone(Duration::from_secs(10));
        eprintln!("run {run}: signal {signal}, {status}");
        assert!(
            left.is_empty(),
            "run {run}: after signal {signal} ({status}) these programs remain: {left:?}"
        );
        if signal != libc::SIGKILL {
            // Stopped by a signal it handles: a clean exit (or the runtime
            // was not up yet, and the default action killed it).
            assert!(
                status.success() || status.code().is_none(),
                "run {run}: {status}"
            );
        }
    }
}

/// Runs ctrace as root with only `caps` in its bounding set (so only those
/// effective), like a service unit's CapabilityBoundingSet.
fn with_caps(caps: &str, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args([
            "--inh-caps=-all",
            &format!("--bounding-set=-all,{caps}"),
            "--",
        ])
        .arg(ctrace_bin())
        .args(args)
        .output()
        .unwrap()
}

fn have_setpriv(test: &str) -> bool {
    let ok = Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED {test}: setpriv (util-linux) missing");
    }
    ok
}

#[test]
fn each_missing_capability_is_named() {
    if !privileged() || !have_setpriv("each_missing_capability_is_named") {
        return;
    }
    let all = ["+bpf", "+perfmon", "+net_admin"];
    for (i, missing) in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]
        .iter()
        .enumerate()
    {
        // Without SYS_ADMIN, which would stand in for BPF and PERFMON.
        let caps: Vec<&str> = all
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, c)| *c)
            .collect();
        let out = with_caps(&caps.join(","), &["watch", "--duration", "1"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(err.contains(&format!("(missing: {missing})")), "{err}");
    }
    // Nobody, no capabilities at all: all three named. Nobody may not be
    // able to reach the checkout's binary.
    let bin = ctrace_tests::ReachableBin::new();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .arg(&bin.path)
        .arg("probe")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("(missing: CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN)"),
        "{err}"
    );
}

#[test]
fn bpf_perfmon_and_net_admin_are_enough_where_tracefs_is_mounted() {
    if !privileged()
        || !ctrace_tests::ctnetlink()
        || !have_setpriv("bpf_perfmon_and_net_admin_are_enough_where_tracefs_is_mounted")
    {
        return;
    }
    // Its own namespace: entering others takes CAP_SYS_ADMIN (setns).
    let own = ctrace::netns::NetNs::current().unwrap().inode();
    let own_arg = own.to_string();
    let mut args = vec!["watch", "--json", "--duration", "2", "--netns", &own_arg];
    let strategy = ctrace_tests::strategy();
    if let Some(s) = &strategy {
        args.extend(["--strategy", s]);
    }
    let three = with_caps("+bpf,+perfmon,+net_admin", &args);
    let err = String::from_utf8_lossy(&three.stderr).into_owned();
    let out = if three.status.success() {
        three
    } else {
        // Where tracefs is not mounted, mounting it is the one thing that
        // takes CAP_SYS_ADMIN; ctrace must say exactly that, and work with it.
        assert!(
            err.contains("mounting it takes CAP_SYS_ADMIN"),
            "three capabilities failed for another reason: {err}"
        );
        eprintln!("tracefs not mounted here: CAP_SYS_ADMIN needed for it ({err})");
        with_caps("+bpf,+perfmon,+net_admin,+sys_admin", &args)
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let s = final_summary(&records);
    eprintln!(
        "strategy {} with three capabilities; stderr: {err}",
        s["strategy"]
    );
    assert!(reads_table_of(s, own), "{s}");
}

/// Whether a summary lists `inode`'s table.
fn reads_table_of(summary: &serde_json::Value, inode: u64) -> bool {
    summary["netns"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["inode"].as_u64() == Some(inode))
}

/// An account that is not root, with CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN
/// and nothing else, cannot read or mount tracefs: the tracepoint tier
/// still runs there (a raw tracepoint typed from BTF), where root's probe
/// says it runs, and traces.
#[test]
fn an_unprivileged_account_with_three_capabilities_gets_the_tracepoint_tier() {
    if !privileged()
        || !ctrace_tests::ctnetlink()
        || !have_setpriv("an_unprivileged_account_with_three_capabilities_gets_the_tracepoint_tier")
    {
        return;
    }
    let probe = |cmd: &mut Command| -> serde_json::Value {
        let out = cmd.args(["probe", "--json"]).output().unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    let usable = |p: &serde_json::Value, s: &str| {
        p["strategies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["strategy"] == s && t["usable"] == true)
    };
    let root = probe(&mut Command::new(ctrace_bin()));
    if !usable(&root, "tracepoint") {
        eprintln!("SKIPPED: no tracepoint tier on this kernel, even for root");
        return;
    }
    let bin = ctrace_tests::ReachableBin::new();
    let as_nobody = || {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all,+bpf,+perfmon,+net_admin",
            "--ambient-caps=+bpf,+perfmon,+net_admin",
            "--",
        ])
        .arg(&bin.path);
        c
    };
    let nobody = probe(&mut as_nobody());
    assert!(
        usable(&nobody, "tracepoint"),
        "tracepoint tier refused without root: {nobody}"
    );
    assert_eq!(nobody["auto"], "tracepoint", "{nobody}");
    // And it traces: its own namespace (entering others takes SYS_ADMIN).
    let own = ctrace::netns::NetNs::current().unwrap().inode().to_string();
    let out = as_nobody()
        .args(["watch", "--json", "--side", "router", "--duration", "2"])
        .args(["--strategy", "tracepoint", "--netns", &own])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let s = final_summary(&records);
    assert_eq!(s["strategy"], "tracepoint", "{err}");
    assert!(
        reads_table_of(s, own.parse().unwrap()),
        "its own namespace's table is not read: {s}"
    );
}

#[test]
fn two_tracers_at_once_both_count_every_drop() {
    if !privileged() || !ctrace_tests::ctnetlink() {
        return;
    }
    let lab = full_lab();
    let router = lab.topo.router.inode();
    let args = ["--netns", &router.to_string(), "--interval", "300ms"];
    let a = Tracer::start(&args);
    let b = Tracer::start(&args);
    let before = conntrack_drops(&lab.topo.router);
    let flood = traffic::syn_flood(
        &lab.topo.clients,
        topology::CLIENTS_V4[0],
        topology::SERVER_V4,
        5_000,
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let kernel = conntrack_drops(&lab.topo.router) - before;
    let table_full = |records: &[serde_json::Value]| -> u64 {
        final_summary(records)["drops"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["cause"] == "table_full" && g["netns"] == router)
            .map(|g| g["packets"].as_u64().unwrap())
            .sum()
    };
    let (ra, rb) = (a.stop(), b.stop());
    eprintln!(
        "{} SYNs sent, conntrack dropped {kernel}; tracers saw {} and {}",
        flood.sent,
        table_full(&ra),
        table_full(&rb)
    );
    assert_eq!(table_full(&ra), kernel);
    assert_eq!(table_full(&rb), kernel);
    assert!(programs_gone(Duration::from_secs(10)).is_empty());
}

#[test]
fn namespaces_come_and_go_and_the_limit_and_table_change_while_watching() {
    if !privileged() || !ctrace_tests::ctnetlink() {
        return;
    }
    let tracer = Tracer::start(&["--interval", "200ms"]);
    // A namespace that tracks connections appears, is seen, and goes.
    let ns = ctrace::netlink::rtnetlink::new_netns().unwrap();
    let inode = ns.inode();
    // A task inside, as every real namespace has (ctrace finds namespaces
    // through their tasks and /run/netns).
    let (quit, wait) = std::sync::mpsc::channel::<()>();
    let holder = ns.spawn("ns-holder", move || wait.recv()).unwrap();
    ctrace::netlink::nftables::enable_conntrack(&ns).unwrap();
    let mut ct = ctrace::netlink::ctnetlink::CtSocket::open(Some(&ns)).unwrap();
    ct.create_batch(&mut (0..50u16).map(|i| {
        ctrace::netlink::ctnetlink::CtEntry::assured(
            ctrace_common::IPPROTO_UDP,
            "10.77.0.1".parse().unwrap(),
            2000 + i,
            "10.77.0.2".parse().unwrap(),
            53,
            60,
        )
    }))
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // The machine-wide limit changes under it (restored after).
    let lowered = ctrace_tests::global_max() - 1;
    let guard = ctrace::lab::SysctlGuard::set(ctrace_tests::MAX, &lowered.to_string()).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    drop(guard);
    // The table is flushed under it: reported as empty, not crashed on.
    ct.flush().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    drop(ct);
    drop(ns);
    drop(quit);
    let _ = holder.join();
    std::thread::sleep(Duration::from_secs(2));
    let (records, status) = tracer.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}");
    let summaries: Vec<_> = records.iter().filter(|r| r["type"] == "summary").collect();
    let seen = |s: &serde_json::Value| {
        s["netns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["inode"] == inode && n["count"] == 50)
    };
    assert!(
        summaries.iter().any(|s| seen(s)),
        "the namespace was never shown"
    );
    assert!(
        summaries.iter().any(|s| s["netns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["max"] == lowered)),
        "the lowered nf_conntrack_max was never reported"
    );
    let first_seen = summaries.iter().position(|s| seen(s)).unwrap();
    assert!(
        summaries[first_seen..].iter().any(|s| s["netns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["inode"] == inode && n["count"] == 0)),
        "the flushed table was never reported empty"
    );
    assert!(
        !seen(final_summary(&records)),
        "a destroyed namespace is still shown at the end"
    );
}

/// Soak: a full table and a storm of new flows for minutes
/// (CTRACE_SOAK_SECS, 120 by default). After a warm-up ctrace's RSS stays
/// within a stated band, its maps do not grow, no summary goes missing and
/// every drop is still counted.
#[test]
fn soak_under_a_storm_keeps_memory_flat_and_every_summary() {
    if !privileged() || !ctrace_tests::ctnetlink() {
        return;
    }
    /// How much the typical RSS of the last third of the run may exceed
    /// that of the first: the flow detail settles during warm-up, so a
    /// rise beyond allocator noise is growth with the storm. Medians,
    /// because a sample may catch a table re-dump's transient breakdown
    /// (megabytes), or fall just after the allocator returned pages.
    const RSS_GROWTH_MIB: f64 = 4.0;
    const WARM_UP: Duration = Duration::from_secs(20);
    let secs: u64 = std::env::var("CTRACE_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120)
        // Thirds of at least four samples after the warm-up.
        .max(80);
    let lab = full_lab();
    let router = lab.topo.router.inode();
    let entries = ctrace::netlink::ctnetlink::CtSocket::open(Some(&lab.topo.router))
        .unwrap()
        .stats()
        .unwrap()
        .entries;
    let tracer =
        Tracer::start_summaries_only(&["--netns", &router.to_string(), "--interval", "1s"]);
    let pid = tracer.pid();
    let maps_at_start = ctrace_tests::map_bytes(pid);
    let before = conntrack_drops(&lab.topo.router);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let started = Instant::now();
    let (sent, samples) = std::thread::scope(|s| {
        let flood = s.spawn(|| {
            let mut sent = 0u64;
            // Each round from another client address: distinct tuples
            // within a round, 200,000 new flows a round.
            for src in topology::CLIENTS_V4.iter().cycle() {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let f = traffic::syn_flood(&lab.topo.clients, *src, topology::SERVER_V4, 200_000)
                    .unwrap();
                sent += f.sent;
            }
            sent
        });
        let mut samples = Vec::new();
        while started.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(Duration::from_secs(5));
            if started.elapsed() >= WARM_UP {
                let rss = ctrace_tests::status_kib(pid, "VmRSS").unwrap_or(0);
                samples.push((rss, ctrace_tests::map_bytes(pid)));
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (flood.join().unwrap(), samples)
    });
    std::thread::sleep(Duration::from_millis(1500));
    let kernel = conntrack_drops(&lab.topo.router) - before;
    let records = tracer.stop();
    let rss: Vec<f64> = samples.iter().map(|s| s.0 as f64 / 1024.0).collect();
    let (lo, hi) = rss
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    let summaries: Vec<f64> = records
        .iter()
        .filter(|r| r["type"] == "summary" && r["final"] == false)
        .map(|r| r["elapsed_s"].as_f64().unwrap())
        .collect();
    let widest_gap = summaries
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(0.0f64, f64::max);
    let s = final_summary(&records);
    let table_full: u64 = ctrace_tests::totals(s, router)
        .iter()
        .filter(|((_, c), _)| c == "table_full")
        .map(|(_, v)| v.1)
        .sum();
    eprintln!(
        "soak: {secs}s, {sent} SYNs ({:.0}/s); RSS after warm-up {lo:.1}..{hi:.1} MiB over {} \
         samples {rss:.1?}; map memlock {maps_at_start} -> {:?} bytes; {} summaries, widest gap {widest_gap:.2}s; \
         kernel drops {kernel}, ctrace table_full {table_full}, lost events {}",
        sent as f64 / secs as f64,
        rss.len(),
        samples.last().map(|s| s.1),
        summaries.len(),
        s["lost_events"]
    );
    assert!(sent > 0 && kernel > 0, "the storm made no drops");
    let bound = ctrace_tests::memory_bound_mib(entries);
    assert!(
        hi <= bound,
        "RSS reached {hi:.1} MiB, over the documented bound of {bound:.1} MiB for {entries} entries: {rss:?}"
    );
    let third = rss.len() / 3;
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (early, late) = (median(&rss[..third]), median(&rss[rss.len() - third..]));
    assert!(
        late - early <= RSS_GROWTH_MIB,
        "RSS grew with the storm: median {early:.1} MiB in the first third after warm-up, \
         {late:.1} MiB in the last: {rss:?}"
    );
    assert!(
        samples.iter().all(|s| s.1 == maps_at_start),
        "map memory changed: {maps_at_start} -> {samples:?}"
    );
    // One summary a second: ticks slip under load (each late tick delays
    // the next), none may vanish.
    assert!(
        summaries.len() as u64 >= secs * 8 / 10 && widest_gap < 3.0,
        "{} summaries in {secs}s, widest gap {widest_gap:.2}s",
        summaries.len()
    );
    assert_eq!(table_full, kernel, "every drop of the soak counted");
}

/// A recording made to exhaust `ctrace report`: 16 MiB in which every
/// summary names a new service, a new namespace and new breakdown keys,
/// with counts at u64::MAX. The report streams it: its peak memory is
/// bounded by what it shows, not by the file (before: 1.6 MB took 1.8 GiB).
#[test]
fn report_of_a_hostile_recording_is_bounded() {
    use std::io::Write as _;
    const SIZE: usize = 16 << 20;
    const BOUND_KIB: i64 = 256 << 10;
    const CAUSES: [&str; 5] = ["table_full", "clash", "invalid", "rule", "unknown"];
    const EVICTORS: [&str; 2] = ["early_drop", "gc"];
    let dir = std::env::temp_dir().join(format!("ctrace-hostile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // create_dir, not create_dir_all: a link planted at that name fails
    // the test rather than being written through.
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("hostile.ndjson");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    writeln!(out, r#"{{"type":"recording","version":1,"host":"h"}}"#).unwrap();
    let mut written = 0;
    let mut i = 0u64;
    while written < SIZE {
        let line = serde_json::json!({
            "type": "summary",
            "time": humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + i * 1000)
            ).to_string(),
            "netns": [{"inode": i, "count": i, "max": u64::MAX, "processes": [format!("p{i}")]}],
            // Causes and evictors are typed: a value ctrace never writes
            // breaks the line. Every key is new all the same (netns, service).
            "drops": [{"netns": i, "service": format!("svc-{i}"), "cause": CAUSES[i as usize % 5],
                       "proto": "tcp", "flows": u64::MAX - i, "packets": u64::MAX}],
            "evictions": [{"netns": i, "service": format!("svc-{i}"), "proto": "udp",
                           "entries": i, "by": EVICTORS[i as usize % 2]}],
            "occupancy": [{"inode": i, "total": i + 1,
                           "by_src_prefix": {format!("10.{}.0.0/16", i % 256): i}}],
            "agreement": [{"netns": i, "attributed": i, "kernel": i, "table_full": i,
                           "unseen": 0, "trust": "exact"}],
        })
        .to_string();
        writeln!(out, "{line}").unwrap();
        written += line.len() + 1;
        i += 1;
    }
    drop(out);
    let started = Instant::now();
    let child = Command::new(ctrace_bin())
        .arg("report")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, rss_kib) = wait_with_maxrss(child);
    let took = started.elapsed();
    std::fs::remove_dir_all(&dir).unwrap();
    eprintln!(
        "report of {} MiB ({i} summaries): {:.1} s, peak RSS {} MiB",
        SIZE >> 20,
        took.as_secs_f64(),
        rss_kib >> 10
    );
    assert!(status.success(), "{status:?}");
    assert!(
        rss_kib <= BOUND_KIB,
        "peak RSS {rss_kib} KiB > {BOUND_KIB} KiB"
    );
}

/// Waits for `child`; its exit status and its own peak RSS in KiB
/// (wait4's rusage is the child's alone).
fn wait_with_maxrss(child: std::process::Child) -> (std::process::ExitStatus, i64) {
    use std::os::unix::process::ExitStatusExt as _;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data the kernel fills.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, writing into our locals.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "{}", std::io::Error::last_os_error());
    (std::process::ExitStatus::from_raw(status), usage.ru_maxrss)
}
