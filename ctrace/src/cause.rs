//! Why a packet was dropped: the causes ctrace names, and the evidence
//! strings that say what decided each one. The decision itself is made per
//! interval by the ledger (`ledger.rs`), from the kernel side's evidence
//! classes and conntrack's own counters.
use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub enum Cause {
    /// conntrack could not allocate an entry: the table was full.
    TableFull,
    /// Confirming the entry failed (clash resolution lost, `insert_failed`).
    Clash,
    /// conntrack's protocol tracker judged the packet invalid and dropped it.
    Invalid,
    /// A rule (nftables, iptables) dropped it.
    Rule,
    /// The evidence cannot tell.
    Unknown,
}

impl Cause {
    pub fn name(self) -> &'static str {
        match self {
            Cause::TableFull => "table_full",
            Cause::Clash => "clash",
            Cause::Invalid => "invalid",
            Cause::Rule => "rule",
            Cause::Unknown => "unknown",
        }
    }

    /// Causes that raise conntrack's own `drop` statistic.
    pub fn counted_by_conntrack(self) -> bool {
        matches!(self, Cause::TableFull | Cause::Clash | Cause::Invalid)
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Every evidence string, documented in docs/causes.md's evidence table.
pub mod evidence {
    /// Exact tiers: the allocation failed inside nf_conntrack_in.
    pub const ALLOC_FAILED: &str = "conntrack_allocation_failed";
    /// Exact tiers: nf_conntrack_in returned NF_DROP without a failed
    /// allocation, and `invalid` rose.
    pub const TRACKER_DROPPED: &str = "conntrack_tracker_dropped";
    /// Exact tiers: __nf_conntrack_confirm returned NF_DROP.
    pub const CONFIRM_FAILED: &str = "conntrack_confirm_failed";
    /// The packet was freed inside nft_do_chain.
    pub const FREED_IN_NFT: &str = "freed_in_nft_do_chain";
    /// Tracked packet, `insert_failed` and `drop` rose with it.
    pub const INSERT_FAILED_ROSE: &str = "insert_failed_counter_rose";
    /// Tracked packet, no clash: something after conntrack dropped it.
    pub const HAD_ENTRY: &str = "packet_had_conntrack_entry";
    /// Untracked packet, `drop` rose with it.
    pub const DROP_ROSE: &str = "conntrack_drop_counter_rose";
    /// Untracked packet, `drop` and `invalid` rose with it in a table with
    /// room.
    pub const DROP_AND_INVALID_ROSE: &str = "conntrack_drop_and_invalid_counters_rose";
    /// Untracked packet, only `invalid` rose.
    pub const INVALID_ROSE: &str = "conntrack_invalid_counter_rose";
    /// Untracked packet, no counter moved: dropped before conntrack.
    pub const NO_COUNTER_MOVED: &str = "no_conntrack_counter_moved";
    /// tc tier: the flow's opening packet neither left nor was answered,
    /// and no conntrack counter rose for it.
    pub const NOT_FORWARDED: &str = "not_forwarded_no_counter_moved";
    /// Exact tiers: conntrack's verdict was not a drop.
    pub const NOT_CONNTRACK: &str = "conntrack_did_not_drop";
    /// Exact tier whose claims the counters did not back, or whose counters
    /// rose with no claim: the cause was inferred from the counters instead.
    pub const EXACT_DISAGREES: &str = "inferred_exact_tier_disagrees";
    /// Namespace first seen through this drop: its fill level decided.
    pub const COUNT_AT_MAX: &str = "count_at_max";
    pub const NO_BASELINE: &str = "no_counter_baseline";
    /// The namespace's statistics cannot be read.
    pub const NO_COUNTERS: &str = "no_conntrack_counters";
}
