//! The tc tier: for kernels with no tracing program types and no BTF
//! (stock OpenWrt). Only uapi `__sk_buff` access and maps.
//!
//! A drop is seen by its absence. A packet that opens a flow on ingress is
//! held in `PENDING`, keyed by what NAT leaves intact; the flow passes when
//! that packet leaves on egress (forwarded) or the host answers it (a
//! SYN-ACK or RST toward its source, a datagram back to its tuple). User
//! space judges pending flows older than its window as dropped here.
//!
//! The programs run first or early on their hook and always hand the packet
//! on unchanged (TC_ACT_UNSPEC / TCX_NEXT), so qosify and friends still see
//! everything.
use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{HashMap, LruHashMap},
    programs::TcContext,
};
use ctrace_common::{
    AF_INET, AF_INET6, FlowKey, IPPROTO_TCP, IPPROTO_UDP, counter, service_key,
    tc::{MatchKey, Pending, state},
};

use crate::{SERVICES, bump};

/// Continue with the next filter or program: the hook's default action.
const NEXT: i32 = -1;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Flows opened on ingress and not yet judged. A plain hash, not LRU: an
/// entry evicted silently would be a flow never judged. Sized by user space;
/// an opening packet that finds it full is counted in TC_PENDING_FULL.
#[map]
static PENDING: HashMap<MatchKey, Pending> = HashMap::with_max_entries(1, 0);

/// UDP tuples (as they arrived) -> their pending flow's key: tells a
/// flow's later datagrams from a new flow, and lets a datagram going back
/// to the tuple pass it. LRU: losing one only makes a later datagram look
/// like a new flow, which then passes as it leaves.
#[map]
static UDP_TUPLES: LruHashMap<FlowKey, MatchKey> = LruHashMap::with_max_entries(1, 0);

/// The headers ctrace reads, from one packet.
struct Packet {
    flow: FlowKey,
    /// Offset of the L4 payload.
    payload: usize,
    tcp_flags: u8,
    seq: u32,
    ack_seq: u32,
    /// IPv4 ID (0 on IPv6) and UDP length, for the datagram digest.
    ip_id: u16,
    udp_len: u16,
}

#[classifier]
pub fn ctrace_tc_ingress(ctx: TcContext) -> i32 {
    if let Some(p) = parse(&ctx, ETH_HLEN) {
        ingress(&ctx, &p);
    }
    NEXT
}

#[classifier]
pub fn ctrace_tc_egress(ctx: TcContext) -> i32 {
    if let Some(p) = parse(&ctx, ETH_HLEN) {
        egress(&ctx, &p);
    }
    NEXT
}

/// For devices without a link-layer header (PPP, WireGuard, tun): the
/// packet starts at the IP header.
#[classifier]
pub fn ctrace_tc_ingress_l3(ctx: TcContext) -> i32 {
    if let Some(p) = parse(&ctx, 0) {
        ingress(&ctx, &p);
    }
    NEXT
}

#[classifier]
pub fn ctrace_tc_egress_l3(ctx: TcContext) -> i32 {
    if let Some(p) = parse(&ctx, 0) {
        egress(&ctx, &p);
    }
    NEXT
}

#[inline(always)]
fn parse(ctx: &TcContext, l2: usize) -> Option<Packet> {
    // __sk_buff.protocol is the ethertype in network byte order.
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    let mut flow = FlowKey::default();
    let mut ip_id = 0u16;
    let l4 = match ethertype {
        ETH_P_IP => {
            let hdr: [u8; 20] = ctx.load(l2).ok()?;
            if hdr[0] >> 4 != 4 {
                return None;
            }
            // Only a first fragment carries the L4 header.
            if u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff != 0 {
                return None;
            }
            flow.family = AF_INET;
            flow.proto = hdr[9];
            flow.src[..4].copy_from_slice(&hdr[12..16]);
            flow.dst[..4].copy_from_slice(&hdr[16..20]);
            ip_id = u16::from_be_bytes([hdr[4], hdr[5]]);
            l2 + ((hdr[0] & 0x0f) as usize) * 4
        }
        ETH_P_IPV6 => {
            let hdr: [u8; 40] = ctx.load(l2).ok()?;
            flow.family = AF_INET6;
            // Extension headers are not walked: such flows are not judged.
            flow.proto = hdr[6];
            flow.src.copy_from_slice(&hdr[8..24]);
            flow.dst.copy_from_slice(&hdr[24..40]);
            l2 + 40
        }
        _ => return None,
    };
    let mut p = Packet {
        flow,
        payload: 0,
        tcp_flags: 0,
        seq: 0,
        ack_seq: 0,
        ip_id,
        udp_len: 0,
    };
    match p.flow.proto {
        IPPROTO_TCP => {
            let hdr: [u8; 14] = ctx.load(l4).ok()?;
            p.flow.sport = u16::from_be_bytes([hdr[0], hdr[1]]);
            p.flow.dport = u16::from_be_bytes([hdr[2], hdr[3]]);
            p.seq = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
            p.ack_seq = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
            p.tcp_flags = hdr[13];
        }
        IPPROTO_UDP => {
            let hdr: [u8; 8] = ctx.load(l4).ok()?;
            p.flow.sport = u16::from_be_bytes([hdr[0], hdr[1]]);
            p.flow.dport = u16::from_be_bytes([hdr[2], hdr[3]]);
            p.udp_len = u16::from_be_bytes([hdr[4], hdr[5]]);
            p.payload = l4 + 8;
        }
        _ => return None,
    }
    Some(p)
}

/// A datagram's identity across NAT: the IPv4 ID and the payload are
/// forwarded untouched (the checksum and ports are not). FNV-1a over what
/// there is; a datagram shorter than 8 payload bytes hashes its length.
#[inline(always)]
fn datagram_key(ctx: &TcContext, p: &Packet) -> MatchKey {
    let head: [u8; 8] = ctx.load(p.payload).unwrap_or([0; 8]);
    let mut h: u32 = 0x811c_9dc5;
    let mut mix = |b: u8| {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    };
    for b in p.ip_id.to_be_bytes() {
        mix(b);
    }
    for b in p.udp_len.to_be_bytes() {
        mix(b);
    }
    for b in head {
        mix(b);
    }
    MatchKey {
        id: h,
        proto: IPPROTO_UDP,
        family: p.flow.family,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is the program's __sk_buff; ifindex is a
    // plain readable field on every tc hook.
    unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex }
}

#[inline(always)]
fn tcp_key(family: u8, isn: u32) -> MatchKey {
    MatchKey {
        id: isn,
        proto: IPPROTO_TCP,
        family,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn ingress(ctx: &TcContext, p: &Packet) {
    let key = match p.flow.proto {
        IPPROTO_TCP => {
            if p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN {
                return;
            }
            tcp_key(p.flow.family, p.seq)
        }
        _ => {
            if let Some(known) = unsafe { UDP_TUPLES.get(&p.flow) }.copied()
                && let Some(pending) = PENDING.get_ptr_mut(&known)
            {
                // A later datagram of a flow still held: counts as a
                // retry while the flow has not passed. A tuple whose flow
                // left the map opens a flow anew: fixed tuples (NTP,
                // WireGuard) must be judged again when dropped later.
                repeat(pending, p);
                return;
            }
            datagram_key(ctx, p)
        }
    };
    if let Some(pending) = PENDING.get_ptr_mut(&key) {
        repeat(pending, p);
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let service = unsafe { SERVICES.get(&service_key(p.flow.proto, p.flow.dport)) }
        .copied()
        .unwrap_or(0);
    let fresh = Pending {
        flow: p.flow,
        ifindex: ifindex(ctx),
        first_ns: now,
        last_ns: now,
        packets: 1,
        service,
        state: state::PENDING,
        tcp_flags: p.tcp_flags,
    };
    match PENDING.insert(&key, &fresh, BPF_NOEXIST as u64) {
        Ok(()) => {
            bump(counter::TC_OPENED);
            if p.flow.proto == IPPROTO_UDP {
                let _ = UDP_TUPLES.insert(&p.flow, &key, 0);
            }
        }
        // E2BIG: full. EEXIST: another CPU's packet with the same key got
        // there between lookup and insert, the same flow or a clash.
        Err(e) if e == -7 => bump(counter::TC_PENDING_FULL),
        Err(_) => bump(counter::TC_KEY_CLASH),
    }
}

/// One more opening packet for a key already held: the same flow (a
/// retransmitted SYN, a retried query), or a different flow whose key
/// clashes, which cannot be judged.
#[inline(always)]
fn repeat(pending: *mut Pending, p: &Packet) {
    // SAFETY: a value pointer from the map, valid during this program run;
    // fields are written by concurrent CPUs without tearing (aligned
    // scalars), and a lost update only undercounts retries.
    unsafe {
        let same = (*pending).flow.src == p.flow.src
            && (*pending).flow.dst == p.flow.dst
            && (*pending).flow.sport == p.flow.sport
            && (*pending).flow.dport == p.flow.dport
            && (*pending).flow.proto == p.flow.proto;
        if !same {
            bump(counter::TC_KEY_CLASH);
            return;
        }
        if (*pending).state == state::PASSED {
            return;
        }
        (*pending).packets += 1;
        (*pending).last_ns = bpf_ktime_get_ns();
        (*pending).tcp_flags |= p.tcp_flags;
    }
    bump(counter::TC_REPEATED);
}

#[inline(always)]
fn egress(ctx: &TcContext, p: &Packet) {
    match p.flow.proto {
        IPPROTO_TCP => {
            let f = p.tcp_flags;
            if f & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN {
                // The opening SYN leaves: forwarded, after any NAT.
                pass(&tcp_key(p.flow.family, p.seq), None);
            } else if f & TCP_ACK != 0 && f & (TCP_SYN | TCP_RST) != 0 {
                // This host answers a SYN (SYN-ACK, or RST for a closed
                // port): its ack is the ISN + 1, its destination the
                // opener.
                let key = tcp_key(p.flow.family, p.ack_seq.wrapping_sub(1));
                pass(&key, Some(p));
            }
        }
        _ => {
            // Forwarded: the same datagram leaves.
            if pass(&datagram_key(ctx, p), None) {
                return;
            }
            // Answered by this host: a datagram back to the opener's tuple.
            let back = FlowKey {
                src: p.flow.dst,
                dst: p.flow.src,
                sport: p.flow.dport,
                dport: p.flow.sport,
                ..p.flow
            };
            if let Some(key) = unsafe { UDP_TUPLES.get(&back) }.copied() {
                pass(&key, None);
            }
        }
    }
}

/// A flow passed. One younger than the judge window cannot have been
/// judged yet and leaves the map here: with thousands of new flows a
/// second, passed entries left for user space to sweep filled the map and
/// made each sweep walk it all. An older one may have been judged dropped
/// (a retransmission got through late): it is marked, and user space
/// counts its last packets before it deletes it. `answer`: the reply must
/// go back to the opener (ISNs of unrelated flows may clash).
#[inline(always)]
fn pass(key: &MatchKey, answer: Option<&Packet>) -> bool {
    let window_ns = crate::LAYOUT.load().tc_window_ns;
    let Some(pending) = PENDING.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: as in `repeat`.
    unsafe {
        if let Some(a) = answer
            && ((*pending).flow.src != a.flow.dst || (*pending).flow.sport != a.flow.dport)
        {
            return false;
        }
        if (*pending).state == state::PASSED {
            return true;
        }
        let age = bpf_ktime_get_ns().saturating_sub((*pending).first_ns);
        if age < window_ns {
            // Another CPU passing the same flow at once finds it gone.
            let _ = PENDING.remove(key);
        } else {
            (*pending).state = state::PASSED;
        }
    }
    bump(counter::TC_PASSED);
    true
}
