//! rtnetlink, just what a lab of namespaces needs: veth pairs across
//! namespaces, addresses, routes, links up.
//!
//! Links are named, never indexed, in this API: indexes are per namespace
//! and the lab thinks in names. Each call is one request and its ack, so a
//! failure names the object and carries the kernel's extended ack message.
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use anyhow::{Context, Result, bail};

use super::{MsgBuilder, NETLINK_ROUTE, NLM_F_CREATE, NLM_F_EXCL, NlSocket};
use crate::netns::NetNs;

// linux/rtnetlink.h
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_GETADDR: u16 = 22;
pub const RTM_NEWROUTE: u16 = 24;

// linux/if_link.h
pub const IFLA_ADDRESS: u16 = 1;
pub const IFLA_IFNAME: u16 = 3;
pub const IFLA_LINK: u16 = 5;
pub const IFLA_MASTER: u16 = 10;
pub const IFLA_VLAN_ID: u16 = 1;
pub const IFLA_LINKINFO: u16 = 18;
pub const IFLA_NET_NS_FD: u16 = 28;
pub const IFLA_EXT_MASK: u16 = 29;
pub const IFLA_INFO_KIND: u16 = 1;
pub const IFLA_INFO_DATA: u16 = 2;
// linux/veth.h
pub const VETH_INFO_PEER: u16 = 1;
/// RTEXT_FILTER_SKIP_STATS: leave the (large) counters out of link replies.
const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;

// linux/if_addr.h
pub const IFA_ADDRESS: u16 = 1;
pub const IFA_LOCAL: u16 = 2;
pub const IFA_FLAGS: u16 = 8;
pub const IFA_F_NODAD: u32 = 0x02;

// linux/rtnetlink.h, routes
pub const RTA_DST: u16 = 1;
pub const RTA_GATEWAY: u16 = 5;
pub const RT_TABLE_MAIN: u8 = 254;
pub const RTPROT_STATIC: u8 = 4;
pub const RT_SCOPE_UNIVERSE: u8 = 0;
pub const RT_SCOPE_LINK: u8 = 253;
pub const RTN_UNICAST: u8 = 1;

const IFF_UP: u32 = 0x1;
const IFNAMSIZ: usize = 16;
const IFINFOMSG_LEN: usize = 16;

/// struct ifinfomsg.
fn ifinfomsg(index: i32, flags: u32, change: u32) -> [u8; IFINFOMSG_LEN] {
    let mut h = [0u8; IFINFOMSG_LEN];
    h[0] = libc::AF_UNSPEC as u8; // ifi_family; [1] pad, [2..4] ifi_type
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h[8..12].copy_from_slice(&flags.to_ne_bytes());
    h[12..16].copy_from_slice(&change.to_ne_bytes());
    h
}

// linux/rtnetlink.h, linux/pkt_sched.h: tc objects.
const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const RTM_GETQDISC: u16 = 38;
const TCA_KIND: u16 = 1;
const TCMSG_LEN: usize = 20;
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
const TC_H_CLSACT: u32 = 0xffff_fff1;
const TC_H_MIN_INGRESS: u32 = 0xfff2;
const TC_H_MIN_EGRESS: u32 = 0xfff3;

/// struct tcmsg.
fn tcmsg(index: u32, handle: u32, parent: u32) -> [u8; TCMSG_LEN] {
    let mut h = [0u8; TCMSG_LEN];
    h[0] = libc::AF_UNSPEC as u8;
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h[8..12].copy_from_slice(&handle.to_ne_bytes());
    h[12..16].copy_from_slice(&parent.to_ne_bytes());
    h
}

fn family(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

fn octets(addr: &IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn check_prefix(addr: IpAddr, prefix_len: u8) -> Result<()> {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix_len > max {
        bail!("prefix length /{prefix_len} is too long for {addr}");
    }
    Ok(())
}

/// The kernel's dev_valid_name(), so a bad name fails here with a reason
/// instead of as a bare EINVAL (or, with a NUL, a silently shorter name).
fn check_ifname(name: &str) -> Result<()> {
    let why = if name.is_empty() {
        "empty"
    } else if name.len() >= IFNAMSIZ {
        "longer than 15 bytes"
    } else if name == "." || name == ".." {
        "reserved"
    } else if name.contains(['/', ':', '\0']) || name.contains(char::is_whitespace) {
        "contains '/', ':', NUL or whitespace"
    } else {
        return Ok(());
    };
    bail!("invalid interface name {name:?}: {why}")
}

/// One link, as `ip link` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// ARPHRD_* (linux/if_arp.h): what header its packets start with.
    pub arphrd: u16,
    pub up: bool,
    /// IFLA_INFO_KIND: "bridge", "vlan", "veth", "dsa", ...; empty for a
    /// plain NIC (and for PPP, which reports none).
    pub kind: String,
    /// IFLA_MASTER: the bridge or bond this link is a port of, 0 for none.
    pub master: u32,
    /// IFLA_LINK: the device this one sits on (a VLAN's or DSA port's
    /// lower device; a veth's peer, in another namespace), 0 for none.
    pub lower: u32,
    /// IFLA_ADDRESS when it is a 6-byte hardware address.
    pub mac: Option<[u8; 6]>,
}

impl Link {
    pub const ARPHRD_ETHER: u16 = 1;
    pub const ARPHRD_LOOPBACK: u16 = 772;
}

/// An rtnetlink socket bound to one network namespace.
#[derive(Debug)]
pub struct RtSocket(NlSocket);

/// A new network namespace with its loopback up. The kernel makes `lo`
/// down, and nearly everything needs it: 127.0.0.1, and local delivery to
/// the namespace's other addresses, which goes through `lo` too.
pub fn new_netns() -> Result<NetNs> {
    let ns = NetNs::create()?;
    RtSocket::open(Some(&ns))
        .and_then(|mut rt| rt.set_up("lo"))
        .with_context(|| format!("bringing up lo in new network namespace {}", ns.inode()))?;
    Ok(ns)
}

impl RtSocket {
    /// Opens a socket in `ns`, or in the calling thread's namespace for None.
    pub fn open(ns: Option<&NetNs>) -> Result<RtSocket> {
        Ok(RtSocket(NlSocket::open(NETLINK_ROUTE, ns)?))
    }

    /// The underlying socket, for requests this type does not wrap.
    pub fn socket(&mut self) -> &mut NlSocket {
        &mut self.0
    }

    /// Index of the link called `name` in this socket's namespace
    /// (if_nametoindex() would look in the calling thread's instead).
    pub fn link_index(&mut self, name: &str) -> Result<u32> {
        check_ifname(name)?;
        let mut msg = MsgBuilder::new(RTM_GETLINK, 0);
        msg.header(&ifinfomsg(0, 0, 0))
            .str(IFLA_IFNAME, name)
            .u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS);
        let mut index = None;
        self.0
            .request(msg, |reply| {
                if reply.ty == RTM_NEWLINK {
                    let h = reply.header(IFINFOMSG_LEN)?;
                    index = Some(i32::from_ne_bytes([h[4], h[5], h[6], h[7]]));
                }
                Ok(())
            })
            .with_context(|| format!("looking up link {name}"))?;
        match index {
            Some(i) if i > 0 => Ok(i as u32),
            _ => bail!("looking up link {name}: no RTM_NEWLINK in the answer"),
        }
    }

    /// Every link of this socket's namespace (`ip link show`).
    pub fn links(&mut self) -> Result<Vec<Link>> {
        let mut msg = MsgBuilder::new(RTM_GETLINK, 0);
        msg.header(&ifinfomsg(0, 0, 0))
            .u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS);
        let mut links = Vec::new();
        self.0
            .dump(msg, |reply| {
                if reply.ty != RTM_NEWLINK {
                    return Ok(());
                }
                let h = reply.header(IFINFOMSG_LEN)?;
                let index = i32::from_ne_bytes([h[4], h[5], h[6], h[7]]);
                let mut link = Link {
                    index: u32::try_from(index).unwrap_or(0),
                    name: String::new(),
                    arphrd: u16::from_ne_bytes([h[2], h[3]]),
                    up: u32::from_ne_bytes([h[8], h[9], h[10], h[11]]) & IFF_UP != 0,
                    kind: String::new(),
                    master: 0,
                    lower: 0,
                    mac: None,
                };
                for a in reply.attrs(IFINFOMSG_LEN)? {
                    let a = a?;
                    match a.ty {
                        IFLA_IFNAME => link.name = a.str()?.to_string(),
                        IFLA_MASTER => link.master = a.u32()?,
                        IFLA_LINK => link.lower = a.u32()?,
                        IFLA_ADDRESS => link.mac = a.payload.try_into().ok(),
                        IFLA_LINKINFO => {
                            if let Some(k) = a.nested().find(IFLA_INFO_KIND)? {
                                link.kind = k.str()?.to_string();
                            }
                        }
                        _ => {}
                    }
                }
                links.push(link);
                Ok(())
            })
            .context("listing links")?;
        Ok(links)
    }

    /// Links (by index) that carry an address of global or site scope:
    /// the ones the IP stack itself uses (an IPv6 link-local address,
    /// which every up Ethernet device gets, does not count).
    pub fn addressed_links(&mut self) -> Result<std::collections::BTreeSet<u32>> {
        let mut msg = MsgBuilder::new(RTM_GETADDR, 0);
        msg.header(&[0u8; 8]);
        let mut found = std::collections::BTreeSet::new();
        self.0
            .dump(msg, |reply| {
                if reply.ty != RTM_NEWADDR {
                    return Ok(());
                }
                let h = reply.header(8)?;
                if h[3] < RT_SCOPE_LINK {
                    found.insert(u32::from_ne_bytes([h[4], h[5], h[6], h[7]]));
                }
                Ok(())
            })
            .context("listing addresses")?;
        Ok(found)
    }

    /// The addresses of global or site scope in this socket's namespace:
    /// what other hosts reach it by (loopback and link-local left out).
    pub fn addresses(&mut self) -> Result<Vec<IpAddr>> {
        let mut msg = MsgBuilder::new(RTM_GETADDR, 0);
        msg.header(&[0u8; 8]);
        let mut found = Vec::new();
        self.0
            .dump(msg, |reply| {
                if reply.ty != RTM_NEWADDR {
                    return Ok(());
                }
                // struct ifaddrmsg: family, prefix length, flags, scope, index.
                let h = reply.header(8)?;
                if h[3] >= RT_SCOPE_LINK {
                    return Ok(());
                }
                // IPv4 puts the interface's own address in IFA_LOCAL (IFA_ADDRESS
                // is the peer's on a point-to-point link); IPv6 has only
                // IFA_ADDRESS.
                let mut local = None;
                let mut address = None;
                for a in reply.attrs(8)? {
                    let a = a?;
                    let ip = match a.payload.len() {
                        4 => <[u8; 4]>::try_from(a.payload).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(a.payload).ok().map(IpAddr::from),
                        _ => None,
                    };
                    match a.ty {
                        IFA_LOCAL => local = ip,
                        IFA_ADDRESS => address = ip,
                        _ => {}
                    }
                }
                found.extend(local.or(address));
                Ok(())
            })
            .context("listing addresses")?;
        Ok(found)
    }

    /// Creates a bridge (`ip link add NAME type bridge`).
    pub fn add_bridge(&mut self, name: &str) -> Result<()> {
        check_ifname(name)?;
        let mut msg = MsgBuilder::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL);
        msg.header(&ifinfomsg(0, 0, 0))
            .str(IFLA_IFNAME, name)
            .nested(IFLA_LINKINFO, |m| {
                m.str(IFLA_INFO_KIND, "bridge");
            });
        self.0
            .request_ack(msg)
            .with_context(|| format!("creating bridge {name}"))
    }

    /// Creates VLAN `id` on `lower` (`ip link add NAME link LOWER type
    /// vlan id ID`).
    pub fn add_vlan(&mut self, name: &str, lower: &str, id: u16) -> Result<()> {
        check_ifname(name)?;
        let lower_index = self.link_index(lower)?;
        let mut msg = MsgBuilder::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL);
        msg.header(&ifinfomsg(0, 0, 0))
            .str(IFLA_IFNAME, name)
            .u32(IFLA_LINK, lower_index)
            .nested(IFLA_LINKINFO, |m| {
                m.str(IFLA_INFO_KIND, "vlan").nested(IFLA_INFO_DATA, |m| {
                    m.u16(IFLA_VLAN_ID, id);
                });
            });
        self.0
            .request_ack(msg)
            .with_context(|| format!("creating VLAN {name} (id {id} on {lower})"))
    }

    /// Renames a link that is down (`ip link set OLD name NEW`).
    pub fn rename(&mut self, old: &str, new: &str) -> Result<()> {
        check_ifname(new)?;
        let index = self.link_index(old)?;
        let mut msg = MsgBuilder::new(RTM_NEWLINK, 0);
        msg.header(&ifinfomsg(index as i32, 0, 0))
            .str(IFLA_IFNAME, new);
        self.0
            .request_ack(msg)
            .with_context(|| format!("renaming {old} to {new}"))
    }

    /// Makes `port` a port of `master` (`ip link set PORT master MASTER`).
    pub fn set_master(&mut self, port: &str, master: &str) -> Result<()> {
        check_ifname(port)?;
        let master_index = self.link_index(master)?;
        let mut msg = MsgBuilder::new(RTM_NEWLINK, 0);
        msg.header(&ifinfomsg(0, 0, 0))
            .str(IFLA_IFNAME, port)
            .u32(IFLA_MASTER, master_index);
        self.0
            .request_ack(msg)
            .with_context(|| format!("adding {port} to {master}"))
    }

    /// How many tc filters hang off the clsact qdisc of link `index`,
    /// ingress and egress together (`tc filter show dev X ingress|egress`).
    pub fn clsact_filters(&mut self, index: u32) -> Result<usize> {
        let mut n = 0;
        for minor in [TC_H_MIN_INGRESS, TC_H_MIN_EGRESS] {
            let mut msg = MsgBuilder::new(RTM_GETTFILTER, 0);
            msg.header(&tcmsg(index, 0, TC_H_CLSACT | minor));
            self.0
                .dump(msg, |reply| {
                    // Each classifier instance is listed once bare (handle
                    // 0), then once per filter it holds.
                    if reply.ty == RTM_NEWTFILTER {
                        let h = reply.header(TCMSG_LEN)?;
                        let handle = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
                        n += usize::from(handle != 0);
                    }
                    Ok(())
                })
                .with_context(|| format!("listing the tc filters of link {index}"))?;
        }
        Ok(n)
    }

    /// Links (by index) that carry a clsact qdisc (`tc qdisc show`).
    pub fn clsact_links(&mut self) -> Result<Vec<u32>> {
        let mut msg = MsgBuilder::new(RTM_GETQDISC, 0);
        msg.header(&tcmsg(0, 0, 0));
        let mut found = Vec::new();
        self.0
            .dump(msg, |reply| {
                if reply.ty != RTM_NEWQDISC {
                    return Ok(());
                }
                let h = reply.header(TCMSG_LEN)?;
                let index = u32::from_ne_bytes([h[4], h[5], h[6], h[7]]);
                if let Some(kind) = reply.attrs(TCMSG_LEN)?.find(TCA_KIND)?
                    && kind.str()? == "clsact"
                {
                    found.push(index);
                }
                Ok(())
            })
            .context("listing qdiscs")?;
        Ok(found)
    }

    /// Deletes the clsact qdisc of link `index` (`tc qdisc del dev X
    /// clsact`), with every filter still on it.
    pub fn delete_clsact(&mut self, index: u32) -> Result<()> {
        let mut msg = MsgBuilder::new(RTM_DELQDISC, 0);
        msg.header(&tcmsg(index, TC_H_CLSACT & 0xffff_0000, TC_H_CLSACT));
        self.0
            .request_ack(msg)
            .with_context(|| format!("deleting the clsact qdisc of link {index}"))
    }

    /// Sets the link administratively up (`ip link set NAME up`).
    pub fn set_up(&mut self, name: &str) -> Result<()> {
        check_ifname(name)?;
        // RTM_NEWLINK without NLM_F_CREATE changes an existing link, found by
        // name when the index is 0: one round trip, no index lookup.
        let mut msg = MsgBuilder::new(RTM_NEWLINK, 0);
        msg.header(&ifinfomsg(0, IFF_UP, IFF_UP))
            .str(IFLA_IFNAME, name);
        self.0
            .request_ack(msg)
            .with_context(|| format!("setting link {name} up"))
    }

    /// veth pair: `name` stays in this socket's netns, `peer` is created
    /// directly inside `peer_ns`, so it never appears (not even briefly) in
    /// this namespace, whose names it could clash with.
    pub fn add_veth(&mut self, name: &str, peer: &str, peer_ns: &NetNs) -> Result<()> {
        check_ifname(name)?;
        check_ifname(peer)?;
        // The kernel resolves IFLA_NET_NS_FD in the sending process's fd
        // table, which is ours: the send happens on this thread.
        let ns_fd = u32::try_from(peer_ns.fd().as_raw_fd()).context("negative namespace fd")?;
        let mut msg = MsgBuilder::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL);
        msg.header(&ifinfomsg(0, 0, 0))
            .str(IFLA_IFNAME, name)
            .nested(IFLA_LINKINFO, |m| {
                m.str(IFLA_INFO_KIND, "veth").nested(IFLA_INFO_DATA, |m| {
                    m.nested_raw(VETH_INFO_PEER, |m| {
                        m.header(&ifinfomsg(0, 0, 0))
                            .str(IFLA_IFNAME, peer)
                            .u32(IFLA_NET_NS_FD, ns_fd);
                    });
                });
            });
        self.0.request_ack(msg).with_context(|| {
            format!(
                "creating veth pair {name} <-> {peer} (peer in network namespace {})",
                peer_ns.inode()
            )
        })
    }

    /// Adds `addr/prefix_len` to `ifname`. IPv6 addresses get IFA_F_NODAD so
    /// they are usable at once instead of tentative for a second or two.
    pub fn add_address(&mut self, ifname: &str, addr: IpAddr, prefix_len: u8) -> Result<()> {
        check_prefix(addr, prefix_len)?;
        let index = self.link_index(ifname)?;
        let flags = if addr.is_ipv6() { IFA_F_NODAD } else { 0 };
        let mut hdr = [0u8; 8]; // struct ifaddrmsg
        hdr[0] = family(addr);
        hdr[1] = prefix_len;
        hdr[2] = flags as u8; // ifa_flags: the low 8 bits, IFA_FLAGS has all
        hdr[3] = RT_SCOPE_UNIVERSE;
        hdr[4..8].copy_from_slice(&index.to_ne_bytes());
        let bytes = octets(&addr);
        let mut msg = MsgBuilder::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL);
        msg.header(&hdr)
            .bytes(IFA_LOCAL, &bytes)
            .bytes(IFA_ADDRESS, &bytes)
            .u32(IFA_FLAGS, flags);
        self.0
            .request_ack(msg)
            .with_context(|| format!("adding address {addr}/{prefix_len} to {ifname}"))
    }

    /// Adds a route to `dst/prefix_len` via `gateway` in the main table;
    /// prefix_len 0 makes it the default route. The gateway must be
    /// reachable over a connected route already.
    pub fn add_route(&mut self, dst: IpAddr, prefix_len: u8, gateway: IpAddr) -> Result<()> {
        let what = || {
            if prefix_len == 0 {
                format!("adding default route via {gateway}")
            } else {
                format!("adding route {dst}/{prefix_len} via {gateway}")
            }
        };
        if dst.is_ipv4() != gateway.is_ipv4() {
            bail!("{}: destination and gateway families differ", what());
        }
        check_prefix(dst, prefix_len)?;
        let mut hdr = [0u8; 12]; // struct rtmsg
        hdr[0] = family(gateway);
        hdr[1] = prefix_len; // rtm_dst_len; [2] src_len, [3] tos
        hdr[4] = RT_TABLE_MAIN;
        hdr[5] = RTPROT_STATIC;
        hdr[6] = RT_SCOPE_UNIVERSE;
        hdr[7] = RTN_UNICAST; // [8..12] rtm_flags
        let mut msg = MsgBuilder::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL);
        msg.header(&hdr);
        if prefix_len > 0 {
            msg.bytes(RTA_DST, &octets(&dst));
        }
        msg.bytes(RTA_GATEWAY, &octets(&gateway));
        self.0.request_ack(msg).with_context(what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::{Attrs, NLM_F_DUMP, NlError};
    use crate::netns::skip_unless_root;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;

    const A4: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 1);
    const B4: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 2);
    const A6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 1);
    const B6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 2);

    #[test]
    fn new_netns_is_separate_and_has_loopback() {
        if skip_unless_root("new_netns_is_separate_and_has_loopback") {
            return;
        }
        let here = NetNs::current().unwrap();
        let ns = new_netns().unwrap();
        assert_ne!(ns.inode(), here.inode());
        // The caller's thread was not moved.
        assert_eq!(NetNs::current().unwrap().inode(), here.inode());

        // Inside, /proc/thread-self/ns/net is the new namespace and 127.0.0.1
        // works, which it would not with lo down.
        let (inside, echoed) = ns
            .run(|| {
                let inside = NetNs::current().unwrap().inode();
                let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
                let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
                let (s, _) = l.accept().unwrap();
                (inside, s.peer_addr().unwrap() == c.local_addr().unwrap())
            })
            .unwrap();
        assert_eq!(inside, ns.inode());
        assert!(echoed);
        assert_eq!(NetNs::current().unwrap().inode(), here.inode());
    }

    /// The IFLA_IFNAME of an RTM_NEWLINK message.
    fn link_name<'a>(msg: &crate::netlink::Msg<'a>) -> Result<Option<&'a str>> {
        let attrs: Attrs<'a> = msg.attrs(IFINFOMSG_LEN)?;
        attrs.find(IFLA_IFNAME)?.map(|a| a.str()).transpose()
    }

    fn links(rt: &mut RtSocket) -> Vec<String> {
        let mut names = Vec::new();
        rt.socket()
            .dump(
                {
                    let mut m = MsgBuilder::new(RTM_GETLINK, NLM_F_DUMP);
                    m.header(&ifinfomsg(0, 0, 0))
                        .u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS);
                    m
                },
                |m| {
                    if let Some(n) = link_name(m)? {
                        names.push(n.to_owned());
                    }
                    Ok(())
                },
            )
            .unwrap();
        names.sort();
        names
    }

    /// Connects from `client_ns` to a listener in `server_ns` and exchanges a
    /// few bytes both ways, all with timeouts so a broken lab fails, not hangs.
    fn tcp_roundtrip(client_ns: &NetNs, server_ns: &NetNs, server: SocketAddr) {
        let listener = server_ns
            .run(move || TcpListener::bind(server))
            .unwrap()
            .unwrap();
        let server_thread = std::thread::spawn(move || {
            let (mut s, peer) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).unwrap();
            s.write_all(b"pong").unwrap();
            (buf, peer)
        });
        let (reply, local) = client_ns
            .run(move || {
                let mut c = TcpStream::connect_timeout(&server, Duration::from_secs(5)).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                c.write_all(b"ping").unwrap();
                let mut buf = [0u8; 4];
                c.read_exact(&mut buf).unwrap();
                (buf, c.local_addr().unwrap())
            })
            .unwrap();
        let (got, peer) = server_thread.join().unwrap();
        assert_eq!(&got, b"ping");
        assert_eq!(&reply, b"pong");
        assert_eq!(peer, local);
    }

    #[test]
    fn netlink_rtnetlink_veth_lab_carries_tcp_on_both_families() {
        if skip_unless_root("netlink_rtnetlink_veth_lab_carries_tcp_on_both_families") {
            return;
        }
        let lab_names = ["veth-a".to_owned(), "veth-b".to_owned()];
        let host_links = links(&mut RtSocket::open(None).unwrap());
        assert!(
            !host_links.iter().any(|l| lab_names.contains(l)),
            "{host_links:?}"
        );

        let a = new_netns().unwrap();
        let b = new_netns().unwrap();
        let mut rta = RtSocket::open(Some(&a)).unwrap();
        let mut rtb = RtSocket::open(Some(&b)).unwrap();
        rta.add_veth("veth-a", "veth-b", &b).unwrap();
        assert_eq!(links(&mut rta), ["lo", "veth-a"]);
        assert_eq!(links(&mut rtb), ["lo", "veth-b"]);
        assert!(rta.link_index("veth-a").unwrap() > 1);

        rta.add_address("veth-a", A4.into(), 24).unwrap();
        rtb.add_address("veth-b", B4.into(), 24).unwrap();
        rta.add_address("veth-a", A6.into(), 64).unwrap();
        rtb.add_address("veth-b", B6.into(), 64).unwrap();
        rta.set_up("veth-a").unwrap();
        rtb.set_up("veth-b").unwrap();
        // Routes through the peer, exercising add_route (default and prefix).
        rta.add_route(Ipv4Addr::UNSPECIFIED.into(), 0, B4.into())
            .unwrap();
        rtb.add_route(
            Ipv6Addr::new(0xfd98, 0, 0, 0, 0, 0, 0, 0).into(),
            64,
            A6.into(),
        )
        .unwrap();

        tcp_roundtrip(&a, &b, SocketAddr::new(B4.into(), 7001));
        tcp_roundtrip(&a, &b, SocketAddr::new(B6.into(), 7001));
        tcp_roundtrip(&b, &a, SocketAddr::new(A6.into(), 7002));

        // Errors name the object and keep the errno.
        let e = rta.add_address("veth-a", A4.into(), 24).unwrap_err();
        assert_eq!(NlError::errno_of(&e), Some(libc::EEXIST), "{e:#}");
        assert!(
            format!("{e:#}").contains("adding address 10.199.0.1/24 to veth-a"),
            "{e:#}"
        );
        let e = rta.set_up("nope0").unwrap_err();
        assert_eq!(NlError::errno_of(&e), Some(libc::ENODEV), "{e:#}");
        assert!(format!("{e:#}").contains("nope0"));
        assert!(rta.link_index("veth-b").is_err(), "peer is not in a");
        assert!(rta.add_veth("bad/name", "x", &b).is_err());
        assert!(rta.add_veth("waytoolonginterfacename", "x", &b).is_err());
        assert!(rta.add_address("veth-a", A4.into(), 33).is_err());
        assert!(rta.add_route(A4.into(), 32, B6.into()).is_err());

        drop((rta, rtb, a, b));
        // Nothing of the lab leaked into the host namespace.
        let after = links(&mut RtSocket::open(None).unwrap());
        assert!(!after.iter().any(|l| lab_names.contains(l)), "{after:?}");
    }
}
