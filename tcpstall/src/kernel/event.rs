//! Owned, validated events decoded from the raw ring-buffer records.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::Serialize;
use tcpstall_common::{self as common, EVENT_SIZE, flag, kind, source};

/// Why a ring-buffer record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error(
        "record is {0} bytes, expected {EVENT_SIZE}: agent and kernel programs are from different builds"
    )]
    Size(usize),
    #[error("unknown event kind {0}")]
    Kind(u32),
    #[error("unknown event source {0}")]
    Source(u32),
    #[error("unknown address family {0}")]
    Family(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Retransmit,
    WriteTimer,
    State,
    ErrorReport,
    /// New data acknowledged during an RTO episode (`tcp:tcp_probe`).
    Ack,
    /// This node dropped a packet of a socket in a loss episode
    /// (`skb:kfree_skb`; [`SockEvent::ack_seq`] is the drop reason).
    Drop,
    /// A retransmission this node failed to send (6.17+;
    /// [`SockEvent::ack_seq`] is the kernel's `err` as an `i32`).
    RetransmitError,
    /// A socket snapshot from the sweep (not a ring-buffer event; not in
    /// [`EventKind::ALL`], which lists what the ring buffer carries).
    Sweep,
    /// The keepalive timer (`sk->sk_timer`) expired (snapshot before the
    /// kernel handled it).
    KeepaliveTimer,
    /// A timewait socket's timer started: in the FIN_WAIT2 substate (an
    /// orphan's FIN_WAIT2 timeout runs, [`SockEvent::tw`]), or in TIME_WAIT
    /// for one that was (the peer's FIN came). [`SockEvent::state`] is the
    /// substate.
    TwTimerStart,
    /// That timewait socket's timer expired: the kernel ends it now.
    TwTimerExpire,
}

impl EventKind {
    pub const ALL: [EventKind; 10] = [
        EventKind::Retransmit,
        EventKind::WriteTimer,
        EventKind::State,
        EventKind::ErrorReport,
        EventKind::Ack,
        EventKind::Drop,
        EventKind::RetransmitError,
        EventKind::KeepaliveTimer,
        EventKind::TwTimerStart,
        EventKind::TwTimerExpire,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Retransmit => "retransmit",
            EventKind::WriteTimer => "write_timer",
            EventKind::State => "state",
            EventKind::ErrorReport => "error_report",
            EventKind::Ack => "ack",
            EventKind::Drop => "drop",
            EventKind::RetransmitError => "retransmit_error",
            EventKind::Sweep => "sweep",
            EventKind::KeepaliveTimer => "keepalive_timer",
            EventKind::TwTimerStart => "tw_timer_start",
            EventKind::TwTimerExpire => "tw_timer_expire",
        }
    }
}

/// The mechanism that produced an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    TpBtf,
    Fentry,
    Kprobe,
    TimerTracepoint,
    SockOps,
    /// The socket sweep (BPF iterator).
    Sweep,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::TpBtf => "tp_btf",
            Mechanism::Fentry => "fentry",
            Mechanism::Kprobe => "kprobe",
            Mechanism::TimerTracepoint => "timer_tracepoint",
            Mechanism::SockOps => "sock_ops",
            Mechanism::Sweep => "sweep",
        }
    }
}

/// TCP states as numbered by the kernel (include/net/tcp_states.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    BoundInactive,
    Unknown(u32),
}

impl TcpState {
    pub fn from_raw(v: u32) -> Self {
        match v {
            1 => Self::Established,
            2 => Self::SynSent,
            3 => Self::SynRecv,
            4 => Self::FinWait1,
            5 => Self::FinWait2,
            6 => Self::TimeWait,
            7 => Self::Close,
            8 => Self::CloseWait,
            9 => Self::LastAck,
            10 => Self::Listen,
            11 => Self::Closing,
            12 => Self::NewSynRecv,
            13 => Self::BoundInactive,
            other => Self::Unknown(other),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Established => "ESTABLISHED",
            Self::SynSent => "SYN_SENT",
            Self::SynRecv => "SYN_RECV",
            Self::FinWait1 => "FIN_WAIT1",
            Self::FinWait2 => "FIN_WAIT2",
            Self::TimeWait => "TIME_WAIT",
            Self::Close => "CLOSE",
            Self::CloseWait => "CLOSE_WAIT",
            Self::LastAck => "LAST_ACK",
            Self::Listen => "LISTEN",
            Self::Closing => "CLOSING",
            Self::NewSynRecv => "NEW_SYN_RECV",
            Self::BoundInactive => "BOUND_INACTIVE",
            Self::Unknown(_) => "UNKNOWN",
        }
    }
}

/// A decoded kernel event. Times are CLOCK_MONOTONIC nanoseconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SockEvent {
    pub kind: EventKind,
    pub mechanism: Mechanism,
    pub ts_ns: u64,
    pub jiffies: u64,
    /// Socket cookie (0 = not assigned yet; see `skaddr`).
    pub cookie: u64,
    pub skaddr: u64,
    pub netns: u32,
    /// cgroup v2 id of the cgroup the socket was created in (the inode
    /// number of its directory on the cgroup2 mount); 0 = unknown.
    pub cgroup_id: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: TcpState,
    /// For `State` events.
    pub old_state: TcpState,
    /// Fields read from `struct sock` (None for sock_ops-only events).
    pub sock: Option<SockFields>,
    /// Fields every mechanism provides.
    pub retransmits: u32,
    pub rto_jiffies: u32,
    pub snd_una: u32,
    pub packets_out: u32,
    pub retrans_out: u32,
    pub total_retrans: u32,
    /// The socket's netns sysctls (None when they could not be read).
    pub netns_sysctls: Option<NetnsSysctls>,
    /// Orphaned socket (SOCK_DEAD).
    pub orphan: bool,
    /// sock_ops RTO_CB: the kernel's verdict that the limit is reached.
    pub rto_expired_verdict: bool,
    /// ERROR_REPORT: `sk_err` (positive errno).
    pub sk_err: u32,
    /// ACK: the segment's acknowledgment number (after `snd_una`, which is
    /// the value before the segment is processed). DROP: the drop reason.
    /// RETRANSMIT_ERROR: the kernel's `err` (`i32` bits: `-errno`, or a
    /// positive `NET_XMIT_*` code for a local congestion drop).
    pub ack_seq: u32,
    /// `sk_err_soft` (positive errno; 0 = none or not read).
    pub err_soft: u32,
    /// The timewait timer of the timewait-timer events (None for others).
    pub tw: Option<TwTimer>,
}

/// A timewait socket's timer, from the timewait-timer events (jiffies).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TwTimer {
    /// `TwTimerStart`: the timer wheel's bucket expiry (when the timer will
    /// run: the requested expiry rounded up to its wheel level's
    /// granularity), as the tracepoint gave it; `TwTimerExpire`: the
    /// timer's `expires`.
    pub bucket_expiry: u64,
    /// `TwTimerStart`: the requested expiry (`timer->expires`), its high
    /// bits from the event's jiffies; `TwTimerExpire`: as `bucket_expiry`.
    pub expires: u64,
    /// `TwTimerStart`: the namespace's `tcp_fin_timeout` (jiffies; None:
    /// not read on this kernel).
    pub netns_fin_timeout_j: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SockFields {
    pub backoff: u32,
    pub probes_out: u32,
    /// `icsk_pending` (see `tcpstall_common::pending`).
    pub pending: u32,
    /// `icsk_ca_state`: 0 Open, 1 Disorder, 2 CWR, 3 Recovery, 4 Loss.
    pub ca_state: u32,
    pub rto_max_jiffies: u32,
    pub user_timeout_ms: u32,
    pub retrans_stamp: u32,
    /// `retrans_stamp` counts microseconds.
    pub usec_ts: bool,
    pub snd_wnd: u32,
    pub lsndtime: u32,
    pub rcv_tstamp: u32,
    /// Write timer expiry (jiffies, 64 bit).
    pub timer_expires: u64,
    /// `icsk_syn_retries` (TCP_SYNCNT; 0 = the netns `tcp_syn_retries`).
    pub syn_retries: u32,
    /// `tp->mss_cache` (0 = not read on this kernel).
    pub mss_cache: u32,
    /// `tp->sacked_out` (0 = none or not read).
    pub sacked_out: u32,
    /// What `tcp_keepalive_timer()` reads (issue 20).
    pub keepalive: KeepaliveFields,
    /// What `tcp_fin_time()` reads (issue 20).
    pub fin: FinTimeFields,
}

/// The limits of a FIN_WAIT2 wait (`tcp_fin_time()`: `tp->linger2 ?:
/// tcp_fin_timeout`, at least 3.5 RTOs), jiffies as the kernel stores them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FinTimeFields {
    /// `tp->linger2` (TCP_LINGER2; 0 = the namespace's `tcp_fin_timeout`,
    /// negative = no wait: the kernel closes at the ACK of the FIN).
    pub linger2_j: i32,
    /// The namespace's `tcp_fin_timeout` (None: not read on this kernel).
    pub netns_fin_timeout_j: Option<u32>,
}

/// The keepalive fields of one socket: per-socket values (0 = the netns
/// sysctl) and the socket's netns sysctls (all jiffies but the counts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KeepaliveFields {
    /// SO_KEEPALIVE is on (`SOCK_KEEPOPEN`).
    pub keepopen: bool,
    pub time_j: u32,
    pub intvl_j: u32,
    pub probes: u32,
    /// The netns `tcp_keepalive_{time,intvl,probes}`; None when not read.
    pub netns: Option<(u32, u32, u32)>,
    /// `icsk_ack.lrcvtime` (jiffies, 32 bit).
    pub lrcvtime: u32,
    /// `sk->sk_timer.expires` (jiffies, low 32 bits).
    pub timer_expires: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetnsSysctls {
    pub tcp_retries2: u32,
    pub tcp_orphan_retries: u32,
    /// `tcp_rto_max_ms` (6.15+); None where the kernel has no such sysctl.
    pub tcp_rto_max_ms: Option<u32>,
    /// `tcp_syn_retries` (0: not read on this kernel).
    pub tcp_syn_retries: u32,
    /// `tcp_syn_linear_timeouts` (6.5+); None where the kernel has no such
    /// sysctl (no linear SYN timeouts).
    pub tcp_syn_linear_timeouts: Option<u32>,
}

/// The 64-bit jiffies value whose low 32 bits are `low`, nearest to
/// `near` (a timer's expiry within 2^31 jiffies of the event).
pub fn widen_jiffies(low: u32, near: u64) -> u64 {
    let delta = low.wrapping_sub(near as u32) as i32;
    near.wrapping_add_signed(i64::from(delta))
}

/// The kernel's ETIMEDOUT errno.
pub const ETIMEDOUT: u32 = 110;

fn addr(family: u32, raw: &[u8; 16], port: u16) -> Result<SocketAddr, DecodeError> {
    let ip = match family {
        2 => IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
        10 => {
            let v6 = Ipv6Addr::from(*raw);
            // v4-mapped addresses are shown as IPv4.
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        other => return Err(DecodeError::Family(other)),
    };
    Ok(SocketAddr::new(ip, port))
}

impl SockEvent {
    /// Decode one ring-buffer record. Never panics on malformed input.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() != EVENT_SIZE {
            return Err(DecodeError::Size(bytes.len()));
        }
        // SAFETY: the length matches and `Event` is plain old data (every bit
        // pattern valid); `read_unaligned` copes with any alignment.
        let raw: common::Event =
            unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<common::Event>()) };
        Self::from_raw(&raw)
    }

    pub fn from_raw(ev: &common::Event) -> Result<Self, DecodeError> {
        let raw = &ev.sock;
        let kind = match ev.kind {
            kind::RETRANSMIT => EventKind::Retransmit,
            kind::WRITE_TIMER => EventKind::WriteTimer,
            kind::STATE => EventKind::State,
            kind::ERROR_REPORT => EventKind::ErrorReport,
            kind::ACK => EventKind::Ack,
            kind::DROP => EventKind::Drop,
            kind::RETRANSMIT_ERROR => EventKind::RetransmitError,
            kind::SWEEP => EventKind::Sweep,
            kind::KEEPALIVE_TIMER => EventKind::KeepaliveTimer,
            kind::TW_TIMER_START => EventKind::TwTimerStart,
            kind::TW_TIMER_EXPIRE => EventKind::TwTimerExpire,
            other => return Err(DecodeError::Kind(other.into())),
        };
        let mechanism = match ev.source {
            source::TP_BTF => Mechanism::TpBtf,
            source::FENTRY => Mechanism::Fentry,
            source::KPROBE => Mechanism::Kprobe,
            source::TIMER_TP => Mechanism::TimerTracepoint,
            source::SOCK_OPS => Mechanism::SockOps,
            source::SWEEP => Mechanism::Sweep,
            other => return Err(DecodeError::Source(other.into())),
        };
        let family = u32::from(raw.family);
        let local = addr(family, &raw.saddr, raw.sport)?;
        let remote = addr(family, &raw.daddr, raw.dport)?;
        let sock = (raw.flags & flag::SOCK_FIELDS != 0).then_some(SockFields {
            backoff: raw.backoff.into(),
            probes_out: raw.probes_out.into(),
            pending: raw.pending.into(),
            ca_state: raw.ca_state.into(),
            rto_max_jiffies: raw.rto_max_jiffies,
            user_timeout_ms: raw.user_timeout_ms,
            retrans_stamp: raw.retrans_stamp,
            usec_ts: raw.flags & flag::USEC_TS != 0,
            snd_wnd: raw.snd_wnd,
            lsndtime: raw.lsndtime,
            rcv_tstamp: raw.rcv_tstamp,
            timer_expires: raw.timer_expires,
            syn_retries: raw.syn_retries.into(),
            mss_cache: raw.mss_cache.into(),
            sacked_out: raw.sacked_out.into(),
            keepalive: KeepaliveFields {
                keepopen: raw.flags & flag::KEEPOPEN != 0,
                time_j: raw.keepalive_time,
                intvl_j: raw.keepalive_intvl,
                probes: raw.keepalive_probes.into(),
                netns: (raw.flags & flag::NETNS_SYSCTLS != 0).then_some((
                    raw.netns_keepalive_time,
                    raw.netns_keepalive_intvl,
                    raw.netns_keepalive_probes.into(),
                )),
                lrcvtime: raw.lrcvtime,
                timer_expires: raw.sk_timer_expires,
            },
            fin: FinTimeFields {
                linger2_j: raw.linger2,
                netns_fin_timeout_j: (raw.flags & flag::NETNS_SYSCTLS != 0
                    && raw.netns_fin_timeout != 0)
                    .then_some(raw.netns_fin_timeout),
            },
        });
        let netns_sysctls = (raw.flags & flag::NETNS_SYSCTLS != 0).then_some(NetnsSysctls {
            tcp_retries2: raw.retries2.into(),
            tcp_orphan_retries: raw.orphan_retries.into(),
            tcp_rto_max_ms: (raw.netns_rto_max_ms != 0).then_some(raw.netns_rto_max_ms),
            tcp_syn_retries: raw.netns_syn_retries.into(),
            tcp_syn_linear_timeouts: (raw.flags & flag::SYN_LINEAR != 0)
                .then_some(raw.netns_syn_linear_timeouts.into()),
        });
        Ok(SockEvent {
            kind,
            mechanism,
            ts_ns: ev.ts_ns,
            jiffies: ev.jiffies,
            cookie: raw.cookie,
            skaddr: raw.skaddr,
            netns: raw.netns,
            cgroup_id: raw.cgroup_id,
            local,
            remote,
            state: TcpState::from_raw(raw.state.into()),
            old_state: TcpState::from_raw(ev.old_state.into()),
            sock,
            retransmits: raw.retransmits.into(),
            rto_jiffies: raw.rto_jiffies,
            snd_una: raw.snd_una,
            packets_out: raw.packets_out,
            retrans_out: raw.retrans_out,
            total_retrans: raw.total_retrans,
            netns_sysctls,
            orphan: raw.flags & flag::SOCK_DEAD != 0,
            rto_expired_verdict: raw.flags & flag::RTO_EXPIRED != 0,
            sk_err: raw.sk_err.into(),
            ack_seq: ev.ack_seq,
            err_soft: raw.err_soft.into(),
            tw: match kind {
                EventKind::TwTimerStart => Some(TwTimer {
                    bucket_expiry: raw.timer_expires,
                    expires: widen_jiffies(ev.ack_seq, ev.jiffies),
                    netns_fin_timeout_j: (raw.netns_fin_timeout != 0)
                        .then_some(u64::from(raw.netns_fin_timeout)),
                }),
                EventKind::TwTimerExpire => Some(TwTimer {
                    bucket_expiry: raw.timer_expires,
                    expires: raw.timer_expires,
                    netns_fin_timeout_j: None,
                }),
                _ => None,
            },
        })
    }

    /// The kernel said ETIMEDOUT for this socket.
    pub fn is_etimedout(&self) -> bool {
        self.kind == EventKind::ErrorReport && self.sk_err == ETIMEDOUT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcpstall_common::Event;

    fn bytes_of(ev: &Event) -> Vec<u8> {
        // SAFETY: Event is POD without padding.
        unsafe {
            std::slice::from_raw_parts((ev as *const Event).cast::<u8>(), EVENT_SIZE).to_vec()
        }
    }

    fn sample() -> Event {
        let mut ev = Event::zeroed();
        ev.kind = kind::RETRANSMIT;
        ev.source = source::TP_BTF;
        ev.sock.family = 2;
        ev.sock.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        ev.sock.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        ev.sock.sport = 40000;
        ev.sock.dport = 8080;
        ev.sock.state = 1;
        ev.sock.flags = flag::SOCK_FIELDS | flag::NETNS_SYSCTLS;
        ev.sock.retries2 = 5;
        ev.sock.backoff = 3;
        ev
    }

    #[test]
    fn decodes_ipv4_retransmit() {
        let ev = SockEvent::decode(&bytes_of(&sample())).unwrap();
        assert_eq!(ev.kind, EventKind::Retransmit);
        assert_eq!(ev.local, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(ev.remote, "10.0.0.2:8080".parse().unwrap());
        assert_eq!(ev.state, TcpState::Established);
        assert_eq!(ev.sock.unwrap().backoff, 3);
        assert_eq!(ev.netns_sysctls.unwrap().tcp_retries2, 5);
        assert_eq!(ev.netns_sysctls.unwrap().tcp_rto_max_ms, None);
    }

    #[test]
    fn decodes_cgroup_id_and_ca_state() {
        let mut raw = sample();
        raw.sock.cgroup_id = 0x1_0000_0042;
        raw.sock.ca_state = 4;
        let ev = SockEvent::decode(&bytes_of(&raw)).unwrap();
        assert_eq!(ev.cgroup_id, 0x1_0000_0042);
        assert_eq!(ev.sock.unwrap().ca_state, 4);
    }

    #[test]
    fn decodes_ack_events_with_their_ack_seq() {
        let mut raw = sample();
        raw.kind = kind::ACK;
        raw.ack_seq = 0xdead_beef;
        let ev = SockEvent::decode(&bytes_of(&raw)).unwrap();
        assert_eq!(ev.kind, EventKind::Ack);
        assert_eq!(ev.kind.as_str(), "ack");
        assert_eq!(ev.ack_seq, 0xdead_beef);
        raw.kind = 200;
        assert!(SockEvent::decode(&bytes_of(&raw)).is_err());
    }

    /// Drop and failed-retransmit events carry their reason / error in
    /// `ack_seq`; every snapshot its `sk_err_soft`.
    #[test]
    fn decodes_drop_and_retransmit_error_events() {
        let mut raw = sample();
        raw.kind = kind::DROP;
        raw.ack_seq = 6;
        raw.sock.err_soft = 113;
        let ev = SockEvent::decode(&bytes_of(&raw)).unwrap();
        assert_eq!(
            (ev.kind, ev.ack_seq, ev.err_soft),
            (EventKind::Drop, 6, 113)
        );
        raw.kind = kind::RETRANSMIT_ERROR;
        raw.ack_seq = (-1i32) as u32;
        let ev = SockEvent::decode(&bytes_of(&raw)).unwrap();
        assert_eq!(ev.kind, EventKind::RetransmitError);
        assert_eq!(ev.ack_seq as i32, -1);
    }

    #[test]
    fn decodes_v4_mapped_ipv6_as_ipv4_and_plain_ipv6() {
        let mut raw = sample();
        raw.sock.family = 10;
        raw.sock.saddr = Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped().octets();
        raw.sock.daddr = "fd00::2".parse::<Ipv6Addr>().unwrap().octets();
        let ev = SockEvent::decode(&bytes_of(&raw)).unwrap();
        assert_eq!(ev.local.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(ev.remote.ip(), "fd00::2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn missing_groups_are_none() {
        let mut raw = sample();
        raw.sock.flags = 0;
        let ev = SockEvent::decode(&bytes_of(&raw)).unwrap();
        assert!(ev.sock.is_none());
        assert!(ev.netns_sysctls.is_none());
    }

    #[test]
    fn rejects_malformed_records() {
        let good = bytes_of(&sample());
        assert_eq!(SockEvent::decode(&good[..100]), Err(DecodeError::Size(100)));
        assert_eq!(SockEvent::decode(&[]), Err(DecodeError::Size(0)));
        let mut raw = sample();
        raw.kind = 99;
        assert_eq!(
            SockEvent::decode(&bytes_of(&raw)),
            Err(DecodeError::Kind(99))
        );
        let mut raw = sample();
        raw.source = 0;
        assert_eq!(
            SockEvent::decode(&bytes_of(&raw)),
            Err(DecodeError::Source(0))
        );
        let mut raw = sample();
        raw.sock.family = 7;
        assert_eq!(
            SockEvent::decode(&bytes_of(&raw)),
            Err(DecodeError::Family(7))
        );
    }

    #[test]
    fn etimedout_detection() {
        let mut raw = sample();
        raw.kind = kind::ERROR_REPORT;
        raw.sock.sk_err = 110;
        assert!(SockEvent::decode(&bytes_of(&raw)).unwrap().is_etimedout());
        raw.sock.sk_err = 113;
        assert!(!SockEvent::decode(&bytes_of(&raw)).unwrap().is_etimedout());
    }
}
