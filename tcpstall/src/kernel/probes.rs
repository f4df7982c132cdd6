//! The declarative table of probes: what each one observes, the mechanisms
//! that can provide it in order of preference, and the kernel fields each
//! mechanism reads. The loader walks this table, trying each mechanism for
//! real; `tcpstall doctor` prints it with the outcome.

use tcpstall_common::{
    SWEEP_DIRECT_PROGRAM, SWEEP_PLAIN_PROGRAM, SWEEP_PROGRAM, field, guard, program,
};

use crate::kernel::event::Mechanism;

/// How a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// BTF-typed tracepoint (`tp_btf/<name>`).
    TpBtf { tracepoint: &'static str },
    /// BPF trampoline on a kernel function.
    Fentry { function: &'static str },
    /// kprobe on a kernel function (needs the kprobe PMU).
    Kprobe { function: &'static str },
    /// `tp_btf/<tracepoint>` of the timer wheel (`timer_expire_entry`,
    /// `timer_start`), filtered in the program to timers whose callback is
    /// `callback` (address from /proc/kallsyms).
    TimerTracepoint {
        tracepoint: &'static str,
        callback: &'static str,
    },
    /// cgroup `sock_ops` on the cgroup2 root.
    SockOps,
    /// cgroup `sock_ops` on the cgroup2 root, the guard's: sets socket
    /// options at establishment (`bpf_setsockopt`), observes nothing.
    SockOpsGuard,
    /// BPF iterator `iter/<target>`: loaded at start-up, run on demand (one
    /// run = one sweep), attached to no hook.
    Iter { target: &'static str },
}

impl Attach {
    pub fn mechanism(&self) -> Mechanism {
        match self {
            Attach::TpBtf { .. } => Mechanism::TpBtf,
            Attach::Fentry { .. } => Mechanism::Fentry,
            Attach::Kprobe { .. } => Mechanism::Kprobe,
            Attach::TimerTracepoint { .. } => Mechanism::TimerTracepoint,
            Attach::SockOps | Attach::SockOpsGuard => Mechanism::SockOps,
            Attach::Iter { .. } => Mechanism::Sweep,
        }
    }

    pub fn target(&self) -> String {
        match self {
            Attach::TpBtf { tracepoint } => format!("tp_btf/{tracepoint}"),
            Attach::Fentry { function } => format!("fentry/{function}"),
            Attach::Kprobe { function } => format!("kprobe/{function}"),
            Attach::TimerTracepoint {
                tracepoint,
                callback,
            } => {
                format!("tp_btf/{tracepoint} [function == {callback}]")
            }
            Attach::SockOps => "cgroup/sock_ops (RTO_CB)".to_owned(),
            Attach::SockOpsGuard => "cgroup/sock_ops (ESTABLISHED_CB: bpf_setsockopt)".to_owned(),
            Attach::Iter { target } => format!("iter/{target}"),
        }
    }
}

/// One way to provide a probe.
#[derive(Debug)]
pub struct Candidate {
    pub attach: Attach,
    /// The program's name in the eBPF object.
    pub program: &'static str,
    /// Indices of `tcpstall_common::field` this mechanism needs; a missing one
    /// rules the candidate out before any attach attempt.
    pub fields: &'static [usize],
    /// What this mechanism sees, for `doctor`.
    pub note: &'static str,
    /// Calls the `bpf_rdonly_cast` kfunc (6.2+): not tried when the kernel's
    /// BTF lacks it.
    pub rdonly_cast: bool,
}

/// One thing tcpstall observes.
#[derive(Debug)]
pub struct ProbeSpec {
    /// Stable name, used as the `probe` metric label.
    pub name: &'static str,
    pub purpose: &'static str,
    /// The agent refuses to start when a required probe has no mechanism.
    pub required: bool,
    /// Kernel functions (BTF `FUNC`s) whose presence says the kernel offers
    /// this probe's hooks: where all are present the probe is required as
    /// well (a kernel that has the hooks and loads none of the candidates is
    /// an error, not a quiet feature loss).
    pub offered_by: &'static [&'static str],
    /// Kernel functions (BTF `FUNC`s) that mark what the programs need the
    /// kernel to do at run time, with why: where one is missing no candidate
    /// is tried ("not offered", named in doctor and the plan) and the probe
    /// stays off, without making it required where present.
    pub needs: &'static [(&'static str, &'static str)],
    /// In order of preference.
    pub candidates: &'static [Candidate],
}

/// Fields every program that reads `struct sock` needs.
const SOCK_FIELDS: &[usize] = &[
    field::SKC_FAMILY,
    field::SKC_STATE,
    field::SKC_DADDR,
    field::SKC_RCV_SADDR,
    field::SKC_DPORT,
    field::SKC_NUM,
    field::ICSK_RETRANSMITS,
    field::ICSK_BACKOFF,
    field::ICSK_PENDING,
    field::ICSK_RTO,
    field::ICSK_USER_TIMEOUT,
    field::TP_RETRANS_STAMP,
    field::TP_SND_UNA,
    field::TP_SND_WND,
    field::TP_PACKETS_OUT,
];

const TIMER_FIELDS: &[usize] = &[
    field::SKC_FAMILY,
    field::SKC_STATE,
    field::SKC_COOKIE,
    field::ICSK_RETRANSMITS,
    field::ICSK_BACKOFF,
    field::ICSK_PENDING,
    field::ICSK_RTO,
    field::ICSK_TIMER_EXPIRES,
    field::TP_RETRANS_STAMP,
    field::TP_SND_UNA,
    field::TP_SND_WND,
    field::TP_PACKETS_OUT,
];

const TIMER_TP_FIELDS: &[usize] = &[
    field::SKC_FAMILY,
    field::SKC_STATE,
    field::SKC_COOKIE,
    field::ICSK_RETRANSMITS,
    field::ICSK_BACKOFF,
    field::ICSK_PENDING,
    field::ICSK_RTO,
    field::ICSK_TIMER_EXPIRES,
    field::TP_RETRANS_STAMP,
    field::TP_SND_UNA,
    field::TP_SND_WND,
    field::TP_PACKETS_OUT,
    field::WRITE_TIMER,
    field::TIMER_FUNCTION,
];

/// The note of every `_cast` program (tried before its `_direct` twin).
const CAST_NOTE: &str = "plain loads through a read-only tcp_sock from bpf_rdonly_cast (6.2+; an inlined register move): no helper call, no copy of the socket; falls back to its twin below";

/// The note of every `_plain` program (the last of its probe).
const PLAIN_NOTE: &str = "the last fallback: probe reads from the argument as a plain number, the cookie as the socket holds it (0 until asked: keyed by address until an event names it); no socket pointer passed to any helper, so a verifier that does not trust the tracepoint's pointer still loads it";

/// The 6.17+ tracepoint's last fallback (reads `err`, as its twins do).
const PLAIN_ERR_NOTE: &str =
    "as below, on the 6.17+ tracepoint with `err`: failed attempts are counted, not reported";

/// The note of every `_direct` program (tried before its probe-read twin).
const DIRECT_NOTE: &str = "plain loads through the typed tcp_sock (bpf_skc_to_tcp_sock, 5.9+): no helper call per field; falls back to probe reads if the verifier refuses";

pub const RETRANSMIT: &str = "retransmit";
pub const STATE: &str = "state";
pub const ERROR_REPORT: &str = "error_report";
pub const WRITE_TIMER: &str = "write_timer";
pub const ACK: &str = "ack";
pub const SWEEP: &str = "sweep";
pub const DROP: &str = "drop";
pub const KEEPALIVE_TIMER: &str = "keepalive_timer";
pub const TW_START: &str = "tw_timer_start";
pub const TW_EXPIRE: &str = "tw_timer_expire";

/// What the timewait timer programs read: the timer's callback and expiry,
/// the timewait socket's `sock_common` (at the socket rows' offsets) and
/// substate.
const TW_FIELDS: &[usize] = &[
    field::TIMER_FUNCTION,
    field::TIMER_EXPIRES,
    field::TW_TIMER,
    field::TW_SUBSTATE,
    field::SKC_FAMILY,
    field::SKC_COOKIE,
    field::SKC_DADDR,
    field::SKC_RCV_SADDR,
    field::SKC_DPORT,
    field::SKC_NUM,
];

/// The note of the timewait timer programs.
const TW_NOTE: &str = "the timewait socket at the timer's address minus tw_timer's offset, probe reads from plain addresses, the cookie as it holds it (the full socket's); runs for every timer start on the node, filtered to tw_timer_handler first";

/// What the keepalive-timer programs read: the timer's socket and the
/// fields of `tcp_keepalive_timer()`'s rule.
const KEEPALIVE_FIELDS: &[usize] = &[
    field::SKC_FAMILY,
    field::SKC_STATE,
    field::SKC_COOKIE,
    field::SK_FLAGS,
    field::SK_TIMER,
    field::TIMER_FUNCTION,
    field::ICSK_PROBES_OUT,
    field::ICSK_USER_TIMEOUT,
    field::TP_PACKETS_OUT,
    field::TP_RCV_TSTAMP,
    field::TP_KEEPALIVE_TIME,
    field::TP_KEEPALIVE_INTVL,
    field::TP_KEEPALIVE_PROBES,
];

/// The note of the keepalive programs (all read the socket alike).
const KEEPALIVE_NOTE: &str = "the socket at the timer's address minus the keepalive timer's offset (icsk_keepalive_timer, else sk_timer), probe reads, the cookie as the socket holds it";

/// What the drop probe reads: the skb's owner, its cookie (the filter) and
/// the socket snapshot.
const DROP_FIELDS: &[usize] = &[
    field::SKB_SK,
    field::SKC_COOKIE,
    field::SKC_FAMILY,
    field::SKC_STATE,
    field::SKC_DADDR,
    field::SKC_RCV_SADDR,
    field::SKC_DPORT,
    field::SKC_NUM,
];

pub const GUARD: &str = "guard";

/// In the kernel's BTF from the release (5.9) whose `bpf_setsockopt` learnt
/// `SO_KEEPALIVE`, `TCP_KEEPIDLE`/`KEEPINTVL`/`KEEPCNT` and
/// `TCP_USER_TIMEOUT` for sock_ops programs: the same series exposed this
/// function for the helper ("tcp: Expose tcp_sock_set_keepidle_locked").
/// Without it the guard's programs may still load, but every
/// `bpf_setsockopt` of these options fails at run time (-EINVAL).
pub const GUARD_SETSOCKOPT_FUNC: &str = "tcp_sock_set_keepidle_locked";
const GUARD_SETSOCKOPT_WHY: &str = "bpf_setsockopt from sock_ops cannot set SO_KEEPALIVE, TCP_KEEPIDLE/INTVL/CNT or TCP_USER_TIMEOUT on this kernel (5.9+): the guard stays off";

/// What the guard reads: the socket's cgroup id and the values the
/// application may have set.
const GUARD_FIELDS: &[usize] = &[
    field::SK_CGROUP,
    field::CGROUP_KN,
    field::KERNFS_NODE_ID,
    field::ICSK_USER_TIMEOUT,
    field::SK_FLAGS,
    field::TP_KEEPALIVE_TIME,
    field::TP_KEEPALIVE_INTVL,
    field::TP_KEEPALIVE_PROBES,
];

/// The note of the sweep's last fallback.
const SWEEP_PLAIN_NOTE: &str = "probe reads from plain addresses, no typed socket passed to any helper (a verifier that marks socket->sk untrusted still loads it); the cookie as the socket holds it (0 until asked: keyed by address until an event names it)";

/// What the ACK probe reads: the filter, `snd_una` and the segment's
/// `ack_seq` (through `sk_buff.cb`), plus the socket snapshot.
const ACK_FIELDS: &[usize] = &[
    field::SKC_FAMILY,
    field::SKC_STATE,
    field::SKC_DADDR,
    field::SKC_RCV_SADDR,
    field::SKC_DPORT,
    field::SKC_NUM,
    field::ICSK_RETRANSMITS,
    field::TP_SND_UNA,
    field::SKB_CB,
    field::TCP_SKB_CB_ACK_SEQ,
];

/// The probe plan. Order of the write-timer fallbacks:
/// 1. fentry: a direct call into our program from `tcp_write_timer_handler`,
///    the cheapest hook; sees RTOs and zero-window probes of every socket.
/// 2. kprobe: same coverage, costs an int3/ftrace trap per call.
/// 3. timer_expire_entry: same coverage, but runs for every timer expiring on
///    the machine and filters on the callback address.
/// 4. sock_ops RTO_CB: only sockets established after attach, no zero-window
///    probes, no `retrans_stamp`: the last resort.
pub static PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        name: RETRANSMIT,
        purpose: "every retransmitted segment (fast retransmit, tail loss probe, RTO)",
        required: true,
        offered_by: &[],
        needs: &[],
        candidates: &[
            Candidate {
                attach: Attach::TpBtf {
                    tracepoint: "tcp_retransmit_skb",
                },
                program: program::RETRANSMIT_DIRECT_ERR,
                fields: SOCK_FIELDS,
                note: DIRECT_NOTE,
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::TpBtf {
                    tracepoint: "tcp_retransmit_skb",
                },
                program: program::RETRANSMIT_DIRECT,
                fields: SOCK_FIELDS,
                note: DIRECT_NOTE,
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::TpBtf {
                    tracepoint: "tcp_retransmit_skb",
                },
                program: program::RETRANSMIT_BTF_ERR,
                fields: SOCK_FIELDS,
                note: "6.17+ tracepoint with `err`: failed attempts are counted, not reported",
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::TpBtf {
                    tracepoint: "tcp_retransmit_skb",
                },
                program: program::RETRANSMIT_BTF,
                fields: SOCK_FIELDS,
                note: "typed struct sock *; socket cookie via bpf_get_socket_cookie",
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::TpBtf {
                    tracepoint: "tcp_retransmit_skb",
                },
                program: program::RETRANSMIT_PLAIN_ERR,
                fields: SOCK_FIELDS,
                note: PLAIN_ERR_NOTE,
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::TpBtf {
                    tracepoint: "tcp_retransmit_skb",
                },
                program: program::RETRANSMIT_PLAIN,
                fields: SOCK_FIELDS,
                note: PLAIN_NOTE,
                rdonly_cast: false,
            },
        ],
    },
    ProbeSpec {
        name: STATE,
        purpose: "TCP state changes (CLOSE_WAIT, CLOSE, ...)",
        required: true,
        offered_by: &[],
        needs: &[],
        candidates: &[
            Candidate {
                attach: Attach::TpBtf {
                    tracepoint: "inet_sock_set_state",
                },
                program: program::STATE_DIRECT,
                fields: SOCK_FIELDS,
                note: DIRECT_NOTE,
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::TpBtf {
                    tracepoint: "inet_sock_set_state",
                },
                program: program::STATE_BTF,
                fields: SOCK_FIELDS,
                note: "old and new state plus a socket snapshot",
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::TpBtf {
                    tracepoint: "inet_sock_set_state",
                },
                program: program::STATE_PLAIN,
                fields: SOCK_FIELDS,
                note: PLAIN_NOTE,
                rdonly_cast: false,
            },
        ],
    },
    ProbeSpec {
        name: ERROR_REPORT,
        purpose: "the kernel's error verdict (110 = ETIMEDOUT)",
        required: false,
        offered_by: &[],
        needs: &[],
        candidates: &[
            Candidate {
                attach: Attach::TpBtf {
                    tracepoint: "inet_sk_error_report",
                },
                program: program::ERROR_REPORT_DIRECT,
                fields: &[field::SK_ERR],
                note: DIRECT_NOTE,
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::TpBtf {
                    tracepoint: "inet_sk_error_report",
                },
                program: program::ERROR_REPORT_BTF,
                fields: &[field::SK_ERR],
                note: "5.14+; without it a timeout is inferred from the CLOSE at the predicted instant",
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::TpBtf {
                    tracepoint: "inet_sk_error_report",
                },
                program: program::ERROR_REPORT_PLAIN,
                fields: &[field::SK_ERR],
                note: PLAIN_NOTE,
                rdonly_cast: false,
            },
        ],
    },
    ProbeSpec {
        name: WRITE_TIMER,
        purpose: "RTO and zero-window probe timer expiries",
        required: true,
        offered_by: &[],
        needs: &[],
        candidates: &[
            Candidate {
                attach: Attach::Fentry {
                    function: "tcp_write_timer_handler",
                },
                program: program::WRITE_TIMER_FENTRY_DIRECT,
                fields: TIMER_FIELDS,
                note: DIRECT_NOTE,
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::Fentry {
                    function: "tcp_write_timer_handler",
                },
                program: program::WRITE_TIMER_FENTRY,
                fields: TIMER_FIELDS,
                note: "BPF trampoline: cheapest; every socket; RTO + zero-window probes",
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::Kprobe {
                    function: "tcp_write_timer_handler",
                },
                program: program::WRITE_TIMER_KPROBE,
                fields: TIMER_FIELDS,
                note: "kprobe: every socket; RTO + zero-window probes",
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::TimerTracepoint {
                    tracepoint: "timer_expire_entry",
                    callback: "tcp_write_timer",
                },
                program: program::WRITE_TIMER_TIMER_TP_CAST,
                fields: TIMER_TP_FIELDS,
                note: CAST_NOTE,
                rdonly_cast: true,
            },
            Candidate {
                attach: Attach::TimerTracepoint {
                    tracepoint: "timer_expire_entry",
                    callback: "tcp_write_timer",
                },
                program: program::WRITE_TIMER_TIMER_TP_DIRECT,
                fields: TIMER_TP_FIELDS,
                note: "as below, the callback compared with one plain load from the typed timer_list",
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::TimerTracepoint {
                    tracepoint: "timer_expire_entry",
                    callback: "tcp_write_timer",
                },
                program: program::WRITE_TIMER_TIMER_TP,
                fields: TIMER_TP_FIELDS,
                note: "runs for every kernel timer, filtered to tcp_write_timer; every socket; RTO + zero-window probes",
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::SockOps,
                program: program::SOCK_OPS,
                fields: &[],
                note: "only sockets established after attach; RTOs only (no zero-window probes)",
                rdonly_cast: false,
            },
        ],
    },
    ProbeSpec {
        name: KEEPALIVE_TIMER,
        purpose: "keepalive timer expiries (sk->sk_timer): unanswered keepalive probes of idle sockets",
        required: false,
        offered_by: &[],
        needs: &[],
        candidates: &[
            Candidate {
                attach: Attach::Fentry {
                    function: "tcp_keepalive_timer",
                },
                program: program::KEEPALIVE_TIMER_FENTRY,
                fields: KEEPALIVE_FIELDS,
                note: "BPF trampoline on the timer's callback: cheapest; every socket with SO_KEEPALIVE",
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::Kprobe {
                    function: "tcp_keepalive_timer",
                },
                program: program::KEEPALIVE_TIMER_KPROBE,
                fields: KEEPALIVE_FIELDS,
                note: "kprobe: same coverage, a trap per call",
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::TimerTracepoint {
                    tracepoint: "timer_expire_entry",
                    callback: "tcp_keepalive_timer",
                },
                program: program::KEEPALIVE_TIMER_PLAIN,
                fields: KEEPALIVE_FIELDS,
                note: KEEPALIVE_NOTE,
                rdonly_cast: false,
            },
        ],
    },
    ProbeSpec {
        name: TW_START,
        purpose: "orphaned FIN_WAIT2 connections: the timewait timer started in the FIN_WAIT2 substate (tcp_fin_timeout / TCP_LINGER2 running, with the timer wheel's bucket expiry) or re-armed for TIME_WAIT by the peer's FIN",
        required: false,
        offered_by: &[],
        needs: &[],
        candidates: &[
            Candidate {
                attach: Attach::TimerTracepoint {
                    tracepoint: "timer_start",
                    callback: "tw_timer_handler",
                },
                program: program::TW_START_ARG2,
                fields: TW_FIELDS,
                note: "timer_start(timer, expires, bucket_expiry): the bucket expiry as the third argument (a context load the verifier checks: refused where the tracepoint has two arguments)",
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::TimerTracepoint {
                    tracepoint: "timer_start",
                    callback: "tw_timer_handler",
                },
                program: program::TW_START_PLAIN,
                fields: TW_FIELDS,
                note: TW_NOTE,
                rdonly_cast: false,
            },
        ],
    },
    ProbeSpec {
        name: TW_EXPIRE,
        purpose: "orphaned FIN_WAIT2 connections: the timewait timer's expiry (the kernel ends the connection)",
        required: false,
        offered_by: &[],
        needs: &[],
        candidates: &[Candidate {
            attach: Attach::TimerTracepoint {
                tracepoint: "timer_expire_entry",
                callback: "tw_timer_handler",
            },
            program: program::TW_EXPIRE_PLAIN,
            fields: TW_FIELDS,
            note: TW_NOTE,
            rdonly_cast: false,
        }],
    },
    ProbeSpec {
        name: ACK,
        purpose: "ACK progress that ends an RTO episode (the stall clears at once)",
        required: false,
        offered_by: &[],
        needs: &[],
        candidates: &[
            Candidate {
                attach: Attach::TpBtf {
                    tracepoint: "tcp_probe",
                },
                program: program::ACK_CAST,
                fields: ACK_FIELDS,
                note: CAST_NOTE,
                rdonly_cast: true,
            },
            Candidate {
                attach: Attach::TpBtf {
                    tracepoint: "tcp_probe",
                },
                program: program::ACK_DIRECT,
                fields: ACK_FIELDS,
                note: DIRECT_NOTE,
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::TpBtf {
                    tracepoint: "tcp_probe",
                },
                program: program::ACK_BTF,
                fields: ACK_FIELDS,
                note: "every received segment passes one read; reports only new data acked during an RTO episode; without it a recovery shows when the next RTO is overdue",
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::TpBtf {
                    tracepoint: "tcp_probe",
                },
                program: program::ACK_PLAIN,
                fields: ACK_FIELDS,
                note: PLAIN_NOTE,
                rdonly_cast: false,
            },
        ],
    },
    ProbeSpec {
        name: DROP,
        purpose: "packets this node dropped that a socket in a loss episode owns, with the kernel's drop reason (cause local_drop)",
        required: false,
        offered_by: &[],
        needs: &[],
        candidates: &[
            Candidate {
                attach: Attach::TpBtf {
                    tracepoint: "kfree_skb",
                },
                program: program::DROP_DIRECT,
                fields: DROP_FIELDS,
                note: "5.17+ (drop reason argument); skb->sk with a plain load through the typed skb, filtered in the kernel to sockets in TCPSTALL_EPISODES (one load per dropped packet without an owner, one lookup with one); falls back to probe reads",
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::TpBtf {
                    tracepoint: "kfree_skb",
                },
                program: program::DROP_PLAIN,
                fields: DROP_FIELDS,
                note: PLAIN_NOTE,
                rdonly_cast: false,
            },
        ],
    },
    ProbeSpec {
        name: SWEEP,
        purpose: "socket sweep: every TCP socket's state at start-up, after lost events and periodically (stalls older than the agent, repair after loss, the hang-forever audit, socket owners)",
        required: false,
        // iter/task_file (5.8+) and bpf_sock_from_file (5.11+).
        offered_by: &["bpf_iter_task_file", "bpf_sock_from_file"],
        needs: &[],
        candidates: &[
            Candidate {
                attach: Attach::Iter {
                    target: "task_file",
                },
                program: SWEEP_DIRECT_PROGRAM,
                fields: SOCK_FIELDS,
                note: DIRECT_NOTE,
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::Iter {
                    target: "task_file",
                },
                program: SWEEP_PROGRAM,
                fields: SOCK_FIELDS,
                note: "probe reads; the cookie from bpf_get_socket_cookie (a typed socket pointer)",
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::Iter {
                    target: "task_file",
                },
                program: SWEEP_PLAIN_PROGRAM,
                fields: SOCK_FIELDS,
                note: SWEEP_PLAIN_NOTE,
                rdonly_cast: false,
            },
        ],
    },
    ProbeSpec {
        name: GUARD,
        purpose: "the guard: arms TCP_USER_TIMEOUT / keepalive the application left unset, per the policy (--guard-policy); off without one",
        required: false,
        offered_by: &[],
        needs: &[(GUARD_SETSOCKOPT_FUNC, GUARD_SETSOCKOPT_WHY)],
        candidates: &[
            Candidate {
                attach: Attach::SockOpsGuard,
                program: guard::DIRECT_PROGRAM,
                fields: GUARD_FIELDS,
                note: "plain loads through the typed tcp_sock of the context's sk (bpf_skc_to_tcp_sock, 5.9+); bpf_setsockopt of TCP_USER_TIMEOUT, TCP_KEEPIDLE/INTVL/CNT, SO_KEEPALIVE (5.9+)",
                rdonly_cast: false,
            },
            Candidate {
                attach: Attach::SockOpsGuard,
                program: guard::PLAIN_PROGRAM,
                fields: GUARD_FIELDS,
                note: "the last fallback: the socket's address probe-read from the kernel's context (bpf_sock_ops_kern.sk), its fields probe-read; no socket pointer passed to any helper",
                rdonly_cast: false,
            },
        ],
    },
];

pub fn probe(name: &str) -> Option<&'static ProbeSpec> {
    PROBES.iter().find(|p| p.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn names_and_programs_are_unique() {
        let names: HashSet<_> = PROBES.iter().map(|p| p.name).collect();
        assert_eq!(names.len(), PROBES.len());
        let programs: Vec<_> = PROBES
            .iter()
            .flat_map(|p| p.candidates.iter().map(|c| c.program))
            .collect();
        let unique: HashSet<_> = programs.iter().collect();
        assert_eq!(unique.len(), programs.len());
    }

    #[test]
    fn every_probe_has_a_candidate_and_valid_fields() {
        for p in PROBES {
            assert!(!p.candidates.is_empty(), "{} has no candidate", p.name);
            for c in p.candidates {
                for &f in c.fields {
                    assert!(f < field::COUNT, "{}: field {f} out of range", c.program);
                }
            }
        }
    }

    #[test]
    fn write_timer_fallback_order_is_fentry_kprobe_timer_sockops() {
        let mut order: Vec<_> = probe(WRITE_TIMER)
            .unwrap()
            .candidates
            .iter()
            .map(|c| c.attach.mechanism())
            .collect();
        // The direct-load and probe-read timer programs are one mechanism.
        order.dedup();
        assert_eq!(
            order,
            vec![
                Mechanism::Fentry,
                Mechanism::Kprobe,
                Mechanism::TimerTracepoint,
                Mechanism::SockOps
            ]
        );
    }

    /// Every direct-load program has a probe-read twin on the same hook
    /// after it, so a kernel whose verifier refuses the direct loads still
    /// gets the probe. Mutation: deleting the `tcpstall_state_btf` candidate
    /// fails this test ("state: tcpstall_state_direct has no probe-read
    /// fallback").
    #[test]
    fn direct_programs_have_a_probe_read_fallback() {
        for p in PROBES {
            for (i, c) in p.candidates.iter().enumerate() {
                if !c.program.contains("_direct") {
                    continue;
                }
                // tcpstall_state_direct <-> tcpstall_state_btf,
                // tcpstall_write_timer_tp_direct <-> tcpstall_write_timer_tp,
                // tcpstall_drop_direct <-> tcpstall_drop_plain.
                let stem = c.program.replace("_direct", "");
                assert!(
                    p.candidates[i + 1..].iter().any(|d| d.attach == c.attach
                        && !d.program.contains("_direct")
                        && (d.program.replace("_btf", "") == stem
                            || d.program == format!("{stem}_plain"))),
                    "{}: {} has no probe-read fallback",
                    p.name,
                    c.program
                );
            }
        }
    }

    /// Every `_cast` program is flagged as needing the kfunc (so a kernel
    /// without it skips it with a clear reason) and has its `_direct` twin
    /// on the same hook after it. Mutation: flagging the ACK cast candidate
    /// `rdonly_cast: false` fails this test with `left: false`,
    /// `right: true` for `tcpstall_ack_cast`.
    #[test]
    fn cast_programs_need_the_kfunc_and_have_a_direct_twin() {
        let mut casts = 0;
        for p in PROBES {
            for (i, c) in p.candidates.iter().enumerate() {
                assert_eq!(c.rdonly_cast, c.program.ends_with("_cast"), "{}", c.program);
                if !c.rdonly_cast {
                    continue;
                }
                casts += 1;
                let twin = c.program.replace("_cast", "_direct");
                assert!(
                    p.candidates[i + 1..]
                        .iter()
                        .any(|d| d.attach == c.attach && d.program == twin),
                    "{}: {} has no {twin} fallback",
                    p.name,
                    c.program
                );
            }
        }
        assert_eq!(casts, 2);
    }

    /// Every probe's candidates end in one that asks the verifier for
    /// nothing a kernel build may withhold: a `_plain` program (probe reads
    /// from plain addresses, no socket pointer passed to a helper) or the
    /// sock_ops program (its own context only). A 6.18.44 build refused
    /// every sweep program that passed `socket->sk` to a helper.
    /// Mutation: deleting the `tcpstall_state_plain` candidate fails this
    /// test ("state ends in tcpstall_state_btf").
    #[test]
    fn every_probe_ends_in_a_fallback_that_needs_no_trusted_pointer() {
        for p in PROBES {
            let last = p.candidates.last().expect("candidates");
            assert!(
                last.program.ends_with("_plain") || last.attach == Attach::SockOps,
                "{} ends in {}",
                p.name,
                last.program
            );
            assert!(
                !last.rdonly_cast,
                "{}: the last fallback needs no kfunc",
                p.name
            );
        }
    }

    #[test]
    fn required_probes() {
        let required: Vec<_> = PROBES
            .iter()
            .filter(|p| p.required)
            .map(|p| p.name)
            .collect();
        assert_eq!(required, vec![RETRANSMIT, STATE, WRITE_TIMER]);
    }
}
