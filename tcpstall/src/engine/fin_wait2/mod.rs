//! Orphaned FIN_WAIT2 connections (issue 20, item 3): an orphan whose FIN
//! the peer ACKed but who never sends its own FIN waits under
//! `tcp_fin_timeout` / TCP_LINGER2. With `tmo` <= 60 s the kernel turns it
//! into a timewait socket in the FIN_WAIT2 substate at once
//! (`tcp_time_wait()`: the full socket goes to CLOSE, the connection lives
//! on), whose timer ends it (`tw_timer_handler`). The timewait timer
//! programs report the start ([`EventKind::TwTimerStart`], with the timer
//! wheel's bucket expiry: the predicted end), the re-arm for TIME_WAIT when
//! the peer's FIN comes (a normal close: the flow ends silently) and the
//! expiry ([`EventKind::TwTimerExpire`]: a FIN_WAIT2 timeout, counted).
//!
//! A normal peer sends its FIN milliseconds after its ACK, and with the
//! default `tcp_fin_timeout` (60 s) every active close takes this path: a
//! flow is listed (class `fin_wait2`) only once it has waited
//! `fin_wait2_after` (default 1 s, longer than any round trip but a
//! satellite link's) without the peer's FIN.
//!
//! With `tmo` > 60 s the keepalive timer runs `tmo` - 60 s first on the
//! full FIN_WAIT2 socket (`tcp_rcv_state_process()`), whose callback
//! (`tcp_keepalive_timer()`) hands over to a timewait socket for `tmo` -
//! 60 s more: the whole wait is `2 * (tmo - 60 s)`. Such an orphan is
//! predicted from its change to FIN_WAIT2 (the full snapshot carries
//! `tp->linger2`, the namespace's `tcp_fin_timeout` and `icsk_rto`:
//! [`entry_fate`]), then to the bucket once its timewait timer starts.
//!
//! [`EventKind::TwTimerStart`]: crate::kernel::event::EventKind::TwTimerStart
//! [`EventKind::TwTimerExpire`]: crate::kernel::event::EventKind::TwTimerExpire

use crate::kernel::event::{SockEvent, SockFields, TcpState};

use super::flow::{FinWait2, Prediction};
use super::horizon::{self, BoundarySource, NSEC_PER_MSEC};
use super::sink::TimeoutFacts;
use super::{Engine, StallClass, TimeoutEvidence};

/// The boundary source of a FIN_WAIT2 timeout of `tmo_j` jiffies in a
/// namespace whose `tcp_fin_timeout` is `fin_timeout_j` (None: not read):
/// the namespace's value when they agree, else the socket's TCP_LINGER2
/// (`tcp_fin_time()`: `tp->linger2 ?: tcp_fin_timeout`, at least 3.5 RTOs).
///
/// `tmo_j` is the requested expiry less the event's jiffy, which can be a
/// jiffy or two past the one `tcp_time_wait()` armed the timer at (the tick
/// between the kernel's `jiffies + timeo` and the tracepoint: seen in a
/// TCG guest), so up to [`ARM_SLACK_J`] short of the namespace's value is
/// still the namespace's. A TCP_LINGER2 is whole seconds, and the 3.5-RTO
/// floor only ever lengthens the wait: neither falls in that gap.
pub(crate) fn boundary_source(tmo_j: u64, fin_timeout_j: Option<u64>, hz: u32) -> BoundarySource {
    match fin_timeout_j {
        Some(ft) if ft >= tmo_j && ft - tmo_j <= ARM_SLACK_J => {
            BoundarySource::FinTimeout(secs_of(ft, hz))
        }
        _ => BoundarySource::Linger2(secs_of(tmo_j, hz)),
    }
}

/// Jiffies between a timer's arming and the tracepoint's read of
/// `jiffies` that still count as the same instant (see
/// [`boundary_source`]).
const ARM_SLACK_J: u64 = 2;

/// Whole seconds of `j` jiffies, rounded up.
fn secs_of(j: u64, hz: u32) -> u32 {
    u32::try_from(j.div_ceil(u64::from(hz.max(1)))).unwrap_or(u32::MAX)
}

/// `TCP_TIMEWAIT_LEN` (60 s) in jiffies.
fn timewait_len_j(hz: u32) -> u64 {
    60 * u64::from(hz)
}

/// `tcp_fin_time()` in jiffies: `tp->linger2 ?: tcp_fin_timeout`, at
/// least `3.5 * icsk_rto`; None when `linger2` < 0 (no wait) or the
/// namespace's value was not read.
fn fin_time_j(sock: &SockFields, rto_j: u32) -> Option<u64> {
    let linger2 = sock.fin.linger2_j;
    if linger2 < 0 {
        return None;
    }
    let fin_timeout = if linger2 > 0 {
        u64::from(linger2.unsigned_abs())
    } else {
        u64::from(sock.fin.netns_fin_timeout_j?)
    };
    let rto = u64::from(rto_j);
    let floor = (rto << 2).saturating_sub(rto >> 1);
    Some(fin_timeout.max(floor))
}

/// What the kernel arms when an orphan's FIN is ACKed (its change to
/// FIN_WAIT2), from the full snapshot of that change: `tcp_fin_time()` =
/// `tp->linger2 ?: tcp_fin_timeout`, at least `3.5 * icsk_rto` (`tmo`);
/// above `TCP_TIMEWAIT_LEN` the keepalive timer for `tmo - 60 s`, whose
/// callback hands over to a timewait socket for `tmo - 60 s` (at least
/// `3.5 * icsk_rto`) more. Returns `(tmo, the timewait timer's predicted
/// bucket)` in jiffies for that case only: None when `tmo` <= 60 s (the
/// timewait timer starts at once and says it all), when `linger2` < 0 (no
/// wait) or when the kernel's fields were not read.
pub(crate) fn entry_fate(
    sock: &SockFields,
    rto_j: u32,
    entry_jiffies: u64,
    hz: u32,
) -> Option<(u64, u64)> {
    let tmo = fin_time_j(sock, rto_j)?;
    let rto = u64::from(rto_j);
    let floor = (rto << 2).saturating_sub(rto >> 1);
    let len = timewait_len_j(hz);
    if tmo <= len {
        return None;
    }
    let keepalive_fire = horizon::timer_wheel_fire(entry_jiffies + (tmo - len), entry_jiffies, hz);
    let timeo = (tmo - len).max(floor);
    let bucket = horizon::timer_wheel_fire(keepalive_fire + timeo, keepalive_fire, hz);
    Some((tmo, bucket))
}

impl Engine {
    /// An orphan's change to FIN_WAIT2 with a wait above 60 s: listed
    /// (after `fin_wait2_after`) and predicted from now; `slot` is its flow,
    /// `(tmo_j, bucket)` what [`entry_fate`] found for the event.
    /// `since_ns`: the change to FIN_WAIT2 (the event's time, or earlier
    /// when recovered from the keepalive timer's run).
    pub(super) fn on_fin_wait2_entry(
        &mut self,
        slot: u32,
        ev: &SockEvent,
        (tmo_j, bucket): (u64, u64),
        since_ns: u64,
    ) {
        let hz = self.hz.hz();
        let linger2 = ev.sock.map_or(0, |s| s.fin.linger2_j);
        let death_ns = ev.ts_ns.saturating_add(horizon::jiffies_to_ns(
            bucket.saturating_sub(ev.jiffies),
            hz,
        ));
        let source = if linger2 > 0 {
            BoundarySource::Linger2(secs_of(tmo_j, hz))
        } else {
            BoundarySource::FinTimeout(secs_of(tmo_j, hz))
        };
        let prediction = Prediction {
            death_ns,
            made_at_ns: ev.ts_ns,
            boundary_ms: death_ns.saturating_sub(since_ns) / NSEC_PER_MSEC,
            source,
            start_ns: since_ns,
        };
        let f = self.flows.flow_mut(slot);
        f.orphan = true;
        f.fin_wait2 = Some(FinWait2 {
            since_ns,
            death_ns,
            tw_skaddr: 0,
            first_prediction: prediction,
        });
        if f.streak.is_none() && f.persist.is_none() {
            f.prediction = Some(prediction);
        }
    }

    /// The keepalive timer of an orphan in FIN_WAIT2 whose wait is above
    /// 60 s runs `tmo` - 60 s after its change to FIN_WAIT2 and hands over
    /// to a timewait socket. When that change never reached the agent (seen
    /// in a TCG guest; the kernel skips a program's run while it already
    /// runs on that CPU, e.g. a softirq processing the ACK of the FIN under
    /// the state program's run for another socket), the flow starts here,
    /// backdated to the change (`sk_timer.expires` - (`tmo` - 60 s), the
    /// wheel's lateness kept), so the timewait start that follows keeps
    /// the socket's limit and the wait's start. Returns whether it did
    /// (false: the flow is known, or this is no such orphan).
    pub(super) fn recover_fin_wait2_entry(&mut self, ev: &SockEvent, sock: &SockFields) -> bool {
        if ev.state != TcpState::FinWait2 || !ev.orphan {
            return false;
        }
        if let Some(slot) = self.resolve(ev, false)
            && self.flows.flow(slot).fin_wait2.is_some()
        {
            return false;
        }
        let hz = self.hz.hz();
        let len = timewait_len_j(hz);
        let Some(part) = fin_time_j(sock, ev.rto_jiffies)
            .filter(|&tmo| tmo > len)
            .map(|tmo| tmo - len)
        else {
            return false;
        };
        // How late the wheel ran the timer (32-bit jiffies); unread or
        // implausible (more than the wheel's rounding, 1/8 of the
        // timeout): none.
        let expires = sock.keepalive.timer_expires;
        let late = u64::from((ev.jiffies as u32).wrapping_sub(expires));
        let late = if expires != 0 && late <= part / 8 + 1 {
            late
        } else {
            0
        };
        let entry_j = ev.jiffies.saturating_sub(late + part);
        let Some(fate) = entry_fate(sock, ev.rto_jiffies, entry_j, hz) else {
            return false;
        };
        let Some(slot) = self.resolve(ev, true) else {
            return false;
        };
        let since_ns = ev
            .ts_ns
            .saturating_sub(horizon::jiffies_to_ns(late + part, hz));
        let f = self.flows.flow_mut(slot);
        Self::absorb(f, ev);
        f.state = TcpState::FinWait2;
        self.sink.stats.fin_wait2_entries_recovered += 1;
        self.on_fin_wait2_entry(slot, ev, fate, since_ns);
        self.flows.touch(slot);
        true
    }

    /// A timewait timer started (FIN_WAIT2: the timeout runs; TIME_WAIT:
    /// the peer's FIN came).
    pub(super) fn on_tw_start(&mut self, ev: &SockEvent) {
        let Some(tw) = ev.tw else {
            return;
        };
        match ev.state {
            TcpState::FinWait2 => {
                let Some(slot) = self.resolve(ev, true) else {
                    return;
                };
                let hz = self.hz.hz();
                let tmo_j = tw.expires.saturating_sub(ev.jiffies);
                // The wheel's bucket expiry from the tracepoint; one that
                // cannot be a bucket of this expiry (a kernel whose
                // tracepoint has no such argument: Debian's 6.1 passes
                // `(timer, expires, flags)`) is replaced by the timer
                // wheel's own rounding of the requested expiry, from the
                // jiffy of the start.
                let bucket = if tw.bucket_expiry >= tw.expires
                    && tw.bucket_expiry - tw.expires <= tmo_j / 8 + 1
                {
                    tw.bucket_expiry
                } else {
                    horizon::timer_wheel_fire(tw.expires, ev.jiffies, hz)
                };
                let death_ns = ev.ts_ns.saturating_add(horizon::jiffies_to_ns(
                    bucket.saturating_sub(ev.jiffies),
                    hz,
                ));
                // Seen from its change to FIN_WAIT2 (a wait above 60 s,
                // whose keepalive timer just handed over): the wait began
                // then, under the limit named then.
                let entry = self
                    .flows
                    .flow(slot)
                    .fin_wait2
                    .filter(|fw| fw.tw_skaddr == 0);
                let source = entry.map_or_else(
                    || boundary_source(tmo_j, tw.netns_fin_timeout_j, hz),
                    |fw| fw.first_prediction.source,
                );
                let start_ns = entry.map_or(ev.ts_ns, |fw| fw.since_ns);
                let prediction = Prediction {
                    death_ns,
                    made_at_ns: ev.ts_ns,
                    boundary_ms: death_ns.saturating_sub(start_ns) / NSEC_PER_MSEC,
                    source,
                    start_ns,
                };
                let f = self.flows.flow_mut(slot);
                f.local = ev.local;
                f.remote = ev.remote;
                if ev.netns != 0 {
                    f.netns = ev.netns;
                }
                f.orphan = true;
                f.state = TcpState::FinWait2;
                f.last_event_ns = f.last_event_ns.max(ev.ts_ns);
                f.fin_wait2 = Some(FinWait2 {
                    since_ns: start_ns,
                    death_ns,
                    tw_skaddr: ev.skaddr,
                    first_prediction: entry.map_or(prediction, |fw| fw.first_prediction),
                });
                if f.streak.is_none() && f.persist.is_none() {
                    f.prediction = Some(prediction);
                }
                self.flows.touch(slot);
            }
            TcpState::TimeWait => {
                // The peer's FIN: a normal close, not a stall.
                if let Some(slot) = self.resolve(ev, false) {
                    let f = self.flows.flow_mut(slot);
                    if f.fin_wait2.take().is_some() {
                        self.sink.stats.fin_wait2_peer_fin += 1;
                        self.close_slot(slot, ev.ts_ns, true);
                    }
                }
            }
            _ => {}
        }
    }

    /// The timewait timer ran: the kernel ends the connection now. In the
    /// FIN_WAIT2 substate that is a FIN_WAIT2 timeout (counted, with the
    /// prediction's error); in TIME_WAIT (a re-arm the wheel absorbed
    /// without a start) a normal close.
    pub(super) fn on_tw_expire(&mut self, ev: &SockEvent) {
        let Some(slot) = self.resolve(ev, false) else {
            return;
        };
        let f = self.flows.flow_mut(slot);
        let Some(fw) = f.fin_wait2.take() else {
            return;
        };
        if ev.state == TcpState::FinWait2 {
            f.timed_out = true;
            let last = f.prediction.filter(|p| p.made_at_ns >= fw.since_ns);
            let (cookie, remote) = (f.cookie, f.remote);
            self.sink.stats.fin_wait2_timeouts += 1;
            self.sink.timeout(TimeoutFacts {
                cookie,
                remote,
                evidence: TimeoutEvidence::TimewaitExpiry,
                actual_ns: ev.ts_ns,
                last: last.or(Some(fw.first_prediction)),
                first: Some(fw.first_prediction),
            });
        } else {
            self.sink.stats.fin_wait2_peer_fin += 1;
        }
        self.close_slot(slot, ev.ts_ns, true);
    }

    /// Whether a flow waits in FIN_WAIT2 long enough to be listed at
    /// `now_ns` (and its end is not overdue).
    pub(super) fn fin_wait2_listed(&self, fw: &FinWait2, now_ns: u64) -> bool {
        now_ns.saturating_sub(fw.since_ns) >= super::dur_ns(self.cfg.fin_wait2_after)
            && now_ns <= fw.death_ns.saturating_add(FIN_WAIT2_GRACE_NS)
    }
}

/// How long past its predicted end a FIN_WAIT2 flow without an expiry
/// event stays (a lost event, or a timewait socket the kernel killed early:
/// a reset, its namespace's exit).
pub(crate) const FIN_WAIT2_GRACE_NS: u64 = 2_000_000_000;

/// Announces the FIN_WAIT2 stalls due at `now_ns` and drops overdue ones
/// (called from the tick for every active flow).
pub(super) fn tick_flow(e: &mut Engine, slot: u32, now_ns: u64) {
    let f = e.flows.flow(slot);
    let Some(fw) = f.fin_wait2 else {
        return;
    };
    if now_ns > fw.death_ns.saturating_add(FIN_WAIT2_GRACE_NS) {
        let f = e.flows.flow_mut(slot);
        f.fin_wait2 = None;
        f.announced &= !StallClass::FinWait2.bit();
        e.sink.stats.fin_wait2_unseen_end += 1;
        e.close_slot(slot, now_ns, true);
        return;
    }
    if e.fin_wait2_listed(&fw, now_ns) && f.announced & StallClass::FinWait2.bit() == 0 {
        let f = e.flows.flow_mut(slot);
        f.announced |= StallClass::FinWait2.bit();
        let (cookie, remote) = (f.cookie, f.remote);
        e.sink
            .stall_started(StallClass::FinWait2, cookie, remote, now_ns);
    }
}

#[cfg(test)]
mod tests;
