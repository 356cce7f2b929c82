//! The Kubernetes Service behind a destination, named from kube-proxy's
//! own rules as kube-proxy's own tools write them: `nft` for its nftables
//! mode, `iptables-nft` for its iptables mode. Each ruleset is made in a
//! namespace the test created and goes with it.
use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    time::Duration,
};

use ctrace::{
    lab::{
        topology::{SERVER_V4, SERVER_V6},
        traffic::{self, Planned},
    },
    netlink::kube_proxy::{self, Mode},
    netns::NetNs,
};
use ctrace_tests::{Tracer, drops, privileged};

use super::full_lab;

/// kube-proxy's nftables mode as it writes it: a verdict map keyed by
/// address, protocol and port, each element commented with the Service
/// port's name. Nothing hooks it, so it changes no traffic.
fn nftables_ruleset(v4: &str, v6: &str) -> String {
    let mut s = String::new();
    for (family, addr) in [("ip", v4), ("ip6", v6)] {
        s += &format!(
            "table {family} kube-proxy {{
  comment \"rules for kube-proxy\"
  chain service-AAAA-default/ssh-svc/tcp/ssh {{ }}
  chain service-BBBB-kube-system/kube-dns/udp/dns {{ }}
  map service-ips {{
    type {addr_type} . inet_proto . inet_service : verdict
    comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\"
    elements = {{
      {addr} . tcp . 22 comment \"default/ssh-svc:ssh\" : goto service-AAAA-default/ssh-svc/tcp/ssh,
      {addr} . udp . 53 comment \"kube-system/kube-dns:dns\" : goto service-BBBB-kube-system/kube-dns/udp/dns,
      {addr} . tcp . 8080 comment \"evil/\u{1b}[2Jname\" : goto service-AAAA-default/ssh-svc/tcp/ssh
    }}
  }}
}}
",
            addr_type = if family == "ip" { "ipv4_addr" } else { "ipv6_addr" },
        );
    }
    s
}

/// Runs a tool inside `ns`, with `stdin` fed to it; panics with its output
/// when it fails. None when the tool is not installed.
fn run_in(ns: &NetNs, tool: &str, args: &[&str], stdin: &str) -> Option<()> {
    let mut child = match Command::new("nsenter")
        .arg(format!(
            "--net=/proc/{}/fd/{}",
            std::process::id(),
            ns.fd().as_raw_fd()
        ))
        .arg(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("nsenter: {e}"),
    };
    // A tool that is missing (or fails early) closes its stdin before we
    // write: its exit status, below, says which.
    match child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r.unwrap(),
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // nsenter exits 127 when it cannot find the tool; the tool's own
    // "No such file or directory" is a failure, not an absence.
    if out.status.code() == Some(127) {
        eprintln!("{tool} is not installed: skipping ({err})");
        return None;
    }
    assert!(out.status.success(), "{tool} {args:?}: {err}");
    Some(())
}

/// Both of kube-proxy's modes read back, IPv4 and IPv6, from a kernel's
/// nf_tables; a comment not shaped like a Service name is read but never
/// becomes one.
#[test]
fn kube_proxy_rules_of_either_mode_are_read_back() {
    if !privileged() {
        return;
    }
    let v4 = "10.96.0.10";
    let v6 = "fd00:96::a";

    let ns = ctrace::netlink::rtnetlink::new_netns().unwrap();
    assert_eq!(
        kube_proxy::read(Some(&ns)).unwrap(),
        None,
        "a fresh namespace"
    );
    let Some(()) = run_in(&ns, "nft", &["-f", "-"], &nftables_ruleset(v4, v6)) else {
        return;
    };
    let (mode, mut ips) = kube_proxy::read(Some(&ns)).unwrap().expect("nftables mode");
    assert_eq!(mode, Mode::Nftables);
    ips.sort_by_key(|i| (i.ip, i.port));
    let got: Vec<_> = ips
        .iter()
        .map(|i| (i.ip.to_string(), i.proto, i.port, i.comment.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (v4.to_string(), 6, 22, "default/ssh-svc:ssh"),
            (v4.to_string(), 17, 53, "kube-system/kube-dns:dns"),
            (v4.to_string(), 6, 8080, "evil/\u{1b}[2Jname"),
            (v6.to_string(), 6, 22, "default/ssh-svc:ssh"),
            (v6.to_string(), 17, 53, "kube-system/kube-dns:dns"),
            (v6.to_string(), 6, 8080, "evil/\u{1b}[2Jname"),
        ]
    );
    assert_eq!(
        ctrace::cluster_ips::service_name("evil/\u{1b}[2Jname"),
        None,
        "a hostile comment stays unnamed"
    );

    // iptables mode, as kube-proxy writes KUBE-SERVICES (iptables-nft
    // keeps the comment in an xtables match), with a nodeports jump that
    // names no address.
    let ns = ctrace::netlink::rtnetlink::new_netns().unwrap();
    for (tool, addr) in [("iptables-nft", v4), ("ip6tables-nft", v6)] {
        let Some(()) = run_in(&ns, tool, &["-t", "nat", "-N", "KUBE-SERVICES"], "") else {
            return;
        };
        let rules = [
            format!(
                "-A KUBE-SERVICES -d {addr} -p tcp -m comment --comment \
                 default/ssh-svc:ssh cluster IP -m tcp --dport 22 -j RETURN"
            ),
            format!(
                "-A KUBE-SERVICES -d {addr} -p udp -m comment --comment \
                 kube-system/kube-dns:dns cluster IP -m udp --dport 53 -j RETURN"
            ),
            "-A KUBE-SERVICES -m comment --comment kubernetes service nodeports; NOTE: \
             this must be the last rule in this chain -m addrtype --dst-type LOCAL -j RETURN"
                .to_string(),
        ];
        for rule in rules {
            // The comment is one argument, spaces and all.
            let (before, rest) = rule.split_once("--comment ").unwrap();
            let (comment, after) = rest
                .split_once(" -m ")
                .map(|(c, a)| (c, format!("-m {a}")))
                .unwrap();
            let mut args: Vec<&str> = vec!["-t", "nat"];
            args.extend(before.split_whitespace());
            args.push("--comment");
            args.push(comment);
            args.extend(after.split_whitespace());
            run_in(&ns, tool, &args, "").unwrap();
        }
    }
    let (mode, mut ips) = kube_proxy::read(Some(&ns)).unwrap().expect("iptables mode");
    assert_eq!(mode, Mode::IptablesNft);
    ips.sort_by_key(|i| (i.ip, i.port));
    let got: Vec<_> = ips
        .iter()
        .map(|i| {
            (
                i.ip.to_string(),
                i.proto,
                i.port,
                ctrace::cluster_ips::service_name(&i.comment),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (v4.to_string(), 6, 22, Some("default/ssh-svc:ssh")),
            (v4.to_string(), 17, 53, Some("kube-system/kube-dns:dns")),
            (v6.to_string(), 6, 22, Some("default/ssh-svc:ssh")),
            (v6.to_string(), 17, 53, Some("kube-system/kube-dns:dns")),
        ]
    );
}

/// A full node table with kube-proxy's map naming the server's ssh port:
/// dropped SYNs to it carry `dst_service`, on both families, and those to
/// a port no Service has carry none.
#[test]
fn dropped_flows_name_the_service_of_their_destination() {
    // The full table is made through ctnetlink, which an OpenWrt kernel
    // without kmod-nf-conntrack-netlink lacks (kube-proxy never runs there).
    if !privileged() || !ctrace_tests::ctnetlink() {
        return;
    }
    let lab = full_lab();
    let node = &lab.topo.router;
    let Some(()) = run_in(
        node,
        "nft",
        &["-f", "-"],
        &nftables_ruleset(&SERVER_V4.to_string(), &SERVER_V6.to_string()),
    ) else {
        return;
    };
    let tracer = Tracer::start(&["--netns", &node.inode().to_string(), "--interval", "500ms"]);
    let clients = ctrace::lab::topology::CLIENTS_V4;
    let plan: Vec<Planned> = [(SERVER_V4, 22), (SERVER_V4, 2380)]
        .into_iter()
        .map(|(ip, port)| (IpAddr::V4(ip), port))
        .chain([(IpAddr::V6(SERVER_V6), 22)])
        .map(|(ip, port)| Planned {
            service: "any".into(),
            proto: ctrace::event::Proto::Tcp,
            src: match ip {
                IpAddr::V4(_) => IpAddr::V4(clients[0]),
                IpAddr::V6(_) => IpAddr::V6(ctrace::lab::topology::CLIENT_V6),
            },
            dst: SocketAddr::new(ip, port),
        })
        .collect();
    let attempts =
        traffic::attempt_all(&lab.topo.clients, &plan, Duration::from_millis(2500)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let (records, stderr) = tracer.stop_with_stderr();
    assert!(attempts.iter().all(|a| !a.ok), "{attempts:?}");
    let dropped = drops(&records);
    for (dst, service) in [
        (format!("{SERVER_V4}:22"), Some("default/ssh-svc:ssh")),
        (format!("[{SERVER_V6}]:22"), Some("default/ssh-svc:ssh")),
        (format!("{SERVER_V4}:2380"), None),
    ] {
        let mine: Vec<_> = dropped
            .iter()
            .filter(|d| d["dst"] == dst.as_str())
            .collect();
        assert!(!mine.is_empty(), "no drop to {dst}: {dropped:?}");
        for d in mine {
            assert_eq!(d["dst_service"].as_str(), service, "{d}");
        }
    }
    let summary = ctrace_tests::final_summary(&records);
    let top = summary["top_flows"].as_array().unwrap();
    assert!(
        top.iter()
            .any(|f| f["dst_service"] == "default/ssh-svc:ssh"),
        "{top:?}"
    );
    assert!(
        stderr.iter().all(|l| !l.contains('\u{1b}')),
        "a raw escape reached the terminal: {stderr:?}"
    );
}
