//! The layering of the crate's wings, written down once and checked
//! against the source tree: a unit test reads every file under `src/`, finds
//! each `crate::` path it uses (plain paths and every leaf of a grouped
//! `use crate::{...}` tree; comments are skipped) and fails on a path into a
//! wing the file's own wing may not use.
//!
//! Bottom to top (a wing may use the wings listed for it, and itself):
//!
//! | wing | may use |
//! |---|---|
//! | `kernel` | nothing |
//! | `engine` | `kernel::event` only (the decoded event type) |
//! | `identity` | `engine` (the stall view a flow reference is made from) |
//! | `sweep` | `kernel`, `engine`, `identity` (the holders and pods of swept sockets) |
//! | `serve` | `kernel`, `engine`, `sweep`, `identity` |
//! | `cli` | `kernel`, `engine`, `identity` |
//! | `app` | every wing |
//!
//! `main.rs` (the binary, through the `tcpstall::` library paths) is above
//! everything and not checked; `lib.rs` only declares the wings.
//!
//! Mutation run: `use crate::serve::metrics::Format;` added to
//! `engine/tick.rs` makes [`wings_only_use_the_wings_below`] fail with
//! "engine/tick.rs uses crate::serve::metrics (engine may use:
//! kernel::event)"; the same for `use crate::app::run;` in `kernel/facts.rs`.

use std::path::{Path, PathBuf};

/// Which `crate::` paths each wing may use: a wing name allows the whole
/// wing, `wing::module` only that module. A wing always may use itself.
const ALLOWED: &[(&str, &[&str])] = &[
    ("kernel", &[]),
    ("engine", &["kernel::event"]),
    ("identity", &["engine"]),
    ("sweep", &["kernel", "engine", "identity"]),
    ("serve", &["kernel", "engine", "sweep", "identity"]),
    ("cli", &["kernel", "engine", "identity"]),
    (
        "app",
        &["kernel", "engine", "sweep", "identity", "serve", "cli"],
    ),
];

/// Files not in a wing (or not library code) that are not checked.
const UNCHECKED: &[&str] = &["lib.rs", "main.rs", "layering.rs"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source without `//` comments (line and doc comments; a `//` inside
/// a string literal cuts the rest of that line, which only hides paths).
fn strip_comments(src: &str) -> String {
    src.lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Expands a use tree (`a::b::{c, d::{e, f}}`) into its paths (segments
/// joined by `::`), each truncated to two segments.
fn expand(tree: &str, prefix: &[String], out: &mut Vec<String>) {
    let tree = tree.trim();
    if tree.is_empty() {
        return;
    }
    if let Some(open) = tree.find('{') {
        let head: Vec<String> = tree[..open]
            .split("::")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let close = tree.rfind('}').expect("balanced use tree");
        let mut p = prefix.to_vec();
        p.extend(head);
        let inner = &tree[open + 1..close];
        let (mut depth, mut start) = (0usize, 0usize);
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&inner[start..i], &p, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand(&inner[start..], &p, out);
    } else {
        let mut p = prefix.to_vec();
        let first = tree.split_whitespace().next().unwrap_or("");
        p.extend(
            first
                .split("::")
                .filter(|s| !s.is_empty() && *s != "self")
                .map(str::to_owned),
        );
        p.truncate(2);
        if !p.is_empty() {
            out.push(p.join("::"));
        }
    }
}

/// Every `crate::` path in `src` (comments stripped), two segments each.
fn crate_paths(src: &str) -> Vec<String> {
    let code = strip_comments(src);
    let mut out = Vec::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        let after = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            rest = after;
            continue;
        }
        if after.starts_with('{') {
            let mut depth = 0usize;
            let end = after
                .char_indices()
                .find_map(|(j, c)| {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                return Some(j + 1);
                            }
                        }
                        _ => {}
                    }
                    None
                })
                .expect("balanced use tree");
            expand(&after[..end], &[], &mut out);
            rest = &after[end..];
        } else {
            let end = after
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(after.len());
            let path = after[..end].trim_end_matches(':');
            let two: Vec<&str> = path.split("::").take(2).collect();
            out.push(two.join("::"));
            rest = &after[end..];
        }
    }
    out
}

fn allows(wing: &str, path: &str) -> bool {
    let target = path.split("::").next().unwrap_or("");
    if target == wing {
        return true;
    }
    let rules = ALLOWED
        .iter()
        .find(|(w, _)| *w == wing)
        .unwrap_or_else(|| panic!("wing {wing} is not in the layering table"))
        .1;
    rules
        .iter()
        .any(|r| *r == target || path == *r || path.starts_with(&format!("{r}::")))
}

/// Every wing-crossing `crate::` path, as "file uses crate::path (...)".
fn violations(src_dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src_dir, &mut files);
    let mut bad = Vec::new();
    for f in files {
        let rel = f.strip_prefix(src_dir).expect("under src");
        let rel_s = rel.to_string_lossy().replace('\\', "/");
        if UNCHECKED.contains(&rel_s.as_str()) {
            continue;
        }
        let wing = rel_s
            .split('/')
            .next()
            .expect("a path")
            .trim_end_matches(".rs")
            .to_owned();
        let src = std::fs::read_to_string(&f).expect("readable source");
        for path in crate_paths(&src) {
            if !allows(&wing, &path) {
                let rules = ALLOWED.iter().find(|(w, _)| *w == wing).expect("known").1;
                bad.push(format!(
                    "{rel_s} uses crate::{path} ({wing} may use: {})",
                    if rules.is_empty() {
                        "nothing".to_owned()
                    } else {
                        rules.join(", ")
                    }
                ));
            }
        }
    }
    bad
}

/// Mutation: see the module header (a forbidden `use` in `engine/tick.rs`
/// or `kernel/facts.rs` fails this test with the offending file and path).
#[test]
fn wings_only_use_the_wings_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let bad = violations(&src);
    assert!(
        bad.is_empty(),
        "upward imports across wings:\n{}",
        bad.join("\n")
    );
}

/// Every top-level module of the crate is a wing of the table (or
/// unchecked): a new top-level file must be placed in the layering.
#[test]
fn every_top_level_module_is_placed() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for e in std::fs::read_dir(&src).expect("src") {
        let p = e.expect("entry").path();
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        if UNCHECKED.contains(&name.as_str()) {
            continue;
        }
        let wing = name.trim_end_matches(".rs");
        assert!(
            ALLOWED.iter().any(|(w, _)| *w == wing),
            "{name} is not placed in the layering table"
        );
    }
}

#[test]
fn the_parser_sees_grouped_and_plain_paths() {
    let src = "use crate::{\n    engine::{Engine, StallView},\n    kernel::{event::SockEvent, facts},\n    serve,\n};\n// crate::cli::config in a comment\nfn f() { crate::sweep::risks::audit(); let x = tcpstall_crate::nope; }\nuse crate::identity::netns::PodIdentity as P;\n";
    assert_eq!(
        crate_paths(src),
        [
            "engine::Engine",
            "engine::StallView",
            "kernel::event",
            "kernel::facts",
            "serve",
            "sweep::risks",
            "identity::netns",
        ]
    );
    assert!(allows("engine", "kernel::event"));
    assert!(!allows("engine", "kernel::facts"));
    assert!(!allows("kernel", "engine::Engine"));
    assert!(allows("serve", "sweep::risks"));
    assert!(!allows("sweep", "serve::metrics"));
}

/// The README's layout table (section "Layout") against the tree: every
/// wing has a row (`tcpstall/src/<wing>/`, or `<wing>.rs` for a wing that
/// is a file with a folder of submodules), and that row names each of the
/// wing's modules (`name` for `name.rs`, `name/` or `name` for a folder;
/// `mod.rs` excepted). A module added, renamed or moved without the README
/// fails here, naming the row and the module.
/// Mutation: `sweep/cycle.rs` renamed in the README's sweep row (`cycle` ->
/// `cycles`) fails with "README row tcpstall/src/sweep/ does not name
/// cycle".
#[test]
fn readme_layout_names_every_module() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("../README.md")).expect("README.md");
    let layout = readme
        .split("\n## Layout\n")
        .nth(1)
        .expect("README has a \"## Layout\" section")
        .split("\n## ")
        .next()
        .unwrap_or_default();
    let src = root.join("src");
    let mut missing = Vec::new();
    for (wing, _) in ALLOWED {
        let dir = src.join(wing);
        if !dir.is_dir() {
            continue;
        }
        let key = format!("| `tcpstall/src/{wing}/` |");
        let file_key = format!("| `tcpstall/src/{wing}.rs` |");
        let Some(row) = layout
            .lines()
            .find(|l| l.starts_with(&key) || l.starts_with(&file_key))
        else {
            missing.push(format!("README has no row {key}"));
            continue;
        };
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .expect("wing folder")
            .map(|e| e.expect("entry").path())
            .filter_map(|p| {
                let name = p.file_name()?.to_string_lossy().into_owned();
                if p.is_dir() {
                    Some(name)
                } else {
                    name.strip_suffix(".rs")
                        .filter(|n| *n != "mod")
                        .map(str::to_owned)
                }
            })
            .collect();
        names.sort();
        for n in names {
            if !row.contains(&format!("`{n}`")) && !row.contains(&format!("`{n}/`")) {
                missing.push(format!("README row tcpstall/src/{wing}/ does not name {n}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "README's layout section does not match the tree:\n{}",
        missing.join("\n")
    );
}
