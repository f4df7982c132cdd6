//! Installs what the build and the tests need, idempotently: the pinned eBPF
//! toolchain (`ebpf-toolchain.toml` at the repository root: the nightly by
//! date with `rust-src`, bpf-linker by exact version, built against that
//! nightly's own LLVM), Debian packages, PyPI tools.
//!
//! The toolchain step checks what is installed against the pin (`rustc -vV`'s
//! commit of the nightly, `bpf-linker --version`), not only that it runs; when
//! everything matches it spawns four local commands and touches no network.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use xtask::have;

use crate::util::{run_cmd, step, workspace_root};

/// `cargo xtask setup`: the toolchain, and unless `toolchain_only` the
/// Debian packages (with the bench's).
pub fn run(toolchain_only: bool) -> anyhow::Result<()> {
    toolchain()?;
    if !toolchain_only {
        system_packages()?;
        debian_packages(BENCH_PACKAGES)?;
    }
    Ok(())
}

/// Debian packages the tests and tools need.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "prometheus",
    // amtool: the deploy tests check the Alertmanager routing example.
    "prometheus-alertmanager",
    // The `tcpstall top` test drives the terminal view in a tmux pane.
    "tmux",
    "bpftool",
    "python3-pip",
    // deploy/kubernetes: `kubectl kustomize` renders the overlays.
    "kubectl",
    // setpriv (capability-set test), unshare, nsenter.
    "util-linux",
    // tests/containerd.rs: a real containerd (CRI plugin) with runc and the
    // CNI bridge plugin; its images are built by podman from a static busybox.
    "containerd",
    "runc",
    "containernetworking-plugins",
    "busybox-static",
    "podman",
    // tests/guard/psql.rs: a real Postgres server (initdb, postgres run as
    // the `postgres` user the package creates) and psql.
    "postgresql",
];

/// Debian packages `cargo xtask bench --kernel` needs (installed by
/// `cargo xtask setup` and by the bench itself, not by `cargo xtask test`).
pub const BENCH_PACKAGES: &[&str] = &["bpftrace", "bpftool", "iperf3", "util-linux"];

/// The pin, at the workspace root; tcpstall/build.rs reads the same file.
pub const PIN_FILE: &str = "ebpf-toolchain.toml";

/// The plain `nightly` toolchain: used as is when it is exactly the pinned one.
const NIGHTLY: &str = "nightly";

/// The eBPF toolchain pinned in [`PIN_FILE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// rustup's date of the nightly (toolchain `nightly-<date>`): the day it
    /// was published, usually the day after its commit-date.
    pub nightly: String,
    /// `commit-date:` of that nightly's `rustc -vV`.
    pub commit_date: String,
    /// `commit-hash:` of that nightly's `rustc -vV`.
    pub commit_hash: String,
    /// bpf-linker's exact version (`bpf-linker --version`).
    pub bpf_linker: String,
}

fn is_date(s: &str) -> bool {
    s.len() == 10
        && s.char_indices().all(|(i, c)| {
            if i == 4 || i == 7 {
                c == '-'
            } else {
                c.is_ascii_digit()
            }
        })
}

fn is_version(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
}

impl Pin {
    /// Parses the pin file: flat `key = "value"` lines, `#` comment lines.
    /// Unknown, repeated or missing keys and malformed values are errors.
    pub fn parse(text: &str) -> anyhow::Result<Pin> {
        let mut nightly = None;
        let mut commit_date = None;
        let mut commit_hash = None;
        let mut bpf_linker = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = || format!("{PIN_FILE} line {}", n + 1);
            let (key, value) = line
                .split_once('=')
                .with_context(|| format!("{}: expected `key = \"value\"`, got {line:?}", at()))?;
            let key = key.trim();
            let value = value
                .trim()
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .filter(|v| !v.contains('"'))
                .with_context(|| format!("{}: {key}: the value must be one quoted string", at()))?;
            let (slot, valid, what) = match key {
                "nightly" => (&mut nightly, is_date(value), "a date YYYY-MM-DD"),
                "nightly-commit-date" => (&mut commit_date, is_date(value), "a date YYYY-MM-DD"),
                "nightly-commit-hash" => (
                    &mut commit_hash,
                    value.len() == 40
                        && value
                            .chars()
                            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
                    "a full 40-digit commit hash",
                ),
                "bpf-linker" => (&mut bpf_linker, is_version(value), "an exact version X.Y.Z"),
                _ => bail!("{}: unknown key {key:?}", at()),
            };
            if !valid {
                bail!("{}: {key} = {value:?} is not {what}", at());
            }
            if slot.replace(value.to_owned()).is_some() {
                bail!("{}: {key} given twice", at());
            }
        }
        let need = |v: Option<String>, key: &str| {
            v.with_context(|| format!("{PIN_FILE}: no `{key} = \"...\"` line"))
        };
        let pin = Pin {
            nightly: need(nightly, "nightly")?,
            commit_date: need(commit_date, "nightly-commit-date")?,
            commit_hash: need(commit_hash, "nightly-commit-hash")?,
            bpf_linker: need(bpf_linker, "bpf-linker")?,
        };
        if pin.commit_date > pin.nightly {
            bail!(
                "{PIN_FILE}: nightly-commit-date {} is after the nightly's date {}: a nightly is published after its commit",
                pin.commit_date,
                pin.nightly
            );
        }
        Ok(pin)
    }

    /// Reads [`PIN_FILE`] at the workspace root.
    pub fn read() -> anyhow::Result<Pin> {
        let path = workspace_root().join(PIN_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the eBPF toolchain pin {}", path.display()))?;
        Pin::parse(&text)
    }

    /// rustup's name of the pinned nightly, e.g. `nightly-2026-05-20`.
    pub fn dated_toolchain(&self) -> String {
        format!("nightly-{}", self.nightly)
    }

    /// The pinned compiler as `rustc -vV` would show it, for messages.
    fn rustc(&self) -> String {
        format!(
            "rustc {} {} ({})",
            &self.commit_hash[..9],
            self.commit_date,
            self.dated_toolchain()
        )
    }
}

/// What `rustc -vV` says about a compiler.
#[derive(Debug, PartialEq, Eq)]
pub struct RustcVersion {
    pub commit_hash: String,
    pub commit_date: String,
    pub llvm_major: u32,
}

impl RustcVersion {
    pub fn parse(vv: &str) -> anyhow::Result<RustcVersion> {
        let field = |name: &str| {
            vv.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .with_context(|| format!("`rustc -vV` printed no `{name}` line"))
        };
        let llvm = field("LLVM version:")?;
        let llvm_major = llvm
            .split('.')
            .next()
            .and_then(|m| m.trim().parse().ok())
            .with_context(|| format!("cannot parse LLVM version {llvm:?}"))?;
        Ok(RustcVersion {
            commit_hash: field("commit-hash:")?,
            commit_date: field("commit-date:")?,
            llvm_major,
        })
    }

    /// Whether this compiler is the pinned nightly (commit and its date).
    ///
    /// Checked by the unit test `nightly_comparison`: mutated once to
    /// `self.commit_hash == pin.commit_hash || self.commit_date == pin.commit_date`,
    /// the test failed (another commit with the pinned commit-date passed).
    pub fn is_pinned(&self, pin: &Pin) -> bool {
        self.commit_hash == pin.commit_hash && self.commit_date == pin.commit_date
    }

    fn describe(&self) -> String {
        format!(
            "rustc {} {}",
            self.commit_hash.get(..9).unwrap_or(&self.commit_hash),
            self.commit_date
        )
    }
}

/// The version in `bpf-linker --version`'s output (`bpf-linker 0.13.0`).
pub fn bpf_linker_version(out: &str) -> Option<&str> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("bpf-linker "))
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Whether `bpf-linker --version` printed exactly the pinned version.
///
/// Checked by the unit test `bpf_linker_comparison`: mutated once to
/// `.is_some_and(|v| v.starts_with(&pin.bpf_linker))`, the test failed
/// (0.13.01 and 0.13.0-rc.1 passed for a pin of 0.13.0).
pub fn bpf_linker_is_pinned(out: &str, pin: &Pin) -> bool {
    bpf_linker_version(out).is_some_and(|v| v == pin.bpf_linker)
}

/// Whether `rustup toolchain list` shows `name` (`nightly` is not
/// `nightly-2026-05-20-x86_64-...`; `nightly-2026-05-20` is).
pub fn toolchain_listed(list: &str, name: &str) -> bool {
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|t| {
            t == name
                || t.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix('-'))
                    .and_then(|host| host.chars().next())
                    .is_some_and(|c| !c.is_ascii_digit())
        })
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("could not start {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rustup() -> Command {
    let mut c = Command::new("rustup");
    // Checks never download: a toolchain that is not there is reported.
    c.env("RUSTUP_AUTO_INSTALL", "0");
    c
}

fn rustc_version(toolchain: &str) -> anyhow::Result<RustcVersion> {
    RustcVersion::parse(&output(rustup().args(["run", toolchain, "rustc", "-vV"]))?)
}

/// Checks the pinned eBPF toolchain and installs what does not match:
/// nightly (by `rustc -vV`'s commit), its `rust-src`, bpf-linker (by
/// `bpf-linker --version`). Returns nothing; the eBPF build (tcpstall/build.rs)
/// finds the same toolchain from the same pin.
pub fn toolchain() -> anyhow::Result<()> {
    let t = std::time::Instant::now();
    let pin = Pin::read()?;
    let (nightly, rustc) = nightly(&pin)?;
    let comps =
        output(rustup().args(["component", "list", "--installed", "--toolchain", &nightly]))?;
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        step(&format!(
            "rust-src: not installed for {nightly}, needed (build-std for the BPF target): adding it"
        ));
        run_cmd(rustup().args(["component", "add", "rust-src", "--toolchain", &nightly]))?;
    }
    bpf_linker(&pin, &nightly, &rustc)?;
    if t.elapsed().as_secs() > 2 {
        eprintln!("    toolchain ready in {:.0?}", t.elapsed());
    }
    Ok(())
}

/// The installed toolchain that is the pinned nightly (`nightly-<date>`, else
/// plain `nightly` if it is exactly that compiler), installing
/// `nightly-<date>` when there is none.
fn nightly(pin: &Pin) -> anyhow::Result<(String, RustcVersion)> {
    let dated = pin.dated_toolchain();
    let list = output(rustup().args(["toolchain", "list"]))?;
    let mut found = Vec::new();
    for name in [dated.as_str(), NIGHTLY] {
        if !toolchain_listed(&list, name) {
            continue;
        }
        let rustc = rustc_version(name)?;
        if rustc.is_pinned(pin) {
            return Ok((name.to_owned(), rustc));
        }
        if name == dated {
            bail!(
                "nightly: {dated} is {}, but {PIN_FILE} pins {}: rustup's dated nightlies do not change, so the pin's date and commit disagree; fix {PIN_FILE}",
                rustc.describe(),
                pin.rustc()
            );
        }
        found.push(format!("`{name}` is {}", rustc.describe()));
    }
    let found = if found.is_empty() {
        format!("no `{dated}` or `{NIGHTLY}` toolchain")
    } else {
        found.join(", ")
    };
    step(&format!(
        "nightly: found {found}, pinned {} in {PIN_FILE}: installing {dated} (--profile minimal, rust-src)",
        pin.rustc()
    ));
    run_cmd(rustup().args([
        "toolchain",
        "install",
        &dated,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))?;
    let rustc = rustc_version(&dated)?;
    if !rustc.is_pinned(pin) {
        bail!(
            "nightly: installed {dated} is {}, but {PIN_FILE} pins {}: the pin's date and commit disagree; fix {PIN_FILE}",
            rustc.describe(),
            pin.rustc()
        );
    }
    Ok((dated, rustc))
}

/// What `rustup run <nightly> bpf-linker --version` shows (under rustup, the
/// nightly's libLLVM is on the library path), as a version or a failure.
fn installed_bpf_linker(nightly: &str) -> Result<String, String> {
    let out = rustup()
        .args(["run", nightly, "bpf-linker", "--version"])
        .output()
        .map_err(|e| format!("could not run `rustup run {nightly} bpf-linker --version`: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let why = stderr.lines().next().unwrap_or("no output").trim();
        return Err(format!(
            "`rustup run {nightly} bpf-linker --version` failed ({why})"
        ));
    }
    Ok(stdout.into_owned())
}

fn bpf_linker(pin: &Pin, nightly: &str, rustc: &RustcVersion) -> anyhow::Result<()> {
    let found = match installed_bpf_linker(nightly) {
        Ok(out) if bpf_linker_is_pinned(&out, pin) => return Ok(()),
        Ok(out) => match bpf_linker_version(&out) {
            Some(v) => format!("found {v}"),
            None => format!("`bpf-linker --version` printed {:?}", out.trim()),
        },
        Err(why) => why,
    };
    step(&format!(
        "bpf-linker: {found}, pinned {} in {PIN_FILE}: installing bpf-linker {} against {nightly}'s LLVM {} (about 4 minutes, once)",
        pin.bpf_linker, pin.bpf_linker, rustc.llvm_major
    ));
    install_bpf_linker(pin, nightly, rustc.llvm_major)?;
    match installed_bpf_linker(nightly) {
        Ok(out) if bpf_linker_is_pinned(&out, pin) => Ok(()),
        Ok(out) => bail!(
            "bpf-linker: installed {}, but `rustup run {nightly} bpf-linker --version` says {:?} (another bpf-linker earlier on PATH?)",
            pin.bpf_linker,
            out.trim()
        ),
        Err(why) => bail!("bpf-linker: installed {}, but {why}", pin.bpf_linker),
    }
}

fn install_bpf_linker(pin: &Pin, nightly: &str, major: u32) -> anyhow::Result<()> {
    let sysroot = PathBuf::from(
        output(rustup().args(["run", nightly, "rustc", "--print", "sysroot"]))?.trim(),
    );
    let libdir = sysroot.join("lib");
    let lib = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("libLLVM.so.{major}"))
                    || n.starts_with(&format!("libLLVM-{major}"))
            })
        })
        .with_context(|| {
            format!(
                "no libLLVM for LLVM {major} in {}: reinstall {nightly}",
                libdir.display()
            )
        })?;
    // bpf-linker's build looks for $LLVM_PREFIX/lib/libLLVM.so.
    let prefix = workspace_root().join("target/xtask/llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)
        .with_context(|| format!("symlink {}", link.display()))?;
    step(&format!(
        "building bpf-linker {} against {nightly}'s LLVM {major} ({})",
        pin.bpf_linker,
        lib.display()
    ));
    let feature = format!("llvm-{major}");
    let version = format!("={}", pin.bpf_linker);
    run_cmd(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                &version,
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                &feature,
            ])
            .env("LLVM_PREFIX", &prefix)
            .env(format!("LLVM_SYS_{major}0_PREFIX"), &prefix),
    )
    .with_context(|| {
        format!(
            "building bpf-linker {} with feature {feature} failed (a nightly with another LLVM may need another bpf-linker: move the pin in {PIN_FILE})",
            pin.bpf_linker
        )
    })
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub fn system_packages() -> anyhow::Result<()> {
    debian_packages(DEBIAN_PACKAGES)?;
    if !have("kubernetes-validate") {
        step("installing kubernetes-validate (PyPI) for manifest checks");
        run_cmd(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "-q",
            "kubernetes-validate",
        ]))?;
    }
    Ok(())
}

/// Install the Debian packages among `packages` that are missing.
pub fn debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !missing.is_empty() {
        if !have("apt-get") {
            bail!("missing Debian packages {missing:?} and no apt-get to install them");
        }
        step(&format!(
            "installing Debian packages: {}",
            missing.join(" ")
        ));
        run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = r#"
# comment
nightly = "2026-05-20"
nightly-commit-date = "2026-05-19"
  nightly-commit-hash =  "e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a"

bpf-linker = "0.13.0"
"#;

    /// `rustc +nightly -vV` on the reference machine.
    const RUSTC_VV: &str = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)
binary: rustc
commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a
commit-date: 2026-05-19
host: x86_64-unknown-linux-gnu
release: 1.97.0-nightly
LLVM version: 22.1.4
";

    fn pin() -> Pin {
        Pin::parse(PIN).unwrap()
    }

    #[test]
    fn pin_parses() {
        assert_eq!(
            pin(),
            Pin {
                nightly: "2026-05-20".into(),
                commit_date: "2026-05-19".into(),
                commit_hash: "e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a".into(),
                bpf_linker: "0.13.0".into(),
            }
        );
        assert_eq!(pin().dated_toolchain(), "nightly-2026-05-20");
    }

    /// The pin file in the repository parses (what setup and build.rs read).
    #[test]
    fn repository_pin_parses() {
        let pin = Pin::read().unwrap();
        assert!(pin.dated_toolchain().starts_with("nightly-20"));
    }

    #[test]
    fn pin_rejects_malformed() {
        let bad = |from: &str, to: &str| {
            let text = PIN.replace(from, to);
            assert_ne!(text, PIN, "{from:?} not in the test pin");
            Pin::parse(&text).unwrap_err().to_string()
        };
        assert!(bad("\"0.13.0\"", "\"0.13\"").contains("exact version"));
        assert!(bad("\"0.13.0\"", "\"^0.13.0\"").contains("exact version"));
        assert!(bad("\"0.13.0\"", "0.13.0").contains("quoted"));
        assert!(bad("\"2026-05-20\"", "\"2026-5-20\"").contains("YYYY-MM-DD"));
        assert!(bad("\"2026-05-20\"", "\"2026-05-18\"").contains("after the nightly's date"));
        assert!(bad("e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a", "e50aa6fba").contains("40-digit"));
        assert!(bad("bpf-linker = ", "bpf_linker = ").contains("unknown key"));
        assert!(bad("bpf-linker = \"0.13.0\"", "").contains("no `bpf-linker"));
        assert!(bad("# comment", "nightly = \"2026-05-21\"").contains("given twice"));
        assert!(bad("# comment", "nightly").contains("expected `key = \"value\"`"));
    }

    #[test]
    fn rustc_vv_parses() {
        assert_eq!(
            RustcVersion::parse(RUSTC_VV).unwrap(),
            RustcVersion {
                commit_hash: "e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a".into(),
                commit_date: "2026-05-19".into(),
                llvm_major: 22,
            }
        );
        assert!(RustcVersion::parse("rustc 1.97.0-nightly\ncommit-hash: x\n").is_err());
    }

    /// Mutation run: `&&` -> `||` in `RustcVersion::is_pinned` fails here.
    #[test]
    fn nightly_comparison() {
        let pin = pin();
        let vv = |text: &str| RustcVersion::parse(text).unwrap();
        assert!(vv(RUSTC_VV).is_pinned(&pin));
        // rustup's nightly-2026-05-19: the day before, another commit.
        let day_before = RUSTC_VV
            .replace(
                "e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a",
                "9eb3be26b0000000000000000000000000000000",
            )
            .replace("2026-05-19", "2026-05-18");
        assert!(!vv(&day_before).is_pinned(&pin));
        // Same commit-date, another commit (two nightlies from one day).
        let same_date = RUSTC_VV.replace(
            "e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a",
            "0123456789abcdef0123456789abcdef01234567",
        );
        assert!(!vv(&same_date).is_pinned(&pin));
        // Same commit, another date: not what the pin says either.
        let other_date = RUSTC_VV.replace("commit-date: 2026-05-19", "commit-date: 2026-05-20");
        assert!(!vv(&other_date).is_pinned(&pin));
    }

    /// Mutation run: `v == pin.bpf_linker` -> `v.starts_with(&pin.bpf_linker)`
    /// in `bpf_linker_is_pinned` fails here.
    #[test]
    fn bpf_linker_comparison() {
        let pin = pin();
        assert_eq!(bpf_linker_version("bpf-linker 0.13.0\n"), Some("0.13.0"));
        assert!(bpf_linker_is_pinned("bpf-linker 0.13.0\n", &pin));
        assert!(!bpf_linker_is_pinned("bpf-linker 0.12.1\n", &pin));
        assert!(!bpf_linker_is_pinned("bpf-linker 0.13.01\n", &pin));
        assert!(!bpf_linker_is_pinned("bpf-linker 0.13.0-rc.1\n", &pin));
        assert!(!bpf_linker_is_pinned("bpf-linker\n", &pin));
        assert!(!bpf_linker_is_pinned("", &pin));
    }

    #[test]
    fn toolchain_list() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)
nightly-2026-05-20-x86_64-unknown-linux-gnu
1.95.0-x86_64-unknown-linux-gnu
";
        assert!(toolchain_listed(list, "nightly-2026-05-20"));
        assert!(!toolchain_listed(list, "nightly"));
        assert!(!toolchain_listed(list, "nightly-2026-05-19"));
        let list = "nightly-x86_64-unknown-linux-gnu\nstable-x86_64-unknown-linux-gnu (default)\n";
        assert!(toolchain_listed(list, "nightly"));
        assert!(!toolchain_listed(list, "nightly-2026-05-20"));
        assert!(toolchain_listed(
            "nightly-2026-05-20\n",
            "nightly-2026-05-20"
        ));
    }
}
