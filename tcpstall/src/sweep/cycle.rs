//! One socket sweep, agent side, between the event loop's
//! `Pipeline::start_sweep` and `Pipeline::finish_sweep` (in [`crate::app`],
//! which owns the engine, the hold and the metrics): the iterator's records
//! read, decoded and audited on a blocking thread ([`read_and_audit`], the
//! result a [`PendingSweep`] awaits), and the snapshots folded in time order
//! with the events held meanwhile ([`merge_by_time`]).

use std::sync::Arc;
use std::time::Instant;

use super::SweepReason;
use super::risks::{self, RiskReport, SweptSocket};
use crate::kernel::event::SockEvent;
use crate::kernel::{facts, loader};

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
