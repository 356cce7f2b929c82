//! The tc tier: classifier programs on every watched interface, for kernels
//! that offer no tracing program types and no BTF (stock OpenWrt). Drops are
//! seen by correlation: see ctrace-ebpf/src/tc.rs and `judge.rs`.
//!
//! Attachment, by probing:
//! - TCX links (BPF_TCX_INGRESS/EGRESS) where the kernel accepts them. A
//!   link is a file descriptor: it goes away with ctrace however it exits.
//! - Otherwise clsact filters through netlink, named after the programs
//!   (`ctrace_tc_*`). Those outlive a killed process, so every start first
//!   sweeps away filters of those names, and every exit path ctrace can
//!   catch removes its own.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap},
    programs::{
        LinkOrder, SchedClassifier, TcAttach, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLink},
    },
};

use ctrace_common::tc::DeviceKey;

mod devices;
mod passed;
mod tick;

pub use devices::DeviceChoice;
pub use passed::PassedFlows;
use tick::Tick;

use crate::{
    event::{self, Clock, Flow, KernelEvent, Passed},
    judge::Judge,
    kernel::KernelFacts,
    loader::{self, LoadOptions, TcAttachMode},
    netlink::rtnetlink::{Link, RtSocket},
    netns::{self, NetNs},
    readings::{CorrelationCounts, FlowCount, KernelTotal},
    source::{Correlator, EventSource},
    text,
    tier::{Capabilities, DropSight, Strategy, Tier},
};

/// Program names: also the names of the clsact filters of netlink mode.
const INGRESS: &str = "ctrace_tc_ingress";
const EGRESS: &str = "ctrace_tc_egress";
const INGRESS_L3: &str = "ctrace_tc_ingress_l3";
const EGRESS_L3: &str = "ctrace_tc_egress_l3";
const PROGRAMS: [&str; 4] = [INGRESS, EGRESS, INGRESS_L3, EGRESS_L3];

/// How often interfaces are re-listed, to hook the ones that appeared.
const RESCAN: Duration = Duration::from_secs(2);
/// Rows of the kernel's device map: hooked devices of every watched
/// namespace, plus one group-address row each.
const DEVICE_ROWS: u32 = 8192;
/// Passers' notes for flows another CPU may still hold: each lives for
/// the moments between a SYN and a late answer.
const NOTES: u32 = 4096;

pub const CAPABILITIES: Capabilities = Capabilities {
    exact_verdicts: false,
    entry_events: false,
    drop_location: false,
    gc_evictions: false,
    fd_scoped_cleanup: false,
    needs_btf: false,
    drops: DropSight::Correlated,
    passed_flows: true,
};

pub fn probe(_facts: &KernelFacts) -> anyhow::Result<String> {
    super::program_type_loads(
        aya::programs::ProgramType::SchedClassifier,
        "tc (sched_cls)",
    )?;
    let ns = crate::netlink::rtnetlink::new_netns()
        .context("creating a namespace to probe tc attachment in")?;
    let index = crate::services::KernelIndex::default();
    let (mut ebpf, _) = load(&LoadOptions::new(&index), 64)?;
    let (mode, why) = probe_mode(&mut ebpf, &ns)?;
    Ok(format!(
        "sched_cls programs load without BTF; attaches as {}{why}",
        mode.describe()
    ))
}

/// What the tc tier would hook in ctrace's own namespace, and why (for
/// `probe`: a router's devices live there).
pub fn devices_here() -> anyhow::Result<Vec<DeviceChoice>> {
    let inode = std::fs::metadata("/proc/self/ns/net")
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .context("reading /proc/self/ns/net")?;
    let mut rt = RtSocket::open(None)?;
    let links = rt.links()?;
    let addressed = rt.addressed_links()?;
    Ok(devices::choose(inode, &links, &addressed, &[]))
}

/// Loads the object for the tc tier: no kernel BTF (stock OpenWrt has
/// none, and the programs need none), and the other tiers' big maps
/// shrunk to nothing.
fn load(
    opts: &LoadOptions<'_>,
    pending: u32,
) -> anyhow::Result<(Ebpf, Option<loader::KernelLogger>)> {
    let layout = ctrace_common::KernelLayout {
        tc_window_ns: u64::try_from(opts.judge_window.as_nanos()).unwrap_or(u64::MAX),
        ..Default::default()
    };
    let (mut ebpf, logger) = loader::load_with(&layout, opts, |loader| {
        loader
            // Withheld on purpose: the programs must load on kernels that
            // have none, so any attempt to use it fails the load here too.
            .btf_source(|_| {
                Err(aya::EbpfError::BtfSourceError(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "kernel BTF withheld: the tc tier must not need it",
                )))
            })
            .map_max_entries("PENDING", pending)
            .map_max_entries("UDP_TUPLES", pending)
            .map_max_entries("PASSED_BY", pending)
            .map_max_entries("NOTES", NOTES)
            .map_max_entries("DEVICES", DEVICE_ROWS)
            // Unused here: the smallest sizes the kernel accepts.
            .map_max_entries("FLOWS", 1)
            .map_max_entries("EVICTED", 1)
            .map_max_entries("DEPTHS", 1)
            .map_max_entries("FRAMES", 1)
            .map_max_entries("VERDICTS", 1)
            .map_max_entries("EVENTS", 4096)
            .map_max_entries("ENTRIES", 4096);
        loader::without_node_maps(loader);
    })?;
    for name in PROGRAMS {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("loading tc program {name}"))?;
    }
    Ok((ebpf, logger))
}

/// Attaches to loopback of a throwaway namespace: TCX if the kernel takes
/// it, else clsact.
fn probe_mode(ebpf: &mut Ebpf, ns: &NetNs) -> anyhow::Result<(TcAttachMode, String)> {
    let prog: &mut SchedClassifier = ebpf.program_mut(INGRESS).expect("loaded").try_into()?;
    let tcx = ns.run(|| {
        prog.attach(
            c"lo",
            TcAttach::Tcx {
                attach_type: TcAttachType::Ingress,
                order: LinkOrder::default(),
            },
        )
        .map(|id| prog.detach(id))
    })?;
    match tcx {
        Ok(_) => Ok((TcAttachMode::Tcx, String::new())),
        Err(e) => {
            let clsact = ns.run(|| -> anyhow::Result<()> {
                tc::qdisc_add_clsact(c"lo").context("adding a clsact qdisc")?;
                let id = prog
                    .attach(
                        c"lo",
                        TcAttach::Netlink {
                            parent: TcAttachType::Ingress.into(),
                            options: NlOptions::default(),
                        },
                    )
                    .context("attaching a clsact filter")?;
                prog.detach(id)?;
                Ok(())
            })?;
            clsact.with_context(|| format!("TCX refused ({e}), and clsact too"))?;
            Ok((TcAttachMode::Clsact, format!("; TCX refused: {e}")))
        }
    }
}

pub fn start(_facts: &KernelFacts, opts: &LoadOptions<'_>) -> anyhow::Result<EventSource> {
    let (mut ebpf, logger) = load(opts, opts.pending_flows)?;
    let (mode, why) = match opts.tc_attach {
        Some(TcAttachMode::Clsact) => (TcAttachMode::Clsact, " (--tc-attach clsact)".to_string()),
        wanted => {
            let probe_ns = crate::netlink::rtnetlink::new_netns()
                .context("creating a namespace to probe tc attachment in")?;
            let (mode, why) = probe_mode(&mut ebpf, &probe_ns)?;
            if wanted == Some(TcAttachMode::Tcx) && mode != TcAttachMode::Tcx {
                anyhow::bail!("--tc-attach tcx: this kernel refuses TCX links{why}");
            }
            (mode, why)
        }
    };
    log::info!("tc tier: attaching as {}{why}", mode.describe());
    let mut hooks = Hooks::new(&mut ebpf, mode, opts.ifaces.clone())?;
    let tick = match Tick::start(&mut ebpf, mode) {
        Ok(t) => {
            let (key, slot) = tick::device_row();
            hooks.fixed.insert(key, slot);
            Some(t)
        }
        Err(e) => {
            log::warn!("tc tier: no tick ({e:#}): {NO_TICK}");
            None
        }
    };
    let judge = Judge::new(
        &mut ebpf,
        opts.judge_window,
        opts.pending_flows,
        opts.services.clone(),
    )?;
    let passed = PassedFlows::new(PerCpuHashMap::try_from(
        ebpf.take_map("PASSED_BY")
            .context("map PASSED_BY missing from the eBPF object")?,
    )?);
    let tier = Tier {
        strategy: Strategy::Tc,
        caps: Capabilities {
            fd_scoped_cleanup: mode == TcAttachMode::Tcx,
            ..CAPABILITIES
        },
    };
    EventSource::new(ebpf, tier, logger).map(|s| {
        s.with_correlator(Box::new(Correlation {
            hooks,
            judge,
            passed,
            tick,
        }))
    })
}

/// The tier's verdicts: the hooks tell which namespace a pending flow's
/// interface belongs to, the judge settles what the pending map holds.
struct Correlation {
    hooks: Hooks,
    judge: Judge,
    passed: PassedFlows,
    /// None if it could not start (see NO_TICK).
    tick: Option<Tick>,
}

/// What running without the tick means.
const NO_TICK: &str = "a dropped TCP flow is judged only after its CPU opens another flow";

impl Correlator for Correlation {
    fn attach(&mut self, ebpf: &mut Ebpf, wanted: &dyn Fn(&netns::NetNsInfo) -> bool, now: bool) {
        self.hooks.refresh(ebpf, wanted, now);
    }

    fn window(&self) -> Duration {
        self.judge.window()
    }

    fn period(&self) -> Duration {
        crate::judge::SWEEP_EVERY
    }

    fn judge(&mut self, horizon: u64, clock: &Clock, out: &mut Vec<KernelEvent>, flush: bool) {
        // Every flow a CPU still holds goes into the map the sweep reads.
        if let Some(tick) = &mut self.tick {
            tick.run();
        }
        let hooks = &self.hooks;
        let now = event::monotonic_ns();
        self.judge
            .sweep(now, horizon, clock, |slot| hooks.netns_of(slot), out, flush);
    }

    fn counts(&self) -> CorrelationCounts {
        self.judge.counts()
    }

    fn totals(&self) -> Vec<KernelTotal> {
        self.judge.totals()
    }

    fn flow_counts(&mut self, out: &mut std::collections::HashMap<Flow, FlowCount>) {
        self.judge.flow_counts(out);
    }

    fn forget_netns(&mut self, gone: &[u64]) {
        self.judge.forget_netns(gone);
    }

    fn devices(&self) -> Vec<DeviceChoice> {
        self.hooks.choices()
    }

    fn warnings(&self) -> Vec<String> {
        let mut w = self.hooks.warnings();
        if self.tick.is_none() {
            w.push(format!("no tick: {NO_TICK}"));
        }
        w
    }

    fn passed(&mut self, passed_total: u64) -> Option<(Vec<(u64, Passed)>, u64)> {
        let (flows, missed) = self.passed.read(passed_total);
        let flows = flows
            .into_iter()
            .filter_map(|p| Some((self.hooks.netns_of(p.slot)?, p)))
            .collect();
        Some((flows, missed))
    }

    fn detach(&mut self) {
        // clsact filters outlive the process unless removed, and only from
        // inside their namespace; TCX links just close.
        self.hooks.detach_all();
        self.tick = None;
    }
}

/// One interface's two attachments.
struct Attached {
    name: String,
    index: u32,
    /// Its hardware address, as frames carry it; None without L2.
    mac: Option<[u8; 6]>,
    links: Vec<SchedClassifierLink>,
    /// ctrace added the clsact qdisc: it goes at exit if nothing else
    /// hangs off it by then.
    added_clsact: bool,
}

/// Which interfaces of which namespaces carry the programs, and how the
/// programs tell those namespaces apart.
pub struct Hooks {
    mode: TcAttachMode,
    /// `--iface`: only these names; empty for every device `devices`
    /// picks.
    ifaces: Vec<String>,
    /// netns inode -> ifindex -> links.
    attached: BTreeMap<u64, BTreeMap<u32, Attached>>,
    /// netns inode -> the slot its flows are keyed by in the kernel. Never
    /// reused: a flow of a namespace that went away cannot be taken for a
    /// new one's.
    slots: BTreeMap<u64, u32>,
    next_slot: u32,
    /// The kernel's device map, and what was last written to it.
    devices: BpfHashMap<MapData, DeviceKey, u32>,
    written: BTreeMap<DeviceKey, u32>,
    /// Rows of no watched namespace's: the tick's device.
    fixed: BTreeMap<DeviceKey, u32>,
    /// What was decided for each device, per namespace.
    choices: BTreeMap<u64, Vec<DeviceChoice>>,
    /// Per namespace: what the tc tier cannot see there, in words.
    warnings: BTreeMap<u64, Vec<String>>,
    last_scan: Option<Instant>,
}

impl Hooks {
    fn new(ebpf: &mut Ebpf, mode: TcAttachMode, ifaces: Vec<String>) -> anyhow::Result<Hooks> {
        let map = ebpf
            .take_map("DEVICES")
            .context("map DEVICES missing from the eBPF object")?;
        Ok(Hooks {
            mode,
            ifaces,
            attached: BTreeMap::new(),
            slots: BTreeMap::new(),
            next_slot: 1,
            devices: BpfHashMap::try_from(map)?,
            written: BTreeMap::new(),
            fixed: BTreeMap::new(),
            choices: BTreeMap::new(),
            warnings: BTreeMap::new(),
            last_scan: None,
        })
    }

    /// The namespace a pending flow's slot stands for.
    pub fn netns_of(&self, slot: u32) -> Option<u64> {
        self.slots
            .iter()
            .find(|(_, s)| **s == slot)
            .map(|(ns, _)| *ns)
    }

    pub fn mode(&self) -> TcAttachMode {
        self.mode
    }

    /// Every device of the watched namespaces, hooked or not, and why.
    pub fn choices(&self) -> Vec<DeviceChoice> {
        self.choices.values().flatten().cloned().collect()
    }

    pub fn warnings(&self) -> Vec<String> {
        self.warnings
            .iter()
            .flat_map(|(ns, w)| w.iter().map(move |w| format!("netns {ns}: {w}")))
            .collect()
    }

    /// Hooks the devices `devices::choose` picks in the watched namespaces,
    /// unhooks those it no longer picks (a port added to a bridge, a device
    /// gone), and rewrites the kernel's device map. Runs at most every
    /// RESCAN unless `now`.
    pub fn refresh(
        &mut self,
        ebpf: &mut Ebpf,
        wanted: impl Fn(&netns::NetNsInfo) -> bool,
        now: bool,
    ) {
        if !now && self.last_scan.is_some_and(|at| at.elapsed() < RESCAN) {
            return;
        }
        self.last_scan = Some(Instant::now());
        let found = match netns::discover() {
            Ok(f) => f,
            Err(e) => {
                log::warn!("tc tier: netns discovery failed: {e:#}");
                return;
            }
        };
        let mut alive = BTreeSet::new();
        for info in found.iter().filter(|i| wanted(i)) {
            alive.insert(info.inode);
            if let Err(e) = self.refresh_netns(ebpf, info) {
                log::warn!("tc tier: netns {}: {e:#}", info.inode);
            }
        }
        let gone: Vec<u64> = self
            .attached
            .keys()
            .filter(|ns| !alive.contains(ns))
            .copied()
            .collect();
        for ns in gone {
            // The devices went with the namespace, and their hooks with
            // them; the links only need closing.
            self.attached.remove(&ns);
            self.slots.remove(&ns);
            self.choices.remove(&ns);
            self.warnings.remove(&ns);
        }
        self.write_devices();
    }

    fn refresh_netns(&mut self, ebpf: &mut Ebpf, info: &netns::NetNsInfo) -> anyhow::Result<()> {
        let ns = NetNs::open(&info.path)?;
        let mut rt = RtSocket::open(Some(&ns))?;
        let links = rt.links()?;
        let addressed = rt.addressed_links()?;
        let choices = devices::choose(info.inode, &links, &addressed, &self.ifaces);
        let wanted: Vec<&Link> = links
            .iter()
            .filter(|l| choices.iter().any(|c| c.ifindex == l.index && c.hooked))
            .collect();
        let bridged =
            links.iter().any(|l| l.kind == "bridge") && links.iter().any(|l| l.master != 0);
        self.warnings
            .insert(info.inode, namespace_warnings(&ns, bridged));
        self.choices.insert(info.inode, choices);
        if !self.slots.contains_key(&info.inode) {
            self.slots.insert(info.inode, self.next_slot);
            self.next_slot += 1;
        }
        let first_visit = !self.attached.contains_key(&info.inode);
        let have = self.attached.entry(info.inode).or_default();
        let dropped: Vec<u32> = have
            .iter()
            .filter(|(index, a)| {
                !wanted
                    .iter()
                    .any(|l| l.index == **index && l.name == a.name)
            })
            .map(|(index, _)| *index)
            .collect();
        for index in dropped {
            if let Some(old) = have.remove(&index) {
                log::info!(
                    "tc tier: unhooked {} (ifindex {index}) in netns {}",
                    text::terminal(&old.name),
                    info.inode
                );
                detach_in(&ns, old);
            }
        }
        for l in &wanted {
            if let Some(a) = have.get_mut(&l.index) {
                // OpenWrt sets addresses as it brings devices up.
                a.mac = l.mac.filter(|_| l.arphrd == Link::ARPHRD_ETHER);
            }
        }
        let mut swept = BTreeSet::new();
        if first_visit && self.mode == TcAttachMode::Clsact {
            swept = sweep_stale_filters(&ns, &wanted);
        }
        for link in wanted {
            if have.contains_key(&link.index) {
                continue;
            }
            let l2 = link.arphrd == Link::ARPHRD_ETHER;
            let (ing, eg) = if l2 {
                (INGRESS, EGRESS)
            } else {
                (INGRESS_L3, EGRESS_L3)
            };
            let mut links = Vec::new();
            let mut added_clsact = swept.contains(&link.index);
            for (name, dir) in [(ing, TcAttachType::Ingress), (eg, TcAttachType::Egress)] {
                match attach(
                    ebpf,
                    &ns,
                    self.mode,
                    name,
                    link.index,
                    dir,
                    &mut added_clsact,
                ) {
                    Ok(l) => links.push(l),
                    Err(e) => log::warn!(
                        "tc tier: netns {} {}: attaching {name}: {e:#}",
                        info.inode,
                        text::terminal(&link.name)
                    ),
                }
            }
            if links.len() == 2 {
                log::info!(
                    "tc tier: hooked {} (ifindex {}) in netns {}",
                    text::terminal(&link.name),
                    link.index,
                    info.inode
                );
            }
            let holder = Attached {
                name: link.name.clone(),
                index: link.index,
                mac: link.mac.filter(|_| l2),
                links,
                added_clsact,
            };
            if let Some(old) = have.insert(link.index, holder) {
                detach_in(&ns, old);
            }
        }
        Ok(())
    }

    /// Brings the kernel's device map in line with the hooked devices.
    fn write_devices(&mut self) {
        let mut rows = device_rows(&self.attached, &self.slots);
        rows.extend(&self.fixed);
        for key in self.written.keys() {
            if !rows.contains_key(key) {
                let _ = self.devices.remove(key);
            }
        }
        for (key, slot) in &rows {
            if self.written.get(key) != Some(slot)
                && let Err(e) = self.devices.insert(key, slot, 0)
            {
                log::warn!(
                    "tc tier: device map: ifindex {}: {e}: its flows are counted as on an \
                     unknown device",
                    key.ifindex
                );
            }
        }
        self.written = rows;
    }

    /// Removes every attachment, each inside its own namespace (a clsact
    /// filter is deleted by ifindex, which only means something there).
    pub fn detach_all(&mut self) {
        let attached = std::mem::take(&mut self.attached);
        let Ok(found) = netns::discover() else {
            return;
        };
        for (inode, ifs) in attached {
            match found
                .iter()
                .find(|i| i.inode == inode)
                .map(|i| NetNs::open(&i.path))
            {
                Some(Ok(ns)) => ifs.into_values().for_each(|a| detach_in(&ns, a)),
                // The namespace is gone, and its devices with it.
                _ => drop(ifs),
            }
        }
    }
}

/// The device map's rows: (ifindex, own address) -> slot for each hooked
/// device, and (ifindex, GROUP) for frames to a group address where no
/// other namespace hooks that ifindex. A key two namespaces share (the
/// same ifindex and address, or two L3 devices of one ifindex) is left out:
/// its packets count as on an unknown device rather than in the wrong
/// namespace.
fn device_rows(
    attached: &BTreeMap<u64, BTreeMap<u32, Attached>>,
    slots: &BTreeMap<u64, u32>,
) -> BTreeMap<DeviceKey, u32> {
    let mut rows: BTreeMap<DeviceKey, Option<u32>> = BTreeMap::new();
    let mut put = |key: DeviceKey, slot: u32| {
        rows.entry(key)
            .and_modify(|s| {
                if *s != Some(slot) {
                    *s = None;
                }
            })
            .or_insert(Some(slot));
    };
    for (ns, ifs) in attached {
        let Some(&slot) = slots.get(ns) else {
            continue;
        };
        for a in ifs.values() {
            let key = |mac| DeviceKey {
                ifindex: a.index,
                mac,
                _pad: [0; 2],
            };
            put(key(a.mac.unwrap_or([0; 6])), slot);
            if a.mac.is_some() {
                put(key(DeviceKey::GROUP), slot);
            }
        }
    }
    rows.into_iter()
        .filter_map(|(k, s)| s.map(|s| (k, s)))
        .collect()
}

/// What the tc tier cannot see in a namespace. With br_netfilter on,
/// bridged frames meet conntrack at the bridge ports, before the bridge
/// device where ctrace holds them: a flow the full table drops there never
/// reaches ctrace.
fn namespace_warnings(ns: &NetNs, bridged: bool) -> Vec<String> {
    if !bridged {
        return Vec::new();
    }
    let on = ns
        .run(|| {
            ["iptables", "ip6tables"]
                .into_iter()
                .filter(|t| {
                    std::fs::read_to_string(format!("/proc/sys/net/bridge/bridge-nf-call-{t}"))
                        .is_ok_and(|v| v.trim() == "1")
                })
                .map(|t| format!("net.bridge.bridge-nf-call-{t}=1"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    if on.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "br_netfilter conntracks bridged frames at the bridge ports ({}): flows a full table \
         drops there are not seen by the tc tier, which holds them on the bridge",
        on.join(", ")
    )]
}

fn attach(
    ebpf: &mut Ebpf,
    ns: &NetNs,
    mode: TcAttachMode,
    program: &str,
    ifindex: u32,
    dir: TcAttachType,
    added_clsact: &mut bool,
) -> anyhow::Result<SchedClassifierLink> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(program)
        .context("program missing")?
        .try_into()?;
    ns.run(|| -> anyhow::Result<SchedClassifierLink> {
        let how = match mode {
            TcAttachMode::Tcx => TcAttach::Tcx {
                attach_type: dir,
                // First, so a program before us that ends the packet's
                // journey (a drop, a redirect) cannot hide it from us.
                order: LinkOrder::first(),
            },
            TcAttachMode::Clsact => {
                match tc::qdisc_add_clsact(ifindex) {
                    Ok(()) => *added_clsact = true,
                    Err(e) if is_exists(&e) => {}
                    Err(e) => return Err(e).context("adding a clsact qdisc"),
                }
                TcAttach::Netlink {
                    parent: dir.into(),
                    options: NlOptions::default(),
                }
            }
        };
        let id = prog.attach(ifindex, how)?;
        Ok(prog.take_link(id)?)
    })?
}

fn is_exists(e: &tc::TcError) -> bool {
    match e {
        tc::TcError::AlreadyAttached => true,
        tc::TcError::NetlinkError(e) => e.raw_os_error() == Some(libc::EEXIST),
        tc::TcError::IoError(e) => e.raw_os_error() == Some(libc::EEXIST),
        _ => false,
    }
}

/// Drops an interface's links from a thread inside their namespace, then
/// the clsact qdisc ctrace added, unless someone else's filters use it.
fn detach_in(ns: &NetNs, a: Attached) {
    let Attached {
        name,
        index,
        links,
        added_clsact,
        ..
    } = a;
    // Interface names are anyone's who can make a namespace.
    let name = text::terminal(&name);
    if let Err(e) = ns.run(move || drop(links)) {
        log::warn!(
            "tc tier: detaching from {name} in netns {}: {e:#}",
            ns.inode()
        );
        return;
    }
    if !added_clsact {
        return;
    }
    let removed = RtSocket::open(Some(ns)).and_then(|mut rt| match rt.clsact_filters(index)? {
        0 => rt.delete_clsact(index).map(|()| true),
        _ => Ok(false),
    });
    match removed {
        Ok(true) => {}
        Ok(false) => {
            log::info!("tc tier: leaving the clsact qdisc on {name}: other filters use it now")
        }
        Err(e) => log::warn!("tc tier: {name}: {e:#}"),
    }
}

/// A run that was killed leaves its clsact filters behind: remove every
/// filter with one of ctrace's program names before attaching.
/// Returns the links it removed filters from: their clsact qdisc was most
/// likely the killed run's, and goes at exit too if nothing else uses it.
fn sweep_stale_filters(ns: &NetNs, links: &[&Link]) -> BTreeSet<u32> {
    let swept = ns.run(|| {
        let mut n = 0;
        let mut on = BTreeSet::new();
        for link in links {
            for dir in [TcAttachType::Ingress, TcAttachType::Egress] {
                for name in PROGRAMS {
                    if tc::qdisc_detach_program(link.index, dir.into(), name).is_ok() {
                        n += 1;
                        on.insert(link.index);
                    }
                }
            }
        }
        (n, on)
    });
    match swept {
        Ok((0, _)) => BTreeSet::new(),
        Ok((n, on)) => {
            log::warn!(
                "tc tier: removed {n} ctrace filter(s) a previous run left in netns {}",
                ns.inode()
            );
            on
        }
        Err(e) => {
            log::warn!("tc tier: sweeping old filters: {e:#}");
            BTreeSet::new()
        }
    }
}

/// ctrace's programs still attached by TCX in `ns`, as "iface direction
/// program" (tests: a clean exit leaves none).
pub fn leftover_tcx(ns: &NetNs) -> anyhow::Result<Vec<String>> {
    let links = RtSocket::open(Some(ns))?.links()?;
    ns.run(|| {
        let mut found = Vec::new();
        for link in &links {
            for dir in [TcAttachType::Ingress, TcAttachType::Egress] {
                let Ok((_, progs)) = SchedClassifier::query_tcx(link.index, dir) else {
                    continue;
                };
                for p in progs {
                    let name = p.name_as_str().unwrap_or_default().to_string();
                    if name.starts_with("ctrace_tc") {
                        found.push(format!("{} {dir:?} {name}", link.name));
                    }
                }
            }
        }
        found
    })
}
