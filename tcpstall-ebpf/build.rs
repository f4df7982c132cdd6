//! Rebuild the programs when bpf-linker changes (it is an undeclared build
//! dependency: cargo cannot express "needs this binary").
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
