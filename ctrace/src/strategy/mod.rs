//! Hook strategies: how ctrace gets its events out of the running kernel.
//!
//! Tiers, best first: fexit (exact, cheapest), kprobe (exact), tracepoint
//! (after the fact, cause inferred), tc (no tracing hooks at all, for stock
//! OpenWrt). Each tier is probed on the running kernel, never chosen by
//! version number; `ctrace probe` prints every verdict with its reason.
//!
//! Every tier loads programs from the same object and fills the same maps,
//! so everything downstream of [`EventSource`] is tier-agnostic.
pub mod kprobe;
pub mod tc;
pub mod tracepoint;

use std::str::FromStr;

use anyhow::{Context as _, bail};
use aya::{programs::ProgramType, sys::is_program_supported};

use crate::{error::CannotRun, kernel::KernelFacts};
pub use crate::{loader::LoadOptions, source::EventSource, tier::Strategy};

/// `--strategy`: a tier, or `auto` for the best one that works here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Auto,
    Only(Strategy),
}

impl FromStr for Choice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Choice::Auto);
        }
        Strategy::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .map(Choice::Only)
            .ok_or_else(|| {
                format!("unknown strategy `{s}`; choose auto, fexit, kprobe, tracepoint or tc")
            })
    }
}

/// Whether one tier can run here, and why (not).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub struct Verdict {
    pub strategy: Strategy,
    pub usable: bool,
    pub reason: String,
}

/// Probes every tier against the running kernel.
pub fn probe(facts: &KernelFacts) -> Vec<Verdict> {
    Strategy::ALL
        .into_iter()
        .map(|strategy| {
            let (usable, reason) = match probe_one(strategy, facts) {
                Ok(reason) => (true, reason),
                Err(e) => (false, format!("{e:#}")),
            };
            Verdict {
                strategy,
                usable,
                reason,
            }
        })
        .collect()
}

pub(crate) fn program_type_loads(t: ProgramType, what: &str) -> anyhow::Result<()> {
    match is_program_supported(t) {
        Ok(true) => Ok(()),
        Err(aya::programs::ProgramError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::EPERM) =>
        {
            bail!(
                "the kernel refuses {what} programs with EPERM (forbidden here, e.g. by lockdown)"
            )
        }
        Ok(false) => bail!(
            "the kernel refuses {what} programs (not built in, or forbidden, e.g. by lockdown)"
        ),
        Err(e) => Err(e).with_context(|| format!("probing {what} programs")),
    }
}

fn probe_one(strategy: Strategy, facts: &KernelFacts) -> anyhow::Result<String> {
    match strategy {
        Strategy::Fexit => {
            let vmlinux = facts.btf.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
            if std::path::Path::new("/sys/kernel/btf/nf_conntrack").exists() {
                bail!(
                    "nf_conntrack is a module: its functions are in /sys/kernel/btf/nf_conntrack, \
                     and aya attaches fentry/fexit only to functions in vmlinux BTF"
                );
            }
            if !vmlinux.has_func("__nf_conntrack_alloc") {
                bail!("__nf_conntrack_alloc is not in vmlinux BTF");
            }
            // Probing the tracing program type makes aya parse the kernel's
            // BTF on its own (tens of MiB), for a tier this build lacks.
            bail!(
                "__nf_conntrack_alloc is in vmlinux BTF, but this build has no fexit programs yet \
                 (tracing program type not probed)"
            )
        }
        Strategy::Kprobe => kprobe::probe(facts),
        Strategy::Tracepoint => tracepoint::probe(facts),
        Strategy::Tc => tc::probe(facts),
    }
}

/// Picks the tier to run: the requested one, or the best usable one.
pub fn select(choice: Choice, verdicts: &[Verdict]) -> anyhow::Result<Strategy> {
    match choice {
        Choice::Only(s) => {
            let v = verdicts
                .iter()
                .find(|v| v.strategy == s)
                .expect("every strategy is probed");
            if !v.usable {
                return Err(CannotRun::Strategy {
                    strategy: s.to_string(),
                    reason: v.reason.clone(),
                }
                .into());
            }
            Ok(s)
        }
        Choice::Auto => verdicts
            .iter()
            .find(|v| v.usable)
            .map(|v| v.strategy)
            .ok_or_else(|| {
                CannotRun::NoStrategy(
                    verdicts
                        .iter()
                        .map(|v| format!("{}: {}", v.strategy, v.reason))
                        .collect(),
                )
                .into()
            }),
    }
}

/// Loads and attaches the programs of `strategy`.
pub fn start(
    strategy: Strategy,
    facts: &KernelFacts,
    opts: &LoadOptions<'_>,
) -> anyhow::Result<EventSource> {
    let mut source = match strategy {
        Strategy::Tracepoint => tracepoint::start(facts, opts)?,
        Strategy::Kprobe => kprobe::start(facts, opts)?,
        Strategy::Tc => tc::start(facts, opts)?,
        other => {
            return Err(CannotRun::Strategy {
                strategy: other.to_string(),
                reason: "not implemented in this build".into(),
            }
            .into());
        }
    };
    if source.tier().caps.drop_location {
        let confirmed = drop_location_usable(&mut source);
        source.set_drop_location(confirmed);
    }
    Ok(source)
}

/// Whether kfree_skb's location tells rule drops apart here: found by an
/// experiment once per boot and kernel, then reused.
fn drop_location_usable(source: &mut EventSource) -> bool {
    let mut found = crate::kernel::found::Found::load();
    if let Some(known) = found.as_ref().and_then(|f| f.nft_drop_in_chain) {
        log::info!(
            "drop location: {} (found at an earlier start of this boot, {})",
            if known {
                "rule drops are told apart"
            } else {
                "location evidence unused"
            },
            crate::kernel::found::Found::path().display()
        );
        return known;
    }
    let Some(confirmed) = tracepoint::kernel_frees_nft_drops_in_nft_do_chain(source) else {
        return false;
    };
    if let Some(f) = found.as_mut() {
        f.nft_drop_in_chain = Some(confirmed);
        f.store();
    }
    confirmed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(strategy: Strategy, usable: bool) -> Verdict {
        Verdict {
            strategy,
            usable,
            reason: format!("{strategy} reason"),
        }
    }

    #[test]
    fn auto_takes_the_best_usable_tier() {
        let vs = [
            v(Strategy::Fexit, false),
            v(Strategy::Kprobe, false),
            v(Strategy::Tracepoint, true),
            v(Strategy::Tc, true),
        ];
        assert_eq!(select(Choice::Auto, &vs).unwrap(), Strategy::Tracepoint);
        let e = select(Choice::Only(Strategy::Kprobe), &vs)
            .unwrap_err()
            .to_string();
        assert!(e.contains("kprobe reason"), "{e}");
        let none = [
            v(Strategy::Fexit, false),
            v(Strategy::Kprobe, false),
            v(Strategy::Tracepoint, false),
            v(Strategy::Tc, false),
        ];
        let e = select(Choice::Auto, &none).unwrap_err().to_string();
        assert!(e.contains("tracepoint: tracepoint reason"), "{e}");
    }

    #[test]
    fn choice_parses() {
        assert_eq!("auto".parse::<Choice>().unwrap(), Choice::Auto);
        assert_eq!("tc".parse::<Choice>().unwrap(), Choice::Only(Strategy::Tc));
        assert!(
            "xdp"
                .parse::<Choice>()
                .unwrap_err()
                .contains("unknown strategy `xdp`")
        );
    }
}
