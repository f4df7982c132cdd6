//! Ring buffer -> owned events. Drains every record each time the ring
//! buffer's fd becomes readable (epoll via tokio: the programs wake it once
//! the ring fills up) or the poll interval passes.

use std::io;

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::kernel::event::{DecodeError, SockEvent};

/// How often the ring is read when no wake-up came (the programs wake the
/// reader only once the ring is an eighth full).
pub const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

pub struct Reader {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl Reader {
    pub fn new(ring: RingBuf<MapData>) -> io::Result<Self> {
        // SAFETY: the ring buffer owns its map fd, which stays open and
        // unchanged for as long as the `RingBuf` (owned by the AsyncFd) lives.
        let ring = unsafe { AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)?;
        Ok(Self { ring })
    }

    /// Decodes the records available now into `out` (appended) without
    /// waiting; returns how many.
    pub fn drain_ready(&mut self, out: &mut Vec<Result<SockEvent, DecodeError>>) -> usize {
        let ring = self.ring.get_mut();
        let before = out.len();
        while let Some(item) = ring.next() {
            out.push(SockEvent::decode(&item));
        }
        out.len() - before
    }

    /// Wait for records, then decode all available ones into `out` (appended;
    /// malformed records are kept as errors so the caller can count them).
    /// The programs submit without waking the reader while the ring is
    /// nearly empty, so the ring is also polled every [`POLL_INTERVAL`]: an
    /// event reaches the engine at most that late (its timestamps are the
    /// kernel's, taken when it happened).
    pub async fn read_batch(
        &mut self,
        out: &mut Vec<Result<SockEvent, DecodeError>>,
    ) -> io::Result<()> {
        loop {
            tokio::select! {
                guard = self.ring.readable_mut() => guard?.clear_ready(),
                () = tokio::time::sleep(POLL_INTERVAL) => {}
            }
            if self.drain_ready(out) > 0 {
                return Ok(());
            }
        }
    }
}
