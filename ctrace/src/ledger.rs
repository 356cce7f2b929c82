//! The ledger: the kernel's per-(netns, service, proto, evidence class)
//! packet totals, settled against conntrack's own counters into the
//! per-service, per-cause totals users act on.
//!
//! Each settlement of a namespace reads the kernel's totals first and its
//! counters right after. A packet counted in the totals had its counter
//! raised before it was freed, so the counters' rise always covers the
//! packets read: the counter deltas are *credits* that packets of each
//! class consume, in order of certainty:
//!
//! 1. what an exact tier claims (allocation failed, tracker dropped,
//!    confirm failed), each backed by the counters it raises;
//! 2. packets freed in `nft_do_chain`: a rule;
//! 3. tracked packets: a clash while `insert_failed` credit lasts, else a
//!    rule;
//! 4. untracked packets: table full while `drop` credit lasts (a tracker
//!    drop first, if `invalid` rose too and the table had room), invalid
//!    while `invalid` credit lasts, else a rule that acted before conntrack.
//!
//! Credit left over carries to the next settlement only (the counter of a
//! packet still being freed), then expires as drops ctrace never saw. The
//! totals are monotonic: nothing here is ever subtracted, and nothing
//! depends on the ring buffer or on the kernel's per-flow LRU.
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::{
    cause::{Cause, evidence},
    conntrack::Stats,
    event::Proto,
    readings::KernelTotal,
    tier::Capabilities,
};
use ctrace_common::class;

/// How far the self-check trusts the tier in a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub enum Trust {
    /// Exact tier, and conntrack's counters back every claim.
    Exact,
    /// Exact tier, but the counters disagreed in the latest window: its
    /// drops are labelled by inference until they agree again.
    Disagrees,
    /// The tier infers causes from the counters.
    Inferred,
    /// The namespace's counters cannot be read.
    NoCounters,
}

impl Trust {
    /// As the JSON output names it.
    pub fn name(self) -> &'static str {
        match self {
            Trust::Exact => "exact",
            Trust::Disagrees => "disagrees",
            Trust::Inferred => "inferred",
            Trust::NoCounters => "no_counters",
        }
    }
}

/// Self-check of one namespace: what ctrace attributed to causes that
/// conntrack counts in `drop`, against conntrack's own `drop` delta.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct Agreement {
    pub netns: u64,
    /// Packets labelled table_full, clash or (tracker) invalid.
    pub attributed: u64,
    /// conntrack's `drop` delta since ctrace first sampled the namespace.
    pub kernel: u64,
    /// attributed / kernel; None while the kernel counted nothing.
    pub ratio: Option<f64>,
    pub table_full: u64,
    /// Kernel drops no packet ever claimed (their credit expired).
    pub unseen: u64,
    pub trust: Trust,
}

/// New flows of one (netns, service) that the kernel's detail budget kept
/// from user space: in the totals, never announced as drop records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct HeldBack {
    pub netns: u64,
    pub service: Option<String>,
    pub flows: u64,
}

/// Attributed totals of one (netns, service, cause, proto).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct DropGroup {
    pub netns: u64,
    pub service: Option<String>,
    pub cause: Cause,
    pub proto: Proto,
    pub flows: u64,
    pub packets: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Credit {
    drop: u64,
    invalid: u64,
    insert_failed: u64,
}

impl Credit {
    fn take(have: &mut u64, want: u64) -> u64 {
        let n = want.min(*have);
        *have -= n;
        n
    }
}

type RowKey = (u16, Proto, u8);

/// Settlements a correlating tier's `drop` credit is kept for: its
/// verdicts follow sweeps (every 200 ms) and may trail a counter rise by a
/// few of them on a loaded machine.
const CORRELATED_CARRY: usize = 10;
type GroupKey = (u16, Cause, Proto);

#[derive(Default)]
struct NetnsLedger {
    /// Cumulative kernel totals at the last settlement.
    seen: HashMap<RowKey, (u64, u64)>,
    last: Option<Stats>,
    carry: Credit,
    /// `drop` credit left over, one bucket per settlement, oldest first.
    aged: std::collections::VecDeque<u64>,
    groups: BTreeMap<GroupKey, (u64, u64)>,
    /// The cause and evidence each class got last, for labelling the
    /// flows announced with it.
    labels: HashMap<u8, (Cause, &'static str)>,
    kernel_drops: u64,
    attributed: u64,
    table_full: u64,
    unseen: u64,
    trust: Option<Trust>,
    /// Cumulative held-back flows by service, as the rows last said.
    held_back: BTreeMap<u16, u64>,
}

/// One share of a row's packets.
struct Share {
    cause: Cause,
    evidence: &'static str,
    packets: u64,
    /// Consumed `drop` credit: counted in the self-check.
    counted: bool,
}

pub struct Ledger {
    caps: Capabilities,
    names: Vec<String>,
    netns: BTreeMap<u64, NetnsLedger>,
}

impl Ledger {
    /// `names`: service names by kernel index (index 0: no service).
    pub fn new(caps: Capabilities, names: Vec<String>) -> Ledger {
        Ledger {
            caps,
            names,
            netns: BTreeMap::new(),
        }
    }

    /// First counters of a namespace: its drops are measured from here.
    pub fn baseline(&mut self, netns: u64, stats: Option<Stats>) {
        let n = self.netns.entry(netns).or_default();
        if n.last.is_none() {
            n.last = stats;
        }
    }

    pub fn knows(&self, netns: u64) -> bool {
        self.netns.contains_key(&netns)
    }

    /// Settles one namespace: `rows` are the kernel's cumulative totals for
    /// it (read first), `stats` its counters read right after (None when
    /// they cannot be read).
    pub fn settle(&mut self, netns: u64, rows: &[KernelTotal], stats: Option<Stats>) {
        let caps = self.caps;
        let n = self.netns.entry(netns).or_default();
        let mut deltas: Vec<(RowKey, u64, u64)> = Vec::new();
        n.held_back.clear();
        for r in rows.iter().filter(|r| r.netns == netns && r.held_back > 0) {
            *n.held_back.entry(r.service).or_default() += r.held_back;
        }
        for r in rows.iter().filter(|r| r.netns == netns) {
            let key = (r.service, r.proto, r.class);
            let (p0, f0) = n.seen.insert(key, (r.packets, r.flows)).unwrap_or((0, 0));
            let (dp, df) = (r.packets.saturating_sub(p0), r.flows.saturating_sub(f0));
            if dp > 0 || df > 0 {
                deltas.push((key, dp, df));
            }
        }
        let before = n.last;
        if stats.is_some() {
            n.last = stats;
        }
        let (Some(now), Some(before)) = (stats, before) else {
            // No window: only the fill level (or nothing) can speak.
            let full = stats.is_some_and(|s| s.max > 0 && s.entries >= s.max);
            let (cause, why) = match stats {
                None => (Cause::Unknown, evidence::NO_COUNTERS),
                Some(_) if full => (Cause::TableFull, evidence::COUNT_AT_MAX),
                Some(_) => (Cause::Unknown, evidence::NO_BASELINE),
            };
            if stats.is_none() {
                n.trust = Some(Trust::NoCounters);
            }
            for ((service, proto, cls), dp, df) in deltas {
                let share = Share {
                    cause,
                    evidence: why,
                    packets: dp,
                    counted: false,
                };
                n.book(service, proto, cls, df, &[share]);
            }
            return;
        };
        let fresh = Credit {
            drop: now.drop.saturating_sub(before.drop),
            invalid: now.invalid.saturating_sub(before.invalid),
            insert_failed: now.insert_failed.saturating_sub(before.insert_failed),
        };
        n.kernel_drops += fresh.drop;
        let old = Credit {
            drop: n.aged.iter().sum(),
            ..n.carry
        };
        let mut credit = Credit {
            drop: fresh.drop + old.drop,
            invalid: fresh.invalid + old.invalid,
            insert_failed: fresh.insert_failed + old.insert_failed,
        };
        let full = [before, now]
            .iter()
            .any(|s| s.max > 0 && s.entries >= s.max);
        // Most certain first: exact claims, then location, then tracked,
        // then the rest.
        deltas.sort_by_key(|((_, _, cls), _, _)| rank(*cls));
        let mut disagreed = false;
        for ((service, proto, cls), dp, df) in deltas {
            let shares = attribute(cls, dp, &mut credit, caps, full, &mut disagreed);
            n.book(service, proto, cls, df, &shares);
        }
        // Old credit is spent first; what is older than the tier allows
        // expires. Tiers that see drops directly spend a rise within one
        // settlement; a correlating tier's verdicts trail it by up to a
        // few sweeps when the machine is busy.
        let spent = (fresh.drop + old.drop) - credit.drop;
        let mut to_spend = spent;
        for bucket in n.aged.iter_mut() {
            let t = (*bucket).min(to_spend);
            *bucket -= t;
            to_spend -= t;
        }
        n.aged.push_back(fresh.drop - to_spend);
        let keep = if caps.drops == crate::tier::DropSight::Correlated {
            CORRELATED_CARRY
        } else {
            1
        };
        let mut expired = 0;
        while n.aged.len() > keep {
            expired += n.aged.pop_front().unwrap_or(0);
        }
        n.unseen += expired;
        n.carry = Credit {
            drop: 0,
            invalid: credit.invalid.min(fresh.invalid),
            insert_failed: credit.insert_failed.min(fresh.insert_failed),
        };
        let active = spent > 0 || fresh.drop > 0;
        n.trust = Some(match (caps.exact_verdicts, disagreed) {
            (false, _) => Trust::Inferred,
            (true, true) => Trust::Disagrees,
            (true, false) if active || n.trust.is_none() => Trust::Exact,
            (true, false) => n.trust.unwrap_or(Trust::Exact),
        });
    }

    /// The cause a flow of this class in this namespace gets, from the
    /// latest settlement that saw the class.
    pub fn label(&self, netns: u64, cls: u8) -> Option<(Cause, &'static str)> {
        self.netns.get(&netns)?.labels.get(&cls).copied()
    }

    /// Forgets namespaces that no longer exist.
    pub fn retain(&mut self, alive: impl Fn(u64) -> bool) {
        self.netns.retain(|ns, _| alive(*ns));
    }

    pub fn groups(&self) -> Vec<DropGroup> {
        let mut v: Vec<DropGroup> = self
            .netns
            .iter()
            .flat_map(|(netns, n)| {
                n.groups
                    .iter()
                    .map(
                        move |(&(service, cause, proto), &(flows, packets))| DropGroup {
                            netns: *netns,
                            service: self.service_name(service),
                            cause,
                            proto,
                            flows,
                            packets,
                        },
                    )
            })
            .collect();
        v.sort_by(|a, b| b.flows.cmp(&a.flows).then(b.packets.cmp(&a.packets)));
        v
    }

    /// Flows the detail budget held back, by namespace and service.
    pub fn held_back(&self) -> Vec<HeldBack> {
        self.netns
            .iter()
            .flat_map(|(netns, n)| {
                n.held_back.iter().map(move |(&service, &flows)| HeldBack {
                    netns: *netns,
                    service: self.service_name(service),
                    flows,
                })
            })
            .collect()
    }

    fn service_name(&self, index: u16) -> Option<String> {
        match index {
            0 => None,
            i => self.names.get(usize::from(i)).cloned(),
        }
    }

    /// Namespaces with any attributed drop.
    pub fn netns_with_drops(&self) -> Vec<u64> {
        self.netns
            .iter()
            .filter(|(_, n)| !n.groups.is_empty())
            .map(|(ns, _)| *ns)
            .collect()
    }

    pub fn agreement(&self) -> Vec<Agreement> {
        self.netns
            .iter()
            .filter(|(_, n)| n.kernel_drops > 0 || n.attributed > 0)
            .map(|(netns, n)| Agreement {
                netns: *netns,
                attributed: n.attributed,
                kernel: n.kernel_drops,
                ratio: (n.kernel_drops > 0).then(|| n.attributed as f64 / n.kernel_drops as f64),
                table_full: n.table_full,
                unseen: n.unseen,
                trust: n.trust.unwrap_or(if self.caps.exact_verdicts {
                    Trust::Exact
                } else {
                    Trust::Inferred
                }),
            })
            .collect()
    }
}

impl NetnsLedger {
    fn book(&mut self, service: u16, proto: Proto, cls: u8, flows: u64, shares: &[Share]) {
        // Flows go with the largest share: a flow has one cause.
        let main = shares.iter().max_by_key(|s| s.packets);
        for s in shares.iter().filter(|s| s.packets > 0) {
            let g = self.groups.entry((service, s.cause, proto)).or_default();
            g.1 += s.packets;
            if s.counted {
                self.attributed += s.packets;
            }
            if s.cause == Cause::TableFull {
                self.table_full += s.packets;
            }
        }
        if let Some(m) = main {
            if flows > 0 {
                self.groups.entry((service, m.cause, proto)).or_default().0 += flows;
            }
            self.labels.insert(cls, (m.cause, m.evidence));
        }
    }
}

/// Order of settlement: exact claims, then location, tracked, untracked.
fn rank(cls: u8) -> u8 {
    if cls & class::ALLOC_FAILED != 0 {
        0
    } else if cls & class::CLASH != 0 {
        1
    } else if cls & class::TRACKER_DROP != 0 {
        2
    } else if cls & class::AT_NFT_CHAIN != 0 {
        3
    } else if cls & class::HAS_CT != 0 {
        4
    } else {
        5
    }
}

fn push(out: &mut Vec<Share>, cause: Cause, evidence: &'static str, packets: u64, counted: bool) {
    if packets > 0 {
        out.push(Share {
            cause,
            evidence,
            packets,
            counted,
        });
    }
}

/// Splits `packets` of one class among causes, consuming credit.
fn attribute(
    cls: u8,
    packets: u64,
    credit: &mut Credit,
    caps: Capabilities,
    full: bool,
    disagreed: &mut bool,
) -> Vec<Share> {
    let mut out = Vec::new();
    let mut left = packets;
    if cls & class::ALLOC_FAILED != 0 {
        let n = Credit::take(&mut credit.drop, left);
        push(&mut out, Cause::TableFull, evidence::ALLOC_FAILED, n, true);
        left -= n;
    } else if cls & class::CLASH != 0 {
        let n = left.min(credit.drop).min(credit.insert_failed);
        credit.drop -= n;
        credit.insert_failed -= n;
        push(&mut out, Cause::Clash, evidence::CONFIRM_FAILED, n, true);
        left -= n;
    } else if cls & class::TRACKER_DROP != 0 {
        let n = left.min(credit.drop).min(credit.invalid);
        credit.drop -= n;
        credit.invalid -= n;
        push(&mut out, Cause::Invalid, evidence::TRACKER_DROPPED, n, true);
        left -= n;
    }
    let exact_claim = cls & (class::ALLOC_FAILED | class::CLASH | class::TRACKER_DROP) != 0;
    if exact_claim && left > 0 {
        // The counters do not back the claim: the tier is not seeing what
        // it thinks it sees.
        *disagreed = true;
    }
    if left == 0 {
        return out;
    }
    if cls & class::AT_NFT_CHAIN != 0 && !exact_claim {
        push(&mut out, Cause::Rule, evidence::FREED_IN_NFT, left, false);
        return out;
    }
    if cls & class::HAS_CT != 0 && !exact_claim {
        let n = left.min(credit.drop).min(credit.insert_failed);
        credit.drop -= n;
        credit.insert_failed -= n;
        push(
            &mut out,
            Cause::Clash,
            evidence::INSERT_FAILED_ROSE,
            n,
            true,
        );
        push(&mut out, Cause::Rule, evidence::HAD_ENTRY, left - n, false);
        return out;
    }
    // Untracked, or an exact claim the counters did not back. An exact
    // tier claims every drop conntrack makes, so `drop` credit left for
    // such a packet means it missed one.
    let inferring_for_exact = caps.exact_verdicts;
    let (full_why, tracker_why) = if inferring_for_exact {
        (evidence::EXACT_DISAGREES, evidence::EXACT_DISAGREES)
    } else {
        (evidence::DROP_ROSE, evidence::DROP_AND_INVALID_ROSE)
    };
    // A tracker drop raises `drop` and `invalid`; a full table only `drop`.
    // In a full table, `drop` credit goes to table_full first.
    let mut inferred = 0;
    // A flow the tc tier saw vanish names table_full only when the table
    // was full in the same interval; `drop` with room is a tracker's.
    let correlated = cls & class::NOT_FORWARDED != 0;
    for table_full_turn in if full { [true, false] } else { [false, true] } {
        if table_full_turn && correlated && !full {
            continue;
        }
        let n = if table_full_turn {
            let n = Credit::take(&mut credit.drop, left);
            push(&mut out, Cause::TableFull, full_why, n, true);
            n
        } else {
            let n = left.min(credit.drop).min(credit.invalid);
            credit.drop -= n;
            credit.invalid -= n;
            push(&mut out, Cause::Invalid, tracker_why, n, true);
            n
        };
        left -= n;
        inferred += n;
    }
    if inferred > 0 && inferring_for_exact {
        *disagreed = true;
    }
    let n = Credit::take(&mut credit.invalid, left);
    push(&mut out, Cause::Invalid, evidence::INVALID_ROSE, n, false);
    left -= n;
    if correlated {
        // Not forwarded, not answered, and no conntrack counter to say
        // why: a rule, a full socket backlog, a route. ctrace cannot tell.
        push(
            &mut out,
            Cause::Unknown,
            evidence::NOT_FORWARDED,
            left,
            false,
        );
        return out;
    }
    let why = if caps.exact_verdicts {
        evidence::NOT_CONNTRACK
    } else {
        evidence::NO_COUNTER_MOVED
    };
    push(&mut out, Cause::Rule, why, left, false);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::DropSight;

    fn caps(exact: bool) -> Capabilities {
        Capabilities {
            exact_verdicts: exact,
            entry_events: exact,
            drop_location: true,
            gc_evictions: exact,
            fd_scoped_cleanup: true,
            needs_btf: true,
            drops: DropSight::Direct,
            passed_flows: false,
        }
    }

    fn stats(entries: u64, drop: u64, invalid: u64, insert_failed: u64) -> Stats {
        Stats {
            entries,
            max: 100,
            drop,
            invalid,
            insert_failed,
            ..Stats::default()
        }
    }

    fn row(service: u16, cls: u8, packets: u64, flows: u64) -> KernelTotal {
        KernelTotal {
            netns: 7,
            service,
            proto: Proto::Tcp,
            class: cls,
            packets,
            flows,
            held_back: 0,
        }
    }

    fn ledger(exact: bool) -> Ledger {
        let mut l = Ledger::new(caps(exact), vec![String::new(), "ssh".into()]);
        l.baseline(7, Some(stats(50, 0, 0, 0)));
        l
    }

    fn got(l: &Ledger) -> BTreeMap<(Option<String>, Cause), (u64, u64)> {
        l.groups()
            .into_iter()
            .map(|g| ((g.service, g.cause), (g.flows, g.packets)))
            .collect()
    }

    #[test]
    fn a_flood_into_a_full_table_is_all_table_full_whatever_the_timing() {
        let mut l = ledger(false);
        // The counter ran ahead of the packets read (still being freed):
        // the credit carries over to the next settlement.
        l.settle(
            7,
            &[row(1, class::AT_HOOK_SLOW, 900, 900)],
            Some(stats(100, 1000, 0, 0)),
        );
        l.settle(
            7,
            &[row(1, class::AT_HOOK_SLOW, 1000, 1000)],
            Some(stats(100, 1000, 0, 0)),
        );
        assert_eq!(
            got(&l),
            BTreeMap::from([((Some("ssh".into()), Cause::TableFull), (1000, 1000))])
        );
        let a = l.agreement()[0];
        assert_eq!((a.attributed, a.kernel, a.ratio), (1000, 1000, Some(1.0)));
        assert_eq!(l.label(7, class::AT_HOOK_SLOW).unwrap().0, Cause::TableFull);
    }

    #[test]
    fn nft_rule_drops_in_a_full_table_stay_rules() {
        let mut l = ledger(false);
        l.settle(
            7,
            &[
                row(1, class::AT_HOOK_SLOW, 10, 10),
                row(0, class::AT_NFT_CHAIN, 5, 5),
            ],
            Some(stats(100, 10, 0, 0)),
        );
        let g = got(&l);
        assert_eq!(g[&(Some("ssh".into()), Cause::TableFull)], (10, 10));
        assert_eq!(g[&(None, Cause::Rule)], (5, 5));
    }

    #[test]
    fn tracker_drops_are_invalid_and_clashes_are_clashes() {
        let mut l = ledger(false);
        // Table with room: drop and invalid rose together.
        l.settle(7, &[row(1, 0, 3, 3)], Some(stats(50, 3, 3, 0)));
        // A tracked packet while insert_failed and drop rose: a clash.
        l.settle(7, &[row(1, class::HAS_CT, 2, 2)], Some(stats(50, 5, 3, 2)));
        let g = got(&l);
        assert_eq!(g[&(Some("ssh".into()), Cause::Invalid)], (3, 3));
        assert_eq!(g[&(Some("ssh".into()), Cause::Clash)], (2, 2));
        assert_eq!(l.agreement()[0].attributed, 5);
    }

    #[test]
    fn untracked_drops_without_counters_are_rules_and_leftover_credit_expires() {
        let mut l = ledger(false);
        l.settle(7, &[row(1, 0, 2, 2)], Some(stats(50, 0, 0, 0)));
        assert_eq!(got(&l)[&(Some("ssh".into()), Cause::Rule)], (2, 2));
        // Drops no packet claims: carried once, then expired as unseen.
        l.settle(7, &[row(1, 0, 2, 2)], Some(stats(50, 4, 0, 0)));
        l.settle(7, &[row(1, 0, 2, 2)], Some(stats(50, 4, 0, 0)));
        let a = l.agreement()[0];
        assert_eq!((a.kernel, a.attributed, a.unseen), (4, 0, 4));
    }

    #[test]
    fn exact_tier_claims_need_no_inference() {
        let mut l = ledger(true);
        l.settle(
            7,
            &[
                row(1, class::ALLOC_FAILED | class::AT_HOOK_SLOW, 4, 2),
                row(1, class::AT_HOOK_SLOW, 1, 1),
            ],
            Some(stats(100, 4, 0, 0)),
        );
        let g = got(&l);
        assert_eq!(g[&(Some("ssh".into()), Cause::TableFull)], (2, 4));
        assert_eq!(g[&(Some("ssh".into()), Cause::Rule)], (1, 1));
        assert_eq!(l.agreement()[0].trust, Trust::Exact);
    }

    #[test]
    fn a_blind_exact_tier_is_caught_and_inferred() {
        let mut l = ledger(true);
        // The allocation probe never fired: conntrack's drops arrive as
        // tracker claims that no `invalid` rise backs.
        l.settle(
            7,
            &[row(1, class::TRACKER_DROP | class::AT_HOOK_SLOW, 6, 6)],
            Some(stats(100, 6, 0, 0)),
        );
        let g = got(&l);
        assert_eq!(g[&(Some("ssh".into()), Cause::TableFull)], (6, 6));
        let a = l.agreement()[0];
        assert_eq!(a.trust, Trust::Disagrees);
        assert_eq!(
            l.label(7, class::TRACKER_DROP | class::AT_HOOK_SLOW)
                .unwrap()
                .1,
            evidence::EXACT_DISAGREES
        );
        // Agreeing again.
        l.settle(
            7,
            &[
                row(1, class::TRACKER_DROP | class::AT_HOOK_SLOW, 6, 6),
                row(1, class::ALLOC_FAILED | class::AT_HOOK_SLOW, 1, 1),
            ],
            Some(stats(100, 7, 0, 0)),
        );
        assert_eq!(l.agreement()[0].trust, Trust::Exact);
    }

    #[test]
    fn first_sight_without_baseline_uses_the_fill_level() {
        let mut l = Ledger::new(caps(false), vec![String::new()]);
        l.settle(
            9,
            &[KernelTotal {
                netns: 9,
                ..row(0, 0, 3, 3)
            }],
            Some(stats(100, 50, 0, 0)),
        );
        assert_eq!(
            l.label(9, 0),
            Some((Cause::TableFull, evidence::COUNT_AT_MAX))
        );
        l.settle(
            10,
            &[KernelTotal {
                netns: 10,
                ..row(0, 0, 3, 3)
            }],
            None,
        );
        assert_eq!(
            l.label(10, 0),
            Some((Cause::Unknown, evidence::NO_COUNTERS))
        );
    }
}
