//! The Kubernetes Service behind a destination address, on a node whose
//! kube-proxy programs netfilter: a dropped SYN to 10.96.0.10:53 is a SYN
//! to `kube-system/kube-dns:dns-tcp`.
//!
//! The names come from kube-proxy's own rules in the node's network
//! namespace (see [`crate::netlink::kube_proxy`]), read again every 10 s
//! when asked, so that Services come and go without a restart. Only names
//! shaped like Kubernetes' own (`namespace/name[:port]`, DNS labels) are
//! kept: the text is written by whoever can change the ruleset.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    event::Proto,
    netlink::kube_proxy::{self, Mode},
    netns::NetNs,
};

/// Services change at human speed; a read is one or two netlink dumps.
const REREAD_EVERY: Duration = Duration::from_secs(10);
/// More than any cluster's Service ports on one node; past it the rest are
/// left unnamed rather than held.
pub const MAX_ADDRESSES: usize = 65_536;
/// Namespaces whose rules are kept; flows of others use the node's.
const MAX_NAMESPACES: usize = 64;

/// What the last read found, for `probe` and the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    Names {
        mode: Mode,
        addresses: usize,
    },
    /// No kube-proxy rules in nf_tables; why that leaves names out.
    Nothing(String),
}

impl Found {
    pub fn usable(&self) -> bool {
        matches!(self, Found::Names { .. })
    }

    pub fn describe(&self) -> String {
        match self {
            Found::Names { mode, addresses } => {
                format!("{addresses} Service addresses ({})", mode.describe())
            }
            Found::Nothing(why) => why.clone(),
        }
    }
}

/// The rules of each namespace asked about, and of the node's. A flow is
/// named from its own namespace's rules (the node's, for flows tracked
/// there), else from the node's (a pod's namespace has none, but its
/// connections to a ClusterIP are the node's Services).
pub struct ClusterIps {
    /// The node's namespace: where kube-proxy writes its rules.
    node_netns: PathBuf,
    node_inode: Option<u64>,
    read: HashMap<u64, Rules>,
    /// Namespaces asked about since the last read.
    wanted: HashSet<u64>,
    last: Option<Instant>,
}

/// One namespace's names and what the read found.
struct Rules {
    by_dst: Names,
    found: Found,
}

type Names = HashMap<(IpAddr, u8, u16), Arc<str>>;

impl ClusterIps {
    /// Reads kube-proxy's rules in the namespace of `root`/proc/1 (the
    /// host's, also under `--host-root`) and in the namespaces of flows.
    pub fn new(root: impl Into<PathBuf>) -> ClusterIps {
        ClusterIps {
            node_netns: root.into().join("proc/1/ns/net"),
            node_inode: None,
            read: HashMap::new(),
            wanted: HashSet::new(),
            last: None,
        }
    }

    /// `namespace/name:port` of the Service with this address, protocol
    /// and port, for a flow tracked in namespace `netns`.
    pub fn service(&mut self, netns: u64, ip: IpAddr, proto: Proto, port: u16) -> Option<Arc<str>> {
        let unread = !self.read.contains_key(&netns)
            && !self.wanted.contains(&netns)
            && self.read.len() + self.wanted.len() < MAX_NAMESPACES;
        if unread {
            self.wanted.insert(netns);
        }
        let due = self.last.is_none_or(|t| t.elapsed() >= REREAD_EVERY);
        // A namespace new to us is read at once, at most once a second.
        let hurry = unread
            && self
                .last
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if due || hurry {
            self.reread();
        }
        let key = (ip, proto.number(), port);
        [Some(netns), self.node_inode]
            .into_iter()
            .flatten()
            .find_map(|ns| self.read.get(&ns)?.by_dst.get(&key).cloned())
    }

    /// What the node's rules gave, read now.
    pub fn found(&mut self) -> Found {
        self.reread();
        match self.node_inode.and_then(|n| self.read.get(&n)) {
            Some(r) => r.found.clone(),
            None => Found::Nothing(format!(
                "cannot enter the node's namespace ({})",
                self.node_netns.display()
            )),
        }
    }

    fn reread(&mut self) {
        self.last = Some(Instant::now());
        // PID 1's namespace may be closed to us (ctrace inside a user
        // namespace); then ctrace's own stands in, which is the node's for
        // a hostNetwork pod or a service on the host.
        let node = NetNs::open(&self.node_netns)
            .inspect_err(|e| log::debug!("Service names: node namespace: {e:#}; using ours"))
            .or_else(|_| NetNs::current())
            .ok();
        self.node_inode = node.as_ref().map(NetNs::inode);
        let mut wanted: HashSet<u64> = self.read.keys().copied().collect();
        wanted.extend(self.wanted.drain());
        let mut handles: HashMap<u64, NetNs> = HashMap::new();
        if let Some(n) = node {
            wanted.remove(&n.inode());
            handles.insert(n.inode(), n);
        }
        if !wanted.is_empty() {
            match crate::netns::discover() {
                Ok(all) => {
                    for info in all.into_iter().filter(|i| wanted.contains(&i.inode)) {
                        // A task that exited since discovery may have left
                        // its number to one in another namespace.
                        if let Ok(ns) = NetNs::open(&info.path)
                            && ns.inode() == info.inode
                        {
                            handles.insert(info.inode, ns);
                        }
                    }
                }
                Err(e) => log::debug!("Service names: {e:#}"),
            }
        }
        let own = NetNs::current().ok().map(|n| n.inode());
        let before = self
            .node_inode
            .and_then(|n| self.read.get(&n))
            .map(|r| r.found.clone());
        // Namespaces gone since are forgotten with their names.
        self.read.clear();
        for (inode, ns) in handles {
            // Entering our own namespace is a needless setns.
            let ns = (own != Some(inode)).then_some(ns);
            let (by_dst, found) =
                read(ns.as_ref()).unwrap_or_else(|why| (Names::new(), Found::Nothing(why)));
            self.read.insert(inode, Rules { by_dst, found });
        }
        let now = self
            .node_inode
            .and_then(|n| self.read.get(&n))
            .map(|r| r.found.clone());
        if now != before
            && let Some(found) = now
        {
            log::info!(
                "Kubernetes Service names (node namespace): {}",
                crate::text::terminal(&found.describe())
            );
        }
    }
}

fn read(ns: Option<&NetNs>) -> Result<(Names, Found), String> {
    let Some((mode, ips)) = kube_proxy::read(ns).map_err(|e| format!("{e:#}"))? else {
        return Err(format!(
            "no kube-proxy rules in nf_tables (neither map {} of table {} nor chain {} of \
             table {}); iptables-legacy rules are not read",
            kube_proxy::NFT_MAP,
            kube_proxy::NFT_TABLE,
            kube_proxy::IPT_CHAIN,
            kube_proxy::IPT_TABLE
        ));
    };
    let mut by_dst = Names::new();
    let mut rejected = 0usize;
    for ip in ips {
        if by_dst.len() >= MAX_ADDRESSES {
            break;
        }
        match service_name(&ip.comment) {
            Some(name) => {
                by_dst.insert((ip.ip, ip.proto, ip.port), Arc::from(name));
            }
            None => rejected += 1,
        }
    }
    if rejected > 0 {
        log::debug!("{rejected} kube-proxy comments are no Service name; left unnamed");
    }
    let addresses = by_dst.len();
    Ok((by_dst, Found::Names { mode, addresses }))
}

/// `namespace/name:port` from a kube-proxy comment: nftables mode writes
/// exactly that, iptables mode adds what the address is (`… cluster IP`,
/// `… external IP`, `… loadbalancer IP`). None for anything not shaped like
/// Kubernetes names.
pub fn service_name(comment: &str) -> Option<&str> {
    let name = comment.split(' ').next()?;
    let (namespace, rest) = name.split_once('/')?;
    let (service, port) = match rest.split_once(':') {
        Some((s, p)) => (s, Some(p)),
        None => (rest, None),
    };
    let label = |s: &str, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    (label(namespace, 63) && label(service, 63) && port.is_none_or(|p| label(p, 63)))
        .then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kubernetes_shaped_names_are_kept() {
        assert_eq!(
            service_name("kube-system/kube-dns:dns-tcp"),
            Some("kube-system/kube-dns:dns-tcp")
        );
        assert_eq!(
            service_name("kube-system/kube-dns:dns-tcp cluster IP"),
            Some("kube-system/kube-dns:dns-tcp")
        );
        assert_eq!(
            service_name("default/kubernetes"),
            Some("default/kubernetes")
        );
        for bad in [
            "kubernetes service nodeports; NOTE: this must be the last rule in this chain",
            "",
            "/x",
            "a/",
            "A/b",
            "a/b:\u{1b}[2J",
            "a/b\u{7}",
            "../../etc/passwd",
            "../x",
        ] {
            assert_eq!(service_name(bad), None, "{bad:?}");
        }
        let long = format!("{}/b", "a".repeat(64));
        assert_eq!(service_name(&long), None);
    }
}
