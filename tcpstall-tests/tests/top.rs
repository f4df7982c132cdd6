//! `tcpstall top` in a real terminal: the real agent, scenario S1 (blackholed
//! peer, tcp_retries2 = 8 in the client namespace: ETIMEDOUT about 102 s
//! after the write), `tcpstall top` running in a tmux pane. Two captures of
//! the pane show the stalled row (class, local and remote address, RTOs) and
//! a countdown to ETIMEDOUT that decreases between them; `--once` prints the
//! same row as a plain table; without an agent, `top` exits non-zero with one
//! line naming the URL; the harness's own variable is not read by `top`.
//!
//! Privileged (root, namespaces, BPF); needs tmux (Debian package `tmux`,
//! installed by `cargo xtask setup`). Run with `--test-threads=1`.

use std::{
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use tcpstall_tests::*;

/// A private tmux server (its own socket) running one command in a fixed
/// size window; killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(cmd: &[&str]) -> Self {
        let socket = format!("tcpstall-top-test-{}", std::process::id());
        let mut args = vec![
            "-L",
            &socket,
            "new-session",
            "-d",
            "-x",
            "200",
            "-y",
            "30",
            "-s",
            "top",
        ];
        args.extend_from_slice(cmd);
        run_ok(
            Command::new("tmux")
                .args(&args)
                .env("TERM", "xterm-256color"),
            "tmux new-session",
        );
        Tmux { socket }
    }

    fn capture(&self) -> String {
        run_ok(
            Command::new("tmux").args(["-L", &self.socket, "capture-pane", "-p", "-t", "top"]),
            "tmux capture-pane",
        )
    }

    /// Captures the pane every 100 ms until `done` holds or 10 s passed;
    /// returns the last capture (the caller asserts on it).
    fn wait_for(&self, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pane = self.capture();
            if done(&pane) || Instant::now() >= deadline {
                return pane;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn keys(&self, keys: &str) {
        let st = Command::new("tmux")
            .args(["-L", &self.socket, "send-keys", "-t", "top", keys])
            .status()
            .expect("tmux send-keys");
        assert!(st.success());
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

fn require_tmux() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("tmux"))
            .find(|p| p.is_file())
    });
    require(
        found.is_some(),
        "tmux (Debian package `tmux`)",
        "apt-get install tmux (or cargo xtask setup)",
    );
    found.expect("checked")
}

/// The seconds of the `T-12.3s` countdown on the line naming `local`.
fn countdown_of(pane: &str, local: &str) -> Option<f64> {
    let line = pane.lines().find(|l| l.contains(local))?;
    let t = line.split_whitespace().find(|w| w.starts_with("T-"))?;
    t.trim_start_matches("T-")
        .trim_end_matches('s')
        .parse()
        .ok()
}

/// The harness's variable naming the agent binary ([`AGENT_BIN_ENV`], set
/// in the environment of every test) does not configure `tcpstall top`,
/// whose `--agent` URL reads `TCPSTALL_AGENT`: with the variable inherited
/// and no agent at the default URL (`TCPSTALL_LISTEN`), the one-line error
/// names that URL. No agent, no root needed.
/// Mutation: `AGENT_BIN_ENV` = `"TCPSTALL_AGENT"` (the harness's old name;
/// `tcpstall-tests/src/lib.rs`) -> fails with "--agent
/// /.../tcpstall: expected http://HOST:PORT".
#[test]
fn top_is_not_configured_by_the_harness_variable() {
    let bin = agent_path();
    let out = Command::new(&bin)
        .args(["top", "--once"])
        .env_remove("TCPSTALL_AGENT")
        .env(AGENT_BIN_ENV, &bin)
        .env("TCPSTALL_LISTEN", "127.0.0.1:1")
        .output()
        .expect("run tcpstall top");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "top without an agent must fail");
    assert!(
        err.contains("no tcpstall agent answers at http://127.0.0.1:1"),
        "{err}"
    );
}

#[test]
fn top_shows_the_stall_with_a_running_countdown() {
    require_tools();
    require_tmux();
    let bin = agent_path();

    // No agent: one clear line, non-zero exit.
    let out = Command::new(&bin)
        .args(["top", "--once", "--agent", "http://127.0.0.1:1"])
        .output()
        .expect("run tcpstall top");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "top without an agent must fail");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("no tcpstall agent answers at http://127.0.0.1:1"),
        "{err}"
    );

    let link = Link::new("ptop", 41);
    link.a.sysctl("net.ipv4.tcp_retries2", "8");
    let agent = Agent::start(&[]);
    let url = format!("http://{}", agent.listen);
    let conn = Conn::establish(&link, 8080, None);
    let (local, remote) = (conn.local.to_string(), conn.server.to_string());
    let _blackhole = link.b.blackhole_from(link.a_ip);
    let (_t_write, reader) = conn.write_and_await_death(Duration::from_secs(150));

    // The agent reports the stall with a prediction.
    let (local_addr, remote_addr) = (local.parse().unwrap(), remote.parse().unwrap());
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(200),
        "the agent never listed the stall with a prediction",
        || match agent.stall_of(local_addr, remote_addr) {
            Some(s) if s["seconds_to_timeout"].is_number() => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );

    // --once: a plain table with the row.
    let table = run_ok(
        Command::new(&bin).args(["top", "--once", "--agent", &url]),
        "tcpstall top --once",
    );
    assert!(table.starts_with("ETIMEDOUT"), "{table}");
    let row = table
        .lines()
        .find(|l| l.contains(&local))
        .unwrap_or_else(|| panic!("--once has no row for {local}:\n{table}"));
    assert!(row.contains(&remote) && row.contains("retransmit"), "{row}");
    assert!(row.starts_with("T-"), "{row}");

    // The live view in a real terminal.
    let tmux = Tmux::start(&[
        bin.to_str().expect("utf-8 path"),
        "top",
        "--agent",
        &url,
        "--interval",
        "0.5",
    ]);
    let (pane1, t1) = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(200),
        "the pane never showed the stalled row",
        || {
            let pane = tmux.capture();
            match countdown_of(&pane, &local) {
                Some(t) => Ok((pane, t)),
                None => Err(format!("\n{pane}")),
            }
        },
    );
    let line = pane1.lines().find(|l| l.contains(&local)).unwrap();
    assert!(
        line.contains(&remote) && line.contains("retransmit"),
        "row: {line}\n{pane1}"
    );
    assert!(
        pane1.contains("tcpstall top") && pane1.contains(&url),
        "{pane1}"
    );
    // The countdown is the API's prediction for the same flow (mutation,
    // run: top's countdown 2 s off, `seconds_to_timeout.map(|s| s + 2.0)`
    // in `tcpstall/src/cli/top.rs` -> "top shows T-108s, the API's
    // prediction ... gives [105.87, 107.08] s"): top shows
    // `predicted - now` as of its last fetch (every 0.5 s), so between the
    // prediction as of just after the capture and as of 0.5 s (plus a
    // redraw under load, 0.5 s, and the display's 0.1 s rounding) before.
    let m0 = monotonic_ns();
    let pane = tmux.capture();
    let m1 = monotonic_ns();
    let shown =
        countdown_of(&pane, &local).unwrap_or_else(|| panic!("the capture lost the row:\n{pane}"));
    let api = agent
        .stall_of(local_addr, remote_addr)
        .unwrap_or_else(|| panic!("the API lost the flow"));
    let predicted = api["predicted_timeout_ns"]
        .as_u64()
        .unwrap_or_else(|| panic!("no prediction: {api}"));
    let (lo, hi) = (
        (predicted as f64 - m1 as f64) / 1e9 - 0.1,
        (predicted as f64 - m0 as f64) / 1e9 + 1.1,
    );
    assert!(
        (lo..=hi).contains(&shown),
        "top shows T-{shown}s, the API's prediction for {local} gives [{lo:.2}, {hi:.2}] s: {api}\n{pane}"
    );
    thread::sleep(Duration::from_secs(2));
    let pane2 = tmux.capture();
    let t2 = countdown_of(&pane2, &local)
        .unwrap_or_else(|| panic!("second capture lost the row:\n{pane2}"));
    assert!(
        t2 < t1 - 1.0 && t2 > t1 - 4.0,
        "the countdown must run down by about 2 s: {t1} -> {t2}\n{pane2}"
    );

    // Filter keys: a filter that matches nothing hides the row, Esc clears it.
    tmux.keys("/");
    tmux.keys("no-such-pod");
    tmux.keys("Enter");
    // The view redraws after each key (and every 250 ms); under load that
    // can take longer than a fixed sleep: wait for it, up to 10 s.
    let pane3 =
        tmux.wait_for(|p| !p.lines().any(|l| l.contains(&local)) && p.contains("(0 shown)"));
    assert!(
        !pane3.lines().any(|l| l.contains(&local)) && pane3.contains("(0 shown)"),
        "filtered view:\n{pane3}"
    );
    tmux.keys("Escape");
    let pane4 = tmux.wait_for(|p| p.contains(&local));
    assert!(pane4.contains(&local), "filter cleared:\n{pane4}");
    drop(tmux);

    drop(_blackhole);
    drop(reader);
    drop(agent);
}
