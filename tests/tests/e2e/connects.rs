//! The node view: the client nodes' own connection attempts, against what
//! the clients saw (their errno) and what the router dropped.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    time::Duration,
};

use ctrace::event::Proto;
use ctrace::lab::{
    incident_plan,
    topology::{CLIENTS_V4, SERVER_V4, Topology},
    traffic::{self, Planned},
};
use serde_json::Value;

use ctrace_tests::{Tracer, final_summary, full_lab, privileged, totals};

/// Whether this kernel runs the node view. It must wherever the tracepoint
/// tier runs (the same tracefs and BTF), so a probe that says no there is a
/// failure, not a skip.
fn node_view_usable() -> bool {
    let out = std::process::Command::new(ctrace_tests::ctrace_bin())
        .args(["probe", "--json"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let node = v["node_view"]["usable"] == true;
    let tracepoint = v["strategies"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["strategy"] == "tracepoint" && t["usable"] == true);
    assert!(
        node || !tracepoint,
        "the tracepoint tier runs here but the node view does not: {}",
        v["node_view"]
    );
    if !node {
        eprintln!("skipping: no node view here: {}", v["node_view"]["reason"]);
    }
    node
}

/// ctrace with the node view alone, on one namespace.
fn node_tracer(netns: u64) -> Tracer {
    Tracer::start(&[
        "--side",
        "node",
        "--netns",
        &netns.to_string(),
        "--interval",
        "500ms",
    ])
}

/// The `connects` rows of one namespace, by service.
fn connects(summary: &Value, netns: u64) -> BTreeMap<String, Value> {
    summary["connects"]
        .as_array()
        .expect("a connects section")
        .iter()
        .filter(|r| r["netns"].as_u64() == Some(netns))
        .map(|r| {
            (
                r["service"].as_str().unwrap_or("other").to_string(),
                r.clone(),
            )
        })
        .collect()
}

fn planned(service: &str, src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> Planned {
    Planned {
        service: service.into(),
        proto: Proto::Tcp,
        src: IpAddr::V4(src),
        dst: SocketAddr::new(IpAddr::V4(dst), port),
    }
}

#[test]
fn node_view_matches_the_clients_and_the_router() {
    if !privileged() || !ctrace_tests::ctnetlink() || !node_view_usable() {
        return;
    }
    let lab = full_lab();
    let (router, clients) = (lab.topo.router.inode(), lab.topo.clients.inode());
    // A listener on the client node itself: a connect that needs no router
    // and is established, and a closed port beside it that refuses.
    let local = CLIENTS_V4[0];
    let listener = lab
        .topo
        .clients
        .run(move || TcpListener::bind((local, 6443)))
        .unwrap()
        .unwrap();
    let tracer = Tracer::start(&[
        "--side",
        "both",
        "--netns",
        &router.to_string(),
        "--netns",
        &clients.to_string(),
        "--interval",
        "500ms",
    ]);
    let mut plan: Vec<Planned> = incident_plan(3)
        .into_iter()
        .filter(|p| p.proto == Proto::Tcp)
        .collect();
    plan.push(planned("kube-apiserver", local, local, 6443));
    plan.push(planned("kube-apiserver", local, local, 6443));
    plan.push(planned("etcd-client", local, local, 2379));
    let mut attempts =
        traffic::attempt_all(&lab.topo.clients, &plan, Duration::from_secs(3)).unwrap();
    // The client gives up first (no TCP_SYNCNT, its own 500 ms deadline):
    // aborted, as the kernel sees a close from SYN_SENT without an error.
    let aborted = lab
        .topo
        .clients
        .run(move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.bind(&SocketAddr::new(IpAddr::V4(local), 0).into())?;
            let r = s.connect_timeout(
                &SocketAddr::new(IpAddr::V4(SERVER_V4), 10250).into(),
                Duration::from_millis(500),
            );
            Ok::<_, std::io::Error>((s.local_addr()?.as_socket(), r))
        })
        .unwrap()
        .unwrap();
    assert!(
        aborted.1.is_err(),
        "a connect through a full table succeeded"
    );
    drop(listener);
    std::thread::sleep(Duration::from_millis(1200));
    let records = tracer.stop();
    let summary = final_summary(&records);

    // Ground truth: each attempt's outcome as its client saw it.
    let mut truth: BTreeMap<String, BTreeMap<&str, u64>> = BTreeMap::new();
    for a in &attempts {
        let t = truth.entry(a.planned.service.clone()).or_default();
        *t.entry("attempts").or_default() += 1;
        *t.entry(a.tcp_outcome()).or_default() += 1;
    }
    let t = truth.entry("kubelet".into()).or_default();
    *t.entry("attempts").or_default() += 1;
    *t.entry("aborted").or_default() += 1;
    for (service, want) in [
        ("ssh", "timeout"),
        ("etcd-peer", "timeout"),
        ("nvme-tcp", "timeout"),
        ("kube-apiserver", "established"),
        ("etcd-client", "refused"),
    ] {
        assert!(
            truth[service].get(want).copied().unwrap_or(0) > 0,
            "{service}: the clients saw no {want}: {truth:?}"
        );
    }

    let got = connects(summary, clients);
    let router_drops = totals(summary, router);
    for (service, t) in &truth {
        let row = got
            .get(service)
            .unwrap_or_else(|| panic!("no connects row for {service}: {got:?}"));
        let n = |k: &str| row[k].as_u64().unwrap();
        let want = |k: &str| t.get(k).copied().unwrap_or(0);
        assert_eq!(n("attempts"), want("attempts"), "{service}: {row}");
        assert_eq!(n("established"), want("established"), "{service}: {row}");
        assert_eq!(n("timeouts"), want("timeout"), "{service}: {row}");
        assert_eq!(n("refused"), want("refused"), "{service}: {row}");
        assert_eq!(n("unreachable"), want("unreachable"), "{service}: {row}");
        assert_eq!(n("aborted"), want("aborted"), "{service}: {row}");
        assert_eq!(
            n("failed"),
            n("timeouts") + n("refused") + n("unreachable") + n("aborted"),
            "{row}"
        );
        // Both ends of the path: the router's table-full flows of the
        // service are the attempts that got no answer on the client side
        // (timed out, or given up by the client first).
        let router_flows = router_drops
            .get(&(service.clone(), "table_full".to_string()))
            .map_or(0, |v| v.0);
        assert_eq!(
            router_flows,
            n("timeouts") + n("aborted"),
            "{service}: router table-full flows vs unanswered attempts: {router_drops:?} / {row}"
        );
        if n("timeouts") > 0 {
            assert!(n("syn_retransmits") >= n("timeouts"), "{row}");
        }
    }

    // One connect_failure record per failed attempt, with its own tuple.
    attempts.retain(|a| !a.ok);
    let failures: Vec<&Value> = records
        .iter()
        .filter(|r| r["type"] == "connect_failure" && r["netns"].as_u64() == Some(clients))
        .collect();
    assert_eq!(failures.len(), attempts.len() + 1, "{failures:#?}");
    for a in &attempts {
        let src = a.local.unwrap().to_string();
        let rec = failures
            .iter()
            .find(|r| r["src"] == src.as_str())
            .unwrap_or_else(|| panic!("no connect_failure for {src}: {failures:#?}"));
        assert_eq!(rec["dst"], a.planned.dst.to_string());
        assert_eq!(rec["service"], a.planned.service.as_str());
        assert_eq!(rec["outcome"], a.tcp_outcome());
        assert_eq!(rec["proto"], "tcp");
        if a.tcp_outcome() == "timeout" {
            assert!(rec["syn_retransmits"].as_u64().unwrap() >= 1, "{rec}");
            assert!(rec["elapsed_ms"].as_u64().unwrap() >= 900, "{rec}");
        }
    }
    let src = aborted.0.unwrap().to_string();
    let rec = failures
        .iter()
        .find(|r| r["src"] == src.as_str())
        .expect("a connect_failure for the aborted attempt");
    assert_eq!(rec["outcome"], "aborted");
    assert_eq!(rec["service"], "kubelet");
    assert_eq!(summary["connect_counters"]["lost_events"], 0, "{summary}");
}

/// Refused connects to distinct ports from several threads, as fast as
/// they go: every attempt counted, every failure either reported or
/// counted as lost, and ctrace's memory flat.
#[test]
fn connect_storm_is_counted_exactly_in_bounded_memory() {
    if !privileged() || !node_view_usable() {
        return;
    }
    let topo = Topology::build().unwrap();
    let clients = topo.clients.inode();
    let tracer = node_tracer(clients);
    std::thread::sleep(Duration::from_millis(800));
    let rss_before = ctrace_tests::status_kib(tracer.pid(), "VmRSS").unwrap_or(0);
    const THREADS: u32 = 4;
    const FIRST_PORT: u32 = 20_000;
    // 40,000 connects here; in a VM (TCG, ~20x slower) scaled with the
    // flood the matrix sends (40,000 SYNs there: 10,000 connects).
    let per_thread: u32 = std::env::var("CTRACE_TEST_FLOOD")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map_or(10_000, |flood| (flood / 16).clamp(100, 10_000))
        .min((65_535 - FIRST_PORT) / THREADS);
    let started = std::time::Instant::now();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            topo.clients
                .spawn("storm", move || {
                    let mut refused = 0u64;
                    for i in 0..per_thread {
                        // Ports 20000.. carry no service name: one row.
                        let port = (FIRST_PORT + t * per_thread + i) as u16;
                        // From one local address to another: a connect
                        // can never meet itself (simultaneous open).
                        let s = socket2::Socket::new(
                            socket2::Domain::IPV4,
                            socket2::Type::STREAM,
                            None,
                        )?;
                        s.bind(&SocketAddr::new(IpAddr::V4(CLIENTS_V4[0]), 0).into())?;
                        let to = SocketAddr::new(IpAddr::V4(CLIENTS_V4[1]), port);
                        if let Err(e) = s.connect(&to.into()) {
                            refused += u64::from(e.raw_os_error() == Some(libc::ECONNREFUSED));
                        }
                    }
                    Ok::<_, std::io::Error>(refused)
                })
                .unwrap()
        })
        .collect();
    let refused: u64 = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .sum();
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(1200));
    let rss_after = ctrace_tests::status_kib(tracer.pid(), "VmRSS").unwrap_or(0);
    let peak = ctrace_tests::status_kib(tracer.pid(), "VmHWM").unwrap_or(0);
    let records = tracer.stop();
    let summary = final_summary(&records);
    let total = u64::from(THREADS * per_thread);
    eprintln!(
        "connect storm: {total} connects to distinct ports in {:.2}s ({:.0}/s), {refused} refused; \
         ctrace RSS {:.1} -> {:.1} MiB, peak {:.1} MiB; counters {}",
        took.as_secs_f64(),
        total as f64 / took.as_secs_f64(),
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        peak as f64 / 1024.0,
        summary["connect_counters"]
    );
    assert_eq!(
        refused, total,
        "every connect to a closed local port is refused"
    );
    let rows = connects(summary, clients);
    assert_eq!(rows.len(), 1, "distinct ports, one service: {rows:?}");
    let row = &rows["other"];
    assert_eq!(row["attempts"].as_u64(), Some(total), "{row}");
    assert_eq!(row["refused"].as_u64(), Some(total), "{row}");
    assert_eq!(row["failed"].as_u64(), Some(total), "{row}");
    assert_eq!(row["established"].as_u64(), Some(0), "{row}");
    let reported = records
        .iter()
        .filter(|r| r["type"] == "connect_failure" && r["netns"].as_u64() == Some(clients))
        .count() as u64;
    let c = &summary["connect_counters"];
    assert_eq!(
        reported + c["lost_events"].as_u64().unwrap(),
        total,
        "failure records reported + lost must be every failure: {c}"
    );
    assert_eq!(c["undecodable"], 0, "{c}");
    // Per-attempt state is a bounded LRU map in the kernel and user space
    // keeps no per-flow state for connects: memory must not follow the
    // storm.
    let growth = (rss_after.saturating_sub(rss_before)) as f64 / 1024.0;
    assert!(
        growth < 16.0,
        "ctrace grew by {growth:.1} MiB over a storm of {total} failing connects"
    );
}

/// The other direction: handshakes that clients leave hanging on this
/// host's listeners show as SYN-ACK retransmits of the listener's service.
/// SYNs from an address nobody holds: the SYN-ACKs find no one to answer,
/// and the servers resend them after a second.
#[test]
fn half_open_handshakes_are_synack_retransmits_of_the_listener() {
    if !privileged() || !node_view_usable() {
        return;
    }
    let topo = Topology::build().unwrap();
    let servers = topo.servers.inode();
    let _l = traffic::Listeners::start(&topo.servers, &[22, 2380, 4420], &[]).unwrap();
    let tracer = node_tracer(servers);
    // One SYN to each of the flood's ten ports; three have a listener.
    let nobody = Ipv4Addr::new(10, 10, 0, 99);
    traffic::syn_flood(&topo.clients, nobody, SERVER_V4, 10).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let records = tracer.stop();
    let rows = connects(final_summary(&records), servers);
    for service in ["ssh", "etcd-peer", "nvme-tcp"] {
        let n = rows
            .get(service)
            .and_then(|r| r["synack_retransmits"].as_u64())
            .unwrap_or(0);
        assert!(
            (1..=2).contains(&n),
            "{service}: {n} SYN-ACK retransmits in 2.5 s for one half-open handshake: {rows:?}"
        );
    }
    for (service, r) in &rows {
        assert_eq!(
            r["attempts"], 0,
            "the servers connected nowhere: {service} {r}"
        );
        if !["ssh", "etcd-peer", "nvme-tcp"].contains(&service.as_str()) {
            assert_eq!(r["synack_retransmits"], 0, "no listener on {service}: {r}");
        }
    }
}

/// A connect the router answers with an ICMP error (it has no route to
/// the destination) fails as `unreachable`, not as a timeout. A blocking
/// connect: the first ICMP error arrives while connect() holds the socket
/// and is kept aside (sk_err_soft); the one answering the retransmitted SYN
/// a second later ends the attempt. (A non-blocking client that reads
/// SO_ERROR takes that first error itself and closes: to the kernel, and
/// so to ctrace, that attempt was aborted. See docs/usage.md.)
#[test]
fn an_icmp_error_is_unreachable() {
    if !privileged() || !node_view_usable() {
        return;
    }
    let topo = Topology::build().unwrap();
    let clients = topo.clients.inode();
    let tracer = node_tracer(clients);
    // The clients route everything to the router; the router has no
    // route to 10.10.9.0/24.
    let to = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 10, 9, 9)), 443);
    let (local, result) = topo
        .clients
        .run(move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.bind(&SocketAddr::new(IpAddr::V4(CLIENTS_V4[0]), 0).into())?;
            let local = s.local_addr()?.as_socket();
            Ok::<_, std::io::Error>((local, s.connect(&to.into())))
        })
        .unwrap()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let records = tracer.stop();
    let errno = result.as_ref().err().and_then(std::io::Error::raw_os_error);
    assert!(
        matches!(errno, Some(libc::ENETUNREACH | libc::EHOSTUNREACH)),
        "the client saw {result:?}"
    );
    let rows = connects(final_summary(&records), clients);
    let row = &rows["https"];
    assert_eq!(row["attempts"], 1, "{row}");
    assert_eq!(row["unreachable"], 1, "{row}");
    assert_eq!(row["failed"], 1, "{row}");
    let rec = records
        .iter()
        .find(|r| r["type"] == "connect_failure" && r["dst"] == to.to_string().as_str())
        .expect("a connect_failure record");
    assert_eq!(rec["outcome"], "unreachable", "{rec}");
    assert_eq!(rec["src"], local.unwrap().to_string().as_str());
}

/// A dual-stack socket connecting to an IPv4 address (::ffff:a.b.c.d, as
/// Java and `::`-bound clients do) is IPv4 on the wire and is reported so,
/// to line up with what the router sees.
#[test]
fn a_v4_mapped_connect_is_reported_as_ipv4() {
    if !privileged() || !node_view_usable() {
        return;
    }
    let topo = Topology::build().unwrap();
    let clients = topo.clients.inode();
    let tracer = node_tracer(clients);
    // Nothing listens on etcd's client port on the client node: refused.
    let to: SocketAddr = "[::ffff:10.10.0.3]:2379".parse().unwrap();
    let result = topo
        .clients
        .run(move || {
            let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
            s.set_only_v6(false)?;
            Ok::<_, std::io::Error>(s.connect(&to.into()))
        })
        .unwrap()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let records = tracer.stop();
    assert_eq!(
        result.as_ref().err().and_then(std::io::Error::raw_os_error),
        Some(libc::ECONNREFUSED),
        "{result:?}"
    );
    let rec = records
        .iter()
        .find(|r| r["type"] == "connect_failure" && r["netns"].as_u64() == Some(clients))
        .expect("a connect_failure record");
    assert_eq!(rec["family"], "ipv4", "{rec}");
    assert_eq!(rec["dst"], "10.10.0.3:2379", "{rec}");
    assert!(
        rec["src"].as_str().unwrap().starts_with("10.10.0."),
        "{rec}"
    );
    assert_eq!(rec["outcome"], "refused", "{rec}");
    assert_eq!(rec["service"], "etcd-client", "{rec}");
}

/// ctrace's start-up experiment (a SYN to 127.0.0.1:9 dropped in a
/// throwaway namespace, to learn where this kernel frees rule drops) is in
/// no view, and a second start of the same boot reuses what it found
/// instead of repeating it.
#[test]
fn own_experiment_is_in_no_view_and_runs_once_per_boot() {
    if !privileged() || !node_view_usable() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ctrace-facts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = || {
        let mut cmd = std::process::Command::new(ctrace_tests::ctrace_bin());
        cmd.args(["watch", "-v", "--json", "--side", "both", "--duration", "2"])
            .env(ctrace::kernel::found::DIR_ENV, &dir);
        if let Some(s) = ctrace_tests::strategy() {
            cmd.args(["--strategy", &s]);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        let records: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (records, err)
    };
    let (records, err) = run();
    let own = |records: &[Value]| -> Vec<Value> {
        records
            .iter()
            .filter(|r| r["type"] == "connect_failure" && r["dst"] == "127.0.0.1:9")
            .cloned()
            .collect()
    };
    assert!(
        own(&records).is_empty(),
        "the start-up experiment reached the node view: {:?}",
        own(&records)
    );
    if !err.contains("drop location: an nftables drop was freed") {
        eprintln!("skipping the second start: this tier runs no experiment ({err})");
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let (records, err) = run();
    assert!(own(&records).is_empty(), "{:?}", own(&records));
    assert!(
        err.contains("found at an earlier start of this boot"),
        "the second start repeated the experiment: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
