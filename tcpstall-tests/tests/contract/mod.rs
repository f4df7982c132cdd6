//! The metric contract: every series the agent exports, its type and its
//! labels. One copy, read by the deploy checks (rules, dashboard) and
//! compared with a live agent's `/metrics` (behaviour.rs), so it cannot
//! drift from what the agent really serves.
#![allow(dead_code)]

use std::collections::BTreeMap;

pub const FLOW_LABELS: &[&str] = &[
    "class",
    "cause",
    "local",
    "remote",
    "direction",
    "peer",
    "netns",
    "pod",
    "namespace",
    "container",
];

/// Labels of the incident series (every stalled socket, grouped).
pub const INCIDENT_LABELS: &[&str] = &[
    "node",
    "class",
    "cause",
    "namespace",
    "pod",
    "remote",
    "direction",
];

/// Labels attached at scrape time (job/instance by Prometheus, node/agent_pod
/// by the ServiceMonitor relabelings; `cluster` as an external or target label
/// of a multi-cluster setup, kept by every aggregation of the rules).
pub const TARGET_LABELS: &[&str] = &["job", "instance", "node", "agent_pod", "cluster"];

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// name -> (type, labels)
pub fn contract() -> BTreeMap<&'static str, (Kind, Vec<&'static str>)> {
    use Kind::*;
    let mut m = BTreeMap::new();
    m.insert(
        "tcpstall_retransmits_total",
        (Counter, vec!["remote", "cause"]),
    );
    m.insert("tcpstall_rto_expirations_total", (Counter, vec!["remote"]));
    m.insert("tcpstall_timeouts_total", (Counter, vec![]));
    m.insert("tcpstall_stall_resets_total", (Counter, vec!["cause"]));
    m.insert("tcpstall_drop_filter_errors_total", (Counter, vec![]));
    m.insert("tcpstall_drop_probe_attached", (Gauge, vec![]));
    m.insert("tcpstall_drop_probe_attaches_total", (Counter, vec![]));
    m.insert("tcpstall_drop_probe_attach_errors_total", (Counter, vec![]));
    m.insert("tcpstall_stalled_sockets", (Gauge, vec!["class"]));
    m.insert("tcpstall_sockets_near_timeout", (Gauge, vec![]));
    m.insert(
        "tcpstall_stall_duration_seconds",
        (Histogram, vec!["outcome"]),
    );
    m.insert(
        "tcpstall_timeout_prediction_error_seconds",
        (Histogram, vec![]),
    );
    m.insert(
        "tcpstall_socket_seconds_to_timeout",
        (Gauge, FLOW_LABELS.to_vec()),
    );
    m.insert(
        "tcpstall_socket_unacked_age_seconds",
        (Gauge, FLOW_LABELS.to_vec()),
    );
    m.insert(
        "tcpstall_socket_stall_seconds",
        (Gauge, FLOW_LABELS.to_vec()),
    );
    m.insert(
        "tcpstall_incident_stalled_sockets",
        (Gauge, INCIDENT_LABELS.to_vec()),
    );
    m.insert(
        "tcpstall_incident_oldest_stall_seconds",
        (Gauge, INCIDENT_LABELS.to_vec()),
    );
    m.insert(
        "tcpstall_incident_earliest_timeout_seconds",
        (Gauge, INCIDENT_LABELS.to_vec()),
    );
    // The socket sweep (safety net and hang-forever audit).
    m.insert("tcpstall_sweeps_total", (Counter, vec!["reason"]));
    m.insert("tcpstall_sweep_failures_total", (Counter, vec![]));
    m.insert("tcpstall_sweep_hold_overflows_total", (Counter, vec![]));
    m.insert("tcpstall_sweep_duration_seconds", (Histogram, vec![]));
    m.insert("tcpstall_sweep_sockets_visited_total", (Counter, vec![]));
    m.insert("tcpstall_sweep_tcp_sockets", (Gauge, vec![]));
    m.insert("tcpstall_sweep_interval_seconds", (Gauge, vec![]));
    m.insert(
        "tcpstall_sockets_without_timeout",
        (Gauge, vec!["namespace", "pod"]),
    );
    m.insert(
        "tcpstall_guard_sockets_total",
        (Counter, vec!["namespace", "rule", "action", "mode"]),
    );
    m.insert("tcpstall_guard_reload_failures_total", (Counter, vec![]));
    m.insert("process_cpu_seconds_total", (Counter, vec![]));
    m.insert("process_resident_memory_bytes", (Gauge, vec![]));
    m.insert("tcpstall_events_total", (Counter, vec!["kind"]));
    m.insert("tcpstall_event_delivery_seconds", (Histogram, vec![]));
    m.insert("tcpstall_ringbuf_dropped_events_total", (Counter, vec![]));
    m.insert("tcpstall_decode_errors_total", (Counter, vec![]));
    m.insert(
        "tcpstall_probe_attached",
        (Gauge, vec!["probe", "mechanism"]),
    );
    m.insert("tcpstall_feature", (Gauge, vec!["feature", "state"]));
    m.insert(
        "tcpstall_probe_missed_runs_total",
        (Counter, vec!["program"]),
    );
    m.insert("tcpstall_probe_runs_total", (Counter, vec!["program"]));
    m.insert(
        "tcpstall_probe_run_seconds_total",
        (Counter, vec!["program"]),
    );
    m.insert("tcpstall_flows_tracked", (Gauge, vec![]));
    m.insert("tcpstall_flow_evictions_total", (Counter, vec![]));
    m.insert("tcpstall_event_loop_heartbeat_age_seconds", (Gauge, vec![]));
    m.insert("tcpstall_build_info", (Gauge, vec!["version", "kernel"]));
    m
}
