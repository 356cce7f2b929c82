//! Facts about the running kernel, read from the kernel itself: BTF for
//! struct layouts, tracefs for tracepoint records, capabilities for what we
//! may do; and what it says without BPF or ctnetlink: conntrack's procfs
//! files (`procfs`) and its log (`kmsg`). Nothing here keys on a version
//! number.
pub mod btf;
pub mod found;
pub mod kallsyms;
pub mod kmsg;
pub mod map_batch;
pub mod privileges;
pub mod tracefs;

use std::path::PathBuf;

use btf::Btf;

/// What the strategies need to decide whether and how they can run. Errors
/// are kept as text: a missing fact disqualifies some tiers, not ctrace.
pub struct KernelFacts {
    pub btf: Result<Btf, String>,
    pub tracefs: Result<PathBuf, String>,
    pub release: String,
    /// The kernel's tick rate, to turn conntrack's jiffies into seconds.
    pub hz: u32,
}

impl KernelFacts {
    pub fn gather() -> Self {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let hz = measure_hz()
            .or_else(|| config_hz(&release))
            .unwrap_or_else(|| {
                log::warn!(
                    "cannot tell the kernel's HZ (no /proc/timer_list, no /boot/config); \
                     assuming {DEFAULT_HZ} for remaining timeouts"
                );
                DEFAULT_HZ
            });
        KernelFacts {
            hz,
            btf: if std::env::var_os(WITHHOLD_BTF).is_some_and(|v| v == "1") {
                Err(format!(
                    "kernel BTF withheld ({WITHHOLD_BTF}=1), as on a kernel built without \
                     CONFIG_DEBUG_INFO_BTF (stock OpenWrt)"
                ))
            } else {
                Btf::vmlinux().map_err(|e| format!("{e:#}"))
            },
            tracefs: tracefs::mounted_root().ok_or_else(|| {
                if privileges::has_sys_admin() {
                    "tracefs is not mounted and could not be mounted at /sys/kernel/tracing"
                        .to_string()
                } else {
                    "tracefs is not mounted, and mounting it takes CAP_SYS_ADMIN (or mount it \
                     for ctrace: mount -t tracefs nodev /sys/kernel/tracing)"
                        .to_string()
                }
            }),
            release,
        }
    }
}

/// Set to 1, ctrace behaves as on a kernel without BTF: what a router
/// without CONFIG_DEBUG_INFO_BTF sees, testable on any machine.
pub const WITHHOLD_BTF: &str = "CTRACE_WITHHOLD_BTF";

/// When the kernel's config cannot be read: Debian's and most distributions'
/// value. Only remaining-timeout buckets of kprobe-tier inserts use it.
const DEFAULT_HZ: u32 = 250;

/// Tick rates Linux is configured with.
const HZ_CHOICES: [u32; 5] = [100, 250, 300, 1000, 1024];

/// HZ measured: jiffies (from /proc/timer_list) advance over 200 ms of
/// CLOCK_MONOTONIC, rounded to the nearest configurable rate. Routers ship
/// no /boot/config.
fn measure_hz() -> Option<u32> {
    let read = || -> Option<(u64, u64)> {
        let text = std::fs::read_to_string("/proc/timer_list").ok()?;
        let j = text
            .lines()
            .find_map(|l| l.strip_prefix("jiffies: "))?
            .trim()
            .parse()
            .ok()?;
        Some((j, crate::event::monotonic_ns()))
    };
    let (j0, t0) = read()?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (j1, t1) = read()?;
    let rate = j1.checked_sub(j0)? as f64 * 1e9 / t1.checked_sub(t0)?.max(1) as f64;
    nearest_hz(rate)
}

fn nearest_hz(rate: f64) -> Option<u32> {
    let best = HZ_CHOICES.iter().copied().min_by(|a, b| {
        (f64::from(*a) - rate)
            .abs()
            .total_cmp(&(f64::from(*b) - rate).abs())
    })?;
    // A rate far from every choice means the reading is off (a stalled VM).
    ((f64::from(best) - rate).abs() <= f64::from(best) * 0.15).then_some(best)
}

/// CONFIG_HZ from /boot/config-RELEASE, where distributions install it.
fn config_hz(release: &str) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/boot/config-{release}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.trim().parse().ok())
}

/// Gives this process a private mount namespace with tracefs mounted, when
/// the host has not mounted it. The mount disappears with the process, so
/// ctrace leaves no trace in the host's mount table. Must run before any
/// thread is started: unshare(CLONE_NEWNS) refuses multithreaded callers.
pub fn ensure_tracefs_privately() -> Result<(), String> {
    if tracefs::mounted_root().is_some() {
        return Ok(());
    }
    // SAFETY: plain syscalls with valid, NUL-terminated arguments.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNS): {}",
                std::io::Error::last_os_error()
            ));
        }
        // Slave: host mounts made later (ip netns add) still reach us, ours
        // (tracefs) never reach the host.
        if libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        ) != 0
        {
            return Err(format!(
                "making mounts private: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    tracefs::ensure_mounted()
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
}

/// Hands memory freed after start-up (parsed BTF, ours and aya's: tens of
/// MiB on a distribution kernel) back to the system. glibc keeps freed heap
/// otherwise; musl (the router builds) returns it by itself.
pub fn return_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes one conntrack entry takes in this kernel: the slab slot size of
/// the `nf_conntrack` cache (struct nf_conn and its alignment; extensions
/// such as NAT or timestamps are allocated beside it). None where neither
/// SLUB's sysfs nor /proc/slabinfo says (slab merging can hide the cache).
pub fn conntrack_entry_bytes() -> Option<u64> {
    if let Ok(s) = std::fs::read_to_string("/sys/kernel/slab/nf_conntrack/slab_size")
        && let Ok(n) = s.trim().parse()
    {
        return Some(n);
    }
    // "nf_conntrack <active_objs> <num_objs> <objsize> …"
    let info = std::fs::read_to_string("/proc/slabinfo").ok()?;
    info.lines()
        .find(|l| l.split_whitespace().next() == Some("nf_conntrack"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn measured_rates_round_to_a_configurable_hz() {
        assert_eq!(super::nearest_hz(243.0), Some(250));
        assert_eq!(super::nearest_hz(290.0), Some(300));
        assert_eq!(super::nearest_hz(1010.0), Some(1000));
        assert_eq!(super::nearest_hz(96.0), Some(100));
        assert_eq!(super::nearest_hz(600.0), None);
    }

    /// HZ measured from jiffies is the kernel's CONFIG_HZ, where the
    /// kernel's config can be read to check it (/proc/config.gz here).
    #[test]
    fn measured_hz_is_the_configured_one() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED measured_hz_is_the_configured_one: /proc/timer_list needs root");
            return;
        }
        // A reading is refused when the machine stalls mid-measure: retry.
        let Some(measured) = (0..3).find_map(|_| super::measure_hz()) else {
            panic!("three measurements of HZ failed");
        };
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let configured = super::config_hz(release.trim()).or_else(|| {
            let out = std::process::Command::new("zcat")
                .arg("/proc/config.gz")
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("CONFIG_HZ="))
                .and_then(|v| v.trim().parse().ok())
        });
        match configured {
            Some(hz) => assert_eq!(measured, hz),
            None => {
                eprintln!("no kernel config to check against; measured HZ {measured}");
                assert!(super::HZ_CHOICES.contains(&measured));
            }
        }
    }
}
