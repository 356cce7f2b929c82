//! The node side: this host's own outgoing TCP connection attempts, and the
//! SYN-ACKs its listeners had to retransmit.
//!
//! `inet_sock_set_state` marks an attempt's start (→ SYN_SENT) and its end
//! (SYN_SENT → ESTABLISHED or CLOSE); `tcp_retransmit_skb` counts
//! retransmitted SYNs; `tcp_retransmit_synack` counts handshakes that
//! clients leave hanging on our listeners. They are raw tracepoints: a
//! socket changes state several times per connection, and a raw tracepoint
//! hands over the states and the socket without formatting a record, so
//! the transitions this is not about cost a compare. How a closed attempt failed is
//! the socket's `sk_err` at that moment (else `sk_err_soft`): the kernel
//! sets it (ECONNREFUSED on a RST, ETIMEDOUT when it gives up, an ICMP
//! error's errno) before it moves the socket to CLOSE; an application that
//! closes first leaves 0.
//!
//! Totals are counted here, per (namespace, service, outcome); the attempt
//! map only adds elapsed time and retransmits per attempt, so an attempt
//! evicted from it in a storm still counts.
use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{map, raw_tracepoint},
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::RawTracePointContext,
};
use ctrace_common::{
    AF_INET, AF_INET6, FlowKey, IPPROTO_TCP,
    connect::{Attempt, Count, Failure, Layout, TotalKey, counter, what},
    service_key,
};

use crate::{SERVICES, read};

// SAFETY: plain integers; user space overrides it before load.
#[unsafe(no_mangle)]
static CONNECT_LAYOUT: aya_ebpf::Global<Layout> =
    aya_ebpf::Global::new(unsafe { core::mem::zeroed() });

/// Sockets in SYN_SENT, by address. LRU: a storm of attempts that never
/// end evicts the oldest, whose outcome then counts without detail.
#[map]
static CONNECTING: LruHashMap<u64, Attempt> = LruHashMap::with_max_entries(16384, 0);

/// Attempts and outcomes per (netns, service, what). Bounded by
/// namespaces x services x outcomes, never by flows.
#[map]
static CONNECT_TOTALS: PerCpuHashMap<TotalKey, Count> = PerCpuHashMap::with_max_entries(8192, 0);

/// Failed attempts, one record each, as they end.
#[map]
static CONNECT_EVENTS: RingBuf = RingBuf::with_byte_size(128 * 1024, 0);

#[map]
static CONNECT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;

const ETIMEDOUT: i32 = 110;
const ECONNREFUSED: i32 = 111;

#[inline(always)]
fn bump(index: u32) {
    if let Some(slot) = CONNECT_COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn netns_of_sock(l: &Layout, sk: u64) -> u32 {
    let net: u64 = unsafe { read(sk, l.sk_net) }.unwrap_or(0);
    if net == 0 {
        return 0;
    }
    unsafe { read(net, l.net_inum) }.unwrap_or(0)
}

#[inline(always)]
fn service_of(port: u16) -> u16 {
    let k = service_key(IPPROTO_TCP, port);
    unsafe { SERVICES.get(&k) }.copied().unwrap_or(0)
}

#[inline(always)]
fn count(key: &TotalKey, events: u64, syn_retransmits: u64, elapsed_ns: u64) {
    if let Some(c) = CONNECT_TOTALS.get_ptr_mut(key) {
        // This CPU's slot: no other CPU writes it.
        unsafe {
            (*c).events += events;
            (*c).syn_retransmits += syn_retransmits;
            (*c).elapsed_ns += elapsed_ns;
        }
        return;
    }
    let fresh = Count {
        events,
        syn_retransmits,
        elapsed_ns,
    };
    if CONNECT_TOTALS
        .insert(key, &fresh, aya_ebpf::bindings::BPF_NOEXIST as u64)
        .is_ok()
    {
        return;
    }
    // Another CPU made the key first (this CPU's slot exists now), or the
    // map is full.
    match CONNECT_TOTALS.get_ptr_mut(key) {
        Some(c) => unsafe {
            (*c).events += events;
            (*c).syn_retransmits += syn_retransmits;
            (*c).elapsed_ns += elapsed_ns;
        },
        None => bump(counter::TOTALS_FULL),
    }
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn ctrace_sock_set_state(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
    let old = ctx.arg::<u64>(1) as i32;
    let new = ctx.arg::<u64>(2) as i32;
    if new != TCP_SYN_SENT && old != TCP_SYN_SENT {
        return 0;
    }
    let l = CONNECT_LAYOUT.load();
    let _ = set_state(&l, ctx.arg::<u64>(0), new);
    0
}

#[inline(always)]
fn set_state(l: &Layout, sk: u64, new: i32) -> Result<(), i64> {
    let proto: u16 = unsafe { read(sk, l.sk_protocol) }?;
    if proto != IPPROTO_TCP as u16 {
        return Ok(());
    }
    let dport = u16::from_be(unsafe { read::<u16>(sk, l.skc_dport) }?);
    let netns = netns_of_sock(l, sk);
    let mut key = TotalKey {
        netns,
        service: service_of(dport),
        proto: IPPROTO_TCP,
        what: what::ATTEMPTED,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if new == TCP_SYN_SENT {
        // connect() enters SYN_SENT before it picks the source port, so
        // the tuple is read when the attempt ends.
        let a = Attempt {
            start_ns: now,
            syn_retransmits: 0,
            _pad: 0,
        };
        let _ = CONNECTING.insert(&sk, &a, 0);
        count(&key, 1, 0, 0);
        return Ok(());
    }
    key.what = if new == TCP_ESTABLISHED || new == TCP_SYN_RECV {
        what::ESTABLISHED
    } else if new == TCP_CLOSE {
        // An ICMP error that arrived while connect() held the socket lands
        // in sk_err_soft; the application may close before a second one
        // ends the attempt with sk_err.
        let err = match unsafe { read::<i32>(sk, l.sk_err) }.unwrap_or(0) {
            0 => unsafe { read::<i32>(sk, l.sk_err_soft) }.unwrap_or(0),
            e => e,
        };
        match err {
            0 => what::ABORTED,
            ETIMEDOUT => what::TIMEOUT,
            ECONNREFUSED => what::REFUSED,
            _ => what::UNREACHABLE,
        }
    } else {
        return Ok(());
    };
    let (started, elapsed_ns, retransmits) = match unsafe { CONNECTING.get(&sk) } {
        Some(a) => (true, now.saturating_sub(a.start_ns), a.syn_retransmits),
        None => {
            bump(counter::UNTRACKED);
            (false, 0, 0)
        }
    };
    let _ = CONNECTING.remove(&sk);
    count(&key, 1, retransmits as u64, elapsed_ns);
    if key.what == what::ESTABLISHED {
        return Ok(());
    }
    let mut flow = FlowKey {
        netns,
        dport,
        proto: IPPROTO_TCP,
        ..FlowKey::default()
    };
    flow.sport = u16::from_be(unsafe { read::<u16>(sk, l.inet_sport) }?);
    let family: u16 = unsafe { read(sk, l.skc_family) }?;
    let v6_dst: [u8; 16] = if family == AF_INET6 as u16 {
        unsafe { read(sk, l.skc_v6_daddr) }?
    } else {
        [0; 16]
    };
    // A dual-stack socket connecting to ::ffff:a.b.c.d speaks IPv4 on the
    // wire, where the router sees it: report it as IPv4 (the kernel keeps
    // the v4 addresses in skc_daddr and skc_rcv_saddr for it too).
    let v4_mapped = v6_dst[..10] == [0; 10] && v6_dst[10] == 0xff && v6_dst[11] == 0xff;
    if family == AF_INET as u16 || v4_mapped {
        flow.family = AF_INET;
        let s: [u8; 4] = unsafe { read(sk, l.skc_rcv_saddr) }?;
        let d: [u8; 4] = unsafe { read(sk, l.skc_daddr) }?;
        flow.src[..4].copy_from_slice(&s);
        flow.dst[..4].copy_from_slice(&d);
    } else {
        flow.family = AF_INET6;
        flow.src = unsafe { read(sk, l.skc_v6_rcv_saddr) }?;
        flow.dst = v6_dst;
    }
    match CONNECT_EVENTS.reserve::<Failure>(0) {
        Some(mut entry) => {
            entry.write(Failure {
                ts_ns: now,
                elapsed_ns,
                flow,
                syn_retransmits: retransmits,
                outcome: key.what,
                started: started as u8,
                _pad: [0; 6],
            });
            entry.submit(0);
        }
        None => bump(counter::LOST_EVENTS),
    }
    Ok(())
}

#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn ctrace_tcp_retransmit_skb(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(const struct sock *sk, const struct sk_buff *skb[, int err])
    let l = CONNECT_LAYOUT.load();
    let _ = retransmit(&l, ctx.arg::<u64>(0));
    0
}

#[inline(always)]
fn retransmit(l: &Layout, sk: u64) -> Result<(), i64> {
    let state: u8 = unsafe { read(sk, l.skc_state) }?;
    if i32::from(state) != TCP_SYN_SENT {
        return Ok(());
    }
    let dport = u16::from_be(unsafe { read::<u16>(sk, l.skc_dport) }?);
    if let Some(a) = CONNECTING.get_ptr_mut(&sk) {
        // One socket retransmits from its own timer, never concurrently
        // with itself.
        unsafe { (*a).syn_retransmits += 1 };
    }
    let key = TotalKey {
        netns: netns_of_sock(l, sk),
        service: service_of(dport),
        proto: IPPROTO_TCP,
        what: what::ATTEMPTED,
    };
    count(&key, 0, 1, 0);
    Ok(())
}

#[raw_tracepoint(tracepoint = "tcp_retransmit_synack")]
pub fn ctrace_tcp_retransmit_synack(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(const struct sock *sk, const struct request_sock *req): the
    // listener, whose own port names the service.
    let l = CONNECT_LAYOUT.load();
    let _ = retransmit_synack(&l, ctx.arg::<u64>(0));
    0
}

#[inline(always)]
fn retransmit_synack(l: &Layout, sk: u64) -> Result<(), i64> {
    let sport: u16 = unsafe { read(sk, l.skc_num) }?;
    let key = TotalKey {
        netns: netns_of_sock(l, sk),
        service: service_of(sport),
        proto: IPPROTO_TCP,
        what: what::SYNACK_RETRANSMIT,
    };
    count(&key, 1, 0, 0);
    Ok(())
}
