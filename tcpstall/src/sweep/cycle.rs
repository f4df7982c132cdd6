//! One socket sweep, agent side, from start to finish: the iterator
//! attached and its records read, decoded and audited on a blocking thread
//! ([`start`], [`read_and_audit`]; a [`PendingSweep`] awaits the result),
//! the run finished ([`finish`]), the snapshots of stalled sockets folded
//! into the engine in time order with the events held meanwhile ([`seed`],
//! [`merge_by_time`]), and the holders of those sockets and the audit's
//! per-pod counts resolved ([`owners_per_pod`]). The event loop's
//! `Pipeline` (in `crate::app`, which owns the engine, the hold and the
//! metrics) only calls these in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::risks::{self, RiskReport, SweptSocket};
use super::{PodLabels, SweepReason};
use crate::engine::{Engine, Observation, seed::classify_snapshot};
use crate::identity::{FlowRef, Identities, ProcessInfo, SocketKey};
use crate::kernel::event::SockEvent;
use crate::kernel::{
    facts,
    loader::{self, StatsReader, SweepError, SweepOutput},
};

/// Attaches the sweep iterator and starts reading it on a blocking thread:
/// the event loop keeps reading the ring and serving HTTP meanwhile. At most
/// `listed` at-risk sockets are listed by the audit.
pub fn start(
    loaded: &mut loader::Loaded,
    stats: &StatsReader,
    hz: u32,
    listed: usize,
    reason: SweepReason,
) -> Result<PendingSweep, SweepError> {
    let t0 = Instant::now();
    let run = Arc::new(loaded.start_sweep(stats)?);
    let r = run.clone();
    let task = tokio::task::spawn_blocking(move || read_and_audit(&r, hz, listed));
    Ok(PendingSweep {
        reason,
        t0,
        run,
        task,
    })
}

/// The blocking thread's result joined with the run's end (the kernel-side
/// counts of the iterator).
pub fn finish(
    run: &loader::SweepRun,
    result: Result<Result<SweepResult, SweepError>, tokio::task::JoinError>,
    stats: &StatsReader,
) -> Result<(SweepOutput, SweepResult), SweepError> {
    let r = result.map_err(|e| SweepError::Run(format!("sweep thread: {e}")))??;
    Ok((run.finish(Vec::new(), stats)?, r))
}

/// The swept sockets the engine takes a snapshot of (those in a stall
/// class: retransmitting, zero window, CLOSE_WAIT ...), classified once.
pub fn stalled(sockets: &[SweptSocket]) -> Vec<&SweptSocket> {
    sockets
        .iter()
        .filter(|sk| classify_snapshot(&sk.ev).is_some())
        .collect()
}

/// Folds the snapshots of `stalled` sockets into the engine, in time order
/// with the events `held` while the sweep ran ([`merge_by_time`]), and
/// returns the engine's observations.
pub fn seed(engine: &mut Engine, stalled: &[&SweptSocket], held: &[SockEvent]) -> Vec<Observation> {
    let mut snapshots: Vec<&SockEvent> = stalled.iter().map(|s| &s.ev).collect();
    snapshots.sort_by_key(|ev| ev.ts_ns);
    for ev in merge_by_time(&snapshots, held) {
        engine.ingest(ev);
    }
    engine.drain_observations().collect()
}

/// Teaches the identity resolver the holder (pid, comm) of each stalled
/// socket, seen by the sweep, so no `/proc` scan is needed for them; and
/// counts the audit's sockets without a timeout per pod, with the same
/// identity as stalls (the socket's cgroup first, the network namespace
/// where there is no cgroup id).
pub fn owners_per_pod(
    pods: &mut Identities,
    stalled: &[&SweptSocket],
    report: &RiskReport,
    now: Instant,
) -> HashMap<PodLabels, usize> {
    for sk in stalled {
        pods.learn_process(
            SocketKey {
                netns: sk.ev.netns,
                local: sk.ev.local,
                remote: sk.ev.remote,
            },
            ProcessInfo {
                pid: sk.pid,
                comm: sk.comm.to_string_lossy(),
            },
            now,
        );
    }
    let mut per_pod: HashMap<PodLabels, usize> = HashMap::new();
    for (&(netns, cgroup_id), &n) in &report.by_owner {
        let id = pods.pod(&FlowRef::owner(netns, cgroup_id), now);
        let l = PodLabels {
            namespace: id.as_ref().map(|p| p.namespace.clone()).unwrap_or_default(),
            pod: id.map(|p| p.pod).unwrap_or_default(),
        };
        *per_pod.entry(l).or_default() += n;
    }
    per_pod
}

/// Reads one running sweep's records, decodes them into sockets and audits
/// them (at most `listed` risks listed): the work of the blocking thread.
pub fn read_and_audit(
    run: &loader::SweepRun,
    hz: u32,
    listed: usize,
) -> Result<SweepResult, loader::SweepError> {
    let records = run.read()?;
    let (sockets, bad) = super::decode_all(&records);
    let report = risks::audit(&sockets, hz, facts::monotonic_ns(), listed);
    Ok(SweepResult {
        sockets,
        bad,
        report,
    })
}

/// The events read while a sweep ran and its snapshots, in time order (a
/// snapshot before every event later than it, after every earlier one;
/// events keep their ring order): folded in as if the sweep had taken no
/// time, so no snapshot lands after a newer event of its socket (which
/// could resurrect a socket that closed meanwhile) and no event older than
/// a snapshot lands after it.
pub fn merge_by_time<'a>(
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
pub struct PendingSweep {
    pub reason: SweepReason,
    pub t0: Instant,
    pub run: Arc<loader::SweepRun>,
    pub task: tokio::task::JoinHandle<Result<SweepResult, loader::SweepError>>,
}

/// What the blocking thread computes from one sweep.
pub struct SweepResult {
    pub sockets: Vec<SweptSocket>,
    pub bad: usize,
    pub report: RiskReport,
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
}
