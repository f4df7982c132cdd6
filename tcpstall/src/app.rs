//! `tcpstall run`: loader -> reader -> engine -> metrics and HTTP server,
//! until SIGINT/SIGTERM.
//!
//! One task owns the ring buffer: it decodes every batch, counts events,
//! feeds them to the engine (behind a mutex, locked once per batch) and folds
//! the engine's observations into the metrics; once a second it advances the
//! engine's clock and reads the kernel-side counters. The HTTP server (its
//! own tasks) only takes the engine lock to compute a view.
//!
//! Shutdown (SIGTERM/SIGINT): `/readyz` turns 503, the server stops accepting
//! and finishes in-flight requests, the ring buffer is drained, the
//! `tcpstall stopped` summary is logged, and dropping the loader detaches
//! every probe.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};

use crate::{
    config::Settings,
    engine::{Engine, EngineConfig, Observation, StallView},
    event::{DecodeError, SockEvent},
    identity::{FlowRef, Identities, IdentityConfig, ProcessInfo},
    kernel,
    loader::{self, KernelStats, LoaderOptions, Plan, ProgramStatsReader, StatsReader},
    metrics::{Format, LiveView, Metrics, MetricsConfig, MetricsError},
    pods::PodIdentity,
    reader::Reader,
    server,
    sweep::{self as sweeping, Offer, PodLabels, SweepHold, SweepPolicy, SweepReason},
};

/// How often the engine's clock advances and kernel counters are read.
const TICK: Duration = Duration::from_secs(1);
/// How long /proc-derived pod identities are reused before a rescan.
const POD_REFRESH: Duration = Duration::from_secs(30);
/// Stall starts per batch whose owner (pod, process) is resolved for the
/// log line; the rest are logged without (the API resolves them on demand).
const MAX_OWNER_LOOKUPS: usize = 32;
/// Time allowed for in-flight HTTP requests at shutdown.
const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Loss-triggered sweeps run at most this often.
const LOSS_SWEEP_GAP: Duration = Duration::from_secs(2);
/// Entries of `/api/v1/risks` (longest idle first).
const RISKS_LISTED: usize = 1_000;
/// Upper bound on the final ring-buffer drain at shutdown.
const FINAL_DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// The final drain ends once the ring stays empty this long.
const FINAL_DRAIN_QUIET: Duration = Duration::from_millis(100);

fn log_plan(plan: &loader::Plan) {
    for p in &plan.probes {
        let failed: Vec<String> = p
            .attempts
            .iter()
            .filter_map(|a| {
                a.error
                    .as_ref()
                    .map(|e| format!("{}: {e}", a.mechanism.as_str()))
            })
            .collect();
        match p.chosen {
            Some(m) => info!(
                probe = p.probe,
                mechanism = m.as_str(),
                program = p.program.unwrap_or_default(),
                not_used = %failed.join("; "),
                "probe attached"
            ),
            None => warn!(probe = p.probe, why = %failed.join("; "), "probe not attached"),
        }
    }
}

/// One line per feature that is off, saying why (WARN when the kernel is
/// the reason: the node lacks something the fleet has).
fn log_features(features: &[crate::features::FeatureStatus]) {
    use crate::features::FeatureState;
    for f in features {
        match &f.state {
            FeatureState::On => {}
            FeatureState::OffConfig(flag) => {
                info!(
                    feature = f.name,
                    what = f.what,
                    flag,
                    "feature off (configured)"
                )
            }
            FeatureState::OffKernel(why) => {
                warn!(feature = f.name, what = f.what, why = %why, "feature off: not available on this kernel")
            }
        }
    }
    let on: Vec<&str> = features
        .iter()
        .filter(|f| f.state == FeatureState::On)
        .map(|f| f.name)
        .collect();
    info!(on = %on.join(","), "features");
}

/// Log one event as a structured line (`--log-events`).
pub fn log_event(e: &SockEvent) {
    let s = e.sock.as_ref();
    let n = e.netns_sysctls.as_ref();
    info!(
        target: "tcpstall::event",
        kind = e.kind.as_str(),
        mechanism = e.mechanism.as_str(),
        ts_ns = e.ts_ns,
        cookie = e.cookie,
        netns = e.netns,
        cgroup_id = e.cgroup_id,
        local = %e.local,
        remote = %e.remote,
        state = e.state.as_str(),
        old_state = e.old_state.as_str(),
        retransmits = e.retransmits,
        backoff = s.map(|s| s.backoff),
        pending = s.map(|s| s.pending),
        ca_state = s.map(|s| s.ca_state),
        probes_out = s.map(|s| s.probes_out),
        rto_jiffies = e.rto_jiffies,
        user_timeout_ms = s.map(|s| s.user_timeout_ms),
        retrans_stamp = s.map(|s| s.retrans_stamp),
        snd_una = e.snd_una,
        snd_wnd = s.map(|s| s.snd_wnd),
        packets_out = e.packets_out,
        retrans_out = e.retrans_out,
        timer_expires = s.map(|s| s.timer_expires),
        jiffies = e.jiffies,
        tcp_retries2 = n.map(|n| n.tcp_retries2),
        sk_err = e.sk_err,
        ack_seq = e.ack_seq,
        orphan = e.orphan,
        skaddr = e.skaddr,
        total_retrans = e.total_retrans,
        rto_max_jiffies = s.map(|s| s.rto_max_jiffies),
        usec_ts = s.map(|s| s.usec_ts),
        lsndtime = s.map(|s| s.lsndtime),
        rcv_tstamp = s.map(|s| s.rcv_tstamp),
        tcp_orphan_retries = n.map(|n| n.tcp_orphan_retries),
        tcp_rto_max_ms = n.and_then(|n| n.tcp_rto_max_ms),
        rto_expired_verdict = e.rto_expired_verdict,
        "event"
    );
}

/// The engine settings for `tcpstall run`. `hz`: the kernel's CONFIG_HZ when
/// the loader found it (else the engine calibrates from events).
pub fn engine_config(s: &Settings, hz: Option<u32>) -> EngineConfig {
    let d = EngineConfig::default();
    EngineConfig {
        hz,
        max_flows: s.max_flows,
        min_rto_streak: s.min_rto_streak,
        zero_window_after: s.zero_window_after,
        close_wait_after: s.close_wait_after,
        near_horizon_secs: s.near_horizon.as_secs_f64(),
        near_horizon_fraction: s.near_horizon_fraction,
        top_remotes: s.top_k_remotes,
        max_remotes: d.max_remotes.max(s.top_k_remotes),
        ..d
    }
}

/// The pod and the process owning a stalled socket.
pub(crate) type Owner = (Option<PodIdentity>, Option<ProcessInfo>);

/// Logs the engine facts worth a line each (stall start and end, timeouts).
fn log_observation(o: &Observation, owner: Option<&Owner>) {
    match *o {
        Observation::StallStarted {
            class,
            cookie,
            remote,
        } => {
            let pod = owner.and_then(|o| o.0.as_ref());
            let process = owner.and_then(|o| o.1.as_ref());
            let s = |f: fn(&PodIdentity) -> &str| pod.map(f).unwrap_or("");
            info!(
                class = class.as_str(),
                cookie,
                remote = %remote,
                pod = s(|p| &p.pod),
                namespace = s(|p| &p.namespace),
                container = s(|p| &p.container),
                pod_uid = s(|p| &p.pod_uid),
                pid = process.map(|p| p.pid),
                comm = process.map(|p| p.comm.as_str()).unwrap_or(""),
                "stall started"
            )
        }
        Observation::StreakEnded {
            remote,
            outcome,
            duration_s,
            rtos,
            stalled: true,
        } => info!(
            remote = %remote,
            outcome = outcome.as_str(),
            duration_s,
            rtos,
            "retransmission stall ended"
        ),
        Observation::Timeout {
            cookie,
            remote,
            evidence,
            prediction_error_s,
            lead_time_s,
            boundary_s,
            boundary_source,
            ..
        } => info!(
            cookie,
            remote = %remote,
            evidence = evidence.as_str(),
            prediction_error_s,
            lead_time_s,
            boundary_s,
            boundary_source = boundary_source.map(|b| b.to_string()),
            "socket timed out (ETIMEDOUT)"
        ),
        Observation::FlowEvicted {
            remote,
            active: true,
        } => debug!(remote = %remote, "flow table full: evicted an active flow"),
        _ => {}
    }
}

/// Everything the event loop and the server share.
pub struct AgentState {
    pub engine: Mutex<Engine>,
    pub metrics: Metrics,
    pub pods: Mutex<Identities>,
    pub plan: Plan,
    pub health: server::Health,
    /// CLOCK_MONOTONIC ns (replaceable in tests).
    pub clock: fn() -> u64,
    /// How long `/readyz` tolerates no drain.
    pub ready_stale_after: Duration,
    /// Per-request time limit.
    pub request_timeout: Duration,
    /// The hang-forever audit of the last sweep (None: no sweep yet).
    pub risks: Mutex<Option<crate::engine::risks::RiskReport>>,
}

impl AgentState {
    pub fn new(engine: Engine, metrics: Metrics, pods: Identities, plan: Plan) -> Self {
        Self {
            engine: Mutex::new(engine),
            metrics,
            pods: Mutex::new(pods),
            plan,
            health: server::Health::default(),
            clock: kernel::monotonic_ns,
            ready_stale_after: server::READY_STALE_AFTER,
            request_timeout: server::REQUEST_TIMEOUT,
            risks: Mutex::new(None),
        }
    }

    /// The engine, also after a panic elsewhere (its state is still usable).
    pub fn engine(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(PoisonError::into_inner)
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
        let incidents = crate::incidents::aggregate(
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
        if let Some(p) = crate::process::sample() {
            self.metrics.process(&p);
        }
        self.metrics.render(&live, format)
    }
}

/// The event loop's state between batches.
struct Pipeline {
    state: Arc<AgentState>,
    log_events: bool,
    observations: Vec<Observation>,
    events: Vec<SockEvent>,
    /// A sweep is running: decoded events wait here (see
    /// `Pipeline::finish_sweep`), bounded.
    hold: SweepHold,
    /// The held events overflowed during the last sweep: sweep again.
    sweep_again: bool,
    decode_errors: u64,
    last_stats: KernelStats,
    programs: ProgramStatsReader,
    /// Sum of the kernel's recursion misses over our programs.
    missed_runs: u64,
    /// Lost events seen since the last look (ring-buffer drops or missed runs).
    lost_events: bool,
}

impl Pipeline {
    /// Counts, logs and ingests one decoded batch; empties `batch`.
    /// Ingests a drained batch and tells `/readyz` the ring was drained.
    fn ingest(&mut self, batch: &mut Vec<Result<SockEvent, DecodeError>>) {
        self.ingest_events(batch);
        self.state.health.drained(kernel::monotonic_ns());
    }

    /// Ingests a drained batch without touching readiness (the start-up
    /// sweep drains first, and `/readyz` must stay 503 until it is done).
    fn ingest_events(&mut self, batch: &mut Vec<Result<SockEvent, DecodeError>>) {
        let metrics = &self.state.metrics;
        // Read just now: every event of the batch waited from its kernel
        // timestamp (CLOCK_MONOTONIC, as this clock) until the drain.
        let read_at = kernel::monotonic_ns();
        for item in batch.drain(..) {
            match item {
                Ok(ev) => {
                    metrics.event(ev.kind);
                    if ev.ts_ns != 0 {
                        metrics.event_delivered(read_at.saturating_sub(ev.ts_ns));
                    }
                    if self.log_events {
                        log_event(&ev);
                    }
                    self.events.push(ev);
                }
                Err(e) => {
                    self.decode_errors += 1;
                    metrics.decode_error();
                    error!(error = %e, total = self.decode_errors, "malformed event from the kernel");
                }
            }
        }
        // A sweep is running: its snapshots and these events are folded in
        // together, in time order, when it finishes; unless more events
        // arrive than the hold takes.
        match self.hold.offer(&mut self.events) {
            Offer::Held => return,
            Offer::NotHolding => {}
            Offer::Overflow { held } => {
                self.sweep_again = true;
                metrics.sweep.hold_overflowed();
                warn!(
                    held,
                    cap = self.hold.cap(),
                    "more events arrived during a socket sweep than one ring buffer holds: fed to the engine now instead of after the sweep (none lost; the sweep's older snapshots of their sockets are ignored); another sweep follows"
                );
            }
        }
        {
            let mut engine = self.state.engine();
            for ev in &self.events {
                engine.ingest(ev);
            }
            self.observations.extend(engine.drain_observations());
        }
        self.events.clear();
        self.apply_observations();
    }

    fn apply_observations(&mut self) {
        let started: Vec<u64> = self
            .observations
            .iter()
            .filter_map(|o| match o {
                Observation::StallStarted { cookie, .. } => Some(*cookie),
                _ => None,
            })
            .collect();
        let owners = self.owners(&started);
        for o in self.observations.drain(..) {
            self.state.metrics.observe(&o);
            let owner = match &o {
                Observation::StallStarted { cookie, .. } => owners.get(cookie),
                _ => None,
            };
            log_observation(&o, owner);
        }
    }

    /// Pod and process of the flows whose stall just started (bounded).
    fn owners(&self, cookies: &[u64]) -> HashMap<u64, Owner> {
        if cookies.is_empty() {
            return HashMap::new();
        }
        let views: Vec<StallView> = self
            .state
            .engine()
            .stalls(kernel::monotonic_ns())
            .into_iter()
            .filter(|v| v.cookie != 0 && cookies.contains(&v.cookie))
            .take(MAX_OWNER_LOOKUPS)
            .collect();
        let cookies: Vec<u64> = views.iter().map(|v| v.cookie).collect();
        cookies.into_iter().zip(self.state.owners(&views)).collect()
    }

    /// Advances the engine to `now` and reads the kernel counters.
    fn tick(&mut self, stats: &StatsReader) {
        let now = kernel::monotonic_ns();
        {
            let mut engine = self.state.engine();
            engine.tick(now);
            self.observations.extend(engine.drain_observations());
        }
        self.apply_observations();
        self.read_kernel_stats(stats);
        self.state.health.drained(now);
    }

    fn read_kernel_stats(&mut self, stats: &StatsReader) {
        match stats.read() {
            Ok(s) => {
                let dropped = s
                    .ringbuf_dropped
                    .saturating_sub(self.last_stats.ringbuf_dropped);
                if dropped > 0 {
                    self.lost_events = true;
                    self.state.metrics.ringbuf_dropped(dropped);
                    warn!(
                        dropped,
                        total = s.ringbuf_dropped,
                        "ring buffer full: events dropped (raise --ringbuf-bytes)"
                    );
                }
                self.last_stats = s;
            }
            Err(e) => error!(error = %e, "reading kernel counters failed"),
        }
        match self.programs.read() {
            Ok(samples) => {
                self.state.metrics.program_runtime(&samples);
                let missed: u64 = samples.iter().map(|s| s.recursion_misses).sum();
                if missed > self.missed_runs {
                    self.lost_events = true;
                    warn!(
                        missed = missed - self.missed_runs,
                        total = missed,
                        "the kernel skipped runs of tcpstall programs (already running on that CPU): their events are lost"
                    );
                }
                self.missed_runs = missed;
            }
            Err(e) => error!(error = %e, "reading kernel program statistics failed"),
        }
    }
}

impl Pipeline {
    /// Starts one sweep: first the events already in the ring (older than
    /// the sweep) are ingested, then the iterator is attached and read, and
    /// its records decoded and audited, on a blocking thread: the event loop
    /// keeps reading the ring and serving HTTP meanwhile. [`Self::finish_sweep`]
    /// folds the result in. None: the sweep could not start (logged, counted).
    fn start_sweep(
        &mut self,
        loaded: &mut loader::Loaded,
        reader: &mut Reader,
        stats: &StatsReader,
        batch: &mut Vec<Result<SockEvent, DecodeError>>,
        reason: SweepReason,
    ) -> Option<PendingSweep> {
        reader.drain_ready(batch);
        self.ingest_events(batch);
        let t0 = Instant::now();
        self.hold.start();
        let run = match loaded.start_sweep(stats) {
            Ok(r) => Arc::new(r),
            Err(e) => {
                self.state.metrics.sweep.failed();
                // Nothing was read since the hold started.
                self.events = self.hold.finish();
                self.ingest_events(&mut Vec::new());
                error!(error = %e, reason = reason.as_str(), "socket sweep failed");
                return None;
            }
        };
        let hz = self.state.engine().hz().0;
        let r = run.clone();
        let task = tokio::task::spawn_blocking(move || {
            let records = r.read()?;
            let (sockets, bad) = sweeping::decode_all(&records);
            let report =
                crate::engine::risks::audit(&sockets, hz, kernel::monotonic_ns(), RISKS_LISTED);
            Ok(SweepResult {
                sockets,
                bad,
                report,
            })
        });
        Some(PendingSweep {
            reason,
            t0,
            run,
            task,
        })
    }

    /// Folds a finished sweep in: first every event the ring holds now
    /// (those older than the snapshots included; newer ones make the engine
    /// ignore a snapshot: it never rolls a flow back, never resurrects a
    /// closed one), then the snapshots, then the audit.
    fn finish_sweep(
        &mut self,
        pending: PendingSweep,
        result: Result<Result<SweepResult, loader::SweepError>, tokio::task::JoinError>,
        reader: &mut Reader,
        stats: &StatsReader,
        batch: &mut Vec<Result<SockEvent, DecodeError>>,
    ) {
        let PendingSweep {
            reason, t0, run, ..
        } = pending;
        // Every event up to now joins the held ones.
        reader.drain_ready(batch);
        self.ingest_events(batch);
        let held = self.hold.finish();
        let out = result
            .map_err(|e| loader::SweepError::Run(format!("sweep thread: {e}")))
            .and_then(|r| r)
            .and_then(|r| Ok((run.finish(Vec::new(), stats)?, r)));
        let (
            out,
            SweepResult {
                sockets,
                bad,
                report,
            },
        ) = match out {
            Ok(o) => o,
            Err(e) => {
                self.state.metrics.sweep.failed();
                error!(error = %e, reason = reason.as_str(), "socket sweep failed");
                self.events = held;
                self.ingest_events(&mut Vec::new());
                return;
            }
        };
        if bad > 0 {
            self.decode_errors += bad as u64;
            error!(records = bad, "malformed sweep records from the kernel");
        }
        if out.overflow > 0 {
            warn!(
                lost = out.overflow,
                "sweep records did not fit the iterator buffer"
            );
        }
        let (seeded_before, repaired_before) = {
            let mut engine = self.state.engine();
            let st = engine.stats();
            let mut snapshots: Vec<&SockEvent> = sockets
                .iter()
                .map(|s| &s.ev)
                .filter(|ev| crate::engine::seed::classify_snapshot(ev).is_some())
                .collect();
            snapshots.sort_by_key(|ev| ev.ts_ns);
            for ev in merge_by_time(&snapshots, &held) {
                engine.ingest(ev);
            }
            self.observations.extend(engine.drain_observations());
            (st.sweep_seeded, st.sweep_repaired)
        };
        let mut per_pod: std::collections::HashMap<PodLabels, usize> = Default::default();
        {
            let t = Instant::now();
            let mut pods = self
                .state
                .pods
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // The sweep saw each socket's holder: the process resolver
            // needs no /proc scan for the stalled ones.
            for sk in sockets
                .iter()
                .filter(|sk| crate::engine::seed::classify_snapshot(&sk.ev).is_some())
            {
                pods.learn_process(
                    crate::identity::SocketKey {
                        netns: sk.ev.netns,
                        local: sk.ev.local,
                        remote: sk.ev.remote,
                    },
                    ProcessInfo {
                        pid: sk.pid,
                        comm: sk.comm.to_string_lossy(),
                    },
                    t,
                );
            }
            // The same identity as stalls: the socket's cgroup first, the
            // network namespace where there is no cgroup id.
            for (&(netns, cgroup_id), &n) in &report.by_owner {
                let id = pods.pod(&crate::identity::FlowRef::owner(netns, cgroup_id), t);
                let l = PodLabels {
                    namespace: id.as_ref().map(|p| p.namespace.clone()).unwrap_or_default(),
                    pod: id.map(|p| p.pod).unwrap_or_default(),
                };
                *per_pod.entry(l).or_default() += n;
            }
        }
        self.state.metrics.sweep.without_timeout(&per_pod);
        let elapsed = t0.elapsed();
        self.state.metrics.sweep.ran(
            reason,
            elapsed.as_secs_f64(),
            out.socket_files,
            sockets.len(),
        );
        let at_risk = report.total;
        *self
            .state
            .risks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(report);
        self.apply_observations();
        let st = self.state.engine().stats();
        info!(
            reason = reason.as_str(),
            duration_ms = elapsed.as_secs_f64() * 1e3,
            socket_files = out.socket_files,
            tcp_sockets = sockets.len(),
            seeded = st.sweep_seeded - seeded_before,
            repaired = st.sweep_repaired - repaired_before,
            without_timeout = at_risk,
            "socket sweep"
        );
    }
}

/// The events read while a sweep ran and its snapshots, in time order (a
/// snapshot before every event later than it, after every earlier one;
/// events keep their ring order): folded in as if the sweep had taken no
/// time, so no snapshot lands after a newer event of its socket (which
/// could resurrect a socket that closed meanwhile) and no event older than
/// a snapshot lands after it.
fn merge_by_time<'a>(
    snapshots: &'a [&'a SockEvent],
    events: &'a [SockEvent],
) -> impl Iterator<Item = &'a SockEvent> + 'a {
    let (mut s, mut e) = (0, 0);
    std::iter::from_fn(move || match (snapshots.get(s), events.get(e)) {
        (Some(a), Some(b)) if a.ts_ns <= b.ts_ns => {
            s += 1;
            Some(*a)
        }
        (_, Some(b)) => {
            e += 1;
            Some(b)
        }
        (Some(a), None) => {
            s += 1;
            Some(*a)
        }
        (None, None) => None,
    })
}

/// A sweep running on a blocking thread.
struct PendingSweep {
    reason: SweepReason,
    t0: Instant,
    run: Arc<loader::SweepRun>,
    task: tokio::task::JoinHandle<Result<SweepResult, loader::SweepError>>,
}

/// What the blocking thread computes from one sweep.
struct SweepResult {
    sockets: Vec<crate::engine::risks::SweptSocket>,
    bad: usize,
    report: crate::engine::risks::RiskReport,
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let opts = LoaderOptions {
        ringbuf_bytes: settings.ringbuf_bytes,
        force_write_timer: settings.mechanism,
        cgroup: settings.cgroup.clone(),
        btf_path: settings.btf.clone(),
        try_all: false,
        disabled: if settings.no_ack_probe {
            vec![(crate::probes::ACK, "--no-ack-probe")]
        } else {
            Vec::new()
        },
        denied: settings.deny_programs.clone(),
    };
    // Before loading anything: the one line is the whole output.
    if settings.program_stats && !kernel::Privileges::current().cap_sys_admin {
        anyhow::bail!(
            "--program-stats needs CAP_SYS_ADMIN (the kernel's BPF_ENABLE_STATS): grant it or run without --program-stats"
        );
    }
    let mut loaded = loader::load(&opts).context("loading probes")?;
    log_plan(&loaded.plan);
    let ring = loaded.take_events()?;
    let stats = loaded.take_stats()?;
    let programs = loaded.program_stats(settings.program_stats)?;
    let mut reader = Reader::new(ring).context("watching the ring buffer")?;

    let engine =
        Engine::new(engine_config(&settings, loaded.plan.hz)).context("invalid engine settings")?;
    let metrics = Metrics::new(
        &MetricsConfig {
            max_remote_labels: settings.max_remote_labels,
            top_k_flows: settings.top_k_flows,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            kernel: loaded.plan.kernel.clone(),
            node: settings.node_name.clone(),
            max_incidents: settings.max_incidents,
        },
        &loaded.plan.probes,
    );
    let features = crate::features::features(
        &loaded.sweep_program(),
        settings.startup_sweep,
        settings.sweep_on_loss,
        settings.sweep_interval.is_some(),
    );
    log_features(&features);
    metrics.set_features(&features);
    let pods = Identities::new(&IdentityConfig {
        proc_root: settings.proc_root.clone(),
        cgroup2_root: kernel::cgroup2_root(),
        runtimes: settings.runtimes.clone(),
        netns_refresh: POD_REFRESH,
    });
    let state = Arc::new(AgentState::new(engine, metrics, pods, loaded.plan.clone()));

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {} (--listen)", settings.listen))?;
    let listen = listener.local_addr().unwrap_or(settings.listen);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut server = tokio::spawn(server::serve(listener, state.clone(), async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    }));
    let mut server_done = false;

    let mut pipeline = Pipeline {
        state: state.clone(),
        log_events: settings.log_events,
        observations: Vec::with_capacity(1024),
        events: Vec::with_capacity(1024),
        hold: SweepHold::new(SweepHold::cap_for_ring(settings.ringbuf_bytes)),
        sweep_again: false,
        decode_errors: 0,
        last_stats: KernelStats::default(),
        programs,
        missed_runs: 0,
        lost_events: false,
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch: Vec<Result<SockEvent, DecodeError>> = Vec::with_capacity(1024);
    let (hz, hz_source) = state.engine().hz();
    info!(
        listen = %listen,
        kernel = %loaded.plan.kernel,
        hz,
        hz_source = hz_source.as_str(),
        sweep = loaded.sweep_program().unwrap_or("unavailable"),
        "tcpstall running"
    );
    let mut policy = SweepPolicy::new(
        settings.sweep_interval,
        settings.sweep_on_loss,
        LOSS_SWEEP_GAP,
    );
    match loaded.sweep_available() {
        Ok(()) if settings.startup_sweep => {
            // Before the first drain: /readyz turns ready only after it.
            policy.ran(Instant::now(), SweepReason::Startup);
            if let Some(mut p) = pipeline.start_sweep(
                &mut loaded,
                &mut reader,
                &stats,
                &mut batch,
                SweepReason::Startup,
            ) {
                let r = (&mut p.task).await;
                pipeline.finish_sweep(p, r, &mut reader, &stats, &mut batch);
            }
        }
        Ok(()) => policy.ran(Instant::now(), SweepReason::Startup),
        Err(_) => {
            // Said once per feature above (`feature off`).
            policy = SweepPolicy::new(None, false, LOSS_SWEEP_GAP);
        }
    }
    let mut failure: Option<anyhow::Error> = None;
    let mut reader_failed = false;
    // At most one sweep at a time, off the event loop.
    let mut sweeping: Option<PendingSweep> = None;
    loop {
        tokio::select! {
            r = reader.read_batch(&mut batch) => {
                if let Err(e) = r {
                    error!(error = %e, "reading the ring buffer failed; stopping");
                    failure = Some(anyhow::Error::new(e).context("reading the ring buffer"));
                    reader_failed = true;
                    break;
                }
                pipeline.ingest(&mut batch);
            }
            _ = tick.tick() => {
                pipeline.tick(&stats);
                if std::mem::take(&mut pipeline.lost_events) {
                    policy.loss();
                }
                if std::mem::take(&mut pipeline.sweep_again) {
                    policy.again();
                }
                if sweeping.is_none()
                    && let Some(reason) = policy.due(Instant::now())
                {
                    // Counted from the start: a loss reported while this
                    // sweep runs triggers the next one.
                    policy.ran(Instant::now(), reason);
                    sweeping = pipeline.start_sweep(&mut loaded, &mut reader, &stats, &mut batch, reason);
                }
            }
            r = async { (&mut sweeping.as_mut().expect("guarded").task).await }, if sweeping.is_some() => {
                if let Some(p) = sweeping.take() {
                    pipeline.finish_sweep(p, r, &mut reader, &stats, &mut batch);
                }
            }
            r = &mut server, if !server_done => {
                server_done = true;
                let e = match r {
                    Ok(Ok(())) => anyhow::anyhow!("the HTTP server stopped unexpectedly"),
                    Ok(Err(e)) => anyhow::Error::new(e).context("the HTTP server failed"),
                    Err(e) => anyhow::Error::new(e).context("the HTTP server task failed"),
                };
                error!(error = %format!("{e:#}"), "stopping");
                failure = Some(e);
                break;
            }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
        }
    }

    // 1. Stop serving: /readyz says so at once, then in-flight requests finish.
    state.health.set_stopping();
    let _ = stop_tx.send(true);
    if !server_done {
        match tokio::time::timeout(SERVER_STOP_TIMEOUT, &mut server).await {
            Ok(Ok(Ok(()))) => debug!("HTTP server stopped"),
            Ok(Ok(Err(e))) => warn!(error = %e, "HTTP server failed while stopping"),
            Ok(Err(e)) => warn!(error = %e, "HTTP server task failed while stopping"),
            Err(_) => {
                warn!(
                    timeout_s = SERVER_STOP_TIMEOUT.as_secs(),
                    "HTTP requests still running at shutdown; aborting them"
                );
                server.abort();
            }
        }
    }

    // 2. Drain what is already in the ring so nothing submitted is lost.
    if !reader_failed {
        let t0 = Instant::now();
        while t0.elapsed() < FINAL_DRAIN_LIMIT {
            match tokio::time::timeout(FINAL_DRAIN_QUIET, reader.read_batch(&mut batch)).await {
                Ok(Ok(())) => pipeline.ingest(&mut batch),
                Ok(Err(e)) => {
                    warn!(error = %e, "reading the ring buffer at shutdown failed");
                    break;
                }
                Err(_) => break,
            }
        }
    }
    pipeline.tick(&stats);

    // 3. The summary (its fields are part of the test contract).
    let stats_final = stats.read().unwrap_or(pipeline.last_stats);
    // Each attached program's kernel run count (`name=runs`, comma
    // separated) while run-time statistics are on (`--program-stats`),
    // else empty.
    let program_runs = match pipeline.programs.read() {
        Ok(samples) if pipeline.programs.run_time_enabled() => samples
            .iter()
            .map(|s| format!("{}={}", s.program, s.run_count))
            .collect::<Vec<_>>()
            .join(","),
        _ => String::new(),
    };
    info!(
        program_runs = %program_runs,
        submitted = stats_final.submitted,
        dropped = stats_final.ringbuf_dropped,
        read_errors = stats_final.read_errors,
        missed_runs = pipeline.missed_runs,
        decode_errors = pipeline.decode_errors,
        timer_not_due = stats_final.timer_not_due,
        retransmit_failed = stats_final.retransmit_failed,
        "tcpstall stopped"
    );

    // 4. Detach every probe.
    drop(pipeline);
    drop(reader);
    drop(loaded);
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Snapshots of a sweep and the events read while it ran are folded in
    /// time order: a socket that closed during the sweep has its close
    /// event after its (older) snapshot, so the snapshot cannot resurrect
    /// it; events keep their ring order.
    /// Mutation: `a.ts_ns <= b.ts_ns` -> `a.ts_ns > b.ts_ns` in
    /// `merge_by_time` puts the snapshot after the newer close.
    #[test]
    fn sweep_snapshots_merge_with_held_events_by_time() {
        let ev = |kind, ts_ns| {
            let mut raw = tcpstall_common::Event::zeroed();
            raw.kind = kind;
            raw.source = tcpstall_common::source::SWEEP;
            raw.ts_ns = ts_ns;
            raw.sock.family = 2;
            SockEvent::from_raw(&raw).expect("decodes")
        };
        use tcpstall_common::kind::{STATE, SWEEP};
        let snaps = [ev(SWEEP, 5), ev(SWEEP, 9)];
        let snap_refs: Vec<&SockEvent> = snaps.iter().collect();
        let held = [ev(STATE, 3), ev(STATE, 7), ev(STATE, 6), ev(STATE, 12)];
        let order: Vec<u64> = merge_by_time(&snap_refs, &held).map(|e| e.ts_ns).collect();
        assert_eq!(order, [3, 5, 7, 6, 9, 12]);
        assert_eq!(merge_by_time(&snap_refs, &[]).count(), 2);
        assert_eq!(merge_by_time(&[], &held).count(), 4);
    }

    #[test]
    fn engine_config_from_settings() {
        let s = Settings::default();
        let c = engine_config(&s, Some(250));
        assert_eq!(c.hz, Some(250));
        assert_eq!(c.max_flows, 65_536);
        assert_eq!(c.min_rto_streak, 2);
        assert_eq!(c.near_horizon_secs, 60.0);
        assert_eq!(c.top_remotes, 100);
        c.validate().expect("defaults are valid");
        assert!(Engine::new(c).is_ok());

        let s = Settings {
            near_horizon: Duration::from_millis(1_500),
            top_k_remotes: 50_000,
            zero_window_after: Duration::from_secs(3),
            close_wait_after: Duration::from_secs(2),
            max_flows: 10,
            min_rto_streak: 3,
            near_horizon_fraction: 0.25,
            ..Settings::default()
        };
        let c = engine_config(&s, None);
        assert_eq!(c.hz, None);
        assert_eq!(c.near_horizon_secs, 1.5);
        assert_eq!(c.top_remotes, 50_000);
        assert!(c.max_remotes >= c.top_remotes);
        assert_eq!(c.zero_window_after, Duration::from_secs(3));
        assert_eq!(c.close_wait_after, Duration::from_secs(2));
        assert_eq!((c.max_flows, c.min_rto_streak), (10, 3));
        assert_eq!(c.near_horizon_fraction, 0.25);
        c.validate().expect("valid");
    }
}
