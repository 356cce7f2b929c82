//! Which devices of a namespace carry the tc programs: the ones where the
//! IP stack, and so conntrack, receives and sends. A packet is then seen
//! once, on the device conntrack sees it on, and a held flow's forwarded
//! copy leaves with that device as its `ingress_ifindex`.
//!
//! - Bridge masters, VLAN uppers, PPP, WireGuard and tun devices, and plain
//!   NICs with no master: hooked.
//! - Bridge ports and bond slaves: their traffic reaches IP on the master.
//! - A VLAN's (or macvlan's) lower device with no address of its own: only
//!   its uppers carry IP. With an address, it carries IP itself, and its
//!   tagged frames are skipped there by the programs (they count them).
//! - A DSA conduit: it carries switch-tagged frames of the user ports.
use std::collections::BTreeSet;

use crate::netlink::rtnetlink::Link;
pub use crate::readings::DeviceChoice;

/// Decides for every link of one namespace. `addressed`: the links with an
/// address of their own (`RtSocket::addressed_links`); `ifaces`: `--iface`,
/// which narrows the hooked set (empty: no narrowing).
pub fn choose(
    netns: u64,
    links: &[Link],
    addressed: &BTreeSet<u32>,
    ifaces: &[String],
) -> Vec<DeviceChoice> {
    let name_of = |index: u32| {
        links
            .iter()
            .find(|l| l.index == index)
            .map_or_else(|| format!("ifindex {index}"), |l| l.name.clone())
    };
    // Uppers stacked on each link: a kind of "dsa" marks a switch port on
    // its conduit; vlan, macvlan and ipvlan take their traffic off it.
    let uppers = |index: u32, kinds: &[&str]| -> Vec<String> {
        links
            .iter()
            .filter(|u| u.lower == index && u.index != index && kinds.contains(&u.kind.as_str()))
            .map(|u| u.name.clone())
            .collect()
    };
    links
        .iter()
        .map(|l| {
            let (hooked, why) = decide(l, addressed, &name_of, &uppers);
            let (hooked, why) = if hooked && !ifaces.is_empty() && !ifaces.contains(&l.name) {
                (false, "not named by --iface".to_string())
            } else {
                (hooked, why)
            };
            DeviceChoice {
                netns,
                name: l.name.clone(),
                ifindex: l.index,
                hooked,
                why,
            }
        })
        .collect()
}

fn decide(
    l: &Link,
    addressed: &BTreeSet<u32>,
    name_of: &dyn Fn(u32) -> String,
    uppers: &dyn Fn(u32, &[&str]) -> Vec<String>,
) -> (bool, String) {
    if l.arphrd == Link::ARPHRD_LOOPBACK {
        return (false, "loopback".into());
    }
    if !l.up {
        return (false, "down (hooked once up)".into());
    }
    if l.master != 0 {
        return (
            false,
            format!(
                "port of {}: its traffic reaches IP there",
                name_of(l.master)
            ),
        );
    }
    let dsa = uppers(l.index, &["dsa"]);
    if !dsa.is_empty() {
        return (
            false,
            format!(
                "DSA conduit of {}: carries switch-tagged frames",
                dsa.join(", ")
            ),
        );
    }
    let vlans = uppers(l.index, &["vlan", "macvlan", "ipvlan"]);
    if !vlans.is_empty() && !addressed.contains(&l.index) {
        return (
            false,
            format!("carries IP only for {}, hooked there", vlans.join(", ")),
        );
    }
    let why = match l.kind.as_str() {
        "bridge" => "bridge: IP receives and sends its ports' traffic here".to_string(),
        "vlan" => format!("VLAN device on {}", name_of(l.lower)),
        _ if l.arphrd != Link::ARPHRD_ETHER => {
            "device without a link-layer header (PPP, WireGuard, tun)".to_string()
        }
        _ if !vlans.is_empty() => format!(
            "has addresses of its own (tagged frames for {} are skipped)",
            vlans.join(", ")
        ),
        "" => "device with no master".to_string(),
        kind => format!("{kind} device with no master"),
    };
    (true, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: &str, master: u32, lower: u32) -> Link {
        Link {
            index,
            name: name.into(),
            arphrd: if name == "lo" {
                Link::ARPHRD_LOOPBACK
            } else if name.starts_with("ppp") || name.starts_with("wg") {
                512
            } else {
                Link::ARPHRD_ETHER
            },
            up: true,
            kind: kind.into(),
            master,
            lower,
            mac: Some([2, 0, 0, 0, 0, index as u8]),
        }
    }

    fn hooked(choices: &[DeviceChoice]) -> Vec<&str> {
        choices
            .iter()
            .filter(|c| c.hooked)
            .map(|c| c.name.as_str())
            .collect()
    }

    /// A stock OpenWrt 24.10 router on a DSA switch: lan1..lan3 under
    /// br-lan, wan as a DSA user port carrying PPPoE, eth0 the conduit.
    #[test]
    fn openwrt_dsa_router_hooks_the_bridge_wan_and_ppp_only() {
        let links = [
            link(1, "lo", "", 0, 0),
            link(2, "eth0", "", 0, 0),
            link(3, "lan1", "dsa", 6, 2),
            link(4, "lan2", "dsa", 6, 2),
            link(5, "wan", "dsa", 0, 2),
            link(6, "br-lan", "bridge", 0, 0),
            link(7, "pppoe-wan", "", 0, 0),
        ];
        let addressed = BTreeSet::from([6, 7]);
        let c = choose(1, &links, &addressed, &[]);
        assert_eq!(hooked(&c), ["wan", "br-lan", "pppoe-wan"]);
        let why = |n: &str| c.iter().find(|c| c.name == n).unwrap().why.clone();
        assert!(
            why("eth0").contains("DSA conduit of lan1, lan2, wan"),
            "{c:?}"
        );
        assert!(why("lan1").contains("port of br-lan"), "{c:?}");
        assert!(why("pppoe-wan").contains("PPP"), "{c:?}");
    }

    /// swconfig-era OpenWrt: eth0.1 under br-lan, eth0.2 the WAN.
    #[test]
    fn swconfig_router_hooks_vlan_uppers_not_their_lower() {
        let links = [
            link(1, "lo", "", 0, 0),
            link(2, "eth0", "", 0, 0),
            link(3, "eth0.1", "vlan", 5, 2),
            link(4, "eth0.2", "vlan", 0, 2),
            link(5, "br-lan", "bridge", 0, 0),
        ];
        let c = choose(1, &links, &BTreeSet::from([4, 5]), &[]);
        assert_eq!(hooked(&c), ["eth0.2", "br-lan"]);
        // The lower gets an address of its own: it carries IP too.
        let c = choose(1, &links, &BTreeSet::from([2, 4, 5]), &[]);
        assert_eq!(hooked(&c), ["eth0", "eth0.2", "br-lan"]);
    }

    #[test]
    fn iface_narrows_and_down_links_wait() {
        let mut links = vec![
            link(1, "lo", "", 0, 0),
            link(2, "eth0", "veth", 0, 9),
            link(3, "eth1", "veth", 0, 9),
        ];
        links[2].up = false;
        let c = choose(1, &links, &BTreeSet::new(), &[]);
        assert_eq!(hooked(&c), ["eth0"]);
        let c = choose(1, &links, &BTreeSet::new(), &["eth1".into()]);
        assert!(hooked(&c).is_empty());
        assert!(c[1].why.contains("--iface"));
        assert!(c[2].why.contains("down"));
    }
}
