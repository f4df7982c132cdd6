//! The horizon predictor: when will the kernel kill a retransmitting socket?
//!
//! Pure functions, no state, following `shared/design/kernel-tcp-timeouts.md`:
//!
//! - the boundary is `icsk_user_timeout ?: T(N, 200 ms, rto_max)` where
//!   `T = tcp_model_timeout`, `N = tcp_retries2` of the socket's netns, or the
//!   `tcp_orphan_retries` rule for orphaned (`SOCK_DEAD`) sockets;
//! - the kernel checks it only at an RTO expiry, before that expiry's
//!   retransmission, and only when `icsk_retransmits > 0`: the socket dies at
//!   the first RTO expiry with `now - retrans_stamp >= boundary`;
//! - after each expiry the RTO doubles (capped at `rto_max`), and with a user
//!   timeout the next expiry is clamped to `retrans_stamp + UTO`
//!   (`tcp_clamp_rto_to_user_timeout`);
//! - optionally, the timer wheel's rounding of each expiry is modelled
//!   (`calc_wheel_index`: timers fire at the next bucket boundary of their
//!   level, never early), which is where most of the "lateness" of a real
//!   ETIMEDOUT comes from.

use std::fmt;

use serde::{Serialize, Serializer};

use crate::kernel::event::NetnsSysctls;

/// `TCP_RTO_MIN`: the base of `tcp_model_timeout` from ESTABLISHED on.
pub const TCP_RTO_MIN_MS: u64 = 200;
/// `TCP_TIMEOUT_INIT`: the base in SYN_SENT / SYN_RECV.
pub const TCP_TIMEOUT_INIT_MS: u64 = 1_000;
/// `TCP_RTO_MAX` (the default `rto_max`).
pub const TCP_RTO_MAX_MS: u64 = 120_000;
pub const NSEC_PER_MSEC: u64 = 1_000_000;
pub const NSEC_PER_SEC: u64 = 1_000_000_000;

/// Steps walked one by one before switching to a closed form (only reachable
/// with a huge user timeout: `tcp_retries2` is at most 255).
const MAX_EXACT_STEPS: u32 = 4_096;

/// `tcp_model_timeout(sk, n, base)` in milliseconds:
///
/// ```text
/// K = ilog2(max / base)
/// T = n <= K ? (2^(n+1) - 1) * base : (2^(K+1) - 1) * base + (n - K) * max
/// ```
pub fn model_timeout_ms(n: u32, base_ms: u64, max_ms: u64) -> u64 {
    let base = u128::from(base_ms.max(1));
    let max = u128::from(max_ms);
    let ratio = max / base;
    let k = if ratio == 0 { 0 } else { ratio.ilog2() };
    let t = if n <= k {
        ((2u128 << n) - 1) * base
    } else {
        ((2u128 << k) - 1) * base + u128::from(n - k) * max
    };
    u64::try_from(t).unwrap_or(u64::MAX)
}

/// `msecs_to_jiffies` (rounds up, as the kernel does).
pub fn msecs_to_jiffies(ms: u64, hz: u32) -> u64 {
    (u128::from(ms) * u128::from(hz)).div_ceil(1_000) as u64
}

/// `jiffies_to_msecs` (rounds up, as the kernel does for HZ not dividing 1000).
pub fn jiffies_to_msecs(j: u64, hz: u32) -> u64 {
    let hz = u128::from(hz.max(1));
    (u128::from(j) * 1_000).div_ceil(hz) as u64
}

/// Jiffies to nanoseconds (exact for every HZ dividing 10^9).
pub fn jiffies_to_ns(j: u64, hz: u32) -> u64 {
    let hz = u128::from(hz.max(1));
    u64::try_from(u128::from(j) * u128::from(NSEC_PER_SEC) / hz).unwrap_or(u64::MAX)
}

/// Reconstructs the CLOCK_MONOTONIC instant (ns) of a `retrans_stamp`, a
/// wrapping u32 of milliseconds (microseconds when `usec`) of the same clock,
/// from an event time taken after it. A stamp "in the future" (clock noise)
/// maps to the event time.
pub fn stamp_to_ns(stamp: u32, usec: bool, ts_ns: u64) -> u64 {
    let unit = if usec { 1_000 } else { NSEC_PER_MSEC };
    let now_units = ts_ns / unit;
    let age = (now_units as u32).wrapping_sub(stamp);
    if age > i32::MAX as u32 {
        return ts_ns;
    }
    now_units.saturating_sub(u64::from(age)) * unit
}

/// Where the death boundary comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BoundarySource {
    /// `T(tcp_retries2 = N)` of the socket's netns.
    Retries2(u32),
    /// `TCP_USER_TIMEOUT` replaces the retries rule.
    UserTimeout,
    /// Orphaned socket: `T(N)` with N the effective `tcp_orphan_retries`
    /// (a configured 0 means 8 while the RTO is below its maximum).
    OrphanRetries(u32),
    /// SYN_SENT: `icsk_syn_retries ?: tcp_syn_retries` = N retries (plus the
    /// linear ones), or `T(N, initial RTO)` since the first SYN.
    SynRetries(u32),
    /// SYN_SENT with TCP_SYNCNT set on the socket.
    SynCount(u32),
    /// Keepalive: N unanswered probes, N the netns `tcp_keepalive_probes`.
    KeepaliveProbes(u32),
    /// Keepalive with TCP_KEEPCNT = N set on the socket.
    KeepCnt(u32),
    /// An orphan's FIN_WAIT2 timeout: the netns `tcp_fin_timeout` = N s.
    FinTimeout(u32),
    /// An orphan's FIN_WAIT2 timeout: TCP_LINGER2 = N s on the socket (or
    /// the kernel's floor of 3.5 RTOs).
    Linger2(u32),
}

impl BoundarySource {
    /// The kind without the number: a bounded metric label value.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Retries2(_) => "tcp_retries2",
            Self::UserTimeout => "user_timeout",
            Self::OrphanRetries(_) => "tcp_orphan_retries",
            Self::SynRetries(_) => "tcp_syn_retries",
            Self::SynCount(_) => "tcp_syncnt",
            Self::KeepaliveProbes(_) => "tcp_keepalive_probes",
            Self::KeepCnt(_) => "tcp_keepcnt",
            Self::FinTimeout(_) => "tcp_fin_timeout",
            Self::Linger2(_) => "tcp_linger2",
        }
    }
}

impl fmt::Display for BoundarySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retries2(n) => write!(f, "tcp_retries2={n}"),
            Self::UserTimeout => f.write_str("user_timeout"),
            Self::OrphanRetries(n) => write!(f, "tcp_orphan_retries={n}"),
            Self::SynRetries(n) => write!(f, "tcp_syn_retries={n}"),
            Self::SynCount(n) => write!(f, "tcp_syncnt={n}"),
            Self::KeepaliveProbes(n) => write!(f, "tcp_keepalive_probes={n}"),
            Self::KeepCnt(n) => write!(f, "tcp_keepcnt={n}"),
            Self::FinTimeout(n) => write!(f, "tcp_fin_timeout={n}"),
            Self::Linger2(n) => write!(f, "tcp_linger2={n}"),
        }
    }
}

impl Serialize for BoundarySource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Which rule `retransmits_timed_out()` applies to a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoundaryRule {
    /// `icsk_user_timeout` (ms, non-zero).
    UserTimeout { ms: u32 },
    /// `tcp_retries2` of the socket's netns.
    Retries2 { n: u32 },
    /// `SOCK_DEAD`: `tcp_orphan_retries` of the netns (as configured), and
    /// whether `sk_err_soft` holds an ICMP error (then 0 once not alive).
    Orphan { configured: u32, soft_error: bool },
    /// SYN_SENT: `T(n, initial RTO)` (`n = icsk_syn_retries ?: tcp_syn_retries`;
    /// `per_socket`: from TCP_SYNCNT). The retry count limit is
    /// [`SynLimits`].
    Syn { n: u32, per_socket: bool },
}

/// A boundary evaluated at one RTO expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Boundary {
    pub ms: u64,
    pub source: BoundarySource,
}

impl BoundaryRule {
    /// The rule for a socket: the user timeout wins over everything, then
    /// the orphan rule, then `tcp_retries2`. None when the netns sysctls
    /// are unknown and no user timeout is set. `soft_error`: the socket's
    /// `sk_err_soft` is set (orphans only).
    pub fn select(
        user_timeout_ms: u32,
        orphan: bool,
        soft_error: bool,
        sysctls: Option<NetnsSysctls>,
    ) -> Option<Self> {
        if user_timeout_ms != 0 {
            return Some(Self::UserTimeout {
                ms: user_timeout_ms,
            });
        }
        let s = sysctls?;
        Some(if orphan {
            Self::Orphan {
                configured: s.tcp_orphan_retries,
                soft_error,
            }
        } else {
            Self::Retries2 { n: s.tcp_retries2 }
        })
    }

    /// The boundary at an expiry where `icsk_rto` (before doubling) is
    /// `rto_ms`; `base_ms` is 200 ms (established) or 1 s (SYN states).
    pub fn at(self, rto_ms: u64, rto_max_ms: u64, base_ms: u64) -> Boundary {
        match self {
            Self::UserTimeout { ms } => Boundary {
                ms: u64::from(ms),
                source: BoundarySource::UserTimeout,
            },
            Self::Retries2 { n } => Boundary {
                ms: model_timeout_ms(n, base_ms, rto_max_ms),
                source: BoundarySource::Retries2(n),
            },
            Self::Orphan {
                configured,
                soft_error,
            } => {
                let n = effective_orphan_retries(configured, rto_ms < rto_max_ms, soft_error);
                Boundary {
                    ms: model_timeout_ms(n, base_ms, rto_max_ms),
                    source: BoundarySource::OrphanRetries(n),
                }
            }
            Self::Syn { n, per_socket } => Boundary {
                ms: model_timeout_ms(n, base_ms, rto_max_ms),
                source: if per_socket {
                    BoundarySource::SynCount(n)
                } else {
                    BoundarySource::SynRetries(n)
                },
            },
        }
    }
}

/// The retry-count side of `tcp_write_timeout()` in SYN_SENT: the socket
/// dies at the expiry that finds `icsk_retransmits >= max_retransmits`
/// (`icsk_syn_retries ?: tcp_syn_retries`, plus `tcp_syn_linear_timeouts`
/// where the kernel has it), and `tcp_retransmit_timer()` keeps the RTO at
/// its initial value for the first `linear + 1` expiries (it doubles only
/// once the expiry count exceeds `linear`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynLimits {
    pub max_retransmits: u32,
    pub linear: u32,
}

/// Why a SYN_SENT socket has no prediction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoPrediction {
    /// Neither `icsk_syn_retries` nor the netns `tcp_syn_retries` could be
    /// read on this kernel.
    SynRetriesUnknown,
    /// A zero window without TCP_USER_TIMEOUT: `tcp_probe_timer()` gives up
    /// only after `tcp_retries2` unanswered probes, and every answer of a
    /// live peer (even one that keeps the window at zero) resets the count,
    /// so the kernel probes at `rto_max` for as long as the peer answers.
    ZeroWindowWithoutUserTimeout,
    /// Keepalive probing, but the socket's keepalive time, interval or
    /// probe count (and its netns sysctl) could not be read.
    KeepaliveUnknown,
}

/// The rule and limits of a SYN_SENT socket: `icsk_syn_retries` wins over
/// the netns `tcp_syn_retries`; linear timeouts count only where the kernel
/// has the sysctl (None: none). The user timeout replaces the time rule
/// (the retry count still applies).
pub fn syn_rule(
    user_timeout_ms: u32,
    syn_retries: u32,
    sysctls: Option<NetnsSysctls>,
) -> Result<(BoundaryRule, SynLimits), NoPrediction> {
    let netns_n = sysctls.map_or(0, |s| s.tcp_syn_retries);
    let (n, per_socket) = if syn_retries != 0 {
        (syn_retries, true)
    } else if netns_n != 0 {
        (netns_n, false)
    } else {
        return Err(NoPrediction::SynRetriesUnknown);
    };
    let linear = sysctls.and_then(|s| s.tcp_syn_linear_timeouts).unwrap_or(0);
    let rule = if user_timeout_ms != 0 {
        BoundaryRule::UserTimeout {
            ms: user_timeout_ms,
        }
    } else {
        BoundaryRule::Syn { n, per_socket }
    };
    Ok((
        rule,
        SynLimits {
            max_retransmits: n.saturating_add(linear),
            linear,
        },
    ))
}

/// The initial RTO (`tcp_timeout_init()`, jiffies) of a SYN_SENT socket
/// whose `icsk_rto` is `rto` at an expiry that found `retransmits`: the
/// expiries after the `linear` first ones each doubled it. None once it may
/// have been capped at `rto_max` (the caller then assumes TCP_TIMEOUT_INIT).
pub fn syn_initial_rto(rto: u64, retransmits: u32, linear: u32, rto_max: u64) -> Option<u64> {
    let doublings = retransmits.saturating_sub(linear);
    if rto >= rto_max || doublings >= 63 {
        return None;
    }
    Some((rto >> doublings).max(1))
}

/// `tcp_orphan_retries()`: an ICMP soft error (`sk_err_soft`) on a socket
/// no longer "alive" (`icsk_rto` reached `rto_max`) means 0 retries; a
/// configured 0 means 8 while the socket is alive ("sent something
/// recently").
pub fn effective_orphan_retries(configured: u32, alive: bool, soft_error: bool) -> u32 {
    let n = if soft_error && !alive { 0 } else { configured };
    if n == 0 && alive { 8 } else { n }
}

/// The socket's `rto_max` in jiffies: `icsk_rto_max` when the kernel has it,
/// else the netns `tcp_rto_max_ms`, else `TCP_RTO_MAX`.
pub fn rto_max_jiffies(icsk_rto_max: u32, netns_rto_max_ms: Option<u32>, hz: u32) -> u64 {
    if icsk_rto_max != 0 {
        u64::from(icsk_rto_max)
    } else if let Some(ms) = netns_rto_max_ms.filter(|&ms| ms != 0) {
        msecs_to_jiffies(u64::from(ms), hz)
    } else {
        msecs_to_jiffies(TCP_RTO_MAX_MS, hz)
    }
}

/// `LVL_START(n)` of the timer wheel (`LVL_CLK_SHIFT` 3, `LVL_BITS` 6).
const fn lvl_start(n: u32) -> u64 {
    63 << ((n - 1) * 3)
}

/// The jiffy at which a timer armed for `expires` while the wheel's clock is
/// at `clk` actually fires: `calc_wheel_index()` puts it in the bucket of
/// the level chosen by `expires - clk` and rounds up to the next bucket
/// boundary (`((expires >> shift) + 1) << shift`), so a timer never fires
/// early and fires up to one level granularity late.
pub fn timer_wheel_fire(expires: u64, clk: u64, hz: u32) -> u64 {
    if expires < clk {
        return clk;
    }
    let depth: u32 = if hz > 100 { 9 } else { 8 };
    let delta = expires - clk;
    let mut lvl = 0;
    while lvl + 1 < depth && delta >= lvl_start(lvl + 1) {
        lvl += 1;
    }
    let shift = 3 * lvl;
    ((expires >> shift).saturating_add(1)) << shift
}

/// The jiffy at which a timer re-armed from its own expiry's callback fires
/// (the RTO re-armed by `tcp_retransmit_timer()` at jiffy `callback`).
/// While a bucket's timers run, the wheel's clock already reads that
/// bucket + 1 (`__run_timers()` increments `base->clk` before
/// `expire_timers()`, and `forward_timer_base()` leaves a clock one ahead of
/// jiffies alone), so `calc_wheel_index()` chooses the level from
/// `expires - (callback + 1)`: an interval of exactly `LVL_START(n)` jiffies
/// (63, 504, ...) stays one level lower, with that level's finer rounding.
pub fn rearmed_timer_fire(expires: u64, callback: u64, hz: u32) -> u64 {
    timer_wheel_fire(expires, callback.saturating_add(1), hz)
}

/// Jiffies from a callback at `j` to the expiry of the timer it re-arms
/// `interval` ahead: the timer wheel's rounding when `wheel`, else exact.
fn rearmed_step(j: u64, interval: u64, hz: u32, wheel: bool) -> u64 {
    if wheel {
        rearmed_timer_fire(j.saturating_add(interval), j, hz)
            .saturating_sub(j)
            .max(1)
    } else {
        interval
    }
}

/// The state at one RTO expiry (the write timer fired with
/// `icsk_pending == ICSK_TIME_RETRANS`), as seen before the kernel handled
/// it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RtoWalk {
    /// The episode start: `retrans_stamp` as a monotonic instant (for the
    /// first RTO of an episode without earlier retransmission: `at_ns`).
    pub start_ns: u64,
    /// This expiry (monotonic ns).
    pub at_ns: u64,
    /// `jiffies` at this expiry (0 = unknown: no timer wheel modelling).
    pub at_jiffies: u64,
    /// `icsk_retransmits` at this expiry (before the increment).
    pub retransmits: u32,
    /// `icsk_rto` at this expiry (before doubling), jiffies.
    pub rto_jiffies: u32,
    /// `rto_max` in jiffies (see [`rto_max_jiffies`]).
    pub rto_max_jiffies: u64,
    pub hz: u32,
    pub rule: BoundaryRule,
    /// 200 ms, or 1 s in SYN states.
    pub base_ms: u64,
    /// Round each future expiry up like the kernel's timer wheel.
    pub timer_wheel: bool,
    /// SYN_SENT: the retry-count limit and the linear first timeouts.
    pub syn: Option<SynLimits>,
}

/// The predicted ETIMEDOUT.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Death {
    /// The RTO expiry at which `tcp_write_timeout()` kills the socket.
    pub at_ns: u64,
    /// Further expiries before that one (0: this expiry kills).
    pub expiries_after: u32,
    /// The boundary at the fatal expiry.
    pub boundary: Boundary,
}

/// Walks the RTO expiries from the current one and returns the first one at
/// which the kernel declares the socket dead. None without a usable RTO.
pub fn predict_rto_death(w: &RtoWalk) -> Option<Death> {
    if w.rto_jiffies == 0 || w.hz == 0 {
        return None;
    }
    let hz = w.hz;
    let max_j = w.rto_max_jiffies.max(1);
    let max_ms = jiffies_to_msecs(max_j, hz);
    let wheel = w.timer_wheel && w.at_jiffies != 0;

    // Instants are computed from the anchor in one conversion
    // (`at_ns + jiffies_to_ns(elapsed)`): summing per-step conversions
    // would lose up to a nanosecond per step where HZ does not divide
    // 10^9 (HZ 300).
    let mut t = w.at_ns;
    let mut j = w.at_jiffies;
    let mut elapsed_j: u64 = 0;
    let mut rto = u64::from(w.rto_jiffies);
    let mut retransmits = u64::from(w.retransmits);
    let mut step: u32 = 0;
    loop {
        let rto_ms = jiffies_to_msecs(rto, hz);
        let boundary = w.rule.at(rto_ms, max_ms, w.base_ms);
        let deadline = w
            .start_ns
            .saturating_add(boundary.ms.saturating_mul(NSEC_PER_MSEC));
        if deadline == u64::MAX {
            return None;
        }
        // SYN_SENT: the retry count first.
        let count_dead = w
            .syn
            .is_some_and(|s| retransmits >= u64::from(s.max_retransmits));
        // retransmits_timed_out(): never while icsk_retransmits == 0.
        if count_dead || (retransmits > 0 && t >= deadline) {
            return Some(Death {
                at_ns: t,
                expiries_after: step,
                boundary,
            });
        }
        // The expiry retransmits, backs off (SYN_SENT: only past the
        // linear ones) and re-arms the timer.
        if w.syn.is_none_or(|s| retransmits + 1 > u64::from(s.linear)) {
            rto = (rto * 2).min(max_j);
        }
        let mut interval = rto;
        if let BoundaryRule::UserTimeout { ms } = w.rule {
            let elapsed_ms = t.saturating_sub(w.start_ns) / NSEC_PER_MSEC;
            let remaining = i128::from(ms) - i128::from(elapsed_ms);
            interval = if remaining <= 0 {
                1
            } else {
                rto.min(msecs_to_jiffies(remaining as u64, hz))
            };
        }
        let dt = rearmed_step(j, interval, hz, wheel);
        // Closed form for the (rare) very long tail at rto_max: skip whole
        // steps while far from the deadline (no clamp can apply there).
        if step >= MAX_EXACT_STEPS && rto == max_j {
            let dt_ns = jiffies_to_ns(dt, hz).max(1);
            if t.saturating_add(2 * dt_ns) < deadline {
                let k = (deadline - t) / dt_ns - 1;
                elapsed_j = elapsed_j.saturating_add(k.saturating_mul(dt));
                t = w.at_ns.saturating_add(jiffies_to_ns(elapsed_j, hz));
                j = j.saturating_add(k.saturating_mul(dt));
                retransmits += k;
                step = step.saturating_add(u32::try_from(k).unwrap_or(u32::MAX));
                continue;
            }
        }
        elapsed_j = elapsed_j.saturating_add(dt);
        t = w.at_ns.saturating_add(jiffies_to_ns(elapsed_j, hz));
        j = j.saturating_add(dt);
        retransmits += 1;
        step = step.saturating_add(1);
    }
}

/// The zero-window (persist) probe interval after a probe sent with
/// `icsk_backoff == backoff` (before the increment): `tcp_probe0_when()`,
/// `max(rto, 200 ms) << min(backoff + 1, ilog2(max / 200 ms) + 1)`, capped.
pub fn persist_next_interval_ms(rto_ms: u64, backoff: u32, rto_max_ms: u64) -> u64 {
    let base = rto_ms.max(TCP_RTO_MIN_MS);
    let cap_shift = (TCP_RTO_MAX_MS / TCP_RTO_MIN_MS).ilog2() + 1;
    let shift = backoff.saturating_add(1).min(cap_shift);
    (base << shift).min(rto_max_ms.max(1))
}

/// Zero window with a user timeout: `tcp_probe_timer()` aborts at the first
/// probe expiry with `now - icsk_probes_tstamp >= UTO`, and
/// `tcp_clamp_probe0_to_user_timeout()` arms that expiry at exactly
/// `first_probe + UTO`. Without a user timeout a live peer keeps the sender
/// in persist forever: no prediction.
pub fn predict_persist_death(
    first_probe_ns: u64,
    current_probe_ns: u64,
    user_timeout_ms: u32,
) -> Option<u64> {
    if user_timeout_ms == 0 {
        return None;
    }
    let deadline = first_probe_ns.saturating_add(u64::from(user_timeout_ms) * NSEC_PER_MSEC);
    Some(deadline.max(current_probe_ns))
}

/// The state at one window-probe expiry (`icsk_pending ==
/// ICSK_TIME_PROBE0`, before the kernel handled it) of a socket whose
/// probes cannot be answered (data that never left this node).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbeWalk {
    pub at_ns: u64,
    /// `jiffies` at this expiry (0 = unknown: no timer wheel modelling).
    pub at_jiffies: u64,
    /// `icsk_probes_out`, `icsk_backoff` at this expiry.
    pub probes_out: u32,
    pub backoff: u32,
    /// `icsk_rto` (the probe base is `max(rto, 200 ms)`), `rto_max`.
    pub rto_ms: u64,
    pub rto_max_ms: u64,
    /// `tcp_retries2` (or the effective orphan retries): the probe count
    /// that kills.
    pub limit: u32,
    /// `tcp_send_probe0()` stops backing off at `tcp_retries2`.
    pub backoff_cap: u32,
    pub hz: u32,
    pub timer_wheel: bool,
}

/// `tcp_probe_timer()` without a user timeout: the expiry that finds
/// `icsk_probes_out >= limit` kills the socket. Each earlier one sends a
/// probe (`icsk_probes_out++`), backs off (`icsk_backoff++` below
/// `tcp_retries2`) and re-arms after `tcp_probe0_when()`:
/// `max(rto, 200 ms) << backoff`, capped at `rto_max`. Returns the fatal
/// expiry's instant (this one when it is fatal already).
pub fn predict_probe_count_death(w: &ProbeWalk) -> Option<u64> {
    if w.hz == 0 {
        return None;
    }
    let hz = w.hz;
    let base = w.rto_ms.max(TCP_RTO_MIN_MS);
    let cap_shift = (TCP_RTO_MAX_MS / TCP_RTO_MIN_MS).ilog2() + 1;
    let wheel = w.timer_wheel && w.at_jiffies != 0;
    let mut backoff = w.backoff;
    let mut j = w.at_jiffies;
    let mut elapsed_j: u64 = 0;
    // Bounded: tcp_retries2 is a u8 sysctl.
    for probes in w.probes_out..=w.probes_out.saturating_add(256) {
        if probes >= w.limit {
            return Some(w.at_ns.saturating_add(jiffies_to_ns(elapsed_j, hz)));
        }
        if backoff < w.backoff_cap {
            backoff += 1;
        }
        let ms = (base << backoff.min(cap_shift)).min(w.rto_max_ms.max(1));
        let interval = msecs_to_jiffies(ms, hz).max(1);
        let dt = rearmed_step(j, interval, hz, wheel);
        elapsed_j = elapsed_j.saturating_add(dt);
        j = j.saturating_add(dt);
    }
    None
}

pub mod keepalive;
pub use keepalive::{
    KeepaliveDeath, KeepaliveRule, KeepaliveWalk, keepalive_rule, predict_keepalive_death,
};

#[cfg(test)]
mod tests;
