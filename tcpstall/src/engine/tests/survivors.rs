//! Tests written for the survivors of the engine's mutation run (`cargo
//! xtask mutants engine`, `docs/testing.md`): each checks a kernel rule or
//! an engine contract a surviving mutant broke unnoticed. The mutant each
//! one kills is named in its comment.

use super::*;

/// A soft error the kernel reports without killing the socket
/// (`tcp_v4_err()` with `IP_RECVERR`), or with it (`tcp_write_err()`
/// reports `sk_err_soft` when one is recorded).
const EHOSTUNREACH: u32 = 113;

fn stall_starts(obs: &[Observation], class: StallClass) -> usize {
    obs.iter()
        .filter(|o| matches!(o, Observation::StallStarted { class: c, .. } if *c == class))
        .count()
}

/// An open-window probe (data that never left this node): the persist timer
/// fires with nothing in flight and the peer's window open.
fn unsent_probe(s: &Sock, ts: u64, probes_out: u32) -> SockEvent {
    let mut ev = s.probe(ts, probes_out, probes_out);
    ev.sock.as_mut().unwrap().snd_wnd = 65_535;
    ev
}

/// The flow's view at `now` (it must be listed).
fn view_of(e: &Engine, cookie: u64, now: u64) -> StallView {
    e.stalls(now)
        .into_iter()
        .find(|v| v.cookie == cookie)
        .unwrap_or_else(|| panic!("cookie {cookie} not listed at {now}"))
}

/// `handlers.rs` `on_rto`: `acked || idx <= st.rtos` -> `&&`. A fast
/// retransmission's streak (no RTO yet), then an RTO expiry after a forward
/// ACK the agent did not see (`tcp_ack()` advanced `snd_una`;
/// `retrans_stamp` may persist, `docs/../shared/design/kernel-tcp-timeouts.md`
/// §2): the ACK ended the first streak, the expiry starts another.
#[test]
fn rto_after_an_unseen_forward_ack_ends_the_fast_retransmit_streak() {
    let s = Sock::new(301);
    let st = ms_stamp(T0);
    let mut e = engine();
    e.ingest(&s.retransmit(T0, 1, 0, st, 51, 1_000, 0));
    assert!(streak_ends(&drain(&mut e)).is_empty());
    e.ingest(&s.rto(T0 + 300 * MS, 0, st, 51, 1_500));
    assert_eq!(
        streak_outcomes(&drain(&mut e)),
        vec![StreakOutcome::Recovered],
        "the forward ACK before the RTO ended the fast retransmit's streak"
    );
}

/// `handlers.rs:82` and `:193` `if ev.snd_una != 0` -> `==` (the streak's
/// `snd_una_last` kept from each event), `seed.rs:231` the same in
/// `seed_rto`. The streak's first event had no `snd_una` (a failed read):
/// the next one that has it must become the reference, so that an expiry
/// after unseen ACK progress (the count back up after lost events, the
/// stamp kept) is recognised by `snd_una` alone.
#[test]
fn snd_una_progress_counts_after_a_first_event_without_snd_una() {
    let st = ms_stamp(T0);
    for via in ["retransmission", "timer", "sweep"] {
        let s = Sock::new(302);
        let mut e = engine();
        e.ingest(&s.rto(T0 + 204 * MS, 0, st, 51, 0));
        match via {
            "retransmission" => {
                // The RTO's retransmissions only (no timer report).
                e.ingest(&s.retransmit(T0 + 205 * MS, 0, 0, st, 51, 0, 0));
                e.ingest(&s.retransmit(T0 + 612 * MS, 0, 1, st, 102, 1_000, 1));
            }
            "timer" => {
                e.ingest(&s.rto(T0 + 612 * MS, 1, st, 102, 1_000));
            }
            _ => {
                let mut snap = s.rto(T0 + 700 * MS, 2, st, 204, 1_000);
                snap.kind = EventKind::Sweep;
                snap.mechanism = Mechanism::Sweep;
                let f = snap.sock.as_mut().unwrap();
                f.backoff = 2;
                f.timer_expires = jiffies_at(HZ, T0 + 1_428 * MS);
                e.ingest(&snap);
            }
        }
        assert!(
            streak_ends(&drain(&mut e)).is_empty(),
            "{via}: one streak so far"
        );
        // Unseen: an ACK of new data (count reset), then expiries whose
        // reports were lost; this one has a count above the streak's.
        e.ingest(&s.rto(T0 + 9 * S, 3, st, 51, 1_500));
        assert_eq!(
            streak_outcomes(&drain(&mut e)),
            vec![StreakOutcome::Recovered],
            "{via}: snd_una moved 1000 -> 1500, the streak must end"
        );
    }
}

/// `handlers.rs:122` `ev.packets_out > 0` -> `<`, `==` (the window-shrunk
/// anchor of an RTO seen by its retransmission alone): the peer's window is
/// 0 with data in flight, so `tcp_retransmit_timer()` takes its
/// zero-window branch (death by `tcp_rtx_probe0_timed_out()`, not
/// `tcp_write_timeout()`): no prediction from the retries2 rule.
#[test]
fn window_shrunk_seen_from_rto_retransmissions_alone() {
    let s = Sock::new(303);
    let st = ms_stamp(T0);
    let mut e = engine();
    for (i, (t, rto)) in [(204u64, 51u32), (612, 102), (1_428, 204)]
        .into_iter()
        .enumerate()
    {
        let mut r = s.retransmit(T0 + t * MS, 0, i as u32, st, rto, 1_000, i as u32);
        r.sock.as_mut().unwrap().snd_wnd = 0;
        e.ingest(&r);
    }
    let v = view_of(&e, 303, T0 + 1_500 * MS);
    assert_eq!(v.rto_streak, 3);
    assert_eq!(
        v.predicted_timeout_ns, None,
        "window shrunk: tcp_write_timeout() does not decide"
    );
}

/// `handlers.rs:159` `ev.mechanism == Mechanism::SockOps` -> `!=`: the
/// kernel's own verdict (`BPF_SOCK_OPS_RTO_CB`'s "expired" argument, from
/// `tcp_write_timeout()`) reported first, the write-timer program's report
/// of the same expiry second: the duplicate must not overwrite the verdict.
/// The close that follows (no error report: an orphan) is a timeout.
#[test]
fn sock_ops_verdict_survives_a_later_duplicate_report() {
    let s = Sock::new(304);
    let mut ops = s;
    ops.mechanism = Mechanism::SockOps;
    let st = ms_stamp(T0);
    let mut e = engine();
    e.ingest(&s.rto(T0 + 204 * MS, 0, st, 51, 1_000));
    e.ingest(&s.rto(T0 + 612 * MS, 1, st, 102, 1_000));
    let mut fatal = ops.base(EventKind::WriteTimer, T0 + 1_428 * MS);
    fatal.retransmits = 2;
    fatal.rto_jiffies = 204;
    fatal.rto_expired_verdict = true;
    e.ingest(&fatal);
    e.ingest(&s.rto(T0 + 1_428 * MS + 20_000, 2, st, 204, 1_000));
    assert_eq!(e.stats().timer_events_duplicate, 1);
    e.ingest(&s.close(T0 + 1_430 * MS));
    e.tick(T0 + 10 * S);
    let t = timeouts(&drain(&mut e));
    assert_eq!(t.len(), 1, "the kernel said expired: a timeout");
}

/// `handlers.rs:265` `ev.packets_out == 0` -> `!=`: `tcp_probe_timer()`
/// probes only with nothing in flight (`if (tp->packets_out || !skb)` it
/// returns), so a probe after an RTO streak means every retransmission was
/// acknowledged: the streak ended as recovered.
#[test]
fn zero_window_probe_with_nothing_in_flight_ends_the_rto_streak() {
    let s = Sock::new(305);
    let st = ms_stamp(T0);
    let mut e = engine();
    e.ingest(&s.rto(T0 + 204 * MS, 0, st, 51, 1_000));
    e.ingest(&s.rto(T0 + 612 * MS, 1, st, 102, 1_000));
    assert!(streak_ends(&drain(&mut e)).is_empty());
    e.ingest(&s.probe(T0 + 800 * MS, 0, 0));
    assert_eq!(
        streak_outcomes(&drain(&mut e)),
        vec![StreakOutcome::Recovered]
    );
}

/// `handlers.rs:317` (`p.probes == 0 && !window_open`: `==` -> `!=`, `&&`
/// -> `||`, `!` deleted), `318` (`+= 1` -> `*=`, `-=`) and `seed.rs:305`
/// (the same count for a seeded episode): one zero-window episode per
/// closed window, however many probes; none for data that never left
/// (open window).
#[test]
fn zero_window_episodes_are_counted_once_per_closed_window() {
    let times = [0u64, 204, 612, 1_428, 3_060, 6_324];
    let s = Sock::new(306);
    let mut e = engine();
    for (b, t) in times.into_iter().enumerate() {
        e.ingest(&s.probe(T0 + t * MS, b as u32, b as u32));
    }
    let v = view_of(&e, 306, T0 + 6_400 * MS);
    assert_eq!(v.class, StallClass::ZeroWindow);
    assert_eq!(v.history.zero_window_episodes, 1, "six probes, one episode");

    let u = Sock::new(307);
    for (b, t) in times.into_iter().enumerate() {
        e.ingest(&unsent_probe(&u, T0 + t * MS, b as u32));
    }
    let v = view_of(&e, 307, T0 + 6_400 * MS);
    assert_eq!(v.class, StallClass::Retransmit);
    assert_eq!(
        v.history.zero_window_episodes, 0,
        "data that never left is no zero-window episode"
    );

    let z = Sock::new(308);
    let now = T0 + 100 * S;
    let mut snap = z.probe(now, 6, 6);
    snap.kind = EventKind::Sweep;
    snap.mechanism = Mechanism::Sweep;
    snap.sock.as_mut().unwrap().timer_expires = jiffies_at(HZ, now) + u64::from(HZ);
    e.ingest(&snap);
    let v = view_of(&e, 308, now);
    assert_eq!(v.history.zero_window_episodes, 1, "seeded from a sweep");
}

/// `handlers.rs:333-337` (the `retransmit` stall of data that never left:
/// `window_open && probes_out + 1 >= min_rto_streak && not yet announced`,
/// then the announced bit) and `:467` (`f.announced &= !CloseWait.bit()` ->
/// `|=`, `!` deleted, on a state change): one announcement per episode,
/// at the probe that found the previous one unanswered; none for a closed
/// window; a state change (the application's `close()` with data unsent,
/// FIN_WAIT1) before or during the episode changes nothing.
#[test]
fn unsent_data_probes_announce_one_retransmit_stall() {
    let times = [0u64, 204, 612, 1_428, 3_060];
    for state_change in ["none", "before", "during"] {
        let s = Sock::new(309);
        let mut e = engine();
        let mut first_at = None;
        for (b, t) in times.into_iter().enumerate() {
            e.ingest(&unsent_probe(&s, T0 + t * MS, b as u32));
            if first_at.is_none() && stall_starts(&drain(&mut e), StallClass::Retransmit) > 0 {
                first_at = Some(b);
            }
            // After the first probe (the flow known, no episode yet).
            if state_change == "before" && b == 0 {
                e.ingest(&s.state(T0 + 100 * MS, TcpState::Established, TcpState::FinWait1));
            }
            if state_change == "during" && b == 2 {
                e.ingest(&s.state(T0 + 700 * MS, TcpState::Established, TcpState::FinWait1));
            }
        }
        let later = stall_starts(&drain(&mut e), StallClass::Retransmit);
        // probes_out 0: answered or first (no episode); 1: the second
        // unanswered, the count reaches min_rto_streak 2.
        assert_eq!(
            first_at,
            Some(1),
            "{state_change}: announced at probes_out 1"
        );
        assert_eq!(later, 0, "{state_change}: announced again");
    }
    // A closed window: a zero-window stall (by time), never `retransmit`.
    let z = Sock::new(310);
    let mut e = engine();
    for (b, t) in times.into_iter().enumerate() {
        e.ingest(&z.probe(T0 + t * MS, b as u32, b as u32));
    }
    assert_eq!(stall_starts(&drain(&mut e), StallClass::Retransmit), 0);
}

/// `handlers.rs:344-346` (`uto_dead = uto != 0 && probes > 1 && now -
/// first >= uto`): `tcp_probe_timer()` stamps `icsk_probes_tstamp` at the
/// first probe and aborts at the first later probe expiry with `now -
/// icsk_probes_tstamp >= UTO`. An error report (a soft error, reported
/// with `IP_RECVERR` while alive) after a probe before the UTO is no
/// timeout; after the probe past it, it is. Without a user timeout
/// (`tcp_retries2` 15, probes answered) nothing dies.
#[test]
fn zero_window_user_timeout_verdict_at_the_probe_expiry() {
    let times = [0u64, 204, 612, 1_428, 3_060, 6_324];
    for uto in [5_000u32, 0] {
        let mut s = Sock::new(311);
        s.uto = uto;
        s.sysctls = Some(sysctls(15));
        let mut e = engine();
        for (b, t) in times.into_iter().enumerate() {
            e.ingest(&s.probe(T0 + t * MS, b as u32, 0));
            if t == 3_060 {
                e.ingest(&s.error(T0 + 3_061 * MS, EHOSTUNREACH));
                assert!(
                    timeouts(&drain(&mut e)).is_empty(),
                    "uto {uto}: 3.06 s after the first probe is not dead"
                );
            }
        }
        e.ingest(&s.error(T0 + 6_325 * MS, EHOSTUNREACH));
        let t = timeouts(&drain(&mut e));
        if uto == 0 {
            assert!(t.is_empty(), "no user timeout: answered probes never die");
        } else {
            assert_eq!(t.len(), 1, "6.32 s after the first probe, past the UTO");
        }
    }
}

/// `handlers.rs:353` (the orphan's backed-off RTO, overflow-checked: `>>`
/// -> `<<`, `==` -> `!=`), `:357` (`alive = min(rto << backoff, rto_max) <
/// rto_max`: `<` -> `<=`, `==`, `>`), `:358` (`ev.err_soft != 0` -> `==`)
/// and `:367` (`uto_dead || count_dead` -> `&&`): `tcp_probe_timer()` on
/// an orphan, `max_probes = tcp_orphan_retries(sk, alive)` (0 with a soft
/// error when not alive; a configured 0 is 8 while alive), then abort when
/// `icsk_probes_out >= max_probes` (or `!alive && icsk_backoff >=
/// max_probes`). Probes answered (probes_out 0) or not; RTO 204 ms, so
/// alive up to backoff 9 (`204 ms << 10` passes 120 s).
#[test]
fn orphan_zero_window_verdict_follows_tcp_orphan_retries() {
    // (tcp_orphan_retries, backoff, probes_out, err_soft, dead)
    let cases = [
        (0u32, 2u32, 3u32, 0u32, false), // alive: 0 means 8
        (0, 2, 8, 0, true),              // alive, 8 unanswered
        (0, 10, 0, 0, true),             // not alive: 0
        (15, 10, 0, 0, false),           // not alive, 15, backoff 10 < 15
        (3, 10, 0, 0, true),             // not alive, backoff 10 >= 3
        (15, 10, 0, EHOSTUNREACH, true), // not alive with a soft error: 0
    ];
    for (i, (retries, backoff, probes_out, err_soft, dead)) in cases.into_iter().enumerate() {
        let mut s = Sock::new(320 + i as u64);
        s.orphan = true;
        s.sysctls = Some(NetnsSysctls {
            tcp_orphan_retries: retries,
            ..sysctls(15)
        });
        let mut e = engine();
        let mut p = s.probe(T0, backoff, probes_out);
        p.err_soft = err_soft;
        e.ingest(&p);
        e.ingest(&s.error(T0 + MS, EHOSTUNREACH));
        assert_eq!(
            timeouts(&drain(&mut e)).len(),
            usize::from(dead),
            "orphan_retries {retries}, backoff {backoff}, probes_out {probes_out}, \
             err_soft {err_soft}: dead {dead}"
        );
    }
}

/// `handlers.rs:441` (`ev.state == TcpState::Close` -> `!=`) and `:448`
/// (`stalls_reset += 1` -> `*=`, `-=`): `tcp_reset()` sets `sk_err`
/// (ECONNRESET) before `tcp_done()` moves the socket to CLOSE: a stalled
/// flow reset by the peer is counted once, with its class.
#[test]
fn reset_of_a_stalled_flow_is_counted() {
    let s = Sock::new(330);
    let st = ms_stamp(T0);
    let mut e = engine();
    e.ingest(&s.rto(T0 + 204 * MS, 0, st, 51, 1_000));
    e.ingest(&s.rto(T0 + 612 * MS, 1, st, 102, 1_000));
    let mut rst = s.close(T0 + 700 * MS);
    rst.sk_err = 104;
    e.ingest(&rst);
    assert_eq!(e.stats().stalls_reset, 1);
    let resets: Vec<_> = drain(&mut e)
        .into_iter()
        .filter_map(|o| match o {
            Observation::StallReset { class, errno, .. } => Some((class, errno)),
            _ => None,
        })
        .collect();
    assert_eq!(resets, vec![(StallClass::Retransmit, 104)]);
}

/// `handlers.rs:512` (`st.snd_una_last == 0 || ev.ack_seq == 0 || ...`:
/// the first `||` -> `&&`): the ACK program reports only segments that
/// acknowledge data after `snd_una` (`ack_after()`); when the streak never
/// had a readable `snd_una`, every reported ACK is progress, whatever half
/// of the sequence space it is in.
#[test]
fn reported_ack_ends_a_streak_without_a_known_snd_una() {
    let s = Sock::new(331);
    let st = ms_stamp(T0);
    let mut e = engine();
    e.ingest(&s.rto(T0 + 204 * MS, 0, st, 51, 0));
    e.ingest(&s.rto(T0 + 612 * MS, 1, st, 102, 0));
    e.ingest(&ack(&s, T0 + 700 * MS, 0, 0x9000_0000, 2));
    assert_eq!(
        streak_outcomes(&drain(&mut e)),
        vec![StreakOutcome::Recovered]
    );
    assert_eq!(e.stats().acks_recovered, 1);
}

/// `streak.rs:135` (`ev.retransmits >= s.max_retransmits` -> `<`): in
/// SYN_SENT `tcp_write_timeout()` kills at the expiry that finds
/// `icsk_retransmits >= icsk_syn_retries ?: tcp_syn_retries` (plus
/// `tcp_syn_linear_timeouts`), not before. A connection refused (RST,
/// `tcp_reset()`: ECONNREFUSED) after the first SYN retransmission is no
/// timeout.
#[test]
fn syn_sent_refused_after_a_retransmission_is_no_timeout() {
    let mut sock = Sock::new(340);
    sock.sysctls = Some(NetnsSysctls {
        tcp_syn_retries: 4,
        tcp_syn_linear_timeouts: Some(4),
        ..sysctls(15)
    });
    let mut e = engine();
    let stamp = ms_stamp(T0);
    for (r, at) in [1u64, 2].into_iter().enumerate() {
        let mut ev = sock.rto(T0 + at * S, r as u32, stamp, 250, 1_000);
        ev.state = TcpState::SynSent;
        e.ingest(&ev);
    }
    let mut refused = sock.error(T0 + 2_100 * MS, 111);
    refused.state = TcpState::SynSent;
    e.ingest(&refused);
    assert!(
        timeouts(&drain(&mut e)).is_empty(),
        "2 of 8 SYN retransmissions: not the kernel's timeout"
    );
}

/// `streak.rs:187` (`ep.stamp == 0 && same_rto_as_anchor`: `&&` -> `||`):
/// a loss probe does not start the kernel's clock (`tcp_send_loss_probe()`
/// retransmits through `__tcp_retransmit_skb()`, which leaves
/// `retrans_stamp` 0); the first RTO's retransmission does. The prediction
/// made at that RTO (user timeout 1 s) is the same with or without the
/// probe 0.7 s before it.
#[test]
fn loss_probe_before_the_first_rto_does_not_start_the_clock() {
    let predicted = |tlp: bool| {
        // A 1 s user timeout: the death is the first expiry 1 s after the
        // clock's start, so where it starts decides which expiry.
        let mut s = Sock::new(341);
        s.uto = 1_000;
        // Listed (and predicted in the view) from the first RTO.
        let mut e = Engine::new(EngineConfig {
            min_rto_streak: 1,
            ..cfg()
        })
        .unwrap();
        if tlp {
            e.ingest(&s.retransmit(T0, 5, 0, 0, 51, 1_000, 0));
        }
        e.ingest(&s.rto(T0 + 700 * MS, 0, 0, 51, 1_000));
        e.ingest(&s.retransmit(T0 + 700 * MS + 30_000, 0, 1, 0, 102, 1_000, 1));
        view_of(&e, 341, T0 + 701 * MS)
            .predicted_timeout_ns
            .expect("a prediction")
    };
    let (without, with) = (predicted(false), predicted(true));
    assert_eq!(
        with,
        without,
        "with a loss probe 0.7 s before: predicted {:+.3} s off",
        (with as f64 - without as f64) / 1e9
    );
}

/// `streak.rs:194` (`!(ep.stamp == 0 && is_rto_expiry)`: `&&` -> `||`)
/// and `:200` (`same = ep.stamp == 0 && close`: `&&` -> `||`): the kernel
/// sets `retrans_stamp` once per loss episode and clears it when every
/// retransmission is acknowledged, so a stamp that went back to 0, or was
/// replaced by another, means the previous episode recovered, even when
/// the ACK was not seen and `snd_una` could not be read.
#[test]
fn a_cleared_or_new_retrans_stamp_ends_the_episode() {
    let s1 = ms_stamp(T0);
    // Cleared: a fast retransmission's episode, then an RTO with stamp 0.
    let s = Sock::new(342);
    let mut e = engine();
    e.ingest(&s.retransmit(T0, 1, 0, 0, 51, 0, 0));
    e.ingest(&s.retransmit(T0 + 10 * MS, 1, 0, s1, 51, 0, 0));
    assert!(streak_ends(&drain(&mut e)).is_empty());
    e.ingest(&s.rto(T0 + 2 * S, 0, 0, 51, 0));
    assert_eq!(
        streak_outcomes(&drain(&mut e)),
        vec![StreakOutcome::Recovered],
        "retrans_stamp cleared"
    );
    // Replaced, less than a second later: one RTO's episode, then a fast
    // retransmission of a new one (its stamp set by the first of them).
    let s = Sock::new(343);
    let mut e = engine();
    e.ingest(&s.rto(T0 + 204 * MS, 0, s1, 51, 0));
    assert!(streak_ends(&drain(&mut e)).is_empty());
    e.ingest(&s.retransmit(T0 + 900 * MS, 1, 0, ms_stamp(T0 + 850 * MS), 51, 0, 0));
    assert_eq!(
        streak_outcomes(&drain(&mut e)),
        vec![StreakOutcome::Recovered],
        "retrans_stamp replaced"
    );
}

/// `horizon/mod.rs` `predict_probe_count_death`: `w.at_jiffies != 0` ->
/// `==` (the walk through the timer wheel) and `backoff < w.backoff_cap`
/// -> `<=`. Refereed by the kernel model: each non-fatal probe expiry at
/// jiffy `j` backs off (`tcp_send_probe0()`: `icsk_backoff++` below
/// `tcp_retries2`) and re-arms `min(max(rto, 200 ms) << backoff, rto_max)`
/// later, placed on the wheel with `clk = j + 1`
/// (`kernel_model::wheel_bucket_expiry`).
#[test]
fn probe_count_walk_follows_the_wheel_and_the_backoff_cap() {
    let hz = u64::from(HZ);
    let at_j = jiffies_at(HZ, T0);
    let kernel = |probes_out: u32, backoff: u32, limit: u32, cap: u32, wheel: bool| {
        let (mut j, mut b) = (at_j, backoff);
        for _ in probes_out..limit {
            if b < cap {
                b += 1;
            }
            let when = kernel_model::msecs_to_jiffies((204u64 << b).min(120_000), hz);
            j = if wheel {
                kernel_model::wheel_bucket_expiry(j + when, j + 1, hz)
            } else {
                j + when
            };
        }
        T0 + ts_of_jiffies(HZ, j) - ts_of_jiffies(HZ, at_j)
    };
    for (probes_out, backoff, limit, cap, wheel) in [
        (1u32, 1u32, 5u32, 5u32, true), // retries2 5, through the wheel
        (1, 1, 8, 3, false),            // an orphan's 8 with tcp_retries2 3
    ] {
        let w = horizon::ProbeWalk {
            at_ns: T0,
            at_jiffies: at_j,
            probes_out,
            backoff,
            rto_ms: 204,
            rto_max_ms: 120_000,
            limit,
            backoff_cap: cap,
            hz: HZ,
            timer_wheel: wheel,
        };
        let want = kernel(probes_out, backoff, limit, cap, wheel);
        let got = horizon::predict_probe_count_death(&w).expect("a death");
        assert_eq!(
            got,
            want,
            "limit {limit}, cap {cap}, wheel {wheel}: {:.3} s, the kernel's {:.3} s",
            (got - T0) as f64 / 1e9,
            (want - T0) as f64 / 1e9
        );
    }
}

fn sweep(mut ev: SockEvent) -> SockEvent {
    ev.kind = EventKind::Sweep;
    ev.mechanism = Mechanism::Sweep;
    ev
}

/// `seed.rs:96` (`if ev.cookie != 0` -> `==`: a cookie-less snapshot's
/// flow looked up by cookie 0, never found) and `:142` (`sweep_repaired +=
/// 1` -> `*=`, `-=`): a socket known only by its kernel address (no event
/// named its cookie) swept without a cookie (the plain sweep) is the same
/// flow: a snapshot older than its events is ignored, a newer one with
/// more RTOs repairs it.
#[test]
fn cookieless_snapshot_of_a_flow_known_by_address() {
    let mut s = Sock::new(350);
    s.cookie = 0;
    let st = ms_stamp(T0);
    let mut e = engine();
    e.ingest(&s.rto(T0 + 204 * MS, 0, st, 51, 1_000));
    e.ingest(&s.rto(T0 + 612 * MS, 1, st, 102, 1_000));
    let snap = |ts: u64, r: u32, rto: u32| {
        let mut ev = sweep(s.rto(ts, r, st, rto, 1_000));
        let f = ev.sock.as_mut().unwrap();
        f.backoff = r;
        f.timer_expires = jiffies_at(HZ, ts) + u64::from(rto) / 2;
        ev
    };
    e.ingest(&snap(T0 + 500 * MS, 2, 204));
    assert_eq!(e.stats().sweep_ignored, 1, "older than the events");
    assert_eq!(e.stats().sweep_seeded, 0);
    e.ingest(&snap(T0 + 3 * S, 3, 408));
    let st = e.stats();
    assert_eq!(
        (st.sweep_repaired, st.sweep_seeded, st.sweep_ignored),
        (1, 0, 1),
        "a newer snapshot with more RTOs repairs the flow"
    );
    assert_eq!(e.flows_tracked(), 1);
    assert_eq!(e.stalls(T0 + 3 * S + MS)[0].rto_streak, 3);
}

/// `seed.rs:127` (`rcv_tstamp == 0 || age_j > i32::MAX`: `||` -> `&&`,
/// `>` -> `==`, `>=`): a CLOSE_WAIT snapshot dates the FIN by `rcv_tstamp`
/// (a u32 jiffies stamp, compared as the kernel does, `(s32)(now -
/// stamp)`): unknown (0) or ahead of now is "since the snapshot"; 2^31 - 1
/// jiffies ago is still a valid age.
#[test]
fn close_wait_snapshot_dates_the_fin_by_rcv_tstamp() {
    let now = T0 + 200 * 86_400 * S;
    let now_j = jiffies_at(HZ, now) as u32;
    let oldest = (i32::MAX as u64) * S / u64::from(HZ);
    for (what, rcv_tstamp, age_s) in [
        ("unknown", 0u32, 0.0),
        ("ahead of now", now_j.wrapping_add(100), 0.0),
        (
            "2^31 - 1 jiffies ago",
            now_j.wrapping_sub(i32::MAX as u32),
            oldest as f64 / 1e9,
        ),
    ] {
        let s = Sock::new(351);
        let mut snap = sweep(s.base(EventKind::Sweep, now));
        snap.state = TcpState::CloseWait;
        snap.packets_out = 0;
        let mut f = s.fields(0, 0, 0, now);
        f.rcv_tstamp = rcv_tstamp;
        f.timer_expires = 0;
        snap.sock = Some(f);
        let mut e = engine();
        e.ingest(&snap);
        let later = now + 61 * S;
        let v = view_of(&e, 351, later);
        assert_eq!(v.class, StallClass::CloseWait);
        let age = v.close_wait_age_s.unwrap();
        assert!(
            (age - (age_s + 61.0)).abs() < 0.01,
            "{what}: close_wait_age_s {age}, want {}",
            age_s + 61.0
        );
    }
}

/// `seed.rs:250` (`window_shrunk = snd_wnd == 0 && packets_out > 0`: `>`
/// -> `<`, `==`): an RTO backoff swept with the peer's window at 0 is in
/// `tcp_retransmit_timer()`'s zero-window branch: no retries2 prediction,
/// as for a watched one.
#[test]
fn rto_snapshot_with_a_zero_window_gets_no_prediction() {
    let s = Sock::new(352);
    let st = ms_stamp(T0);
    let now = T0 + 3 * S;
    let mut snap = sweep(s.rto(now, 3, st, 408, 1_000));
    let f = snap.sock.as_mut().unwrap();
    f.backoff = 3;
    f.timer_expires = jiffies_at(HZ, now) + 100;
    f.snd_wnd = 0;
    let mut e = engine();
    e.ingest(&snap);
    let v = view_of(&e, 352, now + MS);
    assert_eq!(v.rto_streak, 3);
    assert_eq!(v.predicted_timeout_ns, None);
}

/// `seed.rs:310` (`last_probe_ns = next - last_interval * NSEC_PER_MSEC`)
/// and `:316` (`next_interval_ns = last_interval * NSEC_PER_MSEC`), `*`
/// -> `+`, `/`: a zero-window sender swept with backoff 6 and its probe
/// timer 1 s ahead. The last probe went out one interval (`204 ms << 6`,
/// 13.056 s) before that timer; the pending probe gets the grace of that
/// interval (1 s + half of it) before the episode counts as ended, and it
/// ended (quiet) at that last probe: 24.908 + 1 - 13.056 s after the
/// window closed.
#[test]
fn seeded_zero_window_episode_waits_and_ends_at_its_last_probe() {
    let s = Sock::new(353);
    let now = T0 + 100 * S;
    let mut snap = sweep(s.probe(now, 6, 6));
    snap.sock.as_mut().unwrap().timer_expires = jiffies_at(HZ, now) + u64::from(HZ);
    let mut e = engine();
    e.ingest(&snap);
    e.tick(now + 6 * S);
    assert!(
        drain(&mut e)
            .iter()
            .all(|o| !matches!(o, Observation::ZeroWindowEnded { .. })),
        "5 s past the pending probe is within its grace (7.5 s)"
    );
    e.tick(now + 9 * S);
    let ended: Vec<_> = drain(&mut e)
        .into_iter()
        .filter_map(|o| match o {
            Observation::ZeroWindowEnded { duration_s, by, .. } => Some((duration_s, by)),
            _ => None,
        })
        .collect();
    assert_eq!(ended.len(), 1, "ended past the grace");
    let (d, by) = ended[0];
    assert_eq!(by, PersistEnd::Quiet);
    assert!((d - 12.852).abs() < 0.01, "duration {d} s, want 12.852");
}

/// `seed.rs:246` (the anchor's count `r - 1` -> `r + 1`, `r / 1`):
/// `retransmits_timed_out()` is false while `icsk_retransmits == 0`, so
/// the first RTO retransmits however old `retrans_stamp` is (here a fast
/// retransmission 13 s earlier started the episode, past the 12.6 s of
/// `tcp_retries2` 5); the socket dies at the next expiry, the pending
/// timer, not at the one already past.
#[test]
fn swept_after_one_rto_past_the_boundary_dies_at_the_pending_expiry() {
    let s = Sock::new(354);
    let mut e = Engine::new(EngineConfig {
        timer_wheel: false,
        min_rto_streak: 1,
        ..cfg()
    })
    .unwrap();
    let first_rto = T0 + 13 * S;
    let now = first_rto + 200 * MS;
    let mut snap = sweep(s.rto(now, 1, ms_stamp(T0), 102, 1_000));
    let f = snap.sock.as_mut().unwrap();
    f.backoff = 1;
    f.timer_expires = jiffies_at(HZ, first_rto) + 102;
    e.ingest(&snap);
    let pending = ts_of_jiffies(HZ, jiffies_at(HZ, first_rto) + 102);
    let v = view_of(&e, 354, now + MS);
    let p = v.predicted_timeout_ns.expect("a prediction");
    assert!(
        p.abs_diff(pending) <= 4 * MS,
        "predicted {:+.3} s from the pending expiry",
        (p as f64 - pending as f64) / 1e9
    );
}

/// `seed.rs:222` (`timer_wheel && timer_expires != 0`: `&&` -> `||`, `!=`
/// -> `==`): a swept RTO backoff at `rto_max` (120 s, wheel level 3 at HZ
/// 250: 2.048 s buckets) expects its next expiry where the timer wheel
/// fires the pending timer (`kernel_model::wheel_bucket_expiry`, armed one
/// RTO earlier) when the wheel is modelled, at the armed jiffy when not;
/// the streak counts as recovered only a grace (1 s + 60 s) after that.
#[test]
fn swept_rto_streak_expects_the_pending_timer_as_the_wheel_fires_it() {
    let hz = u64::from(HZ);
    let rto_j = 120 * hz;
    let now = T0 + 1_000 * S;
    let now_j = jiffies_at(HZ, now);
    // An expiry that the wheel rounds up by most of a bucket.
    let expires = (now_j + 10 * hz) / 512 * 512 + 1;
    let last_j = expires - rto_j;
    let fired = kernel_model::wheel_bucket_expiry(expires, last_j + 1, hz);
    assert!(
        fired >= expires + 400,
        "rounded up by {} jiffies",
        fired - expires
    );
    for wheel in [true, false] {
        let s = Sock::new(355);
        let mut e = Engine::new(EngineConfig {
            timer_wheel: wheel,
            ..cfg()
        })
        .unwrap();
        let mut snap = sweep(s.rto(now, 12, ms_stamp(T0), rto_j as u32, 1_000));
        let f = snap.sock.as_mut().unwrap();
        f.backoff = 12;
        f.timer_expires = expires;
        e.ingest(&snap);
        let due = ts_of_jiffies(HZ, if wheel { fired } else { expires });
        let grace = S + 60 * S;
        // Just before the end of the grace, and just after it.
        e.tick(due + grace - 200 * MS);
        assert!(
            streak_ends(&drain(&mut e)).is_empty(),
            "wheel {wheel}: ended before its next expiry's grace"
        );
        e.tick(due + grace + 200 * MS);
        assert_eq!(
            streak_outcomes(&drain(&mut e)),
            vec![StreakOutcome::Recovered],
            "wheel {wheel}: not ended after its next expiry's grace"
        );
    }
}

/// `handlers.rs:369` (`if !(uto_dead || count_dead)` -> `&&`: the
/// prediction recomputed at the fatal probe) and `:400` (the count rule's
/// `boundary_ms = (death - first) / NSEC_PER_MSEC`, `/` -> `%`, `*`): data
/// that never left, `tcp_retries2` 5, unanswered probes 204 ms << b apart.
/// The boundary is the time from the episode's first probe (the one that
/// found the previous unanswered) to the fatal one; the timeout's error is
/// that of the last prediction made before the fatal expiry (here 50 ms
/// late), not one made at it.
#[test]
fn unsent_data_count_death_keeps_the_prediction_made_before_it() {
    let s = Sock::new(356);
    let mut e = Engine::new(EngineConfig {
        timer_wheel: false,
        ..cfg()
    })
    .unwrap();
    let t = unsent_probe_times(6);
    for (i, &ts) in t[..5].iter().enumerate() {
        e.ingest(&s.unsent_probe(ts, i as u32, i as u32));
    }
    let v = view_of(&e, 356, t[4] + MS);
    assert_eq!(v.predicted_timeout_ns, Some(t[5]));
    assert_eq!(v.boundary_s, Some(((t[5] - t[1]) / MS) as f64 / 1e3));
    let late = t[5] + 50 * MS;
    e.ingest(&s.unsent_probe(late, 5, 5));
    e.ingest(&s.error(late + MS, 110));
    let t = timeouts(&drain(&mut e));
    assert_eq!(t.len(), 1);
    let Observation::Timeout {
        predicted_ns,
        prediction_error_s,
        ..
    } = t[0]
    else {
        unreachable!()
    };
    assert_eq!(predicted_ns, Some(late - 50 * MS));
    let err = prediction_error_s.unwrap();
    assert!((err - 0.051).abs() < 1e-6, "prediction error {err} s");
}

/// `horizon/mod.rs` `timer_wheel_fire`: `expires < clk` -> `<=` (a timer
/// armed for the wheel's current clock goes to level 0 and runs a jiffy
/// later, `calc_index()`'s round-up; reached by a one-jiffy re-arm, the
/// user-timeout clamp's `remaining <= 0`). Refereed by the kernel model's
/// own `calc_wheel_index()` (`kernel_model::wheel_bucket_expiry`) over
/// every level a TCP timer reaches (up to 2^26 jiffies: `MAX_TCP_KEEPIDLE`
/// 32767 s at HZ 1000 is 3.3e7), at each level's edges.
#[test]
fn timer_wheel_fire_matches_the_kernel_model() {
    for hz in [100u32, 250, 300, 1000] {
        for clk in [0u64, 1, 4_294_892_296, 4_295_000_000, 123_456_789] {
            let mut deltas: Vec<u64> = (0..70).collect();
            for n in 1..9u32 {
                let start = 63u64 << ((n - 1) * 3);
                deltas.extend([start - 1, start, start + 1, start + 7, 2 * start + 3]);
            }
            deltas.extend([1 << 20, (1 << 26) - 1]);
            for d in deltas.into_iter().filter(|&d| d < 1 << 26) {
                let (e, c) = (clk + d, clk);
                assert_eq!(
                    horizon::timer_wheel_fire(e, c, hz),
                    kernel_model::wheel_bucket_expiry(e, c, u64::from(hz)),
                    "expires clk + {d}, clk {clk}, HZ {hz}"
                );
            }
        }
    }
}

/// `horizon/mod.rs` `stamp_to_ns`: `age > i32::MAX` -> `>=`: the kernel
/// compares `retrans_stamp` as `(s32)(tcp_time_stamp - retrans_stamp)`
/// (`retransmits_timed_out()`), so a stamp 2^31 - 1 ms old (24.8 days) is
/// still that old, not "in the future".
#[test]
fn retrans_stamp_of_the_oldest_representable_age_is_dated() {
    let s = Sock::new(357);
    let now = T0 + 30 * 86_400 * S;
    let stamp = ms_stamp(now).wrapping_sub(i32::MAX as u32);
    // The first event of the flow carries it (the episode's start is
    // taken from the first stamp seen); listed from one RTO.
    let mut e = Engine::new(EngineConfig {
        min_rto_streak: 1,
        ..cfg()
    })
    .unwrap();
    e.ingest(&s.rto(now, 6, stamp, 30_000, 1_000));
    let v = view_of(&e, 357, now);
    let age = v.unacked_age_s.expect("an age");
    assert!(
        (age - f64::from(i32::MAX) / 1e3).abs() < 1.0,
        "unacked_age_s {age}, want {}",
        f64::from(i32::MAX) / 1e3
    );
}

/// `handlers.rs` `on_probe`: `probes > 1` -> `>=` (the user-timeout abort
/// never at an episode's first probe): `tcp_probe_timer()` only stamps
/// `icsk_probes_tstamp` at the first probe. A zero-window sender swept
/// before its first probe (backoff 0, the probe timer 1 s ahead) with a
/// 300 ms user timeout survives that probe, and dies at the next.
#[test]
fn seeded_zero_window_survives_its_first_probe_under_a_short_user_timeout() {
    let mut s = Sock::new(358);
    s.uto = 300;
    s.sysctls = Some(sysctls(15));
    let now = T0 + 100 * S;
    let mut snap = sweep(s.probe(now, 0, 0));
    snap.sock.as_mut().unwrap().timer_expires = jiffies_at(HZ, now) + u64::from(HZ);
    let mut e = engine();
    e.ingest(&snap);
    let first = now + S;
    e.ingest(&s.probe(first, 0, 0));
    e.ingest(&s.error(first + MS, EHOSTUNREACH));
    assert!(
        timeouts(&drain(&mut e)).is_empty(),
        "the first probe stamps icsk_probes_tstamp, it never aborts"
    );
    e.ingest(&s.probe(first + 300 * MS, 1, 0));
    e.ingest(&s.error(first + 301 * MS, EHOSTUNREACH));
    assert_eq!(
        timeouts(&drain(&mut e)).len(),
        1,
        "300 ms after the first probe"
    );
}

/// `streak.rs` `absorb`: `ev.cgroup_id != 0` -> `==` (the flow's cgroup,
/// hence its pod, from the events that read it), `ev.rto_jiffies != 0` ->
/// `==` (`icsk_rto` as the view shows it), and `ev.kind != State &&
/// !matches!(ev.state, Unknown(_))` -> `||` (a state no kernel has, read
/// by a failed probe read, never replaces the one known).
#[test]
fn absorb_keeps_the_cgroup_the_rto_and_a_known_state() {
    let s = Sock::new(360);
    let mut e = engine();
    let times = [0u64, 204, 612, 1_428, 3_060, 6_324];
    for (b, t) in times.into_iter().enumerate() {
        let mut p = s.probe(T0 + t * MS, b as u32, b as u32);
        if b == 0 {
            p.cgroup_id = 4242;
        }
        if b == 5 {
            p.state = TcpState::Unknown(99);
        }
        e.ingest(&p);
    }
    let v = view_of(&e, 360, T0 + 6_400 * MS);
    assert_eq!(v.cgroup_id, 4242);
    assert_eq!(v.rto_ms, 204, "icsk_rto 51 jiffies at HZ 250");
    assert_eq!(v.state, TcpState::Established);
}

/// `streak.rs` `end_streak`: the per-flow history (`recovered += 1`,
/// `timed_out += 1` -> `-=`, `*=`) as the view reports it: a streak that
/// recovered (ACK), one the kernel's verdict said died (no close came: a
/// timeout by verdict after the settle time) and that then retransmitted
/// again, and the current one.
#[test]
fn flow_history_counts_recovered_and_timed_out_streaks() {
    let mut s = Sock::new(361);
    s.sysctls = Some(sysctls(3));
    let mut e = engine();
    let st = ms_stamp(T0);
    e.ingest(&s.rto(T0 + 204 * MS, 0, st, 51, 1_000));
    e.ingest(&s.rto(T0 + 612 * MS, 1, st, 102, 1_000));
    e.ingest(&ack(&s, T0 + 700 * MS, 1_000, 2_000, 2));
    // A new episode: retries2 3 kills it at 3.06 s after its stamp.
    let t1 = T0 + 10 * S;
    let st1 = ms_stamp(t1);
    for (r, (t, rto)) in [(204u64, 51u32), (612, 102), (1_428, 204), (3_060, 408)]
        .into_iter()
        .enumerate()
    {
        e.ingest(&s.rto(t1 + t * MS, r as u32, st1, rto, 2_000));
    }
    e.tick(t1 + 6 * S);
    assert_eq!(timeouts(&drain(&mut e)).len(), 1, "dead by the verdict");
    // It was not: it retransmits on.
    e.ingest(&s.rto(t1 + 6_324 * MS, 4, st1, 816, 2_000));
    let v = view_of(&e, 361, t1 + 6_400 * MS);
    assert_eq!(
        (v.history.streaks, v.history.recovered, v.history.timed_out),
        (3, 1, 1)
    );
}

/// `streak.rs` `end_streak` (`f.announced &= !(Retransmit | Connect)`:
/// `&=` -> `|=`, `!` deleted, `|` -> `&`; `outcome == Recovered` -> `!=`,
/// which keeps the streak's prediction) and `end_persist`
/// (`announced &= !Retransmit` after data that never left, `&= !ZeroWindow`
/// after a zero window: `&=` -> `|=`, `!` deleted): one flow through an
/// RTO stall that recovers, a zero-window stall, an episode of unsent data,
/// another RTO stall: each is announced when it starts, and the zero
/// window (no user timeout) is listed without the RTO streak's prediction.
#[test]
fn each_stall_of_a_flow_is_announced_after_the_previous_ended() {
    let s = Sock::new(362);
    let mut e = engine();
    let mut announced = Vec::new();
    let mut note = |e: &mut Engine| {
        for o in drain(e) {
            if let Observation::StallStarted { class, .. } = o {
                announced.push(class);
            }
        }
    };
    // An RTO stall, recovered by an ACK.
    let st = ms_stamp(T0);
    e.ingest(&s.rto(T0 + 204 * MS, 0, st, 51, 1_000));
    e.ingest(&s.rto(T0 + 612 * MS, 1, st, 102, 1_000));
    e.ingest(&ack(&s, T0 + 700 * MS, 1_000, 2_000, 2));
    note(&mut e);
    // A zero window for 6.3 s, ended by an ACK.
    let z = T0 + S;
    for (b, t) in [0u64, 204, 612, 1_428, 3_060, 6_324]
        .into_iter()
        .enumerate()
    {
        e.ingest(&s.probe(z + t * MS, b as u32, b as u32));
    }
    e.tick(z + 6_400 * MS);
    let v = view_of(&e, 362, z + 6_400 * MS);
    assert_eq!(v.class, StallClass::ZeroWindow);
    assert_eq!(v.predicted_timeout_ns, None, "the RTO streak's prediction");
    e.ingest(&ack(&s, z + 6_500 * MS, 2_000, 3_000, 0));
    note(&mut e);
    // Data that never left: two unanswered probes, then a retransmission
    // (RTO) ends the episode; a second RTO streak stalls.
    let u = T0 + 20 * S;
    e.ingest(&unsent_probe(&s, u, 0));
    e.ingest(&unsent_probe(&s, u + 204 * MS, 1));
    note(&mut e);
    let st2 = ms_stamp(u + S);
    e.ingest(&s.rto(u + S, 0, st2, 51, 3_000));
    e.ingest(&s.rto(u + S + 408 * MS, 1, st2, 102, 3_000));
    note(&mut e);
    assert_eq!(
        announced,
        vec![
            StallClass::Retransmit,
            StallClass::ZeroWindow,
            StallClass::Retransmit,
            StallClass::Retransmit
        ]
    );
}

/// `streak.rs` `is_rto_expiry` (`-> true`; the `(Retransmit, Some(s))` arm
/// deleted; `s.pending == 0` -> `!=`), read by `update_episode` for an
/// event with `retrans_stamp` still 0 after an unstamped episode: a loss
/// probe leaves the stamp 0 (`__tcp_retransmit_skb()`), so the RTO that
/// follows it (seen by its retransmission alone, `icsk_pending` 0)
/// continues the same loss, while a fast retransmission (`icsk_pending` 1:
/// the probe was answered with SACKs) starts the kernel's episode: the
/// probe's streak ended.
#[test]
fn after_a_loss_probe_an_rto_continues_and_a_fast_retransmit_starts_anew() {
    for (pending, ends) in [(0u32, 0usize), (1, 1)] {
        let s = Sock::new(363);
        let mut e = engine();
        e.ingest(&s.retransmit(T0, 5, 0, 0, 51, 1_000, 0));
        e.ingest(&s.retransmit(T0 + 300 * MS, pending, 0, 0, 51, 1_000, 0));
        assert_eq!(
            streak_ends(&drain(&mut e)).len(),
            ends,
            "icsk_pending {pending} after a loss probe"
        );
    }
}

/// `streak.rs` `knows_retransmits` (`-> false`; `&&` -> `||`, which
/// takes every retransmission for sock_ops'): a retransmission event reads
/// `icsk_retransmits`, which only a forward ACK resets (`tcp_ack()`), so a
/// fast retransmission with a count below the streak's is progress even
/// when `snd_una` could not be read.
#[test]
fn a_retransmission_with_a_lower_count_is_progress() {
    let s = Sock::new(364);
    let st = ms_stamp(T0);
    let mut e = engine();
    e.ingest(&s.rto(T0 + 204 * MS, 0, st, 51, 0));
    e.ingest(&s.rto(T0 + 612 * MS, 1, st, 102, 0));
    e.ingest(&s.rto(T0 + 1_428 * MS, 2, st, 204, 0));
    assert!(streak_ends(&drain(&mut e)).is_empty());
    e.ingest(&s.retransmit(T0 + 2 * S, 1, 0, st, 51, 0, 0));
    assert_eq!(
        streak_outcomes(&drain(&mut e)),
        vec![StreakOutcome::Recovered]
    );
}

/// `streak.rs` `check_retransmit_stall` (`f.announced |= class.bit()` ->
/// `&=`, which also clears the other classes' bits): a socket in
/// CLOSE_WAIT (the peer closed; the application still sends) whose data
/// then goes unanswered is announced as a CLOSE_WAIT stall once and as a
/// `retransmit` stall once.
#[test]
fn close_wait_then_rto_stall_each_announced_once() {
    let s = Sock::new(365);
    let mut e = engine();
    e.ingest(&s.state(T0, TcpState::Established, TcpState::CloseWait));
    e.tick(T0 + 61 * S);
    let st = ms_stamp(T0 + 62 * S);
    for (r, t) in [204u64, 612].into_iter().enumerate() {
        let mut ev = s.rto(T0 + 62 * S + t * MS, r as u32, st, 51 << r, 1_000);
        ev.state = TcpState::CloseWait;
        e.ingest(&ev);
    }
    e.tick(T0 + 63 * S);
    let obs = drain(&mut e);
    assert_eq!(
        (
            stall_starts(&obs, StallClass::CloseWait),
            stall_starts(&obs, StallClass::Retransmit)
        ),
        (1, 1)
    );
}

/// `streak.rs` `refresh_predictions` (`anchor && streak && !dead`: the
/// second `&&` -> `||`): when HZ is calibrated, only RTO streaks are
/// re-predicted; a zero-window sender's user-timeout prediction (from its
/// first probe, `tcp_probe_timer()`) keeps its value.
#[test]
fn hz_calibration_keeps_a_zero_window_prediction() {
    let mut e = Engine::new(EngineConfig::default()).unwrap();
    let mut s = Sock::new(366);
    s.hz = 1000;
    s.uto = 120_000;
    let jif = |ts: u64| 9_000_000 + ts / MS;
    let t0 = 60 * S;
    // Three probes: too few to calibrate HZ.
    for (b, t) in [0u64, 3_060, 6_324].into_iter().enumerate() {
        let mut p = s.probe(t0 + t * MS, b as u32, b as u32);
        p.jiffies = jif(t0 + t * MS);
        e.ingest(&p);
    }
    assert_eq!(e.hz(), (250, HzSource::Default), "not calibrated yet");
    let before = view_of(&e, 366, t0 + 6_400 * MS).predicted_timeout_ns;
    assert_eq!(before, Some(t0 + 120 * S));
    let other = Sock::new(367);
    for i in 0..8u64 {
        let t = t0 + 6_400 * MS + i * 2_100 * MS;
        let mut ev = other.retransmit(t, 1, 0, 0, 200, i as u32, 0);
        ev.jiffies = jif(t);
        e.ingest(&ev);
    }
    assert_eq!(e.hz().0, 1000, "calibrated");
    let v = view_of(&e, 366, t0 + 7 * S);
    assert_eq!(v.predicted_timeout_ns, before);
}

/// `streak.rs` `end_streak` (`outcome == Recovered` -> `!=`: a recovered
/// streak keeps its verdict): the netns said `tcp_retries2` 3, so the
/// expiry at 3.06 s looked fatal, but an ACK of new data came: the socket
/// lives. A soft error reported (`IP_RECVERR`) a moment later is no
/// timeout.
#[test]
fn a_recovered_streak_forgets_its_death_verdict() {
    let mut s = Sock::new(368);
    s.sysctls = Some(sysctls(3));
    let st = ms_stamp(T0);
    let mut e = engine();
    for (r, (t, rto)) in [(204u64, 51u32), (612, 102), (1_428, 204), (3_060, 408)]
        .into_iter()
        .enumerate()
    {
        e.ingest(&s.rto(T0 + t * MS, r as u32, st, rto, 1_000));
    }
    e.ingest(&ack(&s, T0 + 3_100 * MS, 1_000, 2_000, 4));
    e.ingest(&s.error(T0 + 3_200 * MS, EHOSTUNREACH));
    assert!(timeouts(&drain(&mut e)).is_empty(), "an ACK came: alive");
}

/// `streak.rs` `end_persist` (`f.announced &= !ZeroWindow.bit()`: `!`
/// deleted, which keeps the bit): two zero-window episodes, one after the
/// other (the window reopened by an ACK in between), are two stalls.
#[test]
fn a_second_zero_window_episode_is_announced_again() {
    let s = Sock::new(369);
    let mut e = engine();
    let mut zw = 0;
    for (k, start) in [T0, T0 + 20 * S].into_iter().enumerate() {
        for (b, t) in [0u64, 204, 612, 1_428, 3_060, 6_324]
            .into_iter()
            .enumerate()
        {
            e.ingest(&s.probe(start + t * MS, b as u32, b as u32));
        }
        e.tick(start + 6_400 * MS);
        e.ingest(&ack(
            &s,
            start + 6_500 * MS,
            1_000 + k as u32,
            2_000 + k as u32,
            0,
        ));
        zw += stall_starts(&drain(&mut e), StallClass::ZeroWindow);
    }
    assert_eq!(zw, 2);
}
