//! The watcher: wakes the views and hands what they produce to the sinks.
//!
//! One task drives it. The router view's ring buffers wake it for new
//! drops, the node view's for failed connection attempts, and a timer for
//! the views' ticks and a summary. What each view does with its wake-up is
//! its own business (view/): data flows kernel -> view -> sinks, one way.
use std::{
    future::Future,
    pin::pin,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;

pub use crate::view::WatchConfig;
use crate::{
    connects::{ConnectRow, Side},
    kernel::KernelFacts,
    loader::LoadOptions,
    netns::NetNs,
    services::KernelIndex,
    sink::{Sink, Snapshot},
    tier::Strategy,
    view::{
        node::NodeView,
        router::{RouterOutcome, RouterView},
    },
};

/// How often the wall clock's offset is re-read.
const CLOCK_RESYNC: Duration = Duration::from_secs(60);

/// What a finished run saw, for callers that judge it (the lab, tests).
pub struct Outcome {
    /// None when the router view was off (`--side node`).
    pub strategy: Option<Strategy>,
    /// Empty when the router view was off.
    pub router: RouterOutcome,
    pub connects: Vec<ConnectRow>,
}

pub struct Watcher {
    /// None with `--side node`.
    router: Option<RouterView>,
    /// None with `--side router`, or where the kernel cannot run it.
    node: Option<NodeView>,
    interval: Duration,
    last_clock_sync: Instant,
    started: Instant,
}

/// SIGINT/SIGTERM, caught from the moment this is made: install it before
/// telling anyone we are running, or an early signal kills us without the
/// final summary.
pub struct Shutdown {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Shutdown {
    pub fn install() -> anyhow::Result<Shutdown> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Shutdown {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    pub async fn wait(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

enum Wake {
    Stop,
    Drops(anyhow::Result<()>),
    Connects(anyhow::Result<()>),
    Tick,
}

/// Waits on a view's ring buffer; a view that is off never wakes.
async fn readable<T>(
    view: Option<&mut T>,
    wait: impl AsyncFnOnce(&mut T) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    match view {
        Some(v) => wait(v).await,
        None => std::future::pending().await,
    }
}

impl Watcher {
    /// Starts the views `--side` asks for: the router view first, so that
    /// its start-up experiment (a dropped SYN in a throwaway namespace)
    /// cannot reach the node view as a failed connection of this host.
    pub fn start(cfg: WatchConfig, facts: &KernelFacts) -> anyhow::Result<Watcher> {
        let index: KernelIndex = cfg.catalog.kernel_index()?;
        let opts = LoadOptions {
            kernel_log: cfg.kernel_log,
            test_flags: cfg.test_flags,
            refused_probes: cfg.refused_probes.clone(),
            ifaces: cfg.ifaces.clone(),
            pending_flows: cfg.pending_flows,
            judge_window: cfg.judge_window,
            tc_attach: cfg.tc_attach,
            detail_budget: cfg.detail_budget,
            detail_window: cfg.interval,
            ..LoadOptions::new(&index)
        };
        let side = cfg.side.unwrap_or(Side::Both);
        let router = match side.router() {
            true => Some(RouterView::start(&cfg, facts, &opts)?),
            false => None,
        };
        let node = match side.node() {
            true => Self::start_node(&cfg, facts, &opts)?,
            false => None,
        };
        if router.is_none() {
            log::info!("node view only on kernel {}", facts.release);
        }
        Ok(Watcher {
            router,
            node,
            interval: cfg.interval,
            last_clock_sync: Instant::now(),
            started: Instant::now(),
        })
    }

    /// The node view, or None where it was not asked for by name and this
    /// kernel cannot run it.
    fn start_node(
        cfg: &WatchConfig,
        facts: &KernelFacts,
        opts: &LoadOptions<'_>,
    ) -> anyhow::Result<Option<NodeView>> {
        let filter = cfg
            .connect_netns
            .clone()
            .unwrap_or_else(|| cfg.netns.clone());
        match NodeView::start(facts, opts, cfg.catalog.clone(), filter, &cfg.host_root) {
            Ok(view) => Ok(Some(view)),
            Err(e) if cfg.side.is_none() => {
                log::warn!(
                    "node view left out: {} (the router view runs; --side router \
                     silences this)",
                    crate::error::render(&e, false)
                );
                Ok(None)
            }
            Err(e) => Err(e.context(
                "starting the node view (this host's connection attempts; \
                 --side router runs without it)",
            )),
        }
    }

    /// Watches one more namespace's table in the router view (the lab's
    /// router, which it names).
    pub fn watch_netns(&mut self, ns: &NetNs, name: &str) -> anyhow::Result<()> {
        match self.router.as_mut() {
            Some(r) => r.watch(ns, name),
            None => Ok(()),
        }
    }

    /// Whether this host's connection attempts are traced (`--side`).
    pub fn has_node_view(&self) -> bool {
        self.node.is_some()
    }

    /// The drop tier; None without the router view.
    pub fn strategy(&self) -> Option<Strategy> {
        self.router.as_ref().map(|r| r.tier().strategy)
    }

    /// Runs until `stop` resolves, then drains what is left and reports
    /// once more with `is_final`.
    pub async fn run(
        &mut self,
        sinks: &mut [Box<dyn Sink>],
        stop: impl Future<Output = ()>,
    ) -> anyhow::Result<Outcome> {
        let mut stop = pin!(stop);
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; the start sample was just taken
        loop {
            let wake = tokio::select! {
                _ = &mut stop => Wake::Stop,
                r = readable(self.router.as_mut(), async |v| v.readable().await) => Wake::Drops(r),
                r = readable(self.node.as_mut(), async |v| v.readable().await) => Wake::Connects(r),
                _ = tick.tick() => Wake::Tick,
            };
            match wake {
                Wake::Stop => break,
                Wake::Drops(r) => {
                    r?;
                    if let Some(v) = self.router.as_mut() {
                        v.drain(sinks, false)?;
                    }
                }
                Wake::Connects(r) => {
                    r?;
                    if let Some(v) = self.node.as_mut() {
                        v.drain(sinks)?;
                    }
                }
                Wake::Tick => self.tick(sinks, false)?,
            }
        }
        self.tick(sinks, true)?;
        self.outcome()
    }

    /// Every interval: each view's tick, then one summary of both.
    fn tick(&mut self, sinks: &mut [Box<dyn Sink>], is_final: bool) -> anyhow::Result<()> {
        if self.last_clock_sync.elapsed() >= CLOCK_RESYNC {
            if let Some(v) = self.router.as_mut() {
                v.resync_clock();
            }
            if let Some(v) = self.node.as_mut() {
                v.resync_clock();
            }
            self.last_clock_sync = Instant::now();
        }
        if let Some(v) = self.node.as_mut() {
            v.forget();
            v.drain(sinks)?;
        }
        let counters = match self.router.as_mut() {
            Some(v) => {
                v.forget();
                Some(v.tick(sinks, is_final)?)
            }
            None => None,
        };
        let health = sinks.iter().filter_map(|s| s.health()).collect();
        let mut snap = Snapshot::idle(SystemTime::now(), self.started.elapsed());
        if let (Some(v), Some(c)) = (self.router.as_ref(), counters) {
            v.fill(&mut snap, c);
        }
        if let Some(v) = self.node.as_ref() {
            v.fill(&mut snap)?;
        }
        snap.sink_health = health;
        snap.is_final = is_final;
        for s in sinks.iter_mut() {
            s.summary(&snap).context("writing output")?;
        }
        Ok(())
    }

    /// The state right now, without waiting for a tick.
    pub fn outcome(&self) -> anyhow::Result<Outcome> {
        Ok(Outcome {
            strategy: self.strategy(),
            router: match self.router.as_ref() {
                Some(r) => r.outcome()?,
                None => RouterOutcome::default(),
            },
            connects: self.node.as_ref().map(NodeView::rows).unwrap_or_default(),
        })
    }
}
