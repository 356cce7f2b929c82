//! apt, for host packages and for the Debian kernels the VMs boot.
//!
//! Host packages are installed one per `apt-get install` call: a combined
//! call failed here with a resolver error while single ones worked.
//! Packages of another architecture (arm64 kernels and busybox on an amd64
//! host) are looked up and downloaded with a private apt state (lists and
//! caches under the VM cache), so the system's apt setup stays untouched.
use std::{
    cell::{Cell, RefCell},
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::Arch;
use crate::{output, run, step};

/// The machine we run on: its dpkg database and its apt lists.
pub struct Host {
    /// `apt-get update` runs at most once per xtask run.
    updated: Cell<bool>,
    /// Packages already checked in this run (said once, not per use).
    ensured: RefCell<BTreeSet<String>>,
    deb_arch: String,
}

impl Host {
    pub fn new() -> Host {
        let deb_arch = output(Command::new("dpkg").arg("--print-architecture"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "amd64".into());
        Host {
            updated: Cell::new(false),
            ensured: RefCell::default(),
            deb_arch,
        }
    }

    pub fn is_installed(&self, pkg: &str) -> bool {
        output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", pkg]))
            .is_ok_and(|s| s.trim() == "installed")
    }

    /// Installs `pkg` unless it is there already; says which.
    pub fn ensure_installed(&self, pkg: &str) -> anyhow::Result<()> {
        if !self.ensured.borrow_mut().insert(pkg.to_string()) {
            return Ok(());
        }
        if self.is_installed(pkg) {
            step(&format!("{pkg}: present"));
            return Ok(());
        }
        step(&format!("{pkg}: installing"));
        if !lists_present(Path::new("/var/lib/apt/lists")) {
            self.update()?;
        }
        let install = || {
            run(Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", pkg])
                .env("DEBIAN_FRONTEND", "noninteractive"))
        };
        match install() {
            Ok(()) => Ok(()),
            // Stale lists name files the mirror no longer has: refresh once.
            Err(e) if !self.updated.get() => {
                step(&format!(
                    "{pkg}: install failed ({e:#}); updating apt lists and retrying"
                ));
                self.update()?;
                install()
            }
            Err(e) => Err(e),
        }
    }

    fn update(&self) -> anyhow::Result<()> {
        if !self.updated.replace(true) {
            step("apt-get update");
            run(Command::new("apt-get").arg("update"))?;
        }
        Ok(())
    }
}

/// apt as seen for one Debian architecture.
pub struct Apt<'h> {
    host: &'h Host,
    /// Options that point apt at a private state for a foreign
    /// architecture; empty for the host's own.
    opts: Vec<String>,
    lists: PathBuf,
    /// Whether this run already refreshed the private lists.
    updated: Cell<bool>,
}

impl<'h> Apt<'h> {
    pub fn for_arch(host: &'h Host, arch: Arch, cache: &Path) -> anyhow::Result<Apt<'h>> {
        if arch.deb() == host.deb_arch {
            return Ok(Apt {
                host,
                opts: vec![],
                lists: "/var/lib/apt/lists".into(),
                updated: Cell::new(false),
            });
        }
        let root = cache.join(format!("apt-{}", arch.deb()));
        let lists = root.join("lists");
        fs::create_dir_all(lists.join("partial"))?;
        fs::create_dir_all(root.join("cache/archives/partial"))?;
        // An empty dpkg status: the host's installed packages are of no
        // interest to lookups for another architecture.
        let status = root.join("status");
        if !status.exists() {
            fs::write(&status, "")?;
        }
        let d = |p: &Path| p.display().to_string();
        let opts = [
            format!("APT::Architecture={}", arch.deb()),
            format!("APT::Architectures={}", arch.deb()),
            format!("Dir::State::Lists={}", d(&lists)),
            format!("Dir::State::status={}", d(&status)),
            format!("Dir::Cache={}", d(&root.join("cache"))),
            // As root, apt hands downloads to the `_apt` user, who cannot
            // write under root's home; it would fall back with a warning.
            "APT::Sandbox::User=root".into(),
            // AppStream metadata (icons, descriptions) is of no use here.
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect();
        Ok(Apt {
            host,
            opts,
            lists,
            updated: Cell::new(false),
        })
    }

    fn is_private(&self) -> bool {
        !self.opts.is_empty()
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.args(&self.opts);
        if !self.is_private() {
            c.args(["-o", "APT::Sandbox::User=root"]);
        }
        c
    }

    /// Fetches package lists if there are none yet.
    pub fn ensure_lists(&self) -> anyhow::Result<()> {
        if !lists_present(&self.lists) {
            self.update()
        } else {
            Ok(())
        }
    }

    /// Refreshes package lists, at most once per run.
    pub fn update(&self) -> anyhow::Result<()> {
        if !self.is_private() {
            return self.host.update();
        }
        if !self.updated.replace(true) {
            step(&format!(
                "apt-get update (private lists in {})",
                self.lists.display()
            ));
            run(self.cmd("apt-get").args(["-q", "update"]))?;
        }
        Ok(())
    }

    /// `(package, newest version)` of every package whose name matches the
    /// regular expression.
    pub fn search(&self, name_regex: &str) -> anyhow::Result<Vec<(String, String)>> {
        let names: Vec<String> =
            output(
                self.cmd("apt-cache")
                    .args(["search", "--names-only", name_regex]),
            )?
            .lines()
            .filter_map(|l| l.split(" - ").next())
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        if names.is_empty() {
            return Ok(vec![]);
        }
        // madison: "name | version | archive" per available version.
        let table = output(self.cmd("apt-cache").arg("madison").args(&names))?;
        let mut best: Vec<(String, String)> = vec![];
        for line in table.lines() {
            let cols: Vec<&str> = line.split('|').map(str::trim).collect();
            let [name, version, ..] = cols[..] else {
                continue;
            };
            match best.iter_mut().find(|(n, _)| n == name) {
                Some((_, v)) => {
                    if version_gt(version, v)? {
                        *v = version.to_string();
                    }
                }
                None => best.push((name.to_string(), version.to_string())),
            }
        }
        Ok(best)
    }

    /// Downloads `pkg=version` into `dir` and returns the .deb's path.
    pub fn download(&self, pkg: &str, version: &str, dir: &Path) -> anyhow::Result<PathBuf> {
        fs::create_dir_all(dir)?;
        let spec = format!("{pkg}={version}");
        let fetch = || {
            run(self
                .cmd("apt-get")
                .args(["-q", "download", &spec])
                .current_dir(dir))
        };
        if let Err(e) = fetch() {
            // The usual cause: lists older than the mirror (old versions vanish).
            step(&format!(
                "downloading {spec} failed ({e:#}); updating lists and retrying"
            ));
            self.update()?;
            fetch()?;
        }
        // apt names it name_version_arch.deb, with the epoch's ':' escaped.
        let prefix = format!("{pkg}_");
        fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
            })
            .with_context(|| format!("apt-get download {spec} left no .deb in {}", dir.display()))
    }
}

/// Whether an apt lists directory holds any package index.
fn lists_present(lists: &Path) -> bool {
    fs::read_dir(lists)
        .map(|d| {
            d.filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
        .unwrap_or(false)
}

/// Debian version order (epochs, tildes and all), as dpkg defines it.
pub fn version_gt(a: &str, b: &str) -> anyhow::Result<bool> {
    let status = Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .context("running dpkg --compare-versions")?;
    Ok(status.success())
}

/// A static busybox for `arch`: the host's own from busybox-static when the
/// architectures match, else the package for `arch`, downloaded and cached.
pub fn busybox(host: &Host, apt: &Apt, arch: Arch, cache: &Path) -> anyhow::Result<PathBuf> {
    if !apt.is_private() {
        host.ensure_installed("busybox-static")?;
        return Ok(PathBuf::from("/bin/busybox"));
    }
    let dir = cache.join("busybox").join(arch.deb());
    let bin = dir.join("busybox");
    if bin.exists() {
        step(&format!(
            "busybox for {}: cached ({})",
            arch.name(),
            bin.display()
        ));
        return Ok(bin);
    }
    apt.ensure_lists()?;
    let found = apt.search("^busybox-static$")?;
    let Some((pkg, version)) = found.first() else {
        bail!("apt offers no busybox-static for {}", arch.deb());
    };
    step(&format!(
        "busybox for {}: downloading {pkg} {version}",
        arch.name()
    ));
    let tmp = dir.join("download");
    let _ = fs::remove_dir_all(&tmp);
    let deb = apt.download(pkg, version, &tmp)?;
    let x = tmp.join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x))?;
    let from = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| x.join(p))
        .find(|p| p.exists())
        .with_context(|| format!("no busybox binary in {}", deb.display()))?;
    super::write_atomic(&bin, &fs::read(&from)?)?;
    let _ = fs::remove_dir_all(&tmp);
    Ok(bin)
}
