//! The container image holds what the DaemonSet runs: `cargo xtask image`
//! builds it (static musl binary, FROM scratch) and `cargo xtask test` passes
//! its name in `TCPSTALL_IMAGE`. Running containers does not work on the CI's
//! hybrid-cgroup host, so these tests unpack what the image holds: `podman
//! save`, every layer extracted in order into a root filesystem, then the
//! agent run from that root with `chroot` (in a private mount namespace with
//! the kernel filesystems a container runtime would mount): `--version`,
//! `doctor --json`, whose probe plan must equal the host agent's, and `run`
//! itself against real stalls (S1 live, and one the start-up sweep must
//! find), so the binary users deploy is the binary under test.
//!
//! Privileged (root, BPF): run through `cargo xtask test`.

use std::{
    collections::BTreeSet,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use serde_json::Value;
use tcpstall_tests::{
    Agent, Conn, Link, agent_path, ev_str, ev_u64, monotonic_ns, plan_chosen, require,
    require_root, require_tools,
};

/// A scratch directory of one test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("tcpstall-image-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let (ok, out, err) = run(cmd);
    assert!(ok, "{shown} failed:\n{out}{err}");
    out
}

/// Regular files and symlinks under `root`, relative.
fn files(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else {
                out.insert(
                    e.path()
                        .strip_prefix(root)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    out
}

/// The image's root filesystem and its config, unpacked from `podman save`.
fn unpack(image: &str, dir: &Path) -> (PathBuf, Value) {
    let tar = dir.join("image.tar");
    ok(Command::new("podman")
        .args(["save", "--format", "docker-archive", "-o"])
        .arg(&tar)
        .arg(image));
    let archive = dir.join("archive");
    fs::create_dir_all(&archive).unwrap();
    ok(Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&archive));
    let manifest: Value = serde_json::from_str(
        &fs::read_to_string(archive.join("manifest.json")).expect("manifest.json"),
    )
    .unwrap();
    let m = &manifest[0];
    let config: Value = serde_json::from_str(
        &fs::read_to_string(archive.join(m["Config"].as_str().expect("Config"))).unwrap(),
    )
    .unwrap();
    let rootfs = dir.join("rootfs");
    fs::create_dir_all(&rootfs).unwrap();
    for layer in m["Layers"].as_array().expect("Layers") {
        ok(Command::new("tar")
            .arg("-xf")
            .arg(archive.join(layer.as_str().unwrap()))
            .arg("-C")
            .arg(&rootfs));
    }
    (rootfs, config)
}

/// The image's name (`TCPSTALL_IMAGE`), required.
fn image_name() -> String {
    let image = std::env::var("TCPSTALL_IMAGE").unwrap_or_default();
    require(
        !image.is_empty(),
        "TCPSTALL_IMAGE (an image built by `cargo xtask image`)",
        "run through `cargo xtask test`, which builds the image first",
    );
    image
}

/// Shell commands that exec `tcpstall` chrooted into `rootfs` with /proc,
/// /sys (read-only), tracefs and cgroup2 mounted as a runtime would; to be
/// run in a private mount namespace (the mounts go with it).
fn chroot_script(rootfs: &Path, args: &str) -> String {
    let r = rootfs.display();
    format!(
        "set -e; mkdir -p {r}/proc {r}/sys; \
         mount -t proc proc {r}/proc; \
         mount -t sysfs -o ro sysfs {r}/sys; \
         mount -t tracefs tracefs {r}/sys/kernel/tracing; \
         mount -t cgroup2 -o ro cgroup2 {r}/sys/fs/cgroup; \
         exec chroot {r} /usr/local/bin/tcpstall {args}"
    )
}

/// `tcpstall args` chrooted into `rootfs` (see [`chroot_script`]).
fn in_root(rootfs: &Path, args: &str) -> (bool, String, String) {
    run(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &chroot_script(rootfs, args),
    ]))
}

/// A file's identity, (device, inode); for `/proc/<pid>/exe`, that of the
/// executable the process runs.
fn file_id(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (m.dev(), m.ino())
}

/// `tcpstall run` (with the harness's arguments and `extra`) from the
/// image's root, as [`in_root`] runs it, through a launcher script in `dir`
/// that only `exec`s (unshare, sh, chroot): the agent keeps the launcher's
/// pid, so the harness's SIGTERM reaches it and its mounts go with it.
/// Fails unless the process the harness runs is the image's binary (its
/// `/proc/<pid>/exe` is the file unpacked from the image), not the host
/// build.
fn start_image_agent(dir: &Path, rootfs: &Path, extra: &[&str]) -> Agent {
    use std::os::unix::fs::PermissionsExt;
    let launcher = dir.join("tcpstall-from-image");
    let script = chroot_script(rootfs, "\"$@\"");
    fs::write(
        &launcher,
        format!(
            "#!/bin/sh\nexec unshare --mount --propagation private sh -c '{script}' tcpstall \"$@\"\n"
        ),
    )
    .unwrap();
    fs::set_permissions(&launcher, fs::Permissions::from_mode(0o755)).unwrap();
    let agent = Agent::start_binary(&launcher, extra);
    let pid = agent.pid().expect("the agent runs");
    let image_bin = rootfs.join("usr/local/bin/tcpstall");
    assert_eq!(
        file_id(Path::new(&format!("/proc/{pid}/exe"))),
        file_id(&image_bin),
        "the agent under test (pid {pid}) is not the image's binary {}",
        image_bin.display()
    );
    agent
}

/// Predicted death minus the actual one, in seconds.
fn prediction_error_s(predicted_ns: u64, died_ns: u64) -> f64 {
    (predicted_ns as f64 - died_ns as f64) / 1e9
}

#[test]
fn image_holds_a_working_static_agent() {
    require_root();
    let image = image_name();
    let scratch = Scratch::new("static");
    let (rootfs, config) = unpack(&image, &scratch.0);

    // FROM scratch: the binary and nothing else (no shell, no libc, no loader).
    assert_eq!(
        files(&rootfs),
        BTreeSet::from(["usr/local/bin/tcpstall".to_owned()]),
        "the image must hold only the agent"
    );
    let cfg = &config["config"];
    assert_eq!(
        cfg["Entrypoint"],
        serde_json::json!(["/usr/local/bin/tcpstall"])
    );
    assert!(cfg["ExposedPorts"]["9977/tcp"].is_object(), "{cfg}");

    // --version from the image's root (runs only if it is static).
    let (ok_v, out, err) = in_root(&rootfs, "--version");
    assert!(
        ok_v,
        "tcpstall --version in the image's root failed:\n{out}{err}"
    );
    assert_eq!(
        out.trim(),
        format!("tcpstall {}", env!("CARGO_PKG_VERSION"))
    );

    // doctor --json: real probe loading from the image; the plan must be the
    // host agent's (same kernel, same mechanisms chosen).
    let (ok_d, out, err) = in_root(&rootfs, "doctor --json");
    assert!(
        ok_d,
        "tcpstall doctor --json in the image's root failed:\n{out}{err}"
    );
    let plan: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("doctor JSON: {e}\n{out}"));
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(plan["kernel"].as_str(), Some(release.trim()));
    let host = ok(Command::new(agent_path()).args(["doctor", "--json"]));
    let host: Value = serde_json::from_str(&host).unwrap();
    let (img, hst) = (plan_chosen(&plan), plan_chosen(&host));
    assert!(!img.is_empty());
    assert!(
        img.iter().all(|(p, c)| c != "NONE"
            || plan["probes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["probe"] == p.as_str() && x["required"] == false)),
        "a required probe has no mechanism in the image: {img:?}"
    );
    assert_eq!(
        img, hst,
        "the image's agent chose other mechanisms than the host's"
    );
}

/// S1 against the image's binary: a client in a test namespace with
/// `tcp_retries2 = 5` whose server is blackholed (nftables in the server's
/// namespace) after a first acknowledged write. The agent from the image must
/// list the flow in `/api/v1/stalls` as a `retransmit` stall with a predicted
/// death before the kernel kills it; every prediction it showed must be
/// within max(5 % of the boundary, 1 s) of the ETIMEDOUT the application
/// saw (the sweep tests' tolerance; tests/scenarios.rs checks the host
/// build to the jiffy), and it must log the flow's own death.
/// Mutation: the launcher exec'ing the host build (`agent_path()`) in place
/// of the image's `/usr/local/bin/tcpstall` -> fails with "the agent under
/// test (pid ...) is not the image's binary".
#[test]
fn image_agent_reports_an_s1_stall_with_its_predicted_death() {
    require_tools();
    let image = image_name();
    // Dropped last: the agent (its mounts) and the namespaces go first.
    let scratch = Scratch::new("s1");
    let (rootfs, _) = unpack(&image, &scratch.0);
    let link = Link::new("img1", 93);
    link.a.sysctl("net.ipv4.tcp_retries2", "5");
    let mut agent = start_image_agent(&scratch.0, &rootfs, &[]);
    let conn = Conn::establish(&link, 8080, None);
    let (local, server) = (conn.local, conn.server);
    assert!(
        agent.stall_of(local, server).is_none(),
        "a healthy idle connection must not be listed"
    );
    let _blackhole = link.b.blackhole_from(link.a_ip);
    let (t_write, reader) = conn.write_and_await_death(Duration::from_secs(60));
    let mut views: Vec<(u64, Value)> = Vec::new();
    while !reader.is_finished() {
        let now = monotonic_ns();
        if let Some(v) = agent.stall_of(local, server) {
            views.push((now, v));
        }
        thread::sleep(Duration::from_millis(50));
    }
    let (died_ns, errno) = reader.join().expect("reader");
    assert_eq!(errno, Some(libc::ETIMEDOUT), "killed with ETIMEDOUT");
    views.retain(|(t, _)| *t < died_ns);
    let first = &views
        .first()
        .unwrap_or_else(|| {
            panic!("the image's agent never listed the stalled flow {local} -> {server}")
        })
        .1;
    assert_eq!(ev_str(first, "class"), "retransmit", "{first}");
    assert_eq!(
        ev_str(first, "boundary_source"),
        "tcp_retries2=5",
        "{first}"
    );
    let boundary_s = first["boundary_s"].as_f64().expect("boundary_s");
    let tolerance = (0.05 * boundary_s).max(1.0);
    let predictions: Vec<(u64, u64)> = views
        .iter()
        .filter_map(|(t, v)| v["predicted_timeout_ns"].as_u64().map(|p| (*t, p)))
        .collect();
    assert!(
        !predictions.is_empty(),
        "no predicted death while listed: {views:?}"
    );
    for &(seen, p) in &predictions {
        let err = prediction_error_s(p, died_ns);
        assert!(
            err.abs() <= tolerance,
            "prediction seen {:.1} s after the write is off by {err:+.3} s (tolerance \
             {tolerance:.2} s)",
            seen.saturating_sub(t_write) as f64 / 1e9
        );
    }
    eprintln!(
        "IMAGE S1 | listed {:.2} s after the write | first prediction {:.2} s ahead, off by \
         {:+.3} s | {} views",
        views[0].0.saturating_sub(t_write) as f64 / 1e9,
        died_ns.saturating_sub(predictions[0].0) as f64 / 1e9,
        prediction_error_s(predictions[0].1, died_ns),
        views.len()
    );
    let cookie = agent
        .cookie_of(local, server)
        .expect("the flow's socket cookie in the agent's event log");
    let timed_out = agent.wait_timeout_of(cookie, Duration::from_secs(10));
    assert_eq!(ev_str(&timed_out, "evidence"), "etimedout", "{timed_out}");
    // A clean exit on SIGTERM from the image's root.
    agent.stop();
}

/// The start-up sweep of the image's binary: a connection blackholed
/// 13.5 s before the agent starts (`tcp_retries2 = 15`: six RTO expiries
/// behind it, the next about 12 s away, so no kernel event can tell the
/// agent of it soon) is in `/api/v1/stalls` within 2 s of `/readyz` turning
/// ready, as a `retransmit` stall with its RTOs counted and a predicted
/// death (tests/sweep.rs's `started_mid_stall`, here with the image's agent).
/// Mutation: the image's agent started with `--no-startup-sweep
/// --sweep-interval 0` -> fails with "not listed within 2 s of /readyz".
#[test]
fn image_agent_startup_sweep_finds_a_stall_in_progress() {
    require_tools();
    let image = image_name();
    let scratch = Scratch::new("sweep");
    let (rootfs, _) = unpack(&image, &scratch.0);
    let link = Link::new("img2", 94);
    link.a.sysctl("net.ipv4.tcp_retries2", "15");
    let mut conn = Conn::establish(&link, 8080, None);
    let (local, server) = (conn.local, conn.server);
    let _blackhole = link.b.blackhole_from(link.a_ip);
    let t_write = monotonic_ns();
    conn.client
        .write_all(&[b'x'; 1000])
        .expect("write into the blackhole");
    thread::sleep(Duration::from_millis(13_500));
    let agent = start_image_agent(&scratch.0, &rootfs, &[]);
    let ready = agent.wait_ready(Duration::from_secs(30));
    let mut seen = None;
    while monotonic_ns() < ready + 2_000_000_000 {
        if let Some(v) = agent.stall_of(local, server) {
            seen = Some((monotonic_ns(), v));
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let (seen_ns, first) = seen.unwrap_or_else(|| {
        panic!(
            "the stall in progress {local} -> {server} was not listed within 2 s of /readyz: {:?}",
            agent.stalls()
        )
    });
    eprintln!(
        "IMAGE SWEEP | listed {:.2} s after /readyz",
        seen_ns.saturating_sub(ready) as f64 / 1e9
    );
    assert_eq!(ev_str(&first, "class"), "retransmit", "{first}");
    assert!(
        ev_u64(&first, "rto_streak") >= 4,
        "the RTOs it already had are counted: {first}"
    );
    assert_eq!(
        ev_str(&first, "boundary_source"),
        "tcp_retries2=15",
        "{first}"
    );
    let boundary_s = first["boundary_s"].as_f64().expect("boundary_s");
    let predicted = first["predicted_timeout_ns"]
        .as_u64()
        .unwrap_or_else(|| panic!("a prediction at once: {first}"));
    // The boundary counts from the first retransmission, shortly after the
    // write; death is at the first RTO expiry at or past it (RTOs are at
    // most 120 s apart, plus timer-wheel lateness).
    let from_write = (predicted as f64 - t_write as f64) / 1e9;
    assert!(
        from_write >= boundary_s && from_write <= boundary_s + 125.0,
        "predicted death {from_write:.1} s after the write, boundary {boundary_s} s: {first}"
    );
}
