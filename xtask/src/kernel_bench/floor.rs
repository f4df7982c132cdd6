//! The accounting floor: an empty program (`r0 = 0; exit`) on each
//! tracepoint tcpstall's programs sit on, loaded by the bench in the same
//! run so that "ns/run" can be read both absolutely and above what any
//! program on that hook costs under the kernel's run-time statistics.
//!
//! Loaded with the `bpf(2)` syscall directly, as a raw tracepoint program
//! (`BPF_PROG_TYPE_RAW_TRACEPOINT` + `BPF_RAW_TRACEPOINT_OPEN`): two
//! instructions need no ELF object, no BTF and no compiler, so the same code
//! works in the guests (bpftrace would need LLVM there and minutes under
//! TCG). A raw tracepoint program is dispatched exactly like tcpstall's
//! `tp_btf` programs (both are `bpf_raw_tp_link`s run by
//! `__bpf_trace_run`, with the same `run_time_ns` accounting around the
//! call); only the verifier's view of the arguments differs, which costs
//! nothing at run time.

use std::os::fd::{FromRawFd as _, OwnedFd};

use anyhow::bail;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;

/// `r0 = 0` (BPF_ALU64 | BPF_MOV | BPF_K), `exit` (BPF_JMP | BPF_EXIT).
const EMPTY_PROGRAM: [u64; 2] = [0xb7, 0x95];

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct RawTpOpenAttr {
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a live, zero-padded `union bpf_attr` prefix of the
    // size passed; the kernel reads (and for GET_INFO writes through) it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// One empty program attached to one tracepoint; detached and unloaded on
/// drop (closing the link and program fds).
pub struct FloorProgram {
    pub tracepoint: &'static str,
    pub id: u32,
    _link: OwnedFd,
    _prog: OwnedFd,
}

impl FloorProgram {
    pub fn attach(tracepoint: &'static str, name: &str) -> anyhow::Result<FloorProgram> {
        let license = c"GPL";
        let mut prog_name = [0u8; 16];
        let n = name.len().min(15);
        prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
        let mut load = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_RAW_TRACEPOINT,
            insn_cnt: EMPTY_PROGRAM.len() as u32,
            insns: EMPTY_PROGRAM.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name,
            ..Default::default()
        };
        let prog = match bpf(BPF_PROG_LOAD, &mut load) {
            // SAFETY: a new fd the kernel just returned, owned by nobody else.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd as i32) },
            Err(e) => bail!(
                "loading the empty floor program for {tracepoint} failed: {e} (needs root and a kernel with raw tracepoint programs)"
            ),
        };
        let tp = std::ffi::CString::new(tracepoint).expect("no NUL in a tracepoint name");
        let mut open = RawTpOpenAttr {
            name: tp.as_ptr() as u64,
            prog_fd: std::os::fd::AsRawFd::as_raw_fd(&prog) as u32,
            _pad: 0,
        };
        let link = match bpf(BPF_RAW_TRACEPOINT_OPEN, &mut open) {
            // SAFETY: as above.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd as i32) },
            Err(e) => bail!(
                "attaching the empty floor program to raw tracepoint {tracepoint} failed: {e}"
            ),
        };
        // bpf_prog_info starts with `type`, `id` (u32 each).
        let mut info = [0u32; 2];
        let mut get = InfoAttr {
            bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&prog) as u32,
            info_len: std::mem::size_of_val(&info) as u32,
            info: info.as_mut_ptr() as u64,
        };
        if let Err(e) = bpf(BPF_OBJ_GET_INFO_BY_FD, &mut get) {
            bail!("reading the floor program's id for {tracepoint} failed: {e}");
        }
        Ok(FloorProgram {
            tracepoint,
            id: info[1],
            _link: link,
            _prog: prog,
        })
    }
}

/// Floor programs on every tracepoint bpftrace counts (tcpstall's hooks).
pub fn attach_all(tracepoints: &[&'static str]) -> anyhow::Result<Vec<FloorProgram>> {
    tracepoints
        .iter()
        .map(|tp| {
            // Program names are at most 15 characters.
            let short: String = tp.chars().filter(|c| *c != '_').take(9).collect();
            FloorProgram::attach(tp, &format!("floor_{short}"))
        })
        .collect()
}
