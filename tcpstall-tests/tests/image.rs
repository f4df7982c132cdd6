//! The container image holds what the DaemonSet runs: `cargo xtask image`
//! builds it (static musl binary, FROM scratch) and `cargo xtask test` passes
//! its name in `TCPSTALL_IMAGE`. Running containers does not work on the CI's
//! hybrid-cgroup host, so this test unpacks what the image holds: `podman
//! save`, every layer extracted in order into a root filesystem, then the
//! agent run from that root with `chroot` (in a private mount namespace with
//! the kernel filesystems a container runtime would mount): `--version`, and
//! `doctor --json`, whose probe plan must equal the host agent's.
//!
//! Privileged (root, BPF): run through `cargo xtask test`.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;
use tcpstall_tests::{agent_path, plan_chosen, require, require_root};

struct Scratch(PathBuf);

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

/// `tcpstall args` chrooted into `rootfs`, in a private mount namespace with
/// /proc, /sys (read-only), tracefs and cgroup2 mounted as a runtime would.
fn in_root(rootfs: &Path, args: &str) -> (bool, String, String) {
    let r = rootfs.display();
    let script = format!(
        "set -e; mkdir -p {r}/proc {r}/sys; \
         mount -t proc proc {r}/proc; \
         mount -t sysfs -o ro sysfs {r}/sys; \
         mount -t tracefs tracefs {r}/sys/kernel/tracing; \
         mount -t cgroup2 -o ro cgroup2 {r}/sys/fs/cgroup; \
         exec chroot {r} /usr/local/bin/tcpstall {args}"
    );
    run(Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]))
}

#[test]
fn image_holds_a_working_static_agent() {
    require_root();
    let image = std::env::var("TCPSTALL_IMAGE").unwrap_or_default();
    require(
        !image.is_empty(),
        "TCPSTALL_IMAGE (an image built by `cargo xtask image`)",
        "run through `cargo xtask test`, which builds the image first",
    );
    let dir = std::env::temp_dir().join(format!("tcpstall-image-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let _guard = Scratch(dir.clone());
    let (rootfs, config) = unpack(&image, &dir);

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
