//! The hang-forever audit: established TCP sockets that no kernel timer will
//! ever end if the peer vanishes silently while the socket waits for data
//! (no `SO_KEEPALIVE`, no `TCP_USER_TIMEOUT`). Pure: computed from one
//! sweep's sockets.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Serialize;

use crate::engine::horizon;
use crate::kernel::event::{SockEvent, TcpState};

/// One socket as the sweep saw it (the event snapshot plus what only the file
/// walk knows).
#[derive(Clone, Debug, PartialEq)]
pub struct SweptSocket {
    pub ev: SockEvent,
    /// Process holding it (thread-group id in the agent's pid namespace).
    pub pid: u32,
    pub fd: u32,
    pub comm: Comm,
    /// `SO_KEEPALIVE` is set.
    pub keepalive: bool,
    /// Per-socket keepalive settings in jiffies / probes; 0 = netns default.
    pub keepalive_time_j: u32,
    pub keepalive_intvl_j: u32,
    pub keepalive_probes: u32,
}

/// A task's `comm` as the kernel keeps it (NUL padded, inline: decoding a
/// sweep allocates nothing per socket).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Comm(pub [u8; 16]);

impl Comm {
    /// The name up to the first NUL (invalid UTF-8 replaced).
    pub fn to_string_lossy(&self) -> String {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        String::from_utf8_lossy(&self.0[..end]).into_owned()
    }
}

impl From<&str> for Comm {
    /// Truncated to 15 bytes, as the kernel does.
    fn from(s: &str) -> Self {
        let mut c = [0; 16];
        let n = s.len().min(15);
        c[..n].copy_from_slice(&s.as_bytes()[..n]);
        Self(c)
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.to_string_lossy(), f)
    }
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

/// Audits one sweep's (de-duplicated) sockets; lists at most `limit`, the
/// longest idle first. Only the listed sockets become [`RiskEntry`]s: the
/// others are ranked by a small key (a partial selection, not a full sort).
pub fn audit(sockets: &[SweptSocket], hz: u32, swept_at_ns: u64, limit: usize) -> RiskReport {
    let mut r = RiskReport {
        swept_at_ns,
        ..Default::default()
    };
    // (idle, cookie, index): the listing order, ties by cookie then walk order.
    let mut ranked: Vec<(f64, u64, usize)> = Vec::new();
    let mut last_owner: Option<((u32, u64), usize)> = None;
    let flush = |r: &mut RiskReport, owner: Option<((u32, u64), usize)>| {
        if let Some(((netns, cgroup), n)) = owner {
            *r.by_netns.entry(netns).or_default() += n;
            *r.by_owner.entry((netns, cgroup)).or_default() += n;
        }
    };
    for (i, s) in sockets.iter().enumerate() {
        if s.ev.state == TcpState::Established {
            r.established += 1;
        }
        if !at_risk(s) {
            continue;
        }
        r.total += 1;
        // Sockets of one owner come in runs (walked per process): count a
        // run once instead of two map updates per socket.
        let owner = (s.ev.netns, s.ev.cgroup_id);
        match &mut last_owner {
            Some((o, n)) if *o == owner => *n += 1,
            _ => {
                flush(&mut r, last_owner.take());
                last_owner = Some((owner, 1));
            }
        }
        ranked.push((idle_s(s, hz), s.ev.cookie, i));
    }
    flush(&mut r, last_owner);
    let order = |a: &(f64, u64, usize), b: &(f64, u64, usize)| {
        b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
    };
    if ranked.len() > limit {
        if limit == 0 {
            ranked.clear();
        } else {
            ranked.select_nth_unstable_by(limit - 1, order);
            ranked.truncate(limit);
        }
    }
    ranked.sort_unstable_by(order);
    let secs = |j: u32| (j != 0).then(|| horizon::jiffies_to_ns(u64::from(j), hz) as f64 / 1e9);
    r.listed = ranked
        .into_iter()
        .map(|(idle_s, _, i)| {
            let s = &sockets[i];
            RiskEntry {
                cookie: s.ev.cookie,
                local: s.ev.local,
                remote: s.ev.remote,
                netns: s.ev.netns,
                cgroup_id: s.ev.cgroup_id,
                pid: s.pid,
                process: s.comm.to_string_lossy(),
                fd: s.fd,
                idle_s,
                keepalive: s.keepalive,
                keepalive_idle_s: secs(s.keepalive_time_j),
                keepalive_interval_s: secs(s.keepalive_intvl_j),
                keepalive_probes: (s.keepalive_probes != 0).then_some(s.keepalive_probes),
                user_timeout_ms: s.ev.sock.map_or(0, |k| k.user_timeout_ms),
            }
        })
        .collect();
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

    /// The listing is the `limit` longest idle sockets, longest first (a
    /// partial selection, then a sort of the selected), and `total` still
    /// counts every socket at risk.
    /// Mutation: selecting with the order reversed
    /// (`select_nth_unstable_by(limit - 1, |a, b| order(b, a))`) lists the
    /// shortest idle ones (4, 3, 2, 1, 0 s).
    #[test]
    fn lists_the_longest_idle_first_up_to_the_limit() {
        let sockets: Vec<SweptSocket> = (1..=50u64)
            .map(|c| {
                let mut s = swept(c, 7, 100, false, 0);
                // Idle = jiffies - lsndtime: cookie c idles (c * 7 % 50) s at HZ 1000.
                s.ev.jiffies = 1_000_000;
                let idle_j = (c * 7 % 50) as u32 * 1000;
                if let Some(k) = s.ev.sock.as_mut() {
                    k.lsndtime = 1_000_000 - idle_j;
                    k.rcv_tstamp = 1_000_000 - idle_j;
                }
                s
            })
            .collect();
        let r = audit(&sockets, 1000, 1, 5);
        assert_eq!(r.total, 50);
        assert_eq!(
            r.listed.iter().map(|e| e.idle_s).collect::<Vec<_>>(),
            [49.0, 48.0, 47.0, 46.0, 45.0]
        );
        assert!(audit(&sockets, 1000, 1, 0).listed.is_empty());
        assert_eq!(audit(&sockets, 1000, 1, 100).listed.len(), 50);
    }
}
