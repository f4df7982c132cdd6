//! The Prometheus metric contract (deploy/README.md), on a
//! `prometheus-client` registry.
//!
//! Cumulative metrics (counters, histograms) are fed as things happen: kernel
//! events by kind, decode errors, ring-buffer drops, and the engine's
//! [`Observation`]s. Live metrics (stalled sockets per class, near-timeout
//! count, flow table size and the per-flow series of the top-K most urgent
//! stalled flows) are replaced wholesale right before each encoding by
//! [`Metrics::render`]: the per-flow families are cleared and re-filled, so a
//! flow that left the top-K set (recovered, closed, outranked) loses its
//! series at the next scrape.
//!
//! Cardinality is bounded by construction:
//! - `remote` label: the first `max_remote_labels` distinct remote endpoints
//!   seen get their own value, every later one is counted under `other`;
//! - per-flow series: at most `top_k_flows` flows, three gauges each;
//! - every other label has a closed value set (class, outcome, kind, probe x
//!   mechanism, one build).
//!
//! Exposition: OpenMetrics text (what `prometheus-client` encodes), or the
//! classic Prometheus text format 0.0.4 derived from it by
//! [`openmetrics_to_prometheus_text`].
//!
//! Files: this one (the families, feeding and rendering), `register`
//! ([`Metrics::new`]: the registry built), `text` (the classic text format),
//! `tests`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Mutex, MutexGuard, PoisonError},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use super::incidents::Incident;
use crate::{
    engine::{Gauges, Observation, StallView, StreakOutcome},
    identity::{Direction, netns::PodIdentity},
    kernel::{event::EventKind, loader::ProgramRuntime},
};
pub use labels::FlowLabels;
use labels::*;

/// Upper bounds (seconds) of `tcpstall_stall_duration_seconds`: a streak that
/// reached the `retransmit` class lasts from about a second (TCP_USER_TIMEOUT,
/// low tcp_retries2) to the default 924.6 s boundary and beyond.
pub const STALL_DURATION_BUCKETS: [f64; 14] = [
    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0,
];

/// Upper bounds (seconds) of `tcpstall_timeout_prediction_error_seconds`
/// (absolute error of the last prediction before the kernel's ETIMEDOUT).
pub const PREDICTION_ERROR_BUCKETS: [f64; 11] =
    [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0];

/// Upper bounds (seconds) of `tcpstall_event_delivery_seconds` (kernel
/// timestamp of an event to the agent reading it): the reader polls the
/// ring every 10 ms unless the programs wake it (above an eighth full).
pub const EVENT_DELIVERY_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 1.0,
];

/// The `remote` label value of every remote beyond `max_remote_labels`.
pub const OTHER_REMOTE: &str = "other";

/// Content type of the OpenMetrics exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the classic Prometheus text exposition.
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("encoding the metrics failed")]
    Encode(#[from] std::fmt::Error),
}

/// Exposition format of [`Metrics::render`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    /// Prometheus text format 0.0.4.
    PrometheusText,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Format::PrometheusText => PROMETHEUS_TEXT_CONTENT_TYPE,
        }
    }
}

/// Bounds and identity of the agent's metrics.
#[derive(Clone, Debug)]
pub struct MetricsConfig {
    /// Distinct `remote` label values before `other`.
    pub max_remote_labels: usize,
    /// Stalled flows with per-flow series.
    pub top_k_flows: usize,
    /// `tcpstall_build_info{version}`.
    pub version: String,
    /// `tcpstall_build_info{kernel}`.
    pub kernel: String,
    /// The `node` label of the incident series (--node-name).
    pub node: String,
    /// Incident groups with their own labels (--max-incidents).
    pub max_incidents: usize,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;
type FloatCounter = Counter<f64, std::sync::atomic::AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: String,
}

/// Kernel per-program counters: the families and the last absolute values
/// read (the kernel counts totals; the counters advance by the difference).
#[derive(Default)]
struct ProgramCounters {
    missed: Family<ProgramLabels, Counter>,
    runs: Family<ProgramLabels, Counter>,
    run_seconds: Family<ProgramLabels, FloatCounter>,
    last: Mutex<HashMap<&'static str, ProgramRuntime>>,
}
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn stall_duration_histogram() -> Histogram {
    Histogram::new(STALL_DURATION_BUCKETS)
}

/// The counters of one `remote` label value.
#[derive(Clone, Debug)]
struct RemoteSeries {
    /// The `remote` label value (the endpoint, or `other`).
    label: String,
    rto_expirations: Counter,
}

/// A `remote` label value gives way to a new remote only after this long
/// without an event: bounded by recent activity, not by who came first, and
/// without churning series on a node that talks to more remotes than
/// `--max-remote-labels` at once.
pub const REMOTE_LABEL_IDLE: std::time::Duration = std::time::Duration::from_secs(600);

/// Bounded `remote` label values, kept by recent activity: at most `max`
/// remotes have their own value; a new remote takes the place of the least
/// recently active one once that one has been idle for
/// [`REMOTE_LABEL_IDLE`] (its series are removed), and is counted under
/// `other` while every labelled remote is busier than that.
#[derive(Debug)]
struct RemoteLabeler {
    max: usize,
    known: HashMap<SocketAddr, (RemoteSeries, std::time::Instant)>,
    other: Option<RemoteSeries>,
}

/// Live values for [`Metrics::render`], computed from the engine at `now`.
#[derive(Clone, Debug, Default)]
pub struct LiveView {
    pub gauges: Gauges,
    /// The most urgent stalled flows first (as [`crate::engine::Engine::stalls`]
    /// returns them), with the owning pod when known. Only the first
    /// `top_k_flows` are exported.
    pub top: Vec<(StallView, Option<PodIdentity>, Direction)>,
    /// Every stalled socket, grouped ([`crate::serve::incidents::aggregate`]).
    pub incidents: Vec<Incident>,
}

/// Every tcpstall metric and its registry.
pub struct Metrics {
    registry: Registry,
    features: Family<FeatureLabels, Gauge>,
    top_k_flows: usize,
    retransmits: Family<RetransmitLabels, Counter>,
    rto_expirations: Family<RemoteLabels, Counter>,
    remotes: Mutex<RemoteLabeler>,
    timeouts: Counter,
    stalled_sockets: Family<ClassLabels, Gauge>,
    sockets_near_timeout: Gauge,
    stall_duration_by_outcome: [Histogram; 3],
    prediction_error: Histogram,
    socket_seconds_to_timeout: Family<FlowLabels, FloatGauge>,
    socket_unacked_age: Family<FlowLabels, FloatGauge>,
    socket_stall_seconds: Family<FlowLabels, FloatGauge>,
    node: String,
    max_incidents: usize,
    incident_sockets: Family<IncidentLabels, Gauge>,
    incident_oldest_stall: Family<IncidentLabels, FloatGauge>,
    incident_earliest_timeout: Family<IncidentLabels, FloatGauge>,
    process_cpu: FloatCounter,
    process_cpu_last: Mutex<f64>,
    process_resident: Gauge,
    events_by_kind: [Counter; EventKind::ALL.len()],
    event_delivery: Histogram,
    ringbuf_dropped: Counter,
    episode_filter_errors: Counter,
    drop_probe_attached: Gauge,
    drop_probe_attaches: Counter,
    drop_probe_attach_errors: Counter,
    stall_resets: Family<CauseLabels, Counter>,
    decode_errors: Counter,
    flows_tracked: Gauge,
    flow_evictions: Counter,
    heartbeat_age: FloatGauge,
    programs: ProgramCounters,
    guard_sockets: Family<GuardLabels, Counter>,
    guard_reload_failures: Counter,
    /// The socket sweep's metrics.
    pub sweep: crate::sweep::SweepMetrics,
    /// Serialises "replace the live values, then encode" between scrapes.
    render_lock: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("top_k_flows", &self.top_k_flows)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Metric state stays consistent even if a holder panicked.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn kind_index(kind: EventKind) -> Option<usize> {
    match kind {
        EventKind::Retransmit => Some(0),
        EventKind::WriteTimer => Some(1),
        EventKind::State => Some(2),
        EventKind::ErrorReport => Some(3),
        EventKind::Ack => Some(4),
        EventKind::Drop => Some(5),
        EventKind::RetransmitError => Some(6),
        EventKind::KeepaliveTimer => Some(7),
        EventKind::TwTimerStart => Some(8),
        EventKind::TwTimerExpire => Some(9),
        // Not a ring-buffer event: counted by the sweep metrics.
        EventKind::Sweep => None,
    }
}

fn outcome_index(o: StreakOutcome) -> usize {
    match o {
        StreakOutcome::Recovered => 0,
        StreakOutcome::TimedOut => 1,
        StreakOutcome::Closed => 2,
    }
}

impl Metrics {
    /// `tcpstall_guard_sockets_total`: one socket the guard acted on (or
    /// would have), per action.
    pub fn guard_socket(
        &self,
        namespace: &str,
        rule: &str,
        action: &'static str,
        mode: &'static str,
    ) {
        self.guard_sockets
            .get_or_create(&GuardLabels {
                namespace: namespace.to_owned(),
                rule: rule.to_owned(),
                action,
                mode,
            })
            .inc();
    }

    /// `tcpstall_guard_reload_failures_total`.
    pub fn guard_reload_failed(&self) {
        self.guard_reload_failures.inc();
    }

    /// `tcpstall_feature`: one series per feature and state, 1 for the
    /// state it is in.
    pub fn set_features(&self, features: &[crate::sweep::features::FeatureStatus]) {
        for f in features {
            for state in crate::sweep::features::FeatureState::STATES {
                self.features
                    .get_or_create(&FeatureLabels {
                        feature: f.name,
                        state,
                    })
                    .set(i64::from(f.state.as_str() == state));
            }
        }
    }

    pub fn top_k_flows(&self) -> usize {
        self.top_k_flows
    }

    /// Incident groups exported with their own labels (the rest: `other`).
    pub fn max_incidents(&self) -> usize {
        self.max_incidents
    }

    /// One decoded kernel event.
    pub fn event(&self, kind: EventKind) {
        if let Some(i) = kind_index(kind) {
            self.events_by_kind[i].inc();
        }
    }

    /// One event read `delay_ns` after its kernel timestamp.
    pub fn event_delivered(&self, delay_ns: u64) {
        self.event_delivery.observe(delay_ns as f64 / 1e9);
    }

    /// One undecodable ring-buffer record.
    pub fn decode_error(&self) {
        self.decode_errors.inc();
    }

    /// `n` more events lost to a full ring buffer.
    /// Folds the kernel's per-program totals into the counters (by the
    /// difference from the previous reading; a total that went down, which
    /// only a reloaded program could do, counts from zero).
    pub fn program_runtime(&self, samples: &[ProgramRuntime]) {
        let mut last = lock(&self.programs.last);
        for s in samples {
            let prev = last.get(s.program).copied().unwrap_or_default();
            let d = |now: u64, before: u64| if now >= before { now - before } else { now };
            let l = ProgramLabels {
                program: s.program.to_owned(),
            };
            let missed = d(s.recursion_misses, prev.recursion_misses);
            let runs = d(s.run_count, prev.run_count);
            let ns = d(s.run_time_ns, prev.run_time_ns);
            self.programs.missed.get_or_create(&l).inc_by(missed);
            self.programs.runs.get_or_create(&l).inc_by(runs);
            self.programs
                .run_seconds
                .get_or_create(&l)
                .inc_by(ns as f64 / 1e9);
            last.insert(s.program, *s);
        }
    }

    /// The event loop's heartbeat age (set at each scrape).
    pub fn heartbeat_age(&self, age_s: f64) {
        self.heartbeat_age.set(age_s);
    }

    /// The drop probe attached (on demand) or detached.
    pub fn drop_probe_attached(&self, attached: bool) {
        self.drop_probe_attached.set(i64::from(attached));
        if attached {
            self.drop_probe_attaches.inc();
        }
    }

    /// A failed attach of the drop probe.
    pub fn drop_probe_attach_failed(&self) {
        self.drop_probe_attach_errors.inc();
    }

    /// Failed updates of the drop probe's kernel socket filter.
    pub fn episode_filter_failed(&self, n: u64) {
        self.episode_filter_errors.inc_by(n);
    }

    pub fn ringbuf_dropped(&self, n: u64) {
        if n > 0 {
            self.ringbuf_dropped.inc_by(n);
        }
    }

    /// The counters of `remote`'s label value (its own, or `other`) for an
    /// event at `now`.
    fn remote_counters(&self, remote: SocketAddr, now: std::time::Instant) -> RemoteSeries {
        let mut r = lock(&self.remotes);
        if let Some((c, last)) = r.known.get_mut(&remote) {
            *last = (*last).max(now);
            return c.clone();
        }
        if r.known.len() >= r.max {
            // The least recently active remote gives way if it is idle.
            let lru = r
                .known
                .iter()
                .min_by_key(|(_, (_, last))| *last)
                .map(|(k, (c, last))| (*k, c.label.clone(), *last));
            if let Some((k, label, last)) = lru
                && now.saturating_duration_since(last) >= REMOTE_LABEL_IDLE
            {
                r.known.remove(&k);
                for cause in crate::engine::cause::RetransmitCause::ALL {
                    self.retransmits.remove(&RetransmitLabels {
                        remote: label.clone(),
                        cause: cause.as_str(),
                    });
                }
                self.rto_expirations.remove(&RemoteLabels { remote: label });
            }
        }
        if r.known.len() < r.max {
            let labels = RemoteLabels {
                remote: remote.to_string(),
            };
            let c = RemoteSeries {
                rto_expirations: self.rto_expirations.get_or_create_owned(&labels),
                label: labels.remote,
            };
            r.known.insert(remote, (c.clone(), now));
            return c;
        }
        r.other
            .get_or_insert_with(|| {
                let labels = RemoteLabels {
                    remote: OTHER_REMOTE.to_owned(),
                };
                RemoteSeries {
                    rto_expirations: self.rto_expirations.get_or_create_owned(&labels),
                    label: labels.remote,
                }
            })
            .clone()
    }

    /// Folds one engine observation into the cumulative metrics.
    pub fn observe(&self, o: &Observation) {
        self.observe_at(o, std::time::Instant::now());
    }

    /// [`Metrics::observe`] at a given instant (the `remote` labels' recency).
    pub fn observe_at(&self, o: &Observation, now: std::time::Instant) {
        match *o {
            Observation::Retransmit { remote, cause, .. } => {
                let label = self.remote_counters(remote, now).label;
                self.retransmits
                    .get_or_create(&RetransmitLabels {
                        remote: label,
                        cause: cause.as_str(),
                    })
                    .inc();
            }
            Observation::RtoExpiry { remote, .. } => {
                self.remote_counters(remote, now).rto_expirations.inc();
            }
            Observation::StreakEnded {
                outcome,
                duration_s,
                stalled: true,
                ..
            } => {
                self.stall_duration_by_outcome[outcome_index(outcome)].observe(duration_s);
            }
            Observation::Timeout {
                prediction_error_s, ..
            } => {
                self.timeouts.inc();
                if let Some(e) = prediction_error_s
                    && e.is_finite()
                {
                    self.prediction_error.observe(e.abs());
                }
            }
            Observation::FlowEvicted { .. } => {
                self.flow_evictions.inc();
            }
            Observation::StallReset { cause, .. } => {
                self.stall_resets
                    .get_or_create(&CauseLabels {
                        cause: cause.as_str(),
                    })
                    .inc();
            }
            Observation::StreakEnded { stalled: false, .. }
            | Observation::ZeroWindowProbe { .. }
            | Observation::StallStarted { .. }
            | Observation::ZeroWindowEnded { .. } => {}
        }
    }

    /// Replaces the live gauges and the per-flow series.
    fn set_live(&self, live: &LiveView) {
        let g = &live.gauges;
        for (c, n) in g.stalled.iter() {
            self.stalled_sockets
                .get_or_create(&ClassLabels { class: c.as_str() })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.sockets_near_timeout
            .set(i64::try_from(g.near_timeout).unwrap_or(i64::MAX));
        self.flows_tracked
            .set(i64::try_from(g.flows_tracked).unwrap_or(i64::MAX));

        self.socket_seconds_to_timeout.clear();
        self.socket_unacked_age.clear();
        self.socket_stall_seconds.clear();
        for (view, pod, direction) in live.top.iter().take(self.top_k_flows) {
            let labels = FlowLabels::of(view, pod.as_ref(), *direction);
            if let Some(s) = view.seconds_to_timeout.filter(|s| s.is_finite()) {
                self.socket_seconds_to_timeout.get_or_create(&labels).set(s);
            }
            if let Some(a) = view.unacked_age_s.filter(|a| a.is_finite()) {
                self.socket_unacked_age.get_or_create(&labels).set(a);
            }
            self.socket_stall_seconds
                .get_or_create(&labels)
                .set(view.stalled_for_s);
        }

        self.incident_sockets.clear();
        self.incident_oldest_stall.clear();
        self.incident_earliest_timeout.clear();
        for i in &live.incidents {
            let labels = IncidentLabels {
                node: self.node.clone(),
                class: i.key.class.as_str(),
                cause: i.key.cause.as_str(),
                namespace: i.key.namespace.clone(),
                pod: i.key.pod.clone(),
                remote: i.key.remote.clone(),
                direction: i.key.direction.map_or("", Direction::as_str),
            };
            self.incident_sockets
                .get_or_create(&labels)
                .set(i64::try_from(i.sockets).unwrap_or(i64::MAX));
            self.incident_oldest_stall
                .get_or_create(&labels)
                .set(i.oldest_stall_s);
            if let Some(t) = i.earliest_timeout_s.filter(|t| t.is_finite()) {
                self.incident_earliest_timeout.get_or_create(&labels).set(t);
            }
        }
    }

    /// Advances the process counters to a new reading of /proc/self.
    pub fn process(&self, s: &crate::serve::self_stats::ProcessSample) {
        let mut last = lock(&self.process_cpu_last);
        if s.cpu_seconds > *last {
            self.process_cpu.inc_by(s.cpu_seconds - *last);
            *last = s.cpu_seconds;
        }
        self.process_resident
            .set(i64::try_from(s.resident_bytes).unwrap_or(i64::MAX));
    }

    /// Replaces the live values with `live` and encodes every metric.
    pub fn render(&self, live: &LiveView, format: Format) -> Result<String, MetricsError> {
        let _guard = lock(&self.render_lock);
        self.set_live(live);
        let mut out = String::with_capacity(16 * 1024);
        encode(&mut out, &self.registry)?;
        Ok(match format {
            Format::OpenMetrics => out,
            Format::PrometheusText => openmetrics_to_prometheus_text(&out),
        })
    }

    /// Current value of `tcpstall_decode_errors_total` (for the shutdown log).
    pub fn decode_errors(&self) -> u64 {
        self.decode_errors.get()
    }

    /// Current value of `tcpstall_ringbuf_dropped_events_total`.
    pub fn ringbuf_dropped_total(&self) -> u64 {
        self.ringbuf_dropped.get()
    }
}

mod labels;
mod register;
mod text;

pub use text::openmetrics_to_prometheus_text;

#[cfg(test)]
mod tests;
