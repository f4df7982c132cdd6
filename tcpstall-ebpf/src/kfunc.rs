//! Kernel functions (kfuncs) called by hand: aya has no kfunc support, so
//! the call instruction is emitted raw (`call` with `src_reg =
//! BPF_PSEUDO_KFUNC_CALL`) carrying a marker in place of the kfunc's BTF id,
//! and the agent patches the marker to the running kernel's id before the
//! object is parsed (`tcpstall/src/kfunc.rs`). A kernel without the kfunc
//! refuses the program at load and the agent falls back to its twin.

use tcpstall_common::kfunc::RDONLY_CAST_MARKER;

/// `bpf_rdonly_cast(obj__ign, btf_id__k)` (6.2+): `obj` as a read-only,
/// untrusted pointer to the vmlinux type `btf_id`. The verifier inlines it
/// into a register move; loads through the result are plain loads with an
/// exception-table entry (a bad address reads 0, never faults). `btf_id`
/// must be a constant to the verifier (a load from the frozen layout).
#[inline(always)]
pub fn rdonly_cast(obj: u64, btf_id: u32) -> *const u8 {
    let out: u64;
    // SAFETY: one `call` instruction (code 0x85, src_reg 2, imm = the
    // marker): r1/r2 in, r0 out, r1-r5 clobbered as by any call; it touches
    // no memory the compiler knows of.
    unsafe {
        core::arch::asm!(
            ".byte 0x85, 0x20, 0x00, 0x00",
            ".4byte {marker}",
            marker = const RDONLY_CAST_MARKER,
            inlateout("r1") obj => _,
            inlateout("r2") u64::from(btf_id) => _,
            lateout("r0") out,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
            options(nostack, nomem, pure),
        );
    }
    out as *const u8
}
