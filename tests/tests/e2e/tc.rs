//! The tc tier (`--strategy tc`) against ground truth, as on stock OpenWrt:
//! kernel BTF withheld, no ctnetlink used by ctrace (tables read from
//! procfs) or by the tests (tables filled with real connections, counters
//! read from procfs), so the same tests run on the OpenWrt-configured
//! kernel of the VM matrix, which has neither. Forwarded flows (etcd-peer,
//! nvme-tcp to the servers) and flows to the router itself (its ssh and
//! DNS), plain and masqueraded, in a full table and behind a rule.
use std::{net::IpAddr, net::SocketAddr, time::Duration};

use ctrace::{
    event::Proto,
    kernel::{WITHHOLD_BTF, procfs::ProcConntrack},
    lab::{
        SysctlGuard,
        topology::{CLIENTS_V4, ROUTER_CLIENT_SIDE_V4, SERVER_V4, Topology},
        traffic::{self, Planned},
    },
    netlink::nftables,
    netlink::rtnetlink::RtSocket,
    netns::NetNs,
    table::SOURCE_ENV,
};
use ctrace_tests::{Tracer, drops, final_summary, privileged, totals};

use super::{MAX, failed_by_service};

/// The table size the tests fill (global nf_conntrack_max, restored after):
/// small, so that real connections fill it in a second.
const FILL: usize = 384;
/// How far below the established connections the maximum goes.
const FILL_MARGIN: usize = 32;

/// (service, proto, port, served by the router itself)
const SERVICES: [(&str, Proto, u16, bool); 4] = [
    ("etcd-peer", Proto::Tcp, 2380, false),
    ("nvme-tcp", Proto::Tcp, 4420, false),
    ("ssh", Proto::Tcp, 22, true),
    ("dns", Proto::Udp, 53, true),
];

fn plan(per_service: usize) -> Vec<Planned> {
    let mut plan = Vec::new();
    for (service, proto, port, local) in SERVICES {
        for i in 0..per_service {
            let dst = if local {
                ROUTER_CLIENT_SIDE_V4
            } else {
                SERVER_V4
            };
            plan.push(Planned {
                service: service.into(),
                proto,
                src: IpAddr::V4(CLIENTS_V4[i % CLIENTS_V4.len()]),
                dst: SocketAddr::new(IpAddr::V4(dst), port),
            });
        }
    }
    plan
}

struct RouterLab {
    topo: Topology,
    _servers: traffic::Listeners,
    _router: traffic::Listeners,
}

fn router_lab() -> RouterLab {
    let topo = Topology::build().expect("building namespaces");
    let servers = traffic::Listeners::start(&topo.servers, &[2380, 4420], &[]).unwrap();
    let router = traffic::Listeners::start(&topo.router, &[22], &[53]).unwrap();
    RouterLab {
        topo,
        _servers: servers,
        _router: router,
    }
}

/// The tc tests force the tc tier: they run on the host, and in a matrix
/// run (one pass per strategy) only in a `tc` pass.
fn tc_wanted() -> bool {
    if !privileged() {
        return false;
    }
    match std::env::var("CTRACE_TEST_STRATEGY").ok().as_deref() {
        None | Some("") | Some("tc") => true,
        Some(s) => {
            eprintln!("SKIPPED: forces the tc tier; runs in a tc pass, not the {s} one");
            false
        }
    }
}

fn tc_tracer(router: &NetNs, extra: &[&str]) -> Tracer {
    let ns = router.inode().to_string();
    let mut args = vec!["--netns", ns.as_str(), "--interval", "500ms"];
    args.extend_from_slice(extra);
    Tracer::start_with(
        &args,
        Some("tc"),
        &[(WITHHOLD_BTF, "1"), (SOURCE_ENV, "procfs")],
    )
}

/// Soft RLIMIT_NOFILE up to the hard limit.
fn raise_fd_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// conntrack's own `drop` counter in `ns`, from procfs.
fn conntrack_drops(ns: &NetNs) -> u64 {
    ProcConntrack::open(Some(ns)).unwrap().stats().unwrap().drop
}

/// A router table full of real, established etcd-client connections.
struct Full {
    _max: SysctlGuard,
    _held: Vec<std::net::TcpStream>,
}

/// Opens FILL connections, then lowers nf_conntrack_max below them. Above
/// 95% fill the GC reaps entries that are closing or unassured (what a
/// healthy phase leaves); with more established entries than the maximum
/// the table stays full whatever it reaps.
fn fill(lab: &RouterLab) -> Full {
    // Two descriptors per connection: more than a soft limit of 1024
    // (the VMs' init) allows with the rest of the process.
    raise_fd_limit();
    let conns = traffic::fill_with_connections(
        &lab.topo.clients,
        &lab.topo.servers,
        CLIENTS_V4[3],
        SocketAddr::new(IpAddr::V4(SERVER_V4), 2379),
        FILL,
    )
    .unwrap();
    assert_eq!(conns.held.len() / 2, FILL, "{:?}", conns.refused);
    let max = SysctlGuard::set(MAX, &(FILL - FILL_MARGIN).to_string()).unwrap();
    let stats = ProcConntrack::open(Some(&lab.topo.router))
        .unwrap()
        .stats()
        .unwrap();
    assert!(
        stats.entries >= stats.max && stats.max as usize == FILL - FILL_MARGIN,
        "the table is not full: {stats:?}"
    );
    Full {
        _max: max,
        _held: conns.held,
    }
}

/// A healthy phase (nothing may be reported), then a full table: every
/// failed connect is a table_full flow of its service, and the packets are
/// conntrack's drop count.
fn full_table_run(masquerade: bool) {
    let lab = router_lab();
    let router = lab.topo.router.inode();
    if masquerade {
        nftables::masquerade(&lab.topo.router).unwrap();
    }
    let tracer = tc_tracer(&lab.topo.router, &[]);

    let healthy =
        traffic::attempt_all(&lab.topo.clients, &plan(2), Duration::from_millis(2500)).unwrap();
    assert!(
        healthy.iter().all(|a| a.ok),
        "with room in the table every flow must pass: {healthy:?}"
    );

    let _full = fill(&lab);
    let before = conntrack_drops(&lab.topo.router);
    let attempts =
        traffic::attempt_all(&lab.topo.clients, &plan(4), Duration::from_millis(2500)).unwrap();
    // Past the judging window, so the last retries are judged live too.
    std::thread::sleep(Duration::from_millis(1500));
    let conntrack = conntrack_drops(&lab.topo.router) - before;
    let records = tracer.stop();

    assert!(
        attempts.iter().all(|a| !a.ok),
        "with a full table every new flow must fail: {attempts:?}"
    );
    let failed = failed_by_service(&attempts);
    let summary = final_summary(&records);
    assert_eq!(summary["strategy"], "tc", "{summary}");
    let got = totals(summary, router);
    let mut packets = 0;
    for service in failed.keys().map(String::as_str) {
        let (flows, pkts) = got
            .get(&(service.to_string(), "table_full".to_string()))
            .copied()
            .unwrap_or_default();
        assert_eq!(
            flows, failed[service],
            "{service}: ctrace's table_full flows vs failed connects; summary: {got:?}"
        );
        packets += pkts;
    }
    assert_eq!(
        got.values().map(|v| v.1).sum::<u64>(),
        packets,
        "no other service or cause: {got:?}; agreement: {}",
        summary["agreement"]
    );
    assert_eq!(
        packets, conntrack,
        "ctrace packets vs conntrack's drop counter; summary: {got:?}"
    );

    // Who fills the table, read from procfs: the etcd-client connections.
    let occ = summary["occupancy"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["inode"] == router)
        .unwrap_or_else(|| panic!("no occupancy for the router: {summary}"));
    let total = occ["total"].as_u64().unwrap();
    let etcd = occ["by_service"]["etcd-client"].as_u64().unwrap_or(0);
    assert!(
        total as usize >= FILL - FILL_MARGIN && etcd as usize >= FILL - FILL_MARGIN,
        "occupancy from procfs: {occ}"
    );
    let table = summary["netns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["inode"] == router);
    if let Some(t) = table {
        assert_eq!(t["table_source"], "procfs", "{t}");
    }

    // Precision and recall by tuple: every failed attempt has its record,
    // and nothing else (the healthy phase's flows least of all) has one.
    let d = drops(&records);
    let mut found = 0;
    for a in &attempts {
        let src = a.local.unwrap().to_string();
        let rec = d
            .iter()
            .find(|r| r["src"] == src.as_str())
            .unwrap_or_else(|| panic!("no drop record for {src} ({})", a.planned.service));
        assert_eq!(rec["dst"], a.planned.dst.to_string());
        assert_eq!(rec["service"], a.planned.service.as_str());
        assert_eq!(rec["cause"], "table_full");
        assert_eq!(rec["strategy"], "tc");
        found += 1;
    }
    for a in &healthy {
        let src = a.local.unwrap().to_string();
        assert!(
            !d.iter().any(|r| r["src"] == src.as_str()),
            "a flow that passed was reported dropped: {src}"
        );
    }
    assert_eq!(
        d.len(),
        found,
        "drop records beyond the failed attempts: {d:?}"
    );
    eprintln!(
        "tc tier{}: recall {found}/{} failed flows, precision {found}/{} records, \
         {packets} packets = conntrack's {conntrack}",
        if masquerade { " (masquerade)" } else { "" },
        attempts.len(),
        d.len()
    );
}

#[test]
fn tc_full_table_forwarded_and_local_flows_match_ground_truth() {
    if !tc_wanted() {
        return;
    }
    full_table_run(false);
}

#[test]
fn tc_full_table_behind_masquerade_matches_ground_truth() {
    if !tc_wanted() {
        return;
    }
    full_table_run(true);
}

#[test]
fn tc_rule_drops_are_not_table_full_and_passing_flows_are_never_reported() {
    if !tc_wanted() {
        return;
    }
    let lab = router_lab();
    let router = lab.topo.router.inode();
    nftables::drop_tcp_dport(&lab.topo.router, 2380).unwrap();
    let tracer = tc_tracer(&lab.topo.router, &[]);
    let attempts =
        traffic::attempt_all(&lab.topo.clients, &plan(3), Duration::from_millis(2500)).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let records = tracer.stop();

    for a in &attempts {
        assert_eq!(
            a.ok,
            a.planned.service != "etcd-peer",
            "only etcd-peer is blocked by the rule: {a:?}"
        );
    }
    let got = totals(final_summary(&records), router);
    assert!(
        !got.keys().any(|(_, cause)| cause == "table_full"),
        "a table with room must not be blamed: {got:?}"
    );
    let etcd: u64 = got
        .iter()
        .filter(|((s, _), _)| s == "etcd-peer")
        .map(|(_, v)| v.0)
        .sum();
    assert_eq!(etcd, 3, "every blocked etcd-peer flow is reported: {got:?}");
    let d = drops(&records);
    for a in attempts.iter().filter(|a| a.ok) {
        let src = a.local.unwrap().to_string();
        assert!(
            !d.iter().any(|r| r["src"] == src.as_str()),
            "a flow that passed was reported dropped: {a:?}"
        );
    }
    assert!(d.iter().all(|r| r["service"] == "etcd-peer"), "{d:?}");
}

/// ctrace's tc programs still attached by TCX in `ns`.
fn tcx_left(ns: &NetNs) -> Vec<String> {
    ctrace::strategy::tc::leftover_tcx(ns).unwrap()
}

/// Links of `ns` with a clsact qdisc, over rtnetlink (busybox's tc(8)
/// does not show bpf filters, and the VMs have only busybox).
fn clsact_qdiscs(ns: &NetNs) -> Vec<u32> {
    RtSocket::open(Some(ns)).unwrap().clsact_links().unwrap()
}

/// tc filters on the clsact qdiscs of the lab's two router links: ctrace's
/// are the only ones in a throwaway namespace.
fn clsact_left(ns: &NetNs) -> usize {
    let mut rt = RtSocket::open(Some(ns)).unwrap();
    ["to-clients", "to-servers"]
        .into_iter()
        .map(|dev| {
            let index = rt.link_index(dev).unwrap();
            rt.clsact_filters(index).unwrap_or(0)
        })
        .sum()
}

#[test]
fn tc_hooks_never_outlive_ctrace() {
    if !tc_wanted() {
        return;
    }
    let lab = router_lab();
    let router = &lab.topo.router;
    for (how, signal) in [
        ("SIGINT", libc::SIGINT),
        ("SIGTERM", libc::SIGTERM),
        ("SIGKILL", libc::SIGKILL),
    ] {
        let t = tc_tracer(router, &[]);
        let attached: Vec<String> = tcx_left(router)
            .into_iter()
            .filter(|l| l.starts_with("to-"))
            .collect();
        if attached.is_empty() {
            eprintln!("not attached by TCX here; the clsact part below covers this kernel");
            let (_, _) = t.stop_with(libc::SIGINT);
            break;
        }
        assert_eq!(
            attached.len(),
            4,
            "two interfaces, both directions: {attached:?}"
        );
        if signal == libc::SIGINT {
            // An interface that appears while ctrace runs is hooked too.
            let mut rt = ctrace::netlink::rtnetlink::RtSocket::open(Some(router)).unwrap();
            rt.add_veth("late0", "late1", router).unwrap();
            rt.set_up("late0").unwrap();
            rt.set_up("late1").unwrap();
            let mut late = Vec::new();
            for _ in 0..50 {
                late = tcx_left(router)
                    .into_iter()
                    .filter(|l| l.starts_with("late"))
                    .collect();
                if late.len() == 4 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            assert_eq!(late.len(), 4, "a new interface was not hooked: {late:?}");
        }
        t.stop_with(signal);
        let mut left = tcx_left(router);
        for _ in 0..50 {
            if left.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            left = tcx_left(router);
        }
        assert!(left.is_empty(), "after {how}, still attached: {left:?}");
    }

    // clsact filters outlive a killed process: the next start sweeps them.
    assert_eq!(clsact_left(router), 0);
    for (how, signal) in [("SIGINT", libc::SIGINT), ("SIGTERM", libc::SIGTERM)] {
        let t = tc_tracer(router, &["--tc-attach", "clsact"]);
        assert_eq!(clsact_left(router), 4);
        let (_, status) = t.stop_with(signal);
        assert!(status.success(), "{how}: {status}");
        let left = clsact_left(router);
        assert_eq!(left, 0, "after {how}, filters still attached");
        let qdiscs = clsact_qdiscs(router);
        assert!(
            qdiscs.is_empty(),
            "the qdisc ctrace added stays: {qdiscs:?}"
        );
    }
    let t = tc_tracer(router, &["--tc-attach", "clsact"]);
    t.stop_with(libc::SIGKILL);
    let left = clsact_left(router);
    assert_eq!(
        left, 4,
        "a killed run's filters stay (or this test proves nothing): {left:?}"
    );
    let t = tc_tracer(router, &["--tc-attach", "clsact"]);
    assert_eq!(
        clsact_left(router),
        4,
        "the new run swept the old filters and attached its own"
    );
    let records = t.stop();
    assert!(!records.is_empty());
    assert_eq!(clsact_left(router), 0, "after the restart and SIGINT");
    assert!(clsact_qdiscs(router).is_empty());
}

#[test]
fn tc_is_what_auto_picks_without_btf_and_probe_says_why() {
    if !tc_wanted() {
        return;
    }
    let out = std::process::Command::new(ctrace_tests::ctrace_bin())
        .arg("probe")
        .env(WITHHOLD_BTF, "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = |tier: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(tier))
            .unwrap_or_else(|| panic!("no {tier} line: {text}"))
            .to_string()
    };
    assert!(line("tc").contains("yes"), "{text}");
    assert!(line("tc").contains("without BTF"), "{text}");
    for tier in ["fexit", "tracepoint"] {
        assert!(line(tier).contains(" no "), "{tier} without BTF: {text}");
    }
    let kprobe = line("kprobe");
    assert!(kprobe.contains(" no "), "{kprobe}");
    assert!(text.contains("auto picks: tc"), "{text}");
}

/// A storm of distinct flows into a full table: every dropped SYN is judged
/// table_full or counted as never judged, and memory stays in its bound.
#[test]
fn tc_flood_of_distinct_flows_is_accounted_for_in_bounded_memory() {
    if !tc_wanted() {
        return;
    }
    // Held flows stay in the map for the window and linger after: keep the
    // storm under the map's size so every one of them is judged.
    const PENDING: u64 = 262_144;
    let n = super::flood_count().min(150_000);
    let lab = router_lab();
    let _full = fill(&lab);
    let router = lab.topo.router.inode();
    let entries = FILL as u64;
    let tracer = tc_tracer(&lab.topo.router, &["--pending-flows", &PENDING.to_string()]);
    std::thread::sleep(Duration::from_millis(1500));
    let before = conntrack_drops(&lab.topo.router);
    let flood = traffic::syn_flood(&lab.topo.clients, CLIENTS_V4[0], SERVER_V4, n).unwrap();
    std::thread::sleep(Duration::from_millis(3000));
    let kernel = conntrack_drops(&lab.topo.router) - before;
    let peak = ctrace_tests::status_kib(tracer.pid(), "VmHWM").unwrap_or(0);
    let records = tracer.stop();
    let s = final_summary(&records);
    let got = totals(s, router);
    let table_full: u64 = got
        .iter()
        .filter(|((_, c), _)| c == "table_full")
        .map(|(_, v)| v.1)
        .sum();
    let c = &s["correlation"];
    let bound = ctrace_tests::memory_bound_mib(entries)
        + PENDING as f64 * ctrace::MEMORY_PER_PENDING_FLOW_BYTES / (1024.0 * 1024.0);
    eprintln!(
        "tc flood: {} SYNs in {:.2}s ({:.0}/s); kernel drop delta {kernel}; ctrace table_full \
         {table_full}; correlation {c}; peak RSS {:.1} MiB (bound {bound:.1} MiB)",
        flood.sent,
        flood.elapsed.as_secs_f64(),
        flood.sent as f64 / flood.elapsed.as_secs_f64(),
        peak as f64 / 1024.0,
    );
    assert!(kernel > 0, "the flood caused no conntrack drop");
    let not_judged =
        c["not_judged_map_full"].as_u64().unwrap() + c["not_judged_key_clash"].as_u64().unwrap();
    assert_eq!(
        table_full + not_judged,
        kernel,
        "every dropped SYN is judged table_full or counted as not judged: {got:?}, {c}"
    );
    assert_eq!(not_judged, 0, "the map was sized for the storm: {c}");
    assert!(
        got.keys().all(|(_, cause)| cause == "table_full"),
        "{got:?}"
    );
    assert!(
        peak as f64 / 1024.0 <= bound,
        "peak RSS {:.1} MiB over the documented bound {bound:.1} MiB",
        peak as f64 / 1024.0
    );
}
