//! `cargo xtask vm-test`: the scenario tests inside Debian kernels under
//! QEMU, and the kernel matrix that `test` and `record-fixtures` run too.

use std::path::Path;

use anyhow::{Context as _, bail};

use xtask::vm;

use crate::{cmd::build::build_agent, cmd::build::build_test_binary, setup, util::step};

pub fn run(vm: vm::VmOptions, tests: Vec<String>) -> anyhow::Result<()> {
    setup::toolchain()?;
    setup::debian_packages(vm::VM_DEBIAN_PACKAGES)?;
    let bin = build_agent()?;
    vm_matrix(&vm, &bin, &tests)?;
    Ok(())
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
pub const VM_TESTS: &[&str] = &[
    PLAN_TEST,
    "s1_blackhole_events_end_to_end",
    "s1_horizon_retries2_3",
    "s1_horizon_retries2_5",
    "s2_user_timeout",
    "s1_recovery_clears_the_stall_at_once",
    // Zero window (cause peer_not_reading) and CLOSE_WAIT (cause
    // app_not_closing): every kernel has the signal.
    "s4_zero_window",
    "s5_close_wait",
    // connect() to a blackhole (SYN_SENT): tcp_syn_retries 4, TCP_SYNCNT 2,
    // TCP_USER_TIMEOUT 5 s at once, each kernel against its own rules
    // (linear SYN timeouts only where the sysctl exists).
    "connect::connect_horizon",
    // An orphan retransmitting its FIN (tcp_orphan_retries 3) and the
    // zero-window probe path (TCP_USER_TIMEOUT kills, with a per-socket
    // TCP_RTO_MAX_MS where the kernel has it). Host only: the alive-rule
    // orphan (needs tcp_rto_max_ms, 6.15+) and the zero window without a
    // user timeout (engine logic alone: no kernel rule to check).
    "orphan::orphan_fin_retries_3",
    "orphan::zero_window_user_timeout_dies",
    // Orphans in FIN_WAIT2 (tcp_fin_timeout 5 s, TCP_LINGER2 3 s) seen
    // through the timewait timer's tracepoints, the end measured with `ss`.
    // About 6 s on the host.
    "orphan::fin_wait2_timeouts",
    // An idle keepalive connection whose peer vanished (TCP_KEEPCNT, the
    // namespace's sysctls, TCP_USER_TIMEOUT), read through the keepalive
    // timer the guest's BTF names (icsk_keepalive_timer in both Debian
    // guests, sk_timer before it). About 13 s on the host.
    "keepalive::keepalive_horizon",
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
    // Why it stalls, where the guest kernel has the signal (a few minutes per
    // guest under TCG): a local drop named by the kernel (only where
    // its BTF names netfilter drops: DROP_REASON_TESTS), an ICMP soft error
    // (IPv4 and IPv6), and the path-MTU black hole with and without the
    // kernel's detection lowering the MSS.
    "causes::cause_local_drop_in_the_clients_output_chain",
    "causes::cause_unreachable_icmp_host_unreachable",
    "causes::cause_pmtu_blackhole_with_mtu_probing_lowers_the_mss",
    "causes::cause_pmtu_blackhole_without_mtu_probing",
    "causes::cause_unreachable_icmpv6_address_unreachable",
    // A silent stall ended by an RST (the reset rule put ahead of the
    // blackhole in one nftables change: removing the blackhole first let a
    // retransmission through under TCG).
    "causes::cause_reset_ends_a_silent_stall",
    // The guard (std sockets in pod cgroups, one agent each): both of its
    // programs arm TCP_USER_TIMEOUT / keepalive per pod rule, keep an
    // application's own value, leave other pods alone, dry-run reports
    // exactly what enforce changes, a passive socket follows the server
    // pod's rule; a kernel without the guard's setsockopt options gets
    // doctor's reason and the guard off instead (checked from its BTF).
    "guard_kernel::guard_arms_timeouts_per_pod_rule",
    "guard_kernel::guard_plain_fallback_arms_timeouts_per_pod_rule",
];

/// Tests of VM_TESTS that need the sweep's kernel hooks (the
/// `bpf_iter_task_file` iterator and the `bpf_sock_from_file` helper,
/// 5.11+): not run in a guest whose kernel BTF lacks them, where
/// `sweep_loads_where_the_kernel_offers_it` checks instead that the agent
/// says why the sweep is off.
const SWEEP_HOOK_TESTS: &[&str] = &["sweep/sweep_startup_ipv4_retries2_15"];

/// Tests of VM_TESTS that need the kernel to name its netfilter drops
/// (`SKB_DROP_REASON_NETFILTER_DROP` with the `kfree_skb` drop-reason
/// argument, 5.17 / 6.0+): not run in a guest whose BTF lacks it (5.10).
const DROP_REASON_TESTS: &[&str] = &["causes::cause_local_drop_in_the_clients_output_chain"];

/// Whether a kernel's BTF names netfilter drops (see [`DROP_REASON_TESTS`]).
fn btf_names_netfilter_drops(btf: &[u8]) -> bool {
    let needle = b"\0SKB_DROP_REASON_NETFILTER_DROP\0";
    btf.windows(needle.len()).any(|w| w == needle.as_slice())
}

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

/// One pass of the matrix: one test target run in every guest.
pub struct MatrixPass {
    /// `scenarios` or `sweep` (the tcpstall-tests test target).
    target: &'static str,
    /// Per guest (spec): the tests it ran.
    tests: Vec<(String, Vec<String>)>,
    /// Per guest; `console_log` is the pass's own copy
    /// (`<cache>/<spec>/console-<target>.log`).
    pub results: Vec<vm::KernelResult>,
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
pub fn vm_matrix(
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
    let mut reasonless = std::collections::BTreeSet::new();
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
        if !btf_names_netfilter_drops(&data) {
            eprintln!(
                "    {spec}: its BTF has no SKB_DROP_REASON_NETFILTER_DROP: the scenarios pass \
                 skips {} there",
                DROP_REASON_TESTS.join(", ")
            );
            reasonless.insert(spec.clone());
        }
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
        let per_guest = |spec: &str| -> Vec<String> {
            scenarios
                .iter()
                .filter(|t| !reasonless.contains(spec) || !DROP_REASON_TESTS.contains(&t.as_str()))
                .cloned()
                .collect()
        };
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
        // --report-time (libtest's, unstable: RUSTC_BOOTSTRAP in the guest
        // allows it for a stable-built binary): each test's time under TCG,
        // summed up per guest in the summary (`slowest_tests`).
        let mut test_args = [
            "--test-threads=1",
            "--nocapture",
            "--exact",
            "-Zunstable-options",
            "--report-time",
        ]
        .map(String::from)
        .to_vec();
        test_args.extend(tests.iter().cloned());
        let payload = vm::GuestPayload {
            agent: agent.to_path_buf(),
            tests: binary.clone(),
            test_args,
            extra_env: vec![("RUSTC_BOOTSTRAP".to_owned(), "1".to_owned())],
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

/// Console lines shown under a failed pass in the summary: the end of
/// a run is the last thing CI prints, and a guest that died (a kernel
/// panic, the test binary killed) says why in its last lines.
const FAILURE_TAIL_LINES: usize = 25;

/// Lines shown from the first line of a kernel oops, panic or BUG.
const OOPS_HEAD_LINES: usize = 12;

/// The first line of a kernel report (`Oops: int3: 0000 [#1] SMP`,
/// `BUG: unable to handle page fault`, `Kernel panic - not syncing`,
/// `watchdog: BUG: soft lockup`, `general protection fault`).
fn is_oops_start(line: &str) -> bool {
    [
        "Oops:",
        "BUG:",
        "Kernel panic",
        "general protection fault",
        "------------[ cut here ]",
    ]
    .iter()
    .any(|m| line.contains(m))
}

/// The first lines of a kernel report when it scrolled out of the tail,
/// then the last non-empty lines of a failed pass's console log (the test in
/// progress and whatever the kernel printed last), indented under its
/// summary line; one line saying so when the log cannot be read.
fn failure_tail(console_log: &std::path::Path) -> Vec<String> {
    match std::fs::read(console_log) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            let from = lines.len().saturating_sub(FAILURE_TAIL_LINES);
            let mut out = Vec::new();
            // A kernel oops's first lines (what faulted, where, in which
            // test) scroll out of the tail under its register dumps.
            if let Some(at) = lines[..from].iter().position(|l| is_oops_start(l)) {
                let test = lines[..at].iter().rev().find(|l| l.contains("test "));
                out.push(format!(
                    "              the kernel's first report (line {} of the log{}):",
                    at + 1,
                    test.map_or(String::new(), |t| format!(", after `{}`", t.trim()))
                ));
                let end = (at + OOPS_HEAD_LINES).min(from);
                out.extend(
                    lines[at..end]
                        .iter()
                        .map(|l| format!("              | {l}")),
                );
            }
            out.push(format!(
                "              last {} console lines:",
                lines.len() - from
            ));
            out.extend(lines[from..].iter().map(|l| format!("              | {l}")));
            out
        }
        Err(e) => vec![format!(
            "              (console log {} unreadable: {e})",
            console_log.display()
        )],
    }
}

/// Each test's time from a console log run with libtest's `--report-time`
/// (`test NAME ... ` when it starts; `ok <1.234s>` when it ends, on the same
/// line or, with `--nocapture`, after the test's own output).
fn test_times(log: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in log.lines() {
        let mut rest = line.trim_end();
        if let Some(at) = rest.find("test ")
            && let Some(end) = rest[at..].find(" ... ")
        {
            current = Some(rest[at + 5..at + end].to_owned());
            rest = &rest[at + end + 5..];
        }
        let Some(name) = current.as_ref() else {
            continue;
        };
        if let Some(open) = rest.rfind('<')
            && rest.ends_with("s>")
            && ["ok ", "FAILED "]
                .iter()
                .any(|v| rest[..open].trim_start().starts_with(v.trim_end()))
            && let Ok(secs) = rest[open + 1..rest.len() - 2].parse::<f64>()
        {
            out.push((name.clone(), secs));
            current = None;
        }
    }
    out
}

/// The pass's slowest tests (`SLOWEST` of them) and the sum of all times,
/// as one summary line; None when the log has no times.
fn slowest_tests(log: &str) -> Option<String> {
    const SLOWEST: usize = 6;
    let mut times = test_times(log);
    if times.is_empty() {
        return None;
    }
    let sum: f64 = times.iter().map(|(_, t)| t).sum();
    times.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top: Vec<String> = times
        .iter()
        .take(SLOWEST)
        .map(|(n, t)| format!("{n} {t:.0}s"))
        .collect();
    Some(format!(
        "              tests took {sum:.0}s; slowest: {}",
        top.join(", ")
    ))
}

/// The guest's count of kernel text pokes during the payload (the init
/// script's `kernel text pokes` line), as a summary line.
fn text_pokes(log: &str) -> Option<String> {
    log.lines()
        .find_map(|l| l.split_once("TCPSTALL-VM: kernel text pokes during the payload"))
        .map(|(_, rest)| format!("              kernel text pokes{}", rest.trim_end()))
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
            let log = String::from_utf8_lossy(&std::fs::read(&r.console_log).unwrap_or_default())
                .into_owned();
            out.extend(slowest_tests(&log));
            out.extend(text_pokes(&log));
            if !r.passed {
                out.push(format!("              {}", r.summary));
                out.extend(failure_tail(&r.console_log));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Mutation: dropping the `current = None` after a time, or parsing
    /// only same-line results, fails it.
    #[test]
    fn test_times_from_a_report_time_log() {
        let log = "running 3 tests\n\
            test a::one ... ok <1.500s>\n\
            test b::two ... [agent] started\n\
            some output\n\
            ok <12.250s>\n\
            ok <9.0s>\n\
            test c ... FAILED <3.000s>\n";
        assert_eq!(
            test_times(log),
            vec![
                ("a::one".to_owned(), 1.5),
                ("b::two".to_owned(), 12.25),
                ("c".to_owned(), 3.0)
            ]
        );
        let line = slowest_tests(log).expect("times");
        assert!(
            line.contains("took 17s; slowest: b::two 12s, c 3s, a::one 2s"),
            "{line}"
        );
        assert_eq!(slowest_tests("test x ... ok\n"), None);
    }

    #[test]
    fn netfilter_drop_reason_from_btf() {
        assert!(btf_names_netfilter_drops(
            b"\0SKB_DROP_REASON_NETFILTER_DROP\0"
        ));
        assert!(!btf_names_netfilter_drops(
            b"\0SKB_DROP_REASON_NETFILTER_DROPX\0"
        ));
        assert!(!btf_names_netfilter_drops(b""));
    }

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
    fn failure_tail_shows_the_last_lines_of_a_dead_guest() {
        let dir = std::env::temp_dir().join(format!("xtask-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        let mut text: String = (0..40).map(|i| format!("line {i}\n\n")).collect();
        text.push_str("Kernel panic - not syncing: Attempted to kill init!\n");
        std::fs::write(&log, text).unwrap();
        let tail = failure_tail(&log);
        assert_eq!(tail.len(), FAILURE_TAIL_LINES + 1);
        assert_eq!(
            tail[0].trim(),
            format!("last {FAILURE_TAIL_LINES} console lines:")
        );
        assert_eq!(tail[1].trim(), "| line 16");
        assert!(
            tail.last()
                .unwrap()
                .ends_with("| Kernel panic - not syncing: Attempted to kill init!")
        );
        // An oops far above the tail: its head comes first, with the test
        // in progress.
        let mut text = String::from("test causes::x ... ok\ntest s1_horizon ... \n");
        text.push_str("[  635.1] Oops: int3: 0000 [#1] SMP NOPTI\n");
        text.push_str("[  635.2] RIP: 0010:call_timer_fn+0x1f/0x120\n");
        text.extend((0..60).map(|i| format!("regs {i}\n")));
        std::fs::write(&log, text).unwrap();
        let tail = failure_tail(&log);
        assert!(
            tail[0].contains("line 3 of the log, after `test s1_horizon ...`"),
            "{tail:?}"
        );
        assert!(
            tail[1].ends_with("| [  635.1] Oops: int3: 0000 [#1] SMP NOPTI"),
            "{tail:?}"
        );
        assert!(tail[2].ends_with("| [  635.2] RIP: 0010:call_timer_fn+0x1f/0x120"));
        assert_eq!(tail.len(), 1 + OOPS_HEAD_LINES + 1 + FAILURE_TAIL_LINES);
        let missing = failure_tail(&dir.join("absent.log"));
        assert_eq!(missing.len(), 1);
        assert!(missing[0].contains("unreadable"), "{missing:?}");
        std::fs::remove_dir_all(&dir).unwrap();
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
