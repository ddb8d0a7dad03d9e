//! Builds the BPF object from `bpf/` with clang, so that `cargo build` alone produces it; the
//! crate embeds it (`include_bytes!` from OUT_DIR) and deployment needs no compiler.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let bpf_dir = manifest.join("../bpf");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("zbridge.bpf.o");
    for file in ["zbridge.bpf.c", "helpers.h", "zbridge.h"] {
        println!("cargo:rerun-if-changed={}", bpf_dir.join(file).display());
    }
    println!("cargo:rerun-if-env-changed=CLANG");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_string());

    // The BPF build includes the target's <asm/types.h> through <linux/bpf.h>: on Debian it
    // lives in the multiarch directory (x86_64-linux-gnu, aarch64-linux-gnu, ...).
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").expect("set by cargo");
    let multiarch = PathBuf::from(format!("/usr/include/{arch}-linux-gnu"));
    let target_arch = match arch.as_str() {
        "x86_64" => "x86",
        "aarch64" => "arm64",
        other => other,
    };

    let mut cmd = Command::new(&clang);
    cmd.args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-D__TARGET_ARCH_{target_arch}"))
        .arg("-I")
        .arg(&bpf_dir);
    if multiarch.is_dir() {
        cmd.arg("-I").arg(&multiarch);
    }
    cmd.arg("-c")
        .arg(bpf_dir.join("zbridge.bpf.c"))
        .arg("-o")
        .arg(&out);
    let output = match cmd.output() {
        Ok(output) => output,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
            "zbridge-programmer: `{clang}` not found: the BPF programs in bpf/ are built with \
             clang. Install the Debian packages `clang llvm libbpf-dev` (or set CLANG to a \
             clang that can target bpf)."
        ),
        Err(err) => panic!("zbridge-programmer: running `{clang}`: {err}"),
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let hint = if stderr.contains("bpf/bpf_helpers.h") || stderr.contains("linux/bpf.h") {
            "\nThe libbpf headers are missing: install the Debian package `libbpf-dev` \
             (and `linux-libc-dev`)."
        } else if stderr.contains("asm/types.h") {
            "\nThe kernel's <asm/types.h> is missing: install `linux-libc-dev` (and, off \
             Debian, add its multiarch include directory)."
        } else {
            ""
        };
        panic!(
            "zbridge-programmer: clang failed to build bpf/zbridge.bpf.c ({}):\n{stderr}{hint}",
            output.status
        );
    }
}
