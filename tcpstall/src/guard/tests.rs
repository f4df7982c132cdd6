use tcpstall_common::guard::{GuardRecord, action, rule_flag};

use super::*;

const GOOD: &str = r#"
mode = "dry-run"

[[rule]]
name = "shop-web"
namespace = "shop"
pod = "web-*"
user_timeout = "10s"

[[rule]]
name = "shop"
namespace = "shop"
keepalive = { idle = "30s", interval = "5s", count = 3 }
mode = "enforce"

[[rule]]
name = "batch"
cgroup = "/system.slice/batch.service"
user_timeout = "1m"
"#;

fn pol() -> Policy {
    Policy::parse(GOOD, "p.toml").expect("valid")
}

fn t<'a>(cgroup: &'a str, ns: Option<&'a str>, pod: Option<&'a str>) -> Target<'a> {
    Target {
        cgroup,
        namespace: ns,
        pod,
    }
}

#[test]
fn parses_rules_with_their_lines_and_modes() {
    let p = pol();
    assert_eq!(p.rules.len(), 3);
    assert_eq!(p.rules[0].line, 4);
    assert_eq!(p.rules[0].user_timeout_ms, Some(10_000));
    assert_eq!(p.rules[0].mode, Mode::DryRun);
    assert_eq!(p.rules[1].mode, Mode::Enforce);
    assert_eq!(
        p.rules[1].keepalive,
        Some(policy::Keepalive {
            idle_s: Some(30),
            interval_s: Some(5),
            count: Some(3)
        })
    );
    assert_eq!(p.rules[2].user_timeout_ms, Some(60_000));
    let k = p.rules[1].kernel(2);
    assert_eq!(
        (
            k.keepidle_s,
            k.keepintvl_s,
            k.keepcnt,
            k.rule,
            k.user_timeout_ms
        ),
        (30, 5, 3, 2, 0)
    );
    assert_eq!(k.flags, rule_flag::ENFORCE | rule_flag::KEEPALIVE);
    assert_eq!(p.rules[0].kernel(1).flags, 0);
}

/// First match wins; every matcher given must match; a cgroup rule covers
/// the cgroup and everything below it, not a sibling sharing a prefix.
/// Mutation: `.find(..)` -> `.filter(..).last()` in `first_match` fails the
/// first assertion (the keepalive rule wins).
#[test]
fn first_match_wins() {
    let p = pol();
    let name = |t: &Target<'_>| p.first_match(t).map(|(_, r)| r.name.as_str());
    assert_eq!(
        name(&t("/k", Some("shop"), Some("web-1"))),
        Some("shop-web")
    );
    assert_eq!(name(&t("/k", Some("shop"), Some("db-0"))), Some("shop"));
    assert_eq!(name(&t("/k", Some("other"), Some("web-1"))), None);
    assert_eq!(name(&t("/k", None, None)), None);
    assert_eq!(
        name(&t("/system.slice/batch.service", None, None)),
        Some("batch")
    );
    assert_eq!(
        name(&t("/system.slice/batch.service/sub", None, None)),
        Some("batch")
    );
    assert_eq!(name(&t("/system.slice/batch.service2", None, None)), None);
}

#[test]
fn globs() {
    assert!(policy::glob("web-*", "web-7d9f"));
    assert!(!policy::glob("web-*", "api-7d9f"));
    assert!(policy::glob("*", "x"));
    assert!(policy::glob("a*b*c", "aXXbYYc"));
    assert!(!policy::glob("a*b*c", "aXXcYYb"));
    assert!(policy::glob("shop", "shop"));
    assert!(!policy::glob("shop", "shops"));
}

/// Each kind of bad input: one error naming the file and the line.
#[test]
fn invalid_policies_name_the_line() {
    let cases = [
        (
            "mode = \"enforce\"\n[[rule]]\nnamespace = \"a\"\nuser_timeout = \"10x\"\n",
            2,
            "user_timeout",
        ),
        (
            "[[rule]]\nnamespace = \"a\"\nusr_timeout = \"10s\"\n",
            3,
            "unknown field",
        ),
        ("[[rule]]\nnamespace = \"a\"\n", 1, "sets nothing"),
        ("\n[[rule]]\nuser_timeout = \"10s\"\n", 2, "matches nothing"),
        ("mode = \"on\"\n", 1, "expected \"dry-run\" or \"enforce\""),
        (
            "[[rule]]\nnamespace = \"a\"\nkeepalive = { count = 500 }\n",
            1,
            "count = 500",
        ),
        (
            "[[rule]]\nnamespace = \"a\"\nkeepalive = { idle = \"1500ms\" }\n",
            1,
            "whole seconds",
        ),
        (
            "[[rule]]\ncgroup = \"system.slice\"\nuser_timeout = \"1s\"\n",
            1,
            "starting with `/`",
        ),
        (
            "[[rule]]\nname = \"x\"\nnamespace = \"a\"\nuser_timeout = \"1s\"\n[[rule]]\nname = \"x\"\nnamespace = \"b\"\nuser_timeout = \"1s\"\n",
            5,
            "comes earlier",
        ),
        ("[[rule]\n", 1, ""),
    ];
    for (text, line, needle) in cases {
        let e = Policy::parse(text, "p.toml").expect_err(text);
        assert_eq!(e.line, line, "{text}: {e}");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("guard policy p.toml, line {line}: ")),
            "{msg}"
        );
        assert!(msg.contains(needle), "{text}: {msg}");
        assert_eq!(msg.lines().count(), 1, "{msg}");
    }
}

fn scratch(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("tcpstall-guard-{}-{name}.toml", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// A reload that fails keeps the last good policy (and says why).
/// Mutation: `self.policy = p` moved before the match (assigning a default
/// on error) fails the rule count assertion.
#[test]
fn failed_reload_keeps_the_last_good_policy() {
    let path = scratch("reload");
    std::fs::write(&path, GOOD).unwrap();
    let mut g = Guard::load(&path).unwrap();
    std::fs::write(&path, "[[rule]]\nnamespace = 1\n").unwrap();
    let e = g.reload().expect_err("invalid");
    assert_eq!(e.line, 2);
    assert_eq!(g.policy.rules.len(), 3);
    assert!(g.last_error.as_deref().unwrap().contains("line 2"));
    std::fs::write(
        &path,
        "[[rule]]\nnamespace = \"x\"\nuser_timeout = \"5s\"\n",
    )
    .unwrap();
    g.reload().unwrap();
    assert_eq!(g.policy.rules.len(), 1);
    assert_eq!(g.last_error, None);
    let _ = std::fs::remove_file(&path);
}

fn guard() -> Guard {
    let path = scratch("sync");
    std::fs::write(&path, GOOD).unwrap();
    let g = Guard::load(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    g
}

/// The kernel map gets a rule per covered cgroup, once; a cgroup that goes
/// (or stops matching) is removed.
#[test]
fn sync_sends_only_changes() {
    let mut g = guard();
    let seen = |v: &[(
        u64,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
    )]| {
        v.iter()
            .map(|&(id, path, namespace, pod)| Seen {
                id,
                path,
                namespace,
                pod,
            })
            .collect::<Vec<_>>()
    };
    let a = [
        (1, "/", None, None),
        (2, "/kubepods/x", Some("shop"), Some("web-1")),
        (3, "/kubepods/y", Some("shop"), Some("db-0")),
        (4, "/kubepods/z", Some("dev"), Some("web-1")),
    ];
    let u = g.sync(seen(&a));
    assert_eq!(u.iter().map(|x| x.0).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(u[0].1.unwrap().rule, 1);
    assert_eq!(u[1].1.unwrap().rule, 2);
    assert!(g.sync(seen(&a)).is_empty());
    assert_eq!(g.cgroup(2).unwrap().rule, "shop-web");
    let u = g.sync(seen(&a[..2]));
    assert_eq!(u, vec![(3, None)]);
}

fn record(cookie: u64, cgroup_id: u64, rule: u32, actions: u32) -> GuardRecord {
    GuardRecord {
        cookie,
        cgroup_id,
        ts_ns: cookie,
        rule,
        actions,
        user_timeout_ms: 10_000,
        family: 2,
        saddr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        daddr: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        sport: 40000,
        dport: 5432,
        ..GuardRecord::zeroed()
    }
}

/// Counted per action; logged once per (pod, rule); the socket is found by
/// cookie; a socket whose application kept its own value is counted as kept.
#[test]
fn ingest_counts_logs_once_and_keeps_sockets() {
    let mut g = guard();
    g.sync([Seen {
        id: 2,
        path: "/kubepods/x",
        namespace: Some("shop"),
        pod: Some("web-1"),
    }]);
    let (c, l) = g.ingest(&[
        record(1, 2, 1, action::USER_TIMEOUT),
        record(2, 2, 1, action::USER_TIMEOUT),
        record(3, 2, 1, action::KEPT_USER_TIMEOUT | action::PASSIVE),
    ]);
    assert_eq!(
        c,
        vec![
            ("shop".into(), "shop-web".into(), "user_timeout", "dry-run"),
            ("shop".into(), "shop-web".into(), "user_timeout", "dry-run"),
            (
                "shop".into(),
                "shop-web".into(),
                "kept_user_timeout",
                "dry-run"
            ),
        ]
    );
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].who, "shop/web-1");
    let s = g.socket(2).unwrap();
    assert_eq!(s.local.to_string(), "10.0.0.1:40000");
    assert_eq!(s.remote.to_string(), "10.0.0.2:5432");
    assert_eq!(s.actions, vec!["user_timeout"]);
    assert_eq!(s.side, "active");
    let s = g.socket(3).unwrap();
    assert!(!s.changes());
    assert_eq!((s.side, s.kept.clone()), ("passive", vec!["user_timeout"]));
    let (c, l) = g.ingest(&[record(4, 2, 1, action::USER_TIMEOUT | action::ENFORCED)]);
    assert_eq!(c[0].3, "enforce");
    assert!(l.is_empty(), "logged once per (pod, rule)");
}

/// The kept records are bounded; lookups by cookie stay right as the oldest
/// are dropped.
#[test]
fn kept_sockets_are_bounded() {
    let mut g = guard();
    let n = MAX_SOCKETS_KEPT as u64 + 10;
    let recs: Vec<_> = (1..=n)
        .map(|c| record(c, 9, 1, action::USER_TIMEOUT))
        .collect();
    g.ingest(&recs);
    assert_eq!(g.sockets().count(), MAX_SOCKETS_KEPT);
    assert!(g.socket(1).is_none());
    assert_eq!(g.socket(n).unwrap().cookie, n);
    assert_eq!(g.socket(11).unwrap().cookie, 11);
}
