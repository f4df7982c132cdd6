//! Prerequisite checks (`require*`), command runners, a minimal HTTP GET,
//! polling with a deadline ([`wait_until`]), the monotonic clock and the
//! test notes.

use std::{
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

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
