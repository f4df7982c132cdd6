//! Which process holds a socket: pid and command, for stalled flows only.
//!
//! Method (no kernel support needed): the socket's inode from the kernel's
//! `/proc/<pid>/net/tcp{,6}` of a process in the socket's network namespace
//! (matching the 4-tuple), then `socket:[inode]` among `/proc/*/fd/*`.
//! Processes of the socket's cgroup (`cgroup.procs`) are tried first, which
//! finds a container's socket without scanning the node. Reading other
//! processes' `ns` and `fd` entries needs CAP_SYS_PTRACE.
//!
//! Every process of a network namespace sees the same table, so each
//! namespace's table is read once per lookup burst (cached for
//! [`TABLE_TTL`], re-read on a miss older than [`MISS_REREAD`]): a socket
//! no process holds (an orphan in FIN_WAIT2, a socket of a deleted pod)
//! costs one table read, not one per process of its namespace (each read
//! walks the kernel's whole established hash: hundreds of processes made
//! that seconds of CPU on the event loop).
//!
//! Results are cached per flow (bounded; misses are retried after
//! `retry_after`). Another source that knows the owner directly (e.g. a
//! kernel file iterator) feeds the same cache through [`ProcessResolver::learn`].

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// A process holding a socket.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProcessInfo {
    pub pid: u32,
    /// `/proc/<pid>/comm`.
    pub comm: String,
}

/// A socket as the engine knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketKey {
    /// Network namespace inode (0 = unknown).
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

struct Cached {
    info: Option<ProcessInfo>,
    at: Instant,
}

/// How long a namespace's `/proc/<pid>/net/tcp{,6}` text serves lookups.
pub const TABLE_TTL: Duration = Duration::from_secs(1);
/// A miss in a cached table older than this reads the table again (a socket
/// younger than the copy).
pub const MISS_REREAD: Duration = Duration::from_millis(200);

/// One network namespace's TCP tables (`net/tcp` then `net/tcp6`).
struct Table {
    text: String,
    at: Instant,
}

pub struct ProcessResolver {
    proc_root: PathBuf,
    cache: HashMap<SocketKey, Cached>,
    max_entries: usize,
    retry_after: Duration,
    /// Per network namespace (inode).
    tables: HashMap<u32, Table>,
    /// Full /proc scans done (for tests and logs).
    pub scans: u64,
    /// `net/tcp{,6}` pairs read (for tests).
    pub table_reads: u64,
}

/// One address of `/proc/net/tcp{,6}`: `0100007F:1F90` (the address words
/// in the kernel's byte order, the port big-endian hex).
pub fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?;
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |s: SocketAddr| match s.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(|v4| SocketAddr::new(IpAddr::V4(v4), s.port()))
            .unwrap_or(s),
        IpAddr::V4(_) => s,
    };
    canon(a) == canon(b)
}

/// The inode of the socket `local` <-> `remote` in a `/proc/net/tcp{,6}` table.
pub fn find_inode(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (lo, re) = (parse_proc_addr(f.get(1)?)?, parse_proc_addr(f.get(2)?)?);
        let inode: u64 = f.get(9)?.parse().ok()?;
        (inode != 0 && same(lo, local) && same(re, remote)).then_some(inode)
    })
}

pub(crate) fn netns_of(pid_dir: &Path) -> Option<u32> {
    let l = fs::read_link(pid_dir.join("ns/net")).ok()?;
    l.to_str()?
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

pub(crate) fn pids(proc_root: &Path) -> Vec<u32> {
    let Ok(dir) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut v: Vec<u32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

impl ProcessResolver {
    pub fn new(proc_root: impl Into<PathBuf>, max_entries: usize, retry_after: Duration) -> Self {
        Self {
            proc_root: proc_root.into(),
            cache: HashMap::new(),
            max_entries,
            retry_after,
            tables: HashMap::new(),
            scans: 0,
            table_reads: 0,
        }
    }

    /// Record an owner learnt elsewhere (e.g. a kernel iterator).
    pub fn learn(&mut self, key: SocketKey, info: ProcessInfo, now: Instant) {
        self.insert(key, Some(info), now);
    }

    fn insert(&mut self, key: SocketKey, info: Option<ProcessInfo>, now: Instant) {
        if self.cache.len() >= self.max_entries && !self.cache.contains_key(&key) {
            let ttl = self.retry_after;
            self.cache
                .retain(|_, c| c.info.is_some() && now.duration_since(c.at) < ttl * 6);
            if self.cache.len() >= self.max_entries {
                self.cache.clear();
            }
        }
        self.cache.insert(key, Cached { info, at: now });
    }

    /// The process holding the socket. `cgroup_dir`: the directory of the
    /// socket's cgroup, whose processes are tried first.
    pub fn resolve(
        &mut self,
        key: SocketKey,
        cgroup_dir: Option<&Path>,
        now: Instant,
    ) -> Option<ProcessInfo> {
        if let Some(c) = self.cache.get(&key) {
            let alive = c
                .info
                .as_ref()
                .is_some_and(|i| self.proc_root.join(i.pid.to_string()).exists());
            if alive || (c.info.is_none() && now.duration_since(c.at) < self.retry_after) {
                return c.info.clone();
            }
        }
        let found = self.find(key, cgroup_dir, now);
        self.insert(key, found.clone(), now);
        found
    }

    fn comm(&self, pid: u32) -> String {
        fs::read_to_string(self.proc_root.join(pid.to_string()).join("comm"))
            .map(|s| s.trim_end().to_owned())
            .unwrap_or_default()
    }

    /// `pid`'s namespace tables (cached per namespace; `fresh`: read now
    /// unless the copy is younger than [`MISS_REREAD`]). None when `pid`
    /// is gone.
    fn table(&mut self, netns: u32, pid: u32, now: Instant, fresh: bool) -> Option<&str> {
        let max_age = if fresh { MISS_REREAD } else { TABLE_TTL };
        let stale = self
            .tables
            .get(&netns)
            .is_none_or(|t| now.saturating_duration_since(t.at) >= max_age);
        if stale {
            let dir = self.proc_root.join(pid.to_string());
            let mut text = String::new();
            for t in ["net/tcp", "net/tcp6"] {
                match fs::read_to_string(dir.join(t)) {
                    Ok(x) => text.push_str(&x),
                    // No IPv6 in the namespace: the IPv4 table alone.
                    Err(_) if !text.is_empty() => {}
                    Err(_) => return None,
                }
            }
            self.table_reads += 1;
            // Only copies still serving lookups are kept (a node's root
            // table can be megabytes).
            self.tables
                .retain(|_, t| now.saturating_duration_since(t.at) < TABLE_TTL);
            if self.tables.len() >= self.max_entries {
                self.tables.clear();
            }
            self.tables.insert(netns, Table { text, at: now });
        }
        self.tables.get(&netns).map(|t| t.text.as_str())
    }

    /// The socket's inode in namespace `netns` (its tables read through
    /// `pid`): Ok(None) when the namespace holds no such socket with an
    /// owner (absent, or an orphan: inode 0), Err(()) when `pid` is gone.
    fn inode_in(
        &mut self,
        netns: u32,
        pid: u32,
        key: SocketKey,
        now: Instant,
    ) -> Result<Option<u64>, ()> {
        let (l, r) = (key.local, key.remote);
        let cached = self.table(netns, pid, now, false).ok_or(())?;
        if let Some(i) = find_inode(cached, l, r) {
            return Ok(Some(i));
        }
        let fresh = self.table(netns, pid, now, true).ok_or(())?;
        Ok(find_inode(fresh, l, r))
    }

    fn holds(&self, pid: u32, target: &str) -> bool {
        let Ok(fds) = fs::read_dir(self.proc_root.join(pid.to_string()).join("fd")) else {
            return false;
        };
        fds.flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target))
    }

    fn owner(&self, pid: u32) -> ProcessInfo {
        ProcessInfo {
            pid,
            comm: self.comm(pid),
        }
    }

    fn find(
        &mut self,
        key: SocketKey,
        cgroup_dir: Option<&Path>,
        now: Instant,
    ) -> Option<ProcessInfo> {
        let wanted = |ns: u32| key.netns == 0 || ns == key.netns;
        // 1. The socket's cgroup: usually the owner itself.
        if let Some(procs) =
            cgroup_dir.and_then(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
        {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                let Some(ns) = netns_of(&self.proc_root.join(pid.to_string())) else {
                    continue;
                };
                if !wanted(ns) {
                    continue;
                }
                match self.inode_in(ns, pid, key, now) {
                    Ok(Some(inode)) if self.holds(pid, &format!("socket:[{inode}]")) => {
                        return Some(self.owner(pid));
                    }
                    // Its namespace has no owned socket of that 4-tuple.
                    Ok(None) if key.netns != 0 => return None,
                    _ => {}
                }
            }
        }
        // 2. Every process, grouped by namespace: the inode from one table
        // read per namespace, then the first process holding it (its
        // namespace's processes first).
        self.scans += 1;
        let mut by_ns: HashMap<u32, Vec<u32>> = HashMap::new();
        let all = pids(&self.proc_root);
        for &pid in &all {
            if let Some(ns) = netns_of(&self.proc_root.join(pid.to_string()))
                && wanted(ns)
            {
                by_ns.entry(ns).or_default().push(pid);
            }
        }
        let mut namespaces: Vec<(u32, Vec<u32>)> = by_ns.into_iter().collect();
        namespaces.sort_unstable();
        for (ns, members) in namespaces {
            let inode = members
                .iter()
                .find_map(|&pid| self.inode_in(ns, pid, key, now).ok())
                .flatten();
            let Some(inode) = inode else { continue };
            let target = format!("socket:[{inode}]");
            let pid = members
                .iter()
                .copied()
                .chain(all.iter().copied().filter(|p| !members.contains(p)))
                .find(|&pid| self.holds(pid, &target))?;
            return Some(self.owner(pid));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_addresses() {
        // 127.0.0.1:8080 on a little-endian host.
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_proc_addr("0100007F:1F90"),
                Some("127.0.0.1:8080".parse().unwrap())
            );
            assert_eq!(
                parse_proc_addr("00000000000000000000000001000000:0050"),
                Some("[::1]:80".parse().unwrap())
            );
            assert_eq!(
                parse_proc_addr("0000000000000000FFFF00000100007F:0050"),
                Some("[::ffff:127.0.0.1]:80".parse().unwrap())
            );
        }
        assert_eq!(parse_proc_addr("xyz"), None);
        assert_eq!(parse_proc_addr("0100007F"), None);
    }

    #[test]
    fn finds_the_inode_of_a_four_tuple() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0 100 0 0 10 0\n\
           1: 0100007F:C350 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2222 1 0 20 4 30 10 -1\n";
        if cfg!(target_endian = "little") {
            let l: SocketAddr = "127.0.0.1:50000".parse().unwrap();
            let r: SocketAddr = "127.0.0.1:8080".parse().unwrap();
            assert_eq!(find_inode(table, l, r), Some(2222));
            assert_eq!(find_inode(table, r, l), None);
            // A v4-mapped view of the same flow matches too.
            let l6: SocketAddr = "[::ffff:127.0.0.1]:50000".parse().unwrap();
            assert_eq!(find_inode(table, l6, r), Some(2222));
        }
    }

    /// The real /proc: this test process's own connected socket.
    #[test]
    fn resolves_own_socket_from_real_proc() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(server).unwrap();
        let key = SocketKey {
            netns: 0,
            local: client.local_addr().unwrap(),
            remote: server,
        };
        let mut r = ProcessResolver::new("/proc", 16, Duration::from_secs(10));
        let now = Instant::now();
        let p = r.resolve(key, None, now).expect("own socket found");
        assert_eq!(p.pid, std::process::id());
        assert!(!p.comm.is_empty());
        assert_eq!(r.scans, 1);
        // Cached: no second scan.
        assert_eq!(r.resolve(key, None, now), Some(p));
        assert_eq!(r.scans, 1);
        // Unknown flow: a miss, retried only after retry_after.
        let other = SocketKey {
            remote: "127.0.0.1:1".parse().unwrap(),
            ..key
        };
        assert_eq!(r.resolve(other, None, now), None);
        assert_eq!(r.resolve(other, None, now), None);
        assert_eq!(r.scans, 2);
        assert_eq!(r.resolve(other, None, now + Duration::from_secs(11)), None);
        assert_eq!(r.scans, 3);
        drop(listener);
    }

    /// Sockets no process holds (orphans, a deleted pod's) cost one read
    /// of their namespace's table per [`TABLE_TTL`], whatever the number of
    /// processes there; a socket newer than the cached copy is still found.
    /// Mutations: `let stale = true;` in `table` fails the first count;
    /// `fresh` ignored in `table` fails the new socket's lookup.
    #[test]
    fn an_ownerless_socket_costs_one_table_read() {
        let ns = netns_of(Path::new("/proc/self")).expect("own netns");
        let key = |port| SocketKey {
            netns: ns,
            local: SocketAddr::from(([127, 0, 0, 9], port)),
            remote: SocketAddr::from(([127, 0, 0, 9], 1)),
        };
        let mut r = ProcessResolver::new("/proc", 16, Duration::from_secs(10));
        let t0 = Instant::now();
        for port in 1..=3 {
            assert_eq!(r.resolve(key(port), None, t0), None);
        }
        assert_eq!(r.scans, 3);
        assert_eq!(
            r.table_reads, 1,
            "one read for three misses in one namespace"
        );
        // A socket opened after that read.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let fresh = SocketKey {
            netns: ns,
            local: client.local_addr().unwrap(),
            remote: listener.local_addr().unwrap(),
        };
        let later = t0 + Duration::from_millis(300);
        assert!(MISS_REREAD < later - t0 && later - t0 < TABLE_TTL);
        let p = r.resolve(fresh, None, later);
        assert_eq!(p.map(|p| p.pid), Some(std::process::id()));
        assert_eq!(r.table_reads, 2);
    }

    #[test]
    fn learnt_owner_and_bound() {
        let mut r = ProcessResolver::new("/proc", 2, Duration::from_secs(10));
        let now = Instant::now();
        let key = |port| SocketKey {
            netns: 1,
            local: SocketAddr::from(([10, 0, 0, 1], port)),
            remote: SocketAddr::from(([10, 0, 0, 2], 80)),
        };
        let me = ProcessInfo {
            pid: std::process::id(),
            comm: "x".into(),
        };
        r.learn(key(1), me.clone(), now);
        assert_eq!(r.resolve(key(1), None, now), Some(me.clone()));
        assert_eq!(r.scans, 0);
        r.learn(key(2), me.clone(), now);
        r.learn(key(3), me.clone(), now);
        assert!(r.cache.len() <= 2);
    }
}
