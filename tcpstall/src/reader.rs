//! Ring buffer -> owned events. Waits for the ring buffer's fd to become
//! readable (epoll via tokio) and drains every record each time.

use std::io;

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::event::{DecodeError, SockEvent};

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
    pub async fn read_batch(
        &mut self,
        out: &mut Vec<Result<SockEvent, DecodeError>>,
    ) -> io::Result<()> {
        loop {
            let mut guard = self.ring.readable_mut().await?;
            let ring = guard.get_inner_mut();
            let before = out.len();
            while let Some(item) = ring.next() {
                out.push(SockEvent::decode(&item));
            }
            guard.clear_ready();
            if out.len() > before {
                return Ok(());
            }
        }
    }
}
