//! `cargo xtask bench`, second part: what each kernel program costs per run,
//! measured by the kernel itself (BPF run-time statistics, switched on by the
//! agent's `--program-stats` for as long as it runs) under loopback TCP load.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tcpstall_tests::{http_get, metric_sum};

const LOAD: Duration = Duration::from_secs(5);
/// The agent folds kernel counters in once a second.
const SETTLE: Duration = Duration::from_millis(1_500);

/// Stops the agent on every path out.
struct AgentGuard(Child);

impl Drop for AgentGuard {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(agent: &Path) -> anyhow::Result<(AgentGuard, SocketAddr)> {
    let mut child = Command::new(agent)
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--program-stats",
            "--log-format",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", agent.display()))?;
    let out = child.stdout.take().context("agent stdout")?;
    let guard = AgentGuard(child);
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
    let listen = rx
        .recv_timeout(Duration::from_secs(60))
        .context("the agent did not report `tcpstall running` within 60 s")?;
    let addr = listen
        .parse()
        .with_context(|| format!("agent listen address {listen:?}"))?;
    Ok((guard, addr))
}

/// Per-program (runs, seconds) from the agent's metrics.
fn snapshot(addr: SocketAddr, programs: &[String]) -> Vec<(f64, f64)> {
    let (_, text) = http_get(addr, "/metrics");
    programs
        .iter()
        .map(|p| {
            let l = [("program", p.as_str())];
            (
                metric_sum(&text, "tcpstall_probe_runs_total", &l).unwrap_or(0.0),
                metric_sum(&text, "tcpstall_probe_run_seconds_total", &l).unwrap_or(0.0),
            )
        })
        .collect()
}

/// Loopback bulk transfer for `LOAD`; returns the bytes moved.
fn loopback_load() -> anyhow::Result<u64> {
    let listener = TcpListener::bind("127.0.0.1:0").context("loopback listener")?;
    let addr = listener.local_addr()?;
    let sink = thread::spawn(move || -> u64 {
        let Ok((mut s, _)) = listener.accept() else {
            return 0;
        };
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    });
    let mut c = TcpStream::connect(addr).context("loopback connect")?;
    let chunk = vec![b'x'; 16 * 1024];
    let t0 = Instant::now();
    while t0.elapsed() < LOAD {
        c.write_all(&chunk).context("loopback write")?;
    }
    drop(c);
    Ok(sink.join().unwrap_or(0))
}

pub fn run(agent: &Path) -> anyhow::Result<()> {
    let (guard, addr) = start_agent(agent)?;
    let (status, plan) = http_get(addr, "/api/v1/plan");
    if status != 200 {
        bail!("GET /api/v1/plan answered {status}: {plan}");
    }
    let plan: serde_json::Value = serde_json::from_str(&plan).context("plan JSON")?;
    let mut programs: Vec<String> = plan["probes"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["attempts"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["error"].is_null())
        .filter_map(|a| a["program"].as_str().map(str::to_owned))
        .collect();
    programs.dedup();
    thread::sleep(SETTLE);
    let before = snapshot(addr, &programs);
    let bytes = loopback_load()?;
    thread::sleep(SETTLE);
    let after = snapshot(addr, &programs);
    drop(guard);

    println!(
        "\nkernel programs under {:.0} s of loopback bulk TCP ({:.1} GB moved), measured by the kernel:",
        LOAD.as_secs_f64(),
        bytes as f64 / 1e9
    );
    println!("{:<32} {:>12} {:>10}", "program", "runs", "ns/run");
    for (p, (b, a)) in programs.iter().zip(before.iter().zip(&after)) {
        let runs = a.0 - b.0;
        let ns = if runs > 0.0 {
            format!("{:.0}", (a.1 - b.1) * 1e9 / runs)
        } else {
            "-".to_owned()
        };
        println!("{p:<32} {runs:>12.0} {ns:>10}");
    }
    Ok(())
}
