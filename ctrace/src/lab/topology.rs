//! The lab's network: client nodes, a router, server nodes, each in a
//! throwaway network namespace, joined by veth pairs.
//!
//! ```text
//!   clients (10.10.0.2-5, fd10::2)  --veth--  router  --veth--  servers (10.10.1.2, fd10:1::2)
//!                                           conntrack on
//! ```
//!
//! The namespaces are anonymous and held by file descriptors (plus one
//! parked "anchor" thread each, so that other processes such as a ctrace
//! under test find them in /proc). Dropping the topology, or the process
//! dying in any way, frees them: nothing is left in /run/netns.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::mpsc,
    thread::JoinHandle,
};

use anyhow::Context as _;

use crate::{
    netlink::{nftables, rtnetlink::RtSocket},
    netns::NetNs,
};

/// The four Kubernetes nodes of INC-0004 (nl-k8s-01..04 at 10.10.0.2-5).
pub const CLIENTS_V4: [Ipv4Addr; 4] = [
    Ipv4Addr::new(10, 10, 0, 2),
    Ipv4Addr::new(10, 10, 0, 3),
    Ipv4Addr::new(10, 10, 0, 4),
    Ipv4Addr::new(10, 10, 0, 5),
];
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd10, 0, 0, 0, 0, 0, 0, 2);
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd10, 1, 0, 0, 0, 0, 0, 2);
/// The router's own address toward the clients: local services (its
/// ssh, its DNS) answer there.
pub const ROUTER_CLIENT_SIDE_V4: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
const ROUTER_SERVER_SIDE_V4: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 1);
pub const ROUTER_CLIENT_SIDE_V6: Ipv6Addr = Ipv6Addr::new(0xfd10, 0, 0, 0, 0, 0, 0, 1);
const ROUTER_SERVER_SIDE_V6: Ipv6Addr = Ipv6Addr::new(0xfd10, 1, 0, 0, 0, 0, 0, 1);

pub struct Topology {
    pub clients: NetNs,
    pub router: NetNs,
    pub servers: NetNs,
    anchors: Vec<(mpsc::Sender<()>, JoinHandle<()>)>,
}

impl Topology {
    pub fn build() -> anyhow::Result<Topology> {
        let clients =
            crate::netlink::rtnetlink::new_netns().context("creating the clients namespace")?;
        let router =
            crate::netlink::rtnetlink::new_netns().context("creating the router namespace")?;
        let servers =
            crate::netlink::rtnetlink::new_netns().context("creating the servers namespace")?;
        for ns in [&clients, &router, &servers] {
            ns.no_dad()?;
        }

        let mut rt = RtSocket::open(Some(&router))?;
        rt.add_veth("to-clients", "eth0", &clients)?;
        rt.add_veth("to-servers", "eth0", &servers)?;
        for (ifname, v4, v6) in [
            ("to-clients", ROUTER_CLIENT_SIDE_V4, ROUTER_CLIENT_SIDE_V6),
            ("to-servers", ROUTER_SERVER_SIDE_V4, ROUTER_SERVER_SIDE_V6),
        ] {
            rt.add_address(ifname, IpAddr::V4(v4), 24)?;
            rt.add_address(ifname, IpAddr::V6(v6), 64)?;
            rt.set_up(ifname)?;
        }
        router.set_sysctl("net/ipv4/ip_forward", "1")?;
        router.set_sysctl("net/ipv6/conf/all/forwarding", "1")?;

        let mut rt = RtSocket::open(Some(&clients))?;
        for a in CLIENTS_V4 {
            rt.add_address("eth0", IpAddr::V4(a), 24)?;
        }
        rt.add_address("eth0", IpAddr::V6(CLIENT_V6), 64)?;
        rt.set_up("eth0")?;
        rt.add_route(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            0,
            IpAddr::V4(ROUTER_CLIENT_SIDE_V4),
        )?;
        rt.add_route(
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            0,
            IpAddr::V6(ROUTER_CLIENT_SIDE_V6),
        )?;

        let mut rt = RtSocket::open(Some(&servers))?;
        rt.add_address("eth0", IpAddr::V4(SERVER_V4), 24)?;
        rt.add_address("eth0", IpAddr::V6(SERVER_V6), 64)?;
        rt.set_up("eth0")?;
        rt.add_route(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            0,
            IpAddr::V4(ROUTER_SERVER_SIDE_V4),
        )?;
        rt.add_route(
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            0,
            IpAddr::V6(ROUTER_SERVER_SIDE_V6),
        )?;

        // A stateful firewall on the router, as on OpenWrt: any rule that
        // looks at conntrack state turns conntrack on for the namespace.
        nftables::enable_conntrack(&router).context("turning conntrack on in the router")?;

        let mut anchors = Vec::new();
        for (ns, name) in [
            (&clients, "clients"),
            (&router, "router"),
            (&servers, "servers"),
        ] {
            let (tx, rx) = mpsc::channel::<()>();
            let handle = ns.spawn(&format!("lab-{name}"), move || {
                let _ = rx.recv();
            })?;
            anchors.push((tx, handle));
        }
        Ok(Topology {
            clients,
            router,
            servers,
            anchors,
        })
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for (tx, handle) in self.anchors.drain(..) {
            drop(tx);
            let _ = handle.join();
        }
    }
}
