//! Builds `zbt-net`, the std-only helper process the privileged tests and benchmarks place in
//! cgroups and network namespaces (see `helper/zbt_net.rs`), with the same rustc as the crate.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "helper/zbt_net.rs";
    println!("cargo:rerun-if-changed={source}");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("zbt-net");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = Command::new(&rustc)
        .args(["--edition", "2021", "-C", "opt-level=2", "-o"])
        .arg(&out)
        .arg(source)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {rustc} to build {source}: {e}"));
    assert!(status.success(), "{rustc} failed to build {source}");
}
