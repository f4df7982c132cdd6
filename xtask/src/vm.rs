//! Run tcpstall's privileged tests on other kernels under QEMU (TCG).
//!
//! Flow per kernel spec (`6.1`, `6.12`, a release such as `6.1.0-56-amd64`, or a
//! package name such as `linux-image-6.1.0-56-amd64`):
//!
//! 1. resolve the spec to the newest matching Debian `linux-image-*-amd64` package
//!    offered by the configured apt sources (`apt-cache`; `apt-get update` only when
//!    the lists are missing),
//! 2. `apt-get download` it into `<cache>/debs/` and unpack it with `dpkg-deb -x`
//!    into `<cache>/kernels/<package>_<version>/` (`depmod -b` generates the
//!    `modules.dep` that Debian only creates in its postinst),
//! 3. build `<cache>/<spec>/initrd.gz` (cpio newc written here, gzip): static
//!    busybox, the needed modules (decompressed, loaded in dependency order by
//!    `/init`), `/boot/config-<release>`, host `ip`/`ss`/`tc`/`nft`, the payload, and every shared library `ldd`
//!    reports; rebuilt only when the hash of all inputs changes,
//! 4. boot `qemu-system-x86_64 -accel tcg` with the serial console on stdio,
//!    stream and log it to `<cache>/<spec>/console.log`, kill the guest after the
//!    timeout, and parse the single `TCPSTALL-VM-RESULT:` marker line.
//!
//! `extract_btf` decompresses each kernel's bzImage and writes the raw `.BTF`
//! section of vmlinux (same bytes as the guest's `/sys/kernel/btf/vmlinux`).
//!
//! The cache directory is locked (flock) for the duration of a call, so two
//! developers' runs on one machine queue instead of racing.

use anyhow::{Context, Result, anyhow, bail};
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::hash::Hasher;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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

/// Kernel series booted when none is given.
pub const DEFAULT_KERNELS: &[&str] = &["6.1", "6.12"];

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

/// Bump when the initramfs layout or `/init` changes in a way the input hash
/// would not notice.
const INITRD_FORMAT: &str = "tcpstall-initrd-v1";

const GUEST_AGENT: &str = "/bin/tcpstall";
const GUEST_TESTS: &str = "/bin/tcpstall-tests-bin";
const GUEST_PATH: &str = "/bin:/sbin:/usr/bin:/usr/sbin";
const BTF_BEGIN: &str = "TCPSTALL-BTF-BEGIN";
const BTF_END: &str = "TCPSTALL-BTF-END";

/// Options of `cargo xtask vm-test`.
#[derive(Debug, Clone, clap::Args)]
pub struct VmOptions {
    /// Kernels to boot: a series (`6.1`, `6.12`), a release (`6.1.0-56-amd64`)
    /// or a Debian package name (`linux-image-6.1.0-56-amd64`).
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
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            kernels: DEFAULT_KERNELS.iter().map(|s| s.to_string()).collect(),
            timeout: Duration::from_secs(15 * 60),
            memory_mb: 2048,
            smp: 2,
            extra_modules: Vec::new(),
            cache_dir: default_cache_dir(),
        }
    }
}

/// What runs inside the guest.
#[derive(Debug, Clone)]
pub struct GuestPayload {
    /// Host path of the agent binary; becomes `/bin/tcpstall` (`TCPSTALL_AGENT`).
    pub agent: PathBuf,
    /// Host path of the test binary; becomes `/bin/tcpstall-tests-bin`.
    pub tests: PathBuf,
    /// Arguments passed to the test binary.
    pub test_args: Vec<String>,
    /// Extra environment for the test binary.
    pub extra_env: Vec<(String, String)>,
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

/// Parses `900`, `900s`, `15m`, `1h`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = 0u64;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let mult = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return Err(format!("bad duration {s:?}: use e.g. 900, 900s, 15m, 1h")),
        };
        let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
        total += n * mult;
        num.clear();
    }
    if !num.is_empty() {
        total += num
            .parse::<u64>()
            .map_err(|_| format!("bad duration {s:?}"))?;
    }
    if total == 0 {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(Duration::from_secs(total))
}

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

/// Boots every kernel of `opts.kernels` in turn and runs the payload in it.
///
/// Errors only for problems of the host side that affect every kernel (missing
/// tool, unreadable payload); a kernel that cannot be fetched, does not boot,
/// hangs or fails its tests gives a `KernelResult` with `passed == false`.
pub fn vm_test(opts: &VmOptions, payload: &GuestPayload) -> Result<Vec<KernelResult>> {
    if opts.kernels.is_empty() {
        bail!("no kernels given");
    }
    let tools = Tools::find()?;
    check_payload(payload)?;
    fs::create_dir_all(&opts.cache_dir)
        .with_context(|| format!("creating {}", opts.cache_dir.display()))?;
    let _lock = lock_cache(&opts.cache_dir)?;

    let mut results = Vec::new();
    for spec in &opts.kernels {
        let start = Instant::now();
        let dir = opts.cache_dir.join(sanitize(spec));
        let console_log = dir.join("console.log");
        let res = run_one(&tools, opts, payload, spec, &dir, &console_log, start);
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
#[allow(dead_code, reason = "used by the vm-smoke developer tool")]
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

fn run_one(
    tools: &Tools,
    opts: &VmOptions,
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

    phase(
        spec,
        &format!(
            "booting {} under qemu (TCG, timeout {}s)",
            k.release,
            opts.timeout.as_secs()
        ),
    );
    let boot = boot(tools, opts, spec, &k.vmlinuz, &initrd, console_log, true)?;
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
        (Some(m), _) if m == "PASS" => (true, "PASS".to_string()),
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

// ---------------------------------------------------------------------------
// Host tools
// ---------------------------------------------------------------------------

struct Tools {
    apt_get: PathBuf,
    apt_cache: PathBuf,
    dpkg_deb: PathBuf,
    depmod: PathBuf,
    ldd: PathBuf,
    gzip: PathBuf,
    xz: PathBuf,
    zstd: PathBuf,
    busybox: PathBuf,
    dash: PathBuf,
    bash: PathBuf,
    qemu: PathBuf,
    ip: PathBuf,
    ss: PathBuf,
    tc: PathBuf,
    nft: PathBuf,
}

impl Tools {
    fn find() -> Result<Tools> {
        Ok(Tools {
            apt_get: require_tool("apt-get", "apt")?,
            apt_cache: require_tool("apt-cache", "apt")?,
            dpkg_deb: require_tool("dpkg-deb", "dpkg")?,
            depmod: require_tool("depmod", "kmod")?,
            ldd: require_tool("ldd", "libc-bin")?,
            gzip: require_tool("gzip", "gzip")?,
            xz: require_tool("xz", "xz-utils")?,
            zstd: require_tool("zstd", "zstd")?,
            busybox: require_tool("busybox", "busybox-static")?,
            dash: require_tool("dash", "dash")?,
            bash: require_tool("bash", "bash")?,
            qemu: require_tool("qemu-system-x86_64", "qemu-system-x86")?,
            ip: require_tool("ip", "iproute2")?,
            ss: require_tool("ss", "iproute2")?,
            tc: require_tool("tc", "iproute2")?,
            nft: require_tool("nft", "nftables")?,
        })
    }
}

fn require_tool(name: &str, package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for d in dirs {
        let p = d.join(name);
        if let Ok(m) = fs::metadata(&p)
            && m.is_file()
            && m.permissions().mode() & 0o111 != 0
        {
            return Ok(p);
        }
    }
    bail!(
        "`{name}` not found: install the Debian package `{package}` \
         (apt-get install {package}; the VM tests need: {})",
        VM_DEBIAN_PACKAGES.join(" ")
    )
}

fn run(cmd: &mut Command) -> Result<std::process::Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

fn lock_cache(cache: &Path) -> Result<File> {
    let path = cache.join("lock");
    let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            eprintln!(
                "==> waiting for {} (another VM run is using the cache)",
                path.display()
            );
            f.lock()
                .with_context(|| format!("locking {}", path.display()))?;
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    Ok(f)
}

fn write_atomic(dest: &Path, data: &[u8]) -> Result<()> {
    let tmp = dest.with_extension("tmp");
    fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, dest).with_context(|| format!("renaming to {}", dest.display()))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Kernel packages
// ---------------------------------------------------------------------------

struct KernelPkg {
    package: String,
    version: String,
    release: String,
    vmlinuz: PathBuf,
    /// `<root>/lib/modules/<release>`
    moddir: PathBuf,
}

fn apt_lists_present() -> bool {
    fs::read_dir("/var/lib/apt/lists")
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
        .unwrap_or(false)
}

/// Does `name` belong to the kernel series `series` (`6.1` -> `linux-image-6.1.<n>...-amd64`),
/// excluding -dbg, -rt, -cloud, -unsigned and meta packages?
fn matches_series(name: &str, series: &str) -> bool {
    let Some(rest) = name.strip_prefix("linux-image-") else {
        return false;
    };
    let Some(rest) = rest.strip_prefix(series) else {
        return false;
    };
    let Some(rest) = rest.strip_prefix('.') else {
        return false;
    };
    if !rest.starts_with(|c: char| c.is_ascii_digit()) || !rest.ends_with("-amd64") {
        return false;
    }
    !["-dbg", "-rt-", "-cloud-", "-unsigned"]
        .iter()
        .any(|x| name.contains(x))
}

/// `(candidate version, origin line)` per package, from one `apt-cache policy` call.
fn apt_policy(tools: &Tools, pkgs: &[String]) -> Result<HashMap<String, (String, String)>> {
    let out = run(Command::new(&tools.apt_cache).arg("policy").args(pkgs))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut map = HashMap::new();
    let mut cur: Option<String> = None;
    let mut cand: Option<String> = None;
    let mut in_cand = false;
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            cur = Some(line.trim_end_matches(':').to_string());
            cand = None;
            in_cand = false;
            continue;
        }
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Candidate:") {
            let v = v.trim();
            cand = (v != "(none)").then(|| v.to_string());
            if let (Some(p), Some(c)) = (&cur, &cand) {
                map.insert(p.clone(), (c.clone(), String::new()));
            }
            continue;
        }
        // Version table: "*** 6.1.192-2 500" / "     6.1.192-2 500", then origin lines.
        let mut words = t.trim_start_matches("***").split_whitespace();
        if let (Some(c), Some(first)) = (&cand, words.next()) {
            if first == c {
                in_cand = true;
                continue;
            }
            if in_cand && t.starts_with(|ch: char| ch.is_ascii_digit()) && t.contains("http") {
                if let Some(entry) = map.get_mut(cur.as_deref().unwrap_or_default())
                    && entry.1.is_empty()
                {
                    // "500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages"
                    let w: Vec<&str> = t.split_whitespace().collect();
                    entry.1 = w.get(1..3).map(|x| x.join(" ")).unwrap_or_default();
                }
                continue;
            }
            in_cand = false;
        }
    }
    Ok(map)
}

fn resolve_package(tools: &Tools, spec: &str) -> Result<(String, String, String)> {
    if !apt_lists_present() {
        phase(spec, "apt lists missing: apt-get update");
        run(Command::new(&tools.apt_get).args(["update", "-q"]))
            .context("apt-get update (needed once to know which kernels Debian offers)")?;
    }
    let candidates: Vec<String> = if spec.starts_with("linux-image-") {
        vec![spec.to_string()]
    } else if spec.ends_with("-amd64") {
        vec![format!("linux-image-{spec}")]
    } else {
        if !spec
            .split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        {
            bail!(
                "kernel spec {spec:?}: expected a series like 6.1, a release like 6.1.0-56-amd64 or a package name"
            );
        }
        let pattern = format!("^linux-image-{}\\.", spec.replace('.', "\\."));
        let out = run(Command::new(&tools.apt_cache).args(["search", "--names-only", &pattern]))?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| matches_series(n, spec))
            .map(str::to_string)
            .collect()
    };
    let policy = if candidates.is_empty() {
        HashMap::new()
    } else {
        apt_policy(tools, &candidates)?
    };
    let best = candidates
        .iter()
        .filter_map(|p| policy.get(p).map(|(v, o)| (p, v, o)))
        .max_by(|a, b| deb_version_cmp(a.1, b.1).then_with(|| a.0.cmp(b.0)));
    match best {
        Some((p, v, o)) => Ok((p.clone(), v.clone(), o.clone())),
        None => bail!(
            "no Debian package for kernel {spec:?} (looked for linux-image-{spec}.*-amd64, not -dbg/-rt/-cloud/-unsigned) \
             in the configured apt sources. On Debian 12 the 6.1 kernels come from bookworm / bookworm-security and \
             the 6.12 kernels from bookworm-security (source linux-signed-6.12-amd64) or bookworm-backports: add the \
             missing Debian suite to /etc/apt/sources.list.d/debian.sources and run `apt-get update`"
        ),
    }
}

/// Resolves, downloads (unless cached) and unpacks a kernel package.
fn ensure_kernel(tools: &Tools, cache: &Path, spec: &str) -> Result<KernelPkg> {
    let (package, version, origin) = resolve_package(tools, spec)?;
    phase(
        spec,
        &format!(
            "kernel package {package} {version}{}",
            if origin.is_empty() {
                String::new()
            } else {
                format!(" ({origin})")
            }
        ),
    );
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    let deb_name = format!("{package}_{}_amd64.deb", version.replace(':', "%3a"));
    let deb = debs.join(&deb_name);
    let root = cache.join("kernels").join(format!("{package}_{version}"));
    let stamp = root.join(".unpacked");

    if !stamp.exists() {
        if !deb.exists() {
            phase(spec, &format!("apt-get download {package}={version}"));
            let t = Instant::now();
            run(Command::new(&tools.apt_get)
                .current_dir(&debs)
                .args(["download", "-q"])
                .arg(format!("{package}={version}")))
            .with_context(|| format!("downloading {package} {version}"))?;
            if !deb.exists() {
                bail!("apt-get download did not produce {}", deb.display());
            }
            phase(
                spec,
                &format!("downloaded {deb_name} in {:.1}s", secs(t.elapsed())),
            );
        } else {
            phase(spec, &format!("using cached {}", deb.display()));
        }
        phase(spec, "unpacking (dpkg-deb -x) and running depmod");
        let tmp = root.with_extension("tmp");
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp)?;
        run(Command::new(&tools.dpkg_deb).arg("-x").arg(&deb).arg(&tmp))?;
        let release = single_release(&tmp)?;
        // Debian generates modules.dep in the postinst; do the same here.
        if !tmp
            .join("lib/modules")
            .join(&release)
            .join("modules.dep")
            .exists()
        {
            run(Command::new(&tools.depmod)
                .arg("-b")
                .arg(&tmp)
                .arg(&release))
            .with_context(|| format!("depmod for {release}"))?;
        }
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.parent().unwrap())?;
        fs::rename(&tmp, &root)?;
        fs::write(&stamp, format!("{package} {version}\n"))?;
    } else {
        phase(spec, &format!("using cached kernel {}", root.display()));
    }
    let release = single_release(&root)?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.exists() {
        bail!("{} missing from {package}", vmlinuz.display());
    }
    let moddir = root.join("lib/modules").join(&release);
    Ok(KernelPkg {
        package,
        version,
        release,
        vmlinuz,
        moddir,
    })
}

fn single_release(root: &Path) -> Result<String> {
    let dir = root.join("lib/modules");
    let names: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one kernel release under {}, found {names:?}",
            dir.display()
        ),
    }
}

/// dpkg's version comparison (epoch, upstream, revision; `~` sorts first).
pub fn deb_version_cmp(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) if e.chars().all(|c| c.is_ascii_digit()) => (e.parse().unwrap_or(0), r),
            _ => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((u, r)) => (epoch, u, r),
            None => (epoch, rest, ""),
        }
    }
    fn order(c: Option<u8>) -> i32 {
        match c {
            None => 0,
            Some(c) if c.is_ascii_digit() => 0,
            Some(c) if c.is_ascii_alphabetic() => c as i32,
            Some(b'~') => -1,
            Some(c) => c as i32 + 256,
        }
    }
    fn verrevcmp(a: &[u8], b: &[u8]) -> Ordering {
        let (mut i, mut j) = (0, 0);
        let digit = |s: &[u8], k: usize| s.get(k).is_some_and(|c| c.is_ascii_digit());
        while i < a.len() || j < b.len() {
            while (i < a.len() && !digit(a, i)) || (j < b.len() && !digit(b, j)) {
                let (ac, bc) = (order(a.get(i).copied()), order(b.get(j).copied()));
                if ac != bc {
                    return ac.cmp(&bc);
                }
                i += 1;
                j += 1;
            }
            while a.get(i) == Some(&b'0') {
                i += 1;
            }
            while b.get(j) == Some(&b'0') {
                j += 1;
            }
            let mut first_diff = Ordering::Equal;
            while digit(a, i) && digit(b, j) {
                if first_diff == Ordering::Equal {
                    first_diff = a[i].cmp(&b[j]);
                }
                i += 1;
                j += 1;
            }
            if digit(a, i) {
                return Ordering::Greater;
            }
            if digit(b, j) {
                return Ordering::Less;
            }
            if first_diff != Ordering::Equal {
                return first_diff;
            }
        }
        Ordering::Equal
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| verrevcmp(ua.as_bytes(), ub.as_bytes()))
        .then_with(|| verrevcmp(ra.as_bytes(), rb.as_bytes()))
}

// ---------------------------------------------------------------------------
// Kernel modules
// ---------------------------------------------------------------------------

/// One module to insmod, in load order.
struct ModLoad {
    name: String,
    /// Relative to the module directory, possibly compressed.
    path: String,
    /// A softdep target: a failed insmod is only a note.
    optional: bool,
}

struct ModDb {
    /// module name -> (path relative to the module dir, dependency names)
    deps: HashMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
    softdep_pre: HashMap<String, Vec<String>>,
    aliases: HashMap<String, Vec<String>>,
}

fn mod_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

impl ModDb {
    fn load(moddir: &Path) -> Result<ModDb> {
        let read = |n: &str| {
            let p = moddir.join(n);
            fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
        };
        let mut deps = HashMap::new();
        for line in read("modules.dep")?.lines() {
            let Some((m, d)) = line.split_once(':') else {
                continue;
            };
            let names = d.split_whitespace().map(mod_name).collect();
            deps.insert(mod_name(m), (m.to_string(), names));
        }
        let builtin = read("modules.builtin")?.lines().map(mod_name).collect();
        let mut softdep_pre = HashMap::new();
        if let Ok(text) = read("modules.softdep") {
            for line in text.lines() {
                let mut w = line.split_whitespace();
                if w.next() != Some("softdep") {
                    continue;
                }
                let Some(m) = w.next() else { continue };
                let mut pre = Vec::new();
                let mut in_pre = false;
                for x in w {
                    match x {
                        "pre:" => in_pre = true,
                        "post:" => in_pre = false,
                        _ if in_pre => pre.push(x.replace('-', "_")),
                        _ => {}
                    }
                }
                softdep_pre
                    .entry(m.replace('-', "_"))
                    .or_insert_with(Vec::new)
                    .extend(pre);
            }
        }
        let mut aliases: HashMap<String, Vec<String>> = HashMap::new();
        if let Ok(text) = read("modules.alias") {
            for line in text.lines() {
                let mut w = line.split_whitespace();
                if let (Some("alias"), Some(a), Some(m)) = (w.next(), w.next(), w.next())
                    && !a.contains(['*', '?', '['])
                {
                    aliases
                        .entry(a.replace('-', "_"))
                        .or_default()
                        .push(m.replace('-', "_"));
                }
            }
        }
        Ok(ModDb {
            deps,
            builtin,
            softdep_pre,
            aliases,
        })
    }

    /// Load order for `wanted`: `(name, relative path, optional)`, dependencies
    /// first. Softdep targets are optional (e.g. crc32c_intel needs SSE4.2).
    fn resolve(&self, wanted: &[String]) -> Result<(Vec<ModLoad>, Vec<String>)> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        let mut builtin = Vec::new();
        for w in wanted {
            let n = w.replace('-', "_");
            if self.builtin.contains(&n) {
                builtin.push(n);
                continue;
            }
            if !self.deps.contains_key(&n) {
                bail!("kernel module {w} is neither a module nor built in");
            }
            self.visit(&n, false, &mut seen, &mut order)?;
        }
        Ok((order, builtin))
    }

    fn visit(
        &self,
        name: &str,
        optional: bool,
        seen: &mut HashSet<String>,
        order: &mut Vec<ModLoad>,
    ) -> Result<()> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let (path, deps) = self
            .deps
            .get(name)
            .ok_or_else(|| anyhow!("module {name} not in modules.dep"))?;
        for pre in self.softdep_pre.get(name).into_iter().flatten() {
            let targets: Vec<String> = if self.deps.contains_key(pre) {
                vec![pre.clone()]
            } else {
                self.aliases.get(pre).cloned().unwrap_or_default()
            };
            for t in targets {
                if self.deps.contains_key(&t) && !self.builtin.contains(&t) {
                    self.visit(&t, true, seen, order)?;
                }
            }
        }
        for d in deps {
            self.visit(d, optional, seen, order)?;
        }
        order.push(ModLoad {
            name: name.to_string(),
            path: path.clone(),
            optional,
        });
        Ok(())
    }
}

fn read_module(tools: &Tools, path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        Some(&tools.xz)
    } else if name.ends_with(".ko.zst") {
        Some(&tools.zstd)
    } else if name.ends_with(".ko.gz") {
        Some(&tools.gzip)
    } else {
        None
    };
    match tool {
        None => fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some(t) => Ok(run(Command::new(t).arg("-dc").arg(path))?.stdout),
    }
}

// ---------------------------------------------------------------------------
// initramfs
// ---------------------------------------------------------------------------

enum Source {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

enum Entry {
    Dir,
    File(Source, u32),
    Symlink(String),
    CharDev(u32, u32),
}

/// An in-memory cpio (newc) archive description.
#[derive(Default)]
struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        if path.is_empty() {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entries.entry(path.to_string()).or_insert(Entry::Dir);
    }
    fn add(&mut self, path: &str, e: Entry) {
        let path = path.trim_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entries.insert(path.to_string(), e);
    }
    fn host_file(&mut self, guest: &str, host: &Path, mode: u32) {
        self.add(guest, Entry::File(Source::Host(host.to_path_buf()), mode));
    }
    fn bytes(&mut self, guest: &str, data: impl Into<Vec<u8>>, mode: u32) {
        self.add(guest, Entry::File(Source::Bytes(data.into()), mode));
    }
    fn symlink(&mut self, guest: &str, target: &str) {
        self.add(guest, Entry::Symlink(target.to_string()));
    }
    fn contains(&self, guest: &str) -> bool {
        self.entries.contains_key(guest.trim_matches('/'))
    }

    /// Hash of everything that ends up in the archive (contents included).
    fn hash(&self, salt: &str) -> Result<String> {
        // Two differently seeded SipHashes: 128 bits, deterministic per toolchain.
        let mut h1 = std::hash::DefaultHasher::new();
        let mut h2 = std::hash::DefaultHasher::new();
        h2.write(b"second");
        let mut feed = |b: &[u8]| {
            h1.write(b);
            h2.write(b);
        };
        feed(INITRD_FORMAT.as_bytes());
        feed(salt.as_bytes());
        for (path, e) in &self.entries {
            feed(path.as_bytes());
            match e {
                Entry::Dir => feed(b"d"),
                Entry::Symlink(t) => {
                    feed(b"l");
                    feed(t.as_bytes());
                }
                Entry::CharDev(a, b) => feed(format!("c{a}:{b}").as_bytes()),
                Entry::File(src, mode) => {
                    feed(format!("f{mode:o}").as_bytes());
                    match src {
                        Source::Bytes(b) => {
                            feed(&(b.len() as u64).to_le_bytes());
                            feed(b);
                        }
                        Source::Host(p) => {
                            let mut f = File::open(p)
                                .with_context(|| format!("opening {}", p.display()))?;
                            let mut buf = vec![0u8; 1 << 20];
                            let mut n_total = 0u64;
                            loop {
                                let n = f.read(&mut buf)?;
                                if n == 0 {
                                    break;
                                }
                                n_total += n as u64;
                                feed(&buf[..n]);
                            }
                            feed(&n_total.to_le_bytes());
                        }
                    }
                }
            }
        }
        Ok(format!("{:016x}{:016x}", h1.finish(), h2.finish()))
    }

    /// Writes the archive as cpio newc (all files root-owned, mtime 0).
    fn write_cpio(&self, w: &mut impl Write) -> Result<()> {
        fn header(
            w: &mut impl Write,
            ino: u32,
            mode: u32,
            size: u32,
            rdev: (u32, u32),
            name: &str,
        ) -> Result<()> {
            let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
            write!(
                w,
                "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                0,
                0,
                0,
                0,
                0,
                rdev.0,
                rdev.1,
                name.len() + 1,
                0
            )?;
            w.write_all(name.as_bytes())?;
            w.write_all(&[0])?;
            pad(w, 110 + name.len() + 1)
        }
        fn pad(w: &mut impl Write, len: usize) -> Result<()> {
            let n = (4 - len % 4) % 4;
            w.write_all(&[0u8; 3][..n])?;
            Ok(())
        }
        let mut ino = 1u32;
        for (path, e) in &self.entries {
            ino += 1;
            match e {
                Entry::Dir => header(w, ino, 0o040755, 0, (0, 0), path)?,
                Entry::CharDev(ma, mi) => header(w, ino, 0o020600, 0, (*ma, *mi), path)?,
                Entry::Symlink(t) => {
                    header(w, ino, 0o120777, t.len() as u32, (0, 0), path)?;
                    w.write_all(t.as_bytes())?;
                    pad(w, t.len())?;
                }
                Entry::File(src, mode) => {
                    let data = match src {
                        Source::Bytes(b) => std::borrow::Cow::Borrowed(b.as_slice()),
                        Source::Host(p) => std::borrow::Cow::Owned(
                            fs::read(p).with_context(|| format!("reading {}", p.display()))?,
                        ),
                    };
                    let size = u32::try_from(data.len()).map_err(|_| {
                        anyhow!("{path} is larger than 4 GiB, too big for cpio newc")
                    })?;
                    header(w, ino, 0o100000 | mode, size, (0, 0), path)?;
                    w.write_all(&data)?;
                    pad(w, data.len())?;
                }
            }
        }
        header(w, 0, 0, 0, (0, 0), "TRAILER!!!")?;
        Ok(())
    }
}

/// The base of every initramfs: directories, /dev/console, static busybox with its
/// applet links (except those in `skip`), minimal /etc.
fn base_archive(tools: &Tools, skip: &[&str]) -> Result<Archive> {
    let mut a = Archive::default();
    for d in [
        "bin", "dev", "proc", "sys", "run", "tmp", "etc", "root", "mnt", "var", "usr", "lib",
        "lib64",
    ] {
        a.dir(d);
    }
    a.symlink("sbin", "bin");
    a.symlink("usr/bin", "../bin");
    a.symlink("usr/sbin", "../bin");
    a.symlink("var/run", "../run");
    a.add("dev/console", Entry::CharDev(5, 1));
    a.add("dev/null", Entry::CharDev(1, 3));
    a.bytes("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644);
    a.bytes("etc/group", "root:x:0:\n", 0o644);
    a.bytes("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n", 0o644);
    a.bytes("etc/hostname", "tcpstall-vm\n", 0o644);

    add_binary(tools, &mut a, &tools.busybox, "bin/busybox")?;
    // Debian's static busybox is built with FEATURE_SH_STANDALONE: its ash runs
    // its own `ip`/`tc` applets whatever PATH says. /bin/sh is dash instead, so
    // scripts and `sh -c` from the tests get the host's iproute2.
    add_binary(tools, &mut a, &tools.dash, "bin/sh")?;
    add_binary(tools, &mut a, &tools.bash, "bin/bash")?;
    let out = run(Command::new(&tools.busybox).arg("--list"))?;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty()
            || ["busybox", "sh", "bash"].contains(&applet)
            || skip.contains(&applet)
        {
            continue;
        }
        a.symlink(&format!("bin/{applet}"), "busybox");
    }
    Ok(a)
}

/// Adds a host executable at `guest` and the shared libraries `ldd` lists for it
/// (at their host paths, so the dynamic loader finds them).
fn add_binary(tools: &Tools, a: &mut Archive, host: &Path, guest: &str) -> Result<()> {
    a.host_file(guest, host, 0o755);
    for lib in ldd_libs(tools, host)? {
        let guest_path = lib.to_string_lossy().into_owned();
        if !a.contains(&guest_path) {
            let real =
                fs::canonicalize(&lib).with_context(|| format!("resolving {}", lib.display()))?;
            a.host_file(&guest_path, &real, 0o755);
        }
    }
    Ok(())
}

fn ldd_libs(tools: &Tools, bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new(&tools.ldd)
        .arg(bin)
        .output()
        .with_context(|| format!("running ldd {}", bin.display()))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        bail!("ldd {} failed: {}", bin.display(), text.trim());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some((name, rest)) = line.split_once("=>") {
            let target = rest.split_whitespace().next().unwrap_or("");
            if target == "not" {
                bail!(
                    "{}: shared library {} not found (ldd)",
                    bin.display(),
                    name.trim()
                );
            }
            if target.starts_with('/') {
                libs.push(PathBuf::from(target));
            }
        } else if line.starts_with('/')
            && let Some(p) = line.split_whitespace().next()
        {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

fn check_payload(p: &GuestPayload) -> Result<()> {
    for (what, path) in [("agent", &p.agent), ("tests", &p.tests)] {
        let m =
            fs::metadata(path).with_context(|| format!("payload {what}: {}", path.display()))?;
        if !m.is_file() {
            bail!("payload {what}: {} is not a file", path.display());
        }
    }
    for (k, _) in &p.extra_env {
        let ok = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            bail!("payload env name {k:?} is not a valid shell variable name");
        }
    }
    Ok(())
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Mounts and module loading shared by both guest init scripts.
fn init_prologue(release: &str, modules: &[(String, bool)]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        r#"#!/bin/sh
# Generated by xtask/src/vm.rs: do not edit.
export PATH={GUEST_PATH}
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec 0</dev/console 1>/dev/console 2>&1
echo "TCPSTALL-VM: init started"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tracefs tracefs /sys/kernel/tracing || echo "TCPSTALL-VM: warning: tracefs mount failed"
mount -t debugfs debugfs /sys/kernel/debug || echo "TCPSTALL-VM: warning: debugfs mount failed"
mount -t bpf bpffs /sys/fs/bpf || echo "TCPSTALL-VM: warning: bpffs mount failed"
mount -t tmpfs -o mode=755 cgroup-root /sys/fs/cgroup
mkdir -p /sys/fs/cgroup/unified
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified || echo "TCPSTALL-VM: warning: cgroup2 mount failed"
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
hostname tcpstall-vm
M=/lib/modules/{release}
"#
    ));
    if !modules.is_empty() {
        s.push_str("echo \"TCPSTALL-VM: loading modules\"\n");
    }
    for (m, optional) in modules {
        if *optional {
            s.push_str(&format!(
                "insmod $M/{m}.ko 2>/dev/null || echo \"TCPSTALL-VM: note: optional module {m} not loaded\"\n"
            ));
        } else {
            s.push_str(&format!(
                "insmod $M/{m}.ko || echo \"TCPSTALL-VM: error: insmod {m} failed\"\n"
            ));
        }
    }
    if !modules.is_empty() {
        s.push_str(
            "echo \"TCPSTALL-VM: modules loaded: $(cut -d' ' -f1 /proc/modules | tr '\\n' ' ')\"\n",
        );
    }
    s.push_str(
        r#"ip link set lo up
echo "TCPSTALL-VM: uname -r: $(uname -r)"
btf=no; [ -e /sys/kernel/btf/vmlinux ] && btf=yes
kprobe=no; [ -e /sys/bus/event_source/devices/kprobe ] && kprobe=yes
echo "TCPSTALL-VM: btf=$btf kprobe=$kprobe"
"#,
    );
    s
}

fn test_init(release: &str, modules: &[(String, bool)], payload: &GuestPayload) -> String {
    let mut s = init_prologue(release, modules);
    let mut cmd = format!(
        "env TCPSTALL_AGENT={GUEST_AGENT} TCPSTALL_IN_VM=1 PATH={GUEST_PATH} RUST_BACKTRACE=1"
    );
    for (k, v) in &payload.extra_env {
        cmd.push_str(&format!(" {k}={}", sh_quote(v)));
    }
    cmd.push(' ');
    cmd.push_str(GUEST_TESTS);
    for a in &payload.test_args {
        cmd.push(' ');
        cmd.push_str(&sh_quote(a));
    }
    s.push_str(&format!(
        r#"echo "TCPSTALL-VM: running payload"
cd /
{cmd} </dev/null
rc=$?
echo
if [ "$rc" -eq 0 ]; then echo "{RESULT_MARKER} PASS"; else echo "{RESULT_MARKER} FAIL exit=$rc"; fi
sync
poweroff -f
"#
    ));
    s
}

fn btf_init(release: &str) -> String {
    let mut s = init_prologue(release, &[]);
    s.push_str(&format!(
        r#"if [ -e /sys/kernel/btf/vmlinux ]; then
  echo "{BTF_BEGIN} $(wc -c < /sys/kernel/btf/vmlinux)"
  base64 /sys/kernel/btf/vmlinux
  echo "{BTF_END}"
fi
poweroff -f
"#
    ));
    s
}

/// Builds (or reuses) `<dir>/initrd.gz` for the test payload.
fn build_test_initrd(
    tools: &Tools,
    k: &KernelPkg,
    modules: &[String],
    payload: &GuestPayload,
    dir: &Path,
    spec: &str,
) -> Result<PathBuf> {
    let db = ModDb::load(&k.moddir)?;
    let (order, builtin) = db.resolve(modules)?;
    phase(
        spec,
        &format!(
            "modules: {}{}",
            order
                .iter()
                .map(|m| if m.optional {
                    format!("{}(optional)", m.name)
                } else {
                    m.name.clone()
                })
                .collect::<Vec<_>>()
                .join(" "),
            if builtin.is_empty() {
                String::new()
            } else {
                format!("; built in: {}", builtin.join(" "))
            }
        ),
    );

    let mut a = base_archive(tools, &["ip", "ss", "tc", "nft"])?;
    add_binary(tools, &mut a, &tools.ip, "bin/ip")?;
    add_binary(tools, &mut a, &tools.ss, "bin/ss")?;
    add_binary(tools, &mut a, &tools.tc, "bin/tc")?;
    add_binary(tools, &mut a, &tools.nft, "bin/nft")?;
    add_binary(tools, &mut a, &payload.agent, GUEST_AGENT)?;
    add_binary(tools, &mut a, &payload.tests, GUEST_TESTS)?;
    let mut load = Vec::new();
    for ModLoad {
        name,
        path: rel,
        optional,
    } in &order
    {
        let data = read_module(tools, &k.moddir.join(rel))?;
        a.bytes(&format!("lib/modules/{}/{name}.ko", k.release), data, 0o644);
        load.push((name.clone(), *optional));
    }
    // Debian kernels have no /proc/config.gz (IKCONFIG unset); nodes have this file,
    // and the agent reads CONFIG_HZ from it.
    let config = k
        .moddir
        .join("../../../boot")
        .join(format!("config-{}", k.release));
    if config.exists() {
        a.host_file(&format!("boot/config-{}", k.release), &config, 0o644);
    }
    a.bytes("init", test_init(&k.release, &load, payload), 0o755);
    write_initrd(
        tools,
        &a,
        dir,
        &format!("{} {}", k.package, k.version),
        spec,
    )
}

fn write_initrd(tools: &Tools, a: &Archive, dir: &Path, salt: &str, spec: &str) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let initrd = dir.join("initrd.gz");
    let key_file = dir.join("initrd.key");
    let t = Instant::now();
    let key = a.hash(salt)?;
    if initrd.exists() && fs::read_to_string(&key_file).ok().as_deref() == Some(key.as_str()) {
        phase(
            spec,
            &format!(
                "initramfs unchanged, reusing {} (hashed in {:.1}s)",
                initrd.display(),
                secs(t.elapsed())
            ),
        );
        return Ok(initrd);
    }
    let _ = fs::remove_file(&key_file);
    let tmp = dir.join("initrd.gz.tmp");
    let out = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut gz = Command::new(&tools.gzip)
        .args(["-6", "-n", "-c"])
        .stdin(Stdio::piped())
        .stdout(out)
        .spawn()
        .context("spawning gzip")?;
    {
        let stdin = gz.stdin.take().unwrap();
        let mut w = std::io::BufWriter::with_capacity(1 << 20, stdin);
        a.write_cpio(&mut w)?;
        w.flush()?;
    }
    let st = gz.wait()?;
    if !st.success() {
        bail!("gzip failed: {st}");
    }
    fs::rename(&tmp, &initrd)?;
    fs::write(&key_file, &key)?;
    let size = fs::metadata(&initrd)?.len();
    phase(
        spec,
        &format!(
            "built {} ({:.1} MiB, {} entries) in {:.1}s",
            initrd.display(),
            size as f64 / 1048576.0,
            a.entries.len(),
            secs(t.elapsed())
        ),
    );
    Ok(initrd)
}

// ---------------------------------------------------------------------------
// QEMU
// ---------------------------------------------------------------------------

struct BootOutcome {
    marker: Option<String>,
    timed_out: bool,
    exit: String,
    tail: Vec<String>,
    boot_time: Option<Duration>,
    guest_release: Option<String>,
    caps: Option<String>,
    /// Every console line, only kept when `echo` is false (BTF dump).
    lines: Vec<String>,
}

fn boot(
    tools: &Tools,
    opts: &VmOptions,
    spec: &str,
    vmlinuz: &Path,
    initrd: &Path,
    console_log: &Path,
    echo: bool,
) -> Result<BootOutcome> {
    if let Some(d) = console_log.parent() {
        fs::create_dir_all(d)?;
    }
    let mut log = std::io::BufWriter::new(
        File::create(console_log).with_context(|| format!("creating {}", console_log.display()))?,
    );
    let mut cmd = Command::new(&tools.qemu);
    cmd.args(["-accel", "tcg", "-cpu", "max"])
        .args([
            "-smp",
            &opts.smp.to_string(),
            "-m",
            &opts.memory_mb.to_string(),
        ])
        .args(["-nographic", "-no-reboot"])
        // No NIC: the guest is isolated from the host network (and skips iPXE).
        .args(["-nic", "none"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", tools.qemu.display()))?;

    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            let mut r = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = strip_ansi(&String::from_utf8_lossy(&buf));
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        }));
    }
    drop(tx);

    let deadline = start + opts.timeout;
    let mut o = BootOutcome {
        marker: None,
        timed_out: false,
        exit: String::new(),
        tail: Vec::new(),
        boot_time: None,
        guest_release: None,
        caps: None,
        lines: Vec::new(),
    };
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut marker_at: Option<Instant> = None;
    let mut in_btf = false;
    loop {
        let now = Instant::now();
        // After the marker, give the guest a while to power off by itself.
        let limit = match marker_at {
            Some(t) => (t + Duration::from_secs(60)).min(deadline.max(t + Duration::from_secs(10))),
            None => deadline,
        };
        if now >= limit {
            if marker_at.is_none() {
                o.timed_out = true;
                phase(
                    spec,
                    &format!("timeout after {}s: killing qemu", opts.timeout.as_secs()),
                );
            } else {
                phase(
                    spec,
                    "guest did not power off after its result: killing qemu",
                );
            }
            let _ = child.kill();
            break;
        }
        match rx.recv_timeout(limit - now) {
            Ok(line) => {
                writeln!(log, "{line}")?;
                if line.contains("TCPSTALL-VM: init started") && o.boot_time.is_none() {
                    o.boot_time = Some(start.elapsed());
                    log.flush()?;
                }
                if let Some(r) = line.split("TCPSTALL-VM: uname -r: ").nth(1) {
                    o.guest_release = Some(r.trim().to_string());
                }
                if let Some(c) = line.split("TCPSTALL-VM: ").nth(1)
                    && c.starts_with("btf=")
                {
                    o.caps = Some(c.trim().to_string());
                }
                if let Some(m) = line.split(RESULT_MARKER).nth(1) {
                    o.marker = Some(m.trim().to_string());
                    marker_at = Some(Instant::now());
                    log.flush()?;
                }
                if line.contains(BTF_BEGIN) {
                    in_btf = true;
                } else if line.contains(BTF_END) {
                    in_btf = false;
                }
                if echo {
                    println!("[{spec}] {line}");
                } else {
                    if !in_btf {
                        println!("[{spec}] {line}");
                    }
                    o.lines.push(line.clone());
                }
                tail.push_back(line);
                if tail.len() > 30 {
                    tail.pop_front();
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait().context("waiting for qemu")?;
    for r in readers {
        let _ = r.join();
    }
    log.flush()?;
    o.exit = status.to_string();
    o.tail = tail.into();
    phase(
        spec,
        &format!(
            "qemu finished in {:.1}s ({}), guest booted in {}",
            secs(start.elapsed()),
            o.exit,
            o.boot_time
                .map(|d| format!("{:.1}s", secs(d)))
                .unwrap_or_else(|| "?".into())
        ),
    );
    Ok(o)
}

/// Drops CR/LF, escape sequences (SeaBIOS clears the screen) and other control
/// characters except tab.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\x1b' => {
                if let Some('[') = it.next() {
                    // CSI: parameters/intermediates up to a final byte 0x40..=0x7e
                    while let Some(&n) = it.peek() {
                        it.next();
                        if ('\x40'..='\x7e').contains(&n) {
                            break;
                        }
                    }
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// BTF
// ---------------------------------------------------------------------------

/// Checks the BTF header (magic 0xeb9f, version 1) and that the blob is exactly
/// header + type + string sections long.
pub fn validate_btf(data: &[u8]) -> Result<()> {
    if data.len() < 24 {
        bail!("BTF blob too short ({} bytes)", data.len());
    }
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap()) as usize;
    if u16::from_le_bytes([data[0], data[1]]) != 0xeb9f {
        bail!("bad BTF magic {:02x}{:02x}", data[1], data[0]);
    }
    if data[2] != 1 {
        bail!("unsupported BTF version {}", data[2]);
    }
    let hdr = u32_at(4);
    let end = hdr + (u32_at(8) + u32_at(12)).max(u32_at(16) + u32_at(20));
    if end != data.len() {
        bail!("BTF blob is {} bytes, header says {end}", data.len());
    }
    Ok(())
}

const COMPRESSORS: &[(&[u8], &str)] = &[
    (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], "xz"),
    (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
    (&[0x1f, 0x8b, 0x08], "gzip"),
];

fn decompress_tool<'a>(tools: &'a Tools, kind: &str) -> &'a Path {
    match kind {
        "xz" => &tools.xz,
        "zstd" => &tools.zstd,
        _ => &tools.gzip,
    }
}

/// Decompresses `data` with the tool for `kind`; trailing bytes after the stream
/// make the tools complain, so a nonzero exit is fine as long as the output is ELF.
fn decompress(tools: &Tools, kind: &str, data: &[u8], work: &Path) -> Result<Vec<u8>> {
    let input = work.join("vmlinux.payload");
    let output = work.join("vmlinux.out");
    fs::write(&input, data)?;
    let out_f = File::create(&output)?;
    let mut cmd = Command::new(decompress_tool(tools, kind));
    if kind == "xz" {
        cmd.arg("--single-stream");
    }
    let st = cmd
        .arg("-dc")
        .arg(&input)
        .stdout(out_f)
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("running {kind}"))?;
    let result = fs::read(&output);
    let _ = fs::remove_file(&input);
    let _ = fs::remove_file(&output);
    let result = result?;
    if !result.starts_with(b"\x7fELF") {
        bail!("{kind} output is not an ELF file ({st})");
    }
    Ok(result)
}

/// vmlinux (ELF) from a bzImage: the payload location from the x86 boot header
/// (protocol >= 2.08), else a scan for compressor magics, trying each candidate
/// until one decompresses to ELF.
fn vmlinux_from_bzimage(tools: &Tools, image: &[u8], work: &Path) -> Result<Vec<u8>> {
    let mut errors = Vec::new();
    if image.len() > 0x250 && &image[0x202..0x206] == b"HdrS" {
        let version = u16::from_le_bytes([image[0x206], image[0x207]]);
        let setup_sects = match image[0x1f1] {
            0 => 4,
            n => n as usize,
        };
        let off = (setup_sects + 1) * 512
            + u32::from_le_bytes(image[0x248..0x24c].try_into().unwrap()) as usize;
        let len = u32::from_le_bytes(image[0x24c..0x250].try_into().unwrap()) as usize;
        if version >= 0x208 && len > 4 && off + len <= image.len() {
            // The build appends the decompressed size (4 bytes) to the stream.
            let payload = &image[off..off + len - 4];
            if let Some((_, kind)) = COMPRESSORS.iter().find(|(m, _)| payload.starts_with(m)) {
                match decompress(tools, kind, payload, work) {
                    Ok(v) => return Ok(v),
                    Err(e) => errors.push(format!("boot header payload: {e:#}")),
                }
            } else {
                errors.push(format!(
                    "boot header payload has unknown magic {:02x?}",
                    &payload[..payload.len().min(6)]
                ));
            }
        }
    }
    for (magic, kind) in COMPRESSORS {
        let mut pos = 0;
        let mut tries = 0;
        while let Some(i) = find(&image[pos..], magic) {
            let at = pos + i;
            tries += 1;
            if let Ok(v) = decompress(tools, kind, &image[at..], work) {
                return Ok(v);
            }
            pos = at + 1;
            if tries > 16 {
                break;
            }
        }
    }
    bail!(
        "no compressed vmlinux found in the bzImage ({})",
        errors.join("; ")
    )
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Returns the contents of ELF64 little-endian section `name`.
fn elf_section<'a>(elf: &'a [u8], name: &str) -> Result<Option<&'a [u8]>> {
    if elf.len() < 64 || !elf.starts_with(b"\x7fELF") || elf[4] != 2 || elf[5] != 1 {
        bail!("not a little-endian ELF64 file");
    }
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let shoff = u64_at(0x28);
    let shentsize = u16_at(0x3a);
    let shnum = u16_at(0x3c);
    let shstrndx = u16_at(0x3e);
    if shoff == 0 || shentsize < 64 || shoff + shnum * shentsize > elf.len() || shstrndx >= shnum {
        bail!("ELF section header table missing or truncated");
    }
    let sh = |i: usize| shoff + i * shentsize;
    let strtab_off = u64_at(sh(shstrndx) + 24);
    let strtab_size = u64_at(sh(shstrndx) + 32);
    let strtab = elf
        .get(strtab_off..strtab_off + strtab_size)
        .ok_or_else(|| anyhow!("section name table out of bounds"))?;
    for i in 0..shnum {
        let name_off = u32_at(sh(i));
        let Some(rest) = strtab.get(name_off..) else {
            continue;
        };
        let n = rest.split(|&b| b == 0).next().unwrap_or_default();
        if n == name.as_bytes() {
            let (off, size) = (u64_at(sh(i) + 24), u64_at(sh(i) + 32));
            return elf
                .get(off..off + size)
                .map(Some)
                .ok_or_else(|| anyhow!("section {name} out of bounds"));
        }
    }
    Ok(None)
}

fn btf_from_vmlinuz(tools: &Tools, vmlinuz: &Path, cache: &Path) -> Result<Vec<u8>> {
    let image = fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let work = cache.join("tmp");
    fs::create_dir_all(&work)?;
    let elf = vmlinux_from_bzimage(tools, &image, &work)?;
    let btf = elf_section(&elf, ".BTF")?.ok_or_else(|| anyhow!("vmlinux has no .BTF section"))?;
    validate_btf(btf)?;
    Ok(btf.to_vec())
}

fn btf_from_guest(tools: &Tools, opts: &VmOptions, spec: &str, k: &KernelPkg) -> Result<Vec<u8>> {
    let dir = opts.cache_dir.join(sanitize(spec)).join("btf-dump");
    let mut a = base_archive(tools, &[])?;
    a.bytes("init", btf_init(&k.release), 0o755);
    let initrd = write_initrd(
        tools,
        &a,
        &dir,
        &format!("{} {}", k.package, k.version),
        spec,
    )?;
    let o = boot(
        tools,
        opts,
        spec,
        &k.vmlinuz,
        &initrd,
        &dir.join("console.log"),
        false,
    )?;
    let begin = o
        .lines
        .iter()
        .position(|l| l.contains(BTF_BEGIN))
        .ok_or_else(|| anyhow!("guest printed no BTF (no /sys/kernel/btf/vmlinux?)"))?;
    let expected: usize = o.lines[begin]
        .split(BTF_BEGIN)
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let mut text = String::new();
    for l in &o.lines[begin + 1..] {
        if l.contains(BTF_END) {
            break;
        }
        text.push_str(l.trim());
    }
    let data = base64_decode(&text)?;
    if expected != 0 && data.len() != expected {
        bail!(
            "guest BTF dump: got {} bytes, guest said {expected}",
            data.len()
        );
    }
    validate_btf(&data)?;
    Ok(data)
}

fn base64_decode(s: &str) -> Result<Vec<u8>> {
    let val = |c: u8| -> Result<u32> {
        Ok(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => bail!("bad base64 character {:?}", c as char),
        } as u32)
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        if chunk.len() < 4 {
            bail!("truncated base64");
        }
        let pads = chunk.iter().filter(|&&c| c == b'=').count();
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= if c == b'=' { 0 } else { val(c)? } << (18 - 6 * i);
        }
        let b = n.to_be_bytes();
        out.extend_from_slice(&b[1..4 - pads.min(2)]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_order() {
        assert_eq!(
            deb_version_cmp("6.12.117-1~deb12u1", "6.12.115-1~deb12u1"),
            Ordering::Greater
        );
        assert_eq!(deb_version_cmp("6.1.192-2", "6.1.192-1"), Ordering::Greater);
        assert_eq!(deb_version_cmp("1.0~rc1", "1.0"), Ordering::Less);
        assert_eq!(deb_version_cmp("1:1.0", "2.0"), Ordering::Greater);
        assert_eq!(deb_version_cmp("6.1.99-1", "6.1.100-1"), Ordering::Less);
        assert_eq!(deb_version_cmp("1.0a", "1.0"), Ordering::Greater);
        assert_eq!(deb_version_cmp("1.0", "1.0"), Ordering::Equal);
    }

    #[test]
    fn series_filter() {
        assert!(matches_series("linux-image-6.1.0-56-amd64", "6.1"));
        assert!(matches_series("linux-image-6.12.117+deb12-amd64", "6.12"));
        assert!(!matches_series("linux-image-6.12.117+deb12-amd64", "6.1"));
        assert!(!matches_series("linux-image-6.1.0-56-cloud-amd64", "6.1"));
        assert!(!matches_series("linux-image-6.1.0-56-rt-amd64", "6.1"));
        assert!(!matches_series(
            "linux-image-6.1.0-56-amd64-unsigned",
            "6.1"
        ));
        assert!(!matches_series("linux-image-6.1.0-56-amd64-dbg", "6.1"));
        assert!(!matches_series("linux-image-6.12-amd64", "6.12"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("900").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("15x").is_err());
        assert!(parse_duration("0").is_err());
    }

    #[test]
    fn base64() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8h\naGk=").unwrap(), b"hello!hi");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
    }

    #[test]
    fn ansi() {
        assert_eq!(
            strip_ansi("\x1bc\x1b[?7l\x1b[2JTCPSTALL-VM: x\r\n"),
            "TCPSTALL-VM: x"
        );
        assert_eq!(strip_ansi("a\tb"), "a\tb");
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("a'b"), "'a'\\''b'");
    }

    #[test]
    fn module_names() {
        assert_eq!(
            mod_name("kernel/net/netfilter/nft_numgen.ko.xz"),
            "nft_numgen"
        );
        assert_eq!(
            mod_name("kernel/arch/x86/crypto/crc32c-intel.ko"),
            "crc32c_intel"
        );
    }
}
