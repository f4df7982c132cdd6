//! `tcp_keepalive_timer()` (net/ipv4/tcp_timer.c) and the helpers it calls
//! (include/net/tcp.h), for the engine's keepalive tests. Shares nothing
//! with `horizon::keepalive`; the timer wheel is this model's own
//! [`super::wheel_bucket_expiry`].
//!
//! ```text
//! keepalive_time_when(tp)  = tp->keepalive_time  ?: net->ipv4.sysctl_tcp_keepalive_time
//! keepalive_intvl_when(tp) = tp->keepalive_intvl ?: net->ipv4.sysctl_tcp_keepalive_intvl
//! keepalive_probes(tp)     = tp->keepalive_probes ?: net->ipv4.sysctl_tcp_keepalive_probes
//! keepalive_time_elapsed(tp) = min(tcp_jiffies32 - icsk->icsk_ack.lrcvtime,
//!                                  tcp_jiffies32 - tp->rcv_tstamp)
//!
//! elapsed = keepalive_time_when(tp);
//! if (tp->packets_out || !tcp_write_queue_empty(sk)) goto resched;
//! elapsed = keepalive_time_elapsed(tp);
//! if (elapsed >= keepalive_time_when(tp)) {
//!     if ((user_timeout != 0 && elapsed >= msecs_to_jiffies(user_timeout)
//!          && icsk->icsk_probes_out > 0) ||
//!         (user_timeout == 0 && icsk->icsk_probes_out >= keepalive_probes(tp))) {
//!         tcp_send_active_reset(); tcp_write_err(sk); goto out;
//!     }
//!     if (tcp_write_wakeup(sk, LINUX_MIB_TCPKEEPALIVE) <= 0) {
//!         icsk->icsk_probes_out++;
//!         elapsed = keepalive_intvl_when(tp);
//!     } else {
//!         elapsed = TCP_RESOURCE_PROBE_INTERVAL;
//!     }
//! } else {
//!     elapsed = keepalive_time_when(tp) - elapsed;
//! }
//! resched:
//! inet_csk_reset_keepalive_timer(sk, elapsed);   // sk_reset_timer(jiffies + elapsed)
//! ```

use super::{msecs_to_jiffies, wheel_bucket_expiry};

/// An idle socket whose peer answers nothing, as the kernel holds it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeepaliveSock {
    pub hz: u64,
    /// `tp->keepalive_time`, `_intvl` (jiffies), `_probes`: 0 = the netns's.
    pub tp_time: u32,
    pub tp_intvl: u32,
    pub tp_probes: u32,
    /// `net->ipv4.sysctl_tcp_keepalive_{time,intvl,probes}`.
    pub net_time: u32,
    pub net_intvl: u32,
    pub net_probes: u32,
    pub icsk_user_timeout: u32,
    /// 32-bit jiffies of the last receive.
    pub lrcvtime: u32,
    pub rcv_tstamp: u32,
    pub icsk_probes_out: u32,
    /// The jiffy `sk_timer` is armed for, and the jiffy it was armed at
    /// (by SO_KEEPALIVE from process context).
    pub timer_expires: u64,
    pub armed_at: u64,
}

/// One run of `tcp_keepalive_timer()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KeepaliveExpiry {
    pub jiffies: u64,
    pub ts_ns: u64,
    /// `icsk_probes_out` when the timer fired.
    pub probes_out: u32,
    /// The socket died here (`tcp_write_err`).
    pub fatal: bool,
}

impl KeepaliveSock {
    fn keepalive_time_when(&self) -> u32 {
        if self.tp_time != 0 {
            self.tp_time
        } else {
            self.net_time
        }
    }

    fn keepalive_intvl_when(&self) -> u32 {
        if self.tp_intvl != 0 {
            self.tp_intvl
        } else {
            self.net_intvl
        }
    }

    fn keepalive_probes(&self) -> u32 {
        if self.tp_probes != 0 {
            self.tp_probes
        } else {
            self.net_probes
        }
    }

    fn keepalive_time_elapsed(&self, now: u32) -> u32 {
        now.wrapping_sub(self.lrcvtime)
            .min(now.wrapping_sub(self.rcv_tstamp))
    }

    /// Runs the timer until it kills the socket (at most `max_expiries`).
    pub(crate) fn run(
        mut self,
        jiffy_ns: impl Fn(u64) -> u64,
        max_expiries: usize,
    ) -> Vec<KeepaliveExpiry> {
        let mut out = Vec::new();
        let mut clk = self.armed_at;
        while out.len() < max_expiries {
            let j = wheel_bucket_expiry(self.timer_expires, clk, self.hz);
            let now = j as u32;
            let mut e = KeepaliveExpiry {
                jiffies: j,
                ts_ns: jiffy_ns(j),
                probes_out: self.icsk_probes_out,
                fatal: false,
            };
            let elapsed = self.keepalive_time_elapsed(now);
            let next = if elapsed >= self.keepalive_time_when() {
                let uto = self.icsk_user_timeout;
                if (uto != 0
                    && u64::from(elapsed) >= msecs_to_jiffies(u64::from(uto), self.hz)
                    && self.icsk_probes_out > 0)
                    || (uto == 0 && self.icsk_probes_out >= self.keepalive_probes())
                {
                    e.fatal = true;
                    out.push(e);
                    break;
                }
                self.icsk_probes_out += 1;
                self.keepalive_intvl_when()
            } else {
                self.keepalive_time_when() - elapsed
            };
            out.push(e);
            self.timer_expires = j + u64::from(next);
            // Re-armed from its own callback: the base clock reads j + 1.
            clk = j + 1;
        }
        out
    }
}
