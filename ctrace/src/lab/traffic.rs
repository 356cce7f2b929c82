//! Real traffic and its ground truth: listeners on the server node,
//! connection attempts from the client nodes, and what each attempt saw.
//! This is the yardstick ctrace's counts are compared against.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::{
    conntrack,
    event::Proto,
    netlink::ctnetlink::{CtEntry, CtSocket},
    netns::NetNs,
};

/// Servers that answer on the server node: TCP accept-and-close, UDP echo.
pub struct Listeners {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Listeners {
    pub fn start(ns: &NetNs, tcp_ports: &[u16], udp_ports: &[u16]) -> anyhow::Result<Listeners> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for &port in tcp_ports {
            // [::] is dual-stack in a fresh namespace (bindv6only = 0).
            let l = ns.run(move || TcpListener::bind(("::", port)))??;
            l.set_nonblocking(true)?;
            let stop = stop.clone();
            handles.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.write_all(b"ok\n");
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }));
        }
        for &port in udp_ports {
            let u = ns.run(move || UdpSocket::bind(("::", port)))??;
            u.set_read_timeout(Some(Duration::from_millis(50)))?;
            let stop = stop.clone();
            handles.push(std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = u.recv_from(&mut buf) {
                        let _ = u.send_to(&buf[..n], peer);
                    }
                }
            }));
        }
        Ok(Listeners { stop, handles })
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// One connection attempt to make.
#[derive(Clone, Debug)]
pub struct Planned {
    pub service: String,
    pub proto: Proto,
    pub src: IpAddr,
    pub dst: SocketAddr,
}

/// What the client saw.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub planned: Planned,
    /// The local address the attempt used: the flow's source.
    pub local: Option<SocketAddr>,
    pub ok: bool,
    pub error: Option<String>,
    /// The errno the kernel failed the connect with; None when it
    /// succeeded or the client gave up first.
    pub errno: Option<i32>,
    pub elapsed: Duration,
    /// The client's own sign that its first packet went unanswered: a
    /// TCP handshake that took as long as the first SYN's retransmission
    /// timer, or a DNS reply only to the second query.
    pub retried: bool,
}

impl Attempt {
    /// How a TCP attempt ended, as the client saw it, in the node view's
    /// words: the kernel's errno decides, as `sk_err` does for ctrace.
    pub fn tcp_outcome(&self) -> &'static str {
        match (self.ok, self.errno) {
            (true, _) => "established",
            (false, Some(libc::ETIMEDOUT)) => "timeout",
            (false, Some(libc::ECONNREFUSED)) => "refused",
            (false, Some(_)) => "unreachable",
            (false, None) => "aborted",
        }
    }
}

/// SYN retransmits a lab client allows before its kernel gives up
/// (TCP_SYNCNT): with one, a dropped flow sends its SYN twice and the
/// kernel fails the connect with ETIMEDOUT after 2-3 s, well before the
/// client's own deadline, so the attempt counts as a timeout on both sides.
const LAB_SYN_RETRIES: u32 = 1;
/// The client's own deadline for a TCP connect: later than the kernel's.
const TCP_CONNECT_DEADLINE: Duration = Duration::from_secs(6);

/// Runs every attempt at once from inside `ns` and waits for all. A TCP
/// attempt succeeds when the handshake completes within `timeout`; a UDP
/// attempt sends a query every `timeout / 2` and succeeds on any reply.
/// With the default 2.5 s, a dropped TCP flow sends its SYN twice (initial
/// RTO is 1 s) and a dropped UDP flow sends twice too.
pub fn attempt_all(
    ns: &NetNs,
    plan: &[Planned],
    timeout: Duration,
) -> anyhow::Result<Vec<Attempt>> {
    let mut handles = Vec::new();
    for p in plan.iter().cloned() {
        handles.push(ns.spawn("lab-client", move || attempt(p, timeout))?);
    }
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))
        })
        .collect()
}

fn attempt(p: Planned, timeout: Duration) -> Attempt {
    let started = Instant::now();
    let result = match p.proto {
        Proto::Udp => udp_attempt(&p, timeout),
        _ => tcp_attempt(&p, timeout),
    };
    let mut a = result.unwrap_or_else(|e| Attempt::failed(&p, None, format!("{e:#}"), None));
    a.elapsed = started.elapsed();
    a
}

impl Attempt {
    fn connected(p: &Planned, local: Option<SocketAddr>, retried: bool) -> Attempt {
        Attempt {
            planned: p.clone(),
            local,
            ok: true,
            error: None,
            errno: None,
            elapsed: Duration::ZERO,
            retried,
        }
    }

    fn failed(
        p: &Planned,
        local: Option<SocketAddr>,
        error: String,
        errno: Option<i32>,
    ) -> Attempt {
        Attempt {
            planned: p.clone(),
            local,
            ok: false,
            error: Some(error),
            errno,
            elapsed: Duration::ZERO,
            retried: false,
        }
    }
}

/// The first SYN is retransmitted after 1 s (TCP_TIMEOUT_INIT); a
/// handshake through a quiet veth lab that took this long needed that.
const SYN_RETRANSMITTED_BY: Duration = Duration::from_millis(900);

fn tcp_attempt(p: &Planned, timeout: Duration) -> anyhow::Result<Attempt> {
    let domain = if p.dst.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.bind(&SockAddr::from(SocketAddr::new(p.src, 0)))
        .context("binding the source")?;
    set_syn_retries(&s, LAB_SYN_RETRIES).context("setting TCP_SYNCNT")?;
    let local = s.local_addr().ok().and_then(|a| a.as_socket());
    let started = Instant::now();
    match s.connect_timeout(&SockAddr::from(p.dst), TCP_CONNECT_DEADLINE) {
        Ok(()) => {
            let retried = started.elapsed() >= SYN_RETRANSMITTED_BY;
            let mut stream: std::net::TcpStream = s.into();
            let mut buf = [0u8; 3];
            let _ = stream.set_read_timeout(Some(timeout));
            let _ = stream.read(&mut buf);
            Ok(Attempt::connected(p, local, retried))
        }
        // socket2 reports its own deadline without an errno.
        Err(e) => Ok(Attempt::failed(p, local, e.to_string(), e.raw_os_error())),
    }
}

fn set_syn_retries(s: &Socket, n: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let n = n as libc::c_int;
    // SAFETY: a valid socket, and a c_int option value of the right size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SYNCNT,
            (&raw const n).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn udp_attempt(p: &Planned, timeout: Duration) -> anyhow::Result<Attempt> {
    let u = UdpSocket::bind(SocketAddr::new(p.src, 0)).context("binding the source")?;
    u.connect(p.dst)?;
    let local = u.local_addr().ok();
    let wait = timeout / 2;
    u.set_read_timeout(Some(wait))?;
    // A DNS query for example.org's A record: what a resolver would send.
    const QUERY: &[u8] =
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03org\x00\x00\x01\x00\x01";
    let mut buf = [0u8; 512];
    for query in 0..2 {
        u.send(QUERY)?;
        if u.recv(&mut buf).is_ok() {
            return Ok(Attempt::connected(p, local, query > 0));
        }
    }
    Ok(Attempt::failed(p, local, "no reply".into(), None))
}

/// Fills the table of the router between `clients` and `servers` with real
/// connections to `dst` (a listener this opens in `servers`), as far as
/// `limit`. Each stays ESTABLISHED at both ends while the returned sockets
/// live: its entry is ASSURED, which `early_drop` never evicts, and not
/// closing, which the GC would reap above 95% fill. Needs no ctnetlink
/// (stock OpenWrt has none); stops at the first connect that fails, the
/// table being full.
pub fn fill_with_connections(
    clients: &NetNs,
    servers: &NetNs,
    src: std::net::Ipv4Addr,
    dst: SocketAddr,
    limit: usize,
) -> anyhow::Result<Connections> {
    let listener = servers.run(move || TcpListener::bind(dst))??;
    clients.run(|| {
        let mut held = Vec::new();
        let mut refused = None;
        while held.len() < 2 * limit {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            s.bind(&SockAddr::from(SocketAddr::new(IpAddr::V4(src), 0)))?;
            let local = s.local_addr().ok().and_then(|a| a.as_socket());
            // Long enough for a SYN retransmission: a listener's accept
            // queue that is briefly full drops a SYN too.
            match s.connect_timeout(&SockAddr::from(dst), Duration::from_millis(3500)) {
                Ok(()) => {
                    let (server_side, _) = listener.accept()?;
                    held.push(s.into());
                    held.push(server_side);
                }
                Err(e) => {
                    log::debug!("fill: connect {} failed: {e}", held.len() / 2 + 1);
                    refused = local;
                    break;
                }
            }
        }
        Ok(Connections { held, refused })
    })?
}

/// What [`fill_with_connections`] left.
pub struct Connections {
    /// Both ends of every connection: the entries stay while these live.
    pub held: Vec<std::net::TcpStream>,
    /// The source of the connect that found the table full: a dropped
    /// flow like any other.
    pub refused: Option<SocketAddr>,
}

/// Result of filling a table.
#[derive(Clone, Debug)]
pub struct Fill {
    pub created: u64,
    pub elapsed: Duration,
    /// Creates refused with ENOMEM: the table was full.
    pub refused_full: u64,
}

/// Synthetic, ASSURED entries: early_drop never evicts those, so a table
/// full of them drops new flows for real. The tuples name no host that
/// exists; they are table entries, not traffic. The mix echoes INC-0004:
/// mostly DNS, a good share of long-lived etcd and HTTPS connections.
pub fn synthetic_entry(i: u64, dst: IpAddr) -> CtEntry {
    let src = IpAddr::V4(std::net::Ipv4Addr::from(
        0x0a80_0000u32 + (i / 50_000) as u32 + 1,
    ));
    let sport = 1024 + (i % 50_000) as u16;
    let (proto, dport) = match i % 10 {
        0..=6 => (17u8, 53u16),
        7..=8 => (6u8, 2380u16),
        _ => (6u8, 443u16),
    };
    CtEntry::assured(proto, src, sport, dst, dport, 3600)
}

/// Entries nobody answered (no SEEN_REPLY, not ASSURED): exactly what
/// early_drop may evict. A DNS flood toward `dst` looks like this.
pub fn unreplied_dns_entry(i: u64, dst: IpAddr) -> CtEntry {
    CtEntry {
        proto: 17,
        dport: 53,
        tcp_state: None,
        status: conntrack::IPS_CONFIRMED,
        timeout_secs: 600,
        ..synthetic_entry(i, dst)
    }
}

/// Fills `ns`'s conntrack table with [`synthetic_entry`]s until the kernel
/// refuses: `want` entries are offered, in batches, with `progress` told
/// the running total.
pub fn fill_table(
    ns: &NetNs,
    want: u64,
    dst: IpAddr,
    progress: impl FnMut(u64),
) -> anyhow::Result<Fill> {
    fill_table_with(ns, want, |i| synthetic_entry(i, dst), progress)
}

pub fn fill_table_with(
    ns: &NetNs,
    want: u64,
    entry: impl Fn(u64) -> CtEntry,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<Fill> {
    let mut sock = CtSocket::open(Some(ns))?;
    let started = Instant::now();
    let mut created = 0;
    let mut refused_full = 0;
    const CHUNK: u64 = 32_768;
    let mut next = 0u64;
    while next < want {
        let end = (next + CHUNK).min(want);
        let mut it = (next..end).map(&entry);
        let report = sock.create_batch(&mut it)?;
        created += report.created;
        for (errno, n) in &report.failed {
            if *errno == libc::ENOMEM {
                refused_full += n;
            } else {
                anyhow::bail!(
                    "creating conntrack entries: {n} failed with {}",
                    std::io::Error::from_raw_os_error(*errno)
                );
            }
        }
        progress(created);
        next = end;
        if refused_full > 0 {
            break;
        }
    }
    Ok(Fill {
        created,
        elapsed: started.elapsed(),
        refused_full,
    })
}

/// What a SYN flood sent.
#[derive(Clone, Copy, Debug)]
pub struct Flood {
    pub sent: u64,
    pub elapsed: Duration,
}

/// Destination ports of the flood: the lab's services plus one nobody
/// claims, so that totals split by service.
pub const FLOOD_PORTS: [u16; 10] = [22, 2379, 2380, 4420, 53, 6443, 10250, 80, 443, 9999];

/// Sends `count` TCP SYNs from `src` to `dst` inside `ns`, each with a
/// tuple of its own (source port x destination port, 645,120 distinct), as
/// fast as one raw socket with `sendmmsg` goes. Every SYN would open a new
/// flow: into a full table, every one is a table-full drop.
pub fn syn_flood(
    ns: &NetNs,
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    count: u64,
) -> anyhow::Result<Flood> {
    const SPORTS: u64 = 65536 - 1024;
    anyhow::ensure!(
        count <= SPORTS * FLOOD_PORTS.len() as u64,
        "a flood of {count} SYNs would repeat tuples"
    );
    let sock = raw_socket(ns)?;
    let to = SockAddr::from(SocketAddr::new(IpAddr::V4(dst), 0));
    const BATCH: u64 = 256;
    let started = Instant::now();
    let mut sent = 0u64;
    let mut batch = Vec::with_capacity(BATCH as usize);
    while sent < count {
        batch.clear();
        for i in sent..(sent + BATCH).min(count) {
            let dport = FLOOD_PORTS[(i % FLOOD_PORTS.len() as u64) as usize];
            let sport = 1024 + ((i / FLOOD_PORTS.len() as u64) % SPORTS) as u16;
            batch.push(syn_packet(src, dst, sport, dport, i as u32));
        }
        send_all(&sock, &to, &mut batch)?;
        sent += batch.len() as u64;
    }
    Ok(Flood {
        sent,
        elapsed: started.elapsed(),
    })
}

/// A raw IPv4 socket in `ns`: IPPROTO_RAW implies IP_HDRINCL, we write the
/// IP header and the kernel fills in its checksum and total length. The
/// socket stays in `ns` whichever thread uses it.
fn raw_socket(ns: &NetNs) -> anyhow::Result<Socket> {
    ns.run(|| {
        Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
    })?
    .context("opening a raw socket")
}

/// Sends every packet with `sendmmsg`, retrying what the kernel had no
/// buffer for.
fn send_all<P: AsMut<[u8]>>(sock: &Socket, to: &SockAddr, packets: &mut [P]) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let mut done = 0;
    while done < packets.len() {
        let rest = &mut packets[done..];
        let mut iov: Vec<libc::iovec> = rest
            .iter_mut()
            .map(|p| {
                let p = p.as_mut();
                libc::iovec {
                    iov_base: p.as_mut_ptr().cast(),
                    iov_len: p.len(),
                }
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: mmsghdr is plain data; the pointers set here point
                // into `iov` and `to`, which outlive the sendmmsg call.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = to.as_ptr() as *mut libc::c_void;
                m.msg_hdr.msg_namelen = to.len();
                m.msg_hdr.msg_iov = v;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: valid socket, valid array of msgs.len() messages.
        let r = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                0,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) || e.kind() == std::io::ErrorKind::WouldBlock
            {
                std::thread::yield_now();
                continue;
            }
            return Err(e).context("sendmmsg");
        }
        done += r as usize;
    }
    Ok(())
}

/// Sends each of `count` SYNs (distinct tuples to `dport`) twice at once,
/// from two threads pinned to two CPUs: both copies create an unconfirmed
/// conntrack entry, and when they race to confirm, the loser finds the
/// winner's entry. TCP allows no clash resolution, so conntrack drops it
/// (`insert_failed` and `drop`). How many race is up to the machine; the
/// caller compares with conntrack's counters. Needs two CPUs.
pub fn syn_twins(
    ns: &NetNs,
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    dport: u16,
    count: u16,
) -> anyhow::Result<()> {
    anyhow::ensure!(count <= 40_000, "at most 40,000 source ports");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    anyhow::ensure!(
        cpus >= 2,
        "racing SYNs needs two CPUs, this machine has {cpus}"
    );
    let socks = [raw_socket(ns)?, raw_socket(ns)?];
    let to = SockAddr::from(SocketAddr::new(IpAddr::V4(dst), 0));
    const BATCH: u16 = 32;
    let barrier = std::sync::Barrier::new(2);
    std::thread::scope(|s| -> anyhow::Result<()> {
        let handles: Vec<_> = socks
            .iter()
            .enumerate()
            .map(|(cpu, sock)| {
                let (to, barrier) = (&to, &barrier);
                s.spawn(move || -> anyhow::Result<()> {
                    // SAFETY: a zeroed cpu_set_t with one bit set is valid.
                    unsafe {
                        let mut set: libc::cpu_set_t = std::mem::zeroed();
                        libc::CPU_SET(cpu, &mut set);
                        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
                    }
                    let mut first = 0u16;
                    while first < count {
                        let end = first.saturating_add(BATCH).min(count);
                        let mut batch: Vec<[u8; 40]> = (first..end)
                            .map(|i| syn_packet(src, dst, 20_000 + i, dport, u32::from(i)))
                            .collect();
                        barrier.wait();
                        send_all(sock, to, &mut batch)?;
                        first = end;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a SYN sender panicked"))??;
        }
        Ok(())
    })
}

/// Sends `count` DCCP packets whose header is cut short (8 of its 12
/// bytes: ports and 4 more), each from its own source port. conntrack reads
/// the ports, creates an entry, and then its DCCP tracker cannot read the
/// header: on kernels whose tracker answers that with NF_DROP (6.1), each
/// is a tracker drop, which raises `invalid` and `drop` together. Newer
/// trackers accept such packets as invalid instead.
pub fn short_dccp(
    ns: &NetNs,
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    dport: u16,
    count: u16,
) -> anyhow::Result<()> {
    const IPPROTO_DCCP: u8 = 33;
    let sock = raw_socket(ns)?;
    let to = SockAddr::from(SocketAddr::new(IpAddr::V4(dst), 0));
    let mut packets: Vec<[u8; 28]> = (0..count)
        .map(|i| {
            let mut p = [0u8; 28];
            p[0] = 0x45;
            p[2..4].copy_from_slice(&28u16.to_be_bytes());
            p[8] = 64;
            p[9] = IPPROTO_DCCP;
            p[12..16].copy_from_slice(&src.octets());
            p[16..20].copy_from_slice(&dst.octets());
            p[20..22].copy_from_slice(&(30_000 + i).to_be_bytes());
            p[22..24].copy_from_slice(&dport.to_be_bytes());
            p
        })
        .collect();
    send_all(&sock, &to, &mut packets)
}

/// One IPv4 TCP SYN, 40 bytes, with a correct TCP checksum (conntrack
/// checks it in PRE_ROUTING).
fn syn_packet(
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let t = &mut p[20..40];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let sum = tcp_sum(src, dst, &p[20..40]);
    p[36..38].copy_from_slice(&(!sum).to_be_bytes());
    p
}

/// The ones'-complement sum of the IPv4 pseudo-header and a TCP segment:
/// with the checksum field zero, its complement is the checksum; over a
/// segment with a correct checksum, it is 0xffff.
fn tcp_sum(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, segment: &[u8]) -> u16 {
    let words = |b: &[u8]| -> u32 {
        b.chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
            .sum()
    };
    let mut sum = words(&src.octets()) + words(&dst.octets()) + 6 + segment.len() as u32;
    sum += words(segment);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod flood_tests {
    use super::*;

    #[test]
    fn syn_checksum_verifies() {
        let src = std::net::Ipv4Addr::new(10, 10, 0, 2);
        let dst = std::net::Ipv4Addr::new(10, 10, 1, 2);
        let p = syn_packet(src, dst, 40000, 2380, 7);
        assert_eq!(tcp_sum(src, dst, &p[20..]), 0xffff);
        // RFC 1071's example words, as a check of the sum itself.
        let mut seg = [0u8; 20];
        seg[0..8].copy_from_slice(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]);
        let zero = std::net::Ipv4Addr::UNSPECIFIED;
        assert_eq!(tcp_sum(zero, zero, &seg), (0xddf2u32 + 6 + 20) as u16);
        assert_eq!(p[33], 0x02);
    }
}
