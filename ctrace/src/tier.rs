//! What a hook tier can see, as capabilities. Everything downstream of the
//! event source (attribution, occupancy, output) asks these questions and
//! never which tier is running, so a new tier (tc, fexit) plugs in by
//! stating what it sees.
use std::fmt;

use serde::Serialize;

/// A tier's name, for output only: code decides by [`Capabilities`].
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub enum Strategy {
    Fexit,
    Kprobe,
    Tracepoint,
    Tc,
}

impl Strategy {
    /// In order of preference.
    pub const ALL: [Strategy; 4] = [
        Strategy::Fexit,
        Strategy::Kprobe,
        Strategy::Tracepoint,
        Strategy::Tc,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Fexit => "fexit",
            Strategy::Kprobe => "kprobe",
            Strategy::Tracepoint => "tracepoint",
            Strategy::Tc => "tc",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a tier learns that a packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub enum DropSight {
    /// At the free of the packet itself (kfree_skb).
    Direct,
    /// By correlating what enters and leaves (tc: a new flow that never
    /// left).
    Correlated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct Capabilities {
    /// Sees conntrack's own verdict per packet (allocation failed, tracker
    /// dropped, confirm failed), so causes need no inference while the
    /// kernel's counters agree.
    pub exact_verdicts: bool,
    /// Reports entry inserts, deletes and evictions as events, so occupancy
    /// is kept current without re-dumping the table. False when the probes
    /// for them could not all attach.
    pub entry_events: bool,
    /// Sees where a packet was freed (kfree_skb's `location`), which tells
    /// an nftables rule's drop from conntrack's on kernels that free nft
    /// drops inside `nft_do_chain`.
    pub drop_location: bool,
    /// Counts the garbage collector's early evictions.
    pub gc_evictions: bool,
    /// Its hooks go away with ctrace's file descriptors, however it exits.
    pub fd_scoped_cleanup: bool,
    /// Needs kernel BTF to find struct layouts.
    pub needs_btf: bool,
    pub drops: DropSight,
    /// Counts, in the kernel, the flows it saw pass per opener and
    /// service: its own witness of who is filling the table, so it needs
    /// no ctnetlink announcements for that (the tc tier). Absent from
    /// records written before it existed.
    #[serde(default)]
    pub passed_flows: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Tier {
    pub strategy: Strategy,
    pub caps: Capabilities,
}
