//! Which process holds a socket: pid and command, for stalled flows only.
//!
//! Method (no kernel support needed): the socket's inode from the kernel's
//! `/proc/<pid>/net/tcp{,6}` of a process in the socket's network namespace
//! (matching the 4-tuple), then `socket:[inode]` among `/proc/*/fd/*`.
//! Processes of the socket's cgroup (`cgroup.procs`) are tried first, which
//! finds a container's socket without scanning the node. Reading other
//! processes' `ns` and `fd` entries needs CAP_SYS_PTRACE.
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

pub struct ProcessResolver {
    proc_root: PathBuf,
    cache: HashMap<SocketKey, Cached>,
    max_entries: usize,
    retry_after: Duration,
    /// Full /proc scans done (for tests and logs).
    pub scans: u64,
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
            scans: 0,
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
        let found = self.find(key, cgroup_dir);
        self.insert(key, found.clone(), now);
        found
    }

    fn comm(&self, pid: u32) -> String {
        fs::read_to_string(self.proc_root.join(pid.to_string()).join("comm"))
            .map(|s| s.trim_end().to_owned())
            .unwrap_or_default()
    }

    /// The socket's inode as seen from `pid`'s network namespace.
    fn inode_via(&self, pid: u32, key: SocketKey) -> Option<u64> {
        let dir = self.proc_root.join(pid.to_string());
        if key.netns != 0 && netns_of(&dir)? != key.netns {
            return None;
        }
        ["net/tcp", "net/tcp6"].iter().find_map(|t| {
            fs::read_to_string(dir.join(t))
                .ok()
                .and_then(|text| find_inode(&text, key.local, key.remote))
        })
    }

    fn holds(&self, pid: u32, target: &str) -> bool {
        let Ok(fds) = fs::read_dir(self.proc_root.join(pid.to_string()).join("fd")) else {
            return false;
        };
        fds.flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target))
    }

    fn find(&mut self, key: SocketKey, cgroup_dir: Option<&Path>) -> Option<ProcessInfo> {
        // 1. The socket's cgroup: usually the owner itself.
        if let Some(procs) =
            cgroup_dir.and_then(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
        {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                if let Some(inode) = self.inode_via(pid, key)
                    && self.holds(pid, &format!("socket:[{inode}]"))
                {
                    return Some(ProcessInfo {
                        pid,
                        comm: self.comm(pid),
                    });
                }
            }
        }
        // 2. Every process: the inode from any process in the netns, then
        // the first process holding it.
        self.scans += 1;
        let all = pids(&self.proc_root);
        let inode = all.iter().find_map(|&pid| self.inode_via(pid, key))?;
        let target = format!("socket:[{inode}]");
        let pid = all.into_iter().find(|&pid| self.holds(pid, &target))?;
        Some(ProcessInfo {
            pid,
            comm: self.comm(pid),
        })
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
