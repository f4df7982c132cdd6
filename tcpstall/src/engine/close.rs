//! The end of a flow: error reports (ETIMEDOUT or a soft error after a
//! fatal expiry), closes, and settling the outcome of a streak that was
//! active at close.

use std::net::SocketAddr;

use crate::kernel::event::{ETIMEDOUT, SockEvent};

use super::flow::{Prediction, Streak, Verdict};
use super::sink::TimeoutFacts;
use super::{Engine, PersistEnd, StreakOutcome, TimeoutEvidence, dur_ns};

/// A closed flow remembered for a late error report / settling its streak.
#[derive(Clone, Debug)]
pub(super) struct Closed {
    pub(super) cookie: u64,
    skaddr: u64,
    remote: SocketAddr,
    pub(super) closed_at_ns: u64,
    prediction: Option<Prediction>,
    verdict: Option<Verdict>,
    /// The timeout was already recorded.
    timed_out: bool,
    /// A streak that was active at close, waiting for its outcome.
    pending: Option<Streak>,
    /// The first prediction of a keepalive episode active at close.
    keepalive_first: Option<Prediction>,
}

impl Closed {
    /// Whether `ev` is about this closed socket: the same cookie, or, for a
    /// cookie-less snapshot, the same address and peer (an address the
    /// kernel reused holds another socket).
    pub(super) fn is_socket_of(&self, ev: &SockEvent) -> bool {
        if ev.cookie != 0 {
            return self.cookie == ev.cookie;
        }
        ev.skaddr != 0 && self.skaddr == ev.skaddr && self.remote == ev.remote
    }
}

impl Engine {
    pub(super) fn on_error_report(&mut self, ev: &SockEvent) {
        let settle = dur_ns(self.cfg.close_settle);
        let etimedout = ev.sk_err == ETIMEDOUT;
        if let Some(slot) = self.resolve(ev, false) {
            let f = self.flows.flow_mut(slot);
            Self::absorb(f, ev);
            if f.timed_out {
                return;
            }
            let dying = f
                .verdict
                .is_some_and(|v| v.dead && ev.ts_ns.saturating_sub(v.at_ns) <= settle);
            if !(etimedout || dying) {
                return;
            }
            let evidence = if etimedout {
                TimeoutEvidence::Etimedout
            } else {
                TimeoutEvidence::SoftError { errno: ev.sk_err }
            };
            f.timed_out = true;
            let pred = f.prediction;
            self.sink.timeout(TimeoutFacts {
                cookie: f.cookie,
                remote: f.remote,
                evidence,
                actual_ns: ev.ts_ns,
                last: pred,
                first: f
                    .streak
                    .and_then(|st| st.first_prediction)
                    .or(f.keepalive.and_then(|k| k.first_prediction)),
            });
            Self::end_streak(f, &mut self.sink, StreakOutcome::TimedOut, ev.ts_ns);
            Self::end_persist(f, &mut self.sink, ev.ts_ns, (PersistEnd::Closed, ev.ts_ns));
            Self::end_keepalive(f);
            self.flows.touch(slot);
            return;
        }
        // Closed already (6.10+ closes before reporting)?
        let pos = self.closed.iter().rposition(|c| {
            (ev.cookie != 0 && c.cookie == ev.cookie)
                || (ev.cookie == 0 && ev.skaddr != 0 && c.skaddr == ev.skaddr)
        });
        match pos {
            Some(i) => {
                let c = &mut self.closed[i];
                if c.timed_out {
                    return;
                }
                let dying = c
                    .verdict
                    .is_some_and(|v| v.dead && ev.ts_ns.saturating_sub(v.at_ns) <= settle);
                if etimedout || dying {
                    let evidence = if etimedout {
                        TimeoutEvidence::Etimedout
                    } else {
                        TimeoutEvidence::SoftError { errno: ev.sk_err }
                    };
                    c.timed_out = true;
                    let (cookie, remote, pred) = (c.cookie, c.remote, c.prediction);
                    let pending = c.pending.take();
                    self.sink.timeout(TimeoutFacts {
                        cookie,
                        remote,
                        evidence,
                        actual_ns: ev.ts_ns,
                        last: pred,
                        first: pending
                            .and_then(|st| st.first_prediction)
                            .or(c.keepalive_first),
                    });
                    if let Some(st) = pending {
                        self.sink.streak_ended(
                            (cookie, remote, None),
                            &st,
                            StreakOutcome::TimedOut,
                            ev.ts_ns,
                        );
                    }
                } else if let Some(st) = c.pending.take() {
                    let (remote, at) = (c.remote, c.closed_at_ns);
                    self.sink.streak_ended(
                        (c.cookie, remote, None),
                        &st,
                        StreakOutcome::Closed,
                        at,
                    );
                }
            }
            None if etimedout => {
                self.sink.stats.timeouts_unmatched += 1;
                self.sink.timeout(TimeoutFacts {
                    cookie: ev.cookie,
                    remote: ev.remote,
                    evidence: TimeoutEvidence::Etimedout,
                    actual_ns: ev.ts_ns,
                    last: None,
                    first: None,
                });
            }
            None => {}
        }
    }

    /// Removes a flow on close. `superseded`: the socket vanished unseen
    /// (its address was reused), so its outcome is settled right away.
    pub(super) fn close_slot(&mut self, slot: u32, ts_ns: u64, superseded: bool) {
        let key = self.flows.key(slot);
        let Some(mut f) = self.flows.remove(&key) else {
            return;
        };
        self.sink.stats.flows_closed += 1;
        if f.skaddr != 0 && self.skaddr_map.get(&f.skaddr) == Some(&f.cookie) {
            self.skaddr_map.remove(&f.skaddr);
        }
        // Unsent data dies on its probe count: keep its prediction for the
        // timeout record (ending the episode forgets it).
        let unsent_prediction = f
            .persist
            .is_some_and(|p| p.window_open)
            .then_some(f.prediction)
            .flatten();
        // A keepalive death closes before it reports (6.10+): keep its
        // predictions for the timeout record.
        let keepalive_first = f.keepalive.take().and_then(|k| k.first_prediction);
        Self::end_persist(&mut f, &mut self.sink, ts_ns, (PersistEnd::Closed, ts_ns));
        f.prediction = f.prediction.or(unsent_prediction);
        let mut pending = None;
        if let Some(st) = f.streak.take() {
            if superseded {
                self.sink.streak_ended(
                    (f.cookie, f.remote, f.evidence.mss_lowered()),
                    &st,
                    StreakOutcome::Closed,
                    ts_ns,
                );
            } else {
                pending = Some(st);
            }
        }
        if self.closed.len() >= self.cfg.recently_closed
            && let Some(old) = self.closed.pop_front()
        {
            self.settle_closed(old);
        }
        self.closed.push_back(Closed {
            cookie: f.cookie,
            skaddr: f.skaddr,
            remote: f.remote,
            closed_at_ns: ts_ns,
            prediction: f.prediction,
            verdict: f.verdict,
            timed_out: f.timed_out,
            pending,
            keepalive_first,
        });
    }

    /// Gives a closed flow's pending streak its outcome: a close right after
    /// a fatal expiry is a timeout even without an error report (orphans get
    /// none), anything else a plain close.
    pub(super) fn settle_closed(&mut self, c: Closed) {
        let Some(st) = c.pending else {
            return;
        };
        let settle = dur_ns(self.cfg.close_settle);
        let dying = !c.timed_out
            && c.verdict
                .is_some_and(|v| v.dead && c.closed_at_ns.saturating_sub(v.at_ns) <= settle);
        if dying {
            self.sink.timeout(TimeoutFacts {
                cookie: c.cookie,
                remote: c.remote,
                evidence: TimeoutEvidence::Verdict,
                actual_ns: c.closed_at_ns,
                last: c.prediction,
                first: st.first_prediction,
            });
            self.sink.streak_ended(
                (c.cookie, c.remote, None),
                &st,
                StreakOutcome::TimedOut,
                c.closed_at_ns,
            );
        } else {
            self.sink.streak_ended(
                (c.cookie, c.remote, None),
                &st,
                StreakOutcome::Closed,
                c.closed_at_ns,
            );
        }
    }
}
