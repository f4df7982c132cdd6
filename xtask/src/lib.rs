//! xtask's library part: the QEMU kernel matrix (`vm`), shared by the
//! `xtask` command and the `vm-smoke` developer tool.

pub mod vm;
