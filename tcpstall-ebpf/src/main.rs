//! tcpstall kernel programs.
//!
//! Every program is a thin wrapper around a `try_*` function returning
//! `Result`. Kernel struct fields are read at offsets the agent resolved from the
//! running kernel's BTF (`TCPSTALL_LAYOUT`, a read-only global the agent sets
//! at load time: the verifier sees the offsets as constants); Rust eBPF has no
//! CO-RE. Events go
//! to one ring buffer; an event that does not fit is counted in
//! `TCPSTALL_STATS[RINGBUF_DROPPED]`, never silently lost.
//!
//! Which of the write-timer programs runs is decided by the agent at start-up
//! (fentry > kprobe > timer_expire_entry tp_btf > sock_ops): exactly one of them
//! is attached.
#![no_std]
#![feature(asm_experimental_arch)]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_RTO_CB_FLAG, bpf_sock_ops,
    },
    helpers::{
        bpf_get_socket_cookie, bpf_jiffies64, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_skc_to_tcp_sock,
    },
    macros::{btf_tracepoint, fentry, kprobe, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, FEntryContext, ProbeContext, SockOpsContext},
};
use tcpstall_common::{
    DEFAULT_RINGBUF_BYTES, EPISODES_MAX, Event, KernelLayout, TW_MAX, field, flag, kind,
    layout_flag, pending, source, stat,
};

mod guard;
mod kfunc;
pub mod snapshot;
use snapshot::{Copied, Direct, Plain, Probe, Source, is_tcp, read};
use tcpstall_common::{SOCK_SCRATCH_BYTES, SockSnapshot};
mod sweep;

#[map(name = "TCPSTALL_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RINGBUF_BYTES, 0);

/// The kernel layout, set by the agent before loading (`LAYOUT_GLOBAL`). Lives
/// in `.rodata`, which the loader freezes: loads from it are constants to the
/// verifier. Read only through [`layout`].
#[unsafe(no_mangle)]
static TCPSTALL_LAYOUT: KernelLayout = KernelLayout::zeroed();

/// The agent's reader state (`tcpstall_common::reader`), written by the
/// agent; see [`emit`].
#[map(name = "TCPSTALL_READER")]
static READER: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "TCPSTALL_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Sockets in a loss episode (cookie -> 1), kept by the agent: the drop
/// program reports only skbs they own.
#[map(name = "TCPSTALL_EPISODES")]
static EPISODES: HashMap<u64, u8> = HashMap::with_max_entries(EPISODES_MAX, 0);

/// Timewait sockets whose timer started in the FIN_WAIT2 substate
/// (`tcpstall_common::TW_MAP`), kept by the timewait timer programs.
#[map(name = "TCPSTALL_TW")]
static TW: LruHashMap<u64, u8> = LruHashMap::with_max_entries(TW_MAX, 0);

/// Per-CPU scratch for one socket's span (`snapshot::Copied`).
#[map(name = "TCPSTALL_SCRATCH")]
static SCRATCH: PerCpuArray<[u8; SOCK_SCRATCH_BYTES as usize]> =
    PerCpuArray::with_max_entries(1, 0);

const AF_INET: u32 = 2;
use snapshot::AF_INET6;
const TCP_CLOSE: u32 = 7;
const TCP_LISTEN: u32 = 10;
const TCP_FIN_WAIT2: u8 = 5;
const TCP_TIME_WAIT: u8 = 6;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;

/// Program failed before an event could be sent (nothing to report).
struct Skip;

#[inline(always)]
fn bump(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot owned by this CPU while the program runs.
        unsafe { *counter += 1 };
    }
}

/// The layout the agent set, without the READY check (see [`layout`]).
/// The address goes through an empty `asm!` block that LLVM cannot see
/// into: the compiler sees an immutable zeroed static and would otherwise
/// fold every field to its initializer; the verifier keeps the register's
/// map identity and folds the loads to the values set at load time. (A
/// volatile stack slot did the same at the cost of a store and a load on
/// every run.)
#[inline(always)]
fn layout_unchecked() -> &'static KernelLayout {
    let mut p: *const KernelLayout = &TCPSTALL_LAYOUT;
    // SAFETY: an empty block; `p` stays the static's address.
    unsafe { core::arch::asm!("/* {0} */", inout(reg) p, options(nostack, nomem, pure)) };
    // SAFETY: the static's address.
    unsafe { &*p }
}

/// The layout the agent set, once it is READY (the verifier folds the check).
#[inline(always)]
fn layout() -> Result<&'static KernelLayout, Skip> {
    let l = layout_unchecked();
    if l.flags & layout_flag::READY != 0 {
        Ok(l)
    } else {
        Err(Skip)
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
/// buffer is full. `fill` writes every field of the event once, straight into
/// the reserved slot (nothing is zeroed first).
///
/// The wake-up follows the agent's reader (`TCPSTALL_READER`, see
/// `reader.rs`): while it polls the ring (events arrived recently) no
/// record wakes it (an irq_work and a context switch per event would buy
/// nothing: events carry their own kernel timestamps), except once the ring
/// holds `ringbuf_wake_bytes` (an eighth), so a burst cannot outrun the
/// poll. While it sleeps on the ring's fd (a quiet node: no timer runs in
/// the agent for the ring), the kernel's own rule applies (flags 0): the
/// first record after the reader drained wakes it, the next ones do not.
#[inline(always)]
fn emit(fill: impl FnOnce(&mut Event)) {
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            // SAFETY: the reserved slot is ring-buffer memory (bytes the
            // kernel owns, every bit pattern a valid `Event`), exclusively
            // ours until submit.
            fill(unsafe { &mut *entry.as_mut_ptr() });
            let polling = READER
                .get(0)
                .is_some_and(|v| *v == tcpstall_common::reader::POLLING);
            let flags = if !polling {
                0
            } else {
                let wake_bytes = layout().map_or(0, |l| u64::from(l.ringbuf_wake_bytes));
                if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= wake_bytes {
                    BPF_RB_FORCE_WAKEUP as u64
                } else {
                    BPF_RB_NO_WAKEUP as u64
                }
            };
            entry.submit(flags);
            bump(stat::SUBMITTED);
        }
        None => bump(stat::RINGBUF_DROPPED),
    }
}

/// Every header field of `ev` (kind-specific ones 0).
#[inline(always)]
fn header(ev: &mut Event, kind: u8, source: u8, (ts_ns, jiffies): (u64, u64)) {
    ev.ts_ns = ts_ns;
    ev.jiffies = jiffies;
    ev.ack_seq = 0;
    ev.kind = kind;
    ev.source = source;
    ev.old_state = 0;
    ev._reserved = 0;
}

// ---------------------------------------------------------------------------
// tcp:tcp_retransmit_skb (tp_btf): every retransmitted segment.

/// Each tp_btf program exists twice: `DIRECT` reads the socket with plain
/// loads through the typed `tcp_sock` (`bpf_skc_to_tcp_sock`, 5.9+), the other
/// with probe reads. The agent tries the direct one first and falls back when
/// it does not load (see the probe table).
macro_rules! tp_program {
    ($name:ident, $direct:literal, $tp:literal, $body:ident) => {
        #[btf_tracepoint(function = $tp)]
        pub fn $name(ctx: BtfTracePointContext) -> i32 {
            match $body::<$direct>(&ctx) {
                Ok(()) | Err(Skip) => 0,
            }
        }
    };
}

/// The socket tracepoints' programs: `DIRECT` as above; `PLAIN`, the last
/// fallback, reads with probe reads from the argument as a plain number and
/// takes the cookie as the socket holds it (`skc_cookie`, 0 until asked),
/// never passing the socket to a helper: a kernel build whose verifier does
/// not trust the tracepoint's pointer still loads it.
macro_rules! tp_sock_program {
    ($name:ident, $direct:literal, $plain:literal, $tp:literal, $body:ident) => {
        #[btf_tracepoint(function = $tp)]
        pub fn $name(ctx: BtfTracePointContext) -> i32 {
            match $body::<$direct, $plain>(&ctx) {
                Ok(()) | Err(Skip) => 0,
            }
        }
    };
}

// ---------------------------------------------------------------------------
// tcp:tcp_retransmit_skb (tp_btf): every retransmitted segment.

tp_sock_program!(
    tcpstall_retransmit_btf,
    false,
    false,
    "tcp_retransmit_skb",
    try_retransmit_btf
);
tp_sock_program!(
    tcpstall_retransmit_direct,
    true,
    false,
    "tcp_retransmit_skb",
    try_retransmit_btf
);
tp_sock_program!(
    tcpstall_retransmit_plain,
    false,
    true,
    "tcp_retransmit_skb",
    try_retransmit_btf
);
// 6.17+: the tracepoint also fires for failed attempts; its third argument
// (`err`) tells them apart. Loading fails on kernels without that argument,
// and the agent falls back to the programs above.
tp_sock_program!(
    tcpstall_retransmit_btf_err,
    false,
    false,
    "tcp_retransmit_skb",
    try_retransmit_err
);
tp_sock_program!(
    tcpstall_retransmit_direct_err,
    true,
    false,
    "tcp_retransmit_skb",
    try_retransmit_err
);
tp_sock_program!(
    tcpstall_retransmit_plain_err,
    false,
    true,
    "tcp_retransmit_skb",
    try_retransmit_err
);

#[inline(always)]
fn try_retransmit_err<const DIRECT: bool, const PLAIN: bool>(
    ctx: &BtfTracePointContext,
) -> Result<(), Skip> {
    let err: i32 = ctx.arg(2);
    if err != 0 {
        // This node failed to send it (a netfilter drop, no route, a full
        // qdisc): reported as evidence, not as a retransmission.
        bump(stat::RETRANSMIT_FAILED);
        let l = layout()?;
        return tp_sock_event::<DIRECT, PLAIN>(ctx, l, false, kind::RETRANSMIT_ERROR, |ev| {
            ev.ack_seq = err as u32
        });
    }
    try_retransmit_btf::<DIRECT, PLAIN>(ctx)
}

/// A BTF tracepoint's `struct sock *` (typed for the verifier).
type SkPtr = *mut core::ffi::c_void;

/// What a BTF tracepoint program does with its socket once [`tp_sock`] has
/// chosen how to read it (one generic method: a closure cannot be generic
/// over the [`Source`]).
trait SockHandler {
    fn handle<S: Source>(self, l: &KernelLayout, sk: S, sk_ptr: SkPtr) -> Result<(), Skip>;
}

/// The BTF tracepoint's socket (argument 0), read the program's way.
/// `DIRECT`: plain loads through the typed `tcp_sock`; a socket that is not
/// a full TCP socket (no `tcp_sock`) goes the probe-read way, where
/// `tcp_only` drops non-TCP sockets. `PLAIN`: probe reads from the plain
/// address (the last fallback).
#[inline(always)]
fn tp_sock<const DIRECT: bool, const PLAIN: bool, H: SockHandler>(
    ctx: &BtfTracePointContext,
    l: &KernelLayout,
    tcp_only: bool,
    handler: H,
) -> Result<(), Skip> {
    let sk_ptr: *mut core::ffi::c_void = ctx.arg(0);
    if DIRECT {
        // SAFETY: `sk_ptr` is the tracepoint's `struct sock *` (a BTF pointer).
        let tp = unsafe { bpf_skc_to_tcp_sock(sk_ptr) };
        if !tp.is_null() {
            return handler.handle(l, Direct(tp as *const u8), sk_ptr);
        }
    }
    let sk = arg_scalar(ctx.as_ptr(), 0);
    if tcp_only && !is_tcp(l, sk) {
        return Err(Skip);
    }
    if PLAIN {
        return handler.handle(l, Plain(sk), sk_ptr);
    }
    handler.handle(l, Probe(sk), sk_ptr)
}

/// [`SockHandler`]: one socket event of `kind`, `finish` adding what is
/// specific to the hook.
struct EmitSockEvent<F: FnOnce(&mut Event)> {
    kind: u8,
    finish: F,
}

impl<F: FnOnce(&mut Event)> SockHandler for EmitSockEvent<F> {
    #[inline(always)]
    fn handle<S: Source>(self, l: &KernelLayout, sk: S, sk_ptr: SkPtr) -> Result<(), Skip> {
        sock_event(l, sk, sk_ptr, self.kind, self.finish)
    }
}

/// Emit one socket event of `kind` for the BTF tracepoint's socket ([`tp_sock`]).
#[inline(always)]
fn tp_sock_event<const DIRECT: bool, const PLAIN: bool>(
    ctx: &BtfTracePointContext,
    l: &KernelLayout,
    tcp_only: bool,
    event_kind: u8,
    finish: impl FnOnce(&mut Event),
) -> Result<(), Skip> {
    tp_sock::<DIRECT, PLAIN, _>(
        ctx,
        l,
        tcp_only,
        EmitSockEvent {
            kind: event_kind,
            finish,
        },
    )
}

/// Emit one socket event of `kind`; `finish` adds what is specific to the
/// hook.
#[inline(always)]
fn sock_event<S: Source>(
    l: &KernelLayout,
    sk: S,
    sk_ptr: *mut core::ffi::c_void,
    event_kind: u8,
    finish: impl FnOnce(&mut Event),
) -> Result<(), Skip> {
    let t = now();
    let cookie = cookie_of(l, sk, sk_ptr);
    emit(|ev| {
        header(ev, event_kind, source::TP_BTF, t);
        snapshot::fill_from(&mut ev.sock, l, sk, cookie);
        finish(ev);
    });
    Ok(())
}

/// The socket's cookie: with plain loads, a socket that has one already
/// costs one load; otherwise the kernel assigns it (`sk_ptr`: a BTF
/// `struct sock *`).
#[inline(always)]
fn cookie_of<S: Source>(l: &KernelLayout, sk: S, sk_ptr: *mut core::ffi::c_void) -> u64 {
    if !S::COOKIE_HELPER {
        return sk.get(&l.fields[field::SKC_COOKIE]);
    }
    let cookie = if S::PLAIN_LOADS {
        sk.get(&l.fields[field::SKC_COOKIE])
    } else {
        0
    };
    if cookie != 0 {
        return cookie;
    }
    // SAFETY: `sk_ptr` is a BTF `struct sock *`.
    unsafe { bpf_get_socket_cookie(sk_ptr) }
}

#[inline(always)]
fn try_retransmit_btf<const DIRECT: bool, const PLAIN: bool>(
    ctx: &BtfTracePointContext,
) -> Result<(), Skip> {
    let l = layout()?;
    tp_sock_event::<DIRECT, PLAIN>(ctx, l, false, kind::RETRANSMIT, |_| {})
}

// ---------------------------------------------------------------------------
// sock:inet_sock_set_state (tp_btf): every TCP state change.

tp_sock_program!(
    tcpstall_state_btf,
    false,
    false,
    "inet_sock_set_state",
    try_state_btf
);
tp_sock_program!(
    tcpstall_state_direct,
    true,
    false,
    "inet_sock_set_state",
    try_state_btf
);
tp_sock_program!(
    tcpstall_state_plain,
    false,
    true,
    "inet_sock_set_state",
    try_state_btf
);

#[inline(always)]
fn try_state_btf<const DIRECT: bool, const PLAIN: bool>(
    ctx: &BtfTracePointContext,
) -> Result<(), Skip> {
    let l = layout()?;
    let change = StateChange {
        old: ctx.arg::<i32>(1) as u8,
        new: ctx.arg::<i32>(2) as u8,
    };
    tp_sock::<DIRECT, PLAIN, _>(ctx, l, true, change)
}

/// [`SockHandler`]: the state tracepoint's change ([`state_event`]).
struct StateChange {
    old: u8,
    new: u8,
}

impl SockHandler for StateChange {
    #[inline(always)]
    fn handle<S: Source>(self, l: &KernelLayout, sk: S, sk_ptr: SkPtr) -> Result<(), Skip> {
        state_event(l, sk, sk_ptr, self.old, self.new)
    }
}

/// One STATE event, or none. Most changes of state are of sockets that
/// never had trouble (every short connection makes five or more), and the
/// agent has no use for them: it starts a flow from trouble (a
/// retransmission, a probe, a soft error: [`snapshot::had_trouble`]) or from
/// a state a flow can begin in without any (CLOSE_WAIT: the application not
/// closing; FIN_WAIT2: the peer's FIN awaited). So:
///
/// - trouble, or a change to CLOSE_WAIT or FIN_WAIT2: the full snapshot;
/// - a change out of FIN_WAIT2, TIME_WAIT, CLOSE_WAIT or LAST_ACK (the later
///   life of a flow begun by its state), or with `sk_err` set (a reset): a
///   brief event, enough to end or re-state a flow the agent tracks
///   ([`snapshot::fill_brief`]);
/// - anything else: nothing, not even a ring-buffer reservation (the cost
///   of this program is the reservation and the copy, not the reads).
#[inline(always)]
fn state_event<S: Source>(
    l: &KernelLayout,
    sk: S,
    sk_ptr: *mut core::ffi::c_void,
    old_state: u8,
    new_state: u8,
) -> Result<(), Skip> {
    if new_state == TCP_CLOSE_WAIT || new_state == TCP_FIN_WAIT2 || snapshot::had_trouble(l, sk) {
        return sock_event(l, sk, sk_ptr, kind::STATE, |ev| {
            ev.old_state = old_state;
            ev.sock.state = new_state;
        });
    }
    let later_life = matches!(
        old_state,
        TCP_FIN_WAIT2 | TCP_TIME_WAIT | TCP_CLOSE_WAIT | TCP_LAST_ACK
    );
    if !later_life && !snapshot::has_error(l, sk) {
        // Still give the socket its cookie (one helper call on its first
        // change of state, a load after that): the timer programs read the
        // cookie as the socket holds it and cannot create one, so a socket
        // whose trouble they see first would otherwise be keyed by address.
        let _ = cookie_of(l, sk, sk_ptr);
        return Err(Skip);
    }
    let t = now();
    let cookie = cookie_of(l, sk, sk_ptr);
    emit(|ev| {
        header(ev, kind::STATE, source::TP_BTF, t);
        ev.old_state = old_state;
        snapshot::fill_brief(&mut ev.sock, l, sk, cookie);
        ev.sock.state = new_state;
    });
    Ok(())
}

// ---------------------------------------------------------------------------
// sock:inet_sk_error_report (tp_btf): the kernel's error verdict.

tp_sock_program!(
    tcpstall_error_report_btf,
    false,
    false,
    "inet_sk_error_report",
    try_error_report_btf
);
tp_sock_program!(
    tcpstall_error_report_direct,
    true,
    false,
    "inet_sk_error_report",
    try_error_report_btf
);
tp_sock_program!(
    tcpstall_error_report_plain,
    false,
    true,
    "inet_sk_error_report",
    try_error_report_btf
);

#[inline(always)]
fn try_error_report_btf<const DIRECT: bool, const PLAIN: bool>(
    ctx: &BtfTracePointContext,
) -> Result<(), Skip> {
    let l = layout()?;
    tp_sock_event::<DIRECT, PLAIN>(ctx, l, true, kind::ERROR_REPORT, |_| {})
}

// ---------------------------------------------------------------------------
// tcp:tcp_probe (tp_btf): ACK progress that ends an RTO episode.
//
// Runs for every segment an established socket receives (before the kernel
// processes it), so the filter comes first and costs one read: only sockets
// inside an RTO episode (`icsk_retransmits != 0`, reset by the first ACK
// that advances `snd_una`) go further, and only a segment acknowledging new
// data is reported. That is one event per recovered episode.

tp_sock_program!(tcpstall_ack_btf, false, false, "tcp_probe", try_ack_btf);
tp_sock_program!(tcpstall_ack_direct, true, false, "tcp_probe", try_ack_btf);
tp_sock_program!(tcpstall_ack_plain, false, true, "tcp_probe", try_ack_btf);

#[inline(always)]
fn try_ack_btf<const DIRECT: bool, const PLAIN: bool>(
    ctx: &BtfTracePointContext,
) -> Result<(), Skip> {
    let l = layout()?;
    let f = &l.fields;
    let sk_ptr: *mut core::ffi::c_void = ctx.arg(0);
    if DIRECT {
        // SAFETY: `sk_ptr` is the tracepoint's `struct sock *` (a BTF pointer);
        // tcp_probe fires for full TCP sockets only.
        let tp = Direct(unsafe { bpf_skc_to_tcp_sock(sk_ptr) } as *const u8);
        if tp.is_null() || tp.get(&f[field::ICSK_RETRANSMITS]) == 0 {
            return Err(Skip);
        }
        let una = tp.get(&f[field::TP_SND_UNA]) as u32;
        let ack = ack_after(ctx, l, una)?;
        sock_event(l, tp, sk_ptr, kind::ACK, |ev| ev.ack_seq = ack)
    } else {
        let sk = arg_scalar(ctx.as_ptr(), 0);
        if read(sk, &f[field::ICSK_RETRANSMITS]) == 0 {
            return Err(Skip);
        }
        let una = read(sk, &f[field::TP_SND_UNA]) as u32;
        let ack = ack_after(ctx, l, una)?;
        if PLAIN {
            return sock_event(l, Plain(sk), sk_ptr, kind::ACK, |ev| ev.ack_seq = ack);
        }
        sock_event(l, Probe(sk), sk_ptr, kind::ACK, |ev| ev.ack_seq = ack)
    }
}

/// The socket as a read-only `tcp_sock` (`bpf_rdonly_cast`, 6.2+): an
/// inlined register move instead of the `bpf_skc_to_tcp_sock` helper call.
/// tcp_probe fires for full TCP sockets only.
#[btf_tracepoint(function = "tcp_probe")]
pub fn tcpstall_ack_cast(ctx: BtfTracePointContext) -> i32 {
    match try_ack_cast(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

#[inline(always)]
fn try_ack_cast(ctx: &BtfTracePointContext) -> Result<(), Skip> {
    let l = layout()?;
    let f = &l.fields;
    let sk_ptr: *mut core::ffi::c_void = ctx.arg(0);
    let tp = Direct(kfunc::rdonly_cast(sk_ptr as u64, l.tcp_sock_btf_id));
    if tp.get(&f[field::ICSK_RETRANSMITS]) == 0 {
        return Err(Skip);
    }
    let una = tp.get(&f[field::TP_SND_UNA]) as u32;
    let ack = ack_after(ctx, l, una)?;
    sock_event(l, tp, sk_ptr, kind::ACK, |ev| ev.ack_seq = ack)
}

/// The segment's (argument 1) `ack_seq` when it acknowledges data after
/// `una` (in sequence space).
#[inline(always)]
fn ack_after(ctx: &BtfTracePointContext, l: &KernelLayout, una: u32) -> Result<u32, Skip> {
    let cb = &l.fields[field::SKB_CB];
    let ack_field = &l.fields[field::TCP_SKB_CB_ACK_SEQ];
    if !cb.is_present() || !ack_field.is_present() {
        return Err(Skip);
    }
    let skb = arg_scalar(ctx.as_ptr(), 1);
    if skb == 0 {
        return Err(Skip);
    }
    let ack = read(skb.wrapping_add(cb.offset as u64), ack_field) as u32;
    // 0: no acknowledgment number (an RST answering a segment that had
    // ACK set carries none: `tcp_v4_send_reset()`, nf_reject), which would
    // read as "after snd_una" whenever snd_una is in the upper half.
    if ack == 0 || (ack.wrapping_sub(una) as i32) <= 0 {
        return Err(Skip);
    }
    Ok(ack)
}

// ---------------------------------------------------------------------------
// skb:kfree_skb (tp_btf, 5.17+ with the drop reason): packets this node
// dropped. Runs for every dropped packet on the node, so the filter comes
// first: no owning socket (most received packets) costs one load; an owned
// one a cookie read and one hash lookup; only skbs of sockets the agent put
// in `TCPSTALL_EPISODES` (a loss episode) are reported.

#[btf_tracepoint(function = "kfree_skb")]
pub fn tcpstall_drop_direct(ctx: BtfTracePointContext) -> i32 {
    match try_drop::<true>(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn tcpstall_drop_plain(ctx: BtfTracePointContext) -> i32 {
    match try_drop::<false>(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

/// `DIRECT`: `skb->sk` with a plain load through the typed skb; otherwise
/// (the last fallback) every read a probe read from a plain address.
#[inline(always)]
fn try_drop<const DIRECT: bool>(ctx: &BtfTracePointContext) -> Result<(), Skip> {
    let l = layout()?;
    let spec = &l.fields[field::SKB_SK];
    let sk = if DIRECT {
        Direct(ctx.arg::<*const u8>(0)).get(spec)
    } else {
        read(arg_scalar(ctx.as_ptr(), 0), spec)
    };
    if sk == 0 {
        return Err(Skip);
    }
    let sk = Plain(sk);
    let cookie = sk.get(&l.fields[field::SKC_COOKIE]);
    // SAFETY: a hash map lookup; the value is not kept.
    if cookie == 0 || unsafe { EPISODES.get(&cookie) }.is_none() {
        return Err(Skip);
    }
    // A context load: the verifier refuses it where the tracepoint has no
    // reason argument (before 5.17), so the probe is then unavailable.
    let reason: u32 = ctx.arg(2);
    let t = now();
    emit(|ev| {
        header(ev, kind::DROP, source::TP_BTF, t);
        snapshot::fill_from(&mut ev.sock, l, sk, cookie);
        ev.ack_seq = reason;
    });
    Ok(())
}

// ---------------------------------------------------------------------------
// The write timer (RTO and zero-window probe). One of four mechanisms.

/// Shared by the fentry, kprobe and timer-tracepoint paths: `sk` is the socket
/// whose write timer is expiring now, before the kernel handles it.
#[inline(always)]
fn write_timer_event<S: Source>(l: &KernelLayout, sk: S, src: u8, cookie: u64) -> Result<(), Skip> {
    let f = &l.fields;
    let pend = sk.get(&f[field::ICSK_PENDING]) as u32;
    let state = sk.get(&f[field::SKC_STATE]) as u32;
    if (pend != pending::RETRANS && pend != pending::PROBE0)
        || state == TCP_CLOSE
        || state == TCP_LISTEN
    {
        bump(stat::TIMER_NOT_DUE);
        return Err(Skip);
    }
    let t = now();
    let jiffies = t.1;
    let expires = sk.get(&f[field::ICSK_TIMER_EXPIRES]);
    // The handler re-arms and returns when the timer fired early.
    if f[field::ICSK_TIMER_EXPIRES].is_present() && (expires.wrapping_sub(jiffies) as i64) > 0 {
        bump(stat::TIMER_NOT_DUE);
        return Err(Skip);
    }
    // Probe reads: one copy of the socket's span, then plain loads from it.
    if !S::PLAIN_LOADS {
        if let Some(scratch) = SCRATCH.get_ptr_mut(0) {
            if let Some(copy) = Copied::copy(l, sk.addr(), scratch.cast()) {
                emit(|ev| {
                    header(ev, kind::WRITE_TIMER, src, t);
                    snapshot::fill_from(&mut ev.sock, l, copy, cookie);
                });
                return Ok(());
            }
        }
    }
    emit(|ev| {
        header(ev, kind::WRITE_TIMER, src, t);
        snapshot::fill_from(&mut ev.sock, l, sk, cookie);
    });
    Ok(())
}

#[fentry(function = "tcp_write_timer_handler")]
pub fn tcpstall_write_timer_fentry(ctx: FEntryContext) -> i32 {
    match try_write_timer_fentry::<false>(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

#[fentry(function = "tcp_write_timer_handler")]
pub fn tcpstall_write_timer_fentry_direct(ctx: FEntryContext) -> i32 {
    match try_write_timer_fentry::<true>(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

/// `struct sock *` is a BTF pointer here: plain loads through the typed
/// `tcp_sock` when the verifier takes them (the agent falls back to the
/// probe-read twin otherwise).
#[inline(always)]
fn try_write_timer_fentry<const DIRECT: bool>(ctx: &FEntryContext) -> Result<(), Skip> {
    let l = layout()?;
    let sk_ptr: *mut core::ffi::c_void = ctx.arg(0);
    if DIRECT {
        // SAFETY: `sk_ptr` is the traced function's `struct sock *`.
        let tp = Direct(unsafe { bpf_skc_to_tcp_sock(sk_ptr) } as *const u8);
        if !tp.is_null() {
            let cookie = cookie_of(l, tp, sk_ptr);
            return write_timer_event(l, tp, source::FENTRY, cookie);
        }
    }
    let sk = arg_scalar(ctx.as_ptr(), 0);
    // SAFETY: `sk_ptr` is the traced function's `struct sock *` (a BTF pointer).
    let cookie = unsafe { bpf_get_socket_cookie(sk_ptr) };
    write_timer_event(l, Probe(sk), source::FENTRY, cookie)
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
    write_timer_event(l, Probe(sk), source::KPROBE, 0)
}

tp_program!(
    tcpstall_write_timer_tp,
    false,
    "timer_expire_entry",
    try_write_timer_tp
);
tp_program!(
    tcpstall_write_timer_tp_direct,
    true,
    "timer_expire_entry",
    try_write_timer_tp
);

/// Every timer in the system passes here: the callback compare comes first
/// and is all other timers cost (`DIRECT`: one plain load from the typed
/// `struct timer_list *`).
#[inline(always)]
fn try_write_timer_tp<const DIRECT: bool>(ctx: &BtfTracePointContext) -> Result<(), Skip> {
    let l = layout()?;
    let spec = &l.fields[field::TIMER_FUNCTION];
    let function = if DIRECT {
        Direct(ctx.arg::<*const u8>(0)).get(spec)
    } else {
        read(arg_scalar(ctx.as_ptr(), 0), spec)
    };
    if function == 0 || function != l.tcp_write_timer_addr {
        return Err(Skip);
    }
    let timer = arg_scalar(ctx.as_ptr(), 0);
    let sk = timer.wrapping_sub(l.fields[field::WRITE_TIMER].offset as u64);
    write_timer_event(l, Probe(sk), source::TIMER_TP, 0)
}

/// As [`tcpstall_write_timer_tp_direct`], but a TCP write timer's socket is
/// read with plain loads through a read-only `tcp_sock` (`bpf_rdonly_cast`
/// of the timer's address minus the timer's offset, 6.2+): no helper call,
/// no copy of the socket, only the cache lines the snapshot needs; the
/// `struct net` and cgroup behind it are plain loads too.
#[btf_tracepoint(function = "timer_expire_entry")]
pub fn tcpstall_write_timer_tp_cast(ctx: BtfTracePointContext) -> i32 {
    match try_write_timer_tp_cast(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

/// Every timer on the node passes here, so the non-TCP path is exactly: the
/// argument, the callback's offset, one 8-byte load, the address, one
/// compare. No READY check before it (a layout not yet set has
/// `tcp_write_timer_addr == 0`: a callback of 0 passes the compare and the
/// READY check after it skips) and no size or null dispatch
/// (`timer_list.function` is a pointer; the argument is a BTF pointer whose
/// loads cannot fault).
#[inline(always)]
fn try_write_timer_tp_cast(ctx: &BtfTracePointContext) -> Result<(), Skip> {
    let l = layout_unchecked();
    let timer: *const u8 = ctx.arg(0);
    let at = timer.wrapping_add(l.fields[field::TIMER_FUNCTION].offset as usize);
    // SAFETY: a load from the BTF `struct timer_list *`, checked by the
    // verifier against the member at that offset (a pointer: 8 bytes).
    let function = unsafe { core::ptr::read_volatile(at.cast::<u64>()) };
    if function != l.tcp_write_timer_addr {
        return Err(Skip);
    }
    let l = layout()?;
    let sk = (timer as u64).wrapping_sub(l.fields[field::WRITE_TIMER].offset as u64);
    let tp = Direct(kfunc::rdonly_cast(sk, l.tcp_sock_btf_id));
    write_timer_event(l, tp, source::TIMER_TP, 0)
}

// ---------------------------------------------------------------------------
// The keepalive timer (callback `tcp_keepalive_timer`; `icsk_keepalive_timer`
// where the BTF has it, else `sk->sk_timer`: the layout's `SK_TIMER` row): the
// write timer's counterparts (fentry > kprobe > timer_expire_entry). Every
// mechanism gets the timer's address and reads the socket at that address
// minus the timer's offset with probe reads, the cookie as the socket holds
// it: nothing a kernel build may withhold from the verifier.

/// `timer` is the keepalive timer of a TCP socket whose keepalive timer is
/// expiring now, before `tcp_keepalive_timer()` runs. It fires rarely (once
/// per keepalive interval of a socket with SO_KEEPALIVE, or an orphan's
/// FIN_WAIT2 timeout): no filter beyond LISTEN / CLOSE.
#[inline(always)]
fn keepalive_timer_event(l: &KernelLayout, timer: u64, src: u8) -> Result<(), Skip> {
    let f = &l.fields;
    if !f[field::SK_TIMER].is_present() {
        return Err(Skip);
    }
    let sk = Probe(timer.wrapping_sub(f[field::SK_TIMER].offset as u64));
    let state = sk.get(&f[field::SKC_STATE]) as u32;
    if state == TCP_CLOSE || state == TCP_LISTEN {
        bump(stat::TIMER_NOT_DUE);
        return Err(Skip);
    }
    let cookie = sk.get(&f[field::SKC_COOKIE]);
    let t = now();
    emit(|ev| {
        header(ev, kind::KEEPALIVE_TIMER, src, t);
        snapshot::fill_from(&mut ev.sock, l, sk, cookie);
        snapshot::fill_keepalive(&mut ev.sock, l, sk);
    });
    Ok(())
}

#[fentry(function = "tcp_keepalive_timer")]
pub fn tcpstall_keepalive_timer_fentry(ctx: FEntryContext) -> i32 {
    match try_keepalive_timer_fentry(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

/// The argument (`struct timer_list *`) as a plain number.
#[inline(always)]
fn try_keepalive_timer_fentry(ctx: &FEntryContext) -> Result<(), Skip> {
    let l = layout()?;
    keepalive_timer_event(l, arg_scalar(ctx.as_ptr(), 0), source::FENTRY)
}

#[kprobe]
pub fn tcpstall_keepalive_timer_kprobe(ctx: ProbeContext) -> u32 {
    match try_keepalive_timer_kprobe(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

fn try_keepalive_timer_kprobe(ctx: &ProbeContext) -> Result<(), Skip> {
    let l = layout()?;
    let timer: u64 = ctx.arg(0).ok_or(Skip)?;
    keepalive_timer_event(l, timer, source::KPROBE)
}

/// Every timer on the node passes here: the callback compare (one probe
/// read) comes first and is all other timers cost.
#[btf_tracepoint(function = "timer_expire_entry")]
pub fn tcpstall_keepalive_timer_plain(ctx: BtfTracePointContext) -> i32 {
    match try_keepalive_timer_tp(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

#[inline(always)]
fn try_keepalive_timer_tp(ctx: &BtfTracePointContext) -> Result<(), Skip> {
    let l = layout()?;
    let timer = arg_scalar(ctx.as_ptr(), 0);
    let function = read(timer, &l.fields[field::TIMER_FUNCTION]);
    if function == 0 || function != l.tcp_keepalive_timer_addr {
        return Err(Skip);
    }
    keepalive_timer_event(l, timer, source::TIMER_TP)
}

// ---------------------------------------------------------------------------
// The timewait timer (`tw->tw_timer`, callback `tw_timer_handler`): an
// orphan whose FIN the peer ACKed, with `tcp_fin_timeout` / TCP_LINGER2 up
// to 60 s, becomes a timewait socket in the FIN_WAIT2 substate at once
// (`tcp_time_wait()`), which the timer ends with no socket tracepoint. The
// timer tracepoints show it all: `timer_start` when it is created (bucket
// expiry: when the wheel will run it) or re-armed for TIME_WAIT by the
// peer's FIN, `timer_expire_entry` when it ends. Every program reads the
// timewait socket at the timer's address minus `tw_timer`'s offset with
// probe reads, the cookie as it holds it (the full socket's).

/// `timer` is a `tw_timer_handler` timer being started with the wheel's
/// bucket expiry `bucket`. FIN_WAIT2 substate: remembered and reported;
/// TIME_WAIT: reported (and forgotten) only for one remembered (the peer's
/// FIN after a FIN_WAIT2 start), else nothing (every normal close).
#[inline(always)]
fn tw_start_event(l: &KernelLayout, timer: u64, bucket: u64) -> Result<(), Skip> {
    let f = &l.fields;
    if !f[field::TW_TIMER].is_present() {
        return Err(Skip);
    }
    let tw = timer.wrapping_sub(f[field::TW_TIMER].offset as u64);
    let substate = read(tw, &f[field::TW_SUBSTATE]) as u8;
    if substate == TCP_FIN_WAIT2 {
        let _ = TW.insert(&tw, &1, 0);
    // SAFETY: a map lookup; the value is not kept.
    } else if substate == TCP_TIME_WAIT && unsafe { TW.get(&tw) }.is_some() {
        let _ = TW.remove(&tw);
    } else {
        return Err(Skip);
    }
    let expires = read(timer, &f[field::TIMER_EXPIRES]);
    let t = now();
    emit(|ev| {
        header(ev, kind::TW_TIMER_START, source::TIMER_TP, t);
        snapshot::fill_timewait(&mut ev.sock, l, Plain(tw));
        ev.sock.timer_expires = bucket;
        ev.ack_seq = expires as u32;
    });
    Ok(())
}

/// The callback of the timer at `timer` (probe read), 0 when not the
/// timewait timer's.
#[inline(always)]
fn tw_timer_of(l: &KernelLayout, timer: u64) -> Result<(), Skip> {
    let function = read(timer, &l.fields[field::TIMER_FUNCTION]);
    if function == 0 || function != l.tw_timer_handler_addr {
        return Err(Skip);
    }
    Ok(())
}

/// `timer_start(timer, expires, bucket_expiry)`: the bucket expiry is the
/// third argument, a context load the verifier checks against the
/// prototype (a kernel with two arguments refuses it; the agent falls back).
#[btf_tracepoint(function = "timer_start")]
pub fn tcpstall_tw_start_arg2(ctx: BtfTracePointContext) -> i32 {
    match try_tw_start_arg2(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

#[inline(always)]
fn try_tw_start_arg2(ctx: &BtfTracePointContext) -> Result<(), Skip> {
    let l = layout()?;
    let timer = arg_scalar(ctx.as_ptr(), 0);
    tw_timer_of(l, timer)?;
    // A context load of the tracepoint's third argument.
    let bucket: u64 = ctx.arg(2);
    tw_start_event(l, timer, bucket)
}

/// `timer_start(timer, bucket_expiry)`: the second argument by a probe read
/// of the context (on a three-argument kernel it is `expires`: unrounded).
/// Every timer start on the node passes here: the callback compare (one
/// probe read) comes first.
#[btf_tracepoint(function = "timer_start")]
pub fn tcpstall_tw_start_plain(ctx: BtfTracePointContext) -> i32 {
    match try_tw_start_plain(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

#[inline(always)]
fn try_tw_start_plain(ctx: &BtfTracePointContext) -> Result<(), Skip> {
    let l = layout()?;
    let timer = arg_scalar(ctx.as_ptr(), 0);
    tw_timer_of(l, timer)?;
    let bucket = arg_scalar(ctx.as_ptr(), 1);
    tw_start_event(l, timer, bucket)
}

/// The timewait timer runs now: the end of a remembered timewait socket
/// (reported with its substate: TIME_WAIT when a re-arm was not seen).
#[btf_tracepoint(function = "timer_expire_entry")]
pub fn tcpstall_tw_expire_plain(ctx: BtfTracePointContext) -> i32 {
    match try_tw_expire(&ctx) {
        Ok(()) | Err(Skip) => 0,
    }
}

#[inline(always)]
fn try_tw_expire(ctx: &BtfTracePointContext) -> Result<(), Skip> {
    let l = layout()?;
    let timer = arg_scalar(ctx.as_ptr(), 0);
    tw_timer_of(l, timer)?;
    let f = &l.fields;
    if !f[field::TW_TIMER].is_present() {
        return Err(Skip);
    }
    let tw = timer.wrapping_sub(f[field::TW_TIMER].offset as u64);
    // SAFETY: a map lookup; the value is not kept.
    if unsafe { TW.get(&tw) }.is_none() {
        return Err(Skip);
    }
    let _ = TW.remove(&tw);
    let expires = read(timer, &f[field::TIMER_EXPIRES]);
    let t = now();
    emit(|ev| {
        header(ev, kind::TW_TIMER_EXPIRE, source::TIMER_TP, t);
        snapshot::fill_timewait(&mut ev.sock, l, Plain(tw));
        ev.sock.timer_expires = expires;
    });
    Ok(())
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
    let t = now();
    // SAFETY: sock_ops programs may ask for the cookie of their socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the args union is valid for RTO_CB.
    let args = unsafe { &ops.__bindgen_anon_1.args };
    let family = ops_field(&ops.family);
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    if family == AF_INET6 {
        for i in 0..4 {
            let s = ops_field(&ops.local_ip6[i]).to_ne_bytes();
            let d = ops_field(&ops.remote_ip6[i]).to_ne_bytes();
            saddr[i * 4..i * 4 + 4].copy_from_slice(&s);
            daddr[i * 4..i * 4 + 4].copy_from_slice(&d);
        }
    } else if family == AF_INET {
        saddr[..4].copy_from_slice(&ops_field(&ops.local_ip4).to_ne_bytes());
        daddr[..4].copy_from_slice(&ops_field(&ops.remote_ip4).to_ne_bytes());
    }
    let sock = SockSnapshot {
        cookie,
        family: family as u8,
        state: ops_field(&ops.state) as u8,
        sport: ops_field(&ops.local_port) as u16,
        dport: u16::from_be((ops_field(&ops.remote_port) >> 16) as u16),
        saddr,
        daddr,
        pending: pending::RETRANS as u8,
        retransmits: ops_field(&args[0]) as u8,
        rto_jiffies: ops_field(&args[1]),
        flags: if ops_field(&args[2]) != 0 {
            flag::RTO_EXPIRED
        } else {
            0
        },
        snd_una: ops_field(&ops.snd_una),
        packets_out: ops_field(&ops.packets_out),
        retrans_out: ops_field(&ops.retrans_out),
        total_retrans: ops_field(&ops.total_retrans),
        ..SockSnapshot::zeroed()
    };
    emit(|ev| {
        header(ev, kind::WRITE_TIMER, source::SOCK_OPS, t);
        ev.sock = sock;
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
