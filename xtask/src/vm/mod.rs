//! Run tcpstall's privileged tests on other kernels under QEMU.
//!
//! Flow per kernel spec (`6.1`, `6.12`, a release such as `6.1.0-56-amd64`, a
//! package name such as `linux-image-6.1.0-56-amd64`, or any of these, or
//! `newest`, qualified by a Debian suite: `trixie-backports:7.3`,
//! `bullseye:5.10`, `sid:newest`):
//!
//! 1. resolve the spec to the newest matching Debian `linux-image-*-amd64` package
//!    offered by the host's apt sources (`apt-cache`; `apt-get update` only when
//!    the lists are missing) or, for a suite-qualified spec, by a private apt
//!    configuration under `<cache>/apt/<suite>/` that serves only that suite
//!    of deb.debian.org (the host's `/etc/apt` is never changed; lists
//!    refreshed when older than 6 hours: `apt`),
//! 2. `apt-get download` it into `<cache>/debs/` and unpack it with `dpkg-deb -x`
//!    into `<cache>/kernels/<package>_<version>/` (`depmod -b` generates the
//!    `modules.dep` that Debian only creates in its postinst); a split image
//!    package (7.x: `linux-image-<abi>` only depends on `linux-binary-<abi>`,
//!    `linux-modules-<abi>` and `linux-base-<abi>`) brings those along, and
//!    the merged-/usr layout (`usr/lib/modules/<release>/{vmlinuz,config}`)
//!    is moved to `lib/modules` and `boot/`. Modules may be plain, `.ko.xz`
//!    (7.x) or `.ko.zst` (`modules`: decompressed on the host),
//! 3. build `<cache>/<spec>/initrd.gz` (cpio newc, gzip): static busybox, the
//!    needed modules (decompressed, loaded in dependency order by `/init`),
//!    `/boot/config-<release>`, host `ip`/`ss`/`tc`/`nft`, the payload, and
//!    every shared library `ldd` reports; rebuilt only when the hash of all
//!    inputs changes,
//! 4. boot `qemu-system-x86_64` (KVM when a test boot shows it works, else
//!    TCG: `accel`) with the serial console on stdio, stream and log it to
//!    `<cache>/<spec>/console.log`, kill the guest after the timeout, and parse
//!    the single `TCPSTALL-VM-RESULT:` marker line (and, when asked, the
//!    libtest summary: exactly the expected number of tests passed).
//!
//! `extract_btf` decompresses each kernel's bzImage and writes the raw `.BTF`
//! section of vmlinux (same bytes as the guest's `/sys/kernel/btf/vmlinux`).
//!
//! The cache directory is locked (flock) for the duration of a call, so two
//! developers' runs on one machine queue instead of racing.
//!
//! Files: `apt` (kernel packages), `modules` (module load order), `cpio`
//! (archive writer), `init` (`/init` scripts), `initramfs` (what goes in),
//! `accel` (KVM or TCG), `qemu` (the driver), `btf` (kernel BTF), `host`
//! (host tools, cache lock).

mod accel;
mod apt;
mod btf;
mod cpio;
mod host;
mod init;
mod initramfs;
mod kernel_names;
mod modules;
mod qemu;

use anyhow::{Context, Result, bail};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use accel::AccelChoice;
pub use btf::validate_btf;
pub use qemu::Accel;

use apt::ensure_kernel;
use btf::{btf_from_guest, btf_from_vmlinuz};
use host::{Tools, lock_cache, write_atomic};
use initramfs::{build_test_initrd, check_payload};
use qemu::boot;

/// Debian packages the VM flow needs on the host (the setup step installs them).
/// `gzip`, `dpkg`, `apt`, `libc-bin` (ldd), `dash` and `bash` are Essential and
/// always present.
pub const VM_DEBIAN_PACKAGES: &[&str] = &[
    "busybox-static",
    "qemu-system-x86",
    "xz-utils",
    "zstd",
    "kmod",
    "iproute2",
    "nftables",
];

/// Kernels booted when none is given: Debian 12's two series (host apt
/// sources) and the newest kernel the Debian archive serves, whatever
/// trixie-backports carries when the run starts (7.3.4 on 2026-12-06;
/// private apt configuration: see `apt`). Named `newest`, not by series:
/// backports keeps only its newest kernel, and a series that left it would
/// fail every run.
pub const DEFAULT_KERNELS: &[&str] = &["6.1", "6.12", "trixie-backports:newest"];

/// The oldest kernel the agent runs on, booted by `cargo xtask test
/// --vm-oldest` (or `cargo xtask vm-test bullseye:5.10`): Debian 11's 5.10
/// (bullseye-security). Its tracing programs cannot call
/// `bpf_get_socket_cookie` (5.12+), so only the probes' cookie-less twins
/// load; it has no `inet_sk_error_report` (5.14+) and no
/// `bpf_sock_from_file` (5.11+, so no sweep).
pub const OLDEST_KERNEL: &str = "bullseye:5.10";

/// Kernel modules put into every initramfs (with their `modules.dep` dependencies
/// and `modules.softdep` pre-dependencies). Modules a kernel has built in are skipped.
/// - veth: test hosts in network namespaces
/// - nf_tables (+ nfnetlink): `nft ... ip saddr ... tcp sport 80 drop`; meta, payload,
///   cmp, immediate and the filter chain type are built into nf_tables.ko
/// - nft_numgen: `numgen random mod 100 < 2 drop`
/// - nft_ct, nft_reject_inet, nft_limit: `ct state`, `reject`, `limit` rules
/// - sch_netem: delay/loss qdisc (the 6.18 host has none, Debian kernels do)
/// - tcp_diag (+ inet_diag): `ss -ti` inside the guest
pub const DEFAULT_MODULES: &[&str] = &[
    "veth",
    "nf_tables",
    "nft_numgen",
    "nft_ct",
    "nft_reject_inet",
    "nft_limit",
    "sch_netem",
    "tcp_diag",
];

/// Marker the guest prints exactly once, followed by `PASS` or `FAIL exit=<code>`.
pub const RESULT_MARKER: &str = "TCPSTALL-VM-RESULT:";

/// Options of `cargo xtask vm-test`.
#[derive(Debug, Clone, clap::Args)]
pub struct VmOptions {
    /// Kernels to boot: a series (`6.1`, `6.12`), a release (`6.1.0-56-amd64`)
    /// or a Debian package name (`linux-image-6.1.0-56-amd64`) from the host's
    /// apt sources, or one of those (or `newest`) from a suite of the Debian
    /// archive: `trixie-backports:7.3`, `bullseye:5.10`, `sid:newest`.
    #[arg(value_name = "KERNEL", default_values = DEFAULT_KERNELS)]
    pub kernels: Vec<String>,
    /// Kill a guest that has not printed its result marker after this long
    /// (`900`, `900s`, `15m`, `1h`).
    #[arg(long = "vm-timeout", value_name = "DURATION", default_value = "15m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Guest memory in MiB.
    #[arg(long = "vm-memory", value_name = "MIB", default_value_t = 2048)]
    pub memory_mb: u32,
    /// Guest vCPUs.
    #[arg(long = "vm-smp", value_name = "N", default_value_t = 2)]
    pub smp: u32,
    /// Extra kernel modules to load in the guest (besides DEFAULT_MODULES).
    #[arg(long = "vm-module", value_name = "NAME")]
    pub extra_modules: Vec<String>,
    /// Cache for kernel packages, unpacked kernels, initramfs and console logs.
    #[arg(long = "vm-cache-dir", value_name = "DIR", default_value_os_t = default_cache_dir())]
    pub cache_dir: PathBuf,
    /// QEMU accelerator: `auto` uses KVM when a short test boot under KVM
    /// reaches the guest's `/init`, TCG otherwise.
    #[arg(
        long = "vm-accel",
        value_name = "ACCEL",
        default_value = "auto",
        env = "TCPSTALL_VM_ACCEL"
    )]
    pub accel: AccelChoice,
}

/// The command-line defaults (written once, in the `#[arg]` attributes).
impl Default for VmOptions {
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            vm: VmOptions,
        }
        <Defaults as clap::Parser>::parse_from(["vm"]).vm
    }
}

/// What runs inside the guest.
#[derive(Debug, Clone)]
pub struct GuestPayload {
    /// Host path of the agent binary; becomes `/bin/tcpstall` (`TCPSTALL_AGENT_BIN`).
    pub agent: PathBuf,
    /// Host path of the test binary; becomes `/bin/tcpstall-tests-bin`.
    pub tests: PathBuf,
    /// Arguments passed to the test binary.
    pub test_args: Vec<String>,
    /// Extra environment for the test binary.
    pub extra_env: Vec<(String, String)>,
    /// More host executables for the guest: (host path, guest path such as
    /// `bin/bpftrace`); their shared libraries come along (`ldd`).
    pub extra_bins: Vec<(PathBuf, String)>,
    /// When set, the run passes only if the libtest summaries the guest
    /// prints report exactly this many tests passed.
    pub expected_passed: Option<usize>,
}

/// Outcome of one kernel.
#[derive(Debug, Clone)]
pub struct KernelResult {
    /// The spec as given (`6.1`).
    pub kernel: String,
    /// Kernel release (`6.1.0-56-amd64`), as `uname -r` prints it.
    pub release: String,
    pub passed: bool,
    /// One line: package, PASS/FAIL reason, guest capabilities, timings.
    pub summary: String,
    pub console_log: PathBuf,
    /// From QEMU start to the first line of our `/init`.
    pub boot_time: Option<Duration>,
    /// Whole run for this kernel: resolve, download, initramfs, boot, payload.
    pub total_time: Duration,
}

/// `<workspace>/.cache/vm`
pub fn default_cache_dir() -> PathBuf {
    workspace_root().join(".cache").join("vm")
}

/// `<workspace>/.cache/btf`
pub fn default_btf_dir() -> PathBuf {
    workspace_root().join(".cache").join("btf")
}

fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Parses `900` (seconds) or a humantime duration: `900s`, `15m`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = match s.parse::<u64>() {
        Ok(n) => Duration::from_secs(n),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("bad duration {s:?} ({e}): use e.g. 900, 900s, 15m, 1h"))?,
    };
    if d.is_zero() {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(d)
}

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

/// Boots every kernel of `opts.kernels` in turn and runs the payload in it.
///
/// Errors only for problems of the host side that affect every kernel (missing
/// tool, unreadable payload); a kernel that cannot be fetched, does not boot,
/// hangs or fails its tests gives a `KernelResult` with `passed == false`.
/// The accelerator chosen in this process, kept across [`vm_test`] calls.
static CHOSEN_ACCEL: std::sync::Mutex<Option<Accel>> = std::sync::Mutex::new(None);

pub fn vm_test(opts: &VmOptions, payload: &GuestPayload) -> Result<Vec<KernelResult>> {
    if opts.kernels.is_empty() {
        bail!("no kernels given");
    }
    let tools = Tools::find()?;
    check_payload(payload)?;
    fs::create_dir_all(&opts.cache_dir)
        .with_context(|| format!("creating {}", opts.cache_dir.display()))?;
    let _lock = lock_cache(&opts.cache_dir)?;

    // The accelerator chosen by an earlier call of this process (the
    // matrix's scenarios pass before its sweep pass): the KVM test boot
    // (up to PROBE_TIMEOUT where KVM hangs) is not repeated.
    let auto = opts.accel == AccelChoice::Auto;
    let mut accel = if auto {
        *CHOSEN_ACCEL.lock().unwrap_or_else(|e| e.into_inner())
    } else {
        None
    };
    let mut results = Vec::new();
    for spec in &opts.kernels {
        let start = Instant::now();
        let dir = opts.cache_dir.join(sanitize(spec));
        let console_log = dir.join("console.log");
        let res = run_one(
            &tools,
            opts,
            &mut accel,
            payload,
            spec,
            &dir,
            &console_log,
            start,
        );
        let result = match res {
            Ok(r) => r,
            Err(e) => {
                let summary = format!("FAIL: {e:#}");
                KernelResult {
                    kernel: spec.clone(),
                    release: String::new(),
                    passed: false,
                    summary,
                    console_log,
                    boot_time: None,
                    total_time: start.elapsed(),
                }
            }
        };
        phase(spec, &format!("result: {}", result.summary));
        results.push(result);
    }
    if auto && accel.is_some() {
        *CHOSEN_ACCEL.lock().unwrap_or_else(|e| e.into_inner()) = accel;
    }
    eprintln!("==> vm-test summary");
    for r in &results {
        eprintln!(
            "    {:<8} {:<28} {}",
            r.kernel,
            r.release,
            if r.passed { "PASS" } else { "FAIL" }
        );
    }
    Ok(results)
}

/// Writes the `.BTF` section of each kernel's vmlinux to `<out_dir>/<release>.btf`
/// (downloading the kernel package if it is not cached) and returns the paths.
/// Uses the default cache directory.
pub fn extract_btf(kernels: &[String], out_dir: &Path) -> Result<Vec<PathBuf>> {
    let opts = VmOptions {
        kernels: kernels.to_vec(),
        ..VmOptions::default()
    };
    extract_btf_with(&opts, out_dir)
}

/// `extract_btf` with explicit cache directory / VM settings (the VM settings
/// are only used by the in-guest fallback).
pub fn extract_btf_with(opts: &VmOptions, out_dir: &Path) -> Result<Vec<PathBuf>> {
    let tools = Tools::find()?;
    fs::create_dir_all(&opts.cache_dir)
        .with_context(|| format!("creating {}", opts.cache_dir.display()))?;
    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let _lock = lock_cache(&opts.cache_dir)?;
    let mut out = Vec::new();
    for spec in &opts.kernels {
        let k = ensure_kernel(&tools, &opts.cache_dir, spec)?;
        let dest = out_dir.join(format!("{}.btf", k.release));
        if let Ok(existing) = fs::read(&dest)
            && validate_btf(&existing).is_ok()
        {
            phase(spec, &format!("BTF cached: {}", dest.display()));
            out.push(dest);
            continue;
        }
        let t = Instant::now();
        let btf = match btf_from_vmlinuz(&tools, &k.vmlinuz, &opts.cache_dir) {
            Ok(b) => {
                phase(
                    spec,
                    &format!(
                        "BTF from vmlinuz ELF .BTF section ({} bytes, {:.1}s)",
                        b.len(),
                        secs(t.elapsed())
                    ),
                );
                b
            }
            Err(e) => {
                phase(
                    spec,
                    &format!("no .BTF from vmlinuz ({e:#}); reading it inside the guest"),
                );
                btf_from_guest(&tools, opts, spec, &k)?
            }
        };
        write_atomic(&dest, &btf)?;
        phase(spec, &format!("wrote {}", dest.display()));
        out.push(dest);
    }
    Ok(out)
}

/// Boots the kernel with a minimal initramfs that prints `/sys/kernel/btf/vmlinux`
/// base64-encoded on the console, and decodes it. Fallback of `extract_btf`;
/// public so it can be exercised on its own.
pub fn btf_from_guest_spec(opts: &VmOptions, spec: &str) -> Result<Vec<u8>> {
    let tools = Tools::find()?;
    fs::create_dir_all(&opts.cache_dir)?;
    let _lock = lock_cache(&opts.cache_dir)?;
    let k = ensure_kernel(&tools, &opts.cache_dir, spec)?;
    btf_from_guest(&tools, opts, spec, &k)
}

// ---------------------------------------------------------------------------
// One kernel
// ---------------------------------------------------------------------------

/// `accel`: chosen on the first kernel that gets this far, then kept.
#[allow(clippy::too_many_arguments)]
fn run_one(
    tools: &Tools,
    opts: &VmOptions,
    accel: &mut Option<Accel>,
    payload: &GuestPayload,
    spec: &str,
    dir: &Path,
    console_log: &Path,
    start: Instant,
) -> Result<KernelResult> {
    let k = ensure_kernel(tools, &opts.cache_dir, spec)?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    let mut modules: Vec<String> = DEFAULT_MODULES.iter().map(|s| s.to_string()).collect();
    modules.extend(opts.extra_modules.iter().cloned());
    let initrd = build_test_initrd(tools, &k, &modules, payload, dir, spec)?;

    let accel = match *accel {
        Some(a) => a,
        None => *accel.insert(accel::choose(tools, opts, spec, &k)?),
    };
    phase(
        spec,
        &format!(
            "booting {} under qemu ({}, timeout {}s)",
            k.release,
            accel.name(),
            opts.timeout.as_secs()
        ),
    );
    let run = || {
        boot(
            tools,
            opts,
            accel,
            spec,
            &k.vmlinuz,
            &initrd,
            console_log,
            true,
        )
    };
    let mut boot = run()?;
    if boot.boot_hung {
        // The kernel hung before our /init printed its first line: no test ran,
        // so there is no result to keep or to retry. Boot it once more; its
        // console log is kept beside the new one for the kernel's own errors.
        let hung_log = console_log.with_extension("boot-hang.log");
        fs::rename(console_log, &hung_log)
            .with_context(|| format!("keeping {}", hung_log.display()))?;
        phase(
            spec,
            &format!(
                "booting once more: the first boot hung before /init (its console: {})",
                hung_log.display()
            ),
        );
        boot = run()?;
        if boot.boot_hung {
            bail!(
                "{spec}: the guest hung twice in the kernel's boot, before /init (console logs \
                 {} and {}): the kernel's errors, if any, are there",
                hung_log.display(),
                console_log.display()
            );
        }
    }
    let total = start.elapsed();

    if let Some(r) = &boot.guest_release
        && r != &k.release
    {
        phase(
            spec,
            &format!(
                "warning: guest reports release {r}, package has {}",
                k.release
            ),
        );
    }
    let caps = boot.caps.clone().unwrap_or_else(|| "caps unknown".into());
    let timing = format!(
        "boot {}, total {:.1}s",
        boot.boot_time
            .map(|d| format!("{:.1}s", secs(d)))
            .unwrap_or_else(|| "?".into()),
        secs(total)
    );
    let pkg = format!("{} {}", k.package, k.version);
    let (passed, verdict) = match (&boot.marker, boot.timed_out) {
        (Some(m), _) if m == "PASS" => match payload.expected_passed {
            Some(n) if boot.tests_passed != Some(n) => (
                false,
                format!(
                    "FAIL: the guest's test summary reports {} passed, expected exactly {n} \
                     (a test name that matches nothing?)",
                    boot.tests_passed
                        .map_or_else(|| "no summary".into(), |p| p.to_string())
                ),
            ),
            _ => (true, "PASS".to_string()),
        },
        (Some(m), _) => (false, m.clone()),
        (None, true) => (
            false,
            format!(
                "FAIL: guest killed after {}s without a result marker",
                opts.timeout.as_secs()
            ),
        ),
        (None, false) => (
            false,
            format!("FAIL: qemu exited ({}) without a result marker", boot.exit),
        ),
    };
    if !passed {
        eprintln!(
            "==> [{spec}] last {} console lines ({}):",
            boot.tail.len(),
            console_log.display()
        );
        for l in &boot.tail {
            eprintln!("    {l}");
        }
    }
    Ok(KernelResult {
        kernel: spec.to_string(),
        release: k.release.clone(),
        passed,
        summary: format!("{verdict} ({pkg}; {caps}; {timing})"),
        console_log: console_log.to_path_buf(),
        boot_time: boot.boot_time,
        total_time: total,
    })
}

fn phase(spec: &str, msg: &str) {
    eprintln!("==> [{spec}] {msg}");
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("900").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("15x").is_err());
        assert!(parse_duration("0").is_err());
    }
}
