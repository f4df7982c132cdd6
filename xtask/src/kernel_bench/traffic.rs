//! The load of the bench: ordinary TCP traffic (a rate-limited bulk stream
//! and connection churn, so the state and ACK probes run), and the storm
//! (many established flows whose peer is blackholed, so every RTO fires).

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tcpstall_tests::{Blackhole, Link};

/// Runs `f` on a new thread that has entered netns `ns` (sockets it creates
/// stay there).
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> JoinHandle<anyhow::Result<T>> {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let fd = File::open(&path).with_context(|| format!("open {path}"))?;
        // SAFETY: valid fd; only this thread changes namespace.
        if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        f()
    })
}

pub fn run_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    spawn_in(ns, f)
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
}

/// Accepts on `listener` until `stop`, reading and discarding on each
/// connection (the sockets stay open until `stop`).
fn sink(listener: TcpListener, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    thread::spawn(move || {
        listener.set_nonblocking(true).ok();
        let mut readers = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let stop = stop.clone();
                    readers.push(thread::spawn(move || {
                        s.set_nonblocking(false).ok();
                        s.set_read_timeout(Some(Duration::from_millis(200))).ok();
                        let mut buf = vec![0u8; 64 * 1024];
                        while !stop.load(Ordering::Relaxed) {
                            match s.read(&mut buf) {
                                Ok(0) => break,
                                Ok(_) => {}
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => break,
                            }
                        }
                    }));
                    readers.retain(|r: &JoinHandle<()>| !r.is_finished());
                }
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
        for r in readers {
            let _ = r.join();
        }
    })
}

/// Ordinary traffic from `link.a` to `link.b`: a bulk stream paced to about
/// `mbit` Mbit/s and a new short connection every 10 ms. Stops on drop.
pub struct Ordinary {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub bytes: Arc<AtomicU64>,
    pub connections: Arc<AtomicU64>,
}

impl Ordinary {
    pub fn start(link: &Link, mbit: u64) -> anyhow::Result<Ordinary> {
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let bulk_addr = SocketAddr::from((link.b_ip, 7001));
        let churn_addr = SocketAddr::from((link.b_ip, 7002));
        let mut threads = Vec::new();
        for addr in [bulk_addr, churn_addr] {
            let l = run_in(&link.b.name, move || {
                TcpListener::bind(addr).with_context(|| format!("bind {addr}"))
            })?;
            threads.push(sink(l, stop.clone()));
        }
        let (s, b) = (stop.clone(), bytes.clone());
        let bulk = spawn_in(&link.a.name, move || {
            let mut c = TcpStream::connect_timeout(&bulk_addr, Duration::from_secs(5))
                .with_context(|| format!("connect {bulk_addr}"))?;
            let chunk = vec![b'x'; 64 * 1024];
            // Paced in 10 ms slots.
            let per_slot = (mbit * 1_000_000 / 8 / 100).max(1);
            let t0 = Instant::now();
            let mut slot = 0u64;
            while !s.load(Ordering::Relaxed) {
                let mut sent = 0;
                while sent < per_slot {
                    let n = (per_slot - sent).min(chunk.len() as u64) as usize;
                    if let Err(e) = c.write_all(&chunk[..n]) {
                        if s.load(Ordering::Relaxed) {
                            // The sink closed first on the way out.
                            return Ok(());
                        }
                        return Err(e).context("bulk write");
                    }
                    sent += n as u64;
                }
                b.fetch_add(sent, Ordering::Relaxed);
                slot += 1;
                let next = t0 + Duration::from_millis(10 * slot);
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    thread::sleep(d);
                }
            }
            Ok(())
        });
        let (s, n) = (stop.clone(), connections.clone());
        let churn = spawn_in(&link.a.name, move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok(mut c) = TcpStream::connect_timeout(&churn_addr, Duration::from_secs(2)) {
                    let _ = c.write_all(b"ping");
                    n.fetch_add(1, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        });
        for h in [bulk, churn] {
            threads.push(thread::spawn(move || {
                if let Ok(Err(e)) = h.join() {
                    eprintln!("    ordinary traffic: {e:#}");
                }
            }));
        }
        Ok(Ordinary {
            stop,
            threads,
            bytes,
            connections,
        })
    }
}

impl Drop for Ordinary {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `flows` established connections from `link.a` (where `tcp_retries2` is
/// set) to a reading server in `link.b`; [`Storm::blackhole`] cuts them.
pub struct Storm<'a> {
    link: &'a Link,
    clients: Vec<TcpStream>,
    stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
    blackhole: Option<Blackhole<'a>>,
    local_drop: Option<Blackhole<'a>>,
}

impl<'a> Storm<'a> {
    pub fn establish(link: &'a Link, flows: usize, retries2: u32) -> anyhow::Result<Storm<'a>> {
        link.a
            .sysctl("net.ipv4.tcp_retries2", &retries2.to_string());
        let addr = SocketAddr::from((link.b_ip, 7003));
        let l = run_in(&link.b.name, move || {
            let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
            Ok(l)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let server = sink(l, stop.clone());
        let clients = run_in(&link.a.name, move || {
            let mut v = Vec::with_capacity(flows);
            for i in 0..flows {
                let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .with_context(|| format!("storm flow {i}: connect {addr}"))?;
                c.write_all(b"hello").context("first write")?;
                v.push(c);
            }
            Ok(v)
        })?;
        // Every first write acknowledged before the cut.
        thread::sleep(Duration::from_millis(500));
        Ok(Storm {
            link,
            clients,
            stop,
            server: Some(server),
            blackhole: None,
            local_drop: None,
        })
    }

    /// Drops everything from the clients at the server and writes on every
    /// flow: from here each flow retransmits on every RTO. Every other
    /// packet of the clients is dropped before it leaves, in their own
    /// namespace's output chain (cause `local_drop`: the drop program's
    /// path that reports, for sockets in an RTO episode); the rest reach
    /// the server's blackhole (a drop of no local socket: its early exit).
    pub fn blackhole(&mut self) -> anyhow::Result<()> {
        self.blackhole = Some(self.link.b.blackhole_from(self.link.a_ip));
        self.local_drop = Some(self.link.a.output_rule(&format!(
            "ip daddr {} tcp dport 7003 numgen inc mod 2 == 0 drop",
            self.link.b_ip
        )));
        for c in &mut self.clients {
            c.write_all(&[b'x'; 1000])
                .context("write into the blackhole")?;
        }
        Ok(())
    }
}

impl Drop for Storm<'_> {
    fn drop(&mut self) {
        self.clients.clear();
        self.blackhole = None;
        self.local_drop = None;
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
    }
}
