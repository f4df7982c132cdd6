//! [`Metrics::new`]: every metric family of the contract registered, with
//! its name, help and labels, and the series known at start-up set.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Mutex,
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use super::{
    BuildLabels, CauseLabels, ClassLabels, EVENT_DELIVERY_BUCKETS, FeatureLabels, FloatCounter,
    FloatGauge, FlowLabels, GuardLabels, HistogramFamily, IncidentLabels, KindLabels, Metrics,
    MetricsConfig, OutcomeLabels, PREDICTION_ERROR_BUCKETS, ProbeLabels, ProgramCounters,
    ProgramLabels, RemoteLabeler, RemoteLabels, RetransmitLabels, stall_duration_histogram,
};
use crate::{
    engine::{StallClass, StreakOutcome},
    kernel::{event::EventKind, loader::ProbeStatus},
};

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
            "Stalled sockets now, grouped by class, cause (peer_silent, unreachable, local_drop, pmtu_blackhole, peer_not_reading, app_not_closing, peer_not_closing, unknown: whose problem it is), owning pod (namespace, pod; empty when unknown) and remote endpoint; counts every stalled socket, not only the top-K; at most --max-incidents groups per node, the rest summed per class and cause under the remote value other",
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
            "Kernel events received from the ring buffer, by kind: retransmit, write_timer, state, error_report, ack, drop, retransmit_error, keepalive_timer, tw_timer_start, tw_timer_expire",
            events.clone(),
        );
        let events_by_kind =
            EventKind::ALL.map(|k| events.get_or_create_owned(&KindLabels { kind: k.as_str() }));
        let event_delivery = Histogram::new(EVENT_DELIVERY_BUCKETS);
        registry.register(
            "tcpstall_event_delivery_seconds",
            "Delay in seconds from a kernel event (its CLOCK_MONOTONIC timestamp) to the agent reading it from the ring buffer: woken by the first record on a quiet ring, polled every 10 ms while events keep coming (a ring an eighth full wakes it at once)",
            event_delivery.clone(),
        );
        let ringbuf_dropped = Counter::default();
        registry.register(
            "tcpstall_ringbuf_dropped_events",
            "Kernel events lost because the ring buffer was full (raise --ringbuf-bytes)",
            ringbuf_dropped.clone(),
        );
        let stall_resets = Family::<CauseLabels, Counter>::default();
        for c in crate::engine::StallCause::ALL {
            drop(stall_resets.get_or_create(&CauseLabels { cause: c.as_str() }));
        }
        registry.register(
            "tcpstall_stall_resets",
            "Stalled sockets ended by an RST (the peer restarted, or a middlebox lost the connection's state: cause reset), by the cause the stall had until then; the socket leaves /api/v1/stalls at once",
            stall_resets.clone(),
        );
        let episode_filter_errors = Counter::default();
        registry.register(
            "tcpstall_drop_filter_errors",
            "Failed updates of the drop probe's in-kernel socket filter (sockets in a loss episode): drops of those sockets are not seen, their cause may read peer_silent",
            episode_filter_errors.clone(),
        );
        let drop_probe_attached = Gauge::default();
        registry.register(
            "tcpstall_drop_probe_attached",
            "1 while the drop probe (kfree_skb) is attached: only while some flow is in a loss episode, and until 30 s after the last one ended; 0 otherwise (it then costs nothing)",
            drop_probe_attached.clone(),
        );
        let drop_probe_attaches = Counter::default();
        registry.register(
            "tcpstall_drop_probe_attaches",
            "Times the drop probe was attached on demand (a loss episode began on a node with none)",
            drop_probe_attaches.clone(),
        );
        let drop_probe_attach_errors = Counter::default();
        registry.register(
            "tcpstall_drop_probe_attach_errors",
            "Failed attaches of the drop probe (retried after 5 s): meanwhile drops of sockets in a loss episode are not seen, their cause may read peer_silent",
            drop_probe_attach_errors.clone(),
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
        let heartbeat_age = FloatGauge::default();
        registry.register(
            "tcpstall_event_loop_heartbeat_age_seconds",
            "Seconds since the event loop last made progress (drained the ring buffer or ran its once-a-second tick, which it does on an idle node too); /healthz fails above --liveness-timeout",
            heartbeat_age.clone(),
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

        let guard_sockets = Family::<GuardLabels, Counter>::default();
        registry.register(
            "tcpstall_guard_sockets",
            "Sockets the guard acted on at establishment, by the pod's namespace (empty for non-pod cgroups), policy rule, action (user_timeout, keepalive: set, or in dry-run would be set; kept_user_timeout, kept_keepalive: the application had its own value, left as is; failed: bpf_setsockopt refused) and mode (dry-run, enforce); a socket counts once per action",
            guard_sockets.clone(),
        );
        let guard_reload_failures = Counter::default();
        registry.register(
            "tcpstall_guard_reload_failures",
            "Guard policy reloads refused (invalid file): the last good policy stays in force; the log line names the line",
            guard_reload_failures.clone(),
        );
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
            episode_filter_errors,
            drop_probe_attached,
            drop_probe_attaches,
            drop_probe_attach_errors,
            stall_resets,
            decode_errors,
            flows_tracked,
            flow_evictions,
            heartbeat_age,
            programs,
            guard_sockets,
            guard_reload_failures,
            sweep,
            features,
            render_lock: Mutex::new(()),
        }
    }
}
