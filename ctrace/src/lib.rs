//! ctrace: conntrack pressure tracer.
//!
//! Data flows one way: kernel programs (`strategy`) -> decoded events
//! (`event`) -> cause and service attribution (`cause`, `services`) ->
//! aggregation (`aggregate`) -> sinks (`sink`). Table pressure (`table`)
//! is sampled beside it over ctnetlink.
pub mod aggregate;
pub mod cause;
pub mod cli;
pub mod event;
pub mod kernel;
pub mod lab;
pub mod netlink;
pub mod netns;
pub mod occupancy;
pub mod services;
pub mod sink;
pub mod source;
pub mod strategy;
pub mod table;
pub mod watch;
