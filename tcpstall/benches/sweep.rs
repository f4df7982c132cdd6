//! The socket sweep at 100,000 sockets (criterion; root only: it loads the
//! kernel programs). `cargo xtask bench` runs it as root.
//!
//! Set-up (not timed): the benchmark process enters a fresh network
//! namespace (`unshare(CLONE_NEWNET)`, loopback up) and forks 8 holder
//! processes that open 50,000 loopback TCP connections between them:
//! 100,000 established sockets (both ends are open files of a holder, so the
//! iterator visits each), plus the listeners.
//!
//! - `sweep_100k/<program>`: one run of each `iter/task_file` sweep program
//!   that loads on this kernel (`tcpstall_sweep_direct`: plain loads
//!   through the typed socket; `tcpstall_sweep`: probe reads;
//!   `tcpstall_sweep_plain`: probe reads from plain addresses, the last
//!   fallback) over every task's files and the read of its output (every
//!   socket of the node, this process's 100,000 included): what the agent's
//!   `loader::Loaded::sweep` costs with that program. Programs the verifier
//!   refuses here are named and skipped (some 6.18 builds refuse the first
//!   two).
//! - `sweep_100k/decode_audit`: decoding and de-duplicating the records and
//!   the hang-forever audit over them (the agent's user-space part).
//!
//! Half the connections set SO_KEEPALIVE on their accepted end (as servers
//! commonly do): the kernel skips those idle sockets (no record), the other
//! half are idle established sockets without a timeout, each a record for
//! the audit.

use std::hint::black_box;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use tcpstall::kernel::loader::{self, LoaderOptions};
use tcpstall::kernel::probes::SWEEP;
use tcpstall::sweep;
use tcpstall::sweep::risks;

const CONNECTIONS: usize = 50_000;
/// Processes holding the sockets: RLIMIT_NOFILE cannot be raised past the
/// hard limit without CAP_SYS_RESOURCE (20,000 on the CI machine), so
/// each child holds 12,500 sockets (6,250 connections, both ends).
const HOLDERS: usize = 8;

fn setup_namespace() {
    // SAFETY: plain syscalls on this process.
    unsafe {
        assert_eq!(
            libc::unshare(libc::CLONE_NEWNET),
            0,
            "unshare(CLONE_NEWNET): {} (the sweep benchmark needs root)",
            std::io::Error::last_os_error()
        );
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let st = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("ip link set lo up");
    assert!(st.success());
}

/// `HOLDERS` child processes, each with its share of the connections (one
/// listener each: ephemeral ports run out at about 28,000 per destination);
/// returns their pids once all are connected.
fn connections() -> Vec<libc::pid_t> {
    let mut pids = Vec::new();
    for h in 0..HOLDERS {
        let mut fds = [0; 2];
        // SAFETY: plain syscalls; the child only connects, reports and sleeps.
        unsafe { assert_eq!(libc::pipe(fds.as_mut_ptr()), 0) };
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let held = hold(9101 + h as u16, CONNECTIONS / HOLDERS);
            unsafe {
                libc::write(fds[1], b"k".as_ptr().cast(), 1);
            }
            loop {
                std::thread::sleep(Duration::from_secs(3600));
                black_box(&held);
            }
        }
        let mut b = [0u8; 1];
        // SAFETY: reading one byte from our pipe.
        let n = unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
        assert_eq!(n, 1, "holder {h} failed to connect");
        pids.push(pid);
    }
    pids
}

fn hold(port: u16, n: usize) -> Vec<TcpStream> {
    let mut all = Vec::with_capacity(2 * n);
    {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let l = TcpListener::bind(addr).expect("bind");
        let acceptor = std::thread::spawn(move || {
            (0..n)
                .map(|_| l.accept().expect("accept").0)
                .collect::<Vec<_>>()
        });
        for _ in 0..n {
            all.push(TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect"));
        }
        let accepted = acceptor.join().expect("acceptor");
        for s in &accepted {
            let on: libc::c_int = 1;
            // SAFETY: setsockopt on our own socket with an int option.
            let r = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(s),
                    libc::SOL_SOCKET,
                    libc::SO_KEEPALIVE,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "SO_KEEPALIVE");
        }
        all.extend(accepted);
    }
    all
}

fn bench(c: &mut Criterion) {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "sweep benchmark skipped: it loads the kernel programs (run as root: sudo -E cargo xtask bench)"
        );
        return;
    }
    setup_namespace();
    let holders = connections();
    // try_all: every sweep program the verifier takes loads (the first is
    // chosen); the others are named with the kernel's reason.
    let mut loaded = loader::load(&LoaderOptions {
        try_all: true,
        ..LoaderOptions::default()
    })
    .expect("loading the probes");
    let chosen = loaded.sweep_program().expect("sweep available");
    let attempts: Vec<(&'static str, Option<String>)> = loaded
        .plan
        .probes
        .iter()
        .filter(|p| p.probe == SWEEP)
        .flat_map(|p| p.attempts.iter().map(|a| (a.program, a.error.clone())))
        .collect();
    let programs: Vec<&'static str> = attempts
        .iter()
        .filter(|(_, e)| e.is_none())
        .map(|(p, _)| *p)
        .collect();
    for (p, e) in &attempts {
        if let Some(e) = e {
            eprintln!("sweep program {p}: not benchmarked, it does not load here: {e}");
        }
    }
    let stats = loaded.take_stats().expect("stats");
    let first = loaded.sweep(&stats).expect("sweep");
    let (sockets, bad) = sweep::decode_all(&first.records);
    assert_eq!(bad, 0);
    assert!(
        sockets.len() as u64 + first.skipped >= 2 * CONNECTIONS as u64,
        "the sweep found {} TCP sockets and skipped {}, expected at least {}",
        sockets.len(),
        first.skipped,
        2 * CONNECTIONS
    );
    for p in &programs {
        let out = loaded.sweep_with(p, &stats).expect("sweep");
        assert_eq!(
            out.records.len(),
            first.records.len(),
            "{p} and {chosen} find the same sockets"
        );
    }
    eprintln!(
        "sweep ({chosen}; benchmarked: {}): {} socket files visited, {} TCP sockets read, {} skipped in the kernel ({} of them established), {} records, {} at risk",
        programs.join(", "),
        first.socket_files,
        sockets.len(),
        first.skipped,
        first.skipped_established,
        first.records.len(),
        risks::audit(&sockets, 250, 0, 1_000).total
    );

    let mut g = c.benchmark_group("sweep_100k");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.throughput(Throughput::Elements(first.socket_files));
    for p in &programs {
        g.bench_function(*p, |b| {
            b.iter(|| black_box(loaded.sweep_with(p, &stats).expect("sweep").records.len()))
        });
    }
    g.bench_function("decode_audit", |b| {
        b.iter(|| {
            let (s, _) = sweep::decode_all(black_box(&first.records));
            black_box(risks::audit(&s, 250, 0, 1_000).total)
        })
    });
    g.finish();
    for pid in holders {
        // SAFETY: our own children.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
