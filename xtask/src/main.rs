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
        /// Also boot the oldest kernel the agent runs on (`vm::OLDEST_KERNEL`,
        /// Debian bullseye's 5.10: no sweep, no error_report probe) in the
        /// matrix, after the default kernels (about 5 more minutes).
        #[arg(long, conflicts_with = "no_vm")]
        vm_oldest: bool,
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
    // The socket sweep (iter/task_file + bpf_sock_from_file): a sweep
    // program loads where the kernel offers the hooks, and where it does not
    // (5.10) every candidate says "not offered" and the agent still runs.
    "sweep/sweep_loads_where_the_kernel_offers_it",
    // Start-up reconcile of an S1 stall in progress (guests whose kernel
    // offers the sweep's hooks: SWEEP_HOOK_TESTS).
    "sweep/sweep_startup_ipv4_retries2_15",
];

/// Tests of VM_TESTS that need the sweep's kernel hooks (the
/// `bpf_iter_task_file` iterator and the `bpf_sock_from_file` helper,
/// 5.11+): not run in a guest whose kernel BTF lacks them, where
/// `sweep_loads_where_the_kernel_offers_it` checks instead that the agent
/// says why the sweep is off.
const SWEEP_HOOK_TESTS: &[&str] = &["sweep/sweep_startup_ipv4_retries2_15"];

/// Whether a kernel's BTF has the sweep's hooks (the same check as the
/// sweep tests' `kernel_offers_the_sweep`).
fn btf_offers_the_sweep(btf: &[u8]) -> bool {
    ["bpf_iter_task_file", "bpf_sock_from_file"]
        .iter()
        .all(|name| {
            let needle = [b"\0", name.as_bytes(), b"\0"].concat();
            btf.windows(needle.len()).any(|w| w == needle.as_slice())
        })
}

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

/// One pass of the matrix: one test target run in every guest.
struct MatrixPass {
    /// `scenarios` or `sweep` (the tcpstall-tests test target).
    target: &'static str,
    /// Per guest (spec): the tests it ran.
    tests: Vec<(String, Vec<String>)>,
    /// Per guest; `console_log` is the pass's own copy
    /// (`<cache>/<spec>/console-<target>.log`).
    results: Vec<vm::KernelResult>,
}

impl MatrixPass {
    fn tests_of(&self, spec: &str) -> &[String] {
        self.tests
            .iter()
            .find(|(k, _)| k == spec)
            .map(|(_, t)| t.as_slice())
            .unwrap_or_default()
    }
}

/// Runs the matrix: names prefixed `sweep/` come from the `sweep` test
/// target (tcpstall-tests/tests/sweep.rs), the others from `scenarios`.
/// Every guest runs both passes (the sweep pass even when the scenarios
/// failed there); the summary at the end lists per guest the kernel
/// release, each pass's result, the probe plan and the sweep program, and
/// the matrix fails if any pass failed on any guest.
fn vm_matrix(
    opts: &vm::VmOptions,
    agent: &Path,
    tests: &[String],
) -> anyhow::Result<Vec<MatrixPass>> {
    let (sweep, scenarios): (Vec<String>, Vec<String>) =
        tests.iter().cloned().partition(|t| t.starts_with("sweep/"));
    // Which guests offer the sweep's hooks, from their BTF (cached under
    // .cache/btf; the unit tests of `cargo xtask test` read the same files).
    // A kernel that cannot be fetched fails in its own boot below.
    let mut hookless = std::collections::BTreeSet::new();
    for spec in &opts.kernels {
        let one = vm::VmOptions {
            kernels: vec![spec.clone()],
            ..opts.clone()
        };
        let data = match vm::extract_btf_with(&one, &vm::default_btf_dir()) {
            Ok(paths) => std::fs::read(&paths[0])
                .with_context(|| format!("reading {}", paths[0].display()))?,
            Err(e) => {
                eprintln!("    {spec}: no BTF ({e:#}): its boots will say why");
                continue;
            }
        };
        if !btf_offers_the_sweep(&data) {
            eprintln!(
                "    {spec}: its BTF has no bpf_iter_task_file / bpf_sock_from_file: the sweep pass \
                 skips {} there",
                SWEEP_HOOK_TESTS.join(", ")
            );
            hookless.insert(spec.clone());
        }
    }
    let mut passes = Vec::new();
    if !scenarios.is_empty() {
        let per_guest = |_: &str| scenarios.clone();
        passes.push(vm_matrix_target(opts, agent, "scenarios", &per_guest)?);
    }
    if !sweep.is_empty() {
        let per_guest = |spec: &str| -> Vec<String> {
            sweep
                .iter()
                .filter(|t| !hookless.contains(spec) || !SWEEP_HOOK_TESTS.contains(&t.as_str()))
                .map(|t| t.trim_start_matches("sweep/").to_owned())
                .collect()
        };
        passes.push(vm_matrix_target(opts, agent, "sweep", &per_guest)?);
    }
    for line in matrix_summary(&opts.kernels, &passes) {
        eprintln!("{line}");
    }
    let failed: Vec<String> = passes
        .iter()
        .flat_map(|p| {
            p.results
                .iter()
                .filter(|r| !r.passed)
                .map(move |r| format!("{} ({})", r.kernel, p.target))
        })
        .collect();
    if !failed.is_empty() {
        bail!(
            "the kernel matrix failed on {} (console logs under {})",
            failed.join(", "),
            opts.cache_dir.display()
        );
    }
    Ok(passes)
}

/// Boots every guest with one test target (`tests_for(spec)`: the exact
/// test names for that guest; guests with the same list share one
/// `vm_test` call); never fails for a guest's failure (that is in the
/// results).
fn vm_matrix_target(
    opts: &vm::VmOptions,
    agent: &Path,
    target: &'static str,
    tests_for: &dyn Fn(&str) -> Vec<String>,
) -> anyhow::Result<MatrixPass> {
    let binary = build_test_binary(target)?;
    // Groups of consecutive guests with the same test list, in matrix order.
    let mut groups: Vec<(Vec<String>, Vec<String>)> = Vec::new();
    for spec in &opts.kernels {
        let tests = tests_for(spec);
        match groups.last_mut() {
            Some((t, kernels)) if *t == tests => kernels.push(spec.clone()),
            _ => groups.push((tests, vec![spec.clone()])),
        }
    }
    let mut results = Vec::new();
    let mut tests_run = Vec::new();
    for (tests, kernels) in groups {
        step(&format!(
            "kernel matrix under QEMU, {target} pass ({} tests): {}",
            tests.len(),
            kernels.join(", ")
        ));
        if tests.is_empty() {
            continue;
        }
        // --nocapture: the probe plan and per-flow traces appear in the console log.
        let mut test_args = ["--test-threads=1", "--nocapture", "--exact"]
            .map(String::from)
            .to_vec();
        test_args.extend(tests.iter().cloned());
        let payload = vm::GuestPayload {
            agent: agent.to_path_buf(),
            tests: binary.clone(),
            test_args,
            extra_env: Vec::new(),
            extra_bins: Vec::new(),
            expected_passed: Some(tests.len()),
        };
        let group_opts = vm::VmOptions {
            kernels,
            ..opts.clone()
        };
        for mut r in vm::vm_test(&group_opts, &payload)? {
            // The next pass boots the same guest and rewrites console.log: keep this one's.
            let copy = r
                .console_log
                .with_file_name(format!("console-{target}.log"));
            if std::fs::copy(&r.console_log, &copy).is_ok() {
                r.console_log = copy;
            }
            tests_run.push((r.kernel.clone(), tests.clone()));
            results.push(r);
        }
    }
    Ok(MatrixPass {
        target,
        tests: tests_run,
        results,
    })
}

/// The sweep iterator each agent the pass started loaded (the harness
/// prints `AGENT sweep program: <program>` at every agent start), and the
/// sweep test's own finding of whether the kernel offers the sweep's hooks.
fn sweep_summary(logs: &[String]) -> Vec<String> {
    let programs: std::collections::BTreeSet<&str> = logs
        .iter()
        .flat_map(|log| log.lines())
        .filter_map(|l| {
            l.split_once("AGENT sweep program: ")
                .map(|(_, p)| p.trim_end())
        })
        .collect();
    let mut out = vec![format!(
        "    sweep program: {}",
        if programs.is_empty() {
            "(no agent started)".to_owned()
        } else {
            programs.into_iter().collect::<Vec<_>>().join(", ")
        }
    )];
    let offered: std::collections::BTreeSet<&str> = logs
        .iter()
        .flat_map(|log| log.lines())
        .filter_map(|l| l.split_once("SWEEP OFFERED ").map(|(_, p)| p.trim_end()))
        .collect();
    out.extend(
        offered
            .into_iter()
            .map(|o| format!("    sweep hooks offered: {o}")),
    );
    out
}

/// The summary printed at the end of the matrix: per guest, the kernel
/// release, each pass's result and timings, the probe plan (from the
/// scenarios pass) and the sweep program (from every pass).
fn matrix_summary(kernels: &[String], passes: &[MatrixPass]) -> Vec<String> {
    let mut out = vec![String::new(), "==> kernel matrix summary".to_owned()];
    for spec in kernels {
        let mine: Vec<(&MatrixPass, &vm::KernelResult)> = passes
            .iter()
            .filter_map(|p| p.results.iter().find(|r| &r.kernel == spec).map(|r| (p, r)))
            .collect();
        let release = mine
            .iter()
            .map(|(_, r)| r.release.as_str())
            .find(|r| !r.is_empty())
            .unwrap_or("(release unknown: the kernel was not fetched)");
        out.push(format!("{spec}: kernel {release}"));
        for (p, r) in &mine {
            out.push(format!(
                "    {:<9} {:<4} {} tests, boot {}, total {:.1}s, log {}",
                p.target,
                if r.passed { "PASS" } else { "FAIL" },
                p.tests_of(spec).len(),
                r.boot_time
                    .map(|b| format!("{:.1}s", b.as_secs_f64()))
                    .unwrap_or_else(|| "-".into()),
                r.total_time.as_secs_f64(),
                r.console_log.display()
            ));
            if !r.passed {
                out.push(format!("              {}", r.summary));
            }
        }
        let logs: Vec<String> = mine
            .iter()
            .map(|(_, r)| {
                String::from_utf8_lossy(&std::fs::read(&r.console_log).unwrap_or_default())
                    .into_owned()
            })
            .collect();
        // The plan comes from the scenarios pass (the one that runs PLAN_TEST).
        let plan_pass = mine
            .iter()
            .zip(&logs)
            .find(|((p, _), _)| p.target == "scenarios")
            .or_else(|| mine.iter().zip(&logs).next());
        // One line per probe (its chosen mechanism); every attempt and why
        // it was refused is in the pass's console log.
        out.push("    probe plan (mechanism per probe):".to_owned());
        if let Some(((p, r), log)) = plan_pass {
            out.extend(
                plan_summary(log, p.target, p.tests_of(spec), &r.console_log)
                    .into_iter()
                    .filter(|l| l.contains(" -> ") || l.contains("(no plan"))
                    .map(|l| format!("  {l}")),
            );
        }
        out.extend(sweep_summary(&logs));
    }
    out
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
            vm_oldest,
        } => {
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
                    String::new()
                } else {
                    format!(", QEMU kernel matrix ({})", vm_opts.kernels.join(", "))
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
            let passes = vm_matrix(&vm, &agent, &tests)?;
            for r in passes.iter().flat_map(|p| &p.results) {
                let log = &r.console_log;
                outputs.push(
                    String::from_utf8_lossy(
                        &std::fs::read(log)
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

    #[test]
    fn sweep_hooks_from_btf() {
        let with = b"\0bpf_iter_task_file\0x\0bpf_sock_from_file\0";
        assert!(btf_offers_the_sweep(with));
        // 5.10: the iterator, no bpf_sock_from_file.
        assert!(!btf_offers_the_sweep(
            b"\0bpf_iter_task_file\0bpf_sock_from_file_x\0"
        ));
        assert!(!btf_offers_the_sweep(b""));
    }

    #[test]
    fn sweep_summary_lists_programs_and_hooks() {
        let logs = vec![
            "AGENT sweep program: tcpstall_sweep_direct\nAGENT sweep program: tcpstall_sweep_direct\n"
                .to_owned(),
            "SWEEP OFFERED | kernel 7.3.4 | BTF true | version true\n".to_owned(),
        ];
        assert_eq!(
            sweep_summary(&logs),
            vec![
                "    sweep program: tcpstall_sweep_direct",
                "    sweep hooks offered: | kernel 7.3.4 | BTF true | version true",
            ]
        );
        assert_eq!(
            sweep_summary(&["boot\n".to_owned()]),
            vec!["    sweep program: (no agent started)"]
        );
    }

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
