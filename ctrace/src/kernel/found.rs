//! Facts an experiment found at start, kept for the rest of the boot.
//!
//! Where this kernel frees an nftables rule's drop is found by sending a
//! packet into a rule in a throwaway namespace; it cannot change while the
//! system runs, so the next start reuses it and attaches sooner. The facts
//! live in ctrace's own directory on tmpfs (`/var/run/ctrace`), which a
//! reboot empties, and carry the boot id and the kernel's release and
//! build: a kexec'd or replaced kernel never inherits another's facts, and
//! a file that does not parse or does not match is found again, never
//! trusted.
use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::files::OwnDir;

/// Where the facts are kept instead of `/var/run/ctrace` (tests).
pub const DIR_ENV: &str = "CTRACE_FACTS_DIR";
const DEFAULT_DIR: &str = crate::files::run_dir!();
const FILE: &str = "kernel-facts.json";
/// Far more than the file ever holds.
const MAX_BYTES: u64 = 64 * 1024;

/// What experiments found on this boot of this kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Found {
    boot_id: String,
    kernel: String,
    ctrace: String,
    /// Whether `kfree_skb`'s location tells an nftables rule's drop apart
    /// (it is freed in `nft_do_chain`); None until probed.
    pub nft_drop_in_chain: Option<bool>,
}

impl Found {
    /// Nothing found yet, for this boot and kernel; None when they cannot
    /// be told (no /proc).
    fn blank() -> Option<Found> {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_string())
        };
        Some(Found {
            boot_id: read("/proc/sys/kernel/random/boot_id")?,
            kernel: format!(
                "{} {}",
                read("/proc/sys/kernel/osrelease")?,
                read("/proc/sys/kernel/version")?
            ),
            ctrace: env!("CARGO_PKG_VERSION").to_string(),
            nft_drop_in_chain: None,
        })
    }

    fn dir() -> PathBuf {
        std::env::var_os(DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
    }

    /// The facts kept for this boot and kernel, or a blank set for them.
    pub fn load() -> Option<Found> {
        Self::load_from(&Self::dir())
    }

    fn load_from(dir: &Path) -> Option<Found> {
        let blank = Self::blank()?;
        let kept = OwnDir::open(dir, 0o700)
            .and_then(|d| d.read(OsStr::new(FILE), MAX_BYTES))
            .ok()
            .and_then(|b| serde_json::from_slice::<Found>(&b).ok());
        match kept {
            Some(f)
                if f.boot_id == blank.boot_id
                    && f.kernel == blank.kernel
                    && f.ctrace == blank.ctrace =>
            {
                Some(f)
            }
            _ => Some(blank),
        }
    }

    /// Keeps the facts for later starts; a failure only costs the next
    /// start its experiment.
    pub fn store(&self) {
        self.store_in(&Self::dir());
    }

    fn store_in(&self, dir: &Path) {
        let kept = serde_json::to_vec(self)
            .map_err(std::io::Error::other)
            .and_then(|bytes| OwnDir::open(dir, 0o700)?.replace(OsStr::new(FILE), &bytes, 0o600));
        if let Err(e) = kept {
            log::debug!(
                "kernel facts not kept in {}: {e} (the next start probes again)",
                dir.display()
            );
        }
    }

    pub fn path() -> PathBuf {
        Self::dir().join(FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ctrace-found-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn facts_are_kept_for_this_boot_and_kernel_only() {
        let dir = scratch("keep");
        let mut f = Found::load_from(&dir).expect("/proc");
        assert_eq!(f.nft_drop_in_chain, None, "nothing found yet");
        f.nft_drop_in_chain = Some(true);
        f.store_in(&dir);
        assert_eq!(
            Found::load_from(&dir).unwrap().nft_drop_in_chain,
            Some(true)
        );

        // Another boot's facts (or a file that does not parse) are not
        // trusted: found again.
        let mut other = f.clone();
        other.boot_id = "00000000-0000-0000-0000-000000000000".into();
        other.store_in(&dir);
        assert_eq!(Found::load_from(&dir).unwrap().nft_drop_in_chain, None);
        std::fs::write(dir.join(FILE), b"{not json").unwrap();
        assert_eq!(Found::load_from(&dir).unwrap().nft_drop_in_chain, None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_planted_link_is_not_read() {
        let dir = scratch("link");
        std::fs::create_dir(&dir).unwrap();
        let target = dir.join("elsewhere.json");
        let mut f = Found::blank().unwrap();
        f.nft_drop_in_chain = Some(true);
        std::fs::write(&target, serde_json::to_vec(&f).unwrap()).unwrap();
        std::os::unix::fs::symlink(&target, dir.join(FILE)).unwrap();
        assert_eq!(Found::load_from(&dir).unwrap().nft_drop_in_chain, None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
