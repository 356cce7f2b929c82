#!/usr/bin/env python3
"""Writes the binary seeds of the `btf` and `ctnetlink` fuzz targets.

    python3 fuzz/seeds/generate.py            # BTF blobs, synthetic ctnetlink datagrams
    unshare -n python3 fuzz/seeds/generate.py capture
                                              # a real ctnetlink dump (root, conntrack(8))

BTF: vmlinux's is 5 MB and no subset of it stands alone, so `vmlinux.btf`
is assembled here with the shapes ctrace looks up on a real kernel
(sk_buff fields inside anonymous unions, possible_net_t as a typedef of an
anonymous struct, nf_conn, skb_drop_reason, __nf_conntrack_alloc), and
`nf_conntrack.btf` is split BTF on top of it, as /sys/kernel/btf/<module>
is: type ids and string offsets continue the base's, members name base
types and reuse base strings. The `btf` target parses `vmlinux.btf` as the
base for split input, so regenerate both together.

ctnetlink: datagrams as the kernel sends them in answer to a conntrack
dump, IPCTNL_MSG_CT_NEW messages ended by NLMSG_DONE, and an NLMSG_ERROR
with extended ack TLVs. `capture` makes a few entries in a fresh network
namespace with conntrack -I and saves the kernel's own dump datagram.
Host byte order throughout, as netlink and BTF are.
"""
import os
import socket
import struct
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
    print(f"{target}/{name}: {len(data)} bytes")


# ---------------------------------------------------------------- BTF

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
FUNC, FUNC_PROTO, ENUM64 = 12, 13, 19


class Btf:
    def __init__(self, first_id=1, str_base=0):
        self.types = b""
        self.strs = b"" if str_base else b"\0"
        self.str_base = str_base
        self.next_id = first_id
        self.names = {}

    def str(self, s):
        if s == "":
            return 0  # the base's empty string, for split BTF too
        if s in self.names:
            return self.names[s]
        off = self.str_base + len(self.strs)
        self.strs += s.encode() + b"\0"
        self.names[s] = off
        return off

    def add(self, name, kind, vlen=0, size_or_type=0, extra=(), flag=False):
        info = (int(flag) << 31) | (kind << 24) | vlen
        words = [self.str(name), info, size_or_type, *extra]
        self.types += struct.pack(f"={len(words)}I", *words)
        self.next_id += 1
        return self.next_id - 1

    def int(self, name, size, signed=False, bits=None):
        enc = (1 << 24 if signed else 0) | (bits if bits is not None else size * 8)
        return self.add(name, INT, 0, size, [enc])

    def composite(self, name, size, members, kind=STRUCT, flag=False):
        """members: (name, type id, bit offset[, bitfield size])."""
        extra = []
        for m in members:
            off = m[2] | (m[3] << 24 if len(m) > 3 else 0)
            extra += [self.str(m[0]), m[1], off]
        return self.add(name, kind, len(members), size, extra, flag)

    def enum(self, name, values, size=4, signed=False):
        extra = []
        for n, v in values:
            extra += [self.str(n), v & 0xFFFFFFFF]
        return self.add(name, ENUM, len(values), size, extra, signed)

    def blob(self, hdr_len=24):
        t, s = len(self.types), len(self.strs)
        hdr = struct.pack("=HBBIIIII", 0xEB9F, 1, 0, hdr_len, 0, t, t, s)
        return hdr.ljust(hdr_len, b"\0") + self.types + self.strs


def vmlinux(hdr_len=24):
    b = Btf()
    t = {}
    t["int"] = b.int("int", 4, signed=True)
    t["uint"] = b.int("unsigned int", 4)
    t["ulong"] = b.int("long unsigned int", 8)
    t["long"] = b.int("long int", 8, signed=True)
    t["uchar"] = b.int("unsigned char", 1)
    t["ushort"] = b.int("short unsigned int", 2)
    t["u8"] = b.add("u8", TYPEDEF, 0, t["uchar"])
    t["u16"] = b.add("u16", TYPEDEF, 0, t["ushort"])
    t["u32"] = b.add("u32", TYPEDEF, 0, t["uint"])
    t["be16"] = b.add("__be16", TYPEDEF, 0, t["u16"])
    t["be32"] = b.add("__be32", TYPEDEF, 0, t["u32"])
    void_ptr = b.add("", PTR, 0, 0)
    uchar_ptr = b.add("", PTR, 0, t["uchar"])
    fwd_net = b.add("net", FWD)
    net_ptr = b.add("", PTR, 0, fwd_net)
    anon_net = b.composite("", 8, [("net", net_ptr, 0)])
    t["possible_net_t"] = b.add("possible_net_t", TYPEDEF, 0, anon_net)
    ns_common = b.composite(
        "ns_common", 24, [("stashed", void_ptr, 0), ("ops", void_ptr, 64), ("inum", t["uint"], 128)]
    )
    b.composite("net", 256, [("passive", t["int"], 0), ("ns", ns_common, 1024)])
    net_device = b.composite(
        "net_device", 2304, [("name", b.add("", ARRAY, 0, 0, [t["uchar"], t["int"], 16]), 0),
                             ("nd_net", t["possible_net_t"], 9472)]
    )
    dev_ptr = b.add("", PTR, 0, net_device)
    sock_common = b.composite(
        "sock_common", 136,
        [("skc_daddr", t["be32"], 0), ("skc_rcv_saddr", t["be32"], 32), ("skc_net", t["possible_net_t"], 384)],
    )
    sock = b.composite("sock", 776, [("__sk_common", sock_common, 0), ("sk_rcvbuf", t["int"], 1088)])
    sock_ptr = b.add("", PTR, 0, sock)
    # sk_buff: next/prev/dev in an anonymous struct inside an anonymous union,
    # the header offsets in a struct_group-style anonymous union.
    links = b.composite("", 24, [("next", void_ptr, 0), ("prev", void_ptr, 64), ("dev", dev_ptr, 128)])
    head_union = b.composite("", 24, [("", links, 0), ("rbnode", void_ptr, 0)], kind=UNION)
    sk_union = b.composite("", 8, [("sk", sock_ptr, 0), ("ip_defrag_offset", t["int"], 0)], kind=UNION)
    headers = b.composite(
        "", 8, [("transport_header", t["u16"], 0), ("network_header", t["u16"], 16), ("mac_header", t["u16"], 32)]
    )
    hdr_union = b.composite("", 8, [("", headers, 0), ("headers", headers, 0)], kind=UNION)
    b.composite(
        "sk_buff", 232,
        [("", head_union, 0), ("", sk_union, 192), ("_nfct", t["ulong"], 832),
         ("len", t["uint"], 896), ("pkt_type", t["u8"], 1024, 3), ("", hdr_union, 1440),
         ("head", uchar_ptr, 1600)],
        flag=True,
    )
    b.enum("skb_drop_reason", [("SKB_NOT_DROPPED_YET", 0), ("SKB_CONSUMED", 1),
                               ("SKB_DROP_REASON_NOT_SPECIFIED", 2), ("SKB_DROP_REASON_NETFILTER_DROP", 12),
                               ("SKB_DROP_REASON_MAX", 0x7FFFFFFF)])
    big = [b.str("SKB_DROP_REASON_SUBSYS_MASK"), 0, 0xFFFF, b.str("NEG"), 0xFFFFFFFD, 0xFFFFFFFF]
    b.add("skb_drop_reason_subsys", ENUM64, 2, 8, big, flag=True)
    proto = b.add("", FUNC_PROTO, 1, t["int"], [b.str("skb"), void_ptr])
    b.add("kfree_skb_reason", FUNC, 1, proto)
    b.add("__nf_conntrack_alloc", FUNC, 1, proto)
    conntrack(b, t)
    return b, t, b.blob(hdr_len)


def conntrack(b, t):
    """nf_conn and the tuple types, as in vmlinux when conntrack is built in
    or in the module's split BTF when it is not."""
    u3 = b.composite("", 16, [("all", b.add("", ARRAY, 0, 0, [t["u32"], t["int"], 4]), 0),
                              ("ip", t["be32"], 0)], kind=UNION)
    u3_t = b.add("nf_inet_addr", TYPEDEF, 0, u3)
    man_proto = b.composite("", 2, [("all", t["be16"], 0), ("tcp_port", t["be16"], 0)], kind=UNION)
    man = b.composite("nf_conntrack_man", 20, [("u3", u3_t, 0), ("u", man_proto, 128), ("l3num", t["u16"], 144)])
    dst_u = b.composite("", 2, [("all", t["be16"], 0)], kind=UNION)
    dst = b.composite("", 20, [("u3", u3_t, 0), ("u", dst_u, 128), ("protonum", t["u8"], 144), ("dir", t["u8"], 152)])
    tuple_ = b.composite("nf_conntrack_tuple", 40, [("src", man, 0), ("dst", dst, 160)])
    hnode = b.composite("hlist_nulls_node", 16, [("next", t["ulong"], 0), ("pprev", t["ulong"], 64)])
    hash_ = b.composite("nf_conntrack_tuple_hash", 56, [("hnnode", hnode, 0), ("tuple", tuple_, 128)])
    hashes = b.add("", ARRAY, 0, 0, [hash_, t["int"], 2])
    zone = b.composite("nf_conntrack_zone", 4, [("id", t["u16"], 0), ("flags", t["u8"], 16), ("dir", t["u8"], 24)])
    tcp = b.composite("ip_ct_tcp", 60, [("seen", b.add("", ARRAY, 0, 0, [t["u32"], t["int"], 12]), 0),
                                        ("state", t["u8"], 384), ("last_dir", t["u8"], 392)])
    proto = b.composite("nf_conntrack_proto", 60, [("tcp", tcp, 0)], kind=UNION)
    general = b.composite("nf_conntrack", 4, [("use", t["uint"], 0)])
    b.composite(
        "nf_conn", 256,
        [("ct_general", general, 0), ("lock", t["uint"], 32), ("timeout", t["u32"], 64),
         ("zone", zone, 96), ("tuplehash", hashes, 128), ("status", t["ulong"], 1024),
         ("ct_net", t["possible_net_t"], 1088), ("mark", t["u32"], 1152), ("proto", proto, 1280)],
    )


def nf_conntrack_split(base, t):
    """A module blob: the conntrack types again, on top of `base`, naming
    the base's integer and typedef ids and reusing its strings."""
    b = Btf(first_id=base.next_id, str_base=len(base.strs))
    b.names = dict(base.names)
    conntrack(b, t)
    b.add("nf_ct_delete", FUNC, 1, 0)
    return b.blob()


# ---------------------------------------------------------------- netlink

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_MULTI, NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x2, 0x100, 0x200
NLA_F_NESTED = 1 << 15
CT_NEW, CT_GET = 0x100, 0x101
AF_INET, AF_INET6 = 2, 10


def attr(ty, payload):
    a = struct.pack("=HH", 4 + len(payload), ty) + payload
    return a + b"\0" * (-len(a) % 4)


def nest(ty, *attrs):
    return attr(ty | NLA_F_NESTED, b"".join(attrs))


def msg(ty, flags, payload, seq=1, pid=0):
    m = struct.pack("=IHHII", 16 + len(payload), ty, flags, seq, pid) + payload
    return m + b"\0" * (-len(m) % 4)


def tuple_(ty, src, dst, proto, sport, dport, zone=None):
    v6 = len(src) == 16
    ip = nest(1, attr(3 if v6 else 1, src), attr(4 if v6 else 2, dst))
    if proto in (1, 58):
        icmp = (7, 8, 9) if proto == 58 else (4, 5, 6)
        p = nest(2, attr(1, bytes([proto])), attr(icmp[0], struct.pack(">H", sport)),
                 attr(icmp[1], bytes([dport >> 8])), attr(icmp[2], bytes([dport & 0xFF])))
    else:
        p = nest(2, attr(1, bytes([proto])), attr(2, struct.pack(">H", sport)),
                 attr(3, struct.pack(">H", dport)))
    z = attr(3, struct.pack(">H", zone)) if zone is not None else b""
    return nest(ty, ip, p, z)


def entry(family, src, dst, proto, sport, dport, status, timeout, id_, tcp_state=None,
          mark=0, zone=None, tuple_zone=None):
    a = [tuple_(1, src, dst, proto, sport, dport, tuple_zone),
         tuple_(2, dst, src, proto, dport if proto not in (1, 58) else sport,
                sport if proto not in (1, 58) else dport ^ 0x0800, None)]
    a.append(attr(3, struct.pack(">I", status)))
    a.append(attr(7, struct.pack(">I", timeout)))
    if mark:
        a.append(attr(8, struct.pack(">I", mark)))
    if tcp_state is not None:
        a.append(nest(4, nest(1, attr(1, bytes([tcp_state])), attr(2, b"\x07"), attr(3, b"\x07"),
                              attr(4, b"\x23\x00"), attr(5, b"\x23\x00"))))
    a.append(attr(11, struct.pack(">I", 1)))
    a.append(attr(12, struct.pack(">I", id_)))
    if zone is not None:
        a.append(attr(18, struct.pack(">H", zone)))
    return msg(CT_NEW, NLM_F_MULTI, bytes([family, 0, 0, 0]) + b"".join(a))


def v4(s):
    return socket.inet_pton(socket.AF_INET, s)


def v6(s):
    return socket.inet_pton(socket.AF_INET6, s)


def ctnetlink_seeds():
    dump = b"".join([
        entry(AF_INET, v4("10.10.1.2"), v4("10.10.1.1"), 6, 40312, 2380, 0x18E, 431999, 0x1234, tcp_state=3),
        entry(AF_INET, v4("10.0.0.5"), v4("1.1.1.1"), 17, 53001, 53, 0x8, 29, 7, mark=0x10, zone=3),
        entry(AF_INET6, v6("fd10:1::2"), v6("fd10:1::1"), 58, 0x4242, 0x8000, 0x18A, 29, 99, tuple_zone=5),
        entry(AF_INET, v4("192.0.2.7"), v4("192.0.2.8"), 1, 17, 0x0800, 0x18A, 29, 100),
        entry(AF_INET6, v6("2001:db8::1"), v6("2001:db8::2"), 132, 5000, 36412, 0x18E, 210, 101),
    ]) + msg(NLMSG_DONE, NLM_F_MULTI, struct.pack("=i", 0))
    write("ctnetlink", "dump-synthetic", dump)
    # IPCTNL_MSG_CT_NEW refused: EEXIST, with the request's header echoed
    # (capped) and an extended ack naming the attribute.
    echoed = struct.pack("=IHHII", 64, CT_NEW, 0x605, 9, 0)
    tlvs = attr(1, b"conntrack entry exists\0") + attr(2, struct.pack("=I", 20))
    write("ctnetlink", "error-ext-ack",
          msg(NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, struct.pack("=i", -17) + echoed + tlvs, seq=9))
    # A dump that ends in an error, and a non-IP family the decoder skips.
    write("ctnetlink", "done-error-other-family",
          msg(CT_NEW, NLM_F_MULTI, bytes([7, 0, 0, 0]) + attr(3, b"\0\0\0\x08"))
          + msg(NLMSG_DONE, NLM_F_MULTI | NLM_F_ACK_TLVS, struct.pack("=i", -4) + attr(1, b"EINTR\0")))


def capture():
    """The kernel's answer to a table dump in this network namespace."""
    for args in (["-p", "tcp", "-s", "10.10.1.2", "-d", "10.10.1.1", "--sport", "40312", "--dport", "2380",
                  "--state", "ESTABLISHED", "-u", "ASSURED,SEEN_REPLY", "-t", "3600"],
                 ["-p", "udp", "-s", "10.0.0.5", "-d", "1.1.1.1", "--sport", "53001", "--dport", "53",
                  "-t", "30", "-m", "16", "-w", "3"],
                 ["-p", "icmpv6", "-s", "fd10:1::2", "-d", "fd10:1::1", "--icmpv6-type", "128",
                  "--icmpv6-code", "0", "--icmpv6-id", "4242", "-t", "30"]):
        subprocess.run(["conntrack", "-I", *args], check=True, capture_output=True)
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
    s.bind((0, 0))
    s.send(msg(CT_GET, 0x301, bytes([0, 0, 0, 0])))
    data = s.recv(65536)
    write("ctnetlink", "dump-6.18", data)


if __name__ == "__main__":
    if sys.argv[1:] == ["capture"]:
        capture()
        sys.exit()
    base, types, blob = vmlinux()
    write("btf", "vmlinux.btf", blob)
    write("btf", "vmlinux-hdr32.btf", vmlinux(hdr_len=32)[2])
    write("btf", "nf_conntrack.btf", nf_conntrack_split(base, types))
    ctnetlink_seeds()
