//! Netlink, spoken directly: ctnetlink for table statistics and fills,
//! rtnetlink for the lab's links and addresses.
//!
//! This is the small part of the wire format those two need, written out by
//! hand rather than pulled in from a netlink crate: a socket ([`NlSocket`]), a
//! message builder ([`MsgBuilder`]), parsers ([`Msgs`], [`Attrs`]), and three
//! ways of talking to the kernel: one request and its ack
//! ([`NlSocket::request_ack`], [`NlSocket::request`]), a streamed dump
//! ([`NlSocket::dump`]) and a batch of many requests per `sendmsg`
//! ([`Batch`]).
//!
//! Everything assumes the peer is the kernel (port id 0), which handles a
//! request synchronously inside the sender's `sendmsg()`: by the time that
//! call returns, every answer to it is already queued on our socket. The
//! batch sender relies on that to account for every message it sent without
//! waiting on a timer.
pub mod ctnetlink;
pub mod kube_proxy;
pub mod nftables;
pub mod rtnetlink;

use std::fmt;
use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::netns::NetNs;

// linux/netlink.h

/// Routing and link configuration (rtnetlink).
pub const NETLINK_ROUTE: i32 = 0;
/// nfnetlink: ctnetlink, nftables and friends.
pub const NETLINK_NETFILTER: i32 = 12;

pub const NLM_F_REQUEST: u16 = 0x01;
pub const NLM_F_MULTI: u16 = 0x02;
pub const NLM_F_ACK: u16 = 0x04;
pub const NLM_F_ECHO: u16 = 0x08;
pub const NLM_F_DUMP_INTR: u16 = 0x10;
// Modifiers to GET requests.
pub const NLM_F_ROOT: u16 = 0x100;
pub const NLM_F_MATCH: u16 = 0x200;
pub const NLM_F_DUMP: u16 = NLM_F_ROOT | NLM_F_MATCH;
// Modifiers to NEW requests.
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
// Flags on NLMSG_ERROR.
pub const NLM_F_CAPPED: u16 = 0x100;
pub const NLM_F_ACK_TLVS: u16 = 0x200;

pub const NLMSG_NOOP: u16 = 0x1;
pub const NLMSG_ERROR: u16 = 0x2;
pub const NLMSG_DONE: u16 = 0x3;
pub const NLMSG_OVERRUN: u16 = 0x4;

pub const NLMSG_HDRLEN: usize = 16;
pub const NLA_HDRLEN: usize = 4;
pub const NLA_F_NESTED: u16 = 1 << 15;
pub const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
pub const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;
const NLMSGERR_ATTR_MISS_TYPE: u16 = 5;

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

/// Socket buffer sizes we ask for. The receive side matters most: a failing
/// batch chunk queues one NLMSG_ERROR per message before we read any of them,
/// and an overrun loses error reports silently but for a bare ENOBUFS.
const RCVBUF: usize = 8 << 20;
const SNDBUF: usize = 2 << 20;
/// Large enough for any single datagram the kernel builds for us: it sizes
/// dump skbs after the largest recvmsg() buffer it has seen (capped at 32 KiB
/// plus overhead), so a big buffer also means fewer, fuller dump datagrams.
const RECV_BUF_LEN: usize = 256 << 10;
/// The kernel answers inside our own syscalls, so a wait this long means no
/// answer is coming; it turns a protocol mistake into an error, not a hang.
const RECV_TIMEOUT: Duration = Duration::from_secs(30);

/// Rounds up to netlink's 4-byte alignment (NLMSG_ALIGN, NLA_ALIGN).
pub const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// Conventional name of an errno value ("ENOMEM"), for error messages and
/// reports that people grep for.
pub fn errno_name(errno: i32) -> Option<&'static str> {
    use libc::*;
    Some(match errno {
        EPERM => "EPERM",
        ENOENT => "ENOENT",
        ESRCH => "ESRCH",
        EINTR => "EINTR",
        EIO => "EIO",
        ENXIO => "ENXIO",
        E2BIG => "E2BIG",
        EBADF => "EBADF",
        EAGAIN => "EAGAIN",
        ENOMEM => "ENOMEM",
        EACCES => "EACCES",
        EFAULT => "EFAULT",
        EBUSY => "EBUSY",
        EEXIST => "EEXIST",
        EXDEV => "EXDEV",
        ENODEV => "ENODEV",
        ENOTDIR => "ENOTDIR",
        EISDIR => "EISDIR",
        EINVAL => "EINVAL",
        ENFILE => "ENFILE",
        EMFILE => "EMFILE",
        ENOTTY => "ENOTTY",
        EFBIG => "EFBIG",
        ENOSPC => "ENOSPC",
        ERANGE => "ERANGE",
        ENAMETOOLONG => "ENAMETOOLONG",
        ENOSYS => "ENOSYS",
        ENODATA => "ENODATA",
        ENOLINK => "ENOLINK",
        EPROTO => "EPROTO",
        EOVERFLOW => "EOVERFLOW",
        ENOTSOCK => "ENOTSOCK",
        EMSGSIZE => "EMSGSIZE",
        EPROTOTYPE => "EPROTOTYPE",
        ENOPROTOOPT => "ENOPROTOOPT",
        EPROTONOSUPPORT => "EPROTONOSUPPORT",
        EOPNOTSUPP => "EOPNOTSUPP",
        EAFNOSUPPORT => "EAFNOSUPPORT",
        EADDRINUSE => "EADDRINUSE",
        EADDRNOTAVAIL => "EADDRNOTAVAIL",
        ENETDOWN => "ENETDOWN",
        ENETUNREACH => "ENETUNREACH",
        ECONNRESET => "ECONNRESET",
        ENOBUFS => "ENOBUFS",
        ENOTCONN => "ENOTCONN",
        ETIMEDOUT => "ETIMEDOUT",
        ECONNREFUSED => "ECONNREFUSED",
        EHOSTUNREACH => "EHOSTUNREACH",
        EALREADY => "EALREADY",
        EINPROGRESS => "EINPROGRESS",
        _ => return None,
    })
}

/// "EEXIST (File exists)": the name for grepping, the text for reading.
fn describe_errno(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    let text = text
        .strip_suffix(&format!(" (os error {errno})"))
        .unwrap_or(&text);
    match errno_name(errno) {
        Some(name) => format!("{name} ({text})"),
        None => format!("errno {errno} ({text})"),
    }
}

/// An error the kernel returned in NLMSG_ERROR (or in NLMSG_DONE at the end of
/// a dump), with the extended ack when it sent one. Reachable from an
/// `anyhow::Error` through `downcast_ref::<NlError>()` even under context, so
/// callers can branch on the errno.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NlError {
    /// Positive errno value.
    pub errno: i32,
    /// NLMSGERR_ATTR_MSG: the kernel's human-readable reason.
    pub message: Option<String>,
    /// NLMSGERR_ATTR_OFFS: byte offset of the offending attribute within the
    /// request.
    pub bad_attr_offset: Option<u32>,
    /// NLMSGERR_ATTR_MISS_TYPE: type of a required attribute that was missing.
    pub missing_attr: Option<u32>,
}

impl NlError {
    pub fn new(errno: i32) -> NlError {
        NlError {
            errno,
            message: None,
            bad_attr_offset: None,
            missing_attr: None,
        }
    }

    /// The errno of the first `NlError` in `err`'s chain, if any.
    pub fn errno_of(err: &anyhow::Error) -> Option<i32> {
        err.downcast_ref::<NlError>().map(|e| e.errno)
    }
}

impl fmt::Display for NlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&describe_errno(self.errno))?;
        if let Some(msg) = &self.message {
            write!(f, ": {msg}")?;
        }
        if let Some(ty) = self.missing_attr {
            write!(f, " (missing attribute type {ty})")?;
        }
        if let Some(off) = self.bad_attr_offset {
            write!(f, " (offending attribute at byte {off} of the request)")?;
        }
        Ok(())
    }
}

impl std::error::Error for NlError {}

/// One or more netlink messages under construction, laid out exactly as they
/// go on the wire.
///
/// Lengths (of the message and of every open nest) are kept current after
/// each append, so the buffer is valid at any point. Encoding problems (an
/// attribute over 64 KiB, a NUL inside a string) do not panic and do not
/// break the chaining style: the first one is remembered and reported when
/// the message is sent.
#[derive(Clone, Debug)]
pub struct MsgBuilder {
    buf: Vec<u8>,
    /// Offset of the header of the message being appended to.
    start: usize,
    error: Option<String>,
}

impl MsgBuilder {
    /// A request of type `ty`. NLM_F_REQUEST, NLM_F_ACK/NLM_F_DUMP and the
    /// sequence number are added by the socket method that sends it.
    pub fn new(ty: u16, flags: u16) -> MsgBuilder {
        let mut b = MsgBuilder::empty(256);
        b.begin(ty, flags, 0);
        b
    }

    fn empty(capacity: usize) -> MsgBuilder {
        MsgBuilder {
            buf: Vec::with_capacity(capacity),
            start: 0,
            error: None,
        }
    }

    /// Starts another message after the current one, in the same buffer.
    fn begin(&mut self, ty: u16, flags: u16, seq: u32) {
        self.start = self.buf.len();
        self.buf
            .extend_from_slice(&(NLMSG_HDRLEN as u32).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        // nlmsg_pid: 0, the kernel fills in nothing and does not check it.
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
    }

    /// Writes the current message's nlmsg_len from the buffer's length.
    fn sync_len(&mut self) {
        match u32::try_from(self.buf.len() - self.start) {
            Ok(len) => self.buf[self.start..self.start + 4].copy_from_slice(&len.to_ne_bytes()),
            Err(_) => self.fail(format!(
                "message of {} bytes overflows nlmsg_len",
                self.buf.len() - self.start
            )),
        }
    }

    fn fail(&mut self, what: String) {
        if self.error.is_none() {
            self.error = Some(what);
        }
    }

    fn pad(&mut self) {
        self.buf.resize(align4(self.buf.len()), 0);
    }

    fn flags_at(&self, start: usize) -> u16 {
        u16::from_ne_bytes([self.buf[start + 6], self.buf[start + 7]])
    }

    fn set_flags_at(&mut self, start: usize, flags: u16) {
        self.buf[start + 6..start + 8].copy_from_slice(&flags.to_ne_bytes());
    }

    fn set_seq_at(&mut self, start: usize, seq: u32) {
        self.buf[start + 8..start + 12].copy_from_slice(&seq.to_ne_bytes());
    }

    /// Appends the family header (nfgenmsg, ifinfomsg, ...), padded to 4.
    pub fn header(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self.pad();
        self.sync_len();
        self
    }

    /// Appends an attribute whose payload is `parts` concatenated.
    fn put(&mut self, ty: u16, parts: &[&[u8]]) -> &mut Self {
        let payload_len: usize = parts.iter().map(|p| p.len()).sum();
        let Ok(len) = u16::try_from(NLA_HDRLEN + payload_len) else {
            self.fail(format!(
                "attribute type {ty}: {payload_len} bytes do not fit in a netlink attribute"
            ));
            return self;
        };
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        for part in parts {
            self.buf.extend_from_slice(part);
        }
        self.pad();
        self.sync_len();
        self
    }

    /// Appends an attribute with an arbitrary payload.
    pub fn bytes(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        self.put(ty, &[payload])
    }

    /// Zero-length attribute whose presence is the value (NLA_FLAG).
    pub fn flag(&mut self, ty: u16) -> &mut Self {
        self.bytes(ty, &[])
    }

    pub fn u8(&mut self, ty: u16, v: u8) -> &mut Self {
        self.bytes(ty, &[v])
    }

    pub fn u16(&mut self, ty: u16, v: u16) -> &mut Self {
        self.bytes(ty, &v.to_ne_bytes())
    }

    pub fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.bytes(ty, &v.to_ne_bytes())
    }

    pub fn u64(&mut self, ty: u16, v: u64) -> &mut Self {
        self.bytes(ty, &v.to_ne_bytes())
    }

    pub fn be16(&mut self, ty: u16, v: u16) -> &mut Self {
        self.bytes(ty, &v.to_be_bytes())
    }

    pub fn be32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.bytes(ty, &v.to_be_bytes())
    }

    pub fn be64(&mut self, ty: u16, v: u64) -> &mut Self {
        self.bytes(ty, &v.to_be_bytes())
    }

    /// NUL-terminated string (NLA_NUL_STRING / NLA_STRING both accept it).
    /// An embedded NUL would silently truncate the value in the kernel, so it
    /// is an encoding error here.
    pub fn str(&mut self, ty: u16, s: &str) -> &mut Self {
        if s.as_bytes().contains(&0) {
            self.fail(format!("attribute type {ty}: string {s:?} contains NUL"));
            return self;
        }
        self.put(ty, &[s.as_bytes(), &[0]])
    }

    /// A nested attribute set (NLA_F_NESTED), filled in by `f`.
    pub fn nested(&mut self, ty: u16, f: impl FnOnce(&mut Self)) -> &mut Self {
        self.nest(ty | NLA_F_NESTED, f)
    }

    /// An attribute whose payload `f` builds but which is not a pure attribute
    /// set, so must not carry NLA_F_NESTED: VETH_INFO_PEER, for one, is an
    /// ifinfomsg followed by attributes.
    pub fn nested_raw(&mut self, ty: u16, f: impl FnOnce(&mut Self)) -> &mut Self {
        self.nest(ty, f)
    }

    fn nest(&mut self, ty: u16, f: impl FnOnce(&mut Self)) -> &mut Self {
        let at = self.buf.len();
        self.buf
            .extend_from_slice(&(NLA_HDRLEN as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        f(self);
        match u16::try_from(self.buf.len() - at) {
            Ok(len) => self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes()),
            Err(_) => {
                let len = self.buf.len() - at;
                self.buf.truncate(at);
                self.fail(format!(
                    "nested attribute type {}: {len} bytes do not fit in a netlink attribute",
                    ty & NLA_TYPE_MASK
                ));
            }
        }
        self.sync_len();
        self
    }

    /// Total length of all messages in the buffer.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The wire bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    fn check(&self) -> Result<()> {
        match &self.error {
            Some(e) => bail!("cannot encode netlink message: {e}"),
            None => Ok(()),
        }
    }
}

/// One netlink message as received.
#[derive(Clone, Copy, Debug)]
pub struct Msg<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
    /// Everything after the 16-byte nlmsghdr, up to nlmsg_len.
    pub payload: &'a [u8],
}

impl<'a> Msg<'a> {
    /// The family header of `len` bytes at the start of the payload.
    pub fn header(&self, len: usize) -> Result<&'a [u8]> {
        self.payload.get(..len).ok_or_else(|| {
            anyhow!(
                "netlink message type {} has {} payload bytes, shorter than its {len}-byte header",
                self.ty,
                self.payload.len()
            )
        })
    }

    /// The attributes that follow a family header of `header_len` bytes.
    pub fn attrs(&self, header_len: usize) -> Result<Attrs<'a>> {
        self.header(header_len)?;
        Ok(Attrs::new(
            self.payload.get(align4(header_len)..).unwrap_or_default(),
        ))
    }
}

/// Iterator over the messages packed in one received datagram.
#[derive(Clone, Debug)]
pub struct Msgs<'a> {
    rest: &'a [u8],
}

impl<'a> Msgs<'a> {
    pub fn new(buf: &'a [u8]) -> Msgs<'a> {
        Msgs { rest: buf }
    }
}

impl<'a> Iterator for Msgs<'a> {
    type Item = Result<Msg<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let buf = mem::take(&mut self.rest);
        if buf.len() < NLMSG_HDRLEN {
            return Some(Err(anyhow!(
                "truncated netlink header: {} trailing bytes",
                buf.len()
            )));
        }
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Some(Err(anyhow!(
                "malformed netlink message: nlmsg_len {len} with {} bytes left in the datagram",
                buf.len()
            )));
        }
        let msg = Msg {
            ty: u16::from_ne_bytes([buf[4], buf[5]]),
            flags: u16::from_ne_bytes([buf[6], buf[7]]),
            seq: u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]),
            pid: u32::from_ne_bytes([buf[12], buf[13], buf[14], buf[15]]),
            payload: &buf[NLMSG_HDRLEN..len],
        };
        self.rest = buf.get(align4(len)..).unwrap_or_default();
        Some(Ok(msg))
    }
}

/// One attribute: its type with NLA_F_NESTED and NLA_F_NET_BYTEORDER masked
/// off, and its payload without padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr<'a> {
    pub ty: u16,
    pub payload: &'a [u8],
}

impl<'a> Attr<'a> {
    /// The payload parsed as an attribute set.
    pub fn nested(&self) -> Attrs<'a> {
        Attrs::new(self.payload)
    }

    fn fixed<const N: usize>(&self) -> Result<[u8; N]> {
        self.payload.try_into().map_err(|_| {
            anyhow!(
                "attribute type {}: expected {N} bytes, got {}",
                self.ty,
                self.payload.len()
            )
        })
    }

    pub fn u8(&self) -> Result<u8> {
        Ok(self.fixed::<1>()?[0])
    }

    pub fn u16(&self) -> Result<u16> {
        Ok(u16::from_ne_bytes(self.fixed()?))
    }

    pub fn u32(&self) -> Result<u32> {
        Ok(u32::from_ne_bytes(self.fixed()?))
    }

    pub fn u64(&self) -> Result<u64> {
        Ok(u64::from_ne_bytes(self.fixed()?))
    }

    pub fn be16(&self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.fixed()?))
    }

    pub fn be32(&self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.fixed()?))
    }

    pub fn be64(&self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.fixed()?))
    }

    /// A string attribute, with its NUL terminator (if any) dropped.
    pub fn str(&self) -> Result<&'a str> {
        let bytes = match self.payload.iter().position(|&b| b == 0) {
            Some(nul) => &self.payload[..nul],
            None => self.payload,
        };
        std::str::from_utf8(bytes).with_context(|| format!("attribute type {}: not UTF-8", self.ty))
    }
}

/// Iterator over an attribute set. A malformed attribute yields one error and
/// ends the iteration: what follows it cannot be framed.
#[derive(Clone, Copy, Debug)]
pub struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Attrs<'a> {
    pub fn new(buf: &'a [u8]) -> Attrs<'a> {
        Attrs { rest: buf }
    }

    /// The first attribute of type `ty`, or None. Stops at malformed data.
    pub fn find(self, ty: u16) -> Result<Option<Attr<'a>>> {
        for attr in self {
            let attr = attr?;
            if attr.ty == ty {
                return Ok(Some(attr));
            }
        }
        Ok(None)
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<Attr<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let buf = mem::take(&mut self.rest);
        if buf.len() < NLA_HDRLEN {
            return Some(Err(anyhow!(
                "truncated attribute header: {} trailing bytes",
                buf.len()
            )));
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > buf.len() {
            return Some(Err(anyhow!(
                "malformed attribute type {ty}: nla_len {len} with {} bytes left",
                buf.len()
            )));
        }
        self.rest = buf.get(align4(len)..).unwrap_or_default();
        Some(Ok(Attr {
            ty,
            payload: &buf[NLA_HDRLEN..len],
        }))
    }
}

/// Decodes an NLMSG_ERROR payload: `Ok(None)` for an ack, the error otherwise.
pub fn parse_error(msg: &Msg<'_>) -> Result<Option<NlError>> {
    let p = msg.payload;
    if p.len() < 4 + NLMSG_HDRLEN {
        bail!("NLMSG_ERROR with a {}-byte payload", p.len());
    }
    let err = i32::from_ne_bytes([p[0], p[1], p[2], p[3]]);
    if err == 0 {
        return Ok(None);
    }
    let mut e = NlError::new(err.saturating_neg());
    if msg.flags & NLM_F_ACK_TLVS != 0 {
        // The echoed request is only its header when capped (NETLINK_CAP_ACK,
        // and always for plain acks); otherwise the whole request.
        let echoed = if msg.flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            u32::from_ne_bytes([p[4], p[5], p[6], p[7]]) as usize
        };
        let tlvs = p.get(4 + align4(echoed)..).unwrap_or_default();
        parse_ext_ack(tlvs, &mut e);
    }
    Ok(Some(e))
}

/// Decodes the payload of NLMSG_DONE: a dump can end in an error too.
fn parse_done(msg: &Msg<'_>) -> Option<NlError> {
    let p = msg.payload;
    let err = i32::from_ne_bytes(p.get(..4)?.try_into().ok()?);
    if err == 0 {
        return None;
    }
    let mut e = NlError::new(err.saturating_neg());
    if msg.flags & NLM_F_ACK_TLVS != 0 {
        parse_ext_ack(&p[4..], &mut e);
    }
    Some(e)
}

fn parse_ext_ack(tlvs: &[u8], e: &mut NlError) {
    // Best effort: the errno is what matters, the rest only explains it.
    for attr in Attrs::new(tlvs).map_while(Result::ok) {
        match attr.ty {
            NLMSGERR_ATTR_MSG => e.message = attr.str().ok().map(str::to_owned),
            NLMSGERR_ATTR_OFFS => e.bad_attr_offset = attr.u32().ok(),
            NLMSGERR_ATTR_MISS_TYPE => e.missing_attr = attr.u32().ok(),
            _ => {}
        }
    }
}

/// Name of a netlink protocol for error messages.
fn protocol_name(protocol: i32) -> String {
    match protocol {
        NETLINK_ROUTE => "NETLINK_ROUTE".into(),
        NETLINK_NETFILTER => "NETLINK_NETFILTER".into(),
        p => format!("netlink protocol {p}"),
    }
}

fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn getsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are live and len is the size of value.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets a buffer size, past the net.core.*mem_max limits when we have
/// CAP_NET_ADMIN (the FORCE variant), within them otherwise.
fn set_buf(fd: BorrowedFd<'_>, force: i32, plain: i32, size: usize) {
    let size = i32::try_from(size).unwrap_or(i32::MAX);
    if setsockopt_int(fd, libc::SOL_SOCKET, force, size).is_err()
        && let Err(e) = setsockopt_int(fd, libc::SOL_SOCKET, plain, size)
    {
        log::debug!("netlink socket buffer option {plain}: {e}");
    }
}

/// A netlink socket talking to the kernel, bound to the network namespace it
/// was created in for its whole life, whichever thread later uses it.
pub struct NlSocket {
    fd: OwnedFd,
    protocol: i32,
    seq: u32,
    rbuf: Vec<u8>,
}

impl fmt::Debug for NlSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NlSocket")
            .field("fd", &self.fd.as_raw_fd())
            .field("protocol", &protocol_name(self.protocol))
            .field("seq", &self.seq)
            .finish()
    }
}

/// What a nonblocking read of a subscription found.
pub enum Notice<'a> {
    Messages(Msgs<'a>),
    Empty,
    /// The receive queue overran: notifications were lost.
    Overrun,
    /// A datagram from another process, not the kernel: skipped.
    Foreign,
}

impl NlSocket {
    /// Opens a socket for `protocol` (NETLINK_ROUTE, NETLINK_NETFILTER) in
    /// `ns`, or in the calling thread's namespace for None.
    pub fn open(protocol: i32, ns: Option<&NetNs>) -> Result<NlSocket> {
        let make = move || -> io::Result<OwnedFd> {
            // SAFETY: plain syscall; the returned descriptor is owned below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    protocol,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fd is a fresh descriptor nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        let what = || match ns {
            Some(ns) => format!(
                "opening a {} socket in network namespace {}",
                protocol_name(protocol),
                ns.inode()
            ),
            None => format!("opening a {} socket", protocol_name(protocol)),
        };
        let fd = match ns {
            Some(ns) => ns.run(make).and_then(|made| Ok(made?)),
            None => Ok(make()?),
        }
        .with_context(what)?;

        set_buf(fd.as_fd(), libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, RCVBUF);
        set_buf(fd.as_fd(), libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, SNDBUF);
        // Older kernels lack these; we then get whole requests echoed in
        // errors and no extended messages, which is only less helpful.
        for opt in [NETLINK_EXT_ACK, NETLINK_CAP_ACK] {
            if let Err(e) = setsockopt_int(fd.as_fd(), SOL_NETLINK, opt, 1) {
                log::debug!("netlink socket option {opt}: {e}");
            }
        }
        let timeout = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as _,
            tv_usec: 0,
        };
        // SAFETY: passes a pointer to a live timeval and its exact size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error())
                .context("setting SO_RCVTIMEO on a netlink socket");
        }

        Ok(NlSocket {
            fd,
            protocol,
            seq: 0,
            rbuf: vec![0; RECV_BUF_LEN],
        })
    }

    pub fn protocol(&self) -> i32 {
        self.protocol
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The next sequence number; answers are matched to requests by it.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// The receive buffer size the kernel actually granted (it reports twice
    /// the requested value, the doubling covering skb overhead).
    fn rcvbuf(&self) -> usize {
        getsockopt_int(self.fd(), libc::SOL_SOCKET, libc::SO_RCVBUF)
            .ok()
            .and_then(|v| usize::try_from(v).ok())
            .unwrap_or(0)
    }

    /// Sends `bytes` as one datagram to the kernel.
    fn send(&self, bytes: &[u8]) -> Result<()> {
        // SAFETY: zeroed sockaddr_nl is valid; nl_pid 0 addresses the kernel.
        let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: bytes and addr are live for the call, lengths are theirs.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    0,
                    (&raw const addr).cast(),
                    mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n >= 0 {
                if n as usize != bytes.len() {
                    bail!("netlink sendto sent {n} of {} bytes", bytes.len());
                }
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e).with_context(|| {
                    format!(
                        "sending {} bytes on a {} socket",
                        bytes.len(),
                        protocol_name(self.protocol)
                    )
                });
            }
        }
    }

    /// Waits for the next datagram from the kernel (up to RECV_TIMEOUT) and
    /// returns its length in `rbuf`.
    fn recv_wait(&mut self) -> Result<usize> {
        self.recv(false)?
            .context("netlink recv returned without a datagram")
    }

    /// Unsubscribes from multicast group `group` (NETLINK_DROP_MEMBERSHIP).
    /// What the group sent before stays queued.
    pub fn leave_group(&mut self, group: u32) -> Result<()> {
        const NETLINK_DROP_MEMBERSHIP: libc::c_int = 2;
        self.membership(NETLINK_DROP_MEMBERSHIP, group)
            .with_context(|| format!("leaving netlink multicast group {group}"))
    }

    fn membership(&self, opt: libc::c_int, group: u32) -> io::Result<()> {
        setsockopt_int(
            self.fd(),
            SOL_NETLINK,
            opt,
            i32::try_from(group).unwrap_or(i32::MAX),
        )
    }

    /// Subscribes to multicast group `group` (NETLINK_ADD_MEMBERSHIP).
    pub fn join_group(&mut self, group: u32) -> Result<()> {
        const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;
        // A socket that never sent is unbound, with port id 0: the kernel's
        // broadcasts (also from port 0) skip it as their own sender. Binding
        // to port 0 has the kernel pick one.
        // SAFETY: a zeroed sockaddr_nl with its family set is valid; the
        // length is its own.
        let rc = unsafe {
            let mut addr: libc::sockaddr_nl = mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            libc::bind(
                self.fd.as_raw_fd(),
                (&raw const addr).cast(),
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            // Already bound (it sent a request before): fine.
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e).context("binding a netlink socket");
            }
        }
        self.membership(NETLINK_ADD_MEMBERSHIP, group)
            .with_context(|| format!("joining netlink multicast group {group}"))
    }

    /// The next queued notification of a subscription, without waiting.
    /// An overrun (the kernel dropped notifications, ENOBUFS) is said, and
    /// the socket stays usable. Only the kernel's are taken: a datagram from
    /// another process (any with CAP_NET_ADMIN could forge one) is skipped.
    pub fn next_notice(&mut self) -> Result<Notice<'_>> {
        loop {
            let (n, sender) = match self.recv_raw(libc::MSG_DONTWAIT) {
                Ok(got) => got,
                Err(e) => {
                    return match e.raw_os_error() {
                        Some(libc::EINTR) => continue,
                        Some(libc::EAGAIN) => Ok(Notice::Empty),
                        Some(libc::ENOBUFS) => Ok(Notice::Overrun),
                        _ => Err(e).context("receiving netlink notifications"),
                    };
                }
            };
            if n > self.rbuf.len() {
                bail!("netlink notification of {n} bytes truncated");
            }
            if sender != 0 {
                return Ok(Notice::Foreign);
            }
            return Ok(Notice::Messages(Msgs::new(&self.rbuf[..n])));
        }
    }

    /// One datagram into the receive buffer (`MSG_TRUNC` added to
    /// `flags`): its full length, which may exceed the buffer, and the
    /// sender's port id (0: the kernel).
    fn recv_raw(&mut self, flags: libc::c_int) -> io::Result<(usize, u32)> {
        // SAFETY: zeroed sockaddr_nl is a valid out-parameter.
        let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
        let mut addr_len = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: rbuf, addr and addr_len are live; lengths are theirs.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                self.rbuf.as_mut_ptr().cast(),
                self.rbuf.len(),
                flags | libc::MSG_TRUNC,
                (&raw mut addr).cast(),
                &raw mut addr_len,
            )
        };
        match usize::try_from(n) {
            Ok(n) => Ok((n, addr.nl_pid)),
            Err(_) => Err(io::Error::last_os_error()),
        }
    }

    /// The next datagram already queued, if any.
    fn recv_queued(&mut self) -> Result<Option<usize>> {
        self.recv(true)
    }

    fn recv(&mut self, nonblocking: bool) -> Result<Option<usize>> {
        let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        loop {
            let (n, sender) = match self.recv_raw(flags) {
                Ok(got) => got,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) if nonblocking => return Ok(None),
                    Some(libc::EAGAIN) => bail!(
                        "no answer from the kernel on a {} socket within {} s",
                        protocol_name(self.protocol),
                        RECV_TIMEOUT.as_secs()
                    ),
                    Some(libc::ENOBUFS) => {
                        return Err(e).context(
                                "netlink receive queue overran: the kernel dropped answers to our requests",
                            );
                    }
                    _ => return Err(e).context("receiving from a netlink socket"),
                },
            };
            if n > self.rbuf.len() {
                bail!(
                    "netlink datagram of {n} bytes truncated to our {}-byte buffer",
                    self.rbuf.len()
                );
            }
            if sender != 0 {
                // Only another process could send this; it is not an answer.
                log::debug!("ignoring netlink datagram from port {sender}");
                continue;
            }
            return Ok(Some(n));
        }
    }

    /// Sends a request with NLM_F_ACK and waits for the ack; any reply
    /// messages before it are ignored. Fails with [`NlError`] when the kernel
    /// refuses the request.
    pub fn request_ack(&mut self, msg: MsgBuilder) -> Result<()> {
        self.converse(msg, NLM_F_ACK, &mut |_| Ok(()))?;
        Ok(())
    }

    /// Sends a request with NLM_F_ACK, hands every reply message to
    /// `on_reply`, and waits for the ack. For GET requests that answer with
    /// one object (RTM_GETLINK by name, IPCTNL_MSG_CT_GET_STATS).
    pub fn request(
        &mut self,
        msg: MsgBuilder,
        mut on_reply: impl FnMut(&Msg<'_>) -> Result<()>,
    ) -> Result<()> {
        self.converse(msg, NLM_F_ACK, &mut on_reply)?;
        Ok(())
    }

    /// Sends a dump request (NLM_F_DUMP) and hands each message to `on_msg` as
    /// it arrives, one datagram at a time, so memory stays bounded whatever
    /// the table size. Returns how many messages were handed over.
    ///
    /// If `on_msg` fails, the rest of the dump is still read (and discarded)
    /// so the socket stays usable, then that error is returned. Messages of
    /// an inconsistent dump carry NLM_F_DUMP_INTR in [`Msg::flags`].
    pub fn dump(
        &mut self,
        msg: MsgBuilder,
        mut on_msg: impl FnMut(&Msg<'_>) -> Result<()>,
    ) -> Result<u64> {
        self.converse(msg, NLM_F_DUMP, &mut on_msg)
    }

    fn converse(
        &mut self,
        mut msg: MsgBuilder,
        mode: u16,
        on_msg: &mut dyn FnMut(&Msg<'_>) -> Result<()>,
    ) -> Result<u64> {
        msg.check()?;
        if msg.start != 0 {
            bail!("request builder holds more than one message; use a Batch");
        }
        let seq = self.next_seq();
        let flags = msg.flags_at(0) | NLM_F_REQUEST | mode;
        msg.set_flags_at(0, flags);
        msg.set_seq_at(0, seq);
        let ty = u16::from_ne_bytes([msg.buf[4], msg.buf[5]]);
        self.send(msg.as_bytes())?;

        let mut handed = 0u64;
        let mut failed: Option<anyhow::Error> = None;
        loop {
            let n = self.recv_wait()?;
            for m in Msgs::new(&self.rbuf[..n]) {
                let m = m.with_context(|| format!("answer to netlink request type {ty}"))?;
                if m.seq != seq {
                    // Left over from an earlier request abandoned mid-way.
                    log::debug!("ignoring netlink message seq {} (want {seq})", m.seq);
                    continue;
                }
                let outcome = match m.ty {
                    NLMSG_NOOP => continue,
                    NLMSG_ERROR => parse_error(&m)?,
                    NLMSG_DONE => parse_done(&m),
                    NLMSG_OVERRUN => bail!("kernel reported NLMSG_OVERRUN"),
                    _ => {
                        handed += 1;
                        if failed.is_none()
                            && let Err(e) = on_msg(&m)
                        {
                            failed = Some(e);
                        }
                        continue;
                    }
                };
                if let Some(e) = outcome {
                    return Err(e.into());
                }
                return match failed {
                    Some(e) => Err(e),
                    None => Ok(handed),
                };
            }
        }
    }

    /// A batch sender on this socket; see [`Batch`].
    pub fn batch(&mut self) -> Batch<'_> {
        Batch::new(self)
    }
}

/// Outcome of a [`Batch`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Messages sent, failed or not.
    pub sent: u64,
    /// Failures per errno (positive), sorted by errno.
    pub failed: Vec<(i32, u64)>,
    /// The first failure in full, for its extended ack message.
    pub first_error: Option<NlError>,
}

impl BatchReport {
    pub fn failures(&self, errno: i32) -> u64 {
        self.failed
            .iter()
            .find(|(e, _)| *e == errno)
            .map_or(0, |(_, n)| *n)
    }

    pub fn total_failed(&self) -> u64 {
        self.failed.iter().map(|(_, n)| n).sum()
    }

    pub fn succeeded(&self) -> u64 {
        self.sent.saturating_sub(self.total_failed())
    }

    fn count(&mut self, e: NlError) {
        match self.failed.iter_mut().find(|(errno, _)| *errno == e.errno) {
            Some((_, n)) => *n += 1,
            None => {
                self.failed.push((e.errno, 1));
                self.failed.sort_unstable();
            }
        }
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }
}

/// Sends many requests with few syscalls and counts failures by errno.
///
/// Messages are packed back to back into chunks of up to [`Batch::CHUNK_BYTES`],
/// one `sendmsg` each. Only the last message of a chunk asks for an ack: the
/// kernel answers the others only when they fail, so a successful chunk costs
/// one send and one small receive. The kernel processes a datagram's messages
/// in order inside our `sendmsg`, so when that returns, every error of the
/// chunk and then the final ack are already queued; reading them without
/// blocking also catches the one case where the ack never comes (nfnetlink
/// rejects a whole datagram after answering its first message, e.g. EPERM).
///
/// Chunks are also capped in message count so that a chunk that fails
/// entirely (table full) cannot overrun the receive buffer with error
/// messages before we read them.
///
/// Messages still buffered when a Batch is dropped are not sent: call
/// [`Batch::finish`].
pub struct Batch<'s> {
    sock: &'s mut NlSocket,
    buf: MsgBuilder,
    first_seq: u32,
    last_seq: u32,
    pending: u32,
    max_pending: u32,
    report: BatchReport,
}

impl<'s> Batch<'s> {
    /// Upper bound on one chunk. Past a few tens of KiB the syscall cost is
    /// already noise next to the kernel's per-message work.
    pub const CHUNK_BYTES: usize = 128 << 10;
    /// Receive-buffer budget per message for a chunk that fails whole: an
    /// NLMSG_ERROR skb's truesize is well under 1 KiB with capped acks.
    const ERROR_TRUESIZE: usize = 2048;

    fn new(sock: &'s mut NlSocket) -> Batch<'s> {
        let max_pending = (sock.rcvbuf() / Self::ERROR_TRUESIZE).clamp(1, u32::MAX as usize) as u32;
        Batch {
            sock,
            buf: MsgBuilder::empty(Self::CHUNK_BYTES + 4096),
            first_seq: 0,
            last_seq: 0,
            pending: 0,
            max_pending,
            report: BatchReport::default(),
        }
    }

    /// Appends a request of type `ty` built by `build` (which adds the family
    /// header and attributes). NLM_F_REQUEST is added; do not pass NLM_F_ACK.
    /// Sends the chunk when it is full. An encoding error in this message
    /// drops just this message and is returned.
    pub fn push(&mut self, ty: u16, flags: u16, build: impl FnOnce(&mut MsgBuilder)) -> Result<()> {
        let at = self.buf.len();
        let seq = self.sock.next_seq();
        self.buf
            .begin(ty, (flags & !NLM_F_ACK) | NLM_F_REQUEST, seq);
        build(&mut self.buf);
        if let Err(e) = self.buf.check() {
            self.buf.buf.truncate(at);
            self.buf.error = None;
            return Err(e);
        }
        if self.pending == 0 {
            self.first_seq = seq;
        }
        self.last_seq = seq;
        self.pending += 1;
        if self.buf.len() >= Self::CHUNK_BYTES || self.pending >= self.max_pending {
            self.flush()?;
        }
        Ok(())
    }

    /// Sends what is buffered and collects its errors.
    pub fn flush(&mut self) -> Result<()> {
        if self.pending == 0 {
            return Ok(());
        }
        let last = self.buf.start;
        let flags = self.buf.flags_at(last) | NLM_F_ACK;
        self.buf.set_flags_at(last, flags);
        self.sock.send(self.buf.as_bytes())?;
        let (first, last_seq, pending) = (self.first_seq, self.last_seq, self.pending);
        self.buf.buf.clear();
        self.buf.start = 0;
        self.pending = 0;

        // Sequence numbers of one chunk are consecutive but may wrap.
        let in_chunk = |seq: u32| seq.wrapping_sub(first) <= last_seq.wrapping_sub(first);
        loop {
            let Some(n) = self.sock.recv_queued()? else {
                bail!(
                    "the kernel did not acknowledge the last message (seq {last_seq}) of a \
                     {pending}-message batch; answers for part of the batch are missing"
                );
            };
            let mut done = false;
            for m in Msgs::new(&self.sock.rbuf[..n]) {
                let m = m.context("answer to a netlink batch")?;
                if m.ty != NLMSG_ERROR || !in_chunk(m.seq) {
                    log::debug!(
                        "ignoring netlink message type {} seq {} in a batch",
                        m.ty,
                        m.seq
                    );
                    continue;
                }
                if let Some(e) = parse_error(&m)? {
                    self.report.count(e);
                }
                done |= m.seq == last_seq;
            }
            if done {
                self.report.sent += u64::from(pending);
                return Ok(());
            }
        }
    }

    /// Sends the rest and returns the counts.
    pub fn finish(mut self) -> Result<BatchReport> {
        self.flush()?;
        Ok(mem::take(&mut self.report))
    }

    /// Counts so far (messages still buffered are not included).
    pub fn report(&self) -> &BatchReport {
        &self.report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_builder_lays_out_nested_attributes() {
        let mut b = MsgBuilder::new(0x0100, NLM_F_CREATE);
        b.header(&[2, 0, 0, 0])
            .nested(1, |b| {
                b.be16(2, 0x1234).u8(3, 7);
            })
            .str(4, "veth0")
            .u32(5, 9);
        b.check().unwrap();
        let bytes = b.as_bytes();
        assert_eq!(bytes.len() % 4, 0);
        let msg = Msgs::new(bytes).next().unwrap().unwrap();
        assert_eq!(msg.ty, 0x0100);
        assert_eq!(msg.flags, NLM_F_CREATE);
        assert_eq!(msg.payload.len() + NLMSG_HDRLEN, bytes.len());
        assert_eq!(msg.header(4).unwrap(), &[2, 0, 0, 0]);

        let attrs: Vec<_> = msg.attrs(4).unwrap().map(Result::unwrap).collect();
        assert_eq!(attrs.len(), 3);
        assert_eq!(attrs[0].ty, 1, "NLA_F_NESTED is masked off");
        let inner: Vec<_> = attrs[0].nested().map(Result::unwrap).collect();
        assert_eq!(inner[0].ty, 2);
        assert_eq!(inner[0].be16().unwrap(), 0x1234);
        assert_eq!(inner[1].u8().unwrap(), 7);
        assert_eq!(attrs[1].payload, b"veth0\0");
        assert_eq!(attrs[1].str().unwrap(), "veth0");
        assert_eq!(attrs[2].u32().unwrap(), 9);
        // The nested header carries the flag on the wire.
        let raw_ty = u16::from_ne_bytes([bytes[NLMSG_HDRLEN + 6], bytes[NLMSG_HDRLEN + 7]]);
        assert_eq!(raw_ty, 1 | NLA_F_NESTED);
    }

    #[test]
    fn netlink_string_lengths_and_padding() {
        for s in ["", "a", "abc", "abcd", "abcdefg"] {
            let mut b = MsgBuilder::new(1, 0);
            b.str(3, s).u8(4, 1);
            b.check().unwrap();
            let msg = Msgs::new(b.as_bytes()).next().unwrap().unwrap();
            let attrs: Vec<_> = Attrs::new(msg.payload).map(Result::unwrap).collect();
            assert_eq!(attrs[0].payload.len(), s.len() + 1, "{s:?}");
            assert_eq!(attrs[0].str().unwrap(), s);
            assert_eq!(attrs[1].u8().unwrap(), 1, "{s:?}");
        }
    }

    #[test]
    fn netlink_encoding_errors_are_reported_not_panicked() {
        let mut b = MsgBuilder::new(1, 0);
        b.str(1, "a\0b");
        assert!(b.check().unwrap_err().to_string().contains("NUL"));

        let mut b = MsgBuilder::new(1, 0);
        b.bytes(1, &vec![0; 70_000]).u8(2, 1);
        let err = b.check().unwrap_err().to_string();
        assert!(err.contains("attribute type 1"), "{err}");
        // Still a well-formed message with the later attribute in it.
        let msg = Msgs::new(b.as_bytes()).next().unwrap().unwrap();
        assert_eq!(Attrs::new(msg.payload).count(), 1);

        let mut b = MsgBuilder::new(1, 0);
        b.nested(7, |b| {
            for _ in 0..20 {
                b.bytes(1, &[0; 4000]);
            }
        });
        assert!(b.check().is_err());
        assert_eq!(b.len(), NLMSG_HDRLEN);
    }

    #[test]
    fn netlink_parser_rejects_malformed_input() {
        // nla_len larger than what is left.
        let buf = [12u8, 0, 1, 0, 0, 0];
        let mut it = Attrs::new(&buf);
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
        // nla_len below the header size.
        assert!(Attrs::new(&[2, 0, 1, 0]).next().unwrap().is_err());
        // Truncated header.
        assert!(Attrs::new(&[8, 0]).next().unwrap().is_err());
        // nlmsg_len past the end, and a short trailer.
        let mut m = MsgBuilder::new(1, 0).as_bytes().to_vec();
        m[0] = 200;
        assert!(Msgs::new(&m).next().unwrap().is_err());
        assert!(Msgs::new(&[0; 7]).next().unwrap().is_err());
        // Wrong-size scalar.
        let a = Attr {
            ty: 3,
            payload: &[1, 2, 3],
        };
        assert!(
            a.u32()
                .unwrap_err()
                .to_string()
                .contains("expected 4 bytes, got 3")
        );
        assert!(
            Msg {
                ty: 1,
                flags: 0,
                seq: 0,
                pid: 0,
                payload: &[1, 2]
            }
            .attrs(4)
            .is_err()
        );
    }

    #[test]
    fn netlink_error_message_with_extended_ack() {
        // NLMSG_ERROR, capped, with TLVs: -EINVAL, echoed header, MSG + OFFS.
        let mut b = MsgBuilder::new(NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS);
        let mut payload = (-libc::EINVAL).to_ne_bytes().to_vec();
        payload.extend_from_slice(MsgBuilder::new(16, NLM_F_REQUEST).as_bytes());
        b.header(&payload)
            .str(NLMSGERR_ATTR_MSG, "Unknown device type")
            .u32(NLMSGERR_ATTR_OFFS, 36);
        let msg = Msgs::new(b.as_bytes()).next().unwrap().unwrap();
        let e = parse_error(&msg).unwrap().unwrap();
        assert_eq!(e.errno, libc::EINVAL);
        assert_eq!(e.message.as_deref(), Some("Unknown device type"));
        assert_eq!(e.bad_attr_offset, Some(36));
        let text = e.to_string();
        assert!(
            text.starts_with("EINVAL (Invalid argument): Unknown device type"),
            "{text}"
        );

        // Wrapped in context, the errno is still reachable.
        let any = anyhow::Error::from(e).context("adding a link");
        assert_eq!(NlError::errno_of(&any), Some(libc::EINVAL));

        // A plain ack.
        let mut b = MsgBuilder::new(NLMSG_ERROR, NLM_F_CAPPED);
        let mut payload = 0i32.to_ne_bytes().to_vec();
        payload.extend_from_slice(MsgBuilder::new(16, 0).as_bytes());
        b.header(&payload);
        let msg = Msgs::new(b.as_bytes()).next().unwrap().unwrap();
        assert!(parse_error(&msg).unwrap().is_none());
    }

    #[test]
    fn netlink_batch_report_counts() {
        let mut r = BatchReport {
            sent: 10,
            ..Default::default()
        };
        r.count(NlError::new(libc::ENOMEM));
        r.count(NlError::new(libc::EEXIST));
        r.count(NlError::new(libc::ENOMEM));
        assert_eq!(r.failed, vec![(libc::ENOMEM, 2), (libc::EEXIST, 1)]);
        assert_eq!(r.failures(libc::ENOMEM), 2);
        assert_eq!(r.succeeded(), 7);
        assert_eq!(r.first_error.unwrap().errno, libc::ENOMEM);
    }
}
