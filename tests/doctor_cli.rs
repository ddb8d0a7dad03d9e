//! `zbridge doctor --standalone`, the real binary on this machine: it passes here (root, on a
//! private bpffs), and each simulated failure (a pin dir off bpffs, another PID namespace, a
//! missing capability) fails with the words that say what to do.

mod doctor_support;

use std::path::Path;

use doctor_support::{check_lines, doctor, pin_dir};

#[test]
fn standalone_passes_on_this_host() {
    if !testkit::require_root("doctor_cli_standalone_passes_on_this_host") {
        return;
    }
    let bpffs = testkit::BpfFs::new("doctor-cli").unwrap();
    let (code, out) = doctor(&[], &["--standalone", "--pin-dir", &pin_dir(&bpffs)]);
    assert_eq!(code, 0, "{out}");
    let mut checks = 0;
    for line in out.lines() {
        if line.starts_with("PASS  ") || line.starts_with("WARN  ") {
            checks += 1;
        } else {
            assert!(
                line.starts_with("      ") && line.contains("fix: ")
                    || line == "doctor: this host has what zbridge needs",
                "not PASS/WARN: {line:?} in:\n{out}"
            );
        }
    }
    // kernel, btf, cgroup2, bpffs, capabilities, proc connector, bpf programs.
    assert_eq!(checks, 7, "{out}");
    assert!(
        out.ends_with("doctor: this host has what zbridge needs\n"),
        "{out}"
    );
    assert!(
        check_lines(&out, "proc connector").starts_with("PASS"),
        "{out}"
    );
    assert!(
        check_lines(&out, "bpf programs").contains("connect4"),
        "{out}"
    );
    // The check loads, never pins.
    assert!(!Path::new(&pin_dir(&bpffs)).exists());
}

#[test]
fn pin_dir_off_bpffs_fails() {
    if !testkit::require_root("doctor_cli_pin_dir_off_bpffs_fails") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pins = dir.path().join("zbridge");
    let (code, out) = doctor(&[], &["--standalone", "--pin-dir", &pins.to_string_lossy()]);
    assert_ne!(code, 0, "{out}");
    let bpffs = check_lines(&out, "bpffs");
    assert!(bpffs.starts_with("FAIL"), "{out}");
    assert!(bpffs.contains("not on a bpffs"), "{out}");
    assert!(
        bpffs.contains("mount -t bpf -o mode=0700 bpf /sys/fs/bpf"),
        "{out}"
    );
    assert!(out.ends_with("some required checks failed; zbridge will not work until they pass\n"));
}

#[test]
fn outside_the_host_pid_namespace_the_proc_connector_fails() {
    if !testkit::require_root("doctor_cli_outside_the_host_pid_namespace") {
        return;
    }
    let bpffs = testkit::BpfFs::new("doctor-cli").unwrap();
    // A new PID namespace (the kernel ignores its subscribe: no ACK), nothing else changed.
    let (code, out) = doctor(
        &["unshare", "--pid", "--fork"],
        &["--standalone", "--pin-dir", &pin_dir(&bpffs)],
    );
    assert_ne!(code, 0, "{out}");
    let proc = check_lines(&out, "proc connector");
    assert!(proc.starts_with("FAIL"), "{out}");
    assert!(
        proc.contains("no acknowledgement of the subscribe"),
        "{out}"
    );
    assert!(proc.contains("hostPID: true"), "{out}");
    // Only that check failed.
    assert_eq!(out.matches("FAIL  ").count(), 1, "{out}");
}

#[test]
fn without_net_admin_the_capability_is_named() {
    if !testkit::require_root("doctor_cli_without_net_admin") {
        return;
    }
    let bpffs = testkit::BpfFs::new("doctor-cli").unwrap();
    // Root without CAP_NET_ADMIN (dropped from the bounding set before the exec).
    let (code, out) = doctor(
        &[
            "setpriv",
            "--bounding-set",
            "-net_admin",
            "--inh-caps",
            "-net_admin",
        ],
        &["--standalone", "--pin-dir", &pin_dir(&bpffs)],
    );
    assert_ne!(code, 0, "{out}");
    let caps = check_lines(&out, "capabilities");
    assert!(caps.starts_with("FAIL"), "{out}");
    assert!(caps.contains("missing CAP_NET_ADMIN"), "{out}");
    // Kernels from 6.6 let the subscribe through without the capability, but not the large
    // receive buffer (a warning); older ones refuse the subscribe (a failure). Either way the
    // fix names the capability.
    let proc = check_lines(&out, "proc connector");
    assert!(
        proc.starts_with("WARN") || proc.starts_with("FAIL"),
        "{out}"
    );
    assert!(proc.contains("add NET_ADMIN"), "{out}");
}

#[test]
fn without_bpf_and_sys_admin_the_programs_do_not_load() {
    if !testkit::require_root("doctor_cli_without_bpf_and_sys_admin") {
        return;
    }
    let bpffs = testkit::BpfFs::new("doctor-cli").unwrap();
    let (code, out) = doctor(
        &[
            "setpriv",
            "--bounding-set",
            "-bpf,-sys_admin",
            "--inh-caps",
            "-bpf,-sys_admin",
        ],
        &["--standalone", "--pin-dir", &pin_dir(&bpffs)],
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        check_lines(&out, "capabilities").contains("missing CAP_BPF, CAP_SYS_ADMIN"),
        "{out}"
    );
    let programs = check_lines(&out, "bpf programs");
    assert!(programs.starts_with("FAIL"), "{out}");
    assert!(programs.contains("Operation not permitted"), "{out}");
    assert!(
        programs.contains("add BPF, NET_ADMIN and SYS_ADMIN"),
        "{out}"
    );
}
