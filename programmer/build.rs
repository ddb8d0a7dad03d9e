//! Builds the BPF objects from `bpf/` with clang, so that `cargo build` alone produces them; the
//! crate embeds them (`include_bytes!` from OUT_DIR) and deployment needs no compiler.

include!("../bpf/build_bpf.rs");

fn main() {
    let headers = [
        "helpers.h",
        "kernel.h",
        "zbridge.h",
        "inpod.h",
        "inpod_capture.h",
        "steps.h",
        "tuple_map.h",
    ];
    build_bpf_object(
        "zbridge-programmer",
        "zbridge.bpf.c",
        "zbridge.bpf.o",
        &headers,
    );
    build_bpf_object(
        "zbridge-programmer",
        "inpod_inbound.bpf.c",
        "inpod_inbound.bpf.o",
        &["zbridge.h", "inpod.h"],
    );
}
