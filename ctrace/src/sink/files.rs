//! Files ctrace writes, as root, in directories other accounts may share.
//!
//! Three rules keep a planted link or file from turning a write into
//! root's: a file is created fresh (O_EXCL, which never follows a link in
//! the last component) with O_NOFOLLOW; fixed names (a recording and its
//! rotations) are used only inside a directory no other account can
//! write; a file another program reads whole (the metrics textfile) is
//! written under a random name beside it and renamed over it, never
//! opened itself.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{
        DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
    },
    path::{Path, PathBuf},
};

/// Makes sure `dir` is a directory only this user can write: created with
/// `mode` if missing (its parent must exist), refused with the reason if
/// it is a link, not a directory, owned by another user, or writable by
/// group or others. A recording's fixed names are safe only there.
pub fn own_dir(dir: &Path, mode: u32) -> io::Result<()> {
    match fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = fs::symlink_metadata(dir)?;
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: {why}; ctrace writes fixed file names only in a directory of its \
                 own (remove it, or choose another path)",
                dir.display()
            ),
        ))
    };
    if meta.file_type().is_symlink() {
        return refuse("is a symbolic link".into());
    }
    if !meta.is_dir() {
        return refuse("is not a directory".into());
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return refuse(format!("is owned by uid {}, not {me}", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return refuse(format!(
            "is writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Creates `path` fresh with `mode`: fails if anything (a file, a link)
/// is already there.
pub fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Replaces `path` with `bytes` as one step for its readers: a random
/// name beside it (hidden, not `*.prom`, so collectors skip it) is
/// created fresh, written, synced and renamed over `path`. `path` itself
/// is never opened, so a link planted there is replaced, not followed.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = sibling(path)?;
    let written = (|| {
        let mut f = create_new(&tmp, mode)?;
        f.write_all(bytes)?;
        // The mode asked for, whatever the umask took away.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// `.NAME.ctrace-<random>` in `path`'s directory.
fn sibling(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut random = [0u8; 8];
    // SAFETY: writes at most random.len() bytes into random.
    let n = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
    if n != random.len() as isize {
        return Err(io::Error::last_os_error());
    }
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".ctrace-{:016x}", u64::from_ne_bytes(random)));
    Ok(path.with_file_name(tmp))
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
        let e = own_dir(&foreign, 0o700).unwrap_err().to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");

        let mine = foreign.with_extension("mine");
        let _ = fs::remove_dir_all(&mine);
        own_dir(&mine, 0o700).unwrap();
        let mode = fs::metadata(&mine).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        fs::set_permissions(&mine, fs::Permissions::from_mode(0o1777)).unwrap();
        let e = own_dir(&mine, 0o700).unwrap_err().to_string();
        assert!(e.contains("writable by group or others"), "{e}");

        let link = foreign.with_extension("link");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&mine, &link).unwrap();
        let e = own_dir(&link, 0o700).unwrap_err().to_string();
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
