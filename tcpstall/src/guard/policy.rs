//! The guard's policy file: parsing (TOML, one clear error naming the
//! line) and matching a cgroup (its path and, for a pod's, namespace and
//! pod name) to the first rule that covers it.

use std::time::Duration;

use serde::Deserialize;
use tcpstall_common::guard::{GuardRule, rule_flag};

/// `mode` of the policy or of one rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Mode {
    #[serde(rename = "dry-run")]
    DryRun,
    #[serde(rename = "enforce")]
    Enforce,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::DryRun => "dry-run",
            Mode::Enforce => "enforce",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "dry-run" => Some(Mode::DryRun),
            "enforce" => Some(Mode::Enforce),
            _ => None,
        }
    }
}

/// Keepalive a rule turns on (each value: `None` = the netns default).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Keepalive {
    pub idle_s: Option<u32>,
    pub interval_s: Option<u32>,
    pub count: Option<u32>,
}

/// One rule: what it matches (every matcher given must match) and what it
/// sets.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Rule {
    pub name: String,
    /// Kubernetes namespace pattern (`*` matches any run of characters).
    pub namespace: Option<String>,
    /// Pod name pattern.
    pub pod: Option<String>,
    /// cgroup path (relative to the cgroup2 root, from `/`): this cgroup and
    /// every one below it.
    pub cgroup: Option<String>,
    pub user_timeout_ms: Option<u32>,
    pub keepalive: Option<Keepalive>,
    pub mode: Mode,
    /// 1-based line of the rule's `[[rule]]` header.
    pub line: usize,
}

/// A parsed, valid policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Policy {
    pub rules: Vec<Rule>,
}

/// What a cgroup is, for matching.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub cgroup: &'a str,
    pub namespace: Option<&'a str>,
    pub pod: Option<&'a str>,
}

/// Why a policy file was refused (the line is 1-based).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "guard policy {file}{}: {message}",
    if *line > 0 { format!(", line {line}") } else { String::new() }
)]
pub struct PolicyError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    mode: Option<String>,
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<String>,
    namespace: Option<String>,
    pod: Option<String>,
    cgroup: Option<String>,
    user_timeout: Option<String>,
    keepalive: Option<RawKeepalive>,
    mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeepalive {
    idle: Option<String>,
    interval: Option<String>,
    count: Option<u32>,
}

/// `30s`, `500ms`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(n.checked_mul(3600)?)),
        _ => None,
    }
}

/// Glob with `*` only.
pub fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// `path` is `prefix` or below it.
fn under(prefix: &str, path: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    if p.is_empty() {
        return true;
    }
    path == p || path.strip_prefix(p).is_some_and(|r| r.starts_with('/'))
}

impl Rule {
    pub fn matches(&self, t: &Target<'_>) -> bool {
        let field = |pat: &Option<String>, v: Option<&str>| match pat {
            None => true,
            Some(p) => v.is_some_and(|v| !v.is_empty() && glob(p, v)),
        };
        field(&self.namespace, t.namespace)
            && field(&self.pod, t.pod)
            && self.cgroup.as_deref().is_none_or(|c| under(c, t.cgroup))
    }

    /// The rule as the kernel applies it; `id`: its 1-based position.
    pub fn kernel(&self, id: u32) -> GuardRule {
        let mut flags = 0;
        if self.mode == Mode::Enforce {
            flags |= rule_flag::ENFORCE;
        }
        let ka = self.keepalive.unwrap_or(Keepalive {
            idle_s: None,
            interval_s: None,
            count: None,
        });
        if self.keepalive.is_some() {
            flags |= rule_flag::KEEPALIVE;
        }
        GuardRule {
            user_timeout_ms: self.user_timeout_ms.unwrap_or(0),
            keepidle_s: ka.idle_s.unwrap_or(0),
            keepintvl_s: ka.interval_s.unwrap_or(0),
            keepcnt: ka.count.unwrap_or(0),
            rule: id,
            flags,
        }
    }
}

impl Policy {
    /// The first rule covering `t` (index, rule).
    pub fn first_match(&self, t: &Target<'_>) -> Option<(usize, &Rule)> {
        self.rules.iter().enumerate().find(|(_, r)| r.matches(t))
    }

    /// Parses a policy; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, PolicyError> {
        let err = |line: usize, message: String| PolicyError {
            file: file.to_owned(),
            line,
            message,
        };
        let raw: RawPolicy = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(1, |s| {
                text[..s.start.min(text.len())].matches('\n').count() + 1
            });
            err(line, e.message().trim().to_owned())
        })?;
        // The line of each `[[rule]]` header, in order.
        let headers: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.trim_start().starts_with("[[rule]]"))
            .map(|(i, _)| i + 1)
            .collect();
        let default_mode = match raw.mode.as_deref() {
            None => Mode::DryRun,
            Some(m) => Mode::parse(m).ok_or_else(|| {
                let line = text
                    .lines()
                    .position(|l| l.trim_start().starts_with("mode"))
                    .map_or(1, |i| i + 1);
                err(
                    line,
                    format!("mode = \"{m}\": expected \"dry-run\" or \"enforce\""),
                )
            })?,
        };
        let mut rules = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, r) in raw.rule.into_iter().enumerate() {
            let line = headers.get(i).copied().unwrap_or(1);
            let name = r.name.unwrap_or_else(|| format!("rule-{}", i + 1));
            let e = |m: String| err(line, format!("rule `{name}`: {m}"));
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(e(
                    "name must be non-empty letters, digits, `-`, `_`, `.`".into()
                ));
            }
            if !names.insert(name.clone()) {
                return Err(e("a rule of that name comes earlier".into()));
            }
            if r.namespace.is_none() && r.pod.is_none() && r.cgroup.is_none() {
                return Err(e(
                    "matches nothing: give namespace, pod or cgroup (a rule for every socket on the node is `cgroup = \"/\"`)".into(),
                ));
            }
            if let Some(c) = &r.cgroup
                && !c.starts_with('/')
            {
                return Err(e(format!(
                    "cgroup = \"{c}\": a path from the cgroup2 root, starting with `/`"
                )));
            }
            let user_timeout_ms = match &r.user_timeout {
                None => None,
                Some(s) => {
                    let ms = parse_duration(s)
                        .map(|d| d.as_millis())
                        .filter(|&ms| ms > 0 && ms <= i32::MAX as u128)
                        .ok_or_else(|| {
                            e(format!(
                                "user_timeout = \"{s}\": a duration like \"30s\", \"500ms\", \"2m\", above 0 and at most 24 days"
                            ))
                        })?;
                    Some(ms as u32)
                }
            };
            let secs = |what: &str, v: &Option<String>| -> Result<Option<u32>, PolicyError> {
                match v {
                    None => Ok(None),
                    Some(s) => parse_duration(s)
                        .filter(|d| d.subsec_millis() == 0 && (1..=32_767).contains(&d.as_secs()))
                        .map(|d| Some(d.as_secs() as u32))
                        .ok_or_else(|| {
                            e(format!(
                                "keepalive {what} = \"{s}\": whole seconds from 1s to 32767s"
                            ))
                        }),
                }
            };
            let keepalive = match &r.keepalive {
                None => None,
                Some(k) => {
                    if let Some(c) = k.count
                        && !(1..=127).contains(&c)
                    {
                        return Err(e(format!("keepalive count = {c}: from 1 to 127")));
                    }
                    Some(Keepalive {
                        idle_s: secs("idle", &k.idle)?,
                        interval_s: secs("interval", &k.interval)?,
                        count: k.count,
                    })
                }
            };
            if user_timeout_ms.is_none() && keepalive.is_none() {
                return Err(e("sets nothing: give user_timeout and/or keepalive".into()));
            }
            let mode = match r.mode.as_deref() {
                None => default_mode,
                Some(m) => Mode::parse(m).ok_or_else(|| {
                    e(format!(
                        "mode = \"{m}\": expected \"dry-run\" or \"enforce\""
                    ))
                })?,
            };
            rules.push(Rule {
                name,
                namespace: r.namespace,
                pod: r.pod,
                cgroup: r.cgroup,
                user_timeout_ms,
                keepalive,
                mode,
                line,
            });
        }
        if rules.len() > u16::MAX as usize {
            return Err(err(1, "more than 65535 rules".into()));
        }
        Ok(Policy { rules })
    }
}
