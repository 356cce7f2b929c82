//! Whether we hold what loading and attaching programs takes. Checked up
//! front so the user gets one clear sentence instead of an EPERM from deep
//! inside a bpf() call.
use std::fs;

pub const CAP_DAC_OVERRIDE: u32 = 1;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// Effective capabilities of this process, from /proc/self/status.
fn effective_caps() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// What is missing for tracing (BPF + perf events + netlink admin), if
/// anything. CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, as it does
/// on kernels older than 5.8.
pub fn missing_for_tracing() -> Option<String> {
    let caps = effective_caps();
    let has = |c: u32| caps & (1u64 << c) != 0;
    let bpf = has(CAP_BPF) || has(CAP_SYS_ADMIN);
    let perfmon = has(CAP_PERFMON) || has(CAP_SYS_ADMIN);
    let net = has(CAP_NET_ADMIN);
    if bpf && perfmon && net {
        return None;
    }
    let mut missing = Vec::new();
    if !bpf {
        missing.push("CAP_BPF");
    }
    if !perfmon {
        missing.push("CAP_PERFMON");
    }
    if !net {
        missing.push("CAP_NET_ADMIN");
    }
    Some(missing_message(&missing))
}

/// What to do about missing capabilities, without handing them to every
/// local user.
fn missing_message(missing: &[&str]) -> String {
    format!(
        "ctrace needs root, or CAP_BPF+CAP_PERFMON+CAP_NET_ADMIN (missing: {}). \
         Run it with sudo, or as a service (deploy/ has OpenWrt's and Kubernetes'). \
         These capabilities amount to root: file capabilities (setcap) on a binary \
         every local user may run give all of them root. If you set them, first make \
         the binary executable by one group only, e.g. \
         `chgrp ctrace-admins ctrace && chmod 0750 ctrace`, then \
         `setcap cap_bpf,cap_perfmon,cap_net_admin+ep ctrace` \
         (add cap_sys_admin to watch other namespaces).",
        missing.join(", ")
    )
}

/// What a running `watch` still needs once its programs are attached and
/// its outputs open (docs/usage.md, "Privileges once tracing"), whatever the tier:
/// - CAP_BPF: every bpf() call, map reads included, where unprivileged
///   bpf is off (the default);
/// - CAP_NET_ADMIN: ctnetlink (table statistics and dumps), the tc tier's
///   attachments to devices that appear later, removing the NOTRACK table;
/// - CAP_SYS_ADMIN: entering namespaces that appear later (setns), and
///   bpf() on kernels before 5.8, which have no CAP_BPF;
/// - CAP_SYS_PTRACE: reading other processes' namespace links to find
///   and name namespaces;
/// - CAP_DAC_OVERRIDE, only with `--textfile`: its directory is usually
///   node_exporter's account's.
///
/// CAP_PERFMON (kprobes and tracepoints are attached by then) and every
/// other capability go.
pub fn needed_after_attach(textfile: bool) -> Vec<u32> {
    let mut keep = vec![CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_BPF];
    if textfile {
        keep.push(CAP_DAC_OVERRIDE);
    }
    keep
}

/// Keeps only `keep` of the capabilities held, in every set (bounding,
/// permitted, effective; inheritable and ambient emptied), and sets
/// no_new_privs, so nothing executed later can regain any. Applies to the
/// calling thread and the threads it starts afterwards: call it where no
/// other thread runs (ctrace's runtime is single-threaded).
pub fn keep_only(keep: &[u32]) -> std::io::Result<()> {
    let os = std::io::Error::last_os_error;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(os());
    }
    let last = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40)
        .min(63);
    // The bounding set first: dropping from it takes CAP_SETPCAP, which
    // goes with the rest below. Without CAP_SETPCAP (file capabilities),
    // the bounding set stays; the other sets still shrink.
    for cap in (0..=last).filter(|c| !keep.contains(c)) {
        // SAFETY: as above.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
    }
    // SAFETY: as above.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget fills two CapData for version 3.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(os());
    }
    let mut wanted = [0u32; 2];
    for &c in keep {
        wanted[(c / 32) as usize] |= 1 << (c % 32);
    }
    for (d, w) in data.iter_mut().zip(wanted) {
        d.permitted &= w;
        d.effective = d.permitted;
        d.inheritable = 0;
    }
    // SAFETY: capset reads the header and two CapData.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(os());
    }
    Ok(())
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// CAP_SYS_ADMIN: mounting tracefs, creating and entering namespaces.
pub fn has_sys_admin() -> bool {
    effective_caps() & (1 << CAP_SYS_ADMIN) != 0
}

/// The lab creates namespaces and writes sysctls: that takes CAP_SYS_ADMIN.
pub fn missing_for_lab() -> Option<String> {
    let caps = effective_caps();
    if caps & (1 << CAP_SYS_ADMIN) != 0 && caps & (1 << CAP_NET_ADMIN) != 0 {
        return missing_for_tracing();
    }
    Some("ctrace lab creates network namespaces and loads eBPF programs: run it as root (CAP_SYS_ADMIN + CAP_NET_ADMIN + CAP_BPF + CAP_PERFMON)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advice_never_hands_root_to_every_user() {
        let m = missing_message(&["CAP_BPF"]);
        assert!(m.contains("missing: CAP_BPF"), "{m}");
        assert!(m.contains("amount to root"), "{m}");
        let chmod = m.find("chmod 0750").expect("restrict the binary first");
        let setcap = m.find("setcap cap_").expect("then the capabilities");
        assert!(chmod < setcap, "{m}");
    }
}
