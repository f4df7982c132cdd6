//! Debian kernel packages: which package a kernel spec means (apt index),
//! download and unpack.

use anyhow::{Context, Result, bail};
use std::cmp::Ordering;
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::host::{Tools, run};
use super::{phase, secs};

pub(super) struct KernelPkg {
    pub package: String,
    pub version: String,
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `<root>/lib/modules/<release>`
    pub moddir: PathBuf,
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
    let mut best: Option<(&String, &String, &String)> = None;
    for (p, (v, o)) in candidates
        .iter()
        .filter_map(|p| policy.get(p).map(|vo| (p, vo)))
    {
        let newer = match best {
            None => true,
            Some((bp, bv, _)) => {
                deb_version_cmp(&tools.dpkg, v, bv)?.then_with(|| p.cmp(bp)) == Ordering::Greater
            }
        };
        if newer {
            best = Some((p, v, o));
        }
    }
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
pub(super) fn ensure_kernel(tools: &Tools, cache: &Path, spec: &str) -> Result<KernelPkg> {
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
}
