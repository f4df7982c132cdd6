//! The socket sweep: an `iter/task_file` BPF iterator.
//!
//! It walks every task's open files (the tasks of the agent's pid namespace:
//! the whole node with `hostPID`), turns socket files into their `struct sock`
//! with `bpf_sock_from_file()` (5.11+) and writes one [`SweepRecord`] per TCP
//! socket into the iterator's seq_file, which the agent reads. No namespace is
//! entered: sockets of every network namespace are reached with CAP_BPF +
//! CAP_PERFMON only. The same socket appears once per file table holding it
//! (fork); the agent de-duplicates by cookie.
//!
//! The snapshot is the one every event program takes ([`crate::snapshot::fill`]).

use aya_ebpf::{
    bindings::{file, seq_file},
    helpers::{bpf_get_socket_cookie, bpf_probe_read_kernel, bpf_seq_write, bpf_sock_from_file},
};
use tcpstall_common::{SweepRecord, field, flag, kind, source, stat};

use crate::{Skip, bump, is_tcp, layout, now, read, snapshot};

/// `struct bpf_iter__task_file`: meta, task, fd, file.
#[repr(C)]
struct IterTaskFile {
    meta: *mut IterMeta,
    task: *mut core::ffi::c_void,
    fd: u32,
    _pad: u32,
    file: *mut file,
}

/// `struct bpf_iter_meta`.
#[repr(C)]
struct IterMeta {
    seq: *mut seq_file,
    session_id: u64,
    seq_num: u64,
}

/// Offset of `sk` in `struct socket` (checked against the running kernel's
/// BTF by the agent before loading: the verifier needs a constant here to
/// keep the pointer typed for `bpf_get_socket_cookie`).
pub const SOCKET_SK_OFFSET: usize = 24;
/// Offset of `type` (a `short`) in `struct socket` (checked likewise).
pub const SOCKET_TYPE_OFFSET: u64 = 4;
/// `SOCK_KEEPOPEN` in `enum sock_flags`.
const SOCK_KEEPOPEN_BIT: u64 = 1 << 3;
const SOCK_STREAM: u64 = 1;

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn tcpstall_sweep(ctx: *mut core::ffi::c_void) -> i32 {
    match try_sweep(ctx as *const IterTaskFile) {
        Ok(()) | Err(Skip) => 0,
    }
}

#[inline(always)]
fn socket_type(sock: u64) -> u64 {
    // SAFETY: bpf_probe_read_kernel copes with any address.
    unsafe { bpf_probe_read_kernel((sock + SOCKET_TYPE_OFFSET) as *const u16) }.map_or(0, u64::from)
}

#[inline(always)]
fn try_sweep(ctx: *const IterTaskFile) -> Result<(), Skip> {
    // SAFETY: the iterator context; every field is read with a plain load
    // at its constant offset, which the verifier checks against its BTF.
    let (meta, task, fd, filp) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx).meta),
            core::ptr::read_volatile(&(*ctx).task),
            core::ptr::read_volatile(&(*ctx).fd),
            core::ptr::read_volatile(&(*ctx).file),
        )
    };
    if meta.is_null() || task.is_null() || filp.is_null() {
        return Err(Skip);
    }
    // SAFETY: `filp` is the iterator's (non-null) `struct file *`.
    let sock = unsafe { bpf_sock_from_file(filp) };
    if sock.is_null() {
        return Err(Skip);
    }
    bump(stat::SWEEP_SOCKET_FILES);
    let l = layout()?;
    // SAFETY: typed load of `socket->sk` (constant offset, verified).
    let sk_ptr = unsafe {
        core::ptr::read_volatile(
            (sock as *const u8).add(SOCKET_SK_OFFSET) as *const *mut core::ffi::c_void
        )
    };
    if sk_ptr.is_null() {
        return Err(Skip);
    }
    let sk = sk_ptr as u64;
    let family = read(sk, &l.fields[field::SKC_FAMILY]) as u32;
    if (family != crate::AF_INET && family != crate::AF_INET6)
        || !l.fields[field::SK_PROTOCOL].is_present()
        || !is_tcp(l, sk)
        || socket_type(sock as u64) != SOCK_STREAM
    {
        return Err(Skip);
    }
    let (ts, jiffies) = now();
    // SAFETY: `sk_ptr` is a BTF `struct sock *`.
    let cookie = unsafe { bpf_get_socket_cookie(sk_ptr) };
    let mut rec = SweepRecord::zeroed();
    rec.event.ts_ns = ts;
    rec.event.jiffies = jiffies;
    rec.event.kind = kind::SWEEP;
    rec.event.source = source::SWEEP;
    snapshot::fill(&mut rec.event.sock, l, sk, cookie);
    if read(sk, &l.fields[field::SK_FLAGS]) & SOCK_KEEPOPEN_BIT != 0 {
        rec.event.sock.flags |= flag::KEEPOPEN;
    }
    rec.keepalive_time = read(sk, &l.fields[field::TP_KEEPALIVE_TIME]) as u32;
    rec.keepalive_intvl = read(sk, &l.fields[field::TP_KEEPALIVE_INTVL]) as u32;
    rec.keepalive_probes = read(sk, &l.fields[field::TP_KEEPALIVE_PROBES]) as u32;
    let t = task as u64;
    rec.pid = read(t, &l.fields[field::TASK_TGID]) as u32;
    rec.fd = fd;
    let comm = &l.fields[field::TASK_COMM];
    if comm.is_present() {
        // SAFETY: bpf_probe_read_kernel copes with any address.
        if let Ok(c) =
            unsafe { bpf_probe_read_kernel(t.wrapping_add(comm.offset as u64) as *const [u8; 16]) }
        {
            rec.comm = c;
        }
    }
    // SAFETY: `meta` is the iterator's (non-null) meta pointer.
    let seq = unsafe { core::ptr::read_volatile(&(*meta).seq) };
    // SAFETY: `seq` is the iterator's seq_file, `rec` lives on the stack.
    let r = unsafe {
        bpf_seq_write(
            seq,
            &rec as *const SweepRecord as *const core::ffi::c_void,
            core::mem::size_of::<SweepRecord>() as u32,
        )
    };
    if r != 0 {
        bump(stat::SWEEP_OVERFLOW);
    }
    Ok(())
}
