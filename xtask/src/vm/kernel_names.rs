//! Names of Debian kernel packages: which `linux-image-*` names are the
//! generic flavour of a series, the parts a split image package depends on,
//! and the file name `apt-get download` writes. Pure string work, for
//! [`super::apt`].

/// `linux-image-<version>-amd64` of the generic flavour (no -dbg, -rt,
/// -cloud, -unsigned, no meta package such as `linux-image-amd64` or an
/// experimental `linux-image-7.3-amd64`).
pub(super) fn plain_image(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("linux-image-") else {
        return false;
    };
    let mut parts = rest.splitn(3, |c: char| !c.is_ascii_digit());
    let (Some(major), Some(minor)) = (parts.next(), parts.next()) else {
        return false;
    };
    if major.is_empty() || minor.is_empty() || !rest[major.len()..].starts_with('.') {
        return false;
    }
    // <major>.<minor>.<digit>...
    let after = &rest[major.len() + 1 + minor.len()..];
    if !after.starts_with('.') || !after[1..].starts_with(|c: char| c.is_ascii_digit()) {
        return false;
    }
    name.ends_with("-amd64")
        && !["-dbg", "-rt-", "-cloud-", "-unsigned"]
            .iter()
            .any(|x| name.contains(x))
}

/// `7.3` from `linux-image-7.3.4+deb13-amd64`.
pub(super) fn image_series(name: &str) -> Option<String> {
    let rest = name.strip_prefix("linux-image-")?;
    let mut it = rest.split('.');
    let major = it.next()?;
    let minor: String = it
        .next()?
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    Some(format!("{major}.{minor}"))
}

/// Does `name` belong to the kernel series `series` (`6.1` -> `linux-image-6.1.<n>...-amd64`),
/// excluding -dbg, -rt, -cloud, -unsigned and meta packages?
pub(super) fn matches_series(name: &str, series: &str) -> bool {
    let Some(rest) = name.strip_prefix("linux-image-") else {
        return false;
    };
    let Some(rest) = rest.strip_prefix(series) else {
        return false;
    };
    rest.starts_with('.') && plain_image(name)
}

pub(super) fn parse_split_parts(depends: &str, package: &str) -> Vec<(String, String)> {
    let Some(abi) = package.strip_prefix("linux-image-") else {
        return Vec::new();
    };
    let suffix = format!("-{abi}");
    depends
        .split([',', '|'])
        .filter_map(|dep| {
            let dep = dep.trim();
            let (name, rest) = dep.split_once(' ').unwrap_or((dep, ""));
            let version = rest
                .trim()
                .strip_prefix("(=")?
                .trim()
                .strip_suffix(')')?
                .trim();
            (name.starts_with("linux-") && name.ends_with(&suffix) && name != package)
                .then(|| (name.to_string(), version.to_string()))
        })
        .collect()
}

pub(super) fn deb_file_name(package: &str, version: &str) -> String {
    format!("{package}_{}_amd64.deb", version.replace(':', "%3a"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(matches_series("linux-image-7.3.4+deb13-amd64", "7.3"));
        assert!(matches_series("linux-image-5.10.0-46-amd64", "5.10"));
        assert!(!matches_series(
            "linux-image-6.1.0-0.deb11.51-amd64",
            "6.12"
        ));
        assert!(matches_series("linux-image-6.1.0-0.deb11.51-amd64", "6.1"));
    }

    #[test]
    fn plain_images_and_their_series() {
        for n in [
            "linux-image-7.3.4+deb13-amd64",
            "linux-image-5.10.0-46-amd64",
            "linux-image-6.12.117+deb12-amd64",
        ] {
            assert!(plain_image(n), "{n}");
        }
        for n in [
            "linux-image-amd64",
            "linux-image-7.3-amd64",
            "linux-image-7.3.4+deb13-cloud-amd64",
            "linux-image-7.3.4+deb13-amd64-dbg",
            "linux-image-7.3.4+deb13-amd64-unsigned",
            "linux-image-7.3.4+deb13-rt-amd64",
            "linux-image-7.3.4+deb13-arm64",
            "linux-headers-7.3.4+deb13-amd64",
        ] {
            assert!(!plain_image(n), "{n}");
        }
        assert_eq!(
            image_series("linux-image-7.3.4+deb13-amd64").as_deref(),
            Some("7.3")
        );
        assert_eq!(
            image_series("linux-image-5.10.0-46-amd64").as_deref(),
            Some("5.10")
        );
    }

    #[test]
    fn split_image_packages() {
        let depends = "dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, \
            linux-base-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), linux-binary-7.3.4+deb13-amd64 \
            (= 7.3.4-1~bpo13+1), linux-modules-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1)\n";
        assert_eq!(
            parse_split_parts(depends, "linux-image-7.3.4+deb13-amd64"),
            ["linux-base", "linux-binary", "linux-modules"]
                .map(|p| (
                    format!("{p}-7.3.4+deb13-amd64"),
                    "7.3.4-1~bpo13+1".to_string()
                ))
                .to_vec()
        );
        // A classic image package (vmlinuz and modules inside) has no parts.
        let classic =
            "kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool";
        assert!(parse_split_parts(classic, "linux-image-6.1.0-56-amd64").is_empty());
    }
}
