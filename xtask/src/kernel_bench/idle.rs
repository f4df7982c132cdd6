//! The agent's own cost on a node with many idle sockets, against what a
//! user would run instead (`ss -tinoH` once a second), and the periodic
//! sweep at scale:
//!
//! - **idle**: `--idle-sockets` established loopback sockets in a
//!   namespace of the bench, held open by child processes, no traffic; the
//!   agent (defaults but `--sweep-interval 0`, so the window holds no
//!   sweep) runs for `--idle`: its CPU (every thread's `schedstat`, ns)
//!   per second of wall time (threads sampled every 20 ms). Beside it, one `ss -tinoH` dump of the same
//!   namespace (CPU of the child, `getrusage`).
//! - **from idle**: single short connections 1 s apart (each reaches an
//!   asleep reader): event delivery delay, kernel timestamp to the agent's
//!   read (`tcpstall_event_delivery_seconds`).
//! - **sweep**: the agent with `--sweep-interval 2 --sweep-interval-max 2`
//!   (a fixed gap) over the same sockets
//!   and then `--sweep-sockets` of them, for `--sweep-window` twice: first
//!   alone, for the CPU per sweep (the window's CPU less the idle rate, over
//!   the sweeps run) and the sweep's wall time; then with `/healthz` asked
//!   every 5 ms (its latency) and a short connection every 100 ms (event
//!   delivery delay): the event loop while sweeps run.
//!
//! Half the connections set SO_KEEPALIVE on their accepted end (servers
//! commonly do): the sweep skips those idle sockets in the kernel; the
//! other half are idle established sockets without a timeout, which the
//! audit lists, so each is a record.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tcpstall_tests::Netns;

use super::{Delivery, agent_stats, procs::Agent, traffic::run_in};

/// Connections per holder process (both ends: 12,500 descriptors, under
/// the 20,000 RLIMIT_NOFILE hard limit CI has, which cannot be raised
/// without CAP_SYS_RESOURCE; and under the about 28,000 ephemeral ports
/// per destination: one listener per holder).
const PER_HOLDER: usize = 6_250;

/// Established loopback connections inside one namespace, both ends held
/// by child processes (one listener each); killed on drop (then the
/// namespace goes).
pub struct Held {
    pub ns: Netns,
    holders: Vec<libc::pid_t>,
    sockets: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        for pid in self.holders.drain(..) {
            // SAFETY: our own children.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

fn keepalive(s: &TcpStream) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on our own socket with an int option.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// In a holder child: enter the namespace, open `n` connections to a
/// listener on `port`, SO_KEEPALIVE on each accepted end.
fn hold(netns: &str, port: u16, n: usize) -> std::io::Result<Vec<TcpStream>> {
    let f = std::fs::File::open(netns)?;
    // SAFETY: valid fd; this (child) process changes namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let l = TcpListener::bind(addr)?;
    let acceptor = thread::spawn(move || -> std::io::Result<Vec<TcpStream>> {
        (0..n)
            .map(|_| {
                let s = l.accept()?.0;
                keepalive(&s)?;
                Ok(s)
            })
            .collect()
    });
    let mut all = Vec::with_capacity(2 * n);
    for _ in 0..n {
        all.push(TcpStream::connect_timeout(&addr, Duration::from_secs(5))?);
    }
    all.extend(
        acceptor
            .join()
            .map_err(|_| std::io::Error::other("acceptor panicked"))??,
    );
    Ok(all)
}

impl Held {
    pub fn new(tag: &str) -> Held {
        Held {
            ns: Netns::new(tag),
            holders: Vec::new(),
            sockets: 0,
        }
    }

    pub fn sockets(&self) -> usize {
        self.sockets
    }

    /// Adds holder processes until `sockets` sockets (both ends) are held.
    pub fn grow_to(&mut self, sockets: usize) -> anyhow::Result<()> {
        let netns = format!("/run/netns/{}", self.ns.name);
        while self.sockets < sockets {
            let n = ((sockets - self.sockets) / 2).clamp(1, PER_HOLDER);
            let port = 9100 + self.holders.len() as u16;
            let mut fds = [0; 2];
            // SAFETY: plain syscalls; the child only connects, reports on
            // the pipe and sleeps until killed.
            if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
                bail!("pipe: {}", std::io::Error::last_os_error());
            }
            let pid = unsafe { libc::fork() };
            if pid < 0 {
                bail!("fork: {}", std::io::Error::last_os_error());
            }
            if pid == 0 {
                let ok = match hold(&netns, port, n) {
                    Ok(held) => {
                        unsafe { libc::write(fds[1], b"k".as_ptr().cast(), 1) };
                        Some(held)
                    }
                    Err(_) => None,
                };
                if ok.is_none() {
                    unsafe { libc::_exit(1) };
                }
                loop {
                    thread::sleep(Duration::from_secs(3600));
                    std::hint::black_box(&ok);
                }
            }
            self.holders.push(pid);
            let mut b = [0u8; 1];
            // SAFETY: reading one byte from our pipe (EOF if the child died).
            let got = unsafe {
                libc::close(fds[1]);
                let r = libc::read(fds[0], b.as_mut_ptr().cast(), 1);
                libc::close(fds[0]);
                r
            };
            if got != 1 {
                bail!(
                    "a socket holder failed to open {n} connections on 127.0.0.1:{port} in {}",
                    self.ns.name
                );
            }
            self.sockets += 2 * n;
        }
        Ok(())
    }
}

/// CPU time (ns) so far of each live thread of `pid`
/// (`/proc/PID/task/TID/schedstat`).
fn thread_cpu_ns(pid: u32) -> std::collections::HashMap<u32, u64> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in dir.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(ns) = std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        {
            out.insert(tid, ns);
        }
    }
    out
}

/// Runs `f` and returns the CPU seconds the agent spent meanwhile, and the
/// wall seconds. Its threads are sampled every 20 ms (a thread that exits
/// takes its schedstat with it; one born meanwhile counts from 0), so the
/// sum is exact to the nanosecond but for a thread that lives under 20 ms.
fn agent_cpu(agent: &Agent, f: impl FnOnce()) -> anyhow::Result<(f64, f64)> {
    let pid = agent.pid();
    let first = thread_cpu_ns(pid);
    if first.is_empty() {
        bail!("no threads of the agent (pid {pid}) in /proc");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let sampler = thread::spawn(move || {
        let mut last = thread_cpu_ns(pid);
        while !s.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(20));
            for (tid, ns) in thread_cpu_ns(pid) {
                last.insert(tid, ns);
            }
        }
        for (tid, ns) in thread_cpu_ns(pid) {
            last.insert(tid, ns);
        }
        last
    });
    let t0 = Instant::now();
    f();
    let wall = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let last = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("CPU sampler panicked"))?;
    let spent: u64 = last
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(first.get(tid).copied().unwrap_or(0)))
        .sum();
    Ok((spent as f64 / 1e9, wall))
}

/// CPU seconds of one `ss -tinoH` dump of namespace `ns` (median of 3).
fn ss_dump_cpu(ns: &str) -> anyhow::Result<f64> {
    let mut v = Vec::new();
    for _ in 0..3 {
        let before = children_cpu();
        let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
        let fd = f.as_raw_fd();
        let mut cmd = std::process::Command::new("ss");
        cmd.arg("-tinoH").stdout(std::process::Stdio::null());
        // SAFETY: setns between fork and exec (async-signal-safe): `ss`
        // itself runs in the namespace, with no `ip netns exec` around it.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let st = cmd
            .status()
            .context("running `ss` (apt-get install iproute2)")?;
        if !st.success() {
            bail!("`ss -tinoH` in {ns} failed: {st}");
        }
        v.push(children_cpu() - before);
    }
    Ok(super::iperf::median(&v))
}

fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// One short connection in `ns` (to a listener there): open, write, close.
fn one_connection(ns: &str, addr: SocketAddr) {
    let _ = run_in(ns, move || {
        use std::io::Write as _;
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        c.write_all(b"x")?;
        Ok(())
    });
}

/// A listener in `ns` that accepts and closes (for the short connections).
fn closing_listener(ns: &str, port: u16, stop: Arc<AtomicBool>) -> anyhow::Result<SocketAddr> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let l = run_in(ns, move || {
        TcpListener::bind(addr).with_context(|| format!("bind {addr}"))
    })?;
    l.set_nonblocking(true)?;
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok(s) => drop(s),
                Err(_) => thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    Ok(addr)
}

fn delivery_between(before: &str, after: &str) -> Delivery {
    let b = agent_stats::buckets(before, super::DELIVERY_HISTOGRAM);
    let a = agent_stats::buckets(after, super::DELIVERY_HISTOGRAM);
    let events = a.last().map_or(0.0, |l| l.1) - b.last().map_or(0.0, |l| l.1);
    Delivery {
        events: events.max(0.0) as u64,
        p50: agent_stats::quantile(&b, &a, 0.5),
        p99: agent_stats::quantile(&b, &a, 0.99),
    }
}

fn events_total(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("tcpstall_events_total{"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum()
}

#[derive(Debug, Clone)]
pub struct Idle {
    pub sockets: usize,
    pub secs: f64,
    pub cpu_s: f64,
    /// Events the agent read in the window (other traffic on the node).
    pub events: u64,
    pub ss_dump_cpu_s: f64,
    pub from_idle: Delivery,
}

impl Idle {
    pub fn cpu_ms_per_s(&self) -> f64 {
        self.cpu_s * 1e3 / self.secs
    }
}

/// The idle phase and the from-idle delivery delay.
pub fn idle(agent_bin: &std::path::Path, held: &Held, window: Duration) -> anyhow::Result<Idle> {
    let agent = Agent::start(agent_bin, &["--sweep-interval", "0"])?;
    // Start-up (BTF, loading, the start-up sweep) is over; let it settle.
    thread::sleep(Duration::from_secs(3));
    let m0 = agent_stats::scrape(agent.listen)?;
    let (cpu_s, secs) = agent_cpu(&agent, || thread::sleep(window))?;
    let m1 = agent_stats::scrape(agent.listen)?;
    let ss_dump_cpu_s = ss_dump_cpu(&held.ns.name)?;
    let stop = Arc::new(AtomicBool::new(false));
    let addr = closing_listener(&held.ns.name, 9099, stop.clone())?;
    let m2 = agent_stats::scrape(agent.listen)?;
    for _ in 0..20 {
        one_connection(&held.ns.name, addr);
        thread::sleep(Duration::from_secs(1));
    }
    let m3 = agent_stats::scrape(agent.listen)?;
    stop.store(true, Ordering::Relaxed);
    Ok(Idle {
        sockets: held.sockets(),
        secs,
        cpu_s,
        events: (events_total(&m1) - events_total(&m0)).max(0.0) as u64,
        ss_dump_cpu_s,
        from_idle: delivery_between(&m2, &m3),
    })
}

#[derive(Debug, Clone)]
pub struct SweepCost {
    pub sockets: usize,
    pub sweeps: u64,
    pub secs: f64,
    pub cpu_s: f64,
    /// CPU seconds per sweep: the window's CPU less `idle_rate` x window,
    /// over the sweeps.
    pub cpu_per_sweep_s: f64,
    /// Mean wall time of one sweep (`tcpstall_sweep_duration_seconds`).
    pub wall_per_sweep_s: Option<f64>,
    /// `/healthz` latency while the sweeps ran: p50, p99, max (seconds),
    /// and how many answered.
    pub healthz: (f64, f64, f64, usize),
    /// Event delivery delay of a short connection every 100 ms meanwhile.
    pub delivery: Delivery,
}

fn healthz_once(listen: SocketAddr) -> Option<f64> {
    use std::io::{Read as _, Write as _};
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&listen, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET /healthz HTTP/1.0\r\nHost: {listen}\r\n\r\n").ok()?;
    let mut b = Vec::new();
    s.read_to_end(&mut b).ok()?;
    Some(t.elapsed().as_secs_f64())
}

fn quantile_of(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// The sweep phase at the sockets `held` holds now.
pub fn sweep(
    agent_bin: &std::path::Path,
    held: &Held,
    window: Duration,
    idle_cpu_per_s: f64,
) -> anyhow::Result<SweepCost> {
    // A fixed gap: the agent's back-off on a quiet node would stretch it.
    let agent = Agent::start(
        agent_bin,
        &["--sweep-interval", "2", "--sweep-interval-max", "2"],
    )?;
    thread::sleep(Duration::from_secs(1));
    let listen = agent.listen;
    // CPU: nothing else asks anything of the agent meanwhile.
    let c0 = agent_stats::scrape(listen)?;
    let (cpu_s, secs) = agent_cpu(&agent, || thread::sleep(window))?;
    let c1 = agent_stats::scrape(listen)?;
    let sweeps = agent_stats::sample(&c1, "tcpstall_sweeps_total{reason=\"interval\"}")
        .unwrap_or(0.0)
        - agent_stats::sample(&c0, "tcpstall_sweeps_total{reason=\"interval\"}").unwrap_or(0.0);
    // The event loop while sweeps run: HTTP and event delivery.
    let stop = Arc::new(AtomicBool::new(false));
    let addr = closing_listener(&held.ns.name, 9098, stop.clone())?;
    let m0 = agent_stats::scrape(listen)?;
    let (s2, ns) = (stop.clone(), held.ns.name.clone());
    let trickle = thread::spawn(move || {
        while !s2.load(Ordering::Relaxed) {
            one_connection(&ns, addr);
            thread::sleep(Duration::from_millis(100));
        }
    });
    let s3 = stop.clone();
    let prober = thread::spawn(move || {
        let mut lat = Vec::new();
        while !s3.load(Ordering::Relaxed) {
            if let Some(l) = healthz_once(listen) {
                lat.push(l);
            }
            thread::sleep(Duration::from_millis(5));
        }
        lat
    });
    thread::sleep(window);
    stop.store(true, Ordering::Relaxed);
    let _ = trickle.join();
    let mut lat = prober.join().unwrap_or_default();
    let m1 = agent_stats::scrape(listen)?;
    let sum = |m: &str| agent_stats::sample(m, "tcpstall_sweep_duration_seconds_sum");
    let count = |m: &str| agent_stats::sample(m, "tcpstall_sweep_duration_seconds_count");
    let wall_per_sweep_s = match (sum(&c0), sum(&m1), count(&c0), count(&m1)) {
        (Some(s0), Some(s1), Some(c0), Some(c1)) if c1 > c0 => Some((s1 - s0) / (c1 - c0)),
        _ => None,
    };
    let sweeps = sweeps.max(0.0) as u64;
    let healthz = (
        quantile_of(&mut lat, 0.5),
        quantile_of(&mut lat, 0.99),
        lat.iter().copied().fold(0.0, f64::max),
        lat.len(),
    );
    Ok(SweepCost {
        sockets: held.sockets(),
        sweeps,
        secs,
        cpu_s,
        cpu_per_sweep_s: (cpu_s - idle_cpu_per_s * secs).max(0.0) / sweeps.max(1) as f64,
        wall_per_sweep_s,
        healthz,
        delivery: delivery_between(&m0, &m1),
    })
}
