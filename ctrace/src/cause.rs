//! Why a packet was dropped.
//!
//! At `kfree_skb` a table-full drop, a rule's drop and a `ct state invalid
//! drop` all look alike: reason NETFILTER_DROP. What tells them apart is the
//! evidence around the drop:
//!
//! * the skb carried a conntrack entry (`_nfct != 0`): conntrack had already
//!   tracked the packet, so the table was not what stopped it: **rule**;
//! * no entry, and conntrack's own per-netns `drop` counter rose across the
//!   drop: **table_full** (that counter only moves when conntrack fails to
//!   allocate or confirm an entry). When no sample precedes the drop (a
//!   namespace first seen through it), a count at the max decides instead;
//! * no entry, and the `invalid` counter rose: **invalid**;
//! * no entry and no conntrack counter moved: a rule dropped it before
//!   conntrack saw it (raw table, notrack): **rule**;
//! * the namespace's counters could not be read: **unknown**.
//!
//! Limits: the counters are per namespace, not per packet. An invalid-state
//! drop in the same window as table-full drops is labelled table_full. The
//! exact tiers (kprobe/fexit, issue 3) see the failed allocation itself and
//! need none of this.
use std::fmt;

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    TableFull,
    Invalid,
    Rule,
    Unknown,
}

impl Cause {
    pub fn name(self) -> &'static str {
        match self {
            Cause::TableFull => "table_full",
            Cause::Invalid => "invalid",
            Cause::Rule => "rule",
            Cause::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What conntrack's counters did in one namespace around a drop: the
/// difference between a sample taken before the drop and one after it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evidence {
    pub drop_delta: u64,
    pub invalid_delta: u64,
    /// Entry count and max at the later sample.
    pub entries: u64,
    pub max: u64,
    /// Whether a sample before the drop existed. Without one only the
    /// count-versus-max test can be made.
    pub has_baseline: bool,
}

/// What the kernel side saw of the drop itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct Seen {
    /// The skb carried a conntrack entry.
    pub has_ct: bool,
    /// The kprobe tier saw conntrack's allocation fail for this packet.
    pub alloc_failed: bool,
    /// The tier watches allocations, so a drop without `alloc_failed` was
    /// certainly not a full table.
    pub exact: bool,
}

/// The cause, and the evidence that decided it (shown in JSON as `evidence`).
pub fn classify(seen: Seen, evidence: Option<&Evidence>) -> (Cause, &'static str) {
    if seen.alloc_failed {
        return (Cause::TableFull, "conntrack_allocation_failed");
    }
    if seen.has_ct {
        return (Cause::Rule, "packet_had_conntrack_entry");
    }
    if seen.exact {
        return match evidence {
            Some(ev) if ev.has_baseline && ev.invalid_delta > 0 => {
                (Cause::Invalid, "conntrack_invalid_counter_rose")
            }
            _ => (Cause::Rule, "conntrack_allocation_did_not_fail"),
        };
    }
    let Some(ev) = evidence else {
        return (Cause::Unknown, "no_conntrack_counters");
    };
    if !ev.has_baseline {
        // First sight of this namespace: only its fill level can speak.
        if ev.max > 0 && ev.entries >= ev.max {
            return (Cause::TableFull, "count_at_max");
        }
        return (Cause::Unknown, "no_counter_baseline");
    }
    if ev.drop_delta > 0 {
        return (Cause::TableFull, "conntrack_drop_counter_rose");
    }
    if ev.invalid_delta > 0 {
        return (Cause::Invalid, "conntrack_invalid_counter_rose");
    }
    (Cause::Rule, "no_conntrack_counter_moved")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(drop_delta: u64, invalid_delta: u64, entries: u64, max: u64) -> Evidence {
        Evidence {
            drop_delta,
            invalid_delta,
            entries,
            max,
            has_baseline: true,
        }
    }

    fn inferred(has_ct: bool) -> Seen {
        Seen {
            has_ct,
            ..Seen::default()
        }
    }

    #[test]
    fn tracked_packets_are_rule_drops_even_in_a_full_table() {
        assert_eq!(
            classify(inferred(true), Some(&ev(5, 0, 100, 100))).0,
            Cause::Rule
        );
    }

    #[test]
    fn exact_tier_needs_no_counters() {
        let full = Seen {
            alloc_failed: true,
            exact: true,
            has_ct: false,
        };
        assert_eq!(
            classify(full, None),
            (Cause::TableFull, "conntrack_allocation_failed")
        );
        // Exact tier, allocation fine: not the table, whatever the counters say.
        let other = Seen {
            exact: true,
            ..Seen::default()
        };
        assert_eq!(classify(other, Some(&ev(9, 0, 100, 100))).0, Cause::Rule);
        assert_eq!(classify(other, Some(&ev(0, 1, 10, 100))).0, Cause::Invalid);
    }

    #[test]
    fn full_table_or_rising_drop_counter_means_table_full() {
        assert_eq!(
            classify(inferred(false), Some(&ev(3, 0, 99, 100))),
            (Cause::TableFull, "conntrack_drop_counter_rose")
        );
    }

    #[test]
    fn not_full_and_quiet_counters_mean_a_rule() {
        assert_eq!(
            classify(inferred(false), Some(&ev(0, 0, 10, 100))).0,
            Cause::Rule
        );
        assert_eq!(
            classify(inferred(false), Some(&ev(0, 2, 10, 100))).0,
            Cause::Invalid
        );
    }

    #[test]
    fn missing_evidence_is_unknown_not_guessed() {
        assert_eq!(classify(inferred(false), None).0, Cause::Unknown);
        let mut e = ev(4, 0, 10, 100);
        e.has_baseline = false;
        assert_eq!(classify(inferred(false), Some(&e)).0, Cause::Unknown);
        e.entries = 100;
        assert_eq!(classify(inferred(false), Some(&e)).0, Cause::TableFull);
    }
}
