//! Unit tests (and property tests) of the horizon predictor against the
//! kernel's timer arithmetic.

use super::*;
use proptest::prelude::*;

const HZ: u32 = 250;

fn secs(ms: u64) -> f64 {
    ms as f64 / 1_000.0
}

#[test]
fn design_note_table() {
    let t = |n| secs(model_timeout_ms(n, TCP_RTO_MIN_MS, TCP_RTO_MAX_MS));
    assert_eq!(t(15), 924.6);
    assert_eq!(t(8), 102.2);
    assert_eq!(t(5), 12.6);
    assert_eq!(t(3), 3.0);
    // K = ilog2(600) = 9: the linear part starts after N = 9.
    assert_eq!(t(9), 204.6);
    assert_eq!(t(10), 204.6 + 120.0);
    assert_eq!(t(0), 0.2);
}

#[test]
fn rto_max_other_than_120s() {
    // 60 s: K = ilog2(300) = 8.
    assert_eq!(model_timeout_ms(15, 200, 60_000), 511 * 200 + 7 * 60_000);
    assert_eq!(model_timeout_ms(8, 200, 60_000), 102_200);
    assert_eq!(model_timeout_ms(5, 200, 60_000), 12_600);
    // 5 s: K = ilog2(25) = 4.
    assert_eq!(model_timeout_ms(15, 200, 5_000), 31 * 200 + 11 * 5_000);
    assert_eq!(model_timeout_ms(4, 200, 5_000), 6_200);
    assert_eq!(model_timeout_ms(5, 200, 5_000), 6_200 + 5_000);
    // Degenerate max below base: K = 0.
    assert_eq!(model_timeout_ms(3, 200, 100), 200 + 3 * 100);
}

#[test]
fn syn_base_one_second() {
    // SYN states: base TCP_TIMEOUT_INIT, K = ilog2(120) = 6.
    assert_eq!(
        model_timeout_ms(6, TCP_TIMEOUT_INIT_MS, TCP_RTO_MAX_MS),
        127_000
    );
    assert_eq!(
        model_timeout_ms(5, TCP_TIMEOUT_INIT_MS, TCP_RTO_MAX_MS),
        63_000
    );
    assert_eq!(
        model_timeout_ms(8, TCP_TIMEOUT_INIT_MS, TCP_RTO_MAX_MS),
        127_000 + 2 * 120_000
    );
}

#[test]
fn rule_selection_and_sources() {
    let s = NetnsSysctls {
        tcp_retries2: 5,
        tcp_orphan_retries: 0,
        tcp_rto_max_ms: None,
        ..Default::default()
    };
    assert_eq!(
        BoundaryRule::select(0, false, false, Some(s)),
        Some(BoundaryRule::Retries2 { n: 5 })
    );
    assert_eq!(
        BoundaryRule::select(4000, false, false, Some(s)),
        Some(BoundaryRule::UserTimeout { ms: 4000 })
    );
    assert_eq!(
        BoundaryRule::select(4000, true, false, None),
        Some(BoundaryRule::UserTimeout { ms: 4000 })
    );
    assert_eq!(
        BoundaryRule::select(0, true, false, Some(s)),
        Some(BoundaryRule::Orphan {
            configured: 0,
            soft_error: false,
        })
    );
    assert_eq!(BoundaryRule::select(0, false, false, None), None);

    let b = BoundaryRule::Retries2 { n: 5 }.at(200, TCP_RTO_MAX_MS, TCP_RTO_MIN_MS);
    assert_eq!(b.ms, 12_600);
    assert_eq!(b.source.to_string(), "tcp_retries2=5");
    assert_eq!(b.source.kind(), "tcp_retries2");
    let b = BoundaryRule::UserTimeout { ms: 9000 }.at(200, TCP_RTO_MAX_MS, TCP_RTO_MIN_MS);
    assert_eq!(
        (b.ms, b.source.to_string()),
        (9000, "user_timeout".to_string())
    );
    assert_eq!(
        serde_json::to_string(&BoundarySource::OrphanRetries(8)).unwrap(),
        "\"tcp_orphan_retries=8\""
    );
}

#[test]
fn orphan_semantics() {
    let rule = BoundaryRule::Orphan {
        configured: 0,
        soft_error: false,
    };
    // Alive (rto below max): 0 means 8.
    let b = rule.at(3_200, TCP_RTO_MAX_MS, TCP_RTO_MIN_MS);
    assert_eq!(
        (b.ms, b.source),
        (102_200, BoundarySource::OrphanRetries(8))
    );
    // RTO at its maximum: 0 really is 0 -> T = 200 ms.
    let b = rule.at(TCP_RTO_MAX_MS, TCP_RTO_MAX_MS, TCP_RTO_MIN_MS);
    assert_eq!((b.ms, b.source), (200, BoundarySource::OrphanRetries(0)));
    // A configured value is used as is.
    let b = BoundaryRule::Orphan {
        configured: 3,
        soft_error: false,
    }
    .at(200, TCP_RTO_MAX_MS, TCP_RTO_MIN_MS);
    assert_eq!((b.ms, b.source), (3_000, BoundarySource::OrphanRetries(3)));
    assert_eq!(effective_orphan_retries(0, true, false), 8);
    assert_eq!(effective_orphan_retries(0, false, false), 0);
    assert_eq!(effective_orphan_retries(2, true, false), 2);
    // `sk->sk_err_soft && !alive`: 0, whatever is configured.
    assert_eq!(effective_orphan_retries(3, false, true), 0);
    assert_eq!(effective_orphan_retries(3, true, true), 3);
    assert_eq!(effective_orphan_retries(0, true, true), 8);
    let soft = BoundaryRule::Orphan {
        configured: 3,
        soft_error: true,
    };
    let b = soft.at(TCP_RTO_MAX_MS, TCP_RTO_MAX_MS, TCP_RTO_MIN_MS);
    assert_eq!((b.ms, b.source), (200, BoundarySource::OrphanRetries(0)));
    let b = soft.at(400, TCP_RTO_MAX_MS, TCP_RTO_MIN_MS);
    assert_eq!((b.ms, b.source), (3_000, BoundarySource::OrphanRetries(3)));
}

#[test]
fn rto_max_selection() {
    assert_eq!(rto_max_jiffies(15_000, Some(5_000), 250), 15_000);
    assert_eq!(rto_max_jiffies(0, Some(5_000), 250), 1_250);
    assert_eq!(rto_max_jiffies(0, None, 250), 30_000);
    assert_eq!(rto_max_jiffies(0, None, 1000), 120_000);
    assert_eq!(rto_max_jiffies(0, Some(0), 100), 12_000);
}

#[test]
fn conversions() {
    assert_eq!(msecs_to_jiffies(204, 250), 51);
    assert_eq!(msecs_to_jiffies(1, 250), 1);
    assert_eq!(msecs_to_jiffies(0, 250), 0);
    assert_eq!(jiffies_to_msecs(51, 250), 204);
    assert_eq!(jiffies_to_msecs(1, 300), 4);
    assert_eq!(jiffies_to_ns(51, 250), 204_000_000);
    assert_eq!(jiffies_to_ns(1, 300), 3_333_333);
}

#[test]
fn stamp_reconstruction_and_wrap() {
    let ts = 5_000_123_456_789u64; // 5000 s
    let stamp = (ts / NSEC_PER_MSEC - 1_500) as u32;
    assert_eq!(
        stamp_to_ns(stamp, false, ts),
        (ts / NSEC_PER_MSEC - 1_500) * NSEC_PER_MSEC
    );
    // The u32 of milliseconds wraps every 49.7 days.
    let ts = (1u64 << 32) * NSEC_PER_MSEC + 700 * NSEC_PER_MSEC;
    let start_ms = (1u64 << 32) - 300; // before the wrap
    let stamp = start_ms as u32;
    assert_eq!(stamp, u32::MAX - 299);
    assert_eq!(stamp_to_ns(stamp, false, ts), start_ms * NSEC_PER_MSEC);
    // Microsecond stamps wrap every 71.6 minutes.
    let ts = 3 * (1u64 << 32) * 1_000 + 5_000_000;
    let start_us = 3 * (1u64 << 32) - 2_000_000;
    assert_eq!(stamp_to_ns(start_us as u32, true, ts), start_us * 1_000);
    // A stamp slightly in the future (noise) is clamped to the event.
    let ts = 10 * NSEC_PER_SEC;
    assert_eq!(stamp_to_ns(10_002, false, ts), ts);
}

#[test]
fn timer_wheel_rounding() {
    // Level 0: one jiffy late.
    assert_eq!(timer_wheel_fire(1_051, 1_000, 250), 1_052);
    // Level 1 (63..504 jiffies ahead): granularity 8.
    assert_eq!(timer_wheel_fire(1_102, 1_000, 250), 1_104);
    assert_eq!(timer_wheel_fire(1_104, 1_000, 250), 1_112);
    // Level 2 (504..4032): granularity 64.
    assert_eq!(timer_wheel_fire(1_000 + 816, 1_000, 250), 1_856);
    // A 120 s timer at HZ=1000 is in level 4 (granularity 4096 jiffies).
    let fire = timer_wheel_fire(1_000_000 + 120_000, 1_000_000, 1000);
    assert_eq!(fire % 4096, 0);
    assert!(fire > 1_120_000 && fire <= 1_120_000 + 4096);
    // Already expired: fires at the wheel's clock.
    assert_eq!(timer_wheel_fire(5, 10, 250), 10);
}

#[test]
fn persist_intervals() {
    assert_eq!(persist_next_interval_ms(204, 0, TCP_RTO_MAX_MS), 408);
    assert_eq!(persist_next_interval_ms(100, 0, TCP_RTO_MAX_MS), 400);
    assert_eq!(persist_next_interval_ms(204, 5, TCP_RTO_MAX_MS), 204 << 6);
    assert_eq!(
        persist_next_interval_ms(204, 20, TCP_RTO_MAX_MS),
        TCP_RTO_MAX_MS
    );
    assert_eq!(persist_next_interval_ms(200, 7, 60_000), 51_200);
    assert_eq!(persist_next_interval_ms(200, 9, 60_000), 60_000);
}

#[test]
fn persist_prediction_only_with_user_timeout() {
    assert_eq!(predict_persist_death(1_000, 5_000, 0), None);
    let s = NSEC_PER_SEC;
    assert_eq!(predict_persist_death(s, 3 * s, 10_000), Some(11 * s));
    // Past the deadline: this probe kills.
    assert_eq!(predict_persist_death(s, 12 * s, 10_000), Some(12 * s));
}

fn walk(start_ns: u64, at_ns: u64, retransmits: u32, rto: u32, rule: BoundaryRule) -> RtoWalk {
    RtoWalk {
        start_ns,
        at_ns,
        at_jiffies: 0,
        retransmits,
        rto_jiffies: rto,
        rto_max_jiffies: 30_000,
        hz: HZ,
        rule,
        base_ms: TCP_RTO_MIN_MS,
        timer_wheel: false,
        syn: None,
    }
}

const MS: u64 = NSEC_PER_MSEC;

#[test]
fn walk_without_wheel_retries2_5() {
    // First RTO at 204 ms after the first retransmission (t = 0), rto 51.
    // Expiries: 0.204, 0.612, 1.428, 3.060, 6.324, 12.852 (>= 12.6).
    let start = 1_000 * NSEC_PER_SEC;
    let w = walk(
        start,
        start + 204 * MS,
        1,
        51,
        BoundaryRule::Retries2 { n: 5 },
    );
    let d = predict_rto_death(&w).unwrap();
    assert_eq!(d.at_ns - start, 12_852 * MS);
    assert_eq!(d.expiries_after, 5);
    assert_eq!(d.boundary.source, BoundarySource::Retries2(5));
    // The same from a later expiry.
    let w = walk(
        start,
        start + 3_060 * MS,
        4,
        408,
        BoundaryRule::Retries2 { n: 5 },
    );
    assert_eq!(predict_rto_death(&w).unwrap().at_ns - start, 12_852 * MS);
}

#[test]
fn first_rto_with_zero_retransmits_cannot_kill() {
    // UTO already exceeded, but icsk_retransmits == 0 at this expiry:
    // the socket survives it and dies at the next one (clamped to 1
    // jiffy since the user timeout has passed).
    let start = 50 * NSEC_PER_SEC;
    let w = walk(
        start,
        start + 5_000 * MS,
        0,
        51,
        BoundaryRule::UserTimeout { ms: 1_000 },
    );
    let d = predict_rto_death(&w).unwrap();
    assert_eq!(d.expiries_after, 1);
    assert_eq!(d.at_ns, start + 5_000 * MS + 4 * MS);
    let w = walk(
        start,
        start + 5_000 * MS,
        1,
        51,
        BoundaryRule::UserTimeout { ms: 1_000 },
    );
    assert_eq!(predict_rto_death(&w).unwrap().at_ns, start + 5_000 * MS);
}

#[test]
fn user_timeout_shorter_than_retries2() {
    // UTO 4000 ms with rto 51 jiffies: expiries 0.204, 0.612, 1.428,
    // 3.060; the next (6.324) is clamped to exactly start + 4.000.
    let start = 10 * NSEC_PER_SEC;
    let w = walk(
        start,
        start + 204 * MS,
        0,
        51,
        BoundaryRule::UserTimeout { ms: 4_000 },
    );
    let d = predict_rto_death(&w).unwrap();
    assert_eq!(d.at_ns - start, 4_000 * MS);
    assert_eq!(d.boundary.source, BoundarySource::UserTimeout);
    assert_eq!(d.expiries_after, 4);
    // And shorter than retries2 = 15 by far.
    let r = predict_rto_death(&walk(
        start,
        start + 204 * MS,
        0,
        51,
        BoundaryRule::Retries2 { n: 15 },
    ))
    .unwrap();
    assert!(r.at_ns > d.at_ns);
}

#[test]
fn user_timeout_longer_than_retries2() {
    // UTO 200 s > T(5) = 12.6 s: the socket lives until 200 s, with the
    // last expiry clamped to exactly start + 200 s.
    let start = 10 * NSEC_PER_SEC;
    let w = walk(
        start,
        start + 204 * MS,
        0,
        51,
        BoundaryRule::UserTimeout { ms: 200_000 },
    );
    let d = predict_rto_death(&w).unwrap();
    assert_eq!(d.at_ns - start, 200_000 * MS);
    let r = predict_rto_death(&walk(
        start,
        start + 204 * MS,
        0,
        51,
        BoundaryRule::Retries2 { n: 5 },
    ))
    .unwrap();
    assert!(d.at_ns > r.at_ns);
}

#[test]
fn user_timeout_reached_exactly_by_an_unclamped_expiry() {
    // UTO 3060 ms hits an expiry exactly: no extra step.
    let start = 10 * NSEC_PER_SEC;
    let w = walk(
        start,
        start + 204 * MS,
        0,
        51,
        BoundaryRule::UserTimeout { ms: 3_060 },
    );
    assert_eq!(predict_rto_death(&w).unwrap().at_ns - start, 3_060 * MS);
}

#[test]
fn retries2_15_and_rto_max() {
    // From a 200 ms RTO: expiries at 0.2 * (2^k - 1) s up to rto_max,
    // then every 120 s. T = 924.6 s; the fatal expiry is the first at or
    // after it.
    let start = 100 * NSEC_PER_SEC;
    let mut w = walk(
        start,
        start + 200 * MS,
        0,
        50,
        BoundaryRule::Retries2 { n: 15 },
    );
    let d = predict_rto_death(&w).unwrap();
    // Expiries from the first retransmission at t=0 (rto 200 ms at the
    // first expiry): 0.2, 0.6, 1.4, ..., 102.2, 204.6, 324.6, ... 924.6.
    assert_eq!(d.at_ns - start, 924_600 * MS);
    // rto_max 60 s (icsk_rto_max = 15000 jiffies): T = 522.2 s.
    w.rto_max_jiffies = 15_000;
    let d = predict_rto_death(&w).unwrap();
    assert_eq!(d.boundary.ms, 522_200);
    assert_eq!(d.at_ns - start, 522_200 * MS);
    // rto_max 5 s: T = 61.2 s; expiries 0.2..6.2 then every 5 s.
    w.rto_max_jiffies = 1_250;
    let d = predict_rto_death(&w).unwrap();
    assert_eq!(d.boundary.ms, 61_200);
    assert_eq!(d.at_ns - start, 61_200 * MS);
}

#[test]
fn orphan_walk() {
    // Orphan, tcp_orphan_retries = 0, rto 200 ms: N = 8 while alive,
    // T = 102.2 s; the expiry at 102.2 s has rto 51.2 s < max: dies
    // there (elapsed measured from the first retransmission).
    let start = 100 * NSEC_PER_SEC;
    let w = walk(
        start,
        start + 200 * MS,
        0,
        50,
        BoundaryRule::Orphan {
            configured: 0,
            soft_error: false,
        },
    );
    let d = predict_rto_death(&w).unwrap();
    assert_eq!(d.at_ns - start, 102_200 * MS);
    assert_eq!(d.boundary.source, BoundarySource::OrphanRetries(8));
    // With the RTO already at rto_max (not alive): 0 retries, 200 ms.
    let w = walk(
        start,
        start + 400_000 * MS,
        3,
        30_000,
        BoundaryRule::Orphan {
            configured: 0,
            soft_error: false,
        },
    );
    let d = predict_rto_death(&w).unwrap();
    assert_eq!((d.at_ns - start, d.expiries_after), (400_000 * MS, 0));
    assert_eq!(d.boundary.source, BoundarySource::OrphanRetries(0));
}

/// The orphan scenarios' rules with literal numbers (HZ 250, no wheel),
/// from the first retransmission (`retrans_stamp`, an expiry with
/// `icsk_retransmits` 0 and `icsk_rto` 200 ms). `tcp_orphan_retries` 3:
/// T(3) = 3.0 s; expiries 0, 0.4, 1.2, 2.8 (< 3.0), 6.0: dies at 6.0 s.
/// `tcp_orphan_retries` 0 with `tcp_rto_max_ms` 1000: while `icsk_rto` <
/// 1 s the socket is alive and 0 means 8 (T(8) = 7 * 0.2 + 6 * 1 = 7.4 s);
/// at the expiry whose `icsk_rto` is 1 s it is not (0 retries, T = 0.2 s):
/// expiries 0 (rto 200), 0.4 (400), 1.2 (800), 2.2 (1000): dies at 2.2 s.
#[test]
fn orphan_scenarios_literal() {
    let start = 10 * NSEC_PER_SEC;
    let rule = |configured| BoundaryRule::Orphan {
        configured,
        soft_error: false,
    };
    let d = predict_rto_death(&walk(start, start, 0, 50, rule(3))).unwrap();
    assert_eq!((d.at_ns - start, d.expiries_after), (6_000 * MS, 4));
    assert_eq!(d.boundary.source, BoundarySource::OrphanRetries(3));
    let mut w = walk(start, start, 0, 50, rule(0));
    w.rto_max_jiffies = 250;
    let d = predict_rto_death(&w).unwrap();
    assert_eq!((d.at_ns - start, d.expiries_after), (2_200 * MS, 3));
    assert_eq!(d.boundary.source, BoundarySource::OrphanRetries(0));
    assert_eq!(rule(0).at(800, 1_000, TCP_RTO_MIN_MS).ms, 7_400);
}

#[test]
fn s1_tlp_first_with_timer_wheel_lands_near_observed() {
    // Seen here: HZ=250, retries2=5, blackholed peer: ETIMEDOUT 13.35 s
    // after the first send; the first retransmission is a TLP about
    // 200 ms after the send (retrans_stamp), then RTOs with rto 51 ->
    // 1632 jiffies; the first RTO has icsk_retransmits == 0.
    let hz = 250;
    let j_send: u64 = 4_295_000_123; // arbitrary absolute jiffies
    let ts_send = 700 * NSEC_PER_SEC;
    let to_ns = |j: u64| ts_send + jiffies_to_ns(j - j_send, hz);
    // TLP armed for 200 ms (50 jiffies), fires one jiffy late.
    let j_tlp = timer_wheel_fire(j_send + 50, j_send, hz);
    // The RTO armed after the TLP: rto 51 jiffies.
    let j_rto1 = timer_wheel_fire(j_tlp + 51, j_tlp + 1, hz);
    let w = RtoWalk {
        start_ns: to_ns(j_tlp) / NSEC_PER_MSEC * NSEC_PER_MSEC,
        at_ns: to_ns(j_rto1),
        at_jiffies: j_rto1,
        retransmits: 0,
        rto_jiffies: 51,
        rto_max_jiffies: 30_000,
        hz,
        rule: BoundaryRule::Retries2 { n: 5 },
        base_ms: TCP_RTO_MIN_MS,
        timer_wheel: true,
        syn: None,
    };
    let d = predict_rto_death(&w).unwrap();
    assert_eq!(d.expiries_after, 5);
    let from_send = (d.at_ns - ts_send) as f64 / 1e9;
    assert!(
        (from_send - 13.35).abs() < 0.3,
        "predicted {from_send} s after the send"
    );
    // Without the wheel the prediction is the nominal 13.05 s.
    let nominal = predict_rto_death(&RtoWalk {
        timer_wheel: false,
        syn: None,
        ..w
    })
    .unwrap();
    let nominal_s = (nominal.at_ns - ts_send) as f64 / 1e9;
    assert!((nominal_s - 13.06).abs() < 0.02, "{nominal_s}");
    assert!(d.at_ns > nominal.at_ns);
}

/// The boundary case: a user timeout clamps the last RTO to exactly
/// `LVL_START(1)` = 63 jiffies, armed at a jiffy where `j + 63` is a
/// level-1 bucket boundary. The kernel re-arms from the callback with
/// the wheel's clock at j + 1 (delta 62: level 0) and fires at j + 64;
/// a model taking the clock as j puts it in level 1 and fires at j + 71,
/// 28 ms late at HZ 250.
/// Mutation: `rearmed_timer_fire` with `callback` instead of
/// `callback.saturating_add(1)` fails with `left: 1000072, right:
/// 1000065` (fires at j + 71, not j + 64); the kernel simulation of
/// `engine::tests::prop_blackhole_prediction_exact` fails with it too.
#[test]
fn clamped_rto_on_a_level_boundary_fires_like_the_kernel() {
    let start = 10 * NSEC_PER_SEC;
    let j: u64 = 1_000_001; // j + 63 = 1_000_064, a multiple of 8
    assert_eq!((j + 63) % 8, 0);
    let w = RtoWalk {
        start_ns: start,
        at_ns: start + 3_060 * MS,
        at_jiffies: j,
        retransmits: 4,
        rto_jiffies: 408,
        rto_max_jiffies: 30_000,
        hz: HZ,
        // 252 ms left at this expiry: msecs_to_jiffies = 63.
        rule: BoundaryRule::UserTimeout { ms: 3_312 },
        base_ms: TCP_RTO_MIN_MS,
        timer_wheel: true,
        syn: None,
    };
    assert_eq!(msecs_to_jiffies(252, HZ), 63);
    assert_eq!(rearmed_timer_fire(j + 63, j, HZ), j + 64);
    let d = predict_rto_death(&w).unwrap();
    assert_eq!(d.expiries_after, 1);
    assert_eq!(d.at_ns - w.at_ns, 256 * MS);
    // One level up (504 = LVL_START(2)): level 1, not level 2.
    let j2: u64 = 2_000_000 - 504; // j2 + 504 is a multiple of 64
    assert_eq!(rearmed_timer_fire(j2 + 504, j2, HZ), j2 + 504 + 8);
    assert_eq!(timer_wheel_fire(j2 + 504, j2, HZ), j2 + 504 + 64);
}

#[test]
fn huge_user_timeout_terminates() {
    let start = 0;
    let w = walk(
        start,
        200 * MS,
        0,
        50,
        BoundaryRule::UserTimeout { ms: u32::MAX },
    );
    let d = predict_rto_death(&w).unwrap();
    // Clamped to start + UTO, rounded up to a whole jiffy (4 ms).
    assert_eq!(d.at_ns, (u64::from(u32::MAX) + 1) * MS);
    let mut w2 = w;
    w2.at_jiffies = 1 << 33;
    w2.timer_wheel = true;
    let d2 = predict_rto_death(&w2).unwrap();
    assert!(d2.at_ns >= u64::from(u32::MAX) * MS);
}

#[test]
fn no_rto_no_prediction() {
    assert_eq!(
        predict_rto_death(&walk(0, 1, 1, 0, BoundaryRule::Retries2 { n: 5 })),
        None
    );
}

/// Independent, step-by-step simulation of the kernel (no closed form).
fn naive(w: &RtoWalk) -> (u64, u64) {
    let max_ms = jiffies_to_msecs(w.rto_max_jiffies, w.hz);
    let (mut t, mut j, mut rto, mut r) = (
        w.at_ns,
        w.at_jiffies,
        u64::from(w.rto_jiffies),
        w.retransmits,
    );
    let mut prev = 0;
    let (t0, mut dj) = (t, 0u64);
    loop {
        let b = w.rule.at(jiffies_to_msecs(rto, w.hz), max_ms, w.base_ms);
        if r > 0 && t >= w.start_ns + b.ms * MS {
            return (t, prev);
        }
        prev = t;
        rto = (rto * 2).min(w.rto_max_jiffies);
        let mut iv = rto;
        if let BoundaryRule::UserTimeout { ms } = w.rule {
            let el = (t - w.start_ns) / MS;
            iv = if u64::from(ms) <= el {
                1
            } else {
                rto.min(msecs_to_jiffies(u64::from(ms) - el, w.hz))
            };
        }
        let dt = if w.timer_wheel {
            // Re-armed from the callback: the wheel's clock is j + 1.
            timer_wheel_fire(j + iv, j + 1, w.hz) - j
        } else {
            iv
        };
        dj += dt;
        t = t0 + jiffies_to_ns(dj, w.hz);
        j += dt;
        r += 1;
    }
}

fn arb_rule() -> impl Strategy<Value = BoundaryRule> {
    prop_oneof![
        (0u32..20).prop_map(|n| BoundaryRule::Retries2 { n }),
        (1u32..1_000_000).prop_map(|ms| BoundaryRule::UserTimeout { ms }),
        (0u32..10, any::<bool>()).prop_map(|(configured, soft_error)| BoundaryRule::Orphan {
            configured,
            soft_error,
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn prop_model_timeout_monotonic(n in 0u32..300, max_s in 1u64..600) {
        let max = max_s * 1000;
        prop_assert!(model_timeout_ms(n + 1, 200, max) > model_timeout_ms(n, 200, max));
        let k = (max / 200).max(1).ilog2();
        if n <= k {
            prop_assert_eq!(model_timeout_ms(n, 200, max), ((1u64 << (n + 1)) - 1) * 200);
        } else {
            prop_assert_eq!(model_timeout_ms(n + 1, 200, max) - model_timeout_ms(n, 200, max), max);
        }
    }

    #[test]
    fn prop_death_is_first_expiry_past_boundary(
        rule in arb_rule(),
        hz in prop::sample::select(vec![100u32, 250, 300, 1000]),
        rto_ms in 200u64..3_000,
        retransmits in 0u32..4,
        elapsed_ms in 0u64..5_000,
        max_s in prop::sample::select(vec![5u64, 60, 120]),
        wheel in any::<bool>(),
        j0 in 1u64..(1 << 40),
    ) {
        let start = 1_000 * NSEC_PER_SEC;
        let w = RtoWalk {
            start_ns: start,
            at_ns: start + elapsed_ms * MS,
            at_jiffies: j0,
            retransmits,
            rto_jiffies: msecs_to_jiffies(rto_ms, hz) as u32,
            rto_max_jiffies: max_s * u64::from(hz),
            hz,
            rule,
            base_ms: TCP_RTO_MIN_MS,
            timer_wheel: wheel,
            syn: None,
        };
        let d = predict_rto_death(&w).unwrap();
        let (expect, prev) = naive(&w);
        prop_assert_eq!(d.at_ns, expect);
        // At or after the boundary, and the previous expiry was before it
        // (or could not kill).
        let b = rule.at(jiffies_to_msecs(u64::from(w.rto_jiffies), hz), max_s * 1000, TCP_RTO_MIN_MS);
        if !matches!(rule, BoundaryRule::Orphan { .. }) {
            prop_assert!(d.at_ns >= start + b.ms * MS);
            if d.expiries_after > 0 && (retransmits > 0 || d.expiries_after > 1) {
                prop_assert!(prev < start + b.ms * MS);
            }
        }
        if let BoundaryRule::UserTimeout { ms } = rule {
            // The clamp makes the fatal expiry land within one wheel
            // granule (or a jiffy) of start + UTO, unless an earlier
            // expiry was already past it.
            if d.expiries_after > 0 && elapsed_ms < u64::from(ms) {
                let late = d.at_ns - (start + u64::from(ms) * MS);
                let slack = if wheel { 4096 + 2 } else { 2 };
                prop_assert!(late <= jiffies_to_ns(slack, hz), "late {}", late);
            }
        }
    }

    #[test]
    fn prop_stamp_roundtrip(start_ms in 0u64..(1u64 << 43), age_ms in 0u64..(1u64 << 31)) {
        let ts = (start_ms + age_ms) * MS + 123_456;
        prop_assert_eq!(stamp_to_ns(start_ms as u32, false, ts), start_ms * MS);
    }
}

// ----- SYN_SENT (connect) ----------------------------------------------------
//
// Expected values below are derived by hand from net/ipv4/tcp_timer.c, not
// from this module: `tcp_write_timeout()` in SYN_SENT declares the socket
// dead at the expiry that finds `icsk_retransmits >= retry_until + linear`
// (retry_until = `icsk_syn_retries ?: tcp_syn_retries`, linear =
// `tcp_syn_linear_timeouts`, 6.5+), or when `retransmits_timed_out()` holds:
// `icsk_retransmits > 0 && now - retrans_stamp >= (UTO ?: T(retry_until,
// tcp_timeout_init))`, `retrans_stamp` being the first SYN (`tcp_connect()`).
// `tcp_retransmit_timer()` doubles `icsk_rto` only once the expiry count
// (`icsk_backoff` / `total_rto` after its increment) exceeds `linear`.

const SYN_HZ: u32 = 1_000;

/// A walk from the first SYN RTO expiry (1 s after the SYN at 100 s),
/// jiffies = ms, no timer wheel.
fn first_syn_expiry(n: u32, linear: u32, uto_ms: u32) -> RtoWalk {
    let s = NetnsSysctls {
        tcp_syn_retries: n,
        tcp_syn_linear_timeouts: Some(linear),
        ..Default::default()
    };
    let (rule, syn) = syn_rule(uto_ms, 0, Some(s)).unwrap();
    RtoWalk {
        start_ns: 100 * NSEC_PER_SEC,
        at_ns: 101 * NSEC_PER_SEC,
        at_jiffies: 0,
        retransmits: 0,
        rto_jiffies: 1_000,
        rto_max_jiffies: 120_000,
        hz: SYN_HZ,
        rule,
        base_ms: 1_000,
        timer_wheel: false,
        syn: Some(syn),
    }
}

fn death_after_syn_s(w: &RtoWalk) -> (f64, u32) {
    let d = predict_rto_death(w).unwrap();
    (
        (d.at_ns - 100 * NSEC_PER_SEC) as f64 / 1e9,
        d.expiries_after,
    )
}

#[test]
fn syn_retries_4_with_linear_timeouts() {
    // Expiries 1 2 3 4 5 (RTO 1 s while the count <= 4), 7 11 19 35:
    // at 35 s the count is 8 = 4 + 4 (and 35 >= T(4, 1 s) = 31).
    assert_eq!(death_after_syn_s(&first_syn_expiry(4, 4, 0)), (35.0, 8));
}

#[test]
fn syn_retries_4_without_linear_timeouts() {
    // 6.1: expiries 1 3 7 15 31, the count is 4 at 31 s.
    let mut w = first_syn_expiry(4, 0, 0);
    w.syn = Some(SynLimits {
        max_retransmits: 4,
        linear: 0,
    });
    assert_eq!(death_after_syn_s(&w), (31.0, 4));
}

#[test]
fn syn_retries_default_6() {
    // With linear timeouts: 1 2 3 4 5 7 11 19 35 67 131, count 10 at 131 s
    // (what connect() to a blackhole takes on 6.5+, plus timer lateness).
    assert_eq!(death_after_syn_s(&first_syn_expiry(6, 4, 0)), (131.0, 10));
    // Without: 1 3 7 15 31 63 127, count 6 at 127 s = T(6, 1 s).
    assert_eq!(death_after_syn_s(&first_syn_expiry(6, 0, 0)), (127.0, 6));
}

#[test]
fn syn_time_rule_ends_linear_retries_early() {
    // tcp_syn_retries 1, linear 4: T(1, 1 s) = 3 s; expiries 1 2 3: at 3 s
    // the count is 2 < 5 but 3 s have passed since the SYN.
    let w = first_syn_expiry(1, 4, 0);
    let d = predict_rto_death(&w).unwrap();
    assert_eq!(d.boundary.ms, 3_000);
    assert_eq!(d.boundary.source, BoundarySource::SynRetries(1));
    assert_eq!(
        (
            (d.at_ns - 100 * NSEC_PER_SEC) / NSEC_PER_MSEC,
            d.expiries_after
        ),
        (3_000, 2)
    );
}

#[test]
fn syn_user_timeout_shortens_and_clamps() {
    // UTO 10 s, tcp_syn_retries 6, linear 4: expiries 1 2 3 4 5 7; the next
    // one (7 + 4) is clamped to 10 s (tcp_clamp_rto_to_user_timeout), where
    // 10 s >= UTO kills it.
    let w = first_syn_expiry(6, 4, 10_000);
    let d = predict_rto_death(&w).unwrap();
    assert_eq!(d.boundary.source, BoundarySource::UserTimeout);
    assert_eq!(
        (
            (d.at_ns - 100 * NSEC_PER_SEC) / NSEC_PER_MSEC,
            d.expiries_after
        ),
        (10_000, 6)
    );
    // A user timeout longer than the retries cannot lengthen them: UTO
    // 60 s, tcp_syn_retries 2, no linear: expiries 1 3 7, count 2 at 7 s.
    let w = first_syn_expiry(2, 0, 60_000);
    assert_eq!(death_after_syn_s(&w), (7.0, 2));
}

#[test]
fn syn_walk_through_the_timer_wheel() {
    // tcp_syn_retries 2, no linear, HZ 1000, the first expiry at jiffy
    // 2^20 (a bucket boundary of every level). Re-armed from the callback
    // with the wheel's clock at j + 1: 2000 jiffies -> delta 1999, level 2
    // (>= 504, < 4032), 64-jiffy buckets: fires at j + 2048; then 4000 ->
    // delta 3999, level 2: (j + 2048 + 4000) rounds up to j + 6080, where
    // the count is 2.
    let j = 1u64 << 20;
    let mut w = first_syn_expiry(2, 0, 0);
    w.syn = Some(SynLimits {
        max_retransmits: 2,
        linear: 0,
    });
    w.at_jiffies = j;
    w.timer_wheel = true;
    let d = predict_rto_death(&w).unwrap();
    assert_eq!((d.at_ns - 101 * NSEC_PER_SEC) / NSEC_PER_MSEC, 6_080);
    // Linear: tcp_syn_retries 1, linear 4 -> 1000-jiffy intervals round up
    // to 1024 (delta 999: level 2); the time rule T(1) = 3 s from the SYN
    // (1 s before j) holds at j + 2048 (3.048 s), the count (5) does not.
    let mut w = first_syn_expiry(1, 4, 0);
    w.at_jiffies = j;
    w.timer_wheel = true;
    let d = predict_rto_death(&w).unwrap();
    assert_eq!(
        (
            (d.at_ns - 101 * NSEC_PER_SEC) / NSEC_PER_MSEC,
            d.expiries_after
        ),
        (2_048, 2)
    );
}

#[test]
fn syn_rule_sources() {
    let s = NetnsSysctls {
        tcp_syn_retries: 6,
        tcp_syn_linear_timeouts: Some(4),
        ..Default::default()
    };
    // TCP_SYNCNT on the socket wins over the netns.
    assert_eq!(
        syn_rule(0, 3, Some(s)),
        Ok((
            BoundaryRule::Syn {
                n: 3,
                per_socket: true
            },
            SynLimits {
                max_retransmits: 7,
                linear: 4
            }
        ))
    );
    // A kernel without linear timeouts (no sysctl): none.
    let old = NetnsSysctls {
        tcp_syn_linear_timeouts: None,
        ..s
    };
    assert_eq!(
        syn_rule(0, 0, Some(old)).unwrap().1,
        SynLimits {
            max_retransmits: 6,
            linear: 0
        }
    );
    assert_eq!(
        syn_rule(5_000, 0, Some(s)).unwrap().0,
        BoundaryRule::UserTimeout { ms: 5_000 }
    );
    // Nothing readable: no prediction, with the reason.
    assert_eq!(syn_rule(0, 0, None), Err(NoPrediction::SynRetriesUnknown));
    assert_eq!(
        syn_rule(0, 0, Some(NetnsSysctls::default())),
        Err(NoPrediction::SynRetriesUnknown)
    );
    // Initial RTO back from icsk_rto: 4 s at the expiry with 6 retransmits
    // and 4 linear ones = 2 doublings; 8 s after 3 without linear.
    assert_eq!(syn_initial_rto(4_000, 6, 4, 120_000), Some(1_000));
    assert_eq!(syn_initial_rto(8_000, 3, 0, 120_000), Some(1_000));
    assert_eq!(syn_initial_rto(3_000, 2, 4, 120_000), Some(3_000));
    assert_eq!(syn_initial_rto(120_000, 9, 0, 120_000), None);
}

/// Unsent data probing at a high backoff with the default `rto_max`
/// (120 s): `tcp_probe0_when()` is `200 ms << backoff` capped at 120 s, so
/// from backoff 10 on (200 ms << 10 = 204.8 s) every interval is 120 s,
/// never a shorter power of two (200 ms << 9 = 102.4 s). Two probes left:
/// dead 240 s after this expiry.
#[test]
fn probe_walk_at_high_backoff_steps_at_rto_max() {
    let w = ProbeWalk {
        at_ns: 1_000_000_000,
        at_jiffies: 0,
        probes_out: 13,
        backoff: 12,
        rto_ms: 200,
        rto_max_ms: 120_000,
        limit: 15,
        backoff_cap: 15,
        hz: 1000,
        timer_wheel: false,
    };
    assert_eq!(
        predict_probe_count_death(&w),
        Some(1_000_000_000 + 240 * 1_000_000_000)
    );
}
