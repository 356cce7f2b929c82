//! The kprobe tier: conntrack's own decisions, seen where they are made.
//!
//! * Table full, exactly: `nf_conntrack_in` returning NF_DROP after
//!   `__nf_conntrack_alloc` failed inside it. NF_DROP without a failed
//!   allocation is a protocol tracker's verdict (`invalid` and `drop` both
//!   rise). Allocation failures outside the packet path (ctnetlink creating
//!   entries) are no packet's drop and are ignored.
//! * Clash: `__nf_conntrack_confirm` returning NF_DROP (`insert_failed`).
//! * The verdict is handed to the kfree_skb tracepoint, keyed by the skb, so
//!   each dropped packet is counted once, where it is freed, together with
//!   the location evidence there. Without the tracepoint the packet is
//!   counted at the return probe.
//! * Evictions: `nf_ct_delete` called inside `early_drop`, or inside
//!   `gc_worker` for an entry that has not expired yet (the collector's own
//!   early eviction above 95% fill, which no kernel statistic counts).
//! * Inserts: `__nf_conntrack_confirm` returning NF_ACCEPT, and
//!   `nf_conntrack_hash_check_insert` (ctnetlink) returning 0.
//! * Deletes: every other `nf_ct_delete` (timeouts, kills, flushes).
//!
//! State between an entry probe and its return probe is kept per task and
//! per nesting depth, never per CPU: softirqs nest inside a task's own
//! LOCAL_OUT processing, and LOCAL_OUT runs with bottom halves enabled, so
//! the task can migrate between entry and return. The idle task (pid 0)
//! cannot migrate, and is told apart by CPU. A frame older than
//! `STALE_NS` is a return that was missed (kretprobe instances run out under
//! load), and is discarded rather than trusted.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        generated::bpf_jiffies64,
    },
    macros::{kprobe, kretprobe, map},
    maps::{LruHashMap, LruPerCpuHashMap},
    programs::{ProbeContext, RetProbeContext},
};
use ctrace_common::{
    AF_INET, AF_INET6, Event, EvictKey, FlowKey, KernelLayout, class, counter, evicted_by, kind,
    test_flags,
};

use crate::{ENTRIES, LAYOUT, bump, read, record_drop, submit};

/// Evictions per (netns, protocol, port, evictor). Per-CPU and LRU like the
/// flow map; user space sums the CPUs and carries totals forward.
#[map]
static EVICTED: LruPerCpuHashMap<EvictKey, u64> = LruPerCpuHashMap::with_max_entries(4096, 0);

/// The functions whose calls are tracked from entry to return.
mod func {
    pub const CT_IN: u32 = 1;
    pub const EARLY_DROP: u32 = 2;
    pub const CONFIRM: u32 = 3;
    pub const HASH_INSERT: u32 = 4;
    pub const GC_WORKER: u32 = 5;
}

/// One call in progress: a task (or an idle CPU), a function, and how deep
/// that function is nested on it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FrameKey {
    task: u64,
    func: u32,
    depth: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Frame {
    /// The function's first argument (skb or entry); in VERDICTS, the
    /// task that decided.
    arg: u64,
    /// Something seen during the call (an allocation failure).
    flag: u64,
    ts_ns: u64,
}

/// A frame this old belongs to a call whose return probe never ran. The
/// tracked calls take microseconds, gc_worker at most a few milliseconds.
const STALE_NS: u64 = 1_000_000_000;

#[map]
static DEPTHS: LruHashMap<FrameKey, u32> = LruHashMap::with_max_entries(8192, 0);

#[map]
static FRAMES: LruHashMap<FrameKey, Frame> = LruHashMap::with_max_entries(8192, 0);

/// Verdicts of nf_conntrack_in/confirm for skbs about to be freed: the
/// kfree_skb tracepoint takes the class from here. Keyed by skb address;
/// the value holds the task that decided and when, because the free that
/// follows a netfilter drop runs on the same task at once. A mark whose
/// packet was not freed as a netfilter drop (OVS and act_ct call conntrack
/// directly, and may free it with another reason or consume it) therefore
/// cannot taint a later skb at the same address on another task, or later.
#[map]
static VERDICTS: LruHashMap<u64, Frame> = LruHashMap::with_max_entries(4096, 0);

/// A verdict is consumed by the free that follows it on the same path;
/// one older than this is left over.
const VERDICT_TTL_NS: u64 = 50_000_000;

#[inline(always)]
fn task() -> u64 {
    let tid = bpf_get_current_pid_tgid() as u32;
    if tid == 0 {
        (1u64 << 32) | u64::from(unsafe { bpf_get_smp_processor_id() })
    } else {
        u64::from(tid)
    }
}

#[inline(always)]
fn depth_key(task: u64, func: u32) -> FrameKey {
    FrameKey {
        task,
        func,
        depth: 0,
    }
}

/// Records a call's entry; returns nothing, the return probe pops it.
#[inline(always)]
fn enter(func: u32, arg: u64) {
    let t = task();
    let dk = depth_key(t, func);
    let now = unsafe { bpf_ktime_get_ns() };
    let mut depth = unsafe { DEPTHS.get(&dk) }.copied().unwrap_or(0);
    if depth > 0 {
        // Is the caller's frame real, or left by a missed return?
        let below = FrameKey {
            task: t,
            func,
            depth,
        };
        let stale = match unsafe { FRAMES.get(&below) } {
            Some(f) => now.saturating_sub(f.ts_ns) > STALE_NS,
            None => true,
        };
        if stale {
            bump(counter::STALE_STATE);
            depth = 0;
        }
    }
    if depth >= 8 {
        bump(counter::STALE_STATE);
        depth = 0;
    }
    depth += 1;
    let _ = DEPTHS.insert(&dk, &depth, 0);
    // Overwrites whatever a missed return left at this depth.
    let _ = FRAMES.insert(
        &FrameKey {
            task: t,
            func,
            depth,
        },
        &Frame {
            arg,
            flag: 0,
            ts_ns: now,
        },
        0,
    );
}

/// The innermost call of `func` on this task, if one is in progress.
#[inline(always)]
fn top(func: u32) -> Option<*mut Frame> {
    let t = task();
    let depth = unsafe { DEPTHS.get(&depth_key(t, func)) }.copied()?;
    if depth == 0 {
        return None;
    }
    let f = FRAMES.get_ptr_mut(&FrameKey {
        task: t,
        func,
        depth,
    })?;
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(unsafe { (*f).ts_ns }) > STALE_NS {
        return None;
    }
    Some(f)
}

/// Pops the innermost call of `func` at its return.
#[inline(always)]
fn leave(func: u32) -> Option<Frame> {
    let t = task();
    let dk = depth_key(t, func);
    let depth = unsafe { DEPTHS.get(&dk) }.copied().unwrap_or(0);
    if depth == 0 {
        return None;
    }
    let _ = DEPTHS.insert(&dk, &(depth - 1), 0);
    let fk = FrameKey {
        task: t,
        func,
        depth,
    };
    let frame = unsafe { FRAMES.get(&fk) }.copied();
    let _ = FRAMES.remove(&fk);
    frame
}

/// The class conntrack's verdict gave `skb`, for the kfree_skb tracepoint
/// (and forgets it); 0 when there is none, or it is left over.
#[inline(always)]
pub fn take_verdict(skb: u64) -> u8 {
    if skb == 0 {
        return 0;
    }
    let Some(v) = (unsafe { VERDICTS.get(&skb) }).copied() else {
        return 0;
    };
    let _ = VERDICTS.remove(&skb);
    let now = unsafe { bpf_ktime_get_ns() };
    if v.arg != task() || now.saturating_sub(v.ts_ns) > VERDICT_TTL_NS {
        return 0;
    }
    v.flag as u8
}

/// Drops the mark of an skb freed for another reason than a netfilter drop.
#[inline(always)]
pub fn forget_verdict(skb: u64) {
    // A lookup takes no lock, a delete does: every drop on the machine
    // passes here, and almost none has a mark.
    if skb != 0 && unsafe { VERDICTS.get(&skb) }.is_some() {
        let _ = VERDICTS.remove(&skb);
    }
}

/// Hands a drop's class to the free that follows, or counts the packet
/// here when no kfree_skb tracepoint is attached.
#[inline(always)]
fn report_verdict<C: aya_ebpf::EbpfContext>(ctx: &C, skb: u64, class: u8) {
    let layout = LAYOUT.load();
    if layout.tp_reason_arg != 0 {
        let v = Frame {
            arg: task(),
            flag: u64::from(class),
            ts_ns: unsafe { bpf_ktime_get_ns() },
        };
        let _ = VERDICTS.insert(&skb, &v, 0);
        return;
    }
    if record_drop(ctx, &layout, skb, layout.netfilter_drop, class).is_err() {
        bump(counter::UNDECODED);
    }
}

/// IS_ERR(): the top 4095 values of the address space are error codes.
#[inline(always)]
fn is_err(ptr: u64) -> bool {
    ptr >= (-4095i64) as u64
}

/// NF_DROP, in the low byte of a netfilter verdict.
#[inline(always)]
fn is_nf_drop(verdict: u32) -> bool {
    verdict & 0xff == 0
}

#[kprobe]
pub fn ctrace_ct_in(ctx: ProbeContext) -> u32 {
    let skb: u64 = ctx.arg(0).unwrap_or(0);
    enter(func::CT_IN, skb);
    0
}

#[kretprobe]
pub fn ctrace_ct_alloc_ret(ctx: RetProbeContext) -> u32 {
    let ret: u64 = ctx.ret();
    if !is_err(ret) {
        return 0;
    }
    if LAYOUT.load().test_flags & test_flags::BLIND_ALLOC != 0 {
        return 0;
    }
    // Outside nf_conntrack_in (ctnetlink) there is no packet to blame.
    if let Some(f) = top(func::CT_IN) {
        unsafe { (*f).flag = 1 };
    }
    0
}

#[kretprobe]
pub fn ctrace_ct_in_ret(ctx: RetProbeContext) -> u32 {
    let verdict: u32 = ctx.ret();
    let Some(frame) = leave(func::CT_IN) else {
        return 0;
    };
    if frame.arg == 0 || !is_nf_drop(verdict) {
        return 0;
    }
    let class = if frame.flag != 0 {
        bump(counter::ALLOC_FAILURES);
        class::ALLOC_FAILED
    } else {
        class::TRACKER_DROP
    };
    report_verdict(&ctx, frame.arg, class);
    0
}

#[kprobe]
pub fn ctrace_early_drop(_ctx: ProbeContext) -> u32 {
    enter(func::EARLY_DROP, 0);
    0
}

#[kretprobe]
pub fn ctrace_early_drop_ret(_ctx: RetProbeContext) -> u32 {
    let _ = leave(func::EARLY_DROP);
    0
}

#[kprobe]
pub fn ctrace_gc_worker(_ctx: ProbeContext) -> u32 {
    enter(func::GC_WORKER, 0);
    0
}

#[kretprobe]
pub fn ctrace_gc_worker_ret(_ctx: RetProbeContext) -> u32 {
    let _ = leave(func::GC_WORKER);
    0
}

#[kprobe]
pub fn ctrace_ct_delete(ctx: ProbeContext) -> u32 {
    let ct: u64 = ctx.arg(0).unwrap_or(0);
    let by = if top(func::EARLY_DROP).is_some() {
        evicted_by::EARLY_DROP
    } else if top(func::GC_WORKER).is_some() && !expired(ct) {
        evicted_by::GC
    } else {
        0
    };
    let (what, c) = match by {
        evicted_by::EARLY_DROP => (kind::EVICT, counter::EVICTIONS),
        evicted_by::GC => (kind::GC_EVICT, counter::GC_EVICTIONS),
        _ => (kind::DELETE, counter::DELETES),
    };
    bump(c);
    if let Some(key) = report_entry(ct, what)
        && by != 0
    {
        count_eviction(&key, by);
    }
    0
}

/// Whether the entry's timeout has passed (`nf_ct_is_expired`).
#[inline(always)]
fn expired(ct: u64) -> bool {
    let layout = LAYOUT.load();
    let Ok(timeout) = (unsafe { read::<u32>(ct, layout.ct_timeout) }) else {
        return true;
    };
    let now = unsafe { bpf_jiffies64() } as u32;
    (timeout.wrapping_sub(now) as i32) <= 0
}

#[inline(always)]
fn count_eviction(flow: &FlowKey, by: u8) {
    let key = EvictKey {
        netns: flow.netns,
        dport: flow.dport,
        by,
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
    enter(func::CONFIRM, skb);
    0
}

#[kretprobe]
pub fn ctrace_ct_confirm_ret(ctx: RetProbeContext) -> u32 {
    let verdict: u32 = ctx.ret();
    let Some(frame) = leave(func::CONFIRM) else {
        return 0;
    };
    let skb = frame.arg;
    let layout = LAYOUT.load();
    let nfct: u64 = unsafe { read(skb, layout.skb_nfct) }.unwrap_or(0);
    // The low bits of _nfct carry ctinfo.
    let ct = nfct & !7;
    if is_nf_drop(verdict) {
        report_entry(ct, kind::INSERT_FAILED);
        report_verdict(&ctx, skb, class::CLASH);
    } else {
        bump(counter::INSERTS);
        report_entry(ct, kind::INSERT);
    }
    0
}

#[kprobe]
pub fn ctrace_ct_hash_insert(ctx: ProbeContext) -> u32 {
    let ct: u64 = ctx.arg(0).unwrap_or(0);
    enter(func::HASH_INSERT, ct);
    0
}

#[kretprobe]
pub fn ctrace_ct_hash_insert_ret(ctx: RetProbeContext) -> u32 {
    let ret: i32 = ctx.ret();
    let Some(frame) = leave(func::HASH_INSERT) else {
        return 0;
    };
    if ret == 0 {
        bump(counter::INSERTS);
        report_entry(frame.arg, kind::INSERT);
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
    let zone: u16 = if layout.ct_zone != 0 {
        unsafe { read(ct, layout.ct_zone) }.unwrap_or(0)
    } else {
        0
    };
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
            _pad: 0,
            ct_zone: zone,
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
