//! The guard's maps: the rules by cgroup id the agent writes, the records
//! of what the kernel program did it reads (and deletes).

use aya::maps::{HashMap, MapData};
use tcpstall_common::guard::{GuardRecord, GuardRule, RULES_MAP, SOCKETS_MAP};

use super::{LoadError, Loaded, chain};
use crate::kernel::btf::Btf;

/// The guard's two maps, taken from the loaded object.
pub struct GuardMaps {
    rules: HashMap<MapData, u64, GuardRule>,
    sockets: HashMap<MapData, u64, GuardRecord>,
}

impl GuardMaps {
    /// Sets the rule of cgroup `id`.
    pub fn set(&mut self, id: u64, rule: GuardRule) -> Result<(), String> {
        self.rules.insert(id, rule, 0).map_err(|e| chain(&e))
    }

    /// Removes the rule of cgroup `id` (absent: fine).
    pub fn remove(&mut self, id: u64) {
        let _ = self.rules.remove(&id);
    }

    /// Every record the kernel wrote since the last call (deleted from the
    /// map as read).
    pub fn drain(&mut self) -> Vec<GuardRecord> {
        let keys: Vec<u64> = self.sockets.keys().filter_map(Result::ok).collect();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Ok(r) = self.sockets.get(&k, 0) {
                out.push(r);
            }
            let _ = self.sockets.remove(&k);
        }
        out
    }
}

/// The guard's plain program reads the socket at offset 0 of the kernel's
/// sock_ops context (`struct bpf_sock_ops_kern`): checked against BTF.
pub(super) fn check_sock_ops_kern(btf: &Btf) -> Result<(), String> {
    let m = btf
        .member("bpf_sock_ops_kern", "sk")
        .map_err(|e| format!("kernel BTF: struct bpf_sock_ops_kern.sk: {e}"))?;
    if m.offset_bits != 0 {
        return Err(format!(
            "struct bpf_sock_ops_kern.sk is at byte {} on this kernel, the guard's plain program expects 0",
            m.offset_bits / 8
        ));
    }
    Ok(())
}

impl Loaded {
    /// The guard's maps when one of its programs is attached (`Ok(None)`:
    /// the guard is off; can be taken once).
    pub fn take_guard(&mut self) -> Result<Option<GuardMaps>, LoadError> {
        let attached = self
            .plan
            .probes
            .iter()
            .any(|p| p.probe == crate::kernel::probes::GUARD && p.chosen.is_some());
        if !attached {
            return Ok(None);
        }
        let mut take = |name: &str| {
            self.ebpf
                .take_map(name)
                .ok_or_else(|| LoadError::Map(format!("map {name} missing or already taken")))
        };
        let rules = take(RULES_MAP)?;
        let sockets = take(SOCKETS_MAP)?;
        Ok(Some(GuardMaps {
            rules: HashMap::try_from(rules).map_err(|e| LoadError::Map(chain(&e)))?,
            sockets: HashMap::try_from(sockets).map_err(|e| LoadError::Map(chain(&e)))?,
        }))
    }
}
