//! The HTTP server (axum): metrics, health and the JSON API.
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /metrics` | every metric ([`crate::serve::metrics`]); OpenMetrics text unless the `Accept` header prefers `text/plain` (then Prometheus text 0.0.4) |
//! | `GET /healthz` | 200 `ok` while the event loop's heartbeat (every second, idle or not) is younger than `--liveness-timeout`; 503 with the reason otherwise (the kubelet restarts the agent) |
//! | `GET /readyz` | 200 when every required probe is attached and the event loop drained the ring buffer within [`READY_STALE_AFTER`](super::state::READY_STALE_AFTER); 503 with the reason otherwise |
//! | `GET /api/v1/stalls` | every stalled flow, most urgent first, with pod identity and wall-clock instants |
//! | `GET /api/v1/remotes` | per-remote aggregation (top K remotes, the rest summed) |
//! | `GET /api/v1/risks` | the hang-forever audit of the last sweep: established sockets without SO_KEEPALIVE and TCP_USER_TIMEOUT, longest idle first, bounded |
//! | `GET /api/v1/guard` | the guard: its rules, the cgroups each covers, the sockets it acted on (or would have, dry-run) |
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
    identity::{Direction, ProcessInfo, netns::PodIdentity, peer_service},
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
    /// The guard rule that armed (or, dry-run, would arm) this socket's
    /// timeouts at establishment; None: no rule acted on it.
    guarded_by: Option<GuardedBy>,
    /// Who opened the connection: `initiated` or `accepted`.
    direction: Direction,
    /// The incident's `remote` label: the peer address for an initiated
    /// connection, the peer IP with our listening port for an accepted one.
    peer_service: String,
}

/// `guarded_by` of a stalled socket.
#[derive(Serialize)]
struct GuardedBy {
    rule: String,
    mode: crate::guard::Mode,
    /// What the guard set (would set); empty: the application had its own.
    actions: Vec<&'static str>,
    kept: Vec<&'static str>,
}

fn guarded_by(g: Option<&crate::guard::Guard>, cookie: u64) -> Option<GuardedBy> {
    let s = g?.socket(cookie)?;
    Some(GuardedBy {
        rule: s.rule.clone(),
        mode: s.mode,
        actions: s.actions.clone(),
        kept: s.kept.clone(),
    })
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
    let guard = state.guard();
    let directions = state.directions(&views);
    let stalls: Vec<StallEntry<'_>> = views
        .iter()
        .zip(&owners)
        .zip(directions)
        .map(|((v, (p, proc_)), direction)| StallEntry {
            direction,
            peer_service: peer_service(v.local, v.remote, direction).to_string(),
            view: v,
            since: wall(v.since_ns, offset),
            predicted_timeout_at: v.predicted_timeout_ns.map(|t| wall(t, offset)),
            pod: p.as_ref().and_then(|p| nonempty(&p.pod)),
            namespace: p.as_ref().and_then(|p| nonempty(&p.namespace)),
            container: p.as_ref().and_then(|p| nonempty(&p.container)),
            container_id: p.as_ref().and_then(|p| nonempty(&p.container_id)),
            pod_uid: p.as_ref().and_then(|p| nonempty(&p.pod_uid)),
            process: proc_.as_ref(),
            guarded_by: guarded_by(guard.as_ref(), v.cookie),
        })
        .collect();
    drop(guard);
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

async fn healthz(State(state): State<Arc<AgentState>>) -> Response {
    let now = (state.clock)();
    match state.health.liveness(now, state.liveness_timeout) {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not live: {reason}\n"),
        )
            .into_response(),
    }
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
    pod_uid: Option<&'a str>,
    container: Option<&'a str>,
    container_id: Option<&'a str>,
    /// The guard rule covering the socket's cgroup now: it is not changed
    /// (the guard acts at establishment only) and would be guarded on
    /// reconnect. None: no rule covers it (or the guard is off).
    guarded_on_reconnect_by: Option<String>,
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
    let rules: Vec<Option<String>> = {
        let guard = state.guard();
        report
            .listed
            .iter()
            .map(|r| {
                guard
                    .as_ref()
                    .and_then(|g| g.cgroup(r.cgroup_id))
                    .map(|c| c.rule.clone())
            })
            .collect()
    };
    let risks = report
        .listed
        .iter()
        .zip(&ids)
        .zip(rules)
        .map(|((r, p), rule)| RiskDocEntry {
            risk: r,
            pod: p.as_ref().and_then(|p| nonempty(&p.pod)),
            namespace: p.as_ref().and_then(|p| nonempty(&p.namespace)),
            pod_uid: p.as_ref().and_then(|p| nonempty(&p.pod_uid)),
            container: p.as_ref().and_then(|p| nonempty(&p.container)),
            container_id: p.as_ref().and_then(|p| nonempty(&p.container_id)),
            guarded_on_reconnect_by: rule,
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

async fn guard_handler(State(state): State<Arc<AgentState>>) -> Response {
    blocking(state, guard_json).await
}

/// `/api/v1/guard`.
#[derive(Serialize)]
struct GuardDoc<'a> {
    generated_at: String,
    enabled: bool,
    /// Why the guard is off (kill switch, no policy, kernel).
    off_reason: Option<String>,
    policy_file: Option<String>,
    /// The rules in force (the last good policy).
    rules: Vec<&'a crate::guard::Rule>,
    /// Why the last reload failed (the rules above stay in force).
    last_reload_error: Option<&'a str>,
    reloads: u64,
    /// Every cgroup a rule covers now.
    cgroups: Vec<&'a crate::guard::CgroupEntry>,
    /// Sockets the guard acted on (or would have: dry-run), newest first,
    /// bounded.
    count: usize,
    sockets: Vec<&'a crate::guard::GuardedSocket>,
}

fn guard_json(state: &AgentState) -> Response {
    let now = (state.clock)();
    let offset = facts::realtime_offset_ns();
    let off = state
        .guard_off
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let guard = state.guard();
    let g = guard.as_ref();
    let sockets: Vec<_> = g.map(|g| g.sockets().rev().collect()).unwrap_or_default();
    json_response(&GuardDoc {
        generated_at: wall(now, offset),
        enabled: g.is_some(),
        off_reason: off,
        policy_file: g.map(|g| g.path.display().to_string()),
        rules: g
            .map(|g| g.policy.rules.iter().collect())
            .unwrap_or_default(),
        last_reload_error: g.and_then(|g| g.last_error.as_deref()),
        reloads: g.map_or(0, |g| g.reloads),
        cgroups: g.map(|g| g.cgroups()).unwrap_or_default(),
        count: sockets.len(),
        sockets,
    })
}

/// The probe plan, and the drop probe's on-demand attach state
/// (`drop_probe`, null where the probe is not attached on this kernel).
async fn plan_handler(State(state): State<Arc<AgentState>>) -> Response {
    let drop_probe = state
        .drop_probe
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    match serde_json::to_value(&state.plan) {
        Ok(serde_json::Value::Object(mut doc)) => {
            doc.insert(
                "drop_probe".to_owned(),
                serde_json::to_value(drop_probe).unwrap_or_default(),
            );
            json_response(&doc)
        }
        _ => json_response(&state.plan),
    }
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        "not found; endpoints: /metrics /healthz /readyz /api/v1/stalls /api/v1/remotes /api/v1/risks /api/v1/guard /api/v1/plan\n",
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
        .route("/api/v1/guard", get(guard_handler))
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
mod tests;
