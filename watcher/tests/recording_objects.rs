//! `read_record_with_objects`: a kube record's object read by the caller in the one parse of
//! its line gives what `read_record` gives, and every other line (a declined object, an error)
//! is read exactly as `read_record` reads it.

use std::io::Cursor;
use std::path::PathBuf;

use serde::Deserialize;
use watcher::recording::{ObjectReading, RecordWithObject, RecordingReader};
use watcher::{KubeAction, Record, TimedRecord};

/// A reading that keeps what identifies a plain object: `(kind, uid or name)`; it declines
/// what the reader's check would refuse, and also any object with an `"other"` field (to have
/// valid objects declined).
#[derive(Deserialize)]
struct Identity {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<Meta>,
    other: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct Meta {
    uid: Option<String>,
    name: Option<String>,
}

impl ObjectReading for Identity {
    type Object = (String, String);

    fn into_object(self) -> Option<(String, String)> {
        if self.api_version.as_deref() != Some("v1") || self.other.is_some() {
            return None;
        }
        let meta = self.metadata?;
        let id = match self.kind.as_deref()? {
            "Pod" => meta.uid,
            "Namespace" => meta.name,
            _ => None,
        }
        .filter(|id| !id.is_empty())?;
        Some((self.kind?, id))
    }
}

/// The records of both readings up to the end or the first error, and that error's message.
type Outcome<T> = (Vec<T>, Option<String>);

fn read_all(text: &[u8]) -> Outcome<TimedRecord> {
    let mut reader = match RecordingReader::new(Cursor::new(text.to_vec())) {
        Ok(reader) => reader,
        Err(err) => return (Vec::new(), Some(err.to_string())),
    };
    let mut records = Vec::new();
    loop {
        match reader.read_record() {
            Ok(Some(record)) => records.push(record),
            Ok(None) => return (records, None),
            Err(err) => return (records, Some(err.to_string())),
        }
    }
}

fn read_all_with_objects(text: &[u8]) -> Outcome<RecordWithObject<(String, String)>> {
    let mut reader = match RecordingReader::new(Cursor::new(text.to_vec())) {
        Ok(reader) => reader,
        Err(err) => return (Vec::new(), Some(err.to_string())),
    };
    let mut records = Vec::new();
    loop {
        match reader.read_record_with_objects::<Identity>() {
            Ok(Some(record)) => records.push(record),
            Ok(None) => return (records, None),
            Err(err) => return (records, Some(err.to_string())),
        }
    }
}

/// Asserts that both readings agree: the same records (a kube record read by `Identity` as
/// the one `read_record` gives, identified alike), the same error.
fn assert_same_reading(name: &str, text: &[u8]) -> Vec<RecordWithObject<(String, String)>> {
    let (plain, plain_error) = read_all(text);
    let (with_objects, error) = read_all_with_objects(text);
    assert_eq!(error, plain_error, "{name}");
    assert_eq!(with_objects.len(), plain.len(), "{name}");
    for (one, other) in with_objects.iter().zip(&plain) {
        match one {
            RecordWithObject::Record(record) => assert_eq!(record, other, "{name}"),
            RecordWithObject::Kube { ts, action, object } => {
                assert_eq!(*ts, other.ts, "{name}");
                let Record::Kube(kube) = &other.record else {
                    panic!("{name}: {other:?} read as a kube object");
                };
                assert_eq!(*action, kube.action, "{name}");
                let identity: Identity = serde_json::from_str(kube.object.get()).unwrap();
                assert_eq!(identity.into_object().as_ref(), Some(object), "{name}");
            }
        }
    }
    with_objects
}

#[test]
fn every_malformed_fixture_fails_the_same_way() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/malformed");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read(&path).unwrap();
        let name = path.display().to_string();
        let (_, error) = read_all_with_objects(&text);
        assert!(error.is_some(), "{name}: read without an error");
        assert_same_reading(&name, &text);
        count += 1;
    }
    assert!(count >= 32, "{count} fixtures");
}

#[test]
fn plain_objects_are_read_in_the_one_parse_and_the_others_as_before() {
    let text = br#"{"format":"zbridge-events","version":1,"node":"n"}
{"ts":1,"type":"kube","action":"apply","object":{"apiVersion":"v1","kind":"Pod","metadata":{"uid":"u1","name":"a"}}}
{"ts":2,"type":"exec","pid":7,"tgid":7,"comm":"sh","cgroup":"/a\u002fb","cgroup_id":9,"ips":["10.0.0.1"]}
{"object":{"kind":"Namespace","metadata":{"name":"ns"},"apiVersion":"v1"},"action":"delete","type":"kube","ts":3}
{"ts":4,"type":"kube","action":"apply","object":{"apiVersion":"v1","kind":"P\u006fd","metadata":{"uid":"u2"}}}
{"ts":5,"type":"kube","action":"apply","object":{"apiVersion":"v1","kind":"Pod","metadata":{"uid":"u3"},"other":1}}
{"ts":6,"type":"kube_synced"}
{"ts":7,"type":"fork","parent_pid":7,"parent_tgid":7,"child_pid":8,"child_tgid":8}
"#;
    let records = assert_same_reading("mixed", text);
    let kinds: Vec<&str> = records
        .iter()
        .map(|r| match r {
            RecordWithObject::Kube { .. } => "object",
            RecordWithObject::Record(TimedRecord {
                record: Record::Kube(_),
                ..
            }) => "kube text",
            RecordWithObject::Record(_) => "record",
        })
        .collect();
    assert_eq!(
        kinds,
        // The escaped `kind` is read too (this reading reads escapes); `other` is declined.
        [
            "object",
            "record",
            "object",
            "object",
            "kube text",
            "record",
            "record"
        ]
    );
    assert_eq!(
        records[2],
        RecordWithObject::Kube {
            ts: 3,
            action: KubeAction::Delete,
            object: ("Namespace".to_string(), "ns".to_string()),
        }
    );
}

#[test]
fn lines_the_object_reading_fails_on_fail_as_read_record_fails() {
    let header = r#"{"format":"zbridge-events","version":1,"node":"n"}"#;
    let cases: [&[u8]; 6] = [
        // The object's identity wrong: the reader's check names the field.
        br#"{"ts":1,"type":"kube","action":"apply","object":{"apiVersion":"v1","kind":"Pod","metadata":{"uid":""}}}"#,
        // A field the reading reads of the wrong type.
        br#"{"ts":1,"type":"kube","action":"apply","object":{"apiVersion":"v1","kind":7,"metadata":{"uid":"u"}}}"#,
        // A bad action after a plain object.
        br#"{"ts":1,"type":"kube","object":{"apiVersion":"v1","kind":"Pod","metadata":{"uid":"u"}},"action":"patch"}"#,
        // ts going back after a record read in one parse.
        br#"{"ts":5,"type":"kube","action":"apply","object":{"apiVersion":"v1","kind":"Pod","metadata":{"uid":"u"}}}
{"ts":4,"type":"kube","action":"apply","object":{"apiVersion":"v1","kind":"Pod","metadata":{"uid":"u"}}}"#,
        // Not UTF-8 inside a string.
        b"{\"ts\":1,\"type\":\"exec\",\"pid\":1,\"tgid\":1,\"comm\":\"\xff\"}",
        // Invalid JSON inside the object.
        br#"{"ts":1,"type":"kube","action":"apply","object":{"apiVersion":"v1","kind":"Pod","metadata":{"uid":"u"},}}"#,
    ];
    for case in cases {
        let mut text = header.as_bytes().to_vec();
        text.push(b'\n');
        text.extend_from_slice(case);
        text.push(b'\n');
        let name = String::from_utf8_lossy(case).to_string();
        let (_, error) = read_all_with_objects(&text);
        assert!(error.is_some(), "{name}: read without an error");
        assert_same_reading(&name, &text);
    }
}
