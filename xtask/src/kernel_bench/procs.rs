//! Child processes of the bench, each stopped by a guard on every path out:
//! the agent, bpftrace, the iperf3 server.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::progs;

/// SIGTERM (or `sig`), then SIGKILL after 10 s.
fn stop_child(child: &mut Child, sig: i32) {
    stop_child_within(child, sig, Duration::from_secs(10));
}

/// `sig`, then SIGKILL after `grace`; whether the child exited by itself.
fn stop_child_within(child: &mut Child, sig: i32, grace: Duration) -> bool {
    if let Ok(Some(_)) = child.try_wait() {
        return true;
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// How long bpftrace may take to print its maps after SIGINT: a few
/// seconds on the host, minutes in a guest under TCG (it formats every
/// 4-tuple of the churn).
const BPFTRACE_PRINT_GRACE: Duration = Duration::from_secs(240);

/// The agent; stopped on drop.
pub struct Agent {
    child: Child,
    pub listen: SocketAddr,
}

impl Drop for Agent {
    fn drop(&mut self) {
        stop_child(&mut self.child, libc::SIGTERM);
    }
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `tcpstall run` on a loopback port with `extra` flags; returns once it
    /// logs `tcpstall running` (probes attached).
    pub fn start(agent: &Path, extra: &[&str]) -> anyhow::Result<Agent> {
        let mut child = Command::new(agent)
            .args(["run", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", agent.display()))?;
        // The agent logs (JSON lines) on stderr.
        let out = child.stderr.take().context("agent stderr")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["message"] == "tcpstall running"
                {
                    let _ = tx.send(v["listen"].as_str().unwrap_or_default().to_owned());
                }
            }
        });
        let mut guard = Agent {
            child,
            listen: "127.0.0.1:0".parse().expect("literal"),
        };
        // A guest under TCG needs a while to parse BTF and load the programs.
        let listen = rx.recv_timeout(Duration::from_secs(300)).map_err(|_| {
            let exited = guard.child.try_wait().ok().flatten();
            anyhow::anyhow!(
                "the agent did not report `tcpstall running` within 300 s{}",
                exited.map_or_else(String::new, |s| format!(" (it exited: {s})"))
            )
        })?;
        guard.listen = listen
            .parse()
            .with_context(|| format!("agent listen address {listen:?}"))?;
        Ok(guard)
    }
}

/// The tracepoints bpftrace counts, as `bpftool perf list` names them.
pub const BPFTRACE_TRACEPOINTS: [&str; 5] = [
    "tcp_retransmit_skb",
    "inet_sock_set_state",
    "tcp_probe",
    "timer_expire_entry",
    "kfree_skb",
];

/// Counts the tracepoints tcpstall's programs sit on, per 4-tuple (the TCP
/// write timer per timer): what someone would write by hand to watch the
/// same events, and so the yardstick for what one event may cost.
pub const BPFTRACE_SCRIPT: &str = r#"
tracepoint:tcp:tcp_retransmit_skb { @retransmit[ntop(args->saddr), ntop(args->daddr), args->sport, args->dport] = count(); }
tracepoint:sock:inet_sock_set_state /args->protocol == 6/ { @state[ntop(args->saddr), ntop(args->daddr), args->sport, args->dport] = count(); }
tracepoint:tcp:tcp_probe { @ack[((struct sockaddr_in *)args->saddr)->sin_addr.s_addr, ((struct sockaddr_in *)args->daddr)->sin_addr.s_addr, args->sport, args->dport] = count(); }
tracepoint:timer:timer_expire_entry /args->function == kaddr("tcp_write_timer")/ { @timer[args->timer] = count(); }
tracepoint:skb:kfree_skb { @drop[args->location, args->reason] = count(); }
"#;

/// bpftrace running [`BPFTRACE_SCRIPT`]; interrupted on drop.
pub struct Bpftrace {
    child: Child,
    out: PathBuf,
    /// tracepoint name -> program id
    pub programs: Vec<(String, u32)>,
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        stop_child(&mut self.child, libc::SIGINT);
        let _ = std::fs::remove_file(&self.out);
        let _ = std::fs::remove_file(self.out.with_extension("bt"));
    }
}

impl Bpftrace {
    /// Starts bpftrace in a private mount namespace with its own tracefs
    /// mount (the host's mounts stay as they are) and waits until all four
    /// tracepoints are attached.
    pub fn start() -> anyhow::Result<Bpftrace> {
        let base = std::env::temp_dir().join(format!("tcpstall-bench-{}", std::process::id()));
        let script = base.with_extension("bt");
        let out = base.with_extension("out");
        std::fs::write(&script, BPFTRACE_SCRIPT).context("writing the bpftrace script")?;
        let stdout = std::fs::File::create(&out).context("bpftrace output file")?;
        let child = Command::new("unshare")
            .args([
                "-m",
                "sh",
                "-c",
                "mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null; exec bpftrace \"$0\"",
            ])
            .arg(&script)
            // The default (4096 keys per map) fills up with the churn's
            // 4-tuples; a full map would make bpftrace's updates cheaper.
            .env("BPFTRACE_MAP_KEYS_MAX", "65536")
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .context(
                "starting bpftrace under `unshare -m` (apt-get install bpftrace util-linux)",
            )?;
        let mut bt = Bpftrace {
            child,
            out,
            programs: Vec::new(),
        };
        // bpftrace compiles with LLVM first: slow under TCG.
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(st) = bt.child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = bt.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!(
                    "bpftrace exited ({st}) before attaching: {}",
                    err.lines()
                        .filter(|l| !l.contains("RLIMIT_MEMLOCK"))
                        .collect::<Vec<_>>()
                        .join(" | ")
                );
            }
            let attached = progs::tracepoints_of(bt.child.id())?;
            if BPFTRACE_TRACEPOINTS
                .iter()
                .all(|t| attached.iter().any(|(_, n)| n == t))
            {
                bt.programs = attached.into_iter().map(|(id, n)| (n, id)).collect();
                // Keep its stderr from filling the pipe.
                if let Some(e) = bt.child.stderr.take() {
                    thread::spawn(
                        move || {
                            for _ in BufReader::new(e).lines().map_while(Result::ok) {}
                        },
                    );
                }
                return Ok(bt);
            }
            if Instant::now() > deadline {
                bail!(
                    "bpftrace did not attach its {} tracepoints within 300 s",
                    BPFTRACE_TRACEPOINTS.len()
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn program(&self, tracepoint: &str) -> Option<u32> {
        self.programs
            .iter()
            .find(|(n, _)| n == tracepoint)
            .map(|(_, id)| *id)
    }

    /// Stops bpftrace and returns how many keys (4-tuples, timers) each of
    /// its maps ended with (None when it did not finish printing them
    /// within [`BPFTRACE_PRINT_GRACE`]) and how long it took. Only a sanity
    /// check: the costs come from the kernel's counters, read before this.
    pub fn finish(mut self) -> BpftraceMaps {
        let t = Instant::now();
        let printed = stop_child_within(&mut self.child, libc::SIGINT, BPFTRACE_PRINT_GRACE);
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        BpftraceMaps {
            keys: printed.then(|| {
                ["retransmit", "state", "ack", "timer", "drop"]
                    .iter()
                    .map(|m| {
                        let prefix = format!("@{m}[");
                        (
                            (*m).to_owned(),
                            text.lines().filter(|l| l.starts_with(&prefix)).count(),
                        )
                    })
                    .collect()
            }),
            secs: t.elapsed().as_secs_f64(),
        }
    }
}

/// What bpftrace printed at exit.
#[derive(Debug, Clone)]
pub struct BpftraceMaps {
    /// Keys per map; None when it was killed before it finished printing.
    pub keys: Option<Vec<(String, usize)>>,
    /// Seconds from SIGINT to its exit (or the kill).
    pub secs: f64,
}

/// A long-running process inside a network namespace; killed on drop.
pub struct NsProcess(Child);

impl NsProcess {
    pub fn start(ns: &str, args: &[&str]) -> anyhow::Result<NsProcess> {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {args:?} in netns {ns}"))?;
        Ok(NsProcess(child))
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        stop_child(&mut self.0, libc::SIGTERM);
    }
}
