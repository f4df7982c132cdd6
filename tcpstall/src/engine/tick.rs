//! Time: ends overdue streaks and zero-window episodes, settles closed
//! flows, announces time-based stalls.

use super::sink::TimeoutFacts;
use super::{Engine, PersistEnd, StallClass, StreakOutcome, TimeoutEvidence, dur_ns};

impl Engine {
    /// Advances time: ends overdue streaks (recovered) and zero-window
    /// episodes, settles closed flows, announces time-based stalls.
    pub fn tick(&mut self, now_ns: u64) {
        let mut slots = std::mem::take(&mut self.scratch);
        self.flows.active_slots(&mut slots);
        let zw_after = dur_ns(self.cfg.zero_window_after);
        let cw_after = dur_ns(self.cfg.close_wait_after);
        for &s in &slots {
            let (streak_grace, persist_grace, keepalive_grace) = {
                let f = self.flows.flow(s);
                (
                    f.streak.map(|st| self.grace_ns(st.next_interval_ns)),
                    f.persist.map(|p| self.grace_ns(p.next_interval_ns)),
                    f.keepalive.map(|k| self.grace_ns(k.next_interval_ns)),
                )
            };
            let f = self.flows.flow_mut(s);
            if let (Some(st), Some(g)) = (f.streak, streak_grace)
                && now_ns > st.next_due_ns.saturating_add(g)
            {
                if f.verdict.is_some_and(|v| v.dead) && !f.timed_out {
                    // Died at its last expiry, but neither error report nor
                    // close came (lost events).
                    f.timed_out = true;
                    let pred = f.prediction;
                    let at = f.verdict.map_or(st.last_event_ns, |v| v.at_ns);
                    self.sink.timeout(TimeoutFacts {
                        cookie: f.cookie,
                        remote: f.remote,
                        evidence: TimeoutEvidence::Verdict,
                        actual_ns: at,
                        last: pred,
                        first: st.first_prediction,
                    });
                    Self::end_streak(f, &mut self.sink, StreakOutcome::TimedOut, at);
                } else {
                    Self::end_streak(
                        f,
                        &mut self.sink,
                        StreakOutcome::Recovered,
                        st.last_event_ns,
                    );
                }
            }
            if let Some(k) = f.keepalive
                && now_ns > k.next_due_ns.saturating_add(keepalive_grace.unwrap_or(0))
            {
                Self::end_keepalive(f);
            }
            if let (Some(p), Some(g)) = (f.persist, persist_grace)
                && now_ns > p.next_due_ns.saturating_add(g)
            {
                Self::end_persist(
                    f,
                    &mut self.sink,
                    p.last_probe_ns,
                    (PersistEnd::Quiet, now_ns),
                );
            }
            if let Some(p) = f.persist.as_mut()
                && !p.stalled
                && !p.window_open
                && now_ns.saturating_sub(p.since_ns) >= zw_after
            {
                p.stalled = true;
                if f.announced & StallClass::ZeroWindow.bit() == 0 {
                    f.announced |= StallClass::ZeroWindow.bit();
                    self.sink
                        .stall_started(StallClass::ZeroWindow, f.cookie, f.remote, now_ns);
                }
            }
            if let Some(since) = f.close_wait_since_ns
                && now_ns.saturating_sub(since) >= cw_after
                && f.announced & StallClass::CloseWait.bit() == 0
            {
                f.announced |= StallClass::CloseWait.bit();
                self.sink
                    .stall_started(StallClass::CloseWait, f.cookie, f.remote, now_ns);
            }
            super::fin_wait2::tick_flow(self, s, now_ns);
            if !self.flows.contains_slot(s) {
                continue;
            }
            self.flows.retier(s);
        }
        self.scratch = slots;
        let settle = dur_ns(self.cfg.close_settle);
        while self
            .closed
            .front()
            .is_some_and(|c| now_ns >= c.closed_at_ns.saturating_add(settle))
        {
            if let Some(c) = self.closed.pop_front() {
                self.settle_closed(c);
            }
        }
    }
}
