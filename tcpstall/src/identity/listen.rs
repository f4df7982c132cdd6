//! Which side opened a connection: a socket whose local port is a listening
//! port of its network namespace was accepted (we are the server), any other
//! was initiated (we are the client). From the namespace's own socket table
//! (`/proc/<pid>/net/tcp{,6}` of a process in it, the `0A` = LISTEN rows),
//! cached per namespace for [`LISTEN_REFRESH`].
//!
//! This is what makes `remote` the peer *service*: for an accepted
//! connection the peer's port is the client's ephemeral port, one per
//! connection, so the incident and alert labels use our listening port
//! instead (see [`peer_service`]).

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use super::process::{netns_of, parse_proc_addr, pids};

/// How long a namespace's listening sockets are reused before a re-read.
pub const LISTEN_REFRESH: Duration = Duration::from_secs(5);
/// Namespaces remembered at most (the oldest entries are dropped first).
const MAX_NAMESPACES: usize = 4_096;

/// Who opened the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// This side connected (the peer's port is the service's).
    Initiated,
    /// This side accepted (the local port is a listening port).
    Accepted,
}

impl Direction {
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Initiated => "initiated",
            Direction::Accepted => "accepted",
        }
    }
}

/// The peer service of a connection, the `remote` label of incidents: for an
/// initiated connection the peer's address; for an accepted one the peer's
/// IP and our listening port (all clients of one server port from one peer
/// address are one service, whatever their ephemeral ports).
pub fn peer_service(local: SocketAddr, remote: SocketAddr, d: Direction) -> SocketAddr {
    match d {
        Direction::Initiated => remote,
        Direction::Accepted => SocketAddr::new(remote.ip(), local.port()),
    }
}

/// The listening (address, port) pairs in one `/proc/net/tcp{,6}` table.
pub fn parse_listeners(table: &str, out: &mut HashSet<(IpAddr, u16)>) {
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(3) != Some(&"0A") {
            continue;
        }
        if let Some(a) = f.get(1).and_then(|s| parse_proc_addr(s)) {
            out.insert((a.ip(), a.port()));
        }
    }
}

/// Is `local` served by one of `listeners` (same address, or a wildcard
/// listener; a v4-mapped local address matches a v4 or a v6 wildcard)?
pub fn is_listening(listeners: &HashSet<(IpAddr, u16)>, local: SocketAddr) -> bool {
    let port = local.port();
    let ip = match local.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    listeners
        .iter()
        .any(|&(l, p)| p == port && (l.is_unspecified() || l == ip || l == local.ip()))
}

struct Entry {
    read_at: Instant,
    listeners: HashSet<(IpAddr, u16)>,
}

/// Listening sockets per network namespace, read from /proc.
pub struct ListenIndex {
    proc_root: PathBuf,
    /// netns inode -> a pid in it (rebuilt by a /proc scan on a miss).
    pid_of: HashMap<u32, u32>,
    last_scan: Option<Instant>,
    by_netns: HashMap<u32, Entry>,
}

impl ListenIndex {
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
            pid_of: HashMap::new(),
            last_scan: None,
            by_netns: HashMap::new(),
        }
    }

    /// Who opened the connection `local` -> remote in namespace `netns`
    /// (`Initiated` when the namespace cannot be read).
    pub fn direction(&mut self, netns: u32, local: SocketAddr, now: Instant) -> Direction {
        let fresh = self
            .by_netns
            .get(&netns)
            .is_some_and(|e| now.duration_since(e.read_at) < LISTEN_REFRESH);
        if !fresh {
            let listeners = self.read(netns, now);
            if self.by_netns.len() >= MAX_NAMESPACES {
                self.by_netns
                    .retain(|_, e| now.duration_since(e.read_at) < LISTEN_REFRESH);
            }
            self.by_netns.insert(
                netns,
                Entry {
                    read_at: now,
                    listeners: listeners.unwrap_or_default(),
                },
            );
        }
        match self.by_netns.get(&netns) {
            Some(e) if is_listening(&e.listeners, local) => Direction::Accepted,
            _ => Direction::Initiated,
        }
    }

    fn read(&mut self, netns: u32, now: Instant) -> Option<HashSet<(IpAddr, u16)>> {
        if let Some(l) = self
            .pid_of
            .get(&netns)
            .and_then(|&p| self.read_pid(netns, p))
        {
            return Some(l);
        }
        let recent = self
            .last_scan
            .is_some_and(|t| now.duration_since(t) < LISTEN_REFRESH);
        if recent {
            return None;
        }
        self.last_scan = Some(now);
        self.pid_of.clear();
        for pid in pids(&self.proc_root) {
            if let Some(ns) = netns_of(&self.proc_root.join(pid.to_string())) {
                self.pid_of.entry(ns).or_insert(pid);
            }
        }
        let pid = *self.pid_of.get(&netns)?;
        self.read_pid(netns, pid)
    }

    /// The listeners of `netns` through `pid` (None when `pid` is gone or
    /// has moved to another namespace).
    fn read_pid(&self, netns: u32, pid: u32) -> Option<HashSet<(IpAddr, u16)>> {
        let dir = self.proc_root.join(pid.to_string());
        if netns_of(&dir)? != netns {
            return None;
        }
        let mut out = HashSet::new();
        let mut any = false;
        for t in ["net/tcp", "net/tcp6"] {
            if let Ok(text) = fs::read_to_string(dir.join(t)) {
                any = true;
                parse_listeners(&text, &mut out);
            }
        }
        any.then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:A2B4 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn listeners_and_direction() {
        let mut l = HashSet::new();
        parse_listeners(TCP, &mut l);
        assert_eq!(l.len(), 2, "{l:?}");
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        // Wildcard :8080 serves every address; 127.0.0.1:3306 only its own.
        assert!(is_listening(&l, a("10.0.0.1:8080")));
        assert!(is_listening(&l, a("[::ffff:10.0.0.1]:8080")));
        assert!(is_listening(&l, a("127.0.0.1:3306")));
        assert!(!is_listening(&l, a("10.0.0.1:3306")));
        assert!(!is_listening(&l, a("10.0.0.1:41588")));
    }

    #[test]
    fn peer_service_of_each_direction() {
        let local: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let remote: SocketAddr = "10.0.0.2:41588".parse().unwrap();
        assert_eq!(peer_service(local, remote, Direction::Initiated), remote);
        assert_eq!(
            peer_service(local, remote, Direction::Accepted),
            "10.0.0.2:8080".parse().unwrap()
        );
    }

    #[test]
    fn reads_the_namespace_of_a_real_process() {
        // This process's own namespace, through the real /proc: a listener
        // it opens is found, an ephemeral client port is not.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let ns = netns_of(std::path::Path::new("/proc/self")).expect("own netns");
        let mut idx = ListenIndex::new("/proc");
        let now = Instant::now();
        let local = SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(idx.direction(ns, local, now), Direction::Accepted);
        let client = std::net::TcpStream::connect(local).unwrap();
        assert_eq!(
            idx.direction(ns, client.local_addr().unwrap(), now),
            Direction::Initiated
        );
    }
}
