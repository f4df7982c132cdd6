//! Why a flow stalls: a [`StallCause`] per stalled flow, from the kernel's
//! evidence on that socket in its current loss episode ([`Evidence`]),
//! independent of the stall class (which says *how* it is stuck).
//!
//! The evidence and where it comes from (verified against `net/ipv4/`,
//! 5.10 .. 6.18):
//! - **local drop**: this node dropped the socket's own segments:
//!   `skb:kfree_skb` for skbs the socket owns (`skb->sk`, drop reason
//!   `NETFILTER_DROP`, `QDISC_DROP`, `IP_OUTNOROUTES`, `NEIGH_FAILED`, ...;
//!   5.17+), or the 6.17+ `tcp_retransmit_skb` tracepoint's `err` (a failed
//!   retransmission). Also implied, without any drop record, when the write
//!   timer runs window probes while the peer's window is open and nothing is
//!   in flight: `tcp_write_xmit()` stops at a failed `tcp_transmit_skb()`,
//!   and `tcp_check_probe_timer()` then probes with data that never left.
//!   A remote cause cannot produce that state (a lost segment is in flight).
//! - **unreachable**: `sk_err_soft` holds EHOSTUNREACH / ENETUNREACH /
//!   EHOSTDOWN (an ICMP error for the socket: `tcp_v4_err()` /
//!   `tcp_v6_err()`); `tcp_ack()` clears it, so a non-zero value in an
//!   episode is current.
//! - **pmtu_blackhole**: full-size segments vanish on the path while
//!   smaller packets pass. Kernel evidence: the black-hole detection
//!   (`tcp_write_timeout()` -> `tcp_mtu_probing()` after `tcp_retries1`
//!   timeouts, with `net.ipv4.tcp_mtu_probing` >= 1) lowers `tp->mss_cache`
//!   within the loss episode (`icsk_mtup.search_low` from `tcp_base_mss`,
//!   halved on each further timeout). Circumstantial without it
//!   (`tcp_mtu_probing` 0): the peer SACKs later data (`tp->sacked_out` > 0
//!   at the timeouts: it is alive and receiving, smaller segments get
//!   through) while the head segment, retransmitted at the full MSS, is lost
//!   every time.
//! - **peer_not_reading**: the peer advertises a zero window (persist
//!   probes: the `zero_window` class).
//! - **peer_silent**: retransmissions without ACK, with none of the above:
//!   circumstantial (an absence of evidence), and only said where this
//!   kernel could have shown a local drop (the drop probe is attached).
//! - **unknown**: the kernel cannot tell (no drop tracing), with the reason.

use serde::Serialize;

/// `EPERM`: what a netfilter drop in the output path returns
/// (`NF_DROP_GETERR`).
pub const EPERM: i32 = 1;
pub const ENETUNREACH: u32 = 101;
pub const EHOSTDOWN: u32 = 112;
pub const EHOSTUNREACH: u32 = 113;
/// `-EBUSY`: the kernel did not retransmit because the previous copy is
/// still in a local queue (`skb_still_in_host_queue`): not a drop.
pub const EBUSY: i32 = 16;
/// `tcp_reset()`'s `sk_err`: ECONNRESET (EPIPE in CLOSE_WAIT).
pub const ECONNRESET: u32 = 104;
pub const EPIPE: u32 = 32;

/// Why a flow stalls. The label strings are fixed (a bounded metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StallCause {
    /// No ACK, no ICMP error, no local drop: the peer (or the path) is
    /// silent. Circumstantial.
    PeerSilent,
    /// An ICMP error says the peer cannot be reached.
    Unreachable,
    /// This node drops the socket's own segments.
    LocalDrop,
    /// Full-size segments are lost on the path while smaller ones pass.
    PmtuBlackhole,
    /// The peer's receive window is zero: its application does not read.
    PeerNotReading,
    /// The peer closed; the local application keeps its socket open.
    AppNotClosing,
    /// This side closed and the peer acknowledged its FIN, but the peer
    /// never sends its own (FIN_WAIT2): the remote application does not
    /// close its end.
    PeerNotClosing,
    /// The kernel offers no evidence that tells the causes apart here.
    Unknown,
}

impl StallCause {
    pub const ALL: [StallCause; 8] = [
        Self::PeerSilent,
        Self::Unreachable,
        Self::LocalDrop,
        Self::PmtuBlackhole,
        Self::PeerNotReading,
        Self::AppNotClosing,
        Self::PeerNotClosing,
        Self::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::PeerSilent => "peer_silent",
            Self::Unreachable => "unreachable",
            Self::LocalDrop => "local_drop",
            Self::PmtuBlackhole => "pmtu_blackhole",
            Self::PeerNotReading => "peer_not_reading",
            Self::AppNotClosing => "app_not_closing",
            Self::PeerNotClosing => "peer_not_closing",
            Self::Unknown => "unknown",
        }
    }
}

/// The kernel's evidence on one socket in its current loss episode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Evidence {
    /// Packets of this socket this node dropped (`skb:kfree_skb`).
    pub local_drops: u32,
    /// The drop reason of the last one (`enum skb_drop_reason`).
    pub last_drop_reason: Option<u32>,
    /// Retransmissions this node failed to send (6.17+ `err`).
    pub send_errors: u32,
    /// The kernel's `err` of the last one.
    pub last_send_error: Option<i32>,
    /// `sk_err_soft` at the last event of the episode (0 = none).
    pub soft_error: u32,
    /// `tp->mss_cache` at the episode's first event that read it, and at
    /// its last (0 = not read): lower now = the black-hole detection.
    pub mss_first: u32,
    pub mss_now: u32,
    /// `tp->sacked_out` at the last event of the episode.
    pub sacked_out: u32,
}

/// The send MSS lowered within a loss episode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MssChange {
    pub from: u32,
    pub to: u32,
}

impl Evidence {
    /// A failed retransmission. `err`: the tracepoint's value (`-errno`, or
    /// a positive `NET_XMIT_*` code for a local congestion drop).
    pub fn send_error(&mut self, err: i32) {
        if err == -EBUSY {
            return;
        }
        self.send_errors = self.send_errors.saturating_add(1);
        self.last_send_error = Some(err);
    }

    /// The socket's fields at an event of the episode.
    pub fn observe(&mut self, s: &crate::kernel::event::SockFields, err_soft: u32) {
        self.soft_error = err_soft;
        if s.mss_cache != 0 {
            if self.mss_first == 0 {
                self.mss_first = s.mss_cache;
            }
            self.mss_now = s.mss_cache;
        }
        self.sacked_out = s.sacked_out;
    }

    /// The kernel lowered the send MSS in this episode.
    pub fn mss_lowered(&self) -> Option<MssChange> {
        (self.mss_now != 0 && self.mss_now < self.mss_first).then_some(MssChange {
            from: self.mss_first,
            to: self.mss_now,
        })
    }

    pub fn drop(&mut self, reason: u32) {
        self.local_drops = self.local_drops.saturating_add(1);
        self.last_drop_reason = Some(reason);
    }
}

/// What the API shows about a cause: the kernel's evidence on the socket,
/// and whether the cause is inferred from an absence of evidence.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CauseEvidence {
    /// The cause rests on what was *not* seen (no ACK, no ICMP error, no
    /// local drop) or on the socket's state alone, not on a kernel record.
    pub circumstantial: bool,
    /// One line: what the kernel showed (or why it cannot tell).
    pub summary: String,
    /// Packets of this socket this node dropped in the episode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_drops: Option<u32>,
    /// The kernel's drop reason of the last one (`NETFILTER_DROP`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<String>,
    /// Retransmissions this node failed to send, and the last error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_errors: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_error: Option<String>,
    /// `sk_err_soft` (the ICMP error), as an errno name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soft_error: Option<String>,
    /// The send MSS the kernel's black-hole detection lowered in the
    /// episode (`from` -> `to`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mss_lowered: Option<MssChange>,
    /// Segments the peer SACKed above the lost head (`tp->sacked_out`),
    /// with the current send MSS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sacked_out: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mss: Option<u32>,
}

/// What the cause is decided from, for one stalled flow.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Facts<'a> {
    pub evidence: Evidence,
    /// Window probes with the peer's window open and nothing in flight.
    pub unsent: bool,
    /// The stall is a zero-window one.
    pub zero_window: bool,
    /// The stall is a CLOSE_WAIT one.
    pub close_wait: bool,
    /// The stall is a FIN_WAIT2 one (an orphan waiting for the peer's FIN).
    pub fin_wait2: bool,
    /// The stall is a retransmission one with at least one RTO expiry.
    pub rto_stall: bool,
    /// The kernel can show local drops for this socket (the drop probe is
    /// attached).
    pub drops_visible: bool,
    /// Drop reason names of the running kernel, by value.
    pub reason_names: &'a [String],
}

pub(crate) fn errno_name(e: u32) -> String {
    let name = match e {
        1 => "EPERM",
        12 => "ENOMEM",
        22 => "EINVAL",
        32 => "EPIPE",
        71 => "EPROTO",
        90 => "EMSGSIZE",
        101 => "ENETUNREACH",
        104 => "ECONNRESET",
        105 => "ENOBUFS",
        110 => "ETIMEDOUT",
        111 => "ECONNREFUSED",
        112 => "EHOSTDOWN",
        113 => "EHOSTUNREACH",
        _ => return format!("errno {e}"),
    };
    name.to_owned()
}

fn send_error_name(err: i32) -> String {
    match err {
        e if e < 0 => errno_name(e.unsigned_abs()),
        1 => "NET_XMIT_DROP (local congestion)".to_owned(),
        e => format!("NET_XMIT code {e}"),
    }
}

fn reason_name(names: &[String], r: u32) -> String {
    names
        .get(r as usize)
        .filter(|n| !n.is_empty())
        .cloned()
        .unwrap_or_else(|| format!("reason {r}"))
}

fn is_unreachable(e: u32) -> bool {
    matches!(e, ENETUNREACH | EHOSTUNREACH | EHOSTDOWN)
}

/// The cause and its evidence. First match wins: a record of this node
/// dropping the socket's packets, then an ICMP error, then the socket's
/// state (zero window, CLOSE_WAIT, FIN_WAIT2, data that never left), then
/// silence.
pub(crate) fn decide(f: &Facts<'_>) -> (StallCause, CauseEvidence) {
    let e = f.evidence;
    let mut ev = CauseEvidence {
        soft_error: (e.soft_error != 0).then(|| errno_name(e.soft_error)),
        ..CauseEvidence::default()
    };
    if e.local_drops > 0 || e.send_errors > 0 {
        ev.local_drops = (e.local_drops > 0).then_some(e.local_drops);
        ev.drop_reason = e.last_drop_reason.map(|r| reason_name(f.reason_names, r));
        ev.send_errors = (e.send_errors > 0).then_some(e.send_errors);
        ev.send_error = e.last_send_error.map(send_error_name);
        ev.summary = match (&ev.drop_reason, &ev.send_error) {
            (Some(r), _) => format!(
                "this node dropped {} of the socket's packets (last drop reason {r})",
                e.local_drops
            ),
            (None, Some(err)) => format!(
                "this node failed to send {} retransmissions (last error {err})",
                e.send_errors
            ),
            (None, None) => "this node dropped the socket's packets".to_owned(),
        };
        return (StallCause::LocalDrop, ev);
    }
    if is_unreachable(e.soft_error) {
        ev.summary = format!(
            "ICMP error on the socket: {} (sk_err_soft)",
            errno_name(e.soft_error)
        );
        return (StallCause::Unreachable, ev);
    }
    if let Some(m) = e.mss_lowered() {
        ev.mss_lowered = Some(m);
        ev.summary = format!(
            "the kernel's path-MTU black-hole detection lowered the MSS from {} to {} after repeated timeouts (net.ipv4.tcp_mtu_probing): full-size segments are lost on the path",
            m.from, m.to
        );
        return (StallCause::PmtuBlackhole, ev);
    }
    if f.zero_window {
        ev.circumstantial = true;
        ev.summary = "the peer advertises a zero window: its application does not read".into();
        return (StallCause::PeerNotReading, ev);
    }
    if f.close_wait {
        ev.circumstantial = true;
        ev.summary =
            "the peer closed the connection; the local application has not closed its socket"
                .into();
        return (StallCause::AppNotClosing, ev);
    }
    if f.fin_wait2 {
        ev.circumstantial = true;
        ev.summary = "this side closed and the peer acknowledged its FIN, but the peer never sends its own: the remote application has not closed its end (or the remote vanished after the ACK)".into();
        return (StallCause::PeerNotClosing, ev);
    }
    if f.unsent {
        ev.circumstantial = true;
        ev.summary = "the data never left this node: window probes with the peer's window open and nothing in flight (a failed local transmit); no drop record for this socket".into();
        return (StallCause::LocalDrop, ev);
    }
    if f.rto_stall && e.sacked_out > 0 {
        ev.circumstantial = true;
        ev.sacked_out = Some(e.sacked_out);
        ev.mss = (e.mss_now != 0).then_some(e.mss_now);
        ev.summary = format!(
            "the peer acknowledges (SACKs) {} later segment(s) while the head segment, retransmitted at the full MSS{}, is lost every time: likely a path-MTU black hole (no MSS change seen: net.ipv4.tcp_mtu_probing is probably 0)",
            e.sacked_out,
            ev.mss.map(|m| format!(" {m}")).unwrap_or_default()
        );
        return (StallCause::PmtuBlackhole, ev);
    }
    if !f.drops_visible {
        ev.summary = "no ACK and no ICMP error; this kernel shows no local drops (no kfree_skb drop-reason tracing attached), so peer_silent and local_drop cannot be told apart".into();
        return (StallCause::Unknown, ev);
    }
    ev.circumstantial = true;
    ev.summary = match &ev.soft_error {
        Some(s) => format!("no ACK, no local drop; ICMP error {s} (not an unreachable one)"),
        None => "no ACK, no ICMP error, no local drop for this socket's segments".into(),
    };
    (StallCause::PeerSilent, ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(e: Evidence) -> Facts<'static> {
        Facts {
            evidence: e,
            unsent: false,
            zero_window: false,
            close_wait: false,
            fin_wait2: false,
            rto_stall: true,
            drops_visible: true,
            reason_names: &[],
        }
    }

    #[test]
    fn drop_records_win_over_everything() {
        let mut e = Evidence {
            soft_error: EHOSTUNREACH,
            ..Evidence::default()
        };
        e.drop(6);
        let names: Vec<String> = (0..7).map(|i| format!("R{i}")).collect();
        let (c, ev) = decide(&Facts {
            zero_window: true,
            reason_names: &names,
            ..facts(e)
        });
        assert_eq!(c, StallCause::LocalDrop);
        assert!(!ev.circumstantial);
        assert_eq!(ev.local_drops, Some(1));
        assert_eq!(ev.drop_reason.as_deref(), Some("R6"));
        assert_eq!(ev.soft_error.as_deref(), Some("EHOSTUNREACH"));
    }

    #[test]
    fn send_errors_are_local_drops_but_ebusy_is_not() {
        let mut e = Evidence::default();
        e.send_error(-EBUSY);
        assert_eq!(decide(&facts(e)).0, StallCause::PeerSilent);
        e.send_error(-EPERM);
        let (c, ev) = decide(&facts(e));
        assert_eq!(c, StallCause::LocalDrop);
        assert_eq!(ev.send_error.as_deref(), Some("EPERM"));
        assert_eq!(ev.send_errors, Some(1));
    }

    #[test]
    fn unreachable_from_the_soft_error() {
        for errno in [EHOSTUNREACH, ENETUNREACH, EHOSTDOWN] {
            let e = Evidence {
                soft_error: errno,
                ..Evidence::default()
            };
            let (c, ev) = decide(&facts(e));
            assert_eq!(c, StallCause::Unreachable, "{errno}");
            assert!(!ev.circumstantial);
        }
        // Another soft error (EMSGSIZE) is no verdict.
        let e = Evidence {
            soft_error: 90,
            ..Evidence::default()
        };
        assert_eq!(decide(&facts(e)).0, StallCause::PeerSilent);
    }

    #[test]
    fn silence_is_circumstantial_and_unknown_without_drop_tracing() {
        let (c, ev) = decide(&facts(Evidence::default()));
        assert_eq!(c, StallCause::PeerSilent);
        assert!(ev.circumstantial);
        let (c, ev) = decide(&Facts {
            drops_visible: false,
            ..facts(Evidence::default())
        });
        assert_eq!(c, StallCause::Unknown);
        assert!(
            ev.summary.contains("cannot be told apart"),
            "{}",
            ev.summary
        );
        // Unsent data needs no drop tracing: the socket's state says it.
        let (c, ev) = decide(&Facts {
            drops_visible: false,
            unsent: true,
            ..facts(Evidence::default())
        });
        assert_eq!(c, StallCause::LocalDrop);
        assert!(ev.circumstantial);
    }

    /// Mutation: `mss_lowered` comparing with `>` instead of `<` fails the
    /// first block; dropping the `sacked_out` rule fails the second.
    #[test]
    fn pmtu_blackhole_from_the_mss_change_or_sacks() {
        let lowered = Evidence {
            mss_first: 1448,
            mss_now: 1012,
            ..Evidence::default()
        };
        let (c, ev) = decide(&facts(lowered));
        assert_eq!(c, StallCause::PmtuBlackhole);
        assert!(!ev.circumstantial);
        assert_eq!(
            ev.mss_lowered,
            Some(MssChange {
                from: 1448,
                to: 1012
            })
        );
        // A raised MSS (probing up) or an unchanged one is no evidence.
        for (a, b) in [(1012, 1448), (1448, 1448), (0, 1448)] {
            let e = Evidence {
                mss_first: a,
                mss_now: b,
                ..Evidence::default()
            };
            assert_eq!(e.mss_lowered(), None, "{a} -> {b}");
        }
        // SACKs of later data while the head is lost: circumstantial, only
        // in an RTO stall.
        let sacked = Evidence {
            sacked_out: 1,
            mss_first: 1448,
            mss_now: 1448,
            ..Evidence::default()
        };
        let (c, ev) = decide(&facts(sacked));
        assert_eq!(c, StallCause::PmtuBlackhole);
        assert!(ev.circumstantial);
        assert_eq!((ev.sacked_out, ev.mss), (Some(1), Some(1448)));
        let no_rto = Facts {
            rto_stall: false,
            ..facts(sacked)
        };
        assert_eq!(decide(&no_rto).0, StallCause::PeerSilent);
        // A local drop record still wins.
        let mut dropped = lowered;
        dropped.drop(6);
        assert_eq!(decide(&facts(dropped)).0, StallCause::LocalDrop);
    }

    #[test]
    fn state_causes() {
        let zw = decide(&Facts {
            zero_window: true,
            ..facts(Evidence::default())
        });
        assert_eq!(zw.0, StallCause::PeerNotReading);
        let cw = decide(&Facts {
            close_wait: true,
            ..facts(Evidence::default())
        });
        assert_eq!(cw.0, StallCause::AppNotClosing);
        let fw2 = decide(&Facts {
            fin_wait2: true,
            rto_stall: false,
            ..facts(Evidence::default())
        });
        assert_eq!(fw2.0, StallCause::PeerNotClosing);
        assert!(fw2.1.circumstantial);
        assert!(
            fw2.1.summary.contains("peer acknowledged its FIN"),
            "{}",
            fw2.1.summary
        );
        // An orphan in FIN_WAIT2 whose packets this node drops is the
        // node's problem first.
        let mut dropped = Evidence::default();
        dropped.drop(6);
        let fw2_drop = decide(&Facts {
            fin_wait2: true,
            ..facts(dropped)
        });
        assert_eq!(fw2_drop.0, StallCause::LocalDrop);
        assert_eq!(
            StallCause::ALL.map(StallCause::as_str),
            [
                "peer_silent",
                "unreachable",
                "local_drop",
                "pmtu_blackhole",
                "peer_not_reading",
                "app_not_closing",
                "peer_not_closing",
                "unknown"
            ]
        );
    }
}
