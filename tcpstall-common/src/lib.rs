//! Types shared by the tcpstall kernel programs (`tcpstall-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` with fixed-width fields and no implicit
//! padding, so the same bytes mean the same thing on both sides. Map and program
//! names are `pub const`s used by both sides.
#![no_std]

use core::mem::size_of;

/// Ring buffer carrying [`Event`]s from the kernel to the agent.
pub const EVENTS_MAP: &str = "TCPSTALL_EVENTS";
/// The read-only global (`.rodata`) holding the [`KernelLayout`] the agent
/// resolved from BTF, set at load time (`EbpfLoader::set_global`). The map
/// is frozen before any program loads, so the verifier sees every offset as a
/// constant: no lookup per run, branches on absent fields are pruned.
pub const LAYOUT_GLOBAL: &str = "TCPSTALL_LAYOUT";
/// Per-CPU array of `u64` counters indexed by the [`stat`] constants.
pub const STATS_MAP: &str = "TCPSTALL_STATS";
/// One-entry array (`u32`) the agent's ring-buffer reader writes: whether
/// it is polling the ring ([`reader::POLLING`]: the programs submit without
/// a wake-up) or asleep on the ring's fd ([`reader::ASLEEP`]: the kernel
/// wakes it for the first record after it drained).
pub const READER_MAP: &str = "TCPSTALL_READER";

/// Values of [`READER_MAP`]'s entry.
pub mod reader {
    /// The reader sleeps on the ring's fd until the kernel wakes it (the
    /// default, also before the agent set anything).
    pub const ASLEEP: u32 = 0;
    /// The reader polls the ring on its own: no wake-up per record.
    pub const POLLING: u32 = 1;
}
/// Hash map `u64 cookie -> u8` of the sockets in a loss episode (a
/// retransmission streak or failing window probes), kept by the agent. The
/// drop program ([`program::DROP_DIRECT`], [`program::DROP_PLAIN`]) reports
/// only skbs owned by a socket in it: with no stall on the node it costs one
/// load and, for skbs owned by a socket, one lookup per dropped packet.
pub const EPISODES_MAP: &str = "TCPSTALL_EPISODES";
/// Capacity of [`EPISODES_MAP`]; the agent inserts no more (the most urgent
/// flows first).
pub const EPISODES_MAX: u32 = 4_096;

/// Default ring buffer size (bytes, power of two, multiple of the page size).
pub const DEFAULT_RINGBUF_BYTES: u32 = 4 * 1024 * 1024;

/// Program names (the Rust function names in `tcpstall-ebpf`).
///
/// Programs ending in `_direct` read the socket with plain loads through a
/// BTF-typed pointer (no helper call per field); the others with probe reads.
/// The agent tries the direct one first.
pub mod program {
    /// `tp_btf/tcp_retransmit_skb` reading its `err` argument (6.17+): failed
    /// attempts are counted in `stat::RETRANSMIT_FAILED`, not reported.
    pub const RETRANSMIT_BTF_ERR: &str = "tcpstall_retransmit_btf_err";
    pub const RETRANSMIT_DIRECT_ERR: &str = "tcpstall_retransmit_direct_err";
    /// `tp_btf/tcp_retransmit_skb` (kernels whose tracepoint has no `err`).
    pub const RETRANSMIT_BTF: &str = "tcpstall_retransmit_btf";
    pub const RETRANSMIT_DIRECT: &str = "tcpstall_retransmit_direct";
    /// The last fallbacks of the socket tracepoints: probe reads from the
    /// argument as a plain number, the cookie as the socket holds it; no
    /// socket pointer passed to any helper.
    pub const RETRANSMIT_PLAIN_ERR: &str = "tcpstall_retransmit_plain_err";
    pub const RETRANSMIT_PLAIN: &str = "tcpstall_retransmit_plain";
    pub const STATE_PLAIN: &str = "tcpstall_state_plain";
    pub const ERROR_REPORT_PLAIN: &str = "tcpstall_error_report_plain";
    pub const ACK_PLAIN: &str = "tcpstall_ack_plain";
    /// `tp_btf/inet_sock_set_state`
    pub const STATE_BTF: &str = "tcpstall_state_btf";
    pub const STATE_DIRECT: &str = "tcpstall_state_direct";
    /// `tp_btf/inet_sk_error_report`
    pub const ERROR_REPORT_BTF: &str = "tcpstall_error_report_btf";
    pub const ERROR_REPORT_DIRECT: &str = "tcpstall_error_report_direct";
    /// fentry on `tcp_write_timer_handler`
    pub const WRITE_TIMER_FENTRY: &str = "tcpstall_write_timer_fentry";
    pub const WRITE_TIMER_FENTRY_DIRECT: &str = "tcpstall_write_timer_fentry_direct";
    /// kprobe on `tcp_write_timer_handler`
    pub const WRITE_TIMER_KPROBE: &str = "tcpstall_write_timer_kprobe";
    /// `tp_btf/timer_expire_entry`, filtered to `tcp_write_timer`
    pub const WRITE_TIMER_TIMER_TP: &str = "tcpstall_write_timer_tp";
    pub const WRITE_TIMER_TIMER_TP_DIRECT: &str = "tcpstall_write_timer_tp_direct";
    /// The socket read through `bpf_rdonly_cast` (6.2+; tried first).
    pub const WRITE_TIMER_TIMER_TP_CAST: &str = "tcpstall_write_timer_tp_cast";
    /// cgroup `sock_ops` (RTO_CB / STATE_CB)
    pub const SOCK_OPS: &str = "tcpstall_sock_ops";
    /// `tp_btf/tcp_probe`, filtered to segments that acknowledge new data on
    /// a socket inside an RTO episode (`icsk_retransmits != 0`).
    pub const ACK_BTF: &str = "tcpstall_ack_btf";
    pub const ACK_DIRECT: &str = "tcpstall_ack_direct";
    /// The socket read through `bpf_rdonly_cast` (6.2+; tried first).
    pub const ACK_CAST: &str = "tcpstall_ack_cast";
    /// `tp_btf/kfree_skb` (5.17+: the drop reason argument), filtered in the
    /// kernel to skbs owned by a socket in [`crate::EPISODES_MAP`]: `skb->sk`
    /// with a plain load through the typed skb.
    pub const DROP_DIRECT: &str = "tcpstall_drop_direct";
    /// The last fallback: `skb->sk` and the cookie with probe reads from
    /// plain addresses.
    pub const DROP_PLAIN: &str = "tcpstall_drop_plain";
    /// fentry on `tcp_keepalive_timer` (`sk->sk_timer`'s callback): the
    /// socket is the timer's address minus its offset, read with probe reads.
    pub const KEEPALIVE_TIMER_FENTRY: &str = "tcpstall_keepalive_timer_fentry";
    /// kprobe on `tcp_keepalive_timer`.
    pub const KEEPALIVE_TIMER_KPROBE: &str = "tcpstall_keepalive_timer_kprobe";
    /// `tp_btf/timer_expire_entry`, filtered to `tcp_keepalive_timer`; the
    /// last fallback (probe reads from plain addresses only).
    pub const KEEPALIVE_TIMER_PLAIN: &str = "tcpstall_keepalive_timer_plain";
    /// `tp_btf/timer_start`, filtered to `tw_timer_handler` (the timewait
    /// socket's timer): the bucket expiry read as the tracepoint's third
    /// argument, a context load the verifier checks against the kernel's
    /// prototype (loads only where it has three: `timer, expires,
    /// bucket_expiry`).
    pub const TW_START_ARG2: &str = "tcpstall_tw_start_arg2";
    /// The same with the second argument read by a probe read of the
    /// context (`timer, bucket_expiry` kernels; on three-argument kernels
    /// it is `expires`, unrounded): the last fallback.
    pub const TW_START_PLAIN: &str = "tcpstall_tw_start_plain";
    /// `tp_btf/timer_expire_entry`, filtered to `tw_timer_handler`, for a
    /// timewait socket [`crate::TW_MAP`] holds: the end of an orphaned
    /// FIN_WAIT2 connection. Probe reads from plain addresses only.
    pub const TW_EXPIRE_PLAIN: &str = "tcpstall_tw_expire_plain";
}

/// LRU hash map `u64 timewait socket address -> u8` of the timewait sockets
/// whose timer was started in the FIN_WAIT2 substate (an orphan waiting for
/// its peer's FIN under `tcp_fin_timeout` / TCP_LINGER2), kept by the
/// kernel programs themselves: a re-arm in the TIME_WAIT substate (the peer
/// sent its FIN) and the expiry are reported only for them, and remove them.
pub const TW_MAP: &str = "TCPSTALL_TW";
/// Capacity of [`TW_MAP`] (LRU: an entry whose end was never seen, a
/// timewait socket killed by a reset or its namespace's exit, ages out).
pub const TW_MAX: u32 = 16_384;

/// Event kinds ([`Event::kind`]).
pub mod kind {
    /// `tcp:tcp_retransmit_skb`: one retransmitted segment (fast, TLP or RTO).
    pub const RETRANSMIT: u8 = 1;
    /// The write timer expired for a socket with an RTO or zero-window probe
    /// pending (snapshot taken before the kernel handles the expiry).
    pub const WRITE_TIMER: u8 = 2;
    /// `sock:inet_sock_set_state`.
    pub const STATE: u8 = 3;
    /// `sock:inet_sk_error_report` (the kernel's error verdict, 110 = ETIMEDOUT).
    pub const ERROR_REPORT: u8 = 4;
    /// `tcp:tcp_probe` (before the segment is processed): the peer
    /// acknowledged new data ([`Event::ack_seq`] after `snd_una`) while the
    /// socket was in an RTO episode. The episode is over.
    pub const ACK: u8 = 5;
    /// A socket found by the sweep (`iter/task_file`): a snapshot taken
    /// outside any kernel event (see [`SweepRecord`]).
    pub const SWEEP: u8 = 6;
    /// `skb:kfree_skb`: this node dropped a packet owned by a socket in a
    /// loss episode; [`Event::ack_seq`] carries the drop reason (`enum
    /// skb_drop_reason` of the running kernel, names from its BTF).
    pub const DROP: u8 = 7;
    /// `tcp:tcp_retransmit_skb` with `err != 0` (6.17+): a retransmission
    /// this node failed to send; [`Event::ack_seq`] carries `-err` (errno).
    pub const RETRANSMIT_ERROR: u8 = 8;
    /// `sk->sk_timer` expired (callback `tcp_keepalive_timer`; snapshot taken
    /// before the kernel handles it): keepalive probing of an idle socket
    /// (and, for orphans, the FIN_WAIT2 timer). Every TCP state but LISTEN
    /// and CLOSE is reported.
    pub const KEEPALIVE_TIMER: u8 = 9;
    /// `timer:timer_start` of a timewait socket's timer (`tw_timer_handler`)
    /// in the FIN_WAIT2 substate (an orphan's FIN_WAIT2 timeout starts), or
    /// in the TIME_WAIT substate for one that was (the peer's FIN came).
    /// The snapshot holds only what `struct sock_common` has (cookie,
    /// endpoints, netns) and [`SockSnapshot::state`] is `tw_substate`;
    /// [`SockSnapshot::timer_expires`] is the timer wheel's bucket expiry
    /// (jiffies: when the timer will run) and [`Event::ack_seq`] the low 32
    /// bits of the requested expiry (`timer->expires`).
    pub const TW_TIMER_START: u8 = 10;
    /// `timer:timer_expire_entry` of such a timewait socket's timer: the
    /// kernel ends it now ([`SockSnapshot::state`] is `tw_substate`,
    /// [`SockSnapshot::timer_expires`] the timer's `expires`).
    pub const TW_TIMER_EXPIRE: u8 = 11;
}

/// Which mechanism produced an event ([`Event::source`]).
pub mod source {
    pub const TP_BTF: u8 = 1;
    pub const FENTRY: u8 = 2;
    pub const KPROBE: u8 = 3;
    pub const TIMER_TP: u8 = 4;
    pub const SOCK_OPS: u8 = 5;
    /// The socket sweep (BPF iterator).
    pub const SWEEP: u8 = 6;
}

/// Bits of [`SockSnapshot::flags`].
pub mod flag {
    /// `SOCK_DEAD`: orphaned socket (tcp_orphan_retries semantics).
    pub const SOCK_DEAD: u16 = 1 << 0;
    /// `tp->tcp_usec_ts`: `retrans_stamp` counts microseconds (6.7+).
    pub const USEC_TS: u16 = 1 << 1;
    /// `retries2` / `orphan_retries` were read from the socket's `struct net`.
    pub const NETNS_SYSCTLS: u16 = 1 << 2;
    /// The socket fields (`retransmits`, `rto`, `retrans_stamp`, ...) were read
    /// from `struct sock`; unset for sock_ops events, which carry only what the
    /// sock_ops context offers.
    pub const SOCK_FIELDS: u16 = 1 << 3;
    /// sock_ops RTO_CB: the kernel's own verdict that the retry limit is reached.
    pub const RTO_EXPIRED: u16 = 1 << 4;
    /// `SOCK_KEEPOPEN` (SO_KEEPALIVE) is set in `sk_flags`.
    pub const KEEPOPEN: u16 = 1 << 5;
    /// The kernel has `net.ipv4.tcp_syn_linear_timeouts` (its BTF has the
    /// field): [`SockSnapshot::netns_syn_linear_timeouts`] is meaningful.
    pub const SYN_LINEAR: u16 = 1 << 6;
}

/// `icsk_pending` values (include/net/inet_connection_sock.h).
pub mod pending {
    pub const RETRANS: u32 = 1;
    pub const DACK: u32 = 2;
    pub const PROBE0: u32 = 3;
    pub const LOSS_PROBE: u32 = 5;
    pub const REO_TIMEOUT: u32 = 6;
}

/// Indices of the per-CPU counters in [`STATS_MAP`].
pub mod stat {
    /// Events that did not fit in the ring buffer.
    pub const RINGBUF_DROPPED: u32 = 0;
    /// Kernel reads (`bpf_probe_read_kernel`) that failed; the event was sent
    /// with the field zeroed.
    pub const READ_ERRORS: u32 = 1;
    /// Write-timer expiries skipped because no RTO / zero-window probe was due
    /// (tail loss probe, reorder timer, stale timer).
    pub const TIMER_NOT_DUE: u32 = 2;
    /// Events submitted to the ring buffer.
    pub const SUBMITTED: u32 = 3;
    /// Retransmission attempts that failed (6.17+ tracepoint `err != 0`).
    pub const RETRANSMIT_FAILED: u32 = 4;
    /// Socket files the sweep iterator visited (any family).
    pub const SWEEP_SOCKET_FILES: u32 = 5;
    /// Sweep records that did not fit in the iterator's buffer.
    pub const SWEEP_OVERFLOW: u32 = 6;
    /// TCP sockets the sweep iterator skipped in the kernel: nothing in
    /// flight, no timer pending, not CLOSE_WAIT, and a timeout set (or not
    /// established), so neither the engine nor the audit can use them.
    pub const SWEEP_SKIPPED: u32 = 7;
    /// Of those, established ones (the audit's `established` count).
    pub const SWEEP_SKIPPED_ESTABLISHED: u32 = 8;
    pub const COUNT: u32 = 9;
}

/// The socket snapshot: everything read from one `struct sock` (and its
/// `struct net`). Filled by exactly one function on the kernel side
/// (`tcpstall-ebpf/src/snapshot.rs`), embedded by [`Event`] (and by any other
/// record that carries a socket, e.g. the sweep's). Fields the producing
/// mechanism cannot see are zero; [`SockSnapshot::flags`] says which groups
/// are valid.
///
/// Each field is as wide as the kernel field it comes from (`u8` for the
/// kernel's `u8` fields), ordered by size so there is no padding: the ring
/// buffer carries every byte of it for every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockSnapshot {
    /// Socket cookie; 0 when the kernel has not assigned one yet (kprobe and
    /// timer paths read it, they cannot create it).
    pub cookie: u64,
    /// Kernel address of `struct sock` (correlation only; reused quickly).
    pub skaddr: u64,
    /// Write timer expiry in jiffies (RTO or zero-window probe).
    pub timer_expires: u64,
    /// cgroup v2 id of the cgroup the socket was created in
    /// (`sk_cgrp_data.cgroup->kn->id`, the cgroup directory's inode number);
    /// 0 when unknown (no cgroup v2 data in this kernel, or not readable).
    pub cgroup_id: u64,
    /// Local and remote address; IPv4 in the first 4 bytes (network order).
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Network namespace inode number (0 if unknown).
    pub netns: u32,
    /// `icsk_user_timeout` (TCP_USER_TIMEOUT) in ms, 0 = off.
    pub user_timeout_ms: u32,
    /// `icsk_rto` in jiffies.
    pub rto_jiffies: u32,
    /// `icsk_rto_max` in jiffies (6.15+, else 0).
    pub rto_max_jiffies: u32,
    /// `tp->retrans_stamp` (ms of tcp_time_stamp, us with [`flag::USEC_TS`]).
    pub retrans_stamp: u32,
    pub snd_una: u32,
    pub snd_wnd: u32,
    pub packets_out: u32,
    pub retrans_out: u32,
    pub total_retrans: u32,
    /// `tp->lsndtime`, `tp->rcv_tstamp` (jiffies, 32 bit).
    pub lsndtime: u32,
    pub rcv_tstamp: u32,
    /// The socket's netns `tcp_rto_max_ms` (0 where the kernel has no such
    /// sysctl).
    pub netns_rto_max_ms: u32,
    /// Local, remote port (host byte order).
    pub sport: u16,
    pub dport: u16,
    /// `sk_err` (positive errno).
    pub sk_err: u16,
    /// Bits from [`flag`].
    pub flags: u16,
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u8,
    /// TCP state when the event fired (for STATE events: the new state).
    pub state: u8,
    /// `icsk_retransmits`, `icsk_backoff`, `icsk_probes_out`, `icsk_pending`.
    pub retransmits: u8,
    pub backoff: u8,
    pub probes_out: u8,
    pub pending: u8,
    /// `icsk_ca_state` (congestion-avoidance state: 0 Open, 1 Disorder,
    /// 2 CWR, 3 Recovery, 4 Loss).
    pub ca_state: u8,
    /// The socket's netns `tcp_retries2`, `tcp_orphan_retries` (`u8` sysctls).
    pub retries2: u8,
    pub orphan_retries: u8,
    /// `icsk_syn_retries` (TCP_SYNCNT; 0 = the netns `tcp_syn_retries`).
    pub syn_retries: u8,
    /// The socket's netns `tcp_syn_retries` and `tcp_syn_linear_timeouts`
    /// (the latter valid with [`flag::SYN_LINEAR`]).
    pub netns_syn_retries: u8,
    pub netns_syn_linear_timeouts: u8,
    /// `sk_err_soft` (positive errno, e.g. 113 EHOSTUNREACH after an ICMP
    /// host unreachable; 0 = none or not read).
    pub err_soft: u8,
    // --- cause2 (pmtu_blackhole evidence): the 4 formerly reserved bytes ---
    /// `tp->mss_cache` (the current send MSS; the kernel's PMTU black-hole
    /// detection, `tcp_mtu_probing()`, lowers it after `tcp_retries1`
    /// timeouts). 0 = not read on this kernel.
    pub mss_cache: u16,
    /// `tp->sacked_out` (segments the peer SACKed above `snd_una`),
    /// saturated at `u16::MAX`. 0 = none or not read.
    pub sacked_out: u16,
    // --- end cause2 ---
    // ---- keepalive (issue 20, item 2): what `tcp_keepalive_timer()` reads.
    // 32 bytes; filled (with `flag::KEEPOPEN`) by the keepalive-timer
    // programs and the sweep only, zero in every other event; 0 where the
    // kernel lacks the field.
    /// `tp->keepalive_time`, `tp->keepalive_intvl` (jiffies; TCP_KEEPIDLE,
    /// TCP_KEEPINTVL; 0 = the netns sysctl).
    pub keepalive_time: u32,
    pub keepalive_intvl: u32,
    /// The socket's netns `tcp_keepalive_time`, `tcp_keepalive_intvl`
    /// (jiffies, as the kernel stores them).
    pub netns_keepalive_time: u32,
    pub netns_keepalive_intvl: u32,
    /// `icsk_ack.lrcvtime` (jiffies, 32 bit): the last data received.
    pub lrcvtime: u32,
    /// The keepalive timer's `expires` (jiffies, low 32 bits):
    /// `icsk_keepalive_timer` where the kernel has it, else `sk->sk_timer`.
    pub sk_timer_expires: u32,
    /// `tp->keepalive_probes` (TCP_KEEPCNT; 0 = the netns sysctl) and the
    /// netns `tcp_keepalive_probes`.
    pub keepalive_probes: u8,
    pub netns_keepalive_probes: u8,
    // ---- end keepalive
    pub _reserved2: u16,
    // ---- FIN_WAIT2 (issue 20, item 3): what `tcp_fin_time()` reads.
    /// The socket's namespace's `tcp_fin_timeout` in jiffies (as the
    /// kernel stores it); 0 = not read. Full snapshots and
    /// TW_TIMER_START events.
    pub netns_fin_timeout: u32,
    /// `tp->linger2` (jiffies; TCP_LINGER2; 0 = the namespace's
    /// `tcp_fin_timeout`, negative = no FIN_WAIT2 wait at all). Full
    /// snapshots only (0 elsewhere: a timewait socket has no `tcp_sock`).
    pub linger2: i32,
    pub _reserved3: u32,
    // ---- end FIN_WAIT2
}

pub const SOCK_SNAPSHOT_SIZE: usize = 184;
const _: () = assert!(size_of::<SockSnapshot>() == SOCK_SNAPSHOT_SIZE);

impl SockSnapshot {
    pub const fn zeroed() -> Self {
        Self {
            cookie: 0,
            skaddr: 0,
            timer_expires: 0,
            cgroup_id: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            netns: 0,
            user_timeout_ms: 0,
            rto_jiffies: 0,
            rto_max_jiffies: 0,
            retrans_stamp: 0,
            snd_una: 0,
            snd_wnd: 0,
            packets_out: 0,
            retrans_out: 0,
            total_retrans: 0,
            lsndtime: 0,
            rcv_tstamp: 0,
            netns_rto_max_ms: 0,
            sport: 0,
            dport: 0,
            sk_err: 0,
            flags: 0,
            family: 0,
            state: 0,
            retransmits: 0,
            backoff: 0,
            probes_out: 0,
            pending: 0,
            ca_state: 0,
            retries2: 0,
            orphan_retries: 0,
            syn_retries: 0,
            netns_syn_retries: 0,
            netns_syn_linear_timeouts: 0,
            err_soft: 0,
            mss_cache: 0,
            sacked_out: 0,
            keepalive_time: 0,
            keepalive_intvl: 0,
            netns_keepalive_time: 0,
            netns_keepalive_intvl: 0,
            lrcvtime: 0,
            sk_timer_expires: 0,
            keepalive_probes: 0,
            netns_keepalive_probes: 0,
            _reserved2: 0,
            netns_fin_timeout: 0,
            linger2: 0,
            _reserved3: 0,
        }
    }
}

/// One event from the kernel: when and why, plus the socket snapshot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// `bpf_jiffies64()` at the same instant.
    pub jiffies: u64,
    /// ACK events: the segment's acknowledgment number (`TCP_SKB_CB(skb)->ack_seq`);
    /// DROP events: the drop reason; RETRANSMIT_ERROR events: the errno;
    /// TW_TIMER_START events: the low 32 bits of the timer's `expires`;
    /// 0 for every other kind.
    pub ack_seq: u32,
    /// One of [`kind`].
    pub kind: u8,
    /// One of [`source`].
    pub source: u8,
    /// STATE events: the previous state.
    pub old_state: u8,
    /// Zero (keeps the struct free of implicit padding).
    pub _reserved: u8,
    /// The socket.
    pub sock: SockSnapshot,
}

pub const EVENT_SIZE: usize = 24 + SOCK_SNAPSHOT_SIZE;
const _: () = assert!(size_of::<Event>() == EVENT_SIZE);

impl Event {
    pub const fn zeroed() -> Self {
        Self {
            ts_ns: 0,
            jiffies: 0,
            ack_seq: 0,
            kind: 0,
            source: 0,
            old_state: 0,
            _reserved: 0,
            sock: SockSnapshot::zeroed(),
        }
    }
}

/// Where one kernel field lives, as resolved from BTF by the agent.
/// `size == 0` means "not present in this kernel": the program reads 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FieldSpec {
    /// Byte offset from the base object (see [`field`] for the base of each).
    pub offset: u32,
    /// Bytes to read: 1, 2, 4, 8 or 16; 0 = absent.
    pub size: u16,
    /// For bitfields: shift right by this many bits after reading ...
    pub bit_shift: u8,
    /// ... and keep this many bits (0 = not a bitfield).
    pub bit_len: u8,
}
const _: () = assert!(size_of::<FieldSpec>() == 8);

impl FieldSpec {
    pub const ABSENT: Self = Self {
        offset: 0,
        size: 0,
        bit_shift: 0,
        bit_len: 0,
    };
    pub const fn is_present(&self) -> bool {
        self.size != 0
    }
}

/// Indices into [`KernelLayout::fields`]. Unless noted, offsets are from the
/// start of `struct sock` (which begins `inet_connection_sock` and `tcp_sock`).
pub mod field {
    pub const SKC_FAMILY: usize = 0;
    pub const SKC_STATE: usize = 1;
    pub const SKC_DADDR: usize = 2;
    pub const SKC_RCV_SADDR: usize = 3;
    pub const SKC_DPORT: usize = 4;
    pub const SKC_NUM: usize = 5;
    pub const SKC_V6_DADDR: usize = 6;
    pub const SKC_V6_RCV_SADDR: usize = 7;
    pub const SKC_COOKIE: usize = 8;
    /// Pointer to `struct net` (`__sk_common.skc_net.net`).
    pub const SKC_NET: usize = 9;
    /// From the start of `struct net`.
    pub const NET_NS_INUM: usize = 10;
    /// From the start of `struct net`.
    pub const NET_TCP_RETRIES2: usize = 11;
    /// From the start of `struct net`.
    pub const NET_TCP_ORPHAN_RETRIES: usize = 12;
    /// From the start of `struct net` (6.15+).
    pub const NET_TCP_RTO_MAX_MS: usize = 13;
    pub const SK_FLAGS: usize = 14;
    pub const SK_ERR: usize = 15;
    /// `icsk_ca_state` (a 5-bit bitfield).
    pub const ICSK_CA_STATE: usize = 16;
    pub const ICSK_RETRANSMITS: usize = 17;
    pub const ICSK_BACKOFF: usize = 18;
    pub const ICSK_PROBES_OUT: usize = 19;
    pub const ICSK_PENDING: usize = 20;
    pub const ICSK_RTO: usize = 21;
    pub const ICSK_RTO_MAX: usize = 22;
    pub const ICSK_USER_TIMEOUT: usize = 23;
    /// Expiry (jiffies) of the retransmit/probe timer.
    pub const ICSK_TIMER_EXPIRES: usize = 24;
    pub const TP_RETRANS_STAMP: usize = 25;
    pub const TP_USEC_TS: usize = 26;
    pub const TP_SND_UNA: usize = 27;
    /// Pointer to the socket's cgroup v2 (`sk_cgrp_data.cgroup`); optional
    /// (kernels 5.15+ with CONFIG_SOCK_CGROUP_DATA).
    pub const SK_CGROUP: usize = 28;
    pub const TP_SND_WND: usize = 29;
    pub const TP_PACKETS_OUT: usize = 30;
    pub const TP_RETRANS_OUT: usize = 31;
    pub const TP_TOTAL_RETRANS: usize = 32;
    pub const TP_LSNDTIME: usize = 33;
    pub const TP_RCV_TSTAMP: usize = 34;
    /// Offset of the write timer's `struct timer_list` inside `struct sock`.
    pub const WRITE_TIMER: usize = 35;
    /// From the start of `struct timer_list`: the `function` pointer.
    pub const TIMER_FUNCTION: usize = 36;
    /// `sk_protocol` (IPPROTO_TCP = 6); optional: hooks then trust their caller.
    pub const SK_PROTOCOL: usize = 37;
    /// `inet_sock.inet_sport` (network order): the local port, still set after
    /// the kernel released the port (`skc_num` reads 0 in the final CLOSE).
    pub const INET_SPORT: usize = 38;
    /// Offset of `cb` (the control block) inside `struct sk_buff`; offset only.
    pub const SKB_CB: usize = 39;
    /// From the start of `struct tcp_skb_cb` (which lives at `sk_buff.cb`):
    /// `ack_seq`.
    pub const TCP_SKB_CB_ACK_SEQ: usize = 40;
    /// `tcp_sock.keepalive_time` (jiffies, 0 = the netns sysctl).
    pub const TP_KEEPALIVE_TIME: usize = 41;
    /// `tcp_sock.keepalive_intvl` (jiffies, 0 = the netns sysctl).
    pub const TP_KEEPALIVE_INTVL: usize = 42;
    /// `tcp_sock.keepalive_probes` (0 = the netns sysctl).
    pub const TP_KEEPALIVE_PROBES: usize = 43;
    /// From the start of `struct task_struct`: `tgid` (the process id).
    pub const TASK_TGID: usize = 44;
    /// From the start of `struct task_struct`: `comm` (16 bytes; offset only).
    pub const TASK_COMM: usize = 45;
    /// From the start of `struct cgroup`: `kn` (pointer to its kernfs node).
    pub const CGROUP_KN: usize = 46;
    /// From the start of `struct kernfs_node`: `id` (u64; the cgroup id, equal
    /// to the inode number of the cgroup directory).
    pub const KERNFS_NODE_ID: usize = 47;
    /// `icsk_syn_retries` (TCP_SYNCNT, 0 = the netns sysctl).
    pub const ICSK_SYN_RETRIES: usize = 48;
    /// From the start of `struct net`: `ipv4.sysctl_tcp_syn_retries`.
    pub const NET_TCP_SYN_RETRIES: usize = 49;
    /// From the start of `struct net`: `ipv4.sysctl_tcp_syn_linear_timeouts`
    /// (6.5+; absent before).
    pub const NET_TCP_SYN_LINEAR_TIMEOUTS: usize = 50;
    /// `sk_buff.sk`: the socket owning a dropped skb.
    pub const SKB_SK: usize = 51;
    /// `sock.sk_err_soft`: the last ICMP soft error (EHOSTUNREACH, ...).
    pub const SK_ERR_SOFT: usize = 52;
    // --- cause2 (pmtu_blackhole evidence) ---
    /// `tcp_sock.mss_cache`: the send MSS (lowered by black-hole detection).
    pub const TP_MSS_CACHE: usize = 53;
    /// `tcp_sock.sacked_out`: segments the peer SACKed.
    pub const TP_SACKED_OUT: usize = 54;
    // --- end cause2 ---
    // ---- keepalive (issue 20, item 2)
    /// `icsk_ack.lrcvtime` (jiffies, u32).
    pub const ICSK_ACK_LRCVTIME: usize = 55;
    /// Offset of the keepalive timer's `struct timer_list` inside `struct
    /// sock` (`icsk_keepalive_timer` where the kernel has it, else
    /// `sk->sk_timer`); offset only.
    pub const SK_TIMER: usize = 56;
    /// That timer's `expires` (jiffies), from the start of `struct sock`.
    pub const SK_TIMER_EXPIRES: usize = 57;
    /// From the start of `struct net`: `ipv4.sysctl_tcp_keepalive_time`,
    /// `..._probes`, `..._intvl` (jiffies, count, jiffies).
    pub const NET_TCP_KEEPALIVE_TIME: usize = 58;
    pub const NET_TCP_KEEPALIVE_PROBES: usize = 59;
    pub const NET_TCP_KEEPALIVE_INTVL: usize = 60;
    // ---- end keepalive
    // ---- FIN_WAIT2 (issue 20, item 3): the timewait socket
    /// Offset of `tw_timer` (`struct timer_list`) inside `struct
    /// inet_timewait_sock`; offset only.
    pub const TW_TIMER: usize = 61;
    /// `inet_timewait_sock.tw_substate` (FIN_WAIT2 or TIME_WAIT).
    pub const TW_SUBSTATE: usize = 62;
    /// `timer_list.expires` (jiffies), from the start of the timer.
    pub const TIMER_EXPIRES: usize = 63;
    /// From the start of `struct net`: `ipv4.sysctl_tcp_fin_timeout`
    /// (jiffies).
    pub const NET_TCP_FIN_TIMEOUT: usize = 64;
    /// `tcp_sock.linger2` (int, jiffies; TCP_LINGER2).
    pub const TP_LINGER2: usize = 65;
    // ---- end FIN_WAIT2
    pub const COUNT: usize = 66;
}

/// Bits of [`KernelLayout::flags`].
pub mod layout_flag {
    /// The agent filled in the layout (programs do nothing until it is set).
    pub const READY: u32 = 1 << 0;
}

/// Everything the programs need to know about the running kernel, written by
/// the agent into [`LAYOUT_GLOBAL`] before the programs are loaded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLayout {
    pub fields: [FieldSpec; field::COUNT],
    /// Address of `tcp_write_timer` (from /proc/kallsyms), for the timer path.
    pub tcp_write_timer_addr: u64,
    /// Address of `tcp_keepalive_timer` (from /proc/kallsyms), for the
    /// keepalive timer path (0: unknown).
    pub tcp_keepalive_timer_addr: u64,
    /// Bits from [`layout_flag`].
    pub flags: u32,
    /// Ring-buffer fill level (bytes) from which every submit wakes the
    /// agent; below it the agent polls.
    pub ringbuf_wake_bytes: u32,
    /// Bytes of `struct sock` (from its start) that hold every socket field
    /// the snapshot reads: the probe-read write-timer paths copy this span
    /// with one read. 0 = read field by field (the span exceeds
    /// [`SOCK_SCRATCH_BYTES`]).
    pub sock_span: u32,
    /// BTF id of `struct tcp_sock` in the running kernel's vmlinux BTF (the
    /// type the `_cast` programs give a socket with `bpf_rdonly_cast`; a
    /// constant to the verifier). 0 when the agent found none.
    pub tcp_sock_btf_id: u32,
    /// Address of `tw_timer_handler` (from /proc/kallsyms), for the
    /// timewait timer programs (0: unknown).
    pub tw_timer_handler_addr: u64,
}

/// Hand-made kfunc calls (see `tcpstall-ebpf/src/kfunc.rs`).
pub mod kfunc {
    /// The `imm` of the `bpf_rdonly_cast` call instruction as compiled; the
    /// agent replaces it with the kfunc's vmlinux BTF id before loading.
    pub const RDONLY_CAST_MARKER: u32 = 0x7CA5_7CA5;
    /// The kfunc the marker stands for.
    pub const RDONLY_CAST: &str = "bpf_rdonly_cast";
}

/// Size of the per-CPU scratch buffer a socket's span is copied into.
pub const SOCK_SCRATCH_BYTES: u32 = 4096;

pub const KERNEL_LAYOUT_SIZE: usize = field::COUNT * 8 + 40;
const _: () = assert!(size_of::<KernelLayout>() == KERNEL_LAYOUT_SIZE);

impl KernelLayout {
    pub const fn zeroed() -> Self {
        Self {
            fields: [FieldSpec::ABSENT; field::COUNT],
            tcp_write_timer_addr: 0,
            tcp_keepalive_timer_addr: 0,
            flags: 0,
            ringbuf_wake_bytes: 0,
            sock_span: 0,
            tcp_sock_btf_id: 0,
            tw_timer_handler_addr: 0,
        }
    }
}

/// Iterator program of the socket sweep (`iter/task_file`), probe reads
/// (the fallback).
pub const SWEEP_PROGRAM: &str = "tcpstall_sweep";
/// The same iterator with plain loads through the typed socket and task
/// (tried first).
pub const SWEEP_DIRECT_PROGRAM: &str = "tcpstall_sweep_direct";
/// The last fallback: the socket reached through probe reads of plain
/// addresses only (no typed socket pointer, no helper that takes one), so
/// a verifier that hands out `socket->sk` as an untrusted pointer (seen on
/// a 6.18.44 build) still loads it. The cookie is `skc_cookie` as read (0
/// until something asked the kernel for it: the agent then keys the socket
/// by its address until an event names its cookie).
pub const SWEEP_PLAIN_PROGRAM: &str = "tcpstall_sweep_plain";

/// One TCP socket found by the sweep: the same snapshot as every event
/// (`kind::SWEEP`, `source::SWEEP`) plus what only the file walk knows: the
/// process holding it and the audit fields. Written by the iterator into its
/// seq_file, read by the agent (not through the ring buffer: a full ring
/// cannot lose a sweep).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SweepRecord {
    pub event: Event,
    /// The process (thread-group id, in the agent's pid namespace) and the
    /// descriptor holding the socket.
    pub pid: u32,
    pub fd: u32,
    /// `task->comm` (NUL padded).
    pub comm: [u8; 16],
    /// `keepalive_time`, `keepalive_intvl` (ms: converted by the agent from
    /// jiffies; raw jiffies here) and `keepalive_probes`; 0 = netns default.
    pub keepalive_time: u32,
    pub keepalive_intvl: u32,
    pub keepalive_probes: u32,
    pub _reserved: u32,
}

pub const SWEEP_RECORD_SIZE: usize = EVENT_SIZE + 40;
const _: () = assert!(size_of::<SweepRecord>() == SWEEP_RECORD_SIZE);

impl SweepRecord {
    pub const fn zeroed() -> Self {
        Self {
            event: Event::zeroed(),
            pid: 0,
            fd: 0,
            comm: [0; 16],
            keepalive_time: 0,
            keepalive_intvl: 0,
            keepalive_probes: 0,
            _reserved: 0,
        }
    }
}

/// The guard (`tcpstall_guard_*` sock_ops programs): timeouts armed on
/// sockets whose applications left them unset, per cgroup.
pub mod guard {
    use core::mem::size_of;

    /// Hash map: cgroup v2 id (u64) -> [`GuardRule`], filled by the agent
    /// from the policy as cgroups appear.
    pub const RULES_MAP: &str = "TCPSTALL_GUARD_RULES";
    /// LRU hash map: socket cookie (u64) -> [`GuardRecord`], one per socket
    /// the guard acted on (or would have, dry-run); the agent consumes and
    /// deletes each entry.
    pub const SOCKETS_MAP: &str = "TCPSTALL_GUARD_SOCKETS";
    pub const MAX_RULES: u32 = 65_536;
    pub const MAX_SOCKETS: u32 = 16_384;
    /// Program with plain loads through the typed socket (tried first).
    pub const DIRECT_PROGRAM: &str = "tcpstall_guard_direct";
    /// The last fallback: the socket's address probe-read from the context
    /// (`bpf_sock_ops_kern.sk`), its fields probe-read; no socket pointer
    /// passed to any helper.
    pub const PLAIN_PROGRAM: &str = "tcpstall_guard_plain";

    /// Bits of [`GuardRule::flags`].
    pub mod rule_flag {
        /// Change the socket (else dry-run: report only).
        pub const ENFORCE: u32 = 1 << 0;
        /// Turn on SO_KEEPALIVE when the application left it off.
        pub const KEEPALIVE: u32 = 1 << 1;
    }

    /// Bits of [`GuardRecord::actions`]: what the guard set (or, dry-run,
    /// would set). `KEPT_*`: the application had its own value, left as is.
    pub mod action {
        pub const USER_TIMEOUT: u32 = 1 << 0;
        pub const KEEPALIVE: u32 = 1 << 1;
        pub const KEEPIDLE: u32 = 1 << 2;
        pub const KEEPINTVL: u32 = 1 << 3;
        pub const KEEPCNT: u32 = 1 << 4;
        pub const KEPT_USER_TIMEOUT: u32 = 1 << 8;
        pub const KEPT_KEEPALIVE: u32 = 1 << 9;
        /// A `bpf_setsockopt` call failed ([`super::GuardRecord::error`]).
        pub const FAILED: u32 = 1 << 15;
        /// Passive side (accepted socket); else active (connect).
        pub const PASSIVE: u32 = 1 << 16;
        /// The rule was in enforce mode (else dry-run).
        pub const ENFORCED: u32 = 1 << 17;
    }

    /// One rule as the kernel applies it (0 = the rule leaves it alone).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct GuardRule {
        pub user_timeout_ms: u32,
        /// TCP_KEEPIDLE, TCP_KEEPINTVL (seconds), TCP_KEEPCNT.
        pub keepidle_s: u32,
        pub keepintvl_s: u32,
        pub keepcnt: u32,
        /// The rule's id (its 1-based position in the policy).
        pub rule: u32,
        /// Bits from [`rule_flag`].
        pub flags: u32,
    }
    pub const GUARD_RULE_SIZE: usize = 24;
    const _: () = assert!(size_of::<GuardRule>() == GUARD_RULE_SIZE);

    /// What the guard did to one socket (or would have done).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct GuardRecord {
        pub cookie: u64,
        pub cgroup_id: u64,
        /// CLOCK_MONOTONIC ns.
        pub ts_ns: u64,
        pub saddr: [u8; 16],
        pub daddr: [u8; 16],
        pub rule: u32,
        /// Bits from [`action`].
        pub actions: u32,
        /// The values found on the socket before (0 = unset).
        pub found_user_timeout_ms: u32,
        /// The values set (or that would be set).
        pub user_timeout_ms: u32,
        pub keepidle_s: u32,
        pub keepintvl_s: u32,
        pub keepcnt: u32,
        /// The first failing `bpf_setsockopt`'s return (negative errno).
        pub error: i32,
        pub netns: u32,
        pub family: u16,
        pub sport: u16,
        pub dport: u16,
        pub _reserved: u16,
        pub _reserved2: u32,
    }
    pub const GUARD_RECORD_SIZE: usize = 104;
    const _: () = assert!(size_of::<GuardRecord>() == GUARD_RECORD_SIZE);

    impl GuardRecord {
        pub const fn zeroed() -> Self {
            Self {
                cookie: 0,
                cgroup_id: 0,
                ts_ns: 0,
                saddr: [0; 16],
                daddr: [0; 16],
                rule: 0,
                actions: 0,
                found_user_timeout_ms: 0,
                user_timeout_ms: 0,
                keepidle_s: 0,
                keepintvl_s: 0,
                keepcnt: 0,
                error: 0,
                netns: 0,
                family: 0,
                sport: 0,
                dport: 0,
                _reserved: 0,
                _reserved2: 0,
            }
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: these types are `repr(C)`, contain only integers and arrays of
    // integers, have no padding (asserted by size above) and every bit pattern
    // is a valid value.
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::KernelLayout {}
    unsafe impl aya::Pod for super::SweepRecord {}
    unsafe impl aya::Pod for super::guard::GuardRule {}
    unsafe impl aya::Pod for super::guard::GuardRecord {}
}
