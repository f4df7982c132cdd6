//! Keepalive stalls (issue 20, item 2): an established socket with nothing
//! in flight whose keepalive probes go unanswered. Seen at each expiry of
//! its keepalive timer (`sk->sk_timer`, [`EventKind::KeepaliveTimer`]) or
//! in a sweep snapshot; listed from the expiry that finds the first probe
//! unanswered (`icsk_probes_out >= 1`: an answer resets it), its death
//! predicted by [`horizon::predict_keepalive_death`].
//!
//! [`EventKind::KeepaliveTimer`]: crate::kernel::event::EventKind::KeepaliveTimer

use crate::kernel::event::{SockEvent, SockFields, TcpState};

use super::flow::{Flow, Keepalive, Prediction};
use super::horizon::{self, KeepaliveWalk, NSEC_PER_MSEC};
use super::{Engine, StallClass};

/// `keepalive_time_elapsed()` at the event: jiffies since the last receive,
/// `min(now - icsk_ack.lrcvtime, now - rcv_tstamp)` (32-bit jiffies).
pub(super) fn elapsed_since_receive(jiffies: u64, sock: &SockFields) -> u64 {
    let now = jiffies as u32;
    u64::from(
        now.wrapping_sub(sock.keepalive.lrcvtime)
            .min(now.wrapping_sub(sock.rcv_tstamp)),
    )
}

/// Whether the socket is probing with keepalive: established, SO_KEEPALIVE
/// on, nothing in flight, and a probe out unanswered.
pub(super) fn unanswered(ev: &SockEvent, sock: &SockFields) -> bool {
    ev.state == TcpState::Established
        && sock.keepalive.keepopen
        && ev.packets_out == 0
        && sock.probes_out != 0
}

impl Engine {
    /// One expiry of the keepalive timer (snapshot before the kernel ran it).
    pub(super) fn on_keepalive_timer(&mut self, ev: &SockEvent) {
        let Some(sock) = ev.sock else {
            self.sink.stats.timer_events_ignored += 1;
            return;
        };
        // An orphan's FIN_WAIT2 wait above 60 s handing over to its
        // timewait socket, whose change to FIN_WAIT2 was never seen.
        if self.recover_fin_wait2_entry(ev, &sock) {
            return;
        }
        if !unanswered(ev, &sock) {
            // Answered (an ACK reset icsk_probes_out), data in flight or
            // not keepalive at all: any episode is over.
            if let Some(slot) = self.resolve(ev, false) {
                let f = self.flows.flow_mut(slot);
                Self::absorb(f, ev);
                Self::end_keepalive(f);
                self.flows.touch(slot);
            }
            return;
        }
        let Some(slot) = self.resolve(ev, true) else {
            return;
        };
        let f = self.flows.flow_mut(slot);
        Self::absorb(f, ev);
        let elapsed_j = elapsed_since_receive(ev.jiffies, &sock);
        // This expiry sends the next probe `intvl` ahead (or kills).
        self.keepalive_at(slot, ev, &sock, elapsed_j, ev.ts_ns, ev.jiffies);
    }

    /// Updates (or starts) the keepalive episode of `slot` from the state
    /// `sock` at the expiry `(at_ns, at_jiffies)`, `elapsed_j` after the last
    /// receive: the prediction, the next expiry and the stall announcement.
    pub(super) fn keepalive_at(
        &mut self,
        slot: u32,
        ev: &SockEvent,
        sock: &SockFields,
        elapsed_j: u64,
        at_ns: u64,
        at_jiffies: u64,
    ) {
        let hz = self.hz.hz();
        let wheel = self.cfg.timer_wheel;
        let f = self.flows.flow_mut(slot);
        let ka = sock.keepalive;
        let rule = horizon::keepalive_rule(
            (ka.time_j, ka.intvl_j, ka.probes),
            ka.netns,
            sock.user_timeout_ms,
        );
        let last_rcv_ns = at_ns.saturating_sub(horizon::jiffies_to_ns(elapsed_j, hz));
        let prediction = rule.ok().and_then(|rule| {
            let d = horizon::predict_keepalive_death(&KeepaliveWalk {
                at_ns,
                at_jiffies,
                probes_out: sock.probes_out,
                elapsed_j,
                rule,
                hz,
                timer_wheel: wheel,
            })?;
            Some(Prediction {
                death_ns: d.at_ns,
                made_at_ns: ev.ts_ns,
                boundary_ms: d.at_ns.saturating_sub(last_rcv_ns) / NSEC_PER_MSEC,
                source: rule.source,
                start_ns: last_rcv_ns,
            })
        });
        let intvl_j = rule.map_or(u64::from(ka.intvl_j), |r| r.intvl_j);
        let interval = horizon::jiffies_to_ns(intvl_j.max(1), hz);
        let next_due_ns = at_ns.saturating_add(interval);
        let k = f.keepalive.get_or_insert(Keepalive {
            since_ns: ev.ts_ns,
            last_ns: ev.ts_ns,
            next_due_ns,
            next_interval_ns: interval,
            probes_out: 0,
            first_prediction: prediction,
            no_prediction: None,
        });
        k.last_ns = ev.ts_ns;
        k.next_due_ns = next_due_ns;
        k.next_interval_ns = interval;
        k.probes_out = sock.probes_out;
        k.no_prediction = rule.err();
        if k.first_prediction.is_none() {
            k.first_prediction = prediction;
        }
        if f.streak.is_none() && f.persist.is_none() {
            f.prediction = prediction;
        }
        if f.announced & StallClass::Keepalive.bit() == 0 {
            f.announced |= StallClass::Keepalive.bit();
            let (cookie, remote) = (f.cookie, f.remote);
            self.sink
                .stall_started(StallClass::Keepalive, cookie, remote, ev.ts_ns);
        }
        self.flows.touch(slot);
    }

    /// Ends a keepalive episode (answered, overdue or dead).
    pub(super) fn end_keepalive(f: &mut Flow) {
        if f.keepalive.take().is_some() {
            f.announced &= !StallClass::Keepalive.bit();
            if f.streak.is_none() && f.persist.is_none() {
                f.prediction = None;
            }
        }
    }
}

#[cfg(test)]
mod tests;
