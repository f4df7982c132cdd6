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
    /// The peer's receive window is zero: its application does not read.
    PeerNotReading,
    /// The peer closed; the local application keeps its socket open.
    AppNotClosing,
    /// The kernel offers no evidence that tells the causes apart here.
    Unknown,
}

impl StallCause {
    pub const ALL: [StallCause; 6] = [
        Self::PeerSilent,
        Self::Unreachable,
        Self::LocalDrop,
        Self::PeerNotReading,
        Self::AppNotClosing,
        Self::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::PeerSilent => "peer_silent",
            Self::Unreachable => "unreachable",
            Self::LocalDrop => "local_drop",
            Self::PeerNotReading => "peer_not_reading",
            Self::AppNotClosing => "app_not_closing",
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
/// state (zero window, CLOSE_WAIT, data that never left), then silence.
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
    if f.unsent {
        ev.circumstantial = true;
        ev.summary = "the data never left this node: window probes with the peer's window open and nothing in flight (a failed local transmit); no drop record for this socket".into();
        return (StallCause::LocalDrop, ev);
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
        assert_eq!(
            StallCause::ALL.map(StallCause::as_str),
            [
                "peer_silent",
                "unreachable",
                "local_drop",
                "peer_not_reading",
                "app_not_closing",
                "unknown"
            ]
        );
    }
}
