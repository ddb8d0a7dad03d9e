//! Builds the BPF objects from `bpf/` with clang, so that `cargo build` alone produces them; the
//! crate embeds them (`include_bytes!` from OUT_DIR) and deployment needs no compiler.
//!
//! It also builds a variant of zbridge.bpf.c whose `orig_dst_by_tuple` is the kernel's LRU
//! hash (`-DZBRIDGE_TUPLE_LRU`, bpf/tuple_lru.h; `object::TUPLE_LRU_OBJECT`), for the datapath
//! bench's comparison with the set-associative table; built always, so that its tests (the
//! verifier, its maps) run wherever the others do. The agent never references it, so its
//! binary does not carry it.

include!("../bpf/build_bpf.rs");

fn main() {
    let headers = [
        "helpers.h",
        "kernel.h",
        "zbridge.h",
        "inpod.h",
        "inpod_capture.h",
        "steps.h",
        "tuple_table.h",
        "tuple_lru.h",
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
    build_bpf_variant(
        "zbridge-programmer",
        "zbridge.bpf.c",
        "zbridge-tuple-lru.bpf.o",
        &headers,
        &["ZBRIDGE_TUPLE_LRU"],
    );
}
