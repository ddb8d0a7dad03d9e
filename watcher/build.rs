//! Builds the exec tap's BPF object (`bpf/exec_tap.bpf.c`) with clang, so that `cargo build`
//! alone produces it; the crate embeds it (`include_bytes!` from OUT_DIR) and deployment needs
//! no compiler.

include!("../bpf/build_bpf.rs");

fn main() {
    build_bpf_object(
        "zbridge-watcher",
        "exec_tap.bpf.c",
        "exec_tap.bpf.o",
        &["kernel.h"],
    );
}
