//! The tick: every CPU moves the TCP flow it holds into the pending map
//! before a sweep reads that map (see `HELD` in ctrace-ebpf/src/tc.rs).
//!
//! A CPU moves its held flow when it opens the next one, so a CPU that
//! opens no more would keep a dropped flow from its judge. Before every
//! sweep, a thread of ctrace's visits each CPU in turn and sends itself a
//! datagram over the loopback device of a namespace of its own, where the
//! egress program is hooked: that run, on that CPU, with bottom halves
//! disabled like every tc run, moves the flow. Nothing outside ctrace
//! changes: the namespace, its device and hook go when ctrace does.
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::mpsc,
    thread,
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{TcAttachType, tc::SchedClassifierLink},
};
use ctrace_common::tc::{DeviceKey, TICK_SLOT};

use crate::{loader::TcAttachMode, netlink::rtnetlink, netns::NetNs};

/// Where the tick's datagrams leave: `lo` in a fresh namespace has index 1
/// and, in the Ethernet header the loopback device builds, a zero address.
pub const DEVICE: DeviceKey = DeviceKey {
    ifindex: 1,
    mac: [0; 6],
    _pad: [0; 2],
};

pub struct Tick {
    /// Kept open: the namespace lives as long as ctrace holds it.
    ns: NetNs,
    /// Dropped inside the namespace (a clsact filter is deleted by
    /// ifindex, which means something only there).
    link: Option<SchedClassifierLink>,
    /// Until the first tick: the thread is started then, after ctrace has
    /// dropped the privileges it no longer needs (capabilities are each
    /// thread's own, and a thread keeps those it was started with).
    idle: Option<(Vec<usize>, UdpSocket)>,
    /// One request per sweep; the answer is how many CPUs the thread
    /// could not run on.
    requests: Option<mpsc::SyncSender<mpsc::SyncSender<usize>>>,
    unreached: usize,
}

impl Tick {
    pub fn start(ebpf: &mut Ebpf, mode: TcAttachMode) -> anyhow::Result<Tick> {
        let ns = rtnetlink::new_netns().context("creating the tick's namespace")?;
        let mut added = false;
        let link = super::attach(
            ebpf,
            &ns,
            mode,
            super::EGRESS,
            DEVICE.ifindex,
            TcAttachType::Egress,
            &mut added,
        )
        .context("hooking the tick's loopback device")?;
        let socket = ns
            .run(|| -> std::io::Result<UdpSocket> {
                let s = UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
                s.connect(s.local_addr()?)?;
                s.set_nonblocking(true)?;
                Ok(s)
            })?
            .context("opening the tick's socket")?;
        let cpus = online_cpus().context("reading the online CPUs")?;
        Ok(Tick {
            ns,
            link: Some(link),
            idle: Some((cpus, socket)),
            requests: None,
            unreached: 0,
        })
    }

    /// Makes every CPU it can run on move its held flow; returns once they
    /// all have.
    pub fn run(&mut self) {
        if let Some((cpus, socket)) = self.idle.take() {
            let (requests, rx) = mpsc::sync_channel::<mpsc::SyncSender<usize>>(1);
            let started = thread::Builder::new()
                .name("ctrace-tick".into())
                .spawn(move || {
                    for reply in rx {
                        let _ = reply.send(visit(&cpus, &socket));
                    }
                });
            match started {
                Ok(_) => self.requests = Some(requests),
                Err(e) => log::warn!("tc tier: starting the tick's thread: {e}"),
            }
        }
        let (reply, done) = mpsc::sync_channel(1);
        if self
            .requests
            .as_ref()
            .is_none_or(|r| r.send(reply).is_err())
        {
            return;
        }
        if let Ok(unreached) = done.recv()
            && unreached != self.unreached
        {
            if unreached > 0 {
                log::warn!(
                    "tc tier: {unreached} CPUs are outside ctrace's CPU set: a dropped TCP \
                     flow one of them holds is judged only after that CPU opens another flow"
                );
            }
            self.unreached = unreached;
        }
    }
}

impl Drop for Tick {
    fn drop(&mut self) {
        if let Some(link) = self.link.take() {
            let _ = self.ns.run(move || drop(link));
        }
    }
}

/// Runs on each CPU in turn and sends one datagram there; the CPUs it
/// could not run on.
fn visit(cpus: &[usize], socket: &UdpSocket) -> usize {
    let mut unreached = 0;
    for &cpu in cpus {
        // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and
        // sched_setaffinity only read and write it.
        let pinned = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
        };
        // The send runs the egress program on the CPU the thread is on:
        // sched_setaffinity has moved it there before returning.
        if !pinned || socket.send(&[0]).is_err() {
            unreached += 1;
        }
    }
    let mut buf = [0u8; 8];
    while socket.recv(&mut buf).is_ok() {}
    unreached
}

/// The CPUs /sys lists as online ("0-3,6").
fn online_cpus() -> anyhow::Result<Vec<usize>> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online")?;
    parse_cpu_list(text.trim())
}

fn parse_cpu_list(list: &str) -> anyhow::Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi): (usize, usize) = (lo.parse()?, hi.parse()?);
        anyhow::ensure!(
            lo <= hi && hi < libc::CPU_SETSIZE as usize,
            "CPU range `{part}`"
        );
        cpus.extend(lo..=hi);
    }
    anyhow::ensure!(!cpus.is_empty(), "no CPU listed");
    Ok(cpus)
}

/// The row `DEVICES` needs for the tick.
pub fn device_row() -> (DeviceKey, u32) {
    (DEVICE, TICK_SLOT)
}

#[cfg(test)]
mod tests {
    use super::parse_cpu_list;

    #[test]
    fn cpu_lists_parse_as_sysfs_writes_them() {
        assert_eq!(parse_cpu_list("0").unwrap(), vec![0]);
        assert_eq!(parse_cpu_list("0-3,6").unwrap(), vec![0, 1, 2, 3, 6]);
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
    }
}
