//! Differential test: random recordings (testkit::testgen) through `zbridge replay` agree with
//! the generator's own, independent model of the node, for thousands of seeds.

use std::io::Write;
use std::process::Command;

use testkit::testgen::{GenConfig, Generator};

/// Seeds per run; `ZBRIDGE_DIFF_SEEDS` raises it (e.g. for a long soak).
fn seeds() -> u64 {
    std::env::var("ZBRIDGE_DIFF_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

fn check(seed: u64, dir: &std::path::Path) {
    let mut generator = Generator::new(GenConfig::small(seed));
    let path = dir.join(format!("seed-{seed}.events.jsonl"));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    generator.write_to(&mut file).unwrap();
    file.flush().unwrap();
    drop(file);
    let out = Command::new(env!("CARGO_BIN_EXE_zbridge"))
        .args(["--log-level", "error", "replay"])
        .arg(&path)
        .output()
        .expect("run zbridge replay");
    assert!(
        out.status.success(),
        "seed {seed}: replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    got.as_object_mut().unwrap().remove("stats");
    let want = generator.expected();
    if got != want {
        let keep = std::env::temp_dir().join(format!("zbridge-diff-seed-{seed}.events.jsonl"));
        std::fs::copy(&path, &keep).unwrap();
        panic!(
            "seed {seed}: replay and model disagree (recording kept at {})\nreplay: {}\nmodel:  {}",
            keep.display(),
            serde_json::to_string_pretty(&got).unwrap(),
            serde_json::to_string_pretty(&want).unwrap()
        );
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn random_recordings_agree_with_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let n = seeds();
    // Two threads: the machine has two cores; each replay is a process of its own.
    std::thread::scope(|scope| {
        for part in 0..2u64 {
            let dir = dir.path();
            scope.spawn(move || {
                for seed in (part..n).step_by(2) {
                    check(seed, dir);
                }
            });
        }
    });
}

#[test]
fn generated_recordings_exercise_every_kind_of_record() {
    let mut generator = Generator::new(GenConfig::small(7));
    let mut text = Vec::new();
    generator.write_to(&mut text).unwrap();
    let text = String::from_utf8(text).unwrap();
    for kind in [
        "\"type\":\"scan\"",
        "\"type\":\"exec\"",
        "\"type\":\"fork\"",
        "\"type\":\"exit\"",
        "\"type\":\"lost\"",
        "\"type\":\"kube_synced\"",
        "\"action\":\"delete\"",
        "\"kind\":\"Namespace\"",
        // A pod's network namespace addresses, which stand in for a status without any.
        "\"ips\":[",
    ] {
        assert!(text.contains(kind), "seed 7 has no {kind}");
    }
    let expected = generator.expected();
    let roles: Vec<&str> = expected["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["role"].as_str().unwrap())
        .collect();
    assert!(
        roles.contains(&"ambient") && roles.contains(&"none"),
        "{roles:?}"
    );
}
