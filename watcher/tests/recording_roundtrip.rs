//! Every record type through the writer and back through the reader, plain and gzip, with
//! the compression told by the content, not the file name.

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::json;
use watcher::recording::{Header, RecordingError, RecordingReader, RecordingWriter};
use watcher::{
    CgroupId, CgroupRef, EventSource, KubeAction, KubeRecord, ProcEvent, ProcFacts, Record,
    ScannedProcess, TimedRecord,
};

fn header() -> Header {
    let mut header = Header::new("worker-1");
    header.cgroup_root = Some("/sys/fs/cgroup/unified".to_string());
    header
        .extra
        .insert("kernel".to_string(), json!("6.18.0-test"));
    header.extra.insert(
        "recorded_at".to_string(),
        json!({"unix_ns": 1_700_000_000u64}),
    );
    header
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn pod_cgroup() -> CgroupRef {
    CgroupRef {
        path: "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f8e0e4c_7d4b_4a5e_9d3b_1c2d3e4f5a6b.slice/cri-containerd-4b1ec9.scope".into(),
        id: CgroupId(7301),
    }
}

/// One of every record type, with every optional field both present and absent somewhere.
fn records() -> Vec<TimedRecord> {
    let at = |ts: u64, record: Record| TimedRecord { ts, record };
    vec![
        at(
            0,
            Record::Kube(KubeRecord::from_value(
                KubeAction::Apply,
                &json!({"apiVersion":"v1","kind":"Namespace",
                    "metadata":{"name":"default","labels":{"istio.io/dataplane-mode":"ambient"}}}),
            )),
        ),
        at(
            500,
            Record::Kube(KubeRecord::from_value(
                KubeAction::Apply,
                &json!({"apiVersion":"v1","kind":"Pod",
                    "metadata":{"name":"web-1","namespace":"default","uid":"0f8e0e4c-7d4b-4a5e-9d3b-1c2d3e4f5a6b"},
                    "spec":{"nodeName":"worker-1"},"status":{"podIP":"10.244.1.7"}}),
            )),
        ),
        at(500, Record::KubeSynced),
        at(
            900,
            Record::Proc(ProcEvent::Scan {
                processes: vec![
                    ScannedProcess {
                        pid: 1,
                        facts: ProcFacts {
                            cgroup: Some(CgroupRef {
                                path: "/init.scope".into(),
                                id: CgroupId(12),
                            }),
                            netns: Some(4026531840),
                            ips: vec![],
                            comm: Some("systemd".to_string()),
                        },
                    },
                    ScannedProcess {
                        pid: 4242,
                        facts: ProcFacts {
                            cgroup: Some(pod_cgroup()),
                            netns: Some(4026532999),
                            ips: vec![ip("10.244.1.7"), ip("fd00::7")],
                            comm: None,
                        },
                    },
                    // Gone before /proc could be read.
                    ScannedProcess {
                        pid: 4300,
                        facts: ProcFacts::default(),
                    },
                ],
            }),
        ),
        at(
            1200,
            Record::Proc(ProcEvent::Exec {
                pid: 4243,
                tgid: 4243,
                facts: ProcFacts {
                    cgroup: Some(pod_cgroup()),
                    netns: Some(4026532999),
                    ips: vec![ip("10.244.1.7")],
                    // Quotes, a backslash and non-ASCII: escaped in JSON.
                    comm: Some("we\"b\\ünit".to_string()),
                },
            }),
        ),
        at(
            1300,
            Record::Proc(ProcEvent::Fork {
                parent_pid: 4243,
                parent_tgid: 4243,
                child_pid: 4244,
                child_tgid: 4243,
            }),
        ),
        // The gone-process race: an exec whose /proc facts could not be read.
        at(
            1300,
            Record::Proc(ProcEvent::Exec {
                pid: 4250,
                tgid: 4250,
                facts: ProcFacts::default(),
            }),
        ),
        at(
            1400,
            Record::Proc(ProcEvent::Exit {
                pid: 4244,
                tgid: 4243,
                exit_code: 0,
            }),
        ),
        at(
            1500,
            Record::Proc(ProcEvent::Exit {
                pid: 4243,
                tgid: 4243,
                exit_code: 9,
            }),
        ),
        at(1600, Record::Proc(ProcEvent::Lost)),
        at(
            1700,
            Record::Kube(KubeRecord::from_value(
                KubeAction::Delete,
                &json!({"apiVersion":"v1","kind":"Pod","metadata":{"uid":"0f8e0e4c-7d4b-4a5e-9d3b-1c2d3e4f5a6b"}}),
            )),
        ),
        at(
            u64::MAX,
            Record::Kube(KubeRecord::from_value(
                KubeAction::Delete,
                &json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"default"}}),
            )),
        ),
    ]
}

fn write_file(path: &Path, gzip: bool) {
    let mut writer = RecordingWriter::create(path, &header(), gzip).unwrap();
    for record in records() {
        writer.write(&record).unwrap();
    }
    writer.finish().unwrap();
}

/// Reads the whole file through the [`EventSource`] trait, as replay does.
fn read_file(path: &Path) -> (Header, Vec<TimedRecord>) {
    let mut reader = RecordingReader::open(path).unwrap();
    let header = reader.header().clone();
    let mut read = Vec::new();
    while let Some(record) = reader.next_record().unwrap() {
        read.push(record);
    }
    // The end stays the end.
    assert!(reader.next_record().unwrap().is_none());
    (header, read)
}

fn is_gzip(path: &Path) -> bool {
    std::fs::read(path).unwrap().starts_with(&[0x1f, 0x8b])
}

#[test]
fn plain_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.events.jsonl");
    write_file(&path, false);
    assert!(!is_gzip(&path));
    assert_eq!(read_file(&path), (header(), records()));
}

#[test]
fn gzip_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.events.jsonl.gz");
    write_file(&path, true);
    assert!(is_gzip(&path));
    assert_eq!(read_file(&path), (header(), records()));
}

#[test]
fn compression_is_told_by_content_not_name() {
    let dir = tempfile::tempdir().unwrap();
    let gzip_named_plain = dir.path().join("compressed.events.jsonl");
    write_file(&gzip_named_plain, true);
    assert!(is_gzip(&gzip_named_plain));
    assert_eq!(read_file(&gzip_named_plain), (header(), records()));

    let plain_named_gzip = dir.path().join("plain.events.jsonl.gz");
    write_file(&plain_named_gzip, false);
    assert!(!is_gzip(&plain_named_gzip));
    assert_eq!(read_file(&plain_named_gzip), (header(), records()));
}

#[test]
fn writer_uses_the_spec_field_names_and_omits_absent_fields() {
    let mut writer = RecordingWriter::new(Vec::new(), &Header::new("worker-1")).unwrap();
    let exec = |ts, facts| TimedRecord {
        ts,
        record: Record::Proc(ProcEvent::Exec {
            pid: 4242,
            tgid: 4242,
            facts,
        }),
    };
    writer
        .write(&exec(
            1200,
            ProcFacts {
                cgroup: Some(CgroupRef {
                    path: "/a.slice/b.scope".into(),
                    id: CgroupId(7301),
                }),
                netns: None,
                ips: vec![],
                comm: Some("nginx".to_string()),
            },
        ))
        .unwrap();
    writer.write(&exec(1300, ProcFacts::default())).unwrap();
    writer
        .write(&TimedRecord {
            ts: 1400,
            record: Record::Proc(ProcEvent::Exit {
                pid: 4242,
                tgid: 4242,
                exit_code: 0,
            }),
        })
        .unwrap();
    assert_eq!(writer.line(), 4);
    let text = String::from_utf8(writer.finish().unwrap()).unwrap();
    assert_eq!(
        text,
        concat!(
            "{\"format\":\"zbridge-events\",\"version\":1,\"node\":\"worker-1\"}\n",
            "{\"ts\":1200,\"type\":\"exec\",\"pid\":4242,\"tgid\":4242,\"comm\":\"nginx\",\"cgroup\":\"/a.slice/b.scope\",\"cgroup_id\":7301}\n",
            "{\"ts\":1300,\"type\":\"exec\",\"pid\":4242,\"tgid\":4242}\n",
            "{\"ts\":1400,\"type\":\"exit\",\"pid\":4242,\"tgid\":4242,\"exit_code\":0}\n",
        )
    );
}

#[test]
fn writer_refuses_ts_going_backwards() {
    let mut writer = RecordingWriter::new(Vec::new(), &Header::new("n")).unwrap();
    let lost = |ts| TimedRecord {
        ts,
        record: Record::Proc(ProcEvent::Lost),
    };
    writer.write(&lost(1300)).unwrap();
    let err = writer.write(&lost(1200)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "line 3: field \"ts\": goes backwards (1200 after 1300)"
    );
    // The refused record was not written: the next one is still line 3.
    writer.write(&lost(1300)).unwrap();
    assert_eq!(writer.line(), 3);
}

#[test]
fn writer_refuses_kube_objects_the_reader_would_refuse() {
    let mut writer = RecordingWriter::new(Vec::new(), &Header::new("n")).unwrap();
    let err = writer
        .write(&TimedRecord {
            ts: 1,
            record: Record::Kube(KubeRecord::from_value(
                KubeAction::Apply,
                &json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":"no-uid"}}),
            )),
        })
        .unwrap_err();
    assert!(
        matches!(&err, RecordingError::MissingField { line: 2, field, .. } if field == "object.metadata.uid"),
        "{err:?}"
    );
}

/// A byte sink that the test can look into while the writer still owns it.
#[derive(Clone, Default)]
struct SharedBytes(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBytes {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn gzip_cut_short_after_flush_still_holds_the_flushed_records() {
    let sink = SharedBytes::default();
    let mut writer = RecordingWriter::new_gzip(sink.clone(), &header()).unwrap();
    for record in records() {
        writer.write(&record).unwrap();
    }
    writer.flush().unwrap();
    // A killed agent: the bytes so far, without the gzip trailer.
    let cut = sink.0.lock().unwrap().clone();
    let mut reader = RecordingReader::detect(std::io::Cursor::new(cut)).unwrap();
    let mut read = Vec::new();
    let err = loop {
        match reader.read_record() {
            Ok(Some(record)) => read.push(record),
            Ok(None) => panic!("a stream without its gzip trailer must not read as complete"),
            Err(err) => break err,
        }
    };
    assert_eq!(read, records());
    assert!(matches!(err, RecordingError::Read { .. }), "{err:?}");
}
