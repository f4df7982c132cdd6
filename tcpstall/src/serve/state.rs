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
    identity::{FlowRef, Identities, Owner, netns::PodIdentity},
    kernel::{facts, loader::Plan},
};

/// Upper bound on handling one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// `/readyz` fails when the event loop has not drained the ring buffer for
/// this long.
pub const READY_STALE_AFTER: Duration = Duration::from_secs(5);

/// Liveness facts the event loop publishes for `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    /// CLOCK_MONOTONIC ns of the last time the event loop drained the ring
    /// buffer (after a batch, or at a tick with nothing pending); 0 = never.
    last_drain_ns: AtomicU64,
    stopping: AtomicBool,
}

impl Health {
    pub fn drained(&self, now_ns: u64) {
        self.last_drain_ns.store(now_ns, Ordering::Relaxed);
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
    /// Per-request time limit.
    pub request_timeout: Duration,
    /// The hang-forever audit of the last sweep (None: no sweep yet).
    pub risks: Mutex<Option<crate::sweep::risks::RiskReport>>,
    /// The guard (None: off; `guard_off` says why).
    pub guard: Mutex<Option<crate::guard::Guard>>,
    /// Why the guard is off (None: on, or never asked for).
    pub guard_off: Mutex<Option<String>>,
}

impl AgentState {
    pub fn new(engine: Engine, metrics: Metrics, pods: Identities, plan: Plan) -> Self {
        Self {
            engine: Mutex::new(engine),
            metrics,
            pods: Mutex::new(pods),
            plan,
            health: Health::default(),
            clock: facts::monotonic_ns,
            ready_stale_after: READY_STALE_AFTER,
            request_timeout: REQUEST_TIMEOUT,
            risks: Mutex::new(None),
            guard: Mutex::new(None),
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

    /// Pod identity of each view's socket (one resolver lock for all).
    pub(crate) fn identities(&self, views: &[StallView]) -> Vec<Option<PodIdentity>> {
        let now = Instant::now();
        let mut pods = self.pods();
        views
            .iter()
            .map(|v| pods.pod(&FlowRef::of(v), now))
            .collect()
    }

    /// Pod and process of each stalled flow (API).
    pub(crate) fn owners(&self, views: &[StallView]) -> Vec<Owner> {
        let now = Instant::now();
        let mut pods = self.pods();
        views
            .iter()
            .map(|v| {
                let f = FlowRef::of(v);
                (pods.pod(&f, now), pods.process(&f, now))
            })
            .collect()
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
            stalls.iter().zip(pods.iter().map(Option::as_ref)),
            self.metrics.max_incidents(),
        );
        stalls.truncate(self.metrics.top_k_flows());
        pods.truncate(stalls.len());
        let live = LiveView {
            gauges,
            top: stalls.into_iter().zip(pods).collect(),
            incidents,
        };
        if let Some(p) = super::self_stats::sample() {
            self.metrics.process(&p);
        }
        self.metrics.render(&live, format)
    }
}
