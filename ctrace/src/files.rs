//! Files ctrace writes, as root, in directories other accounts may share.
//!
//! Three rules keep a planted link or file from turning a write into
//! root's: a file is created fresh (O_EXCL, which never follows a link in
//! the last component) with O_NOFOLLOW; fixed names (a recording and its
//! rotations) are used only inside a directory no other account can
//! write, held open and used by handle; a file another program reads
//! whole (the metrics textfile) is written under a random name beside it
//! and renamed over it, never opened itself.
use std::{
    ffi::{CString, OsStr, OsString},
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{
            ffi::OsStrExt as _,
            fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
        },
    },
    path::{Path, PathBuf},
};

/// ctrace's directory for what it keeps while the system runs (recordings,
/// kernel facts): /var/run is tmpfs on OpenWrt (/tmp/run, spares the
/// flash) and on Debian (/run), and only root can write it on both, so no
/// other account can take `ctrace/` first, as it could in /tmp. A macro,
/// so that paths under it stay `&'static str` literals (clap defaults).
macro_rules! run_dir {
    () => {
        "/var/run/ctrace"
    };
}
pub(crate) use run_dir;

/// A directory only this user can write, held open: every name in it is
/// resolved from this handle (openat, renameat), so swapping the directory
/// or one of its parents after the check changes nothing.
pub struct OwnDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl OwnDir {
    /// Makes sure `dir` is a directory only this user can write: created
    /// with `mode` if missing (its parent must exist), refused with the
    /// reason if it is a link, not a directory, owned by another user, or
    /// writable by group or others. A recording's fixed names are safe
    /// only there.
    pub fn open(dir: &Path, mode: u32) -> io::Result<OwnDir> {
        match fs::DirBuilder::new().mode(mode).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let refuse = |why: String| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{}: {why}; ctrace writes fixed file names only in a directory of its \
                     own (remove it, or choose another path)",
                    dir.display()
                ),
            )
        };
        let fd: OwnedFd = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir)
        {
            Ok(f) => f.into(),
            // O_DIRECTORY|O_NOFOLLOW on a link: ENOTDIR (or ELOOP).
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                let link = fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
                return Err(refuse(
                    if link {
                        "is a symbolic link"
                    } else {
                        "is not a directory"
                    }
                    .into(),
                ));
            }
            Err(e) => return Err(e),
        };
        // What was opened, not what the path names now.
        let meta = File::from(fd.try_clone()?).metadata()?;
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(refuse(format!("is owned by uid {}, not {me}", meta.uid())));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(refuse(format!(
                "is writable by group or others (mode {:o})",
                meta.mode() & 0o7777
            )));
        }
        Ok(OwnDir {
            fd,
            path: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates `name` fresh with `mode`: fails if anything (a file, a
    /// link) is already there.
    pub fn create_new(&self, name: &OsStr, mode: u32) -> io::Result<File> {
        at_create_new(&self.fd, name, mode)
    }

    /// Whether anything (a link included) is at `name`.
    pub fn exists(&self, name: &OsStr) -> bool {
        let Ok(c) = CString::new(name.as_bytes()) else {
            return false;
        };
        // SAFETY: stat is plain data the kernel fills; c is NUL-terminated.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; the fd is ours and open.
        unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            ) == 0
        }
    }

    /// Reads `name` whole, up to `max` bytes; never through a link.
    pub fn read(&self, name: &OsStr, max: u64) -> io::Result<Vec<u8>> {
        use std::io::Read as _;
        let c = cstr(name)?;
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: the fd is ours and open; c is NUL-terminated.
        let fd = unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut bytes = Vec::new();
        file.take(max).read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    /// Replaces `name` with `bytes` as one step, as [`replace`] does.
    pub fn replace(&self, name: &OsStr, bytes: &[u8], mode: u32) -> io::Result<()> {
        replace_at(&self.fd, name, bytes, mode)
    }

    pub fn rename(&self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        at_rename(&self.fd, from, to)
    }

    pub fn remove(&self, name: &OsStr) -> io::Result<()> {
        let c = cstr(name)?;
        // SAFETY: the fd is ours and open; c is NUL-terminated.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn cstr(name: &OsStr) -> io::Result<CString> {
    if name.as_bytes().contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a name, not a path",
        ));
    }
    CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

fn at_create_new(dir: &OwnedFd, name: &OsStr, mode: u32) -> io::Result<File> {
    let c = cstr(name)?;
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: the fd is ours and open; c is NUL-terminated.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn at_rename(dir: &OwnedFd, from: &OsStr, to: &OsStr) -> io::Result<()> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: the fd is ours and open; both names are NUL-terminated.
    let rc = unsafe { libc::renameat(dir.as_raw_fd(), f.as_ptr(), dir.as_raw_fd(), t.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Replaces `path` with `bytes` as one step for its readers: a random
/// name beside it (hidden, not `*.prom`, so collectors skip it) is
/// created fresh, written, synced and renamed over `path`, all relative
/// to the directory opened once. `path` itself is never opened, so a link
/// planted there is replaced, not followed.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir: OwnedFd = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(parent)?
        .into();
    replace_at(&dir, name, bytes, mode)
}

fn replace_at(dir: &OwnedFd, name: &OsStr, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = hidden_sibling(name)?;
    let written = (|| {
        let mut f = at_create_new(dir, &tmp, mode)?;
        f.write_all(bytes)?;
        // The mode asked for, whatever the umask took away.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        at_rename(dir, &tmp, name)
    })();
    if written.is_err() {
        let _ = cstr(&tmp).map(|c| {
            // SAFETY: the fd is ours and open; c is NUL-terminated.
            unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) }
        });
    }
    written
}

/// `.NAME.ctrace-<random>`.
fn hidden_sibling(name: &OsStr) -> io::Result<OsString> {
    let mut random = [0u8; 8];
    // SAFETY: writes at most random.len() bytes into random.
    let n = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
    if n != random.len() as isize {
        return Err(io::Error::last_os_error());
    }
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".ctrace-{:016x}", u64::from_ne_bytes(random)));
    Ok(tmp)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A directory owned by another account (nobody), writable by it, as
    /// node_exporter's textfile directory or a shared /tmp entry would be.
    /// None when not root (chown needs it).
    pub(crate) fn foreign_dir(tag: &str) -> Option<PathBuf> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: needs root to chown a directory to another user");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("ctrace-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        Some(dir)
    }

    #[test]
    fn own_dir_refuses_what_another_user_could_write() {
        let Some(foreign) = foreign_dir("owndir") else {
            return;
        };
        let e = OwnDir::open(&foreign, 0o700).err().unwrap().to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");

        let mine = foreign.with_extension("mine");
        let _ = fs::remove_dir_all(&mine);
        OwnDir::open(&mine, 0o700).unwrap();
        let mode = fs::metadata(&mine).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        fs::set_permissions(&mine, fs::Permissions::from_mode(0o1777)).unwrap();
        let e = OwnDir::open(&mine, 0o700).err().unwrap().to_string();
        assert!(e.contains("writable by group or others"), "{e}");

        let link = foreign.with_extension("link");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&mine, &link).unwrap();
        let e = OwnDir::open(&link, 0o700).err().unwrap().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        for p in [&foreign, &mine] {
            fs::remove_dir_all(p).unwrap();
        }
        fs::remove_file(&link).unwrap();
    }

    #[test]
    fn replace_never_follows_a_planted_link() {
        let Some(dir) = foreign_dir("replace") else {
            return;
        };
        let victim = dir.with_extension("victim");
        fs::write(&victim, "precious\n").unwrap();
        let target = dir.join("ctrace.prom");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("ctrace.prom.tmp")).unwrap();
        replace(&target, b"metrics\n", 0o644).unwrap();
        let kept = fs::read_to_string(&victim).unwrap();
        let meta = fs::symlink_metadata(&target).unwrap();
        let written = fs::read_to_string(&target).unwrap();
        let left: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        fs::remove_dir_all(&dir).unwrap();
        fs::remove_file(&victim).unwrap();
        assert_eq!(kept, "precious\n");
        assert!(meta.is_file(), "the link was replaced by a file");
        assert_eq!(meta.mode() & 0o777, 0o644);
        assert_eq!(written, "metrics\n");
        assert_eq!(left.len(), 2, "no temporary left behind: {left:?}");
    }
}
