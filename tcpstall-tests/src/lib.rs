//! Harness for the privileged scenario tests: network namespaces joined by
//! veth pairs, nftables blackholes, sockets created inside a namespace, and the
//! real agent as a child process. Every resource is owned by a guard that
//! removes it on drop, also when a test fails.
//!
//! Prerequisites are checked loudly: a missing one fails the test with a line
//! naming it and the fix; nothing is skipped.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// Fail (never skip) when a prerequisite is missing.
pub fn require(cond: bool, what: &str, fix: &str) {
    assert!(cond, "prerequisite missing: {what}. Fix: {fix}");
}

pub fn require_root() {
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    require(
        euid == 0,
        "root (BPF, network namespaces)",
        "run as root via `cargo xtask test`",
    );
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn require_tools() {
    require_root();
    require(have("ip"), "the `ip` command", "apt-get install iproute2");
    require(have("nft"), "the `nft` command", "apt-get install nftables");
}

/// Runs `cmd` and returns its stdout; fails the test naming `what`, the
/// exit status and stderr unless it succeeds.
pub fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a shell command, panicking with its stderr on failure.
pub fn sh(cmd: &str) -> String {
    run_ok(Command::new("sh").args(["-c", cmd]), &format!("`{cmd}`"))
}

/// Like [`sh`] but ignores failure (cleanup paths).
pub fn sh_quiet(cmd: &str) {
    let _ = Command::new("sh")
        .args(["-c", cmd])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

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

    /// Block all TCP traffic from `peer` arriving in this namespace.
    pub fn blackhole_from(&self, peer: Ipv4Addr) -> Blackhole<'_> {
        self.exec("nft add table inet tcpstall_test");
        self.exec(
            "nft add chain inet tcpstall_test input { type filter hook input priority 0 \\; policy accept \\; }",
        );
        self.exec(&format!(
            "nft add rule inet tcpstall_test input ip saddr {peer} drop"
        ));
        Blackhole { ns: self }
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

/// The environment variable naming the agent binary under test (set by
/// `cargo xtask test`; its own name: `TCPSTALL_AGENT` is `tcpstall top
/// --agent`, the URL of an agent).
pub const AGENT_BIN_ENV: &str = "TCPSTALL_AGENT_BIN";

/// Path of the agent binary under test (`cargo xtask test` sets it).
pub fn agent_path() -> PathBuf {
    let p = std::env::var_os(AGENT_BIN_ENV).map(PathBuf::from);
    require(
        p.as_ref().is_some_and(|p| p.exists()),
        "TCPSTALL_AGENT_BIN (path of a built tcpstall binary)",
        "run the tests through `cargo xtask test`",
    );
    p.expect("checked")
}

/// The running agent; SIGTERM + wait on drop (SIGKILL after 10 s).
pub struct Agent {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<Value>>>,
    pub listen: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl Agent {
    /// Start `tcpstall run` with JSON logs and `--log-events` plus `extra` args,
    /// and wait until it reports that it is running. It listens on an
    /// ephemeral loopback port (no clash with anything else on the machine);
    /// `listen` is the address it reported.
    pub fn start(extra: &[&str]) -> Self {
        Self::spawn(Command::new(agent_path()), extra)
    }

    /// Spawns `cmd` (which runs `tcpstall`; arguments `run --log-format json
    /// --log-events --listen 127.0.0.1:0` and `extra` are appended), follows
    /// its output and waits for the start line.
    fn spawn(mut cmd: Command, extra: &[&str]) -> Self {
        let requested: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let program = cmd.get_program().to_string_lossy().into_owned();
        let mut child = cmd
            .args([
                "run",
                "--log-format",
                "json",
                "--log-events",
                "--listen",
                &requested.to_string(),
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program} (the agent): {e}"));
        // Logs (JSON, one object a line) come on stderr, as for every
        // command; stdout carries nothing in `run`.
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("stdout");
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("agent stdout: {line}");
            }
        });
        let err = child.stderr.take().expect("stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let esink = stderr.clone();
        let sink = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                // What a failure message quotes: warnings, errors and
                // anything that is not a log line (the exit error).
                let quoted = match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        let loud = v["level"] == "WARN" || v["level"] == "ERROR";
                        sink.lock().expect("lock").push(v);
                        loud
                    }
                    Err(_) => {
                        eprintln!("agent (non-JSON): {line}");
                        true
                    }
                };
                if quoted {
                    esink.lock().expect("lock").push_str(&(line + "\n"));
                }
            }
        });
        let mut agent = Agent {
            child: Some(child),
            lines,
            listen: requested,
            stderr,
        };
        let running = agent.wait_log(Duration::from_secs(60), "agent start", |v| {
            v["message"] == "tcpstall running"
        });
        agent.listen = ev_str(&running, "listen").parse().unwrap_or_else(|e| {
            panic!("agent start line without its listen address ({e}): {running}")
        });
        assert_ne!(agent.listen.port(), 0, "{running}");
        eprintln!("AGENT sweep program: {}", ev_str(&running, "sweep"));
        agent
    }

    /// Every JSON log line so far.
    pub fn logs(&self) -> Vec<Value> {
        self.lines.lock().expect("lock").clone()
    }

    /// Kernel events logged so far (`--log-events`).
    pub fn events(&self) -> Vec<Value> {
        self.logs()
            .into_iter()
            .filter(|v| v["message"] == "event")
            .collect()
    }

    /// Wait until a log line satisfies `pred`, failing with context on timeout
    /// or when the agent exits.
    pub fn wait_log(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.lines.lock().expect("lock").iter().find(|v| pred(v)) {
                return v.clone();
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                thread::sleep(Duration::from_millis(200));
                panic!(
                    "agent exited ({status}) while waiting for {what}; stderr:\n{}",
                    self.stderr.lock().expect("lock")
                );
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET a path from the agent's HTTP server.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.listen, path)
    }

    /// Stop with SIGTERM and return the final log lines (the shutdown summary);
    /// fails when the agent does not exit cleanly within 10 s.
    pub fn stop(&mut self) -> Vec<Value> {
        if let Some(child) = self.child.take() {
            match terminate(child) {
                Ok(status) => assert!(status.success(), "agent exited with {status} after SIGTERM"),
                Err(()) => panic!("agent did not stop within 10 s of SIGTERM"),
            }
            thread::sleep(Duration::from_millis(200));
        }
        self.logs()
    }
}

/// SIGTERM, wait up to 10 s, then SIGKILL (`Err`).
fn terminate(mut child: Child) -> Result<std::process::ExitStatus, ()> {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(status);
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(())
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let _ = terminate(child);
        }
    }
}

/// Minimal HTTP/1.1 GET over loopback (no client dependency needed).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read response");
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Field accessors for event JSON lines.
pub fn ev_str<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("")
}

pub fn ev_u64(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// Polls `probe` every `every` until it returns `Ok`, and returns that
/// value. `Err` carries what the probe saw; once `timeout` has passed, the
/// test fails with `what` (the failure, e.g. "the pane never showed the
/// row"), the timeout and the last thing seen. The deadline only bounds a
/// wait for an invariant; it is never what a test asserts.
pub fn wait_until<T, E: std::fmt::Display>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what} (waited {timeout:?}); last seen: {last}")
            }
            Err(_) => thread::sleep(every),
        }
    }
}

/// CLOCK_MONOTONIC in ns: the clock of the kernel's event timestamps and of
/// the agent's `predicted_timeout_ns`. The same as the agent's
/// `tcpstall::kernel::facts::monotonic_ns` on purpose: this harness library cannot
/// depend on the agent (it is only a dev-dependency, for `tests/replay.rs`;
/// a normal dependency would build the eBPF object into every harness
/// build), and the tests check the agent's timestamps against a clock read
/// that is not the agent's own code.
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
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

impl Agent {
    /// Currently stalled flows from `GET /api/v1/stalls`.
    pub fn stalls(&self) -> Vec<Value> {
        let (status, body) = self.http_get("/api/v1/stalls");
        assert_eq!(status, 200, "GET /api/v1/stalls: {body}");
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("stalls JSON: {e}: {body}"));
        v["stalls"].as_array().cloned().unwrap_or_default()
    }

    /// The stall entry of one flow, if it is stalled now.
    pub fn stall_of(&self, local: SocketAddr, remote: SocketAddr) -> Option<Value> {
        self.stalls().into_iter().find(|s| {
            ev_str(s, "local") == local.to_string() && ev_str(s, "remote") == remote.to_string()
        })
    }

    /// The /metrics text.
    pub fn metrics(&self) -> String {
        let (status, body) = self.http_get("/metrics");
        assert_eq!(status, 200, "GET /metrics: {body}");
        body
    }
}

/// Sum of the samples of metric `name` whose labels include every `(k, v)`
/// in `labels` (Prometheus text or OpenMetrics exposition). None if absent.
pub fn metric_sum(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in exposition.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let ok = labels
            .iter()
            .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
        if ok && let Ok(x) = value.parse::<f64>() {
            *found.get_or_insert(0.0) += x;
        }
    }
    found
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
        let server = SocketAddr::from((link.b_ip, port));
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
        let reader = thread::spawn(move || {
            self.client.set_read_timeout(Some(wait)).expect("timeout");
            let mut buf = [0u8; 16];
            let err = std::io::Read::read(&mut self.client, &mut buf).expect_err("read must fail");
            (monotonic_ns(), err.raw_os_error())
        });
        (t_write, reader)
    }
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
    ns.exec("nft add table inet tcpstall_test");
    ns.exec(
        "nft add chain inet tcpstall_test input { type filter hook input priority 0 \\; policy accept \\; }",
    );
    ns.exec(&format!(
        "nft add rule inet tcpstall_test input ip6 saddr {peer} drop"
    ));
    Blackhole { ns }
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

impl Agent {
    /// Poll `GET /readyz` until 200; returns the monotonic instant it turned
    /// ready.
    pub fn wait_ready(&self, timeout: Duration) -> u64 {
        wait_until(
            timeout,
            Duration::from_millis(20),
            "/readyz not 200",
            || match self.http_get("/readyz") {
                (200, _) => Ok(monotonic_ns()),
                (status, body) => Err(format!("{status} {body}")),
            },
        )
    }

    /// `GET /api/v1/risks` as JSON.
    pub fn risks(&self) -> Value {
        let (status, body) = self.http_get("/api/v1/risks");
        assert_eq!(status, 200, "GET /api/v1/risks: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("risks JSON: {e}: {body}"))
    }
}

/// Expands Grafana's template variables in a dashboard query so Prometheus
/// (or a parser) can take it: the interval variables (`$__rate_interval`,
/// `$__interval`, `$__range`, also as `${...}`) become `range`; a variable
/// listed in `vars` its value; any other `$name` / `${name}` becomes `all`
/// (a dashboard variable's "All" value, e.g. `.*`).
pub fn grafana_expand(expr: &str, vars: &[(&str, &str)], all: &str, range: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(p) = rest.find('$') {
        out.push_str(&rest[..p]);
        let after = &rest[p + 1..];
        let (name, tail) = if let Some(inner) = after.strip_prefix('{') {
            match inner.find('}') {
                Some(e) => (&inner[..e], &inner[e + 1..]),
                None => (inner, ""),
            }
        } else {
            let e = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..e], &after[e..])
        };
        if name.is_empty() {
            out.push('$');
        } else if name.starts_with("__") {
            out.push_str(range);
        } else if let Some((_, v)) = vars.iter().find(|(k, _)| *k == name) {
            out.push_str(v);
        } else {
            out.push_str(all);
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}

impl Agent {
    /// Like [`Agent::start`], but the agent is started through `prefix`
    /// (e.g. `setpriv --bounding-set ... --`), which runs `tcpstall` itself.
    pub fn start_via(prefix: &[String], extra: &[&str]) -> Self {
        let (cmd, pre_args) = prefix.split_first().expect("a wrapper command");
        let mut c = Command::new(cmd);
        c.args(pre_args).arg(agent_path());
        Self::spawn(c, extra)
    }

    /// The agent's pid (while running).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// `setpriv` arguments that run a program as uid 0 with exactly `caps`
/// (capability names as in a Kubernetes manifest, e.g. `NET_ADMIN`) in its
/// bounding, inheritable and ambient sets, and no_new_privs (as
/// `allowPrivilegeEscalation: false`). Ends with `--`.
pub fn setpriv_exactly(caps: &[String]) -> Vec<String> {
    let list: String = caps
        .iter()
        .map(|c| format!(",+{}", c.to_ascii_lowercase()))
        .collect();
    let set = format!("-all{list}");
    [
        "setpriv",
        "--no-new-privs",
        "--bounding-set",
        &set,
        "--inh-caps",
        &set,
        "--ambient-caps",
        &set,
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The probe plan's choices from `tcpstall doctor --json`: (probe, chosen
/// mechanism or `NONE`), in plan order.
pub fn plan_chosen(plan: &Value) -> Vec<(String, String)> {
    plan["probes"]
        .as_array()
        .unwrap_or_else(|| panic!("doctor JSON without probes: {plan}"))
        .iter()
        .map(|p| {
            (
                p["probe"].as_str().unwrap_or("?").to_owned(),
                p["chosen"].as_str().unwrap_or("NONE").to_owned(),
            )
        })
        .collect()
}

/// Checks the output of one `kubernetes-validate --strict` run over the
/// resources `(kind, name)`: each passed, except kinds in `crd_kinds`, which
/// the tool must report as schema-less (a CRD, validated by its operator at
/// apply time), and no other warning or error. `what` names the input in
/// failure messages.
pub fn assert_kubernetes_validate(
    out: &str,
    resources: &[(String, String)],
    crd_kinds: &[&str],
    what: &str,
) {
    for (kind, name) in resources {
        if crd_kinds.contains(&kind.as_str()) {
            assert!(
                out.contains(&format!("Couldn't find schema for kind {kind}")),
                "{what}: expected kubernetes-validate to report {kind} as schema-less:\n{out}"
            );
        } else {
            assert!(
                out.contains(&format!(
                    "passed for resource {}/{name} ",
                    kind.to_lowercase()
                )),
                "{what}: {kind}/{name} did not pass kubernetes-validate --strict:\n{out}"
            );
        }
    }
    for line in out
        .lines()
        .filter(|l| l.starts_with("WARN") || l.starts_with("ERROR"))
    {
        assert!(
            crd_kinds
                .iter()
                .any(|k| line.contains(&format!("Couldn't find schema for kind {k} "))),
            "{what}: unexpected kubernetes-validate diagnostic: {line}"
        );
    }
}

impl Agent {
    /// The socket cookie of the flow `local` -> `remote` from the agent's
    /// event log (`--log-events`), once any event of it was logged.
    pub fn cookie_of(&self, local: SocketAddr, remote: SocketAddr) -> Option<u64> {
        self.events()
            .iter()
            .filter(|e| {
                ev_str(e, "local") == local.to_string() && ev_str(e, "remote") == remote.to_string()
            })
            .map(|e| ev_u64(e, "cookie"))
            .find(|&c| c != 0)
    }

    /// Waits until the agent has flagged the flow `local` -> `remote` as
    /// stalled and has logged its write-timer expiry with `backoff >=
    /// min_backoff` (the caller keeps the peer blackholed meanwhile).
    pub fn wait_stalled_to_backoff(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        min_backoff: u64,
    ) {
        self.wait_log(Duration::from_secs(15), "the stall flagged", |v| {
            v["message"] == "stall started" && ev_str(v, "remote") == remote.to_string()
        });
        self.wait_log(
            Duration::from_secs(15),
            &format!("an RTO expiry at backoff {min_backoff}"),
            |v| {
                v["message"] == "event"
                    && ev_str(v, "kind") == "write_timer"
                    && ev_str(v, "local") == local.to_string()
                    && ev_u64(v, "backoff") >= min_backoff
            },
        );
    }

    /// Waits for the agent's own record of the flow's death: its
    /// `socket timed out (ETIMEDOUT)` line for socket `cookie`.
    pub fn wait_timeout_of(&mut self, cookie: u64, timeout: Duration) -> Value {
        self.wait_log(timeout, "the flow's ETIMEDOUT line", |v| {
            v["message"] == "socket timed out (ETIMEDOUT)" && ev_u64(v, "cookie") == cookie
        })
    }
}

/// One event's socket state on one line, for diagnostic output (a flow's
/// events, the gap reports): kind, timestamp (ns), cookie, the timer and
/// retransmission fields, the write-timer mechanism and the TCP state.
pub fn fmt_event(e: &Value) -> String {
    format!(
        "{:<12} ts={} cookie={} jiffies={} expires={} retransmits={} backoff={} pending={} rto={} stamp={} mech={} state={}",
        ev_str(e, "kind"),
        ev_u64(e, "ts_ns"),
        ev_u64(e, "cookie"),
        ev_u64(e, "jiffies"),
        ev_u64(e, "timer_expires"),
        ev_u64(e, "retransmits"),
        ev_u64(e, "backoff"),
        ev_u64(e, "pending"),
        ev_u64(e, "rto_jiffies"),
        ev_u64(e, "retrans_stamp"),
        ev_str(e, "mechanism"),
        ev_str(e, "state"),
    )
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

impl Agent {
    /// Polls `/api/v1/stalls` (every 100 ms) until the flow `local` ->
    /// `remote` is reported as a stall of `class` and returns that entry;
    /// fails after `timeout` with the flow's last entry.
    pub fn wait_stall_class(
        &self,
        local: SocketAddr,
        remote: SocketAddr,
        class: &str,
        timeout: Duration,
    ) -> Value {
        wait_until(
            timeout,
            Duration::from_millis(100),
            &format!("no {class} stall of {local} -> {remote}"),
            || match self.stall_of(local, remote) {
                Some(v) if ev_str(&v, "class") == class => Ok(v),
                other => Err(format!("{other:?}")),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `wait_until` returns the first `Ok`, polling until then. Mutation:
    /// failing on the first `Err` (before the deadline) fails this with
    /// "gave up early: 1".
    #[test]
    fn wait_until_returns_the_first_ok() {
        let mut calls = 0;
        let v = wait_until(
            Duration::from_secs(60),
            Duration::from_millis(1),
            "three calls",
            || {
                calls += 1;
                if calls == 3 { Ok("ready") } else { Err(calls) }
            },
        );
        assert_eq!((v, calls), ("ready", 3));
    }

    /// Past the deadline the failure names what was awaited and the last
    /// thing seen. Mutation: dropping `{last}` from the panic message fails
    /// this ("panic did not contain expected string").
    #[test]
    #[should_panic(expected = "never ready (waited 0ns); last seen: state 1")]
    fn wait_until_fails_naming_what_and_the_last_sight() {
        let mut calls = 0;
        wait_until(Duration::ZERO, Duration::ZERO, "never ready", || {
            calls += 1;
            Err::<(), _>(format!("state {calls}"))
        });
    }

    /// Mutation: dropping the `{}` of stderr from `run_ok`'s failure
    /// message fails this ("panic did not contain expected string").
    #[test]
    #[should_panic(expected = "`echo oops >&2; exit 3` failed (exit status: 3): oops")]
    fn run_ok_fails_naming_the_command_status_and_stderr() {
        sh("echo oops >&2; exit 3");
    }

    #[test]
    fn run_ok_returns_stdout() {
        assert_eq!(sh("echo hi"), "hi\n");
    }
}

/// The environment variable naming the test-notes file (see [`test_note`]).
pub const TEST_NOTES_ENV: &str = "TCPSTALL_TEST_NOTES";

/// Appends `line` to the file named by `TCPSTALL_TEST_NOTES`, which
/// `cargo xtask test` sets and prints after the privileged tests, passed or
/// failed: what a passing test still wants in the CI log (e.g. how many RTO
/// gaps the storm classified as the kernel's). Without the variable (a
/// plain `cargo test`) the line goes to stderr only.
pub fn test_note(line: &str) {
    use std::io::Write as _;
    eprintln!("NOTE {line}");
    if let Some(path) = std::env::var_os(TEST_NOTES_ENV) {
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            eprintln!(
                "cannot append to the test notes {}: {e}",
                path.to_string_lossy()
            );
        }
    }
}

/// One tracepoint hit as an ftrace instance recorded it ([`TraceWitness`]).
#[derive(Debug, Clone)]
pub struct WitnessHit {
    /// `mono` trace clock: the clock of `bpf_ktime_get_ns` (and of the
    /// agent's `ts_ns`), printed with microsecond resolution.
    pub ts_ns: u64,
    pub cpu: u32,
    /// The event's name, e.g. `tcp_retransmit_skb`.
    pub event: String,
    /// The event's printed `key=value` fields.
    pub fields: std::collections::HashMap<String, String>,
    /// The line as the instance printed it (task, CPU, context flags).
    pub line: String,
}

impl WitnessHit {
    pub fn field(&self, k: &str) -> &str {
        self.fields.get(k).map_or("", String::as_str)
    }

    /// A pointer field (`timer=`, `skaddr=`; printed unhashed).
    pub fn addr(&self, k: &str) -> Option<u64> {
        u64::from_str_radix(self.field(k).trim_start_matches("0x"), 16).ok()
    }

    /// Parses one line of an instance's `trace` file
    /// (`comm-pid [cpu] flags secs.usecs: event: k=v ...`); None for the
    /// header and anything else.
    pub fn parse(line: &str) -> Option<Self> {
        if line.starts_with('#') {
            return None;
        }
        let mut tokens = line.split_whitespace();
        let mut cpu = None;
        let mut ts_ns = None;
        for t in tokens.by_ref() {
            if let Some(c) = t.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
                cpu = c.parse().ok();
            } else if let (Some(ts), Some(_)) = (t.strip_suffix(':'), cpu) {
                let (s, frac) = ts.split_once('.')?;
                let frac_ns: u64 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
                ts_ns = Some(s.parse::<u64>().ok()? * 1_000_000_000 + frac_ns);
                break;
            }
        }
        let event = tokens.next()?.strip_suffix(':')?.to_string();
        let fields = tokens
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(Self {
            ts_ns: ts_ns?,
            cpu: cpu?,
            event,
            fields,
            line: line.trim().to_string(),
        })
    }
}

/// An independent witness of kernel tracepoints: an ftrace instance of the
/// test's own (`/sys/kernel/tracing/instances/<name>`), with trace clock
/// `mono`, unhashed pointers, no overwriting, and the given events enabled
/// with their filters. The kernel calls its probe from the same tracepoint
/// call as the agent's programs, so a hit the witness recorded and the agent
/// has no event for is the agent's loss, and one neither saw never reached any
/// probe. The instance is removed on drop (and tracefs unmounted again if
/// this guard mounted it), also when the test fails; the global trace
/// buffer and other instances are not touched.
pub struct TraceWitness {
    dir: PathBuf,
    unmount: Option<PathBuf>,
}

const TRACEFS: &str = "/sys/kernel/tracing";

impl TraceWitness {
    /// `events`: `("timer/timer_expire_entry", Some("function == 0x..."))`.
    pub fn start(name: &str, events: &[(&str, Option<String>)]) -> Self {
        require_root();
        let root = PathBuf::from(TRACEFS);
        let mut unmount = None;
        if !root.join("instances").is_dir() {
            run_ok(
                Command::new("mount").args(["-t", "tracefs", "nodev", TRACEFS]),
                "mounting tracefs (the test's tracepoint witness)",
            );
            unmount = Some(root.clone());
        }
        let dir = root
            .join("instances")
            .join(format!("{name}{}", run_suffix()));
        let _ = std::fs::remove_dir(&dir);
        if let Err(e) = std::fs::create_dir(&dir) {
            if let Some(m) = &unmount {
                sh_quiet(&format!("umount {}", m.display()));
            }
            panic!(
                "prerequisite missing: an ftrace instance at {} ({e}). Fix: a kernel with CONFIG_TRACING and tracefs",
                dir.display()
            );
        }
        let w = Self { dir, unmount };
        w.write("trace_clock", "mono");
        w.write("buffer_size_kb", "4096");
        w.write("options/overwrite", "0");
        w.write("options/hash-ptr", "0");
        for (event, filter) in events {
            if let Some(f) = filter {
                w.write(&format!("events/{event}/filter"), f);
            }
            w.write(&format!("events/{event}/enable"), "1");
        }
        w.write("tracing_on", "1");
        w
    }

    fn write(&self, file: &str, value: &str) {
        let path = self.dir.join(file);
        std::fs::write(&path, value).unwrap_or_else(|e| {
            panic!(
                "the tracepoint witness: writing {value:?} to {}: {e}",
                path.display()
            )
        });
    }

    /// Stops recording and returns every hit, or why the record is not
    /// complete (the instance overran or dropped events).
    pub fn finish(&self) -> Result<Vec<WitnessHit>, String> {
        self.write("tracing_on", "0");
        let mut lost = Vec::new();
        if let Ok(cpus) = std::fs::read_dir(self.dir.join("per_cpu")) {
            for cpu in cpus.flatten() {
                let stats = std::fs::read_to_string(cpu.path().join("stats")).unwrap_or_default();
                for line in stats.lines() {
                    let (k, v) = line.split_once(':').unwrap_or((line, ""));
                    let n: u64 = v.trim().parse().unwrap_or(0);
                    if (k == "overrun" || k == "dropped events") && n > 0 {
                        lost.push(format!("{}: {k} {n}", cpu.file_name().to_string_lossy()));
                    }
                }
            }
        }
        if !lost.is_empty() {
            return Err(format!("the witness lost hits ({})", lost.join(", ")));
        }
        let text = std::fs::read_to_string(self.dir.join("trace"))
            .map_err(|e| format!("reading the witness's trace: {e}"))?;
        Ok(text.lines().filter_map(WitnessHit::parse).collect())
    }
}

impl Drop for TraceWitness {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("tracing_on"), "0");
        let _ = std::fs::write(self.dir.join("events/enable"), "0");
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(m) = &self.unmount {
            sh_quiet(&format!("umount {}", m.display()));
        }
    }
}

/// A kernel symbol's address from `/proc/kallsyms` (None when absent or
/// hidden: `kptr_restrict` prints zeros).
pub fn kallsyms_addr(symbol: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/kallsyms").ok()?;
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let (addr, _kind, name) = (it.next()?, it.next()?, it.next()?);
        (name == symbol && it.next().is_none())
            .then(|| u64::from_str_radix(addr, 16).ok())
            .flatten()
            .filter(|&a| a != 0)
    })
}

#[cfg(test)]
mod witness_tests {
    use super::{WitnessHit, Witnessed};
    use std::net::SocketAddr;

    /// Mutation: `frac:0<9` padding dropped (`frac.parse()` as is) -> the
    /// microseconds come out as nanoseconds and the timestamp check fails.
    #[test]
    fn parses_trace_lines() {
        let h = WitnessHit::parse(
            "          <idle>-0       [001] ..s2. 11794.904093: tcp_retransmit_skb: skbaddr=ffff888296869000 skaddr=ffff88818443ef00 family=AF_INET sport=38738 dport=8090 saddr=10.201.91.1 state=TCP_ESTABLISHED err=0",
        )
        .expect("a hit");
        assert_eq!(h.ts_ns, 11_794_904_093_000);
        assert_eq!(h.cpu, 1);
        assert_eq!(h.event, "tcp_retransmit_skb");
        assert_eq!(h.field("sport"), "38738");
        assert_eq!(h.addr("skaddr"), Some(0xffff_8881_8443_ef00));
        let t = WitnessHit::parse(
            " kworker/0:1-42 [000] ..s1. 5.000001: timer_expire_entry: timer=ffff88818443f350 function=tcp_write_timer now=4297840958 baseclk=4297840958",
        )
        .expect("a hit");
        assert_eq!((t.ts_ns, t.cpu), (5_000_001_000, 0));
        assert_eq!(t.addr("timer"), Some(0xffff_8881_8443_f350));
        assert!(WitnessHit::parse("# tracer: nop").is_none());
        assert!(
            WitnessHit::parse("#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION")
                .is_none()
        );
    }

    fn line(cpu: u32, us: u64, body: &str) -> String {
        format!(
            "  <idle>-0 [{cpu:03}] ..s1. {}.{:06}: {body}",
            us / 1_000_000,
            us % 1_000_000
        )
    }

    fn expiry(cpu: u32, us: u64, sk: u64, sport: u16) -> [String; 2] {
        [
            line(
                cpu,
                us,
                &format!(
                    "timer_expire_entry: timer={:x} function=tcp_write_timer now=1 baseclk=1",
                    sk + 0x450
                ),
            ),
            line(
                cpu,
                us + 2,
                &format!(
                    "tcp_retransmit_skb: skbaddr=ffff1 skaddr={sk:x} family=AF_INET sport={sport} dport=8090 saddr=10.0.0.1 daddr=10.0.0.2 state=TCP_ESTABLISHED err=0"
                ),
            ),
        ]
    }

    /// The timer's offset in the socket is read off timer-then-retransmit
    /// pairs, each socket's hits are its own, and a window with nothing of
    /// the socket reached no probe only by a complete record.
    /// Mutations (in `Witnessed::socket_hits` / `in_window`):
    /// `h.addr("timer") == timer` dropped -> fails with the other socket's
    /// expiries counted (5, not 3); `reliable: true` always -> fails: the
    /// lost record clears the gap.
    #[test]
    fn witnessed_per_socket_windows() {
        let (a, b) = (0xffff_8881_0000_0000u64, 0xffff_8881_0000_8000u64);
        let mut lines = Vec::new();
        lines.extend(expiry(0, 1_000_000, a, 1000));
        lines.extend(expiry(1, 1_000_100, b, 2000));
        lines.extend(expiry(0, 2_000_000, a, 1000));
        // Socket a's third expiry reached no probe; b's did.
        lines.extend(expiry(1, 3_000_100, b, 2000));
        lines.extend(expiry(0, 4_000_000, a, 1000));
        let hits = lines.iter().filter_map(|l| WitnessHit::parse(l)).collect();
        let w = Witnessed::new(Ok(hits));
        assert!(w.lost.is_none(), "{:?}", w.lost);
        let sa: SocketAddr = "10.0.0.1:1000".parse().expect("addr");
        let all = w.in_window(sa, 0, u64::MAX);
        assert_eq!((all.timer_hits, all.retransmits), (3, 3));
        let gap = w.in_window(sa, 2_500_000_000, 3_500_000_000);
        assert!(gap.reached_no_probe(), "{gap}");
        let seen = w.in_window(sa, 1_500_000_000, 2_500_000_000);
        assert_eq!((seen.timer_hits, seen.retransmits), (1, 1));
        assert!(!seen.reached_no_probe());
        let lost = Witnessed::new(Err("overrun".into()));
        assert!(
            !lost
                .in_window(sa, 2_500_000_000, 3_500_000_000)
                .reached_no_probe()
        );
    }
}

/// What reached the tracepoints of one socket in a time window, by the
/// [`TraceWitness`]: write-timer expiries and retransmissions.
#[derive(Debug, Clone, Copy, Default)]
pub struct WitnessSeen {
    pub timer_hits: usize,
    pub retransmits: usize,
    /// The witness's record is complete and ties timer hits to sockets.
    pub reliable: bool,
}

impl WitnessSeen {
    /// Nothing of the socket reached any probe in the window, by a complete
    /// record.
    pub fn reached_no_probe(&self) -> bool {
        self.reliable && self.timer_hits == 0 && self.retransmits == 0
    }
}

impl std::fmt::Display for WitnessSeen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} write-timer expiries and {} retransmissions{}",
            self.timer_hits,
            self.retransmits,
            if self.reliable {
                ""
            } else {
                " (record incomplete)"
            }
        )
    }
}

/// A finished [`TraceWitness`] record of `timer_expire_entry` (filtered to
/// `tcp_write_timer`) and `tcp_retransmit_skb`, per socket: a socket's
/// address comes from its retransmissions (`skaddr`, with `saddr` and
/// `sport`), its write timer's address is that plus the timer's offset in the
/// socket, which is read off the record itself (an expiry's retransmission
/// follows its timer hit on the same CPU within a millisecond).
pub struct Witnessed {
    hits: Vec<WitnessHit>,
    timer_offset: Option<u64>,
    /// Why the record cannot clear a gap (None: it can).
    pub lost: Option<String>,
}

impl Witnessed {
    pub fn new(record: Result<Vec<WitnessHit>, String>) -> Self {
        let hits = match record {
            Ok(h) => h,
            Err(e) => {
                return Self {
                    hits: Vec::new(),
                    timer_offset: None,
                    lost: Some(e),
                };
            }
        };
        let mut offsets = std::collections::HashMap::<u64, usize>::new();
        for (i, t) in hits.iter().enumerate() {
            if t.event != "timer_expire_entry" || t.field("function") != "tcp_write_timer" {
                continue;
            }
            let next = hits[i + 1..]
                .iter()
                .take_while(|h| h.ts_ns <= t.ts_ns + 1_000_000)
                .find(|h| h.cpu == t.cpu);
            let retransmit = next.filter(|r| r.event == "tcp_retransmit_skb");
            if let (Some(sk), Some(timer)) =
                (retransmit.and_then(|r| r.addr("skaddr")), t.addr("timer"))
            {
                *offsets.entry(timer.wrapping_sub(sk)).or_default() += 1;
            }
        }
        let timer_offset = offsets.into_iter().max_by_key(|&(_, n)| n).map(|(o, _)| o);
        let lost = timer_offset
            .is_none()
            .then(|| "no write-timer hit followed by its retransmission: timer hits cannot be tied to sockets".to_string());
        Self {
            hits,
            timer_offset,
            lost,
        }
    }

    /// Retransmissions the witness saw in `[lo_ns, hi_ns)` (every socket
    /// its filter lets through).
    pub fn retransmits_between(&self, lo_ns: u64, hi_ns: u64) -> usize {
        self.hits
            .iter()
            .filter(|h| h.event == "tcp_retransmit_skb" && (lo_ns..hi_ns).contains(&h.ts_ns))
            .count()
    }

    /// The hits of the socket at `local`: its retransmissions (by `saddr`
    /// and `sport`) and its write-timer hits (by the timer's address: the
    /// socket's `skaddr` plus the timer offset), and whether timer hits could
    /// be tied to it.
    fn socket_hits(&self, local: SocketAddr) -> (Vec<&WitnessHit>, bool) {
        let (ip, port) = (local.ip().to_string(), local.port().to_string());
        let is_retransmit = |h: &WitnessHit| {
            h.event == "tcp_retransmit_skb" && h.field("saddr") == ip && h.field("sport") == port
        };
        let sk = self
            .hits
            .iter()
            .find(|h| is_retransmit(h))
            .and_then(|h| h.addr("skaddr"));
        let timer = sk.zip(self.timer_offset).map(|(s, o)| s.wrapping_add(o));
        let hits = self
            .hits
            .iter()
            .filter(|h| {
                is_retransmit(h)
                    || (timer.is_some()
                        && h.event == "timer_expire_entry"
                        && h.addr("timer") == timer)
            })
            .collect();
        (hits, timer.is_some())
    }

    /// The witness's lines of the socket at `local` in `[lo_ns, hi_ns)`
    /// (its timer hits and retransmissions), for a gap report.
    pub fn lines_in_window(&self, local: SocketAddr, lo_ns: u64, hi_ns: u64) -> Vec<String> {
        let (hits, _) = self.socket_hits(local);
        hits.into_iter()
            .filter(|h| (lo_ns..hi_ns).contains(&h.ts_ns))
            .map(|h| h.line.clone())
            .collect()
    }

    /// What of the socket at `local` reached the tracepoints in
    /// `[lo_ns, hi_ns)` (microsecond resolution).
    pub fn in_window(&self, local: SocketAddr, lo_ns: u64, hi_ns: u64) -> WitnessSeen {
        let (hits, timer_known) = self.socket_hits(local);
        let in_window: Vec<&WitnessHit> = hits
            .into_iter()
            .filter(|h| (lo_ns..hi_ns).contains(&h.ts_ns))
            .collect();
        let count = |event: &str| in_window.iter().filter(|h| h.event == event).count();
        WitnessSeen {
            timer_hits: count("timer_expire_entry"),
            retransmits: count("tcp_retransmit_skb"),
            reliable: self.lost.is_none() && timer_known,
        }
    }
}

impl Agent {
    /// Like [`Agent::start`], but runs `program` instead of the agent from
    /// [`agent_path`]: another build of `tcpstall` (the binary of the
    /// container image), or a launcher that `exec`s one with the arguments
    /// it is given (so [`Agent::pid`] is the agent's).
    pub fn start_binary(program: &std::path::Path, extra: &[&str]) -> Self {
        Self::spawn(Command::new(program), extra)
    }
}
