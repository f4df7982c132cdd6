//! Builds the initramfs: busybox, host tools with their shared libraries,
//! kernel modules, the payload and `/init`, cached by a hash of all inputs.

use anyhow::{Context, Result, bail};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::apt::KernelPkg;
use super::cpio::{Archive, Entry};
use super::host::{Tools, run};
use super::init::{GUEST_AGENT, GUEST_TESTS, test_init};
use super::modules::{ModDb, ModLoad, read_module};
use super::{GuestPayload, VmOptions, phase, sanitize, secs};

/// Bump when the initramfs layout or `/init` changes in a way the input hash
/// would not notice.
const INITRD_FORMAT: &str = "tcpstall-initrd-v1";

/// The base of every initramfs: directories, /dev/console, static busybox with its
/// applet links (except those in `skip`), minimal /etc.
pub(super) fn base_archive(tools: &Tools, skip: &[&str]) -> Result<Archive> {
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

pub(super) fn check_payload(p: &GuestPayload) -> Result<()> {
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

/// Builds (or reuses) `<dir>/initrd.gz` for the test payload.
pub(super) fn build_test_initrd(
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
    for (host, guest) in &payload.extra_bins {
        add_binary(tools, &mut a, host, guest)?;
    }
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

/// The initrd of a helper boot (the KVM test boot, the BTF dump): the base
/// archive with `init` as its only script, cached in
/// `<cache>/<spec>/<subdir>`. Returns that directory and the initrd.
pub(super) fn init_only_initrd(
    tools: &Tools,
    opts: &VmOptions,
    spec: &str,
    k: &KernelPkg,
    subdir: &str,
    init: String,
) -> Result<(PathBuf, PathBuf)> {
    let dir = opts.cache_dir.join(sanitize(spec)).join(subdir);
    let mut a = base_archive(tools, &[])?;
    a.bytes("init", init, 0o755);
    let initrd = write_initrd(
        tools,
        &a,
        &dir,
        &format!("{} {}", k.package, k.version),
        spec,
    )?;
    Ok((dir, initrd))
}

pub(super) fn write_initrd(
    tools: &Tools,
    a: &Archive,
    dir: &Path,
    salt: &str,
    spec: &str,
) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let initrd = dir.join("initrd.gz");
    let key_file = dir.join("initrd.key");
    let t = Instant::now();
    let key = a.hash(&format!("{INITRD_FORMAT} {salt}"))?;
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
