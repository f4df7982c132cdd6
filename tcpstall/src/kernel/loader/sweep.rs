//! The socket sweep's loader side: the running iterator ([`SweepRun`], read
//! on a blocking thread), its raw output and errors, the iterator's records
//! decoded from bytes, and the `struct socket` offsets the sweep programs
//! take as constants checked against the running kernel's BTF.

use tcpstall_common::{SWEEP_RECORD_SIZE, SweepRecord};

use super::{KernelStats, StatsReader, chain};
use crate::kernel::btf::Btf;

/// Offsets in `struct socket` the sweep iterator uses as constants (the
/// verifier needs a constant offset to keep `socket->sk` typed). Checked
/// against the running kernel's BTF before the program is loaded.
pub(super) const SOCKET_CONSTANTS: [(&str, u32); 2] = [("sk", 24), ("type", 4)];

/// One sweep's raw output.
#[derive(Clone, Debug, Default)]
pub struct SweepOutput {
    /// Every TCP socket found (one record per file holding it).
    pub records: Vec<SweepRecord>,
    /// Socket files visited (all families).
    pub socket_files: u64,
    /// Records that did not fit in the iterator's buffer (lost).
    pub overflow: u64,
    /// TCP sockets skipped in the kernel (no record: idle with a timeout
    /// set, listeners, ...; counted per file holding them, not
    /// de-duplicated), and the established ones among them.
    pub skipped: u64,
    pub skipped_established: u64,
}

/// A started sweep: the iterator's file, read with [`SweepRun::read`]
/// (blocking; `Send`, so it can run on a blocking thread).
pub struct SweepRun {
    pub(super) file: std::fs::File,
    pub(super) before: KernelStats,
    pub(super) bytes_hint: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl SweepRun {
    /// Runs the iterator to the end and decodes its records (blocking).
    pub fn read(&self) -> Result<Vec<SweepRecord>, SweepError> {
        use std::io::Read as _;
        use std::sync::atomic::Ordering::Relaxed;
        // Sized from the last sweep: no re-allocation and copy on the way.
        let hint = self.bytes_hint.load(Relaxed);
        let mut buf = Vec::with_capacity((hint + hint / 8).max(1 << 20));
        (&self.file)
            .read_to_end(&mut buf)
            .map_err(|e| SweepError::Run(format!("reading the iterator: {e}")))?;
        self.bytes_hint.store(buf.len(), Relaxed);
        let mut records = Vec::new();
        let rest = parse_sweep_records(&buf, &mut records);
        if rest != 0 {
            return Err(SweepError::Run(format!(
                "iterator output is {} bytes, not a multiple of {SWEEP_RECORD_SIZE}: agent and kernel programs are from different builds",
                buf.len()
            )));
        }
        Ok(records)
    }

    /// The sweep's output, with the visited / overflow / skipped counters (read
    /// after [`Self::read`] returned).
    pub fn finish(
        &self,
        records: Vec<SweepRecord>,
        stats: &StatsReader,
    ) -> Result<SweepOutput, SweepError> {
        let after = stats.read().map_err(|e| SweepError::Run(chain(&e)))?;
        // What the kernel counted during this sweep.
        let during = |counter: fn(&KernelStats) -> u64| {
            counter(&after).saturating_sub(counter(&self.before))
        };
        Ok(SweepOutput {
            records,
            socket_files: during(|s| s.sweep_socket_files),
            overflow: during(|s| s.sweep_overflow),
            skipped: during(|s| s.sweep_skipped),
            skipped_established: during(|s| s.sweep_skipped_established),
        })
    }
}

/// Why a sweep could not run.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("the socket sweep is unavailable on this kernel: {0}")]
    Unavailable(String),
    #[error("running the sweep iterator failed: {0}")]
    Run(String),
}

/// The `struct socket` offsets the sweep programs use as constants match
/// the running kernel's BTF (else no sweep program is tried, with this
/// reason).
pub(super) fn check_socket_constants(ours: &Btf) -> Result<(), String> {
    for (member, want) in SOCKET_CONSTANTS {
        let m = ours
            .member("socket", member)
            .map_err(|e| format!("kernel BTF: struct socket.{member}: {e}"))?;
        if m.offset_bits != want * 8 {
            return Err(format!(
                "struct socket.{member} is at byte {} on this kernel, the sweep programs expect {want}",
                m.offset_bits / 8
            ));
        }
    }
    Ok(())
}

/// Decodes the iterator's output: whole records only.
pub fn parse_sweep_records(buf: &[u8], out: &mut Vec<SweepRecord>) -> usize {
    let whole = buf.len() / SWEEP_RECORD_SIZE;
    out.reserve(whole);
    for chunk in buf.chunks_exact(SWEEP_RECORD_SIZE) {
        // SAFETY: SweepRecord is repr(C) plain integers (every bit pattern
        // valid); read_unaligned copes with the byte buffer's alignment.
        out.push(unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<SweepRecord>()) });
    }
    buf.len() % SWEEP_RECORD_SIZE
}
