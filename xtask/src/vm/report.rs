//! Reading a VM's console (the CTRACE-VM-* markers of /init and libtest's
//! own lines) and printing the matrix's results.
use std::time::Duration;

use super::kernel::Kernel;

/// One run of the suite with one strategy.
#[derive(Debug, Default)]
pub struct Run {
    pub strategy: String,
    /// None: the VM never reported the end of this run.
    pub exit: Option<i32>,
    pub secs: Option<u64>,
    /// libtest's "test result: …" line.
    pub summary: Option<String>,
    pub passed: u32,
    pub failed: u32,
    pub failed_tests: Vec<String>,
}

impl Run {
    fn verdict(&self) -> &'static str {
        match self.exit {
            Some(0) => "PASS",
            // 128 + SIGKILL: /init's `timeout -s KILL` (run limit), or the OOM killer.
            Some(137) => "KILLED",
            Some(_) => "FAIL",
            None => "NO RESULT",
        }
    }
}

/// Everything one VM told us.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The guest's `uname -r` and friends.
    pub kernel_line: Option<String>,
    pub conntrack_max: Option<String>,
    /// /init's facts about the kernel's hooks (BTF, ctnetlink, tracefs…).
    pub facts: Option<String>,
    /// `ctrace probe`'s output.
    pub probe: Vec<String>,
    /// Seconds from the guest kernel's start to the end of `ctrace probe`.
    pub probe_done_at: Option<String>,
    pub runs: Vec<Run>,
    /// /init's CTRACE-VM-NOTEs, and what went wrong with the VM itself.
    pub notes: Vec<String>,
    pub done: bool,
    /// How long qemu ran (the rest of a VM's wall time is preparing it).
    pub qemu: Option<Duration>,
}

impl Outcome {
    pub fn failed_to_start(why: String) -> Outcome {
        Outcome {
            notes: vec![format!("VM not run: {why}")],
            ..Outcome::default()
        }
    }
}

pub struct VmReport {
    pub kernel: Kernel,
    pub strategies: Vec<String>,
    pub wall: Duration,
    pub outcome: Outcome,
}

impl VmReport {
    /// The `i`th requested run, if the VM got to it. /init runs the
    /// strategies in the order given, so position is identity (a strategy
    /// may be listed twice, e.g. to look for flakiness).
    fn run(&self, i: usize) -> Option<&Run> {
        self.outcome
            .runs
            .get(i)
            .filter(|r| Some(&r.strategy) == self.strategies.get(i))
    }

    fn ok(&self) -> bool {
        (0..self.strategies.len()).all(|i| self.run(i).is_some_and(|r| r.exit == Some(0)))
    }
}

/// The payload of a CTRACE-VM marker anywhere in `line` (kernel messages
/// may share a line with it on the console).
fn marker<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(name)?;
    let rest = &line[at + name.len()..];
    (rest.is_empty() || rest.starts_with(' ')).then(|| rest.trim())
}

/// `key=value` from a marker's payload.
fn field<'a>(payload: &'a str, key: &str) -> Option<&'a str> {
    payload
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// "… 7 passed; 1 failed; …" -> the number before `what`.
fn count(summary: &str, what: &str) -> u32 {
    summary
        .split(';')
        .find_map(|part| {
            let mut w = part.split_whitespace().rev();
            (w.next()? == what).then_some(())?;
            w.next()?.parse().ok()
        })
        .unwrap_or(0)
}

pub fn parse(lines: &[String], timed_out: bool, status_note: Option<String>) -> Outcome {
    let mut o = Outcome::default();
    let mut in_probe = false;
    let mut current: Option<Run> = None;
    let mut oops = OopsLines::default();
    for line in lines {
        oops.see(line);
        if let Some(p) = marker(line, "CTRACE-VM-KERNEL") {
            o.kernel_line = Some(p.to_string());
        } else if let Some(p) = marker(line, "CTRACE-VM-CONNTRACK") {
            o.conntrack_max = field(p, "max").map(str::to_string);
        } else if let Some(p) = marker(line, "CTRACE-VM-FACTS") {
            o.facts = Some(p.to_string());
        } else if let Some(p) = marker(line, "CTRACE-VM-NOTE") {
            o.notes.push(p.to_string());
        } else if marker(line, "CTRACE-VM-PROBE-BEGIN").is_some() {
            in_probe = true;
        } else if let Some(p) = marker(line, "CTRACE-VM-PROBE-END") {
            in_probe = false;
            o.probe_done_at = field(p, "uptime").map(str::to_string);
            if field(p, "exit") != Some("0") {
                o.notes.push(format!("ctrace probe: {p}"));
            }
        } else if in_probe {
            o.probe.push(line.clone());
        } else if let Some(p) = marker(line, "CTRACE-VM-BEGIN") {
            o.runs.extend(current.take());
            current = Some(Run {
                strategy: field(p, "strategy").unwrap_or("?").to_string(),
                ..Run::default()
            });
        } else if let Some(p) = marker(line, "CTRACE-VM-RESULT") {
            let mut run = current.take().unwrap_or_default();
            run.strategy = field(p, "strategy").unwrap_or(&run.strategy).to_string();
            run.exit = field(p, "exit").and_then(|e| e.parse().ok());
            run.secs = field(p, "secs").and_then(|e| e.parse().ok());
            o.runs.push(run);
        } else if marker(line, "CTRACE-VM-DONE").is_some() {
            o.done = true;
        } else if let Some(run) = current.as_mut() {
            if let Some(at) = line.find("test result: ") {
                let s = line[at..].to_string();
                run.passed = count(&s, "passed");
                run.failed = count(&s, "failed");
                run.summary = Some(s);
            } else if let Some((name, outcome)) = line
                .strip_prefix("test ")
                .and_then(|l| l.split_once(" ... "))
                // "FAILED", or "FAILED <1.234s>" with --report-time.
                && outcome.split_whitespace().next() == Some("FAILED")
            {
                run.failed_tests.push(name.to_string());
            }
        }
    }
    // A run that began and never ended: the VM died or was killed in it.
    o.runs.extend(current.take());
    if timed_out {
        o.notes
            .push("the VM hit its time limit and was killed".into());
    }
    if !o.done {
        o.notes
            .push("the VM did not finish the suite (see its console log)".into());
    }
    o.notes.extend(status_note);
    o.notes.extend(oops.lines);
    o
}

/// The guest kernel's own account of how it died: a VM that stops in the
/// middle of a run (panic=-1 and -no-reboot make qemu exit cleanly) says
/// nothing else, and CI keeps no console logs.
#[derive(Default)]
struct OopsLines {
    lines: Vec<String>,
    in_oops: bool,
}

impl OopsLines {
    const FIRST: [&str; 3] = ["Oops: ", "BUG: ", "Kernel panic - not syncing"];

    fn see(&mut self, line: &str) {
        // The first oops, the RIP and call trace's top that follow it, and
        // the panic: enough to name the crash, not the whole dump.
        if self.lines.len() >= 4 {
            return;
        }
        if let Some(at) = Self::FIRST.iter().filter_map(|k| line.find(k)).min() {
            self.in_oops = true;
            self.lines
                .push(format!("guest kernel: {}", line[at..].trim()));
        } else if self.in_oops {
            if let Some(at) = line.find("RIP: ") {
                let rip = format!("guest kernel: {}", line[at..].trim());
                // The dump's end repeats it.
                if !self.lines.contains(&rip) {
                    self.lines.push(rip);
                }
            }
        }
    }
}

fn mins(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}

/// Prints the results table; true if every requested run passed.
pub fn print(reports: &[VmReport], total: Duration) -> bool {
    let label = |r: &VmReport| format!("{} ({})", r.kernel.version, r.kernel.series);
    let kw = reports
        .iter()
        .map(|r| label(r).len())
        .max()
        .unwrap_or(0)
        .max(6);
    let sw = reports
        .iter()
        .flat_map(|r| r.strategies.iter().map(String::len))
        .max()
        .unwrap_or(0)
        .max(8);
    let rule = "-".repeat(kw + sw + 64);
    println!("\n{rule}\nctrace VM matrix: kernel x arch x strategy\n{rule}");
    println!(
        "{:<kw$}  {:<8} {:<sw$}  {:<10} {:<26} {:>8}",
        "kernel", "arch", "strategy", "result", "tests", "time"
    );
    for r in reports {
        let kernel = label(r);
        for (i, s) in r.strategies.iter().enumerate() {
            let (verdict, tests, time) = match r.run(i) {
                Some(run) => (
                    run.verdict(),
                    match &run.summary {
                        Some(_) => format!("{} passed, {} failed", run.passed, run.failed),
                        None => "no libtest summary".into(),
                    },
                    run.secs
                        .map(|s| mins(Duration::from_secs(s)))
                        .unwrap_or_else(|| "-".into()),
                ),
                None => ("NO RESULT", "-".into(), "-".into()),
            };
            println!(
                "{kernel:<kw$}  {:<8} {s:<sw$}  {verdict:<10} {tests:<26} {time:>8}",
                r.kernel.arch.name()
            );
        }
    }
    println!("{rule}");

    for r in reports {
        let o = &r.outcome;
        println!(
            "\n{} {} ({}): VM wall time {} (qemu {}), nf_conntrack_max {}",
            r.kernel.arch.name(),
            r.kernel.version,
            r.kernel.package,
            mins(r.wall),
            o.qemu.map_or("-".into(), mins),
            o.conntrack_max.as_deref().unwrap_or("unknown")
        );
        if let Some(k) = &o.kernel_line {
            println!("  guest: {k}");
        }
        if let Some(f) = &o.facts {
            println!("  facts: {f}");
        }
        if !o.probe.is_empty() {
            match &o.probe_done_at {
                Some(t) => println!("  ctrace probe (done {t}s after the guest kernel started):"),
                None => println!("  ctrace probe:"),
            }
            for l in &o.probe {
                println!("    {l}");
            }
        }
        for run in &o.runs {
            let summary = run.summary.as_deref().unwrap_or("(no libtest summary)");
            println!(
                "  [{}] exit {}: {summary}",
                run.strategy,
                run.exit.map_or("none".into(), |e| e.to_string())
            );
            for t in &run.failed_tests {
                println!("    failed: {t}");
            }
        }
        for n in &o.notes {
            println!("  note: {n}");
        }
    }
    let ok = reports.iter().all(VmReport::ok);
    // VMs run side by side: their qemu times add up to more than the wall
    // time they took.
    let in_qemu: Duration = reports.iter().filter_map(|r| r.outcome.qemu).sum();
    let preparing: Duration = reports
        .iter()
        .map(|r| r.wall.saturating_sub(r.outcome.qemu.unwrap_or_default()))
        .sum();
    println!(
        "\ntotal wall time {} ({} VMs: {} of qemu time, {} preparing them): {}",
        mins(total),
        reports.len(),
        mins(in_qemu),
        mins(preparing),
        if ok { "all passed" } else { "FAILURES" }
    );
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(str::to_string).collect()
    }

    #[test]
    fn parses_markers_and_libtest_lines() {
        let console = lines(
            "[    1.0] Run /init as init process
CTRACE-VM-KERNEL release=6.1.0-56-cloud-amd64 machine=x86_64 cpus=2 mem_kb=2000000
CTRACE-VM-CONNTRACK max=65536
CTRACE-VM-FACTS btf=absent proc_nf_conntrack=present
CTRACE-VM-PROBE-BEGIN
kernel 6.1.0-56-cloud-amd64
auto picks: tracepoint
CTRACE-VM-PROBE-END exit=0 uptime=4.20
CTRACE-VM-BEGIN strategy=auto
running 8 tests
test a ... ok <0.120s>
test b ... FAILED <3.500s>
test result: FAILED. 7 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 9.1s
CTRACE-VM-RESULT strategy=auto exit=101 secs=95
CTRACE-VM-BEGIN strategy=kprobe
running 8 tests",
        );
        let o = parse(&console, true, Some("qemu killed".into()));
        assert_eq!(o.conntrack_max.as_deref(), Some("65536"));
        assert_eq!(
            o.facts.as_deref(),
            Some("btf=absent proc_nf_conntrack=present")
        );
        assert_eq!(o.probe_done_at.as_deref(), Some("4.20"));
        assert_eq!(
            o.probe,
            ["kernel 6.1.0-56-cloud-amd64", "auto picks: tracepoint"]
        );
        assert_eq!(o.runs.len(), 2);
        let r = &o.runs[0];
        assert_eq!(
            (r.strategy.as_str(), r.exit, r.secs, r.passed, r.failed),
            ("auto", Some(101), Some(95), 7, 1)
        );
        assert_eq!(r.failed_tests, ["b"]);
        assert_eq!(
            (o.runs[1].strategy.as_str(), o.runs[1].exit),
            ("kprobe", None)
        );
        assert!(!o.done);
        assert_eq!(o.notes.len(), 3);
    }

    #[test]
    fn a_guest_kernel_crash_is_named() {
        let console = lines(
            "CTRACE-VM-BEGIN strategy=tracepoint
test blind ... [  142.450219] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI
[  142.450443] CPU: 0 UID: 0 PID: 9 Comm: kworker/0:0
[  142.450796] RIP: 0010:NF_HOOK.constprop.0+0x24/0x160
[  142.452561] RIP: 0010:NF_HOOK.constprop.0+0x24/0x160
[  142.452731] Kernel panic - not syncing: Fatal exception in interrupt",
        );
        let o = parse(&console, false, None);
        assert_eq!(o.runs[0].exit, None);
        assert_eq!(
            o.notes[1..],
            [
                "guest kernel: Oops: int3: 0000 [#1] PREEMPT SMP NOPTI",
                "guest kernel: RIP: 0010:NF_HOOK.constprop.0+0x24/0x160",
                "guest kernel: Kernel panic - not syncing: Fatal exception in interrupt",
            ]
        );
    }

    #[test]
    fn counts_in_a_summary() {
        let s = "test result: ok. 8 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1s";
        assert_eq!(
            (count(s, "passed"), count(s, "failed"), count(s, "ignored")),
            (8, 0, 1)
        );
    }
}
