//! The Prometheus endpoint, the recording and the report, end to end: a
//! real Prometheus and a real node_exporter (Debian's packages, on
//! loopback ports) scrape ctrace during a table-full lab; the endpoint
//! answers inside a full namespace through its NOTRACK rule; the report
//! of a recorded lab names the services and sizes the table from its peak.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use ctrace::{
    lab::incident_plan,
    netlink::{
        ctnetlink::{CtEntry, CtSocket},
        nftables::{self, NotrackRule},
    },
};
use ctrace_common::IPPROTO_UDP;
use ctrace_tests::{Tracer, ctrace_bin, privileged};
use serde_json::Value;

use super::{conntrack_drops, full_lab};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const NODE_EXPORTER: &str = "/usr/bin/prometheus-node-exporter";
const PROMTOOL: &str = "/usr/bin/promtool";

fn have(bins: &[&str], test: &str) -> bool {
    let missing: Vec<_> = bins.iter().filter(|b| !Path::new(b).exists()).collect();
    if !missing.is_empty() {
        // `cargo xtask test` installs them; VMs have no room for them.
        eprintln!("SKIPPED {test}: {missing:?} not installed");
    }
    missing.is_empty()
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

pub(super) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ctrace-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A helper process killed when the test ends, however it ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET over a fresh connection; (status, body). One request, connection
/// closed by the server: enough for a test client.
pub(super) fn get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    // Prometheus answers chunked; its JSON starts at the first brace.
    let body = match body.find('{') {
        Some(i) if path.starts_with("/api/") => {
            body[i..body.rfind('}').map_or(body.len(), |e| e + 1)].to_string()
        }
        _ => body.to_string(),
    };
    Ok((status, body))
}

/// Polls `f` until it gives Ok; the last Err says what was seen instead.
fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> Result<String, String>) -> String {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            Ok(v) => return v,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last seen: {seen}"
            ),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A PromQL expression as a query-string value.
fn url_encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Prometheus' instant query; the vector's (labels, value) pairs.
fn query(prom: SocketAddr, q: &str) -> Vec<(Value, f64)> {
    let enc = url_encode(q);
    let Ok((200, body)) = get(
        prom,
        &format!("/api/v1/query?query={enc}"),
        Duration::from_secs(5),
    ) else {
        return vec![];
    };
    let v: Value = serde_json::from_str(&body).unwrap_or_default();
    v["data"]["result"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|s| {
                    let val = s["value"][1]
                        .as_str()
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(f64::NAN);
                    (s["metric"].clone(), val)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn own_netns() -> u64 {
    ctrace::netns::NetNs::current().unwrap().inode()
}

/// Entries in the test's own namespace (the host's) while it runs, so
/// that the gauges compared with node_exporter's are not all zero: 500
/// UDP entries made over ctnetlink (no conntrack hooks, so no churn from
/// the scrapes where the host tracks nothing), deleted after.
struct HostEntries(CtSocket, Vec<CtEntry>);

impl HostEntries {
    fn add() -> HostEntries {
        let mut ct = CtSocket::open(None).unwrap();
        let entries: Vec<CtEntry> = (0..500u16)
            .map(|i| {
                CtEntry::assured(
                    IPPROTO_UDP,
                    "10.250.0.1".parse().unwrap(),
                    20000 + i,
                    "10.250.0.2".parse().unwrap(),
                    5353,
                    600,
                )
            })
            .collect();
        let made = ct.create_batch(&mut entries.iter().copied()).unwrap();
        assert_eq!(made.created, 500, "{made:?}");
        HostEntries(ct, entries)
    }
}

impl Drop for HostEntries {
    fn drop(&mut self) {
        for e in &self.1 {
            let _ = self.0.delete(e);
        }
    }
}

#[test]
fn prometheus_scrapes_ctrace_like_node_exporter_and_the_alerts_fire() {
    const TEST: &str = "prometheus_scrapes_ctrace_like_node_exporter_and_the_alerts_fire";
    if !privileged()
        || !ctrace_tests::ctnetlink()
        || !have(&[PROMETHEUS, NODE_EXPORTER, PROMTOOL], TEST)
    {
        return;
    }
    let dir = tmpdir("prometheus");
    let _entries = HostEntries::add();
    let (p_ctrace, p_node, p_prom) = (free_port(), free_port(), free_port());
    let lab = full_lab();
    let router = lab.topo.router.inode();
    let tracer = Tracer::start(&["--interval", "500ms", "--metrics", &p_ctrace.to_string()]);
    let _node = Daemon(
        Command::new(NODE_EXPORTER)
            .args([
                &format!("--web.listen-address=127.0.0.1:{p_node}"),
                "--collector.disable-defaults",
                "--collector.conntrack",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let rules = repo_file("deploy/prometheus/ctrace-rules.yml");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: ctrace\n    static_configs:\n      - targets: ['127.0.0.1:{p_ctrace}']\n\
             \x20 - job_name: node\n    static_configs:\n      - targets: ['127.0.0.1:{p_node}']\n",
            rules.display()
        ),
    )
    .unwrap();
    let _prom = Daemon(
        Command::new(PROMETHEUS)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{p_prom}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let prom: SocketAddr = format!("127.0.0.1:{p_prom}").parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{p_ctrace}").parse().unwrap();

    // Prometheus must have the router's series at zero before the drops,
    // as it would on a router watched before its incident.
    wait_for("the first scrapes", Duration::from_secs(60), || {
        let r = query(
            prom,
            &format!("ctrace_table_full_drops_total{{netns=\"{router}\"}}"),
        );
        let n = query(prom, "up{job=\"node\"} == 1");
        if r.is_empty() || n.is_empty() {
            Err(format!("ctrace {r:?}, node_exporter {n:?}"))
        } else {
            Ok(String::new())
        }
    });

    // The incident: new flows into the full router table.
    let before = conntrack_drops(&lab.topo.router);
    let plan = incident_plan(2);
    let attempts =
        ctrace::lab::traffic::attempt_all(&lab.topo.clients, &plan, Duration::from_millis(2500))
            .unwrap();
    assert!(attempts.iter().all(|a| !a.ok), "{attempts:?}");
    let kernel_drops = conntrack_drops(&lab.topo.router) - before;

    // promtool accepts what ctrace serves.
    let (status, text) = get(metrics, "/metrics", Duration::from_secs(5)).unwrap();
    assert_eq!(status, 200, "{text}");
    let mut check = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Beside node_exporter and the Prometheus Operator: no series of its
    // names, no label the Operator sets on every target.
    const OPERATOR_LABELS: [&str; 8] = [
        "pod",
        "namespace",
        "node",
        "container",
        "service",
        "endpoint",
        "instance",
        "job",
    ];
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.starts_with("ctrace_"), "not ctrace's own: {line}");
        let labels = line.split_once('{').map_or("", |(_, l)| l);
        for label in OPERATOR_LABELS {
            assert!(
                !labels.starts_with(&format!("{label}=\""))
                    && !labels.contains(&format!(",{label}=\"")),
                "label {label} would become exported_{label}: {line}"
            );
        }
    }

    // conntrack's numbers for the initial namespace, from both: ctrace's
    // own series against node_exporter's.
    let own = own_netns();
    for (metric, theirs) in [
        (
            "ctrace_conntrack_entries_limit",
            "node_nf_conntrack_entries_limit",
        ),
        ("ctrace_conntrack_entries", "node_nf_conntrack_entries"),
        (
            "ctrace_conntrack_stat_drop_total",
            "node_nf_conntrack_stat_drop",
        ),
        (
            "ctrace_conntrack_stat_early_drop_total",
            "node_nf_conntrack_stat_early_drop",
        ),
        (
            "ctrace_conntrack_stat_insert_failed_total",
            "node_nf_conntrack_stat_insert_failed",
        ),
        (
            "ctrace_conntrack_stat_invalid_total",
            "node_nf_conntrack_stat_invalid",
        ),
    ] {
        // Loopback scrapes can move the initial namespace's numbers
        // between the two scrapes: they must meet, not race.
        let seen = wait_for(metric, Duration::from_secs(60), || {
            let ours = query(prom, &format!("{metric}{{job=\"ctrace\",netns=\"{own}\"}}"));
            let theirs = query(prom, &format!("{theirs}{{job=\"node\"}}"));
            match (ours.first(), theirs.first()) {
                (Some(a), Some(b)) if a.1 == b.1 => Ok(format!("{} = {}", a.1, b.1)),
                _ => Err(format!("ctrace {ours:?}, node_exporter {theirs:?}")),
            }
        });
        eprintln!("{metric}: ctrace and node_exporter agree: {seen}");
    }

    // The incident's 80% alert and ctrace's drop alert fire for the router.
    let router_label = router.to_string();
    let firing = wait_for("the alerts to fire", Duration::from_secs(60), || {
        let (_, body) =
            get(prom, "/api/v1/alerts", Duration::from_secs(5)).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        let alerts = v["data"]["alerts"].as_array().cloned().unwrap_or_default();
        let fires = |name: &str| {
            alerts.iter().any(|a| {
                a["labels"]["alertname"] == name
                    && a["labels"]["netns"].as_str() == Some(router_label.as_str())
                    && a["state"] == "firing"
            })
        };
        let all = serde_json::to_string(&alerts).unwrap();
        if fires("ConntrackTableNearlyFull") && fires("ConntrackTableFullDrops") {
            Ok(all)
        } else {
            Err(all)
        }
    });
    eprintln!("firing: {firing}");
    // ctrace's table-full packets, through Prometheus, meet conntrack's
    // own drop count (scrapes trail the drops by an interval or two).
    let q = format!("sum(ctrace_drops_packets_total{{cause=\"table_full\",netns=\"{router}\"}})");
    let seen = wait_for("the drops in Prometheus", Duration::from_secs(60), || {
        // conntrack's count now: a late retransmission counts on both sides.
        let kernel = conntrack_drops(&lab.topo.router) - before;
        let got = query(prom, &q).first().map(|d| d.1 as u64);
        if got == Some(kernel) {
            Ok(format!(
                "{kernel} = conntrack {kernel} (right after the attempts: {kernel_drops})"
            ))
        } else {
            Err(format!(
                "{got:?} in Prometheus, {kernel} counted by conntrack"
            ))
        }
    });
    eprintln!("table-full packets: Prometheus {seen}");
    dashboard_queries_run(prom);
    let records = tracer.stop();
    assert!(!records.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every query of the Grafana dashboard is valid PromQL to a real
/// Prometheus, and names series ctrace serves (evictions appear only once
/// something is evicted, filling rates while entries are made; the node
/// view's only where the kernel runs it).
fn dashboard_queries_run(prom: SocketAddr) {
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("deploy/kubernetes/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let (_, names) = get(
        prom,
        "/api/v1/label/__name__/values",
        Duration::from_secs(5),
    )
    .unwrap();
    let names: Value = serde_json::from_str(&names).unwrap();
    let names: Vec<&str> = names["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*")
                .replace("$node", ".*");
            let enc = url_encode(&expr);
            let (status, body) = get(
                prom,
                &format!("/api/v1/query?query={enc}"),
                Duration::from_secs(5),
            )
            .unwrap();
            assert_eq!(status, 200, "{expr}: {body}");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                let ours = word.starts_with("ctrace_");
                let node_view_off = word.starts_with("ctrace_connect_")
                    && !names.contains(&"ctrace_connect_lost_records_total");
                // Filling rates exist only while entries are being made,
                // and this table is full.
                let only_while = [
                    "ctrace_evictions_total",
                    "ctrace_filling_new_entries_per_second",
                ];
                if ours && !only_while.contains(&word) && !node_view_off {
                    assert!(
                        names.contains(&word),
                        "{word} (panel {}) not served",
                        panel["title"]
                    );
                }
            }
        }
    }
}

#[test]
fn metrics_answer_inside_a_full_table_only_through_notrack() {
    if !privileged() || !ctrace_tests::ctnetlink() {
        return;
    }
    let lab = full_lab();
    let router = lab.topo.router.inode().to_string();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let scrape = |lab: &super::FullLab| {
        lab.topo
            .router
            .run(move || get(addr, "/metrics", Duration::from_secs(3)))
            .unwrap()
    };
    let args = |notrack: bool| {
        let mut a = vec![
            "--netns".to_string(),
            router.clone(),
            "--interval".into(),
            "500ms".into(),
            "--metrics".into(),
            port.to_string(),
            "--metrics-netns".into(),
            router.clone(),
        ];
        if notrack {
            a.push("--metrics-notrack".into());
        }
        a
    };

    // Without the rule, the full table refuses the scrape's SYN.
    let a = args(false);
    let tracer = Tracer::start(&a.iter().map(String::as_str).collect::<Vec<_>>());
    std::thread::sleep(Duration::from_secs(1));
    let before = conntrack_drops(&lab.topo.router);
    let refused = scrape(&lab);
    assert!(
        refused.is_err(),
        "a scrape got through a full table: {refused:?}"
    );
    assert!(conntrack_drops(&lab.topo.router) > before);
    tracer.stop();

    // With it, the endpoint answers, with the router's full table in it.
    let a = args(true);
    let tracer = Tracer::start(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let table = NotrackRule::table_name(port);
    assert!(nftables::table_exists(Some(&lab.topo.router), &table).unwrap());
    let body = wait_for(
        "a scrape through NOTRACK",
        Duration::from_secs(10),
        || match scrape(&lab) {
            Ok((200, body)) => Ok(body),
            other => Err(format!("{other:?}")),
        },
    );
    let limit = body
        .lines()
        .find(|l| l.starts_with(&format!("ctrace_conntrack_entries{{netns=\"{router}\"}}")))
        .unwrap_or_else(|| panic!("no router entries in:\n{body}"));
    let entries: u64 = limit.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(entries >= super::global_max() - 1, "{limit}");
    tracer.stop();
    assert!(
        !nftables::table_exists(Some(&lab.topo.router), &table).unwrap(),
        "table inet {table} outlived ctrace"
    );
}

#[test]
fn report_of_a_recorded_lab_names_the_services_and_sizes_from_the_peak() {
    // The lab fills its table over ctnetlink.
    if !privileged() || !ctrace_tests::ctnetlink() {
        return;
    }
    let dir = tmpdir("report");
    let rec = dir.join("lab.ndjson");
    let mut lab = Command::new(ctrace_bin());
    lab.args(["lab", "--json", "--max", "4096", "--flows", "2", "--record"])
        .arg(&rec);
    if let Some(s) = ctrace_tests::strategy() {
        lab.args(["--strategy", &s]);
    }
    let out = lab.output().unwrap();
    if ctrace_tests::lab_left_out(&out) {
        return;
    }
    // With --json the verdict is the only stdout that is not a record.
    let verdict: Vec<_> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('{'))
        .map(str::to_owned)
        .collect();
    assert!(
        out.status.success(),
        "lab failed:\n{}\n{}",
        verdict.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    let report = |files: &[&Path]| {
        Command::new(ctrace_bin())
            .arg("report")
            .args(files)
            .arg("--html")
            .arg(dir.join("r.html"))
            .output()
            .unwrap()
    };
    let r = report(&[&rec]);
    let md = String::from_utf8_lossy(&r.stdout).into_owned();
    assert!(
        r.status.success(),
        "{md}\n{}",
        String::from_utf8_lossy(&r.stderr)
    );
    for service in ctrace::lab::LAB_SERVICES.iter().map(|s| s.0) {
        assert!(
            md.lines()
                .any(|l| l.starts_with(&format!("| {service} | table_full |"))),
            "{service} missing from the affected services:\n{md}"
        );
    }
    // The peak the recording saw, and the advice built on it.
    let text = std::fs::read_to_string(&rec).unwrap();
    let peak = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "summary")
        .flat_map(|v| v["netns"].as_array().cloned().unwrap_or_default())
        .filter_map(|n| n["count"].as_u64())
        .max()
        .unwrap();
    let advised: u64 = md
        .lines()
        .find_map(|l| l.strip_prefix("sysctl -w net.netfilter.nf_conntrack_max="))
        .unwrap_or_else(|| panic!("no nf_conntrack_max advice:\n{md}"))
        .parse()
        .unwrap();
    assert!(advised.is_power_of_two(), "{advised}");
    assert!(
        advised as f64 * 0.8 >= peak as f64 && (advised / 2) as f64 * 0.8 < peak as f64 + 1000.0,
        "advised {advised} for a peak of {peak}"
    );
    let html = std::fs::read_to_string(dir.join("r.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("Table fill over time"));

    // Cut the recording mid-line: the report covers what came before and
    // says where it broke.
    let cut = dir.join("cut.ndjson");
    let lines: Vec<&str> = text.lines().collect();
    let keep = lines.len() - 2;
    let mut broken = lines[..keep].join("\n");
    broken.push('\n');
    broken.push_str(&lines[keep][..lines[keep].len() / 2]);
    std::fs::write(&cut, broken).unwrap();
    let r = report(&[&cut]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cut.ndjson:{}:", keep + 1)) && err.contains("cut short"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&r.stdout).contains("## Affected services"));

    // Not a recording at all: a usage error, no report.
    let junk = dir.join("junk.txt");
    std::fs::write(&junk, "hello\n").unwrap();
    let r = report(&[&junk]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("junk.txt:1: not a ctrace recording"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_namespace_is_labelled_with_its_pod() {
    if !privileged() || !ctrace_tests::ctnetlink() {
        return;
    }
    let lab = full_lab();
    let router = lab.topo.router.inode();
    // A kubelet's traces in a fixture root: a process of the pod in the
    // router's namespace, its kubepods cgroup, the pod's log directory.
    const UID: &str = "0d1e2f30-4a5b-4c6d-8e9f-a0b1c2d3e4f5";
    let root = tmpdir("podroot");
    let p = root.join("proc/31337");
    std::fs::create_dir_all(p.join("ns")).unwrap();
    std::os::unix::fs::symlink(format!("net:[{router}]"), p.join("ns/net")).unwrap();
    std::fs::write(p.join("comm"), "etcd\n").unwrap();
    std::fs::write(p.join("cmdline"), "etcd\0").unwrap();
    std::fs::write(
        p.join("cgroup"),
        format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-1.scope\n",
            UID.replace('-', "_")
        ),
    )
    .unwrap();
    std::fs::create_dir_all(root.join(format!("var/log/pods/kube-system_etcd-node1_{UID}")))
        .unwrap();
    let port = free_port();
    let tracer = Tracer::start(&[
        "--netns",
        &router.to_string(),
        "--interval",
        "500ms",
        "--host-root",
        root.to_str().unwrap(),
        "--metrics",
        &port.to_string(),
    ]);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let info = wait_for("ctrace_netns_info", Duration::from_secs(10), || {
        let (_, body) = get(addr, "/metrics", Duration::from_secs(3)).map_err(|e| e.to_string())?;
        body.lines()
            .find(|l| {
                l.starts_with("ctrace_netns_info{") && l.contains(&format!("netns=\"{router}\""))
            })
            .map(str::to_string)
            .ok_or(body)
    });
    let records = tracer.stop();
    let _ = std::fs::remove_dir_all(&root);
    assert!(info.contains("k8s_namespace=\"kube-system\""), "{info}");
    assert!(info.contains("k8s_pod=\"etcd-node1\""), "{info}");
    // Process names are free text: in the JSON, never a label.
    assert!(!info.contains("processes="), "{info}");
    let ns = ctrace_tests::final_summary(&records)["netns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["inode"] == router)
        .cloned()
        .unwrap();
    assert_eq!(ns["pod"], "kube-system/etcd-node1", "{ns}");
}

#[test]
fn abusive_scrapers_cannot_stall_tracing() {
    if !privileged() {
        return;
    }
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let tracer = Tracer::start(&["--interval", "200ms", "--metrics", &port.to_string()]);
    wait_for("a first scrape", Duration::from_secs(10), || {
        match get(addr, "/metrics", Duration::from_secs(3)) {
            Ok((200, _)) => Ok(String::new()),
            other => Err(format!("{other:?}")),
        }
    });
    // A malformed request is refused with an HTTP error, not a hang.
    let bad = (|| -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(b"NOT HTTP AT ALL\r\n\r\n")?;
        let mut r = String::new();
        s.read_to_string(&mut r)?;
        Ok(r)
    })();
    // Slowloris: many connections that never finish their request head.
    let abuse_began = std::time::SystemTime::now();
    let idle: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
            s
        })
        .collect();
    // The server closes every idle connection by itself: the excess ones at
    // once, the others when their head is overdue.
    let started = Instant::now();
    let mut answered = 0;
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            // EOF, or the start of a refusal (408): either way not left open.
            Ok(n) => answered += usize::from(n > 0),
            Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "left open"),
        }
    }
    let closed_in = started.elapsed();
    let abuse_ended = std::time::SystemTime::now();
    let ok = get(addr, "/metrics", Duration::from_secs(5)).unwrap();
    let records = tracer.stop();
    // Summaries written while the connections were held.
    let summaries = records
        .iter()
        .filter(|r| r["type"] == "summary")
        .filter_map(|r| humantime::parse_rfc3339(r["time"].as_str()?).ok())
        .filter(|t| (abuse_began..=abuse_ended).contains(t))
        .count();
    eprintln!(
        "idle connections closed within {closed_in:?} ({answered} with a response); {summaries} summaries meanwhile; bad request: {bad:?}"
    );
    assert_eq!(ok.0, 200);
    assert!(
        bad.as_ref().is_ok_and(|r| r.starts_with("HTTP/1.1 400")),
        "{bad:?}"
    );
    // One summary per 200 ms was asked for: a loop the connections
    // stalled would write none in the seconds they were held.
    assert!(
        summaries >= 2,
        "{summaries} summaries in the {closed_in:?} the connections were held"
    );
}

/// An output that fails (its directory removed, as a full or cleaned /tmp
/// would) is reported and retried; tracing, the other outputs and the
/// endpoint go on, and ctrace ends normally.
#[test]
fn a_failing_output_never_stops_tracing() {
    if !privileged() {
        return;
    }
    let dir = tmpdir("sinkfail");
    let textfile = dir.join("ctrace.prom");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let tracer = Tracer::start(&[
        "--interval",
        "200ms",
        "--metrics",
        &port.to_string(),
        "--textfile",
        textfile.to_str().unwrap(),
    ]);
    wait_for("a first textfile", Duration::from_secs(10), || {
        std::fs::read_to_string(&textfile)
            .ok()
            .filter(|t| t.contains("ctrace_build_info"))
            .ok_or_else(|| "not yet".to_string())
    });
    std::fs::remove_dir_all(&dir).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let scrape = get(addr, "/metrics", Duration::from_secs(5)).unwrap();
    let (records, status) = tracer.stop_with(libc::SIGINT);
    assert!(status.success(), "{status:?}");
    assert_eq!(scrape.0, 200);
    assert!(
        scrape
            .1
            .contains("ctrace_sink_errors_total{sink=\"--textfile\"}"),
        "{}",
        scrape.1
    );
    let summaries = records.iter().filter(|r| r["type"] == "summary").count();
    let last = ctrace_tests::final_summary(&records);
    let errors = &last["sink_errors"]["--textfile"];
    assert!(errors["errors"].as_u64() > Some(0), "{last}");
    assert!(
        errors["failing"]
            .as_str()
            .is_some_and(|e| e.contains("No such file")),
        "{errors}"
    );
    assert!(summaries >= 5, "summaries went on: {summaries}");
}
