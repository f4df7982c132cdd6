//! Kernel function (kfunc) calls in the eBPF object. aya does not resolve
//! kfuncs, so the programs emit each call with a marker in place of the
//! kfunc's BTF id (`tcpstall-ebpf/src/kfunc.rs`) and [`patch_calls`] writes
//! the running kernel's id into every such instruction before the object is
//! parsed. Only the executable program sections (found through the ELF
//! section table) are searched, instruction by instruction, so marker-shaped
//! bytes in data (maps, strings, BTF) are never touched. aya's relocation
//! only rewrites calls with `src_reg == 1`, so the patched instructions
//! reach the verifier as they are.

use std::ops::Range;

use thiserror::Error;

/// `BPF_JMP | BPF_CALL`.
const CALL: u8 = 0x85;
/// `src_reg = BPF_PSEUDO_KFUNC_CALL` (2), `dst_reg = 0`.
const KFUNC_REGS: u8 = 0x20;
/// Size of one eBPF instruction (the second half of a 16-byte `ld_imm64`
/// has opcode 0, so it never looks like a call).
const INSN: usize = 8;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KfuncError {
    #[error(
        "the eBPF object holds no kfunc call with marker {marker:#x}: it was built from other \
         sources than this agent; rebuild both (`cargo xtask build`)"
    )]
    NoMarker { marker: u32 },
    #[error(
        "the eBPF object is not a usable little-endian ELF64 file ({0}); rebuild it \
         (`cargo xtask build`)"
    )]
    BadElf(String),
}

/// The instruction as compiled: `call` with `src_reg = 2`, `off = 0`,
/// `imm = marker` (little endian, as on bpfel).
fn instruction(imm: u32) -> [u8; 8] {
    let i = imm.to_le_bytes();
    [CALL, KFUNC_REGS, 0, 0, i[0], i[1], i[2], i[3]]
}

/// Replace the `imm` of every kfunc call instruction carrying `marker` in
/// the executable program sections of `object` (an ELF file) with
/// `btf_id`; instructions sit at 8-byte offsets from their section's start.
/// Returns how many were patched; an object without any is an error (the
/// programs and the agent disagree), as is one whose section table cannot
/// be read. On error `object` is unchanged.
pub fn patch_calls(object: &mut [u8], marker: u32, btf_id: u32) -> Result<usize, KfuncError> {
    let from = instruction(marker);
    let to = instruction(btf_id);
    let mut n = 0;
    for code in elf::code_sections(object)? {
        for insn in object[code].chunks_exact_mut(INSN) {
            if *insn == from {
                insn.copy_from_slice(&to);
                n += 1;
            }
        }
    }
    if n == 0 {
        return Err(KfuncError::NoMarker { marker });
    }
    Ok(n)
}

/// Just enough of the ELF64 format to find the program sections.
mod elf {
    use super::{KfuncError, Range};

    const MAGIC: &[u8; 4] = b"\x7fELF";
    const ELFCLASS64: u8 = 2;
    const ELFDATA2LSB: u8 = 1;
    const SHDR_SIZE: u16 = 64;
    const SHT_PROGBITS: u32 = 1;
    const SHF_EXECINSTR: u64 = 0x4;

    fn bad(what: String) -> KfuncError {
        KfuncError::BadElf(what)
    }

    /// Little-endian fields at fixed offsets; `None` past the end.
    struct Le<'a>(&'a [u8]);

    impl Le<'_> {
        fn array<const N: usize>(&self, at: usize) -> Option<[u8; N]> {
            self.0.get(at..at.checked_add(N)?)?.try_into().ok()
        }
        fn u16(&self, at: usize) -> Option<u16> {
            self.array(at).map(u16::from_le_bytes)
        }
        fn u32(&self, at: usize) -> Option<u32> {
            self.array(at).map(u32::from_le_bytes)
        }
        fn u64(&self, at: usize) -> Option<u64> {
            self.array(at).map(u64::from_le_bytes)
        }
    }

    /// The fields of an `Elf64_Shdr` used here.
    struct SectionHeader {
        kind: u32,
        flags: u64,
        offset: u64,
        size: u64,
    }

    /// The section header table of an ELF64 little-endian file.
    struct Sections<'a> {
        file: Le<'a>,
        table: u64,
        count: u64,
    }

    impl<'a> Sections<'a> {
        fn parse(bytes: &'a [u8]) -> Result<Self, KfuncError> {
            let file = Le(bytes);
            let ident: [u8; 6] = file.array(0).ok_or_else(|| {
                bad(format!(
                    "{} bytes, too short for an ELF header",
                    bytes.len()
                ))
            })?;
            if ident[..4] != MAGIC[..] {
                return Err(bad("no ELF magic at the start".into()));
            }
            if ident[4] != ELFCLASS64 || ident[5] != ELFDATA2LSB {
                return Err(bad(format!(
                    "class {} data {}, not ELF64 little endian",
                    ident[4], ident[5]
                )));
            }
            let truncated = || bad(format!("ELF header truncated at {} bytes", bytes.len()));
            let table = file.u64(0x28).ok_or_else(truncated)?;
            let entry = file.u16(0x3a).ok_or_else(truncated)?;
            let count = file.u16(0x3c).ok_or_else(truncated)?;
            if table == 0 {
                return Err(bad("no section header table".into()));
            }
            if entry != SHDR_SIZE {
                return Err(bad(format!(
                    "section header size {entry}, expected {SHDR_SIZE}"
                )));
            }
            let mut sections = Sections {
                file,
                table,
                count: u64::from(count),
            };
            // Extended numbering: the real count is section 0's sh_size.
            if count == 0 {
                sections.count = sections.header(0)?.size;
            }
            Ok(sections)
        }

        fn header(&self, index: u64) -> Result<SectionHeader, KfuncError> {
            let f = &self.file;
            let read = || {
                let at = usize::try_from(
                    index
                        .checked_mul(u64::from(SHDR_SIZE))?
                        .checked_add(self.table)?,
                )
                .ok()?;
                let h = Le(f.0.get(at..at.checked_add(usize::from(SHDR_SIZE))?)?);
                Some(SectionHeader {
                    kind: h.u32(4)?,
                    flags: h.u64(8)?,
                    offset: h.u64(24)?,
                    size: h.u64(32)?,
                })
            };
            read().ok_or_else(|| {
                bad(format!(
                    "section header {index} at {:#x} runs past the end of the {}-byte file",
                    self.table
                        .saturating_add(index.saturating_mul(u64::from(SHDR_SIZE))),
                    f.0.len()
                ))
            })
        }
    }

    /// File ranges of the executable program sections (`SHT_PROGBITS` with
    /// `SHF_EXECINSTR`), each checked to lie inside the file.
    pub(super) fn code_sections(bytes: &[u8]) -> Result<Vec<Range<usize>>, KfuncError> {
        let sections = Sections::parse(bytes)?;
        let mut code = Vec::new();
        for index in 0..sections.count {
            let h = sections.header(index)?;
            if h.kind != SHT_PROGBITS || h.flags & SHF_EXECINSTR == 0 {
                continue;
            }
            let range = h
                .offset
                .checked_add(h.size)
                .filter(|&end| end <= bytes.len() as u64)
                .map(|end| h.offset as usize..end as usize)
                .ok_or_else(|| {
                    bad(format!(
                        "program section {index} ({:#x} bytes at {:#x}) runs past the end of the \
                         {}-byte file",
                        h.size,
                        h.offset,
                        bytes.len()
                    ))
                })?;
            code.push(range);
        }
        Ok(code)
    }
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

    const MARKER: u32 = 0x7CA5_7CA5;
    /// `instruction(MARKER)` spelled out, so a change to the patcher's
    /// constants cannot change what the tests feed it.
    const MARKED: [u8; 8] = [0x85, 0x20, 0, 0, 0xa5, 0x7c, 0xa5, 0x7c];
    const PATCHED_4242: [u8; 8] = [0x85, 0x20, 0, 0, 0x92, 0x10, 0, 0];
    const PROG: (u32, u64) = (1, 0x6); // SHT_PROGBITS, SHF_ALLOC | SHF_EXECINSTR
    const DATA: (u32, u64) = (1, 0x3); // SHT_PROGBITS, SHF_WRITE | SHF_ALLOC

    /// A relocatable ELF64 little-endian file: header, each section's bytes
    /// at an 8-byte aligned offset, then the section header table (a null
    /// section first). Returns it with each section's file offset.
    fn elf(sections: &[((u32, u64), &[u8])]) -> (Vec<u8>, Vec<usize>) {
        let mut out = vec![0u8; 64];
        out[..6].copy_from_slice(b"\x7fELF\x02\x01");
        out[6] = 1; // EV_CURRENT
        out[16..18].copy_from_slice(&1u16.to_le_bytes()); // ET_REL
        out[18..20].copy_from_slice(&247u16.to_le_bytes()); // EM_BPF
        out[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        let mut offsets = Vec::new();
        for (_, data) in sections {
            offsets.push(out.len());
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(8), 0);
        }
        let table = out.len() as u64;
        out.extend_from_slice(&[0; 64]); // SHN_UNDEF
        for (((kind, flags), data), offset) in sections.iter().zip(&offsets) {
            let mut h = [0u8; 64];
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&flags.to_le_bytes());
            h[24..32].copy_from_slice(&(*offset as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(data.len() as u64).to_le_bytes());
            h[48..56].copy_from_slice(&8u64.to_le_bytes()); // sh_addralign
            out.extend_from_slice(&h);
        }
        out[0x28..0x30].copy_from_slice(&table.to_le_bytes());
        out[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        out[0x3c..0x3e].copy_from_slice(&(sections.len() as u16 + 1).to_le_bytes());
        (out, offsets)
    }

    /// Marked calls in every program section are patched; the same imm in
    /// a helper call (src_reg 0) and a BPF-to-BPF call (src_reg 1) stays.
    /// Mutation: `KFUNC_REGS = 0x10` (matching src_reg 1) patches the
    /// BPF-to-BPF call instead and this fails with `left: Ok(1)`,
    /// `right: Ok(3)`.
    #[test]
    fn patches_every_marked_call_and_nothing_else() {
        let helper = [0x85, 0x00, 0, 0, 0xa5, 0x7c, 0xa5, 0x7c];
        let bpf2bpf = [0x85, 0x10, 0, 0, 0xa5, 0x7c, 0xa5, 0x7c];
        let mov = [0xb7, 0x00, 0, 0, 0, 0, 0, 0]; // r0 = 0
        let text: Vec<u8> = [mov, MARKED, helper, bpf2bpf, MARKED].concat();
        let other: Vec<u8> = [MARKED, mov].concat();
        let (mut obj, at) = elf(&[(PROG, &text), (PROG, &other)]);
        let before = obj.clone();
        assert_eq!(patch_calls(&mut obj, MARKER, 4242), Ok(3));
        let mut expect = before.clone();
        expect[at[0] + 8..at[0] + 16].copy_from_slice(&PATCHED_4242);
        expect[at[0] + 32..at[0] + 40].copy_from_slice(&PATCHED_4242);
        expect[at[1]..at[1] + 8].copy_from_slice(&PATCHED_4242);
        assert_eq!(obj, expect);
    }

    /// Marker-shaped bytes outside the program sections (a data section,
    /// the ELF and section headers) are not code: left alone. Mutation:
    /// dropping the `SHF_EXECINSTR` check patches the data section's two
    /// and this fails with `left: Ok(3)`, `right: Ok(1)`.
    #[test]
    fn data_that_looks_like_a_call_is_not_patched() {
        let data: Vec<u8> = [MARKED, MARKED].concat();
        let (mut obj, at) = elf(&[(DATA, &data), (PROG, &MARKED)]);
        let before = obj.clone();
        assert_eq!(patch_calls(&mut obj, MARKER, 4242), Ok(1));
        let mut expect = before;
        expect[at[1]..at[1] + 8].copy_from_slice(&PATCHED_4242);
        assert_eq!(obj, expect);
    }

    /// Bytes that look like the instruction at an offset that is not a
    /// multiple of 8 from their section's start are not an instruction; no
    /// marked call is an error, not a panic.
    #[test]
    fn no_marker_is_an_error() {
        let text: Vec<u8> = [&[0u8; 3][..], &MARKED, &[0; 5]].concat();
        let (mut obj, _) = elf(&[(PROG, &text)]);
        let before = obj.clone();
        assert_eq!(
            patch_calls(&mut obj, MARKER, 1),
            Err(KfuncError::NoMarker { marker: MARKER })
        );
        assert_eq!(obj, before);
    }

    /// Truncated, garbage or inconsistent files give `BadElf` naming the
    /// problem, never a panic, and stay unchanged. Mutation: dropping the
    /// `end <= bytes.len()` filter in `code_sections` panics on the section
    /// past the end ("range end index 208 out of range for slice of length
    /// 200").
    #[test]
    fn malformed_elf_is_an_error() {
        let (good, _) = elf(&[(PROG, &MARKED)]);
        let table = good.len() - 2 * 64;
        let mut oversized = good.clone();
        oversized[table + 64 + 32..table + 64 + 40].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut past_end = good.clone();
        past_end[table + 64 + 24..table + 64 + 32]
            .copy_from_slice(&(good.len() as u64).to_le_bytes());
        let mut big_endian = good.clone();
        big_endian[5] = 2;
        let mut no_table = good.clone();
        no_table[0x28..0x30].fill(0);
        let mut odd_entry = good.clone();
        odd_entry[0x3a] = 40;
        let mut extended_garbage = good.clone(); // e_shnum 0: count in section 0
        extended_garbage[0x3c..0x3e].fill(0);
        extended_garbage[table + 32..table + 40].copy_from_slice(&u64::MAX.to_le_bytes());
        let cases: [(&str, Vec<u8>, &str); 11] = [
            ("empty", Vec::new(), "0 bytes, too short"),
            (
                "garbage",
                b"hello, world, not an object".to_vec(),
                "no ELF magic",
            ),
            (
                "ident only",
                good[..6].to_vec(),
                "ELF header truncated at 6 bytes",
            ),
            ("header cut", good[..0x30].to_vec(), "ELF header truncated"),
            (
                "table cut",
                good[..table + 70].to_vec(),
                "section header 1 at",
            ),
            ("oversized section", oversized, "program section 1"),
            ("section past the end", past_end, "runs past the end"),
            ("big endian", big_endian, "not ELF64 little endian"),
            ("no section table", no_table, "no section header table"),
            (
                "header size",
                odd_entry,
                "section header size 40, expected 64",
            ),
            ("extended count", extended_garbage, "section header 2 at"),
        ];
        for (what, mut obj, message) in cases {
            let before = obj.clone();
            let err = patch_calls(&mut obj, MARKER, 1).expect_err(what);
            let KfuncError::BadElf(problem) = &err else {
                panic!("{what}: {err}");
            };
            assert!(problem.contains(message), "{what}: {err}");
            assert!(!err.to_string().contains('\n'), "{what}: {err}");
            assert_eq!(obj, before, "{what}");
        }
    }

    #[test]
    fn aligned_copy_keeps_the_bytes() {
        let src: Vec<u8> = (0..21).collect();
        let o = AlignedObject::new(&src[1..]);
        assert_eq!(o.bytes(), &src[1..]);
        assert_eq!(o.bytes().as_ptr() as usize % 8, 0);
    }
}
