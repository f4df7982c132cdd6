//! Unit tests of the field table and its resolution from BTF (synthetic blobs
//! and, where readable, the running kernel's).

use std::path::Path;
use std::time::Instant;

use tcpstall_common::field;

use super::*;
use crate::kernel::btf::SYS_VMLINUX;
use crate::kernel::btf::writer::{BtfWriter, INT_SIGNED, M};

/// Kernel generations of the synthetic kernel.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Gen {
    /// 6.1-like: `icsk_timeout`, int sysctls, no `tcp_usec_ts`.
    V6_1,
    /// 6.12-like: `icsk_timeout`, u8 sysctls, `tcp_usec_ts`.
    V6_12,
    /// 6.15-6.18: `icsk_retransmit_timer.expires`, `icsk_rto_max`.
    V6_18,
    /// 6.19+: `sk->tcp_retransmit_timer` in a union with `sk_timer`.
    V6_19,
}

struct Opts {
    kgen: Gen,
    ipv6: bool,
    net_ns: bool,
    drop_retrans_stamp: bool,
    /// Make `snd_wnd` a 3-byte array (unreadable size).
    bad_snd_wnd: bool,
    /// Put something before `sk` in `inet_connection_sock`.
    shifted_icsk: bool,
}

impl Opts {
    fn new(kgen: Gen) -> Self {
        Self {
            kgen,
            ipv6: true,
            net_ns: true,
            drop_retrans_stamp: false,
            bad_snd_wnd: false,
            shifted_icsk: false,
        }
    }
}

/// Byte offsets used by the synthetic kernel (bits = bytes * 8).
const ICSK_TIMER: u32 = 1000;
const ICSK_FIELDS: u32 = 1100;
const TP_FIELDS: u32 = 1400;
const SK_TIMER: u32 = 200;
const ICSK_KEEPALIVE_TIMER: u32 = 1040;

/// A miniature kernel with the shapes of the real structs.
fn synthetic_kernel(o: &Opts) -> Vec<u8> {
    let mut w = BtfWriter::new();
    let u8_ = w.int("unsigned char", 1, 0);
    let u16_ = w.int("short unsigned int", 2, 0);
    let u32_ = w.int("unsigned int", 4, 0);
    let int = w.int("int", 4, INT_SIGNED);
    let s64 = w.int("long long int", 8, INT_SIGNED);
    let ulong = w.int("long unsigned int", 8, 0);
    let t_u8 = w.typedef("u8", u8_);
    let t_u16 = w.typedef("__u16", u16_);
    let t_u32 = w.typedef("u32", u32_);
    let be32 = w.typedef("__be32", u32_);
    let be16 = w.typedef("__be16", u16_);
    let addrpair = w.typedef("__addrpair", s64);
    let portpair = w.typedef("__portpair", u32_);
    // Forward declarations before the definitions, like real BTF has.
    let fwd_net = w.fwd("net", false);
    w.fwd("tcp_sock", false);
    let net_ptr = w.ptr(fwd_net);

    let a_s = w.struct_(
        "",
        8,
        &[("skc_daddr", be32, 0, 0), ("skc_rcv_saddr", be32, 32, 0)],
    );
    let a_u = w.union_("", 8, &[("skc_addrpair", addrpair, 0, 0), ("", a_s, 0, 0)]);
    let p_s = w.struct_(
        "",
        4,
        &[("skc_dport", be16, 0, 0), ("skc_num", t_u16, 16, 0)],
    );
    let p_u = w.union_("", 4, &[("skc_portpair", portpair, 0, 0), ("", p_s, 0, 0)]);
    let possible_net: Vec<M<'_>> = if o.net_ns {
        vec![("net", net_ptr, 0, 0)]
    } else {
        vec![]
    };
    let pnet_s = w.struct_("", if o.net_ns { 8 } else { 0 }, &possible_net);
    let pnet = w.typedef("possible_net_t", pnet_s);
    let a64s = w.struct_("", 8, &[("counter", s64, 0, 0)]);
    let atomic64 = w.typedef("atomic64_t", a64s);
    let arr16 = w.array(u8_, u32_, 16);
    let in6_u = w.union_("", 16, &[("u6_addr8", arr16, 0, 0)]);
    let in6 = w.struct_("in6_addr", 16, &[("in6_u", in6_u, 0, 0)]);
    let vol_u8 = w.volatile(u8_);
    let mut skc: Vec<M<'_>> = vec![
        ("", a_u, 0, 0),
        ("", p_u, 96, 0),
        ("skc_family", u16_, 128, 0),
        ("skc_state", vol_u8, 144, 0),
        ("skc_reuse", u8_, 152, 4),
        ("skc_ipv6only", u8_, 157, 1),
        ("skc_net", pnet, 384, 0),
        ("skc_cookie", atomic64, 704, 0),
    ];
    if o.kgen != Gen::V6_1 {
        // `sk_flags` is `#define sk_flags __sk_common.skc_flags`.
        let sk_ptr = w.ptr(0);
        let fl = w.union_(
            "",
            8,
            &[("skc_flags", ulong, 0, 0), ("skc_listener", sk_ptr, 0, 0)],
        );
        skc.push(("", fl, 768, 0));
    }
    if o.ipv6 {
        skc.push(("skc_v6_daddr", in6, 448, 0));
        skc.push(("skc_v6_rcv_saddr", in6, 576, 0));
    }
    let sock_common = w.struct_("sock_common", 136, &skc);

    // struct timer_list { hlist_node entry; unsigned long expires; fn; u32 flags; }
    let proto = w.func_proto(0, &[]);
    let fptr = w.ptr(proto);
    let hlist = w.struct_(
        "hlist_node",
        16,
        &[("next", fptr, 0, 0), ("pprev", fptr, 64, 0)],
    );
    let timer = w.struct_(
        "timer_list",
        40,
        &[
            ("entry", hlist, 0, 0),
            ("expires", ulong, 128, 0),
            ("function", fptr, 192, 0),
            ("flags", u32_, 256, 0),
        ],
    );
    let fwd_timer = w.fwd("timer_list", false);
    let _ = fwd_timer;

    let mut sk: Vec<M<'_>> = vec![
        ("__sk_common", sock_common, 0, 0),
        ("sk_err", int, 1200, 0),
        ("sk_err_soft", int, 1232, 0),
    ];
    if o.kgen == Gen::V6_1 {
        // Old style: a real `sk_flags` member (tests the fallback).
        sk.push(("sk_flags", ulong, 1280, 0));
    }
    if o.kgen == Gen::V6_1 {
        // Pre-5.6 style: an 8-bit bitfield straddling bytes 164-165.
        sk.push(("sk_protocol", u32_, 1316, 8));
    } else {
        sk.push(("sk_protocol", u16_, 1312, 0));
    }
    if o.kgen == Gen::V6_19 {
        let tu = w.union_(
            "",
            40,
            &[
                ("sk_timer", timer, 0, 0),
                ("tcp_retransmit_timer", timer, 0, 0),
            ],
        );
        sk.push(("", tu, SK_TIMER * 8, 0));
    } else {
        sk.push(("sk_timer", timer, SK_TIMER * 8, 0));
    }
    let sock = w.struct_("sock", 800, &sk);
    let inet = w.struct_("inet_sock", 900, &[("sk", sock, 0, 0)]);

    let mut icsk: Vec<M<'_>> = vec![("icsk_inet", inet, if o.shifted_icsk { 64 } else { 0 }, 0)];
    let f = ICSK_FIELDS * 8;
    icsk.extend_from_slice(&[
        ("icsk_rto", t_u32, f, 0),
        ("icsk_ca_state", u8_, f + 32, 5),
        ("icsk_ca_initialized", u8_, f + 37, 1),
        ("icsk_retransmits", u8_, f + 40, 0),
        ("icsk_pending", u8_, f + 48, 0),
        ("icsk_backoff", u8_, f + 56, 0),
        ("icsk_probes_out", u8_, f + 64, 0),
        ("icsk_user_timeout", t_u32, f + 96, 0),
    ]);
    if o.kgen != Gen::V6_19 {
        icsk.push(("icsk_retransmit_timer", timer, ICSK_TIMER * 8, 0));
    }
    if matches!(o.kgen, Gen::V6_12 | Gen::V6_19) {
        // "tcp: introduce icsk->icsk_keepalive_timer" (6.19, carried by
        // Debian's 6.1.192 and 6.12.118): keepalive off sk_timer.
        let ku = w.union_(
            "",
            40,
            &[
                ("icsk_keepalive_timer", timer, 0, 0),
                ("mptcp_tout_timer", timer, 0, 0),
            ],
        );
        icsk.push(("", ku, ICSK_KEEPALIVE_TIMER * 8, 0));
    }
    if matches!(o.kgen, Gen::V6_1 | Gen::V6_12) {
        icsk.push(("icsk_timeout", ulong, f + 128, 0));
    } else {
        icsk.push(("icsk_rto_max", t_u32, f + 192, 0));
    }
    let icsk = w.struct_("inet_connection_sock", 1200, &icsk);

    let t = TP_FIELDS * 8;
    let snd_wnd = if o.bad_snd_wnd {
        w.array(u8_, u32_, 3)
    } else {
        t_u32
    };
    let mut tp: Vec<M<'_>> = vec![
        ("inet_conn", icsk, 0, 0),
        ("snd_una", t_u32, t, 0),
        ("snd_nxt", t_u32, t + 32, 0),
        ("snd_wnd", snd_wnd, t + 64, 0),
        ("packets_out", t_u32, t + 96, 0),
        ("retrans_out", t_u32, t + 128, 0),
        ("total_retrans", t_u32, t + 160, 0),
        ("lsndtime", t_u32, t + 192, 0),
        ("rcv_tstamp", t_u32, t + 224, 0),
        ("is_sack_reneg", u8_, t + 256, 1),
    ];
    if !o.drop_retrans_stamp {
        tp.push(("retrans_stamp", t_u32, t + 288, 0));
    }
    if o.kgen != Gen::V6_1 {
        // Bit 2 of byte TP_FIELDS + 33.
        tp.push(("tcp_usec_ts", u8_, t + 266, 1));
    }
    w.struct_("tcp_sock", 2000, &tp);

    let ns = w.struct_(
        "ns_common",
        80,
        &[("stashed", ulong, 0, 0), ("inum", u32_, 192, 0)],
    );
    let sysctl = if o.kgen == Gen::V6_1 { int } else { t_u8 };
    let ss = if o.kgen == Gen::V6_1 { 32 } else { 8 };
    let mut ipv4: Vec<M<'_>> = vec![
        ("sysctl_tcp_retries1", sysctl, 4000, 0),
        ("sysctl_tcp_retries2", sysctl, 4000 + ss, 0),
        ("sysctl_tcp_orphan_retries", sysctl, 4000 + 2 * ss, 0),
    ];
    if matches!(o.kgen, Gen::V6_18 | Gen::V6_19) {
        ipv4.push(("sysctl_tcp_rto_max_ms", int, 4800, 0));
    }
    let netns_ipv4 = w.struct_("netns_ipv4", 1024, &ipv4);
    w.struct_(
        "net",
        4288,
        &[("ns", ns, 0, 0), ("ipv4", netns_ipv4, 8000, 0)],
    );
    w.build()
}

fn btf_of(o: &Opts) -> Btf {
    match Btf::from_bytes(synthetic_kernel(o)) {
        Ok(b) => b,
        Err(e) => panic!("synthetic kernel: {e}"),
    }
}

fn ok(btf: &Btf, release: &str) -> ResolvedLayout {
    match resolve(btf, release) {
        Ok(r) => r,
        Err(e) => panic!("{release}: {e}"),
    }
}

fn spec(offset: u32, size: u16) -> FieldSpec {
    FieldSpec {
        offset,
        size,
        bit_shift: 0,
        bit_len: 0,
    }
}

/// The span the probe-read write-timer paths copy in one read covers
/// every socket field that is read (and no more than the scratch
/// buffer). Mutation: `sock_span` taking `offset` without `+ size`
/// fails ("TP_RETRANS_STAMP ends past the span 1436").
#[test]
fn sock_span_covers_every_socket_field() {
    for kgen in [Gen::V6_1, Gen::V6_12, Gen::V6_18, Gen::V6_19] {
        let r = ok(&btf_of(&Opts::new(kgen)), "synthetic");
        let span = r.sock_span();
        assert!(span > 0 && span <= tcpstall_common::SOCK_SCRATCH_BYTES);
        for row in r.rows() {
            if row.def.base != Base::Sock || row.def.access == Access::OffsetOnly {
                continue;
            }
            let end = row.spec.offset + u32::from(row.spec.size);
            assert!(end <= span, "{} ends past the span {span}", row.def.id);
        }
    }
}

#[test]
fn synthetic_generations() {
    for kgen in [Gen::V6_1, Gen::V6_12, Gen::V6_18, Gen::V6_19] {
        let r = ok(&btf_of(&Opts::new(kgen)), "synthetic");
        let l = r.layout();
        assert_eq!(l.tcp_write_timer_addr, 0);
        assert_eq!((l.flags, l.ringbuf_wake_bytes), (0, 0));
        assert_eq!(l.fields[field::SKC_DADDR], spec(0, 4));
        assert_eq!(l.fields[field::SKC_RCV_SADDR], spec(4, 4));
        assert_eq!(l.fields[field::SKC_DPORT], spec(12, 2));
        assert_eq!(l.fields[field::SKC_NUM], spec(14, 2));
        assert_eq!(l.fields[field::SKC_FAMILY], spec(16, 2));
        assert_eq!(l.fields[field::SKC_STATE], spec(18, 1));
        assert_eq!(l.fields[field::SKC_NET], spec(48, 8));
        assert_eq!(l.fields[field::SKC_V6_DADDR], spec(56, 16));
        assert_eq!(l.fields[field::SKC_V6_RCV_SADDR], spec(72, 16));
        assert_eq!(l.fields[field::SKC_COOKIE], spec(88, 8));
        assert_eq!(l.fields[field::SK_ERR], spec(150, 4));
        if kgen == Gen::V6_1 {
            assert_eq!(l.fields[field::SK_FLAGS], spec(160, 8));
            assert_eq!(r.matched(field::SK_FLAGS), Some(1));
        } else {
            assert_eq!(l.fields[field::SK_FLAGS], spec(96, 8));
            assert_eq!(r.matched(field::SK_FLAGS), Some(0));
        }
        assert_eq!(l.fields[field::NET_NS_INUM], spec(24, 4));
        let f = ICSK_FIELDS;
        assert_eq!(l.fields[field::ICSK_RTO], spec(f, 4));
        assert_eq!(l.fields[field::ICSK_RETRANSMITS], spec(f + 5, 1));
        assert_eq!(l.fields[field::ICSK_PENDING], spec(f + 6, 1));
        assert_eq!(l.fields[field::ICSK_BACKOFF], spec(f + 7, 1));
        assert_eq!(l.fields[field::ICSK_PROBES_OUT], spec(f + 8, 1));
        assert_eq!(l.fields[field::ICSK_USER_TIMEOUT], spec(f + 12, 4));
        // 5-bit bitfield at bit 32 of the icsk block.
        assert_eq!(
            l.fields[field::ICSK_CA_STATE],
            FieldSpec {
                offset: f + 4,
                size: 1,
                bit_shift: 0,
                bit_len: 5
            }
        );
        // The synthetic kernel has no cgroup data: optional, absent.
        assert!(!r.has(field::SK_CGROUP));
        assert!(!r.has(field::KERNFS_NODE_ID));
        let t = TP_FIELDS;
        assert_eq!(l.fields[field::TP_SND_UNA], spec(t, 4));
        assert_eq!(l.fields[field::TP_SND_WND], spec(t + 8, 4));
        assert_eq!(l.fields[field::TP_PACKETS_OUT], spec(t + 12, 4));
        assert_eq!(l.fields[field::TP_RETRANS_OUT], spec(t + 16, 4));
        assert_eq!(l.fields[field::TP_TOTAL_RETRANS], spec(t + 20, 4));
        assert_eq!(l.fields[field::TP_LSNDTIME], spec(t + 24, 4));
        assert_eq!(l.fields[field::TP_RCV_TSTAMP], spec(t + 28, 4));
        assert_eq!(l.fields[field::TP_RETRANS_STAMP], spec(t + 36, 4));
        assert_eq!(l.fields[field::TIMER_FUNCTION], spec(24, 8));
        let proto = if kgen == Gen::V6_1 {
            FieldSpec {
                offset: 164,
                size: 2,
                bit_shift: 4,
                bit_len: 8,
            }
        } else {
            spec(164, 2)
        };
        assert_eq!(l.fields[field::SK_PROTOCOL], proto);
        let exp = l.fields[field::ICSK_TIMER_EXPIRES];
        let wt = l.fields[field::WRITE_TIMER];
        assert_eq!(wt.size, 8, "offset-only marker");
        match kgen {
            Gen::V6_1 | Gen::V6_12 => {
                assert_eq!(r.matched(field::ICSK_TIMER_EXPIRES), Some(0));
                assert_eq!(exp, spec(f + 16, 8));
                assert_eq!(r.matched(field::WRITE_TIMER), Some(0));
                assert_eq!(wt.offset, ICSK_TIMER);
                assert!(!r.has(field::ICSK_RTO_MAX));
                assert!(!r.has(field::NET_TCP_RTO_MAX_MS));
            }
            Gen::V6_18 => {
                assert_eq!(r.matched(field::ICSK_TIMER_EXPIRES), Some(1));
                assert_eq!(exp, spec(ICSK_TIMER + 16, 8));
                assert_eq!(wt.offset, ICSK_TIMER);
                assert_eq!(l.fields[field::ICSK_RTO_MAX], spec(f + 24, 4));
                assert_eq!(l.fields[field::NET_TCP_RTO_MAX_MS], spec(1600, 4));
            }
            Gen::V6_19 => {
                assert_eq!(r.matched(field::ICSK_TIMER_EXPIRES), Some(2));
                assert_eq!(r.matched(field::WRITE_TIMER), Some(1));
                assert_eq!(exp, spec(SK_TIMER + 16, 8));
                assert_eq!(wt.offset, SK_TIMER);
                assert!(r.has(field::ICSK_RTO_MAX));
                let row = r.row(field::ICSK_TIMER_EXPIRES);
                assert_eq!(row.map(|r| r.tried.len()), Some(2));
                assert_eq!(
                    row.and_then(ResolvedRow::source).as_deref(),
                    Some("sock.tcp_retransmit_timer.expires")
                );
            }
        }
        // The keepalive timer: the dedicated icsk member where it exists.
        let (ka, ka_source) = if matches!(kgen, Gen::V6_12 | Gen::V6_19) {
            (
                ICSK_KEEPALIVE_TIMER,
                "inet_connection_sock.icsk_keepalive_timer",
            )
        } else {
            (SK_TIMER, "sock.sk_timer")
        };
        assert_eq!(l.fields[field::SK_TIMER].offset, ka, "{kgen:?}");
        assert_eq!(
            l.fields[field::SK_TIMER_EXPIRES],
            spec(ka + 16, 8),
            "{kgen:?}"
        );
        assert_eq!(
            r.row(field::SK_TIMER)
                .and_then(ResolvedRow::source)
                .as_deref(),
            Some(ka_source),
            "{kgen:?}"
        );
        // Timer-based expiry is the write timer's `expires`.
        if r.matched(field::ICSK_TIMER_EXPIRES) != Some(0) {
            assert_eq!(exp.offset, wt.offset + 16);
        }
        if kgen == Gen::V6_1 {
            assert_eq!(l.fields[field::NET_TCP_RETRIES2], spec(1504, 4));
            assert_eq!(l.fields[field::NET_TCP_ORPHAN_RETRIES], spec(1508, 4));
            assert!(!r.has(field::TP_USEC_TS));
        } else {
            assert_eq!(l.fields[field::NET_TCP_RETRIES2], spec(1501, 1));
            assert_eq!(l.fields[field::NET_TCP_ORPHAN_RETRIES], spec(1502, 1));
            // 1-bit bitfield at bit 2 of byte TP_FIELDS + 33.
            assert_eq!(
                l.fields[field::TP_USEC_TS],
                FieldSpec {
                    offset: t + 33,
                    size: 1,
                    bit_shift: 2,
                    bit_len: 1
                }
            );
            assert!(r.has(field::TP_USEC_TS));
        }
    }
}

#[test]
fn optional_fields_absent() {
    let mut o = Opts::new(Gen::V6_12);
    o.ipv6 = false;
    o.net_ns = false;
    let r = ok(&btf_of(&o), "6.12-noipv6");
    for i in [field::SKC_V6_DADDR, field::SKC_V6_RCV_SADDR, field::SKC_NET] {
        assert!(!r.has(i), "{}", field_name(i));
        assert_eq!(r.spec(i), FieldSpec::ABSENT);
        assert_eq!(r.layout().fields[i].size, 0);
        assert_eq!(r.row(i).map(|row| row.tried.len()), Some(1));
    }
    assert!(r.has(field::NET_NS_INUM));
    let text = r.to_string();
    assert!(text.contains("absent (optional)"), "{text}");
    assert!(!r.has(field::COUNT));
    assert_eq!(r.spec(field::COUNT + 5), FieldSpec::ABSENT);
}

#[test]
fn missing_required_field_message() {
    let mut o = Opts::new(Gen::V6_18);
    o.drop_retrans_stamp = true;
    let err = resolve(&btf_of(&o), "6.18.44").err();
    let Some(LayoutError::MissingField {
        field,
        tried,
        kernel,
        ..
    }) = &err
    else {
        panic!("expected MissingField, got {err:?}");
    };
    assert_eq!(
        (*field, kernel.as_str()),
        ("tcp_sock.retrans_stamp", "6.18.44")
    );
    assert_eq!(
        tried,
        &vec!["tcp_sock.retrans_stamp: no member retrans_stamp".to_owned()]
    );
    let msg = err.map(|e| e.to_string()).unwrap_or_default();
    assert_eq!(
        msg,
        "kernel 6.18.44 has no tcp_sock.retrans_stamp (tried tcp_sock.retrans_stamp: \
         no member retrans_stamp): tcpstall cannot read retransmission timing on this kernel"
    );
    assert!(!msg.contains('\n'));
}

#[test]
fn missing_struct_lists_every_candidate() {
    // A BTF with none of the structs at all.
    let mut w = BtfWriter::new();
    w.int("int", 4, INT_SIGNED);
    let btf = Btf::from_bytes(w.build()).ok();
    let err = btf.map(|b| resolve(&b, "5.4.0").map(|_| ()));
    let Some(Err(LayoutError::MissingField { field, tried, .. })) = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*field, "sock_common.skc_family");
    assert_eq!(
        tried,
        &vec!["sock.__sk_common.skc_family: no such struct".to_owned()]
    );

    // Timer expiry with all three candidates failing.
    let blob = synthetic_kernel(&Opts::new(Gen::V6_19));
    // Rename sock's "tcp_retransmit_timer" by corrupting its string.
    let needle = b"tcp_retransmit_timer\0";
    let mut blob2 = blob.clone();
    if let Some(pos) = blob2.windows(needle.len()).position(|w| w == needle) {
        blob2[pos] = b'X';
    }
    let btf = Btf::from_bytes(blob2).ok();
    let msg = btf
        .and_then(|b| resolve(&b, "6.19.1").err())
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert_eq!(
        msg,
        "kernel 6.19.1 has no retransmit timer expiry (tried \
         inet_connection_sock.icsk_timeout: no member icsk_timeout, \
         inet_connection_sock.icsk_retransmit_timer.expires: no member icsk_retransmit_timer, \
         sock.tcp_retransmit_timer.expires: no member tcp_retransmit_timer): \
         tcpstall cannot predict when the retransmit timer fires on this kernel"
    );
}

#[test]
fn bad_size_names_the_field() {
    let mut o = Opts::new(Gen::V6_12);
    o.bad_snd_wnd = true;
    let err = resolve(&btf_of(&o), "6.12.9").err();
    assert!(
        matches!(
            &err,
            Some(LayoutError::BadSize {
                field: "tcp_sock.snd_wnd",
                size: 3,
                ipv6: false,
                ..
            })
        ),
        "{err:?}"
    );
    let msg = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("tcp_sock.snd_wnd") && msg.contains("6.12.9"),
        "{msg}"
    );
}

#[test]
fn struct_must_start_with_sock() {
    let mut o = Opts::new(Gen::V6_12);
    o.shifted_icsk = true;
    let err = resolve(&btf_of(&o), "x").err();
    assert!(
        matches!(
            err,
            Some(LayoutError::NotSockPrefixed {
                outer: "inet_connection_sock",
                offset: 8,
                ..
            })
        ),
        "{err:?}"
    );
}

#[test]
fn bitfield_windows() {
    let bf = |off, bits| bitfield_spec(off, bits);
    // 1 bit at bit 11705 (tcp_usec_ts on 6.18): byte 1463, bit 1.
    assert_eq!(
        bf(11705, 1),
        Some(FieldSpec {
            offset: 1463,
            size: 1,
            bit_shift: 1,
            bit_len: 1
        })
    );
    assert_eq!(
        bf(3, 5),
        Some(FieldSpec {
            offset: 0,
            size: 1,
            bit_shift: 3,
            bit_len: 5
        })
    );
    // Crosses a byte: widen to an aligned u16.
    assert_eq!(
        bf(6, 4),
        Some(FieldSpec {
            offset: 0,
            size: 2,
            bit_shift: 6,
            bit_len: 4
        })
    );
    // Crosses a u16 boundary at byte 1-2: aligned u32 at 0.
    assert_eq!(
        bf(12, 8),
        Some(FieldSpec {
            offset: 0,
            size: 4,
            bit_shift: 12,
            bit_len: 8
        })
    );
    // Crosses byte 3-4: aligned u64.
    assert_eq!(
        bf(28, 8),
        Some(FieldSpec {
            offset: 0,
            size: 8,
            bit_shift: 28,
            bit_len: 8
        })
    );
    assert_eq!(
        bf(64 + 28, 8),
        Some(FieldSpec {
            offset: 8,
            size: 8,
            bit_shift: 28,
            bit_len: 8
        })
    );
    // Crosses an 8-byte boundary: impossible.
    assert_eq!(bf(60, 8), None);
    assert_eq!(bf(0, 0), None);
    assert_eq!(bf(0, 65), None);
    // A bitfield filling its window is a plain read.
    assert_eq!(bf(16, 16), Some(spec(2, 2)));
    assert_eq!(bf(0, 64), Some(spec(0, 8)));
    // Windows never exceed 64 bits and bit_len < 64.
    for off in 0..128u32 {
        for bits in 1..=64u32 {
            if let Some(s) = bf(off, bits) {
                assert!(u32::from(s.bit_shift) + u32::from(s.bit_len) <= u32::from(s.size) * 8);
                assert_eq!(s.offset % u32::from(s.size), 0);
                assert!(s.bit_len < 64);
                if s.bit_len == 0 {
                    assert_eq!((off, bits), (s.offset * 8, u32::from(s.size) * 8));
                } else {
                    assert_eq!(s.offset * 8 + u32::from(s.bit_shift), off);
                }
            }
        }
    }
}

/// Extracting a bitfield the way the eBPF side will.
#[test]
fn bitfield_extraction_roundtrip() {
    let mut mem = [0u8; 16];
    // Write value 0b101 (3 bits) at bit 13.
    let val: u64 = 0b101;
    let (off, bits) = (13u32, 3u32);
    let word = u64::from_le_bytes(mem[..8].try_into().unwrap_or_default()) | (val << off);
    mem[..8].copy_from_slice(&word.to_le_bytes());
    let s = bitfield_spec(off, bits).unwrap_or_default();
    let start = s.offset as usize;
    let mut buf = [0u8; 8];
    buf[..usize::from(s.size)].copy_from_slice(&mem[start..start + usize::from(s.size)]);
    let v = u64::from_le_bytes(buf);
    assert_eq!((v >> s.bit_shift) & ((1u64 << s.bit_len) - 1), val);
}

#[test]
fn field_names_and_table() {
    assert_eq!(field_name(field::TP_USEC_TS), "TP_USEC_TS");
    assert_eq!(field_name(field::COUNT), "?");
    for (i, d) in FIELDS.iter().enumerate() {
        assert_eq!(d.index, i);
        assert!(!d.name.is_empty() && !d.purpose.is_empty() && !d.id.is_empty());
    }
    let required: Vec<_> = FIELDS
        .iter()
        .filter(|d| d.required)
        .map(|d| d.index)
        .collect();
    for i in [
        field::SKC_FAMILY,
        field::SKC_STATE,
        field::SKC_DADDR,
        field::SKC_RCV_SADDR,
        field::SKC_DPORT,
        field::SKC_NUM,
        field::SKC_COOKIE,
        field::ICSK_RETRANSMITS,
        field::ICSK_BACKOFF,
        field::ICSK_PENDING,
        field::ICSK_RTO,
        field::ICSK_USER_TIMEOUT,
        field::ICSK_TIMER_EXPIRES,
        field::TP_RETRANS_STAMP,
        field::TP_SND_UNA,
        field::TP_SND_WND,
        field::TP_PACKETS_OUT,
        field::WRITE_TIMER,
        field::TIMER_FUNCTION,
        field::SK_ERR,
    ] {
        assert!(required.contains(&i), "{} must be required", field_name(i));
    }
    for i in [
        field::SKC_V6_DADDR,
        field::SKC_NET,
        field::ICSK_RTO_MAX,
        field::TP_USEC_TS,
        field::NET_TCP_RTO_MAX_MS,
        field::TP_RETRANS_OUT,
        field::ICSK_CA_STATE,
        field::SK_CGROUP,
        field::CGROUP_KN,
        field::KERNFS_NODE_ID,
    ] {
        assert!(!required.contains(&i), "{} must be optional", field_name(i));
    }
}

// ---- real kernels -------------------------------------------------------

fn release_of_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// `(major, minor)` from a release like `6.1.0-31-amd64`.
fn version_of(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// Sanity checks valid for any kernel.
fn check_sane(btf: &Btf, r: &ResolvedLayout, release: &str) {
    for row in r.rows() {
        let d = row.def;
        if d.required {
            assert!(row.is_present(), "{release}: {} missing", d.id);
        }
        let Some(i) = row.matched else {
            assert!(!row.is_present());
            continue;
        };
        let (outer, _) = d.candidates[i];
        let outer_size = btf.struct_size(outer).unwrap_or(0);
        let end = row.spec.offset + u32::from(row.spec.size);
        let limit = if d.access == Access::OffsetOnly {
            // The timer_list itself must fit.
            row.spec.offset + btf.struct_size("timer_list").unwrap_or(u32::MAX)
        } else {
            end
        };
        assert!(
            limit <= outer_size && end <= outer_size,
            "{release}: {} ends at {limit}, beyond {outer} ({outer_size} bytes)",
            d.id
        );
        assert!(
            matches!(row.spec.size, 1 | 2 | 4 | 8 | 16),
            "{release}: {}",
            d.id
        );
        if row.spec.size == 16 {
            assert_eq!(d.access, Access::Ipv6Addr);
        }
    }
    let sock = btf.struct_size("sock").unwrap_or(0);
    // Fields living in struct sock itself are within it.
    for i in [
        field::SKC_FAMILY,
        field::SKC_COOKIE,
        field::SK_FLAGS,
        field::SK_ERR,
    ] {
        let s = r.spec(i);
        assert!(
            s.offset + u32::from(s.size) <= sock,
            "{release}: {}",
            field_name(i)
        );
    }
    let expected = version_of(release).map(|v| match v {
        v if v <= (6, 14) => 0,
        v if v <= (6, 18) => 1,
        _ => 2,
    });
    if let Some(want) = expected {
        assert_eq!(
            r.matched(field::ICSK_TIMER_EXPIRES),
            Some(want),
            "{release}: wrong ICSK_TIMER_EXPIRES candidate\n{r}"
        );
        assert_eq!(
            r.matched(field::WRITE_TIMER),
            Some(usize::from(want == 2)),
            "{release}: wrong WRITE_TIMER candidate"
        );
        assert_eq!(
            r.has(field::ICSK_RTO_MAX),
            want >= 1,
            "{release}: icsk_rto_max"
        );
        if let Some(v) = version_of(release) {
            if v >= (6, 8) {
                assert!(r.has(field::TP_USEC_TS), "{release}: tcp_usec_ts");
            }
            // (6.6.y got some 6.7 TCP backports; be conservative.)
            if v < (6, 6) {
                assert!(!r.has(field::TP_USEC_TS), "{release}: tcp_usec_ts");
            }
        }
    }
    let exp = r.spec(field::ICSK_TIMER_EXPIRES);
    let wt = r.spec(field::WRITE_TIMER);
    if r.matched(field::ICSK_TIMER_EXPIRES) != Some(0) {
        let timer_expires = btf
            .member("timer_list", "expires")
            .map(|m| m.offset_bits / 8);
        assert_eq!(
            Ok(exp.offset.wrapping_sub(wt.offset)),
            timer_expires.map_err(|e| e.to_string())
        );
    }
    assert_eq!(exp.size, 8, "{release}: expires is an unsigned long");
    assert_eq!(r.spec(field::TIMER_FUNCTION).size, 8);
    let text = r.to_string();
    assert_eq!(text.lines().count(), field::COUNT + 2, "{text}");
}

/// Minimal parser of `bpftool btf dump ... format raw`, as an independent
/// oracle: `[id] KIND 'name' k=v ...` lines followed by tab-indented
/// member lines `'name' type_id=N bits_offset=N [bitfield_size=N]`.
struct RawDump {
    kinds: std::collections::HashMap<u32, (String, String, u32)>,
    members: std::collections::HashMap<u32, Vec<(String, u32, u32, u32)>>,
    by_name: std::collections::HashMap<String, u32>,
}

fn kv(line: &str, key: &str) -> Option<u32> {
    line.split_whitespace().find_map(|w| {
        w.strip_prefix(key)?
            .strip_prefix('=')?
            .trim_end_matches(',')
            .parse()
            .ok()
    })
}

impl RawDump {
    fn parse(text: &str) -> Self {
        let mut d = RawDump {
            kinds: Default::default(),
            members: Default::default(),
            by_name: Default::default(),
        };
        let mut cur = 0;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix('[') {
                let Some((id, rest)) = rest.split_once("] ") else {
                    continue;
                };
                let Ok(id) = id.parse() else { continue };
                let mut parts = rest.splitn(2, ' ');
                let kind = parts.next().unwrap_or_default().to_owned();
                let rest = parts.next().unwrap_or_default();
                let name = rest.split('\'').nth(1).unwrap_or_default().to_owned();
                let ty = kv(rest, "type_id").unwrap_or(0);
                if kind == "STRUCT" || kind == "UNION" {
                    d.by_name.entry(name.clone()).or_insert(id);
                }
                d.kinds.insert(id, (kind, name, ty));
                cur = id;
            } else if let Some(m) = line.strip_prefix('\t') {
                let name = m.split('\'').nth(1).unwrap_or_default().to_owned();
                let (Some(ty), Some(off)) = (kv(m, "type_id"), kv(m, "bits_offset")) else {
                    continue;
                };
                let bf = kv(m, "bitfield_size").unwrap_or(0);
                d.members.entry(cur).or_default().push((name, ty, off, bf));
            }
        }
        d
    }

    fn skip(&self, mut id: u32) -> u32 {
        for _ in 0..64 {
            match self.kinds.get(&id) {
                Some((k, _, ty))
                    if matches!(
                        k.as_str(),
                        "TYPEDEF" | "CONST" | "VOLATILE" | "RESTRICT" | "TYPE_TAG"
                    ) =>
                {
                    id = *ty
                }
                _ => break,
            }
        }
        id
    }

    fn find(&self, id: u32, name: &str) -> Option<(u32, u32, u32)> {
        for (mname, ty, off, bf) in self.members.get(&id)? {
            if mname == "(anon)" {
                if let Some((o, t, b)) = self.find(self.skip(*ty), name) {
                    return Some((o + off, t, b));
                }
            } else if mname == name {
                return Some((*off, *ty, *bf));
            }
        }
        None
    }

    /// (bit offset, bitfield size) of a dotted path.
    fn member(&self, outer: &str, path: &str) -> Option<(u32, u32)> {
        let mut id = *self.by_name.get(outer)?;
        let mut total = 0;
        let mut bits = 0;
        for part in path.split('.') {
            let (off, ty, bf) = self.find(id, part)?;
            total += off;
            bits = bf;
            id = self.skip(ty);
        }
        Some((total, bits))
    }
}

/// The running kernel's BTF: must exist (failing, not skipping, if not).
#[test]
fn host_kernel_layout() {
    assert!(
        Path::new(SYS_VMLINUX).exists(),
        "{SYS_VMLINUX} is missing: tcpstall needs a kernel with CONFIG_DEBUG_INFO_BTF=y, \
         and this test must run on one"
    );
    let release = release_of_host();
    let start = Instant::now();
    let btf = match Btf::from_sys_fs() {
        Ok(b) => b,
        Err(e) => panic!("{SYS_VMLINUX}: {e}"),
    };
    let parsed = start.elapsed();
    let r = ok(&btf, &release);
    let total = start.elapsed();
    println!("{r}");
    println!(
        "parse {:.2} ms, parse + resolve {} fields {:.2} ms ({} types)",
        parsed.as_secs_f64() * 1e3,
        field::COUNT,
        total.as_secs_f64() * 1e3,
        btf.type_count()
    );
    check_sane(&btf, &r, &release);

    // Facts about this very host, checked against bpftool by hand.
    if release == "6.18.44-fc-v769" {
        let l = r.layout();
        assert_eq!(l.fields[field::ICSK_RETRANSMITS], spec(1249, 1));
        assert_eq!(l.fields[field::TP_RETRANS_STAMP], spec(2176, 4));
        assert_eq!(l.fields[field::ICSK_PENDING], spec(1250, 1));
        assert_eq!(l.fields[field::ICSK_BACKOFF], spec(1251, 1));
        assert_eq!(l.fields[field::ICSK_PROBES_OUT], spec(1253, 1));
        assert_eq!(l.fields[field::ICSK_RTO], spec(1184, 4));
        assert_eq!(l.fields[field::ICSK_RTO_MAX], spec(1192, 4));
        assert_eq!(l.fields[field::ICSK_USER_TIMEOUT], spec(1292, 4));
        assert_eq!(l.fields[field::WRITE_TIMER].offset, 1104);
        assert_eq!(l.fields[field::ICSK_TIMER_EXPIRES], spec(1120, 8));
        assert_eq!(l.fields[field::TP_SND_UNA], spec(1672, 4));
        assert_eq!(
            l.fields[field::TP_USEC_TS],
            FieldSpec {
                offset: 1463,
                size: 1,
                bit_shift: 1,
                bit_len: 1
            }
        );
        assert_eq!(l.fields[field::SKC_COOKIE], spec(88, 8));
        assert_eq!(l.fields[field::SKC_NET], spec(48, 8));
        assert_eq!(l.fields[field::SK_ERR], spec(284, 4));
        assert_eq!(
            l.fields[field::ICSK_CA_STATE],
            FieldSpec {
                offset: 1248,
                size: 1,
                bit_shift: 0,
                bit_len: 5
            }
        );
        assert_eq!(l.fields[field::SK_CGROUP], spec(672, 8));
        assert_eq!(l.fields[field::NET_TCP_RETRIES2], spec(768 + 581, 1));
        assert_eq!(l.fields[field::NET_TCP_ORPHAN_RETRIES], spec(768 + 582, 1));
        assert_eq!(l.fields[field::NET_TCP_RTO_MAX_MS], spec(768 + 600, 4));
        assert_eq!(l.fields[field::NET_NS_INUM], spec(152 + 24, 4));
        assert_eq!(l.fields[field::SK_FLAGS], spec(96, 8));
        assert_eq!(l.fields[field::TIMER_FUNCTION], spec(24, 8));
        assert_eq!(l.fields[field::SK_PROTOCOL], spec(532, 2));
    } else {
        println!("host kernel {release} is not 6.18.44-fc-v769: skipped the hard-coded offsets");
    }

    // Every resolved row against bpftool's own reading of the same BTF.
    let out = std::process::Command::new("bpftool")
        .args(["btf", "dump", "file", SYS_VMLINUX, "format", "raw"])
        .output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        other => panic!("bpftool btf dump failed (install bpftool): {other:?}"),
    };
    let dump = RawDump::parse(&String::from_utf8_lossy(&out.stdout));
    let mut compared = 0;
    for row in r.rows() {
        let Some(i) = row.matched else { continue };
        let (outer, path) = row.def.candidates[i];
        let want = dump.member(outer, path);
        let m = row.member.map(|m| (m.offset_bits, m.bitfield_bits));
        assert_eq!(
            m, want,
            "{}: {outer}.{path} differs from bpftool",
            row.def.id
        );
        compared += 1;
    }
    // A failed candidate must also be missing for bpftool.
    for row in r.rows() {
        let failed = &row.def.candidates[..row.matched.unwrap_or(row.def.candidates.len())];
        for &(outer, path) in failed {
            assert_eq!(dump.member(outer, path), None, "{outer}.{path}");
        }
    }
    println!("{compared} fields agree with bpftool");
    assert!(compared >= 30);
}

/// Extra kernels' BTF from `$TCPSTALL_TEST_BTF_DIR/*.btf`, named by
/// kernel release (`6.1.0-31-amd64.btf`). `cargo xtask test` extracts the
/// matrix kernels' BTF, sets the variable and runs this test; a plain
/// `cargo test` reports it as ignored. Run without the variable, or with a
/// directory that is missing or empty, it fails.
#[test]
#[ignore = "needs TCPSTALL_TEST_BTF_DIR (cargo xtask test sets it)"]
fn extra_kernels_from_env_dir() {
    let Some(dir) = std::env::var_os("TCPSTALL_TEST_BTF_DIR") else {
        panic!(
            "TCPSTALL_TEST_BTF_DIR is not set: point it at a directory of <release>.btf files \
             (cargo xtask test extracts them to .cache/btf)"
        );
    };
    let dir = Path::new(&dir);
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => panic!("TCPSTALL_TEST_BTF_DIR={}: {e}", dir.display()),
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "btf"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "TCPSTALL_TEST_BTF_DIR={} contains no *.btf files",
        dir.display()
    );
    for path in &files {
        let release = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let btf = match Btf::from_file(path) {
            Ok(b) => b,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        let r = match resolve(&btf, &release) {
            Ok(r) => r,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        check_sane(&btf, &r, &release);
        println!("{r}");
    }
    println!("checked {} extra kernels in {}", files.len(), dir.display());
}
