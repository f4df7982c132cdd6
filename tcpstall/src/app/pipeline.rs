//! The event loop's state between batches ([`Pipeline`]): ingesting decoded
//! batches into the engine and the metrics, ticking, reading the kernel-side
//! counters, and calling the socket sweep's steps in order around the hold
//! (the sweep's own work is in [`crate::sweep::cycle`]).

use std::{collections::HashMap, sync::Arc, time::Instant};

use tracing::{error, info, warn};

use super::{
    drop_gate::{self, DropGate, GateAction},
    logs::{log_event, log_observation},
};
use crate::{
    engine::{Observation, StallView},
    identity::Owner,
    kernel::{
        event::{DecodeError, SockEvent},
        facts,
        loader::{self, KernelStats, ProgramStatsReader, StatsReader},
        reader::Reader,
    },
    serve::state::AgentState,
    sweep::{
        Offer, SweepHold, SweepReason,
        cycle::{self, PendingSweep, SweepResult},
    },
};

/// Stall starts per batch whose owner (pod, process) is resolved for the
/// log line; the rest are logged without (the API resolves them on demand).
const MAX_OWNER_LOOKUPS: usize = 32;
/// Entries of `/api/v1/risks` (longest idle first).
const RISKS_LISTED: usize = 1_000;

/// The event loop's state between batches.
pub(super) struct Pipeline {
    pub(super) state: Arc<AgentState>,
    pub(super) log_events: bool,
    pub(super) observations: Vec<Observation>,
    pub(super) events: Vec<SockEvent>,
    /// A sweep is running: decoded events wait here (see
    /// `Pipeline::finish_sweep`), bounded.
    pub(super) hold: SweepHold,
    /// The held events overflowed during the last sweep: sweep again.
    pub(super) sweep_again: bool,
    pub(super) decode_errors: u64,
    pub(super) last_stats: KernelStats,
    pub(super) programs: ProgramStatsReader,
    /// Sum of the kernel's recursion misses over our programs.
    pub(super) missed_runs: u64,
    /// Lost events seen since the last look (ring-buffer drops or missed runs).
    pub(super) lost_events: bool,
    /// A stall started since the last look (the sweep's gap goes back to
    /// `--sweep-interval`).
    pub(super) stall_started: bool,
    /// The drop probe's in-kernel filter (None: the probe is not attached).
    pub(super) episodes: Option<loader::EpisodeFilter>,
    pub(super) episode_cookies: Vec<u64>,
    /// The drop program, attached only while the gate says so (None: the
    /// probe is not attached on this kernel).
    pub(super) drop_switch: Option<loader::DropSwitch>,
    pub(super) drop_gate: DropGate,
}

impl Pipeline {
    /// Counts, logs and ingests one decoded batch; empties `batch`.
    /// Ingests a drained batch and tells `/readyz` the ring was drained.
    pub(super) fn ingest(&mut self, batch: &mut Vec<Result<SockEvent, DecodeError>>) {
        self.ingest_events(batch);
        self.state.health.drained(facts::monotonic_ns());
    }

    /// Ingests a drained batch without touching readiness (the start-up
    /// sweep drains first, and `/readyz` must stay 503 until it is done).
    pub(super) fn ingest_events(&mut self, batch: &mut Vec<Result<SockEvent, DecodeError>>) {
        let metrics = &self.state.metrics;
        // Read just now: every event of the batch waited from its kernel
        // timestamp (CLOCK_MONOTONIC, as this clock) until the drain.
        let read_at = facts::monotonic_ns();
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
        self.sync_episodes();
    }

    /// Makes the drop probe's kernel filter hold exactly the flows in a loss
    /// episode (their packets' drops are then reported).
    pub(super) fn sync_episodes(&mut self) {
        let Some(filter) = self.episodes.as_mut() else {
            return;
        };
        self.episode_cookies.clear();
        self.state
            .engine()
            .episode_cookies(&mut self.episode_cookies);
        let failed = filter.sync(&self.episode_cookies);
        if failed > 0 {
            self.state.metrics.episode_filter_failed(failed);
            warn!(
                failed,
                held = filter.len(),
                "updating the drop probe's socket filter failed: drops of those sockets are not seen"
            );
        }
        // After the filter: the program never runs without its sockets.
        let episodes = self.episode_cookies.len();
        self.gate_drop_probe(episodes);
    }

    /// Attaches the drop probe when a first flow is in a loss episode and
    /// detaches it once none has been for a while (see [`DropGate`]).
    fn gate_drop_probe(&mut self, episodes: usize) {
        let Some(switch) = self.drop_switch.as_mut() else {
            return;
        };
        let now = Instant::now();
        let error = match self.drop_gate.decide(episodes, now) {
            GateAction::Nothing => return,
            GateAction::Detach => {
                switch.detach();
                info!(
                    program = switch.program(),
                    idle_s = drop_gate::DETACH_AFTER.as_secs(),
                    "drop probe detached: no flow in a loss episode"
                );
                None
            }
            GateAction::Attach => match switch.attach() {
                Ok(()) => {
                    self.drop_gate.attach_result(true, now);
                    info!(
                        program = switch.program(),
                        episodes, "drop probe attached: a flow is in a loss episode"
                    );
                    None
                }
                Err(e) => {
                    self.drop_gate.attach_result(false, now);
                    self.state.metrics.drop_probe_attach_failed();
                    error!(
                        program = switch.program(),
                        error = %e,
                        retry_s = drop_gate::RETRY_AFTER.as_secs(),
                        "attaching the drop probe failed: drops of sockets in a loss episode are not seen (their cause may read peer_silent)"
                    );
                    Some(e.to_string())
                }
            },
        };
        let attached = switch.attached();
        self.state.metrics.drop_probe_attached(attached);
        let mut shown = self
            .state
            .drop_probe
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(d) = shown.as_mut() {
            d.attached = attached;
            match error {
                Some(e) => {
                    d.attach_errors += 1;
                    d.last_error = Some(e);
                }
                None => d.attaches += u64::from(attached),
            }
        }
    }

    pub(super) fn apply_observations(&mut self) {
        let started: Vec<u64> = self
            .observations
            .iter()
            .filter_map(|o| match o {
                Observation::StallStarted { cookie, .. } => Some(*cookie),
                _ => None,
            })
            .collect();
        self.stall_started |= !started.is_empty();
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
    pub(super) fn owners(&self, cookies: &[u64]) -> HashMap<u64, Owner> {
        if cookies.is_empty() {
            return HashMap::new();
        }
        let views: Vec<StallView> = self
            .state
            .engine()
            .stalls(facts::monotonic_ns())
            .into_iter()
            .filter(|v| v.cookie != 0 && cookies.contains(&v.cookie))
            .take(MAX_OWNER_LOOKUPS)
            .collect();
        let cookies: Vec<u64> = views.iter().map(|v| v.cookie).collect();
        cookies.into_iter().zip(self.state.owners(&views)).collect()
    }

    /// Advances the engine to `now` and reads the kernel counters.
    pub(super) fn tick(&mut self, stats: &StatsReader) {
        let now = facts::monotonic_ns();
        {
            let mut engine = self.state.engine();
            engine.tick(now);
            self.observations.extend(engine.drain_observations());
        }
        self.apply_observations();
        self.sync_episodes();
        self.read_kernel_stats(stats);
        self.state.health.drained(now);
    }

    pub(super) fn read_kernel_stats(&mut self, stats: &StatsReader) {
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
    /// Starts one sweep ([`cycle::start`]): first the events already in the
    /// ring (older than the sweep) are ingested and the hold starts, then
    /// the iterator runs on a blocking thread. [`Self::finish_sweep`] folds
    /// the result in. None: the sweep could not start (logged, counted).
    pub(super) fn start_sweep(
        &mut self,
        loaded: &mut loader::Loaded,
        reader: &mut Reader,
        stats: &StatsReader,
        batch: &mut Vec<Result<SockEvent, DecodeError>>,
        reason: SweepReason,
    ) -> Option<PendingSweep> {
        reader.drain_ready(batch);
        self.ingest_events(batch);
        self.hold.start();
        let hz = self.state.engine().hz().0;
        match cycle::start(loaded, stats, hz, RISKS_LISTED, reason) {
            Ok(p) => Some(p),
            Err(e) => {
                let held = self.hold.finish();
                self.sweep_failed(reason, &e, held);
                None
            }
        }
    }

    /// Folds a finished sweep in: first every event the ring holds now
    /// (those older than the snapshots included; newer ones make the engine
    /// ignore a snapshot: it never rolls a flow back, never resurrects a
    /// closed one), then the snapshots ([`cycle::seed`]), then the audit
    /// and its owners ([`cycle::owners_per_pod`]). Returns the stalled
    /// sockets the engine learned something from (seeded or repaired; 0 if
    /// the sweep failed).
    pub(super) fn finish_sweep(
        &mut self,
        pending: PendingSweep,
        result: Result<Result<SweepResult, loader::SweepError>, tokio::task::JoinError>,
        reader: &mut Reader,
        stats: &StatsReader,
        batch: &mut Vec<Result<SockEvent, DecodeError>>,
    ) -> u64 {
        let PendingSweep {
            reason, t0, run, ..
        } = pending;
        // Every event up to now joins the held ones.
        reader.drain_ready(batch);
        self.ingest_events(batch);
        let held = self.hold.finish();
        let (out, mut r) = match cycle::finish(&run, result, stats) {
            Ok(o) => o,
            Err(e) => {
                self.sweep_failed(reason, &e, held);
                return 0;
            }
        };
        if r.bad > 0 {
            self.decode_errors += r.bad as u64;
            error!(records = r.bad, "malformed sweep records from the kernel");
        }
        if out.overflow > 0 {
            warn!(
                lost = out.overflow,
                "sweep records did not fit the iterator buffer"
            );
        }
        let stalled = cycle::stalled(&r.sockets);
        let (before, observations) = {
            let mut engine = self.state.engine();
            let before = engine.stats();
            (before, cycle::seed(&mut engine, &stalled, &held))
        };
        self.observations.extend(observations);
        let per_pod = cycle::owners_per_pod(
            &mut self
                .state
                .pods
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            &stalled,
            &r.report,
            Instant::now(),
        );
        self.state.metrics.sweep.without_timeout(&per_pod);
        // Sockets the kernel skipped (no record) still count as TCP
        // sockets, and as established ones in the audit's summary.
        r.report.established += out.skipped_established as usize;
        let tcp_sockets = r.sockets.len() + out.skipped as usize;
        let elapsed = t0.elapsed();
        self.state
            .metrics
            .sweep
            .ran(reason, elapsed.as_secs_f64(), out.socket_files, tcp_sockets);
        let at_risk = r.report.total;
        *self
            .state
            .risks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(r.report);
        self.apply_observations();
        let st = self.state.engine().stats();
        let (seeded, repaired) = (
            st.sweep_seeded - before.sweep_seeded,
            st.sweep_repaired - before.sweep_repaired,
        );
        info!(
            reason = reason.as_str(),
            duration_ms = elapsed.as_secs_f64() * 1e3,
            socket_files = out.socket_files,
            tcp_sockets,
            records = r.sockets.len(),
            seeded,
            repaired,
            without_timeout = at_risk,
            "socket sweep"
        );
        seeded + repaired
    }

    /// A sweep that failed: counted and logged; the events held meanwhile
    /// go to the engine now (none lost).
    fn sweep_failed(&mut self, reason: SweepReason, e: &loader::SweepError, held: Vec<SockEvent>) {
        self.state.metrics.sweep.failed();
        error!(error = %e, reason = reason.as_str(), "socket sweep failed");
        self.events = held;
        self.ingest_events(&mut Vec::new());
    }
}
