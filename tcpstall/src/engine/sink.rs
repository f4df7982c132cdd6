//! Where handlers put their results: the observation queue, per-remote
//! counters and engine statistics (split from the flow table for borrowing).

use std::collections::VecDeque;
use std::net::SocketAddr;

use super::flow::{Persist, Prediction, Streak};
use super::remote::RemoteTable;
use super::why::MssChange;
use super::{EngineStats, Observation, PersistEnd, StallClass, StreakOutcome, TimeoutEvidence};
use super::{secs, signed_secs};

/// Where handlers put their results (split from the flow table for borrowing).
#[derive(Debug)]
pub(super) struct Sink {
    pub(super) outbox: VecDeque<Observation>,
    pub(super) max_observations: usize,
    pub(super) remotes: RemoteTable,
    pub(super) stats: EngineStats,
    pub(super) abs_error_sum: f64,
}

impl Sink {
    pub(super) fn emit(&mut self, o: Observation) {
        if self.outbox.len() >= self.max_observations {
            self.outbox.pop_front();
            self.stats.observations_dropped += 1;
        }
        self.outbox.push_back(o);
    }

    pub(super) fn streak_ended(
        &mut self,
        (cookie, remote, mss_lowered): (u64, SocketAddr, Option<MssChange>),
        st: &Streak,
        outcome: StreakOutcome,
        end_ns: u64,
    ) {
        match outcome {
            StreakOutcome::Recovered => self.stats.streaks_recovered += 1,
            StreakOutcome::TimedOut => self.stats.streaks_timed_out += 1,
            StreakOutcome::Closed => self.stats.streaks_closed += 1,
        }
        self.emit(Observation::StreakEnded {
            remote,
            outcome,
            duration_s: secs(end_ns.saturating_sub(st.start_ns)),
            rtos: st.rtos,
            stalled: st.stalled,
            cookie,
            mss_lowered,
        });
    }

    pub(super) fn persist_ended(
        &mut self,
        (cookie, remote): (u64, SocketAddr),
        p: &Persist,
        end_ns: u64,
        (by, at_ns): (PersistEnd, u64),
    ) {
        self.emit(Observation::ZeroWindowEnded {
            cookie,
            remote,
            duration_s: secs(end_ns.saturating_sub(p.since_ns)),
            probes: p.probes,
            by,
            at_ns,
        });
    }

    pub(super) fn stall_started(
        &mut self,
        class: StallClass,
        cookie: u64,
        remote: SocketAddr,
        now_ns: u64,
    ) {
        self.stats.stalls_started += 1;
        self.remotes.counters(remote, now_ns).stalls += 1;
        self.emit(Observation::StallStarted {
            class,
            cookie,
            remote,
        });
    }

    pub(super) fn timeout(&mut self, t: TimeoutFacts) {
        self.stats.timeouts += 1;
        self.remotes.counters(t.remote, t.actual_ns).timeouts += 1;
        let error = t.last.map(|p| signed_secs(t.actual_ns, p.death_ns));
        if let Some(e) = error {
            self.stats.timeouts_predicted += 1;
            self.stats.last_prediction_error_s = Some(e);
            self.abs_error_sum += e.abs();
            self.stats.mean_abs_prediction_error_s =
                Some(self.abs_error_sum / self.stats.timeouts_predicted as f64);
        }
        self.emit(Observation::Timeout {
            cookie: t.cookie,
            remote: t.remote,
            evidence: t.evidence,
            actual_ns: t.actual_ns,
            predicted_ns: t.last.map(|p| p.death_ns),
            prediction_error_s: error,
            first_prediction_error_s: t.first.map(|p| signed_secs(t.actual_ns, p.death_ns)),
            lead_time_s: t
                .first
                .or(t.last)
                .map(|p| signed_secs(t.actual_ns, p.made_at_ns)),
            boundary_s: t.last.map(|p| p.boundary_ms as f64 / 1_000.0),
            boundary_source: t.last.map(|p| p.source),
        });
    }
}

/// What [`Sink::timeout`] records.
pub(super) struct TimeoutFacts {
    pub(super) cookie: u64,
    pub(super) remote: SocketAddr,
    pub(super) evidence: TimeoutEvidence,
    pub(super) actual_ns: u64,
    /// The last prediction made before the fatal expiry.
    pub(super) last: Option<Prediction>,
    /// The first prediction of the streak.
    pub(super) first: Option<Prediction>,
}

impl Sink {
    pub(super) fn stats_retransmit(
        &mut self,
        remote: SocketAddr,
        rto: bool,
        cause: super::cause::RetransmitCause,
        ts_ns: u64,
    ) {
        self.remotes.counters(remote, ts_ns).retransmits += 1;
        self.emit(Observation::Retransmit { remote, rto, cause });
    }

    pub(super) fn rto_expiry(&mut self, remote: SocketAddr, rtos: u32, ts_ns: u64) {
        self.remotes.counters(remote, ts_ns).rto_expiries += 1;
        self.emit(Observation::RtoExpiry { remote, rtos });
    }
}
