//! The kprobe tier: conntrack's own decisions, seen where they are made.
//!
//! * Table full, exactly: `__nf_conntrack_alloc` returning an error while
//!   `nf_conntrack_in` handles a packet. Allocation failures outside the
//!   packet path (ctnetlink creating entries) are not packet drops and are
//!   ignored. The packet is reported from `nf_conntrack_in`'s return, and
//!   the kfree_skb tracepoint skips it so it is not counted twice.
//! * Evictions: `nf_ct_delete` called while `early_drop` runs, counted in
//!   the kernel per (netns, protocol, port) and also sent as entry events.
//! * Inserts: `__nf_conntrack_confirm` returning NF_ACCEPT, and
//!   `nf_conntrack_hash_check_insert` (ctnetlink) returning 0.
//! * Deletes: every other `nf_ct_delete` (timeouts, kills, flushes).
//!
//! State between an entry probe and its return probe lives in a per-CPU
//! scratch slot: conntrack runs these paths with bottom halves disabled, so
//! nothing else runs them on the same CPU in between.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, generated::bpf_jiffies64},
    macros::{kprobe, kretprobe, map},
    maps::{LruPerCpuHashMap, PerCpuArray},
    programs::{ProbeContext, RetProbeContext},
};
use ctrace_common::{
    AF_INET, AF_INET6, EVENT_F_TABLE_FULL, Event, EvictKey, FlowKey, KernelLayout, counter, kind,
};

use crate::{ENTRIES, LAYOUT, bump, read, record_drop, submit};

/// Evictions per (netns, protocol, port). Per-CPU and LRU like the flow
/// map; user space sums the CPUs and carries totals forward.
#[map]
static EVICTED: LruPerCpuHashMap<EvictKey, u64> = LruPerCpuHashMap::with_max_entries(4096, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Scratch {
    /// The skb nf_conntrack_in is handling, 0 outside it.
    skb: u64,
    /// Allocation failed during this nf_conntrack_in.
    alloc_failed: u64,
    /// Depth of early_drop on this CPU.
    in_early_drop: u64,
    /// The entry __nf_conntrack_confirm / hash_check_insert works on.
    confirm_ct: u64,
    insert_ct: u64,
    /// The last skb reported as a table-full drop, for kfree_skb to skip.
    reported_skb: u64,
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: per-CPU slot, used only with preemption/BHs off on this CPU.
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Whether `skb` was already reported by the kprobe tier (and forget it).
#[inline(always)]
pub fn take_reported_skb(skb: u64) -> bool {
    match scratch() {
        Some(s) if s.reported_skb == skb && skb != 0 => {
            s.reported_skb = 0;
            true
        }
        _ => false,
    }
}

/// IS_ERR(): the top 4095 values of the address space are error codes.
#[inline(always)]
fn is_err(ptr: u64) -> bool {
    ptr >= (-4095i64) as u64
}

#[kprobe]
pub fn ctrace_ct_in(ctx: ProbeContext) -> u32 {
    let skb: u64 = ctx.arg(0).unwrap_or(0);
    if let Some(s) = scratch() {
        s.skb = skb;
        s.alloc_failed = 0;
    }
    0
}

#[kretprobe]
pub fn ctrace_ct_alloc_ret(ctx: RetProbeContext) -> u32 {
    let ret: u64 = ctx.ret();
    if let Some(s) = scratch()
        && s.skb != 0
        && is_err(ret)
    {
        s.alloc_failed = 1;
    }
    0
}

#[kretprobe]
pub fn ctrace_ct_in_ret(ctx: RetProbeContext) -> u32 {
    let Some(s) = scratch() else { return 0 };
    let skb = s.skb;
    let failed = s.alloc_failed != 0;
    s.skb = 0;
    s.alloc_failed = 0;
    if !failed || skb == 0 {
        return 0;
    }
    bump(counter::ALLOC_FAILURES);
    s.reported_skb = skb;
    let layout = LAYOUT.load();
    if record_drop(
        &ctx,
        &layout,
        skb,
        layout.netfilter_drop,
        EVENT_F_TABLE_FULL,
    )
    .is_err()
    {
        bump(counter::UNDECODED);
    }
    0
}

#[kprobe]
pub fn ctrace_early_drop(_ctx: ProbeContext) -> u32 {
    if let Some(s) = scratch() {
        s.in_early_drop += 1;
    }
    0
}

#[kretprobe]
pub fn ctrace_early_drop_ret(_ctx: RetProbeContext) -> u32 {
    if let Some(s) = scratch()
        && s.in_early_drop > 0
    {
        s.in_early_drop -= 1;
    }
    0
}

#[kprobe]
pub fn ctrace_ct_delete(ctx: ProbeContext) -> u32 {
    let ct: u64 = ctx.arg(0).unwrap_or(0);
    let evicted = scratch().is_some_and(|s| s.in_early_drop > 0);
    let (what, c) = if evicted {
        (kind::EVICT, counter::EVICTIONS)
    } else {
        (kind::DELETE, counter::DELETES)
    };
    bump(c);
    if let Some(key) = report_entry(ct, what)
        && evicted
    {
        count_eviction(&key);
    }
    0
}

#[inline(always)]
fn count_eviction(flow: &FlowKey) {
    let key = EvictKey {
        netns: flow.netns,
        dport: flow.dport,
        family: flow.family,
        proto: flow.proto,
    };
    match EVICTED.get_ptr_mut(&key) {
        // This CPU's slot: no other CPU writes it.
        Some(n) => unsafe { *n += 1 },
        None => {
            if EVICTED.insert(&key, &1, BPF_NOEXIST as u64).is_err() {
                // Another CPU created the key first: our slot exists now.
                match EVICTED.get_ptr_mut(&key) {
                    Some(n) => unsafe { *n += 1 },
                    None => bump(counter::FLOW_MAP_ERRORS),
                }
            }
        }
    }
}

#[kprobe]
pub fn ctrace_ct_confirm(ctx: ProbeContext) -> u32 {
    let skb: u64 = ctx.arg(0).unwrap_or(0);
    let layout = LAYOUT.load();
    let nfct: u64 = unsafe { read(skb, layout.skb_nfct) }.unwrap_or(0);
    if let Some(s) = scratch() {
        // The low bits of _nfct carry ctinfo.
        s.confirm_ct = nfct & !7;
    }
    0
}

#[kretprobe]
pub fn ctrace_ct_confirm_ret(ctx: RetProbeContext) -> u32 {
    let verdict: u32 = ctx.ret();
    let Some(s) = scratch() else { return 0 };
    let ct = s.confirm_ct;
    s.confirm_ct = 0;
    // NF_ACCEPT = 1, NF_DROP = 0.
    if verdict == 1 {
        bump(counter::INSERTS);
        report_entry(ct, kind::INSERT);
    } else {
        report_entry(ct, kind::INSERT_FAILED);
    }
    0
}

#[kprobe]
pub fn ctrace_ct_hash_insert(ctx: ProbeContext) -> u32 {
    let ct: u64 = ctx.arg(0).unwrap_or(0);
    if let Some(s) = scratch() {
        s.insert_ct = ct;
    }
    0
}

#[kretprobe]
pub fn ctrace_ct_hash_insert_ret(ctx: RetProbeContext) -> u32 {
    let ret: i32 = ctx.ret();
    let Some(s) = scratch() else { return 0 };
    let ct = s.insert_ct;
    s.insert_ct = 0;
    if ret == 0 {
        bump(counter::INSERTS);
        report_entry(ct, kind::INSERT);
    }
    0
}

/// Sends one entry's original tuple, netns, status, timeout and TCP state;
/// returns the tuple when it could be read.
#[inline(always)]
fn report_entry(ct: u64, what: u8) -> Option<FlowKey> {
    if ct == 0 {
        return None;
    }
    let layout = LAYOUT.load();
    let Ok(key) = entry_key(&layout, ct) else {
        bump(counter::UNDECODED);
        return None;
    };
    let status: u64 = unsafe { read(ct, layout.ct_status) }.unwrap_or(0);
    let timeout: u32 = unsafe { read(ct, layout.ct_timeout) }.unwrap_or(0);
    let tcp_state: u8 = unsafe { read(ct, layout.ct_tcp_state) }.unwrap_or(0);
    // nf_conn.timeout is absolute, in 32-bit jiffies.
    let now = unsafe { bpf_jiffies64() } as u32;
    submit(
        &ENTRIES,
        &Event {
            ts_ns: unsafe { bpf_ktime_get_ns() },
            key,
            kind: what,
            tier: layout.tier as u8,
            tcp_flags: 0,
            flags: 0,
            reason: 0,
            ct_status: status as u32,
            ct_timeout_jiffies: timeout.wrapping_sub(now),
            ct_tcp_state: if key.proto == ctrace_common::IPPROTO_TCP {
                tcp_state
            } else {
                0
            },
            _pad: [0; 3],
        },
    );
    Some(key)
}

#[inline(always)]
fn entry_key(layout: &KernelLayout, ct: u64) -> Result<FlowKey, ()> {
    let t = ct + layout.ct_tuple as u64;
    let l3num: u16 = unsafe { read(t, layout.tuple_l3num) }.map_err(|_| ())?;
    let mut key = FlowKey {
        family: l3num as u8,
        proto: unsafe { read(t, layout.tuple_protonum) }.map_err(|_| ())?,
        ..FlowKey::default()
    };
    match key.family {
        AF_INET => {
            let s: [u8; 4] = unsafe { read(t, layout.tuple_src_u3) }.map_err(|_| ())?;
            let d: [u8; 4] = unsafe { read(t, layout.tuple_dst_u3) }.map_err(|_| ())?;
            key.src[..4].copy_from_slice(&s);
            key.dst[..4].copy_from_slice(&d);
        }
        AF_INET6 => {
            key.src = unsafe { read(t, layout.tuple_src_u3) }.map_err(|_| ())?;
            key.dst = unsafe { read(t, layout.tuple_dst_u3) }.map_err(|_| ())?;
        }
        _ => return Err(()),
    }
    // Ports are stored in network byte order.
    let sp: [u8; 2] = unsafe { read(t, layout.tuple_src_port) }.map_err(|_| ())?;
    let dp: [u8; 2] = unsafe { read(t, layout.tuple_dst_port) }.map_err(|_| ())?;
    key.sport = u16::from_be_bytes(sp);
    key.dport = u16::from_be_bytes(dp);
    let net: u64 = unsafe { read(ct, layout.ct_net) }.unwrap_or(0);
    if net != 0 {
        key.netns = unsafe { read(net, layout.net_inum) }.unwrap_or(0);
    }
    Ok(key)
}
