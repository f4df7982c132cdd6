//! The real agent as a child process ([`Agent`]: start, logs, HTTP API) and
//! readers of its event JSON and `doctor --json` output.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::util::{http_get, monotonic_ns, require, wait_until};

/// The environment variable naming the agent binary under test (set by
/// `cargo xtask test`; its own name: `TCPSTALL_AGENT` is `tcpstall top
/// --agent`, the URL of an agent).
pub const AGENT_BIN_ENV: &str = "TCPSTALL_AGENT_BIN";

/// The start-up line of a probe loaded but attached only while a flow needs
/// it (the drop probe; `tcpstall/src/app/logs.rs`).
pub const PROBE_ON_DEMAND: &str =
    "probe loaded, attached on demand: only while a flow is in a loss episode";

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

/// How many of the agent's non-event log lines a [`Agent::wait_log`]
/// timeout prints.
const WAIT_LOG_TAIL: usize = 20;

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
            if Instant::now() >= deadline {
                // What the agent said besides its events (warnings: lost
                // events, missed runs), for the diagnosis.
                let lines = self.lines.lock().expect("lock");
                let events = lines.iter().filter(|v| v["message"] == "event").count();
                let said: Vec<String> = lines
                    .iter()
                    .filter(|v| v["message"] != "event")
                    .map(|v| v.to_string())
                    .collect();
                let tail = &said[said.len().saturating_sub(WAIT_LOG_TAIL)..];
                panic!(
                    "timed out waiting for {what} ({} s; {events} events logged); the agent's last {} other lines:\n{}",
                    timeout.as_secs(),
                    tail.len(),
                    tail.join("\n")
                );
            }
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

/// Field accessors for event JSON lines.
pub fn ev_str<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("")
}

pub fn ev_u64(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
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

    /// The flow's stall entries, each with the monotonic instant it was
    /// read, polled every `every` until `done` is finished (a thread that
    /// waits for the socket's death).
    pub fn views_until<T>(
        &self,
        local: SocketAddr,
        remote: SocketAddr,
        done: &thread::JoinHandle<T>,
        every: Duration,
    ) -> Vec<(u64, Value)> {
        let mut views = Vec::new();
        while !done.is_finished() {
            let now = monotonic_ns();
            if let Some(v) = self.stall_of(local, remote) {
                views.push((now, v));
            }
            thread::sleep(every);
        }
        views
    }

    /// The /metrics text.
    pub fn metrics(&self) -> String {
        let (status, body) = self.http_get("/metrics");
        assert_eq!(status, 200, "GET /metrics: {body}");
        body
    }
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

impl Agent {
    /// Like [`Agent::start`], but runs `program` instead of the agent from
    /// [`agent_path`]: another build of `tcpstall` (the binary of the
    /// container image), or a launcher that `exec`s one with the arguments
    /// it is given (so [`Agent::pid`] is the agent's).
    pub fn start_binary(program: &std::path::Path, extra: &[&str]) -> Self {
        Self::spawn(Command::new(program), extra)
    }
}

impl Agent {
    /// `GET /api/v1/guard`.
    pub fn guard(&self) -> Value {
        let (code, body) = self.http_get("/api/v1/guard");
        assert_eq!(code, 200, "GET /api/v1/guard: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("guard JSON: {e}: {body}"))
    }

    /// Waits until every rule of `rules` covers a cgroup in the kernel map.
    pub fn wait_guard_covers(&self, rules: &[&str]) {
        wait_until(
            Duration::from_secs(15),
            Duration::from_millis(200),
            "the guard covering the pods' cgroups",
            || {
                let g = self.guard();
                let covered: Vec<String> = g["cgroups"]
                    .as_array()
                    .map(|a| a.iter().map(|c| ev_str(c, "rule").to_owned()).collect())
                    .unwrap_or_default();
                if rules.iter().all(|w| covered.iter().any(|c| c == w)) {
                    Ok(())
                } else {
                    Err(format!("{}", g["cgroups"]))
                }
            },
        );
    }
}

/// The guard's record (`/api/v1/guard` document `guard`) of the socket at
/// `local`, if any.
pub fn guard_record(guard: &Value, local: &str) -> Option<Value> {
    guard["sockets"]
        .as_array()?
        .iter()
        .find(|s| s["local"] == local)
        .cloned()
}

/// The strings of a JSON array (empty for anything else).
pub fn json_strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
