//! Kubernetes helpers: exact capability sets through `setpriv` and checks
//! of `kubernetes-validate` output; a real containerd node driven through
//! the CRI API ([`containerd`], [`cri`]); kubelet-style pod cgroups
//! ([`Cgroups`]) and processes started in them, containerd task specs.

pub mod containerd;
pub mod cri;

/// `setpriv` arguments that run a program as uid 0 with exactly `caps`
/// (capability names as in a Kubernetes manifest, e.g. `NET_ADMIN`) in its
/// bounding, inheritable and ambient sets, and no_new_privs (as
/// `allowPrivilegeEscalation: false`). Ends with `--`.
pub fn setpriv_exactly(caps: &[String]) -> Vec<String> {
    let list: String = caps
        .iter()
        .map(|c| format!(",+{}", c.to_ascii_lowercase()))
        .collect();
    let set = format!("-all{list}");
    [
        "setpriv",
        "--no-new-privs",
        "--bounding-set",
        &set,
        "--inh-caps",
        &set,
        "--ambient-caps",
        &set,
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Checks the output of one `kubernetes-validate --strict` run over the
/// resources `(kind, name)`: each passed, except kinds in `crd_kinds`, which
/// the tool must report as schema-less (a CRD, validated by its operator at
/// apply time), and no other warning or error. `what` names the input in
/// failure messages.
pub fn assert_kubernetes_validate(
    out: &str,
    resources: &[(String, String)],
    crd_kinds: &[&str],
    what: &str,
) {
    for (kind, name) in resources {
        if crd_kinds.contains(&kind.as_str()) {
            assert!(
                out.contains(&format!("Couldn't find schema for kind {kind}")),
                "{what}: expected kubernetes-validate to report {kind} as schema-less:\n{out}"
            );
        } else {
            assert!(
                out.contains(&format!(
                    "passed for resource {}/{name} ",
                    kind.to_lowercase()
                )),
                "{what}: {kind}/{name} did not pass kubernetes-validate --strict:\n{out}"
            );
        }
    }
    for line in out
        .lines()
        .filter(|l| l.starts_with("WARN") || l.starts_with("ERROR"))
    {
        assert!(
            crd_kinds
                .iter()
                .any(|k| line.contains(&format!("Couldn't find schema for kind {k} "))),
            "{what}: unexpected kubernetes-validate diagnostic: {line}"
        );
    }
}

/// The host's cgroup2 mount (fails the test, naming the fix, without one).
pub fn cgroup2_root() -> std::path::PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mount = pre.split_whitespace().nth(4)?;
        (post.split_whitespace().next()? == "cgroup2").then(|| std::path::PathBuf::from(mount))
    });
    crate::require(
        root.is_some(),
        "a cgroup2 mount",
        "mount cgroup2 (pure v2 or hybrid host)",
    );
    root.unwrap()
}

/// cgroup directories created for a test (kubelet-style pod and container
/// cgroups); removed (deepest first) on drop, after the processes in them
/// were killed.
#[derive(Default)]
pub struct Cgroups {
    created: Vec<std::path::PathBuf>,
}

impl Cgroups {
    /// `root/rel`, creating each missing level.
    pub fn make(&mut self, root: &std::path::Path, rel: &str) -> std::path::PathBuf {
        let mut p = root.to_path_buf();
        for seg in rel.split('/').filter(|s| !s.is_empty()) {
            p.push(seg);
            if !p.exists() {
                std::fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
                self.created.push(p.clone());
            }
        }
        p
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for d in self.created.iter().rev() {
            if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                for pid in procs.lines() {
                    let _ = std::process::Command::new("kill")
                        .args(["-9", pid])
                        .status();
                }
            }
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// A child process killed on drop.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `program args...` inside `cgroup` (joined before anything else
/// runs, so every socket it creates is the cgroup's), optionally in a
/// network namespace: one pid throughout. Waits until the pid is in the
/// cgroup. `stdin`/`stdout` as given; stderr is inherited.
pub fn spawn_in_cgroup(
    netns: Option<&str>,
    cgroup: &std::path::Path,
    program: &std::path::Path,
    args: &[&str],
    stdin: std::process::Stdio,
    stdout: std::process::Stdio,
) -> Proc {
    // Join the cgroup first (`ip netns exec` remounts /sys, hiding the
    // cgroup2 mount), then enter the namespace and exec the program.
    let mut c = std::process::Command::new("/bin/bash");
    c.args([
        "-c",
        "echo $$ > \"$1\"/cgroup.procs || exit 1; shift; exec \"$@\"",
        "_",
    ])
    .arg(cgroup);
    if let Some(ns) = netns {
        c.args(["ip", "netns", "exec", ns]);
    }
    let child = c
        .arg(program)
        .args(args)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("spawn");
    let pid = child.id().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .any(|l| l == pid)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} did not join {}",
            cgroup.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Proc(child)
}

/// The OCI `config.json` of a containerd task with the CRI annotations the
/// agent reads (`kind`: `container` or `sandbox`).
pub fn containerd_spec(
    kind: &str,
    name: &str,
    pod: &str,
    ns: &str,
    uid: &str,
    sandbox_id: &str,
) -> String {
    format!(
        r#"{{"ociVersion":"1.1.0","process":{{"env":["PATH=/bin"]}},"annotations":{{
        "io.kubernetes.cri.container-type":"{kind}","io.kubernetes.cri.container-name":"{name}",
        "io.kubernetes.cri.sandbox-id":"{sandbox_id}","io.kubernetes.cri.sandbox-name":"{pod}",
        "io.kubernetes.cri.sandbox-namespace":"{ns}","io.kubernetes.cri.sandbox-uid":"{uid}"}}}}"#
    )
}

/// A kubelet-style pod of this run, backed by containerd task specs under a
/// scratch state directory (no containerd runs): unique UID, container and
/// sandbox IDs carrying the test's pid, so concurrent runs of other tests on
/// the machine never resolve to it.
pub struct TaskPod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// The container's ID (64 hex digits); its name is `app`.
    pub container_id: String,
    /// The container's cgroup (processes started in it are the pod's).
    pub cgroup: std::path::PathBuf,
}

/// Makes pod `idx` (distinct per test run) named `name` in `namespace`:
/// its container and sandbox task specs under `tasks` (containerd's
/// `io.containerd.runtime.v2.task/k8s.io` directory) and its container's
/// cgroup under the cgroup2 `root` (removed with `cgroups`).
pub fn make_task_pod(
    cgroups: &mut Cgroups,
    root: &std::path::Path,
    tasks: &std::path::Path,
    idx: u32,
    namespace: &str,
    name: &str,
) -> TaskPod {
    let pid = std::process::id();
    let uid = format!("{pid:08x}-6a7d-4c2a-9f43-{idx:012x}");
    let app = format!("{idx:02x}{}{pid:08x}", "a".repeat(54));
    let sandbox = format!("{idx:02x}{}{pid:08x}", "b".repeat(54));
    write_file(
        &tasks.join(&app).join("config.json"),
        &containerd_spec("container", "app", name, namespace, &uid, &sandbox),
    );
    write_file(
        &tasks.join(&sandbox).join("config.json"),
        &containerd_spec("sandbox", "", name, namespace, &uid, &sandbox),
    );
    let slice = format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
        uid.replace('-', "_")
    );
    let cgroup = cgroups.make(root, &format!("{slice}/cri-containerd-{app}.scope"));
    TaskPod {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        uid,
        container_id: app,
        cgroup,
    }
}

/// A bash process in `cgroup` (a pod's) and network namespace `netns`
/// holding one TCP connection to `server` with neither SO_KEEPALIVE nor
/// TCP_USER_TIMEOUT (bash's `/dev/tcp`); returns once it is connected. The
/// pid is the socket's owner throughout.
pub fn hold_connection_in(
    netns: &str,
    cgroup: &std::path::Path,
    server: std::net::SocketAddr,
) -> Proc {
    let mut p = spawn_in_cgroup(
        Some(netns),
        cgroup,
        std::path::Path::new("/bin/bash"),
        &[
            "-c",
            &format!(
                "exec 3<>/dev/tcp/{}/{} && echo connected && read -r",
                server.ip(),
                server.port()
            ),
        ],
        std::process::Stdio::piped(),
        std::process::Stdio::piped(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(p.0.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("the connecting process' output");
    assert_eq!(
        line.trim(),
        "connected",
        "no connection to {server} from the pod's process"
    );
    p
}

/// The agent's container-runtime state arguments (containerd, CRI-O,
/// kubelet, Docker), all under the scratch directory `dir`: the agent
/// reads only what the test writes there.
pub fn runtime_state_args(dir: &std::path::Path) -> Vec<String> {
    [
        ("--containerd-state", "containerd"),
        ("--crio-state", "crio"),
        ("--kubelet-root", "kubelet"),
        ("--docker-root", "docker"),
    ]
    .iter()
    .flat_map(|(flag, d)| [(*flag).to_owned(), dir.join(d).to_str().unwrap().to_owned()])
    .collect()
}

/// A scratch directory removed on drop.
pub struct Scratch(pub std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `text` to `p`, creating its parent directories.
pub fn write_file(p: &std::path::Path, text: &str) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// Who the agent must name as a stalled socket's owner.
#[derive(Debug)]
pub struct ExpectedOwner<'a> {
    pub pod: &'a str,
    pub namespace: &'a str,
    pub pod_uid: &'a str,
    pub container: &'a str,
    pub container_id: &'a str,
    pub pid: u64,
    pub comm: &'a str,
}

/// Asserts that the stall view `v` (from `/api/v1/stalls`), the flow's
/// `tcpstall_socket_stall_seconds` series and its `stall started` log line
/// (the one to `remote`) name `want`.
pub fn assert_owner_named(
    agent: &mut crate::Agent,
    v: &serde_json::Value,
    remote: std::net::SocketAddr,
    want: &ExpectedOwner,
) {
    use crate::ev_str;
    assert_eq!(ev_str(v, "pod"), want.pod, "{v}");
    assert_eq!(ev_str(v, "namespace"), want.namespace, "{v}");
    assert_eq!(ev_str(v, "container"), want.container, "{v}");
    assert_eq!(ev_str(v, "container_id"), want.container_id, "{v}");
    assert_eq!(ev_str(v, "pod_uid"), want.pod_uid, "{v}");
    assert_eq!(v["process"]["pid"].as_u64(), Some(want.pid), "{v}");
    assert_eq!(v["process"]["comm"].as_str(), Some(want.comm), "{v}");
    let local = ev_str(v, "local");
    let m = agent.metrics();
    let labels = [
        ("local", local),
        ("pod", want.pod),
        ("namespace", want.namespace),
        ("container", want.container),
    ];
    assert!(
        crate::metric_sum(&m, "tcpstall_socket_stall_seconds", &labels).is_some(),
        "no per-flow series with {labels:?}:\n{}",
        m.lines()
            .filter(|l| l.starts_with("tcpstall_socket_stall_seconds"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let line = agent.wait_log(
        std::time::Duration::from_secs(10),
        "stall started log of the flow",
        |l| l["message"] == "stall started" && l["remote"] == remote.to_string(),
    );
    assert_eq!(ev_str(&line, "pod"), want.pod, "{line}");
    assert_eq!(ev_str(&line, "namespace"), want.namespace, "{line}");
    assert_eq!(ev_str(&line, "container"), want.container, "{line}");
    assert_eq!(ev_str(&line, "pod_uid"), want.pod_uid, "{line}");
    assert_eq!(ev_str(&line, "comm"), want.comm, "{line}");
    assert_eq!(line["pid"].as_u64(), Some(want.pid), "{line}");
}

/// A run's kubelet-style pods: a scratch directory with the containerd
/// state naming them, and their cgroups; all removed on drop (cgroups
/// first: their processes are killed).
pub struct TaskPods {
    cgroups: Cgroups,
    /// The scratch directory (containerd state under `containerd/`).
    pub tmp: std::path::PathBuf,
    _scratch: Scratch,
    cg_root: std::path::PathBuf,
    /// Namespaces are `<name>-<tag><pid>`.
    tag: &'static str,
}

impl TaskPods {
    /// `tag` unique per test (namespaces, scratch directory).
    pub fn new(tag: &'static str) -> Self {
        let pid = std::process::id();
        let tmp = std::env::temp_dir().join(format!("tcpstall-guard-{tag}{pid}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        TaskPods {
            cgroups: Cgroups::default(),
            _scratch: Scratch(tmp.clone()),
            tmp,
            cg_root: cgroup2_root(),
            tag,
        }
    }

    /// Pod `name` in namespace `<namespace>-<tag><pid>`; `idx` unique per run.
    pub fn pod(&mut self, idx: u32, namespace: &str, name: &str) -> TaskPod {
        let tasks = self
            .tmp
            .join("containerd/io.containerd.runtime.v2.task/k8s.io");
        let ns = format!("{namespace}-{}{}", self.tag, std::process::id());
        make_task_pod(&mut self.cgroups, &self.cg_root, &tasks, idx, &ns, name)
    }

    /// The agent with the guard policy `policy`, resolving pods from this
    /// run's containerd state (the other runtimes' roots empty), plus
    /// `extra` arguments.
    pub fn agent_with_policy(&self, policy: &std::path::Path, extra: &[&str]) -> crate::Agent {
        let mut args = runtime_state_args(&self.tmp);
        args.extend(["--guard-policy".to_owned(), policy.display().to_string()]);
        let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
        all.extend_from_slice(extra);
        crate::Agent::start(&all)
    }
}

/// Runs `f` with this whole process moved into `cgroup` (a pod's): every
/// socket created meanwhile is the cgroup's (the kernel ties a socket to
/// its creator's cgroup at creation, and cgroup `sock_ops` programs run by
/// the socket's cgroup, not by the process using it later). The process
/// moves back to its own cgroup afterwards, also when `f` panics (a pod's
/// cgroup guard kills what is left in it).
pub fn in_cgroup<T>(cgroup: &std::path::Path, f: impl FnOnce() -> T) -> T {
    struct Back(std::path::PathBuf);
    impl Drop for Back {
        fn drop(&mut self) {
            let procs = self.0.join("cgroup.procs");
            if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
                // Never leave the test inside a pod's cgroup (killed with it).
                eprintln!("moving the test back to {}: {e}", procs.display());
                std::process::abort();
            }
        }
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no cgroup2 line in /proc/self/cgroup:\n{own}"));
    let home = cgroup2_root().join(rel.trim().trim_start_matches('/'));
    let _back = Back(home);
    let procs = cgroup.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .unwrap_or_else(|e| panic!("moving the test into {}: {e}", procs.display()));
    f()
}
