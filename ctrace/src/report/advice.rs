//! Recommendations, each a command and the numbers from the recording that
//! justify it.
//!
//! Sizing: a full table refused F flows while holding P entries, so the
//! demand was at least P + F (each refused flow needed one entry). The new
//! limit leaves 20% headroom over that, so that the 80% alert fires before
//! the table fills, rounded up to a power of two. Its memory is one slab
//! slot per entry (the `nf_conntrack` cache's, measured when recording)
//! plus one 8-byte hash bucket per entry (nf_conntrack_buckets equal to
//! the limit, the kernel's own default ratio).
//!
//! Timeouts: with flows arriving at a steady rate, the entries a state
//! holds are proportional to its timeout (Little's law), so cutting a
//! timeout from T to T' removes a share 1 - T'/T of those entries.
use std::net::IpAddr;

use super::{Report, fill, render::Block};
use crate::record::Header;

/// struct nf_conn's slab slot on 64-bit kernels of the 6.x series, for
/// recordings whose kernel did not say (slab merging hides the cache).
const FALLBACK_ENTRY_BYTES: u64 = 320;
const BUCKET_BYTES: u64 = 8;
/// The incident's alert threshold.
const ALERT_FILL: f64 = 0.8;
/// Kernel defaults the timeout advice starts from.
const SYN_SENT_DEFAULT: u64 = 120;
const SYN_SENT_ADVISED: u64 = 30;
const UDP_DEFAULT: u64 = 30;
const UDP_ADVISED: u64 = 10;
const ESTABLISHED_DEFAULT: u64 = 432_000;
const ESTABLISHED_ADVISED: u64 = 86_400;

/// The alert rules the deployment ships (deploy/prometheus), loaded by
/// Prometheus as they are and checked by `promtool check rules` in tests.
pub const ALERT_RULES: &str = include_str!("../../../deploy/prometheus/ctrace-rules.yml");

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

pub fn advise(r: &Report, h: &Header) -> Vec<Block> {
    let mut b = vec![];
    let Some(ns) = r.main_namespace() else {
        b.push(Block::Para("No table was sampled: nothing to size.".into()));
        return b;
    };
    let entry = h.conntrack_entry_bytes.unwrap_or(FALLBACK_ENTRY_BYTES);
    let entry_note = if h.conntrack_entry_bytes.is_some() {
        format!("{entry} bytes per entry, measured from the kernel's nf_conntrack slab")
    } else {
        format!("{entry} bytes per entry assumed (the recording did not measure it)")
    };

    // 1. The limit. A recording is untrusted input: nothing here may wrap.
    let demand = ns.peak.saturating_add(ns.table_full_flows);
    let peak_fill = fill(ns.peak, ns.max);
    b.push(Block::Heading(3, "1. nf_conntrack_max".into()));
    if ns.table_full_flows == 0 && peak_fill < ALERT_FILL * 100.0 {
        b.push(Block::Para(format!(
            "The table peaked at {} of {} entries ({peak_fill:.1}%) and refused nothing: the limit is sufficient for what was recorded.",
            ns.peak, ns.max
        )));
    } else if let Some(advised) = advised_max(demand) {
        let bytes = |n: u64| n.saturating_mul(entry.saturating_add(BUCKET_BYTES));
        let (now, then) = (bytes(ns.max), bytes(advised));
        b.push(Block::Para(format!(
            "netns {} held **{} entries** at its peak (limit {}) and refused **{} flows** for a full table: the demand was at least **{demand}** entries. \
             With 20% headroom (so that an 80% alert fires before the table fills) that is {advised} (rounded up to a power of two). \
             Kernel memory at that limit: **{}** (was {} at {}), from {entry_note} plus {BUCKET_BYTES} bytes per hash bucket.",
            crate::text::markdown(&ns.label),
            ns.peak,
            ns.max,
            ns.table_full_flows,
            mib(then),
            mib(now),
            ns.max,
        )));
        b.push(Block::Code("sh", format!(
            "# now\nsysctl -w net.netfilter.nf_conntrack_max={advised}\nsysctl -w net.netfilter.nf_conntrack_buckets={advised}\n\
             # at every boot (/etc/sysctl.d is read at boot by systemd-sysctl, and by OpenWrt's /etc/init.d/sysctl;\n\
             # OpenWrt has no UCI option for this)\n\
             printf 'net.netfilter.nf_conntrack_max = {advised}\\nnet.netfilter.nf_conntrack_buckets = {advised}\\n' > /etc/sysctl.d/90-conntrack.conf\n\
             # where nf_conntrack is a module loaded after sysctl runs, size its hash when it loads\n\
             echo 'options nf_conntrack hashsize={advised}' > /etc/modprobe.d/nf_conntrack.conf"
        )));
    } else {
        b.push(Block::Para(format!(
            "The recorded demand ({demand} entries) is beyond what nf_conntrack_max can be set to ({MAX_SETTABLE}): the recording is damaged or not from a real table, so no limit is advised."
        )));
    }

    // 2. Timeouts.
    b.push(Block::Heading(3, "2. Timeouts".into()));
    let mut any = false;
    if let Some(o) = &ns.occupancy {
        let total = o.total.max(1);
        let syn_sent = o.by_tcp_state.get("SYN_SENT").copied().unwrap_or(0);
        let established = o.by_tcp_state.get("ESTABLISHED").copied().unwrap_or(0);
        let unreplied_other = o.unreplied.saturating_sub(syn_sent);
        if u128::from(syn_sent) * 10 >= u128::from(total) {
            any = true;
            let gone = fewer(syn_sent, SYN_SENT_DEFAULT, SYN_SENT_ADVISED);
            b.push(Block::Para(format!(
                "{syn_sent} entries ({:.0}%) were TCP connections never answered (SYN_SENT). At {SYN_SENT_ADVISED} s instead of the default {SYN_SENT_DEFAULT} s they would hold a quarter of that: about **{gone} entries fewer** at the peak.",
                fill(syn_sent, total)
            )));
            b.push(sysctl(
                "nf_conntrack_tcp_timeout_syn_sent",
                SYN_SENT_ADVISED,
            ));
        }
        if u128::from(unreplied_other) * 10 >= u128::from(total) {
            any = true;
            let gone = fewer(unreplied_other, UDP_DEFAULT, UDP_ADVISED);
            b.push(Block::Para(format!(
                "{unreplied_other} entries ({:.0}%) besides those were never answered (UDP and others: scans, floods, dead DNS servers). A {UDP_ADVISED} s UDP timeout instead of {UDP_DEFAULT} s removes about **{gone}** of them.",
                fill(unreplied_other, total)
            )));
            b.push(sysctl("nf_conntrack_udp_timeout", UDP_ADVISED));
        }
        if u128::from(established) * 2 >= u128::from(total) {
            any = true;
            // Remaining under a day, with a 5-day timeout: idle 4 days.
            let idle = ["10m-1h", "1h-1d"]
                .iter()
                .filter_map(|k| o.by_timeout.get(*k))
                .fold(0u64, |t, n| t.saturating_add(*n));
            b.push(Block::Para(format!(
                "{established} entries ({:.0}%) were ESTABLISHED. With the default {} day timeout, the {idle} entries with 10 minutes to a day left had been idle for over four days: a {} day timeout would have expired at least those.",
                fill(established, total),
                ESTABLISHED_DEFAULT / 86_400,
                ESTABLISHED_ADVISED / 86_400
            )));
            b.push(sysctl(
                "nf_conntrack_tcp_timeout_established",
                ESTABLISHED_ADVISED,
            ));
        }
    }
    if !any {
        b.push(Block::Para(
            "No state dominated the table enough to justify shorter timeouts (or occupancy was not recorded)."
                .into(),
        ));
    }

    // 3. NOTRACK for intra-network traffic.
    b.push(Block::Heading(
        3,
        "3. Traffic that needs no tracking".into(),
    ));
    // Only what parses as a prefix reaches a command, printed back from
    // its typed form: a key is text from a file someone else may have made.
    let keys = ns.occupancy.iter().flat_map(|o| o.by_src_prefix.iter());
    let unparsed = keys
        .clone()
        .filter(|(p, _)| p.parse::<Prefix>().is_err())
        .count();
    let private: Vec<(Prefix, u64)> = keys
        .filter_map(|(p, n)| Some((p.parse::<Prefix>().ok()?, *n)))
        .filter(|(p, _)| p.is_private())
        .collect();
    let private_total = private.iter().fold(0u64, |t, (_, n)| t.saturating_add(*n));
    let total = ns.occupancy.as_ref().map_or(0, |o| o.total);
    if unparsed > 0 {
        b.push(Block::Para(format!(
            "{unparsed} source prefix key(s) in the recording are not prefixes and were left out."
        )));
    }
    if total > 0 && u128::from(private_total) * 10 >= u128::from(total) * 3 {
        let mut prefixes = private.clone();
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.1));
        let set: Vec<String> = prefixes
            .iter()
            .take(4)
            .map(|(p, _)| p.to_string())
            .collect();
        let (v4, v6): (Vec<&String>, Vec<&String>) = set.iter().partition(|p| !p.contains(':'));
        b.push(Block::Para(format!(
            "{private_total} entries ({:.0}%) came from private prefixes ({}). If that traffic stays inside your networks and needs no NAT or stateful filtering, exempting it from conntrack frees those entries (rules must then accept `ct state untracked` where they filter it).",
            fill(private_total, total),
            set.join(", ")
        )));
        let mut cmd = String::from(
            "nft add table inet notrack_intra\n\
             nft add chain inet notrack_intra pre '{ type filter hook prerouting priority raw; }'\n\
             nft add chain inet notrack_intra out '{ type filter hook output priority raw; }'\n",
        );
        for (fam, list) in [("ip", &v4), ("ip6", &v6)] {
            if list.is_empty() {
                continue;
            }
            let s = list
                .iter()
                .map(|p| p.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            for chain in ["pre", "out"] {
                cmd += &format!(
                    "nft add rule inet notrack_intra {chain} {fam} saddr {{ {s} }} {fam} daddr {{ {s} }} notrack\n"
                );
            }
        }
        b.push(Block::Code("sh", cmd));
    } else {
        b.push(Block::Para(
            "Private prefixes did not dominate the table; no NOTRACK rule is suggested.".into(),
        ));
    }

    // 4. Alerts.
    b.push(Block::Heading(3, "4. Alerts".into()));
    b.push(Block::Para(
        "The incident's own alert (80% fill), a predictive one (full within the hour at the current growth), any table-full drop, and ctrace losing events or disagreeing with the kernel. Load with `ctrace watch --metrics` scraped (deploy/ has the Kubernetes and OpenWrt setups):".into(),
    ));
    b.push(Block::Code("yaml", ALERT_RULES.to_string()));
    b
}

/// nf_conntrack_max is an int sysctl: the largest power of two it takes.
const MAX_SETTABLE: u64 = 1 << 30;

/// The limit for `demand` entries with the alert's headroom, rounded up to
/// a power of two; None past what the sysctl can hold.
fn advised_max(demand: u64) -> Option<u64> {
    let wanted = (demand as f64 / ALERT_FILL).ceil();
    if wanted > MAX_SETTABLE as f64 {
        return None;
    }
    (wanted as u64).max(1024).checked_next_power_of_two()
}

/// Entries a state would hold fewer with its timeout cut from `default` to
/// `advised`, at a steady arrival rate (Little's law).
fn fewer(entries: u64, default: u64, advised: u64) -> u64 {
    (u128::from(entries) * u128::from(default - advised) / u128::from(default)) as u64
}

/// A source prefix as occupancy keys it (`10.10.0.0/24`, `fd00:1::/64`),
/// parsed: only this form is ever printed into a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl std::str::FromStr for Prefix {
    type Err = ();

    fn from_str(s: &str) -> Result<Prefix, ()> {
        let (addr, len) = s.split_once('/').ok_or(())?;
        let addr: IpAddr = addr.parse().map_err(|_| ())?;
        // Digits only: u8's parser would take a leading `+`.
        if len.is_empty() || !len.bytes().all(|c| c.is_ascii_digit()) {
            return Err(());
        }
        let len: u8 = len.parse().map_err(|_| ())?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        if len > bits {
            return Err(());
        }
        Ok(Prefix { addr, len })
    }
}

impl std::fmt::Display for Prefix {
    /// The network address (host bits cleared, as nft wants it) and length.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let net = match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        write!(f, "{net}/{}", self.len)
    }
}

impl Prefix {
    /// Wholly inside RFC 1918 or IPv6 ULA space: the network printed (the
    /// address with host bits cleared) and its length both, so that
    /// `10.0.0.0/0` (the whole internet) is not private.
    fn is_private(&self) -> bool {
        let ranges: &[(IpAddr, u8)] = &[
            (IpAddr::V4([10, 0, 0, 0].into()), 8),
            (IpAddr::V4([172, 16, 0, 0].into()), 12),
            (IpAddr::V4([192, 168, 0, 0].into()), 16),
            (IpAddr::V6([0xfc00, 0, 0, 0, 0, 0, 0, 0].into()), 7),
        ];
        ranges.iter().any(|&(addr, len)| {
            let range = Prefix { addr, len };
            self.len >= len
                && self.addr.is_ipv4() == addr.is_ipv4()
                && Prefix {
                    addr: self.addr,
                    len,
                }
                .to_string()
                    == range.to_string()
        })
    }
}

/// `sysctl -w net.netfilter.KEY=VALUE` as a command block.
fn sysctl(key: &str, value: u64) -> Block {
    Block::Code("sh", format!("sysctl -w net.netfilter.{key}={value}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private(s: &str) -> bool {
        s.parse::<Prefix>().unwrap().is_private()
    }

    #[test]
    fn private_prefixes() {
        assert!(private("10.10.0.0/24"));
        assert!(private("fd00:1::/64"));
        assert!(!private("8.8.8.0/24"));
        assert!(!private("2001:db8::/64"));
        // Wider than the private range: the whole internet, say.
        for wide in [
            "10.0.0.0/0",
            "10.0.0.0/7",
            "172.16.0.0/11",
            "fd00::/6",
            "192.168.0.0/15",
        ] {
            assert!(!private(wide), "{wide}");
        }
        assert!(private("172.31.0.0/16") && !private("172.32.0.0/16"));
    }

    #[test]
    fn only_prefixes_parse_and_print_back_typed() {
        for bad in [
            "10.0.0.0/8;touch /tmp/x;#",
            "10.0.0.0/8 }; touch /tmp/x",
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0.0/+8",
            "10.0.0.0/",
            "fd00::/129",
            "10.0.0.0/8\n",
        ] {
            assert!(bad.parse::<Prefix>().is_err(), "{bad}");
        }
        let p: Prefix = "10.1.2.3/8".parse().unwrap();
        assert_eq!(p.to_string(), "10.0.0.0/8");
        let p: Prefix = "fd00:1::7/64".parse().unwrap();
        assert_eq!(p.to_string(), "fd00:1::/64");
        assert_eq!(
            "0.0.0.0/0".parse::<Prefix>().unwrap().to_string(),
            "0.0.0.0/0"
        );
    }

    #[test]
    fn sizing_never_wraps() {
        assert_eq!(advised_max(0), Some(1024));
        assert_eq!(advised_max(100_000), Some(131_072));
        assert_eq!(advised_max(u64::MAX), None);
        assert_eq!(advised_max(MAX_SETTABLE), None);
        assert_eq!(fewer(u64::MAX, 120, 30), u64::MAX / 4 * 3 + 2);
    }
}
