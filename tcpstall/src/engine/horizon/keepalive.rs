//! Keepalive (issue 20, item 2): `tcp_keepalive_timer()` of
//! net/ipv4/tcp_timer.c, the death of an idle socket whose keepalive probes
//! go unanswered.
//!
//! At each expiry of `sk->sk_timer` (nothing in flight, write queue empty):
//! `elapsed = keepalive_time_elapsed()` (jiffies since the last receive,
//! `min(now - icsk_ack.lrcvtime, now - rcv_tstamp)`). When
//! `elapsed >= keepalive_time_when()`:
//! - with a user timeout `u`: dead when `elapsed >= msecs_to_jiffies(u)`
//!   and `icsk_probes_out > 0`;
//! - without: dead when `icsk_probes_out >= keepalive_probes()`;
//! - else a probe goes out (`icsk_probes_out++`) and the timer is re-armed
//!   `keepalive_intvl_when()` ahead.
//!
//! Otherwise it is re-armed `keepalive_time_when() - elapsed` ahead. Each
//! of `keepalive_{time,intvl,probes}` is the socket's own value
//! (TCP_KEEPIDLE / TCP_KEEPINTVL / TCP_KEEPCNT) when non-zero, else the
//! socket's netns sysctl. Every re-arm is `sk_reset_timer()` (`mod_timer`):
//! the timer wheel rounds it like the RTO's.

use super::{BoundarySource, NoPrediction, jiffies_to_ns, msecs_to_jiffies, rearmed_step};

/// The effective keepalive settings of one socket (jiffies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepaliveRule {
    pub time_j: u64,
    pub intvl_j: u64,
    pub probes: u32,
    /// `icsk_user_timeout` (ms, 0 = off).
    pub user_timeout_ms: u32,
    /// The fatal count's source (TCP_KEEPCNT, the netns sysctl) or the user
    /// timeout that takes over.
    pub source: BoundarySource,
}

/// Per-socket values win when non-zero (`tp->keepalive_time ?: sysctl`).
/// `netns`: the socket's netns `(time_j, intvl_j, probes)`, None when they
/// could not be read. Err when a value the rule needs is unknown (0).
pub fn keepalive_rule(
    socket: (u32, u32, u32),
    netns: Option<(u32, u32, u32)>,
    user_timeout_ms: u32,
) -> Result<KeepaliveRule, NoPrediction> {
    let (nt, ni, np) = netns.unwrap_or((0, 0, 0));
    let pick = |own: u32, ns: u32| if own != 0 { own } else { ns };
    let time_j = u64::from(pick(socket.0, nt));
    let intvl_j = u64::from(pick(socket.1, ni));
    let probes = pick(socket.2, np);
    if time_j == 0 || intvl_j == 0 || (user_timeout_ms == 0 && probes == 0) {
        return Err(NoPrediction::KeepaliveUnknown);
    }
    let source = if user_timeout_ms != 0 {
        BoundarySource::UserTimeout
    } else if socket.2 != 0 {
        BoundarySource::KeepCnt(probes)
    } else {
        BoundarySource::KeepaliveProbes(probes)
    };
    Ok(KeepaliveRule {
        time_j,
        intvl_j,
        probes,
        user_timeout_ms,
        source,
    })
}

/// One keepalive timer expiry, as seen before the kernel handled it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KeepaliveWalk {
    /// This expiry (monotonic ns) and `jiffies` then (0 = unknown: no
    /// timer wheel modelling).
    pub at_ns: u64,
    pub at_jiffies: u64,
    /// `icsk_probes_out` at this expiry.
    pub probes_out: u32,
    /// `keepalive_time_elapsed()` at this expiry (jiffies).
    pub elapsed_j: u64,
    pub rule: KeepaliveRule,
    pub hz: u32,
    pub timer_wheel: bool,
}

/// The fatal expiry: its instant and how many expiries after this one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepaliveDeath {
    pub at_ns: u64,
    pub expiries_after: u32,
}

/// Walks `tcp_keepalive_timer()` from the expiry `w` to the one that kills
/// the socket (this one when it is fatal already), assuming nothing is
/// received. None when no expiry within 1 000 does.
pub fn predict_keepalive_death(w: &KeepaliveWalk) -> Option<KeepaliveDeath> {
    if w.hz == 0 {
        return None;
    }
    let r = w.rule;
    let wheel = w.timer_wheel && w.at_jiffies != 0;
    let uto_j = msecs_to_jiffies(u64::from(r.user_timeout_ms), w.hz);
    let (mut j, mut elapsed, mut probes, mut total) =
        (w.at_jiffies, w.elapsed_j, w.probes_out, 0u64);
    for step in 0..1_000u32 {
        let interval = if elapsed >= r.time_j {
            let dead = if r.user_timeout_ms != 0 {
                elapsed >= uto_j && probes > 0
            } else {
                probes >= r.probes
            };
            if dead {
                return Some(KeepaliveDeath {
                    at_ns: w.at_ns.saturating_add(jiffies_to_ns(total, w.hz)),
                    expiries_after: step,
                });
            }
            probes = probes.saturating_add(1);
            r.intvl_j
        } else {
            r.time_j - elapsed
        };
        let dt = rearmed_step(j, interval.max(1), w.hz, wheel);
        j = j.saturating_add(dt);
        elapsed = elapsed.saturating_add(dt);
        total = total.saturating_add(dt);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn walk(rule: KeepaliveRule, wheel: bool) -> KeepaliveWalk {
        // The first expiry: 3 000 jiffies (HZ 1000) after the last receive,
        // no probe out yet.
        KeepaliveWalk {
            at_ns: 100 * S,
            at_jiffies: 3_000,
            probes_out: 0,
            elapsed_j: 3_000,
            rule,
            hz: 1_000,
            timer_wheel: wheel,
        }
    }

    fn per_socket(uto: u32) -> KeepaliveRule {
        keepalive_rule((3_000, 2_000, 4), Some((7_200_000, 75_000, 9)), uto).unwrap()
    }

    /// TCP_KEEPIDLE 3 s / TCP_KEEPINTVL 2 s / TCP_KEEPCNT 4 without the
    /// timer wheel: probes at 3, 5, 7, 9 s; the expiry at 11 s finds
    /// `icsk_probes_out` 4 >= 4.
    #[test]
    fn keepcnt_dies_at_the_expiry_that_finds_all_probes_out() {
        let r = per_socket(0);
        assert_eq!(r.source, BoundarySource::KeepCnt(4));
        let d = predict_keepalive_death(&walk(r, false)).unwrap();
        assert_eq!(d.at_ns, 108 * S);
        assert_eq!(d.expiries_after, 4);
    }

    /// The same through the timer wheel (HZ 1000): each 2 000-jiffy re-arm
    /// from the callback at j (clk j + 1, delta 1 999: level 2, 64-jiffy
    /// buckets) fires at `((j + 2000) >> 6 + 1) << 6`: 5 056, 7 104, 9 152,
    /// 11 200: 8 200 jiffies after the first expiry.
    #[test]
    fn keepcnt_death_through_the_timer_wheel() {
        let d = predict_keepalive_death(&walk(per_socket(0), true)).unwrap();
        assert_eq!(d.at_ns, 100 * S + 8_200_000_000);
        assert_eq!(d.expiries_after, 4);
    }

    /// TCP_USER_TIMEOUT 6 000 ms takes over: the expiry at 7 104 finds
    /// 7 104 jiffies since the last receive (>= 6 000) and a probe out.
    #[test]
    fn user_timeout_takes_over_at_the_first_expiry_past_it() {
        let r = per_socket(6_000);
        assert_eq!(r.source, BoundarySource::UserTimeout);
        let d = predict_keepalive_death(&walk(r, true)).unwrap();
        assert_eq!(d.at_ns, 100 * S + 4_104_000_000);
        assert_eq!(d.expiries_after, 2);
        // A user timeout is never fatal before a probe went out.
        let mut w = walk(keepalive_rule((3_000, 2_000, 0), None, 1).unwrap(), false);
        w.elapsed_j = 3_000;
        let d = predict_keepalive_death(&w).unwrap();
        assert_eq!(d.expiries_after, 1);
    }

    /// Nothing on the socket: the namespace's 3 s / 2 s / 3 probes.
    #[test]
    fn netns_sysctls_fill_what_the_socket_left_unset() {
        let r = keepalive_rule((0, 0, 0), Some((3_000, 2_000, 3)), 0).unwrap();
        assert_eq!(r.source, BoundarySource::KeepaliveProbes(3));
        let d = predict_keepalive_death(&walk(r, true)).unwrap();
        assert_eq!(d.at_ns, 100 * S + 6_152_000_000);
        // Per socket beats netns field by field.
        let r = keepalive_rule((0, 1_000, 0), Some((3_000, 2_000, 3)), 0).unwrap();
        assert_eq!((r.time_j, r.intvl_j, r.probes), (3_000, 1_000, 3));
    }

    /// An expiry before the idle time is up re-arms for the rest of it
    /// (`keepalive_time_when - elapsed`): data received since.
    #[test]
    fn an_early_expiry_waits_for_the_rest_of_the_idle_time() {
        let mut w = walk(per_socket(0), false);
        w.elapsed_j = 1_000;
        let d = predict_keepalive_death(&w).unwrap();
        assert_eq!(d.at_ns, 110 * S);
        assert_eq!(d.expiries_after, 5);
    }

    #[test]
    fn unknown_settings_give_no_rule() {
        assert_eq!(
            keepalive_rule((0, 0, 0), None, 0),
            Err(NoPrediction::KeepaliveUnknown)
        );
        assert_eq!(
            keepalive_rule((3_000, 2_000, 0), Some((0, 0, 0)), 0),
            Err(NoPrediction::KeepaliveUnknown)
        );
        // A user timeout needs no probe count.
        assert!(keepalive_rule((3_000, 2_000, 0), Some((0, 0, 0)), 5_000).is_ok());
    }
}
