//! Kernel function (kfunc) calls in the eBPF object. aya does not resolve
//! kfuncs, so the programs emit each call with a marker in place of the
//! kfunc's BTF id (`tcpstall-ebpf/src/kfunc.rs`) and [`patch_calls`] writes
//! the running kernel's id into every such instruction before the object is
//! parsed. aya's relocation only rewrites calls with `src_reg == 1`, so the
//! patched instructions reach the verifier as they are.

use thiserror::Error;

/// `BPF_JMP | BPF_CALL`.
const CALL: u8 = 0x85;
/// `src_reg = BPF_PSEUDO_KFUNC_CALL` (2), `dst_reg = 0`.
const KFUNC_REGS: u8 = 0x20;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KfuncError {
    #[error(
        "the eBPF object holds no kfunc call with marker {marker:#x}: it was built from other \
         sources than this agent; rebuild both (`cargo xtask build`)"
    )]
    NoMarker { marker: u32 },
}

/// The instruction as compiled: `call` with `src_reg = 2`, `off = 0`,
/// `imm = marker` (little endian, as on bpfel).
fn instruction(imm: u32) -> [u8; 8] {
    let i = imm.to_le_bytes();
    [CALL, KFUNC_REGS, 0, 0, i[0], i[1], i[2], i[3]]
}

/// Replace the `imm` of every kfunc call instruction carrying `marker` in
/// `object` (an ELF file; code sections are 8-byte aligned in it, as every
/// instruction is) with `btf_id`. Returns how many were patched; an object
/// without any is an error (the programs and the agent disagree).
pub fn patch_calls(object: &mut [u8], marker: u32, btf_id: u32) -> Result<usize, KfuncError> {
    let from = instruction(marker);
    let to = instruction(btf_id);
    let mut n = 0;
    for insn in object.chunks_exact_mut(8) {
        if *insn == from {
            insn.copy_from_slice(&to);
            n += 1;
        }
    }
    if n == 0 {
        return Err(KfuncError::NoMarker { marker });
    }
    Ok(n)
}

/// A copy of an object, 8-byte aligned (the ELF parser needs aligned
/// headers), to patch before loading.
pub struct AlignedObject {
    words: Vec<u64>,
    len: usize,
}

impl AlignedObject {
    pub fn new(bytes: &[u8]) -> Self {
        let mut o = AlignedObject {
            words: vec![0; bytes.len().div_ceil(8)],
            len: bytes.len(),
        };
        o.bytes_mut().copy_from_slice(bytes);
        o
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialised bytes; u8 has no
        // alignment or validity requirements.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, borrowed mutably from `self`.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mutation: matching `src_reg == 1` (0x10) instead of 2 patches
    /// nothing and this test fails with `NoMarker`.
    #[test]
    fn patches_every_marked_call_and_nothing_else() {
        let marker = 0x7CA5_7CA5;
        let mut obj = Vec::new();
        obj.extend_from_slice(b"\x7fELF\x02\x01\x01\x00"); // not an instruction
        obj.extend_from_slice(&instruction(marker));
        // The same imm in a helper call (src_reg 0) and a BPF-to-BPF call
        // (src_reg 1) stays.
        obj.extend_from_slice(&[0x85, 0x00, 0, 0, 0xa5, 0x7c, 0xa5, 0x7c]);
        obj.extend_from_slice(&[0x85, 0x10, 0, 0, 0xa5, 0x7c, 0xa5, 0x7c]);
        obj.extend_from_slice(&instruction(marker));
        let before = obj.clone();
        assert_eq!(patch_calls(&mut obj, marker, 4242), Ok(2));
        assert_eq!(obj[8..16], instruction(4242));
        assert_eq!(obj[32..40], instruction(4242));
        assert_eq!(obj[..8], before[..8]);
        assert_eq!(obj[16..32], before[16..32]);
    }

    /// Unaligned bytes that happen to look like the instruction are not
    /// code: left alone; no aligned marker is an error, not a panic.
    #[test]
    fn no_marker_is_an_error() {
        let marker = 0x7CA5_7CA5;
        let mut obj = vec![0u8; 3];
        obj.extend_from_slice(&instruction(marker));
        obj.extend_from_slice(&[0; 5]);
        let before = obj.clone();
        assert_eq!(
            patch_calls(&mut obj, marker, 1),
            Err(KfuncError::NoMarker { marker })
        );
        assert_eq!(obj, before);
    }

    #[test]
    fn aligned_copy_keeps_the_bytes() {
        let src: Vec<u8> = (0..21).collect();
        let o = AlignedObject::new(&src[1..]);
        assert_eq!(o.bytes(), &src[1..]);
        assert_eq!(o.bytes().as_ptr() as usize % 8, 0);
    }
}
