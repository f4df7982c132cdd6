//! The stall engine: pure, I/O-free state machine over decoded kernel events.
//!
//! Time only comes in through event timestamps and explicit `now_ns`
//! arguments (CLOCK_MONOTONIC ns, the clock of [`SockEvent::ts_ns`]).
//!
//! - [`Engine::ingest`] folds one event into the flow table (allocation-light:
//!   no string formatting, 4-tuples as `SocketAddr`).
//! - [`Engine::tick`] ends streaks and zero-window episodes whose next
//!   expected timer expiry passed without an event (the kernel re-arms its
//!   timer quietly once ACKs flow), settles closed flows and announces
//!   time-based stalls.
//! - [`Engine::stalls`], [`Engine::remotes`], [`Engine::gauges`] compute views
//!   on demand; [`Engine::drain_observations`] hands out counter/histogram
//!   facts.
//!
//! How it decides:
//! - a **streak** starts at the first retransmission of an episode (fast
//!   retransmit, loss probe or RTO) and ends on ACK progress (`snd_una`
//!   moved, `icsk_retransmits` went down, `retrans_stamp` cleared or
//!   replaced), on death, on close, or when the next RTO expiry is overdue by
//!   `stale_grace + stale_grace_factor * interval`;
//! - `retransmit` class: `icsk_retransmits + 1 >= min_rto_streak` at an RTO
//!   expiry (consecutive RTOs without ACK progress);
//! - the death prediction walks RTO expiries from the last one seen
//!   ([`horizon`]); it is not made for SYN states, zero-window
//!   retransmissions (`tcp_rtx_probe0_timed_out` applies) or without the
//!   netns sysctls (unless a user timeout is set);
//! - `zero_window`: persist-timer expiries (`icsk_pending == 3`) with
//!   `snd_wnd == 0` for longer than `zero_window_after`; no prediction
//!   unless a user timeout is set;
//! - `close_wait`: a `State` event into CLOSE_WAIT longer than
//!   `close_wait_after` ago.

mod flow;
pub mod horizon;
pub mod hz;
mod output;
mod remote;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use tcpstall_common::pending;

use crate::event::{ETIMEDOUT, EventKind, Mechanism, NetnsSysctls, SockEvent, TcpState};

use flow::{Anchor, Episode, Flow, FlowKey, FlowTable, Persist, Prediction, Streak, Verdict};
use horizon::{BoundaryRule, NSEC_PER_MSEC, NSEC_PER_SEC, RtoWalk, TCP_RTO_MIN_MS};
use remote::RemoteTable;

pub use horizon::BoundarySource;
pub use hz::HzSource;
pub use output::{
    EngineStats, FlowHistory, Observation, OtherRemotes, RemoteCounters, RemoteLive, RemoteView,
    RemotesView, StallClass, StallView, StalledCounts, StreakOutcome, TimeoutEvidence,
};

/// Engine settings. `Default` gives the documented defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// The kernel's HZ; None = calibrate from event (ts, jiffies) pairs.
    pub hz: Option<u32>,
    /// Flow table bound (LRU eviction beyond, counted). Default 65,536.
    pub max_flows: usize,
    /// Consecutive RTOs without ACK progress for the `retransmit` class. Default 2.
    pub min_rto_streak: u32,
    /// Persist timer running this long -> `zero_window`. Default 5 s.
    pub zero_window_after: Duration,
    /// In CLOSE_WAIT this long -> `close_wait`. Default 60 s.
    pub close_wait_after: Duration,
    /// Near horizon when the predicted death is this close. Default 60 s.
    pub near_horizon_secs: f64,
    /// ... or this share of the boundary is consumed, in (0, 1]. Default 0.5.
    pub near_horizon_fraction: f64,
    /// Remotes listed by [`Engine::remotes`]; the rest is summed. Default 100.
    pub top_remotes: usize,
    /// Remotes with their own cumulative counters. Default 16,384.
    pub max_remotes: usize,
    /// Fixed part of the grace after an expected expiry. Default 1 s.
    pub stale_grace: Duration,
    /// Proportional part (of the expected interval). Default 0.5.
    pub stale_grace_factor: f64,
    /// How long a closed flow waits for its error report before its streak
    /// is settled. Default 2 s.
    pub close_settle: Duration,
    /// Closed flows remembered to match a late error report. Default 4,096.
    pub recently_closed: usize,
    /// Observations kept until drained (oldest dropped, counted). Default 100,000.
    pub max_observations: usize,
    /// Model the kernel timer wheel's rounding of future expiries. Default true.
    pub timer_wheel: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            hz: None,
            max_flows: 65_536,
            min_rto_streak: 2,
            zero_window_after: Duration::from_secs(5),
            close_wait_after: Duration::from_secs(60),
            near_horizon_secs: 60.0,
            near_horizon_fraction: 0.5,
            top_remotes: 100,
            max_remotes: 16_384,
            stale_grace: Duration::from_secs(1),
            stale_grace_factor: 0.5,
            close_settle: Duration::from_secs(2),
            recently_closed: 4_096,
            max_observations: 100_000,
            timer_wheel: true,
        }
    }
}

/// A nonsensical [`EngineConfig`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("max_flows must be at least 1")]
    MaxFlows,
    #[error("hz must be between 1 and 100000, got {0}")]
    Hz(u32),
    #[error("min_rto_streak must be at least 1")]
    MinRtoStreak,
    #[error("near_horizon_fraction must be in (0, 1], got {0}")]
    NearHorizonFraction(f64),
    #[error("near_horizon_secs must be finite and >= 0, got {0}")]
    NearHorizonSecs(f64),
    #[error("top_remotes must be at least 1")]
    TopRemotes,
    #[error("max_remotes ({max_remotes}) must be at least top_remotes ({top_remotes})")]
    MaxRemotes {
        max_remotes: usize,
        top_remotes: usize,
    },
    #[error("stale_grace_factor must be finite and >= 0, got {0}")]
    StaleGraceFactor(f64),
    #[error("recently_closed must be at least 1")]
    RecentlyClosed,
    #[error("max_observations must be at least 1")]
    MaxObservations,
}

impl EngineConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_flows == 0 {
            return Err(ConfigError::MaxFlows);
        }
        if let Some(hz) = self.hz
            && !(1..=100_000).contains(&hz)
        {
            return Err(ConfigError::Hz(hz));
        }
        if self.min_rto_streak == 0 {
            return Err(ConfigError::MinRtoStreak);
        }
        let f = self.near_horizon_fraction;
        if !(f > 0.0 && f <= 1.0) {
            return Err(ConfigError::NearHorizonFraction(f));
        }
        if !(self.near_horizon_secs.is_finite() && self.near_horizon_secs >= 0.0) {
            return Err(ConfigError::NearHorizonSecs(self.near_horizon_secs));
        }
        if self.top_remotes == 0 {
            return Err(ConfigError::TopRemotes);
        }
        if self.max_remotes < self.top_remotes {
            return Err(ConfigError::MaxRemotes {
                max_remotes: self.max_remotes,
                top_remotes: self.top_remotes,
            });
        }
        if !(self.stale_grace_factor.is_finite() && self.stale_grace_factor >= 0.0) {
            return Err(ConfigError::StaleGraceFactor(self.stale_grace_factor));
        }
        if self.recently_closed == 0 {
            return Err(ConfigError::RecentlyClosed);
        }
        if self.max_observations == 0 {
            return Err(ConfigError::MaxObservations);
        }
        Ok(())
    }
}

/// Gauges computed in one pass ([`Engine::gauges`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Gauges {
    pub stalled: StalledCounts,
    pub near_timeout: usize,
    pub flows_tracked: usize,
}

/// A closed flow remembered for a late error report / settling its streak.
#[derive(Clone, Debug)]
struct Closed {
    cookie: u64,
    skaddr: u64,
    remote: SocketAddr,
    closed_at_ns: u64,
    prediction: Option<Prediction>,
    verdict: Option<Verdict>,
    /// The timeout was already recorded.
    timed_out: bool,
    /// A streak that was active at close, waiting for its outcome.
    pending: Option<Streak>,
}

/// Where handlers put their results (split from the flow table for borrowing).
#[derive(Debug)]
struct Sink {
    outbox: VecDeque<Observation>,
    max_observations: usize,
    remotes: RemoteTable,
    stats: EngineStats,
    abs_error_sum: f64,
}

impl Sink {
    fn emit(&mut self, o: Observation) {
        if self.outbox.len() >= self.max_observations {
            self.outbox.pop_front();
            self.stats.observations_dropped += 1;
        }
        self.outbox.push_back(o);
    }

    fn streak_ended(
        &mut self,
        remote: SocketAddr,
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
        });
    }

    fn persist_ended(&mut self, remote: SocketAddr, p: &Persist, end_ns: u64) {
        self.emit(Observation::ZeroWindowEnded {
            remote,
            duration_s: secs(end_ns.saturating_sub(p.since_ns)),
            probes: p.probes,
        });
    }

    fn stall_started(&mut self, class: StallClass, cookie: u64, remote: SocketAddr, now_ns: u64) {
        self.stats.stalls_started += 1;
        self.remotes.counters(remote, now_ns).stalls += 1;
        self.emit(Observation::StallStarted {
            class,
            cookie,
            remote,
        });
    }

    fn timeout(&mut self, t: TimeoutFacts) {
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
struct TimeoutFacts {
    cookie: u64,
    remote: SocketAddr,
    evidence: TimeoutEvidence,
    actual_ns: u64,
    /// The last prediction made before the fatal expiry.
    last: Option<Prediction>,
    /// The first prediction of the streak.
    first: Option<Prediction>,
}

fn secs(ns: u64) -> f64 {
    ns as f64 / NSEC_PER_SEC as f64
}

/// `a - b` in seconds, signed.
fn signed_secs(a: u64, b: u64) -> f64 {
    if a >= b { secs(a - b) } else { -secs(b - a) }
}

fn dur_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// TCP sequence comparison: `a` after `b`.
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

fn is_syn_state(s: TcpState) -> bool {
    matches!(
        s,
        TcpState::SynSent | TcpState::SynRecv | TcpState::NewSynRecv
    )
}

/// Two endpoints are compatible unless both are known and differ.
fn same_remote(a: SocketAddr, b: SocketAddr) -> bool {
    a.ip().is_unspecified() || b.ip().is_unspecified() || a == b
}

/// The last-known address, keeping a known port when the event reads 0
/// (`skc_num` reads 0 at ESTABLISHED -> CLOSE).
fn merge_addr(old: SocketAddr, new: SocketAddr) -> SocketAddr {
    if new.ip().is_unspecified() {
        return old;
    }
    if new.port() == 0 && new.ip() == old.ip() {
        return old;
    }
    new
}

/// The stall engine. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    flows: FlowTable,
    skaddr_map: HashMap<u64, u64>,
    netns: HashMap<u32, NetnsSysctls>,
    closed: VecDeque<Closed>,
    hz: hz::HzCalibrator,
    sink: Sink,
    scratch: Vec<u32>,
    /// Whether this kernel increments `icsk_retransmits` before an RTO's
    /// retransmission (6.7+) — learned from events, None until seen.
    rto_retx_incremented: Option<bool>,
}

/// Bound on remembered network namespaces (sysctl cache).
const MAX_NETNS: usize = 16_384;
/// Two reports of the same RTO expiry (two mechanisms) within this window.
const DUPLICATE_WINDOW_NS: u64 = 100 * NSEC_PER_MSEC;
/// A pre-stamp episode (first RTO, `retrans_stamp` still 0) and the stamp
/// seen later are the same episode when this close.
const EPISODE_MATCH_NS: u64 = NSEC_PER_SEC;

impl Engine {
    pub fn new(cfg: EngineConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Self {
            flows: FlowTable::new(cfg.max_flows),
            skaddr_map: HashMap::new(),
            netns: HashMap::new(),
            closed: VecDeque::with_capacity(cfg.recently_closed.min(4_096)),
            hz: hz::HzCalibrator::new(cfg.hz),
            sink: Sink {
                outbox: VecDeque::new(),
                max_observations: cfg.max_observations,
                remotes: RemoteTable::new(cfg.max_remotes),
                stats: EngineStats::default(),
                abs_error_sum: 0.0,
            },
            scratch: Vec::new(),
            rto_retx_incremented: None,
            cfg,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The HZ in use and where it comes from.
    pub fn hz(&self) -> (u32, HzSource) {
        (self.hz.hz(), self.hz.source())
    }

    pub fn flows_tracked(&self) -> usize {
        self.flows.len()
    }

    /// Folds one kernel event into the engine.
    pub fn ingest(&mut self, ev: &SockEvent) {
        let st = &mut self.sink.stats;
        st.events += 1;
        match ev.kind {
            EventKind::Retransmit => st.events_retransmit += 1,
            EventKind::WriteTimer => st.events_write_timer += 1,
            EventKind::State => st.events_state += 1,
            EventKind::ErrorReport => st.events_error_report += 1,
            EventKind::Ack => st.events_ack += 1,
        }
        if self.hz.observe(ev.ts_ns, ev.jiffies) {
            self.refresh_predictions();
        }
        if let Some(s) = ev.netns_sysctls
            && ev.netns != 0
            && (self.netns.len() < MAX_NETNS || self.netns.contains_key(&ev.netns))
        {
            self.netns.insert(ev.netns, s);
        }
        match ev.kind {
            EventKind::Retransmit => self.on_retransmit(ev),
            EventKind::WriteTimer => {
                let pend = match ev.sock {
                    Some(s) => s.pending,
                    // sock_ops RTO_CB (and any timer event without the
                    // socket fields) is an RTO expiry.
                    None => pending::RETRANS,
                };
                match pend {
                    pending::RETRANS => self.on_rto(ev),
                    pending::PROBE0 => self.on_probe(ev),
                    _ => self.sink.stats.timer_events_ignored += 1,
                }
            }
            EventKind::State => self.on_state(ev),
            EventKind::ErrorReport => self.on_error_report(ev),
            EventKind::Ack => self.on_ack(ev),
        }
    }

    // ----- identity -------------------------------------------------------

    /// Finds (or, with `create`, makes) the flow of an event.
    fn resolve(&mut self, ev: &SockEvent, create: bool) -> Option<u32> {
        if ev.cookie != 0 && ev.skaddr != 0 {
            if let Some(&c) = self.skaddr_map.get(&ev.skaddr)
                && c != ev.cookie
            {
                // The kernel reused the address: that socket is gone.
                self.skaddr_map.remove(&ev.skaddr);
                self.sink.stats.skaddr_reuses += 1;
                if let Some(s) = self.flows.slot_of(&FlowKey::Cookie(c))
                    && self.flows.flow(s).skaddr == ev.skaddr
                {
                    self.close_slot(s, ev.ts_ns, true);
                }
            }
            if let Some(ps) = self.flows.slot_of(&FlowKey::Skaddr(ev.skaddr)) {
                self.merge_provisional(ps, ev);
            }
        }
        let key = if ev.cookie != 0 {
            FlowKey::Cookie(ev.cookie)
        } else if ev.skaddr != 0 {
            match self.skaddr_map.get(&ev.skaddr).copied() {
                Some(c) => match self.flows.slot_of(&FlowKey::Cookie(c)) {
                    Some(s) if same_remote(self.flows.flow(s).remote, ev.remote) => {
                        FlowKey::Cookie(c)
                    }
                    Some(s) => {
                        // Stale mapping: the address now holds another socket.
                        self.sink.stats.skaddr_reuses += 1;
                        self.close_slot(s, ev.ts_ns, true);
                        FlowKey::Skaddr(ev.skaddr)
                    }
                    None => {
                        self.skaddr_map.remove(&ev.skaddr);
                        FlowKey::Skaddr(ev.skaddr)
                    }
                },
                None => FlowKey::Skaddr(ev.skaddr),
            }
        } else {
            self.sink.stats.events_unattributed += 1;
            return None;
        };
        if let Some(s) = self.flows.slot_of(&key) {
            if let FlowKey::Skaddr(_) = key
                && !same_remote(self.flows.flow(s).remote, ev.remote)
            {
                // A provisional flow whose address was reused.
                self.close_slot(s, ev.ts_ns, true);
            } else {
                self.learn_skaddr(s, ev);
                return Some(s);
            }
        }
        if !create {
            return None;
        }
        let flow = Flow::new(ev.cookie, ev.skaddr, ev.local, ev.remote, ev.ts_ns);
        let (slot, evicted) = self.flows.insert(key, flow);
        self.sink.stats.flows_created += 1;
        if let Some((_, f)) = evicted {
            self.on_evicted(f);
        }
        self.learn_skaddr(slot, ev);
        Some(slot)
    }

    fn learn_skaddr(&mut self, slot: u32, ev: &SockEvent) {
        if ev.cookie == 0 || ev.skaddr == 0 {
            return;
        }
        let f = self.flows.flow_mut(slot);
        if f.skaddr != ev.skaddr || !self.skaddr_map.contains_key(&ev.skaddr) {
            if f.skaddr != 0
                && f.skaddr != ev.skaddr
                && self.skaddr_map.get(&f.skaddr) == Some(&f.cookie)
            {
                self.skaddr_map.remove(&f.skaddr);
            }
            f.skaddr = ev.skaddr;
            self.skaddr_map.insert(ev.skaddr, ev.cookie);
        }
    }

    /// A provisional (cookie-less) flow meets an event with its cookie.
    fn merge_provisional(&mut self, ps: u32, ev: &SockEvent) {
        let pkey = FlowKey::Skaddr(ev.skaddr);
        if !same_remote(self.flows.flow(ps).remote, ev.remote) {
            self.close_slot(ps, ev.ts_ns, true);
            return;
        }
        let ckey = FlowKey::Cookie(ev.cookie);
        self.sink.stats.provisional_merges += 1;
        if self.flows.rekey(&pkey, ckey) {
            let f = self.flows.flow_mut(ps);
            f.cookie = ev.cookie;
            return;
        }
        // Both exist: fold the provisional one into the cookie flow.
        let Some(p) = self.flows.remove(&pkey) else {
            return;
        };
        let Some(cs) = self.flows.slot_of(&ckey) else {
            return;
        };
        let c = self.flows.flow_mut(cs);
        if c.streak.is_none() && p.streak.is_some() {
            c.streak = p.streak;
            c.anchor = p.anchor;
            c.prediction = p.prediction;
            c.verdict = p.verdict;
        }
        if c.episode.is_none() {
            c.episode = p.episode;
        }
        if c.persist.is_none() {
            c.persist = p.persist;
        }
        if c.close_wait_since_ns.is_none() {
            c.close_wait_since_ns = p.close_wait_since_ns;
        }
        c.announced |= p.announced;
        c.history.streaks += p.history.streaks;
        c.history.recovered += p.history.recovered;
        c.history.timed_out += p.history.timed_out;
        c.history.closed += p.history.closed;
        c.history.zero_window_episodes += p.history.zero_window_episodes;
        c.first_seen_ns = c.first_seen_ns.min(p.first_seen_ns);
        self.flows.touch(cs);
    }

    fn on_evicted(&mut self, f: Flow) {
        let s = &mut self.sink.stats;
        s.flows_evicted += 1;
        if f.streak.is_some() {
            s.streaks_evicted += 1;
        }
        if f.skaddr != 0 && self.skaddr_map.get(&f.skaddr) == Some(&f.cookie) {
            self.skaddr_map.remove(&f.skaddr);
        }
        let active = f.is_active();
        self.sink.emit(Observation::FlowEvicted {
            remote: f.remote,
            active,
        });
    }

    // ----- helpers over a flow ---------------------------------------------

    fn grace_ns(&self, interval_ns: u64) -> u64 {
        dur_ns(self.cfg.stale_grace)
            .saturating_add((interval_ns as f64 * self.cfg.stale_grace_factor) as u64)
    }

    fn sysctls_of(&self, f: &Flow) -> Option<NetnsSysctls> {
        f.sysctls.or_else(|| self.netns.get(&f.netns).copied())
    }

    fn rule_of(&self, f: &Flow) -> Option<BoundaryRule> {
        BoundaryRule::select(f.user_timeout_ms, f.orphan, self.sysctls_of(f))
    }

    fn rto_max_j(&self, f: &Flow) -> u64 {
        horizon::rto_max_jiffies(
            f.rto_max_jiffies,
            self.sysctls_of(f).and_then(|s| s.tcp_rto_max_ms),
            self.hz.hz(),
        )
    }

    fn j_to_ns(&self, j: u64) -> u64 {
        horizon::jiffies_to_ns(j, self.hz.hz())
    }

    /// Death prediction from the flow's last RTO expiry.
    fn predict(&self, f: &Flow) -> Option<Prediction> {
        let a = f.anchor?;
        let ep = f.episode?;
        if a.window_shrunk || is_syn_state(f.state) {
            return None;
        }
        let rule = self.rule_of(f)?;
        let walk = RtoWalk {
            start_ns: ep.start_ns,
            at_ns: a.at_ns,
            at_jiffies: a.jiffies,
            retransmits: a.retransmits,
            rto_jiffies: a.rto_jiffies,
            rto_max_jiffies: self.rto_max_j(f),
            hz: self.hz.hz(),
            rule,
            base_ms: TCP_RTO_MIN_MS,
            timer_wheel: self.cfg.timer_wheel,
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
    fn rto_verdict(&self, f: &Flow, ev: &SockEvent) -> Option<bool> {
        if ev.mechanism == Mechanism::SockOps {
            return Some(ev.rto_expired_verdict);
        }
        if ev.retransmits == 0 {
            return Some(false);
        }
        let a = f.anchor?;
        if a.window_shrunk || is_syn_state(f.state) {
            return None;
        }
        let ep = f.episode?;
        let rule = self.rule_of(f)?;
        let hz = self.hz.hz();
        let max_ms = horizon::jiffies_to_msecs(self.rto_max_j(f), hz);
        let b = rule.at(
            horizon::jiffies_to_msecs(u64::from(ev.rto_jiffies), hz),
            max_ms,
            TCP_RTO_MIN_MS,
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
                // Still 0: only the retransmission of the RTO that was seen
                // before the stamp got set continues the episode.
                if ep.stamp == 0 && same_rto_as_anchor {
                    false
                } else {
                    f.episode = Some(Episode {
                        stamp: 0,
                        start_ns: ev.ts_ns,
                    });
                    true
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
    fn absorb(f: &mut Flow, ev: &SockEvent) {
        f.last_event_ns = f.last_event_ns.max(ev.ts_ns);
        if ev.cookie != 0 {
            f.cookie = ev.cookie;
        }
        if ev.netns != 0 {
            f.netns = ev.netns;
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
        if matches!(ev.kind, EventKind::Retransmit | EventKind::WriteTimer) {
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
                f.backoff = s.backoff;
                f.user_timeout_ms = s.user_timeout_ms;
                f.rto_max_jiffies = s.rto_max_jiffies;
                f.usec_ts = s.usec_ts;
                f.snd_wnd = Some(s.snd_wnd);
            }
        }
    }

    /// The socket as the kernel leaves it after handling RTO number `idx`
    /// (what `ss` shows): retransmits and backoff incremented, RTO doubled.
    fn after_rto(f: &mut Flow, idx: u32, rto_jiffies: u32, max_j: u64) {
        f.retransmits = idx;
        f.backoff = f.backoff.max(idx.saturating_sub(1)).saturating_add(1);
        if rto_jiffies != 0 {
            f.rto_jiffies = (u64::from(rto_jiffies) * 2).min(max_j.max(1)) as u32;
        }
    }

    /// Ends the flow's streak with `outcome` (and forgets its anchor and
    /// prediction unless it died).
    fn end_streak(f: &mut Flow, sink: &mut Sink, outcome: StreakOutcome, end_ns: u64) {
        let Some(st) = f.streak.take() else {
            return;
        };
        match outcome {
            StreakOutcome::Recovered => f.history.recovered += 1,
            StreakOutcome::TimedOut => f.history.timed_out += 1,
            StreakOutcome::Closed => f.history.closed += 1,
        }
        sink.streak_ended(f.remote, &st, outcome, end_ns);
        f.announced &= !StallClass::Retransmit.bit();
        if outcome == StreakOutcome::Recovered {
            f.anchor = None;
            f.prediction = None;
            f.verdict = None;
        }
    }

    fn end_persist(f: &mut Flow, sink: &mut Sink, end_ns: u64) {
        if let Some(p) = f.persist.take() {
            sink.persist_ended(f.remote, &p, end_ns);
            f.announced &= !StallClass::ZeroWindow.bit();
            if f.streak.is_none() {
                f.prediction = None;
            }
        }
    }

    /// Progress since the streak's last event: `snd_una` moved or
    /// `icsk_retransmits` went down. A zero `snd_una` is a failed read, and
    /// a sock_ops retransmission callback has no `icsk_retransmits`.
    fn acked(st: &Streak, ev: &SockEvent) -> bool {
        let una = ev.snd_una != 0 && st.snd_una_last != 0 && seq_after(ev.snd_una, st.snd_una_last);
        una || (Self::knows_retransmits(ev) && ev.retransmits < st.last_retransmits)
    }

    fn knows_retransmits(ev: &SockEvent) -> bool {
        !(ev.mechanism == Mechanism::SockOps && ev.kind == EventKind::Retransmit)
    }

    /// Starts a streak if none is running; returns it.
    /// Close the current streak as recovered when `recovered` (ACK progress),
    /// and again when `ev` starts a new loss episode; then return the streak
    /// `ev` belongs to (created if needed).
    fn roll_streak<'a>(
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

    fn check_retransmit_stall(&mut self, slot: u32, now_ns: u64) {
        let min = self.cfg.min_rto_streak;
        let f = self.flows.flow_mut(slot);
        if let Some(st) = f.streak.as_mut()
            && !st.stalled
            && st.rtos >= min
        {
            st.stalled = true;
            if f.announced & StallClass::Retransmit.bit() == 0 {
                f.announced |= StallClass::Retransmit.bit();
                let (cookie, remote) = (f.cookie, f.remote);
                self.sink
                    .stall_started(StallClass::Retransmit, cookie, remote, now_ns);
            }
        }
    }

    // ----- event handlers --------------------------------------------------

    /// Window within which two reports belong to the same RTO expiry (the
    /// retransmission follows its expiry in the same handler, or when the
    /// owner releases the socket): 100 ms, at most half the RTO.
    fn same_expiry_window(&self, rto_jiffies: u32) -> u64 {
        DUPLICATE_WINDOW_NS.min(self.j_to_ns(u64::from(rto_jiffies.max(1))) / 2)
    }

    fn on_retransmit(&mut self, ev: &SockEvent) {
        let Some(slot) = self.resolve(ev, true) else {
            return;
        };
        // Sent by an RTO expiry: the write timer handler clears
        // icsk_pending before tcp_retransmit_timer(). Loss probes run with
        // pending 5, fast retransmits with the RTO timer pending (1).
        let rto_ctx = ev.sock.is_some_and(|s| s.pending == 0);
        let remote = {
            let f = self.flows.flow_mut(slot);
            Self::absorb(f, ev);
            f.remote
        };
        self.sink.stats_retransmit(remote, rto_ctx, ev.ts_ns);

        // Which RTO this retransmission belongs to. Kernels before 6.7
        // increment icsk_retransmits after the retransmission, 6.7+
        // (tcp_update_rto_stats) before it: the value is r or r + 1 for the
        // expiry that saw r. Matched against the expiry just reported when
        // there is one (which also tells the kernel's order), else derived
        // with the learned order (unknown: assume "after", which can only
        // make a stall show one RTO late, never early).
        let v = ev.retransmits;
        let mut same_rto = false;
        let mut idx = 0;
        if rto_ctx {
            let f = self.flows.flow(slot);
            if let Some(a) = f.anchor
                && ev.ts_ns.saturating_sub(a.at_ns) <= self.same_expiry_window(a.rto_jiffies)
                && (v == a.retransmits || v == a.retransmits.saturating_add(1))
            {
                same_rto = true;
                idx = a.index;
                if a.from_timer {
                    self.rto_retx_incremented = Some(v == a.retransmits.saturating_add(1));
                }
            } else if v == 0 {
                self.rto_retx_incremented = Some(false);
                idx = 1;
            } else if self.rto_retx_incremented == Some(false) {
                idx = v.saturating_add(1);
            } else {
                idx = v;
            }
        }

        let hz = self.hz.hz();
        let max_j = self.rto_max_j(self.flows.flow(slot));
        let f = self.flows.flow_mut(slot);
        Self::end_persist(f, &mut self.sink, ev.ts_ns);
        let recovered = f.streak.is_some_and(|st| Self::acked(&st, ev)) && !same_rto;
        let st = Self::roll_streak(f, &mut self.sink, ev, recovered, same_rto);
        st.retransmissions = st.retransmissions.saturating_add(1);
        if ev.snd_una != 0 {
            st.snd_una_last = ev.snd_una;
        }
        st.last_event_ns = ev.ts_ns;
        if let Some(s) = ev.sock {
            st.backoff = s.backoff;
        }
        if ev.rto_jiffies != 0 {
            st.rto_jiffies = ev.rto_jiffies;
        }
        if rto_ctx {
            // Keep the expiry's own count (r): the increment may or may not
            // have happened yet.
            st.last_retransmits = idx.saturating_sub(1);
            st.rtos = st.rtos.max(idx);
        } else if Self::knows_retransmits(ev) {
            st.last_retransmits = v;
            st.rtos = st.rtos.max(v);
        }
        let rto = u64::from(st.rto_jiffies.max(1));
        let interval_j = if rto_ctx { (rto * 2).min(max_j) } else { rto };
        let interval = horizon::jiffies_to_ns(interval_j, hz);
        if !same_rto {
            st.next_due_ns = ev.ts_ns.saturating_add(interval);
            st.next_interval_ns = interval;
        }
        let st_rto = st.rto_jiffies;
        if rto_ctx {
            Self::after_rto(f, idx, st_rto, max_j);
        }
        // An RTO expiry no timer event reported: anchor the walk here.
        if rto_ctx && !same_rto {
            f.anchor = Some(Anchor {
                at_ns: ev.ts_ns,
                jiffies: ev.jiffies,
                timer_expires: 0,
                retransmits: idx.saturating_sub(1),
                rto_jiffies: ev.rto_jiffies,
                index: idx,
                from_timer: false,
                window_shrunk: f.snd_wnd == Some(0) && ev.packets_out > 0,
            });
            // It retransmitted, so it was not fatal.
            f.verdict = Some(Verdict {
                at_ns: ev.ts_ns,
                dead: false,
            });
            let remote = f.remote;
            self.sink.rto_expiry(remote, idx, ev.ts_ns);
            self.update_prediction(slot);
        }
        self.check_retransmit_stall(slot, ev.ts_ns);
        self.flows.touch(slot);
    }

    fn update_prediction(&mut self, slot: u32) {
        let p = self.predict(self.flows.flow(slot));
        let f = self.flows.flow_mut(slot);
        f.prediction = p;
        if let Some(st) = f.streak.as_mut()
            && st.first_prediction.is_none()
        {
            st.first_prediction = p;
        }
    }

    fn on_rto(&mut self, ev: &SockEvent) {
        let Some(slot) = self.resolve(ev, true) else {
            return;
        };
        let idx = ev.retransmits.saturating_add(1);
        let expires = ev.sock.map_or(0, |s| s.timer_expires);
        // The same expiry reported twice (two mechanisms): keep the kernel's
        // own verdict if this one carries it, count nothing.
        let dup = {
            let f = self.flows.flow(slot);
            f.streak.is_some()
                && f.anchor.is_some_and(|a| {
                    a.index == idx
                        && ((expires != 0 && a.timer_expires == expires)
                            || ev.ts_ns.abs_diff(a.at_ns) <= self.same_expiry_window(a.rto_jiffies))
                })
        };
        if dup {
            let f = self.flows.flow_mut(slot);
            // Its socket fields may be richer (sock_ops reported first).
            Self::absorb(f, ev);
            if let Some(a) = f.anchor.as_mut() {
                if ev.mechanism == Mechanism::SockOps {
                    f.verdict = Some(Verdict {
                        at_ns: a.at_ns,
                        dead: ev.rto_expired_verdict,
                    });
                }
                if a.timer_expires == 0 {
                    a.timer_expires = expires;
                }
            }
            self.sink.stats.timer_events_duplicate += 1;
            return;
        }
        let remote = {
            let f = self.flows.flow_mut(slot);
            Self::absorb(f, ev);
            f.remote
        };
        self.sink.rto_expiry(remote, idx, ev.ts_ns);
        let hz = self.hz.hz();
        let max_j = self.rto_max_j(self.flows.flow(slot));
        let f = self.flows.flow_mut(slot);
        Self::end_persist(f, &mut self.sink, ev.ts_ns);
        let recovered = f
            .streak
            .is_some_and(|st| Self::acked(&st, ev) || idx <= st.rtos);
        let st = Self::roll_streak(f, &mut self.sink, ev, recovered, false);
        st.rtos = idx;
        st.last_retransmits = ev.retransmits;
        if ev.snd_una != 0 {
            st.snd_una_last = ev.snd_una;
        }
        st.last_event_ns = ev.ts_ns;
        if let Some(s) = ev.sock {
            st.backoff = s.backoff;
        }
        if ev.rto_jiffies != 0 {
            st.rto_jiffies = ev.rto_jiffies;
        }
        let rto = u64::from(st.rto_jiffies.max(1));
        let interval = horizon::jiffies_to_ns((rto * 2).min(max_j), hz);
        st.next_due_ns = ev.ts_ns.saturating_add(interval);
        st.next_interval_ns = interval;
        f.anchor = Some(Anchor {
            at_ns: ev.ts_ns,
            jiffies: ev.jiffies,
            timer_expires: expires,
            retransmits: ev.retransmits,
            rto_jiffies: st.rto_jiffies,
            index: idx,
            from_timer: true,
            window_shrunk: f.snd_wnd == Some(0) && ev.packets_out > 0,
        });
        let verdict = self.rto_verdict(self.flows.flow(slot), ev);
        let settle = dur_ns(self.cfg.close_settle);
        let f = self.flows.flow_mut(slot);
        if verdict != Some(true) {
            // (A fatal expiry neither retransmits nor backs off.)
            Self::after_rto(f, idx, ev.rto_jiffies, max_j);
        }
        f.verdict = verdict.map(|dead| Verdict {
            at_ns: ev.ts_ns,
            dead,
        });
        if verdict == Some(true) {
            // The socket dies at this expiry: keep the prediction made
            // before it (the accuracy figure); expect the error report /
            // close within the settle time.
            if let Some(st) = f.streak.as_mut() {
                st.next_due_ns = ev.ts_ns;
                st.next_interval_ns = settle;
            }
        } else {
            self.update_prediction(slot);
        }
        self.check_retransmit_stall(slot, ev.ts_ns);
        self.flows.touch(slot);
    }

    fn on_probe(&mut self, ev: &SockEvent) {
        let Some(sock) = ev.sock else {
            self.sink.stats.timer_events_ignored += 1;
            return;
        };
        let Some(slot) = self.resolve(ev, true) else {
            return;
        };
        let remote = {
            let f = self.flows.flow_mut(slot);
            Self::absorb(f, ev);
            f.remote
        };
        self.sink
            .remotes
            .counters(remote, ev.ts_ns)
            .zero_window_probes += 1;
        self.sink.emit(Observation::ZeroWindowProbe { remote });
        let hz = self.hz.hz();
        let max_ms = horizon::jiffies_to_msecs(self.rto_max_j(self.flows.flow(slot)), hz);
        let sys = self.sysctls_of(self.flows.flow(slot));
        let f = self.flows.flow_mut(slot);
        if ev.packets_out == 0
            && let Some(st) = f.streak
        {
            // Persist means nothing in flight: the retransmissions were acked.
            Self::end_streak(
                f,
                &mut self.sink,
                StreakOutcome::Recovered,
                st.last_event_ns,
            );
        }
        if f.persist.is_none() && sock.snd_wnd != 0 {
            // A probe for a window too small for the next segment, outside a
            // zero-window episode: not a zero-window stall.
            self.flows.touch(slot);
            return;
        }
        let p = f.persist.get_or_insert(Persist {
            since_ns: ev.ts_ns,
            first_probe_ns: ev.ts_ns,
            last_probe_ns: ev.ts_ns,
            probes: 0,
            probes_out: 0,
            backoff: 0,
            next_due_ns: ev.ts_ns,
            next_interval_ns: 0,
            stalled: false,
        });
        if p.probes == 0 {
            f.history.zero_window_episodes += 1;
        }
        p.probes = p.probes.saturating_add(1);
        p.last_probe_ns = ev.ts_ns;
        p.probes_out = sock.probes_out;
        p.backoff = sock.backoff;
        let rto_ms = horizon::jiffies_to_msecs(u64::from(ev.rto_jiffies), hz);
        let interval =
            horizon::persist_next_interval_ms(rto_ms, sock.backoff, max_ms) * NSEC_PER_MSEC;
        p.next_due_ns = ev.ts_ns.saturating_add(interval);
        p.next_interval_ns = interval;
        let (first, probes) = (p.first_probe_ns, p.probes);
        // tcp_probe_timer(): UTO since the first probe, or too many
        // unanswered probes (orphans: the orphan rule).
        let uto = f.user_timeout_ms;
        let uto_dead = uto != 0
            && probes > 1
            && ev.ts_ns.saturating_sub(first) >= u64::from(uto) * NSEC_PER_MSEC;
        let limit = sys.map(|s| {
            if f.orphan {
                horizon::effective_orphan_retries(s.tcp_orphan_retries, rto_ms < max_ms)
            } else {
                s.tcp_retries2
            }
        });
        let count_dead = limit.is_some_and(|l| sock.probes_out >= l);
        f.verdict = Some(Verdict {
            at_ns: ev.ts_ns,
            dead: uto_dead || count_dead,
        });
        if !(uto_dead || count_dead) {
            f.prediction =
                horizon::predict_persist_death(first, ev.ts_ns, uto).map(|death| Prediction {
                    death_ns: death,
                    made_at_ns: ev.ts_ns,
                    boundary_ms: u64::from(uto),
                    source: BoundarySource::UserTimeout,
                    start_ns: first,
                });
        }
        self.flows.touch(slot);
    }

    fn on_state(&mut self, ev: &SockEvent) {
        let create = ev.state == TcpState::CloseWait;
        let Some(slot) = self.resolve(ev, create) else {
            return;
        };
        let f = self.flows.flow_mut(slot);
        Self::absorb(f, ev);
        if f.state != ev.state {
            f.state_since_ns = ev.ts_ns;
        }
        f.state = ev.state;
        if ev.state == TcpState::CloseWait {
            f.close_wait_since_ns.get_or_insert(ev.ts_ns);
        } else {
            f.close_wait_since_ns = None;
            f.announced &= !StallClass::CloseWait.bit();
        }
        match ev.state {
            TcpState::Close => {
                self.close_slot(slot, ev.ts_ns, false);
                return;
            }
            // Our FIN acknowledged / both FINs done: nothing unacked left.
            TcpState::FinWait2 | TcpState::TimeWait => {
                if let Some(st) = f.streak {
                    Self::end_streak(
                        f,
                        &mut self.sink,
                        StreakOutcome::Recovered,
                        st.last_event_ns,
                    );
                }
                Self::end_persist(f, &mut self.sink, ev.ts_ns);
            }
            _ => {}
        }
        self.flows.touch(slot);
    }

    /// The peer acknowledged new data while the socket was in an RTO
    /// episode: the streak ends as recovered now, not when the next expected
    /// expiry is overdue. (The event fires before the kernel processes the
    /// segment: `snd_una` is the old value, `ack_seq` the new one.)
    fn on_ack(&mut self, ev: &SockEvent) {
        let Some(slot) = self.resolve(ev, false) else {
            return;
        };
        let f = self.flows.flow_mut(slot);
        f.last_event_ns = f.last_event_ns.max(ev.ts_ns);
        if ev.ack_seq != 0 {
            f.snd_una = ev.ack_seq;
        }
        // A segment acknowledging new data also ends any persist episode.
        Self::end_persist(f, &mut self.sink, ev.ts_ns);
        if f.streak.is_some_and(|st| {
            st.snd_una_last == 0 || ev.ack_seq == 0 || seq_after(ev.ack_seq, st.snd_una_last)
        }) {
            f.retransmits = 0;
            f.backoff = 0;
            Self::end_streak(f, &mut self.sink, StreakOutcome::Recovered, ev.ts_ns);
            self.sink.stats.acks_recovered += 1;
        }
        self.flows.touch(slot);
    }

    fn on_error_report(&mut self, ev: &SockEvent) {
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
                first: f.streak.and_then(|st| st.first_prediction),
            });
            Self::end_streak(f, &mut self.sink, StreakOutcome::TimedOut, ev.ts_ns);
            Self::end_persist(f, &mut self.sink, ev.ts_ns);
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
                        first: pending.and_then(|st| st.first_prediction),
                    });
                    if let Some(st) = pending {
                        self.sink
                            .streak_ended(remote, &st, StreakOutcome::TimedOut, ev.ts_ns);
                    }
                } else if let Some(st) = c.pending.take() {
                    let (remote, at) = (c.remote, c.closed_at_ns);
                    self.sink
                        .streak_ended(remote, &st, StreakOutcome::Closed, at);
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
    fn close_slot(&mut self, slot: u32, ts_ns: u64, superseded: bool) {
        let key = self.flows.key(slot);
        let Some(mut f) = self.flows.remove(&key) else {
            return;
        };
        self.sink.stats.flows_closed += 1;
        if f.skaddr != 0 && self.skaddr_map.get(&f.skaddr) == Some(&f.cookie) {
            self.skaddr_map.remove(&f.skaddr);
        }
        Self::end_persist(&mut f, &mut self.sink, ts_ns);
        let mut pending = None;
        if let Some(st) = f.streak.take() {
            if superseded {
                self.sink
                    .streak_ended(f.remote, &st, StreakOutcome::Closed, ts_ns);
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
        });
    }

    /// Gives a closed flow's pending streak its outcome: a close right after
    /// a fatal expiry is a timeout even without an error report (orphans get
    /// none), anything else a plain close.
    fn settle_closed(&mut self, c: Closed) {
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
            self.sink
                .streak_ended(c.remote, &st, StreakOutcome::TimedOut, c.closed_at_ns);
        } else {
            self.sink
                .streak_ended(c.remote, &st, StreakOutcome::Closed, c.closed_at_ns);
        }
    }

    fn refresh_predictions(&mut self) {
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

    // ----- time --------------------------------------------------------------

    /// Advances time: ends overdue streaks (recovered) and zero-window
    /// episodes, settles closed flows, announces time-based stalls.
    pub fn tick(&mut self, now_ns: u64) {
        let mut slots = std::mem::take(&mut self.scratch);
        self.flows.active_slots(&mut slots);
        let zw_after = dur_ns(self.cfg.zero_window_after);
        let cw_after = dur_ns(self.cfg.close_wait_after);
        for &s in &slots {
            let (streak_grace, persist_grace) = {
                let f = self.flows.flow(s);
                (
                    f.streak.map(|st| self.grace_ns(st.next_interval_ns)),
                    f.persist.map(|p| self.grace_ns(p.next_interval_ns)),
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
            if let (Some(p), Some(g)) = (f.persist, persist_grace)
                && now_ns > p.next_due_ns.saturating_add(g)
            {
                Self::end_persist(f, &mut self.sink, p.last_probe_ns);
            }
            if let Some(p) = f.persist.as_mut()
                && !p.stalled
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

    // ----- views -------------------------------------------------------------

    /// The primary stall class of a flow at `now` (read-only: overdue streaks
    /// and episodes count as ended even before `tick` runs).
    fn classify(&self, f: &Flow, now_ns: u64) -> Option<StallClass> {
        if f.timed_out {
            return None;
        }
        if let Some(st) = f.streak
            && st.rtos >= self.cfg.min_rto_streak
            && now_ns
                <= st
                    .next_due_ns
                    .saturating_add(self.grace_ns(st.next_interval_ns))
        {
            return Some(StallClass::Retransmit);
        }
        if let Some(p) = f.persist
            && now_ns.saturating_sub(p.since_ns) >= dur_ns(self.cfg.zero_window_after)
            && now_ns
                <= p.next_due_ns
                    .saturating_add(self.grace_ns(p.next_interval_ns))
        {
            return Some(StallClass::ZeroWindow);
        }
        if let Some(since) = f.close_wait_since_ns
            && now_ns.saturating_sub(since) >= dur_ns(self.cfg.close_wait_after)
        {
            return Some(StallClass::CloseWait);
        }
        None
    }

    /// The prediction relevant to a class: (death, boundary ms, source, start).
    fn horizon_of(f: &Flow, class: StallClass) -> Option<Prediction> {
        match class {
            StallClass::Retransmit => f.prediction.filter(|_| f.streak.is_some()),
            StallClass::ZeroWindow => f.prediction.filter(|_| f.persist.is_some()),
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
            StallClass::Retransmit => f.streak.map_or(now_ns, |st| st.start_ns),
            StallClass::ZeroWindow => f.persist.map_or(now_ns, |p| p.since_ns),
            StallClass::CloseWait => f.close_wait_since_ns.unwrap_or(now_ns),
        };
        let pred = Self::horizon_of(f, class);
        let hz = self.hz.hz();
        StallView {
            class,
            since_ns: since,
            stalled_for_s: secs(now_ns.saturating_sub(since)),
            cookie: f.cookie,
            local: f.local,
            remote: f.remote,
            netns: f.netns,
            state: f.state,
            retransmits: f.retransmits,
            rto_streak: f.streak.map_or(0, |st| st.rtos),
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
            horizon_fraction: pred.filter(|p| p.boundary_ms > 0).map(|p| {
                secs(now_ns.saturating_sub(p.start_ns)) / (p.boundary_ms as f64 / 1_000.0)
            }),
            near_horizon: pred.is_some_and(|p| self.near(&p, now_ns)),
            zero_window_probes: f.persist.map(|p| p.probes),
            zero_window_unanswered: f.persist.map(|p| p.probes_out),
            zero_window_s: f.persist.map(|p| secs(now_ns.saturating_sub(p.since_ns))),
            close_wait_age_s: f
                .close_wait_since_ns
                .map(|s| secs(now_ns.saturating_sub(s))),
            orphan: f.orphan,
            user_timeout_ms: (f.user_timeout_ms != 0).then_some(f.user_timeout_ms),
            last_event_age_s: secs(now_ns.saturating_sub(f.last_event_ns)),
            history: FlowHistory {
                streaks: f.history.streaks,
                recovered: f.history.recovered,
                timed_out: f.history.timed_out,
                closed: f.history.closed,
                zero_window_episodes: f.history.zero_window_episodes,
            },
        }
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

    /// Takes the queued observations.
    pub fn drain_observations(&mut self) -> std::collections::vec_deque::Drain<'_, Observation> {
        self.sink.outbox.drain(..)
    }

    pub fn stats(&self) -> EngineStats {
        let mut s = self.sink.stats.clone();
        s.flows_tracked = self.flows.len();
        s.flows_active = self.flows.active_len();
        s.observations_pending = self.sink.outbox.len();
        s.hz = self.hz.hz();
        s.hz_source = self.hz.source();
        s.remotes_tracked = self.sink.remotes.len();
        s.netns_known = self.netns.len();
        s.recently_closed = self.closed.len();
        s
    }
}

impl Sink {
    fn stats_retransmit(&mut self, remote: SocketAddr, rto: bool, ts_ns: u64) {
        self.remotes.counters(remote, ts_ns).retransmits += 1;
        self.emit(Observation::Retransmit { remote, rto });
    }

    fn rto_expiry(&mut self, remote: SocketAddr, rtos: u32, ts_ns: u64) {
        self.remotes.counters(remote, ts_ns).rto_expiries += 1;
        self.emit(Observation::RtoExpiry { remote, rtos });
    }
}
