//! Builds the BPF object from `bpf/` with clang, so that `cargo build` alone produces it; the
//! crate embeds it (`include_bytes!` from OUT_DIR) and deployment needs no compiler.

include!("../bpf/build_bpf.rs");

fn main() {
    build_bpf_object(
        "zbridge-programmer",
        "zbridge.bpf.c",
        "zbridge.bpf.o",
        &["helpers.h", "kernel.h", "zbridge.h"],
    );
}
