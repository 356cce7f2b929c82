//! Whether we hold what loading and attaching programs takes. Checked up
//! front so the user gets one clear sentence instead of an EPERM from deep
//! inside a bpf() call.
use std::fs;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

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
