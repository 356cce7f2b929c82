//! apt, for host packages and for the Debian kernels the VMs boot.
//!
//! Host packages are installed one per `apt-get install` call: a combined
//! call failed here with a resolver error while single ones worked.
//! Kernels (and busybox for a foreign architecture) are looked up and
//! downloaded with a private apt state per architecture (lists and caches
//! under the VM cache), so the system's apt setup stays untouched, and so
//! the lists the matrix is chosen from are fresh: a machine image's own
//! lists can be months old and miss the newer kernel series (seen here:
//! the host's amd64 lists offered 6.1 only, the fresh arm64 ones 6.12 too).
use std::{
    cell::{Cell, RefCell},
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
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

    /// The installed version of `pkg`, if it is installed.
    pub fn installed_version(&self, pkg: &str) -> Option<String> {
        self.is_installed(pkg)
            .then(|| output(Command::new("dpkg-query").args(["-W", "-f=${Version}", pkg])).ok())
            .flatten()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    /// The host's Debian architecture (`amd64`, `arm64`).
    pub fn deb_arch(&self) -> &str {
        &self.deb_arch
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
        if !has_index(Path::new("/var/lib/apt/lists"), "_Packages") {
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
            update_host_lists()?;
        }
        Ok(())
    }
}

/// apt as seen for one Debian architecture.
pub struct Apt {
    /// Another architecture than the host's.
    pub foreign: bool,
    /// Options that point apt at the private state.
    opts: Vec<String>,
    lists: PathBuf,
    /// Whether this run already refreshed the private lists.
    updated: Cell<bool>,
}

impl Apt {
    pub fn for_arch(host: &Host, arch: Arch, cache: &Path) -> anyhow::Result<Apt> {
        let root = cache.join(format!("apt-{}", arch.deb()));
        let lists = root.join("lists");
        fs::create_dir_all(lists.join("partial"))?;
        fs::create_dir_all(root.join("cache/archives/partial"))?;
        // An empty dpkg status: the host's installed packages are of no
        // interest to lookups of kernels to boot elsewhere.
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
            foreign: arch.deb() != host.deb_arch,
            opts,
            lists,
            updated: Cell::new(false),
        })
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.args(&self.opts);
        c
    }

    /// Fetches package lists if there are none, or if they are more than a
    /// day old: the newest kernel of each series is what the matrix tests.
    pub fn ensure_lists(&self) -> anyhow::Result<()> {
        match lists_age(&self.lists) {
            Some(age) if age < LISTS_MAX_AGE => Ok(()),
            _ => self.update(),
        }
    }

    /// Refreshes package lists, at most once per run.
    pub fn update(&self) -> anyhow::Result<()> {
        if !self.updated.replace(true) {
            step(&format!(
                "apt-get update (private lists in {})",
                self.lists.display()
            ));
            update_lists(
                || {
                    let mut c = self.cmd("apt-get");
                    c.args(["-q", "update"]);
                    c
                },
                &self.lists,
                "_Packages",
            )?;
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

const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// `apt-get update` for the system's own lists, as `update_lists` runs it.
pub fn update_host_lists() -> anyhow::Result<()> {
    update_lists(
        || {
            let mut c = Command::new("apt-get");
            c.args(["-q", "update"]);
            c
        },
        Path::new("/var/lib/apt/lists"),
        "_Packages",
    )
}

/// Runs `apt-get update`, retried once, and goes on with what it fetched
/// when it still fails but left indexes (file names containing `kind`) in
/// `lists`. A mirror caught mid-sync serves an index whose size its signed
/// Release does not list (seen here for bookworm-security's armhf
/// Packages, while every other index fetched): apt keeps the others and
/// exits 100, and a lookup that needs the missing one fails by name later.
pub fn update_lists(update: impl Fn() -> Command, lists: &Path, kind: &str) -> anyhow::Result<()> {
    let Err(first) = run(&mut update()) else {
        return Ok(());
    };
    step(&format!(
        "apt-get update failed ({first:#}); retrying in {}s",
        UPDATE_RETRY_AFTER.as_secs()
    ));
    std::thread::sleep(UPDATE_RETRY_AFTER);
    match run(&mut update()) {
        Ok(()) => Ok(()),
        Err(e) if has_index(lists, kind) => {
            step(&format!(
                "warning: apt-get update failed again ({e:#}); going on with the indexes it \
                 fetched into {} (the failed ones are named above)",
                lists.display()
            ));
            Ok(())
        }
        Err(e) => Err(e),
    }
}

const UPDATE_RETRY_AFTER: Duration = Duration::from_secs(15);

/// Whether an apt lists directory holds any index whose file name
/// contains `kind` (`_Packages`, `_Sources`).
fn has_index(lists: &Path, kind: &str) -> bool {
    fs::read_dir(lists).is_ok_and(|d| {
        d.filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().contains(kind))
    })
}

/// How long ago the newest package index in `lists` was written; None
/// when there is none.
fn lists_age(lists: &Path) -> Option<Duration> {
    fs::read_dir(lists)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains("_Packages"))
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max()
        .map(|t| t.elapsed().unwrap_or_default())
}

/// Debian version order (epochs, tildes and all), as dpkg defines it.
pub fn version_gt(a: &str, b: &str) -> anyhow::Result<bool> {
    let status = Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .context("running dpkg --compare-versions")?;
    Ok(status.success())
}

/// Downloads the newest source package `pkg` into `dir` and unpacks it
/// there with its Debian patches (`dpkg-source -x`); returns the tree.
///
/// apt fetches it, so the files are checked against the signed Sources
/// index. It uses a private state (lists under `cache`) whose sources are
/// the `deb-src` twins of the host's Debian repositories: the system's
/// apt setup stays untouched, and hosts without `deb-src` lines work.
pub fn source(host: &Host, cache: &Path, pkg: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    for p in ["dpkg-dev", "bzip2", "xz-utils"] {
        host.ensure_installed(p)?;
    }
    let root = cache.join("apt-source");
    let lists = root.join("lists");
    let parts = root.join("sources.list.d");
    for d in [
        lists.join("partial"),
        root.join("cache/archives/partial"),
        parts.clone(),
    ] {
        fs::create_dir_all(d)?;
    }
    let status = root.join("status");
    fs::write(&status, "")?;
    // "URI SUITE COMPONENT ORIGIN IDENTIFIER" per index the host uses.
    let targets = output(Command::new("apt-get").args([
        "indextargets",
        "--format",
        "$(REPO_URI) $(RELEASE) $(COMPONENT) $(ORIGIN) $(IDENTIFIER)",
    ]))?;
    let keyring = Path::new("/usr/share/keyrings/debian-archive-keyring.gpg");
    let signed_by = if keyring.exists() {
        format!("[signed-by={}] ", keyring.display())
    } else {
        String::new()
    };
    let mut lines = BTreeSet::new();
    for t in targets.lines() {
        if let [uri, suite, component, "Debian", "Packages"] =
            t.split_whitespace().collect::<Vec<_>>()[..]
        {
            lines.insert(format!("deb-src {signed_by}{uri} {suite} {component}\n"));
        }
    }
    if lines.is_empty() {
        bail!("the host's apt has no Debian repository to take {pkg}'s source from");
    }
    let list = root.join("sources.list");
    fs::write(&list, lines.into_iter().collect::<String>())?;
    let d = |p: &Path| p.display().to_string();
    let apt = || {
        let mut c = Command::new("apt-get");
        for o in [
            format!("Dir::Etc::SourceList={}", d(&list)),
            format!("Dir::Etc::SourceParts={}", d(&parts)),
            format!("Dir::State::Lists={}", d(&lists)),
            format!("Dir::State::status={}", d(&status)),
            format!("Dir::Cache={}", d(&root.join("cache"))),
            "APT::Sandbox::User=root".into(),
        ] {
            c.arg("-o").arg(o);
        }
        c
    };
    step(&format!("{pkg}: fetching its Debian source"));
    update_lists(
        || {
            let mut c = apt();
            c.args(["-q", "update"]);
            c
        },
        &lists,
        "_Sources",
    )?;
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir)?;
    run(apt()
        .args(["-q", "source", "--download-only", pkg])
        .current_dir(dir))?;
    let dsc = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "dsc"))
        .with_context(|| format!("apt-get source {pkg} left no .dsc in {}", dir.display()))?;
    let tree = dir.join("tree");
    run(Command::new("dpkg-source")
        .arg("-x")
        .arg(&dsc)
        .arg(&tree)
        .current_dir(dir))?;
    Ok(tree)
}
