// The clang build of a BPF object from `bpf/`, shared by the build scripts of the crates that
// embed one (programmer/build.rs: zbridge.bpf.c; watcher/build.rs: exec_tap.bpf.c). Each
// `include!`s this file, so the compiler flags and the hints for a missing clang or libbpf are
// written once. Not a module of any crate: only `std` is used.

/// Compiles `bpf/<source_file>` with clang into `$OUT_DIR/<out_file>` and tells cargo when to
/// rebuild: on a change of the source, of each of `extra_rerun_files` (headers it includes, in
/// `bpf/`) or of the `CLANG` variable. Panics with a hint naming the missing package when clang
/// or the libbpf/kernel headers are missing: a build script can only fail by panicking.
/// `crate_name` starts each message, so the failing crate is plain.
fn build_bpf_object(
    crate_name: &str,
    source_file: &str,
    out_file: &str,
    extra_rerun_files: &[&str],
) -> std::path::PathBuf {
    use std::path::PathBuf;
    use std::process::Command;

    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let bpf_dir = manifest.join("../bpf");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join(out_file);
    for file in std::iter::once(&source_file).chain(extra_rerun_files) {
        println!("cargo:rerun-if-changed={}", bpf_dir.join(file).display());
    }
    // This file itself: a change of flags rebuilds every object.
    println!(
        "cargo:rerun-if-changed={}",
        bpf_dir.join("build_bpf.rs").display()
    );
    println!("cargo:rerun-if-env-changed=CLANG");
    // ZBRIDGE_BPF_STEPS=1 builds the step markers in (bpf/steps.h; scripts/bpf-steps.sh).
    println!("cargo:rerun-if-env-changed=ZBRIDGE_BPF_STEPS");
    let steps = std::env::var("ZBRIDGE_BPF_STEPS").is_ok_and(|v| v == "1");
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
    // -mcpu=v3: 32-bit compare-and-swap and jmp32 (kernel 5.12+; zbridge needs 6.x anyway).
    cmd.args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf", "-mcpu=v3"])
        .arg(format!("-D__TARGET_ARCH_{target_arch}"))
        .arg("-I")
        .arg(&bpf_dir);
    if multiarch.is_dir() {
        cmd.arg("-I").arg(&multiarch);
    }
    if steps {
        cmd.arg("-DZB_STEPS");
    }
    cmd.arg("-c")
        .arg(bpf_dir.join(source_file))
        .arg("-o")
        .arg(&out);
    let output = match cmd.output() {
        Ok(output) => output,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
            "{crate_name}: `{clang}` not found: the BPF programs in bpf/ are built with \
             clang. Install the Debian packages `clang llvm libbpf-dev` (or set CLANG to a \
             clang that can target bpf)."
        ),
        Err(err) => panic!("{crate_name}: running `{clang}`: {err}"),
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let hint = if stderr.contains("bpf/bpf_helpers.h")
            || stderr.contains("bpf/bpf_core_read.h")
            || stderr.contains("linux/bpf.h")
        {
            "\nThe libbpf headers are missing: install the Debian package `libbpf-dev` \
             (and `linux-libc-dev`)."
        } else if stderr.contains("asm/types.h") {
            "\nThe kernel's <asm/types.h> is missing: install `linux-libc-dev` (and, off \
             Debian, add its multiarch include directory)."
        } else {
            ""
        };
        panic!(
            "{crate_name}: clang failed to build bpf/{source_file} into {out_file} ({}):\n{stderr}{hint}",
            output.status
        );
    }
    out
}
