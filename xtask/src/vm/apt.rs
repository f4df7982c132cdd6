//! Debian kernel packages: which package a kernel spec means (apt index),
//! download and unpack.
//!
//! A spec without a suite (`6.1`, `6.1.0-56-amd64`, `linux-image-...`) is
//! looked up in the host's apt sources (`/etc/apt`, Debian 12 here).
//!
//! A suite-qualified spec, `<suite>:<kernel>` (`trixie-backports:7.3`,
//! `bullseye:5.10`, `sid:newest`), is looked up in a private apt
//! configuration that only serves that suite of the Debian archive, so the
//! host's sources are never touched: `<cache>/apt/<suite>/` holds its
//! `sources.list` (deb.debian.org, signed by
//! `/usr/share/keyrings/debian-archive-keyring.gpg`), an empty `status`,
//! and its own lists and archive cache, and every `apt-get` / `apt-cache`
//! call for that spec passes `-o Dir::Etc::SourceList=...`, `Dir::State`,
//! `Dir::Cache` and friends. A release name (`bullseye`, `bookworm`,
//! `trixie`) also gets its `-updates` and `-security` suites (the newest
//! 5.10 is in bullseye-security); any other suite (`sid`, `forky`,
//! `trixie-backports`, `experimental`) is used alone. Its lists are
//! refreshed when older than [`SUITE_LISTS_MAX_AGE`] (the archive drops
//! superseded kernels), and once more when a download fails. `<kernel>` is
//! a series, a release, a package name, or `newest` (the newest
//! `linux-image-<version>-amd64` the suite offers).

use anyhow::{Context, Result, bail};
use std::cmp::Ordering;
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use super::host::{Tools, run};
use super::kernel_names::{
    deb_file_name, image_series, matches_series, parse_split_parts, plain_image,
};
use super::{phase, secs};

pub(super) struct KernelPkg {
    pub package: String,
    pub version: String,
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `<root>/lib/modules/<release>`
    pub moddir: PathBuf,
}

/// A private suite's lists older than this are refreshed before a lookup.
pub(super) const SUITE_LISTS_MAX_AGE: Duration = Duration::from_secs(6 * 3600);

/// The Debian archive and the key it is signed with.
const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
const DEBIAN_SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Release names whose `-updates` and `-security` suites come along.
const RELEASES_WITH_UPDATES: &[&str] = &["bullseye", "bookworm", "trixie"];

/// `<suite>:<kernel>` -> `(Some(suite), kernel)`; no colon -> `(None, spec)`.
pub(super) fn split_spec(spec: &str) -> Result<(Option<&str>, &str)> {
    let Some((suite, kernel)) = spec.split_once(':') else {
        return Ok((None, spec));
    };
    if suite.is_empty()
        || !suite.starts_with(|c: char| c.is_ascii_lowercase())
        || !suite
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        bail!(
            "kernel spec {spec:?}: {suite:?} is not a Debian suite name (e.g. sid, forky, trixie-backports, bullseye)"
        );
    }
    if kernel.is_empty() || kernel.contains(':') {
        bail!(
            "kernel spec {spec:?}: expected <suite>:<kernel>, e.g. trixie-backports:7.3, bullseye:5.10 or sid:newest"
        );
    }
    Ok((Some(suite), kernel))
}

/// The `sources.list` lines of a private suite.
fn suite_sources(suite: &str) -> String {
    let line =
        |mirror: &str, s: &str| format!("deb [signed-by={DEBIAN_KEYRING}] {mirror} {s} main\n");
    let mut out = line(DEBIAN_MIRROR, suite);
    if RELEASES_WITH_UPDATES.contains(&suite) {
        out += &line(DEBIAN_MIRROR, &format!("{suite}-updates"));
        out += &line(DEBIAN_SECURITY_MIRROR, &format!("{suite}-security"));
    }
    out
}

/// The apt configuration a spec is looked up in: the host's, or a private
/// one for one suite under `<cache>/apt/<suite>/`.
pub(super) struct Apt<'a> {
    tools: &'a Tools,
    /// `(suite, directory)`
    private: Option<(String, PathBuf)>,
}

impl<'a> Apt<'a> {
    pub(super) fn new(tools: &'a Tools, cache: &Path, suite: Option<&str>) -> Result<Apt<'a>> {
        let private = match suite {
            None => None,
            Some(suite) => {
                let dir = cache.join("apt").join(suite);
                for d in ["parts", "state/lists/partial", "cache/archives/partial"] {
                    fs::create_dir_all(dir.join(d))
                        .with_context(|| format!("creating {}", dir.join(d).display()))?;
                }
                let list = dir.join("sources.list");
                let want = suite_sources(suite);
                if fs::read_to_string(&list).ok().as_deref() != Some(want.as_str()) {
                    fs::write(&list, &want)
                        .with_context(|| format!("writing {}", list.display()))?;
                    // New sources: the old lists no longer describe them.
                    let _ = fs::remove_file(dir.join("state/lists/.updated"));
                }
                if !dir.join("status").exists() {
                    fs::write(dir.join("status"), "")?;
                }
                Some((suite.to_string(), dir))
            }
        };
        Ok(Apt { tools, private })
    }

    /// `-o` options that make apt read only the private configuration.
    fn options(&self) -> Vec<String> {
        let Some((_, dir)) = &self.private else {
            return Vec::new();
        };
        let d = |p: &str| dir.join(p).to_string_lossy().into_owned();
        [
            ("Dir::Etc::SourceList", d("sources.list")),
            ("Dir::Etc::SourceParts", d("parts")),
            ("Dir::Etc::Preferences", d("preferences")),
            ("Dir::Etc::PreferencesParts", d("parts")),
            ("Dir::State", d("state")),
            ("Dir::State::status", d("status")),
            ("Dir::Cache", d("cache")),
            ("APT::Architecture", "amd64".into()),
            ("APT::Architectures", "amd64".into()),
            ("Acquire::Languages", "none".into()),
            // Only Packages files: no Contents, no DEP-11 metadata.
            (
                "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled",
                "false".into(),
            ),
            (
                "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled",
                "false".into(),
            ),
            (
                "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled",
                "false".into(),
            ),
            (
                "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled",
                "false".into(),
            ),
            // As root apt downloads as `_apt`, who cannot write under the cache.
            ("APT::Sandbox::User", "root".into()),
        ]
        .into_iter()
        .flat_map(|(k, v)| ["-o".to_string(), format!("{k}={v}")])
        .collect()
    }

    fn apt_get(&self) -> Command {
        let mut c = Command::new(&self.tools.apt_get);
        c.args(self.options());
        c
    }

    fn apt_cache(&self) -> Command {
        let mut c = Command::new(&self.tools.apt_cache);
        c.args(self.options());
        c
    }

    /// `sid` for a private suite, "the host's apt sources" otherwise.
    fn describe(&self) -> String {
        match &self.private {
            Some((suite, _)) => format!("Debian suite {suite} (private apt configuration)"),
            None => "the host's apt sources".into(),
        }
    }

    /// Runs `apt-get update` when the lists are missing (host) or missing or
    /// older than [`SUITE_LISTS_MAX_AGE`] (private suite), or when `force`.
    fn ensure_lists(&self, spec: &str, force: bool) -> Result<()> {
        match &self.private {
            None => {
                if !force && lists_present(Path::new("/var/lib/apt/lists")) {
                    return Ok(());
                }
                phase(spec, "apt lists missing: apt-get update");
                run(self.apt_get().args(["update", "-q"]))
                    .context("apt-get update (needed once to know which kernels Debian offers)")?;
            }
            Some((suite, dir)) => {
                let stamp = dir.join("state/lists/.updated");
                let age = fs::metadata(&stamp)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok());
                let fresh = matches!(age, Some(a) if a < SUITE_LISTS_MAX_AGE);
                if !force && fresh && lists_present(&dir.join("state/lists")) {
                    return Ok(());
                }
                phase(
                    spec,
                    &format!(
                        "apt-get update of Debian {suite} (private lists in {})",
                        dir.display()
                    ),
                );
                let t = Instant::now();
                run(self.apt_get().args(["update", "-q"]))
                    .with_context(|| format!("apt-get update of the private {suite} lists"))?;
                fs::write(&stamp, "")?;
                phase(spec, &format!("lists updated in {:.1}s", secs(t.elapsed())));
            }
        }
        Ok(())
    }
}

fn lists_present(dir: &Path) -> bool {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
        .unwrap_or(false)
}

/// `(candidate version, origin line)` per package, from one `apt-cache policy` call.
fn apt_policy(apt: &Apt, pkgs: &[String]) -> Result<HashMap<String, (String, String)>> {
    let out = run(apt.apt_cache().arg("policy").args(pkgs))?;
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

/// Plain `linux-image-*-amd64` packages whose names match `pattern` (regex).
fn search_images(apt: &Apt, pattern: &str) -> Result<Vec<String>> {
    let out = run(apt.apt_cache().args(["search", "--names-only", pattern]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| plain_image(n))
        .map(str::to_string)
        .collect())
}

/// `kernel` is the spec without its suite: a series, a release, a package
/// or (private suites) `newest`. Returns `(package, version, origin)`.
fn resolve_package(apt: &Apt, spec: &str, kernel: &str) -> Result<(String, String, String)> {
    let candidates: Vec<String> = if kernel.starts_with("linux-image-") {
        vec![kernel.to_string()]
    } else if kernel.ends_with("-amd64") {
        vec![format!("linux-image-{kernel}")]
    } else if kernel == "newest" && apt.private.is_some() {
        search_images(apt, "^linux-image-[0-9]")?
    } else {
        if !kernel
            .split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        {
            bail!(
                "kernel spec {spec:?}: expected a series like 6.1, a release like 6.1.0-56-amd64, a package \
                 name, or <suite>:<one of those or newest> such as trixie-backports:7.3"
            );
        }
        let pattern = format!("^linux-image-{}\\.", kernel.replace('.', "\\."));
        search_images(apt, &pattern)?
            .into_iter()
            .filter(|n| matches_series(n, kernel))
            .collect()
    };
    let policy = if candidates.is_empty() {
        HashMap::new()
    } else {
        apt_policy(apt, &candidates)?
    };
    let mut best: Option<(&String, &String, &String)> = None;
    for (p, (v, o)) in candidates
        .iter()
        .filter_map(|p| policy.get(p).map(|vo| (p, vo)))
    {
        let newer = match best {
            None => true,
            Some((bp, bv, _)) => {
                deb_version_cmp(&apt.tools.dpkg, v, bv)?.then_with(|| p.cmp(bp))
                    == Ordering::Greater
            }
        };
        if newer {
            best = Some((p, v, o));
        }
    }
    match best {
        Some((p, v, o)) => Ok((p.clone(), v.clone(), o.clone())),
        None if apt.private.is_some() => {
            let offered: std::collections::BTreeSet<String> =
                search_images(apt, "^linux-image-[0-9]")?
                    .iter()
                    .filter_map(|n| image_series(n))
                    .collect();
            bail!(
                "no Debian package for kernel {spec:?} in {} (looked for linux-image-{kernel}.*-amd64, \
                 not -dbg/-rt/-cloud/-unsigned); it offers the series: {} (the archive keeps only the \
                 newest kernels of a suite: name one of these, or <suite>:newest)",
                apt.describe(),
                offered.into_iter().collect::<Vec<_>>().join(", ")
            )
        }
        None => bail!(
            "no Debian package for kernel {spec:?} (looked for linux-image-{kernel}.*-amd64, not -dbg/-rt/-cloud/-unsigned) \
             in the configured apt sources. On Debian 12 the 6.1 kernels come from bookworm / bookworm-security and \
             the 6.12 kernels from bookworm-security (source linux-signed-6.12-amd64) or bookworm-backports: add the \
             missing Debian suite to /etc/apt/sources.list.d/debian.sources and run `apt-get update`, or name \
             a suite of the Debian archive in the spec (e.g. trixie-backports:7.3), which uses a private apt \
             configuration instead"
        ),
    }
}

/// Resolves, downloads (unless cached) and unpacks a kernel package.
/// A suite-qualified spec (`trixie-backports:7.3`) is looked up in that
/// suite's private apt configuration (module doc).
pub(super) fn ensure_kernel(tools: &Tools, cache: &Path, spec: &str) -> Result<KernelPkg> {
    let (suite, kernel) = split_spec(spec)?;
    let apt = Apt::new(tools, cache, suite)?;
    apt.ensure_lists(spec, false)?;
    let announce = |package: &str, version: &str, origin: &str| {
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
        )
    };
    let (mut package, mut version, origin) = resolve_package(&apt, spec, kernel)?;
    announce(&package, &version, &origin);
    // A private suite's lists may name a version the mirror has dropped
    // since: refresh them once and look again.
    if apt.private.is_some() && !kernel_cached(cache, &package, &version) {
        let deb = cache.join("debs").join(deb_file_name(&package, &version));
        if !deb.exists()
            && let Err(e) = download(&apt, spec, cache, &package, &version)
        {
            phase(
                spec,
                &format!("download failed ({e:#}): refreshing the lists"),
            );
            apt.ensure_lists(spec, true)?;
            let origin;
            (package, version, origin) = resolve_package(&apt, spec, kernel)?;
            announce(&package, &version, &origin);
        }
    }
    let debs = cache.join("debs");
    let deb = debs.join(deb_file_name(&package, &version));
    let root = cache.join("kernels").join(format!("{package}_{version}"));
    let stamp = root.join(".unpacked");

    if !stamp.exists() {
        if !deb.exists() {
            download(&apt, spec, cache, &package, &version)?;
        } else {
            phase(spec, &format!("using cached {}", deb.display()));
        }
        // Newer Debian kernels (7.x) split the image package: it only
        // depends on linux-binary-<abi> (vmlinuz), linux-modules-<abi> and
        // linux-base-<abi> (config, System.map) of the same version.
        let mut debs_to_unpack = vec![deb.clone()];
        for (part, part_version) in split_parts(tools, &deb, &package)? {
            let part_deb = debs.join(deb_file_name(&part, &part_version));
            if !part_deb.exists() {
                download(&apt, spec, cache, &part, &part_version)?;
            }
            debs_to_unpack.push(part_deb);
        }
        phase(spec, "unpacking (dpkg-deb -x) and running depmod");
        let mut tmp = root.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp)?;
        for d in &debs_to_unpack {
            run(Command::new(&tools.dpkg_deb).arg("-x").arg(d).arg(&tmp))?;
        }
        // Merged /usr (7.x): modules in usr/lib/modules; depmod -b and the
        // rest of this module look in lib/modules.
        if !tmp.join("lib/modules").exists() && tmp.join("usr/lib/modules").is_dir() {
            fs::create_dir_all(tmp.join("lib"))?;
            fs::rename(tmp.join("usr/lib/modules"), tmp.join("lib/modules"))
                .context("moving usr/lib/modules to lib/modules")?;
        }
        let release = single_release(&tmp)?;
        // kernel-install layout (7.x): vmlinuz, config and System.map in
        // the module directory instead of /boot.
        let moddir = tmp.join("lib/modules").join(&release);
        for (inside, boot) in [
            ("vmlinuz", "vmlinuz"),
            ("config", "config"),
            ("System.map", "System.map"),
        ] {
            let dest = tmp.join("boot").join(format!("{boot}-{release}"));
            if !dest.exists() && moddir.join(inside).is_file() {
                fs::create_dir_all(tmp.join("boot"))?;
                fs::copy(moddir.join(inside), &dest)
                    .with_context(|| format!("copying {inside} to {}", dest.display()))?;
            }
        }
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

/// The packages a split kernel image package consists of: its
/// dependencies named `linux-<part>-<abi>` (the image package being
/// `linux-image-<abi>`), each at the version the dependency pins (`= v`).
/// Empty for a classic image package that carries vmlinuz and modules.
fn split_parts(tools: &Tools, deb: &Path, package: &str) -> Result<Vec<(String, String)>> {
    let out = run(Command::new(&tools.dpkg_deb)
        .arg("-f")
        .arg(deb)
        .arg("Depends"))?;
    Ok(parse_split_parts(
        &String::from_utf8_lossy(&out.stdout),
        package,
    ))
}

fn kernel_cached(cache: &Path, package: &str, version: &str) -> bool {
    cache
        .join("kernels")
        .join(format!("{package}_{version}"))
        .join(".unpacked")
        .exists()
}

/// `apt-get download` into `<cache>/debs/`.
fn download(apt: &Apt, spec: &str, cache: &Path, package: &str, version: &str) -> Result<()> {
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    let deb_name = deb_file_name(package, version);
    phase(spec, &format!("apt-get download {package}={version}"));
    let t = Instant::now();
    run(apt
        .apt_get()
        .current_dir(&debs)
        .args(["download", "-q"])
        .arg(format!("{package}={version}")))
    .with_context(|| format!("downloading {package} {version} from {}", apt.describe()))?;
    if !debs.join(&deb_name).exists() {
        bail!(
            "apt-get download did not produce {}",
            debs.join(&deb_name).display()
        );
    }
    phase(
        spec,
        &format!("downloaded {deb_name} in {:.1}s", secs(t.elapsed())),
    );
    Ok(())
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

/// Debian version order, as `dpkg --compare-versions` decides it.
pub(super) fn deb_version_cmp(dpkg: &Path, a: &str, b: &str) -> Result<Ordering> {
    let holds = |op: &str| -> Result<bool> {
        let st = Command::new(dpkg)
            .args(["--compare-versions", a, op, b])
            .status()
            .with_context(|| format!("running {} --compare-versions", dpkg.display()))?;
        match st.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => bail!("dpkg --compare-versions {a:?} {op} {b:?} failed ({st})"),
        }
    };
    Ok(if holds("lt")? {
        Ordering::Less
    } else if holds("eq")? {
        Ordering::Equal
    } else {
        Ordering::Greater
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The comparison as the host's dpkg makes it.
    fn deb_version_cmp(a: &str, b: &str) -> Ordering {
        super::deb_version_cmp(Path::new("dpkg"), a, b).unwrap()
    }

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
    fn suite_specs() {
        assert_eq!(split_spec("6.1").unwrap(), (None, "6.1"));
        assert_eq!(
            split_spec("trixie-backports:7.3").unwrap(),
            (Some("trixie-backports"), "7.3")
        );
        assert_eq!(split_spec("sid:newest").unwrap(), (Some("sid"), "newest"));
        for bad in ["Sid:6.1", ":6.1", "sid:", "sid:6.1:x", "s id:6.1", "-x:6.1"] {
            assert!(split_spec(bad).is_err(), "{bad}");
        }
        // A release name brings its updates and security suites; others come alone.
        let bullseye = suite_sources("bullseye");
        assert_eq!(bullseye.lines().count(), 3, "{bullseye}");
        assert!(bullseye.contains("debian-security bullseye-security main"));
        assert!(bullseye.contains(DEBIAN_KEYRING));
        assert_eq!(
            suite_sources("trixie-backports"),
            format!("deb [signed-by={DEBIAN_KEYRING}] {DEBIAN_MIRROR} trixie-backports main\n")
        );
    }
}
