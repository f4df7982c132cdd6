//! tcpstall kernel programs.
//!
//! Every program is a thin wrapper around a `try_*` function returning
//! `Result`. Kernel struct fields are read at offsets the agent resolved from the
//! running kernel's BTF (`TCPSTALL_LAYOUT`); Rust eBPF has no CO-RE. Events go
//! to one ring buffer; an event that does not fit is counted in
//! `TCPSTALL_STATS[RINGBUF_DROPPED]`, never silently lost.
//!
//! Which of the write-timer programs runs is decided by the agent at start-up
//! (fentry > kprobe > timer_expire_entry tp_btf > sock_ops): exactly one of them
//! is attached.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_RTO_CB_FLAG, bpf_sock_ops,
    },
    helpers::{bpf_get_socket_cookie, bpf_jiffies64, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, fentry, kprobe, map, sock_ops},
    maps::{Array, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, FEntryContext, ProbeContext, SockOpsContext},
};
use tcpstall_common::{
    DEFAULT_RINGBUF_BYTES, Event, KernelLayout, field, flag, kind, layout_flag, pending, source,
    stat,
};

pub mod snapshot;
use snapshot::{is_tcp, read};
mod sweep;

#[map(name = "TCPSTALL_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RINGBUF_BYTES, 0);

#[map(name = "TCPSTALL_LAYOUT")]
static LAYOUT: Array<KernelLayout> = Array::with_max_entries(1, 0);

#[map(name = "TCPSTALL_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

const AF_INET: u32 = 2;
use snapshot::AF_INET6;
const TCP_CLOSE: u32 = 7;
const TCP_LISTEN: u32 = 10;

/// Program failed before an event could be sent (nothing to report).
struct Skip;

#[inline(always)]
fn bump(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot owned by this CPU while the program runs.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn layout() -> Result<&'static KernelLayout, Skip> {
    match LAYOUT.get(0) {
        Some(l) if l.flags & layout_flag::READY != 0 => Ok(l),
        _ => Err(Skip),
    }
}

/// Argument `n` of a BTF-typed program as a plain number. The verifier keeps
/// the type of a trusted pointer and refuses variable-offset arithmetic on it,
/// so pointers used with BTF-resolved offsets are re-read from the context.
#[inline(always)]
fn arg_scalar(ctx: *mut core::ffi::c_void, n: usize) -> u64 {
    // SAFETY: tracing contexts are arrays of u64 arguments.
    unsafe { bpf_probe_read_kernel((ctx as *const u64).wrapping_add(n)) }.unwrap_or(0)
}

#[inline(always)]
fn now() -> (u64, u64) {
    // SAFETY: helpers without arguments.
    unsafe { (bpf_ktime_get_ns(), bpf_jiffies64()) }
}

/// Reserve, fill and submit one event; count it as dropped when the ring
/// buffer is full.
#[inline(always)]
fn emit(fill: impl FnOnce(&mut Event)) {
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            let ev = entry.write(Event::zeroed());
            fill(ev);
            entry.submit(0);
            bump(stat::SUBMITTED);
        }
        None => bump(stat::RINGBUF_DROPPED),
    }
}

// ---------------------------------------------------------------------------
// tcp:tcp_retransmit_skb (tp_btf): every retransmitted segment.

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcpstall_retransmit_btf(ctx: BtfTracePointContext) -> i32 {
    match try_retransmit_btf(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

/// 6.17+: the tracepoint also fires for failed attempts; its third argument
/// (`err`) tells them apart. Loading fails on kernels without that argument,
/// and the agent falls back to the program above.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcpstall_retransmit_btf_err(ctx: BtfTracePointContext) -> i32 {
    let err: i32 = ctx.arg(2);
    if err != 0 {
        bump(stat::RETRANSMIT_FAILED);
        return 0;
    }
    match try_retransmit_btf(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

/// The socket (argument 0) of a BTF tracepoint: the typed pointer for helpers
/// and the same address as a number for BTF-offset reads.
#[inline(always)]
fn tp_sock(ctx: &BtfTracePointContext) -> (*mut core::ffi::c_void, u64) {
    (ctx.arg(0), arg_scalar(ctx.as_ptr(), 0))
}

/// Emit one socket event of `kind` from a BTF tracepoint; `finish` adds what
/// is specific to the hook.
#[inline(always)]
fn sock_event(
    l: &KernelLayout,
    sk_ptr: *mut core::ffi::c_void,
    sk: u64,
    event_kind: u32,
    finish: impl FnOnce(&mut Event),
) -> Result<(), Skip> {
    let (ts, jiffies) = now();
    // SAFETY: `sk_ptr` is the tracepoint's `struct sock *` (a BTF pointer).
    let cookie = unsafe { bpf_get_socket_cookie(sk_ptr) };
    emit(|ev| {
        ev.ts_ns = ts;
        ev.jiffies = jiffies;
        ev.kind = event_kind;
        ev.source = source::TP_BTF;
        snapshot::fill(&mut ev.sock, l, sk, cookie);
        finish(ev);
    });
    Ok(())
}

#[inline(always)]
fn try_retransmit_btf(ctx: &BtfTracePointContext) -> Result<(), Skip> {
    let l = layout()?;
    let (sk_ptr, sk) = tp_sock(ctx);
    sock_event(l, sk_ptr, sk, kind::RETRANSMIT, |_| {})
}

// ---------------------------------------------------------------------------
// sock:inet_sock_set_state (tp_btf): every TCP state change.

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tcpstall_state_btf(ctx: BtfTracePointContext) -> i32 {
    match try_state_btf(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

fn try_state_btf(ctx: &BtfTracePointContext) -> Result<(), Skip> {
    let l = layout()?;
    let (sk_ptr, sk) = tp_sock(ctx);
    if !is_tcp(l, sk) {
        return Err(Skip);
    }
    let old_state: i32 = ctx.arg(1);
    let new_state: i32 = ctx.arg(2);
    sock_event(l, sk_ptr, sk, kind::STATE, |ev| {
        ev.old_state = old_state as u32;
        ev.sock.state = new_state as u32;
    })
}

// ---------------------------------------------------------------------------
// sock:inet_sk_error_report (tp_btf): the kernel's error verdict.

#[btf_tracepoint(function = "inet_sk_error_report")]
pub fn tcpstall_error_report_btf(ctx: BtfTracePointContext) -> i32 {
    match try_error_report_btf(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

fn try_error_report_btf(ctx: &BtfTracePointContext) -> Result<(), Skip> {
    let l = layout()?;
    let (sk_ptr, sk) = tp_sock(ctx);
    if !is_tcp(l, sk) {
        return Err(Skip);
    }
    sock_event(l, sk_ptr, sk, kind::ERROR_REPORT, |_| {})
}

// ---------------------------------------------------------------------------
// tcp:tcp_probe (tp_btf): ACK progress that ends an RTO episode.

/// Runs for every segment an established socket receives (before the kernel
/// processes it), so the filter comes first and costs one read: only sockets
/// inside an RTO episode (`icsk_retransmits != 0`, reset by the first ACK
/// that advances `snd_una`) go further, and only a segment acknowledging new
/// data is reported. That is one event per recovered episode.
#[btf_tracepoint(function = "tcp_probe")]
pub fn tcpstall_ack_btf(ctx: BtfTracePointContext) -> i32 {
    match try_ack_btf(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

fn try_ack_btf(ctx: &BtfTracePointContext) -> Result<(), Skip> {
    let l = layout()?;
    let f = &l.fields;
    let (sk_ptr, sk) = tp_sock(ctx);
    if read(sk, &f[field::ICSK_RETRANSMITS]) == 0 {
        return Err(Skip);
    }
    let cb = &f[field::SKB_CB];
    let ack_field = &f[field::TCP_SKB_CB_ACK_SEQ];
    if !cb.is_present() || !ack_field.is_present() {
        return Err(Skip);
    }
    let skb = arg_scalar(ctx.as_ptr(), 1);
    if skb == 0 {
        return Err(Skip);
    }
    let ack = read(skb.wrapping_add(cb.offset as u64), ack_field) as u32;
    let una = read(sk, &f[field::TP_SND_UNA]) as u32;
    // after(ack, una) in sequence space.
    if (ack.wrapping_sub(una) as i32) <= 0 {
        return Err(Skip);
    }
    sock_event(l, sk_ptr, sk, kind::ACK, |ev| ev.ack_seq = ack)
}

// ---------------------------------------------------------------------------
// The write timer (RTO and zero-window probe). One of four mechanisms.

/// Shared by the fentry, kprobe and timer-tracepoint paths: `sk` is the socket
/// whose write timer is expiring now, before the kernel handles it.
#[inline(always)]
fn write_timer_event(l: &KernelLayout, sk: u64, src: u32, cookie: u64) -> Result<(), Skip> {
    let f = &l.fields;
    let pend = read(sk, &f[field::ICSK_PENDING]) as u32;
    let state = read(sk, &f[field::SKC_STATE]) as u32;
    if (pend != pending::RETRANS && pend != pending::PROBE0)
        || state == TCP_CLOSE
        || state == TCP_LISTEN
    {
        bump(stat::TIMER_NOT_DUE);
        return Err(Skip);
    }
    let (ts, jiffies) = now();
    let expires = read(sk, &f[field::ICSK_TIMER_EXPIRES]);
    // The handler re-arms and returns when the timer fired early.
    if f[field::ICSK_TIMER_EXPIRES].is_present() && (expires.wrapping_sub(jiffies) as i64) > 0 {
        bump(stat::TIMER_NOT_DUE);
        return Err(Skip);
    }
    emit(|ev| {
        ev.ts_ns = ts;
        ev.jiffies = jiffies;
        ev.kind = kind::WRITE_TIMER;
        ev.source = src;
        snapshot::fill(&mut ev.sock, l, sk, cookie);
    });
    Ok(())
}

#[fentry(function = "tcp_write_timer_handler")]
pub fn tcpstall_write_timer_fentry(ctx: FEntryContext) -> i32 {
    match try_write_timer_fentry(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

fn try_write_timer_fentry(ctx: &FEntryContext) -> Result<(), Skip> {
    let l = layout()?;
    let sk_ptr: *mut core::ffi::c_void = ctx.arg(0);
    let sk = arg_scalar(ctx.as_ptr(), 0);
    // SAFETY: `sk_ptr` is the traced function's `struct sock *` (a BTF pointer).
    let cookie = unsafe { bpf_get_socket_cookie(sk_ptr) };
    write_timer_event(l, sk, source::FENTRY, cookie)
}

#[kprobe]
pub fn tcpstall_write_timer_kprobe(ctx: ProbeContext) -> u32 {
    match try_write_timer_kprobe(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

fn try_write_timer_kprobe(ctx: &ProbeContext) -> Result<(), Skip> {
    let l = layout()?;
    let sk: u64 = ctx.arg(0).ok_or(Skip)?;
    write_timer_event(l, sk, source::KPROBE, 0)
}

#[btf_tracepoint(function = "timer_expire_entry")]
pub fn tcpstall_write_timer_tp(ctx: BtfTracePointContext) -> i32 {
    match try_write_timer_tp(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

fn try_write_timer_tp(ctx: &BtfTracePointContext) -> Result<(), Skip> {
    let l = layout()?;
    let timer = arg_scalar(ctx.as_ptr(), 0);
    // Every timer in the system passes here: filter on the callback first.
    let function = read(timer, &l.fields[field::TIMER_FUNCTION]);
    if function == 0 || function != l.tcp_write_timer_addr {
        return Err(Skip);
    }
    let sk = timer.wrapping_sub(l.fields[field::WRITE_TIMER].offset as u64);
    write_timer_event(l, sk, source::TIMER_TP, 0)
}

/// cgroup sock_ops: RTO_CB for sockets established after attach (no
/// zero-window probe callback exists). Every context field is read with
/// `read_volatile`: LLVM may otherwise merge two u32 reads into one 8-byte
/// read, which the verifier rejects.
#[sock_ops]
pub fn tcpstall_sock_ops(ctx: SockOpsContext) -> u32 {
    match try_sock_ops(&ctx) {
        Ok(()) | Err(Skip) => 1,
    }
}

#[inline(always)]
fn ops_field(v: &u32) -> u32 {
    // SAFETY: `v` points into the sock_ops context.
    unsafe { core::ptr::read_volatile(v) }
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), Skip> {
    let ops: &bpf_sock_ops = unsafe { &*ctx.ops };
    let op = ops_field(&ops.op);
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        let flags = ops_field(&ops.bpf_sock_ops_cb_flags);
        let _ = ctx.set_cb_flags((flags | BPF_SOCK_OPS_RTO_CB_FLAG) as i32);
        return Ok(());
    }
    if op != BPF_SOCK_OPS_RTO_CB {
        return Err(Skip);
    }
    let (ts, jiffies) = now();
    // SAFETY: sock_ops programs may ask for the cookie of their socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the args union is valid for RTO_CB.
    let args = unsafe { &ops.__bindgen_anon_1.args };
    let family = ops_field(&ops.family);
    emit(|ev| {
        ev.ts_ns = ts;
        ev.jiffies = jiffies;
        ev.kind = kind::WRITE_TIMER;
        ev.source = source::SOCK_OPS;
        ev.sock.cookie = cookie;
        ev.sock.family = family;
        ev.sock.state = ops_field(&ops.state);
        ev.sock.sport = ops_field(&ops.local_port) as u16;
        ev.sock.dport = u16::from_be((ops_field(&ops.remote_port) >> 16) as u16);
        if family == AF_INET6 {
            for i in 0..4 {
                let s = ops_field(&ops.local_ip6[i]).to_ne_bytes();
                let d = ops_field(&ops.remote_ip6[i]).to_ne_bytes();
                ev.sock.saddr[i * 4..i * 4 + 4].copy_from_slice(&s);
                ev.sock.daddr[i * 4..i * 4 + 4].copy_from_slice(&d);
            }
        } else if family == AF_INET {
            ev.sock.saddr[..4].copy_from_slice(&ops_field(&ops.local_ip4).to_ne_bytes());
            ev.sock.daddr[..4].copy_from_slice(&ops_field(&ops.remote_ip4).to_ne_bytes());
        }
        ev.sock.pending = pending::RETRANS;
        ev.sock.retransmits = ops_field(&args[0]);
        ev.sock.rto_jiffies = ops_field(&args[1]);
        if ops_field(&args[2]) != 0 {
            ev.sock.flags |= flag::RTO_EXPIRED;
        }
        ev.sock.snd_una = ops_field(&ops.snd_una);
        ev.sock.packets_out = ops_field(&ops.packets_out);
        ev.sock.retrans_out = ops_field(&ops.retrans_out);
        ev.sock.total_retrans = ops_field(&ops.total_retrans);
    });
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
