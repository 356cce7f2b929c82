//! The node side: this host's own outgoing TCP connection attempts, and the
//! SYN-ACKs its listeners had to retransmit.
//!
//! `sock:inet_sock_set_state` marks an attempt's start (→ SYN_SENT) and its
//! end (SYN_SENT → ESTABLISHED or CLOSE); `tcp:tcp_retransmit_skb` counts
//! retransmitted SYNs; `tcp:tcp_retransmit_synack` counts handshakes that
//! clients leave hanging on our listeners. How a closed attempt failed is
//! the socket's `sk_err` at that moment: the kernel sets it (ECONNREFUSED
//! on a RST, ETIMEDOUT when it gives up, an ICMP error's errno) before it
//! moves the socket to CLOSE; an application that closes first leaves 0.
//!
//! Totals are counted here, per (namespace, service, outcome); the attempt
//! map only adds elapsed time and retransmits per attempt, so an attempt
//! evicted from it in a storm still counts.
use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{map, tracepoint},
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::TracePointContext,
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

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn ctrace_sock_set_state(ctx: TracePointContext) -> u32 {
    let l = CONNECT_LAYOUT.load();
    let _ = set_state(&ctx, &l);
    0
}

#[inline(always)]
fn set_state(ctx: &TracePointContext, l: &Layout) -> Result<(), i64> {
    let proto: u16 = unsafe { ctx.read_at(l.ss_protocol as usize) }?;
    if proto != IPPROTO_TCP as u16 {
        return Ok(());
    }
    let old: i32 = unsafe { ctx.read_at(l.ss_oldstate as usize) }?;
    let new: i32 = unsafe { ctx.read_at(l.ss_newstate as usize) }?;
    if new != TCP_SYN_SENT && old != TCP_SYN_SENT {
        return Ok(());
    }
    let sk: u64 = unsafe { ctx.read_at(l.ss_skaddr as usize) }?;
    let dport: u16 = unsafe { ctx.read_at(l.ss_dport as usize) }?;
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
        let err: i32 = unsafe { read(sk, l.sk_err) }.unwrap_or(0);
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
    flow.sport = unsafe { ctx.read_at(l.ss_sport as usize) }?;
    let family: u16 = unsafe { ctx.read_at(l.ss_family as usize) }?;
    if family == AF_INET as u16 {
        flow.family = AF_INET;
        let s: [u8; 4] = unsafe { ctx.read_at(l.ss_saddr as usize) }?;
        let d: [u8; 4] = unsafe { ctx.read_at(l.ss_daddr as usize) }?;
        flow.src[..4].copy_from_slice(&s);
        flow.dst[..4].copy_from_slice(&d);
    } else {
        flow.family = AF_INET6;
        flow.src = unsafe { ctx.read_at(l.ss_saddr_v6 as usize) }?;
        flow.dst = unsafe { ctx.read_at(l.ss_daddr_v6 as usize) }?;
    }
    match CONNECT_EVENTS.reserve::<Failure>(0) {
        Some(mut entry) => {
            entry.write(Failure {
                ts_ns: now,
                flow,
                elapsed_ns,
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

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn ctrace_tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let l = CONNECT_LAYOUT.load();
    let _ = retransmit(&ctx, &l);
    0
}

#[inline(always)]
fn retransmit(ctx: &TracePointContext, l: &Layout) -> Result<(), i64> {
    let state: i32 = unsafe { ctx.read_at(l.rt_state as usize) }?;
    if state != TCP_SYN_SENT {
        return Ok(());
    }
    let sk: u64 = unsafe { ctx.read_at(l.rt_skaddr as usize) }?;
    let dport: u16 = unsafe { ctx.read_at(l.rt_dport as usize) }?;
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

#[tracepoint(category = "tcp", name = "tcp_retransmit_synack")]
pub fn ctrace_tcp_retransmit_synack(ctx: TracePointContext) -> u32 {
    let l = CONNECT_LAYOUT.load();
    let _ = retransmit_synack(&ctx, &l);
    0
}

#[inline(always)]
fn retransmit_synack(ctx: &TracePointContext, l: &Layout) -> Result<(), i64> {
    // The listener's socket and its own (local) port.
    let sk: u64 = unsafe { ctx.read_at(l.sa_skaddr as usize) }?;
    let sport: u16 = unsafe { ctx.read_at(l.sa_sport as usize) }?;
    let key = TotalKey {
        netns: netns_of_sock(l, sk),
        service: service_of(sport),
        proto: IPPROTO_TCP,
        what: what::SYNACK_RETRANSMIT,
    };
    count(&key, 1, 0, 0);
    Ok(())
}
