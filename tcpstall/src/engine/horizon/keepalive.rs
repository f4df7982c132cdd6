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
