//! The HTTP server (axum): metrics, health and the JSON API.
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /metrics` | every metric ([`crate::serve::metrics`]); OpenMetrics text unless the `Accept` header prefers `text/plain` (then Prometheus text 0.0.4) |
//! | `GET /healthz` | 200 `ok`: the process serves requests |
//! | `GET /readyz` | 200 when every required probe is attached and the event loop drained the ring buffer within [`READY_STALE_AFTER`](super::state::READY_STALE_AFTER); 503 with the reason otherwise |
//! | `GET /api/v1/stalls` | every stalled flow, most urgent first, with pod identity and wall-clock instants |
//! | `GET /api/v1/remotes` | per-remote aggregation (top K remotes, the rest summed) |
//! | `GET /api/v1/risks` | the hang-forever audit of the last sweep: established sockets without SO_KEEPALIVE and TCP_USER_TIMEOUT, longest idle first, bounded |
//! | `GET /api/v1/plan` | the probe plan: the mechanism chosen per probe and why the others were not |
//!
//! Requests never hold the engine lock for longer than computing a view;
//! pod resolution, serialisation and metric encoding run on the blocking pool
//! after the lock is released, so the event loop is not starved by scrapes.
//! Every request is bounded by [`REQUEST_TIMEOUT`](super::state::REQUEST_TIMEOUT) (503 after that), bodies
//! by [`MAX_BODY_BYTES`] (413); unknown paths answer 404, other methods 405.
//! Connections are HTTP/1.1 (what Prometheus and curl speak): a client gets
//! [`HEADER_READ_TIMEOUT`] to send its request headers (slow or silent
//! clients are dropped), and at most [`MAX_CONNECTIONS`] are served at once
//! (further ones wait in the listen backlog).

use std::{
    future::Future,
    sync::{Arc, PoisonError},
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Serialize;
use time::{OffsetDateTime, format_description::BorrowedFormatItem, macros::format_description};
use tower_http::{limit::RequestBodyLimitLayer, timeout::TimeoutLayer};

use super::metrics::Format;
use super::state::AgentState;
use crate::{
    engine::StallView,
    identity::{ProcessInfo, netns::PodIdentity},
    kernel::facts,
};

/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Largest accepted request body (every endpoint is a GET).
pub const MAX_BODY_BYTES: usize = 4 * 1024;

/// RFC 3339 in UTC with millisecond precision, e.g. `2024-05-01T12:00:03.250Z`.
const RFC3339_MILLIS: &[BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// Formats a CLOCK_REALTIME instant (ns since the Unix epoch) as
/// [`RFC3339_MILLIS`] (truncated to the millisecond).
pub fn rfc3339(unix_ns: i128) -> String {
    let ms = unix_ns.div_euclid(1_000_000) * 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(ms)
        .ok()
        .and_then(|t| t.format(RFC3339_MILLIS).ok())
        .unwrap_or_else(|| format!("(out of range: {unix_ns} ns since 1970)"))
}

/// A CLOCK_MONOTONIC instant as RFC 3339, given `realtime - monotonic`.
fn wall(mono_ns: u64, offset_ns: i128) -> String {
    rfc3339(i128::from(mono_ns) + offset_ns)
}

/// One entry of `/api/v1/stalls`: the engine's view plus identity and wall
/// clock instants.
#[derive(Serialize)]
struct StallEntry<'a> {
    #[serde(flatten)]
    view: &'a StallView,
    /// `since_ns` as wall-clock time.
    since: String,
    /// `predicted_timeout_ns` as wall-clock time.
    predicted_timeout_at: Option<String>,
    pod: Option<&'a str>,
    namespace: Option<&'a str>,
    /// Container name.
    container: Option<&'a str>,
    container_id: Option<&'a str>,
    pod_uid: Option<&'a str>,
    /// A process holding the socket (pid, comm).
    process: Option<&'a ProcessInfo>,
}

fn nonempty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

#[derive(Serialize)]
struct StallsDoc<'a> {
    generated_at: String,
    /// CLOCK_MONOTONIC ns the views were computed at (the clock of every
    /// `*_ns` field).
    now_ns: u64,
    kernel: &'a str,
    count: usize,
    stalls: Vec<StallEntry<'a>>,
}

#[derive(Serialize)]
struct RemotesDoc<'a> {
    generated_at: String,
    now_ns: u64,
    kernel: &'a str,
    #[serde(flatten)]
    remotes: crate::engine::RemotesView,
}

fn json_response<T: Serialize>(doc: &T) -> Response {
    match serde_json::to_vec(doc) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "serialising a JSON response failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response()
        }
    }
}

fn stalls_json(state: &AgentState) -> Response {
    let now = (state.clock)();
    let views = state.engine().stalls(now);
    let offset = facts::realtime_offset_ns();
    let owners = state.owners(&views);
    let stalls: Vec<StallEntry<'_>> = views
        .iter()
        .zip(&owners)
        .map(|(v, (p, proc_))| StallEntry {
            view: v,
            since: wall(v.since_ns, offset),
            predicted_timeout_at: v.predicted_timeout_ns.map(|t| wall(t, offset)),
            pod: p.as_ref().and_then(|p| nonempty(&p.pod)),
            namespace: p.as_ref().and_then(|p| nonempty(&p.namespace)),
            container: p.as_ref().and_then(|p| nonempty(&p.container)),
            container_id: p.as_ref().and_then(|p| nonempty(&p.container_id)),
            pod_uid: p.as_ref().and_then(|p| nonempty(&p.pod_uid)),
            process: proc_.as_ref(),
        })
        .collect();
    json_response(&StallsDoc {
        generated_at: wall(now, offset),
        now_ns: now,
        kernel: &state.plan.kernel,
        count: stalls.len(),
        stalls,
    })
}

fn remotes_json(state: &AgentState) -> Response {
    let now = (state.clock)();
    let remotes = state.engine().remotes(now);
    json_response(&RemotesDoc {
        generated_at: wall(now, facts::realtime_offset_ns()),
        now_ns: now,
        kernel: &state.plan.kernel,
        remotes,
    })
}

/// Runs `f` on the blocking pool (engine lock, /proc scans, encoding).
async fn blocking(
    state: Arc<AgentState>,
    f: impl FnOnce(&AgentState) -> Response + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(move || f(&state)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "request handler failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response()
        }
    }
}

/// Picks the exposition format from an `Accept` header: the media type with
/// the higher q-value among OpenMetrics and `text/plain` (Prometheus text
/// 0.0.4); OpenMetrics on a tie, without a header, or when neither is named.
pub fn negotiate(accept: Option<&str>) -> Format {
    let Some(accept) = accept else {
        return Format::OpenMetrics;
    };
    let (mut om, mut text) = (None::<f32>, None::<f32>);
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let mut q = 1.0f32;
        for p in parts {
            if let Some((k, v)) = p.split_once('=')
                && k.trim().eq_ignore_ascii_case("q")
            {
                q = v.trim().parse().unwrap_or(0.0);
            }
        }
        let slot = match media.as_str() {
            "application/openmetrics-text" => &mut om,
            "text/plain" => &mut text,
            _ => continue,
        };
        *slot = Some(slot.map_or(q, |old: f32| old.max(q)));
    }
    match (om, text) {
        (_, Some(t)) if t > 0.0 && t > om.unwrap_or(0.0) => Format::PrometheusText,
        _ => Format::OpenMetrics,
    }
}

async fn metrics_handler(State(state): State<Arc<AgentState>>, headers: HeaderMap) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let format = negotiate(accept.as_deref());
    blocking(state, move |s| match s.scrape(format) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            )
                .into_response()
        }
    })
    .await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<AgentState>>) -> Response {
    let now = (state.clock)();
    match state
        .health
        .readiness(&state.plan, now, state.ready_stale_after)
    {
        Ok(msg) => (StatusCode::OK, msg + "\n").into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

async fn stalls_handler(State(state): State<Arc<AgentState>>) -> Response {
    blocking(state, stalls_json).await
}

async fn remotes_handler(State(state): State<Arc<AgentState>>) -> Response {
    blocking(state, remotes_json).await
}

async fn risks_handler(State(state): State<Arc<AgentState>>) -> Response {
    blocking(state, risks_json).await
}

/// One entry of `/api/v1/risks`.
#[derive(Serialize)]
struct RiskDocEntry<'a> {
    #[serde(flatten)]
    risk: &'a crate::sweep::risks::RiskEntry,
    pod: Option<&'a str>,
    namespace: Option<&'a str>,
    container: Option<&'a str>,
}

#[derive(Serialize)]
struct RisksDoc<'a> {
    generated_at: String,
    /// When the audited sweep ran (None: no sweep yet).
    swept_at: Option<String>,
    kernel: &'a str,
    /// Established TCP sockets in that sweep.
    established: usize,
    /// Established sockets without SO_KEEPALIVE and TCP_USER_TIMEOUT (all).
    total: usize,
    /// Listed below: the longest idle first, bounded.
    count: usize,
    risks: Vec<RiskDocEntry<'a>>,
}

fn risks_json(state: &AgentState) -> Response {
    let now = (state.clock)();
    let offset = facts::realtime_offset_ns();
    let report = state
        .risks
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
        .unwrap_or_default();
    let ids: Vec<Option<PodIdentity>> = {
        let t = Instant::now();
        let mut pods = state.pods();
        report
            .listed
            .iter()
            .map(|r| pods.pod(&crate::identity::FlowRef::owner(r.netns, r.cgroup_id), t))
            .collect()
    };
    let risks = report
        .listed
        .iter()
        .zip(&ids)
        .map(|(r, p)| RiskDocEntry {
            risk: r,
            pod: p.as_ref().and_then(|p| nonempty(&p.pod)),
            namespace: p.as_ref().and_then(|p| nonempty(&p.namespace)),
            container: p.as_ref().and_then(|p| nonempty(&p.container)),
        })
        .collect::<Vec<_>>();
    json_response(&RisksDoc {
        generated_at: wall(now, offset),
        swept_at: (report.swept_at_ns != 0).then(|| wall(report.swept_at_ns, offset)),
        kernel: &state.plan.kernel,
        established: report.established,
        total: report.total,
        count: risks.len(),
        risks,
    })
}

async fn plan_handler(State(state): State<Arc<AgentState>>) -> Response {
    json_response(&state.plan)
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        "not found; endpoints: /metrics /healthz /readyz /api/v1/stalls /api/v1/remotes /api/v1/risks /api/v1/plan\n",
    )
        .into_response()
}

/// The router (also used by the tests with a fake state).
pub fn router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/v1/stalls", get(stalls_handler))
        .route("/api/v1/remotes", get(remotes_handler))
        .route("/api/v1/plan", get(plan_handler))
        .route("/api/v1/risks", get(risks_handler))
        .fallback(not_found)
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            state.request_timeout,
        ))
        .with_state(state)
}

/// Serves until `shutdown` completes, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AgentState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_router(
        listener,
        router(state),
        ConnLimits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        },
        shutdown,
    )
    .await
}

/// Per-connection limits of [`serve_router`].
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
}

/// Accept loop: one HTTP/1.1 connection task per client, at most
/// `max_connections` at once, each dropped when its request headers do not
/// arrive within `header_read_timeout`. On `shutdown` it stops accepting,
/// closes idle keep-alive connections and waits for requests in flight (the
/// caller bounds that wait). Accept errors (e.g. out of file descriptors)
/// are logged and retried, never fatal.
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::{
        rt::{TokioIo, TokioTimer},
        server::graceful::GracefulShutdown,
        service::TowerToHyperService,
    };

    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // never closed
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an HTTP connection failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
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
        }
    }

    fn state_with(plan: Plan) -> Arc<AgentState> {
        let engine = Engine::new(EngineConfig {
            hz: Some(HZ),
            ..EngineConfig::default()
        })
        .expect("engine");
        let metrics = Metrics::new(
            &MetricsConfig {
                max_remote_labels: 100,
                top_k_flows: 50,
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
            }),
            orphan: false,
            rto_expired_verdict: false,
            sk_err: 0,
            ack_seq: 0,
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
        let since = st["since"].as_str().expect("since");
        let at = st["predicted_timeout_at"]
            .as_str()
            .expect("predicted_timeout_at");
        assert!(since.ends_with('Z') && at.ends_with('Z'));
        assert!(at > since, "{since} < {at}");

        let (_, _, text) = get(&s, "/metrics").await;
        let labels = format!(
            "{{class=\"retransmit\",local=\"{local}\",remote=\"{remote}\",netns=\"4026532111\",pod=\"\",namespace=\"\",container=\"\"}}"
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
}
