//! `cargo xtask`: build, run and test automation for tcpstall.
//!
//! Every command first makes sure the toolchain it needs is installed (nightly
//! `rust-src`, a bpf-linker built against nightly's own LLVM, Debian packages),
//! so the README's two commands work on a fresh machine.
mod image;
mod kernel_bench_vm;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use xtask::vm;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, run and test tcpstall (installs what it needs)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain pieces and Debian packages (idempotent).
    Setup {
        /// Only the Rust/eBPF toolchain (no Debian or PyPI packages).
        #[arg(long)]
        toolchain_only: bool,
    },
    /// Build the eBPF programs and the agent (release).
    Build,
    /// Build and run the agent as root. Arguments after `--` go to `tcpstall`
    /// [default: run --log-events --listen 127.0.0.1:9977].
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Everything CI runs: unit tests, deploy checks, privileged scenario tests
    /// on this kernel (root), and the kernel matrix under QEMU.
    Test {
        /// Run only the unit tests (no root needed).
        #[arg(long)]
        unit_only: bool,
        /// Filter passed to the privileged scenario tests on this kernel.
        #[arg(long)]
        filter: Option<String>,
        /// Skip the QEMU kernel matrix (it runs by default, as in CI).
        #[arg(long)]
        no_vm: bool,
    },
    /// Measure the horizon predictor on this kernel: real blackholed
    /// connections with tcp_retries2 3, 5, 8 and TCP_USER_TIMEOUT 4 s;
    /// prints predicted vs actual ETIMEDOUT as a Markdown table.
    Accuracy,
    /// Criterion benchmarks (decoder, engine hot path, BTF start-up cost;
    /// as root also the socket sweep at 100,000 sockets). With `--kernel`,
    /// only the kernel part instead: tcpstall's kernel programs side by side
    /// with a bpftrace script on the same tracepoints (ns/run from the
    /// kernel's BPF run-time statistics, quiet and storm phases) and iperf3
    /// over veth without/with the agent, as a Markdown table (root).
    Bench {
        /// Run only the kernel bench (not criterion).
        #[arg(long)]
        kernel: bool,
        #[command(flatten)]
        opts: xtask::kernel_bench::BenchOptions,
        /// With --kernel: run the kernel bench inside these Debian kernels
        /// under QEMU instead of on this kernel (`--vm` alone: 6.1 and 6.12).
        #[arg(long, value_name = "KERNEL", num_args = 0.., requires = "kernel")]
        vm: Option<Vec<String>>,
        /// With --vm: cache for kernels and initramfs (as for vm-test).
        #[arg(long, value_name = "DIR", requires = "vm")]
        vm_cache_dir: Option<PathBuf>,
        /// With --vm: kill a guest that has not finished after this long.
        #[arg(long, value_name = "DURATION", default_value = "60m", value_parser = vm::parse_duration)]
        vm_timeout: std::time::Duration,
        /// Criterion arguments, e.g. a benchmark name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the agent as a static binary (musl) and the FROM scratch image
    /// (Containerfile) with podman.
    Image {
        /// Image name and tag, e.g. registry.example.com/platform/tcpstall:0.1.0.
        #[arg(long, default_value = image::DEFAULT_TAG)]
        tag: String,
    },
    /// Record the engine's replay fixtures (`tcpstall-tests/fixtures/replay/`):
    /// S1 (tcp_retries2 = 3 and 5) and S2 (TCP_USER_TIMEOUT = 4 s) on this
    /// kernel and in the QEMU guests, each with its measured ETIMEDOUT
    /// (root; about 10 minutes).
    RecordFixtures {
        #[command(flatten)]
        vm: vm::VmOptions,
        /// Collect from saved test outputs (host stdout, guest console logs)
        /// instead of running the scenarios.
        #[arg(long = "from-log", value_name = "FILE")]
        from_logs: Vec<PathBuf>,
    },
    /// Run the scenario tests inside Debian kernels under QEMU (TCG).
    VmTest {
        #[command(flatten)]
        vm: vm::VmOptions,
        /// Scenario tests to run in each guest, by exact name.
        #[arg(long = "test", value_name = "FILTER", default_values = VM_TESTS)]
        tests: Vec<String>,
    },
}

/// The scenarios whose event streams become replay fixtures.
const FIXTURE_TESTS: &[&str] = &[
    "s1_horizon_retries2_3",
    "s1_horizon_retries2_5",
    "s2_user_timeout",
];

/// Replay fixtures printed by the scenarios (`REPLAY-FIXTURE <file> <json>`).
mod fixtures {
    use std::collections::BTreeMap;

    use anyhow::Context;

    /// Collects the fixtures from `outputs` and writes them.
    pub fn write(outputs: &[String]) -> anyhow::Result<()> {
        let dir = super::workspace_root().join("tcpstall-tests/fixtures/replay");
        std::fs::create_dir_all(&dir)?;
        for (file, lines) in collect(outputs)? {
            let path = dir.join(&file);
            std::fs::write(&path, lines.join("\n") + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {} ({} lines)", path.display(), lines.len());
        }
        Ok(())
    }

    /// Fixture files and their lines from test outputs (host stdout, guest
    /// console logs). A line that is not valid JSON (a console line broken
    /// by kernel messages) fails: a fixture must be complete.
    pub fn collect(outputs: &[String]) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
        let mut files: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for out in outputs {
            for line in out.lines() {
                let Some((_, rest)) = line.split_once("REPLAY-FIXTURE ") else {
                    continue;
                };
                let (file, json) = rest
                    .trim_end()
                    .split_once(' ')
                    .ok_or_else(|| anyhow::anyhow!("malformed fixture line: {line}"))?;
                let v: serde_json::Value = serde_json::from_str(json)
                    .map_err(|e| anyhow::anyhow!("fixture {file}: broken line ({e}): {line}"))?;
                if v.get("fixture").is_some() {
                    // A header starts the file afresh (a re-run replaces it).
                    files.insert(file.to_owned(), Vec::new());
                }
                files
                    .get_mut(file)
                    .ok_or_else(|| anyhow::anyhow!("fixture {file}: events before its header"))?
                    .push(v.to_string());
            }
        }
        anyhow::ensure!(
            !files.is_empty(),
            "no REPLAY-FIXTURE lines in the test output"
        );
        Ok(files)
    }
}

/// The scenario test that prints the probe plan (`PLAN ...` lines).
const PLAN_TEST: &str = "probe_plan_prefers_best_available_mechanism";

/// The probe-plan part of a matrix pass's summary for one guest: the
/// `PLAN ...` lines of its console log, or why there are none (a pass that
/// does not run [`PLAN_TEST`], such as the sweep pass, prints no plan).
fn plan_summary(log: &str, target: &str, tests: &[String], console_log: &Path) -> Vec<String> {
    let plan: Vec<String> = log
        .lines()
        .filter_map(|l| {
            l.split_once("PLAN ")
                .map(|(_, p)| format!("    {}", p.trim_end()))
        })
        .collect();
    if !plan.is_empty() {
        return plan;
    }
    let why = if target == "scenarios" && tests.iter().any(|t| t == PLAN_TEST) {
        format!(
            "{PLAN_TEST} ran but printed no plan: see {}",
            console_log.display()
        )
    } else {
        format!("the {target} pass does not run {PLAN_TEST} (the scenarios pass prints the plan)")
    };
    vec![format!("    (no plan: {why})")]
}

/// Scenario tests run in every guest kernel of the matrix (exact names: each
/// must run and pass, a name that matches nothing fails the matrix).
const VM_TESTS: &[&str] = &[
    PLAN_TEST,
    "s1_blackhole_events_end_to_end",
    "s1_horizon_retries2_3",
    "s1_horizon_retries2_5",
    "s2_user_timeout",
    "s1_recovery_clears_the_stall_at_once",
    // S1 once per write-timer mechanism the guest kernel offers (fentry,
    // kprobe, timer tracepoint, sock_ops), each forced with --mechanism.
    "s1_with_every_working_write_timer_mechanism",
    // Behavioural harness: one socket action per kernel program, exact
    // event fields (the write timer once per mechanism the guest offers).
    "programs::state_program_fields",
    "programs::retransmit_program_fields",
    "programs::error_report_program_fields",
    "programs::ack_program_fields",
    "programs::write_timer_program_fields_per_mechanism",
    // The socket sweep (iter/task_file + bpf_sock_from_file): start-up
    // reconcile of an S1 stall in progress.
    "sweep/sweep_startup_ipv4_retries2_15",
];

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn step(msg: &str) {
    eprintln!("\x1b[1m==> {msg}\x1b[0m");
}

pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Build the agent (release) and return the binary's path.
fn build_agent() -> anyhow::Result<PathBuf> {
    step("building tcpstall (eBPF programs via nightly + bpf-linker, agent via stable)");
    let t = std::time::Instant::now();
    run_cmd(cargo().args(["build", "--release", "-p", "tcpstall"]))?;
    let bin = workspace_root().join("target/release/tcpstall");
    eprintln!("    built {} in {:.0?}", bin.display(), t.elapsed());
    Ok(bin)
}

/// Build the scenario test binary and return its path.
fn build_scenarios() -> anyhow::Result<PathBuf> {
    build_test_binary("scenarios")
}

/// Build one tcpstall-tests test target and return its executable.
fn build_test_binary(target: &str) -> anyhow::Result<PathBuf> {
    let out = cargo()
        .args([
            "test",
            "--release",
            "-p",
            "tcpstall-tests",
            "--test",
            target,
            "--no-run",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("building the {target} tests"))?;
    if !out.status.success() {
        bail!("building the {target} tests failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == target)
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo did not report the {target} test executable"))
}

/// Runs the matrix: names prefixed `sweep/` come from the `sweep` test
/// target (tcpstall-tests/tests/sweep.rs), the others from `scenarios`.
fn vm_matrix(opts: &vm::VmOptions, agent: &Path, tests: &[String]) -> anyhow::Result<()> {
    let (sweep, scenarios): (Vec<String>, Vec<String>) =
        tests.iter().cloned().partition(|t| t.starts_with("sweep/"));
    if !scenarios.is_empty() {
        vm_matrix_target(opts, agent, "scenarios", &scenarios)?;
    }
    if !sweep.is_empty() {
        let names: Vec<String> = sweep
            .iter()
            .map(|t| t.trim_start_matches("sweep/").to_owned())
            .collect();
        vm_matrix_target(opts, agent, "sweep", &names)?;
    }
    Ok(())
}

fn vm_matrix_target(
    opts: &vm::VmOptions,
    agent: &Path,
    target: &str,
    tests: &[String],
) -> anyhow::Result<()> {
    let scenarios = build_test_binary(target)?;
    step(&format!(
        "kernel matrix under QEMU: {}",
        opts.kernels.join(", ")
    ));
    // --nocapture: the probe plan and per-flow traces appear in the console log.
    let mut test_args = ["--test-threads=1", "--nocapture", "--exact"]
        .map(String::from)
        .to_vec();
    test_args.extend(tests.iter().cloned());
    let payload = vm::GuestPayload {
        agent: agent.to_path_buf(),
        tests: scenarios,
        test_args,
        extra_env: Vec::new(),
        extra_bins: Vec::new(),
        expected_passed: Some(tests.len()),
    };
    let results = vm::vm_test(opts, &payload)?;
    eprintln!(
        "\n{:<8} {:<28} {:<6} summary",
        "kernel", "release", "result"
    );
    for r in &results {
        eprintln!(
            "{:<8} {:<28} {:<6} boot {:>6} total {:>6.1?} log {}",
            r.kernel,
            r.release,
            if r.passed { "PASS" } else { "FAIL" },
            r.boot_time
                .map(|b| format!("{:.1}s", b.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
            r.total_time,
            r.console_log.display()
        );
    }
    for r in &results {
        eprintln!("\nprobe plan chosen on {} ({}):", r.kernel, r.release);
        let log = std::fs::read(&r.console_log).unwrap_or_default();
        let log = String::from_utf8_lossy(&log);
        for line in plan_summary(&log, target, tests, &r.console_log) {
            eprintln!("{line}");
        }
        // The sweep iterator each started agent loaded (its start-up line).
        let sweep: std::collections::BTreeSet<&str> = log
            .lines()
            .filter_map(|l| {
                l.split_once("AGENT sweep program: ")
                    .map(|(_, p)| p.trim_end())
            })
            .collect();
        eprintln!(
            "    sweep program: {}",
            if sweep.is_empty() {
                "(no agent started)".to_owned()
            } else {
                sweep.into_iter().collect::<Vec<_>>().join(", ")
            }
        );
    }
    let failed: Vec<_> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| r.kernel.clone())
        .collect();
    if !failed.is_empty() {
        bail!(
            "scenario tests failed on kernel(s) {} (console logs under {})",
            failed.join(", "),
            opts.cache_dir.display()
        );
    }
    Ok(())
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "{what} needs root (BPF programs, network namespaces): run it as root, e.g. `sudo -E cargo xtask ...`"
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup { toolchain_only } => {
            setup::toolchain()?;
            if !toolchain_only {
                setup::system_packages()?;
                setup::debian_packages(setup::BENCH_PACKAGES)?;
            }
        }
        Cmd::Build => {
            setup::toolchain()?;
            build_agent()?;
        }
        Cmd::Run { args } => {
            setup::toolchain()?;
            let bin = build_agent()?;
            require_root("running the agent")?;
            let args = if args.is_empty() {
                ["run", "--log-events", "--listen", "127.0.0.1:9977"]
                    .map(String::from)
                    .to_vec()
            } else {
                args
            };
            step(&format!("running {} {}", bin.display(), args.join(" ")));
            let err = std::os::unix::process::CommandExt::exec(Command::new(&bin).args(&args));
            bail!("could not exec {}: {err}", bin.display());
        }
        Cmd::Test {
            unit_only,
            filter,
            no_vm,
        } => {
            setup::toolchain()?;
            let vm_opts = vm::VmOptions::default();
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
                step(
                    "extracting BTF of the matrix kernels (unit tests check the field layout on each)",
                );
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
            step(
                "privileged scenario tests on this kernel (real probes, namespaces, a real Prometheus)",
            );
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
                    ""
                } else {
                    ", QEMU kernel matrix (6.1, 6.12)"
                }
            ));
        }
        Cmd::Accuracy => {
            setup::toolchain()?;
            require_root("`cargo xtask accuracy` (real connections in namespaces)")?;
            setup::system_packages()?;
            let agent = build_agent()?;
            let scenarios = build_scenarios()?;
            step(
                "blackholed connections: tcp_retries2 = 3, 5, 8 and TCP_USER_TIMEOUT = 4000 ms (about 2.5 minutes)",
            );
            let out = Command::new(&scenarios)
                .args([
                    "--test-threads=1",
                    "--nocapture",
                    "s1_horizon",
                    "s2_user_timeout",
                ])
                .env("TCPSTALL_AGENT_BIN", &agent)
                .stdout(std::process::Stdio::inherit())
                .stderr(std::process::Stdio::piped())
                .output()
                .context("running the horizon scenarios")?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            let rows: Vec<&str> = stderr
                .lines()
                .filter_map(|l| l.strip_prefix("ACCURACY "))
                .collect();
            println!(
                "\nkernel {}\n",
                std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim()
            );
            println!(
                "| tcp_retries2 | TCP_USER_TIMEOUT | boundary | ETIMEDOUT after write | first prediction ahead by | its error | last prediction error | RTOs when flagged |"
            );
            println!("|---|---|---|---|---|---|---|---|");
            for r in &rows {
                println!("{r}");
            }
            if !out.status.success() {
                eprintln!("{stderr}");
                bail!("a horizon scenario failed (output above)");
            }
        }
        Cmd::Bench {
            kernel,
            opts,
            vm,
            vm_cache_dir,
            vm_timeout,
            args,
        } => {
            setup::toolchain()?;
            if kernel {
                setup::debian_packages(setup::BENCH_PACKAGES)?;
                let agent = build_agent()?;
                match vm {
                    None => {
                        xtask::kernel_bench::check_prerequisites(&opts)?;
                        let command =
                            format!("cargo xtask bench --kernel {}", opts.to_args().join(" "));
                        xtask::kernel_bench::run_and_print(&agent, &opts, &command, false)?;
                    }
                    Some(kernels) => {
                        require_root(
                            "`cargo xtask bench --kernel --vm` (QEMU, BPF in the guests)",
                        )?;
                        setup::debian_packages(vm::VM_DEBIAN_PACKAGES)?;
                        let mut vm_opts = vm::VmOptions::default();
                        if !kernels.is_empty() {
                            vm_opts.kernels = kernels;
                        }
                        if let Some(d) = vm_cache_dir {
                            vm_opts.cache_dir = d;
                        }
                        vm_opts.timeout = vm_timeout;
                        kernel_bench_vm::run(&vm_opts, &agent, &opts)?;
                    }
                }
                return Ok(());
            }
            // (criterion bench in tcpstall/benches, what it measures, needs root)
            let benches = [
                ("hot_path", "criterion benchmarks (tcpstall/benches)", false),
                (
                    "sweep",
                    "socket sweep at 100,000 sockets (tcpstall/benches/sweep.rs)",
                    true,
                ),
            ];
            for (bench, label, needs_root) in benches {
                if needs_root && !is_root() {
                    eprintln!("    {label}: not run, it needs root (sudo -E cargo xtask bench)");
                    continue;
                }
                step(label);
                run_cmd(
                    cargo()
                        .args(["bench", "-p", "tcpstall", "--bench", bench, "--"])
                        .args(&args),
                )?;
            }
            eprintln!("    kernel program cost: `cargo xtask bench --kernel` (root; see --help)");
        }
        Cmd::Image { tag } => {
            setup::toolchain()?;
            image::build(&tag)?;
        }
        Cmd::RecordFixtures { vm, from_logs } if !from_logs.is_empty() => {
            let mut outputs = Vec::new();
            for log in &from_logs {
                let bytes =
                    std::fs::read(log).with_context(|| format!("reading {}", log.display()))?;
                outputs.push(String::from_utf8_lossy(&bytes).into_owned());
            }
            let _ = vm;
            fixtures::write(&outputs)?;
        }
        Cmd::RecordFixtures { vm, .. } => {
            setup::toolchain()?;
            require_root("`cargo xtask record-fixtures` (real connections in namespaces)")?;
            setup::system_packages()?;
            setup::debian_packages(vm::VM_DEBIAN_PACKAGES)?;
            let agent = build_agent()?;
            let scenarios = build_scenarios()?;
            let tests: Vec<String> = FIXTURE_TESTS.iter().map(|s| s.to_string()).collect();
            step("replay fixtures on this kernel");
            let out = Command::new(&scenarios)
                .args(["--test-threads=1", "--nocapture", "--exact"])
                .args(&tests)
                .env("TCPSTALL_AGENT_BIN", &agent)
                .stderr(std::process::Stdio::inherit())
                .output()
                .context("running the horizon scenarios")?;
            if !out.status.success() {
                bail!("a horizon scenario failed on this kernel (output above)");
            }
            let mut outputs = vec![String::from_utf8_lossy(&out.stdout).into_owned()];
            vm_matrix(&vm, &agent, &tests)?;
            for spec in &vm.kernels {
                let log = vm.cache_dir.join(spec).join("console.log");
                outputs.push(
                    String::from_utf8_lossy(
                        &std::fs::read(&log)
                            .with_context(|| format!("reading {}", log.display()))?,
                    )
                    .into_owned(),
                );
            }
            fixtures::write(&outputs)?;
        }
        Cmd::VmTest { vm, tests } => {
            setup::toolchain()?;
            setup::debian_packages(vm::VM_DEBIAN_PACKAGES)?;
            let bin = build_agent()?;
            vm_matrix(&vm, &bin, &tests)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mutation: `target == "sweep"` in place of `"scenarios"` in
    /// `plan_summary` fails the last assertion: a scenarios pass that ran
    /// the plan test without a plan says "the scenarios pass does not run
    /// probe_plan_prefers_best_available_mechanism".
    #[test]
    fn plan_summary_prints_the_plan_or_says_why_not() {
        let log_path = Path::new("/cache/6.1/console.log");
        let scenarios = vec![PLAN_TEST.to_owned(), "s2_user_timeout".to_owned()];
        let log = "boot\n[  1.0] PLAN retransmit -> \"tp_btf\"\nPLAN     kprobe  \"refused\"\n";
        assert_eq!(
            plan_summary(log, "scenarios", &scenarios, log_path),
            vec![
                "    retransmit -> \"tp_btf\"",
                "        kprobe  \"refused\""
            ]
        );
        let sweep = vec!["sweep_startup_ipv4_retries2_15".to_owned()];
        assert_eq!(
            plan_summary("boot\n", "sweep", &sweep, log_path),
            vec![format!(
                "    (no plan: the sweep pass does not run {PLAN_TEST} (the scenarios pass prints \
                 the plan))"
            )]
        );
        let [line] = &plan_summary("boot\n", "scenarios", &scenarios, log_path)[..] else {
            panic!("one line");
        };
        assert!(
            line.contains("ran but printed no plan: see /cache/6.1/console.log"),
            "{line}"
        );
    }
}
