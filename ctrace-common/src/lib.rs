//! Types shared by ctrace's eBPF programs and its user space.
//!
//! Everything here crosses the kernel/user boundary byte for byte, so every
//! type is `#[repr(C)]` with its padding spelled out: no implicit holes whose
//! contents the verifier would reject or user space would misread. With the
//! `user` feature the types implement `aya::Pod`.
#![no_std]

/// Address families as the kernel numbers them.
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// IP protocol numbers ctrace names. Others are carried through as numbers.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_GRE: u8 = 47;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

/// The identity of a flow as seen in one network namespace: what conntrack
/// would have called the original tuple, plus the namespace.
///
/// IPv4 addresses sit in the first four bytes of `src`/`dst`, the rest zero,
/// so that one key type serves both families. Ports are in host byte order;
/// for ICMP they carry type and code.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// Inode number of the network namespace (what `/proc/PID/ns/net` shows).
    pub netns: u32,
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
}

/// Per-flow aggregate kept in the kernel's LRU map: the hot path adds to it
/// and never talks to user space after the first packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowStats {
    pub packets: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    /// OR of the TCP flags of every dropped packet of this flow.
    pub tcp_flags: u8,
    /// `class::*` bits of the first packet.
    pub flags: u8,
    /// 1 when the detail budget was spent as the flow began: no event
    /// announced it, and user space leaves it out of the detail (its
    /// packets are in the totals, the flow in `TotalCount::held_back`).
    pub held_back: u8,
    pub _pad: [u8; 5],
}

/// Key of the in-kernel eviction aggregate (kprobe tier): whose entries
/// conntrack threw out early, by namespace, protocol, the entry's original
/// destination port (the service) and who evicted it. Counted in the
/// kernel, so a burst of entry events that overflows the ring buffer cannot
/// lose an eviction.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct EvictKey {
    pub netns: u32,
    /// Host byte order.
    pub dport: u16,
    /// `evicted_by::*`.
    pub by: u8,
    pub proto: u8,
}

/// Who evicted an entry before its time.
pub mod evicted_by {
    /// `early_drop()`, making room for a new flow in a full table.
    pub const EARLY_DROP: u8 = 1;
    /// The garbage collector, which above 95% fill also reaps entries that
    /// have not expired. No kernel statistic counts these.
    pub const GC: u8 = 2;
}

/// What the kernel side could see of one dropped packet, as bits. The
/// cause is decided in user space from these and conntrack's counters
/// (`ctrace::ledger`); the kernel only sorts packets by evidence.
pub mod class {
    /// The skb carried a conntrack entry (`skb->_nfct != 0`).
    pub const HAS_CT: u8 = 1 << 0;
    /// Exact tiers: conntrack failed to allocate an entry for this packet
    /// (the table was full).
    pub const ALLOC_FAILED: u8 = 1 << 1;
    /// Exact tiers: a protocol tracker returned NF_DROP (raises `invalid`
    /// and `drop`).
    pub const TRACKER_DROP: u8 = 1 << 2;
    /// Exact tiers: confirming the entry failed (clash resolution lost;
    /// raises `insert_failed` and `drop`).
    pub const CLASH: u8 = 1 << 3;
    /// kfree_skb's `location` lies in `nft_do_chain`: an nftables rule or
    /// policy dropped it (kernels that free nft drops there: probed at start).
    pub const AT_NFT_CHAIN: u8 = 1 << 4;
    /// kfree_skb's `location` lies in `nf_hook_slow`: a hook's NF_DROP
    /// verdict (conntrack's drops, iptables' and older kernels' nft drops).
    pub const AT_HOOK_SLOW: u8 = 1 << 5;
    /// tc tier: the packet opened a flow on ingress and neither left on
    /// egress nor drew an answer within the window. Dropped on this host,
    /// by what is for the counters to say.
    pub const NOT_FORWARDED: u8 = 1 << 6;
}

/// Key of the in-kernel drop totals: what user space's per-service totals
/// are made of. Bounded by namespaces x services x protocols x classes, not
/// by flows, so a storm of distinct flows cannot grow it.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct TotalKey {
    pub netns: u32,
    /// Index into user space's service catalog (`SERVICES` map), 0 for a
    /// port no service claims.
    pub service: u16,
    pub proto: u8,
    /// `class::*` bits.
    pub class: u8,
}

/// Per-CPU value of the drop totals.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TotalCount {
    pub packets: u64,
    /// Flows whose first packet (as the flow map saw it) was counted here.
    pub flows: u64,
    /// Of those, the flows the detail budget kept from user space.
    pub held_back: u64,
}

/// One CPU's detail budget: how many new flows it has announced in the
/// current window. Announcing costs user space a decode and a record per
/// flow; a storm of distinct flows would make that its own bottleneck,
/// while the totals are already exact in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DetailBudget {
    pub window_start_ns: u64,
    pub used: u64,
}

/// Key of the `SERVICES` map: which catalog entry owns a destination port.
#[inline(always)]
pub const fn service_key(proto: u8, dport: u16) -> u32 {
    ((proto as u32) << 16) | dport as u32
}

/// What happened. The tracepoint tier only reports `DROP`; the kprobe tier
/// sees conntrack's own decisions and reports the rest.
pub mod kind {
    /// A packet was dropped by netfilter (reason NETFILTER_DROP, or conntrack
    /// failed to allocate its entry: then `class::ALLOC_FAILED`).
    pub const DROP: u8 = 1;
    /// `early_drop` evicted this entry to make room for a new one.
    pub const EVICT: u8 = 2;
    /// An entry entered the table (confirmed, or created over ctnetlink).
    pub const INSERT: u8 = 3;
    /// An entry left the table (expired, killed, deleted), not evicted.
    pub const DELETE: u8 = 4;
    /// Confirming an entry failed (`insert_failed`): its packet was dropped.
    pub const INSERT_FAILED: u8 = 5;
    /// The garbage collector evicted this entry before it expired.
    pub const GC_EVICT: u8 = 6;
}

/// Which hook produced an event.
pub mod tier {
    pub const TRACEPOINT: u8 = 1;
    pub const KPROBE: u8 = 2;
}

/// One record in the ring buffer. Sent once per new flow, not per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Event {
    /// CLOCK_MONOTONIC (bpf_ktime_get_ns).
    pub ts_ns: u64,
    pub key: FlowKey,
    pub kind: u8,
    pub tier: u8,
    pub tcp_flags: u8,
    /// Drops: `class::*` bits.
    pub flags: u8,
    /// The kernel's drop reason as numbered by the running kernel.
    pub reason: u32,
    /// For entry events: the entry's `status` bits (IPS_*).
    pub ct_status: u32,
    /// For entry events: jiffies until the entry times out.
    pub ct_timeout_jiffies: u32,
    /// For entry events: TCP conntrack state (TCP_CONNTRACK_*), 0 otherwise.
    pub ct_tcp_state: u8,
    pub _pad: u8,
    /// For entry events: the entry's conntrack zone (0 without zones).
    pub ct_zone: u16,
}

/// Indices of the per-CPU counter array `COUNTERS`.
pub mod counter {
    /// Ring buffer reservations that failed, in either ring: events user
    /// space never saw.
    pub const LOST_EVENTS: u32 = 0;
    /// kfree_skb calls with reason NETFILTER_DROP.
    pub const NETFILTER_DROPS: u32 = 1;
    /// Netfilter drops whose headers could not be read or were not IP.
    pub const UNDECODED: u32 = 2;
    /// Updates of the flow map that failed.
    pub const FLOW_MAP_ERRORS: u32 = 3;
    /// early_drop evictions, inserts, deletes (kprobe tier).
    pub const EVICTIONS: u32 = 4;
    pub const INSERTS: u32 = 5;
    pub const DELETES: u32 = 6;
    /// Allocations that failed inside nf_conntrack_in: table-full drops.
    pub const ALLOC_FAILURES: u32 = 7;
    /// Dropped packets the totals map had no room for (more namespaces x
    /// services than it holds). Shown, so a cap is never a silent loss.
    pub const TOTALS_FULL: u32 = 8;
    /// Entries the garbage collector evicted before they expired.
    pub const GC_EVICTIONS: u32 = 9;
    /// kretprobe state that was found stale (a missed return) and reset.
    pub const STALE_STATE: u32 = 10;
    /// tc tier: packets that opened a flow on ingress (SYN without ACK, or
    /// a UDP datagram of a tuple with no pending entry).
    pub const TC_OPENED: u32 = 11;
    /// tc tier: pending flows that left on egress or drew an answer.
    pub const TC_PASSED: u32 = 12;
    /// tc tier: more packets of a pending flow (retransmitted SYNs, more
    /// datagrams).
    pub const TC_REPEATED: u32 = 13;
    /// tc tier: opening packets that found the pending map full: never
    /// judged, shown as such.
    pub const TC_PENDING_FULL: u32 = 14;
    /// tc tier: opening packets whose match key (TCP ISN, UDP digest) a
    /// different pending flow already holds: never judged.
    pub const TC_KEY_CLASH: u32 = 15;
    /// tc tier: opening packets and answers on a hooked device that
    /// `DEVICES` does not name (its address changed since the last
    /// rescan, or it is shared with another namespace): not held, never
    /// judged, shown.
    pub const TC_UNKNOWN_DEVICE: u32 = 16;
    /// tc tier: frames that still carry an 802.1Q/802.1ad tag, in data or
    /// in metadata, or a PPPoE header: they reach the IP stack (and
    /// conntrack) on an upper device, where ctrace sees them, so they are
    /// skipped here, never misread.
    pub const TC_ENCAPSULATED: u32 = 17;
    pub const COUNT: u32 = 18;
}

/// The tc tier: a packet that opens a flow is held as pending on ingress
/// until it leaves on egress or draws an answer; user space judges the ones
/// that did neither within its window as dropped on this host.
pub mod tc {
    use super::FlowKey;

    /// What identifies a flow's opening packet on both sides of NAT:
    /// masquerade and DNAT rewrite addresses and ports, never the TCP
    /// initial sequence number or the IP ID and payload of a datagram.
    #[repr(C)]
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct MatchKey {
        /// TCP: the initial sequence number. UDP: a digest of the IPv4 ID
        /// (0 on IPv6), the UDP length and the first payload bytes.
        pub id: u32,
        /// The namespace that holds the flow, as `DEVICES` numbers it: a
        /// flow belongs to the namespace it was held in, and only that
        /// namespace's packets pass it.
        pub slot: u32,
        pub proto: u8,
        pub family: u8,
        pub _pad: [u8; 2],
    }

    /// A hooked device as a tc program can tell it: ifindexes repeat
    /// across namespaces (every pod has a low-numbered `eth0`), the
    /// device's own hardware address in the frame (destination on
    /// ingress, source on egress) almost never does.
    #[repr(C)]
    #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
    pub struct DeviceKey {
        pub ifindex: u32,
        /// The device's address; zero for devices without a link-layer
        /// header (PPP, WireGuard, tun); `GROUP` for frames sent to a
        /// group address, registered only for an ifindex no other watched
        /// namespace uses.
        pub mac: [u8; 6],
        pub _pad: [u8; 2],
    }

    impl DeviceKey {
        pub const GROUP: [u8; 6] = [0xff; 6];
    }

    /// `DEVICES` slot of the loopback device in ctrace's own private
    /// namespace: a datagram user space sends there from each CPU in turn
    /// makes that CPU move the flow it holds into `PENDING` (see
    /// `ctrace_tc_egress`). Never a namespace's slot.
    pub const TICK_SLOT: u32 = u32::MAX;

    /// Flows that passed, per opener and destination: who is opening new
    /// conntrack entries, for kernels without ctnetlink's event groups.
    #[repr(C)]
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct PassedKey {
        /// The opener's address (IPv4 in the first 4 bytes).
        pub src: [u8; 16],
        /// The holding namespace, as `DEVICES` numbers it.
        pub slot: u32,
        pub dport: u16,
        pub proto: u8,
        pub family: u8,
    }

    pub mod state {
        /// Seen on ingress, neither forwarded nor answered yet.
        pub const PENDING: u8 = 0;
        /// Left on egress, or the host answered it.
        pub const PASSED: u8 = 1;
        /// Judged dropped by user space; later packets still count.
        pub const JUDGED: u8 = 2;
    }

    /// One flow opened on ingress. `flow.netns` is the key's slot: a tc
    /// program cannot see its namespace's inode; user space maps slots to
    /// namespaces.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Pending {
        pub flow: FlowKey,
        /// Interface the opening packet arrived on: its forwarded copy
        /// leaves with this as `ingress_ifindex`.
        pub ifindex: u32,
        pub first_ns: u64,
        pub last_ns: u64,
        /// Opening packets seen (retransmissions included).
        pub packets: u32,
        /// Index into the service catalog: 0 from the tc programs, which
        /// leave naming to user space (a lookup less per opening packet).
        pub service: u16,
        /// `state::*`.
        pub state: u8,
        pub tcp_flags: u8,
    }
}

/// The node side: outgoing TCP connection attempts and how they ended, from
/// the socket tracepoints. Counted in the kernel per (namespace, service,
/// outcome), so a storm of failing connects loses detail, never a count.
pub mod connect {
    use super::FlowKey;

    /// What a row of the totals counts (`TotalKey::what`).
    pub mod what {
        /// A socket entered SYN_SENT. `syn_retransmits` of this row counts
        /// every retransmitted SYN.
        pub const ATTEMPTED: u8 = 1;
        /// SYN_SENT became ESTABLISHED (or SYN_RECV: simultaneous open).
        pub const ESTABLISHED: u8 = 2;
        /// Closed from SYN_SENT with ETIMEDOUT: the kernel gave up
        /// retransmitting the SYN.
        pub const TIMEOUT: u8 = 3;
        /// Closed from SYN_SENT with ECONNREFUSED: a RST answered.
        pub const REFUSED: u8 = 4;
        /// Closed from SYN_SENT with another error: an ICMP error such as
        /// host or network unreachable.
        pub const UNREACHABLE: u8 = 5;
        /// Closed from SYN_SENT without an error: the application gave up
        /// (its own connect timeout) before any answer.
        pub const ABORTED: u8 = 6;
        /// A listener retransmitted a SYN-ACK: a client that never
        /// completed the handshake (incoming direction).
        pub const SYNACK_RETRANSMIT: u8 = 7;
    }

    #[repr(C)]
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct TotalKey {
        pub netns: u32,
        /// Service catalog index of the destination port (the listener's
        /// own port for SYNACK_RETRANSMIT), 0 for none.
        pub service: u16,
        /// IPPROTO_TCP: the tracepoints see TCP sockets only.
        pub proto: u8,
        /// `what::*`.
        pub what: u8,
    }

    /// Per-CPU value of the totals.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Count {
        pub events: u64,
        /// ATTEMPTED: SYNs retransmitted. Outcomes: the retransmits of the
        /// attempts that ended so, where their start was seen.
        pub syn_retransmits: u64,
        /// Outcomes: summed time from SYN_SENT, where the start was seen.
        pub elapsed_ns: u64,
    }

    /// A socket in SYN_SENT, keyed by its address until it leaves.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Attempt {
        pub start_ns: u64,
        pub syn_retransmits: u32,
        pub _pad: u32,
    }

    /// A failed attempt, sent to user space when it ends.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Failure {
        /// CLOCK_MONOTONIC of the outcome.
        pub ts_ns: u64,
        /// 0 when the start was not seen.
        pub elapsed_ns: u64,
        pub flow: FlowKey,
        pub syn_retransmits: u32,
        /// `what::*`.
        pub outcome: u8,
        /// Whether the attempt's start was seen (elapsed and retransmits
        /// are known).
        pub started: u8,
        pub _pad: [u8; 6],
    }

    /// Indices of `CONNECT_COUNTERS`.
    pub mod counter {
        /// Failures the ring buffer had no room for (their counts are in
        /// the totals).
        pub const LOST_EVENTS: u32 = 0;
        /// Outcomes of attempts whose start had left the attempt map
        /// (evicted in a storm): counted, without elapsed time and
        /// retransmits.
        pub const UNTRACKED: u32 = 1;
        /// Totals rows the map had no room for.
        pub const TOTALS_FULL: u32 = 2;
        pub const COUNT: u32 = 3;
    }

    /// Where struct sock keeps what the programs read, from BTF at run
    /// time. The programs are raw tracepoints: they get the socket itself,
    /// not a formatted record, so the handshakes they are not about cost
    /// next to nothing.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Layout {
        /// struct sock_common (at the start of struct sock)
        pub skc_family: u32,
        pub skc_state: u32,
        /// Local port, host byte order; 0 once the socket is unhashed.
        pub skc_num: u32,
        /// Remote port, network byte order.
        pub skc_dport: u32,
        pub skc_daddr: u32,
        pub skc_rcv_saddr: u32,
        pub skc_v6_daddr: u32,
        pub skc_v6_rcv_saddr: u32,
        /// struct inet_sock: the local port, network byte order. Unlike
        /// skc_num it survives the unhash that precedes CLOSE.
        pub inet_sport: u32,
        /// struct sock
        pub sk_protocol: u32,
        pub sk_err: u32,
        pub sk_err_soft: u32,
        /// struct sock -> __sk_common.skc_net.net, struct net -> ns.inum
        pub sk_net: u32,
        pub net_inum: u32,
    }
}

/// Where things are in the running kernel, read from BTF and tracefs by user
/// space and handed to the programs as a read-only global. Nothing the kernel
/// lays out differently between versions is compiled into the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelLayout {
    /// Raw tracepoint `kfree_skb`: 1 + the argument that is the skb, and
    /// the drop reason, from the tracepoint's prototype in BTF; 0 when the
    /// tracepoint is not attached (a kprobe tier without it).
    pub tp_skb_arg: u32,
    pub tp_reason_arg: u32,
    /// Value of SKB_DROP_REASON_NETFILTER_DROP on this kernel.
    pub netfilter_drop: u32,
    /// struct sk_buff
    pub skb_nfct: u32,
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_dev: u32,
    pub skb_sk: u32,
    /// struct net_device -> nd_net.net
    pub dev_net: u32,
    /// struct sock -> __sk_common.skc_net.net
    pub sk_net: u32,
    /// struct net -> ns.inum
    pub net_inum: u32,
    /// The `tier::*` the programs report as.
    pub tier: u32,
    /// struct nf_conn (module BTF where conntrack is a module)
    pub ct_tuple: u32,
    pub ct_net: u32,
    pub ct_status: u32,
    pub ct_timeout: u32,
    pub ct_tcp_state: u32,
    /// struct nf_conntrack_tuple
    pub tuple_src_u3: u32,
    pub tuple_src_port: u32,
    pub tuple_l3num: u32,
    pub tuple_dst_u3: u32,
    pub tuple_dst_port: u32,
    pub tuple_protonum: u32,
    /// Raw tracepoint `kfree_skb`: 1 + the argument that is the free's
    /// location, 0 when it has none (or its addresses cannot be read).
    pub tp_location_arg: u32,
    /// struct nf_conn -> zone.id, 0 when the kernel has no zones.
    pub ct_zone: u32,
    /// `test_flags::*`: switches that exist only so tests can prove the
    /// self-check catches a blind exact tier.
    pub test_flags: u32,
    /// New flows each CPU may announce per `detail_window_ns`; 0 for no
    /// limit. Flows past it are counted (`TotalCount::held_back`), never
    /// announced.
    pub detail_budget: u32,
    pub _pad: u32,
    /// tc tier: user space's judge window. A flow that passes younger
    /// than this cannot have been judged yet and leaves the pending map
    /// at once; an older one is left for user space to settle.
    pub tc_window_ns: u64,
    /// The detail budget's window.
    pub detail_window_ns: u64,
    /// [start, end) of `nf_hook_slow` and `nft_do_chain` in kernel text, 0
    /// when unknown: where kfree_skb's `location` says a packet was freed.
    pub hook_slow_start: u64,
    pub hook_slow_end: u64,
    pub nft_chain_start: u64,
    pub nft_chain_end: u64,
}

pub mod test_flags {
    /// Ignore conntrack's allocation failures, as a kprobe that attached
    /// but never fires would.
    pub const BLIND_ALLOC: u32 = 1;
    /// Also load a program no verifier accepts, to prove that a rejection
    /// reaches the user with the verifier's log and its own exit code.
    pub const VERIFIER_REJECT: u32 = 2;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), made only of integers, with explicit
    // padding, so every byte pattern is a valid value.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::EvictKey {}
    unsafe impl aya::Pod for super::TotalKey {}
    unsafe impl aya::Pod for super::TotalCount {}
    unsafe impl aya::Pod for super::DetailBudget {}
    unsafe impl aya::Pod for super::FlowStats {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::KernelLayout {}
    unsafe impl aya::Pod for super::tc::MatchKey {}
    unsafe impl aya::Pod for super::tc::DeviceKey {}
    unsafe impl aya::Pod for super::tc::Pending {}
    unsafe impl aya::Pod for super::tc::PassedKey {}
    unsafe impl aya::Pod for super::connect::TotalKey {}
    unsafe impl aya::Pod for super::connect::Count {}
    unsafe impl aya::Pod for super::connect::Attempt {}
    unsafe impl aya::Pod for super::connect::Failure {}
    unsafe impl aya::Pod for super::connect::Layout {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;

    // The eBPF side and user space must agree on sizes; a change here is an
    // ABI change and must be deliberate.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 4 + 1 + 1 + 2);
        assert_eq!(size_of::<FlowStats>(), 8 * 3 + 8);
        assert_eq!(size_of::<EvictKey>(), 4 + 2 + 1 + 1);
        assert_eq!(
            size_of::<Event>(),
            8 + size_of::<FlowKey>() + 4 + 4 + 4 + 4 + 4
        );
        assert_eq!(size_of::<Event>() % 8, 0);
        assert_eq!(size_of::<KernelLayout>(), 28 * 4 + 6 * 8);
        assert_eq!(size_of::<KernelLayout>() % 8, 0);
        assert_eq!(size_of::<TotalKey>(), 8);
        assert_eq!(size_of::<TotalCount>(), 24);
        assert_eq!(size_of::<DetailBudget>(), 16);
        assert_eq!(size_of::<tc::MatchKey>(), 12);
        assert_eq!(size_of::<tc::DeviceKey>(), 12);
        assert_eq!(size_of::<tc::PassedKey>(), 24);
        assert_eq!(
            size_of::<tc::Pending>(),
            size_of::<FlowKey>() + 4 + 8 + 8 + 4 + 2 + 1 + 1
        );
        assert_eq!(size_of::<connect::TotalKey>(), 8);
        assert_eq!(size_of::<connect::Count>(), 24);
        assert_eq!(size_of::<connect::Attempt>(), 16);
        assert_eq!(
            size_of::<connect::Failure>(),
            8 + 8 + size_of::<FlowKey>() + 4 + 1 + 1 + 6
        );
        assert_eq!(size_of::<connect::Failure>() % 8, 0);
        assert_eq!(size_of::<connect::Layout>(), 14 * 4);
    }
}
