//! When the drop probe is attached ([`DropGate`]): at once when the first
//! flow enters a loss episode (its drops are the evidence of `local_drop`,
//! and the next retransmission is at most one RTO away), and detached only
//! after no flow has been in one for [`DETACH_AFTER`], so a flow that keeps
//! flapping in and out of an episode costs at most one attach and one
//! detach per [`DETACH_AFTER`]. A failed attach is retried after
//! [`RETRY_AFTER`] (each failure is logged and counted by the caller).

use std::time::{Duration, Instant};

/// How long the probe stays attached after the last episode ended.
pub const DETACH_AFTER: Duration = Duration::from_secs(30);
/// How long after a failed attach the next try is.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// What to do with the probe now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateAction {
    Attach,
    Detach,
    Nothing,
}

#[derive(Debug, Default)]
pub struct DropGate {
    attached: bool,
    /// Since when no flow has been in an episode (while attached).
    empty_since: Option<Instant>,
    /// No attach before this (after a failure).
    retry_at: Option<Instant>,
}

impl DropGate {
    #[cfg(test)]
    pub fn attached(&self) -> bool {
        self.attached
    }

    /// The action for `episodes` flows in a loss episode at `now`; the
    /// caller applies it and reports back with [`DropGate::attach_result`]
    /// (an attach) or nothing (a detach always succeeds).
    pub fn decide(&mut self, episodes: usize, now: Instant) -> GateAction {
        if episodes > 0 {
            self.empty_since = None;
            if self.attached || self.retry_at.is_some_and(|t| now < t) {
                return GateAction::Nothing;
            }
            return GateAction::Attach;
        }
        if !self.attached {
            return GateAction::Nothing;
        }
        let since = *self.empty_since.get_or_insert(now);
        if now.duration_since(since) >= DETACH_AFTER {
            self.attached = false;
            self.empty_since = None;
            return GateAction::Detach;
        }
        GateAction::Nothing
    }

    /// The outcome of the attach [`DropGate::decide`] asked for.
    pub fn attach_result(&mut self, ok: bool, now: Instant) {
        self.attached = ok;
        self.retry_at = (!ok).then(|| now + RETRY_AFTER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn attaches_at_the_first_episode_and_detaches_after_the_quiet_period() {
        let t0 = Instant::now();
        let mut g = DropGate::default();
        assert_eq!(g.decide(0, t0), GateAction::Nothing, "no episode: detached");
        assert_eq!(g.decide(1, t0), GateAction::Attach);
        g.attach_result(true, t0);
        assert_eq!(g.decide(3, t0 + s(1)), GateAction::Nothing);
        // The last episode ends: still attached until DETACH_AFTER later.
        assert_eq!(g.decide(0, t0 + s(2)), GateAction::Nothing);
        assert_eq!(
            g.decide(0, t0 + s(2) + DETACH_AFTER - s(1)),
            GateAction::Nothing
        );
        assert!(g.attached());
        assert_eq!(g.decide(0, t0 + s(2) + DETACH_AFTER), GateAction::Detach);
        assert!(!g.attached());
        assert_eq!(g.decide(0, t0 + s(100)), GateAction::Nothing);
        assert_eq!(g.decide(1, t0 + s(101)), GateAction::Attach);
    }

    #[test]
    fn a_flapping_flow_does_not_attach_and_detach_each_time() {
        let t0 = Instant::now();
        let mut g = DropGate::default();
        let mut actions = 0;
        // In and out of an episode every second for five minutes.
        for i in 0..300u64 {
            let a = g.decide((i % 2) as usize, t0 + s(i));
            if a == GateAction::Attach {
                g.attach_result(true, t0 + s(i));
            }
            actions += usize::from(a != GateAction::Nothing);
        }
        assert_eq!(actions, 1, "one attach, no detach while it flaps");
    }

    #[test]
    fn a_failed_attach_is_retried_after_a_pause() {
        let t0 = Instant::now();
        let mut g = DropGate::default();
        assert_eq!(g.decide(1, t0), GateAction::Attach);
        g.attach_result(false, t0);
        assert_eq!(g.decide(1, t0 + s(1)), GateAction::Nothing);
        assert_eq!(g.decide(1, t0 + RETRY_AFTER), GateAction::Attach);
        g.attach_result(true, t0 + RETRY_AFTER);
        assert!(g.attached());
    }
}
