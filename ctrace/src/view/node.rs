//! The node view: this host's own connection attempts (SYNs sent, answered,
//! retransmitted, failed), per namespace and service, from the TCP
//! tracepoints. It owns its kernel programs, its namespace filter and when
//! to forget a namespace.
use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    connects::{ConnectRow, ConnectView},
    kernel::KernelFacts,
    loader::LoadOptions,
    pods::PodAddresses,
    services::Catalog,
    sink::{Sink, Snapshot},
    table::NetnsFilter,
};

pub struct NodeView {
    view: ConnectView,
    catalog: Catalog,
    /// The pods of this node behind attempts' addresses.
    pods: PodAddresses,
    filter: NetnsFilter,
    /// Namespaces by inode with their /run/netns names, for the filter;
    /// refreshed every tick.
    names: BTreeMap<u64, Option<String>>,
    /// Per namespace: its events at the last tick, and since when they
    /// have not moved.
    activity: HashMap<u64, (u64, Instant)>,
}

impl NodeView {
    /// Rows of a namespace that is gone from every scan and has not moved
    /// for this long are dropped, so that pods coming and going cannot fill
    /// the kernel's totals map. (A namespace held only by a descriptor is
    /// invisible to the scan, hence the grace.)
    const FORGET_IDLE: Duration = Duration::from_secs(300);

    /// Loads and attaches the node view's programs; `filter` picks the
    /// namespaces whose attempts are reported.
    pub fn start(
        facts: &KernelFacts,
        opts: &LoadOptions<'_>,
        catalog: Catalog,
        filter: NetnsFilter,
        host_root: &std::path::Path,
    ) -> anyhow::Result<NodeView> {
        Ok(NodeView {
            view: ConnectView::start(facts, opts)?,
            catalog,
            pods: PodAddresses::new(host_root),
            filter,
            names: crate::netns::discover()
                .map(|all| all.into_iter().map(|i| (i.inode, i.name)).collect())
                .unwrap_or_default(),
            activity: HashMap::new(),
        })
    }

    pub async fn readable(&mut self) -> anyhow::Result<()> {
        self.view.readable().await
    }

    pub fn resync_clock(&mut self) {
        self.view.resync_clock();
    }

    fn wants(&self, inode: u64) -> bool {
        self.filter.matches_inode(inode, &self.names)
    }

    pub fn rows(&self) -> Vec<ConnectRow> {
        let mut rows = self.view.rows();
        rows.retain(|r| self.wants(r.netns));
        rows
    }

    /// Names and reports the failed attempts announced since the last call.
    pub fn drain(&mut self, sinks: &mut [Box<dyn Sink>]) -> anyhow::Result<()> {
        let mut failures = Vec::new();
        self.view.drain(&mut failures);
        for mut f in failures {
            if !self.wants(f.flow.netns) {
                continue;
            }
            f.service = self
                .catalog
                .lookup(f.flow.proto, f.flow.dst.port())
                .map(str::to_string);
            f.pods = self.pods.flow(&f.flow);
            for s in sinks.iter_mut() {
                s.connect_failure(&f).context("writing output")?;
            }
        }
        Ok(())
    }

    /// The view's share of a summary.
    pub fn fill(&self, snap: &mut Snapshot<'_>) -> anyhow::Result<()> {
        snap.connects = self.rows();
        snap.connect_counters = Some(self.view.counters()?);
        Ok(())
    }

    /// Forgets namespaces that are gone from every scan and idle.
    pub fn forget(&mut self) {
        let Ok(alive) = crate::netns::discover() else {
            return;
        };
        self.names = alive.into_iter().map(|i| (i.inode, i.name)).collect();
        let mut events: HashMap<u64, u64> = HashMap::new();
        for r in self.view.rows() {
            *events.entry(r.netns).or_default() +=
                r.attempts + r.syn_retransmits + r.synack_retransmits + r.established + r.failed;
        }
        let now = Instant::now();
        self.activity.retain(|ns, _| events.contains_key(ns));
        let mut gone = Vec::new();
        for (ns, n) in events {
            let a = self.activity.entry(ns).or_insert((n, now));
            if a.0 != n {
                *a = (n, now);
            } else if !self.names.contains_key(&ns) && a.1.elapsed() >= Self::FORGET_IDLE {
                gone.push(ns);
            }
        }
        if !gone.is_empty() {
            log::info!("node view: forgetting idle namespaces that are gone: {gone:?}");
            self.view.forget_netns(&gone);
        }
    }
}
