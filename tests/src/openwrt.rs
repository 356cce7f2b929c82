//! A router namespace built like OpenWrt's defaults, for the tc tier's
//! field-shape tests:
//!
//! ```text
//!   lan-a (10.10.0.2, fd10::2) --veth-- lan1 \
//!                                             br-lan (10.10.0.1, fd10::1)  router  wan[.7] (10.10.1.1) --veth-- servers (10.10.1.2)
//!   lan-b (10.10.0.3, fd10::3) --veth-- lan2 /                            masquerade
//! ```
//!
//! The WAN is a VLAN upper (`wan.7` on `wan`) where the kernel has 802.1Q,
//! else the plain `wan` device. With [`Wan::Pppoe`] the WAN's IP device is
//! `pppoe-wan`, a PPPoE session over that device (VLAN 7 and PPPoE, as
//! some ISPs run it), to a PPP device in the servers' namespace. br_netfilter is off in the router, as on a
//! stock OpenWrt (kmod-br-netfilter is not installed by default). Every
//! client and the server sit on an `eth0` of their own, so at least three
//! namespaces share ifindex numbers.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::mpsc,
    thread::JoinHandle,
};

use anyhow::Context as _;
use ctrace::{
    netlink::{nftables, rtnetlink::RtSocket},
    netns::NetNs,
};

pub const LAN_V4: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 10, 0, 2), Ipv4Addr::new(10, 10, 0, 3)];
pub const LAN_V6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd10, 0, 0, 0, 0, 0, 0, 2),
    Ipv6Addr::new(0xfd10, 0, 0, 0, 0, 0, 0, 3),
];
pub const ROUTER_LAN_V4: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
pub const ROUTER_LAN_V6: Ipv6Addr = Ipv6Addr::new(0xfd10, 0, 0, 0, 0, 0, 0, 1);
const ROUTER_WAN_V4: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 1);
const ROUTER_WAN_V6: Ipv6Addr = Ipv6Addr::new(0xfd10, 1, 0, 0, 0, 0, 0, 1);
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd10, 1, 0, 0, 0, 0, 0, 2);
/// The WAN's VLAN id where 802.1Q exists.
pub const WAN_VLAN: u16 = 7;

/// How the router reaches the servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wan {
    /// Addresses on `wan.7` (or `wan` without 802.1Q).
    Vlan,
    /// Addresses on `pppoe-wan`, a PPPoE session over `wan.7` (or `wan`).
    Pppoe,
}

/// The PPPoE session id both ends use.
const PPPOE_SID: u16 = 0x0ce7;

pub struct OpenWrtLab {
    pub lans: [NetNs; 2],
    pub router: NetNs,
    pub servers: NetNs,
    /// The WAN's IP device: `wan.7`, or `wan` without 802.1Q, or
    /// `pppoe-wan`.
    pub wan: &'static str,
    /// The device the WAN's IP device sits on, if it is not `wan` itself.
    pub wan_lower: Option<&'static str>,
    anchors: Vec<(mpsc::Sender<()>, JoinHandle<()>)>,
    /// Both ends of the PPPoE session, kept open for the lab's life.
    _pppoe: Vec<crate::pppoe::Session>,
}

impl OpenWrtLab {
    pub fn build() -> anyhow::Result<OpenWrtLab> {
        OpenWrtLab::build_with(Wan::Vlan)
    }

    pub fn build_with(kind: Wan) -> anyhow::Result<OpenWrtLab> {
        let lans = [
            ctrace::netlink::rtnetlink::new_netns()?,
            ctrace::netlink::rtnetlink::new_netns()?,
        ];
        let router = ctrace::netlink::rtnetlink::new_netns()?;
        let servers = ctrace::netlink::rtnetlink::new_netns()?;
        for ns in lans.iter().chain([&router, &servers]) {
            ns.no_dad()?;
        }

        let mut rt = RtSocket::open(Some(&router))?;
        rt.add_bridge("br-lan")?;
        for (port, lan) in ["lan1", "lan2"].into_iter().zip(&lans) {
            rt.add_veth(port, "eth0", lan)?;
            rt.set_master(port, "br-lan")?;
            rt.set_up(port)?;
        }
        rt.add_address("br-lan", IpAddr::V4(ROUTER_LAN_V4), 24)?;
        rt.add_address("br-lan", IpAddr::V6(ROUTER_LAN_V6), 64)?;
        rt.set_up("br-lan")?;
        rt.add_veth("wan", "eth0", &servers)?;
        rt.set_up("wan")?;
        let mut srt = RtSocket::open(Some(&servers))?;
        srt.set_up("eth0")?;
        let (mut wan, mut server_dev) = match rt.add_vlan("wan.7", "wan", WAN_VLAN) {
            Ok(()) => {
                srt.add_vlan("eth0.7", "eth0", WAN_VLAN)?;
                ("wan.7", "eth0.7")
            }
            Err(e) => {
                eprintln!("no 802.1Q here ({e:#}): the WAN is the plain wan device");
                ("wan", "eth0")
            }
        };
        let mut wan_lower = (wan != "wan").then_some("wan");
        let mut pppoe = Vec::new();
        if kind == Wan::Pppoe {
            rt.set_up(wan)?;
            srt.set_up(server_dev)?;
            let mac = |rt: &mut RtSocket, name: &str| -> anyhow::Result<[u8; 6]> {
                rt.links()?
                    .into_iter()
                    .find(|l| l.name == name)
                    .and_then(|l| l.mac)
                    .with_context(|| format!("no MAC on {name}"))
            };
            let (router_mac, server_mac) = (mac(&mut rt, wan)?, mac(&mut srt, server_dev)?);
            pppoe.push(crate::pppoe::open(
                &router,
                wan,
                server_mac,
                PPPOE_SID,
                "pppoe-wan",
            )?);
            pppoe.push(crate::pppoe::open(
                &servers, server_dev, router_mac, PPPOE_SID, "ppp-isp",
            )?);
            wan_lower = Some(wan);
            (wan, server_dev) = ("pppoe-wan", "ppp-isp");
        }
        rt.add_address(wan, IpAddr::V4(ROUTER_WAN_V4), 24)?;
        rt.add_address(wan, IpAddr::V6(ROUTER_WAN_V6), 64)?;
        rt.set_up(wan)?;
        router.set_sysctl("net/ipv4/ip_forward", "1")?;
        router.set_sysctl("net/ipv6/conf/all/forwarding", "1")?;
        bridge_netfilter(&router, false)?;

        for (i, lan) in lans.iter().enumerate() {
            let mut rt = RtSocket::open(Some(lan))?;
            rt.add_address("eth0", IpAddr::V4(LAN_V4[i]), 24)?;
            rt.add_address("eth0", IpAddr::V6(LAN_V6[i]), 64)?;
            rt.set_up("eth0")?;
            rt.add_route(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                0,
                IpAddr::V4(ROUTER_LAN_V4),
            )?;
            rt.add_route(
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                0,
                IpAddr::V6(ROUTER_LAN_V6),
            )?;
        }
        srt.add_address(server_dev, IpAddr::V4(SERVER_V4), 24)?;
        srt.add_address(server_dev, IpAddr::V6(SERVER_V6), 64)?;
        srt.set_up(server_dev)?;
        srt.add_route(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            0,
            IpAddr::V4(ROUTER_WAN_V4),
        )?;
        srt.add_route(
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            0,
            IpAddr::V6(ROUTER_WAN_V6),
        )?;

        nftables::enable_conntrack(&router).context("turning conntrack on in the router")?;
        nftables::masquerade(&router)?;

        let mut anchors = Vec::new();
        for (ns, name) in [
            (&lans[0], "lan-a"),
            (&lans[1], "lan-b"),
            (&router, "router"),
            (&servers, "servers"),
        ] {
            let (tx, rx) = mpsc::channel::<()>();
            let handle = ns.spawn(&format!("owrt-{name}"), move || {
                let _ = rx.recv();
            })?;
            anchors.push((tx, handle));
        }
        Ok(OpenWrtLab {
            lans,
            router,
            servers,
            wan,
            wan_lower,
            anchors,
            _pppoe: pppoe,
        })
    }
}

/// Turns br_netfilter's calls into IPv4/IPv6 netfilter on or off for
/// bridged frames in `ns`. Returns false where br_netfilter is absent
/// (nothing to turn). The namespace is the test's own: the setting goes
/// with it.
pub fn bridge_netfilter(ns: &NetNs, on: bool) -> anyhow::Result<bool> {
    let present = ns.run(|| std::path::Path::new("/proc/sys/net/bridge").exists())?;
    if !present {
        return Ok(false);
    }
    let v = if on { "1" } else { "0" };
    ns.set_sysctl("net/bridge/bridge-nf-call-iptables", v)?;
    ns.set_sysctl("net/bridge/bridge-nf-call-ip6tables", v)?;
    Ok(true)
}

impl Drop for OpenWrtLab {
    fn drop(&mut self) {
        for (tx, handle) in self.anchors.drain(..) {
            drop(tx);
            let _ = handle.join();
        }
    }
}
