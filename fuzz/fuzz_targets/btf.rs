//! BTF: the bytes as a base blob (/sys/kernel/btf/vmlinux) and as a module's
//! split blob on top of the `vmlinux.btf` seed (/sys/kernel/btf/<module>),
//! each then asked what ctrace asks of a kernel: member offsets and sizes
//! along paths through nf_conn, sk_buff and friends, struct sizes, enum
//! values, whether a function exists, the pointer size.
//!
//! Why the assertions hold: hostile type counts, lengths and string offsets
//! must give errors, not panics, hangs or huge allocations (libFuzzer's
//! timeout and RSS limit catch those). Layering split BTF never changes an
//! answer the base gives for its enums and functions: those are looked up
//! base first.
#![no_main]

use std::sync::LazyLock;

use ctrace::kernel::btf::Btf;
use libfuzzer_sys::fuzz_target;

/// Paths ctrace resolves (strategy/tracepoint.rs, strategy/kprobe.rs),
/// with a few that stop at a struct or run into a pointer.
const PATHS: &[&str] = &[
    "nf_conn.ct_general",
    "nf_conn.tuplehash",
    "nf_conn.ct_net",
    "nf_conn.status",
    "nf_conn.timeout",
    "nf_conn.proto",
    "nf_conn.zone",
    "nf_conn.mark",
    "nf_conn.tuplehash.tuple",
    "nf_conntrack_tuple_hash.tuple",
    "nf_conntrack_tuple.src",
    "nf_conntrack_tuple.dst.u3",
    "nf_conntrack_tuple.dst.u",
    "nf_conntrack_tuple.dst.protonum",
    "nf_conntrack_man.u3",
    "nf_conntrack_man.u",
    "nf_conntrack_man.l3num",
    "nf_conntrack_zone.id",
    "ip_ct_tcp.state",
    "possible_net_t.net",
    "possible_net_t.net.ns",
    "sk_buff._nfct",
    "sk_buff.head",
    "sk_buff.network_header",
    "sk_buff.dev",
    "sk_buff.sk",
    "sk_buff.pkt_type",
    "net_device.nd_net",
    "sock.__sk_common",
    "sock_common.skc_net",
    "net.ns",
    "ns_common.inum",
];

const STRUCTS: &[&str] = &[
    "nf_conn",
    "nf_conntrack_tuple_hash",
    "sk_buff",
    "possible_net_t",
];

const ENUMS: &[(&str, &str)] = &[
    ("skb_drop_reason", "SKB_DROP_REASON_NETFILTER_DROP"),
    ("skb_drop_reason", "SKB_DROP_REASON_MAX"),
    ("skb_drop_reason_subsys", "NEG"),
];

const FUNCS: &[&str] = &["__nf_conntrack_alloc", "nf_ct_delete", "kfree_skb_reason"];

struct Answers {
    enums: Vec<Option<i64>>,
    funcs: Vec<bool>,
}

fn ask(btf: &Btf) -> Answers {
    for path in PATHS {
        if btf.member_offset(path).is_ok() {
            let _ = btf.member_size(path);
        }
    }
    for name in STRUCTS {
        let _ = btf.struct_size(name);
    }
    let _ = btf.pointer_size();
    let _ = format!("{btf:?}");
    Answers {
        enums: ENUMS
            .iter()
            .map(|(e, v)| btf.enum_value(e, v).ok())
            .collect(),
        funcs: FUNCS.iter().map(|f| btf.has_func(f)).collect(),
    }
}

static BASE: LazyLock<(Btf, Answers)> = LazyLock::new(|| {
    let btf = Btf::from_bytes(include_bytes!("../seeds/btf/vmlinux.btf").to_vec())
        .expect("the vmlinux.btf seed parses");
    let answers = ask(&btf);
    (btf, answers)
});

fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = Btf::from_bytes(data.to_vec()) {
        ask(&btf);
    }
    let (base, base_answers) = &*BASE;
    if let Ok(split) = Btf::from_split_bytes(data.to_vec(), base) {
        let answers = ask(&split);
        for (i, base_value) in base_answers.enums.iter().enumerate() {
            if base_value.is_some() {
                assert_eq!(&answers.enums[i], base_value, "{:?}", ENUMS[i]);
            }
        }
        for (i, &base_has) in base_answers.funcs.iter().enumerate() {
            assert!(answers.funcs[i] || !base_has, "{}", FUNCS[i]);
        }
    }
});
