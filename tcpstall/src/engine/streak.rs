//! Per-flow bookkeeping shared by the event handlers: loss episodes,
//! retransmission streaks, zero-window episodes, the kernel's verdict at an
//! RTO expiry and the death prediction.

use tcpstall_common::pending;

use crate::kernel::event::{EventKind, Mechanism, NetnsSysctls, SockEvent, TcpState};

use super::flow::Anchor;
use super::flow::{Episode, Flow, Prediction, Streak};
use super::flow_key::merge_addr;
use super::horizon::{
    self, BoundaryRule, NSEC_PER_MSEC, NSEC_PER_SEC, NoPrediction, RtoWalk, SynLimits,
    TCP_RTO_MIN_MS, TCP_TIMEOUT_INIT_MS,
};
use super::sink::Sink;
use super::{Engine, PersistEnd, StallClass, StreakOutcome, dur_ns};

/// A pre-stamp episode (first RTO, `retrans_stamp` still 0) and the stamp
/// seen later are the same episode when this close.
const EPISODE_MATCH_NS: u64 = NSEC_PER_SEC;

/// TCP sequence comparison: `a` after `b`.
pub(super) fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

pub(super) fn is_syn_state(s: TcpState) -> bool {
    matches!(
        s,
        TcpState::SynSent | TcpState::SynRecv | TcpState::NewSynRecv
    )
}

impl Engine {
    pub(super) fn grace_ns(&self, interval_ns: u64) -> u64 {
        dur_ns(self.cfg.stale_grace)
            .saturating_add((interval_ns as f64 * self.cfg.stale_grace_factor) as u64)
    }

    pub(super) fn sysctls_of(&self, f: &Flow) -> Option<NetnsSysctls> {
        f.sysctls.or_else(|| self.netns.get(&f.netns).copied())
    }

    fn rule_of(&self, f: &Flow) -> Option<BoundaryRule> {
        BoundaryRule::select(
            f.user_timeout_ms,
            f.orphan,
            f.evidence.soft_error != 0,
            self.sysctls_of(f),
        )
    }

    pub(super) fn rto_max_j(&self, f: &Flow) -> u64 {
        horizon::rto_max_jiffies(
            f.rto_max_jiffies,
            self.sysctls_of(f).and_then(|s| s.tcp_rto_max_ms),
            self.hz.hz(),
        )
    }

    pub(super) fn j_to_ns(&self, j: u64) -> u64 {
        horizon::jiffies_to_ns(j, self.hz.hz())
    }

    /// The rule `tcp_write_timeout()` applies at the expiry `a`, the SYN_SENT
    /// retry limits and the base of `tcp_model_timeout` (200 ms, or the
    /// initial RTO in SYN_SENT). Err: no prediction, and why (None: no
    /// reason worth telling, e.g. SYN_RECV or unknown sysctls).
    pub(super) fn rule_at(
        &self,
        f: &Flow,
        a: &Anchor,
    ) -> Result<(BoundaryRule, Option<SynLimits>, u64), Option<NoPrediction>> {
        if f.state == TcpState::SynSent {
            let (rule, lim) =
                horizon::syn_rule(f.user_timeout_ms, f.syn_retries, self.sysctls_of(f))
                    .map_err(Some)?;
            let hz = self.hz.hz();
            let init_j = horizon::syn_initial_rto(
                u64::from(a.rto_jiffies),
                a.retransmits,
                lim.linear,
                self.rto_max_j(f),
            )
            .unwrap_or_else(|| horizon::msecs_to_jiffies(TCP_TIMEOUT_INIT_MS, hz));
            return Ok((rule, Some(lim), horizon::jiffies_to_msecs(init_j, hz)));
        }
        if a.window_shrunk || is_syn_state(f.state) {
            return Err(None);
        }
        Ok((self.rule_of(f).ok_or(None)?, None, TCP_RTO_MIN_MS))
    }

    /// Death prediction from the flow's last RTO expiry.
    fn predict(&self, f: &Flow) -> Option<Prediction> {
        let a = f.anchor?;
        let ep = f.episode?;
        let (rule, syn, base_ms) = self.rule_at(f, &a).ok()?;
        let walk = RtoWalk {
            start_ns: ep.start_ns,
            at_ns: a.at_ns,
            at_jiffies: a.jiffies,
            retransmits: a.retransmits,
            rto_jiffies: a.rto_jiffies,
            rto_max_jiffies: self.rto_max_j(f),
            hz: self.hz.hz(),
            rule,
            base_ms,
            timer_wheel: self.cfg.timer_wheel,
            syn,
        };
        let d = horizon::predict_rto_death(&walk)?;
        Some(Prediction {
            death_ns: d.at_ns,
            made_at_ns: a.at_ns,
            boundary_ms: d.boundary.ms,
            source: d.boundary.source,
            start_ns: ep.start_ns,
        })
    }

    /// The kernel's verdict at an RTO expiry (before it retransmits):
    /// dead iff `icsk_retransmits > 0 && now - retrans_stamp >= boundary`.
    pub(super) fn rto_verdict(&self, f: &Flow, ev: &SockEvent) -> Option<bool> {
        if ev.mechanism == Mechanism::SockOps {
            return Some(ev.rto_expired_verdict);
        }
        if ev.retransmits == 0 {
            return Some(false);
        }
        let a = f.anchor?;
        let (rule, syn, base_ms) = self.rule_at(f, &a).ok()?;
        let ep = f.episode?;
        if syn.is_some_and(|s| ev.retransmits >= s.max_retransmits) {
            return Some(true);
        }
        let hz = self.hz.hz();
        let max_ms = horizon::jiffies_to_msecs(self.rto_max_j(f), hz);
        let b = rule.at(
            horizon::jiffies_to_msecs(u64::from(ev.rto_jiffies), hz),
            max_ms,
            base_ms,
        );
        Some(ev.ts_ns.saturating_sub(ep.start_ns) >= b.ms.saturating_mul(NSEC_PER_MSEC))
    }

    /// Updates the flow's episode from an event's `retrans_stamp`; returns
    /// true when this event shows a new episode (the previous one ended with
    /// every retransmission acknowledged).
    fn update_episode(f: &mut Flow, ev: &SockEvent, same_rto_as_anchor: bool) -> bool {
        let Some(sock) = ev.sock else {
            // sock_ops: no stamp; keep what earlier events said.
            if f.episode.is_none() {
                f.episode = Some(Episode {
                    stamp: 0,
                    start_ns: ev.ts_ns,
                });
                return true;
            }
            return false;
        };
        let stamp = sock.retrans_stamp;
        match (f.episode, stamp) {
            (None, 0) => {
                f.episode = Some(Episode {
                    stamp: 0,
                    start_ns: ev.ts_ns,
                });
                true
            }
            (None, s) => {
                f.episode = Some(Episode {
                    stamp: s,
                    start_ns: horizon::stamp_to_ns(s, sock.usec_ts, ev.ts_ns),
                });
                true
            }
            (Some(ep), 0) => {
                // Still 0: the retransmission of the RTO that was seen
                // before the stamp got set continues the episode. So does the
                // first RTO after a loss probe (a probe never sets
                // retrans_stamp; the RTO's retransmission will): the same
                // loss, re-anchored at this expiry, where the kernel's
                // boundary will count from. ACK progress in between already
                // ended the streak (`recovered`).
                if ep.stamp == 0 && same_rto_as_anchor {
                    false
                } else {
                    f.episode = Some(Episode {
                        stamp: 0,
                        start_ns: ev.ts_ns,
                    });
                    !(ep.stamp == 0 && Self::is_rto_expiry(ev))
                }
            }
            (Some(ep), s) if ep.stamp == s => false,
            (Some(ep), s) => {
                let start = horizon::stamp_to_ns(s, sock.usec_ts, ev.ts_ns);
                let same = ep.stamp == 0 && start.abs_diff(ep.start_ns) <= EPISODE_MATCH_NS;
                f.episode = Some(Episode {
                    stamp: s,
                    start_ns: start,
                });
                !same
            }
        }
    }

    /// Absorbs the snapshot fields every event kind may carry.
    pub(super) fn absorb(f: &mut Flow, ev: &SockEvent) {
        f.last_event_ns = f.last_event_ns.max(ev.ts_ns);
        if ev.cookie != 0 {
            f.cookie = ev.cookie;
        }
        if ev.netns != 0 {
            f.netns = ev.netns;
        }
        if ev.cgroup_id != 0 {
            f.cgroup_id = ev.cgroup_id;
        }
        f.local = merge_addr(f.local, ev.local);
        f.remote = merge_addr(f.remote, ev.remote);
        f.orphan |= ev.orphan;
        if let Some(s) = ev.netns_sysctls {
            f.sysctls = Some(s);
        }
        if ev.kind != EventKind::State && !matches!(ev.state, TcpState::Unknown(_)) {
            f.state = ev.state;
        }
        if matches!(
            ev.kind,
            EventKind::Retransmit | EventKind::WriteTimer | EventKind::Sweep
        ) {
            // Still transmitting: whatever said it died (a verdict without
            // close or error report) was wrong.
            f.timed_out = false;
            if Self::knows_retransmits(ev) {
                f.retransmits = ev.retransmits;
            }
            if ev.rto_jiffies != 0 {
                f.rto_jiffies = ev.rto_jiffies;
            }
            if ev.snd_una != 0 {
                f.snd_una = ev.snd_una;
            }
            f.packets_out = ev.packets_out;
            f.total_retrans = f.total_retrans.max(ev.total_retrans);
            if let Some(s) = ev.sock {
                f.evidence.observe(&s, ev.err_soft);
                f.backoff = s.backoff;
                f.user_timeout_ms = s.user_timeout_ms;
                f.syn_retries = s.syn_retries;
                f.rto_max_jiffies = s.rto_max_jiffies;
                f.usec_ts = s.usec_ts;
                f.snd_wnd = Some(s.snd_wnd);
            }
        }
    }

    /// The socket as the kernel leaves it after handling RTO number `idx`
    /// (what `ss` shows): retransmits and backoff incremented, RTO doubled.
    pub(super) fn after_rto(f: &mut Flow, idx: u32, rto_jiffies: u32, max_j: u64) {
        f.retransmits = idx;
        f.backoff = f.backoff.max(idx.saturating_sub(1)).saturating_add(1);
        if rto_jiffies != 0 {
            f.rto_jiffies = (u64::from(rto_jiffies) * 2).min(max_j.max(1)) as u32;
        }
    }

    /// Ends the flow's streak with `outcome` (and forgets its anchor and
    /// prediction unless it died).
    pub(super) fn end_streak(f: &mut Flow, sink: &mut Sink, outcome: StreakOutcome, end_ns: u64) {
        let Some(st) = f.streak.take() else {
            return;
        };
        match outcome {
            StreakOutcome::Recovered => f.history.recovered += 1,
            StreakOutcome::TimedOut => f.history.timed_out += 1,
            StreakOutcome::Closed => f.history.closed += 1,
        }
        sink.streak_ended(
            (f.cookie, f.remote, f.evidence.mss_lowered()),
            &st,
            outcome,
            end_ns,
        );
        f.announced &= !(StallClass::Retransmit.bit() | StallClass::Connect.bit());
        if outcome == StreakOutcome::Recovered {
            f.anchor = None;
            f.prediction = None;
            f.verdict = None;
        }
    }

    /// Ends the flow's persist episode, if any: it lasted until `end_ns`;
    /// `by` ended it at `at_ns`.
    pub(super) fn end_persist(
        f: &mut Flow,
        sink: &mut Sink,
        end_ns: u64,
        (by, at_ns): (PersistEnd, u64),
    ) {
        if let Some(p) = f.persist.take() {
            if p.window_open {
                // Data that never left: announced as a retransmit stall.
                if f.streak.is_none() {
                    f.announced &= !StallClass::Retransmit.bit();
                }
            } else {
                sink.persist_ended((f.cookie, f.remote), &p, end_ns, (by, at_ns));
            }
            f.announced &= !StallClass::ZeroWindow.bit();
            if f.streak.is_none() {
                f.prediction = None;
            }
        }
    }

    /// Progress since the streak's last event: `snd_una` moved or
    /// `icsk_retransmits` went down. A zero `snd_una` is a failed read, and
    /// a sock_ops retransmission callback has no `icsk_retransmits`.
    pub(super) fn acked(st: &Streak, ev: &SockEvent) -> bool {
        let una = ev.snd_una != 0 && st.snd_una_last != 0 && seq_after(ev.snd_una, st.snd_una_last);
        una || (Self::knows_retransmits(ev) && ev.retransmits < st.last_retransmits)
    }

    /// An RTO expiry: the write timer with `ICSK_TIME_RETRANS` pending, or
    /// the retransmission it sends (`icsk_pending` 0 in the event).
    fn is_rto_expiry(ev: &SockEvent) -> bool {
        match (ev.kind, ev.sock) {
            (EventKind::WriteTimer, Some(s)) => s.pending == pending::RETRANS,
            (EventKind::Retransmit, Some(s)) => s.pending == 0,
            _ => false,
        }
    }

    pub(super) fn knows_retransmits(ev: &SockEvent) -> bool {
        !(ev.mechanism == Mechanism::SockOps && ev.kind == EventKind::Retransmit)
    }

    /// Starts a streak if none is running; returns it.
    /// Close the current streak as recovered when `recovered` (ACK progress),
    /// and again when `ev` starts a new loss episode; then return the streak
    /// `ev` belongs to (created if needed).
    pub(super) fn roll_streak<'a>(
        f: &'a mut Flow,
        sink: &mut Sink,
        ev: &SockEvent,
        recovered: bool,
        same_rto_as_anchor: bool,
    ) -> &'a mut Streak {
        if recovered && let Some(st) = f.streak {
            Self::end_streak(f, sink, StreakOutcome::Recovered, st.last_event_ns);
        }
        let new_episode = Self::update_episode(f, ev, same_rto_as_anchor);
        if new_episode && let Some(st) = f.streak {
            Self::end_streak(f, sink, StreakOutcome::Recovered, st.last_event_ns);
        }
        Self::ensure_streak(f, sink, ev, new_episode)
    }

    fn ensure_streak<'a>(
        f: &'a mut Flow,
        sink: &mut Sink,
        ev: &SockEvent,
        new_episode: bool,
    ) -> &'a mut Streak {
        if f.streak.is_none() {
            // The streak starts at the episode start when it opens the
            // episode, else (ACK progress within a persisting episode) now.
            let start = match f.episode {
                Some(ep) if new_episode => ep.start_ns.min(ev.ts_ns),
                _ => ev.ts_ns,
            };
            f.history.streaks += 1;
            if f.persist.is_none() {
                f.new_episode_evidence();
            }
            sink.stats.streaks_started += 1;
            sink.remotes.counters(f.remote, ev.ts_ns).streaks += 1;
            f.streak = Some(Streak {
                start_ns: start,
                last_event_ns: ev.ts_ns,
                rtos: 0,
                retransmissions: 0,
                last_retransmits: ev.retransmits,
                snd_una_start: ev.snd_una,
                snd_una_last: ev.snd_una,
                backoff: 0,
                rto_jiffies: ev.rto_jiffies,
                next_due_ns: ev.ts_ns,
                next_interval_ns: 0,
                first_prediction: None,
                stalled: false,
            });
        }
        f.streak.as_mut().expect("just set")
    }

    /// The class of a retransmission streak and the RTO count that makes
    /// it a stall: a connect() is one from its first SYN retransmission.
    pub(super) fn streak_class(&self, f: &Flow) -> (StallClass, u32) {
        if f.state == TcpState::SynSent {
            (StallClass::Connect, 1)
        } else {
            (StallClass::Retransmit, self.cfg.min_rto_streak)
        }
    }

    pub(super) fn check_retransmit_stall(&mut self, slot: u32, now_ns: u64) {
        let (class, min) = self.streak_class(self.flows.flow(slot));
        let f = self.flows.flow_mut(slot);
        if let Some(st) = f.streak.as_mut()
            && !st.stalled
            && st.rtos >= min
        {
            st.stalled = true;
            if f.announced & class.bit() == 0 {
                f.announced |= class.bit();
                let (cookie, remote) = (f.cookie, f.remote);
                self.sink.stall_started(class, cookie, remote, now_ns);
            }
        }
    }

    pub(super) fn update_prediction(&mut self, slot: u32) {
        let p = self.predict(self.flows.flow(slot));
        let f = self.flows.flow_mut(slot);
        f.prediction = p;
        if let Some(st) = f.streak.as_mut()
            && st.first_prediction.is_none()
        {
            st.first_prediction = p;
        }
    }

    pub(super) fn refresh_predictions(&mut self) {
        let mut slots = std::mem::take(&mut self.scratch);
        self.flows.active_slots(&mut slots);
        for &s in &slots {
            let f = self.flows.flow(s);
            if f.anchor.is_some() && f.streak.is_some() && !f.verdict.is_some_and(|v| v.dead) {
                self.update_prediction(s);
            }
        }
        self.scratch = slots;
    }
}
