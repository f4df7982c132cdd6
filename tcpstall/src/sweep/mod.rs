//! The socket sweep, agent side: decoding the iterator's records into
//! [`SweptSocket`]s (one per socket: de-duplicated by cookie, since forked
//! processes share sockets) and deciding when the next sweep runs.
//!
//! When: at start-up (before `/readyz` turns ready), after the kernel
//! reported lost events (ring-buffer drops or program recursion misses; at
//! most once per [`SweepPolicy::min_gap`]), and periodically (every
//! `--sweep-interval` while there is trouble, backing off to
//! `--sweep-interval-max` on a quiet node; 0 = never periodically); once
//! more after a sweep whose held events overflowed [`SweepHold`].
//!
//! The rest of the sweep's userspace, in this folder:
//! - [`risks`]: the hang-forever audit of one sweep's sockets (pure);
//! - [`cycle`]: one sweep on a blocking thread, and its snapshots merged with
//!   the events held meanwhile;
//! - [`features`]: what the agent does on this node (the sweep and the
//!   features built on it), and why a feature is off.
pub mod cycle;
pub mod features;
pub mod risks;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use tcpstall_common::{SweepRecord, flag};

use crate::kernel::event::{DecodeError, SockEvent};
use risks::{Comm, SweptSocket};

/// Why a sweep ran (the `reason` label of `tcpstall_sweeps_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SweepReason {
    Startup,
    Loss,
    Interval,
    /// The previous sweep's held events overflowed [`SweepHold`].
    HoldOverflow,
}

impl SweepReason {
    pub const ALL: [SweepReason; 4] = [
        Self::Startup,
        Self::Loss,
        Self::Interval,
        Self::HoldOverflow,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Startup => "startup",
            Self::Loss => "loss",
            Self::Interval => "interval",
            Self::HoldOverflow => "hold_overflow",
        }
    }
}

/// Bytes one event takes in the ring buffer: the record and the ring's
/// 8-byte record header (`BPF_RINGBUF_HDR_SZ`), 8-byte aligned.
const RING_RECORD_BYTES: usize = (tcpstall_common::EVENT_SIZE + 8).next_multiple_of(8);

/// The hold's floor, whatever the ring size: a small ring (tests use 4 KiB,
/// 24 events) must not end the hold at every burst; about 1 MiB of events.
pub const MIN_HOLD: usize = 4_096;

/// Events read from the ring while a sweep runs, held so that they are
/// folded in with its snapshots in time order. Bounded: at most as many
/// events as one full ring buffer holds, and at least [`MIN_HOLD`]
/// ([`SweepHold::cap_for_ring`]). Past
/// that the hold ends for this sweep and nothing is dropped: every held
/// event and the new ones go to the engine at once, in ring order (the
/// engine then ignores the sweep's older snapshot of any socket they
/// touched), and the caller counts it and schedules another sweep.
#[derive(Debug)]
pub struct SweepHold {
    cap: usize,
    holding: bool,
    held: Vec<SockEvent>,
}

/// What [`SweepHold::offer`] did with a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// No sweep running: ingest the batch now.
    NotHolding,
    /// Held until the sweep finishes (the batch is now empty).
    Held,
    /// The cap was reached: the hold ended and the batch now holds the
    /// `held` events held so far followed by the new ones; ingest it now.
    Overflow { held: usize },
}

impl SweepHold {
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            holding: false,
            held: Vec::new(),
        }
    }

    /// The cap for a ring buffer of `ringbuf_bytes`: the events it holds
    /// when full, at least [`MIN_HOLD`].
    pub fn cap_for_ring(ringbuf_bytes: u32) -> usize {
        (ringbuf_bytes as usize / RING_RECORD_BYTES).max(MIN_HOLD)
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    pub fn is_holding(&self) -> bool {
        self.holding
    }

    /// A sweep starts: hold what is read from now on.
    pub fn start(&mut self) {
        self.holding = true;
    }

    /// Takes a batch read from the ring (in ring order); see [`Offer`].
    pub fn offer(&mut self, batch: &mut Vec<SockEvent>) -> Offer {
        if !self.holding {
            return Offer::NotHolding;
        }
        if self.held.len() + batch.len() <= self.cap {
            self.held.append(batch);
            return Offer::Held;
        }
        self.holding = false;
        let held = self.held.len();
        let mut all = std::mem::take(&mut self.held);
        all.append(batch);
        *batch = all;
        Offer::Overflow { held }
    }

    /// The sweep finished (or failed): the held events, in ring order
    /// (none after an overflow), and the hold ends.
    pub fn finish(&mut self) -> Vec<SockEvent> {
        self.holding = false;
        std::mem::take(&mut self.held)
    }
}

/// Decodes one record.
pub fn decode(rec: &SweepRecord) -> Result<SweptSocket, DecodeError> {
    let ev = SockEvent::from_raw(&rec.event)?;
    Ok(SweptSocket {
        ev,
        pid: rec.pid,
        fd: rec.fd,
        comm: Comm(rec.comm),
        keepalive: rec.event.sock.flags & flag::KEEPOPEN != 0,
        keepalive_time_j: rec.keepalive_time,
        keepalive_intvl_j: rec.keepalive_intvl,
        keepalive_probes: rec.keepalive_probes,
    })
}

/// Hashes socket cookies: unique kernel-assigned u64s, not attacker-chosen
/// keys, so one multiplication (Fibonacci hashing) spreads them; SipHash
/// would cost more than the rest of the de-duplication.
#[derive(Default)]
struct CookieHasher(u64);

impl Hasher for CookieHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Decodes and de-duplicates (first holder wins: the lowest pid walked
/// first). Returns the sockets and the number of undecodable records.
pub fn decode_all(records: &[SweepRecord]) -> (Vec<SweptSocket>, usize) {
    let mut seen: HashSet<u64, BuildHasherDefault<CookieHasher>> =
        HashSet::with_capacity_and_hasher(records.len(), Default::default());
    let mut out = Vec::with_capacity(records.len());
    let mut bad = 0;
    for r in records {
        match decode(r) {
            Ok(s) => {
                // The cookie, or for a socket without one yet (the plain
                // sweep) its address: cookies count up from 1, kernel
                // addresses lie in the upper half of the address space, so
                // the two cannot collide.
                let key = if s.ev.cookie != 0 {
                    s.ev.cookie
                } else {
                    s.ev.skaddr
                };
                if (s.ev.cookie != 0 || s.ev.skaddr != 0) && !seen.insert(key) {
                    continue;
                }
                out.push(s);
            }
            Err(_) => bad += 1,
        }
    }
    (out, bad)
}

/// When sweeps run.
///
/// The periodic sweep is a safety net: it finds what the events missed
/// without the kernel reporting a loss. Its gap starts at `interval` and
/// doubles after each periodic sweep that found nothing (no stalled socket
/// seeded or repaired, [`Self::finished`]), up to `max_interval`: a quiet
/// node sweeps every `max_interval`. Lost events, a stall starting
/// ([`Self::busy`]) or a sweep that found something bring the gap back to
/// `interval`. So a stall no event reported is found within `interval` on a
/// node with trouble lately, within `max_interval` on a quiet one; a
/// reported loss is swept within `min_gap` whatever the gap.
#[derive(Clone, Debug)]
pub struct SweepPolicy {
    /// Periodic safety net; None = only at start-up and on loss.
    pub interval: Option<Duration>,
    /// The longest gap on a quiet node (at least `interval`).
    pub max_interval: Duration,
    /// The gap now, between `interval` and `max_interval`.
    gap: Option<Duration>,
    /// Sweep after reported event loss.
    pub on_loss: bool,
    /// Rate limit of loss-triggered sweeps.
    pub min_gap: Duration,
    last: Option<Instant>,
    loss_pending: bool,
    again_pending: bool,
}

impl SweepPolicy {
    pub fn new(
        interval: Option<Duration>,
        max_interval: Duration,
        on_loss: bool,
        min_gap: Duration,
    ) -> Self {
        Self {
            interval,
            max_interval: interval.map_or(max_interval, |i| max_interval.max(i)),
            gap: interval,
            on_loss,
            min_gap,
            last: None,
            loss_pending: false,
            again_pending: false,
        }
    }

    /// The last sweep's held events overflowed: sweep again (rate limited
    /// like a loss, whatever `on_loss` says: the overflowed sweep's
    /// snapshots were partly ignored).
    pub fn again(&mut self) {
        self.again_pending = true;
        self.busy();
    }

    /// The kernel reported lost events (the periodic gap goes back to
    /// `interval` even without `on_loss`).
    pub fn loss(&mut self) {
        if self.on_loss {
            self.loss_pending = true;
        }
        self.busy();
    }

    /// Something happened that the safety net should watch closely (a stall
    /// started, events were lost): the periodic gap goes back to `interval`.
    pub fn busy(&mut self) {
        self.gap = self.interval;
    }

    /// A sweep for `reason` finished and `found` stalled sockets the engine
    /// learned something from (seeded or repaired). Found something: the gap
    /// goes back to `interval`; a periodic sweep that found nothing doubles
    /// it, up to `max_interval`.
    pub fn finished(&mut self, reason: SweepReason, found: u64) {
        if found > 0 {
            self.busy();
        } else if reason == SweepReason::Interval {
            self.gap = self.gap.map(|g| (g * 2).min(self.max_interval));
        }
    }

    /// The gap to the next periodic sweep now (None: no periodic sweeps).
    pub fn gap(&self) -> Option<Duration> {
        self.gap
    }

    /// A sweep ran at `now`.
    pub fn ran(&mut self, now: Instant, reason: SweepReason) {
        self.last = Some(now);
        if reason != SweepReason::Startup || self.loss_pending {
            self.loss_pending = false;
        }
        self.again_pending = false;
    }

    /// Whether a sweep is due at `now`, and why.
    pub fn due(&self, now: Instant) -> Option<SweepReason> {
        let since = self.last.map(|l| now.saturating_duration_since(l));
        if self.loss_pending && since.is_none_or(|s| s >= self.min_gap) {
            return Some(SweepReason::Loss);
        }
        if self.again_pending && since.is_none_or(|s| s >= self.min_gap) {
            return Some(SweepReason::HoldOverflow);
        }
        if let Some(i) = self.gap
            && since.is_none_or(|s| s >= i)
        {
            return Some(SweepReason::Interval);
        }
        None
    }
}

/// Upper bounds (seconds) of `tcpstall_sweep_duration_seconds`.
pub const SWEEP_DURATION_BUCKETS: [f64; 10] =
    [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub namespace: String,
    pub pod: String,
}

/// The sweep's metrics (registered by [`crate::serve::metrics::Metrics::new`]).
#[derive(Clone, Debug)]
pub struct SweepMetrics {
    sweeps: Family<ReasonLabels, Counter>,
    failures: Counter,
    hold_overflows: Counter,
    duration: Histogram,
    sockets_visited: Counter,
    tcp_sockets: Gauge,
    without_timeout: Family<PodLabels, Gauge>,
    interval: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl SweepMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            sweeps: Family::default(),
            failures: Counter::default(),
            hold_overflows: Counter::default(),
            duration: Histogram::new(SWEEP_DURATION_BUCKETS),
            sockets_visited: Counter::default(),
            tcp_sockets: Gauge::default(),
            without_timeout: Family::default(),
            interval: Gauge::default(),
        };
        registry.register(
            "tcpstall_sweeps",
            "Socket sweeps run, by reason: startup (before /readyz turns ready), loss (the kernel reported lost events), interval (--sweep-interval), hold_overflow (the previous sweep's held events overflowed)",
            m.sweeps.clone(),
        );
        for r in SweepReason::ALL {
            drop(m.sweeps.get_or_create(&ReasonLabels { reason: r.as_str() }));
        }
        registry.register(
            "tcpstall_sweep_failures",
            "Socket sweeps that failed (see the agent log)",
            m.failures.clone(),
        );
        registry.register(
            "tcpstall_sweep_hold_overflows",
            "Sweeps during which more events arrived than one full ring buffer holds: the events were fed to the engine at once instead of being held for the sweep (none lost; its older snapshots of their sockets ignored) and another sweep followed (see the agent log)",
            m.hold_overflows.clone(),
        );
        registry.register(
            "tcpstall_sweep_duration_seconds",
            "Wall-clock time of one socket sweep (kernel iterator and decoding)",
            m.duration.clone(),
        );
        registry.register(
            "tcpstall_sweep_sockets_visited",
            "Socket files the sweeps visited (every family, once per file table holding them)",
            m.sockets_visited.clone(),
        );
        registry.register(
            "tcpstall_sweep_tcp_sockets",
            "TCP sockets found by the last sweep: the distinct ones it read, plus those it skipped in the kernel (idle with a timeout set, listeners: nothing the engine or the audit uses), counted once per file holding them",
            m.tcp_sockets.clone(),
        );
        registry.register(
            "tcpstall_sockets_without_timeout",
            "Established TCP sockets with neither SO_KEEPALIVE nor TCP_USER_TIMEOUT (they hang forever if the peer vanishes while they wait), as of the last sweep, by pod; sockets outside any pod are counted with empty namespace and pod labels",
            m.without_timeout.clone(),
        );
        registry.register(
            "tcpstall_sweep_interval_seconds",
            "Seconds between periodic socket sweeps now: --sweep-interval while sweeps or events find trouble, doubling after each periodic sweep that found nothing up to --sweep-interval-max (0 = no periodic sweeps)",
            m.interval.clone(),
        );
        m.without_timeout(&HashMap::new());
        m
    }

    /// The periodic gap now ([`SweepPolicy::gap`]; None = 0).
    pub fn interval(&self, gap: Option<Duration>) {
        self.interval.set(gap.map_or(0.0, |g| g.as_secs_f64()));
    }

    pub fn ran(&self, reason: SweepReason, seconds: f64, visited: u64, tcp_sockets: usize) {
        self.sweeps
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
        self.duration.observe(seconds);
        self.sockets_visited.inc_by(visited);
        self.tcp_sockets
            .set(i64::try_from(tcp_sockets).unwrap_or(i64::MAX));
    }

    pub fn failed(&self) {
        self.failures.inc();
    }

    pub fn hold_overflowed(&self) {
        self.hold_overflows.inc();
    }

    /// Replaces the per-pod counts (one series per pod with at-risk
    /// sockets, plus the non-pod series, always present).
    pub fn without_timeout(&self, counts: &HashMap<PodLabels, usize>) {
        self.without_timeout.clear();
        drop(self.without_timeout.get_or_create(&PodLabels {
            namespace: String::new(),
            pod: String::new(),
        }));
        for (l, n) in counts {
            self.without_timeout
                .get_or_create(l)
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcpstall_common::{Event, SockSnapshot, kind, source};

    fn rec(cookie: u64, pid: u32) -> SweepRecord {
        let mut r = SweepRecord::zeroed();
        r.event = Event {
            kind: kind::SWEEP,
            source: source::SWEEP,
            sock: SockSnapshot {
                family: 2,
                cookie,
                state: 1,
                flags: tcpstall_common::flag::SOCK_FIELDS,
                ..SockSnapshot::zeroed()
            },
            ..Event::zeroed()
        };
        r.pid = pid;
        r.comm[..4].copy_from_slice(b"curl");
        r
    }

    #[test]
    fn decodes_and_dedupes_by_cookie() {
        let mut shared = rec(7, 10);
        shared.event.sock.flags |= flag::KEEPOPEN;
        let (s, bad) = decode_all(&[shared, rec(7, 11), rec(8, 12)]);
        assert_eq!(bad, 0);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (
                s[0].pid,
                s[0].comm.to_string_lossy().as_str(),
                s[0].keepalive
            ),
            (10, "curl", true)
        );
        assert_eq!((s[1].ev.cookie, s[1].keepalive), (8, false));
        let mut broken = rec(9, 1);
        broken.event.sock.family = 99;
        assert_eq!(decode_all(&[broken]).1, 1);
    }

    /// A socket the kernel has no cookie for yet (the plain sweep) is
    /// de-duplicated by its address: two holders of one cookie-less socket
    /// give one entry, two cookie-less sockets two.
    /// Mutation: keying cookie-less sockets by cookie alone (`key =
    /// s.ev.cookie`) keeps one of the two distinct sockets (`left: 2,
    /// right: 3`).
    #[test]
    fn cookieless_sockets_dedupe_by_address() {
        let at = |skaddr: u64, pid: u32| {
            let mut r = rec(0, pid);
            r.event.sock.skaddr = skaddr;
            r
        };
        let (s, bad) = decode_all(&[
            at(0xffff_8880_0000_1000, 10),
            at(0xffff_8880_0000_1000, 11),
            at(0xffff_8880_0000_2000, 12),
            rec(5, 13),
        ]);
        assert_eq!(bad, 0);
        assert_eq!(s.len(), 3);
        assert_eq!(
            s.iter().map(|s| s.pid).collect::<Vec<_>>(),
            vec![10, 12, 13]
        );
    }

    #[test]
    fn policy_rate_limits_loss_and_runs_interval() {
        let t0 = Instant::now();
        let mut p = SweepPolicy::new(
            Some(Duration::from_secs(60)),
            Duration::from_secs(60),
            true,
            Duration::from_secs(5),
        );
        p.ran(t0, SweepReason::Startup);
        assert_eq!(p.due(t0 + Duration::from_secs(1)), None);
        p.loss();
        assert_eq!(p.due(t0 + Duration::from_secs(1)), None, "rate limited");
        assert_eq!(p.due(t0 + Duration::from_secs(5)), Some(SweepReason::Loss));
        p.ran(t0 + Duration::from_secs(5), SweepReason::Loss);
        assert_eq!(p.due(t0 + Duration::from_secs(30)), None);
        assert_eq!(
            p.due(t0 + Duration::from_secs(65)),
            Some(SweepReason::Interval)
        );

        let mut off = SweepPolicy::new(None, Duration::ZERO, false, Duration::from_secs(5));
        off.ran(t0, SweepReason::Startup);
        off.loss();
        assert_eq!(off.due(t0 + Duration::from_secs(3600)), None);
        // A held-events overflow sweeps again even without --sweep-on-loss,
        // rate limited, once.
        off.again();
        assert_eq!(off.due(t0 + Duration::from_secs(1)), None, "rate limited");
        assert_eq!(
            off.due(t0 + Duration::from_secs(5)),
            Some(SweepReason::HoldOverflow)
        );
        off.ran(t0 + Duration::from_secs(5), SweepReason::HoldOverflow);
        assert_eq!(off.due(t0 + Duration::from_secs(3600)), None);
    }

    /// On a quiet node the periodic gap doubles after each periodic sweep
    /// that found nothing, up to the maximum; a sweep that found something,
    /// a stall or lost events bring it back to the interval; a loss is
    /// still swept within `min_gap` at any gap; start-up and loss sweeps
    /// that find nothing do not back off. Mutations: `found > 0` ->
    /// `found > 1` in `finished` (a sweep that repaired one socket keeps the
    /// long gap), `self.busy()` removed from `loss` (the gap stays long after
    /// lost events), `.min(self.max_interval)` removed (past the maximum):
    /// each fails.
    #[test]
    fn policy_backs_off_on_a_quiet_node_and_returns_on_trouble() {
        let s = Duration::from_secs;
        let t0 = Instant::now();
        let mut p = SweepPolicy::new(Some(s(60)), s(240), true, s(2));
        p.ran(t0, SweepReason::Startup);
        p.finished(SweepReason::Startup, 0);
        assert_eq!(p.gap(), Some(s(60)), "start-up does not back off");
        assert_eq!(p.due(t0 + s(60)), Some(SweepReason::Interval));
        // Quiet periodic sweeps: 60 -> 120 -> 240 -> 240.
        let mut t = t0 + s(60);
        for want in [120, 240, 240] {
            p.ran(t, SweepReason::Interval);
            p.finished(SweepReason::Interval, 0);
            assert_eq!(p.gap(), Some(s(want)));
            assert_eq!(p.due(t + s(want - 1)), None);
            assert_eq!(p.due(t + s(want)), Some(SweepReason::Interval));
            t += s(want);
        }
        // A sweep that repaired one socket: back to the interval.
        p.ran(t, SweepReason::Interval);
        p.finished(SweepReason::Interval, 1);
        assert_eq!(p.gap(), Some(s(60)));
        // Back off again, then a stall starts: back to the interval.
        p.finished(SweepReason::Interval, 0);
        assert_eq!(p.gap(), Some(s(120)));
        p.busy();
        assert_eq!(p.gap(), Some(s(60)));
        // At the longest gap, lost events: swept within min_gap, and the
        // gap is the interval again; a loss sweep finding nothing keeps it.
        p.finished(SweepReason::Interval, 0);
        p.finished(SweepReason::Interval, 0);
        assert_eq!(p.gap(), Some(s(240)));
        p.ran(t, SweepReason::Interval);
        p.loss();
        assert_eq!(p.gap(), Some(s(60)));
        assert_eq!(p.due(t + s(2)), Some(SweepReason::Loss));
        p.ran(t + s(2), SweepReason::Loss);
        p.finished(SweepReason::Loss, 0);
        assert_eq!(p.gap(), Some(s(60)));
        // Without on_loss, lost events still shorten the gap.
        let mut q = SweepPolicy::new(Some(s(60)), s(240), false, s(2));
        q.finished(SweepReason::Interval, 0);
        assert_eq!(q.gap(), Some(s(120)));
        q.loss();
        assert_eq!(q.gap(), Some(s(60)));
        // max == interval: a fixed interval; max below it is raised to it.
        let mut f = SweepPolicy::new(Some(s(60)), s(30), true, s(2));
        f.finished(SweepReason::Interval, 0);
        assert_eq!(f.gap(), Some(s(60)));
        // No periodic sweeps: none, whatever happens.
        let mut n = SweepPolicy::new(None, s(240), true, s(2));
        n.finished(SweepReason::Interval, 0);
        n.busy();
        assert_eq!(n.gap(), None);
    }

    fn state_ev(ts_ns: u64) -> SockEvent {
        let mut raw = tcpstall_common::Event::zeroed();
        raw.kind = kind::STATE;
        raw.source = source::SWEEP;
        raw.ts_ns = ts_ns;
        raw.sock.family = 2;
        SockEvent::from_raw(&raw).expect("decodes")
    }

    fn ts(evs: &[SockEvent]) -> Vec<u64> {
        evs.iter().map(|e| e.ts_ns).collect()
    }

    /// The hold is bounded and loses nothing: within the cap batches are
    /// held in ring order; the batch that would pass the cap ends the hold
    /// and comes back with every held event before it (to be ingested at
    /// once), later batches pass straight through, and the sweep's finish
    /// has nothing left. Mutations: `<= self.cap` -> `<= usize::MAX` in
    /// `offer` (never overflows: the held Vec grows past the cap), and
    /// `*batch = all` removed (the held events are dropped): both fail.
    #[test]
    fn sweep_hold_is_bounded_and_loses_nothing() {
        let mut h = SweepHold::new(4);
        let mut b = vec![state_ev(1)];
        assert_eq!(h.offer(&mut b), Offer::NotHolding);
        assert_eq!(ts(&b), [1]);

        h.start();
        let mut b = vec![state_ev(2), state_ev(3)];
        assert_eq!(h.offer(&mut b), Offer::Held);
        assert!(b.is_empty());
        let mut b = vec![state_ev(4), state_ev(5)];
        assert_eq!(h.offer(&mut b), Offer::Held, "exactly at the cap");
        let mut b = vec![state_ev(6), state_ev(7)];
        assert_eq!(h.offer(&mut b), Offer::Overflow { held: 4 });
        assert_eq!(ts(&b), [2, 3, 4, 5, 6, 7], "held first, in ring order");
        assert!(!h.is_holding());
        let mut b = vec![state_ev(8)];
        assert_eq!(h.offer(&mut b), Offer::NotHolding);
        assert_eq!(ts(&b), [8]);
        assert!(h.finish().is_empty());

        // The next sweep holds again; its finish returns the held events.
        h.start();
        let mut b = vec![state_ev(9), state_ev(10)];
        assert_eq!(h.offer(&mut b), Offer::Held);
        assert_eq!(ts(&h.finish()), [9, 10]);
        assert!(!h.is_holding());
    }

    #[test]
    fn sweep_hold_cap_is_one_full_ring() {
        // 4 MiB / (208-byte event + 8-byte header).
        assert_eq!(
            SweepHold::cap_for_ring(tcpstall_common::DEFAULT_RINGBUF_BYTES),
            4 * 1024 * 1024 / 216
        );
        assert_eq!(SweepHold::cap_for_ring(4096), MIN_HOLD);
        assert_eq!(SweepHold::cap_for_ring(64 << 20), (64 << 20) / 216);
        assert_eq!(SweepHold::new(0).cap(), 1);
    }
}
