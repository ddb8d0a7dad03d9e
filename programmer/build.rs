//! Builds the BPF objects from `bpf/` with clang, so that `cargo build` alone produces them; the
//! crate embeds them (`include_bytes!` from OUT_DIR) and deployment needs no compiler.
//!
//! `ZBRIDGE_BPF_TUPLE=lru` also builds a variant of zbridge.bpf.c whose `orig_dst_by_tuple`
//! is the kernel's LRU hash (`-DZBRIDGE_TUPLE_LRU`, bpf/tuple_lru.h), embedded beside the
//! shipped object (which it leaves unchanged) for the datapath bench's comparison, and sets
//! the cfg `zbridge_tuple_lru` (`object::TUPLE_LRU_OBJECT`).

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

    println!("cargo::rustc-check-cfg=cfg(zbridge_tuple_lru)");
    println!("cargo:rerun-if-env-changed=ZBRIDGE_BPF_TUPLE");
    match std::env::var("ZBRIDGE_BPF_TUPLE").as_deref() {
        Err(_) | Ok("") | Ok("table") => {}
        Ok("lru") => {
            build_bpf_variant(
                "zbridge-programmer",
                "zbridge.bpf.c",
                "zbridge-tuple-lru.bpf.o",
                &headers,
                &["ZBRIDGE_TUPLE_LRU"],
            );
            println!("cargo:rustc-cfg=zbridge_tuple_lru");
        }
        Ok(other) => panic!(
            "zbridge-programmer: ZBRIDGE_BPF_TUPLE={other}: `lru` builds the LRU variant \
             beside the shipped object; unset (or `table`) builds the shipped object alone"
        ),
    }
}
