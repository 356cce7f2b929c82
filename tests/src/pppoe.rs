//! A PPPoE session between two namespaces, without pppd, for the tc
//! tier's `pppoe-wan` test.
//!
//! The kernel carries a PPPoE session once both ends have a connected
//! PPPoX socket (session id, the peer's MAC, the lower device) and that
//! socket's PPP channel is attached to a PPP unit. Discovery (PADI/PADO)
//! and LCP/IPCP only agree on those values and on addresses: here the
//! test chooses them, so neither is needed. A new unit passes every
//! network protocol (ppp_generic sets NPMODE_PASS), which is what pppd
//! would end with.
use std::{
    fs::OpenOptions,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, bail};
use ctrace::{netlink::rtnetlink::RtSocket, netns::NetNs};

const AF_PPPOX: libc::c_int = 24;
const PX_PROTO_OE: libc::c_int = 0;

/// `_IOR`/`_IOW`/`_IOWR('t', nr, int)`. asm-generic's encoding has the
/// direction in two bits from bit 30 (write 1, read 2); MIPS has three
/// bits from bit 29 (read 2, write 4): the VM's malta rows.
const fn ppp_ioctl(read: bool, write: bool, nr: u64) -> u64 {
    let (r, w, shift) = if cfg!(any(target_arch = "mips", target_arch = "mips64")) {
        (2, 4, 29)
    } else {
        (2, 1, 30)
    };
    let dir = if read { r } else { 0 } | if write { w } else { 0 };
    (dir << shift) | (4 << 16) | ((b't' as u64) << 8) | nr
}
const PPPIOCGCHAN: u64 = ppp_ioctl(true, false, 55);
const PPPIOCATTCHAN: u64 = ppp_ioctl(false, true, 56);
const PPPIOCCONNECT: u64 = ppp_ioctl(false, true, 58);
const PPPIOCNEWUNIT: u64 = ppp_ioctl(true, true, 62);

/// One end of a session. Dropping it closes the unit and the channel:
/// the PPP device goes away.
pub struct Session {
    pub name: String,
    _fds: [OwnedFd; 3],
}

/// Opens session `sid` on `lower` in `ns` towards `peer_mac`, and names
/// its PPP device `name` (left down).
pub fn open(
    ns: &NetNs,
    lower: &str,
    peer_mac: [u8; 6],
    sid: u16,
    name: &str,
) -> anyhow::Result<Session> {
    let fds = ns.run(|| unit_in_this_netns(lower, peer_mac, sid))??;
    let mut rt = RtSocket::open(Some(ns))?;
    let made = format!("ppp{}", fds.1);
    rt.rename(&made, name)?;
    Ok(Session {
        name: name.to_string(),
        _fds: fds.0,
    })
}

/// Must run in the target namespace: the socket finds `lower` by name in
/// its own namespace, and a new unit is made in the caller's.
fn unit_in_this_netns(
    lower: &str,
    peer_mac: [u8; 6],
    sid: u16,
) -> anyhow::Result<([OwnedFd; 3], i32)> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let raw = unsafe { libc::socket(AF_PPPOX, libc::SOCK_STREAM, PX_PROTO_OE) };
    if raw < 0 {
        let e = std::io::Error::last_os_error();
        bail!("no PPPoE in this kernel (socket(AF_PPPOX): {e})");
    }
    // SAFETY: raw is a new, valid fd nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };

    // struct sockaddr_pppox is packed: family (u16), protocol (u32), then
    // struct pppoe_addr: sid (be16), remote MAC, device name (16 bytes).
    let mut addr = [0u8; 30];
    addr[0..2].copy_from_slice(&(AF_PPPOX as u16).to_ne_bytes());
    addr[2..6].copy_from_slice(&(PX_PROTO_OE as u32).to_ne_bytes());
    addr[6..8].copy_from_slice(&sid.to_be_bytes());
    addr[8..14].copy_from_slice(&peer_mac);
    if lower.len() >= 16 {
        bail!("device name {lower:?} is too long");
    }
    addr[14..14 + lower.len()].copy_from_slice(lower.as_bytes());
    // SAFETY: addr is the 30-byte packed sockaddr_pppox the kernel expects.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            addr.as_ptr().cast(),
            addr.len() as libc::socklen_t,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        bail!("connecting PPPoE session {sid:#x} on {lower}: {e}");
    }
    let mut channel: libc::c_int = 0;
    ioctl(&sock, PPPIOCGCHAN, &mut channel).context("PPPIOCGCHAN")?;

    let open_ppp = || -> anyhow::Result<OwnedFd> {
        Ok(OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/ppp")
            .context("opening /dev/ppp")?
            .into())
    };
    let chan = open_ppp()?;
    ioctl(&chan, PPPIOCATTCHAN, &mut channel).context("PPPIOCATTCHAN")?;
    let unit_fd = open_ppp()?;
    let mut unit: libc::c_int = -1;
    ioctl(&unit_fd, PPPIOCNEWUNIT, &mut unit).context("PPPIOCNEWUNIT")?;
    ioctl(&chan, PPPIOCCONNECT, &mut unit).context("PPPIOCCONNECT")?;
    Ok(([sock, chan, unit_fd], unit))
}

fn ioctl(fd: &OwnedFd, request: u64, arg: &mut libc::c_int) -> std::io::Result<()> {
    // SAFETY: every request used here takes a pointer to one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut libc::c_int) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ppp_requests_match_the_kernels_headers() {
        // linux/ppp-ioctl.h through asm-generic/ioctl.h, as on x86_64.
        if !cfg!(any(target_arch = "mips", target_arch = "mips64")) {
            assert_eq!(super::PPPIOCGCHAN, 0x8004_7437);
            assert_eq!(super::PPPIOCATTCHAN, 0x4004_7438);
            assert_eq!(super::PPPIOCCONNECT, 0x4004_743a);
            assert_eq!(super::PPPIOCNEWUNIT, 0xc004_743e);
        }
    }
}
