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

use std::{
    collections::{BTreeSet, HashMap},
    fmt::Write as _,
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
    engine::{Gauges, Observation, StallClass, StallView, StreakOutcome},
    identity::netns::PodIdentity,
    kernel::{
        event::EventKind,
        loader::{ProbeStatus, ProgramRuntime},
    },
};

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RemoteLabels {
    remote: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetransmitLabels {
    remote: String,
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    probe: String,
    mechanism: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FeatureLabels {
    feature: &'static str,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    kernel: String,
}

/// Labels of the incident series (one stall class, owning pod and remote;
/// see [`crate::serve::incidents`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IncidentLabels {
    node: String,
    class: &'static str,
    namespace: String,
    pod: String,
    remote: String,
}

/// Labels of the per-flow series (the alert rules' contract).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    pub class: &'static str,
    pub local: String,
    pub remote: String,
    /// Network namespace inode.
    pub netns: String,
    /// Empty when the owning pod is unknown.
    pub pod: String,
    pub namespace: String,
    pub container: String,
}

impl FlowLabels {
    pub fn of(view: &StallView, pod: Option<&PodIdentity>) -> Self {
        Self {
            class: view.class.as_str(),
            local: view.local.to_string(),
            remote: view.remote.to_string(),
            netns: view.netns.to_string(),
            pod: pod.map(|p| p.pod.clone()).unwrap_or_default(),
            namespace: pod.map(|p| p.namespace.clone()).unwrap_or_default(),
            container: pod.map(|p| p.container.clone()).unwrap_or_default(),
        }
    }
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

/// First-seen bounded `remote` label values.
#[derive(Debug)]
struct RemoteLabeler {
    max: usize,
    known: HashMap<SocketAddr, RemoteSeries>,
    other: Option<RemoteSeries>,
}

/// Live values for [`Metrics::render`], computed from the engine at `now`.
#[derive(Clone, Debug, Default)]
pub struct LiveView {
    pub gauges: Gauges,
    /// The most urgent stalled flows first (as [`crate::engine::Engine::stalls`]
    /// returns them), with the owning pod when known. Only the first
    /// `top_k_flows` are exported.
    pub top: Vec<(StallView, Option<PodIdentity>)>,
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
    decode_errors: Counter,
    flows_tracked: Gauge,
    flow_evictions: Counter,
    programs: ProgramCounters,
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
    /// Builds the registry. `probes`: the loader's plan (one
    /// `tcpstall_probe_attached` series per probe and mechanism tried).
    pub fn new(cfg: &MetricsConfig, probes: &[ProbeStatus]) -> Self {
        let mut registry = Registry::default();

        let retransmits = Family::<RetransmitLabels, Counter>::default();
        registry.register(
            "tcpstall_retransmits",
            "TCP segments retransmitted, by remote endpoint ip:port and cause (rto: retransmission timeout, tlp: tail loss probe, fast: fast retransmit or recovery, syn: SYN or SYN-ACK, unknown: no socket state at the event); the first max_remote_labels remotes seen get their own label value, later ones are counted under the value other",
            retransmits.clone(),
        );
        let rto_expirations = Family::<RemoteLabels, Counter>::default();
        registry.register(
            "tcpstall_rto_expirations",
            "Retransmission timer (RTO) expiries, by remote endpoint ip:port (bounded as tcpstall_retransmits_total)",
            rto_expirations.clone(),
        );
        let timeouts = Counter::default();
        registry.register(
            "tcpstall_timeouts",
            "Sockets the kernel killed on their write timeout (ETIMEDOUT after retransmissions or zero-window probes went unanswered)",
            timeouts.clone(),
        );
        let stalled_sockets = Family::<ClassLabels, Gauge>::default();
        registry.register(
            "tcpstall_stalled_sockets",
            "Sockets stalled now, by class: retransmit (consecutive RTOs without ACK progress), zero_window (peer window closed), close_wait (peer closed, application did not); every stalled socket counts once under its primary class",
            stalled_sockets.clone(),
        );
        for c in StallClass::ALL {
            stalled_sockets
                .get_or_create(&ClassLabels { class: c.as_str() })
                .set(0);
        }
        let sockets_near_timeout = Gauge::default();
        registry.register(
            "tcpstall_sockets_near_timeout",
            "Stalled sockets whose predicted ETIMEDOUT is within --near-horizon-secs or that have consumed --near-horizon-fraction of their timeout budget",
            sockets_near_timeout.clone(),
        );
        let stall_duration: HistogramFamily<OutcomeLabels> =
            Family::new_with_constructor(stall_duration_histogram);
        registry.register(
            "tcpstall_stall_duration_seconds",
            "Duration of retransmission stalls (streaks that reached the retransmit class) in seconds, by how they ended: recovered, timed_out, closed",
            stall_duration.clone(),
        );
        let stall_duration_by_outcome = StreakOutcome::ALL.map(|o| {
            stall_duration.get_or_create_owned(&OutcomeLabels {
                outcome: o.as_str(),
            })
        });
        let prediction_error = Histogram::new(PREDICTION_ERROR_BUCKETS);
        registry.register(
            "tcpstall_timeout_prediction_error_seconds",
            "Absolute difference in seconds between the kernel's actual ETIMEDOUT and the last prediction made before it",
            prediction_error.clone(),
        );
        let socket_seconds_to_timeout = Family::<FlowLabels, FloatGauge>::default();
        registry.register(
            "tcpstall_socket_seconds_to_timeout",
            "Seconds until the kernel is predicted to kill this socket with ETIMEDOUT (negative when overdue); only for the top-K most urgent stalled flows with a prediction",
            socket_seconds_to_timeout.clone(),
        );
        let socket_unacked_age = Family::<FlowLabels, FloatGauge>::default();
        registry.register(
            "tcpstall_socket_unacked_age_seconds",
            "Seconds since the first unacknowledged retransmission of this socket (now - retrans_stamp, the kernel's clock for the timeout); only for the top-K most urgent stalled flows",
            socket_unacked_age.clone(),
        );
        let socket_stall_seconds = Family::<FlowLabels, FloatGauge>::default();
        registry.register(
            "tcpstall_socket_stall_seconds",
            "Seconds this socket has been stalled in its class; only for the top-K most urgent stalled flows",
            socket_stall_seconds.clone(),
        );
        let incident_sockets = Family::<IncidentLabels, Gauge>::default();
        registry.register(
            "tcpstall_incident_stalled_sockets",
            "Stalled sockets now, grouped by class, owning pod (namespace, pod; empty when unknown) and remote endpoint; counts every stalled socket, not only the top-K; at most --max-incidents groups per node, the rest summed per class under the remote value other",
            incident_sockets.clone(),
        );
        let incident_oldest_stall = Family::<IncidentLabels, FloatGauge>::default();
        registry.register(
            "tcpstall_incident_oldest_stall_seconds",
            "Longest time in seconds any socket of the group (as tcpstall_incident_stalled_sockets) has been stalled in its class",
            incident_oldest_stall.clone(),
        );
        let incident_earliest_timeout = Family::<IncidentLabels, FloatGauge>::default();
        registry.register(
            "tcpstall_incident_earliest_timeout_seconds",
            "Seconds until the first predicted ETIMEDOUT among the sockets of the group (as tcpstall_incident_stalled_sockets; negative when overdue); absent when no socket of the group has a prediction",
            incident_earliest_timeout.clone(),
        );
        let process_cpu = FloatCounter::default();
        registry.register(
            "process_cpu_seconds",
            "User and system CPU time spent by the agent process, in seconds",
            process_cpu.clone(),
        );
        let process_resident = Gauge::default();
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the agent process in bytes (BPF maps are not included: they are charged to the container's memory cgroup)",
            process_resident.clone(),
        );
        let events = Family::<KindLabels, Counter>::default();
        registry.register(
            "tcpstall_events",
            "Kernel events received from the ring buffer, by kind: retransmit, write_timer, state, error_report, ack",
            events.clone(),
        );
        let events_by_kind =
            EventKind::ALL.map(|k| events.get_or_create_owned(&KindLabels { kind: k.as_str() }));
        let event_delivery = Histogram::new(EVENT_DELIVERY_BUCKETS);
        registry.register(
            "tcpstall_event_delivery_seconds",
            "Delay in seconds from a kernel event (its CLOCK_MONOTONIC timestamp) to the agent reading it from the ring buffer; the reader polls every 10 ms unless the ring is an eighth full",
            event_delivery.clone(),
        );
        let ringbuf_dropped = Counter::default();
        registry.register(
            "tcpstall_ringbuf_dropped_events",
            "Kernel events lost because the ring buffer was full (raise --ringbuf-bytes)",
            ringbuf_dropped.clone(),
        );
        let decode_errors = Counter::default();
        registry.register(
            "tcpstall_decode_errors",
            "Ring-buffer records that could not be decoded (agent and kernel programs from different builds)",
            decode_errors.clone(),
        );
        let probe_attached = Family::<ProbeLabels, Gauge>::default();
        registry.register(
            "tcpstall_probe_attached",
            "1 for the attach mechanism in use for each probe, 0 for the other mechanisms tried",
            probe_attached.clone(),
        );
        // A probe the operator turned off has no series: it is not "detached".
        for p in probes.iter().filter(|p| p.disabled.is_none()) {
            let mut mechanisms: BTreeSet<&'static str> = BTreeSet::new();
            for a in &p.attempts {
                mechanisms.insert(a.mechanism.as_str());
            }
            if let Some(m) = p.chosen {
                mechanisms.insert(m.as_str());
            }
            for m in mechanisms {
                let v = i64::from(p.chosen.is_some_and(|c| c.as_str() == m));
                probe_attached
                    .get_or_create(&ProbeLabels {
                        probe: p.probe.to_owned(),
                        mechanism: m.to_owned(),
                    })
                    .set(v);
            }
        }
        let features = Family::<FeatureLabels, Gauge>::default();
        registry.register(
            "tcpstall_feature",
            "1 for the state each agent feature is in (state: on; off_config, turned off by a flag; off_kernel, the kernel offers no socket sweep or refused every sweep program), 0 for the other states; feature: sweep, startup_reconcile, repair_after_loss, risk_audit",
            features.clone(),
        );
        let programs = ProgramCounters::default();
        registry.register(
            "tcpstall_probe_missed_runs",
            "Runs of an attached kernel program that the kernel skipped because the program was already running on that CPU (bpf recursion_misses); the events of those runs are lost",
            programs.missed.clone(),
        );
        registry.register(
            "tcpstall_probe_runs",
            "Runs of each attached kernel program; counted only while BPF run-time statistics are on (tcpstall run --program-stats, or kernel.bpf_stats_enabled)",
            programs.runs.clone(),
        );
        registry.register(
            "tcpstall_probe_run_seconds",
            "CPU time spent in each attached kernel program; counted only while BPF run-time statistics are on (tcpstall run --program-stats, or kernel.bpf_stats_enabled)",
            programs.run_seconds.clone(),
        );
        for p in probes.iter().filter(|p| p.disabled.is_none()) {
            for a in p.attempts.iter().filter(|a| a.error.is_none()) {
                let l = ProgramLabels {
                    program: a.program.to_owned(),
                };
                // Zero-valued series from the start.
                drop(programs.missed.get_or_create(&l));
                drop(programs.runs.get_or_create(&l));
                drop(programs.run_seconds.get_or_create(&l));
            }
        }
        let flows_tracked = Gauge::default();
        registry.register(
            "tcpstall_flows_tracked",
            "Flows in the agent's flow table (bounded by --max-flows)",
            flows_tracked.clone(),
        );
        let flow_evictions = Counter::default();
        registry.register(
            "tcpstall_flow_evictions",
            "Flows dropped from the full flow table (least recently used first)",
            flow_evictions.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        registry.register(
            "tcpstall_build_info",
            "Always 1; the agent version and the kernel release it runs on",
            build_info.clone(),
        );
        build_info
            .get_or_create(&BuildLabels {
                version: cfg.version.clone(),
                kernel: cfg.kernel.clone(),
            })
            .set(1);

        let sweep = crate::sweep::SweepMetrics::register(&mut registry);
        Self {
            registry,
            top_k_flows: cfg.top_k_flows,
            retransmits,
            rto_expirations,
            remotes: Mutex::new(RemoteLabeler {
                max: cfg.max_remote_labels,
                known: HashMap::new(),
                other: None,
            }),
            timeouts,
            stalled_sockets,
            sockets_near_timeout,
            stall_duration_by_outcome,
            prediction_error,
            socket_seconds_to_timeout,
            socket_unacked_age,
            socket_stall_seconds,
            node: cfg.node.clone(),
            max_incidents: cfg.max_incidents,
            incident_sockets,
            incident_oldest_stall,
            incident_earliest_timeout,
            process_cpu,
            process_cpu_last: Mutex::new(0.0),
            process_resident,
            events_by_kind,
            event_delivery,
            ringbuf_dropped,
            decode_errors,
            flows_tracked,
            flow_evictions,
            programs,
            sweep,
            features,
            render_lock: Mutex::new(()),
        }
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

    pub fn ringbuf_dropped(&self, n: u64) {
        if n > 0 {
            self.ringbuf_dropped.inc_by(n);
        }
    }

    /// The counters of `remote`'s label value (its own, or `other`).
    fn remote_counters(&self, remote: SocketAddr) -> RemoteSeries {
        let mut r = lock(&self.remotes);
        if let Some(c) = r.known.get(&remote) {
            return c.clone();
        }
        if r.known.len() < r.max {
            let labels = RemoteLabels {
                remote: remote.to_string(),
            };
            let c = RemoteSeries {
                rto_expirations: self.rto_expirations.get_or_create_owned(&labels),
                label: labels.remote,
            };
            r.known.insert(remote, c.clone());
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
        match *o {
            Observation::Retransmit { remote, cause, .. } => {
                let label = self.remote_counters(remote).label;
                self.retransmits
                    .get_or_create(&RetransmitLabels {
                        remote: label,
                        cause: cause.as_str(),
                    })
                    .inc();
            }
            Observation::RtoExpiry { remote, .. } => {
                self.remote_counters(remote).rto_expirations.inc();
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
        for (view, pod) in live.top.iter().take(self.top_k_flows) {
            let labels = FlowLabels::of(view, pod.as_ref());
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
                namespace: i.key.namespace.clone(),
                pod: i.key.pod.clone(),
                remote: i.key.remote.clone(),
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

/// Converts `prometheus-client`'s OpenMetrics text into the classic
/// Prometheus text format (version 0.0.4):
/// - `# EOF` and `# UNIT` lines are dropped;
/// - counter families are announced under their sample name (`# TYPE
///   x_total counter`; OpenMetrics names the family `x`);
/// - `_created` samples of counters and histograms are dropped (none are
///   emitted today);
/// - types without a classic equivalent: `info`/`stateset` become `gauge`,
///   `gaugehistogram` `histogram`, `unknown` `untyped`;
/// - exemplars (` # {...}` after a sample) are stripped.
///
/// Label values and numbers are written the same way in both formats. HELP
/// texts contain no backslash, quote or newline, so their escaping agrees.
pub fn openmetrics_to_prometheus_text(om: &str) -> String {
    let mut types: HashMap<&str, &str> = HashMap::new();
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, ty)) = rest.split_once(' ')
        {
            types.insert(name, ty);
        }
    }
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = classic_family_name(name, types.get(name).copied());
            let _ = writeln!(out, "# HELP {name} {help}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let classic_ty = match ty {
                "counter" | "gauge" | "histogram" | "summary" => ty,
                "gaugehistogram" => "histogram",
                "info" | "stateset" => "gauge",
                _ => "untyped",
            };
            let _ = writeln!(
                out,
                "# TYPE {} {classic_ty}",
                classic_family_name(name, Some(ty))
            );
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        // A sample: strip an exemplar, drop `_created`.
        let sample = match line.find(" # ") {
            Some(i) => &line[..i],
            None => line,
        };
        let name_end = sample.find(['{', ' ']).unwrap_or(sample.len());
        if let Some(base) = sample[..name_end].strip_suffix("_created")
            && matches!(
                types.get(base).copied(),
                Some("counter" | "histogram" | "summary" | "gaugehistogram")
            )
        {
            continue;
        }
        out.push_str(sample);
        out.push('\n');
    }
    out
}

fn classic_family_name(name: &str, ty: Option<&str>) -> String {
    match ty {
        Some("counter") => format!("{name}_total"),
        Some("info") => format!("{name}_info"),
        _ => name.to_owned(),
    }
}

#[cfg(test)]
mod tests;
