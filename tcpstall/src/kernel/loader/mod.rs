//! The only module touching `aya::Ebpf`: feature detection, loading,
//! attaching with fallbacks (walking [`crate::kernel::probes::PROBES`]), and handing
//! out the maps the reader needs.
//!
//! Attaching one probe's candidates is in `attach`; the sweep's running
//! iterator and its records are in `sweep`, the kernel's
//! counters for the agent and its programs in `stats` (both re-exported
//! here: they are the loader's outputs).

use std::{error::Error as StdError, fmt::Write as _, path::PathBuf};

use aya::{
    Btf as AyaBtf, Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::Iter,
};
use tcpstall_common::{
    EVENTS_MAP, KernelLayout, LAYOUT_GLOBAL, READER_MAP, STATS_MAP, layout_flag,
};

use super::{
    btf::Btf,
    event::Mechanism,
    facts::{self, HzConfigFile, Privileges},
    kfunc::{self, AlignedObject},
    layout,
    probes::{PROBES, ProbeSpec},
};

mod attach;
mod guard;
mod on_demand;
mod stats;
mod sweep;

use attach::{AttachEnv, attach_probe};
pub use guard::GuardMaps;
pub use on_demand::DropSwitch;
pub use stats::{
    EpisodeFilter, KernelStats, ProgramRuntime, ProgramStatsReader, StatsReader, parse_prog_fdinfo,
};
use sweep::check_socket_constants;
pub use sweep::{SweepError, SweepOutput, SweepRun, parse_sweep_records};

/// The eBPF object built by `build.rs` (empty when built with AYA_BUILD_SKIP=1).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpstall"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "insufficient privileges: missing {missing}; run as root or grant CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (or CAP_SYS_ADMIN)"
    )]
    Privileges { missing: String },
    #[error(
        "this tcpstall binary was built without its kernel programs (AYA_BUILD_SKIP): rebuild with `cargo xtask build`"
    )]
    NoObject,
    #[error(
        "cannot read kernel BTF from {path}: {reason}; tcpstall needs a kernel with CONFIG_DEBUG_INFO_BTF=y"
    )]
    Btf { path: String, reason: String },
    #[error("{0}")]
    Layout(String),
    #[error("loading the eBPF object failed: {0}")]
    Object(String),
    #[error("{0}")]
    Map(String),
    #[error(
        "required probe `{probe}` could not be attached on kernel {kernel} (run `tcpstall doctor` for details): {attempts}"
    )]
    RequiredProbe {
        probe: &'static str,
        kernel: String,
        attempts: String,
    },
    #[error("--mechanism {0} is not a candidate for the write_timer probe")]
    BadForce(String),
    #[error("--deny-program {0}: no such program in the probe plan (`tcpstall doctor` lists them)")]
    BadDeny(String),
}

#[derive(Clone, Debug)]
pub struct LoaderOptions {
    /// Ring buffer size in bytes (power of two, >= page size).
    pub ringbuf_bytes: u32,
    /// Force the write-timer mechanism (skip the better ones). For tests and
    /// for working around a misbehaving hook.
    pub force_write_timer: Option<Mechanism>,
    /// cgroup2 directory for sock_ops (default: the cgroup2 root).
    pub cgroup: Option<PathBuf>,
    /// Read BTF from this file instead of /sys/kernel/btf/vmlinux.
    pub btf_path: Option<PathBuf>,
    /// Try every candidate (doctor): report all outcomes, keep the first that
    /// works attached.
    pub try_all: bool,
    /// Optional probes not to attach (by [`ProbeSpec::name`]), with the
    /// reason shown in the plan.
    pub disabled: Vec<(&'static str, &'static str)>,
    /// Programs treated as refused by the kernel (`--deny-program`): the
    /// plan falls through to the next candidate, as on a kernel whose
    /// verifier refuses them. For tests of the fallbacks and for working
    /// around a misbehaving program.
    pub denied: Vec<String>,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        Self {
            ringbuf_bytes: tcpstall_common::DEFAULT_RINGBUF_BYTES,
            force_write_timer: None,
            cgroup: None,
            btf_path: None,
            try_all: false,
            disabled: Vec::new(),
            denied: Vec::new(),
        }
    }
}

/// One attempt to load and attach a candidate.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Attempt {
    pub mechanism: Mechanism,
    pub target: String,
    /// The program in the eBPF object.
    pub program: &'static str,
    /// `None` = attached; `Some(reason)` = failed or skipped.
    pub error: Option<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ProbeStatus {
    pub probe: &'static str,
    pub required: bool,
    /// Turned off by the operator (the flag that did it); no metric series.
    pub disabled: Option<&'static str>,
    pub chosen: Option<Mechanism>,
    /// The program of the chosen mechanism.
    pub program: Option<&'static str>,
    pub attempts: Vec<Attempt>,
}

impl ProbeStatus {
    /// The program in use, or why none is: every attempt's reason.
    pub fn outcome(&self) -> Result<&'static str, String> {
        self.program.ok_or_else(|| {
            self.attempts
                .iter()
                .map(|a| format!("{}: {}", a.program, a.error.as_deref().unwrap_or("ok")))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    pub kernel: String,
    pub hz: Option<u32>,
    pub hz_source: Option<String>,
    pub probes: Vec<ProbeStatus>,
    /// Human-readable BTF field resolution report.
    pub fields: String,
    /// `enum skb_drop_reason` names by value, without the
    /// `SKB_DROP_REASON_` prefix (empty: the kernel's BTF has none).
    #[serde(skip)]
    pub drop_reasons: Vec<String>,
}

impl Plan {
    pub fn chosen(&self, probe: &str) -> Option<Mechanism> {
        self.probes
            .iter()
            .find(|p| p.probe == probe)
            .and_then(|p| p.chosen)
    }
}

/// Loaded and attached programs. Dropping it detaches everything.
pub struct Loaded {
    ebpf: Ebpf,
    pub plan: Plan,
    /// The sweep iterator program that loaded (`Err`: why none did).
    sweep: Result<&'static str, String>,
    /// Output size of the last sweep (the next read's buffer starts there).
    sweep_bytes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Whether the kernel offers `spec`'s hooks (all of its `offered_by`
/// functions are in the BTF): `Err` names the first one missing, or the
/// first of its `needs` missing with why it matters; `Ok(false)`: the probe
/// has no `offered_by` (its candidates are tried, it is not made required).
pub fn offered(spec: &ProbeSpec, btf: &Btf) -> Result<bool, String> {
    for (f, why) in spec.needs {
        if btf.func_id(f).is_err() {
            return Err(format!("the kernel has no {f} (BTF): {why}"));
        }
    }
    if spec.offered_by.is_empty() {
        return Ok(false);
    }
    for f in spec.offered_by {
        if btf.func_id(f).is_err() {
            return Err(format!("the kernel has no {f} (BTF)"));
        }
    }
    Ok(true)
}

fn chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    if s.contains("Verifier output:") {
        tracing::debug!("full verifier output: {s}");
    }
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            let _ = write!(s, ": {msg}");
        }
        cur = c.source();
    }
    // Verifier logs are long; doctor shows the first line.
    if let Some(i) = s.find("Verifier output:") {
        let rest = s[i + 16..].trim();
        // The verifier's reason is its last line before the statistics.
        let first = rest
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| {
                !l.is_empty()
                    && !l.starts_with("processed ")
                    && !l.starts_with("verification time")
                    && !l.starts_with("stack depth")
                    && !l.starts_with("-- END PROG LOAD LOG --")
            })
            .unwrap_or("")
            .to_owned();
        s.truncate(i);
        if first.is_empty() {
            s.push_str("(empty verifier log)");
        } else {
            let _ = write!(s, "verifier: {first}");
        }
    }
    s.trim().to_owned()
}

/// bpf(2) with `attr` as the command's `union bpf_attr` prefix (zero-padded,
/// the size passed is its size); the syscall's result.
///
/// # Safety
/// Every pointer in `attr` must be valid for what `cmd` does with it until
/// the call returns.
unsafe fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a live struct of the size passed; its pointers are
    // the caller's contract.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn raise_memlock() {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer. Failure is fine: 5.11+ accounts BPF memory to the
    // memory cgroup instead.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) };
    if ret != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK (fine on 5.11+ kernels)");
    }
}

/// Load the programs and attach the best available mechanism for each probe.
pub fn load(opts: &LoaderOptions) -> Result<Loaded, LoadError> {
    let privs = Privileges::current();
    if !privs.euid_root && !privs.missing().is_empty() {
        return Err(LoadError::Privileges {
            missing: privs.missing().join(", "),
        });
    }
    if EBPF_OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    if !opts.ringbuf_bytes.is_power_of_two() || opts.ringbuf_bytes < 4096 {
        return Err(LoadError::Map(format!(
            "ring buffer size {} is not a power of two >= 4096",
            opts.ringbuf_bytes
        )));
    }
    raise_memlock();
    let kernel_release = facts::release();
    let btf_path = opts
        .btf_path
        .clone()
        .unwrap_or_else(|| PathBuf::from("/sys/kernel/btf/vmlinux"));
    let btf_err = |reason: String| LoadError::Btf {
        path: btf_path.display().to_string(),
        reason,
    };
    // One read, one parse per consumer: aya's model for loading and
    // attaching, ours for the field offsets (aya does not expose members).
    let btf_bytes = std::fs::read(&btf_path).map_err(|e| btf_err(e.to_string()))?;
    let aya_btf =
        AyaBtf::parse(&btf_bytes, aya::Endianness::default()).map_err(|e| btf_err(chain(&e)))?;
    let our_btf = Btf::from_bytes(btf_bytes).map_err(|e| btf_err(e.to_string()))?;
    let resolved =
        layout::resolve(&our_btf, &kernel_release).map_err(|e| LoadError::Layout(e.to_string()))?;

    let hz = facts::hz();
    let mut kl: KernelLayout = resolved.layout();
    kl.flags |= layout_flag::READY;
    kl.ringbuf_wake_bytes = opts.ringbuf_bytes / 8;
    kl.sock_span = resolved.sock_span();
    let timer_addr = facts::kallsyms_lookup("tcp_write_timer");
    if let Ok(addr) = timer_addr {
        kl.tcp_write_timer_addr = addr;
    }
    let keepalive_timer_addr = facts::kallsyms_lookup("tcp_keepalive_timer");
    if let Ok(addr) = keepalive_timer_addr {
        kl.tcp_keepalive_timer_addr = addr;
    }
    let tw_timer_addr = facts::kallsyms_lookup("tw_timer_handler");
    if let Ok(addr) = tw_timer_addr {
        kl.tw_timer_handler_addr = addr;
    }

    // The `_cast` programs: `struct tcp_sock`'s id into the layout, the
    // kfunc's id into their call instructions. Without either they are not
    // tried (their twins are).
    let mut object = AlignedObject::new(EBPF_OBJECT);
    let rdonly_cast = rdonly_cast_ids(&our_btf).and_then(|(tcp_sock, func)| {
        kfunc::patch_calls(
            object.bytes_mut(),
            tcpstall_common::kfunc::RDONLY_CAST_MARKER,
            func,
        )
        .map_err(|e| e.to_string())?;
        kl.tcp_sock_btf_id = tcp_sock;
        Ok(())
    });

    let mut ebpf = EbpfLoader::new()
        .btf(Some(&aya_btf))
        .map_max_entries(EVENTS_MAP, opts.ringbuf_bytes)
        .override_global(LAYOUT_GLOBAL, &kl, true)
        .load(object.bytes())
        .map_err(|e| LoadError::Object(chain(&e)))?;

    if let Some(forced) = opts.force_write_timer {
        let spec = crate::kernel::probes::probe(crate::kernel::probes::WRITE_TIMER)
            .expect("write_timer probe");
        if !spec
            .candidates
            .iter()
            .any(|c| c.attach.mechanism() == forced)
        {
            return Err(LoadError::BadForce(forced.as_str().to_owned()));
        }
    }

    if let Some(unknown) = opts.denied.iter().find(|d| {
        !PROBES
            .iter()
            .flat_map(|p| p.candidates)
            .any(|c| c.program == d.as_str())
    }) {
        return Err(LoadError::BadDeny(unknown.clone()));
    }

    let env = AttachEnv {
        btf: &aya_btf,
        layout: &kl,
        rdonly_cast,
        timer_addr: timer_addr.map_err(|e| e.to_string()),
        keepalive_timer_addr: keepalive_timer_addr.map_err(|e| e.to_string()),
        tw_timer_addr: tw_timer_addr.map_err(|e| e.to_string()),
        cgroup: opts.cgroup.clone().or_else(facts::cgroup2_root),
        socket_constants: check_socket_constants(&our_btf),
        sock_ops_kern_sk: guard::check_sock_ops_kern(&our_btf),
    };
    let mut statuses = Vec::new();
    for spec in PROBES {
        let offered = offered(spec, &our_btf);
        let status = attach_probe(&mut ebpf, spec, &env, opts, &offered);
        if status.required && status.chosen.is_none() {
            let attempts = status
                .attempts
                .iter()
                .map(|a| {
                    format!(
                        "{} ({}): {}",
                        a.mechanism.as_str(),
                        a.program,
                        a.error.as_deref().unwrap_or("ok")
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            return Err(LoadError::RequiredProbe {
                probe: spec.name,
                kernel: kernel_release,
                attempts,
            });
        }
        statuses.push(status);
    }

    let sweep = statuses
        .iter()
        .find(|p| p.probe == crate::kernel::probes::SWEEP)
        .map_or_else(
            || Err("no sweep probe in the plan".to_owned()),
            ProbeStatus::outcome,
        );
    let plan = Plan {
        kernel: kernel_release,
        hz: hz.map(|(h, _)| h),
        hz_source: hz.map(|(_, s)| match s {
            HzConfigFile::ProcConfigGz => "/proc/config.gz".to_owned(),
            HzConfigFile::BootConfig => "/boot/config".to_owned(),
        }),
        probes: statuses,
        fields: resolved.to_string(),
        drop_reasons: our_btf.enum_names("skb_drop_reason", "SKB_DROP_REASON_"),
    };
    Ok(Loaded {
        ebpf,
        plan,
        sweep,
        sweep_bytes: Default::default(),
    })
}

/// vmlinux BTF ids of `struct tcp_sock` and of the `bpf_rdonly_cast` kfunc
/// (6.2+), or why the `_cast` programs cannot be used.
fn rdonly_cast_ids(btf: &Btf) -> Result<(u32, u32), String> {
    let func = btf
        .func_id(tcpstall_common::kfunc::RDONLY_CAST)
        .map_err(|_| {
            format!(
                "kernel BTF lacks the kfunc {} (6.2+)",
                tcpstall_common::kfunc::RDONLY_CAST
            )
        })?;
    let tcp_sock = btf.struct_id("tcp_sock").map_err(|e| e.to_string())?;
    Ok((tcp_sock, func))
}

impl Loaded {
    /// Whether the sweep can run (`Err`: why not).
    pub fn sweep_available(&self) -> Result<(), String> {
        self.sweep.clone().map(|_| ())
    }

    /// The sweep iterator program in use (`Err`: why none loaded).
    pub fn sweep_program(&self) -> Result<&'static str, String> {
        self.sweep.clone()
    }

    /// Runs the sweep iterator once over every task's open files and returns
    /// the TCP sockets it found. Blocking (a read of the iterator's file);
    /// `stats` gives the visited / overflow counters.
    pub fn sweep(&mut self, stats: &StatsReader) -> Result<SweepOutput, SweepError> {
        let name = self.sweep.clone().map_err(SweepError::Unavailable)?;
        self.sweep_with(name, stats)
    }

    /// [`Self::sweep`] with a given iterator program (loaded with
    /// `try_all` both are: benchmarks compare them).
    pub fn sweep_with(
        &mut self,
        program: &str,
        stats: &StatsReader,
    ) -> Result<SweepOutput, SweepError> {
        let run = self.start_sweep_with(program, stats)?;
        let records = run.read()?;
        run.finish(records, stats)
    }

    /// Starts a sweep (attaches the iterator; cheap): [`SweepRun::read`],
    /// the expensive part, can then run on another thread while this one
    /// keeps reading the ring buffer.
    pub fn start_sweep(&mut self, stats: &StatsReader) -> Result<SweepRun, SweepError> {
        let name = self.sweep.clone().map_err(SweepError::Unavailable)?;
        self.start_sweep_with(name, stats)
    }

    fn start_sweep_with(
        &mut self,
        program: &str,
        stats: &StatsReader,
    ) -> Result<SweepRun, SweepError> {
        if let Err(e) = &self.sweep {
            return Err(SweepError::Unavailable(e.clone()));
        }
        let run = |e: &dyn StdError| SweepError::Run(chain(e));
        let before = stats.read().map_err(|e| run(&e))?;
        let prog = self
            .ebpf
            .program_mut(program)
            .ok_or_else(|| SweepError::Unavailable("program missing".to_owned()))?;
        let p: &mut Iter = prog.try_into().map_err(|e| run(&e))?;
        let link_id = p.attach().map_err(|e| run(&e))?;
        let link = p.take_link(link_id).map_err(|e| run(&e))?;
        let file = link.into_file().map_err(|e| run(&e))?;
        Ok(SweepRun {
            file,
            before,
            bytes_hint: self.sweep_bytes.clone(),
        })
    }

    /// The event ring buffer (can be taken once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        let map = self
            .ebpf
            .take_map(EVENTS_MAP)
            .ok_or_else(|| LoadError::Map(format!("map {EVENTS_MAP} missing or already taken")))?;
        RingBuf::try_from(map).map_err(|e| LoadError::Map(chain(&e)))
    }

    /// The reader-mode map the programs consult before waking the reader
    /// (`tcpstall_common::reader`).
    pub fn take_reader_mode(&mut self) -> Result<aya::maps::Array<MapData, u32>, LoadError> {
        let map = self
            .ebpf
            .take_map(READER_MAP)
            .ok_or_else(|| LoadError::Map(format!("map {READER_MAP} missing or already taken")))?;
        aya::maps::Array::try_from(map).map_err(|e| LoadError::Map(chain(&e)))
    }

    /// Run-time statistics of every attached program, from the kernel's
    /// `/proc/self/fdinfo` of each program fd (duplicated, so the reader
    /// outlives borrows of `self`). With `enable_run_time`, the kernel's
    /// run-time accounting (`BPF_ENABLE_STATS`) is switched on for as long
    /// as the reader lives; `recursion_misses` is always counted.
    pub fn program_stats(&self, enable_run_time: bool) -> Result<ProgramStatsReader, LoadError> {
        use std::os::fd::AsFd as _;
        let mut programs = Vec::new();
        for attempt in self.plan.probes.iter().flat_map(|p| &p.attempts) {
            if attempt.error.is_some() {
                continue;
            }
            let fd = self
                .ebpf
                .program(attempt.program)
                .and_then(|p| p.fd().ok())
                .map(|fd| fd.as_fd().try_clone_to_owned())
                .transpose()
                .map_err(|e| {
                    LoadError::Map(format!(
                        "{}: duplicating the program fd: {e}",
                        attempt.program
                    ))
                })?;
            if let Some(fd) = fd {
                programs.push((attempt.program, fd));
            }
        }
        let run_time = if enable_run_time {
            Some(
                aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| {
                    LoadError::Map(format!(
                        "enabling BPF run-time statistics (--program-stats): {}",
                        chain(&e)
                    ))
                })?,
            )
        } else {
            None
        };
        Ok(ProgramStatsReader { programs, run_time })
    }

    /// The kernel-side counters (can be taken once).
    pub fn take_stats(&mut self) -> Result<StatsReader, LoadError> {
        let map = self
            .ebpf
            .take_map(STATS_MAP)
            .ok_or_else(|| LoadError::Map(format!("map {STATS_MAP} missing or already taken")))?;
        PerCpuArray::try_from(map)
            .map(StatsReader)
            .map_err(|e| LoadError::Map(chain(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The built object's marked kfunc calls all sit in its program
    /// sections: the section-table patcher finds every one that a scan of
    /// the whole file in 8-byte steps finds, at least one per `_cast`
    /// program. Mutation: `h.kind == SHT_PROGBITS` (inverted) in
    /// `kfunc::elf::code_sections` fails this with `NoMarker`.
    #[test]
    fn built_object_kfunc_calls_are_in_program_sections() {
        assert!(
            !EBPF_OBJECT.is_empty(),
            "built with AYA_BUILD_SKIP: no eBPF object to check; build it (`cargo xtask build`)"
        );
        let marker = tcpstall_common::kfunc::RDONLY_CAST_MARKER;
        let m = marker.to_le_bytes();
        let marked = [0x85, 0x20, 0, 0, m[0], m[1], m[2], m[3]];
        let anywhere = EBPF_OBJECT
            .chunks_exact(8)
            .filter(|insn| *insn == marked)
            .count();
        let mut object = AlignedObject::new(EBPF_OBJECT);
        let patched = kfunc::patch_calls(object.bytes_mut(), marker, 1).map_err(|e| e.to_string());
        let casts = crate::kernel::probes::PROBES
            .iter()
            .flat_map(|p| p.candidates)
            .filter(|c| c.rdonly_cast)
            .count();
        assert_eq!(patched, Ok(anywhere));
        assert!(
            anywhere >= casts,
            "{anywhere} marked calls, {casts} cast programs"
        );
    }

    /// The guard needs `bpf_setsockopt` of its options from sock_ops
    /// (5.9+), marked by a BTF function: a kernel without it gets "not
    /// offered" naming the function and why (doctor's line for every guard
    /// candidate; the guard stays off); one with it tries the candidates
    /// without making the guard required. Mutation: the `needs` loop in
    /// `offered` skipped (`.iter().take(0)`) -> "not offered without the
    /// function: Ok(false)".
    #[test]
    fn the_guard_is_not_offered_without_its_setsockopt_options() {
        use crate::kernel::btf::{
            Btf,
            writer::{BtfWriter, INT_SIGNED},
        };
        use crate::kernel::probes::{GUARD, GUARD_SETSOCKOPT_FUNC, probe};
        let btf = |with: bool| {
            let mut w = BtfWriter::new();
            let int = w.int("int", 4, INT_SIGNED);
            let proto = w.func_proto(int, &[("val", int)]);
            w.func("tcp_sock_set_keepidle", proto);
            if with {
                w.func(GUARD_SETSOCKOPT_FUNC, proto);
            }
            Btf::from_bytes(w.build()).expect("synthetic BTF")
        };
        let guard = probe(GUARD).expect("guard probe");
        let e = offered(guard, &btf(false)).expect_err("not offered without the function");
        assert!(
            e.contains(GUARD_SETSOCKOPT_FUNC) && e.contains("the guard stays off"),
            "{e}"
        );
        assert_eq!(offered(guard, &btf(true)), Ok(false));
    }

    #[test]
    fn parses_program_fdinfo() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t1057\nprog_type:\t26\n\
                    prog_jited:\t1\nprog_tag:\t5d85bdccd5ed36cc\nmemlock:\t20480\n\
                    prog_id:\t344\nrun_time_ns:\t123456\nrun_cnt:\t789\n\
                    recursion_misses:\t2\nverified_insns:\t1500\n";
        let r = parse_prog_fdinfo("x", text);
        assert_eq!(
            r,
            ProgramRuntime {
                program: "x",
                run_count: 789,
                run_time_ns: 123_456,
                recursion_misses: 2,
            }
        );
        // Older kernels: the lines are missing, the values read 0.
        let r = parse_prog_fdinfo("x", "pos:\t0\nprog_id:\t3\n");
        assert_eq!((r.run_count, r.run_time_ns, r.recursion_misses), (0, 0, 0));
    }
}
