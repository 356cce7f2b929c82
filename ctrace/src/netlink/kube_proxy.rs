//! kube-proxy's own rules, read back from nf_tables: which Service each
//! ClusterIP (and external or load-balancer IP) is.
//!
//! kube-proxy writes the Service's `namespace/name:port` beside every
//! address it programs, in both of its netfilter modes:
//! - **nftables mode:** map `service-ips` in tables `ip kube-proxy` and `ip6
//!   kube-proxy`, keyed by `address . inet_proto . inet_service`, each
//!   element with a comment (set element userdata);
//! - **iptables mode** through iptables-nft (the default backend of current
//!   distributions): rules in chain `KUBE-SERVICES` of tables `ip nat` and
//!   `ip6 nat`, matching `daddr`, `l4proto` and `dport`, with the comment
//!   either in the rule's userdata or in an xtables `comment` match.
//!
//! iptables-legacy keeps its rules in x_tables, which nf_tables cannot see;
//! [`read`] says so instead of guessing.
//!
//! Nothing here trusts the text: names are returned raw and validated by
//! the caller ([`crate::cluster_ips`]).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};

use super::ctnetlink::{NFGENMSG_LEN, nfgenmsg};
use super::nftables::{
    NFT_MSG_GETRULE, NFT_MSG_NEWRULE, NFTA_DATA_VALUE, NFTA_EXPR_DATA, NFTA_EXPR_NAME,
    NFTA_LIST_ELEM, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS, NFTA_RULE_TABLE, NFTA_RULE_USERDATA,
    nft_msg_type,
};
use super::{Attr, Attrs, MsgBuilder, NETLINK_NETFILTER, NlError, NlSocket};
use crate::netns::NetNs;

// linux/netfilter.h
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
// enum nf_tables_msg_types
const NFT_MSG_NEWSETELEM: u8 = 12;
const NFT_MSG_GETSETELEM: u8 = 13;
// enum nft_set_elem_list_attributes, nft_set_elem_attributes
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
// libnftnl's userdata TLVs: the comment is type 0 for rules and elements.
const NFTNL_UDATA_COMMENT: u8 = 0;
// enum nft_meta_attributes, nft_meta_keys
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_L4PROTO: u32 = 16;
// enum nft_payload_attributes, nft_payload_bases
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
// enum nft_cmp_attributes, nft_cmp_ops
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
// enum nft_match_attributes (nft_compat: xtables matches inside nf_tables)
const NFTA_MATCH_NAME: u16 = 1;
const NFTA_MATCH_INFO: u16 = 3;

/// Where kube-proxy keeps the names, per mode.
pub const NFT_TABLE: &str = "kube-proxy";
pub const NFT_MAP: &str = "service-ips";
pub const IPT_TABLE: &str = "nat";
pub const IPT_CHAIN: &str = "KUBE-SERVICES";

/// One address kube-proxy programs for a Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceIp {
    pub ip: IpAddr,
    /// IPPROTO_* number.
    pub proto: u8,
    pub port: u16,
    /// The comment as kube-proxy wrote it, unvalidated.
    pub comment: String,
}

/// Which of kube-proxy's modes the names came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Nftables,
    IptablesNft,
}

impl Mode {
    pub fn describe(self) -> &'static str {
        match self {
            Mode::Nftables => "nftables mode: map service-ips of table kube-proxy",
            Mode::IptablesNft => "iptables mode (iptables-nft): chain KUBE-SERVICES of table nat",
        }
    }
}

/// The addresses of one mode, the first mode that has any. `Ok(None)`: no
/// kube-proxy rules in nf_tables at all.
pub fn read(ns: Option<&NetNs>) -> Result<Option<(Mode, Vec<ServiceIp>)>> {
    let mut sock = NlSocket::open(NETLINK_NETFILTER, ns).context("opening an nf_tables socket")?;
    let mut found = Vec::new();
    for family in [NFPROTO_IPV4, NFPROTO_IPV6] {
        found.extend(map_elements(&mut sock, family)?);
    }
    if !found.is_empty() {
        return Ok(Some((Mode::Nftables, found)));
    }
    for family in [NFPROTO_IPV4, NFPROTO_IPV6] {
        found.extend(chain_rules(&mut sock, family)?);
    }
    Ok((!found.is_empty()).then_some((Mode::IptablesNft, found)))
}

/// The elements of `service-ips` in one family's `kube-proxy` table; none
/// when the table or map does not exist.
fn map_elements(sock: &mut NlSocket, family: u8) -> Result<Vec<ServiceIp>> {
    let mut msg = MsgBuilder::new(nft_msg_type(NFT_MSG_GETSETELEM), 0);
    msg.header(&nfgenmsg(family, 0))
        .str(NFTA_SET_ELEM_LIST_TABLE, NFT_TABLE)
        .str(NFTA_SET_ELEM_LIST_SET, NFT_MAP);
    let mut out = Vec::new();
    let result = sock.dump(msg, |m| {
        if m.ty != nft_msg_type(NFT_MSG_NEWSETELEM) {
            return Ok(());
        }
        let Some(list) = m.attrs(NFGENMSG_LEN)?.find(NFTA_SET_ELEM_LIST_ELEMENTS)? else {
            return Ok(());
        };
        for elem in list.nested() {
            let elem = elem?;
            if elem.ty != NFTA_LIST_ELEM {
                continue;
            }
            if let Some(s) = service_element(elem.nested(), family)? {
                out.push(s);
            }
        }
        Ok(())
    });
    match result {
        Ok(_) => Ok(out),
        Err(e) if NlError::errno_of(&e) == Some(libc::ENOENT) => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("listing map {NFT_MAP} of table {NFT_TABLE}")),
    }
}

/// An element keyed `address . inet_proto . inet_service`: concatenated
/// fields each padded to a 4-byte register.
fn service_element(attrs: Attrs<'_>, family: u8) -> Result<Option<ServiceIp>> {
    let (mut key, mut comment) = (None, None);
    for a in attrs {
        let a = a?;
        match a.ty {
            NFTA_SET_ELEM_KEY => key = a.nested().find(NFTA_DATA_VALUE)?.map(|v| v.payload),
            NFTA_SET_ELEM_USERDATA => comment = userdata_comment(a.payload),
            _ => {}
        }
    }
    let (Some(key), Some(comment)) = (key, comment) else {
        return Ok(None);
    };
    let addr_len = if family == NFPROTO_IPV4 { 4 } else { 16 };
    if key.len() != addr_len + 8 {
        return Ok(None);
    }
    let ip = ip_of(&key[..addr_len]);
    let proto = key[addr_len];
    let port = u16::from_be_bytes([key[addr_len + 4], key[addr_len + 5]]);
    Ok(ip.map(|ip| ServiceIp {
        ip,
        proto,
        port,
        comment,
    }))
}

/// The rules of `KUBE-SERVICES` in one family's `nat` table that match one
/// destination address, protocol and port; none when there is no such
/// chain.
fn chain_rules(sock: &mut NlSocket, family: u8) -> Result<Vec<ServiceIp>> {
    let mut msg = MsgBuilder::new(nft_msg_type(NFT_MSG_GETRULE), 0);
    msg.header(&nfgenmsg(family, 0))
        .str(NFTA_RULE_TABLE, IPT_TABLE)
        .str(NFTA_RULE_CHAIN, IPT_CHAIN);
    let mut out = Vec::new();
    let result = sock.dump(msg, |m| {
        if m.ty != nft_msg_type(NFT_MSG_NEWRULE) {
            return Ok(());
        }
        let (mut exprs, mut comment) = (None, None);
        for a in m.attrs(NFGENMSG_LEN)? {
            let a = a?;
            match a.ty {
                NFTA_RULE_EXPRESSIONS => exprs = Some(a.nested()),
                NFTA_RULE_USERDATA => comment = userdata_comment(a.payload),
                _ => {}
            }
        }
        if let Some(exprs) = exprs
            && let Some(s) = service_rule(exprs, family, comment)?
        {
            out.push(s);
        }
        Ok(())
    });
    match result {
        Ok(_) => Ok(out),
        Err(e) if NlError::errno_of(&e) == Some(libc::ENOENT) => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("listing chain {IPT_CHAIN} of table {IPT_TABLE}")),
    }
}

/// What a register was loaded with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Loaded {
    L4Proto,
    Daddr,
    Dport,
}

/// Follows the rule's loads and compares: `daddr == A`, `l4proto == P`,
/// `dport == N`, plus a comment (userdata, or an xtables `comment` match).
/// A rule missing any of them (the nodeports jump, a masked address) is no
/// Service address.
fn service_rule(
    exprs: Attrs<'_>,
    family: u8,
    mut comment: Option<String>,
) -> Result<Option<ServiceIp>> {
    let addr_off = if family == NFPROTO_IPV4 { 16 } else { 24 };
    let addr_len = if family == NFPROTO_IPV4 { 4 } else { 16 };
    let mut regs: [Option<Loaded>; 32] = [None; 32];
    let (mut ip, mut proto, mut port) = (None, None, None);
    for e in exprs {
        let e = e?;
        if e.ty != NFTA_LIST_ELEM {
            continue;
        }
        let mut name = "";
        let mut data = Attrs::new(&[]);
        for a in e.nested() {
            let a = a?;
            match a.ty {
                NFTA_EXPR_NAME => name = a.str()?,
                NFTA_EXPR_DATA => data = a.nested(),
                _ => {}
            }
        }
        match name {
            "meta" => {
                let reg = reg_of(data.find(NFTA_META_DREG)?)?;
                let key = data.find(NFTA_META_KEY)?.map(|a| a.be32()).transpose()?;
                set(
                    &mut regs,
                    reg,
                    (key == Some(NFT_META_L4PROTO)).then_some(Loaded::L4Proto),
                );
            }
            "payload" => {
                let reg = reg_of(data.find(NFTA_PAYLOAD_DREG)?)?;
                let field =
                    |ty| -> Result<Option<u32>> { data.find(ty)?.map(|a| a.be32()).transpose() };
                let what = match (
                    field(NFTA_PAYLOAD_BASE)?,
                    field(NFTA_PAYLOAD_OFFSET)?,
                    field(NFTA_PAYLOAD_LEN)?,
                ) {
                    (Some(NFT_PAYLOAD_NETWORK_HEADER), Some(o), Some(l))
                        if o == addr_off && l as usize == addr_len =>
                    {
                        Some(Loaded::Daddr)
                    }
                    (Some(NFT_PAYLOAD_TRANSPORT_HEADER), Some(2), Some(2)) => Some(Loaded::Dport),
                    _ => None,
                };
                set(&mut regs, reg, what);
            }
            "cmp" => {
                let reg = reg_of(data.find(NFTA_CMP_SREG)?)?;
                let op = data.find(NFTA_CMP_OP)?.map(|a| a.be32()).transpose()?;
                let value = match data.find(NFTA_CMP_DATA)? {
                    Some(d) => d.nested().find(NFTA_DATA_VALUE)?.map(|v| v.payload),
                    None => None,
                };
                let (Some(value), Some(NFT_CMP_EQ)) = (value, op) else {
                    continue;
                };
                match reg.and_then(|r| regs.get(r).copied().flatten()) {
                    Some(Loaded::Daddr) => ip = ip_of(value),
                    Some(Loaded::L4Proto) if value.len() == 1 => proto = Some(value[0]),
                    Some(Loaded::Dport) if value.len() == 2 => {
                        port = Some(u16::from_be_bytes([value[0], value[1]]))
                    }
                    _ => {}
                }
            }
            "match" => {
                let match_name = data.find(NFTA_MATCH_NAME)?.map(|a| a.str()).transpose()?;
                let info = data.find(NFTA_MATCH_INFO)?.map(|a| a.payload);
                match (match_name, info) {
                    // struct xt_comment_info { char comment[256]; }
                    (Some("comment"), Some(info)) => comment = Some(c_string(info)),
                    // struct xt_tcp / xt_udp: spts[2], dpts[2] in host order.
                    (Some("tcp" | "udp"), Some(info)) if info.len() >= 8 => {
                        let lo = u16::from_ne_bytes([info[4], info[5]]);
                        let hi = u16::from_ne_bytes([info[6], info[7]]);
                        if lo == hi {
                            port = Some(lo);
                        }
                    }
                    _ => {}
                }
            }
            // Anything else writing a register we track makes its
            // contents unknown (a bitwise mask on the address, say).
            _ => {
                for dreg in [1u16, 2, 3] {
                    if let Ok(Some(r)) = data.find(dreg).and_then(reg_of) {
                        set(&mut regs, Some(r), None);
                    }
                }
            }
        }
    }
    Ok(match (ip, proto, port, comment) {
        (Some(ip), Some(proto), Some(port), Some(comment)) => Some(ServiceIp {
            ip,
            proto,
            port,
            comment,
        }),
        _ => None,
    })
}

fn reg_of(a: Option<Attr<'_>>) -> Result<Option<usize>> {
    Ok(a.map(|a| a.be32()).transpose()?.map(|r| r as usize))
}

fn set(regs: &mut [Option<Loaded>; 32], reg: Option<usize>, what: Option<Loaded>) {
    if let Some(slot) = reg.and_then(|r| regs.get_mut(r)) {
        *slot = what;
    }
}

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?).into()),
        16 => Some(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?).into()),
        _ => None,
    }
}

/// The comment TLV of libnftnl userdata: `u8 type, u8 len, value` records.
fn userdata_comment(mut udata: &[u8]) -> Option<String> {
    while udata.len() >= 2 {
        let (ty, len) = (udata[0], udata[1] as usize);
        let value = udata.get(2..2 + len)?;
        if ty == NFTNL_UDATA_COMMENT {
            return Some(c_string(value));
        }
        udata = &udata[2 + len..];
    }
    None
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userdata_comment_is_found_among_other_records() {
        let mut u = vec![1, 1, 0xff];
        u.extend([0, 5]);
        u.extend(b"a/b\0\0");
        assert_eq!(userdata_comment(&u).as_deref(), Some("a/b"));
        assert_eq!(userdata_comment(&[0, 9, 1]), None, "truncated");
        assert_eq!(userdata_comment(&[]), None);
    }
}
