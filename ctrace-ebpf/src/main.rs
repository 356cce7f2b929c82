//! ctrace's kernel programs.
//!
//! The tracepoint tier hooks `kfree_skb` as a raw tracepoint (its arguments
//! typed from BTF, so no tracefs is needed), keeps only packets freed with
//! reason NETFILTER_DROP, and decodes the flow they belong to. Per-packet
//! work ends in the kernel: per-(netns, service, proto, evidence) totals
//! count every packet, a flow-keyed LRU map adds per-flow detail, and only
//! the first packet of a flow is sent to user space through the ring buffer,
//! while each CPU's detail budget for the interval lasts (the rest are
//! counted as held back, so a storm costs user space bounded work).
//! Totals are what users act on, so they depend on neither the ring buffer
//! nor the LRU: a flood loses detail, never a count.
//!
//! No kernel layout is compiled in: every offset and argument position
//! comes from `LAYOUT`, which user space fills from BTF before loading.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext, Global,
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{map, raw_tracepoint, socket_filter},
    maps::{HashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{RawTracePointContext, SkBuffContext},
};
use aya_log_ebpf::debug;
use ctrace_common::{
    AF_INET, AF_INET6, DetailBudget, Event, FlowKey, FlowStats, IPPROTO_ICMP, IPPROTO_ICMPV6,
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, KernelLayout, TotalCount, TotalKey, class, counter,
    kind, service_key,
};

mod connect;
mod conntrack;
mod tc;

// SAFETY: KernelLayout is plain integers; all-zero is a valid value, and
// user space always overrides it before load.
#[unsafe(no_mangle)]
pub(crate) static LAYOUT: Global<KernelLayout> = Global::new(unsafe { core::mem::zeroed() });

/// First packets of dropped flows. 256 KiB holds ~3600 events, enough for a
/// burst of new flows between two user-space polls.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Entry events of the kprobe tier (inserts, deletes, evictions), which
/// keep the occupancy view current. Their own ring: filling or flushing a
/// table sends one per entry, and such a flood must not crowd out the drop
/// events beside it. When it overflows, user space re-dumps the table.
#[map]
static ENTRIES: RingBuf = RingBuf::with_byte_size(1024 * 1024, 0);

/// Per-flow packet counts: detail, not totals. Per-CPU so that counting
/// needs no atomics (the key is shared, each CPU owns its value; user space
/// sums them), LRU so that a flood of distinct flows evicts old ones instead
/// of failing inserts.
#[map]
static FLOWS: LruPerCpuHashMap<FlowKey, FlowStats> = LruPerCpuHashMap::with_max_entries(16384, 0);

/// Every dropped packet, counted by (netns, service, proto, evidence class).
/// Not LRU: an evicted key would lose counts. The key space is small and
/// bounded; a packet that finds the map full is counted in TOTALS_FULL.
#[map]
static TOTALS: PerCpuHashMap<TotalKey, TotalCount> = PerCpuHashMap::with_max_entries(8192, 0);

/// (proto << 16 | port) -> service index, filled by user space from its
/// catalog before attaching; sized by user space to the catalog.
#[map]
pub(crate) static SERVICES: HashMap<u32, u16> = HashMap::with_max_entries(1, 0);

/// Each CPU's detail budget (see `KernelLayout::detail_budget`).
#[map]
static BUDGET: PerCpuArray<DetailBudget> = PerCpuArray::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
pub(crate) fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it, a plain add is enough.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub(crate) unsafe fn read<T>(base: u64, offset: u32) -> Result<T, i32> {
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }
}

/// Argument `n - 1` of a raw tracepoint (the layout's 1-based numbers).
/// The verifier takes only constant context offsets; the layout's numbers
/// are read-only constants to it, so every other arm is dead code it never
/// checks.
#[inline(always)]
fn tp_arg(ctx: &RawTracePointContext, n: u32) -> u64 {
    match n {
        1 => ctx.arg::<u64>(0),
        2 => ctx.arg::<u64>(1),
        3 => ctx.arg::<u64>(2),
        _ => 0,
    }
}

#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn ctrace_kfree_skb(ctx: RawTracePointContext) -> i32 {
    let layout = LAYOUT.load();
    let reason = tp_arg(&ctx, layout.tp_reason_arg) as u32;
    let skb = tp_arg(&ctx, layout.tp_skb_arg);
    if reason != layout.netfilter_drop {
        // A verdict whose packet went another way (OVS and act_ct call
        // conntrack directly) must not wait for the next skb at this address.
        if skb != 0 {
            conntrack::forget_verdict(skb);
        }
        return 0;
    }
    bump(counter::NETFILTER_DROPS);
    if skb == 0 {
        bump(counter::UNDECODED);
        return 0;
    }
    // The kprobe tier may have seen why conntrack dropped it.
    let mut class = conntrack::take_verdict(skb);
    if layout.tp_location_arg != 0 {
        let at = tp_arg(&ctx, layout.tp_location_arg);
        if at >= layout.nft_chain_start && at < layout.nft_chain_end {
            class |= class::AT_NFT_CHAIN;
        } else if at >= layout.hook_slow_start && at < layout.hook_slow_end {
            class |= class::AT_HOOK_SLOW;
        }
    }
    match record_drop(&ctx, &layout, skb, reason, class) {
        Ok(()) => {}
        Err(()) => bump(counter::UNDECODED),
    }
    0
}

/// The packet's netns: from the device it arrived on or leaves by, else from
/// its socket (locally generated packets at LOCAL_OUT have no dev yet).
#[inline(always)]
fn netns_of(layout: &KernelLayout, skb: u64) -> u32 {
    let dev: u64 = unsafe { read(skb, layout.skb_dev) }.unwrap_or(0);
    let net: u64 = if dev != 0 {
        unsafe { read(dev, layout.dev_net) }.unwrap_or(0)
    } else {
        let sk: u64 = unsafe { read(skb, layout.skb_sk) }.unwrap_or(0);
        if sk == 0 {
            return 0;
        }
        unsafe { read(sk, layout.sk_net) }.unwrap_or(0)
    };
    if net == 0 {
        return 0;
    }
    unsafe { read(net, layout.net_inum) }.unwrap_or(0)
}

/// Decodes the packet in `skb` into a flow key and counts it as dropped,
/// with the evidence `class` bits the caller saw.
#[inline(always)]
pub(crate) fn record_drop<C: EbpfContext>(
    ctx: &C,
    layout: &KernelLayout,
    skb: u64,
    reason: u32,
    class: u8,
) -> Result<(), ()> {
    let head: u64 = unsafe { read(skb, layout.skb_head) }.map_err(|_| ())?;
    let nh: u16 = unsafe { read(skb, layout.skb_network_header) }.map_err(|_| ())?;
    let nfct: u64 = unsafe { read(skb, layout.skb_nfct) }.unwrap_or(0);
    let ip = head + nh as u64;

    let mut key = FlowKey::default();
    let first: u8 = unsafe { read(ip, 0) }.map_err(|_| ())?;
    let l4 = match first >> 4 {
        4 => {
            let hdr: [u8; 20] = unsafe { read(ip, 0) }.map_err(|_| ())?;
            key.family = AF_INET;
            key.proto = hdr[9];
            key.src[..4].copy_from_slice(&hdr[12..16]);
            key.dst[..4].copy_from_slice(&hdr[16..20]);
            // A non-first fragment has no L4 header to read.
            let frag_off = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff;
            if frag_off != 0 {
                0
            } else {
                ip + ((hdr[0] & 0x0f) as u64) * 4
            }
        }
        6 => {
            let hdr: [u8; 40] = unsafe { read(ip, 0) }.map_err(|_| ())?;
            key.family = AF_INET6;
            // Extension headers are left undecoded: the flow is still
            // reported, by address and next-header number.
            key.proto = hdr[6];
            key.src.copy_from_slice(&hdr[8..24]);
            key.dst.copy_from_slice(&hdr[24..40]);
            ip + 40
        }
        _ => return Err(()),
    };

    let mut tcp_flags = 0u8;
    if l4 != 0 {
        match key.proto {
            IPPROTO_TCP => {
                let hdr: [u8; 14] = unsafe { read(l4, 0) }.map_err(|_| ())?;
                key.sport = u16::from_be_bytes([hdr[0], hdr[1]]);
                key.dport = u16::from_be_bytes([hdr[2], hdr[3]]);
                tcp_flags = hdr[13];
            }
            IPPROTO_UDP | IPPROTO_SCTP | 136 /* UDP-Lite */ => {
                let hdr: [u8; 4] = unsafe { read(l4, 0) }.map_err(|_| ())?;
                key.sport = u16::from_be_bytes([hdr[0], hdr[1]]);
                key.dport = u16::from_be_bytes([hdr[2], hdr[3]]);
            }
            IPPROTO_ICMP | IPPROTO_ICMPV6 => {
                let hdr: [u8; 2] = unsafe { read(l4, 0) }.map_err(|_| ())?;
                key.sport = hdr[0] as u16;
                key.dport = hdr[1] as u16;
            }
            _ => {}
        }
    }
    key.netns = netns_of(layout, skb);

    let now = unsafe { bpf_ktime_get_ns() };
    let flags = class | if nfct != 0 { class::HAS_CT } else { 0 };
    // The budget is decided before the insert so that a held-back flow is
    // marked from the instant it is in the map: user space reads the map
    // concurrently, and an unmarked flow with no event reads as a lost
    // event, announced on top of being counted as held back.
    let announce = take_detail_budget(layout, now);
    let fresh = FlowStats {
        packets: 1,
        first_ns: now,
        last_ns: now,
        tcp_flags,
        flags,
        held_back: u8::from(!announce),
        _pad: [0; 5],
    };
    // BPF_NOEXIST makes "first packet of this flow" a single atomic decision,
    // so one event per flow even when CPUs race on the same flow.
    if FLOWS.insert(&key, &fresh, BPF_NOEXIST as u64).is_ok() {
        if announce {
            count_total(&key, flags, 1, 0);
            emit(ctx, layout, &key, now, tcp_flags, flags, reason);
        } else {
            count_total(&key, flags, 1, 1);
        }
        return Ok(());
    }
    if announce {
        give_back_detail_budget(layout);
    }
    count_total(&key, flags, 0, 0);
    match FLOWS.get_ptr_mut(&key) {
        // This CPU's slot; the first packet seen on this CPU starts it.
        Some(stats) => unsafe {
            if (*stats).packets == 0 {
                (*stats).first_ns = now;
                (*stats).flags = flags;
            }
            (*stats).packets += 1;
            (*stats).last_ns = now;
            (*stats).tcp_flags |= tcp_flags;
        },
        // Evicted between the failed insert and the lookup: count it, the
        // packet is still in NETFILTER_DROPS.
        None => bump(counter::FLOW_MAP_ERRORS),
    }
    Ok(())
}

/// Spends one of this CPU's announcements of the current window, if any
/// is left.
#[inline(always)]
fn take_detail_budget(layout: &KernelLayout, now: u64) -> bool {
    if layout.detail_budget == 0 {
        return true;
    }
    let Some(b) = BUDGET.get_ptr_mut(0) else {
        return true;
    };
    // This CPU's slot: no other CPU writes it.
    unsafe {
        if now.wrapping_sub((*b).window_start_ns) >= layout.detail_window_ns {
            (*b).window_start_ns = now;
            (*b).used = 0;
        }
        if (*b).used >= u64::from(layout.detail_budget) {
            return false;
        }
        (*b).used += 1;
    }
    true
}

/// Returns an announcement taken for a packet that turned out not to start
/// a flow.
#[inline(always)]
fn give_back_detail_budget(layout: &KernelLayout) {
    if layout.detail_budget == 0 {
        return;
    }
    if let Some(b) = BUDGET.get_ptr_mut(0) {
        // This CPU's slot, taken from a moment ago on this CPU.
        unsafe { (*b).used = (*b).used.saturating_sub(1) };
    }
}

/// Adds one packet (and `new_flows`, of which `held_back` were not
/// announced) to the totals of its service.
#[inline(always)]
fn count_total(flow: &FlowKey, class: u8, new_flows: u64, held_back: u64) {
    let service =
        if flow.proto == IPPROTO_TCP || flow.proto == IPPROTO_UDP || flow.proto == IPPROTO_SCTP {
            let k = service_key(flow.proto, flow.dport);
            unsafe { SERVICES.get(&k) }.copied().unwrap_or(0)
        } else {
            0
        };
    let key = TotalKey {
        netns: flow.netns,
        service,
        proto: flow.proto,
        class,
    };
    if let Some(t) = TOTALS.get_ptr_mut(&key) {
        // This CPU's slot: no other CPU writes it.
        unsafe {
            (*t).packets += 1;
            (*t).flows += new_flows;
            (*t).held_back += held_back;
        }
        return;
    }
    let fresh = TotalCount {
        packets: 1,
        flows: new_flows,
        held_back,
    };
    if TOTALS.insert(&key, &fresh, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    // Another CPU created the key first (our slot exists now), or the map
    // is full.
    match TOTALS.get_ptr_mut(&key) {
        Some(t) => unsafe {
            (*t).packets += 1;
            (*t).flows += new_flows;
            (*t).held_back += held_back;
        },
        None => bump(counter::TOTALS_FULL),
    }
}

#[inline(always)]
fn emit<C: EbpfContext>(
    ctx: &C,
    layout: &KernelLayout,
    key: &FlowKey,
    now: u64,
    tcp_flags: u8,
    flags: u8,
    reason: u32,
) {
    let event = Event {
        ts_ns: now,
        key: *key,
        kind: kind::DROP,
        tier: layout.tier as u8,
        tcp_flags,
        flags,
        reason,
        ct_status: 0,
        ct_timeout_jiffies: 0,
        ct_tcp_state: 0,
        _pad: 0,
        ct_zone: 0,
    };
    if submit(&EVENTS, &event) {
        debug!(
            ctx,
            "new dropped flow proto={} dport={}", key.proto, key.dport
        );
    }
}

/// Queues an event for user space; a full ring buffer is counted, never
/// silent.
#[inline(always)]
pub(crate) fn submit(ring: &RingBuf, event: &Event) -> bool {
    match ring.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(*event);
            entry.submit(0);
            true
        }
        None => {
            bump(counter::LOST_EVENTS);
            false
        }
    }
}

/// Loaded only by tests (`test_flags::VERIFIER_REJECT`): it reads memory
/// through a plain number, which no verifier accepts.
#[socket_filter]
pub fn ctrace_test_rejected(_ctx: SkBuffContext) -> i64 {
    let at = LAYOUT.load().test_flags as usize as *const u64;
    unsafe { core::ptr::read_volatile(at) as i64 }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
