//! ctnetlink: the bytes as one datagram read from a netlink socket, walked
//! message by message as `NlSocket` does; each message decoded as a table
//! dump entry or conntrack event (`conntrack::Entry::from_msg`), NLMSG_ERROR as
//! an error, and every attribute set walked to the bottom.
//!
//! Why the assertions hold: a message lies where the previous one's
//! aligned nlmsg_len ends and its payload is exactly nlmsg_len - 16 bytes;
//! each takes at least 16 bytes; an attribute lies inside its parent and a
//! malformed one ends its set. A decoded entry has the addresses of its
//! family, and encoding it again as the kernel would decodes to the same.
#![no_main]

use std::net::IpAddr;

use ctrace::conntrack::Entry;
use ctrace::netlink::{
    Attrs, MsgBuilder, Msgs, NLMSG_ERROR, NLMSG_HDRLEN, align4,
    ctnetlink::{
        CTA_ID, CTA_IP_V4_DST, CTA_IP_V4_SRC, CTA_IP_V6_DST, CTA_IP_V6_SRC, CTA_MARK,
        CTA_PROTO_DST_PORT, CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE,
        CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTOINFO, CTA_PROTOINFO_TCP,
        CTA_PROTOINFO_TCP_STATE, CTA_STATUS, CTA_TIMEOUT, CTA_TUPLE_IP, CTA_TUPLE_ORIG,
        CTA_TUPLE_PROTO, CTA_ZONE, NFGENMSG_LEN, nfgenmsg,
    },
    parse_error,
};
use ctrace_common::{IPPROTO_ICMP, IPPROTO_ICMPV6};
use libfuzzer_sys::fuzz_target;

/// Deeper than any ctnetlink message nests (4 levels); bounds the work.
const MAX_NEST: usize = 8;
const AF_INET: u8 = 2;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    let mut count = 0;
    for m in Msgs::new(data) {
        let Ok(m) = m else {
            break;
        };
        count += 1;
        let start = m.payload.as_ptr() as usize - data.as_ptr() as usize - NLMSG_HDRLEN;
        assert_eq!(start, at);
        let len = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        assert_eq!(m.payload.len() + NLMSG_HDRLEN, len);
        at += align4(len);

        if let Ok(attrs) = m.attrs(NFGENMSG_LEN) {
            walk(attrs, m.payload, 0);
        }
        if m.ty == NLMSG_ERROR {
            let _ = parse_error(&m);
        } else if let Ok(Some(e)) = Entry::from_msg(&m) {
            let v4 = e.family == AF_INET;
            assert!(e.src.is_ipv4() == v4 && e.dst.is_ipv4() == v4, "{e:?}");
            let mut again = MsgBuilder::new(m.ty, m.flags);
            encode(&mut again, &e);
            let m2 = Msgs::new(again.as_bytes()).next().unwrap().unwrap();
            assert_eq!(Entry::from_msg(&m2).unwrap(), Some(e));
        }
    }
    assert!(count <= data.len() / NLMSG_HDRLEN);
});

fn walk(attrs: Attrs<'_>, parent: &[u8], depth: usize) {
    let range = parent.as_ptr_range();
    let mut attrs = attrs;
    while let Some(a) = attrs.next() {
        let Ok(a) = a else {
            assert!(attrs.next().is_none(), "a malformed attribute ends its set");
            return;
        };
        let p = a.payload.as_ptr_range();
        assert!(range.start <= p.start && p.end <= range.end);
        if depth < MAX_NEST {
            walk(a.nested(), a.payload, depth + 1);
        }
    }
}

/// The attributes `from_msg` reads, as the kernel lays them out.
fn encode(b: &mut MsgBuilder, e: &Entry) {
    b.header(&nfgenmsg(e.family, 0));
    b.nested(CTA_TUPLE_ORIG, |b| {
        b.nested(CTA_TUPLE_IP, |b| match (e.src, e.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                b.bytes(CTA_IP_V4_SRC, &s.octets())
                    .bytes(CTA_IP_V4_DST, &d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                b.bytes(CTA_IP_V6_SRC, &s.octets())
                    .bytes(CTA_IP_V6_DST, &d.octets());
            }
            _ => unreachable!("checked above"),
        });
        b.nested(CTA_TUPLE_PROTO, |b| {
            b.u8(CTA_PROTO_NUM, e.proto);
            if matches!(e.proto, IPPROTO_ICMP | IPPROTO_ICMPV6) {
                let [ty, code] = e.dport.to_be_bytes();
                b.be16(CTA_PROTO_ICMP_ID, e.sport)
                    .u8(CTA_PROTO_ICMP_TYPE, ty)
                    .u8(CTA_PROTO_ICMP_CODE, code);
            } else {
                b.be16(CTA_PROTO_SRC_PORT, e.sport)
                    .be16(CTA_PROTO_DST_PORT, e.dport);
            }
        });
    });
    b.be32(CTA_STATUS, e.status)
        .be32(CTA_TIMEOUT, e.timeout_secs)
        .be32(CTA_ID, e.id)
        .be32(CTA_MARK, e.mark)
        .be16(CTA_ZONE, e.zone);
    if let Some(state) = e.tcp_state {
        b.nested(CTA_PROTOINFO, |b| {
            b.nested(CTA_PROTOINFO_TCP, |b| {
                b.u8(CTA_PROTOINFO_TCP_STATE, state);
            });
        });
    }
}
