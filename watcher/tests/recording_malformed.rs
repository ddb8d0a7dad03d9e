//! One malformed recording per rule of `shared/spec/recording-v1.md`: each must be refused with
//! an error that names the right line and field.

use std::path::PathBuf;

use watcher::recording::{RecordingError, RecordingReader};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/malformed")
        .join(name)
}

/// Reads the fixture to its end and returns the first error.
fn first_error(name: &str) -> RecordingError {
    let mut reader = match RecordingReader::open(&fixture(name)) {
        Ok(reader) => reader,
        Err(err) => return err,
    };
    loop {
        match reader.read_record() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("{name}: read to the end without an error"),
            Err(err) => return err,
        }
    }
}

/// Asserts that `name` fails on `line`, about `field`, and that the message says both.
fn assert_refused(name: &str, line: usize, field: &str) -> RecordingError {
    let err = first_error(name);
    assert_eq!(err.line(), Some(line), "{name}: wrong line in: {err}");
    assert_eq!(err.field(), Some(field), "{name}: wrong field in: {err}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("line {line}: field \"{field}\": ")),
        "{name}: message does not name line and field: {text}"
    );
    err
}

#[test]
fn missing_required_fields_are_named() {
    for (name, line, field) in [
        ("missing_tgid.jsonl", 4, "tgid"),
        ("missing_ts.jsonl", 3, "ts"),
        ("missing_type.jsonl", 4, "type"),
        ("missing_processes.jsonl", 2, "processes"),
        ("missing_object.jsonl", 2, "object"),
    ] {
        let err = assert_refused(name, line, field);
        assert!(
            matches!(err, RecordingError::MissingField { .. }),
            "{name}: {err:?}"
        );
    }
}

#[test]
fn wrong_types_are_named() {
    for (name, line, field) in [
        ("wrong_type_pid.jsonl", 3, "pid"),
        ("wrong_type_ts.jsonl", 2, "ts"),
        ("wrong_type_scan_entry.jsonl", 2, "processes[1].cgroup_id"),
        ("wrong_type_ips_item.jsonl", 2, "ips[1]"),
        ("kube_object_not_object.jsonl", 2, "object"),
        ("record_not_object.jsonl", 2, "(record)"),
    ] {
        let err = assert_refused(name, line, field);
        assert!(
            matches!(err, RecordingError::WrongType { .. }),
            "{name}: {err:?}"
        );
    }
}

#[test]
fn unknown_type_is_refused() {
    let err = assert_refused("unknown_type.jsonl", 3, "type");
    assert_eq!(
        err.to_string(),
        "line 3: field \"type\": unknown record type \"clone\""
    );
}

#[test]
fn ts_going_backwards_is_refused() {
    let err = assert_refused("ts_backwards.jsonl", 7, "ts");
    assert_eq!(
        err.to_string(),
        "line 7: field \"ts\": goes backwards (1200 after 1300)"
    );
}

#[test]
fn second_header_is_refused() {
    let err = assert_refused("second_header.jsonl", 3, "format");
    assert!(
        matches!(err, RecordingError::SecondHeader { header_line: 1, .. }),
        "{err:?}"
    );
}

#[test]
fn bad_headers_are_refused() {
    for (name, field) in [
        ("header_bad_format.jsonl", "format"),
        ("header_bad_version.jsonl", "version"),
    ] {
        let err = assert_refused(name, 1, field);
        assert!(
            matches!(err, RecordingError::BadHeader { .. }),
            "{name}: {err:?}"
        );
    }
    let err = assert_refused("header_version_string.jsonl", 1, "version");
    assert!(matches!(err, RecordingError::WrongType { .. }), "{err:?}");
    let err = assert_refused("header_missing_node.jsonl", 1, "node");
    assert!(
        matches!(err, RecordingError::MissingField { .. }),
        "{err:?}"
    );
    // A recording that starts with a record has no header.
    let err = assert_refused("header_missing.jsonl", 1, "format");
    assert!(
        matches!(err, RecordingError::MissingField { .. }),
        "{err:?}"
    );
}

#[test]
fn empty_recording_is_refused() {
    let err = first_error("empty.jsonl");
    assert!(
        matches!(err, RecordingError::NoHeader { line: 1 }),
        "{err:?}"
    );
}

#[test]
fn cgroup_without_cgroup_id_is_refused() {
    assert_refused("cgroup_without_id.jsonl", 3, "cgroup_id");
    assert_refused("scan_cgroup_without_id.jsonl", 2, "processes[1].cgroup_id");
}

#[test]
fn invalid_json_names_the_line() {
    let err = first_error("invalid_json.jsonl");
    assert!(
        matches!(err, RecordingError::InvalidJson { line: 3, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().starts_with("line 3: invalid JSON: "),
        "{err}"
    );
}

#[test]
fn ips_that_are_not_addresses_are_refused() {
    let err = assert_refused("bad_ip.jsonl", 3, "ips[1]");
    assert!(err.to_string().contains("10.0.0.300"), "{err}");
    assert_refused("scan_bad_ip.jsonl", 2, "processes[0].ips[1]");
}

#[test]
fn kube_objects_must_be_identifiable_v1_pods_or_namespaces() {
    for (name, field) in [
        ("kube_bad_action.jsonl", "action"),
        ("kube_pod_without_uid.jsonl", "object.metadata.uid"),
        ("kube_namespace_without_name.jsonl", "object.metadata.name"),
        ("kube_without_metadata.jsonl", "object.metadata"),
        ("kube_without_api_version.jsonl", "object.apiVersion"),
        ("kube_not_v1.jsonl", "object.apiVersion"),
        ("kube_wrong_kind.jsonl", "object.kind"),
    ] {
        assert_refused(name, 2, field);
    }
}

/// Every fixture in the directory is covered by a test above (a new fixture without a test
/// would prove nothing).
#[test]
fn every_fixture_is_refused() {
    let dir = fixture("");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let err = first_error(&name);
        assert!(err.line().is_some(), "{name}: error names no line: {err}");
        count += 1;
    }
    assert_eq!(count, 32);
}
