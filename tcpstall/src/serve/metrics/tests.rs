//! Unit tests of the metric contract: names, labels, values and the encodings.

use std::collections::BTreeSet;

use super::*;
use crate::engine::cause::RetransmitCause;
use crate::engine::{BoundarySource, FlowHistory, StallClass, StalledCounts, TimeoutEvidence};
use crate::kernel::event::{Mechanism, TcpState};
use crate::kernel::loader::{Attempt, ProbeStatus};

fn cfg(max_remote_labels: usize, top_k_flows: usize) -> MetricsConfig {
    MetricsConfig {
        max_remote_labels,
        top_k_flows,
        version: "0.1.0".into(),
        kernel: "6.1.0-test".into(),
        node: "node-a".into(),
        max_incidents: 100,
    }
}

fn plan() -> Vec<ProbeStatus> {
    let attempt = |m: Mechanism, error: Option<&str>| Attempt {
        mechanism: m,
        target: "t".into(),
        program: "p",
        error: error.map(str::to_owned),
    };
    vec![
        ProbeStatus {
            probe: "retransmit",
            required: true,
            disabled: None,
            chosen: Some(Mechanism::TpBtf),
            program: None,
            // Two tp_btf variants: one series.
            attempts: vec![
                attempt(Mechanism::TpBtf, None),
                attempt(Mechanism::TpBtf, Some("not tried")),
            ],
        },
        ProbeStatus {
            probe: "write_timer",
            required: true,
            disabled: None,
            chosen: Some(Mechanism::TimerTracepoint),
            program: None,
            attempts: vec![
                attempt(Mechanism::Fentry, Some("load failed")),
                attempt(Mechanism::Kprobe, Some("no PMU")),
                attempt(Mechanism::TimerTracepoint, None),
                attempt(Mechanism::SockOps, Some("not tried")),
            ],
        },
        ProbeStatus {
            probe: "error_report",
            required: false,
            disabled: None,
            chosen: None,
            program: None,
            attempts: vec![attempt(Mechanism::TpBtf, Some("missing"))],
        },
        // Turned off by the operator: no series (the 6 above are all).
        ProbeStatus {
            probe: "ack",
            required: false,
            disabled: Some("--no-ack-probe"),
            chosen: None,
            program: None,
            attempts: vec![attempt(Mechanism::TpBtf, Some("disabled: --no-ack-probe"))],
        },
    ]
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn view(class: StallClass, local: &str, remote: &str, to: Option<f64>) -> StallView {
    StallView {
        class,
        since_ns: 1_000,
        stalled_for_s: 7.5,
        cookie: 42,
        local: addr(local),
        remote: addr(remote),
        netns: 4_026_532_000,
        cgroup_id: 0,
        state: TcpState::Established,
        retransmits: 4,
        rto_streak: 5,
        backoff: 4,
        rto_ms: 3_200,
        packets_out: 1,
        total_retrans: 5,
        unacked_age_s: to.map(|_| 6.25),
        boundary_s: to.map(|_| 12.6),
        boundary_source: to.map(|_| BoundarySource::Retries2(5)),
        predicted_timeout_ns: to.map(|_| 99),
        seconds_to_timeout: to,
        horizon_fraction: None,
        near_horizon: to.is_some(),
        zero_window_probes: None,
        zero_window_unanswered: None,
        no_prediction_reason: None,
        zero_window_s: None,
        close_wait_age_s: None,
        orphan: false,
        user_timeout_ms: None,
        last_event_age_s: 0.5,
        history: FlowHistory::default(),
        retransmits_by_cause: Default::default(),
        cause: crate::engine::StallCause::PeerSilent,
        cause_evidence: Default::default(),
    }
}

/// Value of the one sample line starting with `series` (exact name and
/// labels as encoded).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn lines_of<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.split(['{', ' ']).next() == Some(name))
        .collect()
}

#[test]
fn contract_names_types_and_help() {
    let m = Metrics::new(&cfg(100, 50), &plan());
    // Families without any series are not encoded at all.
    let text = m.render(&LiveView::default(), Format::OpenMetrics).unwrap();
    for absent in [
        "tcpstall_retransmits",
        "tcpstall_rto_expirations",
        "tcpstall_socket_seconds_to_timeout",
    ] {
        assert!(!text.contains(&format!("# TYPE {absent} ")), "{text}");
    }
    let r = addr("10.0.0.2:8080");
    m.observe(&Observation::Retransmit {
        remote: r,
        rto: true,
        cause: RetransmitCause::Rto,
    });
    m.observe(&Observation::RtoExpiry { remote: r, rtos: 1 });
    let live = LiveView {
        gauges: Gauges::default(),
        top: vec![(
            view(
                StallClass::Retransmit,
                "10.0.0.1:40000",
                "10.0.0.2:8080",
                Some(3.0),
            ),
            None,
            Direction::Initiated,
        )],
        incidents: vec![crate::serve::incidents::Incident {
            key: crate::serve::incidents::IncidentKey {
                class: StallClass::Retransmit,
                cause: crate::engine::StallCause::PeerSilent,
                namespace: "shop".into(),
                pod: "orders-1".into(),
                remote: "10.0.0.2:8080".into(),
                direction: Some(Direction::Initiated),
            },
            sockets: 50,
            oldest_stall_s: 12.5,
            earliest_timeout_s: Some(3.0),
        }],
    };
    let text = m.render(&live, Format::OpenMetrics).unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    let incident = "{node=\"node-a\",class=\"retransmit\",cause=\"peer_silent\",namespace=\"shop\",pod=\"orders-1\",remote=\"10.0.0.2:8080\",direction=\"initiated\"}";
    assert_eq!(
        sample(
            &text,
            &format!("tcpstall_incident_stalled_sockets{incident}")
        ),
        Some(50.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!("tcpstall_incident_oldest_stall_seconds{incident}")
        ),
        Some(12.5),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!("tcpstall_incident_earliest_timeout_seconds{incident}")
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(sample(&text, "process_cpu_seconds_total"), Some(0.0));
    // The CPU counter follows the process' total, never backwards.
    let p = |cpu_seconds, resident_bytes| crate::serve::self_stats::ProcessSample {
        cpu_seconds,
        resident_bytes,
    };
    m.process(&p(2.5, 4096));
    m.process(&p(2.0, 8192));
    m.process(&p(3.25, 8192));
    // A family with labels has no series (and no TYPE line) until one is
    // counted.
    m.guard_socket("shop", "shop-30s", "user_timeout", "enforce");
    let text = m.render(&live, Format::OpenMetrics).unwrap();
    assert_eq!(
        sample(
            &text,
            "tcpstall_guard_sockets_total{namespace=\"shop\",rule=\"shop-30s\",action=\"user_timeout\",mode=\"enforce\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "process_cpu_seconds_total"), Some(3.25));
    assert_eq!(sample(&text, "process_resident_memory_bytes"), Some(8192.0));
    let expected = [
        ("tcpstall_retransmits", "counter"),
        ("tcpstall_rto_expirations", "counter"),
        ("tcpstall_timeouts", "counter"),
        ("tcpstall_stall_resets", "counter"),
        ("tcpstall_stalled_sockets", "gauge"),
        ("tcpstall_sockets_near_timeout", "gauge"),
        ("tcpstall_stall_duration_seconds", "histogram"),
        ("tcpstall_timeout_prediction_error_seconds", "histogram"),
        ("tcpstall_socket_seconds_to_timeout", "gauge"),
        ("tcpstall_socket_unacked_age_seconds", "gauge"),
        ("tcpstall_socket_stall_seconds", "gauge"),
        ("tcpstall_incident_stalled_sockets", "gauge"),
        ("tcpstall_incident_oldest_stall_seconds", "gauge"),
        ("tcpstall_incident_earliest_timeout_seconds", "gauge"),
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("tcpstall_events", "counter"),
        ("tcpstall_event_delivery_seconds", "histogram"),
        ("tcpstall_ringbuf_dropped_events", "counter"),
        ("tcpstall_drop_filter_errors", "counter"),
        ("tcpstall_drop_probe_attached", "gauge"),
        ("tcpstall_drop_probe_attaches", "counter"),
        ("tcpstall_drop_probe_attach_errors", "counter"),
        ("tcpstall_decode_errors", "counter"),
        ("tcpstall_probe_attached", "gauge"),
        ("tcpstall_probe_missed_runs", "counter"),
        ("tcpstall_probe_runs", "counter"),
        ("tcpstall_probe_run_seconds", "counter"),
        ("tcpstall_flows_tracked", "gauge"),
        ("tcpstall_flow_evictions", "counter"),
        ("tcpstall_event_loop_heartbeat_age_seconds", "gauge"),
        ("tcpstall_build_info", "gauge"),
        ("tcpstall_sweeps", "counter"),
        ("tcpstall_sweep_failures", "counter"),
        ("tcpstall_sweep_hold_overflows", "counter"),
        ("tcpstall_sweep_duration_seconds", "histogram"),
        ("tcpstall_sweep_sockets_visited", "counter"),
        ("tcpstall_sweep_tcp_sockets", "gauge"),
        ("tcpstall_sweep_interval_seconds", "gauge"),
        ("tcpstall_sockets_without_timeout", "gauge"),
        ("tcpstall_guard_sockets", "counter"),
        ("tcpstall_guard_reload_failures", "counter"),
    ];
    let types: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' '))
        .collect();
    assert_eq!(types.len(), expected.len(), "{types:?}");
    for e in expected {
        assert!(types.contains(&e), "missing {e:?} in {types:?}");
        let help = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("# HELP ")?
                    .strip_prefix(e.0)?
                    .strip_prefix(' ')
            })
            .unwrap_or_else(|| panic!("no HELP for {}", e.0));
        assert!(help.len() > 20, "HELP of {} too short: {help}", e.0);
        assert!(
            !help.contains(['"', '\\']),
            "HELP of {} needs escaping",
            e.0
        );
    }
    // Zero-valued series exist from the start for the closed label sets.
    for c in ["retransmit", "zero_window", "close_wait"] {
        assert_eq!(
            sample(&text, &format!("tcpstall_stalled_sockets{{class=\"{c}\"}}")),
            Some(0.0)
        );
    }
    for k in [
        "retransmit",
        "write_timer",
        "state",
        "error_report",
        "ack",
        "drop",
        "retransmit_error",
    ] {
        assert_eq!(
            sample(&text, &format!("tcpstall_events_total{{kind=\"{k}\"}}")),
            Some(0.0)
        );
    }
    for o in ["recovered", "timed_out", "closed"] {
        assert_eq!(
            sample(
                &text,
                &format!("tcpstall_stall_duration_seconds_count{{outcome=\"{o}\"}}")
            ),
            Some(0.0)
        );
    }
    assert_eq!(sample(&text, "tcpstall_timeouts_total"), Some(0.0));
    assert_eq!(
        sample(&text, "tcpstall_ringbuf_dropped_events_total"),
        Some(0.0)
    );
    assert_eq!(sample(&text, "tcpstall_decode_errors_total"), Some(0.0));
    assert_eq!(sample(&text, "tcpstall_flow_evictions_total"), Some(0.0));
    assert_eq!(
        sample(
            &text,
            "tcpstall_build_info{version=\"0.1.0\",kernel=\"6.1.0-test\"}"
        ),
        Some(1.0)
    );
    assert_eq!(lines_of(&text, "tcpstall_events_total").len(), 10);
    assert_eq!(
        lines_of(&text, "tcpstall_stall_duration_seconds_count").len(),
        3
    );
    assert_eq!(lines_of(&text, "tcpstall_probe_attached").len(), 6);
    assert_eq!(lines_of(&text, "tcpstall_build_info").len(), 1);
}

#[test]
fn probe_attached_one_for_chosen_zero_for_others() {
    let m = Metrics::new(&cfg(100, 50), &plan());
    let text = m.render(&LiveView::default(), Format::OpenMetrics).unwrap();
    let v = |p: &str, mech: &str| {
        sample(
            &text,
            &format!("tcpstall_probe_attached{{probe=\"{p}\",mechanism=\"{mech}\"}}"),
        )
    };
    assert_eq!(v("retransmit", "tp_btf"), Some(1.0));
    assert_eq!(lines_of(&text, "tcpstall_probe_attached").len(), 6);
    assert_eq!(v("write_timer", "timer_tracepoint"), Some(1.0));
    assert_eq!(v("write_timer", "fentry"), Some(0.0));
    assert_eq!(v("write_timer", "kprobe"), Some(0.0));
    assert_eq!(v("write_timer", "sock_ops"), Some(0.0));
    assert_eq!(v("error_report", "tp_btf"), Some(0.0));
}

#[test]
fn program_runtime_advances_by_the_kernel_totals_difference() {
    let m = Metrics::new(&cfg(100, 50), &plan());
    let text = m.render(&LiveView::default(), Format::OpenMetrics).unwrap();
    // One series per attached program (the plan attaches "p" for three
    // probes: same program name, one series), zero from the start.
    assert_eq!(
        sample(&text, "tcpstall_probe_missed_runs_total{program=\"p\"}"),
        Some(0.0)
    );
    let at = |runs, ns, missed| ProgramRuntime {
        program: "p",
        run_count: runs,
        run_time_ns: ns,
        recursion_misses: missed,
    };
    m.program_runtime(&[at(10, 2_000, 1)]);
    m.program_runtime(&[at(30, 5_000, 1)]);
    m.program_runtime(&[at(30, 5_000, 3)]);
    let text = m.render(&LiveView::default(), Format::OpenMetrics).unwrap();
    assert_eq!(
        sample(&text, "tcpstall_probe_runs_total{program=\"p\"}"),
        Some(30.0)
    );
    assert_eq!(
        sample(&text, "tcpstall_probe_missed_runs_total{program=\"p\"}"),
        Some(3.0)
    );
    let secs = sample(&text, "tcpstall_probe_run_seconds_total{program=\"p\"}").unwrap();
    assert!((secs - 5e-6).abs() < 1e-12, "{secs}");
    // A total that went down (program reloaded) counts from zero.
    m.program_runtime(&[at(4, 5_000, 3)]);
    let text = m.render(&LiveView::default(), Format::OpenMetrics).unwrap();
    assert_eq!(
        sample(&text, "tcpstall_probe_runs_total{program=\"p\"}"),
        Some(34.0)
    );
}

#[test]
fn observations_feed_counters_and_histograms() {
    let m = Metrics::new(&cfg(100, 50), &plan());
    let r = addr("10.0.0.2:8080");
    m.event(EventKind::Retransmit);
    m.event(EventKind::Retransmit);
    m.event(EventKind::ErrorReport);
    m.decode_error();
    m.ringbuf_dropped(3);
    m.ringbuf_dropped(0);
    for o in [
        Observation::Retransmit {
            remote: r,
            rto: true,
            cause: RetransmitCause::Rto,
        },
        Observation::Retransmit {
            remote: r,
            rto: false,
            cause: RetransmitCause::Fast,
        },
        Observation::RtoExpiry { remote: r, rtos: 1 },
        Observation::StreakEnded {
            remote: r,
            outcome: StreakOutcome::TimedOut,
            duration_s: 12.9,
            rtos: 6,
            stalled: true,
            cookie: 1,
            mss_lowered: None,
        },
        // Not stalled (a recovered loss probe): not a stall duration.
        Observation::StreakEnded {
            remote: r,
            outcome: StreakOutcome::Recovered,
            duration_s: 0.2,
            rtos: 0,
            stalled: false,
            cookie: 1,
            mss_lowered: None,
        },
        Observation::Timeout {
            cookie: 1,
            remote: r,
            evidence: TimeoutEvidence::Etimedout,
            actual_ns: 10,
            predicted_ns: Some(11),
            prediction_error_s: Some(-0.3),
            first_prediction_error_s: None,
            lead_time_s: None,
            boundary_s: Some(12.6),
            boundary_source: Some(BoundarySource::Retries2(5)),
        },
        Observation::FlowEvicted {
            netns: 1,
            local: r,
            remote: r,
            active: false,
        },
        Observation::StallStarted {
            class: StallClass::Retransmit,
            cookie: 1,
            remote: r,
        },
    ] {
        m.observe(&o);
    }
    let text = m.render(&LiveView::default(), Format::OpenMetrics).unwrap();
    let lbl = "{remote=\"10.0.0.2:8080\"}";
    // One per cause: the `cause` label splits them.
    for cause in ["rto", "fast"] {
        assert_eq!(
            sample(
                &text,
                &format!(
                    "tcpstall_retransmits_total{{remote=\"10.0.0.2:8080\",cause=\"{cause}\"}}"
                )
            ),
            Some(1.0),
            "{text}"
        );
    }
    assert_eq!(
        sample(&text, &format!("tcpstall_rto_expirations_total{lbl}")),
        Some(1.0)
    );
    assert_eq!(sample(&text, "tcpstall_timeouts_total"), Some(1.0));
    assert_eq!(sample(&text, "tcpstall_flow_evictions_total"), Some(1.0));
    assert_eq!(sample(&text, "tcpstall_decode_errors_total"), Some(1.0));
    assert_eq!(
        sample(&text, "tcpstall_ringbuf_dropped_events_total"),
        Some(3.0)
    );
    assert_eq!(
        sample(&text, "tcpstall_events_total{kind=\"retransmit\"}"),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "tcpstall_events_total{kind=\"error_report\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "tcpstall_stall_duration_seconds_count{outcome=\"timed_out\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "tcpstall_stall_duration_seconds_count{outcome=\"recovered\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "tcpstall_stall_duration_seconds_bucket{le=\"10.0\",outcome=\"timed_out\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "tcpstall_stall_duration_seconds_bucket{le=\"20.0\",outcome=\"timed_out\"}"
        ),
        Some(1.0)
    );
    // Absolute error.
    assert_eq!(
        sample(&text, "tcpstall_timeout_prediction_error_seconds_sum"),
        Some(0.3)
    );
    assert_eq!(
        sample(
            &text,
            "tcpstall_timeout_prediction_error_seconds_bucket{le=\"0.25\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "tcpstall_timeout_prediction_error_seconds_bucket{le=\"0.5\"}"
        ),
        Some(1.0)
    );
    assert_eq!(m.decode_errors(), 1);
    assert_eq!(m.ringbuf_dropped_total(), 3);
}

/// `remote` labels follow recent activity: a remote idle for
/// REMOTE_LABEL_IDLE gives its label (and its series) to a new one, while
/// busy remotes keep theirs and newcomers wait under `other`.
/// Mutation: the idle check `>= REMOTE_LABEL_IDLE` -> `>= Duration::MAX`
/// (first come, forever) -> fails at "E takes idle B's place".
#[test]
fn remote_labels_follow_recent_activity() {
    use std::time::{Duration, Instant};
    let m = Metrics::new(&cfg(3, 50), &plan());
    let rtx = |r: &str, at: Instant| {
        m.observe_at(
            &Observation::Retransmit {
                remote: addr(r),
                rto: true,
                cause: RetransmitCause::Rto,
            },
            at,
        )
    };
    let t0 = Instant::now();
    let later = |s: u64| t0 + Duration::from_secs(s);
    // A first, then B, then C (B is the least recently active of B and C).
    rtx("10.0.0.1:80", t0);
    rtx("10.0.0.2:80", t0);
    rtx("10.0.0.3:80", later(1));
    // Full, everyone active a minute ago: D waits under `other`.
    rtx("10.0.0.4:80", later(60));
    let series = |m: &Metrics| {
        let text = m.render(&LiveView::default(), Format::OpenMetrics).unwrap();
        lines_of(&text, "tcpstall_retransmits_total")
            .iter()
            .map(|l| l.split('"').nth(1).unwrap_or("").to_owned())
            .collect::<BTreeSet<String>>()
    };
    assert_eq!(
        series(&m),
        BTreeSet::from(["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "other"].map(String::from))
    );
    // Eleven minutes on, A is active again; B and C have been idle since t0.
    let t = REMOTE_LABEL_IDLE.as_secs() + 60;
    rtx("10.0.0.1:80", later(t));
    rtx("10.0.0.5:80", later(t));
    let s = series(&m);
    assert!(s.contains("10.0.0.5:80"), "E takes idle B's place: {s:?}");
    assert!(!s.contains("10.0.0.2:80"), "B's series removed: {s:?}");
    assert!(s.contains("10.0.0.1:80"), "A stays (active): {s:?}");
    rtx("10.0.0.6:80", later(t));
    // Now A, E, F are all fresh: G waits under `other`.
    rtx("10.0.0.7:80", later(t));
    assert_eq!(
        series(&m),
        BTreeSet::from(["10.0.0.1:80", "10.0.0.5:80", "10.0.0.6:80", "other"].map(String::from))
    );
    let text = m.render(&LiveView::default(), Format::OpenMetrics).unwrap();
    let rtos = lines_of(&text, "tcpstall_rto_expirations_total");
    assert!(rtos.len() <= 4, "{rtos:?}");
}

#[test]
fn remote_label_is_bounded_first_seen_then_other() {
    let m = Metrics::new(&cfg(3, 50), &plan());
    for i in 0..10u16 {
        let remote = SocketAddr::from(([10, 0, 0, 1 + i as u8], 9000));
        for _ in 0..=i {
            m.observe(&Observation::Retransmit {
                remote,
                rto: true,
                cause: RetransmitCause::Rto,
            });
        }
        m.observe(&Observation::RtoExpiry { remote, rtos: 1 });
    }
    // The first three again: still their own label.
    m.observe(&Observation::Retransmit {
        remote: addr("10.0.0.1:9000"),
        rto: true,
        cause: RetransmitCause::Rto,
    });
    let text = m.render(&LiveView::default(), Format::OpenMetrics).unwrap();
    let retrans = lines_of(&text, "tcpstall_retransmits_total");
    assert_eq!(retrans.len(), 4, "{retrans:?}");
    assert_eq!(
        sample(
            &text,
            "tcpstall_retransmits_total{remote=\"10.0.0.1:9000\",cause=\"rto\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            "tcpstall_retransmits_total{remote=\"10.0.0.3:9000\",cause=\"rto\"}"
        ),
        Some(3.0)
    );
    // 4..=10 retransmissions of remotes 4..10.
    assert_eq!(
        sample(
            &text,
            "tcpstall_retransmits_total{remote=\"other\",cause=\"rto\"}"
        ),
        Some((4..=10).sum::<u32>() as f64)
    );
    assert_eq!(
        sample(&text, "tcpstall_rto_expirations_total{remote=\"other\"}"),
        Some(7.0)
    );
    assert_eq!(lines_of(&text, "tcpstall_rto_expirations_total").len(), 4);
    // IPv6 remotes are labelled in their bracketed form.
    let m = Metrics::new(&cfg(3, 50), &plan());
    m.observe(&Observation::RtoExpiry {
        remote: addr("[fd00::2]:443"),
        rtos: 1,
    });
    let text = m.render(&LiveView::default(), Format::OpenMetrics).unwrap();
    assert_eq!(
        sample(
            &text,
            "tcpstall_rto_expirations_total{remote=\"[fd00::2]:443\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn per_flow_series_follow_the_top_k_set() {
    let m = Metrics::new(&cfg(100, 2), &plan());
    let pod = PodIdentity {
        pod: "web-1".into(),
        namespace: "shop".into(),
        pod_uid: "uid".into(),
        container: "0123456789ab".into(),
        ..Default::default()
    };
    let a = view(
        StallClass::Retransmit,
        "10.0.0.1:40000",
        "10.0.0.2:8080",
        Some(3.5),
    );
    let b = view(
        StallClass::Retransmit,
        "10.0.0.1:40001",
        "10.0.0.2:8080",
        Some(-0.25),
    );
    let c = view(
        StallClass::ZeroWindow,
        "10.0.0.1:40002",
        "10.0.0.3:80",
        None,
    );
    let live = LiveView {
        gauges: Gauges {
            stalled: StalledCounts {
                retransmit: 2,
                zero_window: 1,
                close_wait: 0,
                connect: 0,
                keepalive: 0,
                fin_wait2: 0,
            },
            near_timeout: 2,
            flows_tracked: 17,
        },
        top: vec![
            (b.clone(), None, Direction::Accepted),
            (a.clone(), Some(pod.clone()), Direction::Initiated),
            (c.clone(), None, Direction::Initiated),
        ],
        incidents: vec![],
    };
    let text = m.render(&live, Format::OpenMetrics).unwrap();
    let a_labels = "{class=\"retransmit\",cause=\"peer_silent\",local=\"10.0.0.1:40000\",remote=\"10.0.0.2:8080\",direction=\"initiated\",peer=\"10.0.0.2:8080\",netns=\"4026532000\",pod=\"web-1\",namespace=\"shop\",container=\"0123456789ab\"}";
    // `b` was accepted: its remote is the peer IP with our port.
    let b_labels = "{class=\"retransmit\",cause=\"peer_silent\",local=\"10.0.0.1:40001\",remote=\"10.0.0.2:40001\",direction=\"accepted\",peer=\"10.0.0.2:8080\",netns=\"4026532000\",pod=\"\",namespace=\"\",container=\"\"}";
    assert_eq!(
        sample(
            &text,
            &format!("tcpstall_socket_seconds_to_timeout{a_labels}")
        ),
        Some(3.5)
    );
    assert_eq!(
        sample(
            &text,
            &format!("tcpstall_socket_seconds_to_timeout{b_labels}")
        ),
        Some(-0.25)
    );
    assert_eq!(
        sample(
            &text,
            &format!("tcpstall_socket_unacked_age_seconds{a_labels}")
        ),
        Some(6.25)
    );
    assert_eq!(
        sample(&text, &format!("tcpstall_socket_stall_seconds{a_labels}")),
        Some(7.5)
    );
    // K = 2: the third flow has no series.
    assert!(!text.contains("10.0.0.1:40002"), "{text}");
    assert_eq!(lines_of(&text, "tcpstall_socket_stall_seconds").len(), 2);
    assert_eq!(
        sample(&text, "tcpstall_stalled_sockets{class=\"retransmit\"}"),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "tcpstall_stalled_sockets{class=\"zero_window\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&text, "tcpstall_sockets_near_timeout"), Some(2.0));
    assert_eq!(sample(&text, "tcpstall_flows_tracked"), Some(17.0));

    // `a` recovered, `c` moved up: a's series are gone, c (no prediction,
    // no unacked age) has only the stall-seconds series.
    let live = LiveView {
        gauges: Gauges::default(),
        top: vec![
            (b, None, Direction::Accepted),
            (c, None, Direction::Initiated),
        ],
        incidents: vec![],
    };
    let text = m.render(&live, Format::OpenMetrics).unwrap();
    assert!(!text.contains("10.0.0.1:40000"), "{text}");
    assert_eq!(
        lines_of(&text, "tcpstall_socket_seconds_to_timeout").len(),
        1
    );
    assert_eq!(
        lines_of(&text, "tcpstall_socket_unacked_age_seconds").len(),
        1
    );
    assert_eq!(lines_of(&text, "tcpstall_socket_stall_seconds").len(), 2);
    assert!(
        text.contains(
            "tcpstall_socket_stall_seconds{class=\"zero_window\",cause=\"peer_silent\",local=\"10.0.0.1:40002\""
        )
    );
    // Nothing stalled: every per-flow series is gone (an empty family is
    // not encoded at all).
    let text = m.render(&LiveView::default(), Format::OpenMetrics).unwrap();
    assert!(lines_of(&text, "tcpstall_socket_stall_seconds").is_empty());
    assert!(!text.contains("tcpstall_socket_"), "{text}");
}

/// Mutation: `delay_ns as f64 / 1e6` in `event_delivered` (ms taken
/// as seconds): the 3 ms delay lands in `+Inf`, not in `le="0.005"`.
#[test]
fn event_delivery_histogram_observes_the_delay_in_seconds() {
    let m = Metrics::new(&cfg(10, 5), &plan());
    m.event_delivered(3_000_000);
    m.event_delivered(40_000_000);
    let text = m
        .render(&LiveView::default(), Format::PrometheusText)
        .unwrap();
    let bucket = |le: &str| {
        sample(
            &text,
            &format!("tcpstall_event_delivery_seconds_bucket{{le=\"{le}\"}}"),
        )
    };
    assert_eq!(bucket("0.002"), Some(0.0), "{text}");
    assert_eq!(bucket("0.005"), Some(1.0), "{text}");
    assert_eq!(bucket("0.05"), Some(2.0), "{text}");
    assert_eq!(
        sample(&text, "tcpstall_event_delivery_seconds_count"),
        Some(2.0)
    );
}

#[test]
fn classic_text_format() {
    let m = Metrics::new(&cfg(100, 50), &plan());
    m.observe(&Observation::Retransmit {
        remote: addr("10.0.0.2:8080"),
        rto: true,
        cause: RetransmitCause::Rto,
    });
    let text = m
        .render(&LiveView::default(), Format::PrometheusText)
        .unwrap();
    assert!(!text.contains("# EOF"), "{text}");
    assert!(!text.contains("# UNIT"));
    assert!(text.contains("# TYPE tcpstall_retransmits_total counter\n"));
    assert!(text.contains("# HELP tcpstall_retransmits_total TCP segments"));
    assert!(text.contains("# TYPE tcpstall_stalled_sockets gauge\n"));
    assert!(text.contains("# TYPE tcpstall_stall_duration_seconds histogram\n"));
    assert!(
        text.contains("tcpstall_retransmits_total{remote=\"10.0.0.2:8080\",cause=\"rto\"} 1\n")
    );
    assert!(
        text.contains("tcpstall_stall_duration_seconds_bucket{le=\"+Inf\",outcome=\"closed\"} 0\n")
    );
    // Every sample's family was announced with its classic name.
    let announced: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let name = l.split(['{', ' ']).next().unwrap_or("");
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| announced.contains(b))
            .unwrap_or(name);
        assert!(announced.contains(base), "{name} not announced");
    }
}

#[test]
fn conversion_of_other_openmetrics_constructs() {
    let om = "# HELP a_seconds A thing.\n# TYPE a_seconds counter\n# UNIT a_seconds seconds\n\
              a_seconds_total 3 # {trace_id=\"x\"} 1.0\na_seconds_created 1.7e9\n\
              # HELP b B.\n# TYPE b info\nb_info{v=\"1\"} 1\n\
              # HELP c C.\n# TYPE c unknown\nc 2\n# EOF\n";
    let t = openmetrics_to_prometheus_text(om);
    assert_eq!(
        t,
        "# HELP a_seconds_total A thing.\n# TYPE a_seconds_total counter\na_seconds_total 3\n\
         # HELP b_info B.\n# TYPE b_info gauge\nb_info{v=\"1\"} 1\n\
         # HELP c C.\n# TYPE c untyped\nc 2\n"
    );
}

/// A stall ended by an RST is counted under the cause it had; every cause
/// has its series from the start (a closed label set, zeros included).
/// Mutation: counting `StallCause::Unknown` instead of `cause` fails it.
#[test]
fn stall_resets_are_counted_by_cause() {
    let m = Metrics::new(&cfg(100, 50), &plan());
    m.observe(&Observation::StallReset {
        class: StallClass::Retransmit,
        cause: crate::engine::StallCause::PeerSilent,
        cookie: 7,
        remote: addr("10.0.0.2:8080"),
        errno: 104,
    });
    let text = m.render(&LiveView::default(), Format::OpenMetrics).unwrap();
    assert!(
        text.contains("tcpstall_stall_resets_total{cause=\"peer_silent\"} 1\n"),
        "{text}"
    );
    for c in crate::engine::StallCause::ALL {
        assert!(
            text.contains(&format!(
                "tcpstall_stall_resets_total{{cause=\"{}\"}}",
                c.as_str()
            )),
            "{c:?}: {text}"
        );
    }
}
