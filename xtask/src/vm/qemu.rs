//! Booting one VM and collecting its serial console.
//!
//! KVM does not work on this machine kind ("KVM internal error"), and
//! four of the five architectures are foreign anyway: all run under TCG. The console is streamed to stdout with a
//! prefix (CI logs show the suite's own output) and to a log file, and the
//! guest gets a wall-clock limit after which qemu is killed.
use std::{
    fs,
    io::{BufRead as _, BufReader, Read, Write as _},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::Arch;
use crate::step;

pub struct Boot {
    pub arch: Arch,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub memory_mib: u32,
    /// qemu's `-smp` value.
    pub smp: &'static str,
    /// One host thread for all vCPUs, also where qemu would give each its
    /// own: with VMs booted side by side, each gets one host core.
    pub single_thread: bool,
    pub timeout: Duration,
    pub log: PathBuf,
    /// Prefix of every console line we echo.
    pub label: String,
}

pub struct Console {
    pub lines: Vec<String>,
    pub timed_out: bool,
    /// How qemu ended, when that is worth saying (killed, error status).
    pub status_note: Option<String>,
    /// From qemu's start to its exit.
    pub wall: Duration,
}

/// After /init says it is done, qemu should exit within seconds.
const POWEROFF_GRACE: Duration = Duration::from_secs(60);

pub fn run(b: &Boot) -> anyhow::Result<Console> {
    let mut cmd = match b.arch {
        Arch::X86_64 => {
            let mut c = Command::new("qemu-system-x86_64");
            // One host thread runs both vCPUs in turn. With a thread per
            // vCPU (MTTCG), a 6.12 guest died twice of "Oops: int3" in a
            // static branch while another vCPU patched it (text_poke_bp's
            // int3 seen after it was taken out): a 2-in-3 failure of the
            // matrix that no kernel under test is to blame for.
            c.args(["-cpu", "max"]);
            c
        }
        Arch::Aarch64 => {
            let mut c = Command::new("qemu-system-aarch64");
            // Debian's arm64 vmlinuz is a gzip'd Image; qemu's arm loader
            // inflates that itself. pauth-impdef: TCG's architected
            // pointer-authentication hash (QARMA) is slow to emulate and
            // the guest does not care which algorithm signs its pointers.
            c.args(["-machine", "virt", "-cpu", "max,pauth-impdef=on"]);
            c
        }
        Arch::Armv7 => {
            let mut c = Command::new("qemu-system-arm");
            // A Cortex-A15 (ARMv7 with VFPv3 and NEON, as
            // arm_cortex-a7_neon-vfpv4). highmem=off: no devices above
            // 4 GiB, which a kernel without LPAE cannot reach.
            c.args(["-machine", "virt,highmem=off", "-cpu", "cortex-a15"]);
            c
        }
        Arch::Mipsel | Arch::Mips => {
            // OpenWrt's own QEMU board, with the 24Kc of its mipsel_24kc
            // and mips_24kc userlands. qemu loads the ELF vmlinux.
            let mut c = Command::new(if b.arch == Arch::Mipsel {
                "qemu-system-mipsel"
            } else {
                "qemu-system-mips"
            });
            c.args(["-machine", "malta", "-cpu", "24Kc"]);
            c
        }
    };
    // x86 always runs its vCPUs on one thread (see above). 32-bit ARM never
    // does: with two vCPUs on one thread, its guest stalled at boot (RCU
    // "kthread starved", every time), and booted with a thread each.
    let single = match b.arch {
        Arch::X86_64 => true,
        Arch::Armv7 => false,
        _ => b.single_thread,
    };
    cmd.args([
        "-accel",
        if single { "tcg,thread=single" } else { "tcg" },
        "-m",
        &b.memory_mib.to_string(),
        "-smp",
        b.smp,
        "-nographic",
        "-no-reboot",
    ])
    // No NIC: the suite builds its own veth networks, and the default
    // NIC would need option ROMs that --no-install-recommends omits.
    .args(["-nic", "none"])
    .arg("-kernel")
    .arg(&b.kernel)
    .arg("-initrd")
    .arg(&b.initrd)
    .arg("-append")
    .arg(&b.append)
    // Not the terminal: with a tty on stdin, -nographic would take it
    // raw and Ctrl-C would go to the guest instead of stopping us.
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe. If xtask dies for any reason
    // (Ctrl-C reaches qemu directly, being in our process group; SIGTERM
    // or SIGKILL to xtask does not), the kernel kills qemu with it. (The
    // signal follows the spawning thread, which waits for this qemu: it
    // cannot end first.)
    unsafe {
        cmd.pre_exec(|| {
            if prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }

    if let Some(d) = b.log.parent() {
        fs::create_dir_all(d)?;
    }
    let mut log =
        fs::File::create(&b.log).with_context(|| format!("creating {}", b.log.display()))?;
    step(&format!(
        "booting {} (console log: {}, limit {}s)",
        b.label,
        b.log.display(),
        b.timeout.as_secs()
    ));
    writeln!(log, "# {cmd:?}")?;
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;

    let (tx, rx) = mpsc::channel();
    forward_lines(child.stdout.take().expect("piped"), tx.clone());
    forward_lines(child.stderr.take().expect("piped"), tx);

    let started = Instant::now();
    let deadline = started + b.timeout;
    let mut done_at = None;
    let mut lines = vec![];
    let mut timed_out = false;
    loop {
        let limit = done_at.map_or(deadline, |d: Instant| (d + POWEROFF_GRACE).min(deadline));
        let now = Instant::now();
        if now >= limit {
            timed_out = done_at.is_none();
            let what = if timed_out {
                "timed out"
            } else {
                "did not power off after the suite"
            };
            let note = format!(
                "{} {what} after {:.0}s; killing qemu",
                b.label,
                now.duration_since(started).as_secs_f64()
            );
            step(&note);
            writeln!(log, "# {note}")?;
            let _ = child.kill();
            break;
        }
        match rx.recv_timeout((limit - now).min(Duration::from_secs(1))) {
            Ok(line) => {
                writeln!(log, "{line}")?;
                println!("[{}] {line}", b.label);
                if line.contains("CTRACE-VM-DONE") {
                    done_at = Some(Instant::now());
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Both pipes closed: qemu is gone.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait()?;
    let wall = started.elapsed();
    writeln!(log, "# qemu: {status}, {:.0}s", wall.as_secs_f64())?;
    step(&format!(
        "{}: qemu exited ({status}) after {:.0}s",
        b.label,
        wall.as_secs_f64()
    ));
    let status_note = (!status.success()).then(|| format!("qemu {status}"));
    Ok(Console {
        lines,
        timed_out,
        status_note,
        wall,
    })
}

/// Sends each line of `r` to `tx`, cleaned for logs, from a thread of
/// its own.
fn forward_lines(r: impl Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = vec![];
        // Raw bytes: the guest console is not guaranteed to be UTF-8.
        while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            if tx.send(clean(&String::from_utf8_lossy(&buf))).is_err() {
                break;
            }
            buf.clear();
        }
    });
}

const PR_SET_PDEATHSIG: i32 = 1;
const SIGKILL: u64 = 9;

unsafe extern "C" {
    fn prctl(option: i32, arg2: u64, arg3: u64, arg4: u64, arg5: u64) -> i32;
}

/// `line` without terminal control sequences (the firmware clears the
/// screen, libtest may colour) and other control characters, which only
/// garble logs.
fn clean(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // CSI (ESC [ parameters… final byte in @..~) or a two-byte
            // escape such as ESC c (reset).
            '\x1b' => {
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn clean_strips_terminal_controls() {
        assert_eq!(
            super::clean("Booting from ROM..\x1bc\x1b[?7l\x1b[2JCTRACE-VM-KERNEL x\r\n"),
            "Booting from ROM..CTRACE-VM-KERNEL x"
        );
        assert_eq!(super::clean("\x1b[31mFAILED\x1b[0m\tok"), "FAILED\tok");
    }
}
