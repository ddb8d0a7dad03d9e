//! Builds `zbt-net`, the std-only helper process the privileged tests and benchmarks place in
//! cgroups and network namespaces (see `helper/zbt_net/main.rs`), with the same rustc as the
//! crate.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "helper/zbt_net/main.rs";
    // The directory: every module of the helper.
    println!("cargo:rerun-if-changed=helper/zbt_net");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("zbt-net");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let mut command = Command::new(&rustc);
    command.args(["--edition", "2021", "-C", "opt-level=2"]);
    // Under CI a warning in the helper fails the build, as clippy's do for the crates (it is
    // compiled here, out of clippy's sight); elsewhere a newer rustc's new warning does not.
    println!("cargo:rerun-if-env-changed=CI");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        command.args(["-D", "warnings"]);
    }
    let status = command
        .arg("-o")
        .arg(&out)
        .arg(source)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {rustc} to build {source}: {e}"));
    assert!(status.success(), "{rustc} failed to build {source}");
}
