//! Unit tests of the BTF reader: synthetic blobs from [`super::writer`] and,
//! where readable, the running kernel's BTF.

use std::path::Path;

use super::writer::{BtfWriter, INT_SIGNED};
use super::*;

fn parse(w: &BtfWriter) -> Btf {
    match Btf::from_bytes(w.build()) {
        Ok(b) => b,
        Err(e) => panic!("synthetic BTF failed to parse: {e}"),
    }
}

fn m(btf: &Btf, s: &str, path: &str) -> Member {
    match btf.member(s, path) {
        Ok(m) => m,
        Err(e) => panic!("{s}.{path}: {e}"),
    }
}

/// A miniature `struct sock_common`-like layout exercising anonymous
/// unions/structs, typedef chains, modifiers, bitfields, FWD + STRUCT.
fn sample() -> BtfWriter {
    let mut w = BtfWriter::new();
    let u8_ = w.int("unsigned char", 1, 0); // 1
    let u16_ = w.int("short unsigned int", 2, 0); // 2
    let u32_ = w.int("unsigned int", 4, 0); // 3
    let s64 = w.int("long long int", 8, INT_SIGNED); // 4
    let ulong = w.int("long unsigned int", 8, 0); // 5
    let be32 = w.typedef("__be32", u32_);
    let be16 = w.typedef("__be16", u16_);
    let addrpair = w.typedef("__addrpair", s64);
    // Forward declaration before the real struct, same name.
    let fwd = w.fwd("sk_common", false);
    let _ptr_fwd = w.ptr(fwd);
    // struct { __be32 daddr; __be32 rcv_saddr; }
    let anon_s = w.struct_(
        "",
        8,
        &[("skc_daddr", be32, 0, 0), ("skc_rcv_saddr", be32, 32, 0)],
    );
    let anon_u = w.union_(
        "",
        8,
        &[("skc_addrpair", addrpair, 0, 0), ("", anon_s, 0, 0)],
    );
    // typedef struct { s64 counter; } atomic64_t;
    let a64s = w.struct_("", 8, &[("counter", s64, 0, 0)]);
    let atomic64 = w.typedef("atomic64_t", a64s);
    let vol_u8 = w.volatile(u8_);
    let const_vol = w.const_(vol_u8);
    let tdef2 = w.typedef("state_t", const_vol);
    let tdef3 = w.typedef("state2_t", tdef2);
    let arr = w.array(u8_, u32_, 16);
    let in6 = w.struct_("in6_addr", 16, &[("s6_addr", arr, 0, 0)]);
    // A named nested struct reached through a typedef + const.
    let inner = w.struct_("inner", 16, &[("x", u32_, 0, 0), ("y", ulong, 64, 0)]);
    let inner_t = w.typedef("inner_t", inner);
    let inner_c = w.const_(inner_t);
    let tagged = w.type_tag("rcu", inner_c);
    let restr = w.restrict(tagged);
    let sk = w.struct_(
        "sk_common",
        96,
        &[
            ("", anon_u, 0, 0),
            ("skc_family", u16_, 64, 0),
            ("skc_state", tdef3, 80, 0),
            ("skc_reuse", u8_, 88, 4),
            ("skc_ipv6only", u8_, 92, 1),
            ("skc_cookie", atomic64, 128, 0),
            ("skc_v6", in6, 192, 0),
            ("nested", restr, 320, 0),
            ("wide_bf", ulong, 483, 40),
            ("skc_ptr", _ptr_fwd, 576, 0),
            ("skc_arr2", arr, 640, 0),
        ],
    );
    let _ = (be16, sk);
    w
}

/// Mutation: `id_of_kind` ignoring the kind returns the forward
/// declaration's id for `struct_id("fwd_then_struct")` and this fails
/// with `left: Some(2)`, `right: Some(3)`.
#[test]
fn struct_and_func_ids_by_kind() {
    let mut w = BtfWriter::new();
    let int = w.int("int", 4, INT_SIGNED);
    let fwd = w.fwd("fwd_then_struct", false);
    let st = w.struct_("fwd_then_struct", 4, &[("x", int, 0, 0)]);
    let proto = w.func_proto(int, &[("a", int)]);
    let func = w.func("bpf_rdonly_cast", proto);
    let btf = parse(&w);
    assert_ne!(fwd, st);
    assert_eq!(btf.struct_id("fwd_then_struct").ok(), Some(st));
    assert_eq!(btf.func_id("bpf_rdonly_cast").ok(), Some(func));
    assert!(btf.func_id("fwd_then_struct").is_err());
    assert!(btf.struct_id("bpf_rdonly_cast").is_err());
    assert!(btf.func_id("missing").is_err());
}

#[test]
fn resolves_anonymous_typedef_modifiers_bitfields() {
    let btf = parse(&sample());
    assert_eq!(
        m(&btf, "sk_common", "skc_daddr"),
        Member {
            offset_bits: 0,
            size_bytes: 4,
            bitfield_bits: 0
        }
    );
    assert_eq!(m(&btf, "sk_common", "skc_rcv_saddr").offset_bits, 32);
    assert_eq!(m(&btf, "sk_common", "skc_addrpair").size_bytes, 8);
    assert_eq!(m(&btf, "sk_common", "skc_family").offset_bits, 64);
    let st = m(&btf, "sk_common", "skc_state");
    assert_eq!(
        (st.offset_bits, st.size_bytes, st.bitfield_bits),
        (80, 1, 0)
    );
    assert_eq!(
        m(&btf, "sk_common", "skc_reuse"),
        Member {
            offset_bits: 88,
            size_bytes: 1,
            bitfield_bits: 4
        }
    );
    assert_eq!(m(&btf, "sk_common", "skc_ipv6only").bitfield_bits, 1);
    assert_eq!(m(&btf, "sk_common", "skc_ipv6only").offset_bits, 92);
    assert_eq!(m(&btf, "sk_common", "skc_ipv6only").offset_bytes(), None);
    assert_eq!(m(&btf, "sk_common", "skc_cookie").size_bytes, 8);
    assert_eq!(m(&btf, "sk_common", "skc_cookie.counter").offset_bits, 128);
    assert_eq!(m(&btf, "sk_common", "skc_v6").size_bytes, 16);
    assert_eq!(m(&btf, "sk_common", "skc_v6.s6_addr").size_bytes, 16);
    // Descends through restrict -> type_tag -> const -> typedef.
    let y = m(&btf, "sk_common", "nested.y");
    assert_eq!((y.offset_bits, y.size_bytes), (320 + 64, 8));
    assert_eq!(y.offset_bytes(), Some(48));
    assert_eq!(m(&btf, "sk_common", "wide_bf").bitfield_bits, 40);
    assert_eq!(m(&btf, "sk_common", "skc_ptr").size_bytes, 8);
    // Typedef'd anonymous struct as a root.
    assert_eq!(m(&btf, "atomic64_t", "counter").size_bytes, 8);
    assert_eq!(m(&btf, "inner_t", "y").offset_bits, 64);
    // FWD of the same name does not shadow the struct.
    assert_eq!(btf.struct_size("sk_common").ok(), Some(96));
    assert_eq!(btf.struct_size("in6_addr").ok(), Some(16));
    assert_eq!(btf.struct_size("atomic64_t").ok(), Some(8));
    assert_eq!(btf.pointer_size(), 8);
}

#[test]
fn fwd_only_struct_is_not_composite() {
    let mut w = BtfWriter::new();
    w.fwd("only_fwd", false);
    let btf = parse(&w);
    assert!(matches!(
        btf.member("only_fwd", "x"),
        Err(BtfError::NotComposite {
            kind: Kind::Fwd,
            ..
        })
    ));
}

#[test]
fn struct_preferred_over_fwd_declared_after() {
    let mut w = BtfWriter::new();
    let u32_ = w.int("unsigned int", 4, 0);
    w.struct_("s", 8, &[("a", u32_, 32, 0)]);
    w.fwd("s", false);
    w.typedef("s", u32_);
    let btf = parse(&w);
    assert_eq!(m(&btf, "s", "a").offset_bits, 32);
}

#[test]
fn old_style_int_bitfields_without_kind_flag() {
    let mut w = BtfWriter::new();
    let u32_ = w.int("unsigned int", 4, 0);
    let bf3 = w.int_bits("unsigned int", 4, 0, 3);
    let bf_off = w.int_bits("unsigned int", 4, 2, 5);
    // Members written with kind_flag = 0 (no bitfield in M tuples).
    w.struct_(
        "old",
        8,
        &[("a", u32_, 0, 0), ("b", bf3, 32, 0), ("c", bf_off, 35, 0)],
    );
    let btf = parse(&w);
    assert_eq!(m(&btf, "old", "a").bitfield_bits, 0);
    assert_eq!(
        m(&btf, "old", "b"),
        Member {
            offset_bits: 32,
            size_bytes: 4,
            bitfield_bits: 3
        }
    );
    assert_eq!(
        m(&btf, "old", "c"),
        Member {
            offset_bits: 37,
            size_bytes: 4,
            bitfield_bits: 5
        }
    );
}

/// One type of every kind, so the walker must get every kind's trailing
/// data size right to find the struct at the end.
fn all_kinds() -> BtfWriter {
    let mut w = BtfWriter::new();
    let int = w.int("int", 4, INT_SIGNED); // 1 INT
    let ptr = w.ptr(int); // 2 PTR
    let arr = w.array(int, int, 3); // 3 ARRAY
    let e = w.enum_("color", 4, false, &[("RED", -1), ("GREEN", 7)]); // 6 ENUM
    let ue = w.enum_("ucolor", 4, true, &[("BIG", -1)]);
    w.fwd("later", true); // 7 FWD (union)
    let td = w.typedef("int_t", int); // 8 TYPEDEF
    let vol = w.volatile(td); // 9
    let cst = w.const_(vol); // 10
    let res = w.restrict(ptr); // 11
    let proto = w.func_proto(int, &[("a", int), ("", 0)]); // 13
    w.func("tcp_write_timer_handler", proto); // 12
    let v = w.var("some_var", int); // 14
    w.datasec(".data", 4, &[(v, 0, 4)]); // 15
    let fl = w.float("double", 8); // 16
    let tt = w.type_tag("user", ptr); // 18
    let e64 = w.enum64("big", 8, true, &[("HUGE", 1 << 40), ("MAX", u64::MAX)]); // 19
    let te = w.typedef("color_t", e);
    let un = w.union_("later", 8, &[("i", int, 0, 0), ("f", fl, 0, 0)]); // 5 UNION
    w.decl_tag("kfunc", un, -1); // 17
    w.struct_(
        "all", // 4 STRUCT
        64,
        &[
            ("i", cst, 0, 0),
            ("p", res, 64, 0),
            ("a", arr, 128, 0),
            ("e", te, 224, 0),
            ("u", un, 256, 0),
            ("t", tt, 320, 0),
            ("e64", e64, 384, 0),
            ("ue", ue, 448, 0),
        ],
    );
    w
}

#[test]
fn walks_every_kind() {
    let btf = parse(&all_kinds());
    assert_eq!(btf.type_count(), 22);
    assert_eq!(m(&btf, "all", "i").size_bytes, 4);
    assert_eq!(m(&btf, "all", "p").size_bytes, 8);
    assert_eq!(m(&btf, "all", "a").size_bytes, 12);
    assert_eq!(m(&btf, "all", "e").size_bytes, 4);
    assert_eq!(m(&btf, "all", "u.f").offset_bits, 256);
    assert_eq!(m(&btf, "all", "u.f").size_bytes, 8);
    assert_eq!(m(&btf, "later", "i").size_bytes, 4);
    assert_eq!(m(&btf, "all", "t").size_bytes, 8);
    assert_eq!(m(&btf, "all", "e64").size_bytes, 8);
}

#[test]
fn lookup_errors() {
    let btf = parse(&sample());
    assert!(matches!(
        btf.member("no_such_struct", "x"),
        Err(BtfError::TypeNotFound { .. })
    ));
    let e = btf.member("sk_common", "skc_nope").err();
    assert!(matches!(e, Some(BtfError::MemberNotFound { ref member, .. }) if member == "skc_nope"));
    assert!(e.is_some_and(|e| e.to_string().contains("struct sk_common")));
    // Non-struct root.
    assert!(matches!(
        btf.member("unsigned int", "x"),
        Err(BtfError::NotComposite {
            kind: Kind::Int,
            ..
        })
    ));
    assert!(matches!(
        btf.member("__be32", "x"),
        Err(BtfError::NotComposite {
            kind: Kind::Int,
            ..
        })
    ));
    // Descending into a non-struct member / a bitfield / an array.
    assert!(matches!(
        btf.member("sk_common", "skc_family.x"),
        Err(BtfError::NotComposite {
            kind: Kind::Int,
            ..
        })
    ));
    assert!(matches!(
        btf.member("sk_common", "skc_reuse.x"),
        Err(BtfError::NotComposite { .. })
    ));
    assert!(matches!(
        btf.member("sk_common", "skc_arr2.x"),
        Err(BtfError::NotComposite {
            kind: Kind::Array,
            ..
        })
    ));
    assert!(matches!(
        btf.member("sk_common", "skc_ptr.x"),
        Err(BtfError::NotComposite {
            kind: Kind::Ptr,
            ..
        })
    ));
    assert!(matches!(
        btf.member("sk_common", "nested.nope"),
        Err(BtfError::MemberNotFound { .. })
    ));
    for bad in ["", ".", "a..b", "skc_family.", ".skc_family"] {
        assert!(
            matches!(
                btf.member("sk_common", bad),
                Err(BtfError::InvalidPath { .. })
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        btf.struct_size("nope"),
        Err(BtfError::TypeNotFound { .. })
    ));
}

#[test]
fn header_errors() {
    let good = sample().build();
    assert!(Btf::from_bytes(good.clone()).is_ok());

    assert!(matches!(
        Btf::from_bytes(Vec::new()),
        Err(BtfError::Truncated { what: "header", .. })
    ));
    assert!(matches!(
        Btf::from_bytes(good[..23].to_vec()),
        Err(BtfError::Truncated { what: "header", .. })
    ));
    let mut bad = good.clone();
    bad[0] = 0x12;
    assert!(matches!(
        Btf::from_bytes(bad),
        Err(BtfError::BadMagic { .. })
    ));
    let mut be = good.clone();
    be.swap(0, 1);
    assert!(matches!(Btf::from_bytes(be), Err(BtfError::BigEndian)));
    let mut v = good.clone();
    v[2] = 2;
    assert!(matches!(
        Btf::from_bytes(v),
        Err(BtfError::UnsupportedVersion(2))
    ));
    let mut h = good.clone();
    h[4..8].copy_from_slice(&8u32.to_le_bytes());
    assert!(matches!(Btf::from_bytes(h), Err(BtfError::BadHeader(_))));
    let mut h = good.clone();
    h[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        Btf::from_bytes(h),
        Err(BtfError::Truncated { .. })
    ));
    // Section offsets pointing past the end, and overflowing.
    let mut s = good.clone();
    s[16..20].copy_from_slice(&100_000u32.to_le_bytes());
    assert!(matches!(
        Btf::from_bytes(s),
        Err(BtfError::Truncated {
            what: "string section",
            ..
        })
    ));
    let mut s = good.clone();
    s[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(Btf::from_bytes(s).is_err());
    let mut s = good.clone();
    s[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    s[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(Btf::from_bytes(s).is_err());
    // Empty / badly terminated string sections.
    let mut s = good.clone();
    s[20..24].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(Btf::from_bytes(s), Err(BtfError::BadStrings(_))));
    let mut s = good.clone();
    let last = s.len() - 1;
    s[last] = b'x';
    assert!(matches!(Btf::from_bytes(s), Err(BtfError::BadStrings(_))));
    // A header longer than 24 bytes (future fields) is fine.
    let mut long = good[..24].to_vec();
    long[4..8].copy_from_slice(&32u32.to_le_bytes());
    long.extend_from_slice(&[0; 8]);
    long.extend_from_slice(&good[24..]);
    let btf = Btf::from_bytes(long).ok();
    assert!(btf.is_some_and(|b| b.struct_size("sk_common").ok() == Some(96)));
    // Empty type section: only void.
    let empty = BtfWriter::new().build();
    let btf = Btf::from_bytes(empty).ok();
    assert!(btf.is_some_and(|b| b.type_count() == 1 && b.pointer_size() == 8));
}

#[test]
fn every_truncation_is_an_error() {
    let good = all_kinds().build();
    for len in 0..good.len() {
        let mut cut = good[..len].to_vec();
        assert!(Btf::from_bytes(cut.clone()).is_err(), "len {len}");
        // Same, but with the header lengths still claiming the rest: the
        // type section is cut short inside a type.
        if len > 24 {
            let type_len = u32::from_le_bytes([good[12], good[13], good[14], good[15]]) as usize;
            if len < 24 + type_len {
                let cut_types = (len - 24) as u32;
                cut[12..16].copy_from_slice(&cut_types.to_le_bytes());
                cut[16..20].copy_from_slice(&cut_types.to_le_bytes());
                cut.extend_from_slice(&[0]);
                cut[20..24].copy_from_slice(&1u32.to_le_bytes());
                let r = Btf::from_bytes(cut);
                // Cutting exactly between two types is valid BTF (that
                // references types that no longer exist, or not).
                if let Err(e) = r {
                    assert!(
                        matches!(
                            e,
                            BtfError::Truncated { .. }
                                | BtfError::TypeIdOutOfRange { .. }
                                | BtfError::StringOffsetOutOfRange { .. }
                        ),
                        "len {len}: {e}"
                    );
                }
            }
        }
    }
}

#[test]
fn string_offset_out_of_range() {
    // Type name.
    let mut w = BtfWriter::new();
    w.raw("", 1, false, 0, 4, &[32]);
    let mut blob = w.build();
    blob[24..28].copy_from_slice(&5000u32.to_le_bytes());
    assert!(matches!(
        Btf::from_bytes(blob),
        Err(BtfError::StringOffsetOutOfRange { offset: 5000, .. })
    ));
    // Member name.
    let mut w = BtfWriter::new();
    let int = w.int("int", 4, 0);
    w.raw("s", 4, false, 1, 4, &[7777, int, 0]);
    assert!(matches!(
        Btf::from_bytes(w.build()),
        Err(BtfError::StringOffsetOutOfRange { offset: 7777, .. })
    ));
    // Enum value name, enum64, func_proto param name.
    for kind in [6u32, 19, 13] {
        let mut w = BtfWriter::new();
        let extra: &[u32] = if kind == 19 {
            &[9999, 0, 0]
        } else {
            &[9999, 0]
        };
        w.raw("e", kind, false, 1, if kind == 13 { 0 } else { 4 }, extra);
        assert!(
            matches!(
                Btf::from_bytes(w.build()),
                Err(BtfError::StringOffsetOutOfRange { .. })
            ),
            "kind {kind}"
        );
    }
}

#[test]
fn type_id_out_of_range() {
    let cases: [fn(&mut BtfWriter); 10] = [
        |w| {
            w.ptr(99);
        },
        |w| {
            w.typedef("t", 1234);
        },
        |w| {
            w.array(1, 500, 2);
        },
        |w| {
            w.array(500, 1, 2);
        },
        |w| {
            w.struct_("s", 4, &[("x", 42, 0, 0)]);
        },
        |w| {
            w.func_proto(77, &[]);
        },
        |w| {
            w.func_proto(1, &[("a", 77)]);
        },
        |w| {
            w.datasec(".bss", 4, &[(88, 0, 4)]);
        },
        |w| {
            w.var("v", 66);
        },
        |w| {
            w.decl_tag("tag", 66, -1);
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let mut w = BtfWriter::new();
        w.int("int", 4, INT_SIGNED);
        case(&mut w);
        assert!(
            matches!(
                Btf::from_bytes(w.build()),
                Err(BtfError::TypeIdOutOfRange { .. })
            ),
            "case {i}"
        );
    }
}

#[test]
fn unknown_kind() {
    let mut w = BtfWriter::new();
    w.raw("x", 20, false, 0, 0, &[]);
    assert!(matches!(
        Btf::from_bytes(w.build()),
        Err(BtfError::UnknownKind { id: 1, kind: 20 })
    ));
    let mut w = BtfWriter::new();
    w.raw("x", 0, false, 0, 0, &[]);
    assert!(matches!(
        Btf::from_bytes(w.build()),
        Err(BtfError::UnknownKind { kind: 0, .. })
    ));
}

#[test]
fn cycles_are_errors_not_hangs() {
    let mut w = BtfWriter::new();
    // typedef a -> typedef b -> typedef a
    let a = w.next_id();
    w.typedef("a", a + 1);
    w.typedef("b", a);
    // A struct whose anonymous member is itself.
    let s = w.next_id();
    w.struct_("selfish", 4, &[("", s, 0, 0)]);
    // An array of itself (size loop).
    let arr = w.next_id();
    w.array(arr, arr, 1);
    let int = w.int("int", 4, 0);
    w.struct_(
        "holder",
        8,
        &[("x", a, 0, 0), ("arr", arr, 32, 0), ("i", int, 0, 0)],
    );
    let btf = parse(&w);
    assert!(matches!(
        btf.member("a", "x"),
        Err(BtfError::TooDeep { .. })
    ));
    assert!(matches!(
        btf.member("selfish", "x"),
        Err(BtfError::TooDeep { .. })
    ));
    assert!(matches!(
        btf.member("holder", "x"),
        Err(BtfError::TooDeep { .. })
    ));
    assert!(matches!(
        btf.member("holder", "arr"),
        Err(BtfError::TooDeep { .. })
    ));
    assert!(btf.member("holder", "i").is_ok());
}

/// Anonymous members forming a wide DAG (2^40 paths): bounded work.
#[test]
fn wide_anonymous_dag_is_bounded() {
    let mut w = BtfWriter::new();
    let int = w.int("int", 4, 0);
    let mut prev = w.struct_("", 4, &[("leaf", int, 0, 0)]);
    for _ in 0..40 {
        prev = w.struct_("", 4, &[("", prev, 0, 0), ("", prev, 0, 0)]);
    }
    w.struct_("dag", 4, &[("", prev, 0, 0)]);
    let btf = parse(&w);
    assert_eq!(m(&btf, "dag", "leaf").offset_bits, 0);
    let start = std::time::Instant::now();
    assert!(matches!(
        btf.member("dag", "nope"),
        Err(BtfError::TooDeep { .. })
    ));
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn sizes_of_unsized_and_huge_types() {
    let mut w = BtfWriter::new();
    let int = w.int("int", 4, 0);
    let proto = w.func_proto(int, &[]);
    let big = w.array(int, int, u32::MAX);
    let bigger = w.array(big, int, u32::MAX);
    w.struct_(
        "s",
        8,
        &[
            ("f", proto, 0, 0),
            ("v", 0, 0, 0),
            ("big", big, 0, 0),
            ("bigger", bigger, 0, 0),
        ],
    );
    // Offsets that overflow u32 bits when accumulated.
    let far = w.struct_("far", 8, &[("x", int, 0xf000_0000, 0)]);
    w.struct_("far_holder", 8, &[("a", far, 0xf000_0000, 0)]);
    let btf = parse(&w);
    assert!(matches!(
        btf.member("s", "f"),
        Err(BtfError::NoSize {
            kind: Kind::FuncProto,
            ..
        })
    ));
    assert!(matches!(
        btf.member("s", "v"),
        Err(BtfError::NoSize {
            kind: Kind::Void,
            ..
        })
    ));
    assert!(matches!(
        btf.member("s", "big"),
        Err(BtfError::Overflow { .. })
    ));
    assert!(matches!(
        btf.member("s", "bigger"),
        Err(BtfError::Overflow { .. })
    ));
    assert_eq!(btf.struct_size("far_holder").ok(), Some(8));
    assert_eq!(m(&btf, "far", "x").offset_bits, 0xf000_0000);
    assert!(matches!(
        btf.member("far_holder", "a.x"),
        Err(BtfError::Overflow { .. })
    ));
}

#[test]
fn pointer_size_from_long() {
    let mut w = BtfWriter::new();
    let l = w.int("long int", 4, INT_SIGNED);
    let p = w.ptr(l);
    w.struct_("s", 8, &[("p", p, 0, 0)]);
    let btf = parse(&w);
    assert_eq!(btf.pointer_size(), 4);
    assert_eq!(m(&btf, "s", "p").size_bytes, 4);
}

/// Random byte flips over valid blobs must never panic or hang.
#[test]
fn mutated_blobs_never_panic() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for base in [sample().build(), all_kinds().build()] {
        for _ in 0..3000 {
            let mut b = base.clone();
            for _ in 0..(rnd() % 4 + 1) {
                let i = (rnd() as usize) % b.len();
                b[i] = rnd() as u8;
            }
            if let Ok(btf) = Btf::from_bytes(b) {
                for (s, p) in [
                    ("sk_common", "skc_daddr"),
                    ("sk_common", "nested.y"),
                    ("sk_common", "skc_cookie.counter"),
                    ("all", "u.f"),
                    ("all", "a"),
                    ("atomic64_t", "counter"),
                ] {
                    let _ = btf.member(s, p);
                    let _ = btf.struct_size(s);
                }
            }
        }
    }
}

#[test]
fn from_file_missing_is_io_error() {
    let r = Btf::from_file(Path::new("/nonexistent/tcpstall/vmlinux"));
    assert!(matches!(r, Err(BtfError::Io { .. })));
    assert!(
        r.err()
            .is_some_and(|e| e.to_string().contains("/nonexistent/tcpstall/vmlinux"))
    );
}

/// The running kernel's BTF. Missing BTF is a failure, not a skip: the
/// agent cannot work without it.
#[test]
fn sys_vmlinux_basics() {
    let btf = match Btf::from_sys_fs() {
        Ok(b) => b,
        Err(e) => panic!(
            "{SYS_VMLINUX} is required for this test (kernel built without CONFIG_DEBUG_INFO_BTF?): {e}"
        ),
    };
    assert!(btf.type_count() > 10_000, "{btf:?}");
    assert_eq!(btf.pointer_size(), 8);
    let daddr = m(&btf, "sock", "__sk_common.skc_daddr");
    assert_eq!((daddr.offset_bits, daddr.size_bytes), (0, 4));
    assert_eq!(m(&btf, "sock_common", "skc_dport").size_bytes, 2);
    assert!(btf.struct_size("tcp_sock").is_ok_and(|s| s > 1000));
    assert_eq!(btf.struct_size("timer_list").ok(), Some(40));
}
