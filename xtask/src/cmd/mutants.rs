//! `cargo xtask mutants`: cargo-mutants on the pure modules (the engine,
//! identity parsing, configuration, incidents), on demand and within a time
//! budget; not part of CI. Installs cargo-mutants with `cargo install
//! --locked` when it is missing. Mutates the work tree in place (the warm
//! `target/` is reused; cargo-mutants restores every file after each
//! mutant): do not edit the tree while it runs. At the budget the run is
//! stopped and what was tested so far is reported: the surviving mutants
//! (`missed`), each to be killed by a test or listed with a reason in
//! `docs/testing.md`.

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
    only: Option<String>,
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
    let bin = ensure_cargo_mutants()?;
    let root = workspace_root();
    let out_dir = root.join("target/mutants");
    std::fs::create_dir_all(&out_dir).context("creating target/mutants")?;
    let deadline = Instant::now() + Duration::from_secs(budget_minutes * 60);
    for (name, files) in chosen {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            println!("{name}: not run (the time budget is spent)");
            continue;
        }
        let out = out_dir.join(name);
        let mut cmd = Command::new(&bin);
        cmd.current_dir(&root)
            .arg("mutants")
            .args(["--package", "tcpstall", "--in-place", "--no-shuffle"])
            .args(["--timeout", "300", "--build-timeout", "900"])
            // Every cargo command in release (the profile the tests are
            // warm in), not only `cargo test`'s run.
            .arg("--cargo-arg=--release")
            .arg("--output")
            .arg(&out);
        // `--only`: a narrower glob inside the target (e.g. one file).
        match &only {
            Some(glob) => {
                cmd.args(["--file", glob]);
            }
            None => {
                for f in *files {
                    cmd.args(["--file", f]);
                }
            }
        }
        for e in EXCLUDED {
            cmd.args(["--exclude", e]);
        }
        if list {
            cmd.arg("--list");
        }
        // cargo test arguments, then the test binary's (the unit tests of
        // the target only).
        cmd.args(["--", "--lib", "--"]);
        cmd.args(test_filters(name));
        step(&format!(
            "cargo-mutants on {name} ({}), at most {} min",
            files.join(" "),
            remaining.as_secs().div_ceil(60)
        ));
        let finished = run_until(&mut cmd, remaining)?;
        if list {
            continue;
        }
        report(name, &out.join("mutants.out"), finished)?;
    }
    Ok(())
}

/// Runs `cmd` until it exits or `budget` passes (then stops it, restoring
/// the tree is cargo-mutants' own job on interrupt). Returns whether it
/// finished.
fn run_until(cmd: &mut Command, budget: Duration) -> anyhow::Result<bool> {
    let mut child = cmd
        .stdin(Stdio::null())
        .spawn()
        .context("starting cargo-mutants")?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            // Exit 2: mutants survived, 3: timeouts; both are results.
            // Interrupted at the budget is handled below.
            if !matches!(status.code(), Some(0 | 2 | 3)) {
                bail!("cargo-mutants failed ({status}); see its output above");
            }
            return Ok(true);
        }
        if start.elapsed() >= budget {
            // SIGINT: cargo-mutants restores the mutated file and stops.
            let pid = child.id().to_string();
            let _ = Command::new("kill").args(["-INT", &pid]).status();
            let _ = child.wait();
            return Ok(false);
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
