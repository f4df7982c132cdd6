//! Keepalive stalls against the kernel model (`kernel_model::keepalive`,
//! written from `tcp_keepalive_timer()`, sharing nothing with the engine):
//! listed from the expiry that finds the first probe unanswered, the death
//! predicted to the fatal expiry, ended when a probe is answered or the
//! timer goes quiet, seeded from a sweep snapshot.

use super::super::horizon::{BoundarySource, NoPrediction};
use super::super::kernel_model::keepalive::{KeepaliveExpiry, KeepaliveSock};
use super::super::testkit::{HZ, MS, S, Sock, T0, jiffies_at, ts_of_jiffies};
use super::super::{Engine, EngineConfig, StallClass};
use crate::kernel::event::{EventKind, KeepaliveFields, SockEvent, SockFields, TcpState};

fn engine() -> Engine {
    Engine::new(EngineConfig {
        hz: Some(HZ),
        ..EngineConfig::default()
    })
    .unwrap()
}

/// HZ jiffies of `s` seconds.
fn j(s: u32) -> u32 {
    s * HZ
}

/// The model socket: last receive at `T0`, SO_KEEPALIVE set then.
fn model(tp: (u32, u32, u32), net: (u32, u32, u32), uto: u32) -> KeepaliveSock {
    let j0 = jiffies_at(HZ, T0);
    KeepaliveSock {
        hz: u64::from(HZ),
        tp_time: tp.0,
        tp_intvl: tp.1,
        tp_probes: tp.2,
        net_time: net.0,
        net_intvl: net.1,
        net_probes: net.2,
        icsk_user_timeout: uto,
        lrcvtime: j0 as u32,
        rcv_tstamp: j0 as u32,
        icsk_probes_out: 0,
        timer_expires: j0 + u64::from(if tp.0 != 0 { tp.0 } else { net.0 }),
        armed_at: j0,
    }
}

fn expiries(m: KeepaliveSock) -> Vec<KeepaliveExpiry> {
    let x = m.run(|j| ts_of_jiffies(HZ, j), 100);
    assert!(
        x.last().is_some_and(|e| e.fatal),
        "the model never dies: {x:?}"
    );
    x
}

/// The fields a keepalive-timer event carries for the model socket.
fn fields(m: &KeepaliveSock, probes_out: u32, timer_expires: u64) -> SockFields {
    let s = Sock::new(1);
    let mut f = s.fields(0, 0, 0, T0);
    f.probes_out = probes_out;
    f.user_timeout_ms = m.icsk_user_timeout;
    f.rcv_tstamp = m.rcv_tstamp;
    f.keepalive = KeepaliveFields {
        keepopen: true,
        time_j: m.tp_time,
        intvl_j: m.tp_intvl,
        probes: m.tp_probes,
        netns: Some((m.net_time, m.net_intvl, m.net_probes)),
        lrcvtime: m.lrcvtime,
        timer_expires: timer_expires as u32,
    };
    f
}

fn timer_event(s: &Sock, m: &KeepaliveSock, x: &KeepaliveExpiry) -> SockEvent {
    let mut ev = s.base(EventKind::KeepaliveTimer, x.ts_ns);
    ev.jiffies = x.jiffies;
    ev.packets_out = 0;
    ev.sock = Some(fields(m, x.probes_out, x.jiffies));
    ev
}

/// Feeds every expiry before the fatal one; checks the listing and the
/// prediction after each: not listed while no probe is out, then listed
/// as `keepalive` with the fatal expiry's instant (1 ms) and `source`.
fn run_to_death(m: KeepaliveSock, source: BoundarySource) -> (Engine, Vec<KeepaliveExpiry>) {
    let s = Sock::new(40);
    let x = expiries(m);
    let death = x.last().unwrap().ts_ns;
    let mut e = engine();
    for k in &x[..x.len() - 1] {
        e.ingest(&timer_event(&s, &m, k));
        let v = e.stalls(k.ts_ns + MS);
        if k.probes_out == 0 {
            assert!(
                v.is_empty(),
                "listed before any probe went unanswered: {v:?}"
            );
            continue;
        }
        assert_eq!(v.len(), 1, "at {k:?}");
        assert_eq!(v[0].class, StallClass::Keepalive);
        assert_eq!(v[0].boundary_source, Some(source));
        let p = v[0].predicted_timeout_ns.expect("a prediction");
        assert!(
            p.abs_diff(death) <= MS,
            "predicted {p}, the model dies at {death} ({:+} ms); expiries {x:?}",
            (p as i128 - death as i128) / MS as i128
        );
    }
    (e, x)
}

/// TCP_KEEPIDLE 3 s, TCP_KEEPINTVL 2 s, TCP_KEEPCNT 4: probes at 3, 5, 7,
/// 9 s, the expiry at ~11 s finds 4 out and kills (plus the timer wheel's
/// rounding: the model's own).
#[test]
fn per_socket_keepalive_is_listed_and_dies_as_predicted() {
    let m = model((j(3), j(2), 4), (j(7_200), j(75), 9), 0);
    let (_, x) = run_to_death(m, BoundarySource::KeepCnt(4));
    assert_eq!(x.len(), 5);
    let after_s = (x[4].ts_ns - T0) as f64 / 1e9;
    assert!((11.0..11.3).contains(&after_s), "{after_s}");
}

/// Nothing set on the socket: the namespace's 3 s / 2 s / 3 probes.
#[test]
fn netns_keepalive_sysctls_are_the_fallback() {
    let m = model((0, 0, 0), (j(3), j(2), 3), 0);
    let (_, x) = run_to_death(m, BoundarySource::KeepaliveProbes(3));
    assert_eq!(x.len(), 4);
}

/// TCP_USER_TIMEOUT 6 s takes over: the expiry at ~7 s finds 7 s since the
/// last receive and a probe out (TCP_KEEPCNT 4 would wait until ~11 s).
#[test]
fn user_timeout_takes_over_keepalive() {
    let m = model((j(3), j(2), 4), (0, 0, 0), 6_000);
    let (_, x) = run_to_death(m, BoundarySource::UserTimeout);
    assert_eq!(x.len(), 3);
    let after_s = (x[2].ts_ns - T0) as f64 / 1e9;
    assert!((7.0..7.3).contains(&after_s), "{after_s}");
}

/// An answered probe (the next expiry finds `icsk_probes_out` 0 again)
/// ends the stall at once; a timer that goes quiet ends it after its grace.
#[test]
fn answered_or_quiet_keepalive_is_no_longer_listed() {
    let m = model((j(3), j(2), 4), (0, 0, 0), 0);
    let x = expiries(m);
    let s = Sock::new(41);
    let mut e = engine();
    e.ingest(&timer_event(&s, &m, &x[0]));
    e.ingest(&timer_event(&s, &m, &x[1]));
    assert_eq!(e.stalls(x[1].ts_ns + MS).len(), 1);
    let answered = KeepaliveExpiry {
        probes_out: 0,
        ..x[2]
    };
    e.ingest(&timer_event(&s, &m, &answered));
    assert!(e.stalls(x[2].ts_ns + MS).is_empty());
    // Listed again at the next unanswered probe, then the timer is quiet.
    e.ingest(&timer_event(&s, &m, &x[3]));
    assert_eq!(e.stalls(x[3].ts_ns + MS).len(), 1);
    let quiet = x[3].ts_ns + 30 * S;
    e.tick(quiet);
    assert!(e.stalls(quiet).is_empty());
}

/// Data in flight: the keepalive timer only re-arms (the write timer owns
/// the socket); nothing is listed.
#[test]
fn keepalive_timer_with_data_in_flight_is_not_a_keepalive_stall() {
    let m = model((j(3), j(2), 4), (0, 0, 0), 0);
    let x = expiries(m);
    let s = Sock::new(42);
    let mut e = engine();
    let mut ev = timer_event(&s, &m, &x[1]);
    ev.packets_out = 2;
    e.ingest(&ev);
    assert!(e.stalls(x[1].ts_ns + MS).is_empty());
    let mut ev = timer_event(&s, &m, &x[2]);
    ev.state = TcpState::FinWait2;
    e.ingest(&ev);
    assert!(e.stalls(x[2].ts_ns + MS).is_empty());
}

/// A sweep snapshot between two expiries (the timer pending at the next
/// one) is listed and predicted like a watched socket.
#[test]
fn sweep_seeds_a_keepalive_stall_with_its_prediction() {
    let m = model((j(3), j(2), 4), (0, 0, 0), 0);
    let x = expiries(m);
    let death = x.last().unwrap().ts_ns;
    let s = Sock::new(43);
    let mut e = engine();
    // Between the second and third expiries: two probes out, the timer
    // armed (unrounded) for the second expiry + intvl.
    let at = x[2].ts_ns - 700 * MS;
    let mut snap = s.base(EventKind::Sweep, at);
    snap.packets_out = 0;
    snap.sock = Some(fields(&m, 2, x[1].jiffies + u64::from(j(2))));
    e.ingest(&snap);
    let v = e.stalls(at + MS);
    assert_eq!(v.len(), 1, "not seeded");
    assert_eq!(v[0].class, StallClass::Keepalive);
    let p = v[0].predicted_timeout_ns.expect("a prediction");
    assert!(
        p.abs_diff(death) <= MS,
        "seeded prediction {p}, the model dies at {death}; expiries {x:?}"
    );
}

/// Neither the socket nor its namespace gave a keepalive time: listed,
/// no prediction, and why.
#[test]
fn unknown_keepalive_settings_give_no_prediction_and_say_why() {
    let m = model((j(3), j(2), 4), (0, 0, 0), 0);
    let x = expiries(m);
    let unknown = KeepaliveSock {
        tp_time: 0,
        tp_intvl: 0,
        tp_probes: 0,
        ..m
    };
    let s = Sock::new(44);
    let mut e = engine();
    e.ingest(&timer_event(&s, &unknown, &x[1]));
    let v = e.stalls(x[1].ts_ns + MS);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].predicted_timeout_ns, None);
    assert_eq!(
        v[0].no_prediction_reason,
        Some(NoPrediction::KeepaliveUnknown)
    );
}

/// A sweep snapshot of `m` at `at` with the probes out then and the timer
/// pending at `timer_expires` (unrounded, as armed).
fn keepalive_snapshot(
    s: &Sock,
    m: &KeepaliveSock,
    at: u64,
    probes_out: u32,
    timer_expires: u64,
) -> SockEvent {
    let mut snap = s.base(EventKind::Sweep, at);
    snap.mechanism = crate::kernel::event::Mechanism::Sweep;
    snap.packets_out = 0;
    snap.sock = Some(fields(m, probes_out, timer_expires));
    snap
}

fn seeded_prediction(snap: &SockEvent) -> u64 {
    let mut e = engine();
    e.ingest(snap);
    let v = e.stalls(snap.ts_ns + MS);
    assert_eq!(v.len(), 1, "not seeded");
    assert_eq!(v[0].class, StallClass::Keepalive);
    v[0].predicted_timeout_ns.expect("a prediction")
}

/// Survivors of the mutation run in `seed.rs` `seed_keepalive` (see
/// `docs/testing.md`): the pending expiry is rounded by the timer wheel as
/// armed one keepalive interval earlier, the socket's own interval
/// (`keepalive_intvl_when()`: `tp->keepalive_intvl ?:` the netns's), so
/// `ka.intvl_j != 0` -> `==` is caught with a 75 s interval (wheel level 3,
/// 2.048 s buckets at HZ 250) from either source; a timer whose expiry
/// already passed (`ahead > i32::MAX` -> `==`) fires now, not in 2^32
/// jiffies; and with a user timeout the death depends on the time since
/// the last receive at each expiry (`elapsed + (next_j - jiffies)`: `-` ->
/// `+`, `/`).
#[test]
fn sweep_seeded_keepalive_matches_the_model_per_interval_source_and_timer() {
    let cases: [(&str, KeepaliveSock, usize); 4] = [
        (
            "socket interval 75 s",
            model((j(3), j(75), 4), (0, 0, 0), 0),
            1,
        ),
        (
            "netns interval 75 s",
            model((j(3), 0, 4), (0, j(75), 0), 0),
            1,
        ),
        (
            "user timeout 9 s",
            model((j(3), j(2), 9), (0, 0, 0), 9_000),
            1,
        ),
        (
            "user timeout 9 s, later",
            model((j(3), j(2), 9), (0, 0, 0), 9_000),
            2,
        ),
    ];
    for (what, m, k) in cases {
        let x = expiries(m);
        let death = x.last().unwrap().ts_ns;
        let intvl = u64::from(if m.tp_intvl != 0 {
            m.tp_intvl
        } else {
            m.net_intvl
        });
        let armed = x[k].jiffies + intvl;
        let s = Sock::new(45);
        let at = x[k + 1].ts_ns - 700 * MS;
        assert!(at > x[k].ts_ns, "{what}: the snapshot between two expiries");
        let p = seeded_prediction(&keepalive_snapshot(&s, &m, at, x[k + 1].probes_out, armed));
        assert!(
            p.abs_diff(death) <= MS,
            "{what}: seeded prediction {p}, the model dies at {death} ({:+} ms); expiries {x:?}",
            (p as i128 - death as i128) / MS as i128
        );
        // The same socket swept after its timer's (unrounded) expiry
        // passed, before the wheel's bucket fired it.
        let late_j = armed + 1;
        if late_j < x[k + 1].jiffies {
            let late = keepalive_snapshot(
                &s,
                &m,
                ts_of_jiffies(HZ, late_j),
                x[k + 1].probes_out,
                armed,
            );
            let p = seeded_prediction(&late);
            assert!(
                p.abs_diff(death) <= MS,
                "{what}, timer overdue: seeded prediction {p}, the model dies at {death} ({:+} ms)",
                (p as i128 - death as i128) / MS as i128
            );
        }
    }
}
