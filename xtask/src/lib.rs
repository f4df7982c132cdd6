//! xtask's library part: the QEMU kernel matrix (`vm`), shared by the
//! `xtask` command and the `vm-smoke` developer tool, and the kernel
//! program bench (`kernel_bench`), run by `cargo xtask bench --kernel` on
//! the host and by the `kernel-bench` binary inside the guests.

pub mod kernel_bench;
pub mod vm;
