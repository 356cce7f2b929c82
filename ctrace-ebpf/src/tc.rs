//! The tc tier: for kernels with no tracing program types and no BTF
//! (stock OpenWrt). Only uapi `__sk_buff` access and maps.
//!
//! A drop is seen by its absence. A packet that opens a flow on ingress is
//! held in `PENDING`, keyed by what NAT leaves intact; the flow passes when
//! that packet leaves on egress (forwarded) or the host answers it (a
//! SYN-ACK or RST toward its source, a datagram back to its tuple). User
//! space judges pending flows older than its window as dropped here.
//!
//! A TCP flow is held on its CPU first (`HELD`), and reaches `PENDING`
//! only if it does not pass at once: a forwarded SYN leaves, and a local
//! SYN-ACK answers, in the same softirq run on the same CPU as the SYN
//! arrived. The hash map's insert, lookup and delete were most of this
//! tier's cost per connection.
//!
//! The programs run first or early on their hook and always hand the packet
//! on unchanged (TC_ACT_UNSPEC / TCX_NEXT), so qosify and friends still see
//! everything.
use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray},
    programs::TcContext,
};
use ctrace_common::{
    AF_INET, AF_INET6, FlowKey, IPPROTO_TCP, IPPROTO_UDP, counter,
    tc::{DeviceKey, MatchKey, PassedKey, Pending, TICK_SLOT, state},
};

use crate::bump;

/// Continue with the next filter or program: the hook's default action.
const NEXT: i32 = -1;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// Tags and headers that mean the packet is not IP on this device yet.
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_P_PPP_DISC: u16 = 0x8863;
const ETH_P_PPP_SES: u16 = 0x8864;

/// `__sk_buff.pkt_type` of a frame addressed to another host: the IP
/// stack drops it before conntrack sees it.
const PACKET_OTHERHOST: u32 = 3;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Flows opened on ingress and not yet judged. A plain hash, not LRU: an
/// entry evicted silently would be a flow never judged. Sized by user space;
/// an opening packet that finds it full is counted in TC_PENDING_FULL.
#[map]
static PENDING: HashMap<MatchKey, Pending> = HashMap::with_max_entries(1, 0);

/// The TCP flow this CPU opened last, while it may still pass in the run
/// that opened it. It moves into `PENDING` when this CPU opens another
/// flow, or when user space's tick reaches this CPU (before every sweep:
/// see `egress`), so an idle CPU never keeps a dropped flow from its
/// judge. Only this CPU's programs touch its slot, and never two at once:
/// both hooks run with bottom halves disabled.
#[map]
static HELD: PerCpuArray<Held> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct Held {
    key: MatchKey,
    pending: Pending,
    /// Non-zero while `pending` is this CPU's and in no map.
    held: u32,
    _pad: u32,
}

/// Passers that found their flow neither in their CPU's slot nor in
/// `PENDING`: it may still be held by the CPU it arrived on (a SYN queued
/// for neighbour resolution, or for a listener busy in a system call,
/// leaves or is answered later, from another CPU). Read when that CPU
/// moves the flow into `PENDING`. LRU: a note nobody reads (a SYN that
/// came in on a device ctrace does not hook) just ages out.
#[map]
static NOTES: LruHashMap<MatchKey, Note> = LruHashMap::with_max_entries(1, 0);

/// A `Passer` as a note keeps it.
#[repr(C)]
#[derive(Clone, Copy)]
struct Note {
    /// `Passer::Forwarded`'s device; 0 for an answer.
    from: u32,
    port: u16,
    _pad: [u8; 2],
    addr: [u8; 16],
}

/// UDP tuples (as they arrived, `netns` = the holding namespace's slot)
/// -> their pending flow's key: tells a flow's later datagrams from a new
/// flow, and lets a datagram going back to the tuple pass it. LRU: losing
/// one only makes a later datagram look like a new flow, which then passes
/// as it leaves.
#[map]
static UDP_TUPLES: LruHashMap<FlowKey, MatchKey> = LruHashMap::with_max_entries(1, 0);

/// `UDP_TUPLES` value of a tuple this namespace opened itself: datagrams
/// arriving on it are answers. No real key has protocol 0.
const ANSWER_TO_OWN: u8 = 0;

/// Flows passed per (slot, opener, protocol, destination port), read by
/// user space as deltas: who fills the table where ctnetlink cannot say.
/// LRU: under a storm of distinct openers the least recent go, and user
/// space counts what the map lost against TC_PASSED.
#[map]
static PASSED_BY: LruPerCpuHashMap<PassedKey, u64> = LruPerCpuHashMap::with_max_entries(1, 0);

/// Hooked devices -> the slot of their namespace. Written by user space as
/// it hooks and rescans.
#[map]
static DEVICES: HashMap<DeviceKey, u32> = HashMap::with_max_entries(1, 0);

/// The headers ctrace reads, from one packet.
struct Packet {
    flow: FlowKey,
    /// The hooked device's own address as the frame carries it:
    /// destination on ingress, source on egress; zero without L2.
    mac: [u8; 6],
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
    if let Some(p) = parse(&ctx, ETH_HLEN, 0, Side::Ingress) {
        ingress(&ctx, &p);
    }
    NEXT
}

#[classifier]
pub fn ctrace_tc_egress(ctx: TcContext) -> i32 {
    let side = Side::egress(&ctx);
    if let Some(p) = parse(&ctx, ETH_HLEN, 6, side) {
        egress(&ctx, &p, side);
    }
    NEXT
}

/// For devices without a link-layer header (PPP, WireGuard, tun): the
/// packet starts at the IP header.
#[classifier]
pub fn ctrace_tc_ingress_l3(ctx: TcContext) -> i32 {
    if let Some(p) = parse(&ctx, 0, 0, Side::Ingress) {
        ingress(&ctx, &p);
    }
    NEXT
}

#[classifier]
pub fn ctrace_tc_egress_l3(ctx: TcContext) -> i32 {
    let side = Side::egress(&ctx);
    if let Some(p) = parse(&ctx, 0, 0, side) {
        egress(&ctx, &p, side);
    }
    NEXT
}

/// Where a packet is, which decides the only TCP flags that can matter
/// there, so that every other segment leaves at its flags byte.
#[derive(Clone, Copy)]
enum Side {
    /// Only an opening SYN is held.
    Ingress,
    /// Leaving, forwarded from the device with this ifindex: only the
    /// opening SYN's own copy passes its flow.
    Forwarded(u32),
    /// Leaving, sent by this namespace itself: only its answer to a SYN
    /// (SYN-ACK, or RST for a closed port) passes a flow.
    Own,
}

impl Side {
    #[inline(always)]
    fn egress(ctx: &TcContext) -> Side {
        // SAFETY: a plain readable field of the program's __sk_buff. 0 for
        // a packet this namespace sent itself.
        match unsafe { (*skb(ctx)).ingress_ifindex } {
            0 => Side::Own,
            from => Side::Forwarded(from),
        }
    }

    #[inline(always)]
    fn wants_tcp(self, flags: u8) -> bool {
        match self {
            Side::Ingress => flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN,
            Side::Forwarded(_) => flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN,
            Side::Own => flags & TCP_ACK != 0 && flags & (TCP_SYN | TCP_RST) != 0,
        }
    }
}

#[inline(always)]
fn skb(ctx: &TcContext) -> *const __sk_buff {
    ctx.as_ptr() as *const __sk_buff
}

/// `N` bytes at `offset`: straight from the packet where its linear part
/// holds them (no helper call), else copied by the helper (a header in a
/// paged fragment is rare, never misread).
#[inline(always)]
fn bytes<const N: usize>(ctx: &TcContext, offset: usize) -> Option<[u8; N]> {
    let start = ctx.data() + offset;
    if start + N <= ctx.data_end() {
        // SAFETY: bounds-checked against data_end just above.
        Some(unsafe { *(start as *const [u8; N]) })
    } else {
        ctx.load(offset).ok()
    }
}

/// Reads what a tc program needs, leaving at the first byte that shows the
/// packet cannot open a flow or answer one. `mac_at`: where the hooked
/// device's own address sits in the Ethernet header (0: destination, 6:
/// source), when `l2` is non-zero.
#[inline(always)]
fn parse(ctx: &TcContext, l2: usize, mac_at: usize, side: Side) -> Option<Packet> {
    // SAFETY: plain readable fields of the program's __sk_buff.
    let (protocol, vlan_present) = unsafe { ((*skb(ctx)).protocol, (*skb(ctx)).vlan_present) };
    // __sk_buff.protocol is the ethertype in network byte order.
    let ethertype = u16::from_be(protocol as u16);
    if vlan_present != 0
        || matches!(
            ethertype,
            ETH_P_8021Q | ETH_P_8021AD | ETH_P_PPP_DISC | ETH_P_PPP_SES
        )
    {
        // Tagged for a VLAN device above this one (the tag is in metadata
        // on both hooks), or still in its tag or PPPoE header: the IP
        // stack meets it on that upper device.
        bump(counter::TC_ENCAPSULATED);
        return None;
    }
    // First only what decides whether the packet matters (version,
    // protocol, fragment offset, TCP flags): most packets on a link are
    // TCP segments with neither SYN nor RST, and leave here without their
    // addresses ever being copied.
    let (proto, l4) = match ethertype {
        ETH_P_IP => {
            let head: [u8; 10] = bytes(ctx, l2)?;
            // Only a first fragment carries the L4 header.
            if head[0] >> 4 != 4 || u16::from_be_bytes([head[6], head[7]]) & 0x1fff != 0 {
                return None;
            }
            (head[9], l2 + ((head[0] & 0x0f) as usize) * 4)
        }
        // Extension headers are not walked: such flows are not judged.
        ETH_P_IPV6 => (bytes::<7>(ctx, l2)?[6], l2 + 40),
        _ => return None,
    };
    match proto {
        IPPROTO_TCP => {
            // Two bytes (data offset, flags): for one, LLVM turns the
            // bounds check into `start < data_end`, which the verifier
            // does not take as room for a byte.
            let [_, flags]: [u8; 2] = bytes(ctx, l4 + 12)?;
            // Only opening packets (SYN) and answers to them (SYN-ACK,
            // RST) matter, each only on its side.
            if !side.wants_tcp(flags) {
                return None;
            }
        }
        IPPROTO_UDP => {}
        _ => return None,
    }
    let mut flow = FlowKey::default();
    let mut ip_id = 0u16;
    flow.proto = proto;
    match ethertype {
        ETH_P_IP => {
            let hdr: [u8; 20] = bytes(ctx, l2)?;
            flow.family = AF_INET;
            flow.src[..4].copy_from_slice(&hdr[12..16]);
            flow.dst[..4].copy_from_slice(&hdr[16..20]);
            ip_id = u16::from_be_bytes([hdr[4], hdr[5]]);
        }
        _ => {
            let hdr: [u8; 40] = bytes(ctx, l2)?;
            flow.family = AF_INET6;
            flow.src.copy_from_slice(&hdr[8..24]);
            flow.dst.copy_from_slice(&hdr[24..40]);
        }
    }
    let mut p = Packet {
        flow,
        mac: [0; 6],
        payload: 0,
        tcp_flags: 0,
        seq: 0,
        ack_seq: 0,
        ip_id,
        udp_len: 0,
    };
    if p.flow.proto == IPPROTO_TCP {
        let hdr: [u8; 14] = bytes(ctx, l4)?;
        p.tcp_flags = hdr[13];
        p.flow.sport = u16::from_be_bytes([hdr[0], hdr[1]]);
        p.flow.dport = u16::from_be_bytes([hdr[2], hdr[3]]);
        p.seq = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        p.ack_seq = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    } else {
        let hdr: [u8; 8] = bytes(ctx, l4)?;
        p.flow.sport = u16::from_be_bytes([hdr[0], hdr[1]]);
        p.flow.dport = u16::from_be_bytes([hdr[2], hdr[3]]);
        p.udp_len = u16::from_be_bytes([hdr[4], hdr[5]]);
        p.payload = l4 + 8;
    }
    if l2 != 0 {
        p.mac = bytes(ctx, mac_at)?;
    }
    Some(p)
}

/// The slot of the namespace that owns the hooked device this packet is
/// on, from the device's address in the frame.
#[inline(always)]
fn slot(ctx: &TcContext, p: &Packet) -> Option<u32> {
    // SAFETY: a plain readable field of the program's __sk_buff.
    let ifindex = unsafe { (*skb(ctx)).ifindex };
    let mut key = DeviceKey {
        ifindex,
        mac: p.mac,
        _pad: [0; 2],
    };
    if key.mac[0] & 1 != 0 {
        key.mac = DeviceKey::GROUP;
    }
    match unsafe { DEVICES.get(&key) } {
        Some(s) => Some(*s),
        None => {
            bump(counter::TC_UNKNOWN_DEVICE);
            None
        }
    }
}

/// A datagram's identity across NAT: the IPv4 ID and the payload are
/// forwarded untouched (the checksum and ports are not). FNV-1a over what
/// there is; a datagram shorter than 8 payload bytes hashes its length.
#[inline(always)]
fn datagram_key(ctx: &TcContext, p: &Packet, slot: u32) -> MatchKey {
    let head: [u8; 8] = bytes(ctx, p.payload).unwrap_or([0; 8]);
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
        slot,
        proto: IPPROTO_UDP,
        family: p.flow.family,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn tcp_key(family: u8, isn: u32, slot: u32) -> MatchKey {
    MatchKey {
        id: isn,
        slot,
        proto: IPPROTO_TCP,
        family,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn ingress(ctx: &TcContext, p: &Packet) {
    // A TCP segment here is an opening SYN: parse let no other through.
    // SAFETY: plain readable fields of the program's __sk_buff.
    let (ifindex, pkt_type) = unsafe { ((*skb(ctx)).ifindex, (*skb(ctx)).pkt_type) };
    if pkt_type == PACKET_OTHERHOST {
        // Seen in promiscuous mode, addressed to another host: the IP
        // stack never takes it in.
        return;
    }
    let Some(slot) = slot(ctx, p) else {
        return;
    };
    let mut flow = p.flow;
    flow.netns = slot;
    let tcp = flow.proto == IPPROTO_TCP;
    let key = if tcp {
        tcp_key(flow.family, p.seq, slot)
    } else {
        let known = unsafe { UDP_TUPLES.get(&flow) }.copied();
        if known.is_some_and(|k| k.proto == ANSWER_TO_OWN) {
            // An answer to a datagram this namespace sent: no new flow.
            return;
        }
        if let Some(known) = known
            && let Some(pending) = PENDING.get_ptr_mut(&known)
        {
            // A later datagram of a flow still held: counts as a retry
            // while the flow has not passed. A tuple whose flow left the
            // map opens a flow anew: fixed tuples (NTP, WireGuard) must be
            // judged again when dropped later.
            repeat(pending, &flow, p.tcp_flags, 1, unsafe {
                bpf_ktime_get_ns()
            });
            return;
        }
        datagram_key(ctx, p, slot)
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if tcp {
        hold(&key, &flow, ifindex, now, p.tcp_flags);
        return;
    }
    let fresh = Pending {
        flow,
        ifindex,
        first_ns: now,
        last_ns: now,
        packets: 1,
        // Named by user space from the port when judged.
        service: 0,
        state: state::PENDING,
        tcp_flags: p.tcp_flags,
    };
    if add_pending(&key, &fresh) {
        let _ = UDP_TUPLES.insert(&flow, &key, 0);
    }
}

/// Holds a TCP flow on this CPU, after moving the one held before into
/// `PENDING`. Written in place, field by field: a `Pending` built on the
/// stack first took the ingress program over the 512 bytes of stack that
/// Linux 6.1 allows a program and the memcpy it calls.
#[inline(always)]
fn hold(key: &MatchKey, flow: &FlowKey, ifindex: u32, now: u64, tcp_flags: u8) {
    let Some(held) = HELD.get_ptr_mut(0) else {
        // A one-entry array has its entry: never here.
        bump(counter::TC_PENDING_FULL);
        return;
    };
    // SAFETY: this CPU's slot; see HELD.
    unsafe {
        if (*held).held != 0 {
            if (*held).key == *key {
                // A retransmitted SYN (or a clash) before the first left.
                repeat(&raw mut (*held).pending, flow, tcp_flags, 1, now);
                return;
            }
            spill(held);
        }
        (*held).key = *key;
        let h = &raw mut (*held).pending;
        (*h).flow = *flow;
        (*h).ifindex = ifindex;
        (*h).first_ns = now;
        (*h).last_ns = now;
        (*h).packets = 1;
        (*h).service = 0;
        (*h).state = state::PENDING;
        (*h).tcp_flags = tcp_flags;
        (*held).held = 1;
    }
}

/// Moves this CPU's held flow into `PENDING`, where user space judges it
/// and any CPU can pass it; passes it at once if a passer left a note.
#[inline(always)]
unsafe fn spill(held: *mut Held) {
    // SAFETY: this CPU's slot; see HELD.
    unsafe {
        (*held).held = 0;
        let key = (*held).key;
        let pending = &(*held).pending;
        if add_pending(&key, pending)
            && let Some(note) = NOTES.get(&key).copied()
        {
            let by = Passer::noted(&note);
            if by.passes(pending) {
                let _ = NOTES.remove(&key);
                pass(&key, by);
            }
        }
    }
}

/// Adds a flow to `PENDING`; true if it is new there.
#[inline(always)]
fn add_pending(key: &MatchKey, fresh: &Pending) -> bool {
    // Inserted first, looked up only if it is there already: most opening
    // packets open a new flow (a storm's all do), and they save a lookup.
    match PENDING.insert(key, fresh, BPF_NOEXIST as u64) {
        Ok(()) => {
            bump(counter::TC_OPENED);
            true
        }
        // E2BIG: full.
        Err(-7) => {
            bump(counter::TC_PENDING_FULL);
            false
        }
        // EEXIST: held already, the same flow (a retransmitted SYN, a
        // retried query) or a clash.
        Err(_) => {
            match PENDING.get_ptr_mut(key) {
                // The held packets' own time: user space settles them
                // against conntrack's counters of that time.
                Some(pending) => repeat(
                    pending,
                    &fresh.flow,
                    fresh.tcp_flags,
                    fresh.packets,
                    fresh.last_ns,
                ),
                // Judged and deleted between the two: a new flow after
                // all, too late to hold; said, never misread.
                None => bump(counter::TC_KEY_CLASH),
            }
            false
        }
    }
}

/// More opening packets (`packets`: more than one when a held flow joins
/// its earlier self in `PENDING`) for a key already held: the same flow
/// (a retransmitted SYN, a retried query), or a different flow whose key
/// clashes, which cannot be judged. `at_ns`: when the last of them came.
#[inline(always)]
fn repeat(pending: *mut Pending, flow: &FlowKey, tcp_flags: u8, packets: u32, at_ns: u64) {
    // SAFETY: a value pointer from the map, valid during this program run;
    // fields are written by concurrent CPUs without tearing (aligned
    // scalars), and a lost update only undercounts retries.
    unsafe {
        let same = (*pending).flow.src == flow.src
            && (*pending).flow.dst == flow.dst
            && (*pending).flow.sport == flow.sport
            && (*pending).flow.dport == flow.dport
            && (*pending).flow.proto == flow.proto;
        if !same {
            bump(counter::TC_KEY_CLASH);
            return;
        }
        if (*pending).state == state::PASSED {
            return;
        }
        (*pending).packets += packets;
        if at_ns > (*pending).last_ns {
            (*pending).last_ns = at_ns;
        }
        (*pending).tcp_flags |= tcp_flags;
    }
    bump(counter::TC_REPEATED);
}

/// What may pass a held flow.
#[derive(Clone, Copy)]
enum Passer {
    /// The flow's own packet, forwarded: it arrived on `ingress_ifindex`.
    Forwarded(u32),
    /// An answer this namespace sent itself, which must go back to the
    /// opener (ISNs of unrelated flows may clash): its destination.
    Answer { addr: [u8; 16], port: u16 },
    /// A datagram back to the opener's tuple, found by that tuple.
    Reply,
}

impl Passer {
    /// Whether this passes `p`, whose key it found.
    #[inline(always)]
    fn passes(&self, p: &Pending) -> bool {
        match *self {
            Passer::Forwarded(from) => p.ifindex == from,
            Passer::Answer { addr, port } => p.flow.src == addr && p.flow.sport == port,
            Passer::Reply => true,
        }
    }

    #[inline(always)]
    fn noted(n: &Note) -> Passer {
        match n.from {
            0 => Passer::Answer {
                addr: n.addr,
                port: n.port,
            },
            from => Passer::Forwarded(from),
        }
    }

    /// Leaves a note for the CPU that may still hold the flow, then looks
    /// once more: that CPU may have moved it into `PENDING` meanwhile.
    #[inline(always)]
    fn leave_note(self, key: &MatchKey) {
        let note = match self {
            Passer::Forwarded(from) => Note {
                from,
                port: 0,
                _pad: [0; 2],
                addr: [0; 16],
            },
            Passer::Answer { addr, port } => Note {
                from: 0,
                port,
                _pad: [0; 2],
                addr,
            },
            Passer::Reply => return,
        };
        let _ = NOTES.insert(key, &note, 0);
        if pass(key, self) {
            let _ = NOTES.remove(key);
        }
    }
}

/// Passes the TCP flow this CPU holds if `isn` and `by` are its own: the
/// run that opened it is still going. True if it did. No device lookup:
/// within one run a packet stays in the namespace it arrived in (it
/// crosses into another only through a device's receive queue, which ends
/// the run), so the held flow's namespace is this packet's.
#[inline(always)]
fn pass_held(family: u8, isn: u32, by: Passer) -> bool {
    let Some(held) = HELD.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; see HELD.
    unsafe {
        // Only TCP flows are held: the ISN and family are the key.
        let k = &(*held).key;
        if (*held).held == 0 || k.id != isn || k.family != family || !by.passes(&(*held).pending) {
            return false;
        }
        (*held).held = 0;
        count_passed(&passed_key(&(*held).pending.flow));
    }
    bump(counter::TC_OPENED);
    bump(counter::TC_PASSED);
    true
}

#[inline(always)]
fn egress(ctx: &TcContext, p: &Packet, side: Side) {
    // TCP segments reach here only if `side` wants them (see parse): a
    // forwarded opening SYN, or this namespace's answer to one. Its own
    // SYN, a client's retransmission among them, passes no flow, its own
    // or another namespace's.
    let from = match side {
        Side::Forwarded(from) => from,
        _ => 0,
    };
    if p.flow.proto == IPPROTO_TCP {
        let (isn, by) = if from != 0 {
            // The opening SYN leaves: forwarded, after any NAT.
            (p.seq, Passer::Forwarded(from))
        } else {
            // This namespace answers a SYN (SYN-ACK, or RST for a closed
            // port): its ack is the ISN + 1, its destination the opener.
            (
                p.ack_seq.wrapping_sub(1),
                Passer::Answer {
                    addr: p.flow.dst,
                    port: p.flow.dport,
                },
            )
        };
        if pass_held(p.flow.family, isn, by) {
            return;
        }
        let Some(slot) = slot(ctx, p) else {
            return;
        };
        let key = tcp_key(p.flow.family, isn, slot);
        if !pass(&key, by) {
            by.leave_note(&key);
        }
        return;
    }
    let Some(slot) = slot(ctx, p) else {
        return;
    };
    if slot == TICK_SLOT {
        // User space's tick on this CPU: nothing of a softirq run is in
        // progress here, so a flow still held did not pass in its run.
        if let Some(held) = HELD.get_ptr_mut(0) {
            // SAFETY: this CPU's slot; see HELD.
            unsafe {
                if (*held).held != 0 {
                    spill(held);
                }
            }
        }
        return;
    }
    if from != 0 {
        // Forwarded: the same datagram leaves.
        pass(&datagram_key(ctx, p, slot), Passer::Forwarded(from));
        return;
    }
    // Answered by this namespace: a datagram back to the opener's tuple.
    let back = FlowKey {
        src: p.flow.dst,
        dst: p.flow.src,
        sport: p.flow.dport,
        dport: p.flow.sport,
        netns: slot,
        ..p.flow
    };
    match unsafe { UDP_TUPLES.get(&back) }.copied() {
        Some(key) if key.proto == ANSWER_TO_OWN => {}
        Some(key) => {
            pass(&key, Passer::Reply);
        }
        None => {
            // This namespace opens a flow of its own (a client's query):
            // what comes back on its tuple is an answer, not a flow to
            // hold.
            let own = MatchKey {
                proto: ANSWER_TO_OWN,
                ..MatchKey::default()
            };
            let _ = UDP_TUPLES.insert(&back, &own, 0);
        }
    }
}

/// A flow in `PENDING` passed. One younger than the judge window cannot
/// have been judged yet and leaves the map here: with thousands of new
/// flows a second, passed entries left for user space to sweep filled the
/// map and made each sweep walk it all. An older one may have been judged
/// dropped (a retransmission got through late): it is marked, and user
/// space counts its last packets before it deletes it. True if `key` was
/// there, whoever it passed.
#[inline(always)]
fn pass(key: &MatchKey, by: Passer) -> bool {
    let window_ns = crate::LAYOUT.load().tc_window_ns;
    let Some(pending) = PENDING.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: as in `repeat`.
    unsafe {
        if !by.passes(&*pending) || (*pending).state == state::PASSED {
            return true;
        }
        // Taken first: a removed entry's memory goes back to the map.
        let opener = passed_key(&(*pending).flow);
        let age = bpf_ktime_get_ns().saturating_sub((*pending).first_ns);
        if age < window_ns {
            // Only the CPU whose delete takes it counts it: a flow's
            // passer and its late note may both come here.
            if PENDING.remove(key).is_err() {
                return true;
            }
        } else {
            (*pending).state = state::PASSED;
        }
        count_passed(&opener);
    }
    bump(counter::TC_PASSED);
    true
}

#[inline(always)]
fn passed_key(flow: &FlowKey) -> PassedKey {
    PassedKey {
        src: flow.src,
        // The pending flow's netns field holds its slot.
        slot: flow.netns,
        dport: flow.dport,
        proto: flow.proto,
        family: flow.family,
    }
}

#[inline(always)]
fn count_passed(key: &PassedKey) {
    match PASSED_BY.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of the value.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = PASSED_BY.insert(key, &1, 0);
        }
    }
}
