//! What the kernel counts for the agent: the per-CPU counters of the
//! programs' stats map ([`StatsReader`] -> [`KernelStats`]) and each attached
//! program's run count, run time and recursion misses from its fdinfo
//! ([`ProgramStatsReader`] -> [`ProgramRuntime`]).

use aya::maps::{MapData, PerCpuArray};
use tcpstall_common::stat;

/// Per-CPU kernel-side counters, summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub ringbuf_dropped: u64,
    pub read_errors: u64,
    pub timer_not_due: u64,
    pub submitted: u64,
    /// Failed retransmission attempts (6.17+), not reported as retransmits.
    pub retransmit_failed: u64,
    /// Socket files the sweep iterator visited; sweep records lost.
    pub sweep_socket_files: u64,
    pub sweep_overflow: u64,
    /// TCP sockets the sweep skipped in the kernel (nothing the engine or
    /// the audit can use), and the established ones among them.
    pub sweep_skipped: u64,
    pub sweep_skipped_established: u64,
}

pub struct StatsReader(pub(super) PerCpuArray<MapData, u64>);

/// What the kernel counts for one attached program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramRuntime {
    pub program: &'static str,
    /// Runs and their total time: counted only while BPF run-time
    /// statistics are on (`--program-stats` or `kernel.bpf_stats_enabled`).
    pub run_count: u64,
    pub run_time_ns: u64,
    /// Runs the kernel skipped because the program was already running on
    /// that CPU (5.12+): the events those runs would have sent are lost.
    pub recursion_misses: u64,
}

/// Reads [`ProgramRuntime`] for each attached program.
pub struct ProgramStatsReader {
    pub(super) programs: Vec<(&'static str, std::os::fd::OwnedFd)>,
    /// Keeps `BPF_ENABLE_STATS` on while held.
    pub(super) run_time: Option<std::os::fd::OwnedFd>,
}

impl ProgramStatsReader {
    /// One `BPF_OBJ_GET_INFO_BY_FD` per program (read every second: no
    /// file opened, nothing formatted or parsed); a kernel that refuses it
    /// is asked through the program's fdinfo instead.
    pub fn read(&self) -> std::io::Result<Vec<ProgramRuntime>> {
        use std::os::fd::AsRawFd as _;
        self.programs
            .iter()
            .map(|(program, fd)| match prog_info(fd.as_raw_fd()) {
                Ok((run_time_ns, run_count, recursion_misses)) => Ok(ProgramRuntime {
                    program,
                    run_count,
                    run_time_ns,
                    recursion_misses,
                }),
                Err(_) => fdinfo(program, fd),
            })
            .collect()
    }

    /// The same figures from each program's `/proc/self/fdinfo` (the
    /// fallback of [`Self::read`]; tests compare the two).
    pub fn read_fdinfo(&self) -> std::io::Result<Vec<ProgramRuntime>> {
        self.programs
            .iter()
            .map(|(program, fd)| fdinfo(program, fd))
            .collect()
    }

    pub fn run_time_enabled(&self) -> bool {
        self.run_time.is_some()
    }
}

fn fdinfo(program: &'static str, fd: &std::os::fd::OwnedFd) -> std::io::Result<ProgramRuntime> {
    use std::os::fd::AsRawFd as _;
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    Ok(parse_prog_fdinfo(program, &text))
}

/// `BPF_OBJ_GET_INFO_BY_FD` (`enum bpf_cmd`).
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `struct bpf_prog_info` up to `recursion_misses` (5.12+), as 8-byte
/// words: `run_time_ns`, `run_cnt` and `recursion_misses` are words 24-26
/// (byte offsets 192, 200, 208 in the UAPI header). An older kernel copies
/// only its shorter struct (the rest reads 0, as absent fdinfo lines do).
const PROG_INFO_WORDS: usize = 27;

/// A program's run time (ns), run count and recursion misses, asked of the
/// kernel by its fd.
fn prog_info(fd: std::os::fd::RawFd) -> std::io::Result<(u64, u64, u64)> {
    let mut info = [0u64; PROG_INFO_WORDS];
    // `union bpf_attr`'s `info` member: bpf_fd, info_len, info (pointer).
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoAttr {
        bpf_fd: fd as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: bpf(2) writes at most `info_len` bytes to `info`, which lives
    // until the call returns.
    unsafe { super::sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok((info[24], info[25], info[26]))
}

/// Parses the `run_time_ns`, `run_cnt` and `recursion_misses` lines of a BPF
/// program's fdinfo (absent lines read 0: older kernels lack some).
pub fn parse_prog_fdinfo(program: &'static str, text: &str) -> ProgramRuntime {
    let mut r = ProgramRuntime {
        program,
        ..ProgramRuntime::default()
    };
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<u64>() else {
            continue;
        };
        match key.trim() {
            "run_time_ns" => r.run_time_ns = v,
            "run_cnt" => r.run_count = v,
            "recursion_misses" => r.recursion_misses = v,
            _ => {}
        }
    }
    r
}

impl StatsReader {
    pub fn read(&self) -> Result<KernelStats, aya::maps::MapError> {
        let sum =
            |i: u32| -> Result<u64, aya::maps::MapError> { Ok(self.0.get(&i, 0)?.iter().sum()) };
        Ok(KernelStats {
            ringbuf_dropped: sum(stat::RINGBUF_DROPPED)?,
            read_errors: sum(stat::READ_ERRORS)?,
            timer_not_due: sum(stat::TIMER_NOT_DUE)?,
            submitted: sum(stat::SUBMITTED)?,
            retransmit_failed: sum(stat::RETRANSMIT_FAILED)?,
            sweep_socket_files: sum(stat::SWEEP_SOCKET_FILES)?,
            sweep_overflow: sum(stat::SWEEP_OVERFLOW)?,
            sweep_skipped: sum(stat::SWEEP_SKIPPED)?,
            sweep_skipped_established: sum(stat::SWEEP_SKIPPED_ESTABLISHED)?,
        })
    }
}

/// The kernel's set of sockets in a loss episode ([`tcpstall_common::EPISODES_MAP`]):
/// the drop program reports only packets they own. The agent keeps it equal
/// to the engine's episodes ([`EpisodeFilter::sync`]).
pub struct EpisodeFilter {
    map: aya::maps::HashMap<MapData, u64, u8>,
    /// What the map holds (the agent is its only writer).
    held: std::collections::HashSet<u64>,
}

impl EpisodeFilter {
    /// Makes the map hold exactly `wanted` (at most
    /// [`tcpstall_common::EPISODES_MAX`] of them: the first ones). Returns
    /// the number of failed map updates (counted by the caller).
    pub fn sync(&mut self, wanted: &[u64]) -> u64 {
        let cap = tcpstall_common::EPISODES_MAX as usize;
        let wanted: std::collections::HashSet<u64> = wanted.iter().copied().take(cap).collect();
        let mut failed = 0;
        let gone: Vec<u64> = self.held.difference(&wanted).copied().collect();
        for c in gone {
            // Already absent is as good as removed.
            let _ = self.map.remove(&c);
            self.held.remove(&c);
        }
        for &c in wanted.difference(&self.held.clone()) {
            match self.map.insert(c, 1, 0) {
                Ok(()) => {
                    self.held.insert(c);
                }
                Err(_) => failed += 1,
            }
        }
        failed
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

impl super::Loaded {
    /// The episode filter of the drop probe (can be taken once).
    pub fn take_episodes(&mut self) -> Result<EpisodeFilter, super::LoadError> {
        let name = tcpstall_common::EPISODES_MAP;
        let map = self
            .ebpf
            .take_map(name)
            .ok_or_else(|| super::LoadError::Map(format!("map {name} missing or already taken")))?;
        aya::maps::HashMap::try_from(map)
            .map(|map| EpisodeFilter {
                map,
                held: Default::default(),
            })
            .map_err(|e| super::LoadError::Map(super::chain(&e)))
    }
}
