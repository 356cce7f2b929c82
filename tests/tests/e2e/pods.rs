//! Pods behind flows, on a node ctrace sees as a kubelet leaves it: each
//! pod is a process in a network namespace of its own (a veth into the
//! node), in a kubepods cgroup, with a directory under /var/log/pods. The
//! real host paths are used (no `--host-root`); everything made is
//! removed, however the test ends.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use ctrace::{
    lab::{
        topology::SERVER_V4,
        traffic::{self, Planned},
    },
    netlink::{nftables, rtnetlink::RtSocket},
    netns::NetNs,
};
use ctrace_tests::{Tracer, ctrace_bin, drops, privileged};

use super::full_lab;

/// Where the kubelet puts its pod logs, which name a pod by its UID.
const POD_LOGS: &str = "/var/log/pods";
/// The kubelet's cgroups for best-effort pods (systemd driver).
const QOS_SLICE: &str = "kubepods.slice/kubepods-besteffort.slice";

/// A cgroup v2 hierarchy this host lets the test write: its mount point.
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split(' ').next() != Some("cgroup2") {
            return None;
        }
        Some(PathBuf::from(left.split(' ').nth(4)?))
    })
}

/// One pod: its namespace, its process, and what was made for it.
struct FakePod {
    ns: NetNs,
    name: &'static str,
    addr: Ipv4Addr,
    process: Child,
    /// None where this kernel has no cgroup v2: a process in a namespace,
    /// which names no pod.
    cgroup: Option<PathBuf>,
    log_dir: PathBuf,
}

impl FakePod {
    /// Pod `default/NAME` at `addr` (a /24 of its own, the node at .1),
    /// with a veth into `node`.
    fn start(
        node: &NetNs,
        name: &'static str,
        uid: &str,
        addr: Ipv4Addr,
        cg: Option<&Path>,
    ) -> FakePod {
        let ns = ctrace::netlink::rtnetlink::new_netns().unwrap();
        let [a, b, c, _] = addr.octets();
        let gateway = Ipv4Addr::new(a, b, c, 1);
        let mut rt = RtSocket::open(Some(node)).unwrap();
        let node_side = format!("to-{name}");
        rt.add_veth(&node_side, "eth0", &ns).unwrap();
        rt.add_address(&node_side, IpAddr::V4(gateway), 24).unwrap();
        rt.set_up(&node_side).unwrap();
        let mut rt = RtSocket::open(Some(&ns)).unwrap();
        rt.add_address("eth0", IpAddr::V4(addr), 24).unwrap();
        rt.set_up("eth0").unwrap();
        rt.add_route(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0, IpAddr::V4(gateway))
            .unwrap();
        // The pod's process: a sleep inside the namespace.
        let process = Command::new("nsenter")
            .arg(format!(
                "--net=/proc/{}/fd/{}",
                std::process::id(),
                ns.fd().as_raw_fd()
            ))
            .args(["sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        // The systemd driver's layout, the UID's dashes as underscores.
        let dir = cg.map(|cg| {
            cg.join(QOS_SLICE).join(format!(
                "kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            ))
        });
        // A killed run may have left it; it is ours either way.
        if let Some(dir) = &dir
            && let Err(e) = std::fs::create_dir(dir)
        {
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::AlreadyExists,
                "{}: {e}",
                dir.display()
            );
        }
        let log_dir = Path::new(POD_LOGS).join(format!("default_{name}_{uid}"));
        std::fs::create_dir_all(&log_dir).unwrap();
        let pod = FakePod {
            ns,
            name,
            addr,
            process,
            cgroup: dir,
            log_dir,
        };
        // nsenter execs sleep: the same PID, in the namespace once exec'd.
        if let Some(dir) = &pod.cgroup {
            std::fs::write(dir.join("cgroup.procs"), pod.process.id().to_string()).unwrap();
        }
        pod
    }

    fn pod(&self) -> String {
        format!("default/{}", self.name)
    }
}

impl Drop for FakePod {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        if let Some(dir) = &self.cgroup {
            let _ = std::fs::remove_dir(dir);
        }
        let _ = std::fs::remove_dir(&self.log_dir);
    }
}

/// Two pods behind a masquerading node whose table is full: every dropped
/// flow names its source pod, live (drop records) and in the report.
#[test]
fn dropped_flows_name_the_pod_behind_their_address() {
    if !privileged() {
        return;
    }
    let Some((cg, _made)) = kubelet_dirs("dropped_flows_name_the_pod_behind_their_address") else {
        return;
    };
    let lab = full_lab();
    let node = &lab.topo.router;
    nftables::masquerade(node).unwrap();
    let pods = [
        FakePod::start(
            node,
            "web-a",
            "1a2b3c4d-0000-4000-8000-00000000000a",
            Ipv4Addr::new(10, 20, 1, 2),
            Some(&cg),
        ),
        FakePod::start(
            node,
            "web-b",
            "1a2b3c4d-0000-4000-8000-00000000000b",
            Ipv4Addr::new(10, 20, 2, 2),
            Some(&cg),
        ),
    ];
    // The pod must be in its namespace (exec done) and its cgroup.
    for p in &pods {
        let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", p.process.id())).unwrap();
        assert!(cgroup.contains("kubepods-besteffort-pod"), "{cgroup}");
        let mut ok = false;
        for _ in 0..50 {
            let link = std::fs::read_link(format!("/proc/{}/ns/net", p.process.id()));
            if link.is_ok_and(|l| l.to_string_lossy() == format!("net:[{}]", p.ns.inode())) {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(ok, "{}'s process never entered its namespace", p.name);
    }
    let dir = std::env::temp_dir().join(format!("ctrace-pods-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rec = dir.join("rec.ndjson");
    let tracer = Tracer::start(&[
        "--netns",
        &node.inode().to_string(),
        "--interval",
        "500ms",
        "--record",
        rec.to_str().unwrap(),
    ]);
    let mut attempts = Vec::new();
    for (p, (service, port)) in pods.iter().zip([("ssh", 22), ("etcd-peer", 2380)]) {
        let plan = [Planned {
            service: service.into(),
            proto: ctrace::event::Proto::Tcp,
            src: IpAddr::V4(p.addr),
            dst: SocketAddr::new(IpAddr::V4(SERVER_V4), port),
        }];
        attempts.extend(traffic::attempt_all(&p.ns, &plan, Duration::from_millis(2500)).unwrap());
    }
    std::thread::sleep(Duration::from_secs(1));
    let records = tracer.stop();
    let report = Command::new(ctrace_bin())
        .arg("report")
        .arg(&rec)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let expected: Vec<(String, String)> =
        pods.iter().map(|p| (p.addr.to_string(), p.pod())).collect();
    drop(pods);
    let md = String::from_utf8_lossy(&report.stdout).into_owned();

    assert!(attempts.iter().all(|a| !a.ok), "{attempts:?}");
    let dropped = drops(&records);
    for (addr, pod) in &expected {
        let mine: Vec<_> = dropped
            .iter()
            .filter(|d| {
                d["src"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(&format!("{addr}:")))
            })
            .collect();
        assert!(!mine.is_empty(), "no drop from {addr}: {dropped:?}");
        for d in mine {
            assert_eq!(d["src_pod"], pod.as_str(), "{d}");
            assert_eq!(d["dst_pod"], serde_json::Value::Null, "{d}");
            assert_eq!(d["cause"], "table_full", "{d}");
        }
    }
    assert!(
        report.status.success(),
        "{md}{}",
        String::from_utf8_lossy(&report.stderr)
    );
    assert!(
        md.contains("Pods and Services behind dropped flows"),
        "{md}"
    );
    let section = md
        .split("## Pods and Services behind dropped flows")
        .nth(1)
        .unwrap_or_default();
    eprintln!(
        "report:{}",
        section.split("\n## ").next().unwrap_or_default()
    );
    for (_, pod) in &expected {
        assert!(md.contains(pod.as_str()), "{pod} not in the report: {md}");
    }
}

/// Opens a TCP connection to `dst` every `1/rate` s for `span` from inside
/// `ns` (each a new conntrack entry in the node), closing each at once.
/// Returns how many were opened, and over how long.
fn open_flows(
    ns: &NetNs,
    dst: SocketAddr,
    rate: u32,
    span: Duration,
) -> std::thread::JoinHandle<(u64, Duration)> {
    ns.spawn("filler", move || {
        let period = Duration::from_secs(1) / rate;
        let start = std::time::Instant::now();
        let mut opened = 0u64;
        let mut i = 0u32;
        while start.elapsed() < span {
            let next = start + period * i;
            if let Some(wait) = next.checked_duration_since(std::time::Instant::now()) {
                std::thread::sleep(wait);
            }
            i += 1;
            if std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(1)).is_ok() {
                opened += 1;
            }
        }
        (opened, start.elapsed())
    })
    .unwrap()
}

/// Who is filling the table now: two pods open new flows at known,
/// different rates through the node; ctrace's top source prefix and pod
/// is the faster one, at its rate (within 10%), and the entries it counts
/// over the run meet the flows opened.
#[test]
fn who_fills_the_table_now_is_measured_by_prefix_pod_and_service() {
    if !privileged() {
        return;
    }
    // Without insert events or passed flows (tracepoint) new entries come
    // from ctnetlink's announcements; an OpenWrt router without
    // kmod-nf-conntrack-netlink has none to give. kprobe and tc count
    // their own.
    if !ctrace_tests::ctnetlink()
        && !matches!(ctrace_tests::strategy().as_deref(), Some("kprobe" | "tc"))
    {
        eprintln!("SKIPPED who_fills_the_table_now: no ctnetlink here");
        return;
    }
    let Some((cg, _made)) = kubelet_dirs("who_fills_the_table_now") else {
        return;
    };
    who_fills(Some(&cg), &[], ctrace_tests::strategy().as_deref());
}

/// The same with ctnetlink's announcements coming faster than ctrace lets
/// the kernel build them: ctrace listens to a share of each interval and
/// scales the rates from it, within the same 10%.
#[test]
fn who_fills_the_table_now_from_a_sample_of_announcements() {
    if !privileged() {
        return;
    }
    if !ctrace_tests::ctnetlink() || ctrace_tests::strategy().as_deref() == Some("kprobe") {
        eprintln!("SKIPPED who_fills_the_table_now_from_a_sample: no announcements used here");
        return;
    }
    let Some((cg, _made)) = kubelet_dirs("who_fills_the_table_now_from_a_sample") else {
        return;
    };
    // 50 new entries a second against a budget of 20.
    who_fills(
        Some(&cg),
        // On by default only where a tier has no witness of its own.
        &["--ctnetlink-events", "--announcements-per-s", "20"],
        ctrace_tests::strategy().as_deref(),
    );
}

/// The same on the tc tier with ctnetlink's events left unused, as on a
/// router that has none: the flows the tc programs saw pass are the new
/// entries. Pods are named where this kernel has cgroup v2.
#[test]
fn who_fills_the_table_now_without_ctnetlink_is_the_tc_tiers_passed_flows() {
    if !privileged() {
        return;
    }
    let dirs = kubelet_dirs("who_fills_the_table_now_without_ctnetlink (pods)");
    who_fills(
        dirs.as_ref().map(|(cg, _)| cg.as_path()),
        &["--no-ctnetlink-events"],
        Some("tc"),
    );
}

fn who_fills(cg: Option<&Path>, extra: &[&str], strategy: Option<&str>) {
    let topo = ctrace::lab::topology::Topology::build().unwrap();
    let _listeners = traffic::Listeners::start(&topo.servers, &[22, 2380], &[]).unwrap();
    let node = &topo.router;
    let pods = [
        FakePod::start(
            node,
            "fill-a",
            "1a2b3c4d-0000-4000-8000-0000000000fa",
            Ipv4Addr::new(10, 20, 1, 2),
            cg,
        ),
        FakePod::start(
            node,
            "fill-b",
            "1a2b3c4d-0000-4000-8000-0000000000fb",
            Ipv4Addr::new(10, 20, 2, 2),
            cg,
        ),
    ];
    let dir = std::env::temp_dir().join(format!("ctrace-filling-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rec = dir.join("rec.ndjson");
    let port = super::exporter::free_port();
    let node_arg = node.inode().to_string();
    let port_arg = port.to_string();
    let mut args = vec![
        "--netns",
        &node_arg,
        "--interval",
        "1s",
        "--record",
        rec.to_str().unwrap(),
        "--metrics",
        &port_arg,
    ];
    args.extend(extra);
    let tracer = Tracer::start_with(&args, strategy, &[]);
    let span = Duration::from_secs(4);
    let a = open_flows(
        &pods[0].ns,
        SocketAddr::new(IpAddr::V4(SERVER_V4), 22),
        40,
        span,
    );
    let b = open_flows(
        &pods[1].ns,
        SocketAddr::new(IpAddr::V4(SERVER_V4), 2380),
        10,
        span,
    );
    // Prometheus sees the same tops while the pods fill the table.
    std::thread::sleep(Duration::from_millis(3500));
    let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (_, text) =
        super::exporter::get(metrics, "/metrics", Duration::from_secs(3)).unwrap_or_default();
    let (a_opened, a_took) = a.join().unwrap();
    let (b_opened, _) = b.join().unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let records = tracer.stop();
    let report = Command::new(ctrace_bin())
        .arg("report")
        .arg(&rec)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let expected = [pods[0].pod(), pods[1].pod()];
    drop(pods);
    // The report's account of who filled the table: the faster pod first.
    let md = String::from_utf8_lossy(&report.stdout).into_owned();
    assert!(report.status.success(), "{md}");
    let section = md
        .split("## Who filled the tables")
        .nth(1)
        .unwrap_or_else(|| panic!("no filling section: {md}"));
    let first_of = |by: &str| {
        section
            .lines()
            .find(|l| l.split('|').nth(2).is_some_and(|c| c.trim() == by))
            .unwrap_or_default()
            .to_string()
    };
    assert!(first_of("src_prefix").contains("10.20.1.0/24"), "{section}");
    let with_pods = cg.is_some();
    // And over time: the faster source's line in the report's timeline.
    let over_time = md
        .split("Who filled the tables over time")
        .nth(1)
        .unwrap_or_else(|| panic!("no filling plot: {md}"));
    let a_line = if with_pods {
        "pod default/fill-a"
    } else {
        "from 10.20.1.0/24"
    };
    assert!(
        over_time
            .split("\n## ")
            .next()
            .unwrap_or_default()
            .contains(a_line),
        "{over_time}"
    );
    if with_pods {
        assert!(first_of("src_pod").contains("fill-a"), "{section}");
    }

    let a_rate = a_opened as f64 / a_took.as_secs_f64();
    // A sample's rates are scaled from part of each interval: wider.
    let budget: Option<f64> = extra
        .iter()
        .position(|a| *a == "--announcements-per-s")
        .and_then(|i| extra.get(i + 1)?.parse().ok());
    let tolerance = if budget.is_some() { 0.15 } else { 0.1 };
    let series = |key: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("ctrace_filling_new_entries_per_second{")
                    && l.contains(&format!("key=\"{key}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    // Prometheus has pods and services (prefixes are no labels).
    let (a_key, b_key) = if with_pods {
        (expected[0].as_str(), expected[1].as_str())
    } else {
        ("ssh", "etcd-peer")
    };
    let a_scraped = series(a_key).unwrap_or_else(|| panic!("no series for a: {text}"));
    assert!(
        (a_scraped - a_rate).abs() <= tolerance * a_rate,
        "Prometheus: {a_scraped}/s for a, which opened {a_rate:.1}/s"
    );
    assert!(series(b_key).is_some(), "{text}");
    let summaries: Vec<&serde_json::Value> =
        records.iter().filter(|r| r["type"] == "summary").collect();
    let node_ns = node.inode();
    let rows = |s: &serde_json::Value, by: &str| -> Vec<(String, f64)> {
        s["filling"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["netns"] == node_ns && r["by"] == by)
            .map(|r| {
                (
                    r["key"].as_str().unwrap().to_string(),
                    r["per_s"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    // Entries counted over the run: the sum of each interval's rate times
    // its length, against the flows opened.
    let mut counted = std::collections::BTreeMap::<String, f64>::new();
    let mut prev = 0.0;
    let mut a_rates = Vec::new();
    for s in &summaries {
        let t = s["elapsed_s"].as_f64().unwrap();
        for (key, per_s) in rows(s, "src_prefix") {
            *counted.entry(key.clone()).or_default() += per_s * (t - prev);
            if key == "10.20.1.0/24" {
                a_rates.push(per_s);
            }
        }
        prev = t;
    }
    eprintln!(
        "pod a: {a_opened} flows at {a_rate:.1}/s, pod b: {b_opened}; counted by prefix {counted:?}; \
         a's rates per interval {a_rates:?}"
    );
    for (key, opened) in [("10.20.1.0/24", a_opened), ("10.20.2.0/24", b_opened)] {
        let got = counted.get(key).copied().unwrap_or(0.0);
        assert!(
            (got - opened as f64).abs() <= tolerance * opened as f64,
            "{key}: counted {got:.1} new entries, {opened} flows opened"
        );
    }
    // The busiest interval: the top source prefix, pod and service are
    // a's, at a's rate.
    a_rates.sort_by(f64::total_cmp);
    let steady = summaries
        .iter()
        .filter(|s| rows(s, "src_prefix").first().is_some_and(|(_, r)| *r > 0.0))
        .max_by(|x, y| {
            let r = |s: &serde_json::Value| rows(s, "src_prefix").first().map_or(0.0, |t| t.1);
            r(x).total_cmp(&r(y))
        })
        .expect("no interval measured any filling");
    let median = a_rates[a_rates.len() / 2];
    assert!(
        (median - a_rate).abs() <= tolerance * a_rate,
        "a's median rate {median:.1}/s, it opened {a_rate:.1}/s"
    );
    assert_eq!(rows(steady, "src_prefix")[0].0, "10.20.1.0/24", "{steady}");
    assert_eq!(rows(steady, "service")[0].0, "ssh", "{steady}");
    if with_pods {
        assert_eq!(rows(steady, "src_pod")[0].0, expected[0], "{steady}");
        assert!(
            rows(steady, "src_pod")
                .iter()
                .any(|(k, _)| *k == expected[1]),
            "{steady}"
        );
    }
    let last = ctrace_tests::final_summary(&records);
    let listened: Vec<f64> = summaries
        .iter()
        .filter_map(|s| s["filling_listened"].as_f64())
        .collect();
    eprintln!("shares of each interval listened: {listened:?}");
    if extra.contains(&"--announcements-per-s") && last["capabilities"]["entry_events"] == true {
        eprintln!("SKIPPED the sample's share: this tier's insert events feed filling");
    } else if let Some(budget) = budget {
        // Sampled while the pods open flows: the share their rate allows
        // (about 20 / 50, less where a slow machine opened fewer).
        let want = budget / ((a_opened + b_opened) as f64 / a_took.as_secs_f64());
        assert!(
            want < 0.8,
            "the pods opened too few flows to sample: {want}"
        );
        assert!(
            listened
                .iter()
                .filter(|s| (*s - want).abs() <= 0.25 * want)
                .count()
                >= 2,
            "shares {listened:?}, {want:.2} expected"
        );
    }
    if extra.contains(&"--no-ctnetlink-events") {
        assert_eq!(last["filling_overruns"], serde_json::Value::Null, "{last}");
        assert_eq!(last["filling_unattributed"], 0, "{last}");
    }
}

/// The cgroup v2 mount and what a kubelet would have made before any pod
/// (its QoS slices, /var/log/pods), removed at the end if the test made
/// them; None, said, where this kernel has no cgroup v2.
fn kubelet_dirs(test: &str) -> Option<(PathBuf, (MadeDirs, PodLogs))> {
    let Some(cg) = cgroup2_mount() else {
        eprintln!("SKIPPED {test}: no cgroup v2 here");
        return None;
    };
    // The logs guard drops after the slices (fields drop in order), and
    // both after the pods, which the test declares later.
    let made = (
        MadeDirs::new(&cg, QOS_SLICE),
        PodLogs(!Path::new(POD_LOGS).exists()),
    );
    Some((cg, made))
}

/// Directories made down a path, removed (innermost first) when empty
/// again at the end.
struct MadeDirs(Vec<PathBuf>);

impl MadeDirs {
    fn new(base: &Path, path: &str) -> MadeDirs {
        let mut made = Vec::new();
        let mut dir = base.to_path_buf();
        for part in path.split('/') {
            dir.push(part);
            if std::fs::create_dir(&dir).is_ok() {
                made.push(dir.clone());
            }
        }
        MadeDirs(made)
    }
}

impl Drop for MadeDirs {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// /var/log/pods, removed at the end if the test made it (and it is
/// empty again).
struct PodLogs(bool);

impl Drop for PodLogs {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::fs::remove_dir(POD_LOGS);
        }
    }
}
