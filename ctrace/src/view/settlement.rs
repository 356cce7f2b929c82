//! When the router view settles drained drops against conntrack's counters,
//! and against which sample of them. Chosen once from how the tier sees
//! drops ([`DropSight`]): the rest of the view never asks.
//!
//! A tier that sees a drop where the packet is freed settles against the
//! counters read right after the kernel's totals (see ledger.rs). A tier
//! that judges drops by correlation (a new flow that never left) gives its
//! verdicts a window after the drop, so they must meet the counters of that
//! time, and only the verdicts judged against the same samples.
use std::{collections::HashMap, time::Duration};

use crate::{
    conntrack::Stats,
    event::KernelEvent,
    source::EventSource,
    table::{Sample, TableMonitor},
    tier::DropSight,
};

/// Whether to settle after a drain, and over which namespaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub settle: bool,
    /// Every watched namespace, not only those whose totals moved.
    pub all: bool,
}

pub enum Settlement {
    Direct,
    Correlated(Correlated),
}

/// What only correlation needs.
pub struct Correlated {
    /// How long after a drop its verdict comes.
    delay: Duration,
    /// Per namespace, the counter sample the latest sweep's verdicts
    /// settle against.
    samples: HashMap<u64, Sample>,
    /// The final sweep judged everything pending: settle against now.
    flushed: bool,
}

impl Settlement {
    pub fn for_source(source: &EventSource) -> Settlement {
        match source.tier().caps.drops {
            DropSight::Direct => Settlement::Direct,
            DropSight::Correlated => Settlement::Correlated(Correlated {
                delay: source.verdict_delay(),
                samples: HashMap::new(),
                flushed: false,
            }),
        }
    }

    /// After a drain into `events`: a correlating tier whose verdicts are
    /// due sweeps them into `events` now, and says so.
    pub fn sweep_if_due(
        &mut self,
        source: &mut EventSource,
        monitor: &mut TableMonitor,
        events: &mut Vec<KernelEvent>,
    ) -> bool {
        match self {
            Settlement::Correlated(c) if source.sweep_due() => {
                c.sweep(source, monitor, events);
                true
            }
            _ => false,
        }
    }

    /// Whether to settle now: `swept` is what [`Self::sweep_if_due`] said,
    /// `pending` that drops wait for a settlement, `due` that the last one
    /// is old enough, `force` that the caller needs one (a tick).
    pub fn decide(&self, swept: bool, pending: bool, due: bool, force: bool) -> Decision {
        match self {
            Settlement::Direct => Decision {
                settle: force || (due && pending),
                all: force,
            },
            // Only right after a sweep: credit carried over one settlement
            // must meet the packets of the next sweep, not an empty tick.
            Settlement::Correlated(_) => Decision {
                settle: swept,
                all: true,
            },
        }
    }

    /// The counters namespace `ns` settles against: `Some(None)` when they
    /// cannot be read, `None` when its verdicts must wait (no sample old
    /// enough yet).
    pub fn counters(&self, ns: u64, monitor: &mut TableMonitor) -> Option<Option<Stats>> {
        match self {
            Settlement::Correlated(c) if !c.flushed => c.samples.get(&ns).map(|s| Some(s.stats)),
            _ => Some(monitor.sample(ns)),
        }
    }

    /// At exit: a correlating tier judges everything still pending, into
    /// `events`, and later settlements read the counters of now.
    pub fn finish(&mut self, source: &mut EventSource, events: &mut Vec<KernelEvent>) {
        if let Settlement::Correlated(c) = self {
            c.flushed = true;
            source.sweep(u64::MAX, events, true);
        }
    }
}

impl Correlated {
    /// Each namespace settles against its newest counter sample at least a
    /// window old, and the sweep judges only what happened before the
    /// oldest of those samples (less a guard for the ingress hook running
    /// just before conntrack counts): a packet is never counted before the
    /// counter rise it caused, and a rise counted early waits one
    /// settlement for its packet.
    fn sweep(
        &mut self,
        source: &mut EventSource,
        monitor: &mut TableMonitor,
        events: &mut Vec<KernelEvent>,
    ) {
        const GUARD_NS: u64 = 20_000_000;
        monitor.sample_all();
        let now = crate::event::monotonic_ns();
        let delay = u64::try_from(self.delay.as_nanos()).unwrap_or(u64::MAX);
        let target = now.saturating_sub(delay);
        self.samples = monitor
            .inodes()
            .into_iter()
            .filter_map(|ns| Some((ns, monitor.sampled_by(ns, target)?)))
            .collect();
        let horizon = self
            .samples
            .values()
            .map(|s| s.mono_ns)
            .min()
            .unwrap_or(target)
            .saturating_sub(GUARD_NS);
        source.sweep(horizon, events, false);
    }
}
