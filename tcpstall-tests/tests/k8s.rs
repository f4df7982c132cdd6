//! A simulated Kubernetes node: real cgroup v2 directories with the kubelet's
//! naming under the host's cgroup2 mount, container runtime state files in a
//! temporary root given to the agent by flags, a pod whose pause process is
//! started first in the pod's network namespace and whose app process (moved
//! into its container cgroup before it creates its socket) makes the
//! connection. The agent must name the app's pod, namespace, container and
//! process (API, per-flow metrics, log line), never the pause container:
//!
//! - systemd driver + containerd, S1 (blackholed peer) from the app;
//! - cgroupfs driver + CRI-O, a hostNetwork pod (socket in the host netns);
//! - a plain host process: no pod labels, process shown.
//!
//! Privileged (root, BPF, namespaces, cgroup2): run through `cargo xtask test`.

use std::{
    fs,
    io::Write as _,
    net::{SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tcpstall_tests::{
    Agent, ExpectedOwner, Link, Proc, assert_owner_named, drain, ev_str, listen_in, require,
    require_tools, spawn_in_cgroup,
};

const POD_UID: &str = "0b3c7a51-7e0d-4c2a-9f43-5a1d2e3f4a5b";
const HOSTNET_UID: &str = "9f8e7d6c-5b4a-4392-8170-6e5d4c3b2a19";
const APP_ID: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
const PAUSE_ID: &str = "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";
const HOSTNET_ID: &str = "c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3";

fn cgroup2_root() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mount = pre.split_whitespace().nth(4)?;
        (post.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount))
    });
    require(
        root.is_some(),
        "a cgroup2 mount",
        "mount cgroup2 (pure v2 or hybrid host)",
    );
    root.unwrap()
}

/// cgroup directories created for the test; removed (deepest first) on drop,
/// after the processes in them were killed.
struct Cgroups {
    created: Vec<PathBuf>,
}

impl Cgroups {
    fn make(&mut self, root: &Path, rel: &str) -> PathBuf {
        let mut p = root.to_path_buf();
        for seg in rel.split('/').filter(|s| !s.is_empty()) {
            p.push(seg);
            if !p.exists() {
                fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
                self.created.push(p.clone());
            }
        }
        p
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for d in self.created.iter().rev() {
            if let Ok(procs) = fs::read_to_string(d.join("cgroup.procs")) {
                for pid in procs.lines() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            for _ in 0..50 {
                if fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn write(p: &Path, text: &str) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

/// A copy of bash under `name` (its comm), for a recognisable process.
fn named_shell(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    fs::copy("/bin/bash", &p).expect("bash");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Start `shell -c script`, optionally in a network namespace; the script's
/// first command moves the shell into `cgroup` (before any socket exists).
fn spawn(netns: Option<&str>, shell: &Path, cgroup: &Path, script: &str) -> Proc {
    spawn_in_cgroup(
        netns,
        cgroup,
        shell,
        &["-c", script],
        Stdio::null(),
        Stdio::null(),
    )
}

fn containerd_spec(kind: &str, name: &str, pod: &str, ns: &str, uid: &str) -> String {
    format!(
        r#"{{"ociVersion":"1.1.0","process":{{"env":["PATH=/bin"]}},"annotations":{{
        "io.kubernetes.cri.container-type":"{kind}","io.kubernetes.cri.container-name":"{name}",
        "io.kubernetes.cri.sandbox-id":"{PAUSE_ID}","io.kubernetes.cri.sandbox-name":"{pod}",
        "io.kubernetes.cri.sandbox-namespace":"{ns}","io.kubernetes.cri.sandbox-uid":"{uid}"}}}}"#
    )
}

fn wait_stall(agent: &Agent, pred: impl Fn(&Value) -> bool, what: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = agent.stalls().into_iter().find(|v| pred(v)) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no stall for {what}: {:?}",
            agent.stalls()
        );
        thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn pods_containers_and_processes_from_cgroups_and_runtime_state() {
    require_tools();
    let cg_root = cgroup2_root();
    let tmp = std::env::temp_dir().join(format!("tcpstall-k8s-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).unwrap();
    let _scratch = Scratch(tmp.clone());
    let mut cgroups = Cgroups {
        created: Vec::new(),
    };

    // Runtime state: containerd bundles (app + its sandbox), CRI-O config
    // for the hostNetwork pod.
    let containerd = tmp.join("containerd");
    let crio = tmp.join("crio");
    let tasks = containerd.join("io.containerd.runtime.v2.task/k8s.io");
    write(
        &tasks.join(APP_ID).join("config.json"),
        &containerd_spec("container", "app", "web-7d9f-abcde", "shop", POD_UID),
    );
    write(
        &tasks.join(PAUSE_ID).join("config.json"),
        &containerd_spec("sandbox", "", "web-7d9f-abcde", "shop", POD_UID),
    );
    write(
        &crio
            .join("overlay-containers")
            .join(HOSTNET_ID)
            .join("userdata/config.json"),
        &format!(
            r#"{{"annotations":{{"io.kubernetes.pod.name":"node-exporter-x2k9p","io.kubernetes.pod.namespace":"monitoring",
            "io.kubernetes.pod.uid":"{HOSTNET_UID}","io.kubernetes.container.name":"exporter",
            "io.kubernetes.cri-o.ContainerType":"container"}}}}"#
        ),
    );

    // cgroups: systemd driver (Burstable) for the pod, cgroupfs driver
    // (BestEffort) for the hostNetwork pod.
    let pod_slice = format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
        POD_UID.replace('-', "_")
    );
    let pause_cg = cgroups.make(
        &cg_root,
        &format!("{pod_slice}/cri-containerd-{PAUSE_ID}.scope"),
    );
    let app_cg = cgroups.make(
        &cg_root,
        &format!("{pod_slice}/cri-containerd-{APP_ID}.scope"),
    );
    let hostnet_cg = cgroups.make(
        &cg_root,
        &format!("kubepods/besteffort/pod{HOSTNET_UID}/{HOSTNET_ID}"),
    );
    let host_cg = cgroups.make(&cg_root, "tcpstall-test-host.slice");

    let link = Link::new("k8s", 43);
    link.a.sysctl("net.ipv4.tcp_retries2", "8");
    let mut agent = Agent::start(&[
        "--containerd-state",
        &containerd.to_string_lossy(),
        "--crio-state",
        &crio.to_string_lossy(),
        "--kubelet-root",
        &tmp.join("kubelet").to_string_lossy(),
        "--docker-root",
        &tmp.join("docker").to_string_lossy(),
        "--close-wait-after",
        "1",
    ]);

    // The pod: pause first, in the pod's netns; then the app.
    let pause_sh = named_shell(&tmp, "pause");
    let _pause = spawn(Some(&link.a.name), &pause_sh, &pause_cg, "exec sleep 300");
    let server_addr = SocketAddr::from((link.b_ip, 8080));
    let listener = listen_in(&link.b, server_addr);
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let (mut s, peer) = listener.accept().expect("accept");
        tx.send(peer).unwrap();
        drain(&mut s, Duration::from_secs(60));
    });
    let go = tmp.join("go");
    let hold = tmp.join("hold");
    for f in [&go, &hold] {
        assert!(Command::new("mkfifo").arg(f).status().unwrap().success());
    }
    let app_sh = named_shell(&tmp, "shop-app");
    let app = spawn(
        Some(&link.a.name),
        &app_sh,
        &app_cg,
        &format!(
            "exec 3<>/dev/tcp/{}/8080 || exit 2; printf hello >&3; read -t 60 line <> {}; printf '%01000d' 0 >&3; read -t 300 line <> {}",
            link.b_ip,
            go.display(),
            hold.display()
        ),
    );
    let app_local = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("app connected");
    thread::sleep(Duration::from_millis(300));
    let _blackhole = link.b.blackhole_from(link.a_ip);
    fs::OpenOptions::new()
        .write(true)
        .open(&go)
        .unwrap()
        .write_all(b"go\n")
        .unwrap();

    // S1 from the app: API, metrics, log line.
    let v = wait_stall(
        &agent,
        |v| {
            ev_str(v, "local") == app_local.to_string()
                && ev_str(v, "class") == "retransmit"
                && !v["process"].is_null()
        },
        "the app's S1 flow",
    );
    assert_owner_named(
        &mut agent,
        &v,
        server_addr,
        &ExpectedOwner {
            pod: "web-7d9f-abcde",
            namespace: "shop",
            pod_uid: POD_UID,
            container: "app",
            container_id: APP_ID,
            pid: u64::from(app.0.id()),
            comm: "shop-app",
        },
    );

    // hostNetwork pod (socket in the host netns) and a plain host process:
    // CLOSE_WAIT on loopback (the test's listener closes at once).
    let lo = TcpListener::bind("127.0.0.1:0").unwrap();
    let lo_addr = lo.local_addr().unwrap();
    thread::spawn(move || {
        for s in lo.incoming().take(2) {
            drop(s);
        }
    });
    let hostnet_sh = named_shell(&tmp, "exporter");
    let hold2 = tmp.join("hold2");
    assert!(
        Command::new("mkfifo")
            .arg(&hold2)
            .status()
            .unwrap()
            .success()
    );
    let script = |port: u16| {
        format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port} || exit 2; read -t 300 line <> {}",
            hold2.display()
        )
    };
    let hostnet = spawn(None, &hostnet_sh, &hostnet_cg, &script(lo_addr.port()));
    let v = wait_stall(
        &agent,
        |v| {
            ev_str(v, "remote") == lo_addr.to_string()
                && ev_str(v, "class") == "close_wait"
                && v["process"]["comm"] == "exporter"
        },
        "the hostNetwork pod's CLOSE_WAIT flow",
    );
    assert_eq!(ev_str(&v, "pod"), "node-exporter-x2k9p", "{v}");
    assert_eq!(ev_str(&v, "namespace"), "monitoring", "{v}");
    assert_eq!(ev_str(&v, "container"), "exporter", "{v}");
    assert_eq!(
        v["process"]["pid"].as_u64(),
        Some(u64::from(hostnet.0.id())),
        "{v}"
    );

    let host_sh = named_shell(&tmp, "host-app");
    let host = spawn(None, &host_sh, &host_cg, &script(lo_addr.port()));
    let v = wait_stall(
        &agent,
        |v| {
            ev_str(v, "remote") == lo_addr.to_string()
                && ev_str(v, "class") == "close_wait"
                && v["process"]["comm"] == "host-app"
        },
        "the host process's CLOSE_WAIT flow",
    );
    // No pod identity at all: every pod field null, the uid and the
    // container id included (a host cgroup resolved as a pod would fill
    // those first).
    for k in ["pod", "namespace", "container", "pod_uid", "container_id"] {
        assert!(v[k].is_null(), "the host process has {k}: {v}");
    }
    assert_eq!(
        v["process"]["pid"].as_u64(),
        Some(u64::from(host.0.id())),
        "{v}"
    );
    drop(agent);
}
