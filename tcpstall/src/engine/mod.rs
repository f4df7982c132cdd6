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
//!
//! Files: `config` (settings and validation), `flow_key` (which flow an event
//! belongs to), `handlers` (one per event kind), `streak` (per-flow
//! episodes, streaks, verdicts, predictions), `close` (error reports, closes),
//! `tick` (time), `views` (stalls, gauges, remotes), `sink` (observations and
//! counters), `flow` (the flow table), `horizon` / `hz` (kernel timer model).

pub mod cause;
mod close;
mod config;
mod fin_wait2;
mod flow;
mod flow_key;
mod handlers;
pub mod horizon;
pub mod hz;
mod keepalive;
#[cfg(test)]
mod kernel_model;
mod output;
mod remote;
pub mod seed;
mod sink;
mod streak;
#[doc(hidden)]
pub mod testkit;
mod tick;
mod views;
pub mod why;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tcpstall_common::pending;

use crate::kernel::event::{EventKind, NetnsSysctls, SockEvent};

use close::Closed;
use flow::FlowTable;
use horizon::NSEC_PER_SEC;
use remote::RemoteTable;
use sink::Sink;

pub use config::{EngineConfig, EngineConfigError};
pub use horizon::BoundarySource;
pub use hz::HzSource;
pub use output::{
    EngineStats, FlowHistory, Observation, OtherRemotes, PersistEnd, RemoteCounters, RemoteLive,
    RemoteView, RemotesView, StallClass, StallView, StalledCounts, StreakOutcome, TimeoutEvidence,
};
pub use views::Gauges;
pub use why::{CauseEvidence, MssChange, StallCause};

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

impl Engine {
    pub fn new(cfg: EngineConfig) -> Result<Self, EngineConfigError> {
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
            EventKind::Drop => st.events_drop += 1,
            EventKind::RetransmitError => st.events_retransmit_error += 1,
            EventKind::Sweep => st.sweep_snapshots += 1,
            EventKind::KeepaliveTimer => st.events_keepalive_timer += 1,
            EventKind::TwTimerStart | EventKind::TwTimerExpire => st.events_tw_timer += 1,
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
            EventKind::Drop | EventKind::RetransmitError => self.on_local_drop(ev),
            EventKind::Sweep => self.on_sweep(ev),
            EventKind::KeepaliveTimer => self.on_keepalive_timer(ev),
            EventKind::TwTimerStart => self.on_tw_start(ev),
            EventKind::TwTimerExpire => self.on_tw_expire(ev),
        }
    }

    /// Cookies of the flows in a loss episode (an RTO streak, or window
    /// probes with data that never left): what the kernel's drop filter
    /// should hold. Appended to `out`.
    pub fn episode_cookies(&self, out: &mut Vec<u64>) {
        out.extend(
            self.flows
                .active()
                .filter(|f| f.cookie != 0 && !f.timed_out && f.in_loss_episode())
                .map(|f| f.cookie),
        );
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
