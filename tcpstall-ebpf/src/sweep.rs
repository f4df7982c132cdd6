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
//!
//! Three programs, tried in this order (the agent's probe table, probe
//! `sweep`): [`tcpstall_sweep_direct`] reads the socket with plain loads
//! through the typed `tcp_sock` (`bpf_skc_to_tcp_sock`) and the task through
//! its BTF pointer (no helper call per field); [`tcpstall_sweep`] reads with
//! probe reads but asks `bpf_get_socket_cookie` for the cookie (a typed
//! socket); [`tcpstall_sweep_plain`] needs no typed socket at all: some
//! kernel builds hand out `socket->sk` as an untrusted pointer, which every
//! socket helper refuses. Tests are ordered cheapest first: a
//! non-socket file costs one helper call, a non-TCP socket a few loads.

use aya_ebpf::{
    bindings::{file, seq_file},
    helpers::{
        bpf_get_socket_cookie, bpf_probe_read_kernel, bpf_seq_write, bpf_skc_to_tcp_sock,
        bpf_sock_from_file,
    },
};
use tcpstall_common::{KernelLayout, SweepRecord, field, kind, source, stat};

use crate::snapshot::SOCK_KEEPOPEN_BIT;
use crate::{Direct, Probe, Skip, Source, bump, is_tcp, layout, now, snapshot};

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
const SOCK_STREAM: u64 = 1;

/// Probe-read variant (the fallback).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn tcpstall_sweep(ctx: *mut core::ffi::c_void) -> i32 {
    match try_sweep::<false>(ctx as *const IterTaskFile) {
        Ok(()) | Err(Skip) => 0,
    }
}

/// Plain-address variant (the last fallback): asks the verifier for
/// nothing a kernel build may withhold. The only typed pointer it passes to
/// a helper is the iterator's own `file` (to `bpf_sock_from_file`, which
/// the hook exists for); `socket->sk` and every socket and task field are
/// read with `bpf_probe_read_kernel` from plain addresses (scalars to the
/// verifier), and the cookie is `skc_cookie` as read.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn tcpstall_sweep_plain(ctx: *mut core::ffi::c_void) -> i32 {
    match try_sweep_plain(ctx as *const IterTaskFile) {
        Ok(()) | Err(Skip) => 0,
    }
}

/// The iterator's meta, task and fd, and the file's `struct socket *`.
type StreamSocket = (
    *mut IterMeta,
    *mut core::ffi::c_void,
    u32,
    *mut core::ffi::c_void,
);

/// The iterator's context fields and, for a stream socket's file, its
/// `struct socket *` (from `bpf_sock_from_file`); other files are skipped.
/// `DIRECT`: the socket's type read with a plain load (else a probe read).
#[inline(always)]
fn stream_socket<const DIRECT: bool>(ctx: *const IterTaskFile) -> Result<StreamSocket, Skip> {
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
    if socket_type::<DIRECT>(sock as *const u8) != SOCK_STREAM {
        return Err(Skip);
    }
    Ok((meta, task, fd, sock as *mut core::ffi::c_void))
}

#[inline(always)]
fn try_sweep_plain(ctx: *const IterTaskFile) -> Result<(), Skip> {
    let (meta, task, fd, sock) = stream_socket::<false>(ctx)?;
    let sock = sock as u64;
    let l = layout()?;
    // SAFETY: bpf_probe_read_kernel copes with any address; the result is a
    // plain number to the verifier (never a typed pointer).
    let sk = unsafe { bpf_probe_read_kernel((sock + SOCKET_SK_OFFSET as u64) as *const u64) }
        .unwrap_or(0);
    if sk == 0 {
        return Err(Skip);
    }
    let family = Probe(sk).get(&l.fields[field::SKC_FAMILY]) as u32;
    if (family != crate::AF_INET && family != crate::AF_INET6)
        || !l.fields[field::SK_PROTOCOL].is_present()
        || !is_tcp(l, sk)
    {
        return Err(Skip);
    }
    if !matters(l, Probe(sk)) {
        return Err(Skip);
    }
    // Cookie 0: `snapshot::fill_from` reads `skc_cookie`.
    emit(meta, l, Probe(sk), Probe(task as u64), fd, 0)
}

/// Direct-load variant (tried first).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn tcpstall_sweep_direct(ctx: *mut core::ffi::c_void) -> i32 {
    match try_sweep::<true>(ctx as *const IterTaskFile) {
        Ok(()) | Err(Skip) => 0,
    }
}

#[inline(always)]
fn socket_type<const DIRECT: bool>(sock: *const u8) -> u64 {
    if DIRECT {
        // SAFETY: `sock` is the BTF `struct socket *` of bpf_sock_from_file;
        // the verifier checks the constant-offset load against its BTF.
        u64::from(unsafe {
            core::ptr::read_volatile(sock.add(SOCKET_TYPE_OFFSET as usize).cast::<u16>())
        })
    } else {
        // SAFETY: bpf_probe_read_kernel copes with any address.
        unsafe { bpf_probe_read_kernel((sock as u64 + SOCKET_TYPE_OFFSET) as *const u16) }
            .map_or(0, u64::from)
    }
}

#[inline(always)]
fn try_sweep<const DIRECT: bool>(ctx: *const IterTaskFile) -> Result<(), Skip> {
    let (meta, task, fd, sock) = stream_socket::<DIRECT>(ctx)?;
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
    if DIRECT {
        let family = Direct(sk_ptr as *const u8).get(&l.fields[field::SKC_FAMILY]) as u32;
        if family != crate::AF_INET && family != crate::AF_INET6 {
            return Err(Skip);
        }
        // SAFETY: `sk_ptr` is a BTF `struct sock *`; null unless a full TCP socket.
        let tp = unsafe { bpf_skc_to_tcp_sock(sk_ptr) };
        if tp.is_null() {
            return Err(Skip);
        }
        let sk = Direct(tp as *const u8);
        if !matters(l, sk) {
            return Err(Skip);
        }
        // With plain loads, a socket that has a cookie already costs one load.
        let mut cookie = sk.get(&l.fields[field::SKC_COOKIE]);
        if cookie == 0 {
            // SAFETY: as above.
            cookie = unsafe { bpf_get_socket_cookie(sk_ptr) };
        }
        emit(meta, l, sk, Direct(task as *const u8), fd, cookie)
    } else {
        let sk = sk_ptr as u64;
        let family = Probe(sk).get(&l.fields[field::SKC_FAMILY]) as u32;
        if (family != crate::AF_INET && family != crate::AF_INET6)
            || !l.fields[field::SK_PROTOCOL].is_present()
            || !is_tcp(l, sk)
        {
            return Err(Skip);
        }
        if !matters(l, Probe(sk)) {
            return Err(Skip);
        }
        // SAFETY: `sk_ptr` is a BTF `struct sock *`.
        let cookie = unsafe { bpf_get_socket_cookie(sk_ptr) };
        emit(meta, l, Probe(sk), Probe(task as u64), fd, cookie)
    }
}

const TCP_ESTABLISHED: u64 = 1;
const TCP_CLOSE_WAIT: u64 = 8;

/// Whether the agent can use this TCP socket's record: the engine seeds
/// only sockets with a timer pending (RTO backoff, zero-window probing) or
/// data in flight, and CLOSE_WAIT ones; the audit lists established sockets
/// without SO_KEEPALIVE and TCP_USER_TIMEOUT. Every other socket (idle with
/// a timeout set, listeners, FIN_WAIT2 without a timer) is skipped here
/// with a few loads instead of a snapshot and a record, and only counted
/// (`stat::SWEEP_SKIPPED`, established ones also in
/// `stat::SWEEP_SKIPPED_ESTABLISHED`).
#[inline(always)]
fn matters<S: Source>(l: &KernelLayout, sk: S) -> bool {
    let f = &l.fields;
    let state = sk.get(&f[field::SKC_STATE]);
    if state == TCP_CLOSE_WAIT
        || sk.get(&f[field::ICSK_PENDING]) != 0
        || sk.get(&f[field::TP_PACKETS_OUT]) != 0
    {
        return true;
    }
    if state == TCP_ESTABLISHED {
        // Keepalive probes unanswered (nothing in flight): a keepalive stall.
        if sk.get(&f[field::ICSK_PROBES_OUT]) != 0 {
            return true;
        }
        if sk.get(&f[field::SK_FLAGS]) & SOCK_KEEPOPEN_BIT == 0
            && sk.get(&f[field::ICSK_USER_TIMEOUT]) == 0
        {
            return true;
        }
        bump(stat::SWEEP_SKIPPED_ESTABLISHED);
    }
    bump(stat::SWEEP_SKIPPED);
    false
}

/// Fills and writes one record for the TCP socket `sk` held by `task` at `fd`
/// (the callers checked that it [`matters`]).
#[inline(always)]
fn emit<S: Source>(
    meta: *mut IterMeta,
    l: &KernelLayout,
    sk: S,
    task: S,
    fd: u32,
    cookie: u64,
) -> Result<(), Skip> {
    let (ts, jiffies) = now();
    let mut rec = SweepRecord::zeroed();
    rec.event.ts_ns = ts;
    rec.event.jiffies = jiffies;
    rec.event.kind = kind::SWEEP;
    rec.event.source = source::SWEEP;
    snapshot::fill_from(&mut rec.event.sock, l, sk, cookie);
    snapshot::fill_keepalive(&mut rec.event.sock, l, sk);
    rec.keepalive_time = sk.get(&l.fields[field::TP_KEEPALIVE_TIME]) as u32;
    rec.keepalive_intvl = sk.get(&l.fields[field::TP_KEEPALIVE_INTVL]) as u32;
    rec.keepalive_probes = sk.get(&l.fields[field::TP_KEEPALIVE_PROBES]) as u32;
    rec.pid = task.get(&l.fields[field::TASK_TGID]) as u32;
    rec.fd = fd;
    let comm = &l.fields[field::TASK_COMM];
    if comm.is_present() {
        // SAFETY: bpf_probe_read_kernel copes with any address.
        if let Ok(c) = unsafe {
            bpf_probe_read_kernel(task.addr().wrapping_add(comm.offset as u64) as *const [u8; 16])
        } {
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
