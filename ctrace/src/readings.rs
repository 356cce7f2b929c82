//! What the kernel side has counted, as user space reads it: per-flow
//! counts, drop totals, evictions and the programs' own counters. Shared by
//! the event source, the tiers that judge drops in user space, and the
//! stages downstream.

/// Kernel-side counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub lost_events: u64,
    pub netfilter_drops: u64,
    pub undecoded: u64,
    pub flow_map_errors: u64,
    /// Kprobe tier only: conntrack's own decisions.
    pub evictions: u64,
    pub gc_evictions: u64,
    pub inserts: u64,
    pub deletes: u64,
    pub alloc_failures: u64,
    /// Packets the kernel's totals map had no room for.
    pub totals_full: u64,
    /// Entry/return state found stale (a missed kretprobe) and reset.
    pub stale_state: u64,
    /// tc tier: flows opened on ingress, passed, repeated opening packets,
    /// and opening packets never judged (map full, key clash).
    pub tc_opened: u64,
    pub tc_passed: u64,
    pub tc_repeated: u64,
    pub tc_pending_full: u64,
    pub tc_key_clash: u64,
    /// tc tier: opening packets and answers on a device the device map
    /// does not name, and frames skipped for a tag or PPPoE header.
    pub tc_unknown_device: u64,
    pub tc_encapsulated: u64,
    /// tc tier, from user space's sweeps: flows pending now, judged
    /// dropped so far, and pending flows no watched interface owns.
    pub tc_pending: u64,
    pub tc_judged: u64,
    pub tc_unattributed: u64,
}

/// A flow's packet count as the kernel map holds it now.
#[derive(Clone, Copy, Debug)]
pub struct FlowCount {
    pub packets: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub tcp_flags: u8,
    /// `ctrace_common::class` bits of the flow's first packet.
    pub class: u8,
}

/// Who evicted an entry early.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub enum Evictor {
    EarlyDrop,
    Gc,
}

impl Evictor {
    /// As the JSON output names it.
    pub fn name(self) -> &'static str {
        match self {
            Evictor::EarlyDrop => "early_drop",
            Evictor::Gc => "gc",
        }
    }
}

/// The kernel's eviction count for one (netns, protocol, port, evictor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EvictedKey {
    pub netns: u64,
    pub proto: crate::event::Proto,
    pub dport: u16,
    pub by: Evictor,
}

/// One row of the kernel's drop totals, summed over CPUs: cumulative since
/// ctrace started, never reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelTotal {
    pub netns: u64,
    pub service: u16,
    pub proto: crate::event::Proto,
    pub class: u8,
    pub packets: u64,
    pub flows: u64,
    /// Of `flows`, those the kernel's detail budget never announced.
    pub held_back: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
/// What a tier that judges drops by correlation has judged.
pub struct CorrelationCounts {
    /// Entries in the map at the last sweep.
    pub pending: u64,
    /// Flows judged dropped.
    pub judged: u64,
    /// Pending flows whose namespace slot names no watched namespace (it
    /// went away before they were judged):
    /// not attributed.
    pub unattributed: u64,
    /// Flows judged dropped but not announced one by one (more in one sweep
    /// than the detail takes); the totals count them.
    pub unannounced: u64,
}

/// What a tier that hooks devices (tc) decided for one device, and why:
/// shown by `probe`, the live view and the JSON summary.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct DeviceChoice {
    pub netns: u64,
    pub name: String,
    pub ifindex: u32,
    pub hooked: bool,
    pub why: String,
}
