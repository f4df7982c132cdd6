//! The orphaned FIN_WAIT2 timeout, from `tcp_rcv_state_process()`,
//! `tcp_fin_time()` (include/net/tcp.h), `tcp_time_wait()`
//! (net/ipv4/tcp_minisocks.c), `__inet_twsk_schedule()` /
//! `inet_twsk_reschedule()` (net/ipv4/inet_timewait_sock.c) and
//! `tcp_timewait_state_process()`, for the engine's FIN_WAIT2 tests. Shares
//! nothing with `engine::fin_wait2`; the timer wheel is this model's own
//! [`super::wheel_bucket_expiry`].
//!
//! ```text
//! // tcp_rcv_state_process(), FIN_WAIT1, the ACK of our FIN:
//! tcp_set_state(sk, TCP_FIN_WAIT2);
//! if (!sock_flag(sk, SOCK_DEAD)) { sk->sk_state_change(sk); break; } // waits forever
//! if (READ_ONCE(tp->linger2) < 0) { tcp_done(sk); ... }              // killed at once
//! tmo = tcp_fin_time(sk);
//! if (tmo > TCP_TIMEWAIT_LEN) {
//!     inet_csk_reset_keepalive_timer(sk, tmo - TCP_TIMEWAIT_LEN);
//! } else if (th->fin || sock_owned_by_user(sk)) {
//!     inet_csk_reset_keepalive_timer(sk, tmo);
//! } else {
//!     tcp_time_wait(sk, TCP_FIN_WAIT2, tmo);
//! }
//!
//! tcp_fin_time(sk) = max(tp->linger2 ?: net->ipv4.sysctl_tcp_fin_timeout,
//!                        (icsk_rto << 2) - (icsk_rto >> 1))          // 3.5 RTO
//!
//! // tcp_time_wait(sk, state, timeo):
//! const int rto = (icsk_rto << 2) - (icsk_rto >> 1);
//! if (state == TCP_TIME_WAIT) timeo = TCP_TIMEWAIT_LEN;
//! else if (timeo < rto) timeo = rto;
//! inet_twsk_hashdance_schedule(tw, sk, hashinfo, timeo);   // mod_timer(&tw->tw_timer, jiffies + timeo)
//! tcp_done(sk);                                            // the full socket: FIN_WAIT2 -> CLOSE
//!
//! // tcp_timewait_state_process(), tw_substate == TCP_FIN_WAIT2, the peer's FIN:
//! tw->tw_substate = TCP_TIME_WAIT;
//! inet_twsk_reschedule(tw, TCP_TIMEWAIT_LEN);             // mod_timer_pending(jiffies + 60 s)
//!
//! // tw_timer_handler(): inet_twsk_kill(tw): the connection is gone.
//! ```

use super::wheel_bucket_expiry;

/// `TCP_TIMEWAIT_LEN` (60 s) in jiffies.
pub(crate) fn tcp_timewait_len(hz: u64) -> u64 {
    60 * hz
}

/// An orphan in FIN_WAIT1 whose FIN the peer is about to ACK.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FinWait2Sock {
    pub hz: u64,
    /// `tp->linger2` (jiffies; 0 = the netns's; negative = killed at once).
    pub linger2: i64,
    /// `net->ipv4.sysctl_tcp_fin_timeout` (jiffies).
    pub net_fin_timeout: u64,
    pub icsk_rto: u64,
}

/// What the kernel does when the ACK of the orphan's FIN arrives at jiffy
/// `now` (with no FIN on the segment, the socket not owned by the user).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FinWait2Fate {
    /// `linger2 < 0`: `tcp_done()` at once.
    DoneNow,
    /// `tmo > TCP_TIMEWAIT_LEN`: the keepalive timer is armed for
    /// `tmo - TCP_TIMEWAIT_LEN` on the full socket.
    KeepaliveFirst { timer_expires: u64, tmo: u64 },
    /// A timewait socket in the FIN_WAIT2 substate whose `tw_timer` runs at
    /// jiffy `bucket` (requested `expires`), `timeo` after `now`.
    Timewait {
        timeo: u64,
        expires: u64,
        bucket: u64,
    },
}

impl FinWait2Sock {
    /// `(icsk_rto << 2) - (icsk_rto >> 1)`.
    fn rto_3_5(&self) -> u64 {
        (self.icsk_rto << 2) - (self.icsk_rto >> 1)
    }

    /// `tcp_fin_time()`.
    pub(crate) fn tcp_fin_time(&self) -> u64 {
        let fin_timeout = if self.linger2 != 0 {
            self.linger2.max(0) as u64
        } else {
            self.net_fin_timeout
        };
        fin_timeout.max(self.rto_3_5())
    }

    /// The ACK of the orphan's FIN at jiffy `now` (`clk`: the timer base's
    /// clock then, `now` from softirq context).
    pub(crate) fn ack_of_fin(&self, now: u64) -> FinWait2Fate {
        if self.linger2 < 0 {
            return FinWait2Fate::DoneNow;
        }
        let tmo = self.tcp_fin_time();
        if tmo > tcp_timewait_len(self.hz) {
            return FinWait2Fate::KeepaliveFirst {
                timer_expires: now + tmo - tcp_timewait_len(self.hz),
                tmo,
            };
        }
        // tcp_time_wait(sk, TCP_FIN_WAIT2, tmo)
        let timeo = tmo.max(self.rto_3_5());
        let expires = now + timeo;
        FinWait2Fate::Timewait {
            timeo,
            expires,
            bucket: wheel_bucket_expiry(expires, now, self.hz),
        }
    }
}

impl FinWait2Sock {
    /// `tcp_keepalive_timer()` on the orphan in FIN_WAIT2 at jiffy `now`
    /// (the keepalive timer [`FinWait2Fate::KeepaliveFirst`] armed):
    /// `if (tp->linger2 >= 0) { tmo = tcp_fin_time(sk) - TCP_TIMEWAIT_LEN;
    /// if (tmo > 0) { tcp_time_wait(sk, TCP_FIN_WAIT2, tmo); } }`, else (or
    /// with `tmo` <= 0) a reset and `tcp_done()`: None.
    pub(crate) fn keepalive_handover(&self, now: u64) -> Option<FinWait2Fate> {
        if self.linger2 < 0 {
            return None;
        }
        let tmo = self.tcp_fin_time().checked_sub(tcp_timewait_len(self.hz))?;
        if tmo == 0 {
            return None;
        }
        // tcp_time_wait(): `if (timeo < rto) timeo = rto;`
        let timeo = tmo.max(self.rto_3_5());
        let expires = now + timeo;
        Some(FinWait2Fate::Timewait {
            timeo,
            expires,
            bucket: wheel_bucket_expiry(expires, now, self.hz),
        })
    }
}

/// The jiffy a timer armed at jiffy `now` for `expires` runs at (the
/// keepalive timer of [`FinWait2Fate::KeepaliveFirst`]).
pub(crate) fn timer_runs_at(expires: u64, now: u64, hz: u64) -> u64 {
    wheel_bucket_expiry(expires, now, hz)
}

/// The peer's FIN reaching the timewait socket at jiffy `now`: the timer is
/// re-armed for TIME_WAIT; returns the jiffy it then runs at.
pub(crate) fn peer_fin(now: u64, hz: u64) -> u64 {
    wheel_bucket_expiry(now + tcp_timewait_len(hz), now, hz)
}
