//! A private containerd "node": Debian's containerd with its CRI plugin,
//! runc and the CNI bridge plugin, driven through the CRI API as the kubelet
//! drives it ([`super::cri`]).
//!
//! Everything is the test's own: root, state, socket and config under a
//! temporary directory; containerd runs in a network namespace of the test
//! (the "node" namespace: the CNI bridge, its gateway address and the test's
//! server live there, never in the host's namespace); the sandbox ("pause")
//! and app images are built locally from Debian's static busybox with podman
//! and imported with `ctr` (no registry is reachable). [`Node`]'s drop
//! removes the pods, stops containerd and its shims, unmounts what it
//! mounted, removes the pod cgroups and the directory.

use std::{
    collections::HashMap,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::cri::{
    ContainerConfig, ContainerMetadata, CriClient, ImageSpec, LinuxPodSandboxConfig, Mount,
    PodSandboxConfig, PodSandboxMetadata,
};
use crate::{
    net::{Netns, run_suffix},
    util::{require, run_ok, sh_quiet, wait_until},
};

/// The kubelet's (and the runtime's) cgroup driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    Cgroupfs,
    Systemd,
}

impl CgroupDriver {
    pub fn name(self) -> &'static str {
        match self {
            CgroupDriver::Cgroupfs => "cgroupfs",
            CgroupDriver::Systemd => "systemd",
        }
    }

    /// The `cgroup_parent` the kubelet passes in `RunPodSandbox` for a
    /// BestEffort pod: the cgroupfs path, or the leaf slice's name
    /// (systemd: the runtime appends `:cri-containerd:<id>`).
    pub fn cgroup_parent(self, pod_uid: &str) -> String {
        match self {
            CgroupDriver::Cgroupfs => format!("/kubepods/besteffort/pod{pod_uid}"),
            CgroupDriver::Systemd => {
                format!("kubepods-besteffort-pod{}.slice", pod_uid.replace('-', "_"))
            }
        }
    }

    /// Why this host cannot run the driver, if it cannot: runc's systemd
    /// driver creates scopes through systemd over D-Bus.
    pub fn unavailable(self) -> Option<String> {
        match self {
            CgroupDriver::Cgroupfs => None,
            CgroupDriver::Systemd => {
                let pid1 = fs::read_to_string("/proc/1/comm").unwrap_or_default();
                (!Path::new("/run/systemd/system").exists()).then(|| {
                    format!(
                        "systemd is not PID 1 here (PID 1 is `{}`, no /run/systemd/system): \
                         runc's systemd cgroup driver needs systemd over D-Bus",
                        pid1.trim()
                    )
                })
            }
        }
    }
}

/// Names of the images this harness builds and imports.
pub const PAUSE_IMAGE: &str = "localhost/tcpstall-test/pause:1";
pub const APP_IMAGE: &str = "localhost/tcpstall-test/app:1";
/// Debian's CNI plugin directory (containerd's default is /opt/cni/bin).
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The static busybox the images are made of (Debian's busybox-static).
pub const BUSYBOX: &str = "/bin/busybox";

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Fails loudly naming what is missing for a containerd node.
pub fn require_containerd() {
    const FIX: &str = "run `cargo xtask setup` (installs containerd, runc, containernetworking-plugins, \
         busybox-static and podman from Debian)";
    for cmd in [
        "containerd",
        "ctr",
        "runc",
        "containerd-shim-runc-v2",
        "podman",
        "nsenter",
    ] {
        require(have(cmd), &format!("the `{cmd}` command"), FIX);
    }
    for plugin in ["bridge", "host-local", "loopback"] {
        let p = Path::new(CNI_BIN_DIR).join(plugin);
        require(p.exists(), &format!("the CNI plugin {}", p.display()), FIX);
    }
    let static_busybox = Command::new("ldd").arg(BUSYBOX).output().is_ok_and(|o| {
        !o.status.success() || String::from_utf8_lossy(&o.stdout).contains("not a dynamic")
    });
    require(
        Path::new(BUSYBOX).exists() && static_busybox,
        "a static busybox at /bin/busybox (the test images' only binary)",
        FIX,
    );
}

/// Builds `tag` from `containerfile` in `dir` (build context: busybox
/// copies) with podman and saves it as a docker-archive; returns the
/// archive and the name it holds. The podman tag is this run's own (two
/// runs never share or delete each other's podman image) and is removed
/// once saved.
fn build_image(dir: &Path, tag: &str, containerfile: &str) -> (PathBuf, String) {
    let base = tag.replace(['/', ':'], "_");
    let file = dir.join(format!("Containerfile.{base}"));
    fs::write(&file, containerfile).expect("Containerfile");
    let local = format!("{tag}{}", run_suffix());
    run_ok(
        Command::new("podman")
            .args(["build", "--quiet", "--file"])
            .arg(&file)
            .args(["--tag", &local])
            .arg(dir),
        &format!("podman build {local}"),
    );
    let archive = dir.join(format!("{base}.tar"));
    let _ = fs::remove_file(&archive);
    run_ok(
        Command::new("podman")
            .args(["save", "--format", "docker-archive", "--output"])
            .arg(&archive)
            .arg(&local),
        &format!("podman save {local}"),
    );
    sh_quiet(&format!("podman rmi --force {local}"));
    (archive, local)
}

/// The pause and app images: (archive, name in the archive, name to give
/// it in containerd).
fn images(dir: &Path) -> Vec<(PathBuf, String, &'static str)> {
    fs::create_dir_all(dir).expect("image dir");
    // The busybox applet is chosen by the file name: copies named sh, nc
    // and sleep (and so each process's comm).
    for name in ["sh", "nc", "sleep"] {
        fs::copy(BUSYBOX, dir.join(name)).expect("copy busybox");
    }
    [
        (
            PAUSE_IMAGE,
            "FROM scratch\nCOPY sleep /bin/sleep\nENTRYPOINT [\"/bin/sleep\", \"1000000000\"]\n",
        ),
        (
            APP_IMAGE,
            "FROM scratch\nCOPY sh /bin/sh\nCOPY nc /bin/nc\nCOPY sleep /bin/sleep\nCMD [\"/bin/sh\"]\n",
        ),
    ]
    .into_iter()
    .map(|(tag, file)| {
        let (archive, local) = build_image(dir, tag, file);
        (archive, local, tag)
    })
    .collect()
}

/// A pod started through CRI, with what the runtime recorded for it.
pub struct Pod {
    pub sandbox_id: String,
    pub config: PodSandboxConfig,
}

/// A private containerd with the CRI plugin in a network namespace of the
/// test. See the module documentation.
pub struct Node {
    pub driver: CgroupDriver,
    pub dir: PathBuf,
    /// containerd's state directory (the agent's `--containerd-state`).
    pub state: PathBuf,
    pub socket: PathBuf,
    /// The node's network namespace (containerd, the CNI bridge).
    pub netns: Netns,
    /// The bridge's address in the node namespace (pods' gateway).
    pub gateway: Ipv4Addr,
    pub cri: CriClient,
    child: Option<Child>,
    sandboxes: Vec<String>,
    pod_uids: Vec<String>,
}

impl Node {
    /// Starts containerd with `driver` and imports the test images. The
    /// pods' subnet is 10.203.`subnet`.0/24 inside the node namespace.
    pub fn start(driver: CgroupDriver, subnet: u8) -> Node {
        require_containerd();
        let dir = std::env::temp_dir().join(format!(
            "tcpstall-containerd-{}{}",
            driver.name(),
            run_suffix()
        ));
        if dir.exists() {
            cleanup_dir(&dir);
        }
        let (root, state, cni) = (dir.join("root"), dir.join("state"), dir.join("cni"));
        for d in [&root, &state, &cni] {
            fs::create_dir_all(d).expect("containerd dirs");
        }
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
# Only what the CRI path needs; no snapshotter that would probe the host.
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  # The kubelet asks for -998 (sandbox) and -997 (critical pods); lowering
  # an oom_score_adj needs CAP_SYS_RESOURCE, which this machine kind's root
  # lacks (runc then fails in nsexec). Restricted: never below containerd's.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = {systemd}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni}"
    max_conf_num = 1
"#,
                root = root.display(),
                state = state.display(),
                socket = socket.display(),
                systemd = driver == CgroupDriver::Systemd,
                cni = cni.display(),
            ),
        )
        .expect("config.toml");
        let gateway = Ipv4Addr::new(10, 203, subnet, 1);
        fs::write(
            cni.join("10-tcpstall-test.conflist"),
            format!(
                r#"{{"cniVersion":"1.0.0","name":"tcpstall-test","plugins":[{{"type":"bridge","bridge":"tsbr0","isGateway":true,"ipMasq":false,
"ipam":{{"type":"host-local","ranges":[[{{"subnet":"10.203.{subnet}.0/24","gateway":"{gateway}"}}]],"dataDir":"{ipam}"}}}}]}}"#,
                ipam = dir.join("ipam").display()
            ),
        )
        .expect("CNI config");
        let netns = Netns::new("tsctd");
        let log = fs::File::create(dir.join("containerd.log")).expect("containerd.log");
        // nsenter --net only: `ip netns exec` would also remount /sys and
        // hide the cgroup mounts from containerd and runc.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", netns.name))
            .arg("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        let mut node = Node {
            driver,
            dir,
            state,
            socket: socket.clone(),
            netns,
            gateway,
            cri: CriClient::new(&socket),
            child: Some(child),
            sandboxes: Vec::new(),
            pod_uids: Vec::new(),
        };
        let v = wait_until(
            Duration::from_secs(30),
            Duration::from_millis(100),
            "containerd's CRI API never answered Version",
            || {
                if let Some(Ok(Some(status))) = node.child.as_mut().map(Child::try_wait) {
                    panic!("containerd exited ({status}):\n{}", node.log());
                }
                node.cri.version()
            },
        );
        eprintln!(
            "containerd node ({}): {} {} (CRI {})",
            driver.name(),
            v.runtime_name,
            v.runtime_version,
            v.runtime_api_version
        );
        let ctr = |args: &[&str], what: &str| {
            run_ok(
                Command::new("ctr")
                    .arg("--address")
                    .arg(&node.socket)
                    .args(["--namespace", "k8s.io"])
                    .args(args),
                what,
            )
        };
        for (archive, local, name) in images(&node.dir.join("images")) {
            let archive = archive.to_string_lossy();
            ctr(
                &["images", "import", &archive],
                &format!("ctr images import {archive}"),
            );
            ctr(
                &["images", "tag", &local, name],
                &format!("ctr images tag {local} {name}"),
            );
            ctr(&["images", "rm", &local], &format!("ctr images rm {local}"));
        }
        node
    }

    /// containerd's log so far (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `RunPodSandbox` as the kubelet sends it for a BestEffort pod:
    /// metadata, the kubelet's pod labels, host name, log directory and the
    /// driver's `cgroup_parent`.
    pub fn run_pod(&mut self, name: &str, namespace: &str, uid: &str) -> Pod {
        let labels = HashMap::from([
            ("io.kubernetes.pod.name".to_owned(), name.to_owned()),
            (
                "io.kubernetes.pod.namespace".to_owned(),
                namespace.to_owned(),
            ),
            ("io.kubernetes.pod.uid".to_owned(), uid.to_owned()),
        ]);
        let annotations = HashMap::from([
            ("kubernetes.io/config.source".to_owned(), "api".to_owned()),
            (
                "kubernetes.io/config.seen".to_owned(),
                "2026-12-06T00:00:00Z".to_owned(),
            ),
        ]);
        let logs = self.dir.join(format!("pods/{namespace}_{name}_{uid}"));
        fs::create_dir_all(&logs).expect("pod log dir");
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_owned(),
                uid: uid.to_owned(),
                namespace: namespace.to_owned(),
                attempt: 0,
            }),
            hostname: name.to_owned(),
            log_directory: logs.to_string_lossy().into_owned(),
            labels,
            annotations,
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: self.driver.cgroup_parent(uid),
            }),
        };
        self.pod_uids.push(uid.to_owned());
        let id = self
            .cri
            .run_pod_sandbox(&config)
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\ncontainerd log:\n{}", self.log()));
        self.sandboxes.push(id.clone());
        Pod {
            sandbox_id: id,
            config,
        }
    }

    /// `CreateContainer` + `StartContainer` of `image` in `pod` with the
    /// kubelet's container labels; `mounts` are (host, container) paths.
    pub fn run_container(
        &self,
        pod: &Pod,
        name: &str,
        image: &str,
        command: &[&str],
        mounts: &[(&Path, &str)],
    ) -> String {
        let meta = pod.config.metadata.clone().unwrap_or_default();
        let labels = HashMap::from([
            ("io.kubernetes.container.name".to_owned(), name.to_owned()),
            ("io.kubernetes.pod.name".to_owned(), meta.name.clone()),
            (
                "io.kubernetes.pod.namespace".to_owned(),
                meta.namespace.clone(),
            ),
            ("io.kubernetes.pod.uid".to_owned(), meta.uid.clone()),
        ]);
        let annotations = HashMap::from([
            (
                "io.kubernetes.container.restartCount".to_owned(),
                "0".to_owned(),
            ),
            (
                "io.kubernetes.container.terminationMessagePath".to_owned(),
                "/dev/termination-log".to_owned(),
            ),
        ]);
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.to_owned(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: image.to_owned(),
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            args: Vec::new(),
            mounts: mounts
                .iter()
                .map(|(host, path)| Mount {
                    container_path: path.to_string(),
                    host_path: host.to_string_lossy().into_owned(),
                    readonly: false,
                })
                .collect(),
            labels,
            annotations,
            log_path: format!("{name}/0.log"),
        };
        let id = self
            .cri
            .create_container(&pod.sandbox_id, &config, &pod.config)
            .unwrap_or_else(|e| panic!("CreateContainer: {e}\ncontainerd log:\n{}", self.log()));
        self.cri
            .start_container(&id)
            .unwrap_or_else(|e| panic!("StartContainer: {e}\ncontainerd log:\n{}", self.log()));
        id
    }
}

/// Every cgroup hierarchy mounted on this host (v1 controllers and v2).
fn cgroup_mounts() -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            let mount = pre.split_whitespace().nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(mount))
        })
        .collect()
}

/// Kills every process in `dir` and below, then removes the directories
/// (deepest first).
fn remove_cgroup_tree(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    let mut dirs = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        if let Ok(rd) = fs::read_dir(&dirs[i]) {
            dirs.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        i += 1;
    }
    for d in dirs.iter().rev() {
        for pid in fs::read_to_string(d.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
        {
            sh_quiet(&format!("kill -9 {pid}"));
        }
        for _ in 0..50 {
            if fs::remove_dir(d).is_ok() || !d.exists() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Unmounts everything mounted under `dir` (deepest first), then removes it.
fn cleanup_dir(dir: &Path) {
    let prefix = format!("{}/", dir.display());
    let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = Command::new("umount").args(["--lazy", &m]).status();
    }
    let _ = fs::remove_dir_all(dir);
}

/// The pids of the shims of the containerd listening on `socket`.
fn shims_of(socket: &Path) -> Vec<u32> {
    let needle = socket.to_string_lossy().into_owned();
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_shim = args.first()?.ends_with("containerd-shim-runc-v2");
            (is_shim && args.contains(&needle)).then_some(pid)
        })
        .collect()
}

impl Drop for Node {
    fn drop(&mut self) {
        // The kubelet's teardown: stop and remove each pod (its containers,
        // network and netns go with it).
        for id in &self.sandboxes {
            if let Err(e) = self.cri.stop_pod_sandbox(id) {
                eprintln!("StopPodSandbox {id}: {e}");
            }
            if let Err(e) = self.cri.remove_pod_sandbox(id) {
                eprintln!("RemovePodSandbox {id}: {e}");
            }
        }
        let shims = shims_of(&self.socket);
        if let Some(mut child) = self.child.take() {
            // SIGTERM (containerd's clean stop), SIGKILL after 10 s.
            sh_quiet(&format!("kill -TERM {}", child.id()));
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in shims {
            sh_quiet(&format!("kill -9 {pid}"));
        }
        // Whatever a failed teardown left: processes and the pod cgroups
        // (the kubelet, not the runtime, removes a pod's cgroup).
        for uid in &self.pod_uids {
            for mount in cgroup_mounts() {
                for rel in [
                    format!("kubepods/besteffort/pod{uid}"),
                    format!(
                        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
                        uid.replace('-', "_")
                    ),
                ] {
                    remove_cgroup_tree(&mount.join(rel));
                }
            }
        }
        cleanup_dir(&self.dir);
    }
}
