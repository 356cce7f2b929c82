//! The two views a watch runs, each owning its state and its steps
//! (`start`, `drain`, `tick`, `fill`, `forget`):
//! - [`router::RouterView`]: packets conntrack dropped, and the tables;
//! - [`node::NodeView`]: this host's own connection attempts.
//!
//! The watcher (watch.rs) only wakes them and hands their output to sinks.
pub mod node;
pub mod router;
pub mod settlement;

use std::time::Duration;

use crate::{connects::Side, services::Catalog, strategy::Choice, table::NetnsFilter};

pub struct WatchConfig {
    pub strategy: Choice,
    /// How often to re-dump tables for occupancy when no event tier keeps
    /// it current; None turns occupancy off.
    pub occupancy_every: Option<Duration>,
    pub interval: Duration,
    pub catalog: Catalog,
    pub netns: NetnsFilter,
    pub kernel_log: bool,
    /// Flows kept in detail.
    pub max_flows: usize,
    /// New flows each CPU announces per `interval` (0: no limit).
    pub detail_budget: u32,
    /// `ctrace_common::test_flags`.
    pub test_flags: u32,
    /// Kernel functions to treat as not probeable (tests).
    pub refused_probes: Vec<String>,
    /// tc tier: `--iface`, `--pending-flows`, `--judge-window`.
    pub ifaces: Vec<String>,
    pub pending_flows: u32,
    pub judge_window: Duration,
    pub tc_attach: Option<crate::loader::TcAttachMode>,
    /// Where /proc and /var/log/pods are read to name namespaces.
    pub host_root: std::path::PathBuf,
    /// `--side`: the router view (drops, tables), the node view (this
    /// host's connection attempts), or both. None: both, the node view
    /// only where this kernel can run it.
    pub side: Option<Side>,
    /// Namespaces whose connection attempts the node view reports; None:
    /// the same as `netns`.
    pub connect_netns: Option<NetnsFilter>,
    /// Whether ctnetlink's NEW and DESTROY announcements are subscribed to
    /// (they cost the kernel a message per entry made and ended). None:
    /// unless the tier counts who fills the table itself (passed flows);
    /// `--ctnetlink-events` and `--no-ctnetlink-events` set it.
    pub ctnetlink_events: Option<bool>,
    /// Announcements per second and namespace the kernel is let build
    /// (`--announcements-per-s`); None: every one.
    pub announcements_per_s: Option<u32>,
}
