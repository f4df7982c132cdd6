//! Kernel modules for the initramfs: `modules.dep` / `modules.softdep` /
//! `modules.alias` resolved to a load order, decompressed module files.

use anyhow::{Context, Result, anyhow, bail};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::Path;
use std::process::Command;

use super::host::{Tools, run};

/// One module to insmod, in load order.
pub(super) struct ModLoad {
    pub name: String,
    /// Relative to the module directory, possibly compressed.
    pub path: String,
    /// A softdep target: a failed insmod is only a note.
    pub optional: bool,
}

pub(super) struct ModDb {
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
    pub(super) fn load(moddir: &Path) -> Result<ModDb> {
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
    pub(super) fn resolve(&self, wanted: &[String]) -> Result<(Vec<ModLoad>, Vec<String>)> {
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

pub(super) fn read_module(tools: &Tools, path: &Path) -> Result<Vec<u8>> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
