//! Behavioural harness of the kernel programs: trigger one socket action,
//! expect exactly these event fields. Included by `scenarios.rs` so the same
//! tests run on the host and, by name (`programs::...`), in the QEMU guests.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::PathBuf,
    process::Command,
    thread,
    time::Duration,
};

use serde_json::Value;
use tcpstall_tests::*;

/// The cgroup2 mount point (`/sys/fs/cgroup` in unified mode,
/// `/sys/fs/cgroup/unified` in hybrid mode); fails when there is none.
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("/proc/self/mounts");
    let root = mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    });
    require(
        root.is_some(),
        "a cgroup2 mount",
        "mount -t cgroup2 none /sys/fs/cgroup/unified",
    );
    root.expect("checked")
}

/// A cgroup directory made for one test; removed on drop.
struct TestCgroup {
    dir: PathBuf,
}

impl TestCgroup {
    fn new(name: &str) -> Self {
        let dir = cgroup2_root().join(name);
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        TestCgroup { dir }
    }
    fn inode(&self) -> u64 {
        std::fs::metadata(&self.dir).expect("cgroup dir").ino()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Its only process (the child below) has exited by now.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The cgroup2 path of this process (`0::/path` in /proc/self/cgroup).
fn own_cgroup_inode(root: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("no cgroup2 line (0::) in /proc/self/cgroup");
    let dir = root.join(rel.trim_start_matches('/'));
    std::fs::metadata(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .ino()
}

/// State events of sockets with this 4-tuple (either end).
fn state_events(agent: &Agent, local: SocketAddr, remote: SocketAddr) -> Vec<Value> {
    agent
        .events()
        .into_iter()
        .filter(|e| {
            ev_str(e, "kind") == "state"
                && ev_str(e, "local") == local.to_string()
                && ev_str(e, "remote") == remote.to_string()
        })
        .collect()
}

/// `cgroup_id` is the cgroup v2 id of the cgroup the socket was created in:
/// the inode number of that cgroup's directory on the cgroup2 mount. A
/// child process moves itself into a fresh cgroup and connects over
/// loopback; its socket must carry that cgroup's inode, and the accepted
/// socket (cloned from our listener) the inode of our own cgroup.
#[test]
fn cgroup_id_is_the_sockets_cgroup_inode() {
    require_root();
    let root = cgroup2_root();
    let cg = TestCgroup::new(&format!("tcpstall-test-{}", std::process::id()));
    let want_child = cg.inode();
    let want_self = own_cgroup_inode(&root);
    assert_ne!(want_child, want_self);
    let mut agent = Agent::start(&[]);

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let server = listener.local_addr().expect("addr");
    let procs = cg.dir.join("cgroup.procs");
    let procs_c = std::ffi::CString::new(procs.to_string_lossy().as_bytes()).expect("path");
    let port = server.port();
    let mut cmd = Command::new("sleep");
    cmd.arg("3");
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs_c.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            // Created after the move: the socket belongs to the new cgroup.
            // Not close-on-exec: `sleep` keeps the connection open.
            let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if s < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
                },
                sin_zero: [0; 8],
            };
            if libc::connect(
                s,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn the connecting child");
    let (mut accepted, client) = listener.accept().expect("accept");
    accepted.write_all(b"x").expect("write");
    let _ = accepted.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = accepted.read(&mut [0u8; 1]);

    let established = |local: SocketAddr, remote: SocketAddr, what: &str| -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = state_events(&agent, local, remote)
                .into_iter()
                .find(|e| ev_str(e, "state") == "ESTABLISHED")
            {
                return e;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no ESTABLISHED state event for the {what} socket {local} -> {remote}; events: {:?}",
                agent.events()
            );
            thread::sleep(Duration::from_millis(50));
        }
    };
    let c = established(client, server, "client");
    let s = established(server, client, "accepted");
    let _ = child.kill();
    let _ = child.wait();
    agent.stop();
    assert_eq!(
        ev_u64(&c, "cgroup_id"),
        want_child,
        "client socket: cgroup_id must be the inode of {} ({c})",
        cg.dir.display()
    );
    assert_eq!(
        ev_u64(&s, "cgroup_id"),
        want_self,
        "accepted socket: cgroup_id must be the inode of this process's cgroup ({s})"
    );
}

/// `ca_state` is `icsk_ca_state`: once the retransmit timer has fired on a
/// blackholed flow the socket is in TCP_CA_Loss (4), and every retransmit
/// event taken after the first RTO (`retransmits >= 1`) must say so.
#[test]
fn retransmit_events_carry_ca_state_loss_after_an_rto() {
    require_tools();
    let link = Link::new("pca", 61);
    let mut agent = Agent::start(&[]);
    let conn = Conn::establish(&link, 8080, None);
    let (local, server) = (conn.local, conn.server);
    let _hole = link.b.blackhole_from(link.a_ip);
    let (_, _death) = conn.write_and_await_death(Duration::from_secs(60));
    let after_rto = |agent: &Agent| -> Vec<Value> {
        agent
            .events()
            .into_iter()
            .filter(|e| {
                ev_str(e, "kind") == "retransmit"
                    && ev_str(e, "local") == local.to_string()
                    && ev_str(e, "remote") == server.to_string()
                    && ev_u64(e, "retransmits") >= 1
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let seen = loop {
        let seen = after_rto(&agent);
        if seen.len() >= 2 {
            break seen;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "fewer than two retransmit events after an RTO for {local} -> {server}: {:?}",
            agent.events()
        );
        thread::sleep(Duration::from_millis(100));
    };
    agent.stop();
    for e in &seen {
        assert_eq!(ev_u64(e, "ca_state"), 4, "TCP_CA_Loss expected: {e}");
    }
}
