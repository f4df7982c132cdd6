//! Network fixtures: namespaces, veth links, nftables blackholes, servers
//! and connections inside a namespace, socket options and `TCP_INFO`.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use crate::util::{monotonic_ns, sh, sh_quiet, wait_until};

/// A network namespace, deleted (with every process still in it) on drop.
pub struct Netns {
    pub name: String,
}

/// The per-run suffix of every namespace name: `-p{pid}` of this test
/// process. Two runs on one host (two checkouts, CI beside a developer) never
/// share a namespace, so neither deletes the other's namespaces or kills its
/// processes; each guard removes exactly its own.
pub fn run_suffix() -> String {
    format!("-p{}", std::process::id())
}

/// Deletes namespaces of this harness (`ts*-p{pid}`) whose run is over (no
/// process `pid` any more): leftovers of a run that was killed before its
/// guards ran. Namespaces of live runs are left alone.
fn reap_stale_namespaces() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            let Some((_, pid)) = name.rsplit_once("-p") else {
                continue;
            };
            let stale = name.starts_with("ts")
                && !pid.is_empty()
                && pid.bytes().all(|b| b.is_ascii_digit())
                && !std::path::Path::new(&format!("/proc/{pid}")).exists();
            if stale {
                sh_quiet(&format!(
                    "ip netns pids {name} 2>/dev/null | xargs -r kill -9; ip netns del {name}"
                ));
            }
        }
    });
}

impl Netns {
    /// Creates namespace `{name}{run_suffix()}` (see [`run_suffix`]).
    pub fn new(name: &str) -> Self {
        reap_stale_namespaces();
        let name = format!("{name}{}", run_suffix());
        // A leftover of this very name (an earlier run with the same pid)
        // must not break this one.
        sh_quiet(&format!(
            "ip netns pids {name} 2>/dev/null | xargs -r kill -9; ip netns del {name}"
        ));
        sh(&format!("ip netns add {name}"));
        let ns = Netns { name };
        ns.exec("ip link set lo up");
        ns
    }

    /// Run a shell command inside the namespace.
    pub fn exec(&self, cmd: &str) -> String {
        sh(&format!(
            "ip netns exec {} sh -c '{}'",
            self.name,
            cmd.replace('\'', "'\\''")
        ))
    }

    /// Set a per-namespace sysctl (never the host's), e.g. `net.ipv4.tcp_retries2`.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.exec(&format!("echo {value} > {path}"));
        let got = self.exec(&format!("cat {path}"));
        assert_eq!(
            got.trim(),
            value,
            "sysctl {key} in netns {} did not stick",
            self.name
        );
    }

    /// The namespace's inode number (what the agent reports as `netns`).
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{}", self.name))
            .expect("netns file")
            .ino()
    }

    /// Run `f` on a thread that has entered this namespace; sockets created
    /// there stay in the namespace.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            let fd = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: valid fd; only this thread changes namespace.
            let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread panicked")
    }

    /// Adds `rule` to the `hook` (input, output) chain of the test table;
    /// the table goes with the returned guard.
    fn test_rule(&self, hook: &str, rule: &str) -> Blackhole<'_> {
        self.test_rule_at(hook, "add", rule)
    }

    /// `verb`: `add` (after the chain's rules) or `insert` (ahead of them).
    fn test_rule_at(&self, hook: &str, verb: &str, rule: &str) -> Blackhole<'_> {
        self.exec("nft add table inet tcpstall_test");
        self.exec(&format!(
            "nft add chain inet tcpstall_test {hook} {{ type filter hook {hook} priority 0 \\; policy accept \\; }}"
        ));
        self.exec(&format!("nft {verb} rule inet tcpstall_test {hook} {rule}"));
        Blackhole { ns: self }
    }

    /// Block all TCP traffic from `peer` arriving in this namespace.
    pub fn blackhole_from(&self, peer: Ipv4Addr) -> Blackhole<'_> {
        self.test_rule("input", &format!("ip saddr {peer} drop"))
    }

    /// Drop every packet this namespace sends to `peer` in its own output
    /// chain (what an egress NetworkPolicy or a host firewall change does
    /// to an established connection): the sender's transmit fails locally.
    pub fn drop_output_to(&self, peer: Ipv4Addr) -> Blackhole<'_> {
        self.output_rule(&format!("ip daddr {peer} drop"))
    }

    /// Adds an nftables `rule` to this namespace's output chain.
    pub fn output_rule(&self, rule: &str) -> Blackhole<'_> {
        self.test_rule("output", rule)
    }

    /// Reject every packet arriving in this namespace that matches `matcher`
    /// (an nftables match, e.g. `ip saddr 10.0.0.1`) with `reject` (e.g.
    /// `icmp type host-unreachable`): the sender gets an ICMP error.
    pub fn reject_input(&self, matcher: &str, reject: &str) -> Blackhole<'_> {
        self.test_rule("input", &format!("{matcher} reject with {reject}"))
    }

    /// As [`Netns::reject_input`], but ahead of the rules already in the test
    /// input chain (`nft insert`): one atomic change, so a packet meets
    /// either the old rules or this one, never neither. Turning a blackhole
    /// into a reset this way leaves no window in which a retransmission
    /// gets through and is acknowledged (removing the blackhole first did,
    /// under TCG, where an `nft` run takes longer than a short RTO).
    pub fn reject_input_first(&self, matcher: &str, reject: &str) -> Blackhole<'_> {
        self.test_rule_at(
            "input",
            "insert",
            &format!("{matcher} reject with {reject}"),
        )
    }

    /// A path-MTU black hole: drop every packet from `peer` longer than
    /// `bytes` arriving in this namespace, silently (no ICMP
    /// fragmentation-needed), as a router with a smaller MTU whose ICMP
    /// errors are filtered does.
    pub fn drop_larger_from(&self, peer: Ipv4Addr, bytes: u32) -> Blackhole<'_> {
        self.test_rule(
            "input",
            &format!("ip saddr {peer} meta length gt {bytes} drop"),
        )
    }

    /// Drop `percent` % of incoming TCP packets at random.
    pub fn random_loss(&self, percent: u32) {
        self.exec("nft add table inet tcpstall_loss");
        self.exec(
            "nft add chain inet tcpstall_loss input { type filter hook input priority 0 \\; policy accept \\; }",
        );
        self.exec(&format!(
            "nft add rule inet tcpstall_loss input \"meta l4proto tcp numgen random mod 100 < {percent} drop\""
        ));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        sh_quiet(&format!(
            "ip netns pids {0} 2>/dev/null | xargs -r kill -9; ip netns del {0}",
            self.name
        ));
    }
}

/// An nftables drop rule; removed on drop.
pub struct Blackhole<'a> {
    ns: &'a Netns,
}

impl Drop for Blackhole<'_> {
    fn drop(&mut self) {
        sh_quiet(&format!(
            "ip netns exec {} nft delete table inet tcpstall_test",
            self.ns.name
        ));
    }
}

/// A process living in a namespace (as a pod's pause container does), so
/// that tools reading a namespace through `/proc/<pid>/net` find one; killed
/// on drop.
pub struct Resident {
    child: std::process::Child,
}

impl Netns {
    /// Starts a `sleep` inside the namespace for as long as the guard lives.
    pub fn resident(&self) -> Resident {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name, "sleep", "3600"])
            .spawn()
            .unwrap_or_else(|e| panic!("ip netns exec {} sleep: {e}", self.name));
        // Until the exec, the child is still in the caller's namespace.
        let want = self.inode();
        let ns = format!("/proc/{}/ns/net", child.id());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            use std::os::unix::fs::MetadataExt;
            if std::fs::metadata(&ns).is_ok_and(|m| m.ino() == want) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the resident process never entered {}",
                self.name
            );
            thread::sleep(Duration::from_millis(20));
        }
        Resident { child }
    }
}

impl Drop for Resident {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two namespaces joined by a veth pair: `a` has 10.{net}.{sub}.1, `b` .2.
pub struct Link {
    pub a: Netns,
    pub b: Netns,
    pub a_ip: Ipv4Addr,
    pub b_ip: Ipv4Addr,
}

impl Link {
    /// `tag` must be unique per test (names are limited to 15 characters).
    pub fn new(tag: &str, subnet: u8) -> Self {
        let a = Netns::new(&format!("tsa-{tag}"));
        let b = Netns::new(&format!("tsb-{tag}"));
        let (a_ip, b_ip) = veth(
            &a,
            &b,
            tag,
            Ipv4Addr::new(10, 201, subnet, 1),
            Ipv4Addr::new(10, 201, subnet, 2),
        );
        // The veth goes away with its namespaces.
        Link { a, b, a_ip, b_ip }
    }
}

/// A listener in a namespace whose accepted connections are handled by `on_conn`.
pub fn listen_in(ns: &Netns, addr: SocketAddr) -> TcpListener {
    ns.run_in(move || TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")))
}

pub fn connect_in(ns: &Netns, addr: SocketAddr) -> TcpStream {
    ns.run_in(move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"))
    })
}

/// Set TCP_USER_TIMEOUT (ms) on a socket.
pub fn set_user_timeout(s: &TcpStream, ms: u32) {
    let v: libc::c_int = ms as libc::c_int;
    // SAFETY: valid fd and option buffer.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        r,
        0,
        "setsockopt TCP_USER_TIMEOUT: {}",
        std::io::Error::last_os_error()
    );
}

/// `TCP_RTO_MAX_MS` (include/uapi/linux/tcp.h, 6.15+).
pub const TCP_RTO_MAX_MS: libc::c_int = 44;

/// Set TCP_RTO_MAX_MS (ms) on a socket. False when the kernel has no such
/// option (`ENOPROTOOPT`, before 6.15); any other failure panics.
pub fn set_rto_max_ms(s: &TcpStream, ms: u32) -> bool {
    let v: libc::c_int = ms as libc::c_int;
    // SAFETY: valid fd and option buffer.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_RTO_MAX_MS,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let err = std::io::Error::last_os_error();
    if r != 0 && err.raw_os_error() == Some(libc::ENOPROTOOPT) {
        return false;
    }
    assert_eq!(r, 0, "setsockopt TCP_RTO_MAX_MS {ms}: {err}");
    true
}

/// Turn SO_KEEPALIVE on, with TCP_KEEPIDLE / TCP_KEEPINTVL (s) and
/// TCP_KEEPCNT where given (None: the namespace's sysctl).
pub fn set_keepalive(s: &TcpStream, idle_s: Option<u32>, intvl_s: Option<u32>, cnt: Option<u32>) {
    let set = |level: libc::c_int, opt: libc::c_int, v: u32, name: &str| {
        let v = v as libc::c_int;
        // SAFETY: valid fd and option buffer.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                level,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(
            r,
            0,
            "setsockopt {name}: {}",
            std::io::Error::last_os_error()
        );
    };
    for (opt, v, name) in [
        (libc::TCP_KEEPIDLE, idle_s, "TCP_KEEPIDLE"),
        (libc::TCP_KEEPINTVL, intvl_s, "TCP_KEEPINTVL"),
        (libc::TCP_KEEPCNT, cnt, "TCP_KEEPCNT"),
    ] {
        if let Some(v) = v {
            set(libc::IPPROTO_TCP, opt, v, name);
        }
    }
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1, "SO_KEEPALIVE");
}

/// Join two existing namespaces with a veth pair on 10.202.{subnet}.0/24;
/// returns (a's address, b's address). The veth dies with its namespaces.
pub fn veth_between(a: &Netns, b: &Netns, tag: &str, subnet: u8) -> (Ipv4Addr, Ipv4Addr) {
    veth(
        a,
        b,
        tag,
        Ipv4Addr::new(10, 202, subnet, 1),
        Ipv4Addr::new(10, 202, subnet, 2),
    )
}

/// A veth pair `va-{tag}` (in `a`, `a_ip`/24) <-> `vb-{tag}` (in `b`, `b_ip`/24).
fn veth(a: &Netns, b: &Netns, tag: &str, a_ip: Ipv4Addr, b_ip: Ipv4Addr) -> (Ipv4Addr, Ipv4Addr) {
    sh(&format!(
        "ip link add va-{tag} netns {} type veth peer name vb-{tag} netns {}",
        a.name, b.name
    ));
    a.exec(&format!(
        "ip addr add {a_ip}/24 dev va-{tag} && ip link set va-{tag} up"
    ));
    b.exec(&format!(
        "ip addr add {b_ip}/24 dev vb-{tag} && ip link set vb-{tag} up"
    ));
    (a_ip, b_ip)
}

/// An established connection from `link.a` to a server in `link.b` that reads
/// and discards everything (S1/S2 building block).
pub struct Conn {
    pub client: TcpStream,
    pub local: SocketAddr,
    pub server: SocketAddr,
}

impl Conn {
    /// Connect to a fresh reading server on `port` in `link.b`, optionally set
    /// TCP_USER_TIMEOUT, and exchange a first acknowledged write.
    pub fn establish(link: &Link, port: u16, user_timeout_ms: Option<u32>) -> Conn {
        Self::establish_to(link, SocketAddr::from((link.b_ip, port)), user_timeout_ms)
    }

    /// As [`Conn::establish`], to `server` (an address of `link.b`, e.g.
    /// its IPv6 one).
    pub fn establish_to(link: &Link, server: SocketAddr, user_timeout_ms: Option<u32>) -> Conn {
        // Longer than any horizon a test waits for: the server must not
        // close first (its FIN is not blackholed and would end the stall).
        drop(drain_server_in(
            &link.b,
            server,
            Duration::from_secs(300),
            None,
        ));
        let mut client = connect_in(&link.a, server);
        if let Some(ms) = user_timeout_ms {
            set_user_timeout(&client, ms);
        }
        let local = client.local_addr().expect("local addr");
        std::io::Write::write_all(&mut client, b"hello").expect("first write");
        wait_all_acked(&client, 5, Duration::from_secs(10));
        Conn {
            client,
            local,
            server,
        }
    }

    /// Write unacknowledged data (the peer must be blackholed by now) and
    /// wait on a thread for the kernel to kill the socket. Returns the write
    /// instant and the thread, which yields (death instant, errno).
    pub fn write_and_await_death(
        mut self,
        wait: Duration,
    ) -> (u64, thread::JoinHandle<(u64, Option<i32>)>) {
        let t_write = monotonic_ns();
        std::io::Write::write_all(&mut self.client, &[b'x'; 1000])
            .expect("write into the blackhole");
        (t_write, await_read_error(self.client, wait))
    }
}

/// A thread blocked in `read()` on `s` (at most `wait`) until the kernel
/// fails the socket; yields (the instant `read()` returned, its errno).
pub fn await_read_error(
    mut s: TcpStream,
    wait: Duration,
) -> thread::JoinHandle<(u64, Option<i32>)> {
    thread::spawn(move || {
        s.set_read_timeout(Some(wait)).expect("timeout");
        let mut buf = [0u8; 16];
        let err = std::io::Read::read(&mut s, &mut buf).expect_err("read must fail");
        (monotonic_ns(), err.raw_os_error())
    })
}

/// `TCP_INFO` of a socket.
pub fn tcp_info(s: &TcpStream) -> libc::tcp_info {
    // SAFETY: tcp_info is plain data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd, buffer and length.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(
        r,
        0,
        "getsockopt TCP_INFO: {}",
        std::io::Error::last_os_error()
    );
    info
}

/// Waits until the peer has acknowledged everything written on `s` (no
/// segment unacknowledged, at least `written` data bytes acknowledged): the
/// kernel's own record, not a guess of how long an ACK takes (under TCG a
/// round trip can take far longer than on the host).
pub fn wait_all_acked(s: &TcpStream, written: u64, timeout: Duration) {
    wait_until(
        timeout,
        Duration::from_millis(5),
        &format!("{written} bytes not acknowledged"),
        || {
            let info = tcp_info(s);
            // bytes_acked counts the SYN too: > written means every data byte.
            if info.tcpi_unacked == 0 && info.tcpi_bytes_acked > written {
                return Ok(());
            }
            Err(format!(
                "unacked segments {}, bytes acked {}",
                info.tcpi_unacked, info.tcpi_bytes_acked
            ))
        },
    )
}

// ---------------------------------------------------------------------------
// Socket sweep helpers.

/// Add IPv6 addresses `fd00:201:{subnet}::1` (a) / `::2` (b) to a [`Link`]'s
/// veth pair (no duplicate address detection delay); returns them.
pub fn link_ipv6(link: &Link, tag: &str, subnet: u8) -> (std::net::Ipv6Addr, std::net::Ipv6Addr) {
    let a: std::net::Ipv6Addr = format!("fd00:201:{subnet}::1").parse().expect("v6");
    let b: std::net::Ipv6Addr = format!("fd00:201:{subnet}::2").parse().expect("v6");
    link.a
        .exec(&format!("ip -6 addr add {a}/64 dev va-{tag} nodad"));
    link.b
        .exec(&format!("ip -6 addr add {b}/64 dev vb-{tag} nodad"));
    (a, b)
}

/// Block all TCP traffic from the IPv6 `peer` arriving in `ns` (removed with
/// the returned guard, like [`Netns::blackhole_from`]).
pub fn blackhole6_from(ns: &Netns, peer: std::net::Ipv6Addr) -> Blackhole<'_> {
    ns.test_rule("input", &format!("ip6 saddr {peer} drop"))
}

/// A server in `ns` at `addr` that accepts every connection and reads and
/// discards everything on each (one thread per connection); runs until the
/// namespace goes away.
pub fn reading_server_in(ns: &Netns, addr: SocketAddr) {
    let listener = listen_in(ns, addr);
    thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { break };
            thread::spawn(move || drain(&mut s, Duration::from_secs(300)));
        }
    });
}

/// Reads and discards everything from `s` until EOF, a read error, or
/// `idle` without data (a blackholed peer's death is never seen, so the
/// timeout ends the reader; it must outlast any stall the test waits for,
/// or the reader's close sends a FIN that the blackhole does not stop).
/// Returns the number of bytes read.
pub fn drain(s: &mut TcpStream, idle: Duration) -> u64 {
    s.set_read_timeout(Some(idle)).expect("set read timeout");
    let mut buf = vec![0u8; 65536];
    let mut total = 0u64;
    while let Ok(n) = std::io::Read::read(s, &mut buf) {
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    total
}

/// A server in `ns` at `addr` for one connection: accepts it, waits until
/// `gate` (if any) receives or is dropped -- the receiver's window closes
/// meanwhile -- then [`drain`]s it with the `idle` timeout. The thread
/// yields the number of bytes read; drop the handle to leave it detached.
pub fn drain_server_in(
    ns: &Netns,
    addr: SocketAddr,
    idle: Duration,
    gate: Option<std::sync::mpsc::Receiver<()>>,
) -> thread::JoinHandle<u64> {
    let listener = listen_in(ns, addr);
    thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        if let Some(gate) = gate {
            let _ = gate.recv();
        }
        drain(&mut s, idle)
    })
}

/// A server on `addr` in `ns` that accepts one connection and never reads
/// it (its window closes once the client fills it), holding it open until
/// the returned sender is used or dropped.
pub fn non_reading_server_in(ns: &Netns, addr: SocketAddr) -> std::sync::mpsc::Sender<()> {
    let listener = listen_in(ns, addr);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    thread::spawn(move || {
        let (s, _) = listener.accept().expect("accept");
        let _ = rx.recv();
        drop(s);
    });
    tx
}

/// Writes 64 KiB chunks to `s` without blocking until the kernel refuses
/// more (`WouldBlock`: the send buffer is full, e.g. behind a closed
/// receive window), then puts `s` back in blocking mode. Returns the bytes
/// written; fails when the buffer is still not full after 10 s.
pub fn fill_send_buffer(s: &TcpStream) -> u64 {
    use std::io::{ErrorKind, Write};
    s.set_nonblocking(true).expect("nonblocking");
    let chunk = [b'z'; 65536];
    let mut sent = 0u64;
    let mut w = s;
    let t0 = Instant::now();
    loop {
        match w.write(&chunk) {
            Ok(n) => sent += n as u64,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("write: {e}"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "send buffer never filled"
        );
    }
    s.set_nonblocking(false).expect("blocking");
    sent
}

/// Per-socket options of [`spawn_connect_in`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnectOpts {
    /// TCP_SYNCNT.
    pub syncnt: Option<u32>,
    /// TCP_USER_TIMEOUT (ms).
    pub user_timeout_ms: Option<u32>,
}

/// A blocking `connect()` from `local` (bound first, so the test knows the
/// socket's address before the handshake) to `remote`, on a thread inside
/// `ns`. The thread yields (the instant `connect()` was called, the instant
/// it returned, its errno: None on success).
pub fn spawn_connect_in(
    ns: &Netns,
    local: SocketAddr,
    remote: SocketAddr,
    opts: ConnectOpts,
) -> thread::JoinHandle<(u64, u64, Option<i32>)> {
    let path = format!("/run/netns/{}", ns.name);
    thread::spawn(move || {
        let fd = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: valid fd; only this thread changes namespace.
        let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        let (SocketAddr::V4(l), SocketAddr::V4(rm)) = (local, remote) else {
            panic!("spawn_connect_in: IPv4 only ({local} -> {remote})");
        };
        // SAFETY: plain socket calls on a descriptor this thread owns; every
        // buffer is a valid local of the right size.
        unsafe {
            let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(s >= 0, "socket: {}", std::io::Error::last_os_error());
            let set = |opt: libc::c_int, v: u32| {
                let v = v as libc::c_int;
                let r = libc::setsockopt(
                    s,
                    libc::IPPROTO_TCP,
                    opt,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
                assert_eq!(
                    r,
                    0,
                    "setsockopt {opt}: {}",
                    std::io::Error::last_os_error()
                );
            };
            if let Some(n) = opts.syncnt {
                set(libc::TCP_SYNCNT, n);
            }
            if let Some(ms) = opts.user_timeout_ms {
                set(libc::TCP_USER_TIMEOUT, ms);
            }
            let sin = |a: std::net::SocketAddrV4| libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let la = sin(l);
            let r = libc::bind(s, (&la as *const libc::sockaddr_in).cast(), len);
            assert_eq!(r, 0, "bind {local}: {}", std::io::Error::last_os_error());
            let ra = sin(rm);
            let start = monotonic_ns();
            let r = libc::connect(s, (&ra as *const libc::sockaddr_in).cast(), len);
            let end = monotonic_ns();
            let errno =
                (r != 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            libc::close(s);
            (start, end, errno)
        }
    })
}

/// An integer socket option (`getsockopt`).
pub fn sockopt_int(s: &impl AsRawFd, level: libc::c_int, opt: libc::c_int) -> i32 {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid fd, buffer and length.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(
        r,
        0,
        "getsockopt {level}/{opt}: {}",
        std::io::Error::last_os_error()
    );
    v
}

/// SO_LINGER {on, 0}: close resets the connection and frees the socket at
/// once (nothing left orphaned to retransmit into a blackhole).
pub fn set_linger_zero(s: &impl AsRawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and option buffer.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

/// TCP_LINGER2 `secs`: how long the socket, once orphaned in FIN_WAIT2,
/// waits for the peer's FIN (instead of the namespace's tcp_fin_timeout).
pub fn set_tcp_linger2(s: &impl AsRawFd, secs: libc::c_int) {
    // SAFETY: a valid fd, option and length.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_LINGER2,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "TCP_LINGER2: {}", std::io::Error::last_os_error());
}

/// A connection from inside `ns` to `addr` whose socket got
/// TCP_USER_TIMEOUT `user_timeout_ms` before `connect()` (what an
/// application that sets its own does), and SO_LINGER {on, 0}.
pub fn connect_with_user_timeout_in(
    ns: &Netns,
    addr: SocketAddr,
    user_timeout_ms: u32,
) -> TcpStream {
    use std::os::fd::FromRawFd as _;
    let SocketAddr::V4(a) = addr else {
        panic!("connect_with_user_timeout_in: IPv4 only ({addr})");
    };
    ns.run_in(move || {
        // SAFETY: a fresh descriptor this thread owns, handed to TcpStream
        // at once (closed on drop); every buffer is a valid local.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let s = TcpStream::from_raw_fd(fd);
            set_user_timeout(&s, user_timeout_ms);
            set_linger_zero(&s);
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            let r = libc::connect(
                fd,
                (&sin as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            assert_eq!(r, 0, "connect {addr}: {}", std::io::Error::last_os_error());
            s
        }
    })
}
