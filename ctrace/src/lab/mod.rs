//! `ctrace lab`: INC-0004 reproduced in throwaway namespaces, traced, and
//! judged against ground truth.
//!
//! 1. Build clients -> router -> servers namespaces, conntrack on in the
//!    router, listeners for ssh, etcd-peer, nvme-tcp and dns on the servers.
//! 2. Start tracing (the same pipeline as `ctrace watch`).
//! 3. Healthy phase: one connection per service goes through.
//! 4. Fill the router's table with ASSURED entries over ctnetlink.
//! 5. Incident phase: new connections from the client nodes fail.
//! 6. Verdict: ctrace's per-service counts against the failed connects the
//!    clients saw, and its packet count against conntrack's `drop` counter.
//!
//! The machine-wide `nf_conntrack_max` is left alone unless `--max` is given,
//! and then restored on every exit path this process controls.
pub mod topology;
pub mod traffic;

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    cause::Cause,
    cli::LabArgs,
    event::{Flow, Proto},
    kernel::KernelFacts,
    netlink::ctnetlink::CtSocket,
    services::Catalog,
    sink::Sink,
    table::NetnsFilter,
    watch::{Outcome, Shutdown, WatchConfig, Watcher},
};
use topology::Topology;
use traffic::{Attempt, Listeners, Planned};

pub const NF_CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

/// A sysctl to put back: its path (for messages), a handle opened when it
/// was set, and the old value.
type Restore = (&'static str, std::sync::Arc<fs::File>, String);

/// Sysctls changed and not yet restored, for the panic hook: release
/// builds abort on panic, so Drop alone would not run.
static TO_RESTORE: std::sync::Mutex<Vec<Restore>> = std::sync::Mutex::new(Vec::new());

/// Writes through the handle opened when the sysctl was set: a /proc/sys/net
/// path resolves in the namespace of whoever opens it, and a panic hook may
/// run on a thread inside a lab namespace, where nf_conntrack_max is
/// read-only (and another namespace's anyway).
fn restore(path: &'static str, file: &fs::File, old: &str) {
    use std::os::unix::fs::FileExt as _;
    if let Err(e) = file.write_at(old.as_bytes(), 0) {
        eprintln!("ctrace: could not restore {path} to {old}: {e}");
    }
}

/// The live guards' list. Every write to a guarded sysctl happens while it
/// is held, so a restore of them all never interleaves with a guard's own.
/// A panic elsewhere does not make it useless.
fn restore_list() -> std::sync::MutexGuard<'static, Vec<Restore>> {
    TO_RESTORE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes the old values back, newest guard first, so that of two guards
/// of one sysctl the older's value is the one left.
fn restore_each(list: &[Restore]) {
    for (path, file, old) in list.iter().rev() {
        restore(path, file, old);
    }
}

/// Puts back every sysctl a live [`SysctlGuard`] changed: for a process
/// that took an ending signal itself, where no guard's drop will run.
/// While the returned value is held no guard is set or dropped, so a
/// process about to exit keeps it.
pub fn restore_all() -> SysctlsRestored {
    let list = restore_list();
    restore_each(&list);
    SysctlsRestored(list)
}

/// See [`restore_all`].
pub struct SysctlsRestored(#[allow(dead_code)] std::sync::MutexGuard<'static, Vec<Restore>>);

/// Sets a sysctl and puts the old value back when dropped, on Ctrl-C and
/// SIGTERM (which end the run normally), and on a panic. Must be made on a
/// thread in the namespace whose sysctl it is.
pub struct SysctlGuard {
    path: &'static str,
    file: std::sync::Arc<fs::File>,
    old: String,
}

impl SysctlGuard {
    pub fn set(path: &'static str, value: &str) -> anyhow::Result<SysctlGuard> {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_each(&restore_list());
                previous(info);
            }));
        });
        let old = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        let old = old.trim().to_string();
        let file = std::sync::Arc::new(
            fs::OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("opening {path} for writing"))?,
        );
        let mut list = restore_list();
        use std::os::unix::fs::FileExt as _;
        file.write_at(value.as_bytes(), 0)
            .with_context(|| format!("writing {value} to {path}"))?;
        list.push((path, file.clone(), old.clone()));
        Ok(SysctlGuard { path, file, old })
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        let mut list = restore_list();
        restore(self.path, &self.file, &self.old);
        // This guard's entry only: an older guard of the same sysctl (the
        // bench's, around a stage's own) still needs its value put back.
        list.retain(|(_, file, _)| !std::sync::Arc::ptr_eq(file, &self.file));
    }
}

/// The services the lab's servers run, and how the clients reach them.
pub const LAB_SERVICES: [(&str, Proto, u16); 4] = [
    ("ssh", Proto::Tcp, 22),
    ("etcd-peer", Proto::Tcp, 2380),
    ("nvme-tcp", Proto::Tcp, 4420),
    ("dns", Proto::Udp, 53),
];

/// `flows` attempts per service, from the four client nodes in turn, to
/// the server. Every fourth ssh attempt goes over IPv6.
pub fn incident_plan(flows: u32) -> Vec<Planned> {
    let mut plan = Vec::new();
    for (service, proto, port) in LAB_SERVICES {
        for i in 0..flows as usize {
            let v6 = service == "ssh" && i % 4 == 3;
            let (src, dst) = if v6 {
                (
                    IpAddr::V6(topology::CLIENT_V6),
                    IpAddr::V6(topology::SERVER_V6),
                )
            } else {
                let c = topology::CLIENTS_V4[i % topology::CLIENTS_V4.len()];
                (IpAddr::V4(c), IpAddr::V4(topology::SERVER_V4))
            };
            plan.push(Planned {
                service: service.into(),
                proto,
                src,
                dst: SocketAddr::new(dst, port),
            });
        }
    }
    plan
}

/// One service's row of the verdict.
#[derive(Clone, Debug)]
pub struct Row {
    pub service: String,
    pub attempts: u64,
    pub failed: u64,
    pub ctrace_flows: u64,
    pub ctrace_packets: u64,
    /// Of `ctrace_flows`, those whose client still connected: a packet
    /// was dropped for want of room, and a retransmission found some (the
    /// GC or early_drop freed a slot in between). Matched by tuple against
    /// the attempts that succeeded.
    pub let_through: u64,
}

/// One TCP service of the clients' side of the verdict: what the client
/// nodes' connects saw, against the node view's counts of the same
/// namespace, and the router's table-full flows for the service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientRow {
    pub service: String,
    /// Ground truth: the clients' own results, by outcome name.
    pub truth: BTreeMap<&'static str, u64>,
    /// The node view's counts, by the same names ("attempts" included).
    pub ctrace: BTreeMap<&'static str, u64>,
    /// The router view's table-full flows of the service that never got
    /// through (those let through after a drop are the client's
    /// established ones).
    pub router_flows: u64,
}

/// The outcomes a client row compares, in display order.
pub const CLIENT_OUTCOMES: [&str; 6] = [
    "attempts",
    "established",
    "timeout",
    "refused",
    "unreachable",
    "aborted",
];

impl ClientRow {
    pub fn truth(&self, what: &str) -> u64 {
        self.truth.get(what).copied().unwrap_or(0)
    }

    pub fn seen(&self, what: &str) -> u64 {
        self.ctrace.get(what).copied().unwrap_or(0)
    }

    /// Every outcome as the clients saw it, and the router's table-full
    /// flows equal to the attempts nothing answered (timed out, or given up
    /// by the client): the same flows, seen from both ends of the path.
    pub fn agrees(&self) -> bool {
        CLIENT_OUTCOMES
            .iter()
            .all(|w| self.truth(w) == self.seen(w))
            && self.router_flows == self.seen("timeout") + self.seen("aborted")
    }
}

pub struct Report {
    pub rows: Vec<Row>,
    /// The clients' side; None when the node view did not run.
    pub clients: Option<Vec<ClientRow>>,
    pub healthy_ok: bool,
    /// Packets conntrack itself counted as dropped (its `drop` statistic).
    pub conntrack_drops: u64,
    pub ctrace_packets: u64,
    pub lost_events: u64,
    pub fill_entries: u64,
    pub fill_time: Duration,
}

impl Report {
    /// ctrace agrees with the ground truth, and the incident happened. A
    /// connection that got through (early_drop found a victim, the GC freed
    /// a slot) is not ctrace's error: it is judged by what it reported.
    pub fn passed(&self) -> bool {
        self.healthy_ok
            && self.rows.iter().any(|r| r.failed > 0)
            && self
                .rows
                .iter()
                .all(|r| r.ctrace_flows == r.failed + r.let_through)
            && self.ctrace_packets == self.conntrack_drops
            && self
                .clients
                .as_ref()
                .is_none_or(|c| c.iter().all(ClientRow::agrees))
    }

    pub fn render(&self) -> String {
        let mut o = String::from("\nVERDICT: ctrace against the lab's ground truth\n");
        o += &format!(
            "  {:<12} {:>9} {:>15} {:>19} {:>15}\n",
            "SERVICE", "ATTEMPTS", "FAILED (truth)", "TABLE_FULL (ctrace)", "PACKETS"
        );
        for r in &self.rows {
            o += &format!(
                "  {:<12} {:>9} {:>15} {:>19} {:>15}  {}\n",
                r.service,
                r.attempts,
                r.failed,
                r.ctrace_flows,
                r.ctrace_packets,
                if r.ctrace_flows == r.failed + r.let_through {
                    "match"
                } else {
                    "MISMATCH"
                }
            );
        }
        o += &format!(
            "  dropped packets: ctrace {} (table_full), conntrack's drop counter {}  {}\n",
            self.ctrace_packets,
            self.conntrack_drops,
            if self.ctrace_packets == self.conntrack_drops {
                "match"
            } else {
                "MISMATCH"
            }
        );
        o += &format!(
            "  healthy phase: {}; fill: {} entries in {:.2}s; lost events: {}\n",
            if self.healthy_ok {
                "all connections went through"
            } else {
                "SOME CONNECTIONS FAILED"
            },
            self.fill_entries,
            self.fill_time.as_secs_f64(),
            self.lost_events
        );
        match &self.clients {
            Some(rows) => o += &render_clients(rows),
            None => o += "  clients' side: not traced (no node view on this kernel)\n",
        }
        let let_through: u64 = self.rows.iter().map(|r| r.let_through).sum();
        let through = self
            .rows
            .iter()
            .map(|r| r.attempts - r.failed)
            .sum::<u64>()
            .saturating_sub(let_through);
        if let_through > 0 {
            o += &format!(
                "  {let_through} incident connection(s) lost a packet to the full table and then \
                 got through on a retransmission: ctrace counts their drop, the clients their \
                 success\n"
            );
        }
        if through > 0 {
            o += &format!(
                "  {through} incident connection(s) got through: the table had room for them \
                 (evictions, expiries)\n"
            );
        }
        if self.rows.iter().all(|r| r.failed == 0) {
            o += "  NO CONNECTION FAILED: the incident was not reproduced\n";
        }
        o += if self.passed() {
            "  PASS\n"
        } else {
            "  FAIL\n"
        };
        o
    }
}

/// The clients' side: per TCP service, truth then ctrace on one line each.
fn render_clients(rows: &[ClientRow]) -> String {
    let mut o = String::from(
        "\n  CLIENTS' SIDE: the client nodes' own connects (truth) against ctrace's node view,\n  \
         and the router's table-full flows beside the attempts nothing answered\n",
    );
    o += &format!("  {:<12} {:<7}", "SERVICE", "");
    for w in CLIENT_OUTCOMES {
        o += &format!(" {w:>11}");
    }
    o += &format!(" {:>13}\n", "ROUTER FLOWS");
    for r in rows {
        for (label, pick) in [("truth", true), ("ctrace", false)] {
            let name = if pick { r.service.as_str() } else { "" };
            o += &format!("  {name:<12} {label:<7}");
            for w in CLIENT_OUTCOMES {
                o += &format!(" {:>11}", if pick { r.truth(w) } else { r.seen(w) });
            }
            if pick {
                o += &format!(" {:>13}\n", r.router_flows);
            } else {
                o += &format!("  {}\n", if r.agrees() { "match" } else { "MISMATCH" });
            }
        }
    }
    o
}

struct Truth {
    healthy: Vec<Attempt>,
    /// A connect to a port nothing listens on: refused, by a RST.
    refused: Vec<Attempt>,
    incident: Vec<Attempt>,
    drops_before: u64,
    drops_after: u64,
    fill: traffic::Fill,
}

/// The scenario's blocking half: namespaces, traffic, fill.
fn scenario(topo: &Topology, flows: u32, max: u64) -> anyhow::Result<Truth> {
    let tcp: Vec<u16> = LAB_SERVICES
        .iter()
        .filter(|s| s.1 == Proto::Tcp)
        .map(|s| s.2)
        .collect();
    let udp: Vec<u16> = LAB_SERVICES
        .iter()
        .filter(|s| s.1 == Proto::Udp)
        .map(|s| s.2)
        .collect();
    let _listeners = Listeners::start(&topo.servers, &tcp, &udp)?;

    eprintln!("lab: healthy phase: one connection per service through the router");
    let healthy_plan: Vec<Planned> = incident_plan(4)
        .into_iter()
        .filter(|p| {
            p.src.is_ipv6() || p.dst.port() != 22 || p.src == IpAddr::V4(topology::CLIENTS_V4[0])
        })
        .collect();
    let healthy = traffic::attempt_all(&topo.clients, &healthy_plan, Duration::from_secs(3))?;
    eprintln!("lab: one connect to a closed port (etcd-client, :2379): refused");
    let refused = traffic::attempt_all(&topo.clients, &[refused_probe()], Duration::from_secs(3))?;

    let mut ct = CtSocket::open(Some(&topo.router))?;
    // The healthy phase leaves entries early_drop may evict (its DNS
    // exchange never becomes ASSURED, closed TCP flows can be dropped
    // early), and each eviction would let one incident flow through.
    // Start the incident from a table of the fill's ASSURED entries only,
    // as on a router whose table is full of long-lived connections.
    std::thread::sleep(Duration::from_millis(200));
    ct.flush()?;
    let before_fill = ct.stats()?;
    let want = max.saturating_sub(before_fill.entries) + 16;
    eprintln!(
        "lab: filling the router's table ({} of {max} in use) with ASSURED entries over ctnetlink",
        before_fill.entries
    );
    let mut last_report = 0;
    let fill = traffic::fill_table(&topo.router, want, IpAddr::V4(topology::SERVER_V4), |n| {
        if n >= last_report + 65_536 {
            eprintln!("lab:   {n} entries");
            last_report = n;
        }
    })?;
    let full = ct.stats()?;
    eprintln!(
        "lab: table full: {}/{} entries ({} created in {:.2}s)",
        full.entries,
        full.max,
        fill.created,
        fill.elapsed.as_secs_f64()
    );

    eprintln!("lab: incident phase: {flows} new connections per service from the client nodes");
    let plan = incident_plan(flows);
    let incident = traffic::attempt_all(&topo.clients, &plan, Duration::from_millis(2500))?;
    // Let the last retransmissions land before the final count.
    std::thread::sleep(Duration::from_millis(300));
    let after = ct.stats()?;
    Ok(Truth {
        healthy,
        refused,
        incident,
        drops_before: full.drop,
        drops_after: after.drop,
        fill,
    })
}

pub async fn run(args: &LabArgs, mut sinks: Vec<Box<dyn Sink>>) -> anyhow::Result<Report> {
    // From here on Ctrl-C ends the run through the cleanup path below.
    let mut shutdown = Shutdown::install()?;
    let _max_guard = match args.max {
        Some(n) => {
            eprintln!("lab: lowering nf_conntrack_max to {n} for this run (restored at exit)");
            Some(SysctlGuard::set(NF_CONNTRACK_MAX, &n.to_string())?)
        }
        None => None,
    };
    let max: u64 = fs::read_to_string(NF_CONNTRACK_MAX)?.trim().parse()?;
    eprintln!("lab: building namespaces: clients -> router -> servers");
    let topo = std::sync::Arc::new(Topology::build()?);

    let facts = KernelFacts::gather();
    let cfg = WatchConfig {
        strategy: args.strategy,
        occupancy_every: Some(Duration::from_secs(5)),
        interval: Duration::from_secs(1),
        catalog: Catalog::with_defaults(),
        netns: NetnsFilter::new(vec![topo.router.inode().to_string()]),
        kernel_log: false,
        max_flows: crate::aggregate::DEFAULT_MAX_FLOWS,
        detail_budget: crate::loader::LoadOptions::DEFAULT_DETAIL_BUDGET,
        test_flags: 0,
        refused_probes: Vec::new(),
        ifaces: Vec::new(),
        pending_flows: crate::loader::LoadOptions::DEFAULT_PENDING_FLOWS,
        judge_window: crate::loader::LoadOptions::DEFAULT_JUDGE_WINDOW,
        tc_attach: None,
        host_root: "/".into(),
        side: None,
        // The node view watches the client nodes' own attempts.
        connect_netns: Some(NetnsFilter::new(vec![topo.clients.inode().to_string()])),
        ctnetlink_events: None,
        announcements_per_s: Some(crate::filling::DEFAULT_BUDGET),
    };
    let mut watcher = Watcher::start(cfg, &facts)?;
    let node_view = watcher.has_node_view();
    drop(facts);
    crate::kernel::return_freed_memory();
    watcher.watch_netns(&topo.router, "lab-router")?;
    eprintln!(
        "lab: tracing the router (netns {}) with strategy {}",
        topo.router.inode(),
        watcher.strategy().map_or("none", |s| s.name())
    );

    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let flows = args.flows;
    let t = topo.clone();
    let worker = std::thread::spawn(move || {
        let r = scenario(&t, flows, max);
        let _ = done_tx.send(());
        r
    });
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = interrupted.clone();
    let stop = async move {
        tokio::select! {
            _ = done_rx => {}
            _ = shutdown.wait() => flag.store(true, std::sync::atomic::Ordering::Relaxed),
        }
    };
    let outcome = watcher.run(&mut sinks, stop).await?;
    if interrupted.load(std::sync::atomic::Ordering::Relaxed) {
        anyhow::bail!("interrupted; namespaces are gone and nf_conntrack_max is restored");
    }
    let truth = worker
        .join()
        .map_err(|_| anyhow::anyhow!("the lab scenario panicked"))??;
    let report = judge(&truth, &outcome, node_view);
    println!("{}", report.render());
    Ok(report)
}

/// The healthy phase's refused connect: nothing listens on etcd's client
/// port on the server node.
fn refused_probe() -> Planned {
    Planned {
        service: "etcd-client".into(),
        proto: Proto::Tcp,
        src: IpAddr::V4(topology::CLIENTS_V4[0]),
        dst: SocketAddr::new(IpAddr::V4(topology::SERVER_V4), 2379),
    }
}

/// The clients' side of the verdict: every TCP attempt the client nodes
/// made (healthy, refused, incident) by service and outcome, against the
/// node view's rows for the clients' namespace.
fn judge_clients(truth: &Truth, outcome: &Outcome, router: &[Row]) -> Vec<ClientRow> {
    fn row<'a>(rows: &'a mut BTreeMap<String, ClientRow>, service: &str) -> &'a mut ClientRow {
        rows.entry(service.to_string())
            .or_insert_with(|| ClientRow {
                service: service.to_string(),
                ..ClientRow::default()
            })
    }
    let mut rows: BTreeMap<String, ClientRow> = BTreeMap::new();
    for a in truth
        .healthy
        .iter()
        .chain(&truth.refused)
        .chain(&truth.incident)
        .filter(|a| a.planned.proto == Proto::Tcp)
    {
        let r = row(&mut rows, &a.planned.service);
        *r.truth.entry("attempts").or_default() += 1;
        *r.truth.entry(a.tcp_outcome()).or_default() += 1;
    }
    for c in &outcome.connects {
        let Some(service) = c.service.as_deref() else {
            continue;
        };
        let r = row(&mut rows, service);
        *r.ctrace.entry("attempts").or_default() += c.attempts;
        *r.ctrace.entry("established").or_default() += c.established;
        for (outcome, n) in c.failures() {
            *r.ctrace.entry(outcome.name()).or_default() += n;
        }
    }
    for r in rows.values_mut() {
        r.router_flows = router
            .iter()
            .find(|x| x.service == r.service)
            .map_or(0, |x| x.ctrace_flows.saturating_sub(x.let_through));
    }
    rows.into_values().collect()
}

/// Per service, ctrace's table-full flows whose client connected only on
/// a retransmission, by its own timing: the same flow from both ends, a
/// drop and then room. A flow ctrace judged dropped whose client
/// connected at once is not excused.
fn let_through<'a>(
    incident: &[Attempt],
    flows: impl IntoIterator<Item = (&'a Flow, Cause, Option<&'a str>)>,
) -> BTreeMap<String, u64> {
    let retried: std::collections::HashSet<(Proto, SocketAddr, SocketAddr)> = incident
        .iter()
        .filter(|a| a.ok && a.retried)
        .filter_map(|a| Some((a.planned.proto, a.local?, a.planned.dst)))
        .collect();
    let mut by_service = BTreeMap::new();
    for (flow, cause, service) in flows {
        if cause == Cause::TableFull
            && retried.contains(&(flow.proto, flow.src, flow.dst))
            && let Some(s) = service
        {
            *by_service.entry(s.to_string()).or_default() += 1;
        }
    }
    by_service
}

fn judge(truth: &Truth, outcome: &Outcome, node_view: bool) -> Report {
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for a in &truth.incident {
        let r = rows
            .entry(a.planned.service.clone())
            .or_insert_with(|| Row {
                service: a.planned.service.clone(),
                attempts: 0,
                failed: 0,
                ctrace_flows: 0,
                ctrace_packets: 0,
                let_through: 0,
            });
        r.attempts += 1;
        r.failed += u64::from(!a.ok);
    }
    let flows = outcome
        .router
        .flows
        .iter()
        .map(|f| (&f.first.flow, f.first.cause, f.first.service.as_deref()));
    for (service, n) in let_through(&truth.incident, flows) {
        if let Some(r) = rows.get_mut(&service) {
            r.let_through = n;
        }
    }
    let mut ctrace_packets = 0;
    for g in outcome
        .router
        .groups
        .iter()
        .filter(|g| g.cause == Cause::TableFull)
    {
        ctrace_packets += g.packets;
        if let Some(r) = g.service.as_ref().and_then(|s| rows.get_mut(s)) {
            r.ctrace_flows += g.flows;
            r.ctrace_packets += g.packets;
        }
    }
    let rows: Vec<Row> = rows.into_values().collect();
    Report {
        clients: node_view.then(|| judge_clients(truth, outcome, &rows)),
        rows,
        healthy_ok: truth.healthy.iter().all(|a| a.ok),
        conntrack_drops: truth.drops_after - truth.drops_before,
        ctrace_packets,
        lost_events: outcome.router.counters.lost_events,
        fill_entries: truth.fill.created,
        fill_time: truth.fill.elapsed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(rows: &[(u64, u64, u64)], ctrace_packets: u64, conntrack_drops: u64) -> Report {
        Report {
            rows: rows
                .iter()
                .enumerate()
                .map(|(i, &(attempts, failed, ctrace_flows))| Row {
                    service: format!("s{i}"),
                    attempts,
                    failed,
                    ctrace_flows,
                    ctrace_packets: 0,
                    let_through: 0,
                })
                .collect(),
            clients: None,
            healthy_ok: true,
            conntrack_drops,
            ctrace_packets,
            lost_events: 0,
            fill_entries: 0,
            fill_time: Duration::ZERO,
        }
    }

    #[test]
    fn verdict_judges_ctrace_against_truth() {
        assert!(report(&[(2, 2, 2), (2, 2, 2)], 8, 8).passed());
        // A flow let through by an eviction is fine if ctrace agrees.
        let r = report(&[(2, 1, 1), (2, 2, 2)], 6, 6);
        assert!(r.passed());
        assert!(r.render().contains("1 incident connection(s) got through"));
        // ctrace missing a failed flow, or miscounting packets, is not.
        assert!(!report(&[(2, 2, 1), (2, 2, 2)], 8, 8).passed());
        // A flow dropped once and then let through is ctrace's to count,
        // and only such a flow.
        let mut r = report(&[(2, 1, 2), (2, 2, 2)], 8, 8);
        assert!(!r.passed());
        r.rows[0].let_through = 1;
        assert!(r.passed());
        assert!(
            r.render()
                .contains("1 incident connection(s) lost a packet")
        );
        assert!(!report(&[(2, 2, 2), (2, 2, 2)], 7, 8).passed());
        // Nothing failed: no incident, nothing judged.
        let r = report(&[(2, 0, 0), (2, 0, 0)], 0, 0);
        assert!(!r.passed());
        assert!(r.render().contains("NO CONNECTION FAILED"));
    }

    #[test]
    fn let_through_needs_the_same_tuple_a_table_full_cause_and_a_retry() {
        let attempt = |proto, local: &str, dst: &str, ok, retried| Attempt {
            planned: Planned {
                service: "svc".into(),
                proto,
                src: local.parse::<SocketAddr>().unwrap().ip(),
                dst: dst.parse().unwrap(),
            },
            local: Some(local.parse().unwrap()),
            ok,
            error: None,
            errno: None,
            elapsed: Duration::ZERO,
            retried,
        };
        let flow = |proto, src: &str, dst: &str| Flow {
            netns: 1,
            proto,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
        };
        let incident = [
            // Connected on its retransmission, v4 and v6.
            attempt(Proto::Tcp, "10.10.0.2:40000", "10.10.1.2:22", true, true),
            attempt(Proto::Tcp, "[fd00::2]:40001", "[fd01::2]:22", true, true),
            attempt(Proto::Udp, "10.10.0.3:40002", "10.10.1.2:53", true, true),
            // Connected at once: no packet of it was lost.
            attempt(Proto::Tcp, "10.10.0.2:40003", "10.10.1.2:2380", true, false),
            // Failed: counted as failed, not let through.
            attempt(
                Proto::Tcp,
                "10.10.0.2:40004",
                "10.10.1.2:4420",
                false,
                false,
            ),
        ];
        let dropped = |proto, src, dst, cause, service| (flow(proto, src, dst), cause, service);
        let full = Cause::TableFull;
        let flows = [
            dropped(Proto::Tcp, "10.10.0.2:40000", "10.10.1.2:22", full, "ssh"),
            dropped(Proto::Tcp, "[fd00::2]:40001", "[fd01::2]:22", full, "ssh"),
            dropped(Proto::Udp, "10.10.0.3:40002", "10.10.1.2:53", full, "dns"),
            // Same addresses, other protocol.
            dropped(Proto::Udp, "10.10.0.2:40000", "10.10.1.2:22", full, "ssh"),
            // A drop ctrace got wrong: the client never lost a packet.
            dropped(
                Proto::Tcp,
                "10.10.0.2:40003",
                "10.10.1.2:2380",
                full,
                "etcd-peer",
            ),
            dropped(
                Proto::Tcp,
                "10.10.0.2:40004",
                "10.10.1.2:4420",
                full,
                "nvme-tcp",
            ),
            // Another cause.
            dropped(
                Proto::Tcp,
                "10.10.0.2:40000",
                "10.10.1.2:22",
                Cause::Rule,
                "ssh",
            ),
        ];
        let got = let_through(&incident, flows.iter().map(|(f, c, s)| (f, *c, Some(*s))));
        let want: BTreeMap<String, u64> = [("dns".to_string(), 1), ("ssh".to_string(), 2)].into();
        assert_eq!(got, want);
    }

    /// The restore writes through the handle opened where the sysctl was
    /// set: dropped on a thread inside another namespace, where the path
    /// names that namespace's read-only copy, the value still comes back.
    /// And `restore_all` puts back a live guard's value.
    #[test]
    fn a_sysctl_is_restored_from_inside_another_namespace() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !std::path::Path::new(NF_CONNTRACK_MAX).exists() {
            eprintln!(
                "SKIPPED a_sysctl_is_restored_from_inside_another_namespace: needs root and nf_conntrack"
            );
            return;
        }
        let read = || -> u64 {
            fs::read_to_string(NF_CONNTRACK_MAX)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let before = read();
        // Puts the value back from here should the code under test fail to.
        struct Backstop(u64);
        impl Drop for Backstop {
            fn drop(&mut self) {
                let _ = fs::write(NF_CONNTRACK_MAX, self.0.to_string());
            }
        }
        let _backstop = Backstop(before);
        let guard = SysctlGuard::set(NF_CONNTRACK_MAX, &(before + 1).to_string()).unwrap();
        assert_eq!(read(), before + 1);
        let child = crate::netlink::rtnetlink::new_netns().unwrap();
        let writable_inside = child
            .run(move || {
                let writable = fs::OpenOptions::new()
                    .write(true)
                    .open(NF_CONNTRACK_MAX)
                    .is_ok();
                drop(guard);
                writable
            })
            .unwrap();
        assert_eq!(
            read(),
            before,
            "not restored from inside a child namespace (its own copy writable: {writable_inside})"
        );
        // A process that takes its own ending signal puts back what its
        // live guards changed, before their drops could; a guard inside
        // another of the same sysctl leaves the outer one's entry when it
        // goes.
        let outer = SysctlGuard::set(NF_CONNTRACK_MAX, &(before + 2).to_string()).unwrap();
        let inner = SysctlGuard::set(NF_CONNTRACK_MAX, &(before + 3).to_string()).unwrap();
        assert_eq!(read(), before + 3);
        drop(inner);
        assert_eq!(read(), before + 2);
        drop(restore_all());
        assert_eq!(
            read(),
            before,
            "restore_all did not put back the outer guard's value"
        );
        drop(outer);
        assert_eq!(read(), before);
    }
}
