//! The node side: how this host's own TCP connection attempts end, per
//! service. A router that drops SYNs shows up here as attempts that time
//! out; a storage or etcd error on a node becomes "nvme-tcp: 12 attempts to
//! 10.10.0.5:4420 timed out", the path and not the disk.
//!
//! Its own programs from the same object (`ctrace-ebpf/src/connect.rs`),
//! loaded beside whichever drop tier runs, or alone with `--side node`.
//! Needs raw tracepoints and BTF (struct sock's layout); nothing here
//! depends on conntrack, nor on tracefs.
use std::{collections::BTreeMap, time::Duration, time::SystemTime};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::RawTracePoint,
};
use ctrace_common::connect::{Count, Failure, Layout, TotalKey, counter, what};
use tokio::io::unix::AsyncFd;

use crate::{
    event::{Clock, Flow, Proto},
    kernel::KernelFacts,
    loader::{self, LoadOptions},
};

/// The raw tracepoints, as (tracepoint, program).
const HOOKS: [(&str, &str); 3] = [
    ("inet_sock_set_state", "ctrace_sock_set_state"),
    ("tcp_retransmit_skb", "ctrace_tcp_retransmit_skb"),
    ("tcp_retransmit_synack", "ctrace_tcp_retransmit_synack"),
];

/// `--side`: which views run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Side {
    /// Conntrack drops and table pressure (this host forwards or NATs).
    Router,
    /// This host's own connection attempts.
    Node,
    Both,
}

impl Side {
    pub fn router(self) -> bool {
        self != Side::Node
    }

    pub fn node(self) -> bool {
        self != Side::Router
    }
}

/// How an attempt ended.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub enum Outcome {
    Established,
    Timeout,
    Refused,
    Unreachable,
    Aborted,
}

impl Outcome {
    fn from_wire(w: u8) -> Option<Outcome> {
        Some(match w {
            what::ESTABLISHED => Outcome::Established,
            what::TIMEOUT => Outcome::Timeout,
            what::REFUSED => Outcome::Refused,
            what::UNREACHABLE => Outcome::Unreachable,
            what::ABORTED => Outcome::Aborted,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Established => "established",
            Outcome::Timeout => "timeout",
            Outcome::Refused => "refused",
            Outcome::Unreachable => "unreachable",
            Outcome::Aborted => "aborted",
        }
    }
}

/// A failed attempt, when it ended: the JSON `connect_failure` record.
#[derive(Clone, Debug)]
pub struct ConnectFailure {
    pub time: SystemTime,
    pub flow: Flow,
    pub service: Option<String>,
    /// The pods of this node behind the source and destination addresses.
    pub pods: crate::pods::FlowPods,
    pub outcome: Outcome,
    /// None where the attempt's start was not seen (started before ctrace,
    /// or evicted from the attempt map in a storm).
    pub syn_retransmits: Option<u32>,
    pub elapsed: Option<Duration>,
}

/// One (namespace, service) of the summary's `connects` section.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct ConnectRow {
    pub netns: u64,
    pub service: Option<String>,
    pub proto: Proto,
    /// Sockets that entered SYN_SENT.
    pub attempts: u64,
    pub established: u64,
    /// timeouts + refused + unreachable + aborted.
    pub failed: u64,
    pub timeouts: u64,
    pub refused: u64,
    pub unreachable: u64,
    pub aborted: u64,
    pub syn_retransmits: u64,
    /// Incoming: SYN-ACKs this namespace's listeners retransmitted for
    /// the service's port (clients that did not complete the handshake).
    pub synack_retransmits: u64,
    /// Summed time from SYN_SENT to the failure, over the failures whose
    /// start was seen.
    #[serde(skip)]
    pub failed_elapsed: Duration,
}

impl ConnectRow {
    /// A row with nothing counted yet.
    pub fn new(netns: u64, service: Option<String>, proto: Proto) -> ConnectRow {
        ConnectRow {
            netns,
            service,
            proto,
            attempts: 0,
            established: 0,
            failed: 0,
            timeouts: 0,
            refused: 0,
            unreachable: 0,
            aborted: 0,
            syn_retransmits: 0,
            synack_retransmits: 0,
            failed_elapsed: Duration::ZERO,
        }
    }

    /// The failures, by how they ended.
    pub fn failures(&self) -> [(Outcome, u64); 4] {
        [
            (Outcome::Timeout, self.timeouts),
            (Outcome::Refused, self.refused),
            (Outcome::Unreachable, self.unreachable),
            (Outcome::Aborted, self.aborted),
        ]
    }

    pub fn in_progress(&self) -> u64 {
        self.attempts.saturating_sub(self.established + self.failed)
    }
}

/// Counters of the node side's own losses: never silent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct ConnectCounters {
    /// Failure records the ring buffer had no room for (counted in rows).
    pub lost_events: u64,
    /// Outcomes whose attempt had left the attempt map: counted, without
    /// elapsed time and retransmits.
    pub untracked: u64,
    pub totals_full: u64,
    /// Ring records this build could not decode.
    pub undecodable: u64,
}

/// Where struct sock keeps what the programs read, on this kernel.
pub fn layout(facts: &KernelFacts) -> anyhow::Result<Layout> {
    let btf = facts
        .btf
        .as_ref()
        .map_err(|e| crate::error::CannotRun::NoBtf {
            what: "the node view",
            why: e.to_string(),
        })?;
    btf.require_64bit_pointers("the node view")?;
    // A member the programs load whole: it must be a plain field of the
    // size they read (sk_protocol was a bitfield before 5.6).
    let field = |path: &str, size: u32| -> anyhow::Result<u32> {
        let have = btf.member_size(path)?;
        anyhow::ensure!(
            have == size,
            "{path} is {have} bytes on this kernel, the node view reads {size}"
        );
        btf.member_offset(path)
    };
    let off = |path: &str| btf.member_offset(path);
    Ok(Layout {
        skc_family: field("sock_common.skc_family", 2)?,
        skc_state: field("sock_common.skc_state", 1)?,
        skc_num: field("sock_common.skc_num", 2)?,
        skc_dport: field("sock_common.skc_dport", 2)?,
        skc_daddr: field("sock_common.skc_daddr", 4)?,
        skc_rcv_saddr: field("sock_common.skc_rcv_saddr", 4)?,
        skc_v6_daddr: field("sock_common.skc_v6_daddr", 16)?,
        skc_v6_rcv_saddr: field("sock_common.skc_v6_rcv_saddr", 16)?,
        inet_sport: field("inet_sock.inet_sport", 2)?,
        sk_protocol: field("sock.sk_protocol", 2)?,
        sk_err: field("sock.sk_err", 4)?,
        sk_err_soft: field("sock.sk_err_soft", 4)?,
        sk_net: off("sock.__sk_common")? + off("sock_common.skc_net")? + off("possible_net_t.net")?,
        net_inum: off("net.ns")? + off("ns_common.inum")?,
    })
}

/// Whether the node view can run here, and on what.
pub fn probe(facts: &KernelFacts) -> anyhow::Result<String> {
    let l = layout(facts)?;
    crate::strategy::program_type_loads(
        aya::programs::ProgramType::RawTracePoint,
        "raw tracepoint",
    )?;
    Ok(format!(
        "raw tracepoints inet_sock_set_state, tcp_retransmit_skb, tcp_retransmit_synack; \
         struct sock from BTF (sk_err at {}, sk_protocol at {})",
        l.sk_err, l.sk_protocol
    ))
}

pub struct ConnectView {
    events: AsyncFd<RingBuf<MapData>>,
    totals: PerCpuHashMap<MapData, TotalKey, Count>,
    counters: PerCpuArray<MapData, u64>,
    /// Service index -> name, as the kernel's service map numbers them.
    names: Vec<String>,
    clock: Clock,
    undecodable: u64,
    // Keeps the programs attached; nothing is pinned, so they go with it.
    _ebpf: Ebpf,
}

impl ConnectView {
    pub fn start(facts: &KernelFacts, opts: &LoadOptions<'_>) -> anyhow::Result<ConnectView> {
        let opts = LoadOptions {
            node_layout: Some(layout(facts)?),
            ..opts.clone()
        };
        let (mut ebpf, _logger) = loader::load_with(
            &ctrace_common::KernelLayout::default(),
            &opts,
            loader::without_router_maps,
        )?;
        for (tracepoint, name) in HOOKS {
            let prog: &mut RawTracePoint = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the verifier rejected {name}"))?;
            prog.attach(tracepoint)
                .with_context(|| format!("attaching to raw tracepoint {tracepoint}"))?;
        }
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
        };
        let ring = RingBuf::try_from(take(&mut ebpf, "CONNECT_EVENTS")?)?;
        // SAFETY: the RingBuf owns its fd and lives inside the AsyncFd.
        let events =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .context("registering the connect ring buffer with tokio")?;
        Ok(ConnectView {
            events,
            totals: PerCpuHashMap::try_from(take(&mut ebpf, "CONNECT_TOTALS")?)?,
            counters: PerCpuArray::try_from(take(&mut ebpf, "CONNECT_COUNTERS")?)?,
            names: opts.services.names.clone(),
            clock: Clock::new(),
            undecodable: 0,
            _ebpf: ebpf,
        })
    }

    pub fn resync_clock(&mut self) {
        self.clock = Clock::new();
    }

    pub async fn readable(&mut self) -> anyhow::Result<()> {
        let mut guard = self
            .events
            .readable_mut()
            .await
            .context("waiting on the connect ring buffer")?;
        guard.clear_ready();
        Ok(())
    }

    fn service(&self, index: u16) -> Option<String> {
        (index != 0)
            .then(|| self.names.get(usize::from(index)).cloned())
            .flatten()
    }

    /// Failed attempts since the last drain, not yet labelled with their
    /// service (the pipeline's attribution step does that).
    pub fn drain(&mut self, out: &mut Vec<ConnectFailure>) {
        let ring = self.events.get_mut();
        while let Some(item) = ring.next() {
            match decode(&item, &self.clock) {
                Some(f) => out.push(f),
                None => self.undecodable += 1,
            }
        }
    }

    /// The kernel's totals, summed over CPUs, per (netns, service).
    pub fn rows(&self) -> Vec<ConnectRow> {
        let mut rows: BTreeMap<(u64, u16), ConnectRow> = BTreeMap::new();
        for (k, per_cpu) in self.totals.iter().filter_map(Result::ok) {
            let r = rows
                .entry((u64::from(k.netns), k.service))
                .or_insert_with(|| {
                    ConnectRow::new(
                        u64::from(k.netns),
                        self.service(k.service),
                        Proto::from_number(k.proto),
                    )
                });
            let events: u64 = per_cpu.iter().map(|c| c.events).sum();
            let retransmits: u64 = per_cpu.iter().map(|c| c.syn_retransmits).sum();
            let elapsed = Duration::from_nanos(per_cpu.iter().map(|c| c.elapsed_ns).sum());
            match k.what {
                what::ATTEMPTED => {
                    r.attempts += events;
                    r.syn_retransmits += retransmits;
                }
                what::SYNACK_RETRANSMIT => r.synack_retransmits += events,
                w => {
                    let Some(o) = Outcome::from_wire(w) else {
                        continue;
                    };
                    match o {
                        Outcome::Established => {
                            r.established += events;
                            continue;
                        }
                        Outcome::Timeout => r.timeouts += events,
                        Outcome::Refused => r.refused += events,
                        Outcome::Unreachable => r.unreachable += events,
                        Outcome::Aborted => r.aborted += events,
                    }
                    r.failed += events;
                    r.failed_elapsed += elapsed;
                }
            }
        }
        rows.into_values().collect()
    }

    pub fn counters(&self) -> anyhow::Result<ConnectCounters> {
        let sum = |i: u32| -> anyhow::Result<u64> {
            Ok(self
                .counters
                .get(&i, 0)
                .context("reading the connect counters")?
                .iter()
                .sum())
        };
        Ok(ConnectCounters {
            lost_events: sum(counter::LOST_EVENTS)?,
            untracked: sum(counter::UNTRACKED)?,
            totals_full: sum(counter::TOTALS_FULL)?,
            undecodable: self.undecodable,
        })
    }

    /// Drops the rows of namespaces that are gone, so a churn of
    /// namespaces cannot fill the totals map.
    pub fn forget_netns(&mut self, gone: &[u64]) {
        let keys: Vec<TotalKey> = self
            .totals
            .keys()
            .filter_map(Result::ok)
            .filter(|k| gone.contains(&u64::from(k.netns)))
            .collect();
        for k in keys {
            let _ = self.totals.remove(&k);
        }
    }
}

/// Decodes one ring record; None for a short or unknown one.
fn decode(bytes: &[u8], clock: &Clock) -> Option<ConnectFailure> {
    if bytes.len() < size_of::<Failure>() {
        return None;
    }
    // SAFETY: length checked; Failure is Pod and read_unaligned copes with
    // the slot's alignment.
    let raw: Failure = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let flow = Flow::from_key(&raw.flow)?;
    let outcome = Outcome::from_wire(raw.outcome)?;
    let started = raw.started != 0;
    Some(ConnectFailure {
        time: clock.wall(raw.ts_ns),
        flow,
        service: None,
        pods: Default::default(),
        outcome,
        syn_retransmits: started.then_some(raw.syn_retransmits),
        elapsed: started.then(|| Duration::from_nanos(raw.elapsed_ns)),
    })
}
