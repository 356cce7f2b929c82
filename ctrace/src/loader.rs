//! Loading the one eBPF object: this kernel's layout as globals, the
//! service catalog into its map, and each side's or tier's map sizes.
use std::time::Duration;

use anyhow::Context as _;
use aya::{Ebpf, maps::HashMap as BpfHashMap};

use crate::services::KernelIndex;

/// The programs, built by ctrace/build.rs for the target architecture.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ctrace-ebpf"));

pub fn object() -> anyhow::Result<&'static [u8]> {
    if OBJECT.is_empty() {
        return Err(crate::error::CannotRun::NoPrograms.into());
    }
    Ok(OBJECT)
}

/// Forwards the programs' aya-log records to the `log` crate.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// How the tc tier's classifiers are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttachMode {
    Tcx,
    Clsact,
}

impl TcAttachMode {
    pub fn describe(self) -> &'static str {
        match self {
            TcAttachMode::Tcx => "TCX links (removed with ctrace's file descriptors)",
            TcAttachMode::Clsact => {
                "clsact filters named ctrace_tc_* (removed at exit; a killed run's are swept at the next start)"
            }
        }
    }
}

/// What every tier's programs are loaded with.
#[derive(Clone)]
pub struct LoadOptions<'a> {
    pub services: &'a KernelIndex,
    pub kernel_log: bool,
    /// `ctrace_common::test_flags`; 0 outside tests.
    pub test_flags: u32,
    /// Kernel functions to treat as not probeable; empty outside tests.
    pub refused_probes: Vec<String>,
    /// tc tier: interfaces to hook (empty: every non-loopback one).
    pub ifaces: Vec<String>,
    /// tc tier: flows held at once while their fate is open.
    pub pending_flows: u32,
    /// tc tier: how long an opening packet may take to leave or be answered.
    pub judge_window: Duration,
    /// tc tier: TCX or clsact; None to probe.
    pub tc_attach: Option<TcAttachMode>,
    /// The node view's tracepoint and socket layout, when it loads.
    pub node_layout: Option<ctrace_common::connect::Layout>,
    /// New flows each CPU announces per `detail_window` (0: no limit).
    pub detail_budget: u32,
    pub detail_window: Duration,
}

impl<'a> LoadOptions<'a> {
    pub const DEFAULT_PENDING_FLOWS: u32 = 32768;
    pub const DEFAULT_JUDGE_WINDOW: Duration = Duration::from_secs(1);
    /// New flows per CPU per interval: a few thousand records a second on
    /// a small router, a small share of a core to decode and write.
    pub const DEFAULT_DETAIL_BUDGET: u32 = 1000;

    pub fn new(services: &'a KernelIndex) -> Self {
        LoadOptions {
            services,
            kernel_log: false,
            test_flags: 0,
            refused_probes: Vec::new(),
            ifaces: Vec::new(),
            pending_flows: Self::DEFAULT_PENDING_FLOWS,
            judge_window: Self::DEFAULT_JUDGE_WINDOW,
            tc_attach: None,
            node_layout: None,
            detail_budget: Self::DEFAULT_DETAIL_BUDGET,
            detail_window: Duration::from_secs(1),
        }
    }
}

/// Loads the object with this kernel's layout and fills the service map;
/// every tier starts here and then loads and attaches its own programs.
pub fn load(
    layout: &ctrace_common::KernelLayout,
    opts: &LoadOptions<'_>,
) -> anyhow::Result<(Ebpf, Option<KernelLogger>)> {
    load_with(layout, opts, without_node_maps)
}

/// The kernel allocates every map of a loaded object, used or not, and the
/// object holds both sides' maps: each load shrinks the other side's to
/// the smallest sizes the kernel accepts (a page for ring buffers).
pub fn without_node_maps(loader: &mut aya::EbpfLoader<'_>) {
    loader
        .map_max_entries("CONNECTING", 1)
        .map_max_entries("CONNECT_TOTALS", 1)
        .map_max_entries("CONNECT_EVENTS", page_size());
}

/// See [`without_node_maps`]: what the node side leaves of the router's.
pub fn without_router_maps(loader: &mut aya::EbpfLoader<'_>) {
    for name in [
        "FLOWS",
        "TOTALS",
        "EVICTED",
        "DEPTHS",
        "FRAMES",
        "VERDICTS",
        "PENDING",
        "UDP_TUPLES",
    ] {
        loader.map_max_entries(name, 1);
    }
    loader
        .map_max_entries("EVENTS", page_size())
        .map_max_entries("ENTRIES", page_size());
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(n).unwrap_or(4096)
}

/// [`load`], with a tier's own loader settings (map sizes, BTF).
pub fn load_with(
    layout: &ctrace_common::KernelLayout,
    opts: &LoadOptions<'_>,
    tier_settings: impl FnOnce(&mut aya::EbpfLoader<'_>),
) -> anyhow::Result<(Ebpf, Option<KernelLogger>)> {
    let layout = ctrace_common::KernelLayout {
        test_flags: opts.test_flags,
        detail_budget: opts.detail_budget,
        detail_window_ns: u64::try_from(opts.detail_window.as_nanos()).unwrap_or(u64::MAX),
        ..*layout
    };
    let kernel_log = opts.kernel_log;
    let services = u32::try_from(opts.services.ports.len().max(1)).context("service map size")?;
    // aya-log's level gate: 0 silences every log site in the programs.
    let log_level: u8 = if kernel_log { 0xff } else { 0 };
    let mut loader = aya::EbpfLoader::new();
    loader
        .map_max_entries("SERVICES", services)
        .override_global("LAYOUT", &layout, true)
        .override_global("AYA_LOG_LEVEL", &log_level, false);
    if let Some(l) = &opts.node_layout {
        loader.override_global("CONNECT_LAYOUT", l, true);
    }
    tier_settings(&mut loader);
    let mut ebpf = loader.load(object()?).context("loading the eBPF object")?;
    {
        let map = ebpf
            .map_mut("SERVICES")
            .context("map SERVICES missing from the eBPF object")?;
        let mut map: BpfHashMap<_, u32, u16> = BpfHashMap::try_from(map)?;
        for (key, index) in &opts.services.ports {
            map.insert(key, index, 0)
                .context("filling the kernel's service map")?;
        }
    }
    if opts.test_flags & ctrace_common::test_flags::VERIFIER_REJECT != 0 {
        let p: &mut aya::programs::SocketFilter = ebpf
            .program_mut("ctrace_test_rejected")
            .context("program ctrace_test_rejected missing")?
            .try_into()?;
        p.load().context("loading ctrace_test_rejected")?;
    }
    let logger = kernel_logger(&mut ebpf, kernel_log);
    Ok((ebpf, logger))
}

fn kernel_logger(ebpf: &mut Ebpf, enabled: bool) -> Option<KernelLogger> {
    if !enabled {
        return None;
    }
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            log::warn!("kernel-side logging unavailable: {e}");
            None
        }
    }
}
