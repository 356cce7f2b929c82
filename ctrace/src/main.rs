use std::{
    io::IsTerminal as _,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ctrace::{
    cli::{Cli, Command, LabArgs, ProbeArgs, ReportArgs, StatusArgs, WatchArgs},
    exporter,
    kernel::{self, KernelFacts, privileges},
    services::{self, Catalog},
    sink::{
        self, Sink,
        json::JsonSink,
        live::LiveSink,
        plain::PlainSink,
        prometheus::{Exposition, PrometheusSink},
        record::RecordSink,
    },
    strategy,
    table::{NetnsFilter, TableMonitor},
    watch::{Shutdown, WatchConfig, Watcher},
};

use ctrace::error::{EXIT_CANNOT_RUN, EXIT_USAGE};

fn main() -> ExitCode {
    let cli = Cli::parse_args();
    let level = match cli.global.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .target(env_logger::Target::Stderr)
        .init();

    let verifier_log = cli.global.verifier_log;
    let command = cli.command.unwrap_or(Command::Watch(cli.watch));
    #[cfg(not(feature = "lab"))]
    if matches!(command, Command::Lab(_)) {
        return lab_left_out();
    }
    let needs = match &command {
        Command::Lab(_) => privileges::missing_for_lab(),
        // Reading files needs nothing.
        Command::Report(_) => None,
        _ => privileges::missing_for_tracing(),
    };
    if let Some(why) = needs {
        eprintln!("ctrace: {why}");
        return ExitCode::from(EXIT_CANNOT_RUN);
    }
    if matches!(
        command,
        Command::Watch(_) | Command::Probe(_) | Command::Lab(_)
    ) && let Err(e) = kernel::ensure_tracefs_privately()
    {
        log::warn!("tracefs unavailable: {e}");
    }
    raise_memlock_limit();

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ctrace: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Watch(args) => watch(args, verifier_log).await,
            Command::Status(args) => status(args).await,
            Command::Probe(args) => probe(args),
            Command::Lab(args) => lab(args).await,
            Command::Report(args) => report(args),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ctrace: error: {}", ctrace::error::render(&e, verifier_log));
            ExitCode::from(ctrace::error::exit_code(&e))
        }
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones ignore it.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn catalog(args: &WatchArgs) -> anyhow::Result<Catalog> {
    let mut c = Catalog::with_defaults();
    match &args.services_file {
        Some(path) => c.add_file(path)?,
        None => {
            let default = std::path::Path::new(services::DEFAULT_FILE);
            if default.exists() {
                c.add_file(default)?;
            }
        }
    }
    for s in &args.services {
        c.add(s.clone());
    }
    Ok(c)
}

/// Sinks for stdout: NDJSON if asked, the live view on a terminal, plain
/// lines into a pipe.
pub fn stdout_sinks(json: bool) -> Vec<Box<dyn Sink>> {
    let out = std::io::stdout();
    if json {
        vec![Box::new(JsonSink::new(out))]
    } else if out.is_terminal() {
        vec![Box::new(LiveSink::new(out))]
    } else {
        vec![Box::new(PlainSink::new(out))]
    }
}

/// Everything the user gave, checked before anything is loaded: a bad
/// part is a usage error (exit code 2) that names it.
fn validated(args: &WatchArgs) -> anyhow::Result<(Catalog, NetnsFilter)> {
    let catalog = catalog(args)?;
    catalog.kernel_index()?;
    let netns = NetnsFilter::new(args.netns.clone()).resolve()?;
    Ok((catalog, netns))
}

async fn watch(args: WatchArgs, verifier_log: bool) -> anyhow::Result<ExitCode> {
    let (catalog, netns) = match validated(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("ctrace: {e:#}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    // Outputs first: a port in use or an unwritable file is the user's to
    // fix, and must fail before any program is loaded.
    let Outputs {
        sinks: mut outputs,
        endpoint: _endpoint,
    } = match outputs(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ctrace: {e:#}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let facts = KernelFacts::gather();
    let cfg = WatchConfig {
        strategy: args.strategy,
        occupancy_every: (!args.no_occupancy).then_some(args.occupancy_every),
        interval: args.interval,
        catalog,
        netns,
        kernel_log: args.kernel_log,
        max_flows: args.max_flows,
        detail_budget: args.detail_budget,
        ifaces: args.ifaces.clone(),
        pending_flows: args.pending_flows,
        judge_window: args.judge_window,
        tc_attach: args.tc_attach,
        host_root: args.host_root.clone(),
        side: args.side,
        connect_netns: None,
        ctnetlink_events: match (args.ctnetlink_events, args.no_ctnetlink_events) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        announcements_per_s: args.announcements_per_s.0,
        refused_probes: args.test_refuse_probe.clone(),
        test_flags: if args.test_blind_alloc {
            ctrace_common::test_flags::BLIND_ALLOC
        } else {
            0
        } | if args.test_verifier_reject {
            ctrace_common::test_flags::VERIFIER_REJECT
        } else {
            0
        },
    };
    let mut watcher = match Watcher::start(cfg, &facts) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("ctrace: {}", ctrace::error::render(&e, verifier_log));
            return Ok(ExitCode::from(ctrace::error::exit_code(&e)));
        }
    };
    drop(facts);
    kernel::return_freed_memory();
    let mut shutdown = Shutdown::install()?;
    // Programs attached, outputs open: from here on only what tracing
    // still needs (docs/usage.md, "Privileges once tracing"), and nothing regained by exec.
    let keep = kernel::privileges::needed_after_attach(args.textfile.is_some());
    if let Err(e) = kernel::privileges::keep_only(&keep) {
        eprintln!("ctrace: warning: could not drop capabilities: {e}");
    }
    match watcher.strategy() {
        Some(s) => eprintln!("ctrace: tracing with strategy {s} (Ctrl-C to stop)"),
        None => {
            eprintln!("ctrace: node view only: this host's connection attempts (Ctrl-C to stop)")
        }
    }
    let mut sinks = if args.quiet {
        vec![]
    } else {
        stdout_sinks(args.json)
    };
    sinks.append(&mut outputs);
    let stop = async {
        match args.duration {
            Some(d) => tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = shutdown.wait() => {}
            },
            None => shutdown.wait().await,
        }
    };
    watcher.run(&mut sinks, stop).await?;
    Ok(ExitCode::SUCCESS)
}

/// The sinks besides stdout (recording, metrics), and the HTTP endpoint
/// serving the metrics, which serves as long as it is kept.
struct Outputs {
    sinks: Vec<Box<dyn Sink>>,
    endpoint: Option<exporter::Endpoint>,
}

fn outputs(args: &WatchArgs) -> anyhow::Result<Outputs> {
    let mut sinks: Vec<Box<dyn Sink>> = vec![];
    if let Some(path) = &args.record {
        let rec = RecordSink::create(path, args.record_size, args.record_keep)
            .with_context(|| format!("--record {}", path.display()))?;
        eprintln!(
            "ctrace: recording to {} (rotated past {} KiB, {} kept)",
            path.display(),
            args.record_size >> 10,
            args.record_keep
        );
        sinks.push(Box::new(sink::guard::Guarded::new(
            "--record",
            Box::new(rec),
        )));
    }
    let mut endpoint = None;
    let exposition = args.metrics.map(|_| Exposition::default());
    if let (Some(listen), Some(exposition)) = (args.metrics, &exposition) {
        let netns = args
            .metrics_netns
            .as_deref()
            .map(|s| ctrace::netns::open_spec(s).with_context(|| format!("--metrics-netns {s}")))
            .transpose()?;
        let e = exporter::start(
            exporter::Options {
                listen,
                netns,
                notrack: args.metrics_notrack,
            },
            exposition.clone(),
        )?;
        eprintln!(
            "ctrace: metrics at http://{}/metrics{}",
            e.local,
            if args.metrics_notrack {
                " (port exempt from conntrack until exit)"
            } else {
                ""
            }
        );
        endpoint = Some(e);
    }
    if let Some(path) = &args.textfile {
        // Fail now, not at the first interval; an empty file is a valid
        // exposition.
        ctrace::files::replace(path, b"", sink::prometheus::TEXTFILE_MODE)
            .with_context(|| format!("--textfile {}: cannot write", path.display()))?;
    }
    // Two sinks, so that a textfile that cannot be written (guarded,
    // retried) never leaves the endpoint's scrapes with stale numbers.
    if exposition.is_some() {
        sinks.push(Box::new(PrometheusSink::new(exposition, None)));
    }
    if args.textfile.is_some() {
        sinks.push(Box::new(sink::guard::Guarded::new(
            "--textfile",
            Box::new(PrometheusSink::new(None, args.textfile.clone())),
        )));
    }
    Ok(Outputs { sinks, endpoint })
}

async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let mut monitor = TableMonitor::new(NetnsFilter::new(args.netns));
    monitor.discover();
    // Two samples, so that rates mean something.
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    monitor.sample_all();
    let snap = sink::Snapshot {
        tables: monitor.views(&[]),
        netns_left_out: monitor.left_out(),
        is_final: true,
        ..sink::Snapshot::idle(std::time::SystemTime::now(), started.elapsed())
    };
    if args.json {
        // No tracing happened: the snapshot names no strategy.
        let line = ctrace::record::Line::Status(Box::new(sink::json::summary(&snap)));
        sink::json::write_line(&mut std::io::stdout().lock(), &line)?;
    } else {
        if snap.tables.is_empty() {
            println!("no network namespace with active conntrack found");
        }
        for t in &snap.tables {
            println!(
                "netns {}: {}/{} entries ({:.1}%), inserts {:.1}/s, drops {:.1}/s, full in {}; drop={} early_drop={} insert_failed={} invalid={} (via {})",
                sink::netns_label(t),
                t.entries,
                t.max,
                t.fill(),
                t.insert_rate,
                t.drop_rate,
                sink::ttf_text(t.time_to_full),
                t.stats.drop,
                t.stats.early_drop,
                t.stats.insert_failed,
                t.stats.invalid,
                t.source.name()
            );
        }
        for (inode, why) in monitor.unreadable() {
            log::info!("netns {inode}: table not readable: {why}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn probe(args: ProbeArgs) -> anyhow::Result<ExitCode> {
    let facts = KernelFacts::gather();
    let verdicts = strategy::probe(&facts);
    let auto = strategy::select(strategy::Choice::Auto, &verdicts).ok();
    let node = ctrace::connects::probe(&facts).map_err(|e| format!("{e:#}"));
    let devices = strategy::tc::devices_here().map_err(|e| format!("{e:#}"));
    let services = ctrace::cluster_ips::ClusterIps::new(&args.host_root).found();
    if args.json {
        use ctrace::record::{Devices, Line, Probe, Usable};
        let line = Line::Probe(Probe {
            kernel: facts.release.clone(),
            btf: facts.btf.is_ok(),
            auto,
            strategies: verdicts.clone(),
            node_view: match &node {
                Ok(why) => Usable {
                    usable: true,
                    reason: why.clone(),
                },
                Err(why) => Usable {
                    usable: false,
                    reason: why.clone(),
                },
            },
            tc_devices: match &devices {
                Ok(d) => Devices::Listed(d.clone()),
                Err(why) => Devices::Unlisted { error: why.clone() },
            },
            k8s_services: Usable {
                usable: services.usable(),
                reason: services.describe(),
            },
        });
        sink::json::write_line(&mut std::io::stdout().lock(), &line)?;
    } else {
        println!("kernel {}", facts.release);
        println!(
            "BTF: {}",
            match &facts.btf {
                Ok(_) => "yes (/sys/kernel/btf/vmlinux)".to_string(),
                Err(e) => format!("no: {e}"),
            }
        );
        for v in &verdicts {
            let mark = if v.usable { "yes" } else { "no " };
            println!("  {:<11} {mark}  {}", v.strategy.name(), v.reason);
        }
        match auto {
            Some(s) => println!("auto picks: {s}"),
            None => println!("auto picks: nothing works on this kernel"),
        }
        match &node {
            Ok(why) => println!("node view (--side node): yes  {why}"),
            Err(why) => println!("node view (--side node): no   {why}"),
        }
        match &devices {
            Ok(d) => {
                println!("tc tier devices (this namespace):");
                for c in d {
                    let mark = if c.hooked { "hook" } else { "skip" };
                    println!(
                        "  {:<16} {mark}  {}",
                        ctrace::text::terminal(&c.name),
                        ctrace::text::terminal(&c.why)
                    );
                }
            }
            Err(why) => println!("tc tier devices: cannot list: {why}"),
        }
        println!(
            "Kubernetes Service names (dst_service): {}  {}",
            if services.usable() { "yes" } else { "no " },
            ctrace::text::terminal(&services.describe())
        );
    }
    Ok(if auto.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_CANNOT_RUN)
    })
}

fn report(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let (r, rec) = match ctrace::report::Report::read(&args.files) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ctrace: {e:#}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    print!("{}", r.markdown());
    if let Some(path) = &args.html {
        // Replaced, never opened: a link planted at PATH is not followed.
        ctrace::files::replace(path, r.html().as_bytes(), 0o600)
            .with_context(|| format!("--html {}", path.display()))?;
        eprintln!("ctrace: HTML report written to {}", path.display());
    }
    // The report covers what could be read; a broken file still fails.
    Ok(match &rec.broken {
        Some(b) => {
            eprintln!("ctrace: {b}; the report covers what came before");
            ExitCode::FAILURE
        }
        None => ExitCode::SUCCESS,
    })
}

/// What a build without the lab says, before it checks anything else: the
/// lab's absence is the reason, not the privileges it would have needed.
#[cfg(not(feature = "lab"))]
fn lab_left_out() -> ExitCode {
    eprintln!(
        "ctrace: this build leaves the lab out to fit a router's flash; \
         `ctrace lab` is in the x86_64 builds (`cargo xtask build`, the amd64 .deb)"
    );
    ExitCode::from(EXIT_CANNOT_RUN)
}

#[cfg(not(feature = "lab"))]
async fn lab(_: LabArgs) -> anyhow::Result<ExitCode> {
    Ok(lab_left_out())
}

#[cfg(feature = "lab")]
async fn lab(args: LabArgs) -> anyhow::Result<ExitCode> {
    let mut sinks = stdout_sinks(args.json);
    if let Some(path) = &args.record {
        let rec = RecordSink::create(
            path,
            sink::record::DEFAULT_MAX_BYTES,
            sink::record::DEFAULT_KEEP,
        )
        .with_context(|| format!("--record {}", path.display()))?;
        sinks.push(Box::new(sink::guard::Guarded::new(
            "--record",
            Box::new(rec),
        )));
    }
    let report = ctrace::lab::run(&args, sinks).await.context("lab")?;
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
