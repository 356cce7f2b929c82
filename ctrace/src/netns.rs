//! Network namespaces: creating anonymous ones for tests and the lab,
//! opening existing ones, running code inside them, and finding them all.
//!
//! Nothing here ever switches the namespace of a thread it did not create:
//! callers may be tokio workers, and a worker silently moved into another
//! namespace would open every later socket there. Work that must happen
//! inside a namespace runs on a fresh thread that enters it and then ends;
//! sockets opened there stay bound to that namespace for their whole life.
//!
//! Namespaces created here are anonymous (never bind-mounted under
//! /run/netns): they live exactly as long as a file descriptor or a thread
//! refers to them, so a crash or a panicking test leaves nothing behind.
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};

use anyhow::{Context, Result, bail};

/// `_IO(NSIO, 0x3)` from linux/nsfs.h: which kind of namespace an nsfs file is.
const NS_GET_NSTYPE: u32 = (0xb7 << 8) | 0x3;

/// The calling thread's network namespace, as a path that stays correct
/// whichever thread opens it (unlike /proc/self, which is the thread group
/// leader's).
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// A network namespace held open by a file descriptor: it lives as long as
/// this value (or a thread inside it) does. Anonymous: not bind-mounted in
/// /run/netns, so nothing is left behind if the process is killed.
pub struct NetNs {
    fd: OwnedFd,
    inode: u64,
    /// Made by [`NetNs::create`]: only such namespaces may have their
    /// sysctls changed, so no code path can retune the host by mistake.
    created: bool,
}

impl fmt::Debug for NetNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetNs")
            .field("inode", &self.inode)
            .field("fd", &self.fd.as_raw_fd())
            .field("created", &self.created)
            .finish()
    }
}

impl NetNs {
    /// A new, empty network namespace, owned by this value. Its `lo` is
    /// down, as the kernel makes it:
    /// [`crate::netlink::rtnetlink::new_netns`] brings it up.
    ///
    /// It is made on a throwaway thread (unshare() moves only the calling
    /// thread), which keeps its handle and exits.
    pub fn create() -> Result<NetNs> {
        let worker = thread::Builder::new()
            .name("netns-create".into())
            .spawn(|| -> Result<NetNs> {
                // SAFETY: plain syscall on this thread, which ends right after.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error()).context(
                        "unshare(CLONE_NEWNET) (creating a network namespace needs CAP_SYS_ADMIN)",
                    );
                }
                let mut ns = NetNs::open(Path::new(THREAD_NETNS))?;
                ns.created = true;
                Ok(ns)
            })
            .context("spawning a thread to create a network namespace")?;
        join(worker)
    }

    /// Opens an existing namespace by path (/proc/PID/ns/net,
    /// /run/netns/NAME) and checks that it is a network namespace.
    pub fn open(path: &Path) -> Result<NetNs> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        check_netns(file.as_fd(), path)?;
        let inode = file
            .metadata()
            .with_context(|| format!("fstat of {}", path.display()))?
            .ino();
        Ok(NetNs {
            fd: file.into(),
            inode,
            created: false,
        })
    }

    /// The calling thread's network namespace.
    pub fn current() -> Result<NetNs> {
        NetNs::open(Path::new(THREAD_NETNS))
    }

    /// Namespace identity: the nsfs inode, equal to `net->ns.inum` in the
    /// kernel (what BPF programs and `ip netns identify`-style tools see).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Another handle to the same namespace, keeping it alive on its own.
    pub fn try_clone(&self) -> Result<NetNs> {
        Ok(NetNs {
            fd: self.fd.try_clone().with_context(|| {
                format!("duplicating the handle of network namespace {}", self.inode)
            })?,
            inode: self.inode,
            created: self.created,
        })
    }

    /// Run f on a new thread that has setns()'d into this namespace; sockets
    /// created there stay bound to it after the thread ends. Never setns the
    /// calling thread (the caller may be a tokio worker).
    ///
    /// Blocks until `f` returns. A panic in `f` is propagated to the caller.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let fd = self.fd.as_fd();
        let inode = self.inode;
        thread::scope(|s| {
            let worker = thread::Builder::new()
                .name("netns-run".into())
                .spawn_scoped(s, move || -> Result<T> {
                    enter(fd, inode)?;
                    Ok(f())
                })
                .context("spawning a thread to enter a network namespace")?;
            match worker.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Long-lived thread inside the namespace (listeners, traffic
    /// generators).
    ///
    /// The thread is started from a short-lived thread that entered the
    /// namespace and inherits the namespace from it, so a failure to enter is
    /// an error here rather than a thread that runs in the wrong place.
    pub fn spawn<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<JoinHandle<T>> {
        if name.contains('\0') {
            bail!("thread name {name:?} contains NUL");
        }
        let builder = thread::Builder::new().name(name.to_owned());
        self.run(move || builder.spawn(f))?.with_context(|| {
            format!(
                "spawning thread {name:?} in network namespace {}",
                self.inode
            )
        })
    }

    /// Write a per-netns sysctl (e.g. "net/ipv4/ip_forward" or
    /// "net.ipv4.ip_forward") from a thread inside the namespace. Only for
    /// namespaces the caller created.
    ///
    /// /proc/sys/net resolves against the opening thread's namespace, which
    /// is why this runs inside it. Keys outside net/ are refused: they are
    /// global, and writing them from any namespace would change the host.
    pub fn set_sysctl(&self, key: &str, value: &str) -> Result<()> {
        if !self.created {
            bail!(
                "refusing to set sysctl {key} in network namespace {}: only namespaces made by \
                 NetNs::create may be changed",
                self.inode
            );
        }
        let path = Path::new("/proc/sys").join(sysctl_relpath(key)?);
        self.run(|| fs::write(&path, value))?.with_context(|| {
            format!(
                "writing {value:?} to {} in network namespace {}",
                path.display(),
                self.inode
            )
        })
    }

    /// IPv6 duplicate address detection off for the links this namespace
    /// will get: a new link's link-local address stays tentative for a
    /// second or so, and neighbour discovery cannot start from it, so the
    /// first IPv6 packet a fresh router forwards waits (seen: a first
    /// connect of 2 s, and now and then a failed one).
    pub fn no_dad(&self) -> Result<()> {
        self.set_sysctl("net/ipv6/conf/default/accept_dad", "0")?;
        self.set_sysctl("net/ipv6/conf/all/accept_dad", "0")
    }
}

/// setns() the calling thread into `fd`'s network namespace.
fn enter(fd: BorrowedFd<'_>, inode: u64) -> Result<()> {
    // A thread starts in its creator's namespace. setns into the one it is
    // in already would still ask CAP_SYS_ADMIN, which tracing its own
    // namespace with CAP_BPF+CAP_PERFMON+CAP_NET_ADMIN must not need.
    if fs::metadata(THREAD_NETNS).is_ok_and(|m| m.ino() == inode) {
        return Ok(());
    }
    // SAFETY: plain syscall; only ever called on threads made for the purpose.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| {
            format!("setns into network namespace {inode} (needs CAP_SYS_ADMIN)")
        });
    }
    Ok(())
}

fn join<T>(worker: JoinHandle<Result<T>>) -> Result<T> {
    match worker.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn ns_kind(nstype: i32) -> String {
    match nstype {
        libc::CLONE_NEWNET => "network".into(),
        libc::CLONE_NEWNS => "mount".into(),
        libc::CLONE_NEWUTS => "uts".into(),
        libc::CLONE_NEWIPC => "ipc".into(),
        libc::CLONE_NEWPID => "pid".into(),
        libc::CLONE_NEWUSER => "user".into(),
        libc::CLONE_NEWCGROUP => "cgroup".into(),
        libc::CLONE_NEWTIME => "time".into(),
        t => format!("type {t:#x}"),
    }
}

/// Fails unless `fd` refers to a network namespace.
fn check_netns(fd: BorrowedFd<'_>, path: &Path) -> Result<()> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
    let nstype = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    if nstype >= 0 {
        if nstype != libc::CLONE_NEWNET {
            bail!(
                "{} is a {} namespace, not a network namespace",
                path.display(),
                ns_kind(nstype)
            );
        }
        return Ok(());
    }
    // ENOTTY: not an nsfs file, or a kernel before 4.11 without the ioctl.
    // nsfs names its files "net:[INODE]", which tells the two apart.
    let err = io::Error::last_os_error();
    let link = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default();
    if link.to_string_lossy().starts_with("net:[") {
        return Ok(());
    }
    bail!(
        "{} is not a network namespace file (NS_GET_NSTYPE: {err})",
        path.display()
    )
}

/// "net.ipv4.ip_forward" or "net/ipv4/ip_forward" -> "net/ipv4/ip_forward",
/// refusing anything that could reach outside /proc/sys/net.
fn sysctl_relpath(key: &str) -> Result<PathBuf> {
    // Dots separate levels only when no slash is used: interface names such
    // as "eth0.100" contain dots, and sysctl(8) writes them with slashes.
    let parts: Vec<&str> = if key.contains('/') {
        key.split('/').collect()
    } else {
        key.split('.').collect()
    };
    if parts.first() != Some(&"net") || parts.len() < 2 {
        bail!("sysctl {key:?} is not under net/: only per-namespace (net/...) sysctls may be set");
    }
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\0'))
    {
        bail!("malformed sysctl name {key:?}");
    }
    Ok(parts.iter().collect())
}

/// Opens the namespace a user named: a path, a /run/netns name or an
/// inode number (as `--netns` takes them).
pub fn open_spec(spec: &str) -> Result<NetNs> {
    if spec.contains('/') {
        return NetNs::open(Path::new(spec));
    }
    let found = discover()?;
    let info = match spec.parse::<u64>() {
        Ok(inode) => found.iter().find(|i| i.inode == inode),
        Err(_) => found.iter().find(|i| i.name.as_deref() == Some(spec)),
    };
    match info {
        Some(i) => NetNs::open(&i.path),
        None => anyhow::bail!(
            "no network namespace `{spec}` (a /run/netns name, an inode from `ctrace status`, or a path)"
        ),
    }
}

/// One network namespace found by [`discover`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetNsInfo {
    pub inode: u64,
    /// An openable path to it: /run/netns/NAME when named, else the ns link
    /// of one of its tasks (valid while that task lives).
    pub path: PathBuf,
    /// Its name under /run/netns, if it has one.
    pub name: Option<String>,
    /// How many tasks (threads) are in it.
    pub pids: usize,
}

/// All network namespaces visible to us: /run/netns/* (named) and
/// /proc/*/task/*/ns/net (any task, including threads of other processes
/// that setns'd — that is how ctrace sees the anonymous namespaces of its
/// tests and lab). Deduplicated by inode, sorted by inode.
///
/// Costs one stat() per task plus a directory read per process, so running
/// it every second on a router with hundreds of tasks is cheap. Tasks that
/// exit mid-scan, and those we may not inspect, are skipped. A namespace
/// kept alive only by a file descriptor or a mount elsewhere (not under
/// /run/netns) is invisible to this scan.
pub fn discover() -> Result<Vec<NetNsInfo>> {
    let mut found: BTreeMap<u64, NetNsInfo> = BTreeMap::new();

    match fs::read_dir("/run/netns") {
        Ok(dir) => {
            for entry in dir.flatten() {
                let path = entry.path();
                // Opening checks the type: a file left behind by a failed
                // `ip netns add` is a plain empty file, not a namespace.
                match NetNs::open(&path) {
                    Ok(ns) => {
                        found.entry(ns.inode).or_insert_with(|| NetNsInfo {
                            inode: ns.inode,
                            path: path.clone(),
                            name: Some(entry.file_name().to_string_lossy().into_owned()),
                            pids: 0,
                        });
                    }
                    Err(e) => log::debug!("skipping {}: {e:#}", path.display()),
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => log::debug!("cannot list /run/netns: {e}"),
    }

    let proc_dir = fs::read_dir("/proc").context("listing /proc (is procfs mounted?)")?;
    let mut path = PathBuf::with_capacity(64);
    for proc_entry in proc_dir.flatten() {
        let pid = proc_entry.file_name();
        if !pid.as_encoded_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        path.clear();
        path.push("/proc");
        path.push(&pid);
        path.push("task");
        // The process may have exited since /proc was read.
        let Ok(tasks) = fs::read_dir(&path) else {
            continue;
        };
        for task in tasks.flatten() {
            path.push(task.file_name());
            path.push("ns/net");
            // stat follows the magic link to the nsfs inode. It fails for
            // tasks that exited (ENOENT) or that we may not ptrace (EACCES).
            if let Ok(meta) = fs::metadata(&path) {
                let info = found.entry(meta.ino()).or_insert_with(|| NetNsInfo {
                    inode: meta.ino(),
                    path: path.clone(),
                    name: None,
                    pids: 0,
                });
                info.pids += 1;
            }
            path.pop();
            path.pop();
            path.pop();
        }
    }
    Ok(found.into_values().collect())
}

/// For tests that need root (namespaces, ctnetlink): true, after printing a
/// skip notice, when we are not root.
#[cfg(test)]
pub(crate) fn skip_unless_root(test: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping {test}: needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)");
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn netns_open_checks_the_namespace_type() {
        let here = NetNs::current().unwrap();
        let again = NetNs::open(Path::new("/proc/thread-self/ns/net")).unwrap();
        assert_eq!(here.inode(), again.inode());
        assert_eq!(again.try_clone().unwrap().inode(), here.inode());

        let e = format!(
            "{:#}",
            NetNs::open(Path::new("/proc/self/ns/uts")).unwrap_err()
        );
        assert!(
            e.contains("is a uts namespace, not a network namespace"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            NetNs::open(Path::new("/proc/self/status")).unwrap_err()
        );
        assert!(e.contains("not a network namespace file"), "{e}");
        let e = format!(
            "{:#}",
            NetNs::open(Path::new("/nonexistent/ns")).unwrap_err()
        );
        assert!(e.contains("opening /nonexistent/ns"), "{e}");
    }

    #[test]
    fn netns_run_propagates_values_and_borrows() {
        if skip_unless_root("netns_run_propagates_values_and_borrows") {
            return;
        }
        let ns = NetNs::create().unwrap();
        let name = String::from("borrowed");
        let got = ns.run(|| name.len()).unwrap();
        assert_eq!(got, 8);
    }

    #[test]
    fn netns_spawned_thread_is_found_by_discover() {
        if skip_unless_root("netns_spawned_thread_is_found_by_discover") {
            return;
        }
        let ns = NetNs::create().unwrap();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let worker = ns
            .spawn("netns-test", move || {
                ready_tx.send(NetNs::current().unwrap().inode()).unwrap();
                let _ = stop_rx.recv();
            })
            .unwrap();
        assert_eq!(ready_rx.recv().unwrap(), ns.inode());

        let all = discover().unwrap();
        assert!(
            all.windows(2).all(|w| w[0].inode < w[1].inode),
            "sorted, unique"
        );
        let here = NetNs::current().unwrap().inode();
        assert!(all.iter().any(|i| i.inode == here));
        let info = all
            .iter()
            .find(|i| i.inode == ns.inode())
            .expect("namespace with a thread inside is discovered");
        assert_eq!(info.pids, 1);
        assert_eq!(info.name, None);
        assert_eq!(NetNs::open(&info.path).unwrap().inode(), ns.inode());

        stop_tx.send(()).unwrap();
        worker.join().unwrap();
        // join() returns when the thread clears its tid, a moment before the
        // exiting task drops its namespaces: allow for that moment.
        let gone = (0..100).any(|_| {
            let after = discover().unwrap();
            let gone = after.iter().all(|i| i.inode != ns.inode());
            if !gone {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            gone
        });
        assert!(
            gone,
            "a namespace whose last thread exited is no longer discovered"
        );
    }

    #[test]
    fn netns_spawn_rejects_bad_thread_name() {
        let ns = NetNs::current().unwrap();
        assert!(ns.spawn("a\0b", || ()).is_err());
    }

    #[test]
    fn netns_sysctl_stays_inside_the_namespace() {
        if skip_unless_root("netns_sysctl_stays_inside_the_namespace") {
            return;
        }
        let key = "/proc/sys/net/ipv4/ip_forward";
        let host_before = fs::read_to_string(key).unwrap();
        let ns = NetNs::create().unwrap();
        let want = if host_before.trim() == "1" { "0" } else { "1" };
        ns.set_sysctl("net/ipv4/ip_forward", want).unwrap();
        assert_eq!(
            ns.run(|| fs::read_to_string(key).unwrap()).unwrap().trim(),
            want
        );
        ns.set_sysctl("net.ipv4.conf.lo.forwarding", want).unwrap();
        assert_eq!(fs::read_to_string(key).unwrap(), host_before);

        let e = format!(
            "{:#}",
            NetNs::current()
                .unwrap()
                .set_sysctl("net/ipv4/ip_forward", "1")
                .unwrap_err()
        );
        assert!(e.contains("refusing"), "{e}");
        for bad in [
            "kernel/hostname",
            "net/../kernel/hostname",
            "net",
            "net//x",
            "net.ipv4.",
        ] {
            assert!(ns.set_sysctl(bad, "1").is_err(), "{bad}");
        }
        let e = format!(
            "{:#}",
            ns.set_sysctl("net/ipv4/no_such_knob", "1").unwrap_err()
        );
        assert!(e.contains("net/ipv4/no_such_knob"), "{e}");
    }

    #[test]
    fn netns_sysctl_paths() {
        assert_eq!(
            sysctl_relpath("net.ipv4.ip_forward").unwrap(),
            Path::new("net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_relpath("net/ipv4/conf/eth0.100/forwarding").unwrap(),
            Path::new("net/ipv4/conf/eth0.100/forwarding")
        );
        assert!(sysctl_relpath("vm.swappiness").is_err());
        assert!(sysctl_relpath("").is_err());
    }
}
