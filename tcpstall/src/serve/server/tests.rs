//! Unit tests of the HTTP server: every endpoint through the router, health,
//! limits and shutdown.

use std::{net::SocketAddr, time::Instant};

use axum::http::{Method, Request as HttpRequest};
use tower::ServiceExt as _;

use super::*;
use crate::{
    engine::{Engine, EngineConfig},
    kernel::{
        event::{EventKind, Mechanism, NetnsSysctls, SockEvent, SockFields, TcpState},
        loader::{Attempt, Plan, ProbeStatus},
    },
    serve::metrics::{Metrics, MetricsConfig},
};

const HZ: u32 = 250;
const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;

fn plan(write_timer_attached: bool) -> Plan {
    let ok = |m: Mechanism| Attempt {
        mechanism: m,
        target: "t".into(),
        program: "p",
        error: None,
    };
    Plan {
        kernel: "6.1.0-test".into(),
        hz: Some(HZ),
        hz_source: Some("/proc/config.gz".into()),
        probes: vec![
            ProbeStatus {
                probe: "retransmit",
                required: true,
                disabled: None,
                chosen: Some(Mechanism::TpBtf),
                program: None,
                attempts: vec![ok(Mechanism::TpBtf)],
            },
            ProbeStatus {
                probe: "write_timer",
                required: true,
                disabled: None,
                chosen: write_timer_attached.then_some(Mechanism::Fentry),
                program: None,
                attempts: vec![ok(Mechanism::Fentry)],
            },
            ProbeStatus {
                probe: "error_report",
                required: false,
                disabled: None,
                chosen: None,
                program: None,
                attempts: vec![],
            },
        ],
        fields: String::new(),
        drop_reasons: Vec::new(),
    }
}

fn state_with(plan: Plan) -> Arc<AgentState> {
    state_with_top_k(plan, 50)
}

fn state_with_top_k(plan: Plan, top_k_flows: usize) -> Arc<AgentState> {
    let engine = Engine::new(EngineConfig {
        hz: Some(HZ),
        ..EngineConfig::default()
    })
    .expect("engine");
    let metrics = Metrics::new(
        &MetricsConfig {
            max_remote_labels: 100,
            top_k_flows,
            version: "0.1.0".into(),
            kernel: plan.kernel.clone(),
            node: "node-a".into(),
            max_incidents: 100,
        },
        &plan.probes,
    );
    let pods = crate::identity::Identities::new(&crate::identity::IdentityConfig {
        proc_root: "/nonexistent/proc".into(),
        cgroup2_root: None,
        runtimes: Default::default(),
        netns_refresh: Duration::from_secs(30),
    });
    Arc::new(AgentState::new(engine, metrics, pods, plan))
}

fn state() -> Arc<AgentState> {
    state_with(plan(true))
}

async fn call(
    state: &Arc<AgentState>,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    let mut req = HttpRequest::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = router(state.clone())
        .oneshot(req.body(axum::body::Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 24)
        .await
        .expect("body");
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

async fn get(state: &Arc<AgentState>, uri: &str) -> (StatusCode, HeaderMap, String) {
    call(state, Method::GET, uri, &[]).await
}

/// jiffies consistent with CLOCK_MONOTONIC `ts` at HZ (boot offset).
fn jiffies_at(ts: u64) -> u64 {
    let j = u128::from(ts) * u128::from(HZ) / u128::from(S);
    ((1u64 << 32) - 300 * u64::from(HZ)).wrapping_add(j as u64)
}

/// A write-timer RTO expiry of a blackholed flow in a netns with
/// tcp_retries2 = 5.
fn rto_event(ts: u64, retransmits: u32, stamp_ms: u32, rto_j: u32) -> SockEvent {
    SockEvent {
        kind: EventKind::WriteTimer,
        mechanism: Mechanism::Fentry,
        ts_ns: ts,
        jiffies: jiffies_at(ts),
        cookie: 7,
        skaddr: 0xffff_8880_0000_7000,
        netns: 4_026_532_111,
        cgroup_id: 0,
        local: "10.201.40.1:40000".parse().expect("addr"),
        remote: "10.201.40.2:8080".parse().expect("addr"),
        state: TcpState::Established,
        old_state: TcpState::Established,
        sock: Some(SockFields {
            backoff: retransmits,
            probes_out: 0,
            pending: 1,
            ca_state: 0,
            rto_max_jiffies: 0,
            user_timeout_ms: 0,
            retrans_stamp: stamp_ms,
            usec_ts: false,
            snd_wnd: 65_535,
            lsndtime: 0,
            rcv_tstamp: 0,
            timer_expires: jiffies_at(ts).saturating_sub(1),
            syn_retries: 0,
            mss_cache: 0,
            sacked_out: 0,
            keepalive: Default::default(),
            fin: Default::default(),
        }),
        retransmits,
        rto_jiffies: rto_j,
        snd_una: 1_000,
        packets_out: 1,
        retrans_out: 1,
        total_retrans: retransmits,
        netns_sysctls: Some(NetnsSysctls {
            tcp_retries2: 5,
            tcp_orphan_retries: 0,
            tcp_rto_max_ms: None,
            ..Default::default()
        }),
        orphan: false,
        rto_expired_verdict: false,
        sk_err: 0,
        ack_seq: 0,
        err_soft: 0,
        tw: None,
    }
}

/// Feeds three RTO expiries (200, 400, 800 ms apart) ending just before
/// the real monotonic now: a `retransmit` stall with a prediction.
fn feed_stall(state: &AgentState) -> (SocketAddr, SocketAddr) {
    let now = facts::monotonic_ns();
    let t0 = now - 1_450 * MS;
    let stamp = (t0 / MS) as u32;
    let mut engine = state.engine();
    let mut ts = t0;
    for (i, rto) in [50u32, 100, 200].into_iter().enumerate() {
        let ev = rto_event(ts, i as u32, if i == 0 { 0 } else { stamp }, rto);
        engine.ingest(&ev);
        ts += u64::from(rto) * S / u64::from(HZ);
    }
    let obs: Vec<_> = engine.drain_observations().collect();
    drop(engine);
    for o in &obs {
        state.metrics.observe(o);
    }
    (
        "10.201.40.1:40000".parse().expect("addr"),
        "10.201.40.2:8080".parse().expect("addr"),
    )
}

#[test]
fn rfc3339_formatting() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(
        rfc3339(1_700_000_000_123_456_789),
        "2023-11-14T22:13:20.123Z"
    );
    // Leap day and end of year.
    assert_eq!(
        rfc3339(951_782_400 * 1_000_000_000),
        "2000-02-29T00:00:00.000Z"
    );
    assert_eq!(
        rfc3339(1_735_689_599_999 * 1_000_000),
        "2024-12-31T23:59:59.999Z"
    );
    assert_eq!(rfc3339(-1_000_000), "1969-12-31T23:59:59.999Z");
}

#[test]
fn accept_negotiation() {
    assert_eq!(negotiate(None), Format::OpenMetrics);
    assert_eq!(negotiate(Some("*/*")), Format::OpenMetrics);
    // Prometheus 2.x's scrape header.
    assert_eq!(
        negotiate(Some(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )),
        Format::OpenMetrics
    );
    assert_eq!(
        negotiate(Some("text/plain;version=0.0.4;q=1.0,*/*;q=0.1")),
        Format::PrometheusText
    );
    assert_eq!(negotiate(Some("text/plain")), Format::PrometheusText);
    assert_eq!(
        negotiate(Some("text/plain;q=0.5, application/openmetrics-text;q=0.9")),
        Format::OpenMetrics
    );
    assert_eq!(negotiate(Some("text/plain;q=0")), Format::OpenMetrics);
    assert_eq!(
        negotiate(Some("text/plain;q=nonsense")),
        Format::OpenMetrics
    );
    assert_eq!(negotiate(Some(";;,,==")), Format::OpenMetrics);
}

#[tokio::test]
async fn metrics_endpoint_negotiates_the_format() {
    let s = state();
    let (status, h, body) = get(&s, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        h[header::CONTENT_TYPE],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(body.ends_with("# EOF\n"));
    assert!(body.contains("# TYPE tcpstall_timeouts counter"));
    let (status, h, body) = call(
        &s,
        Method::GET,
        "/metrics",
        &[("accept", "text/plain;version=0.0.4")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        h[header::CONTENT_TYPE],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert!(!body.contains("# EOF"));
    assert!(body.contains("# TYPE tcpstall_timeouts_total counter"));
}

#[tokio::test]
async fn health_and_readiness() {
    let s = state();
    let (status, _, body) = get(&s, "/healthz").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));

    // Never drained yet.
    let (status, _, body) = get(&s, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("not been read"), "{body}");

    s.health.drained(facts::monotonic_ns());
    let (status, _, body) = get(&s, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.starts_with("ok"), "{body}");
    assert!(
        body.contains("error_report"),
        "optional probe named: {body}"
    );

    // A drain long ago: stuck event loop.
    s.health.drained(facts::monotonic_ns() - 60 * S);
    let (status, _, body) = get(&s, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("last drained"), "{body}");

    s.health.drained(facts::monotonic_ns());
    s.health.set_stopping();
    let (status, _, body) = get(&s, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("shutting down"), "{body}");

    // A required probe without a mechanism.
    let s = state_with(plan(false));
    s.health.drained(facts::monotonic_ns());
    let (status, _, body) = get(&s, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("write_timer"), "{body}");
}

/// Liveness: `/healthz` answers from the event loop's heartbeat (drained or
/// ticked, every second even when idle). A loop that has made no progress
/// for `--liveness-timeout` fails it with the reason, and the heartbeat age
/// is exported; the agent is live again once the loop beats. Shutting down
/// or a missing probe do not fail liveness (a restart fixes neither).
/// Mutation: `healthz` answering `ok` without `health.liveness(..)` ->
/// fails at "a stalled event loop must fail /healthz".
#[tokio::test]
async fn healthz_fails_when_the_event_loop_stalls() {
    let mut st = Arc::try_unwrap(state()).ok().expect("sole owner");
    st.liveness_timeout = Duration::from_secs(30);
    // Started, no heartbeat yet: live (start-up counts from creation).
    let s = Arc::new(st);
    let (status, _, body) = get(&s, "/healthz").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));
    let now = facts::monotonic_ns();
    s.health.drained(now);
    // 31 s later without a beat (the clock moved, the loop did not).
    let stalled = Arc::new(AgentState {
        clock: || facts::monotonic_ns() + 31 * S,
        ..Arc::try_unwrap(s).ok().expect("sole owner")
    });
    let (status, _, body) = get(&stalled, "/healthz").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a stalled event loop must fail /healthz: {body}"
    );
    assert!(
        body.contains("no progress") && body.contains("--liveness-timeout"),
        "{body}"
    );
    let (_, _, text) = get(&stalled, "/metrics").await;
    let age: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tcpstall_event_loop_heartbeat_age_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no heartbeat age in {text}"));
    assert!(age > 30.0, "{age}");
    // The loop beats again: live.
    stalled.health.drained(facts::monotonic_ns() + 31 * S);
    let (status, _, _) = get(&stalled, "/healthz").await;
    assert_eq!(status, StatusCode::OK);
    // Stopping and a detached required probe are readiness, not liveness.
    stalled.health.set_stopping();
    let (status, _, _) = get(&stalled, "/healthz").await;
    assert_eq!(status, StatusCode::OK);
    let s = state_with(plan(false));
    let (status, _, _) = get(&s, "/healthz").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_paths_wrong_methods_and_bodies() {
    let s = state();
    for path in [
        "/",
        "/nope",
        "/metrics/x",
        "/api/v1/stalls/1",
        "/api/v2/stalls",
    ] {
        let (status, _, _) = get(&s, path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    for m in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
        for path in ["/metrics", "/healthz", "/readyz", "/api/v1/stalls"] {
            let (status, _, _) = call(&s, m.clone(), path, &[]).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{m} {path}");
        }
    }
    let (status, _, _) = call(
        &s,
        Method::GET,
        "/metrics",
        &[("content-length", "1000000")],
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // Junk headers and query strings are harmless.
    let (status, _, _) = call(
        &s,
        Method::GET,
        "/api/v1/stalls?limit=%ff%00&x",
        &[
            ("accept", "garbage;q=;;, text/plain;q=x;q="),
            ("content-length", "nope"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(
        &s,
        Method::GET,
        "/metrics",
        &[("accept", "text/plain;q=abc")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn empty_stalls_document() {
    let s = state();
    let (status, h, body) = get(&s, "/api/v1/stalls").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h[header::CONTENT_TYPE], "application/json");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["kernel"], "6.1.0-test");
    assert_eq!(v["stalls"], serde_json::json!([]));
    assert_eq!(v["count"], 0);
    let gen_at = v["generated_at"].as_str().expect("generated_at");
    assert!(gen_at.len() == 24 && gen_at.ends_with('Z'), "{gen_at}");
}

#[tokio::test]
async fn a_stalled_flow_everywhere() {
    let s = state();
    let (local, remote) = feed_stall(&s);

    let (status, _, body) = get(&s, "/api/v1/stalls").await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let stalls = v["stalls"].as_array().expect("stalls");
    assert_eq!(stalls.len(), 1, "{v:#}");
    let st = &stalls[0];
    assert_eq!(st["class"], "retransmit");
    assert_eq!(st["local"], local.to_string());
    assert_eq!(st["remote"], remote.to_string());
    assert_eq!(st["netns"], 4_026_532_111u64);
    assert_eq!(st["state"], "ESTABLISHED");
    assert_eq!(st["boundary_source"], "tcp_retries2=5");
    assert!(st["predicted_timeout_ns"].as_u64().is_some(), "{st}");
    assert!(st["seconds_to_timeout"].as_f64().is_some(), "{st}");
    assert!(st["unacked_age_s"].as_f64().is_some(), "{st}");
    assert!(st["pod"].is_null() && st["namespace"].is_null() && st["container"].is_null());
    // A namespace the agent cannot read: initiated, the peer is the service.
    assert_eq!(st["direction"], "initiated");
    assert_eq!(st["peer_service"], remote.to_string());
    let since = st["since"].as_str().expect("since");
    let at = st["predicted_timeout_at"]
        .as_str()
        .expect("predicted_timeout_at");
    assert!(since.ends_with('Z') && at.ends_with('Z'));
    assert!(at > since, "{since} < {at}");

    let (_, _, text) = get(&s, "/metrics").await;
    let labels = format!(
        "{{class=\"retransmit\",cause=\"peer_silent\",local=\"{local}\",remote=\"{remote}\",direction=\"initiated\",peer=\"{remote}\",netns=\"4026532111\",pod=\"\",namespace=\"\",container=\"\"}}"
    );
    for name in [
        "tcpstall_socket_seconds_to_timeout",
        "tcpstall_socket_unacked_age_seconds",
        "tcpstall_socket_stall_seconds",
    ] {
        assert!(
            text.contains(&format!("{name}{labels} ")),
            "{name} missing:\n{text}"
        );
    }
    assert!(
        text.contains("tcpstall_stalled_sockets{class=\"retransmit\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "tcpstall_rto_expirations_total{{remote=\"{remote}\"}} 3\n"
        )),
        "{text}"
    );

    let (status, _, body) = get(&s, "/api/v1/remotes").await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["top"][0]["remote"], remote.to_string());
    assert_eq!(v["top"][0]["stalled_flows"], 1);

    // Time passes without the next expiry: the streak ends, the series go.
    s.engine().tick(facts::monotonic_ns() + 600 * S);
    let obs: Vec<_> = s.engine().drain_observations().collect();
    for o in &obs {
        s.metrics.observe(o);
    }
    // The view is computed at the real now, where the flow still looks
    // stalled only if the tick did not end it; a clock far ahead proves
    // removal regardless.
    let later = Arc::new(AgentState {
        clock: || facts::monotonic_ns() + 600 * S,
        ..Arc::try_unwrap(s).ok().expect("sole owner")
    });
    let (_, _, text) = get(&later, "/metrics").await;
    assert!(!text.contains(&local.to_string()), "{text}");
    let (_, _, body) = get(&later, "/api/v1/stalls").await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["count"], 0, "{v:#}");
}

/// More stalled sockets than the per-flow top-K: the incident group and
/// the class gauge count every one, only the per-flow series are cut.
/// Mutation: `stalls.truncate(top_k_flows)` moved before
/// `incidents::aggregate` in `AgentState::scrape` fails it (`sockets 2`).
#[tokio::test]
async fn incidents_count_every_stalled_socket_beyond_the_top_k() {
    let s = state_with_top_k(plan(true), 2);
    let now = facts::monotonic_ns();
    let t0 = now - 1_450 * MS;
    let stamp = (t0 / MS) as u32;
    {
        let mut engine = s.engine();
        for flow in 0..5u16 {
            let mut ts = t0;
            for (i, rto) in [50u32, 100, 200].into_iter().enumerate() {
                let mut ev = rto_event(ts, i as u32, if i == 0 { 0 } else { stamp }, rto);
                ev.cookie = 100 + u64::from(flow);
                ev.skaddr = 0xffff_8880_0001_0000 + u64::from(flow) * 0x1000;
                ev.local = SocketAddr::from(([10, 201, 40, 1], 41_000 + flow));
                engine.ingest(&ev);
                ts += u64::from(rto) * S / u64::from(HZ);
            }
        }
        assert_eq!(engine.stalls(now).len(), 5);
    }
    let (_, _, text) = get(&s, "/metrics").await;
    let groups: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("tcpstall_incident_stalled_sockets{"))
        .collect();
    assert_eq!(groups.len(), 1, "one incident group:\n{text}");
    assert!(
        groups[0].contains("class=\"retransmit\"")
            && groups[0].contains("remote=\"10.201.40.2:8080\"")
            && groups[0].ends_with(" 5"),
        "the group counts all 5 stalled sockets: {}",
        groups[0]
    );
    assert!(
        text.contains("tcpstall_stalled_sockets{class=\"retransmit\"} 5\n"),
        "{text}"
    );
    let per_flow = text
        .lines()
        .filter(|l| l.starts_with("tcpstall_socket_stall_seconds{"))
        .count();
    assert_eq!(per_flow, 2, "per-flow series are the top-K only:\n{text}");
}

#[tokio::test]
async fn plan_endpoint() {
    let s = state();
    let (status, _, body) = get(&s, "/api/v1/plan").await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["kernel"], "6.1.0-test");
    assert_eq!(v["probes"][1]["probe"], "write_timer");
    assert_eq!(v["probes"][1]["chosen"], "fentry");
}

#[tokio::test]
async fn a_stuck_engine_times_requests_out_instead_of_hanging() {
    let s = {
        let mut st = Arc::try_unwrap(state()).ok().expect("sole owner");
        st.request_timeout = Duration::from_millis(200);
        Arc::new(st)
    };
    // Another thread holds the engine lock (a stuck event loop).
    let (locked_tx, locked_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = {
        let s = s.clone();
        std::thread::spawn(move || {
            let _guard = s.engine();
            let _ = locked_tx.send(());
            let _ = release_rx.recv_timeout(Duration::from_secs(30));
        })
    };
    locked_rx.recv().expect("locked");
    let t0 = Instant::now();
    let (status, _, body) = get(&s, "/api/v1/stalls").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    // Lock-free endpoints still answer.
    let (status, _, _) = get(&s, "/healthz").await;
    assert_eq!(status, StatusCode::OK);
    release_tx.send(()).expect("release");
    holder.join().expect("holder");
    let (status, _, _) = get(&s, "/api/v1/stalls").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn serves_over_tcp_and_shuts_down() {
    let s = state();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, s, async move {
        let _ = rx.await;
    }));
    let body = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(addr).expect("connect");
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut out = String::new();
        c.read_to_string(&mut out).expect("read");
        out
    })
    .await
    .expect("client");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.ends_with("ok\n"), "{body}");
    tx.send(()).expect("shutdown");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server stops")
        .expect("join")
        .expect("serve");
}

/// A raw HTTP/1.1 exchange: send `request`, read until EOF or 5 s.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (String, Duration) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let t0 = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("send");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    (String::from_utf8_lossy(&out).into_owned(), t0.elapsed())
}

/// With every connection slot taken, a new client is not served: its
/// request waits (in the listen backlog) until a slot frees up.
/// Mutation checked: without the semaphore the request is answered at once.
#[tokio::test]
async fn a_request_waits_while_the_connection_cap_is_held() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
    let limits = ConnLimits {
        header_read_timeout: Duration::from_secs(60),
        max_connections: 1,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_router(listener, app, limits, async move {
        let _ = stop_rx.await;
    }));

    // The only slot: a keep-alive connection, served once (so it was
    // accepted), then left open.
    let mut holder = tokio::net::TcpStream::connect(addr).await.expect("connect");
    holder
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    let mut buf = [0u8; 256];
    let n = holder.read(&mut buf).await.expect("response");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "holder not served");

    // A complete request from a second client gets no answer while the
    // slot is held.
    let mut waiter = tokio::net::TcpStream::connect(addr).await.expect("connect");
    waiter
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let early = tokio::time::timeout(Duration::from_secs(1), waiter.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "answered while the only slot was held: {:?}",
        early.map(|r| r.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned()))
    );

    // Freeing the slot lets it through.
    drop(holder);
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), waiter.read_to_end(&mut out))
        .await
        .expect("served once the slot is free")
        .expect("read");
    let resp = String::from_utf8_lossy(&out);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    stop_tx.send(()).expect("stop");
    tokio::time::timeout(Duration::from_secs(3), server)
        .await
        .expect("server stops")
        .expect("task")
        .expect("serve");
}

#[tokio::test]
async fn slow_clients_are_dropped_and_shutdown_closes_idle_connections() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let limits = ConnLimits {
        header_read_timeout: Duration::from_millis(300),
        max_connections: 2,
    };
    let server = tokio::spawn(serve_router(listener, app, limits, async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));

    // A complete request is answered (and the connection closed on request).
    let (resp, _) = raw_exchange(
        addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("ok"), "{resp}");

    // Half a request line, then silence: dropped after the header timeout,
    // well before the client's own 5 s limit.
    let (resp, took) = raw_exchange(addr, b"GET /hea").await;
    assert!(!resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        took < Duration::from_secs(4),
        "slow client kept for {took:?}"
    );

    // More silent clients than slots: each is dropped in turn, then a
    // real request still gets through.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    let (resp, _) = raw_exchange(
        addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "after idle clients: {resp}"
    );

    // An idle keep-alive connection does not hold up shutdown.
    let mut keep = tokio::net::TcpStream::connect(addr).await.expect("connect");
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        keep.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        let mut buf = [0u8; 256];
        let n = keep.read(&mut buf).await.expect("response");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
    stop_tx.send(true).expect("stop");
    let r = tokio::time::timeout(Duration::from_secs(3), server)
        .await
        .expect("server stops with an idle keep-alive connection open");
    r.expect("task").expect("serve");
    drop(idle);
}
