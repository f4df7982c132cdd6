//! A real container runtime: Debian's containerd (CRI plugin), runc and the
//! CNI bridge plugin, driven through the CRI API as the kubelet drives it
//! (`RunPodSandbox` with the kubelet's `cgroup_parent`, labels and metadata,
//! `CreateContainer`, `StartContainer`), with locally built pause and app
//! images. The app container's connection to a server in the node's network
//! namespace is blackholed; the agent must name the stalled socket with the
//! pod name, namespace, pod UID, container name, container ID and process
//! exactly as containerd recorded them (read back through
//! `PodSandboxStatus` / `ContainerStatus`, not taken from the test's inputs).
//!
//! Both cgroup drivers where the host allows: cgroupfs always; systemd only
//! where systemd is PID 1 (runc's systemd driver needs it over D-Bus); a
//! host without it gets a test note saying so.
//!
//! Privileged (root, BPF, namespaces, cgroups): run through `cargo xtask test`.

use std::{
    fs,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::OpenOptionsExt as _,
    sync::mpsc,
    thread,
    time::Duration,
};

use serde_json::Value;
use tcpstall_tests::{
    Agent, ExpectedOwner, assert_owner_named,
    containerd::{APP_IMAGE, CgroupDriver, Node},
    cri::{CONTAINER_RUNNING, SANDBOX_READY},
    drain, ev_str, listen_in, require_tools, test_note, wait_until,
};

/// A fresh pod UID (the kubelet's are random v4 UUIDs).
fn new_uid() -> String {
    fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("kernel uuid")
        .trim()
        .to_owned()
}

/// What containerd recorded for the pod and its app container.
#[derive(Debug)]
struct Recorded {
    pod: String,
    namespace: String,
    pod_uid: String,
    pod_ip: Ipv4Addr,
    container: String,
    container_id: String,
    pid: u64,
}

fn recorded(node: &Node, sandbox_id: &str, container_id: &str) -> Recorded {
    let ps = node
        .cri
        .pod_sandbox_status(sandbox_id)
        .unwrap_or_else(|e| panic!("PodSandboxStatus: {e}"));
    let s = ps.status.expect("PodSandboxStatus without status");
    assert_eq!(s.state, SANDBOX_READY, "sandbox not ready: {s:?}");
    let meta = s.metadata.expect("sandbox metadata");
    let pod_ip: Ipv4Addr = s
        .network
        .as_ref()
        .and_then(|n| n.ip.parse().ok())
        .unwrap_or_else(|| panic!("sandbox without an IPv4 address: {:?}", s.network));
    let cs = node
        .cri
        .container_status(container_id)
        .unwrap_or_else(|e| panic!("ContainerStatus: {e}"));
    let c = cs.status.expect("ContainerStatus without status");
    assert_eq!(
        c.state, CONTAINER_RUNNING,
        "app container not running: {c:?}"
    );
    // containerd's verbose info: JSON with the init process's host pid.
    let info: Value =
        serde_json::from_str(cs.info.get("info").expect("verbose info")).expect("info JSON");
    Recorded {
        pod: meta.name,
        namespace: meta.namespace,
        pod_uid: meta.uid,
        pod_ip,
        container: c.metadata.expect("container metadata").name,
        container_id: c.id,
        pid: info["pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("no pid: {info}")),
    }
}

/// One node with `driver`: a pod whose app container (busybox `nc`, its
/// container's init process) connects to the node, is blackholed, and must
/// be named as containerd recorded it.
fn stalled_app_is_named_as_containerd_recorded_it(driver: CgroupDriver, subnet: u8) {
    let mut node = Node::start(driver, subnet);
    let ctl = node.dir.join("ctl");
    fs::create_dir_all(&ctl).unwrap();
    let fifo = ctl.join("in");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    // Held open read-write by the test: the container's open() never
    // blocks, and nc never sees end of input while the test runs.
    let mut input = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("open fifo");

    let empty = node.dir.join("empty");
    for d in ["kubelet", "crio", "docker"] {
        fs::create_dir_all(empty.join(d)).unwrap();
    }
    let mut agent = Agent::start(&[
        "--containerd-state",
        &node.state.to_string_lossy(),
        "--crio-state",
        &empty.join("crio").to_string_lossy(),
        "--kubelet-root",
        &empty.join("kubelet").to_string_lossy(),
        "--docker-root",
        &empty.join("docker").to_string_lossy(),
    ]);

    let server_addr = SocketAddr::from((node.gateway, 8080));
    let listener = listen_in(&node.netns, SocketAddr::from(([0, 0, 0, 0], 8080)));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (mut s, peer) = listener.accept().expect("accept");
        tx.send(peer).unwrap();
        drain(&mut s, Duration::from_secs(60));
    });

    let uid = new_uid();
    let pod = node.run_pod("web-7d9f-abcde", "shop", &uid);
    let script = format!(
        "exec /bin/nc {} {} < /ctl/in",
        node.gateway,
        server_addr.port()
    );
    let container_id = node.run_container(
        &pod,
        "app",
        APP_IMAGE,
        &["/bin/sh", "-c", &script],
        &[(ctl.as_path(), "/ctl")],
    );
    input.write_all(b"hello\n").unwrap();
    let peer = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("the app never connected\ncontainerd log:\n{}", node.log()));
    let rec = recorded(&node, &pod.sandbox_id, &container_id);
    eprintln!("containerd recorded: {rec:?}");
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V4(rec.pod_ip),
        "the connection comes from the pod's address"
    );
    let comm = fs::read_to_string(format!("/proc/{}/comm", rec.pid))
        .unwrap_or_else(|e| panic!("comm of the container's pid {}: {e}", rec.pid));
    assert_eq!(comm.trim(), "nc", "the container's init process is nc");
    let cgroup = fs::read_to_string(format!("/proc/{}/cgroup", rec.pid)).unwrap_or_default();
    test_note(&format!(
        "containerd {} driver: app container {} in cgroups {}",
        driver.name(),
        &rec.container_id[..12],
        cgroup.lines().collect::<Vec<_>>().join(" ")
    ));

    thread::sleep(Duration::from_millis(300));
    let _blackhole = node.netns.blackhole_from(rec.pod_ip);
    input.write_all(&[b'x'; 1000]).unwrap();

    let v = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(250),
        "no stall of the app's blackholed flow with its process",
        || {
            let stalls = agent.stalls();
            stalls
                .iter()
                .find(|v| {
                    ev_str(v, "local") == peer.to_string()
                        && ev_str(v, "class") == "retransmit"
                        && !v["process"].is_null()
                })
                .cloned()
                .ok_or_else(|| format!("{stalls:?}"))
        },
    );
    assert_owner_named(
        &mut agent,
        &v,
        server_addr,
        &ExpectedOwner {
            pod: &rec.pod,
            namespace: &rec.namespace,
            pod_uid: &rec.pod_uid,
            container: &rec.container,
            container_id: &rec.container_id,
            pid: rec.pid,
            comm: "nc",
        },
    );
    drop(agent);
    drop(input);
}

#[test]
fn containerd_cri_pods_are_named_as_containerd_recorded_them() {
    require_tools();
    for (driver, subnet) in [(CgroupDriver::Cgroupfs, 1), (CgroupDriver::Systemd, 2)] {
        if let Some(why) = driver.unavailable() {
            test_note(&format!(
                "containerd {} cgroup driver not run on this host: {why}",
                driver.name()
            ));
            continue;
        }
        stalled_app_is_named_as_containerd_recorded_it(driver, subnet);
    }
}
