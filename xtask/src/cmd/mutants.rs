//! `cargo xtask mutants`: cargo-mutants on the pure modules (the engine,
//! identity parsing, configuration, incidents), on demand and within a time
//! budget; not part of CI. Installs cargo-mutants with `cargo install
//! --locked` when it is missing. Mutates the work tree in place (the warm
//! `target/` is reused; cargo-mutants restores every file after each
//! mutant): do not edit the tree while it runs. At the budget the run is
//! stopped and what was tested so far is reported: the surviving mutants
//! (`missed`), each to be killed by a test or listed with a reason in
//! `docs/testing.md`.
//!
//! Without `--only`, each target is one run; `--only GLOB` (repeatable)
//! makes each glob its own run. The budget is shared equally among the runs
//! not yet started, and cargo-mutants tests a run's mutants in a random
//! order, so a run stopped at its share is a random sample of its files'
//! mutants, not the first functions of the first file.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::util::{cargo, step, workspace_root};

/// The pure modules cargo-mutants may mutate, by name.
pub const TARGETS: &[(&str, &[&str])] = &[
    ("engine", &["tcpstall/src/engine/**/*.rs"]),
    ("identity", &["tcpstall/src/identity/**/*.rs"]),
    ("config", &["tcpstall/src/cli/config.rs"]),
    ("incidents", &["tcpstall/src/serve/incidents.rs"]),
];

/// Never mutated: tests, and the engine's test-only kernel model (the
/// referee, not the code under test).
const EXCLUDED: &[&str] = &[
    "**/tests.rs",
    "**/tests/**",
    "tcpstall/src/engine/kernel_model/**",
];

/// The unit tests each target's mutants are tested with (filters of the
/// `tcpstall` library's tests).
fn test_filters(target: &str) -> &'static [&'static str] {
    match target {
        "engine" => &["engine::"],
        "identity" => &["identity::"],
        "config" => &["cli::"],
        "incidents" => &["serve::"],
        _ => &[],
    }
}

pub fn run(
    targets: Vec<String>,
    budget_minutes: u64,
    list: bool,
    only: Vec<String>,
) -> anyhow::Result<()> {
    let chosen: Vec<&(&str, &[&str])> = if targets.is_empty() {
        TARGETS.iter().collect()
    } else {
        targets
            .iter()
            .map(|t| {
                TARGETS.iter().find(|(n, _)| n == t).with_context(|| {
                    format!(
                        "unknown mutants target {t:?}: use one of {}",
                        TARGETS
                            .iter()
                            .map(|(n, _)| *n)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    if budget_minutes == 0 {
        bail!("--budget-minutes 0: give the run at least a minute");
    }
    if !only.is_empty() && chosen.len() != 1 {
        bail!(
            "--only narrows one target: name exactly one (e.g. `cargo xtask mutants engine --only ...`)"
        );
    }
    // One run per target, or per `--only` glob (each with its own outcomes).
    let runs: Vec<Run> = chosen
        .iter()
        .flat_map(|&&(name, files)| {
            if only.is_empty() {
                vec![Run {
                    target: name,
                    label: name.to_owned(),
                    files: files.iter().map(|f| (*f).to_owned()).collect(),
                }]
            } else {
                only.iter()
                    .map(|g| Run {
                        target: name,
                        label: format!("{name}-{}", slug(g)),
                        files: vec![g.clone()],
                    })
                    .collect()
            }
        })
        .collect();
    let bin = ensure_cargo_mutants()?;
    let root = workspace_root();
    let out_dir = root.join("target/mutants");
    std::fs::create_dir_all(&out_dir).context("creating target/mutants")?;
    let deadline = Instant::now() + Duration::from_secs(budget_minutes * 60);
    for (i, run) in runs.iter().enumerate() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            println!("{}: not run (the time budget is spent)", run.label);
            continue;
        }
        // This run's share: what is left, split among the runs left.
        let share = remaining / u32::try_from(runs.len() - i).unwrap_or(1);
        let out = out_dir.join(&run.label);
        let mut cmd = Command::new(&bin);
        cmd.current_dir(&root)
            .arg("mutants")
            .args(["--package", "tcpstall", "--in-place"])
            // Random order (cargo-mutants' default is now the source
            // order): a run stopped at its budget is a sample of its
            // files, not their first functions.
            .arg("--shuffle")
            // The engine's unit tests take 2-5 s at opt-level 0; a mutant
            // that makes them loop is a timeout after a minute.
            .args(["--timeout", "60", "--build-timeout", "600"])
            .args(PROFILE_ARGS)
            .envs(ENV.iter().copied())
            .arg("--output")
            .arg(&out);
        for f in &run.files {
            cmd.args(["--file", f]);
        }
        for e in EXCLUDED {
            cmd.args(["--exclude", e]);
        }
        if list {
            cmd.arg("--list");
        }
        // The unit tests of the target only (arguments of the test binary).
        cmd.args(["--", "--"]);
        cmd.args(test_filters(run.target));
        step(&format!(
            "cargo-mutants on {} ({}), at most {} min",
            run.label,
            run.files.join(" "),
            share.as_secs().div_ceil(60)
        ));
        let started = Instant::now();
        let mut finished = run_until(&mut cmd, share)?;
        if finished == Some(BASELINE_FAILED) {
            // A run stopped at its budget can stop rustc mid-build, leaving
            // an incremental cache that links to missing symbols ("undefined
            // hidden symbol"): the next unmutated baseline fails. Once more
            // from a clean cache of the mutated crate.
            step("the unmutated baseline failed: clearing tcpstall's incremental cache, once more");
            clear_incremental(&root)?;
            finished = run_until(&mut cmd, share.saturating_sub(started.elapsed()))?;
        }
        if let Some(code) = finished
            && !matches!(code, 0 | 2 | 3)
        {
            bail!("cargo-mutants failed (exit {code}); see its output above");
        }
        let finished = finished.is_some();
        if list {
            continue;
        }
        report(&run.label, &out.join("mutants.out"), finished)?;
    }
    Ok(())
}

/// Every cargo command of a run (build and test alike): the library's unit
/// tests only (`--lib`: no binary, no integration test is built per
/// mutant), in the release profile the tree is warm in (dependencies stay
/// as built, at opt-level 3), with the mutated crate alone built
/// incrementally at opt-level 0 in 256 codegen units (package overrides
/// apply to `tcpstall` only; its build script then runs in an OUT_DIR of
/// its own, so the normal release build's embedded eBPF object is left
/// alone). Measured on the 2-core host under load (docs/testing.md): a
/// mutant's rebuild is 3-6 s at opt-level 0 against 10-20 s at
/// opt-level 1, and the engine's tests 5 s instead of 1 s, of which 9 s of
/// one thread is the 20,000-case blackhole property test: under
/// `TCPSTALL_MUTANTS=1` (set by this command, [`ENV`]) the two long
/// property tests run a tenth of their cases.
const PROFILE_ARGS: &[&str] = &[
    "--cargo-arg=--release",
    "--cargo-arg=--lib",
    "--cargo-arg=--config=profile.release.incremental=true",
    "--cargo-arg=--config=profile.release.package.tcpstall.opt-level=0",
    "--cargo-arg=--config=profile.release.package.tcpstall.codegen-units=256",
];

/// The environment of every cargo command of a run: the long property
/// tests at a tenth of their cases, and no eBPF build (the unit tests load
/// no program; the placeholder object goes to the opt-level-0 build's own
/// OUT_DIR).
const ENV: &[(&str, &str)] = &[("TCPSTALL_MUTANTS", "1"), ("AYA_BUILD_SKIP", "1")];

/// One cargo-mutants run: the files of one target (or one `--only` glob).
struct Run {
    target: &'static str,
    label: String,
    files: Vec<String>,
}

/// A glob as a directory name: `tcpstall/src/engine/horizon/mod.rs` ->
/// `horizon-mod`.
fn slug(glob: &str) -> String {
    let tail = glob.strip_prefix("tcpstall/src/").unwrap_or(glob);
    let tail = tail.split_once('/').map_or(tail, |(_, t)| t);
    tail.trim_end_matches(".rs")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// Removes the mutated crate's incremental cache (release profile; the
/// opt-level-0 build's cache is beside the normal one's, both named
/// `tcpstall-*`).
fn clear_incremental(root: &Path) -> anyhow::Result<()> {
    let dir = root.join("target/release/incremental");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with("tcpstall-") {
            std::fs::remove_dir_all(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// cargo-mutants' exit code when the unmutated tree failed to build or
/// its tests failed.
const BASELINE_FAILED: i32 = 4;

/// Runs `cmd` until it exits (its exit code; 2: mutants survived, 3:
/// timeouts, both results) or `budget` passes (None: stopped with SIGINT,
/// on which cargo-mutants restores the mutated file and stops).
fn run_until(cmd: &mut Command, budget: Duration) -> anyhow::Result<Option<i32>> {
    let mut child = cmd
        .stdin(Stdio::null())
        .spawn()
        .context("starting cargo-mutants")?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status.code().unwrap_or(-1)));
        }
        if start.elapsed() >= budget {
            let pid = child.id().to_string();
            let _ = Command::new("kill").args(["-INT", &pid]).status();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Prints the counts and the surviving mutants of one run.
fn report(name: &str, dir: &Path, finished: bool) -> anyhow::Result<()> {
    let read = |f: &str| -> Vec<String> {
        std::fs::read_to_string(dir.join(f))
            .map(|s| s.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let caught = read("caught.txt");
    let missed = read("missed.txt");
    let timeout = read("timeout.txt");
    let unviable = read("unviable.txt");
    println!(
        "\n{name}: {} caught, {} missed, {} timed out, {} unviable{}",
        caught.len(),
        missed.len(),
        timeout.len(),
        unviable.len(),
        if finished {
            ""
        } else {
            " (stopped at the time budget: a partial run)"
        }
    );
    for m in &missed {
        println!("  MISSED {m}");
    }
    for m in &timeout {
        println!("  TIMEOUT {m}");
    }
    println!("  (outcomes: {})", dir.display());
    Ok(())
}

/// `cargo-mutants` on PATH or in cargo's bin directory, installed with
/// `cargo install --locked` when missing.
fn ensure_cargo_mutants() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let bin = home.join("bin/cargo-mutants");
    if bin.exists() {
        return Ok(bin);
    }
    step("installing cargo-mutants (cargo install --locked cargo-mutants; a few minutes)");
    let status = cargo()
        .args(["install", "--locked", "cargo-mutants"])
        .status()
        .context("running cargo install")?;
    if !status.success() || !bin.exists() {
        bail!(
            "cargo install --locked cargo-mutants failed ({status}): install it by hand, then rerun"
        );
    }
    Ok(bin)
}
