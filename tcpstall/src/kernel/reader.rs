//! Ring buffer -> owned events, woken by data with a bounded delay.
//!
//! Two modes, told to the kernel programs through `TCPSTALL_READER`
//! ([`tcpstall_common::reader`]):
//!
//! - **asleep** (a quiet node): the reader waits on the ring's fd (epoll
//!   via tokio) and the programs submit with the kernel's own wake-up rule:
//!   the first record after the reader drained wakes it, the next ones do
//!   not. No timer runs for the ring but a fallback read every
//!   [`ASLEEP_POLL`] (a record whose wake-up raced with the mode switch
//!   waits at most that long). An idle agent costs what an idle epoll costs.
//! - **polling** (events arrived in the last [`IDLE_AFTER`]): the programs
//!   submit without a wake-up (no irq_work and context switch per event)
//!   and the reader drains the ring every [`POLL_INTERVAL`]; a ring an
//!   eighth full still wakes it at once. After [`IDLE_AFTER`] without a
//!   record it switches back to asleep and drains once more (records
//!   submitted without a wake-up just before the switch).
//!
//! Events carry the kernel's timestamps, so the engine's view does not
//! depend on when they are read; the delay is measured per event
//! (`tcpstall_event_delivery_seconds`). Deadlines live in the reader, so
//! a caller that drops [`Reader::read_batch`] (a `select!` whose other arm
//! fired) does not push them back.

use std::{
    io,
    time::{Duration, Instant},
};

use aya::maps::{Array, MapData, RingBuf};
pub use tcpstall_common::reader::{ASLEEP, POLLING};
use tokio::io::unix::AsyncFd;

use crate::kernel::event::{DecodeError, SockEvent};

/// How often the ring is read while events keep arriving.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Without a record for this long, the reader sleeps on the ring's fd.
pub const IDLE_AFTER: Duration = Duration::from_millis(30);
/// While asleep, the ring is still read this often (a bound on the delay
/// of a record whose wake-up raced with the switch to asleep).
pub const ASLEEP_POLL: Duration = Duration::from_secs(1);

pub struct Reader {
    ring: AsyncFd<RingBuf<MapData>>,
    /// The mode the programs see (None: the reader always polls).
    mode_map: Option<Array<MapData, u32>>,
    polling: bool,
    /// Next read without a wake-up.
    next_read: Instant,
    /// Last time a read found records.
    last_data: Instant,
    wakeups: ReaderCounts,
}

/// How the reader got to read the ring (for `tcpstall_ring_reads_total`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReaderCounts {
    /// Woken by the kernel (the first record after a drain, or a ring an
    /// eighth full).
    pub woken: u64,
    /// Timed reads (polling, or the asleep fallback).
    pub timed: u64,
    /// Switches from polling to asleep.
    pub slept: u64,
}

impl Reader {
    /// `mode_map`: the programs' `TCPSTALL_READER` (None: poll only).
    pub fn new(ring: RingBuf<MapData>, mode_map: Option<Array<MapData, u32>>) -> io::Result<Self> {
        // SAFETY: the ring buffer owns its map fd, which stays open and
        // unchanged for as long as the `RingBuf` (owned by the AsyncFd) lives.
        let ring = unsafe { AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)?;
        let now = Instant::now();
        let mut r = Self {
            ring,
            mode_map,
            polling: false,
            next_read: now,
            last_data: now,
            wakeups: ReaderCounts::default(),
        };
        // Start polling: the programs may have submitted already.
        r.set_polling(true)?;
        Ok(r)
    }

    pub fn counts(&self) -> ReaderCounts {
        self.wakeups
    }

    fn set_polling(&mut self, polling: bool) -> io::Result<()> {
        if let Some(m) = &mut self.mode_map {
            m.set(0, if polling { POLLING } else { ASLEEP }, 0)
                .map_err(|e| io::Error::other(format!("setting the reader mode: {e}")))?;
        } else if !polling {
            // Without the map the programs never wake an asleep reader.
            return Ok(());
        }
        self.polling = polling;
        Ok(())
    }

    /// Decodes the records available now into `out` (appended) without
    /// waiting; returns how many.
    pub fn drain_ready(&mut self, out: &mut Vec<Result<SockEvent, DecodeError>>) -> usize {
        let ring = self.ring.get_mut();
        let before = out.len();
        while let Some(item) = ring.next() {
            out.push(SockEvent::decode(&item));
        }
        let n = out.len() - before;
        if n > 0 {
            self.last_data = Instant::now();
        }
        n
    }

    /// Wait for records, then decode all available ones into `out`
    /// (appended; malformed records are kept as errors so the caller can
    /// count them). Cancel-safe: nothing is read or switched before the
    /// wait ends.
    pub async fn read_batch(
        &mut self,
        out: &mut Vec<Result<SockEvent, DecodeError>>,
    ) -> io::Result<()> {
        loop {
            let woken = tokio::select! {
                guard = self.ring.readable_mut() => {
                    guard?.clear_ready();
                    true
                }
                () = tokio::time::sleep_until(self.next_read.into()) => false,
            };
            let now = Instant::now();
            if woken {
                self.wakeups.woken += 1;
            } else {
                self.wakeups.timed += 1;
            }
            if self.polling {
                self.next_read = now + POLL_INTERVAL;
                if self.drain_ready(out) > 0 {
                    return Ok(());
                }
                if now.duration_since(self.last_data) >= IDLE_AFTER {
                    self.set_polling(false)?;
                    if !self.polling {
                        self.wakeups.slept += 1;
                        self.next_read = now + ASLEEP_POLL;
                    }
                    // Submitted without a wake-up before the switch.
                    if self.drain_ready(out) > 0 {
                        return Ok(());
                    }
                }
            } else {
                if woken {
                    // Records are coming: poll from now on (no wake-up per
                    // record), then read what woke us.
                    self.set_polling(true)?;
                    self.next_read = now + POLL_INTERVAL;
                } else {
                    self.next_read = now + ASLEEP_POLL;
                }
                if self.drain_ready(out) > 0 {
                    if !self.polling {
                        self.set_polling(true)?;
                        self.next_read = now + POLL_INTERVAL;
                    }
                    return Ok(());
                }
            }
        }
    }
}
