//! What the engine hands out: stall views, observations, statistics.

use std::net::SocketAddr;

use serde::Serialize;

use crate::kernel::event::TcpState;

use super::horizon::BoundarySource;
use super::hz::HzSource;

/// Stall classes. The label strings are fixed (metric label values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StallClass {
    /// >= `min_rto_streak` consecutive RTO expiries without ACK progress.
    Retransmit,
    /// Persist timer running (peer window zero) longer than `zero_window_after`.
    ZeroWindow,
    /// In CLOSE_WAIT longer than `close_wait_after`.
    CloseWait,
    /// `connect()` retransmitting its SYN (SYN_SENT) from the first SYN
    /// retransmission: the peer cannot be reached at all.
    Connect,
    /// An idle established socket (nothing in flight) whose keepalive
    /// probes go unanswered, from the first unanswered probe.
    Keepalive,
    /// An orphan (closed by its application) whose FIN the peer ACKed but
    /// who sends no FIN of its own, waiting under `tcp_fin_timeout` /
    /// TCP_LINGER2 for longer than `fin_wait2_after`: node health (a peer
    /// application that does not close), not an application page.
    FinWait2,
}

impl StallClass {
    pub const ALL: [StallClass; 6] = [
        Self::Retransmit,
        Self::ZeroWindow,
        Self::CloseWait,
        Self::Connect,
        Self::Keepalive,
        Self::FinWait2,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retransmit => "retransmit",
            Self::ZeroWindow => "zero_window",
            Self::CloseWait => "close_wait",
            Self::Connect => "connect",
            Self::Keepalive => "keepalive",
            Self::FinWait2 => "fin_wait2",
        }
    }

    pub(crate) fn bit(self) -> u8 {
        match self {
            Self::Retransmit => 1,
            Self::ZeroWindow => 2,
            Self::CloseWait => 4,
            Self::Connect => 8,
            Self::Keepalive => 16,
            Self::FinWait2 => 32,
        }
    }
}

/// Stalled flows per class (each stalled flow counts once, under its
/// primary class: retransmit, then zero_window, then close_wait).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StalledCounts {
    pub retransmit: usize,
    pub zero_window: usize,
    pub close_wait: usize,
    pub connect: usize,
    pub keepalive: usize,
    pub fin_wait2: usize,
}

impl StalledCounts {
    pub fn get(&self, class: StallClass) -> usize {
        match class {
            StallClass::Retransmit => self.retransmit,
            StallClass::ZeroWindow => self.zero_window,
            StallClass::CloseWait => self.close_wait,
            StallClass::Connect => self.connect,
            StallClass::Keepalive => self.keepalive,
            StallClass::FinWait2 => self.fin_wait2,
        }
    }

    pub fn add(&mut self, class: StallClass) {
        match class {
            StallClass::Retransmit => self.retransmit += 1,
            StallClass::ZeroWindow => self.zero_window += 1,
            StallClass::CloseWait => self.close_wait += 1,
            StallClass::Connect => self.connect += 1,
            StallClass::Keepalive => self.keepalive += 1,
            StallClass::FinWait2 => self.fin_wait2 += 1,
        }
    }

    pub fn total(&self) -> usize {
        self.retransmit
            + self.zero_window
            + self.close_wait
            + self.connect
            + self.keepalive
            + self.fin_wait2
    }

    /// `(class, count)` for every class, zeros included.
    pub fn iter(&self) -> impl Iterator<Item = (StallClass, usize)> + '_ {
        StallClass::ALL.into_iter().map(|c| (c, self.get(c)))
    }
}

/// One stalled flow, as of `now`. Instants are CLOCK_MONOTONIC ns (the
/// clock of `SockEvent::ts_ns`); durations are seconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StallView {
    pub class: StallClass,
    /// When this stall began (streak start, first zero-window probe, entry
    /// into CLOSE_WAIT).
    pub since_ns: u64,
    pub stalled_for_s: f64,
    /// Socket cookie (0 while only the kernel address is known).
    pub cookie: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub netns: u32,
    /// cgroup v2 id of the socket's cgroup (0 = unknown): its pod and container.
    pub cgroup_id: u64,
    pub state: TcpState,
    /// `icsk_retransmits` at the last event.
    pub retransmits: u32,
    /// Consecutive RTO expiries without ACK progress in the current streak.
    pub rto_streak: u32,
    pub backoff: u32,
    pub rto_ms: u64,
    pub packets_out: u32,
    pub total_retrans: u32,
    /// `now - retrans_stamp` (the kernel's clock for the boundary).
    pub unacked_age_s: Option<f64>,
    pub boundary_s: Option<f64>,
    pub boundary_source: Option<BoundarySource>,
    /// When the kernel will declare ETIMEDOUT.
    pub predicted_timeout_ns: Option<u64>,
    /// Negative when overdue.
    pub seconds_to_timeout: Option<f64>,
    /// Why there is no predicted timeout where one is expected (e.g. a
    /// kernel that lacks a field the rule needs); None otherwise.
    pub no_prediction_reason: Option<super::horizon::NoPrediction>,
    /// Share of the boundary consumed (`unacked_age / boundary`).
    pub horizon_fraction: Option<f64>,
    pub near_horizon: bool,
    pub zero_window_probes: Option<u32>,
    /// `icsk_probes_out`: unanswered zero-window probes.
    pub zero_window_unanswered: Option<u32>,
    pub zero_window_s: Option<f64>,
    pub close_wait_age_s: Option<f64>,
    pub orphan: bool,
    pub user_timeout_ms: Option<u32>,
    pub last_event_age_s: f64,
    /// Outcomes of this flow's streaks and zero-window episodes so far
    /// (the current ones included).
    pub history: FlowHistory,
    /// This flow's retransmissions by cause (since the agent saw it).
    pub retransmits_by_cause: super::cause::CauseCounts,
    /// Why it stalls, from the kernel's evidence on this socket.
    pub cause: super::why::StallCause,
    pub cause_evidence: super::why::CauseEvidence,
}

/// Per-flow counts of retransmission streaks by outcome, and zero-window
/// episodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FlowHistory {
    pub streaks: u32,
    pub recovered: u32,
    pub timed_out: u32,
    pub closed: u32,
    pub zero_window_episodes: u32,
}

/// How a retransmission streak ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreakOutcome {
    /// ACK progress, or the expected next RTO never came.
    Recovered,
    /// The kernel killed the socket.
    TimedOut,
    /// The socket closed for another reason.
    Closed,
}

impl StreakOutcome {
    pub const ALL: [StreakOutcome; 3] = [Self::Recovered, Self::TimedOut, Self::Closed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Recovered => "recovered",
            Self::TimedOut => "timed_out",
            Self::Closed => "closed",
        }
    }
}

/// What ended a zero-window (persist) episode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PersistEnd {
    /// The next zero-window probe is overdue by the grace: the window
    /// reopened (no kernel event reports that).
    Quiet,
    /// A zero-window probe found the window open.
    WindowOpened,
    /// A retransmission of the flow.
    Retransmit,
    /// An RTO expiry of the flow.
    RtoExpiry,
    /// An ACK of new data (reported inside an RTO episode).
    Ack,
    /// Our FIN acknowledged (FIN_WAIT2 / TIME_WAIT).
    FinAcked,
    /// The socket closed or timed out.
    Closed,
    /// A sweep snapshot showed no persist timer.
    Sweep,
}

impl PersistEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quiet => "quiet",
            Self::WindowOpened => "window_opened",
            Self::Retransmit => "retransmit",
            Self::RtoExpiry => "rto_expiry",
            Self::Ack => "ack",
            Self::FinAcked => "fin_acked",
            Self::Closed => "closed",
            Self::Sweep => "sweep",
        }
    }
}

/// What proved a timeout death.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeoutEvidence {
    /// `inet_sk_error_report` with `sk_err == ETIMEDOUT`: the terminal truth.
    Etimedout,
    /// The write timeout killed the socket but an earlier ICMP soft error
    /// surfaced instead of ETIMEDOUT (`sk_err = sk_err_soft ?: ETIMEDOUT`).
    SoftError { errno: u32 },
    /// No error report (orphaned sockets get none): the socket closed right
    /// after an expiry at which the kernel's rule (or its sock_ops verdict)
    /// said dead.
    Verdict,
    /// An orphan's FIN_WAIT2 timeout: its timewait timer ran in the
    /// FIN_WAIT2 substate (no error report, no socket tracepoint).
    TimewaitExpiry,
}

impl TimeoutEvidence {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Etimedout => "etimedout",
            Self::SoftError { .. } => "soft_error",
            Self::Verdict => "verdict",
            Self::TimewaitExpiry => "timewait_expiry",
        }
    }
}

/// Facts for counters and histograms, queued by the engine and drained with
/// [`super::Engine::drain_observations`]. `Copy`, no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Observation {
    /// One retransmitted segment (`rto`: sent by an RTO expiry, as opposed
    /// to fast retransmit / loss probe; false when unknown).
    Retransmit {
        remote: SocketAddr,
        rto: bool,
        cause: super::cause::RetransmitCause,
    },
    /// One RTO expiry (`rtos`: consecutive ones without ACK progress,
    /// this one included).
    RtoExpiry { remote: SocketAddr, rtos: u32 },
    /// One zero-window probe expiry.
    ZeroWindowProbe { remote: SocketAddr },
    /// A flow entered a stall class.
    StallStarted {
        class: StallClass,
        cookie: u64,
        remote: SocketAddr,
    },
    /// A retransmission episode ended. Every episode, including fast
    /// retransmits and loss probes that recovered (`rtos == 0`);
    /// `stalled` says whether it reached the `retransmit` class.
    StreakEnded {
        remote: SocketAddr,
        outcome: StreakOutcome,
        duration_s: f64,
        /// Consecutive RTO expiries without ACK progress at the end.
        rtos: u32,
        stalled: bool,
        cookie: u64,
        /// The send MSS the kernel's black-hole detection lowered in the
        /// episode (cause `pmtu_blackhole`; a recovery after it is the
        /// detection's doing).
        mss_lowered: Option<super::why::MssChange>,
    },
    /// A zero-window episode ended (window opened, or the flow closed).
    /// `by`: what ended it, decided at `at_ns` (the event's instant, or the
    /// tick that found the next probe overdue).
    ZeroWindowEnded {
        cookie: u64,
        remote: SocketAddr,
        duration_s: f64,
        probes: u32,
        by: PersistEnd,
        at_ns: u64,
    },
    /// The kernel killed a socket on its write timeout. `prediction_error_s`
    /// = actual - predicted (signed seconds) for the last prediction made
    /// before the fatal expiry: the product's accuracy figure.
    Timeout {
        cookie: u64,
        remote: SocketAddr,
        evidence: TimeoutEvidence,
        actual_ns: u64,
        predicted_ns: Option<u64>,
        prediction_error_s: Option<f64>,
        /// Same for the first prediction of the streak (made when it
        /// became predictable, usually at its first RTO).
        first_prediction_error_s: Option<f64>,
        /// How long before the death the first prediction was available.
        lead_time_s: Option<f64>,
        boundary_s: Option<f64>,
        boundary_source: Option<BoundarySource>,
    },
    /// A stalled flow ended by an RST (`sk_err` ECONNRESET / EPIPE at its
    /// CLOSE): the peer restarted or a middlebox lost the connection's
    /// state. `cause`: what the stall was attributed to until then.
    StallReset {
        class: StallClass,
        cause: super::why::StallCause,
        cookie: u64,
        remote: SocketAddr,
        errno: u32,
    },
    /// The flow table was full: the least recently used flow was dropped.
    FlowEvicted {
        netns: u32,
        local: SocketAddr,
        remote: SocketAddr,
        active: bool,
    },
}

/// Engine counters (cumulative since start) and sizes.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EngineStats {
    pub events: u64,
    /// Sweep snapshots ingested (see [`crate::engine::seed`]).
    pub sweep_snapshots: u64,
    /// Flows a sweep created in a stall state (not known from events).
    pub sweep_seeded: u64,
    /// Known flows whose state a sweep repaired (events were lost).
    pub sweep_repaired: u64,
    /// Snapshots ignored: closed or timed-out flows, newer events, no cookie.
    pub sweep_ignored: u64,
    pub events_retransmit: u64,
    pub events_write_timer: u64,
    pub events_state: u64,
    pub events_error_report: u64,
    pub events_ack: u64,
    /// This node's drops of packets of sockets in a loss episode.
    pub events_drop: u64,
    /// Retransmissions this node failed to send (6.17+).
    pub events_retransmit_error: u64,
    pub events_keepalive_timer: u64,
    /// Timewait-timer starts and expiries of orphaned FIN_WAIT2
    /// connections (issue 20, item 3).
    pub events_tw_timer: u64,
    /// FIN_WAIT2 flows ended by the peer's FIN (not a stall), by their
    /// timewait timer's expiry (a FIN_WAIT2 timeout), or with no end seen
    /// (gone past their predicted end without an expiry event).
    pub fin_wait2_peer_fin: u64,
    pub fin_wait2_timeouts: u64,
    pub fin_wait2_unseen_end: u64,
    /// Orphans waiting above 60 s whose change to FIN_WAIT2 was never
    /// received, started from their keepalive timer's run (backdated).
    pub fin_wait2_entries_recovered: u64,
    /// ACK events that ended a streak (the stall cleared at once).
    pub acks_recovered: u64,
    /// Events with neither cookie nor socket address.
    pub events_unattributed: u64,
    /// The same RTO expiry reported twice (two mechanisms).
    pub timer_events_duplicate: u64,
    /// Write-timer events for a pending value that is neither RTO nor probe.
    pub timer_events_ignored: u64,
    pub flows_tracked: usize,
    pub flows_active: usize,
    pub flows_created: u64,
    pub flows_closed: u64,
    pub flows_evicted: u64,
    /// Provisional (cookie-less) flows merged once the cookie was seen.
    pub provisional_merges: u64,
    /// A socket address came back with a new cookie: the old flow was gone.
    pub skaddr_reuses: u64,
    pub streaks_started: u64,
    pub streaks_recovered: u64,
    pub streaks_timed_out: u64,
    pub streaks_closed: u64,
    pub streaks_evicted: u64,
    pub stalls_started: u64,
    /// Stalled flows ended by an RST.
    pub stalls_reset: u64,
    pub timeouts: u64,
    /// Timeouts that had a prediction.
    pub timeouts_predicted: u64,
    /// ETIMEDOUT for a socket the engine knew nothing about.
    pub timeouts_unmatched: u64,
    pub last_prediction_error_s: Option<f64>,
    pub mean_abs_prediction_error_s: Option<f64>,
    pub observations_pending: usize,
    pub observations_dropped: u64,
    pub hz: u32,
    pub hz_source: HzSource,
    pub remotes_tracked: usize,
    pub netns_known: usize,
    pub recently_closed: usize,
}

/// Cumulative per-remote counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RemoteCounters {
    pub retransmits: u64,
    pub rto_expiries: u64,
    pub zero_window_probes: u64,
    /// Retransmission episodes started.
    pub streaks: u64,
    /// Stalls started (any class).
    pub stalls: u64,
    pub timeouts: u64,
}

impl RemoteCounters {
    pub fn add(&mut self, o: &RemoteCounters) {
        self.retransmits += o.retransmits;
        self.rto_expiries += o.rto_expiries;
        self.zero_window_probes += o.zero_window_probes;
        self.streaks += o.streaks;
        self.stalls += o.stalls;
        self.timeouts += o.timeouts;
    }
}

/// Live per-remote gauges, computed from the flow table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RemoteLive {
    pub stalled_flows: usize,
    pub stalled: StalledCounts,
    pub near_timeout: usize,
}

impl RemoteLive {
    pub fn add(&mut self, o: &RemoteLive) {
        self.stalled_flows += o.stalled_flows;
        self.stalled.retransmit += o.stalled.retransmit;
        self.stalled.zero_window += o.stalled.zero_window;
        self.stalled.close_wait += o.stalled.close_wait;
        self.stalled.connect += o.stalled.connect;
        self.stalled.keepalive += o.stalled.keepalive;
        self.near_timeout += o.near_timeout;
    }
}

/// One remote endpoint (IP:port).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RemoteView {
    pub remote: SocketAddr,
    #[serde(flatten)]
    pub live: RemoteLive,
    #[serde(flatten)]
    pub counters: RemoteCounters,
}

/// Everything beyond the top K, summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct OtherRemotes {
    /// How many remotes were summed (including ones already folded away
    /// from the bounded counter table).
    pub remotes: u64,
    #[serde(flatten)]
    pub live: RemoteLive,
    #[serde(flatten)]
    pub counters: RemoteCounters,
}

/// Per-remote aggregation: the top K by stalled flows then retransmits.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RemotesView {
    pub top: Vec<RemoteView>,
    pub other: OtherRemotes,
}
