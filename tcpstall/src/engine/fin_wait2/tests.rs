//! Orphaned FIN_WAIT2 timeouts against the kernel model
//! (`kernel_model::fin_wait2`, written from `tcp_rcv_state_process()`,
//! `tcp_fin_time()`, `tcp_time_wait()` and the timer wheel, sharing
//! nothing with the engine): listed once the timeout ran `fin_wait2_after`
//! without the peer's FIN, the end predicted at the timewait timer's bucket
//! expiry, the full socket's CLOSE (the handover) not ending the flow, the
//! peer's FIN ending it silently, the expiry counted as a timeout.

use super::super::horizon::BoundarySource;
use super::super::kernel_model::fin_wait2::{FinWait2Fate, FinWait2Sock, peer_fin, timer_runs_at};
use super::super::testkit::{HZ, MS, S, Sock, T0, jiffies_at, ts_of_jiffies};
use super::super::{Engine, EngineConfig, Observation, StallClass, TimeoutEvidence};
use crate::kernel::event::{EventKind, FinTimeFields, SockEvent, TcpState, TwTimer};

fn engine() -> Engine {
    Engine::new(EngineConfig {
        hz: Some(HZ),
        ..EngineConfig::default()
    })
    .unwrap()
}

fn hz() -> u64 {
    u64::from(HZ)
}

/// The model's orphan: RTO 204 ms (51 jiffies at HZ 250).
fn model(linger2_s: i64, fin_timeout_s: u64) -> FinWait2Sock {
    FinWait2Sock {
        hz: hz(),
        linger2: linger2_s * hz() as i64,
        net_fin_timeout: fin_timeout_s * hz(),
        icsk_rto: 51,
    }
}

/// The timewait timer's start as the programs report it, at jiffy `now`.
fn start(s: &Sock, now: u64, substate: TcpState, expires: u64, bucket: u64, ft: u64) -> SockEvent {
    let mut ev = s.base(EventKind::TwTimerStart, ts_of_jiffies(HZ, now));
    ev.jiffies = now;
    ev.state = substate;
    ev.sock = None;
    ev.netns_sysctls = None;
    ev.tw = Some(TwTimer {
        bucket_expiry: bucket,
        expires,
        netns_fin_timeout_j: Some(ft),
    });
    ev
}

fn expire(s: &Sock, at: u64, substate: TcpState) -> SockEvent {
    let mut ev = s.base(EventKind::TwTimerExpire, ts_of_jiffies(HZ, at));
    ev.jiffies = at;
    ev.state = substate;
    ev.sock = None;
    ev.netns_sysctls = None;
    ev.tw = Some(TwTimer {
        bucket_expiry: at,
        expires: at,
        netns_fin_timeout_j: None,
    });
    ev
}

/// The orphan's start at `T0` under `m`: (event, the jiffy its timer runs).
fn timewait_start(s: &Sock, m: &FinWait2Sock) -> (SockEvent, u64) {
    let now = jiffies_at(HZ, T0);
    let FinWait2Fate::Timewait {
        expires, bucket, ..
    } = m.ack_of_fin(now)
    else {
        panic!("the model keeps a timewait socket: {m:?}");
    };
    (
        start(
            s,
            now,
            TcpState::FinWait2,
            expires,
            bucket,
            m.net_fin_timeout,
        ),
        bucket,
    )
}

fn timeouts(e: &mut Engine) -> Vec<Observation> {
    e.drain_observations()
        .filter(|o| matches!(o, Observation::Timeout { .. }))
        .collect()
}

/// `tcp_fin_timeout` 5 s: not listed before `fin_wait2_after` (1 s), then
/// listed as `fin_wait2` with the model's end (the wheel's bucket) and the
/// source `tcp_fin_timeout=5`; the full socket's CLOSE keeps it; the
/// expiry at the predicted instant is a timeout with a zero error.
#[test]
fn fin_timeout_listed_after_min_age_and_predicted_to_the_bucket() {
    let m = model(0, 5);
    let s = Sock::new(70);
    let (ev, bucket) = timewait_start(&s, &m);
    let end_ns = ts_of_jiffies(HZ, bucket);
    let mut e = engine();
    e.ingest(&ev);
    // The handover: the full socket's FIN_WAIT2 -> CLOSE right after.
    e.ingest(&s.state(T0 + MS, TcpState::FinWait2, TcpState::Close));
    assert!(e.stalls(T0 + 500 * MS).is_empty(), "listed before 1 s");
    e.tick(T0 + 1_100 * MS);
    let v = e.stalls(T0 + 1_100 * MS);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].class, StallClass::FinWait2);
    assert_eq!(v[0].boundary_source, Some(BoundarySource::FinTimeout(5)));
    assert_eq!(v[0].predicted_timeout_ns, Some(end_ns));
    assert!(
        (5 * S..5 * S + S / 2).contains(&(end_ns - T0)),
        "the model's end {} ms after the start",
        (end_ns - T0) / MS
    );
    e.ingest(&expire(&s, bucket, TcpState::FinWait2));
    assert!(e.stalls(end_ns + MS).is_empty());
    let t = timeouts(&mut e);
    assert_eq!(t.len(), 1, "{t:?}");
    let Observation::Timeout {
        evidence,
        prediction_error_s,
        ..
    } = t[0]
    else {
        unreachable!()
    };
    assert_eq!(evidence, TimeoutEvidence::TimewaitExpiry);
    assert_eq!(prediction_error_s, Some(0.0));
    assert_eq!(e.stats().fin_wait2_timeouts, 1);
}

/// A kernel whose `timer_start` has no bucket argument (the program's read
/// is the tracepoint's flags, as on Debian's 6.1): the end is still the
/// model's bucket, the engine rounding the requested expiry itself.
#[test]
fn without_a_bucket_from_the_tracepoint_the_wheel_is_modelled() {
    for fin_timeout_s in [3, 5, 30, 60] {
        let m = model(0, fin_timeout_s);
        let s = Sock::new(71);
        let (mut ev, bucket) = timewait_start(&s, &m);
        let expires = ev.tw.unwrap().expires;
        assert!(bucket > expires, "{fin_timeout_s} s: the model rounds up");
        ev.tw = Some(TwTimer {
            bucket_expiry: 0x4_0001,
            ..ev.tw.unwrap()
        });
        let mut e = engine();
        e.ingest(&ev);
        e.tick(T0 + 1_100 * MS);
        let v = e.stalls(T0 + 1_100 * MS);
        assert_eq!(v.len(), 1, "{fin_timeout_s} s: {v:?}");
        assert_eq!(
            v[0].predicted_timeout_ns,
            Some(ts_of_jiffies(HZ, bucket)),
            "{fin_timeout_s} s: the model's bucket {bucket}, requested {expires}"
        );
    }
}

/// TCP_LINGER2 3 s in a namespace whose `tcp_fin_timeout` is 60 s: the
/// socket's value rules (`tcp_linger2=3`).
#[test]
fn linger2_is_the_source_when_it_differs_from_the_namespace() {
    let m = model(3, 60);
    let s = Sock::new(71);
    let (ev, bucket) = timewait_start(&s, &m);
    let mut e = engine();
    e.ingest(&ev);
    e.tick(T0 + 1_100 * MS);
    let v = e.stalls(T0 + 1_100 * MS);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].boundary_source, Some(BoundarySource::Linger2(3)));
    assert_eq!(v[0].predicted_timeout_ns, Some(ts_of_jiffies(HZ, bucket)));
}

/// The peer's FIN 300 ms in (before `fin_wait2_after`): never listed, no
/// timeout; the TIME_WAIT socket's own expiry later is not reported (the
/// kernel forgot it), and nothing is left.
#[test]
fn peer_fin_ends_it_silently() {
    let m = model(0, 60);
    let s = Sock::new(72);
    let (ev, _) = timewait_start(&s, &m);
    let mut e = engine();
    e.ingest(&ev);
    e.ingest(&s.state(T0 + MS, TcpState::FinWait2, TcpState::Close));
    let fin_j = jiffies_at(HZ, T0 + 300 * MS);
    let rearm = peer_fin(fin_j, hz());
    e.ingest(&start(
        &s,
        fin_j,
        TcpState::TimeWait,
        fin_j + 60 * hz(),
        rearm,
        60 * hz(),
    ));
    e.tick(T0 + 2 * S);
    assert!(e.stalls(T0 + 2 * S).is_empty());
    assert!(timeouts(&mut e).is_empty());
    assert_eq!(e.stats().fin_wait2_peer_fin, 1);
    assert_eq!(e.gauges(T0 + 2 * S).flows_tracked, 0);
}

/// A re-arm the wheel absorbed (no `timer_start`): the expiry comes in the
/// TIME_WAIT substate: a normal close, not a timeout.
#[test]
fn expiry_in_time_wait_is_no_timeout() {
    let m = model(0, 60);
    let s = Sock::new(73);
    let (ev, bucket) = timewait_start(&s, &m);
    let mut e = engine();
    e.ingest(&ev);
    e.ingest(&expire(&s, bucket, TcpState::TimeWait));
    assert!(timeouts(&mut e).is_empty());
    assert_eq!(e.stats().fin_wait2_timeouts, 0);
}

/// No expiry event (lost, or the timewait socket was killed early): the
/// flow leaves the list after its predicted end plus the grace.
#[test]
fn an_unseen_end_is_dropped_after_the_grace() {
    let m = model(0, 5);
    let s = Sock::new(74);
    let (ev, bucket) = timewait_start(&s, &m);
    let mut e = engine();
    e.ingest(&ev);
    let end_ns = ts_of_jiffies(HZ, bucket);
    e.tick(end_ns + 500 * MS);
    assert_eq!(e.stalls(end_ns + 500 * MS).len(), 1);
    e.tick(end_ns + 3 * S);
    assert!(e.stalls(end_ns + 3 * S).is_empty());
    assert_eq!(e.stats().fin_wait2_unseen_end, 1);
    assert!(timeouts(&mut e).is_empty());
}

/// The host's sequence (a real run, HZ 250): the state program's full
/// FIN_WAIT1 -> FIN_WAIT2 event, the timewait start, the full socket's
/// CLOSE, then ticks: listed from 1 s on.
#[test]
fn host_sequence_is_listed() {
    let mut s = Sock::new(669_237);
    s.skaddr = 0xffff_8881_0000_1000;
    let mut e = engine();
    let ts0 = 54_669_628_058_364;
    let j0 = 4_308_559_668;
    let mut fw2 = s.state(ts0, TcpState::FinWait1, TcpState::FinWait2);
    fw2.jiffies = j0;
    fw2.orphan = true;
    e.ingest(&fw2);
    let mut st = start(
        &s,
        j0,
        TcpState::FinWait2,
        4_308_560_918,
        4_308_560_960,
        1250,
    );
    st.ts_ns = ts0 + 1_162;
    st.skaddr = 0xffff_8884_0000_0000;
    e.ingest(&st);
    let mut close = s.state(ts0 + 1_973, TcpState::FinWait2, TcpState::Close);
    close.jiffies = j0;
    e.ingest(&close);
    // The full socket's address, freed at its CLOSE, holds a new socket
    // 700 ms later (seen on the host: the test's own HTTP polls): its first
    // event must not end the FIN_WAIT2 flow as "address reused".
    let mut other = Sock::new(669_300);
    other.skaddr = s.skaddr;
    let mut reuse = other.state(ts0 + 700 * MS, TcpState::FinWait1, TcpState::FinWait2);
    reuse.skaddr = close.skaddr;
    e.ingest(&reuse);
    for k in 1..=40 {
        e.tick(ts0 + k * 100 * MS);
    }
    let v = e.stalls(ts0 + 4 * S);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].cookie, 669_237);
}

/// The orphan's change to FIN_WAIT2 at jiffy `now` as the state program
/// reports it (full snapshot: `tp->linger2`, the namespace's
/// `tcp_fin_timeout`, `icsk_rto`).
fn fin_wait2_entry(s: &Sock, m: &FinWait2Sock, now: u64) -> SockEvent {
    let ts = ts_of_jiffies(HZ, now);
    let mut ev = s.state(ts, TcpState::FinWait1, TcpState::FinWait2);
    ev.jiffies = now;
    ev.orphan = true;
    ev.packets_out = 0;
    ev.rto_jiffies = m.icsk_rto as u32;
    let mut sock = s.fields(0, 0, 0, ts);
    sock.fin = FinTimeFields {
        linger2_j: m.linger2 as i32,
        netns_fin_timeout_j: Some(m.net_fin_timeout as u32),
    };
    ev.sock = Some(sock);
    ev
}

/// The model's wait above 60 s from the ACK of the FIN at jiffy `now`:
/// the keepalive timer's requested expiry, its run, `tmo`, and the
/// timewait timer's requested expiry and bucket.
struct AboveSixty {
    timer_expires: u64,
    ka_runs: u64,
    tmo: u64,
    expires: u64,
    bucket: u64,
}

/// The two waits above 60 s the tests run (TCP_LINGER2 65 s; the
/// namespace's tcp_fin_timeout 70 s) and the source each names.
fn above_60_s_cases() -> [(FinWait2Sock, BoundarySource); 2] {
    [
        (model(65, 60), BoundarySource::Linger2(65)),
        (model(0, 70), BoundarySource::FinTimeout(70)),
    ]
}

fn above_60_s(m: &FinWait2Sock, now: u64) -> AboveSixty {
    let FinWait2Fate::KeepaliveFirst { timer_expires, tmo } = m.ack_of_fin(now) else {
        panic!("the model arms the keepalive timer first: {m:?}");
    };
    let ka_runs = timer_runs_at(timer_expires, now, hz());
    let Some(FinWait2Fate::Timewait {
        expires, bucket, ..
    }) = m.keepalive_handover(ka_runs)
    else {
        panic!("the model hands over to a timewait socket: {m:?}");
    };
    AboveSixty {
        timer_expires,
        ka_runs,
        tmo,
        expires,
        bucket,
    }
}

/// The keepalive timer's run hands over (the timewait timer's start, the
/// full socket's CLOSE a millisecond later): the flow stays listed from
/// the entry at `T0`, under `source`, with the model's end; then the
/// expiry at the bucket is the one timeout. Returns the timeouts.
fn handover_and_expiry(
    e: &mut Engine,
    s: &Sock,
    m: &FinWait2Sock,
    a: &AboveSixty,
    source: BoundarySource,
) -> Vec<Observation> {
    let (ka_runs, bucket) = (a.ka_runs, a.bucket);
    let (tw_ts, end_ns) = (ts_of_jiffies(HZ, ka_runs), ts_of_jiffies(HZ, bucket));
    e.ingest(&start(
        s,
        ka_runs,
        TcpState::FinWait2,
        a.expires,
        bucket,
        m.net_fin_timeout,
    ));
    e.ingest(&s.state(tw_ts + MS, TcpState::FinWait2, TcpState::Close));
    let v = e.stalls(tw_ts + 2 * MS);
    assert_eq!(
        v.len(),
        1,
        "{m:?}: not listed right after the handover: {v:?}"
    );
    assert_eq!(v[0].boundary_source, Some(source), "{m:?}");
    assert_eq!(v[0].since_ns, T0, "{m:?}: the wait began at the entry");
    assert_eq!(v[0].predicted_timeout_ns, Some(end_ns), "{m:?}");
    e.drain_observations().for_each(drop);
    e.ingest(&expire(s, bucket, TcpState::FinWait2));
    let t = timeouts(e);
    assert_eq!(t.len(), 1, "{m:?}: {t:?}");
    assert!(e.stalls(end_ns + MS).is_empty());
    t
}

/// A wait above 60 s (TCP_LINGER2 65 s; the namespace's tcp_fin_timeout
/// 70 s): listed from the change to FIN_WAIT2 (after `fin_wait2_after`)
/// with the model's end (keepalive timer `tmo` - 60 s, then the timewait
/// socket `tmo` - 60 s more, each rounded by the wheel), the source named
/// at the entry; the timewait start at the keepalive timer's run keeps the
/// flow listed, its start and source; the expiry is a timeout whose first
/// prediction (from the entry) is exact.
#[test]
fn wait_above_60_s_is_predicted_from_the_entry() {
    for (m, source) in above_60_s_cases() {
        let s = Sock::new(71);
        let now = jiffies_at(HZ, T0);
        let a = above_60_s(&m, now);
        let (tmo, bucket) = (a.tmo, a.bucket);
        let end_ns = ts_of_jiffies(HZ, bucket);
        let lived = end_ns - T0;
        let twice = 2 * (tmo - 60 * hz());
        assert!(
            (ts_of_jiffies(HZ, now + twice) - T0..ts_of_jiffies(HZ, now + twice) - T0 + S)
                .contains(&lived),
            "{m:?}: the model's wait {lived} ns, 2 * (tmo - 60 s) = {twice} jiffies"
        );
        let mut e = engine();
        e.ingest(&fin_wait2_entry(&s, &m, now));
        assert!(
            e.stalls(T0 + 500 * MS).is_empty(),
            "{m:?}: listed before 1 s"
        );
        e.tick(T0 + 1_100 * MS);
        let v = e.stalls(T0 + 1_100 * MS);
        assert_eq!(v.len(), 1, "{m:?}: {v:?}");
        assert_eq!(v[0].class, StallClass::FinWait2);
        assert!(v[0].orphan, "{v:?}");
        assert_eq!(v[0].boundary_source, Some(source), "{m:?}");
        assert_eq!(v[0].predicted_timeout_ns, Some(end_ns), "{m:?}");
        // The keepalive timer runs: the timewait socket starts.
        let t = handover_and_expiry(&mut e, &s, &m, &a, source);
        let Observation::Timeout {
            first_prediction_error_s,
            ..
        } = &t[0]
        else {
            unreachable!()
        };
        assert_eq!(*first_prediction_error_s, Some(0.0), "{m:?}: {t:?}");
    }
}

/// Waits the kernel ends without a keepalive part are not created by the
/// change to FIN_WAIT2: `tmo` <= 60 s (the timewait timer's start says
/// it), TCP_LINGER2 < 0 (closed at once), a socket not orphaned (no timer:
/// shutdown() only) and a kernel whose fields were not read.
#[test]
fn entry_without_a_keepalive_part_is_not_listed() {
    let now = jiffies_at(HZ, T0);
    let s = Sock::new(72);
    let mut cases = vec![
        ("tmo 60 s", fin_wait2_entry(&s, &model(0, 60), now)),
        ("linger2 < 0", fin_wait2_entry(&s, &model(-1, 90), now)),
    ];
    let mut not_orphan = fin_wait2_entry(&s, &model(65, 60), now);
    not_orphan.orphan = false;
    cases.push(("not an orphan", not_orphan));
    let mut unread = fin_wait2_entry(&s, &model(0, 90), now);
    if let Some(sock) = unread.sock.as_mut() {
        sock.fin.netns_fin_timeout_j = None;
    }
    cases.push(("fields not read", unread));
    for (name, ev) in cases {
        let mut e = engine();
        e.ingest(&ev);
        e.tick(T0 + 1_100 * MS);
        assert!(e.stalls(T0 + 1_100 * MS).is_empty(), "{name}: listed");
    }
}

/// The tracepoint read `jiffies` a tick after `tcp_time_wait()` armed the
/// timer (seen in a TCG guest): the requested delay is one or two jiffies
/// short of the namespace's tcp_fin_timeout, still its source; a TCP_LINGER2
/// a whole second off is not.
#[test]
fn a_tick_between_arming_and_the_tracepoint_keeps_the_namespaces_source() {
    let ft = 5 * hz();
    for late in 0..=2 {
        assert_eq!(
            super::boundary_source(ft - late, Some(ft), HZ),
            BoundarySource::FinTimeout(5),
            "{late} jiffies late"
        );
    }
    assert_eq!(
        super::boundary_source(ft - hz(), Some(ft), HZ),
        BoundarySource::Linger2(4)
    );
    assert_eq!(
        super::boundary_source(ft + 1, Some(ft), HZ),
        BoundarySource::Linger2(6)
    );
}

/// The change to FIN_WAIT2 of an orphan waiting above 60 s never reached
/// the agent (the kernel skipped the state program's run: seen in a TCG
/// guest). Its keepalive timer's run (`sk_timer.expires` as requested at
/// the entry, the wheel running it later) starts the flow backdated to the
/// change: listed at once with the socket's own limit, the wait's start at
/// the entry, the model's end; the timewait start and the handover keep
/// them; the expiry is a timeout. A keepalive run of a flow whose entry
/// was seen changes nothing, and one that is no such orphan starts nothing.
///
/// Mutation: `recover_fin_wait2_entry` returning false at once fails it
/// (not listed after the handover until 1 s later, and then with the
/// timewait's `tcp_linger2=5`).
#[test]
fn a_lost_entry_is_recovered_from_the_keepalive_timer() {
    for (m, source) in above_60_s_cases() {
        let s = Sock::new(73);
        let now = jiffies_at(HZ, T0);
        let a = above_60_s(&m, now);
        let (timer_expires, ka_runs, bucket) = (a.timer_expires, a.ka_runs, a.bucket);
        let end_ns = ts_of_jiffies(HZ, bucket);
        // The keepalive timer's run as the keepalive program reports it.
        let entry = fin_wait2_entry(&s, &m, now);
        let ka_ts = ts_of_jiffies(HZ, ka_runs);
        let mut ka = entry.clone();
        ka.kind = EventKind::KeepaliveTimer;
        ka.ts_ns = ka_ts;
        ka.jiffies = ka_runs;
        if let Some(sock) = ka.sock.as_mut() {
            sock.keepalive.timer_expires = timer_expires as u32;
        }
        let mut e = engine();
        e.ingest(&ka);
        assert_eq!(e.stats().fin_wait2_entries_recovered, 1, "{m:?}");
        e.tick(ka_ts + MS);
        let v = e.stalls(ka_ts + MS);
        assert_eq!(v.len(), 1, "{m:?}: not listed at the keepalive run: {v:?}");
        assert_eq!(v[0].class, StallClass::FinWait2);
        assert_eq!(v[0].boundary_source, Some(source), "{m:?}");
        assert_eq!(v[0].since_ns, T0, "{m:?}: backdated to the entry");
        assert_eq!(v[0].predicted_timeout_ns, Some(end_ns), "{m:?}");
        handover_and_expiry(&mut e, &s, &m, &a, source);

        // Seen at the entry: the keepalive run recovers nothing.
        let mut e = engine();
        e.ingest(&entry);
        e.ingest(&ka);
        assert_eq!(e.stats().fin_wait2_entries_recovered, 0, "{m:?}");
        let v = e.stalls(ka_ts + MS);
        assert_eq!(v.len(), 1, "{m:?}: {v:?}");
        assert_eq!(v[0].since_ns, T0, "{m:?}");
    }
    // Not an orphan, or a wait of 60 s or less: no flow.
    let s = Sock::new(74);
    let now = jiffies_at(HZ, T0);
    for (name, m, orphan) in [
        ("not an orphan", model(65, 60), false),
        ("tmo 60 s", model(0, 60), true),
    ] {
        let mut ka = fin_wait2_entry(&s, &m, now);
        ka.kind = EventKind::KeepaliveTimer;
        ka.orphan = orphan;
        let mut e = engine();
        e.ingest(&ka);
        e.tick(T0 + 2 * S);
        assert!(e.stalls(T0 + 2 * S).is_empty(), "{name}: listed");
        assert_eq!(e.stats().fin_wait2_entries_recovered, 0, "{name}");
    }
}
