//! `zbridge replay` on hostile input: memory stays bounded whatever the file holds (a gzip
//! bomb, `/dev/zero`), so that under a memory limit it ends with an error naming the line
//! instead of being killed; and an I/O error is printed once.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use watcher::recording::{MAX_HEADER_LINE, MAX_RECORD_LINE};

/// The address space the replay child may use: well above what a replay of the examples needs,
/// far below what reading a whole 1 GiB line would.
const ADDRESS_SPACE_LIMIT: u64 = 256 << 20;

/// Runs `zbridge replay <file>` with its address space limited to [`ADDRESS_SPACE_LIMIT`].
fn replay_limited(file: &str) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_zbridge"));
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["replay", file]);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: ADDRESS_SPACE_LIMIT,
                rlim_max: ADDRESS_SPACE_LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.output().expect("run zbridge")
}

/// Asserts the replay ended with exit code 1 (not a signal) and the line's error.
fn assert_refused(out: &Output, line: usize, limit: usize) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{:?}: {stderr}", out.status);
    assert!(
        stderr.contains(&format!("line {line}: longer than {limit} bytes")),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn a_replay_fits_the_limit() {
    let out = replay_limited("examples/bookinfo.events.jsonl");
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_gzip_bomb_ends_with_the_line_error_under_a_memory_limit() {
    // A 1 MB file: a header, then one line of 1 GiB of `a` (1,024 gzip members of 1 MiB).
    let gzip = |data: &[u8]| {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    };
    let mut bomb = gzip(b"{\"format\":\"zbridge-events\",\"version\":1,\"node\":\"n1\"}\n");
    let member = gzip(&vec![b'a'; 1 << 20]);
    for _ in 0..1024 {
        bomb.extend_from_slice(&member);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.events.jsonl.gz");
    std::fs::write(&path, &bomb).unwrap();
    assert_refused(&replay_limited(path.to_str().unwrap()), 2, MAX_RECORD_LINE);
}

#[test]
fn dev_zero_ends_with_the_line_error_under_a_memory_limit() {
    assert_refused(&replay_limited("/dev/zero"), 1, MAX_HEADER_LINE);
}

#[test]
fn a_directory_is_refused_with_its_error_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = replay_limited(dir.path().to_str().unwrap());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let text = "Is a directory (os error 21)";
    assert_eq!(stderr.matches(text).count(), 1, "{stderr}");
    assert!(stderr.contains("line 1: read failed"), "{stderr}");
}

#[test]
fn lost_records_are_logged_once_per_rescan() {
    let mut text = String::from("{\"format\":\"zbridge-events\",\"version\":1,\"node\":\"n1\"}\n");
    let mut ts = 0;
    let mut lost = |text: &mut String, n: usize| {
        for _ in 0..n {
            ts += 1;
            text.push_str(&format!("{{\"ts\":{ts},\"type\":\"lost\"}}\n"));
        }
    };
    lost(&mut text, 10_000);
    text.push_str("{\"ts\":20000,\"type\":\"scan\",\"processes\":[]}\n");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lost.events.jsonl");
    std::fs::write(&path, &text).unwrap();
    let out = replay_limited(path.to_str().unwrap());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("events were lost").count(), 1, "{stderr}");
    assert_eq!(
        stderr
            .matches("rescan after 10000 losses of events")
            .count(),
        1,
        "{stderr}"
    );
    assert!(stderr.lines().count() < 10, "{stderr}");
}
