//! Views computed on demand: stalled flows, gauges, per-remote aggregation.

use std::collections::HashMap;
use std::net::SocketAddr;

use super::flow::{Flow, Prediction};
use super::horizon;
use super::remote;
use super::why;
use super::{
    Engine, FlowHistory, RemoteLive, RemotesView, StallClass, StallView, StalledCounts, dur_ns,
    secs, signed_secs,
};

/// Gauges computed in one pass ([`Engine::gauges`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Gauges {
    pub stalled: StalledCounts,
    pub near_timeout: usize,
    pub flows_tracked: usize,
}

impl Engine {
    /// The primary stall class of a flow at `now` (read-only: overdue streaks
    /// and episodes count as ended even before `tick` runs).
    pub(super) fn classify(&self, f: &Flow, now_ns: u64) -> Option<StallClass> {
        if f.timed_out {
            return None;
        }
        let (streak_class, min) = self.streak_class(f);
        if let Some(st) = f.streak
            && st.rtos >= min
            && now_ns
                <= st
                    .next_due_ns
                    .saturating_add(self.grace_ns(st.next_interval_ns))
        {
            return Some(streak_class);
        }
        // Data that never left: unanswered window probes count like RTO
        // expiries (`icsk_probes_out + 1` of them, this one included).
        if let Some(p) = f.persist
            && p.window_open
        {
            let live = now_ns
                <= p.next_due_ns
                    .saturating_add(self.grace_ns(p.next_interval_ns));
            return (live && p.probes_out.saturating_add(1) >= self.cfg.min_rto_streak)
                .then_some(StallClass::Retransmit);
        }
        if let Some(p) = f.persist
            && now_ns.saturating_sub(p.since_ns) >= dur_ns(self.cfg.zero_window_after)
            && now_ns
                <= p.next_due_ns
                    .saturating_add(self.grace_ns(p.next_interval_ns))
        {
            return Some(StallClass::ZeroWindow);
        }
        if let Some(k) = f.keepalive
            && now_ns
                <= k.next_due_ns
                    .saturating_add(self.grace_ns(k.next_interval_ns))
        {
            return Some(StallClass::Keepalive);
        }
        if let Some(since) = f.close_wait_since_ns
            && now_ns.saturating_sub(since) >= dur_ns(self.cfg.close_wait_after)
        {
            return Some(StallClass::CloseWait);
        }
        if let Some(fw) = f.fin_wait2
            && self.fin_wait2_listed(&fw, now_ns)
        {
            return Some(StallClass::FinWait2);
        }
        None
    }

    /// The prediction relevant to a class: (death, boundary ms, source, start).
    fn horizon_of(f: &Flow, class: StallClass) -> Option<Prediction> {
        match class {
            StallClass::Connect => f.prediction.filter(|_| f.streak.is_some()),
            StallClass::Retransmit => f
                .prediction
                .filter(|_| f.streak.is_some() || f.persist.is_some_and(|p| p.window_open)),
            StallClass::ZeroWindow => f.prediction.filter(|_| f.persist.is_some()),
            StallClass::Keepalive => f.prediction.filter(|_| f.keepalive.is_some()),
            StallClass::FinWait2 => f
                .prediction
                .filter(|_| f.fin_wait2.is_some())
                .or(f.fin_wait2.map(|fw| fw.first_prediction)),
            StallClass::CloseWait => f
                .prediction
                .filter(|_| f.streak.is_some() || f.persist.is_some()),
        }
    }

    fn near(&self, p: &Prediction, now_ns: u64) -> bool {
        let remaining = signed_secs(p.death_ns, now_ns);
        let fraction = if p.boundary_ms == 0 {
            1.0
        } else {
            secs(now_ns.saturating_sub(p.start_ns)) / (p.boundary_ms as f64 / 1_000.0)
        };
        remaining <= self.cfg.near_horizon_secs || fraction >= self.cfg.near_horizon_fraction
    }

    fn view(&self, f: &Flow, class: StallClass, now_ns: u64) -> StallView {
        let since = match class {
            StallClass::Connect => f.streak.map_or(now_ns, |st| st.start_ns),
            StallClass::Retransmit => match (f.streak, f.persist) {
                (Some(st), _) => st.start_ns,
                (None, Some(p)) => p.since_ns,
                (None, None) => now_ns,
            },
            StallClass::ZeroWindow => f.persist.map_or(now_ns, |p| p.since_ns),
            StallClass::CloseWait => f.close_wait_since_ns.unwrap_or(now_ns),
            StallClass::Keepalive => f.keepalive.map_or(now_ns, |k| k.since_ns),
            StallClass::FinWait2 => f.fin_wait2.map_or(now_ns, |fw| fw.since_ns),
        };
        let pred = Self::horizon_of(f, class);
        let hz = self.hz.hz();
        let zw = f.persist.filter(|p| !p.window_open);
        let (cause, cause_evidence) = self.cause_of(f, class);
        StallView {
            class,
            since_ns: since,
            stalled_for_s: secs(now_ns.saturating_sub(since)),
            cookie: f.cookie,
            local: f.local,
            remote: f.remote,
            netns: f.netns,
            cgroup_id: f.cgroup_id,
            state: f.state,
            retransmits: f.retransmits,
            rto_streak: match (f.streak, f.persist) {
                (Some(st), _) => st.rtos,
                (None, Some(p)) if p.window_open => p.probes_out.saturating_add(1),
                _ => 0,
            },
            backoff: f.backoff,
            rto_ms: horizon::jiffies_to_msecs(u64::from(f.rto_jiffies), hz),
            packets_out: f.packets_out,
            total_retrans: f.total_retrans,
            unacked_age_s: f
                .streak
                .and(f.episode)
                .map(|ep| secs(now_ns.saturating_sub(ep.start_ns))),
            boundary_s: pred.map(|p| p.boundary_ms as f64 / 1_000.0),
            boundary_source: pred.map(|p| p.source),
            predicted_timeout_ns: pred.map(|p| p.death_ns),
            seconds_to_timeout: pred.map(|p| signed_secs(p.death_ns, now_ns)),
            no_prediction_reason: if pred.is_none() {
                if class == StallClass::Keepalive {
                    f.keepalive.and_then(|k| k.no_prediction)
                } else {
                    f.anchor
                        .and_then(|a| self.rule_at(f, &a).err().flatten())
                        .or_else(|| {
                            (class == StallClass::ZeroWindow && f.user_timeout_ms == 0)
                                .then_some(horizon::NoPrediction::ZeroWindowWithoutUserTimeout)
                        })
                }
            } else {
                None
            },
            horizon_fraction: pred.filter(|p| p.boundary_ms > 0).map(|p| {
                secs(now_ns.saturating_sub(p.start_ns)) / (p.boundary_ms as f64 / 1_000.0)
            }),
            near_horizon: pred.is_some_and(|p| self.near(&p, now_ns)),
            zero_window_probes: zw.map(|p| p.probes),
            zero_window_unanswered: zw.map(|p| p.probes_out),
            zero_window_s: zw.map(|p| secs(now_ns.saturating_sub(p.since_ns))),
            close_wait_age_s: f
                .close_wait_since_ns
                .map(|s| secs(now_ns.saturating_sub(s))),
            orphan: f.orphan,
            user_timeout_ms: (f.user_timeout_ms != 0).then_some(f.user_timeout_ms),
            last_event_age_s: secs(now_ns.saturating_sub(f.last_event_ns)),
            retransmits_by_cause: f.retransmits_by_cause,
            cause,
            cause_evidence,
            history: FlowHistory {
                streaks: f.history.streaks,
                recovered: f.history.recovered,
                timed_out: f.history.timed_out,
                closed: f.history.closed,
                zero_window_episodes: f.history.zero_window_episodes,
            },
        }
    }

    /// Why `f` stalls in `class`, with the evidence.
    pub(super) fn cause_of(
        &self,
        f: &Flow,
        class: StallClass,
    ) -> (why::StallCause, why::CauseEvidence) {
        why::decide(&why::Facts {
            evidence: f.evidence,
            unsent: f.streak.is_none() && f.persist.is_some_and(|p| p.window_open),
            zero_window: class == StallClass::ZeroWindow,
            close_wait: class == StallClass::CloseWait,
            fin_wait2: class == StallClass::FinWait2,
            rto_stall: class == StallClass::Retransmit && f.streak.is_some_and(|st| st.rtos > 0),
            drops_visible: self.cfg.drops_visible,
            reason_names: &self.cfg.drop_reason_names,
        })
    }

    /// Every stalled flow, most urgent first: smallest seconds-to-timeout
    /// first (flows without a prediction after), then longest stalled.
    pub fn stalls(&self, now_ns: u64) -> Vec<StallView> {
        let mut v: Vec<StallView> = self
            .flows
            .active()
            .filter_map(|f| self.classify(f, now_ns).map(|c| self.view(f, c, now_ns)))
            .collect();
        v.sort_by(|a, b| {
            let ta = a.seconds_to_timeout.unwrap_or(f64::INFINITY);
            let tb = b.seconds_to_timeout.unwrap_or(f64::INFINITY);
            ta.total_cmp(&tb)
                .then(a.since_ns.cmp(&b.since_ns))
                .then(a.cookie.cmp(&b.cookie))
        });
        v
    }

    /// Stalled flows per class, near-timeout count and table size, in one pass.
    pub fn gauges(&self, now_ns: u64) -> Gauges {
        let mut g = Gauges {
            flows_tracked: self.flows.len(),
            ..Default::default()
        };
        for f in self.flows.active() {
            if let Some(c) = self.classify(f, now_ns) {
                g.stalled.add(c);
                if Self::horizon_of(f, c).is_some_and(|p| self.near(&p, now_ns)) {
                    g.near_timeout += 1;
                }
            }
        }
        g
    }

    pub fn stalled_counts(&self, now_ns: u64) -> StalledCounts {
        self.gauges(now_ns).stalled
    }

    /// Stalled flows predicted to time out soon (near horizon).
    pub fn near_timeout_count(&self, now_ns: u64) -> usize {
        self.gauges(now_ns).near_timeout
    }

    /// Per-remote aggregation: top K by stalled flows, then retransmits.
    pub fn remotes(&self, now_ns: u64) -> RemotesView {
        let mut live: HashMap<SocketAddr, RemoteLive> = HashMap::new();
        for f in self.flows.active() {
            if let Some(c) = self.classify(f, now_ns) {
                let l = live.entry(f.remote).or_default();
                l.stalled_flows += 1;
                l.stalled.add(c);
                if Self::horizon_of(f, c).is_some_and(|p| self.near(&p, now_ns)) {
                    l.near_timeout += 1;
                }
            }
        }
        remote::build(&self.sink.remotes, &live, self.cfg.top_remotes)
    }
}
