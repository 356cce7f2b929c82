//! The command line.
use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{services::ServiceSpec, strategy::Choice};

#[derive(Parser, Debug)]
#[command(
    name = "ctrace",
    version,
    about = "Catch conntrack table-full drops live and say whose connections they were.",
    long_about = "ctrace watches the kernel's connection-tracking (nf_conntrack) tables. When a table \
fills, the kernel silently drops every packet that would start a new flow: SSH logins, etcd peers, \
NVMe-over-TCP replicas. ctrace catches each dropped flow as it happens, says why it was dropped \
(table_full, rule, invalid), names the service it belonged to, and shows how full every \
namespace's table is and how fast it fills.\n\nWithout a subcommand, ctrace runs `watch`.",
    after_help = "Examples:\n  ctrace                          live view of all namespaces\n  ctrace watch --json --duration 60\n  ctrace --service metrics=tcp/9100 --netns 4026531840\n  ctrace probe                    which hooks this kernel allows\n  ctrace lab                      reproduce a full table safely and watch it\n  ctrace -q --record --metrics 0.0.0.0:9465 --metrics-notrack\n                                  as a service: record, serve metrics even when full\n  ctrace report /var/run/ctrace/recording.ndjson --html report.html\n\nExit status: 0 when done; 1 when tracing failed after it started; 2 for bad\ninput (the message names it); 3 when this host cannot run it: missing privileges\nor kernel features, a program the verifier rejected (the message says why)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub watch: WatchArgs,
    #[command(flatten)]
    pub global: GlobalArgs,
}

#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// More log output on stderr (-v: info, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// When the kernel's verifier rejects a program, print its whole log
    /// (by default the last 20 lines, where its verdict is).
    #[arg(long, global = true)]
    pub verifier_log: bool,
}

impl Cli {
    /// Parses the command line, or exits as clap does. Watch options
    /// before a subcommand are refused (they would be silently ignored);
    /// global ones (`-v`, `--verifier-log`) go anywhere.
    pub fn parse_args() -> Cli {
        Self::parse_from_args(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    pub fn parse_from_args(
        args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
    ) -> Result<Cli, clap::Error> {
        use clap::{CommandFactory as _, FromArgMatches as _, parser::ValueSource};
        let mut cmd = Cli::command();
        let m = cmd.try_get_matches_from_mut(args)?;
        if let Some((sub, _)) = m.subcommand() {
            let watch_only = WatchArgs::augment_args(clap::Command::new("watch"));
            let misplaced: Vec<String> = watch_only
                .get_arguments()
                .filter(|a| m.value_source(a.get_id().as_str()) == Some(ValueSource::CommandLine))
                .map(|a| match a.get_long() {
                    Some(l) => format!("--{l}"),
                    None => a.get_id().to_string(),
                })
                .collect();
            if !misplaced.is_empty() {
                return Err(cmd.error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!(
                        "{} before `{sub}`: watch options go without a subcommand or after `watch`",
                        misplaced.join(", ")
                    ),
                ));
            }
        }
        Cli::from_arg_matches(&m).map_err(|e| e.format(&mut cmd))
    }
}

// Parsed once per run: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Trace dropped flows and table pressure live (the default).
    Watch(WatchArgs),
    /// One snapshot of every namespace's conntrack table, then exit.
    Status(StatusArgs),
    /// Report which hook strategies this kernel supports, and why not.
    Probe(ProbeArgs),
    /// Reproduce INC-0004 in throwaway namespaces and trace it.
    Lab(LabArgs),
    /// Post-incident report (Markdown; --html too) from recordings, with
    /// sizing and tuning advice as commands.
    Report(ReportArgs),
}

#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    /// Stop after this long and print a final summary (e.g. 30, 30s, 5m).
    /// Without it, run until Ctrl-C or SIGTERM, which also print the summary.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// How often to sample tables and refresh the view.
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// NDJSON on stdout (logs stay on stderr); schema in docs/output.md.
    #[arg(long)]
    pub json: bool,
    /// Name a service: NAME=PROTO/PORT[-PORT][,...], PROTO tcp, udp, sctp
    /// or tcp+udp. Repeatable; overrides built-in names on overlap.
    #[arg(long = "service", value_name = "SPEC")]
    pub services: Vec<ServiceSpec>,
    /// A file of service specs, one per line (# comments). Default:
    /// /etc/ctrace/services.conf when it exists.
    #[arg(long, value_name = "FILE")]
    pub services_file: Option<PathBuf>,
    /// Hook strategy: auto, fexit, kprobe, tracepoint or tc.
    #[arg(long, default_value = "auto")]
    pub strategy: Choice,
    /// Which views run: `router` (conntrack drops and table pressure, for a
    /// host that forwards or NATs), `node` (this host's own TCP connection
    /// attempts per service: timeouts, refusals, SYN retransmits; needs no
    /// conntrack), or both. Default: both, leaving the node view out (with
    /// a note) on a kernel that cannot run it, such as stock OpenWrt's.
    #[arg(long, value_enum, value_name = "SIDE")]
    pub side: Option<crate::connects::Side>,
    /// Only these network namespaces: inode number, /run/netns name or path.
    /// Repeatable.
    #[arg(long = "netns", value_name = "NETNS")]
    pub netns: Vec<String>,
    /// Forward the eBPF programs' own log (aya-log) to stderr.
    #[arg(long)]
    pub kernel_log: bool,
    /// How often to re-read every table to show who occupies it, where no
    /// kprobe tier keeps that current from insert/delete events. The
    /// kernel formats every entry of every dump (about 0.4 s of a core for
    /// 200,000 entries), so a re-dump also waits 100 times as long as the
    /// last one took: at most 1% of a core, whatever the table's size. The
    /// live view and JSON say how old the breakdown is (dump_age_s).
    #[arg(long, default_value = "10s", value_parser = parse_interval, value_name = "DURATION")]
    pub occupancy_every: Duration,
    /// Do not break tables down by occupier at all.
    #[arg(long)]
    pub no_occupancy: bool,
    /// Keep at most this many dropped flows in detail (top flows, drop
    /// records); the least recently seen are forgotten first. Per-service
    /// totals are kept in the kernel and never lose a packet to this cap.
    #[arg(long, default_value_t = crate::aggregate::DEFAULT_MAX_FLOWS, value_name = "N",
          value_parser = parse_max_flows)]
    pub max_flows: usize,
    /// New dropped flows each CPU announces per interval, for the drop
    /// records and top flows (0: no limit). In a storm of distinct flows
    /// the rest are counted per service as held back, so ctrace costs a
    /// bounded share of a core; per-service totals stay exact either way.
    #[arg(long, default_value_t = crate::loader::LoadOptions::DEFAULT_DETAIL_BUDGET,
          value_name = "N")]
    pub detail_budget: u32,
    /// tc tier: hook only these interfaces (repeatable); default: every
    /// non-loopback interface of each watched namespace, including ones
    /// that appear later.
    #[arg(long = "iface", value_name = "NAME")]
    pub ifaces: Vec<String>,
    /// tc tier: how many flows may wait at once for their opening packet to
    /// leave or be answered. Each takes about 150 bytes of kernel memory;
    /// opening packets that find it full are counted as not judged.
    #[arg(long, default_value_t = crate::loader::LoadOptions::DEFAULT_PENDING_FLOWS,
          value_name = "N", value_parser = parse_pending_flows)]
    pub pending_flows: u32,
    /// tc tier: how long an opening packet may take to leave the host or be
    /// answered before it counts as dropped here.
    #[arg(long, default_value = "1s", value_parser = parse_judge_window, value_name = "DURATION")]
    pub judge_window: Duration,
    /// tc tier: attach by TCX links or clsact filters instead of probing
    /// (TCX where the kernel takes it, else clsact).
    #[arg(long, value_enum, value_name = "MODE")]
    pub tc_attach: Option<crate::loader::TcAttachMode>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics: PORT alone
    /// listens on loopback only. node_exporter's conntrack gauges per
    /// namespace, plus drops by service and cause, occupancy, evictions,
    /// the self-check, lost events and time to full.
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = crate::exporter::parse_listen)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Exempt connections to this host's metrics port from conntrack while
    /// ctrace runs (an nf_tables table `inet ctrace_notrack_PORT` at raw
    /// priority, removed at exit), so that scrapes still connect when the
    /// table is full. Forwarded traffic to that port stays tracked.
    #[arg(long, requires = "metrics")]
    pub metrics_notrack: bool,
    /// Listen for scrapes inside this network namespace (name, inode or
    /// path) instead of ctrace's own.
    #[arg(long, requires = "metrics", value_name = "NETNS")]
    pub metrics_netns: Option<String>,
    /// Also write the metrics to FILE every interval (atomically), for
    /// node_exporter's textfile collector: point it at a FILE ending in
    /// .prom in its --collector.textfile.directory.
    #[arg(long, value_name = "FILE")]
    pub textfile: Option<PathBuf>,
    /// Record drops and summaries (NDJSON) for `ctrace report`; FILE
    /// defaults to /var/run/ctrace/recording.ndjson (tmpfs on routers, whose
    /// flash wears). Flushed every interval; rotated by --record-size.
    #[arg(long, value_name = "FILE", num_args = 0..=1,
          default_missing_value = crate::sink::record::DEFAULT_PATH)]
    pub record: Option<PathBuf>,
    /// Rotate the recording past this size (e.g. 16M, 512K).
    #[arg(long, value_name = "SIZE", default_value = "16M", value_parser = parse_size)]
    pub record_size: u64,
    /// Rotated recordings kept beside the current one (FILE.1 …).
    #[arg(long, value_name = "N", default_value_t = crate::sink::record::DEFAULT_KEEP,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    pub record_keep: u32,
    /// Print nothing on stdout (a service: record and serve metrics).
    #[arg(long, short = 'q', conflicts_with = "json")]
    pub quiet: bool,
    /// Read /proc and /var/log/pods under DIR to name namespaces by their
    /// processes and Kubernetes pods (a container with the host's mounted
    /// there).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub host_root: PathBuf,
    /// Test only: make the exact tier ignore conntrack's allocation
    /// failures, as a probe that attached but never fires would, to prove
    /// the self-check catches it.
    #[arg(long, hide = true)]
    pub test_blind_alloc: bool,
    /// Do not subscribe to ctnetlink's NEW and DESTROY announcements. On
    /// the tracepoint tier they feed "filling now" and keep occupancy
    /// current between dumps, but the kernel then builds one message per
    /// new and per ended entry, in the packet's path. Without them, the
    /// tracepoint tier shows no filling and keeps occupancy by periodic
    /// dumps alone. Off by default on the tc tier (see --ctnetlink-events).
    #[arg(long, conflicts_with = "ctnetlink_events")]
    pub no_ctnetlink_events: bool,
    /// Subscribe to ctnetlink's announcements on the tc tier too. By
    /// default it counts who fills the table from the flows its own
    /// programs saw pass, which costs no message per entry; the
    /// announcements add entries the host made itself or that came in on
    /// devices it does not hook, and keep occupancy between dumps while
    /// they come slower than --announcements-per-s.
    #[arg(long)]
    pub ctnetlink_events: bool,
    /// Announcements per second and namespace that ctnetlink is let build
    /// for ctrace, or `unlimited`. The kernel builds one for every entry
    /// made and ended while anyone listens, in the packet's path; above
    /// this rate ctrace listens for the first part of each interval only
    /// and scales the rates from that sample (the summary's
    /// `filling_listened` says how much), and occupancy comes from dumps
    /// alone meanwhile.
    #[arg(long, default_value = "2000", value_parser = parse_budget, value_name = "N|unlimited")]
    pub announcements_per_s: Budget,
    /// Test only: also load a program no verifier accepts, to prove what a
    /// rejection prints and which exit code it ends with.
    #[arg(long, hide = true)]
    pub test_verifier_reject: bool,
    /// Test only: treat FUNCTION as not probeable on this kernel, as if
    /// inlined or cloned, to prove what ctrace does without its probe.
    #[arg(long, hide = true, value_name = "FUNCTION")]
    pub test_refuse_probe: Vec<String>,
}

/// `16M`, `512K`, `1G` or a byte count.
fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    match num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult)) {
        Some(n) if n >= 4096 => Ok(n),
        _ => Err(format!(
            "`{s}` is not a size of at least 4K (e.g. 512K, 16M)"
        )),
    }
}

fn parse_max_flows(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
        _ => Err(format!("`{s}` is not a flow count from 1 to 1000000")),
    }
}

/// `--announcements-per-s`: a rate, or None for `unlimited`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget(pub Option<u32>);

fn parse_budget(s: &str) -> Result<Budget, String> {
    if s == "unlimited" {
        return Ok(Budget(None));
    }
    match s.parse::<u32>() {
        Ok(n) if (10..=10_000_000).contains(&n) => Ok(Budget(Some(n))),
        _ => Err(format!(
            "`{s}` is not a rate from 10 to 10000000, nor `unlimited`"
        )),
    }
}

fn parse_pending_flows(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if (64..=4_000_000).contains(&n) => Ok(n),
        _ => Err(format!("`{s}` is not a flow count from 64 to 4000000")),
    }
}

fn parse_judge_window(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if !(Duration::from_millis(50)..=Duration::from_secs(30)).contains(&d) {
        return Err(format!("`{s}`: the window must be from 50ms to 30s"));
    }
    Ok(d)
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    #[arg(long)]
    pub json: bool,
    /// Only these network namespaces (inode, name or path). Repeatable.
    #[arg(long = "netns", value_name = "NETNS")]
    pub netns: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ProbeArgs {
    #[arg(long)]
    pub json: bool,
    /// Look for kube-proxy's rules in the namespace of DIR/proc/1, as
    /// `watch --host-root` does.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub host_root: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct LabArgs {
    /// Lower the machine-wide nf_conntrack_max to N for the run (restored
    /// on every exit path). By default the global limit is left alone and
    /// the lab router's table is filled up to it.
    #[arg(long, value_name = "N")]
    pub max: Option<u64>,
    /// Failed connection attempts per service while the table is full.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=200))]
    pub flows: u32,
    /// Print the watch output as NDJSON instead of the live view.
    #[arg(long)]
    pub json: bool,
    /// Hook strategy, as for watch.
    #[arg(long, default_value = "auto")]
    pub strategy: Choice,
    /// Record the lab's trace to FILE, for `ctrace report`.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// Recordings made with `watch --record`, oldest first (FILE.2 FILE.1
    /// FILE after rotation).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Also write a self-contained HTML report (plots included) to PATH.
    #[arg(long, value_name = "PATH")]
    pub html: Option<PathBuf>,
}

/// The longest duration any option takes: deadlines are computed from
/// it, and a clock plus a huge duration overflows.
const MAX_DURATION: Duration = Duration::from_secs(10 * 366 * 86_400);
/// Sampling intervals beyond a day would show nothing.
const MAX_INTERVAL: Duration = Duration::from_secs(86_400);

/// Seconds as a bare number, or a humantime duration (`90s`, `5m`), from
/// more than zero to ten years.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("`{s}`: the duration must be at most 10 years"))?,
        Ok(_) => return Err(format!("`{s}` is not a duration: it must be positive")),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("`{s}` is not a duration ({e}); use e.g. 30, 30s, 5m"))?,
    };
    if d.is_zero() {
        return Err(format!("`{s}`: the duration must be more than zero"));
    }
    if d > MAX_DURATION {
        return Err(format!("`{s}`: the duration must be at most 10 years"));
    }
    Ok(d)
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(100) {
        return Err(format!("`{s}`: the interval must be at least 100ms"));
    }
    if d > MAX_INTERVAL {
        return Err(format!("`{s}`: the interval must be at most 1 day"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_flags_go_anywhere_watch_options_only_where_they_count() {
        let ok = |args: &[&str]| {
            Cli::parse_from_args(std::iter::once("ctrace").chain(args.iter().copied()))
                .unwrap_or_else(|e| panic!("{args:?}: {e}"))
        };
        assert_eq!(ok(&["-v", "watch", "--json"]).global.verbose, 1);
        assert_eq!(ok(&["watch", "-vv"]).global.verbose, 2);
        assert!(ok(&["--verifier-log", "probe"]).global.verifier_log);
        assert!(ok(&["--json", "--duration", "5"]).watch.json);
        assert!(matches!(
            ok(&["-v", "watch", "--json"]).command,
            Some(Command::Watch(w)) if w.json
        ));
        let e = Cli::parse_from_args(["ctrace", "--json", "status"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--json before `status`"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("-3").unwrap_err().contains("positive"));
        assert!(parse_duration("0").unwrap_err().contains("more than zero"));
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(parse_interval("10ms").is_err());
        // Out of range is a usage error, never a panic.
        for huge in ["1e20", "1e300", "100000000y", "18446744073709551615"] {
            assert!(
                parse_duration(huge).unwrap_err().contains("at most"),
                "{huge}"
            );
        }
        assert!(parse_interval("2d").unwrap_err().contains("at most 1 day"));
    }

    #[test]
    fn cli_parses_default_watch_and_subcommands() {
        let c = Cli::try_parse_from(["ctrace", "--json", "--service", "x=tcp/1"]).unwrap();
        assert!(c.command.is_none() && c.watch.json);
        let c = Cli::try_parse_from(["ctrace", "watch", "--duration", "3"]).unwrap();
        assert!(matches!(c.command, Some(Command::Watch(_))));
        let e = Cli::try_parse_from(["ctrace", "--service", "bad"]).unwrap_err();
        assert!(e.to_string().contains("expected NAME=PROTO/PORT"), "{e}");
        let c = Cli::try_parse_from(["ctrace", "--record", "--metrics", "9465"]).unwrap();
        assert_eq!(
            c.watch.record.as_deref(),
            Some(std::path::Path::new(crate::sink::record::DEFAULT_PATH))
        );
        assert_eq!(c.watch.metrics.unwrap().to_string(), "127.0.0.1:9465");
        assert_eq!(parse_size("16M").unwrap(), 16 << 20);
        assert!(parse_size("12").is_err());
        let e = Cli::try_parse_from(["ctrace", "--metrics-notrack"]).unwrap_err();
        assert!(e.to_string().contains("--metrics"), "{e}");
        let e = Cli::try_parse_from(["ctrace", "--strategy", "xdp"]).unwrap_err();
        assert!(e.to_string().contains("unknown strategy"), "{e}");
    }
}
