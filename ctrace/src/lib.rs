//! ctrace: conntrack pressure tracer.
//!
//! Data flows one way: kernel programs (`strategy`, described by their
//! capabilities in `tier`) -> the event source (`source`) -> decoded events
//! (`event`; the tc tier's verdicts in `judge`) -> settled totals and causes (`ledger`, `cause`, `services`)
//! -> per-flow detail (`aggregate`) -> sinks (`sink`). Table pressure
//! (`table`, its namespaces named by `pods`) is sampled beside it over
//! ctnetlink or procfs. `report` reads what the recording sink wrote.
pub mod aggregate;
pub mod cause;
pub mod cli;
pub mod cluster_ips;
pub mod connects;
pub mod conntrack;
pub mod error;
pub mod event;
pub mod exporter;
pub mod files;
pub mod filling;
pub mod judge;
pub mod kernel;
#[cfg(feature = "lab")]
pub mod lab;
pub mod ledger;
pub mod loader;
pub mod netlink;
pub mod netns;
pub mod occupancy;
pub mod pods;
pub mod readings;
pub mod record;
pub mod report;
pub mod services;
pub mod sink;
pub mod source;
pub mod strategy;
pub mod table;
pub mod text;
pub mod tier;
pub mod view;
pub mod watch;

/// ctrace's memory bound (docs/memory-and-performance.md, "Memory"): a fixed base (binary, parsed
/// BTF at start-up, ring buffers, per-CPU map reads), plus occupancy's
/// compact record per table entry twice over (a periodic re-dump builds the
/// new breakdown beside the old), plus the bounded flow detail.
pub const MEMORY_BASE_MIB: f64 = 24.0;
pub const MEMORY_PER_TABLE_ENTRY_BYTES: f64 = 96.0;
pub const MEMORY_PER_FLOW_BYTES: f64 = 400.0;
/// tc tier: user space's record of each flow the pending map can hold
/// (`--pending-flows`), judged and lingering for retransmissions.
pub const MEMORY_PER_PENDING_FLOW_BYTES: f64 = 144.0;
