//! The shipped example recordings through the `zbridge` binary: exact workloads and roles, the
//! same bytes on every run, and a malformed file refused with nothing on stdout.

use std::process::{Command, Output};

fn zbridge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zbridge"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .expect("run zbridge")
}

fn replay_json(args: &[&str]) -> (serde_json::Value, Vec<u8>) {
    let out = zbridge(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (serde_json::from_slice(&out.stdout).unwrap(), out.stdout)
}

/// (cgroup_id, pod, ip, role) of every workload.
fn rows(doc: &serde_json::Value) -> Vec<(u64, Option<String>, Option<String>, String)> {
    doc["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["cgroup_id"].as_u64().unwrap(),
                w["pod"].as_str().map(String::from),
                w["ip"].as_str().map(String::from),
                w["role"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn row(
    id: u64,
    pod: Option<&str>,
    ip: Option<&str>,
    role: &str,
) -> (u64, Option<String>, Option<String>, String) {
    (
        id,
        pod.map(String::from),
        ip.map(String::from),
        role.to_string(),
    )
}

#[test]
fn bookinfo_example() {
    let args = [
        "replay",
        "examples/bookinfo.events.jsonl",
        "--output",
        "json",
    ];
    let (doc, bytes) = replay_json(&args);
    assert_eq!(doc["node"], "worker-1");
    assert_eq!(doc["ztunnel"]["ips"], serde_json::json!(["10.244.1.3"]));
    assert_eq!(
        rows(&doc),
        vec![
            row(12, None, None, "none"),
            row(40, None, None, "none"),
            row(41, None, None, "none"),
            row(
                6100,
                Some("kube-system/coredns-7db6d8ff4d-x2x9k"),
                None,
                "none"
            ),
            row(
                7301,
                Some("bookinfo/productpage-v1-7c548b785b-w9zl6"),
                Some("10.244.1.7"),
                "ambient"
            ),
            row(
                7320,
                Some("bookinfo/reviews-v1-5b5d6494f4-8mvbq"),
                Some("10.244.1.8"),
                "ambient"
            ),
            row(
                7340,
                Some("bookinfo/ratings-v1-b8f8fcf49-5zcrr"),
                Some("10.244.1.9"),
                "ambient"
            ),
            row(
                7360,
                Some("bookinfo/details-v1-64b939b569-9txv8"),
                Some("10.244.1.10"),
                "ambient"
            ),
            row(
                7380,
                Some("bookinfo/legacy-client-6d9f5c7b8-qk4lp"),
                None,
                "none"
            ),
            row(
                7415,
                Some("istio-system/ztunnel-nptf6"),
                Some("10.244.1.3"),
                "ztunnel"
            ),
        ]
    );
    assert_eq!(doc["workloads"][0]["cgroup"], "/init.scope");
    // The lost + scan dropped ratings' curl; productpage's worker lives on.
    assert_eq!(doc["stats"]["live_processes"], 11);
    let (_, again) = replay_json(&args);
    assert_eq!(bytes, again, "two replays print the same bytes");
}

#[test]
fn bookinfo_table() {
    let out = zbridge(&[
        "replay",
        "examples/bookinfo.events.jsonl",
        "--output",
        "table",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("node: worker-1\nztunnel: 10.244.1.3\n"),
        "{text}"
    );
    let line = text.lines().find(|l| l.contains("productpage")).unwrap();
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        &cols[..4],
        [
            "bookinfo/productpage-v1-7c548b785b-w9zl6",
            "ambient",
            "10.244.1.7",
            "7301"
        ]
    );
    assert_eq!(
        text,
        String::from_utf8(
            zbridge(&[
                "replay",
                "examples/bookinfo.events.jsonl",
                "--output",
                "table"
            ])
            .stdout
        )
        .unwrap()
    );
}

#[test]
fn standalone_example() {
    let args = [
        "replay",
        "examples/standalone.events.jsonl",
        "--workloads",
        "examples/workloads.yaml",
    ];
    let (doc, bytes) = replay_json(&args);
    assert_eq!(doc["ztunnel"]["ips"], serde_json::json!(["10.99.0.1"]));
    assert_eq!(
        rows(&doc),
        vec![
            row(12, None, None, "none"),
            row(40, None, None, "none"),
            row(9001, None, Some("10.99.0.1"), "ztunnel"),
            row(9011, Some("demo/productpage"), Some("10.99.0.2"), "ambient"),
            row(9021, Some("demo/reviews"), Some("10.99.0.3"), "ambient"),
            row(9031, Some("demo/legacy"), None, "none"),
        ]
    );
    assert_eq!(replay_json(&args).1, bytes);
    // Without the workloads file, the same recording has no pods: everything is none.
    let (doc, _) = replay_json(&["replay", "examples/standalone.events.jsonl"]);
    assert!(rows(&doc).iter().all(|r| r.3 == "none"));
}

#[test]
fn malformed_recordings_fail_naming_line_and_field_with_empty_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("{\"ts\":1,\"type\":\"exec\",\"tgid\":5}", "pid"),
        ("{\"ts\":1,\"type\":\"kube\",\"action\":\"apply\",\"object\":{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{\"name\":\"a\"}}}", "metadata.uid"),
        ("{\"ts\":1,\"type\":\"kube\",\"action\":\"apply\",\"object\":{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{\"uid\":\"u\"},\"spec\":{\"hostNetwork\":1,\"containers\":[]}}}", "spec.hostNetwork"),
    ];
    for (i, (bad, field)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.jsonl"));
        let text = format!(
            "{{\"format\":\"zbridge-events\",\"version\":1,\"node\":\"n\"}}\n{{\"ts\":0,\"type\":\"scan\",\"processes\":[]}}\n{bad}\n"
        );
        std::fs::write(&path, text).unwrap();
        let out = zbridge(&["replay", path.to_str().unwrap()]);
        assert!(!out.status.success(), "case {i}");
        assert!(out.stdout.is_empty(), "case {i}: stdout must stay empty");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("line 3") && err.contains(field),
            "case {i}: {err}"
        );
    }
}
