//! A test-only model of the kernel's RTO timeout rules, the referee of the
//! engine's tests. It shares no function with the engine (`horizon`, `hz`,
//! `BoundaryRule`, `timer_wheel_fire` are never called here): it is written
//! from the kernel sources, rule by rule, in the kernel's own units
//! (jiffies where the kernel computes in jiffies, milliseconds of
//! `tcp_time_stamp` where it compares those), so that a mistake shared by the
//! engine and its tests cannot pass unnoticed. Its own tests
//! (`kernel_model::tests`) check it against the replay fixtures: real event
//! streams recorded on 6.1, 6.12 and 6.18.
//!
//! Rules (net/ipv4/tcp_timer.c unless named):
//! - `tcp_model_timeout(sk, boundary, rto_base)`: with
//!   `thresh = ilog2(rto_max / rto_base)` (jiffies), `T = ((2 << b) - 1) *
//!   rto_base` for `b <= thresh`, else `((2 << thresh) - 1) * rto_base + (b -
//!   thresh) * rto_max`; returned through `jiffies_to_msecs`. `rto_base` is
//!   `TCP_RTO_MIN` (`HZ / 5`) from ESTABLISHED on. Before 6.15 `rto_max` is
//!   the constant `TCP_RTO_MAX` (`120 * HZ`); from 6.15 `tcp_rto_max(sk)`.
//! - `retransmits_timed_out(sk, boundary, timeout)`: false while
//!   `icsk_retransmits == 0`; `timeout` is the user timeout (ms) when set,
//!   else `tcp_model_timeout`; expired when `(s32)(now_ms - retrans_stamp -
//!   timeout) >= 0`.
//! - `tcp_write_timeout()`: `retry_until = tcp_retries2`; for `SOCK_DEAD`
//!   `tcp_orphan_retries(sk, alive = icsk_rto < rto_max)`, where an
//!   `sk_err_soft` on a socket not alive means 0 and a configured 0 means 8
//!   while alive.
//! - `tcp_retransmit_timer()`: if not expired, retransmit, `icsk_backoff++`,
//!   `icsk_retransmits++`, `icsk_rto = min(icsk_rto << 1, rto_max)`, and
//!   re-arm at `jiffies + tcp_clamp_rto_to_user_timeout(sk)`: with a user
//!   timeout, `remaining = uto - (now_ms - retrans_stamp)`; `remaining <= 0`
//!   arms 1 jiffy, else `min(icsk_rto, msecs_to_jiffies(remaining))`.
//!   `retrans_stamp` is set by the first retransmission of the episode
//!   (`tcp_retransmit_skb`; a loss probe does not set it).
//! - kernel/time/timer.c: `calc_wheel_index(expires, clk)` picks the level
//!   `lvl` whose range holds `delta = expires - clk` (`LVL_START(n) = 63 <<
//!   3(n-1)`, `LVL_DEPTH` 9 when HZ > 100 else 8), and the timer's bucket
//!   expires at `((expires >> 3 lvl) + 1) << 3 lvl`; an already expired timer
//!   goes to the bucket at `clk`. `__run_timers()` increments `base->clk`
//!   before it runs a bucket's callbacks, and `forward_timer_base()` never
//!   moves the clock back, so a timer re-armed from its own callback at
//!   jiffy `j` is placed with `clk = j + 1`; one armed from process context
//!   with `clk = jiffies`.

/// One millisecond in ns.
const MS_NS: u64 = 1_000_000;
/// Bits per level of the timer wheel (`LVL_BITS`) and the clock shift between
/// levels (`LVL_CLK_SHIFT`).
const LVL_BITS: u32 = 6;
const LVL_CLK_SHIFT: u32 = 3;

/// The kernel's `TCP_RTO_MIN` for a HZ, in jiffies.
pub(crate) fn tcp_rto_min(hz: u64) -> u64 {
    hz / 5
}

/// The kernel's `TCP_RTO_MAX` for a HZ, in jiffies.
pub(crate) fn tcp_rto_max(hz: u64) -> u64 {
    120 * hz
}

/// `jiffies_to_msecs` (include/linux/jiffies.h): exact when HZ divides 1000,
/// else rounded up (`(j * 1000 + HZ - 1) / HZ`).
pub(crate) fn jiffies_to_msecs(j: u64, hz: u64) -> u64 {
    if 1000 % hz == 0 {
        j * (1000 / hz)
    } else {
        (j * 1000).div_ceil(hz)
    }
}

/// `msecs_to_jiffies` (rounds up).
pub(crate) fn msecs_to_jiffies(ms: u64, hz: u64) -> u64 {
    if 1000 % hz == 0 {
        ms.div_ceil(1000 / hz)
    } else {
        (ms * hz).div_ceil(1000)
    }
}

/// `tcp_model_timeout()`: the retries rule's boundary in ms.
pub(crate) fn tcp_model_timeout_ms(boundary: u32, rto_base_j: u64, rto_max_j: u64, hz: u64) -> u64 {
    let thresh = (rto_max_j / rto_base_j).ilog2();
    let b = u64::from(boundary);
    let timeout_j = if boundary <= thresh {
        ((2u64 << b) - 1) * rto_base_j
    } else {
        ((2u64 << thresh) - 1) * rto_base_j + (b - u64::from(thresh)) * rto_max_j
    };
    jiffies_to_msecs(timeout_j, hz)
}

/// `tcp_orphan_retries(sk, alive)`, statement by statement:
/// `retries = sysctl_tcp_orphan_retries` ("May be zero"); `if (sk->sk_err_soft
/// && !alive) retries = 0;` `if (retries == 0 && alive) retries = 8;`.
pub(crate) fn tcp_orphan_retries(configured: u32, alive: bool, sk_err_soft: u32) -> u32 {
    let mut retries = configured;
    if sk_err_soft != 0 && !alive {
        retries = 0;
    }
    if retries == 0 && alive {
        retries = 8;
    }
    retries
}

/// What `tcp_write_timeout()` reads of a socket (ESTABLISHED-like states).
#[derive(Clone, Copy, Debug)]
pub(crate) struct KernelSock {
    pub hz: u64,
    pub tcp_retries2: u32,
    pub tcp_orphan_retries: u32,
    /// `icsk_user_timeout`, ms (0: none).
    pub user_timeout_ms: u32,
    /// `SOCK_DEAD`.
    pub orphan: bool,
    /// `tcp_rto_max(sk)`, jiffies.
    pub rto_max_j: u64,
    /// `sk_err_soft` (errno, 0: none).
    pub sk_err_soft: u32,
}

impl KernelSock {
    /// `tcp_write_timeout()`'s verdict at an RTO expiry: `now_ms` is
    /// `tcp_time_stamp`, `retrans_stamp` the episode's start (ms),
    /// `icsk_rto` the RTO before this expiry's doubling.
    pub(crate) fn timed_out(
        &self,
        icsk_retransmits: u32,
        now_ms: u32,
        retrans_stamp: u32,
        icsk_rto_j: u64,
    ) -> bool {
        let mut retry_until = self.tcp_retries2;
        if self.orphan {
            retry_until = tcp_orphan_retries(
                self.tcp_orphan_retries,
                icsk_rto_j < self.rto_max_j,
                self.sk_err_soft,
            );
        }
        // retransmits_timed_out()
        if icsk_retransmits == 0 {
            return false;
        }
        let timeout = if self.user_timeout_ms != 0 {
            u64::from(self.user_timeout_ms)
        } else {
            tcp_model_timeout_ms(retry_until, tcp_rto_min(self.hz), self.rto_max_j, self.hz)
        };
        (now_ms
            .wrapping_sub(retrans_stamp)
            .wrapping_sub(timeout as u32) as i32)
            >= 0
    }

    /// `tcp_clamp_rto_to_user_timeout()`: the interval (jiffies) the timer is
    /// re-armed with after the RTO doubled to `icsk_rto_j`.
    pub(crate) fn clamp_rto(&self, icsk_rto_j: u64, now_ms: u32, retrans_stamp: u32) -> u64 {
        if self.user_timeout_ms == 0 {
            return icsk_rto_j;
        }
        let elapsed = now_ms.wrapping_sub(retrans_stamp) as i32;
        let remaining = self.user_timeout_ms as i32 - elapsed;
        if remaining <= 0 {
            return 1;
        }
        icsk_rto_j.min(msecs_to_jiffies(remaining as u64, self.hz))
    }
}

/// `LVL_START(n)`.
fn lvl_start(n: u32) -> u64 {
    ((1u64 << LVL_BITS) - 1) << ((n - 1) * LVL_CLK_SHIFT)
}

/// `calc_wheel_index()`'s bucket expiry: the jiffy at which a timer for
/// `expires` placed while the base clock reads `clk` is run.
pub(crate) fn wheel_bucket_expiry(expires: u64, clk: u64, hz: u64) -> u64 {
    if expires < clk {
        return clk;
    }
    let depth = if hz > 100 { 9 } else { 8 };
    let delta = expires - clk;
    let lvl = (1..depth).take_while(|&n| delta >= lvl_start(n)).count() as u32;
    let shift = lvl * LVL_CLK_SHIFT;
    ((expires >> shift) + 1) << shift
}

/// One RTO expiry of a simulated blackholed socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Expiry {
    /// The jiffy the callback runs at.
    pub jiffies: u64,
    /// The callback's `CLOCK_MONOTONIC` instant (ns).
    pub ts_ns: u64,
    /// `icsk_retransmits` when the timer fired.
    pub retransmits: u32,
    /// `icsk_rto` when the timer fired (before doubling), jiffies.
    pub rto_j: u64,
    /// `retrans_stamp` when the timer fired (0: not set yet).
    pub retrans_stamp: u32,
    /// `icsk_timeout`: the jiffy the timer was armed for.
    pub timer_expires: u64,
    /// `tcp_write_timeout()` killed the socket here.
    pub fatal: bool,
}

/// A blackholed socket in the kernel: RTO expiries from one armed timer
/// until `tcp_write_timeout()` kills it. The timer was armed for
/// `timer_expires` (jiffies) by a callback at jiffy `armed_at`
/// (`from_callback`) or from process context; `jiffy_ns(j)` gives the
/// monotonic instant of jiffy `j`'s tick, and a callback runs
/// `callback_latency_ns` after its tick.
pub(crate) struct Blackholed {
    pub sock: KernelSock,
    pub icsk_rto_j: u64,
    pub icsk_retransmits: u32,
    pub retrans_stamp: u32,
    pub timer_expires: u64,
    pub armed_at: u64,
    pub from_callback: bool,
    pub callback_latency_ns: u64,
}

impl Blackholed {
    /// Runs the socket to its death (at most `max_expiries`).
    pub(crate) fn run(mut self, jiffy_ns: impl Fn(u64) -> u64, max_expiries: usize) -> Vec<Expiry> {
        let hz = self.sock.hz;
        let mut out = Vec::new();
        let mut clk = if self.from_callback {
            self.armed_at + 1
        } else {
            self.armed_at
        };
        while out.len() < max_expiries {
            let j = wheel_bucket_expiry(self.timer_expires, clk, hz);
            let ts_ns = jiffy_ns(j) + self.callback_latency_ns;
            let now_ms = (ts_ns / MS_NS) as u32;
            let fatal = self.sock.timed_out(
                self.icsk_retransmits,
                now_ms,
                self.retrans_stamp,
                self.icsk_rto_j,
            );
            out.push(Expiry {
                jiffies: j,
                ts_ns,
                retransmits: self.icsk_retransmits,
                rto_j: self.icsk_rto_j,
                retrans_stamp: self.retrans_stamp,
                timer_expires: self.timer_expires,
                fatal,
            });
            if fatal {
                break;
            }
            if self.retrans_stamp == 0 {
                self.retrans_stamp = now_ms;
            }
            self.icsk_retransmits += 1;
            self.icsk_rto_j = (self.icsk_rto_j << 1).min(self.sock.rto_max_j);
            self.timer_expires =
                j + self
                    .sock
                    .clamp_rto(self.icsk_rto_j, now_ms, self.retrans_stamp);
            // Re-armed from the callback: the base clock reads j + 1.
            clk = j + 1;
        }
        out
    }
}

/// A sender in persist whose live peer answers every window probe with the
/// window still zero (net/ipv4/tcp_timer.c `tcp_probe_timer()`,
/// net/ipv4/tcp_output.c `tcp_send_probe0()`, net/ipv4/tcp_input.c
/// `tcp_ack()` / `tcp_ack_probe()`; 5.11+ with `icsk_probes_tstamp`):
/// - at each probe expiry (jiffy `j`): `icsk_probes_tstamp` is set to `j`
///   when 0, else with a user timeout the socket is aborted once `j -
///   icsk_probes_tstamp >= msecs_to_jiffies(user_timeout)`; then it is
///   aborted when `icsk_probes_out >= tcp_retries2`; else `tcp_send_probe0()`
///   sends a probe, `icsk_backoff++` (below `tcp_retries2`),
///   `icsk_probes_out++`;
/// - the peer's ACK (same jiffy here) resets `icsk_probes_out` to 0 and, the
///   window still closed, `tcp_ack_probe()` re-arms the probe timer for
///   `tcp_probe0_when(sk, rto_max) = min(max(icsk_rto, TCP_RTO_MIN) <<
///   icsk_backoff, rto_max)`, clamped by `tcp_clamp_probe0_to_user_timeout()`
///   to `max(msecs_to_jiffies(uto) - (jiffies - icsk_probes_tstamp),
///   TCP_TIMEOUT_MIN = 2)`; placed on the wheel with `clk = j + 1`.
pub(crate) struct AnsweredPersist {
    pub hz: u64,
    pub user_timeout_ms: u32,
    pub tcp_retries2: u32,
    pub icsk_rto_j: u64,
    pub rto_max_j: u64,
}

impl AnsweredPersist {
    /// The probe expiries (jiffies) from the first one at `first_j`; the
    /// last is the abort, if one came within `max_expiries`.
    pub(crate) fn run(&self, first_j: u64, max_expiries: usize) -> (Vec<u64>, bool) {
        let mut probes_tstamp = 0u64;
        let mut backoff = 0u32;
        let mut j = first_j;
        let mut out = Vec::new();
        while out.len() < max_expiries {
            out.push(j);
            let probes_out = 0; // reset by the previous probe's answer
            if probes_tstamp == 0 {
                probes_tstamp = j;
            } else if self.user_timeout_ms != 0
                && j - probes_tstamp >= msecs_to_jiffies(u64::from(self.user_timeout_ms), self.hz)
            {
                return (out, true);
            }
            if probes_out >= self.tcp_retries2 {
                return (out, true);
            }
            if backoff < self.tcp_retries2 {
                backoff += 1;
            }
            let base = self.icsk_rto_j.max(tcp_rto_min(self.hz));
            let mut when = base
                .checked_shl(backoff)
                .filter(|v| v >> backoff == base)
                .unwrap_or(u64::MAX)
                .min(self.rto_max_j);
            if self.user_timeout_ms != 0 {
                let remaining = msecs_to_jiffies(u64::from(self.user_timeout_ms), self.hz)
                    .saturating_sub(j - probes_tstamp)
                    .max(2);
                when = when.min(remaining);
            }
            j = wheel_bucket_expiry(j + when, j + 1, self.hz);
        }
        (out, false)
    }
}
pub(crate) mod fin_wait2;
pub(crate) mod keepalive;

#[cfg(test)]
mod tests;
