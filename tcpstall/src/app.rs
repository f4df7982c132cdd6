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
//!
//! This file wires the wings together ([`run`]); the event loop's state
//! between batches is `pipeline`, its log lines are in `logs`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};

use crate::{
    cli::config::Settings,
    engine::{Engine, EngineConfig},
    identity::{Identities, IdentityConfig},
    kernel::{
        event::{DecodeError, SockEvent},
        facts,
        loader::{self, KernelStats, LoaderOptions},
        reader::Reader,
    },
    serve::{
        metrics::{Metrics, MetricsConfig},
        server,
        state::AgentState,
    },
    sweep::{SweepHold, SweepPolicy, SweepReason, cycle::PendingSweep},
};

/// How often the engine's clock advances and kernel counters are read.
const TICK: Duration = Duration::from_secs(1);
/// How long /proc-derived pod identities are reused before a rescan.
const POD_REFRESH: Duration = Duration::from_secs(30);
/// Time allowed for in-flight HTTP requests at shutdown.
const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Loss-triggered sweeps run at most this often.
const LOSS_SWEEP_GAP: Duration = Duration::from_secs(2);
/// Upper bound on the final ring-buffer drain at shutdown.
const FINAL_DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// The final drain ends once the ring stays empty this long.
const FINAL_DRAIN_QUIET: Duration = Duration::from_millis(100);

mod drop_gate;
mod guard;
mod logs;
mod pipeline;

use logs::{log_features, log_plan};
use pipeline::Pipeline;

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

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    // The guard's policy first: an invalid one is the whole output.
    let policy = match (&settings.guard_policy, settings.no_guard) {
        (Some(path), false) => Some(guard::load_policy(path)?),
        _ => None,
    };
    let mut disabled = Vec::new();
    if settings.no_ack_probe {
        disabled.push((crate::kernel::probes::ACK, "--no-ack-probe"));
    }
    if policy.is_none() {
        let why = if settings.no_guard {
            "--no-guard"
        } else {
            "no --guard-policy"
        };
        disabled.push((crate::kernel::probes::GUARD, why));
    }
    let opts = LoaderOptions {
        ringbuf_bytes: settings.ringbuf_bytes,
        force_write_timer: settings.mechanism,
        cgroup: settings.cgroup.clone(),
        btf_path: settings.btf.clone(),
        try_all: false,
        disabled,
        denied: settings.deny_programs.clone(),
    };
    // Before loading anything: the one line is the whole output.
    if settings.program_stats && !facts::Privileges::current().cap_sys_admin {
        anyhow::bail!(
            "--program-stats needs CAP_SYS_ADMIN (the kernel's BPF_ENABLE_STATS): grant it or run without --program-stats"
        );
    }
    let mut loaded = loader::load(&opts).context("loading probes")?;
    let ring = loaded.take_events()?;
    let stats = loaded.take_stats()?;
    let programs = loaded.program_stats(settings.program_stats)?;
    let reader_mode = loaded.take_reader_mode()?;
    let mut reader = Reader::new(ring, Some(reader_mode)).context("watching the ring buffer")?;

    // The drop probe's filter: only where the probe is attached.
    let drops_visible = loaded.plan.chosen(crate::kernel::probes::DROP).is_some();
    let episodes = if drops_visible {
        Some(loaded.take_episodes()?)
    } else {
        None
    };
    // Loaded once, attached only while a flow is in a loss episode.
    let drop_switch = if drops_visible {
        loaded.take_drop_switch()?
    } else {
        None
    };
    log_plan(&loaded.plan, drop_switch.as_ref().map(|sw| sw.program()));
    let engine = Engine::new(EngineConfig {
        drops_visible,
        drop_reason_names: loaded.plan.drop_reasons.clone(),
        ..engine_config(&settings, loaded.plan.hz)
    })
    .context("invalid engine settings")?;
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
    let features = crate::sweep::features::features(
        &loaded.sweep_program(),
        settings.startup_sweep,
        settings.sweep_on_loss,
        settings.sweep_interval.is_some(),
    );
    log_features(&features);
    metrics.set_features(&features);
    let identity_cfg = IdentityConfig {
        proc_root: settings.proc_root.clone(),
        cgroup2_root: facts::cgroup2_root(),
        runtimes: settings.runtimes.clone(),
        netns_refresh: POD_REFRESH,
    };
    let pods = Identities::new(&identity_cfg);
    let mut state = AgentState::new(engine, metrics, pods, loaded.plan.clone());
    state.liveness_timeout = settings.liveness_timeout;
    if let Some(sw) = &drop_switch {
        *state
            .drop_probe
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(crate::serve::state::DropProbeState {
                program: sw.program(),
                detach_after_s: drop_gate::DETACH_AFTER.as_secs(),
                ..Default::default()
            });
    }
    let state = Arc::new(state);
    let mut guard_runner = match (policy, loaded.take_guard()?) {
        (Some(policy), Some(maps)) => Some(guard::GuardRunner::start(
            maps,
            policy,
            &identity_cfg,
            &state,
        )),
        (Some(_), None) => {
            let why = loaded
                .plan
                .probes
                .iter()
                .find(|p| p.probe == crate::kernel::probes::GUARD)
                .map_or_else(
                    || "no guard probe".to_owned(),
                    |p| p.outcome().err().unwrap_or_default(),
                );
            error!(why = %why, "guard off: its kernel program could not be attached (tcpstall doctor); sockets are not changed");
            *state
                .guard_off
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(format!("kernel: {why}"));
            None
        }
        (None, _) => {
            let why = if settings.no_guard {
                "--no-guard"
            } else {
                "no --guard-policy"
            };
            *state
                .guard_off
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why.to_owned());
            None
        }
    };

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

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
        stall_started: false,
        episodes,
        episode_cookies: Vec::new(),
        drop_switch,
        drop_gate: Default::default(),
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
        settings.sweep_interval_max,
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
                let found = pipeline.finish_sweep(p, r, &mut reader, &stats, &mut batch);
                policy.finished(SweepReason::Startup, found);
            }
        }
        Ok(()) => policy.ran(Instant::now(), SweepReason::Startup),
        Err(_) => {
            // Said once per feature above (`feature off`).
            policy = SweepPolicy::new(None, Duration::ZERO, false, LOSS_SWEEP_GAP);
        }
    }
    state.metrics.sweep.interval(policy.gap());
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
                if let Some(g) = guard_runner.as_mut() {
                    g.tick(&state);
                }
                if std::mem::take(&mut pipeline.lost_events) {
                    policy.loss();
                }
                if std::mem::take(&mut pipeline.sweep_again) {
                    policy.again();
                }
                if std::mem::take(&mut pipeline.stall_started) {
                    policy.busy();
                }
                state.metrics.sweep.interval(policy.gap());
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
                    let reason = p.reason;
                    let found = pipeline.finish_sweep(p, r, &mut reader, &stats, &mut batch);
                    policy.finished(reason, found);
                    state.metrics.sweep.interval(policy.gap());
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
            _ = sighup.recv() => {
                match guard_runner.as_mut() {
                    Some(g) => { info!("SIGHUP: reloading the guard policy"); g.reload(&state); }
                    None => info!("SIGHUP: nothing to reload (the guard is off)"),
                }
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
        // Whatever the reader's mode, what is in the ring now.
        if reader.drain_ready(&mut batch) > 0 {
            pipeline.ingest(&mut batch);
        }
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
        ring_reads_woken = reader.counts().woken,
        ring_reads_timed = reader.counts().timed,
        "tcpstall stopped"
    );

    // 4. Detach every probe (the guard's too: sockets it changed keep
    // their options).
    drop(guard_runner);
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
