//! Names people know a network namespace by, besides its inode: the main
//! processes inside it and, on a Kubernetes node, the pod that owns it.
//!
//! The pod is found without an API server, the way the node itself knows
//! it: a pod's processes live in a cgroup whose path carries the pod's UID
//! (`kubepods-besteffort-pod<uid>.slice` with the systemd driver,
//! `kubepods/burstable/pod<uid>/` with cgroupfs), and the kubelet logs
//! every pod under `/var/log/pods/<namespace>_<name>_<uid>/`.
//!
//! Everything is read under a root directory (`--host-root`), so that a
//! containerised ctrace can be pointed at the host's /proc and /var/log.
//!
//! [`PodAddresses`] turns that around for flows: the pod behind an address
//! is the pod whose namespace holds an interface with it.
use std::{
    collections::{BTreeMap, HashMap},
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{cluster_ips::ClusterIps, event::Flow, netlink::rtnetlink::RtSocket, netns::NetNs};

/// Processes named per namespace; more would crowd the live view.
const MAX_PROCESSES: usize = 3;
/// Kubernetes' sandbox holder: it owns the namespace but says nothing.
const SANDBOX_COMMS: [&str; 1] = ["pause"];
/// Processes come and go slowly compared with the sampling interval; a
/// scan reads three small files per process.
const RESCAN_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetnsNames {
    /// `namespace/name` of the Kubernetes pod whose processes are inside.
    pub pod: Option<String>,
    /// Commands of the lowest-numbered processes inside (not the sandbox).
    pub processes: Vec<String>,
}

pub struct Namer {
    root: PathBuf,
    last_scan: Option<Instant>,
    names: HashMap<u64, NetnsNames>,
}

impl Namer {
    pub fn new(root: impl Into<PathBuf>) -> Namer {
        Namer {
            root: root.into(),
            last_scan: None,
            names: HashMap::new(),
        }
    }

    /// Rescans when the last scan is old enough.
    pub fn refresh(&mut self) {
        if self.last_scan.is_some_and(|t| t.elapsed() < RESCAN_EVERY) {
            return;
        }
        self.last_scan = Some(Instant::now());
        self.names = scan(&self.root);
    }

    pub fn get(&self, inode: u64) -> NetnsNames {
        self.names.get(&inode).cloned().unwrap_or_default()
    }

    /// Namespaces a pod owns, with the pod's `namespace/name`.
    pub fn pods(&self) -> impl Iterator<Item = (u64, &str)> {
        self.names
            .iter()
            .filter_map(|(inode, n)| Some((*inode, n.pod.as_deref()?)))
    }
}

/// The pods of this node at either end of a flow, and the Service its
/// destination address is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowPods {
    pub src: Option<Arc<str>>,
    pub dst: Option<Arc<str>>,
    /// `namespace/name:port` of the Service whose ClusterIP (or external
    /// or load-balancer IP) and port the destination is.
    pub dst_service: Option<Arc<str>>,
}

/// The pod of this node an address belongs to. Every namespace holding a
/// process is looked at, not only those with conntrack activity (a pod's
/// own namespace rarely has any). The node's own namespace names no pod:
/// hostNetwork pods share it, and with it the node's addresses.
pub struct PodAddresses {
    root: PathBuf,
    namer: Namer,
    services: ClusterIps,
    by_ip: HashMap<IpAddr, Arc<str>>,
    last: Option<Instant>,
}

impl PodAddresses {
    pub fn new(root: impl Into<PathBuf>) -> PodAddresses {
        let root = root.into();
        PodAddresses {
            namer: Namer::new(&root),
            services: ClusterIps::new(&root),
            root,
            by_ip: HashMap::new(),
            last: None,
        }
    }

    /// `namespace/name` of the pod with address `ip`. The map is rebuilt
    /// when asked and older than a rescan period (pods come and go slowly
    /// compared with flows; a node with nothing to name pays nothing), in
    /// line: one /proc scan and one address dump per pod every 10 s at
    /// most. A pod's address taken over by another within that time names
    /// the old one until then.
    pub fn pod(&mut self, ip: IpAddr) -> Option<Arc<str>> {
        if self.last.is_none_or(|t| t.elapsed() >= RESCAN_EVERY) {
            self.rebuild();
        }
        self.by_ip.get(&ip).cloned()
    }

    /// The pods at both ends of a flow, and the Service it is addressed to.
    pub fn flow(&mut self, flow: &Flow) -> FlowPods {
        FlowPods {
            src: self.pod(flow.src.ip()),
            dst: self.pod(flow.dst.ip()),
            dst_service: self.services.service(
                flow.netns,
                flow.dst.ip(),
                flow.proto,
                flow.dst.port(),
            ),
        }
    }

    fn rebuild(&mut self) {
        self.last = Some(Instant::now());
        self.namer.refresh();
        let node = netns_inode(&self.root.join("proc/1/ns/net"));
        let paths: HashMap<u64, PathBuf> = match crate::netns::discover() {
            Ok(all) => all.into_iter().map(|i| (i.inode, i.path)).collect(),
            Err(e) => {
                log::debug!("pod addresses: {e:#}");
                return;
            }
        };
        let mut by_ip = HashMap::new();
        for (inode, pod) in self.namer.pods() {
            if Some(inode) == node {
                continue;
            }
            let Some(path) = paths.get(&inode) else {
                continue;
            };
            let pod: Arc<str> = Arc::from(pod);
            let addrs = NetNs::open(path).and_then(|ns| {
                // A task that exited since discovery may have left its
                // number to one in another namespace.
                anyhow::ensure!(ns.inode() == inode, "moved to another namespace");
                RtSocket::open(Some(&ns))?.addresses()
            });
            match addrs {
                Ok(addrs) => by_ip.extend(addrs.into_iter().map(|ip| (ip, pod.clone()))),
                // Gone since the scan, or not ours to enter.
                Err(e) => log::debug!("pod {pod}: addresses unreadable: {e:#}"),
            }
        }
        self.by_ip = by_ip;
    }
}

/// The inode in a `net:[4026531840]` link target.
fn netns_inode(link: &Path) -> Option<u64> {
    let t = fs::read_link(link).ok()?;
    t.to_str()?
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The pod UID in a process's /proc/PID/cgroup, if a kubelet made it.
pub fn pod_uid(cgroup: &str) -> Option<String> {
    for line in cgroup.lines() {
        // "0::/kubepods.slice/…" (v2) or "4:memory:/kubepods/…" (v1).
        let path = line.splitn(3, ':').nth(2)?;
        if !path.contains("kubepods") {
            continue;
        }
        for part in path.split('/') {
            let part = part.strip_suffix(".slice").unwrap_or(part);
            // "kubepods-besteffort-pod<uid>" or "pod<uid>".
            let Some(at) = part.rfind("pod") else {
                continue;
            };
            // The systemd driver escapes the UID's dashes as underscores.
            let uid = part[at + 3..].replace('_', "-");
            if is_uid(&uid) {
                return Some(uid);
            }
        }
    }
    None
}

fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.chars().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// `namespace/name` of pod `uid`, from the kubelet's log directories.
fn pod_name(pods_dir: &Path, uid: &str) -> Option<String> {
    let suffix = format!("_{uid}");
    fs::read_dir(pods_dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        let (ns, pod) = name.strip_suffix(&suffix)?.split_once('_')?;
        Some(format!("{ns}/{pod}"))
    })
}

fn scan(root: &Path) -> HashMap<u64, NetnsNames> {
    let proc_dir = root.join("proc");
    let Ok(dir) = fs::read_dir(&proc_dir) else {
        log::debug!("cannot list {}", proc_dir.display());
        return HashMap::new();
    };
    // Lowest PIDs first: a namespace's first processes are its main ones.
    let mut pids: Vec<u32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let mut found: BTreeMap<u64, (Vec<String>, Option<String>)> = BTreeMap::new();
    for pid in pids {
        let p = proc_dir.join(pid.to_string());
        // Exited since the listing, or not ours to read: skip.
        let Some(inode) = netns_inode(&p.join("ns/net")) else {
            continue;
        };
        let entry = found.entry(inode).or_default();
        if entry.1.is_none()
            && let Ok(cg) = fs::read_to_string(p.join("cgroup"))
        {
            entry.1 = pod_uid(&cg);
        }
        // Kernel threads (empty command line) live in the host's
        // namespace but are nobody's service.
        if entry.0.len() < MAX_PROCESSES
            && fs::metadata(p.join("cmdline")).is_ok()
            && fs::read(p.join("cmdline")).is_ok_and(|c| !c.is_empty())
            && let Ok(comm) = fs::read_to_string(p.join("comm"))
        {
            let comm = comm.trim().to_string();
            if !comm.is_empty()
                && !SANDBOX_COMMS.contains(&comm.as_str())
                && !entry.0.contains(&comm)
            {
                entry.0.push(comm);
            }
        }
    }
    let pods_dir = root.join("var/log/pods");
    found
        .into_iter()
        .map(|(inode, (processes, uid))| {
            let pod = uid.and_then(|u| pod_name(&pods_dir, &u));
            (inode, NetnsNames { pod, processes })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5f0c8a6e-1b2d-4c3e-9f00-0123456789ab";

    #[test]
    fn pod_uids_of_both_cgroup_drivers() {
        let systemd = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-0123.scope\n",
            UID.replace('-', "_")
        );
        assert_eq!(pod_uid(&systemd).as_deref(), Some(UID));
        let cgroupfs = format!("12:memory:/kubepods/burstable/pod{UID}/0123abcd\n");
        assert_eq!(pod_uid(&cgroupfs).as_deref(), Some(UID));
        assert_eq!(
            pod_uid("0::/user.slice/user-0.slice/session-1.scope\n"),
            None
        );
        assert_eq!(
            pod_uid("0::/kubepods.slice/kubepods-podnotauid.slice\n"),
            None
        );
    }

    #[test]
    fn a_fixture_root_names_its_namespace() {
        let root = std::env::temp_dir().join(format!("ctrace-pods-{}", std::process::id()));
        let p = root.join("proc/4242");
        fs::create_dir_all(p.join("ns")).unwrap();
        std::os::unix::fs::symlink("net:[4026599999]", p.join("ns/net")).unwrap();
        fs::write(p.join("comm"), "etcd\n").unwrap();
        fs::write(p.join("cmdline"), "etcd\0--name\0node1\0").unwrap();
        fs::write(
            p.join("cgroup"),
            format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/x.scope\n", UID.replace('-', "_")),
        )
        .unwrap();
        fs::create_dir_all(root.join(format!("var/log/pods/kube-system_etcd-node1_{UID}")))
            .unwrap();
        let mut n = Namer::new(&root);
        n.refresh();
        let got = n.get(4026599999);
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(
            got,
            NetnsNames {
                pod: Some("kube-system/etcd-node1".into()),
                processes: vec!["etcd".into()],
            }
        );
    }
}
