//! Which Debian kernels to boot, and what the VM needs from each package.
//!
//! Debian renames kernel packages with every ABI bump
//! (`linux-image-6.1.0-56-cloud-amd64-unsigned`,
//! `linux-image-6.12.117+deb12-cloud-amd64-unsigned`), so nothing here
//! names one: apt is asked which cloud kernels exist, they are grouped by
//! series (6.1, 6.12, …), and the newest of each series is tested.
//!
//! From a package the VM needs its vmlinuz and the modules ctrace's tests
//! use. Debian builds conntrack, nf_tables and veth as modules; their
//! dependencies are read from each module's own `.modinfo` and loaded
//! deepest first. Compressed modules (.ko.xz/.zst/.gz) are decompressed
//! here, because busybox's insmod takes only plain ELF.
use std::{
    collections::{BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::{
    Arch,
    apt::{Apt, Host, version_gt},
    modinfo,
};
use crate::{run, step};

/// What the suite needs in the guest kernel, beyond what Debian builds in:
/// conntrack itself and its netlink interface (table fill and statistics),
/// nf_tables with the `ct` expression (the lab's stateful ruleset turns
/// conntrack on in a namespace), veth (the lab's links). The rest are their
/// dependencies, named so a missing one is reported by name. The tc pass
/// (see `DEBIAN_TC_SERIES` in vm.rs) adds what the OpenWrt-shaped router
/// is built from: clsact and cls_bpf (no TCX before 6.6), a bridge with
/// br_netfilter as on a host that loads it, 802.1Q uppers, masquerade;
/// and fib, which --metrics-notrack's rules use.
/// Debian's cloud kernels build no PPP: PPPoE is tested in the OpenWrt rows.
pub const WANTED_MODULES: &[&str] = &[
    "libcrc32c",
    "nf_defrag_ipv4",
    "nf_defrag_ipv6",
    "nf_conntrack",
    "nfnetlink",
    "nf_conntrack_netlink",
    "nf_tables",
    "nft_ct",
    "veth",
    "nf_nat",
    "nft_chain_nat",
    "nft_masq",
    "nft_fib_inet",
    "sch_ingress",
    "cls_bpf",
    "bridge",
    "br_netfilter",
    "8021q",
];

/// One kernel package of the matrix.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub arch: Arch,
    /// `6.1`, `6.12`: upstream major.minor.
    pub series: String,
    /// Debian's ABI name, e.g. `6.1.0-56` or `6.12.117+deb12`.
    pub abi: String,
    pub package: String,
    /// Package version, e.g. `6.1.192-2`: the real upstream release.
    pub version: String,
    pub origin: Origin,
}

/// Where a kernel of the matrix comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A Debian cloud kernel package, downloaded through apt.
    Debian,
    /// Built here from Debian's kernel source with OpenWrt's BPF-relevant
    /// configuration (`openwrt.rs`); `source_version` is the version of
    /// the source package it was built from.
    OpenWrt { source_version: String },
}

impl Kernel {
    /// From `linux-image-<abi>-cloud-<debarch>-unsigned`.
    fn from_package(arch: Arch, package: &str, version: &str) -> Option<Kernel> {
        let abi = package
            .strip_prefix("linux-image-")?
            .strip_suffix(&format!("-cloud-{}-unsigned", arch.deb()))?
            .to_string();
        let mut parts = abi.split(['.', '-', '+']);
        let (major, minor) = (parts.next()?, parts.next()?);
        if major.parse::<u32>().is_err() || minor.parse::<u32>().is_err() {
            return None;
        }
        Some(Kernel {
            arch,
            series: format!("{major}.{minor}"),
            abi,
            package: package.to_string(),
            version: version.to_string(),
            origin: Origin::Debian,
        })
    }

    /// Whether `--kernel NAME` selects this package.
    fn matches(&self, name: &str) -> bool {
        name == self.package
            || name == self.abi
            || name == self.version
            || self.abi.starts_with(&format!("{name}-"))
            || self.abi.starts_with(&format!("{name}+"))
    }

    /// Where this kernel's extracted files are cached.
    fn dir(&self, cache: &Path) -> PathBuf {
        cache
            .join("kernels")
            .join(self.arch.deb())
            .join(format!("{}_{}", self.abi, self.version))
    }
}

/// The kernels to test for `arch`: for each `--kernel NAME`, the newest
/// package of that series or that exact package; without names, the newest
/// package of every series apt offers.
pub fn resolve(
    apt: &Apt,
    arch: Arch,
    names: &[String],
    cache: &Path,
) -> anyhow::Result<Vec<Kernel>> {
    let regex = format!("^linux-image-[0-9].*-cloud-{}-unsigned$", arch.deb());
    let mut offered = apt
        .ensure_lists()
        .and_then(|()| available(apt, arch, &regex));
    if matches!(&offered, Ok(v) if v.is_empty()) {
        // Fresh machine with lists from before the last ABI bump, or a
        // private list never fetched: refresh once and ask again.
        offered = apt.update().and_then(|()| available(apt, arch, &regex));
    }
    let offered = match offered {
        Ok(v) if !v.is_empty() => v,
        other => {
            let why = match other {
                Err(e) => format!("{e:#}"),
                Ok(_) => format!("no package matches {regex}"),
            };
            let cached = cached(arch, cache);
            if cached.is_empty() {
                bail!(
                    "cannot find Debian cloud kernels for {} through apt: {why}",
                    arch.deb()
                );
            }
            step(&format!(
                "apt lookup for {} kernels failed ({why}); falling back to the {} kernel(s) already cached",
                arch.deb(),
                cached.len()
            ));
            cached
        }
    };

    let mut series: Vec<String> = offered
        .iter()
        .map(|k| k.series.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    series.sort_by_key(|s| {
        s.split('.')
            .map(|p| p.parse::<u32>().unwrap_or(0))
            .collect::<Vec<_>>()
    });
    let newest_where = |pred: &dyn Fn(&Kernel) -> bool| -> Option<Kernel> {
        let mut best: Option<&Kernel> = None;
        for k in offered.iter().filter(|k| pred(k)) {
            if best.is_none_or(|b| version_gt(&k.version, &b.version).unwrap_or(false)) {
                best = Some(k);
            }
        }
        best.cloned()
    };

    let mut picked = vec![];
    if names.is_empty() {
        for s in &series {
            picked.extend(newest_where(&|k| &k.series == s));
        }
        if series.len() < 2 {
            step(&format!(
                "apt offers only the {} series of cloud kernels for {}: no newer series to test",
                series.join(", "),
                arch.deb()
            ));
        }
    } else {
        for name in names {
            // A series name picks that series' newest; anything else must
            // name a package (the newest one, if it names several).
            let found = if series.contains(name) {
                newest_where(&|k| &k.series == name)
            } else {
                newest_where(&|k| k.matches(name))
            };
            if let Some(k) = found {
                picked.push(k);
            } else {
                let have: Vec<String> = offered
                    .iter()
                    .map(|k| format!("{} ({})", k.abi, k.version))
                    .collect();
                bail!(
                    "no {} cloud kernel matches `{name}`; series offered: {}; packages: {}",
                    arch.deb(),
                    series.join(", "),
                    have.join(", ")
                );
            }
        }
    }
    // `--kernel 6.1 --kernel 6.1.0-56` may name one package twice.
    let mut seen = BTreeSet::new();
    picked.retain(|k| seen.insert(k.package.clone()));
    Ok(picked)
}

fn available(apt: &Apt, arch: Arch, regex: &str) -> anyhow::Result<Vec<Kernel>> {
    Ok(apt
        .search(regex)?
        .into_iter()
        .filter_map(|(pkg, version)| Kernel::from_package(arch, &pkg, &version))
        .collect())
}

/// Kernels prepared by earlier runs, for when apt cannot answer.
fn cached(arch: Arch, cache: &Path) -> Vec<Kernel> {
    let dir = cache.join("kernels").join(arch.deb());
    let Ok(entries) = fs::read_dir(&dir) else {
        return vec![];
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join(COMPLETE).exists())
        .filter_map(|e| fs::read_to_string(e.path().join(PACKAGE)).ok())
        .filter_map(|s| {
            let (pkg, version) = s.trim().split_once(' ')?;
            Kernel::from_package(arch, pkg, version)
        })
        .collect()
}

/// Cache entry files.
const COMPLETE: &str = ".complete";
const PACKAGE: &str = "package";
const ORDER: &str = "modules.order";

/// A kernel ready to boot.
pub struct Prepared {
    pub vmlinuz: PathBuf,
    /// Identifies the kernel in the initramfs cache key.
    pub id: String,
    /// Plain `.ko` files, in load order.
    pub modules: Vec<PathBuf>,
}

/// Downloads and extracts `k` once; later runs use the cache.
pub fn prepare(host: &Host, apt: &Apt, k: &Kernel, cache: &Path) -> anyhow::Result<Prepared> {
    let dir = k.dir(cache);
    // The marker names the modules taken, so a changed list re-extracts.
    let marker = WANTED_MODULES.join(" ");
    if fs::read_to_string(dir.join(COMPLETE)).ok().as_deref() != Some(marker.as_str()) {
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        step(&format!(
            "kernel {} {}: downloading {}",
            k.arch.name(),
            k.version,
            k.package
        ));
        let tmp = dir.join("download");
        let deb = apt.download(&k.package, &k.version, &tmp)?;
        let x = tmp.join("x");
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x))?;
        extract(host, &x, &dir).with_context(|| format!("extracting {}", deb.display()))?;
        fs::remove_dir_all(&tmp)?;
        fs::write(dir.join(PACKAGE), format!("{} {}\n", k.package, k.version))?;
        fs::write(dir.join(COMPLETE), &marker)?;
    } else {
        step(&format!(
            "kernel {} {}: cached ({})",
            k.arch.name(),
            k.version,
            dir.display()
        ));
    }
    prepared(&dir, format!("{}-{}", k.arch.deb(), k.abi))
}

/// The kernel cached in `dir` (`vmlinuz`, `modules/`, `modules.order`).
pub(super) fn prepared(dir: &Path, id: String) -> anyhow::Result<Prepared> {
    let order = fs::read_to_string(dir.join(ORDER))?;
    Ok(Prepared {
        vmlinuz: dir.join("vmlinuz"),
        id,
        modules: order
            .lines()
            .filter(|l| !l.is_empty())
            .map(|m| dir.join("modules").join(format!("{m}.ko")))
            .collect(),
    })
}

/// Copies vmlinuz and the wanted modules (with their dependencies, in load
/// order) from the unpacked package `x` into `dir`.
fn extract(host: &Host, x: &Path, dir: &Path) -> anyhow::Result<()> {
    let vmlinuz = fs::read_dir(x.join("boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .context("no boot/vmlinuz-* in the package")?;
    fs::copy(&vmlinuz, dir.join("vmlinuz"))?;
    collect_modules(host, x, WANTED_MODULES, dir)
}

/// Copies the modules named in `wanted`, with their dependencies, from
/// the tree `root` (a package, or a `make modules_install` destination:
/// `lib/modules/<release>` or `usr/lib/modules/<release>` below it) into
/// `dir/modules`, and writes their load order to `dir/modules.order`.
/// Wanted modules that are built in are said so and skipped.
pub(super) fn collect_modules(
    host: &Host,
    root: &Path,
    wanted: &[&str],
    dir: &Path,
) -> anyhow::Result<()> {
    // Debian 12 ships /lib/modules/<release>; newer ones /usr/lib/modules.
    let moddir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .filter_map(|p| fs::read_dir(root.join(p)).ok())
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .context("no lib/modules/<release> in the package")?;
    let mut files = HashMap::new();
    index_modules(&moddir, &mut files)?;
    let builtin: BTreeSet<String> = fs::read_to_string(moddir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .map(|f| module_name(f).0)
        .collect();

    let mut plan = Plan {
        files: &files,
        builtin: &builtin,
        host,
        loaded: vec![],
        plain: HashMap::new(),
        visiting: vec![],
    };
    for m in wanted {
        plan.visit(m)?;
    }
    fs::create_dir_all(dir.join("modules"))?;
    for name in &plan.loaded {
        fs::write(
            dir.join("modules").join(format!("{name}.ko")),
            &plan.plain[name],
        )?;
    }
    let mut order = plan.loaded.join("\n");
    order.push('\n');
    fs::write(dir.join(ORDER), order)?;
    step(&format!(
        "modules, in load order: {}",
        plan.loaded.join(" ")
    ));
    Ok(())
}

/// Every module file under `dir`, by module name.
fn index_modules(dir: &Path, out: &mut HashMap<String, PathBuf>) -> anyhow::Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            index_modules(&p, out)?;
        } else if let Some(f) = p.file_name().and_then(|n| n.to_str()) {
            let (name, is_module) = module_name(f);
            if is_module {
                out.insert(name, p);
            }
        }
    }
    Ok(())
}

/// `nf_conntrack.ko.xz` -> (`nf_conntrack`, true). The kernel treats `-`
/// and `_` in module names alike; so do we.
fn module_name(file: &str) -> (String, bool) {
    let base = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext));
    (base.unwrap_or(file).replace('-', "_"), base.is_some())
}

/// Depth-first walk over module dependencies; `loaded` ends up in an
/// order where every module comes after what it needs.
struct Plan<'a> {
    files: &'a HashMap<String, PathBuf>,
    builtin: &'a BTreeSet<String>,
    host: &'a Host,
    loaded: Vec<String>,
    plain: HashMap<String, Vec<u8>>,
    visiting: Vec<String>,
}

impl Plan<'_> {
    fn visit(&mut self, name: &str) -> anyhow::Result<()> {
        let name = name.replace('-', "_");
        if self.loaded.contains(&name) {
            return Ok(());
        }
        if self.visiting.contains(&name) {
            bail!(
                "module dependency cycle: {} -> {name}",
                self.visiting.join(" -> ")
            );
        }
        let Some(path) = self.files.get(&name) else {
            if self.builtin.contains(&name) {
                eprintln!("    module {name}: built into this kernel");
            } else {
                // Not fatal: the suite will fail and say what is missing,
                // and every other module still gets its chance.
                eprintln!(
                    "    module {name}: WARNING: neither a module in the package nor built in"
                );
            }
            return Ok(());
        };
        let bytes = decompress(self.host, path)?;
        let info = modinfo::parse(&bytes)
            .with_context(|| format!("reading .modinfo of {}", path.display()))?;
        self.visiting.push(name.clone());
        for dep in info.depends.iter().chain(&info.softdep_pre) {
            // A soft dependency names a module that may be built in or
            // may be an alias (`crc32c`): only real module files count.
            if info.depends.contains(dep) || self.files.contains_key(&dep.replace('-', "_")) {
                self.visit(dep)?;
            }
        }
        self.visiting.pop();
        self.plain.insert(name.clone(), bytes);
        self.loaded.push(name);
        Ok(())
    }
}

fn decompress(host: &Host, path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let (tool, pkg) = if name.ends_with(".xz") {
        ("xz", "xz-utils")
    } else if name.ends_with(".zst") {
        ("zstd", "zstd")
    } else if name.ends_with(".gz") {
        ("gzip", "gzip")
    } else {
        return fs::read(path).with_context(|| format!("reading {}", path.display()));
    };
    host.ensure_installed(pkg)?;
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_give_series_and_abi() {
        let k = Kernel::from_package(
            Arch::X86_64,
            "linux-image-6.1.0-56-cloud-amd64-unsigned",
            "6.1.192-2",
        )
        .unwrap();
        assert_eq!((k.series.as_str(), k.abi.as_str()), ("6.1", "6.1.0-56"));
        let k = Kernel::from_package(
            Arch::Aarch64,
            "linux-image-6.12.117+deb12-cloud-arm64-unsigned",
            "6.12.117-1~deb12u1",
        )
        .unwrap();
        assert_eq!(
            (k.series.as_str(), k.abi.as_str()),
            ("6.12", "6.12.117+deb12")
        );
        assert!(k.matches("6.12.117") && k.matches("6.12.117+deb12") && !k.matches("6.12.11"));
        assert!(Kernel::from_package(Arch::X86_64, "linux-image-cloud-amd64", "1").is_none());
        assert!(
            Kernel::from_package(
                Arch::X86_64,
                "linux-image-6.1.0-56-cloud-arm64-unsigned",
                "1"
            )
            .is_none()
        );
    }

    #[test]
    fn module_file_names() {
        assert_eq!(
            module_name("nf_conntrack.ko.xz"),
            ("nf_conntrack".into(), true)
        );
        assert_eq!(
            module_name("crc32c-intel.ko"),
            ("crc32c_intel".into(), true)
        );
        assert_eq!(module_name("modules.dep"), ("modules.dep".into(), false));
    }
}
