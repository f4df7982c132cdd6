//! `cargo xtask test`: everything CI runs, in this order: unit tests,
//! replay tests, deploy checks, the image, the privileged tests on this
//! kernel, the QEMU kernel matrix.

use xtask::vm;

use crate::{
    cmd::{
        build::build_agent,
        vm_test::{VM_TESTS, vm_matrix},
    },
    image, setup,
    util::{cargo, require_root, run_cmd, step, workspace_root},
};

pub fn run(
    unit_only: bool,
    filter: Option<String>,
    no_vm: bool,
    vm_oldest: bool,
) -> anyhow::Result<()> {
    setup::toolchain()?;
    let mut vm_opts = vm::VmOptions::default();
    if vm_oldest {
        vm_opts.kernels.push(vm::OLDEST_KERNEL.to_owned());
    }
    let mut unit = cargo();
    unit.args([
        "test",
        "--release",
        "-p",
        "tcpstall",
        "-p",
        "tcpstall-common",
        "-p",
        "xtask",
    ]);
    if !unit_only {
        require_root("`cargo xtask test` (the privileged scenario tests)")?;
        setup::system_packages()?;
        setup::debian_packages(vm::VM_DEBIAN_PACKAGES)?;
        step("extracting BTF of the matrix kernels (unit tests check the field layout on each)");
        let btf_dir = vm::default_btf_dir();
        vm::extract_btf(&vm_opts.kernels, &btf_dir)?;
        // The ignored tests are those that need this directory.
        unit.env("TCPSTALL_TEST_BTF_DIR", &btf_dir)
            .args(["--", "--include-ignored"]);
    }
    step("unit tests");
    run_cmd(&mut unit)?;
    step(
        "replay tests (engine against event streams recorded on real kernels) and the \
         test harness's own unit tests",
    );
    run_cmd(cargo().args([
        "test",
        "--release",
        "-p",
        "tcpstall-tests",
        "--lib",
        "--test",
        "replay",
    ]))?;
    if unit_only {
        return Ok(());
    }
    let bin = build_agent()?;
    step("deploy checks (promtool, manifests, dashboard)");
    run_cmd(cargo().args([
        "test",
        "--release",
        "-p",
        "tcpstall-tests",
        "--test",
        "deploy",
        "--test",
        "kustomize",
    ]))?;
    let image_tag = image::DEFAULT_TAG;
    image::build(image_tag)?;
    step("privileged scenario tests on this kernel (real probes, namespaces, a real Prometheus)");
    let mut c = cargo();
    c.args([
        "test",
        "--release",
        "-p",
        "tcpstall-tests",
        "--test",
        "scenarios",
        "--test",
        "prometheus_e2e",
        "--test",
        "sweep",
        "--test",
        "image",
        "--test",
        "privileges",
        "--test",
        "top",
        "--test",
        "k8s",
        "--test",
        "containerd",
        "--test",
        "behaviour",
        "--",
        "--test-threads=1",
    ]);
    if let Some(f) = filter {
        c.arg(f);
    }
    c.env("TCPSTALL_AGENT_BIN", &bin);
    c.env("TCPSTALL_IMAGE", image_tag);
    // Findings of passing tests (tcpstall_tests::test_note), printed
    // whether the run passed or not.
    let notes = workspace_root().join("target/test-notes.txt");
    let _ = std::fs::remove_file(&notes);
    c.env("TCPSTALL_TEST_NOTES", &notes);
    let result = run_cmd(&mut c);
    if let Ok(text) = std::fs::read_to_string(&notes) {
        step("notes from the privileged tests");
        eprint!("{text}");
    }
    result?;
    if !no_vm {
        let tests: Vec<String> = VM_TESTS.iter().map(|s| s.to_string()).collect();
        vm_matrix(&vm_opts, &bin, &tests)?;
    }
    step(&format!(
        "all passed: unit tests, deploy checks, scenarios on this kernel, Prometheus end to end{}",
        if no_vm {
            String::new()
        } else {
            format!(", QEMU kernel matrix ({})", vm_opts.kernels.join(", "))
        }
    ));
    Ok(())
}
