//! What the event loop (in [`crate::app`]) and the HTTP server share:
//! [`AgentState`] (the engine, the metrics, the identity resolvers, the probe
//! plan, the last sweep's audit) and [`Health`] (what `/readyz` answers
//! from), with the server's default limits.

use std::{
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::metrics::{Format, LiveView, Metrics, MetricsError};
use crate::{
    engine::{Engine, StallView},
    identity::{Direction, FlowRef, Identities, Owner, netns::PodIdentity},
    kernel::{facts, loader::Plan},
};

/// Upper bound on handling one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// `/readyz` fails when the event loop has not drained the ring buffer for
/// this long.
pub const READY_STALE_AFTER: Duration = Duration::from_secs(5);

/// `/healthz` fails when the event loop's heartbeat is older than this
/// (`--liveness-timeout`): long enough for a start-up sweep of a busy node,
/// short enough that a stuck agent is restarted within minutes.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(60);

/// Liveness facts the event loop publishes for `/readyz` and `/healthz`.
#[derive(Debug, Default)]
pub struct Health {
    /// CLOCK_MONOTONIC ns of the last time the event loop drained the ring
    /// buffer (after a batch, or at its once-a-second tick, which runs in
    /// the same loop as the ring-buffer reads and so is its heartbeat even on
    /// an idle node); 0 = never.
    last_drain_ns: AtomicU64,
    /// CLOCK_MONOTONIC ns when liveness started counting (the state's
    /// creation): before the first heartbeat, `/healthz` measures from here.
    since_ns: AtomicU64,
    stopping: AtomicBool,
}

impl Health {
    /// Starts the liveness clock at `now_ns`.
    pub fn new(now_ns: u64) -> Self {
        let h = Self::default();
        h.since_ns.store(now_ns, Ordering::Relaxed);
        h
    }

    pub fn drained(&self, now_ns: u64) {
        self.last_drain_ns.store(now_ns, Ordering::Relaxed);
    }

    /// Seconds since the event loop's last heartbeat (or since the state was
    /// created, before the first one).
    pub fn heartbeat_age_s(&self, now_ns: u64) -> f64 {
        let last = self
            .last_drain_ns
            .load(Ordering::Relaxed)
            .max(self.since_ns.load(Ordering::Relaxed));
        Duration::from_nanos(now_ns.saturating_sub(last)).as_secs_f64()
    }

    /// Ok when the event loop made progress within `timeout`, Err(reason)
    /// otherwise (`/healthz`: the kubelet restarts the agent). Unlike
    /// readiness, shutting down or a missing probe is not a failure: a
    /// restart would not fix either.
    pub fn liveness(&self, now_ns: u64, timeout: Duration) -> Result<(), String> {
        let age = self.heartbeat_age_s(now_ns);
        if age > timeout.as_secs_f64() {
            return Err(format!(
                "the event loop has made no progress for {age:.1} s (limit {} s, --liveness-timeout): \
                 it is stuck; restart the agent",
                timeout.as_secs_f64()
            ));
        }
        Ok(())
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Ok(message) when ready, Err(reason) when not.
    pub fn readiness(
        &self,
        plan: &Plan,
        now_ns: u64,
        stale_after: Duration,
    ) -> Result<String, String> {
        if self.is_stopping() {
            return Err("shutting down".to_owned());
        }
        let missing: Vec<&str> = plan
            .probes
            .iter()
            .filter(|p| p.required && p.chosen.is_none())
            .map(|p| p.probe)
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "required probes not attached: {}",
                missing.join(", ")
            ));
        }
        let last = self.last_drain_ns.load(Ordering::Relaxed);
        if last == 0 {
            return Err("the ring buffer has not been read yet".to_owned());
        }
        let age = Duration::from_nanos(now_ns.saturating_sub(last));
        if age > stale_after {
            return Err(format!(
                "the ring buffer was last drained {:.1} s ago (limit {} s): the event loop is stuck or overloaded",
                age.as_secs_f64(),
                stale_after.as_secs()
            ));
        }
        let optional: Vec<&str> = plan
            .probes
            .iter()
            .filter(|p| !p.required && p.chosen.is_none() && p.disabled.is_none())
            .map(|p| p.probe)
            .collect();
        if optional.is_empty() {
            Ok("ok".to_owned())
        } else {
            Ok(format!(
                "ok (optional probes not attached: {})",
                optional.join(", ")
            ))
        }
    }
}

/// Everything the event loop and the server share.
pub struct AgentState {
    pub engine: Mutex<Engine>,
    pub metrics: Metrics,
    pub pods: Mutex<Identities>,
    pub plan: Plan,
    pub health: Health,
    /// CLOCK_MONOTONIC ns (replaceable in tests).
    pub clock: fn() -> u64,
    /// How long `/readyz` tolerates no drain.
    pub ready_stale_after: Duration,
    /// How long `/healthz` tolerates no heartbeat of the event loop.
    pub liveness_timeout: Duration,
    /// Per-request time limit.
    pub request_timeout: Duration,
    /// The hang-forever audit of the last sweep (None: no sweep yet).
    pub risks: Mutex<Option<crate::sweep::risks::RiskReport>>,
    /// The guard (None: off; `guard_off` says why).
    pub guard: Mutex<Option<crate::guard::Guard>>,
    /// Why the guard is off (None: on, or never asked for).
    pub guard_off: Mutex<Option<String>>,
    /// The drop probe, attached on demand (None: not on this kernel).
    pub drop_probe: Mutex<Option<DropProbeState>>,
}

/// The drop probe's on-demand attach state (`/api/v1/plan`'s `drop_probe`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DropProbeState {
    /// The program attached on demand.
    pub program: &'static str,
    /// Attached now: some flow is in a loss episode, or one ended less than
    /// `detach_after_s` ago.
    pub attached: bool,
    pub detach_after_s: u64,
    pub attaches: u64,
    pub attach_errors: u64,
    /// The last failed attach's error.
    pub last_error: Option<String>,
}

impl AgentState {
    pub fn new(engine: Engine, metrics: Metrics, pods: Identities, plan: Plan) -> Self {
        Self {
            engine: Mutex::new(engine),
            metrics,
            pods: Mutex::new(pods),
            plan,
            health: Health::new(facts::monotonic_ns()),
            clock: facts::monotonic_ns,
            ready_stale_after: READY_STALE_AFTER,
            liveness_timeout: LIVENESS_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
            risks: Mutex::new(None),
            guard: Mutex::new(None),
            drop_probe: Mutex::new(None),
            guard_off: Mutex::new(None),
        }
    }

    /// The engine, also after a panic elsewhere (its state is still usable).
    pub fn engine(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The guard's state (None: off).
    pub fn guard(&self) -> MutexGuard<'_, Option<crate::guard::Guard>> {
        self.guard.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn pods(&self) -> MutexGuard<'_, Identities> {
        self.pods.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `f` of each view's flow, under one resolver lock for all.
    fn per_flow<T>(
        &self,
        views: &[StallView],
        mut f: impl FnMut(&mut Identities, &FlowRef, Instant) -> T,
    ) -> Vec<T> {
        let now = Instant::now();
        let mut pods = self.pods();
        views
            .iter()
            .map(|v| f(&mut pods, &FlowRef::of(v), now))
            .collect()
    }

    /// Pod identity and direction of each view's socket.
    pub(crate) fn identities(&self, views: &[StallView]) -> Vec<(Option<PodIdentity>, Direction)> {
        self.per_flow(views, |p, f, now| (p.pod(f, now), p.direction(f, now)))
    }

    /// Who opened each view's connection.
    pub(crate) fn directions(&self, views: &[StallView]) -> Vec<Direction> {
        self.per_flow(views, |p, f, now| p.direction(f, now))
    }

    /// Pod and process of each stalled flow (API).
    pub(crate) fn owners(&self, views: &[StallView]) -> Vec<Owner> {
        self.per_flow(views, |p, f, now| (p.pod(f, now), p.process(f, now)))
    }

    /// Encodes the metrics as of now (engine views under the lock, the rest
    /// after it).
    pub fn scrape(&self, format: Format) -> Result<String, MetricsError> {
        let now = (self.clock)();
        let (gauges, mut stalls) = {
            let engine = self.engine();
            (engine.gauges(now), engine.stalls(now))
        };
        // Every stalled socket goes into the incident groups; only the
        // top-K get per-flow series.
        let mut pods = self.identities(&stalls);
        let incidents = super::incidents::aggregate(
            stalls
                .iter()
                .zip(&pods)
                .map(|(v, (p, d))| (v, p.as_ref(), *d)),
            self.metrics.max_incidents(),
        );
        stalls.truncate(self.metrics.top_k_flows());
        pods.truncate(stalls.len());
        let live = LiveView {
            gauges,
            top: stalls
                .into_iter()
                .zip(pods)
                .map(|(v, (p, d))| (v, p, d))
                .collect(),
            incidents,
        };
        if let Some(p) = super::self_stats::sample() {
            self.metrics.process(&p);
        }
        self.metrics.heartbeat_age(self.health.heartbeat_age_s(now));
        self.metrics.render(&live, format)
    }
}
