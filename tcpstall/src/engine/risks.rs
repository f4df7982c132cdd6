//! The hang-forever audit: established TCP sockets that no kernel timer will
//! ever end if the peer vanishes silently while the socket waits for data
//! (no `SO_KEEPALIVE`, no `TCP_USER_TIMEOUT`). Pure: computed from one
//! sweep's sockets.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Serialize;

use super::horizon;
use crate::event::{SockEvent, TcpState};

/// One socket as the sweep saw it (the event snapshot plus what only the file
/// walk knows).
#[derive(Clone, Debug, PartialEq)]
pub struct SweptSocket {
    pub ev: SockEvent,
    /// Process holding it (thread-group id in the agent's pid namespace).
    pub pid: u32,
    pub fd: u32,
    pub comm: String,
    /// `SO_KEEPALIVE` is set.
    pub keepalive: bool,
    /// Per-socket keepalive settings in jiffies / probes; 0 = netns default.
    pub keepalive_time_j: u32,
    pub keepalive_intvl_j: u32,
    pub keepalive_probes: u32,
}

/// A socket at risk of hanging forever.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RiskEntry {
    pub cookie: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub netns: u32,
    /// cgroup v2 id of the socket (0 = unknown): names the pod and
    /// container, as for stalls.
    pub cgroup_id: u64,
    pub pid: u32,
    pub process: String,
    pub fd: u32,
    /// Seconds since the socket last sent or received anything.
    pub idle_s: f64,
    /// Always false here (listed because of it); kept for the reader.
    pub keepalive: bool,
    /// Per-socket TCP_KEEPIDLE / TCP_KEEPINTVL / TCP_KEEPCNT, None = the
    /// namespace default (which only applies once SO_KEEPALIVE is set).
    pub keepalive_idle_s: Option<f64>,
    pub keepalive_interval_s: Option<f64>,
    pub keepalive_probes: Option<u32>,
    /// TCP_USER_TIMEOUT in ms; 0 (always, here) = none.
    pub user_timeout_ms: u32,
}

/// The audit of one sweep.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RiskReport {
    /// CLOCK_MONOTONIC ns of the sweep.
    pub swept_at_ns: u64,
    /// Established TCP sockets seen (after de-duplication).
    pub established: usize,
    /// Sockets without keepalive and user timeout (all of them, even
    /// beyond `listed`).
    pub total: usize,
    /// The longest idle first, at most the limit given to [`audit`].
    pub listed: Vec<RiskEntry>,
    /// `total` per network namespace inode.
    pub by_netns: BTreeMap<u32, usize>,
    /// `total` per owner: (network namespace inode, cgroup id), the keys
    /// pod identity resolves (cgroup first, the namespace as fallback).
    pub by_owner: BTreeMap<(u32, u64), usize>,
}

/// Whether no kernel timer would end this socket if the peer vanished.
pub fn at_risk(s: &SweptSocket) -> bool {
    s.ev.state == TcpState::Established
        && !s.keepalive
        && s.ev.sock.is_some_and(|k| k.user_timeout_ms == 0)
}

fn idle_s(s: &SweptSocket, hz: u32) -> f64 {
    let Some(k) = s.ev.sock else {
        return 0.0;
    };
    let now = s.ev.jiffies as u32;
    // The most recent of last send and last ACK received.
    let age = |t: u32| {
        let a = now.wrapping_sub(t);
        if t == 0 || a > i32::MAX as u32 {
            u32::MAX
        } else {
            a
        }
    };
    let a = age(k.lsndtime).min(age(k.rcv_tstamp));
    if a == u32::MAX {
        return 0.0;
    }
    horizon::jiffies_to_ns(u64::from(a), hz) as f64 / 1e9
}

/// Audits one sweep's (de-duplicated) sockets; lists at most `limit`.
pub fn audit(sockets: &[SweptSocket], hz: u32, swept_at_ns: u64, limit: usize) -> RiskReport {
    let mut r = RiskReport {
        swept_at_ns,
        ..Default::default()
    };
    let secs = |j: u32| (j != 0).then(|| horizon::jiffies_to_ns(u64::from(j), hz) as f64 / 1e9);
    for s in sockets {
        if s.ev.state == TcpState::Established {
            r.established += 1;
        }
        if !at_risk(s) {
            continue;
        }
        r.total += 1;
        *r.by_netns.entry(s.ev.netns).or_default() += 1;
        *r.by_owner.entry((s.ev.netns, s.ev.cgroup_id)).or_default() += 1;
        r.listed.push(RiskEntry {
            cookie: s.ev.cookie,
            local: s.ev.local,
            remote: s.ev.remote,
            netns: s.ev.netns,
            cgroup_id: s.ev.cgroup_id,
            pid: s.pid,
            process: s.comm.clone(),
            fd: s.fd,
            idle_s: idle_s(s, hz),
            keepalive: s.keepalive,
            keepalive_idle_s: secs(s.keepalive_time_j),
            keepalive_interval_s: secs(s.keepalive_intvl_j),
            keepalive_probes: (s.keepalive_probes != 0).then_some(s.keepalive_probes),
            user_timeout_ms: s.ev.sock.map_or(0, |k| k.user_timeout_ms),
        });
    }
    r.listed
        .sort_by(|a, b| b.idle_s.total_cmp(&a.idle_s).then(a.cookie.cmp(&b.cookie)));
    r.listed.truncate(limit);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcpstall_common::{Event, flag, kind, source};

    fn swept(cookie: u64, netns: u32, cgroup_id: u64, keepalive: bool, uto_ms: u32) -> SweptSocket {
        let mut raw = Event::zeroed();
        raw.kind = kind::SWEEP;
        raw.source = source::SWEEP;
        raw.sock.family = 2;
        raw.sock.cookie = cookie;
        raw.sock.sport = 40000 + cookie as u16;
        raw.sock.dport = 5432;
        raw.sock.state = 1;
        raw.sock.netns = netns;
        raw.sock.cgroup_id = cgroup_id;
        raw.sock.user_timeout_ms = uto_ms;
        raw.sock.flags = flag::SOCK_FIELDS;
        SweptSocket {
            ev: SockEvent::from_raw(&raw).expect("decodes"),
            pid: 1,
            fd: 3,
            comm: "psql".into(),
            keepalive,
            keepalive_time_j: 0,
            keepalive_intvl_j: 0,
            keepalive_probes: 0,
        }
    }

    /// Sockets without a timeout are counted per owner, (netns, cgroup id):
    /// two pods' containers sharing one network namespace (hostNetwork) stay
    /// apart, so the per-pod gauge names each.
    /// Mutation: keying `by_owner` by `(netns, 0)` merges the two owners.
    #[test]
    fn counts_at_risk_sockets_per_owner() {
        let r = audit(
            &[
                swept(1, 7, 100, false, 0),
                swept(2, 7, 100, false, 0),
                swept(3, 7, 200, false, 0),
                swept(4, 7, 200, true, 0),
                swept(5, 8, 0, false, 30_000),
            ],
            1000,
            1,
            10,
        );
        assert_eq!((r.established, r.total), (5, 3));
        assert_eq!(
            r.by_owner.into_iter().collect::<Vec<_>>(),
            [((7, 100), 2), ((7, 200), 1)]
        );
        assert_eq!(r.by_netns.into_iter().collect::<Vec<_>>(), [(7, 3)]);
        assert!(r.listed.iter().all(|e| e.netns == 7));
        assert_eq!(
            r.listed.iter().map(|e| e.cgroup_id).collect::<Vec<_>>(),
            [100, 100, 200]
        );
    }
}
