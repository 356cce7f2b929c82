//! How a run ends, as its exit code says: 2 for the user's input (fix the
//! command line), 3 for what this host cannot do (privileges, kernel
//! features, a program the verifier rejects: retrying will not help), 1
//! for a failure while running. Scripts and service managers tell "do not
//! restart" from "restart" by it.
use std::fmt::Write as _;

use aya::programs::ProgramError;

pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_CANNOT_RUN: u8 = 3;

/// Verifier log lines shown unless the whole log is asked for: the
/// verifier's verdict and the instructions that led to it are at the end.
pub const VERIFIER_TAIL: usize = 20;

/// What this host lacks to run what was asked. Raised where ctrace decides
/// it (tier selection, the object, privileges), so the exit code never
/// depends on matching message text.
#[derive(Debug, thiserror::Error)]
pub enum CannotRun {
    #[error("strategy {strategy} cannot run on this kernel: {reason}")]
    Strategy { strategy: String, reason: String },
    #[error("no hook strategy works on this kernel:\n  {}", .0.join("\n  "))]
    NoStrategy(Vec<String>),
    #[error(
        "this ctrace was built without its eBPF programs (AYA_BUILD_SKIP); build it with `cargo xtask build`"
    )]
    NoPrograms,
    #[error("{0}")]
    Privileges(String),
    #[error("{what} needs kernel BTF: {why}")]
    NoBtf { what: &'static str, why: String },
}

/// Which of the three ways `err` ends a run.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    let cannot_run = err.chain().any(|c| {
        c.downcast_ref::<CannotRun>().is_some()
            || matches!(
                c.downcast_ref::<ProgramError>(),
                Some(ProgramError::LoadError { .. })
            )
    });
    if cannot_run {
        EXIT_CANNOT_RUN
    } else {
        EXIT_FAILURE
    }
}

/// `err` for stderr: its chain on one line, as `{:#}` prints it, except a
/// verifier rejection, whose log follows on lines of its own: the last
/// [`VERIFIER_TAIL`] unless `full_log`.
pub fn render(err: &anyhow::Error, full_log: bool) -> String {
    let mut out = String::new();
    let mut log = None;
    for (i, c) in err.chain().enumerate() {
        if i > 0 {
            out.push_str(": ");
        }
        match c.downcast_ref::<ProgramError>() {
            Some(ProgramError::LoadError {
                io_error,
                verifier_log,
            }) => {
                let _ = write!(
                    out,
                    "the kernel's verifier rejected the program ({io_error})"
                );
                log = Some(verifier_log.to_string());
                // The rest of the chain is the io error again.
                break;
            }
            _ => {
                let _ = write!(out, "{c}");
            }
        }
    }
    if let Some(log) = log {
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        let shown = if full_log {
            &lines[..]
        } else {
            &lines[lines.len().saturating_sub(VERIFIER_TAIL)..]
        };
        if shown.len() < lines.len() {
            let _ = write!(
                out,
                "\nverifier log, last {} of {} lines (--verifier-log for all):",
                shown.len(),
                lines.len()
            );
        } else {
            let _ = write!(out, "\nverifier log:");
        }
        for l in shown {
            out.push_str("\n  ");
            out.push_str(&crate::text::terminal(l));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_reasons_pick_their_code_through_context() {
        let e = anyhow::Error::new(CannotRun::NoPrograms).context("starting the router view");
        assert_eq!(exit_code(&e), EXIT_CANNOT_RUN);
        let e = anyhow::anyhow!("reading the table").context("settling");
        assert_eq!(exit_code(&e), EXIT_FAILURE);
        let e = anyhow::Error::new(CannotRun::Strategy {
            strategy: "kprobe".into(),
            reason: "no kprobe PMU".into(),
        });
        assert_eq!(
            render(&e, false),
            "strategy kprobe cannot run on this kernel: no kprobe PMU"
        );
    }
}
