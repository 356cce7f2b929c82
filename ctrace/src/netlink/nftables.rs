//! nf_tables (nfnetlink subsystem 10), just enough to make a lab namespace
//! behave like a router with a stateful firewall: conntrack on, and
//! optionally a rule that drops one TCP port.
//!
//! Why a ruleset at all: since Linux 4.10 conntrack registers its netfilter
//! hooks in a network namespace only when something there asks for them
//! through nf_ct_netns_get(): an nft `ct` expression, an iptables
//! state/conntrack match, NAT. A fresh namespace therefore tracks nothing,
//! even with nf_conntrack built in. One `ct state` rule in an inet table
//! registers the IPv4 and IPv6 hooks (prerouting, input, output,
//! postrouting), which is exactly what a distribution firewall does.
//!
//! This speaks netlink directly so that the lab runs in a minimal VM without
//! the `nft` binary. Every change is one nf_tables transaction:
//! NFNL_MSG_BATCH_BEGIN, the NEW* messages, NFNL_MSG_BATCH_END, all in a
//! single datagram, because nfnetlink only treats messages as one batch
//! when they arrive in the same skb; the kernel then commits them all or
//! rolls them all back. The generic [`super::Batch`] is not used for that
//! reason (it may split its buffer and acks only its last message).
//!
//! Rules this module adds carry a comment in their userdata (the same
//! NFTNL_UDATA_RULE_COMMENT TLV that `nft ... comment "..."` writes), which is
//! how a second call recognises them and does not add them twice, and how a
//! human reading `nft list ruleset` knows where they came from.
use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
};

use anyhow::{Context, Result, bail};

use super::ctnetlink::{NFGENMSG_LEN, nfgenmsg};
use super::{
    MsgBuilder, Msgs, NETLINK_NETFILTER, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP_INTR,
    NLM_F_EXCL, NLM_F_REQUEST, NLMSG_ERROR, NlError, NlSocket, parse_error,
};
use crate::netns::NetNs;
use ctrace_common::IPPROTO_TCP;

/// The table everything lives in (`table inet ctrace_lab`).
pub const TABLE: &str = "ctrace_lab";
/// Base chain on the forward hook: sees routed traffic, after conntrack's
/// prerouting hook has attached an entry (confirmed or new) to the skb.
pub const FORWARD_CHAIN: &str = "forward";
/// Base chain on the output hook, so the intent "track locally generated
/// packets too" is visible in the ruleset. (Any one `ct` expression already
/// registers every conntrack hook of the namespace.)
pub const OUTPUT_CHAIN: &str = "output";

// linux/netfilter/nfnetlink.h
pub const NFNL_SUBSYS_NFTABLES: u8 = 10;
/// NLMSG_MIN_TYPE: batch delimiters sit below every subsystem's types.
pub const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub const NFNL_MSG_BATCH_END: u16 = 0x11;
/// enum nfnl_batch_attributes: the ruleset generation the batch was
/// computed against; the kernel refuses it with ERESTART if that changed.
pub const NFNL_BATCH_GENID: u16 = 1;

// linux/netfilter.h
pub const NFPROTO_INET: u8 = 1;
pub const NF_DROP: u32 = 0;
pub const NF_ACCEPT: u32 = 1;
// enum nf_inet_hooks
pub const NF_INET_FORWARD: u32 = 2;
pub const NF_INET_LOCAL_OUT: u32 = 3;
/// NF_IP_PRI_FILTER: `priority filter` / `priority 0` in nft syntax.
pub const NF_PRI_FILTER: i32 = 0;
/// NF_IP_PRI_RAW: before conntrack (-200) sees the packet.
pub const NF_PRI_RAW: i32 = -300;
pub const NF_INET_PRE_ROUTING: u32 = 0;
/// Base chain at the raw priority of prerouting.
pub const RAW_CHAIN: &str = "raw_prerouting";
/// Made only for masquerading: type nat, hook postrouting, priority 100.
pub const NAT_CHAIN: &str = "nat_postrouting";
pub const NF_INET_POST_ROUTING: u32 = 4;
pub const NF_PRI_NAT_SRC: i32 = 100;

// linux/netfilter/nf_tables.h: enum nf_tables_msg_types
pub const NFT_MSG_NEWTABLE: u8 = 0;
pub const NFT_MSG_GETTABLE: u8 = 1;
pub const NFT_MSG_DELTABLE: u8 = 2;
pub const NFT_MSG_NEWCHAIN: u8 = 3;
pub const NFT_MSG_NEWRULE: u8 = 6;
pub const NFT_MSG_GETRULE: u8 = 7;
pub const NFT_MSG_NEWGEN: u8 = 15;
pub const NFT_MSG_GETGEN: u8 = 16;

// enum nft_table_attributes
pub const NFTA_TABLE_NAME: u16 = 1;
pub const NFTA_TABLE_FLAGS: u16 = 2;
pub const NFTA_TABLE_USERDATA: u16 = 6;
pub const NFTA_TABLE_OWNER: u16 = 7;
/// The table belongs to the netlink socket that made it: nobody else can
/// change it, and the kernel deletes it when that socket closes (5.12+).
pub const NFT_TABLE_F_OWNER: u32 = 2;
// enum nft_chain_attributes
pub const NFTA_CHAIN_TABLE: u16 = 1;
pub const NFTA_CHAIN_NAME: u16 = 3;
pub const NFTA_CHAIN_HOOK: u16 = 4;
pub const NFTA_CHAIN_POLICY: u16 = 5;
pub const NFTA_CHAIN_TYPE: u16 = 7;
// enum nft_hook_attributes
pub const NFTA_HOOK_HOOKNUM: u16 = 1;
pub const NFTA_HOOK_PRIORITY: u16 = 2;
// enum nft_rule_attributes
pub const NFTA_RULE_TABLE: u16 = 1;
pub const NFTA_RULE_CHAIN: u16 = 2;
pub const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub const NFTA_RULE_USERDATA: u16 = 7;
// enum nft_list_attributes, nft_expr_attributes
pub const NFTA_LIST_ELEM: u16 = 1;
pub const NFTA_EXPR_NAME: u16 = 1;
pub const NFTA_EXPR_DATA: u16 = 2;
// enum nft_data_attributes, nft_verdict_attributes
pub const NFTA_DATA_VALUE: u16 = 1;
pub const NFTA_DATA_VERDICT: u16 = 2;
pub const NFTA_VERDICT_CODE: u16 = 1;
// enum nft_gen_attributes
pub const NFTA_GEN_ID: u16 = 1;

// enum nft_registers. NFT_REG_1 is a legacy 16-byte register (the kernel
// maps it to NFT_REG32_00); every load here is at most 4 bytes.
pub const NFT_REG_VERDICT: u32 = 0;
pub const NFT_REG_1: u32 = 1;

// ct expression: enum nft_ct_attributes, nft_ct_keys
pub const NFTA_CT_DREG: u16 = 1;
pub const NFTA_CT_KEY: u16 = 2;
pub const NFT_CT_STATE: u32 = 0;
// bitwise expression: enum nft_bitwise_attributes
pub const NFTA_BITWISE_SREG: u16 = 1;
pub const NFTA_BITWISE_DREG: u16 = 2;
pub const NFTA_BITWISE_LEN: u16 = 3;
pub const NFTA_BITWISE_MASK: u16 = 4;
pub const NFTA_BITWISE_XOR: u16 = 5;
// cmp expression: enum nft_cmp_attributes, nft_cmp_ops
pub const NFTA_CMP_SREG: u16 = 1;
pub const NFTA_CMP_OP: u16 = 2;
pub const NFTA_CMP_DATA: u16 = 3;
pub const NFT_CMP_EQ: u32 = 0;
pub const NFT_CMP_NEQ: u32 = 1;
// immediate expression: enum nft_immediate_attributes
pub const NFTA_IMMEDIATE_DREG: u16 = 1;
pub const NFTA_IMMEDIATE_DATA: u16 = 2;
// meta expression: enum nft_meta_attributes, nft_meta_keys
pub const NFTA_META_DREG: u16 = 1;
pub const NFTA_META_KEY: u16 = 2;
pub const NFT_META_L4PROTO: u32 = 16;
pub const NFT_META_NFPROTO: u32 = 15;
pub const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
pub const NFTA_FIB_DREG: u16 = 1;
pub const NFTA_FIB_RESULT: u16 = 2;
pub const NFTA_FIB_FLAGS: u16 = 3;
pub const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
pub const NFTA_FIB_F_DADDR: u32 = 1 << 1;
/// rtnetlink's RTN_LOCAL: an address of this host.
pub const RTN_LOCAL: u32 = 2;
// payload expression: enum nft_payload_attributes, nft_payload_bases
pub const NFTA_PAYLOAD_DREG: u16 = 1;
pub const NFTA_PAYLOAD_BASE: u16 = 2;
pub const NFTA_PAYLOAD_OFFSET: u16 = 3;
pub const NFTA_PAYLOAD_LEN: u16 = 4;
pub const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;

// linux/netfilter/nf_conntrack_common.h: the `ct state` register holds
// NF_CT_STATE_BIT(ctinfo) = 1 << (ctinfo % IP_CT_IS_REPLY + 1), in host
// byte order (nft_ct_get_eval stores a plain u32).
pub const NF_CT_STATE_INVALID_BIT: u32 = 1 << 0;
pub const NF_CT_STATE_ESTABLISHED_BIT: u32 = 1 << 1;
pub const NF_CT_STATE_RELATED_BIT: u32 = 1 << 2;
pub const NF_CT_STATE_NEW_BIT: u32 = 1 << 3;
pub const NF_CT_STATE_UNTRACKED_BIT: u32 = 1 << 6;

/// libnftnl's NFTNL_UDATA_RULE_COMMENT: type of the userdata TLV holding a
/// rule's comment (NUL-terminated), which `nft list` prints.
const NFTNL_UDATA_RULE_COMMENT: u8 = 0;

/// Transactions lost to a concurrent ruleset change before giving up. Each
/// retry re-reads the ruleset, so only a writer changing it continuously
/// could exhaust this.
const ATTEMPTS: u32 = 5;

/// nlmsg_type of an nf_tables message.
pub const fn nft_msg_type(msg: u8) -> u16 {
    ((NFNL_SUBSYS_NFTABLES as u16) << 8) | msg as u16
}

/// Turns conntrack on in `ns` the way a stateful firewall does: table `inet
/// ctrace_lab` with base chains `forward` and `output` (type filter,
/// priority 0, policy accept), each with the rule `ct state
/// established,related,new accept`. The `ct` expression is what matters:
/// loading it makes the kernel register conntrack's hooks for the namespace
/// (nf_ct_netns_get), IPv4 and IPv6 alike since the table is inet.
///
/// Idempotent: the table and chains are created without NLM_F_EXCL (an
/// existing one is reused), and rules this module added before are
/// recognised by their comment and not added again. Packets are never
/// dropped by what this adds.
pub fn enable_conntrack(ns: &NetNs) -> Result<()> {
    apply(ns, None).with_context(|| {
        format!(
            "turning conntrack on in network namespace {} (nf_tables table inet {TABLE})",
            ns.inode()
        )
    })
}

/// Adds `meta l4proto tcp tcp dport <port> drop` at the head of the forward
/// chain of `inet ctrace_lab` (setting up conntrack as [`enable_conntrack`]
/// does first, in the same transaction, if needed), so it is evaluated before
/// the accept rule. Conntrack's prerouting hook runs before the forward hook,
/// so every packet this drops carries a conntrack entry (a new, unconfirmed
/// one for a first SYN, which dies with the packet). Adding the same port
/// twice is a no-op.
pub fn drop_tcp_dport(ns: &NetNs, port: u16) -> Result<()> {
    apply(ns, Some((FORWARD_CHAIN, Rule::DropTcpDport(port)))).with_context(|| {
        format!(
            "adding a drop rule for TCP port {port} in network namespace {} (nf_tables table \
             inet {TABLE})",
            ns.inode()
        )
    })
}

/// Adds `meta l4proto tcp tcp dport PORT drop` to a prerouting chain at the
/// raw priority (-300): the packet is dropped before conntrack sees it, so
/// it carries no entry and moves no conntrack counter, even in a full
/// table. On kernels that free nft drops in nft_do_chain, only the drop's
/// location tells it from a table-full drop.
pub fn drop_tcp_dport_before_conntrack(ns: &NetNs, port: u16) -> Result<()> {
    apply(ns, Some((RAW_CHAIN, Rule::DropTcpDport(port)))).with_context(|| {
        format!(
            "adding a raw-priority drop rule for TCP port {port} in network namespace {} \
             (nf_tables table inet {TABLE})",
            ns.inode()
        )
    })
}

/// Masquerades every new flow the router forwards (`masquerade` in a nat
/// postrouting chain), as OpenWrt does on its WAN zone.
pub fn masquerade(ns: &NetNs) -> Result<()> {
    apply(ns, Some((NAT_CHAIN, Rule::Masquerade))).with_context(|| {
        format!(
            "adding a masquerade rule in network namespace {} (nf_tables table inet {TABLE})",
            ns.inode()
        )
    })
}

/// One of our base chains.
#[derive(Clone, Copy, Debug)]
struct BaseChain {
    name: &'static str,
    hook: u32,
    /// The hook in nft syntax, for error messages.
    hook_name: &'static str,
    priority: i32,
    /// "filter" or "nat".
    kind: &'static str,
}

const CHAINS: [BaseChain; 2] = [
    BaseChain {
        name: FORWARD_CHAIN,
        hook: NF_INET_FORWARD,
        hook_name: "forward",
        priority: NF_PRI_FILTER,
        kind: "filter",
    },
    BaseChain {
        name: OUTPUT_CHAIN,
        hook: NF_INET_LOCAL_OUT,
        hook_name: "output",
        priority: NF_PRI_FILTER,
        kind: "filter",
    },
];

/// Made only when a rule needs it.
const RAW: BaseChain = BaseChain {
    name: RAW_CHAIN,
    hook: NF_INET_PRE_ROUTING,
    hook_name: "prerouting",
    priority: NF_PRI_RAW,
    kind: "filter",
};

const NAT: BaseChain = BaseChain {
    name: NAT_CHAIN,
    hook: NF_INET_POST_ROUTING,
    hook_name: "postrouting",
    priority: NF_PRI_NAT_SRC,
    kind: "nat",
};

/// The rules this module knows how to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    /// `ct state established,related,new accept`
    TrackedAccept,
    /// `meta l4proto tcp tcp dport PORT drop`
    DropTcpDport(u16),
    /// `masquerade`: source NAT to the outgoing interface's address.
    Masquerade,
    /// `[TO] meta l4proto tcp tcp sport|dport PORT notrack`
    NotrackTcp { dport: bool, port: u16, to: Dest },
}

/// Which destinations a NOTRACK rule is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// Any (only for the answers, which leave from the port itself).
    Any,
    /// `fib daddr type local`: an address of this host, whichever.
    Local,
    /// `ip daddr A` / `ip6 daddr A`: the one address listened on.
    Addr(IpAddr),
    /// `ip saddr A` / `ip6 saddr A`: answers from that address.
    From(IpAddr),
}

impl Dest {
    /// Where a listener on `ip` can be reached.
    pub fn listened(ip: IpAddr) -> Dest {
        if ip.is_unspecified() {
            Dest::Local
        } else {
            Dest::Addr(ip)
        }
    }

    fn describe(self) -> String {
        match self {
            Dest::Any => String::new(),
            Dest::Local => "fib daddr type local ".into(),
            Dest::Addr(IpAddr::V4(a)) => format!("ip daddr {a} "),
            Dest::Addr(IpAddr::V6(a)) => format!("ip6 daddr {a} "),
            Dest::From(IpAddr::V4(a)) => format!("ip saddr {a} "),
            Dest::From(IpAddr::V6(a)) => format!("ip6 saddr {a} "),
        }
    }

    fn expressions(self, m: &mut MsgBuilder) {
        match self {
            Dest::Any => {}
            Dest::Local => {
                expr(m, "fib", |m| {
                    m.be32(NFTA_FIB_DREG, NFT_REG_1)
                        .be32(NFTA_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE)
                        .be32(NFTA_FIB_FLAGS, NFTA_FIB_F_DADDR);
                });
                cmp(m, NFT_CMP_EQ, &RTN_LOCAL.to_ne_bytes());
            }
            Dest::Addr(ip) | Dest::From(ip) => {
                // Offsets of the destination (source) address in the
                // IPv4 and IPv6 headers.
                let src = matches!(self, Dest::From(_));
                let (family, offset, bytes) = match ip {
                    IpAddr::V4(a) => (
                        libc::NFPROTO_IPV4 as u8,
                        if src { 12 } else { 16 },
                        a.octets().to_vec(),
                    ),
                    IpAddr::V6(a) => (
                        libc::NFPROTO_IPV6 as u8,
                        if src { 8 } else { 24 },
                        a.octets().to_vec(),
                    ),
                };
                meta_is(m, NFT_META_NFPROTO, &[family]);
                payload_is(m, NFT_PAYLOAD_NETWORK_HEADER, offset, &bytes);
            }
        }
    }
}

/// Where a new rule goes in its chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    /// NLM_F_APPEND: after every existing rule.
    Last,
    /// Neither NLM_F_APPEND nor NFTA_RULE_POSITION: nf_tables_newrule()
    /// list_add()s it at the head of the chain.
    First,
}

impl Placement {
    fn flags(self) -> u16 {
        match self {
            // Without a handle to replace, NEWRULE requires NLM_F_CREATE.
            Placement::Last => NLM_F_CREATE | NLM_F_APPEND,
            Placement::First => NLM_F_CREATE,
        }
    }
}

impl Rule {
    /// The rule in nft syntax, for comments and error messages.
    fn describe(self) -> String {
        match self {
            Rule::TrackedAccept => "ct state established,related,new accept".to_owned(),
            Rule::DropTcpDport(port) => format!("meta l4proto tcp tcp dport {port} drop"),
            Rule::Masquerade => "masquerade".to_owned(),
            Rule::NotrackTcp { dport, port, to } => format!(
                "{}meta l4proto tcp tcp {} {port} notrack",
                to.describe(),
                if dport { "dport" } else { "sport" }
            ),
        }
    }

    /// NFTA_RULE_USERDATA: one comment TLV (type, length, NUL-terminated
    /// text), byte for byte what `nft add rule ... comment "..."` stores.
    fn userdata(self) -> Vec<u8> {
        let text = format!("ctrace: {}", self.describe());
        let len = u8::try_from(text.len() + 1).expect("rule comments are short");
        let mut tlv = vec![NFTNL_UDATA_RULE_COMMENT, len];
        tlv.extend_from_slice(text.as_bytes());
        tlv.push(0);
        tlv
    }

    /// The expressions, as nft 1.0 compiles the same rule.
    fn expressions(self, m: &mut MsgBuilder) {
        match self {
            Rule::TrackedAccept => {
                // A set of states is a bitmask test: (state & mask) != 0.
                let states =
                    NF_CT_STATE_ESTABLISHED_BIT | NF_CT_STATE_RELATED_BIT | NF_CT_STATE_NEW_BIT;
                expr(m, "ct", |m| {
                    m.be32(NFTA_CT_DREG, NFT_REG_1)
                        .be32(NFTA_CT_KEY, NFT_CT_STATE);
                });
                expr(m, "bitwise", |m| {
                    m.be32(NFTA_BITWISE_SREG, NFT_REG_1)
                        .be32(NFTA_BITWISE_DREG, NFT_REG_1)
                        .be32(NFTA_BITWISE_LEN, 4);
                    data_value(m, NFTA_BITWISE_MASK, &states.to_ne_bytes());
                    data_value(m, NFTA_BITWISE_XOR, &0u32.to_ne_bytes());
                });
                cmp(m, NFT_CMP_NEQ, &0u32.to_ne_bytes());
                verdict(m, NF_ACCEPT);
            }
            Rule::DropTcpDport(port) => {
                tcp_port_is(m, true, port);
                verdict(m, NF_DROP);
            }
            Rule::Masquerade => expr(m, "masq", |_| {}),
            Rule::NotrackTcp { dport, port, to } => {
                to.expressions(m);
                tcp_port_is(m, dport, port);
                expr(m, "notrack", |_| {});
            }
        }
    }
}

/// `meta l4proto tcp tcp dport|sport PORT`. The l4proto test is not
/// decoration: a transport-header payload load reads whatever protocol the
/// packet carries, so without it UDP to the same port would match too.
fn tcp_port_is(m: &mut MsgBuilder, dport: bool, port: u16) {
    meta_is(m, NFT_META_L4PROTO, &[IPPROTO_TCP]);
    // struct tcphdr: source is the 2 bytes at offset 0, dest at 2.
    let offset = if dport { 2 } else { 0 };
    payload_is(m, NFT_PAYLOAD_TRANSPORT_HEADER, offset, &port.to_be_bytes());
}

/// `meta KEY == value` (the value as long as the key's register holds).
fn meta_is(m: &mut MsgBuilder, key: u32, value: &[u8]) {
    expr(m, "meta", |m| {
        m.be32(NFTA_META_DREG, NFT_REG_1).be32(NFTA_META_KEY, key);
    });
    cmp(m, NFT_CMP_EQ, value);
}

/// The packet's bytes at `offset` from header `base` equal `bytes`.
fn payload_is(m: &mut MsgBuilder, base: u32, offset: u32, bytes: &[u8]) {
    expr(m, "payload", |m| {
        m.be32(NFTA_PAYLOAD_DREG, NFT_REG_1)
            .be32(NFTA_PAYLOAD_BASE, base)
            .be32(NFTA_PAYLOAD_OFFSET, offset)
            .be32(NFTA_PAYLOAD_LEN, bytes.len() as u32);
    });
    cmp(m, NFT_CMP_EQ, bytes);
}

/// One NFTA_LIST_ELEM of NFTA_RULE_EXPRESSIONS.
fn expr(m: &mut MsgBuilder, name: &str, data: impl FnOnce(&mut MsgBuilder)) {
    m.nested(NFTA_LIST_ELEM, |m| {
        m.str(NFTA_EXPR_NAME, name).nested(NFTA_EXPR_DATA, data);
    });
}

/// A nested nft_data holding a plain value (NFTA_DATA_VALUE).
fn data_value(m: &mut MsgBuilder, ty: u16, bytes: &[u8]) {
    m.nested(ty, |m| {
        m.bytes(NFTA_DATA_VALUE, bytes);
    });
}

/// Compares register 1 with `data`; the length of `data` is the length
/// compared, and must be what the preceding load stored.
fn cmp(m: &mut MsgBuilder, op: u32, data: &[u8]) {
    expr(m, "cmp", |m| {
        m.be32(NFTA_CMP_SREG, NFT_REG_1).be32(NFTA_CMP_OP, op);
        data_value(m, NFTA_CMP_DATA, data);
    });
}

/// Sets the verdict register: the rule's `accept` or `drop`.
fn verdict(m: &mut MsgBuilder, code: u32) {
    expr(m, "immediate", |m| {
        m.be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT)
            .nested(NFTA_IMMEDIATE_DATA, |m| {
                m.nested(NFTA_DATA_VERDICT, |m| {
                    m.be32(NFTA_VERDICT_CODE, code);
                });
            });
    });
}

fn table_msg(m: &mut MsgBuilder, table: &str) {
    m.header(&nfgenmsg(NFPROTO_INET, 0))
        .str(NFTA_TABLE_NAME, table);
}

fn chain_msg(m: &mut MsgBuilder, table: &str, chain: BaseChain) {
    m.header(&nfgenmsg(NFPROTO_INET, 0))
        .str(NFTA_CHAIN_TABLE, table)
        .str(NFTA_CHAIN_NAME, chain.name)
        .nested(NFTA_CHAIN_HOOK, |m| {
            // The priority is a signed s32 sent as its two's complement.
            m.be32(NFTA_HOOK_HOOKNUM, chain.hook)
                .be32(NFTA_HOOK_PRIORITY, chain.priority as u32);
        })
        .be32(NFTA_CHAIN_POLICY, NF_ACCEPT)
        .str(NFTA_CHAIN_TYPE, chain.kind);
}

fn rule_msg(m: &mut MsgBuilder, table: &str, chain: &str, rule: Rule) {
    m.header(&nfgenmsg(NFPROTO_INET, 0))
        .str(NFTA_RULE_TABLE, table)
        .str(NFTA_RULE_CHAIN, chain)
        .nested(NFTA_RULE_EXPRESSIONS, |m| rule.expressions(m))
        .bytes(NFTA_RULE_USERDATA, &rule.userdata());
}

/// Brings `inet ctrace_lab` to the state enable_conntrack describes, plus
/// `extra` at the head of the forward chain, in one transaction.
///
/// Read-then-write races with other writers (two lab setups, a person with
/// `nft`) are closed the way nft closes them: the batch carries the ruleset
/// generation it was computed against, the kernel refuses it with ERESTART
/// if that moved, and we recompute.
fn apply(ns: &NetNs, extra: Option<(&'static str, Rule)>) -> Result<()> {
    let mut sock = NlSocket::open(NETLINK_NETFILTER, Some(ns))?;
    let mut wanted = vec![
        (FORWARD_CHAIN, Rule::TrackedAccept, Placement::Last),
        (OUTPUT_CHAIN, Rule::TrackedAccept, Placement::Last),
    ];
    let mut chains = CHAINS.to_vec();
    if let Some((chain, rule)) = extra {
        // Pushed after the accept rules, so even when those are created in
        // this same transaction it lands in front of them.
        wanted.push((chain, rule, Placement::First));
        if chain == RAW_CHAIN {
            chains.push(RAW);
        }
        if chain == NAT_CHAIN {
            chains.push(NAT);
        }
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        let genid = generation(&mut sock)?;
        let present: HashSet<(String, Vec<u8>)> = list_rules(&mut sock)?.into_iter().collect();

        let mut tx = Transaction::new(&mut sock, genid);
        tx.push(
            NFT_MSG_NEWTABLE,
            NLM_F_CREATE,
            format!("table inet {TABLE}"),
            |m| table_msg(m, TABLE),
        );
        for &chain in &chains {
            tx.push(
                NFT_MSG_NEWCHAIN,
                NLM_F_CREATE,
                format!(
                    "base chain {} (type {} hook {} priority {})",
                    chain.name, chain.kind, chain.hook_name, chain.priority
                ),
                |m| chain_msg(m, TABLE, chain),
            );
        }
        for &(chain, rule, placement) in &wanted {
            if present.contains(&(chain.to_owned(), rule.userdata())) {
                continue;
            }
            tx.push(
                NFT_MSG_NEWRULE,
                placement.flags(),
                format!("rule `{}` in chain {chain}", rule.describe()),
                |m| rule_msg(m, TABLE, chain, rule),
            );
        }
        match tx.commit() {
            Err(e) if NlError::errno_of(&e) == Some(libc::ERESTART) && attempt < ATTEMPTS => {
                log::debug!("nf_tables ruleset changed under us (attempt {attempt}); retrying");
            }
            result => return result,
        }
    }
}

/// The ruleset generation (NFT_MSG_GETGEN): nf_tables' base_seq, bumped by
/// every committed transaction.
fn generation(sock: &mut NlSocket) -> Result<u32> {
    let mut msg = MsgBuilder::new(nft_msg_type(NFT_MSG_GETGEN), 0);
    msg.header(&nfgenmsg(libc::AF_UNSPEC as u8, 0));
    let mut id = None;
    sock.request(msg, |m| {
        if m.ty == nft_msg_type(NFT_MSG_NEWGEN)
            && let Some(a) = m.attrs(NFGENMSG_LEN)?.find(NFTA_GEN_ID)?
        {
            id = Some(a.be32()?);
        }
        Ok(())
    })
    .context("NFT_MSG_GETGEN")?;
    id.context("NFT_MSG_GETGEN: answer lacks NFTA_GEN_ID")
}

/// (chain, userdata) of every rule in our table, in chain order. A missing
/// table is an empty list: the kernel's filtered dump just finds nothing.
fn list_rules(sock: &mut NlSocket) -> Result<Vec<(String, Vec<u8>)>> {
    let mut msg = MsgBuilder::new(nft_msg_type(NFT_MSG_GETRULE), 0);
    msg.header(&nfgenmsg(NFPROTO_INET, 0))
        .str(NFTA_RULE_TABLE, TABLE);
    let mut rules = Vec::new();
    sock.dump(msg, |m| {
        if m.ty != nft_msg_type(NFT_MSG_NEWRULE) {
            return Ok(());
        }
        // An interrupted dump may miss a rule; the generation check at
        // commit catches the change that interrupted it.
        if m.flags & NLM_F_DUMP_INTR != 0 {
            log::debug!("nf_tables rule dump interrupted by a ruleset change");
        }
        let (mut chain, mut userdata) = (None, Vec::new());
        for a in m.attrs(NFGENMSG_LEN)? {
            let a = a?;
            match a.ty {
                NFTA_RULE_CHAIN => chain = Some(a.str()?.to_owned()),
                NFTA_RULE_USERDATA => userdata = a.payload.to_vec(),
                _ => {}
            }
        }
        rules.push((
            chain.context("rule without NFTA_RULE_CHAIN in a dump")?,
            userdata,
        ));
        Ok(())
    })
    .with_context(|| format!("listing the rules of table inet {TABLE}"))?;
    Ok(rules)
}

/// One nf_tables transaction: BATCH_BEGIN, messages, BATCH_END, sent as one
/// datagram.
///
/// Every message asks for an ack. nfnetlink holds all answers until the
/// whole batch has been processed and then queues them, acks and errors in
/// message order, before our sendmsg() returns; reading what is queued
/// without blocking therefore sees all of them. The delimiters themselves
/// get no NLM_F_ACK, since only kernels from 6.10 on honour it there; with or
/// without it, the kernel answers the BEGIN header when the batch fails as a
/// whole (EPERM, a stale generation, a failed commit).
struct Transaction<'s> {
    sock: &'s mut NlSocket,
    msg: MsgBuilder,
    begin_seq: u32,
    /// Sequence number and description of each message between the
    /// delimiters.
    parts: Vec<(u32, String)>,
}

impl<'s> Transaction<'s> {
    /// A batch valid only while the ruleset is at generation `genid` (from
    /// [`generation`]); 0 skips that check.
    fn new(sock: &'s mut NlSocket, genid: u32) -> Transaction<'s> {
        let begin_seq = sock.next_seq();
        let mut msg = MsgBuilder::empty(1024);
        msg.begin(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, begin_seq);
        // res_id names the subsystem the batch is for, in network order.
        msg.header(&nfgenmsg(
            libc::AF_UNSPEC as u8,
            NFNL_SUBSYS_NFTABLES.into(),
        ))
        .be32(NFNL_BATCH_GENID, genid);
        Transaction {
            sock,
            msg,
            begin_seq,
            parts: Vec::new(),
        }
    }

    /// Appends an nf_tables message `msg_type` built by `build`;
    /// NLM_F_REQUEST and NLM_F_ACK are added. `what` names it in errors.
    fn push(
        &mut self,
        msg_type: u8,
        flags: u16,
        what: String,
        build: impl FnOnce(&mut MsgBuilder),
    ) {
        let seq = self.sock.next_seq();
        self.msg.begin(
            nft_msg_type(msg_type),
            flags | NLM_F_REQUEST | NLM_F_ACK,
            seq,
        );
        build(&mut self.msg);
        self.parts.push((seq, what));
    }

    /// Sends the batch and checks every answer. On failure the kernel has
    /// rolled back the whole transaction; the error is the first one it
    /// reported, with the errno reachable as an [`NlError`].
    fn commit(self) -> Result<()> {
        let Transaction {
            sock,
            mut msg,
            begin_seq,
            parts,
        } = self;
        let end_seq = sock.next_seq();
        msg.begin(NFNL_MSG_BATCH_END, NLM_F_REQUEST, end_seq);
        msg.header(&nfgenmsg(
            libc::AF_UNSPEC as u8,
            NFNL_SUBSYS_NFTABLES.into(),
        ));
        msg.check()?;
        sock.send(msg.as_bytes())
            .context("sending an nf_tables batch")?;

        let mut acked = vec![false; parts.len()];
        let mut first_error: Option<(String, NlError)> = None;
        while let Some(n) = sock.recv_queued()? {
            for m in Msgs::new(&sock.rbuf[..n]) {
                let m = m.context("answer to an nf_tables batch")?;
                if m.ty != NLMSG_ERROR {
                    log::debug!("ignoring netlink message type {} seq {}", m.ty, m.seq);
                    continue;
                }
                let what = if m.seq == begin_seq {
                    "the batch as a whole".to_owned()
                } else if m.seq == end_seq {
                    "the end of the batch".to_owned()
                } else if let Some(i) = parts.iter().position(|(seq, _)| *seq == m.seq) {
                    acked[i] = true;
                    parts[i].1.clone()
                } else {
                    log::debug!("ignoring netlink answer for seq {}", m.seq);
                    continue;
                };
                if let Some(e) = parse_error(&m)?
                    && first_error.is_none()
                {
                    first_error = Some((what, e));
                }
            }
        }
        if let Some((what, e)) = first_error {
            return Err(anyhow::Error::new(e).context(format!(
                "nf_tables refused {what}; nothing in the batch was applied"
            )));
        }
        if let Some(i) = acked.iter().position(|a| !a) {
            bail!(
                "nf_tables did not answer for {} (seq {}) in a {}-message batch",
                parts[i].1,
                parts[i].0,
                parts.len()
            );
        }
        Ok(())
    }
}

/// A table of its own per port (`table inet ctrace_notrack_PORT`) with two
/// base chains at raw priority, before conntrack (-200) sees a packet:
/// `fib daddr type local tcp dport PORT notrack` on prerouting (requests
/// from elsewhere, to this host only: forwarded traffic to any other host
/// on that port stays tracked, and NATed) and on output (requests from
/// this host to itself), and `tcp sport PORT notrack` on output (the
/// answers). With a listen address, `ip daddr ADDR` replaces the fib
/// test. The endpoint's connections then never need a table entry, so a
/// full table cannot refuse them.
///
/// The table is owned by this process's netlink socket where the kernel
/// allows (5.12+): nobody else can change it, and it goes away with the
/// process, even a killed one. It is made only if no table of that name
/// exists; an existing one is replaced only if it carries ctrace's marker
/// and no live owner (a killed run's, on an older kernel).
pub struct NotrackRule {
    table: String,
    /// The owning socket: closing it deletes an owned table.
    sock: NlSocket,
}

/// NFTA_TABLE_USERDATA of ctrace's NOTRACK tables.
const NOTRACK_MARKER: &[u8] = b"ctrace --metrics-notrack; removed when ctrace exits";

const NOTRACK_CHAINS: [BaseChain; 2] = [
    RAW,
    BaseChain {
        name: "raw_output",
        hook: NF_INET_LOCAL_OUT,
        hook_name: "output",
        priority: NF_PRI_RAW,
        kind: "filter",
    },
];

impl NotrackRule {
    pub fn table_name(port: u16) -> String {
        format!("ctrace_notrack_{port}")
    }

    /// Installs the rules in `ns` (ctrace's own namespace when None) for
    /// an endpoint listening on `listen`.
    pub fn install(ns: Option<&NetNs>, listen: SocketAddr) -> Result<NotrackRule> {
        let table = Self::table_name(listen.port());
        let mut sock = NlSocket::open(NETLINK_NETFILTER, ns)?;
        let mut owned = true;
        let mut replaced = false;
        loop {
            match Self::create(&mut sock, &table, listen, owned) {
                Ok(()) => break,
                // Before 5.12 an unknown table flag is EINVAL (later
                // kernels without it say EOPNOTSUPP).
                Err(e)
                    if owned
                        && matches!(
                            NlError::errno_of(&e),
                            Some(libc::EOPNOTSUPP | libc::EINVAL)
                        ) =>
                {
                    log::info!("this kernel has no owned nf_tables tables: {e:#}");
                    owned = false;
                }
                // EPERM: it exists and another socket owns it.
                Err(e)
                    if matches!(NlError::errno_of(&e), Some(libc::EEXIST | libc::EPERM))
                        && !replaced =>
                {
                    match table_marker(&mut sock, &table)? {
                        Some((marker, None)) if marker == NOTRACK_MARKER => {
                            delete_table(ns, &table)?;
                            log::info!("replaced table inet {table} a killed run left");
                            replaced = true;
                        }
                        Some((_, Some(owner))) => bail!(
                            "table inet {table} exists, owned by netlink port {owner} (another \
                             ctrace on this port?): not touched"
                        ),
                        _ => bail!(
                            "table inet {table} exists and is not ctrace's: not touched \
                             (remove it, or serve metrics on another port)"
                        ),
                    }
                }
                Err(e) if Dest::listened(listen.ip()) == Dest::Local => {
                    return Err(e.context(
                        "the rules match `fib daddr type local` (module nft_fib_inet; \
                         kmod-nft-fib on OpenWrt); with an address (--metrics ADDR:PORT) \
                         they need no fib",
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(NotrackRule { table, sock })
    }

    fn create(sock: &mut NlSocket, table: &str, listen: SocketAddr, owned: bool) -> Result<()> {
        let port = listen.port();
        let to = Dest::listened(listen.ip());
        // Answers leave from the listening socket's port; with an address,
        // only from that address (another service may use the port on
        // another one).
        let from = match to {
            Dest::Addr(ip) => Dest::From(ip),
            _ => Dest::Any,
        };
        let mut tx = Transaction::new(sock, 0);
        tx.push(
            NFT_MSG_NEWTABLE,
            NLM_F_CREATE | NLM_F_EXCL,
            format!("table inet {table}"),
            |m| {
                table_msg(m, table);
                m.bytes(NFTA_TABLE_USERDATA, NOTRACK_MARKER);
                if owned {
                    m.be32(NFTA_TABLE_FLAGS, NFT_TABLE_F_OWNER);
                }
            },
        );
        for chain in NOTRACK_CHAINS {
            tx.push(
                NFT_MSG_NEWCHAIN,
                NLM_F_CREATE,
                format!("base chain {} (hook {})", chain.name, chain.hook_name),
                |m| chain_msg(m, table, chain),
            );
        }
        for (chain, dport, to) in [
            (RAW.name, true, to),
            ("raw_output", true, to),
            ("raw_output", false, from),
        ] {
            let r = Rule::NotrackTcp { dport, port, to };
            tx.push(
                NFT_MSG_NEWRULE,
                Placement::Last.flags(),
                format!("rule `{}` in chain {chain}", r.describe()),
                |m| rule_msg(m, table, chain, r),
            );
        }
        tx.commit()
    }

    fn delete(&mut self) -> Result<bool> {
        delete_table_with(&mut self.sock, &self.table)
    }
}

/// The marker (NFTA_TABLE_USERDATA) and owner (netlink port) of `table
/// inet NAME`; None if there is no such table.
fn table_marker(sock: &mut NlSocket, name: &str) -> Result<Option<(Vec<u8>, Option<u32>)>> {
    let mut msg = MsgBuilder::new(nft_msg_type(NFT_MSG_GETTABLE), 0);
    msg.header(&nfgenmsg(NFPROTO_INET, 0))
        .str(NFTA_TABLE_NAME, name);
    let mut found = None;
    let r = sock.request(msg, |m| {
        let attrs = m.attrs(NFGENMSG_LEN)?;
        let marker = attrs
            .find(NFTA_TABLE_USERDATA)?
            .map(|a| a.payload.to_vec())
            .unwrap_or_default();
        let owner = attrs
            .find(NFTA_TABLE_OWNER)?
            .map(|a| a.be32())
            .transpose()?;
        found = Some((marker, owner));
        Ok(())
    });
    match r {
        Ok(()) => Ok(found),
        Err(e) if NlError::errno_of(&e) == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes `table inet NAME` with everything in it; false if there was none.
pub fn delete_table(ns: Option<&NetNs>, name: &str) -> Result<bool> {
    let mut sock = NlSocket::open(NETLINK_NETFILTER, ns)?;
    delete_table_with(&mut sock, name)
}

/// [`delete_table`] through `sock` (an owned table's owner).
fn delete_table_with(sock: &mut NlSocket, name: &str) -> Result<bool> {
    let mut tx = Transaction::new(sock, 0);
    tx.push(
        NFT_MSG_DELTABLE,
        0,
        format!("deleting table inet {name}"),
        |m| table_msg(m, name),
    );
    match tx.commit() {
        Ok(()) => Ok(true),
        Err(e) if NlError::errno_of(&e) == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

impl Drop for NotrackRule {
    fn drop(&mut self) {
        match self.delete() {
            Ok(_) => log::debug!("removed table inet {}", self.table),
            Err(e) => log::warn!(
                "could not remove table inet {} (remove it with `nft delete table inet {}`): {e:#}",
                self.table,
                self.table
            ),
        }
    }
}

/// Whether `table inet NAME` exists in `ns`.
pub fn table_exists(ns: Option<&NetNs>, name: &str) -> Result<bool> {
    let mut sock = NlSocket::open(NETLINK_NETFILTER, ns)?;
    let mut msg = MsgBuilder::new(nft_msg_type(NFT_MSG_GETTABLE), 0);
    msg.header(&nfgenmsg(NFPROTO_INET, 0))
        .str(NFTA_TABLE_NAME, name);
    match sock.request(msg, |_| Ok(())) {
        Ok(()) => Ok(true),
        Err(e) if NlError::errno_of(&e) == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::Attrs;
    use crate::netlink::ctnetlink::CtSocket;
    use crate::netlink::rtnetlink::RtSocket;
    use crate::netns::skip_unless_root;
    use std::io;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;

    const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
    const ROUTER_C4: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
    const ROUTER_S4: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 1);
    const SERVER4: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 2);
    const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd20, 0, 0, 0, 0, 0, 0, 2);
    const ROUTER_C6: Ipv6Addr = Ipv6Addr::new(0xfd20, 0, 0, 0, 0, 0, 0, 1);
    const ROUTER_S6: Ipv6Addr = Ipv6Addr::new(0xfd20, 1, 0, 0, 0, 0, 0, 1);
    const SERVER6: Ipv6Addr = Ipv6Addr::new(0xfd20, 1, 0, 0, 0, 0, 0, 2);

    fn notrack_rules(ns: &NetNs, name: &str) -> usize {
        let mut sock = NlSocket::open(NETLINK_NETFILTER, Some(ns)).unwrap();
        let mut msg = MsgBuilder::new(nft_msg_type(NFT_MSG_GETRULE), 0);
        msg.header(&nfgenmsg(NFPROTO_INET, 0))
            .str(NFTA_RULE_TABLE, name);
        let mut rules = 0;
        sock.dump(msg, |m| {
            rules += usize::from(m.ty == nft_msg_type(NFT_MSG_NEWRULE));
            Ok(())
        })
        .unwrap();
        rules
    }

    /// A table of `name` made by someone else: marked (or not), unowned.
    fn plant_table(ns: &NetNs, name: &str, marker: Option<&[u8]>) {
        let mut sock = NlSocket::open(NETLINK_NETFILTER, Some(ns)).unwrap();
        let mut tx = Transaction::new(&mut sock, 0);
        tx.push(NFT_MSG_NEWTABLE, NLM_F_CREATE, name.into(), |m| {
            table_msg(m, name);
            if let Some(marker) = marker {
                m.bytes(NFTA_TABLE_USERDATA, marker);
            }
        });
        tx.commit().unwrap();
    }

    /// The NOTRACK table appears with its three rules, owned by ctrace's
    /// socket; a second install does not touch it; a marked leftover of a
    /// killed run is replaced, a table that is not ctrace's never is; the
    /// table is gone when the guard drops.
    #[test]
    fn notrack_rule_comes_and_goes() {
        if skip_unless_root("notrack_rule_comes_and_goes") {
            return;
        }
        let ns = crate::netlink::rtnetlink::new_netns().unwrap();
        let at: SocketAddr = "0.0.0.0:9465".parse().unwrap();
        let name = NotrackRule::table_name(9465);
        let first = NotrackRule::install(Some(&ns), at).unwrap();
        assert_eq!(notrack_rules(&ns, &name), 3);
        let mut sock = NlSocket::open(NETLINK_NETFILTER, Some(&ns)).unwrap();
        let (marker, owner) = table_marker(&mut sock, &name).unwrap().unwrap();
        assert_eq!(marker, NOTRACK_MARKER);
        assert!(owner.is_some(), "owned by the installing socket (5.12+)");
        let e = NotrackRule::install(Some(&ns), at).err().unwrap();
        assert!(format!("{e:#}").contains("owned by netlink port"), "{e:#}");
        drop(first);
        assert!(!table_exists(Some(&ns), &name).unwrap());

        plant_table(&ns, &name, Some(NOTRACK_MARKER));
        let rule = NotrackRule::install(Some(&ns), at).unwrap();
        assert_eq!(notrack_rules(&ns, &name), 3);
        drop(rule);
        assert!(!table_exists(Some(&ns), &name).unwrap());

        plant_table(&ns, &name, None);
        let e = NotrackRule::install(Some(&ns), at).err().unwrap();
        assert!(format!("{e:#}").contains("is not ctrace's"), "{e:#}");
        assert!(table_exists(Some(&ns), &name).unwrap(), "left alone");
    }

    /// On a masquerading router, the endpoint's NOTRACK rule exempts only
    /// connections to the router itself: a client's forwarded connection
    /// to a remote host on the same port stays tracked and NATed.
    #[test]
    fn notrack_leaves_forwarded_flows_to_the_port_tracked_and_nated() {
        if skip_unless_root("notrack_leaves_forwarded_flows_to_the_port_tracked_and_nated") {
            return;
        }
        const PORT: u16 = 9465;
        let lab = lab();
        enable_conntrack(&lab.router).unwrap();
        masquerade(&lab.router).unwrap();
        let on_router = SocketAddr::new(ROUTER_C4.into(), PORT);
        let endpoint = lab
            .router
            .run(move || TcpListener::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), PORT)))
            .unwrap()
            .unwrap();
        let _rule =
            NotrackRule::install(Some(&lab.router), endpoint.local_addr().unwrap()).unwrap();
        let server = lab
            .server
            .run(move || TcpListener::bind(SocketAddr::new(SERVER4.into(), PORT)))
            .unwrap()
            .unwrap();
        let timeout = Duration::from_secs(5);

        // The scrape, to the router itself.
        lab.client
            .run(move || TcpStream::connect_timeout(&on_router, timeout))
            .unwrap()
            .unwrap();
        // The forwarded one: NATed to the router's address on the way out.
        connect(&lab, SERVER4.into(), PORT, timeout).unwrap();
        let (_, peer) = server.accept().unwrap();
        assert_eq!(peer.ip(), IpAddr::from(ROUTER_S4), "masqueraded");

        let mut ct = CtSocket::open(Some(&lab.router)).unwrap();
        let mut to = Vec::new();
        ct.dump(&mut |e| {
            if e.dport == PORT {
                to.push(e.dst);
            }
        })
        .unwrap();
        assert_eq!(
            to,
            [IpAddr::from(SERVER4)],
            "only the forwarded flow is tracked"
        );
        nft_ruleset(&lab.router);
    }

    /// Expression names of a rule message, in order, with each expression's
    /// data attributes.
    fn exprs(rule: Rule) -> Vec<(String, Vec<u8>)> {
        let mut m = MsgBuilder::new(nft_msg_type(NFT_MSG_NEWRULE), 0);
        rule_msg(&mut m, TABLE, FORWARD_CHAIN, rule);
        m.check().unwrap();
        let msg = Msgs::new(m.as_bytes()).next().unwrap().unwrap();
        let list = msg
            .attrs(NFGENMSG_LEN)
            .unwrap()
            .find(NFTA_RULE_EXPRESSIONS)
            .unwrap()
            .unwrap();
        list.nested()
            .map(|e| {
                let e = e.unwrap();
                assert_eq!(e.ty, NFTA_LIST_ELEM);
                let name = e.nested().find(NFTA_EXPR_NAME).unwrap().unwrap();
                let data = e.nested().find(NFTA_EXPR_DATA).unwrap().unwrap();
                (name.str().unwrap().to_owned(), data.payload.to_vec())
            })
            .collect()
    }

    /// NFTA_DATA_VALUE inside the nested attribute `ty` of an expression.
    fn value_in(data: &[u8], ty: u16) -> Vec<u8> {
        let outer = Attrs::new(data).find(ty).unwrap().unwrap();
        let value = outer.nested().find(NFTA_DATA_VALUE).unwrap().unwrap();
        value.payload.to_vec()
    }

    fn be32_in(data: &[u8], ty: u16) -> u32 {
        Attrs::new(data).find(ty).unwrap().unwrap().be32().unwrap()
    }

    fn verdict_of(data: &[u8]) -> u32 {
        assert_eq!(be32_in(data, NFTA_IMMEDIATE_DREG), NFT_REG_VERDICT);
        let d = Attrs::new(data).find(NFTA_IMMEDIATE_DATA).unwrap().unwrap();
        let v = d.nested().find(NFTA_DATA_VERDICT).unwrap().unwrap();
        v.nested()
            .find(NFTA_VERDICT_CODE)
            .unwrap()
            .unwrap()
            .be32()
            .unwrap()
    }

    #[test]
    fn netlink_nftables_rules_encode_like_nft() {
        let e = exprs(Rule::TrackedAccept);
        let names: Vec<_> = e.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["ct", "bitwise", "cmp", "immediate"]);
        assert_eq!(be32_in(&e[0].1, NFTA_CT_KEY), NFT_CT_STATE);
        assert_eq!(be32_in(&e[1].1, NFTA_BITWISE_LEN), 4);
        assert_eq!(
            value_in(&e[1].1, NFTA_BITWISE_MASK),
            0x0eu32.to_ne_bytes(),
            "established|related|new, host order"
        );
        assert_eq!(value_in(&e[1].1, NFTA_BITWISE_XOR), [0; 4]);
        assert_eq!(be32_in(&e[2].1, NFTA_CMP_OP), NFT_CMP_NEQ);
        assert_eq!(value_in(&e[2].1, NFTA_CMP_DATA), [0; 4]);
        assert_eq!(verdict_of(&e[3].1), NF_ACCEPT);

        let e = exprs(Rule::DropTcpDport(2380));
        let names: Vec<_> = e.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["meta", "cmp", "payload", "cmp", "immediate"]);
        assert_eq!(be32_in(&e[0].1, NFTA_META_KEY), NFT_META_L4PROTO);
        assert_eq!(value_in(&e[1].1, NFTA_CMP_DATA), [6]);
        assert_eq!(
            be32_in(&e[2].1, NFTA_PAYLOAD_BASE),
            NFT_PAYLOAD_TRANSPORT_HEADER
        );
        assert_eq!(be32_in(&e[2].1, NFTA_PAYLOAD_OFFSET), 2);
        assert_eq!(be32_in(&e[2].1, NFTA_PAYLOAD_LEN), 2);
        assert_eq!(value_in(&e[3].1, NFTA_CMP_DATA), [0x09, 0x4c]);
        assert_eq!(verdict_of(&e[4].1), NF_DROP);

        let u = Rule::DropTcpDport(2380).userdata();
        assert_eq!(u[0], NFTNL_UDATA_RULE_COMMENT);
        assert_eq!(usize::from(u[1]), u.len() - 2);
        assert_eq!(&u[2..], b"ctrace: meta l4proto tcp tcp dport 2380 drop\0");
        assert_ne!(u, Rule::DropTcpDport(2381).userdata());
    }

    /// clients -- router -- servers, IPv4 and IPv6, forwarding on, no rules.
    struct Lab {
        client: NetNs,
        router: NetNs,
        server: NetNs,
    }

    fn lab() -> Lab {
        let lab = Lab {
            client: crate::netlink::rtnetlink::new_netns().unwrap(),
            router: crate::netlink::rtnetlink::new_netns().unwrap(),
            server: crate::netlink::rtnetlink::new_netns().unwrap(),
        };
        for ns in [&lab.client, &lab.router, &lab.server] {
            ns.no_dad().unwrap();
        }
        let mut rt = RtSocket::open(Some(&lab.router)).unwrap();
        rt.add_veth("to-client", "eth0", &lab.client).unwrap();
        rt.add_veth("to-server", "eth0", &lab.server).unwrap();
        for (ifname, v4, v6) in [
            ("to-client", ROUTER_C4, ROUTER_C6),
            ("to-server", ROUTER_S4, ROUTER_S6),
        ] {
            rt.add_address(ifname, v4.into(), 24).unwrap();
            rt.add_address(ifname, v6.into(), 64).unwrap();
            rt.set_up(ifname).unwrap();
        }
        lab.router.set_sysctl("net/ipv4/ip_forward", "1").unwrap();
        lab.router
            .set_sysctl("net/ipv6/conf/all/forwarding", "1")
            .unwrap();
        for (ns, v4, v6, gw4, gw6) in [
            (&lab.client, CLIENT4, CLIENT6, ROUTER_C4, ROUTER_C6),
            (&lab.server, SERVER4, SERVER6, ROUTER_S4, ROUTER_S6),
        ] {
            let mut rt = RtSocket::open(Some(ns)).unwrap();
            rt.add_address("eth0", v4.into(), 24).unwrap();
            rt.add_address("eth0", v6.into(), 64).unwrap();
            rt.set_up("eth0").unwrap();
            rt.add_route(Ipv4Addr::UNSPECIFIED.into(), 0, gw4.into())
                .unwrap();
            rt.add_route(Ipv6Addr::UNSPECIFIED.into(), 0, gw6.into())
                .unwrap();
        }
        lab
    }

    /// Listeners on the server for `port`, both families. The kernel
    /// completes handshakes into the backlog, so nobody needs to accept.
    fn listen(lab: &Lab, port: u16) -> Vec<TcpListener> {
        [IpAddr::from(SERVER4), IpAddr::from(SERVER6)]
            .into_iter()
            .map(|ip| {
                let at = SocketAddr::new(ip, port);
                lab.server
                    .run(move || TcpListener::bind(at))
                    .unwrap()
                    .unwrap()
            })
            .collect()
    }

    /// A TCP handshake from the client through the router.
    fn connect(lab: &Lab, ip: IpAddr, port: u16, timeout: Duration) -> io::Result<()> {
        let to = SocketAddr::new(ip, port);
        lab.client
            .run(move || TcpStream::connect_timeout(&to, timeout).map(drop))
            .unwrap()
    }

    fn both_families() -> [IpAddr; 2] {
        [SERVER4.into(), SERVER6.into()]
    }

    /// (chain, comment) of the rules in our table, in evaluation order.
    fn rules(ns: &NetNs) -> Vec<(String, String)> {
        let mut sock = NlSocket::open(NETLINK_NETFILTER, Some(ns)).unwrap();
        list_rules(&mut sock)
            .unwrap()
            .into_iter()
            .map(|(chain, u)| {
                assert_eq!(u.first(), Some(&NFTNL_UDATA_RULE_COMMENT), "{u:?}");
                let text = std::str::from_utf8(&u[2..u.len() - 1]).unwrap();
                (chain, text.to_owned())
            })
            .collect()
    }

    fn rule(chain: &str, r: Rule) -> (String, String) {
        (chain.to_owned(), format!("ctrace: {}", r.describe()))
    }

    /// `nft list ruleset` inside `ns`, only to show a person what the kernel
    /// made of our messages; None (and a note) when nft is not installed.
    fn nft_ruleset(ns: &NetNs) -> Option<String> {
        let out = ns
            .run(|| {
                std::process::Command::new("nft")
                    .args(["list", "ruleset"])
                    .output()
            })
            .unwrap();
        match out {
            Ok(o) if o.status.success() => {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                eprintln!("nft list ruleset in namespace {}:\n{text}", ns.inode());
                Some(text)
            }
            Ok(o) => {
                eprintln!(
                    "nft list ruleset failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                None
            }
            Err(e) => {
                eprintln!("not cross-checking with nft: {e}");
                None
            }
        }
    }

    #[test]
    fn netlink_nftables_conntrack_on_router_tracks_forwarded_flows() {
        if skip_unless_root("netlink_nftables_conntrack_on_router_tracks_forwarded_flows") {
            return;
        }
        let lab = lab();
        let _listeners = listen(&lab, 22);
        let timeout = Duration::from_secs(5);

        // Without a ruleset the router forwards but tracks nothing: the
        // hooks are not registered in its namespace.
        for ip in both_families() {
            connect(&lab, ip, 22, timeout).unwrap();
        }
        let mut ct = CtSocket::open(Some(&lab.router)).unwrap();
        let before = ct.stats().unwrap();
        assert_eq!(before.entries, 0, "{before:?}");

        enable_conntrack(&lab.router).unwrap();
        enable_conntrack(&lab.router).unwrap();
        let tracked = rule(FORWARD_CHAIN, Rule::TrackedAccept);
        let tracked_out = rule(OUTPUT_CHAIN, Rule::TrackedAccept);
        assert_eq!(
            rules(&lab.router),
            [tracked, tracked_out],
            "a second call adds nothing"
        );

        for ip in both_families() {
            connect(&lab, ip, 22, timeout).unwrap();
        }
        let after = ct.stats().unwrap();
        // One entry per flow, kept after close (TIME_WAIT-like states).
        assert!(after.entries >= 2, "{after:?}");
        assert_eq!(after.drop, 0, "{after:?}");
        // Only the router got rules, and conntrack is per namespace.
        let client = CtSocket::open(Some(&lab.client)).unwrap().stats().unwrap();
        assert_eq!(client.entries, 0, "{client:?}");

        if let Some(text) = nft_ruleset(&lab.router) {
            assert!(text.contains("table inet ctrace_lab"), "{text}");
            assert!(text.contains("hook forward priority filter"), "{text}");
            assert!(text.contains("hook output priority filter"), "{text}");
            assert!(
                text.contains("ct state established,related,new accept"),
                "{text}"
            );
        }
    }

    #[test]
    fn netlink_nftables_drop_rule_blocks_one_port_before_accept() {
        if skip_unless_root("netlink_nftables_drop_rule_blocks_one_port_before_accept") {
            return;
        }
        let lab = lab();
        let _ssh = listen(&lab, 22);
        let _etcd = listen(&lab, 2380);
        let ok = Duration::from_secs(5);
        let blocked = Duration::from_millis(1500);

        // The listener answers before the rule: a later failure is the rule.
        for ip in both_families() {
            connect(&lab, ip, 2380, ok).unwrap();
        }

        // On a bare router: creates table, chains and the accept rules too.
        drop_tcp_dport(&lab.router, 2380).unwrap();
        drop_tcp_dport(&lab.router, 2380).unwrap();
        enable_conntrack(&lab.router).unwrap();
        assert_eq!(
            rules(&lab.router),
            [
                rule(FORWARD_CHAIN, Rule::DropTcpDport(2380)),
                rule(FORWARD_CHAIN, Rule::TrackedAccept),
                rule(OUTPUT_CHAIN, Rule::TrackedAccept),
            ],
            "drop first, nothing twice"
        );

        for ip in both_families() {
            let e = connect(&lab, ip, 2380, blocked).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{ip}: {e}");
            connect(&lab, ip, 22, ok).unwrap();
        }
        let stats = CtSocket::open(Some(&lab.router)).unwrap().stats().unwrap();
        // The two port-22 flows; the dropped SYNs' entries were never
        // confirmed, so they are not in the table.
        assert!(stats.entries >= 2, "{stats:?}");

        // A second port goes in front as well and leaves 2380 alone.
        drop_tcp_dport(&lab.router, 22).unwrap();
        let forward: Vec<_> = rules(&lab.router)
            .into_iter()
            .filter(|(c, _)| c == FORWARD_CHAIN)
            .collect();
        assert_eq!(
            forward,
            [
                rule(FORWARD_CHAIN, Rule::DropTcpDport(22)),
                rule(FORWARD_CHAIN, Rule::DropTcpDport(2380)),
                rule(FORWARD_CHAIN, Rule::TrackedAccept),
            ]
        );
        let e = connect(&lab, SERVER4.into(), 22, blocked).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");

        if let Some(text) = nft_ruleset(&lab.router) {
            assert!(text.contains("tcp dport 2380 drop"), "{text}");
            assert!(text.contains("tcp dport 22 drop"), "{text}");
        }
    }

    #[test]
    fn netlink_nftables_errors_keep_the_errno_and_roll_back() {
        if skip_unless_root("netlink_nftables_errors_keep_the_errno_and_roll_back") {
            return;
        }
        let ns = crate::netlink::rtnetlink::new_netns().unwrap();
        let mut sock = NlSocket::open(NETLINK_NETFILTER, Some(&ns)).unwrap();
        let genid = generation(&mut sock).unwrap();
        let mut tx = Transaction::new(&mut sock, genid);
        tx.push(NFT_MSG_NEWTABLE, NLM_F_CREATE, "the table".into(), |m| {
            table_msg(m, TABLE)
        });
        tx.push(
            NFT_MSG_NEWRULE,
            Placement::Last.flags(),
            "a rule in a missing chain".into(),
            |m| rule_msg(m, TABLE, "nope", Rule::TrackedAccept),
        );
        let e = tx.commit().unwrap_err();
        assert_eq!(NlError::errno_of(&e), Some(libc::ENOENT), "{e:#}");
        assert!(
            format!("{e:#}").contains("a rule in a missing chain"),
            "{e:#}"
        );
        // All or nothing: the table of the failed batch does not exist.
        // (Generation 0 asks the kernel not to check it.)
        let mut probe = Transaction::new(&mut sock, 0);
        probe.push(NFT_MSG_NEWCHAIN, NLM_F_CREATE, "a chain".into(), |m| {
            chain_msg(m, TABLE, CHAINS[0])
        });
        let e = probe.commit().unwrap_err();
        assert_eq!(NlError::errno_of(&e), Some(libc::ENOENT), "{e:#}");

        // A batch computed against an old generation is refused whole.
        let stale = generation(&mut sock).unwrap();
        enable_conntrack(&ns).unwrap();
        let mut tx = Transaction::new(&mut sock, stale);
        tx.push(NFT_MSG_NEWTABLE, NLM_F_CREATE, "the table".into(), |m| {
            table_msg(m, TABLE)
        });
        let e = tx.commit().unwrap_err();
        assert_eq!(NlError::errno_of(&e), Some(libc::ERESTART), "{e:#}");
    }
}
