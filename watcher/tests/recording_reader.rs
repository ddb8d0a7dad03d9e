//! The reader on hand-written recordings: comments, empty lines, unknown fields, and the
//! gone-process race, as the spec allows them.

use std::io::Cursor;

use serde_json::json;
use watcher::recording::{RecordingReader, RecordingWriter};
use watcher::{
    CgroupId, CgroupRef, EventSource, KubeAction, ProcEvent, ProcFacts, Record, ScannedProcess,
};

fn read_all(text: &str) -> (watcher::recording::Header, Vec<(u64, Record)>) {
    let mut reader = RecordingReader::new(Cursor::new(text.as_bytes().to_vec())).unwrap();
    let mut records = Vec::new();
    while let Some(record) = reader.next_record().unwrap() {
        records.push((record.ts, record.record));
    }
    (reader.header().clone(), records)
}

#[test]
fn comments_and_empty_lines_are_skipped_and_counted() {
    let text = concat!(
        "# a recording written by hand\n",
        "\n",
        "{\"format\":\"zbridge-events\",\"version\":1,\"node\":\"worker-1\"}\r\n",
        "   # an indented comment with {\"ts\":1,\"type\":\"nope\"}\n",
        "  \t \n",
        "\r\n",
        "{\"ts\":5,\"type\":\"lost\"}\r\n",
        "#{\"ts\":1,\"type\":\"lost\"}\n",
        "{\"ts\":6,\"type\":\"kube_synced\"}", // no final line end
    );
    let mut reader = RecordingReader::new(Cursor::new(text)).unwrap();
    assert_eq!(reader.header().node, "worker-1");
    assert_eq!(reader.line(), 3);
    let lost = reader.read_record().unwrap().unwrap();
    assert_eq!((lost.ts, lost.record), (5, Record::Proc(ProcEvent::Lost)));
    assert_eq!(reader.line(), 7);
    let synced = reader.read_record().unwrap().unwrap();
    assert_eq!((synced.ts, synced.record), (6, Record::KubeSynced));
    assert_eq!(reader.line(), 9);
    assert!(reader.read_record().unwrap().is_none());
}

#[test]
fn unknown_fields_are_ignored_and_header_extras_kept() {
    let text = concat!(
        "{\"format\":\"zbridge-events\",\"version\":1,\"node\":\"n1\",\"cgroup_root\":\"/sys/fs/cgroup\",",
        "\"kernel\":\"6.18\",\"agent_version\":{\"major\":0,\"minor\":1}}\n",
        "{\"ts\":1,\"type\":\"scan\",\"future\":[1,{\"a\":null}],\"processes\":[",
        "{\"pid\":1,\"cgroup\":\"/init.scope\",\"cgroup_id\":12,\"oom_score\":0}]}\n",
        "{\"type\":\"exec\",\"ts\":2,\"tgid\":7,\"pid\":8,\"uid\":0,\"argv\":[\"sh\",\"-c\"],\"comm\":\"sh\"}\n",
        "{\"ts\":3,\"type\":\"kube\",\"action\":\"apply\",\"resourceVersion\":\"12\",",
        "\"object\":{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{\"uid\":\"u1\",\"name\":\"p\"},\"status\":{}}}\n",
    );
    let (header, records) = read_all(text);
    assert_eq!(header.node, "n1");
    assert_eq!(header.cgroup_root.as_deref(), Some("/sys/fs/cgroup"));
    assert_eq!(header.extra.len(), 2);
    assert_eq!(header.extra["kernel"], json!("6.18"));
    assert_eq!(header.extra["agent_version"], json!({"major":0,"minor":1}));
    assert_eq!(
        records,
        vec![
            (
                1,
                Record::Proc(ProcEvent::Scan {
                    processes: vec![ScannedProcess {
                        pid: 1,
                        facts: ProcFacts {
                            cgroup: Some(CgroupRef {
                                path: "/init.scope".into(),
                                id: CgroupId(12)
                            }),
                            ..ProcFacts::default()
                        }
                    }]
                })
            ),
            (
                2,
                Record::Proc(ProcEvent::Exec {
                    pid: 8,
                    tgid: 7,
                    facts: ProcFacts {
                        comm: Some("sh".to_string()),
                        ..ProcFacts::default()
                    }
                })
            ),
            (
                3,
                Record::Kube(
                    watcher::// The object is passed on whole, fields the watcher does not know included.
                    KubeRecord::from_value(
                        KubeAction::Apply,
                        &json!({"apiVersion":"v1","kind":"Pod","metadata":{"uid":"u1","name":"p"},"status":{}})
                    )
                )
            ),
        ]
    );
}

#[test]
fn a_process_gone_before_proc_was_read_has_no_cgroup() {
    let text = concat!(
        "{\"format\":\"zbridge-events\",\"version\":1,\"node\":\"n\"}\n",
        "{\"ts\":1200,\"type\":\"exec\",\"pid\":4242,\"tgid\":4242}\n",
        "{\"ts\":1201,\"type\":\"exec\",\"pid\":4243,\"tgid\":4243,\"comm\":\"true\",\"cgroup\":null,\"cgroup_id\":null}\n",
    );
    let (_, records) = read_all(text);
    for (_, record) in &records {
        let Record::Proc(ProcEvent::Exec { facts, .. }) = record else {
            panic!("not an exec: {record:?}");
        };
        assert_eq!(facts.cgroup, None);
        assert!(facts.ips.is_empty());
    }
    assert_eq!(records.len(), 2);
}

#[test]
fn spec_examples_read_as_written() {
    let text = concat!(
        "{\"format\":\"zbridge-events\",\"version\":1,\"node\":\"worker-1\",\"cgroup_root\":\"/sys/fs/cgroup\"}\n",
        "{\"ts\":500,\"type\":\"kube\",\"action\":\"apply\",\"object\":{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\n",
    );
    // The spec's kube example is wrapped over two lines for reading; a recording has it on one.
    assert!(RecordingReader::new(Cursor::new(text))
        .unwrap()
        .read_record()
        .is_err());
    let text = concat!(
        "{\"format\":\"zbridge-events\",\"version\":1,\"node\":\"worker-1\",\"cgroup_root\":\"/sys/fs/cgroup\"}\n",
        "{\"ts\":500,\"type\":\"kube\",\"action\":\"apply\",\"object\":{\"apiVersion\":\"v1\",\"kind\":\"Namespace\", \"metadata\":{\"name\":\"default\",\"labels\":{\"istio.io/dataplane-mode\":\"ambient\"}}}}\n",
        "{\"ts\":900,\"type\":\"scan\",\"processes\":[{\"pid\":1,\"cgroup\":\"/init.scope\",\"cgroup_id\":12}, {\"pid\":4242,\"cgroup\":\"/kubepods.slice/...\",\"cgroup_id\":7301}]}\n",
        "{\"ts\":1200,\"type\":\"exec\",\"pid\":4242,\"tgid\":4242,\"comm\":\"nginx\", \"cgroup\":\"/kubepods.slice/x.scope\", \"cgroup_id\":7301}\n",
        "{\"ts\":1300,\"type\":\"fork\",\"parent_pid\":4242,\"parent_tgid\":4242,\"child_pid\":4250,\"child_tgid\":4242}\n",
        "{\"ts\":1400,\"type\":\"exit\",\"pid\":4250,\"tgid\":4242,\"exit_code\":0}\n",
        "{\"ts\":1500,\"type\":\"lost\"}\n",
        "{\"ts\":1600,\"type\":\"kube_synced\"}\n",
    );
    let (header, records) = read_all(text);
    assert_eq!(header.cgroup_root.as_deref(), Some("/sys/fs/cgroup"));
    let timestamps: Vec<u64> = records.iter().map(|(ts, _)| *ts).collect();
    assert_eq!(timestamps, [500, 900, 1200, 1300, 1400, 1500, 1600]);
    assert_eq!(
        records[4].1,
        Record::Proc(ProcEvent::Exit {
            pid: 4250,
            tgid: 4242,
            exit_code: 0
        })
    );
}

#[test]
fn escaped_strings_read_like_plain_ones() {
    let text = concat!(
        "{\"format\":\"zbridge-events\",\"version\":1,\"node\":\"w\\u00f6rker\"}\n",
        "{\"ts\":1,\"type\":\"exec\",\"pid\":1,\"tgid\":1,\"ips\":[\"10.0.0.\\u0031\",\"fd00::1\"],",
        "\"cgroup\":\"/a\\/b\",\"cgroup_id\":3,\"comm\":\"tab\\there\"}\n",
    );
    let (header, records) = read_all(text);
    assert_eq!(header.node, "wörker");
    assert_eq!(
        records[0].1,
        Record::Proc(ProcEvent::Exec {
            pid: 1,
            tgid: 1,
            facts: ProcFacts {
                cgroup: Some(CgroupRef {
                    path: "/a/b".into(),
                    id: CgroupId(3)
                }),
                netns: None,
                ips: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
                comm: Some("tab\there".to_string()),
            }
        })
    );
}

#[test]
fn equal_timestamps_are_allowed() {
    let text = concat!(
        "{\"format\":\"zbridge-events\",\"version\":1,\"node\":\"n\"}\n",
        "{\"ts\":7,\"type\":\"lost\"}\n",
        "{\"ts\":7,\"type\":\"scan\",\"processes\":[]}\n",
    );
    let (_, records) = read_all(text);
    assert_eq!(
        records,
        vec![
            (7, Record::Proc(ProcEvent::Lost)),
            (7, Record::Proc(ProcEvent::Scan { processes: vec![] }))
        ]
    );
}

#[test]
fn detect_reads_a_plain_stream_such_as_stdin() {
    let mut writer =
        RecordingWriter::new(Vec::new(), &watcher::recording::Header::new("n")).unwrap();
    writer
        .write(&watcher::TimedRecord {
            ts: 3,
            record: Record::KubeSynced,
        })
        .unwrap();
    let bytes = writer.finish().unwrap();
    let mut reader = RecordingReader::detect(Cursor::new(bytes)).unwrap();
    assert_eq!(reader.header().node, "n");
    assert_eq!(
        reader.read_record().unwrap().unwrap().record,
        Record::KubeSynced
    );
    assert!(reader.read_record().unwrap().is_none());
}

#[test]
fn comm_left_out_leaves_everything_else_as_read() {
    let text = concat!(
        "{\"format\":\"zbridge-events\",\"version\":1,\"node\":\"n\"}\n",
        // Flat, as the writer writes it; with whitespace (the JSON parse); with an escape.
        "{\"ts\":1,\"type\":\"exec\",\"pid\":7,\"tgid\":7,\"comm\":\"app\",\"cgroup\":\"/a/b\",\"cgroup_id\":9}\n",
        "{\"ts\":2, \"type\":\"exec\", \"pid\":8, \"tgid\":8, \"comm\":\"sh\", \"ips\":[\"10.0.0.1\"]}\n",
        "{\"ts\":3,\"type\":\"exec\",\"pid\":9,\"tgid\":9,\"comm\":\"a\\u0062\"}\n",
        "{\"ts\":4,\"type\":\"scan\",\"processes\":[{\"pid\":7,\"comm\":\"app\",\"cgroup\":\"/a/b\",\"cgroup_id\":9}]}\n",
    );
    let read = |keep: bool| {
        let mut reader = RecordingReader::new(Cursor::new(text.as_bytes().to_vec()))
            .unwrap()
            .keep_comm(keep);
        let mut records = Vec::new();
        while let Some(record) = reader.read_record().unwrap() {
            records.push(record.record);
        }
        records
    };
    let kept = read(true);
    let left_out = read(false);
    assert_eq!(kept.len(), 4);
    let comms = |records: &[Record]| -> Vec<Option<String>> {
        records
            .iter()
            .flat_map(|r| match r {
                Record::Proc(ProcEvent::Exec { facts, .. }) => vec![facts.comm.clone()],
                Record::Proc(ProcEvent::Scan { processes }) => {
                    processes.iter().map(|p| p.facts.comm.clone()).collect()
                }
                _ => Vec::new(),
            })
            .collect()
    };
    let names = |names: &[&str]| {
        names
            .iter()
            .map(|n| Some(n.to_string()))
            .collect::<Vec<_>>()
    };
    assert_eq!(comms(&kept), names(&["app", "sh", "ab", "app"]));
    assert_eq!(comms(&left_out), vec![None; 4]);
    // Without the comms, the records are the same.
    let without_comm = |records: Vec<Record>| -> Vec<Record> {
        records
            .into_iter()
            .map(|mut r| {
                match &mut r {
                    Record::Proc(ProcEvent::Exec { facts, .. }) => facts.comm = None,
                    Record::Proc(ProcEvent::Scan { processes }) => {
                        processes.iter_mut().for_each(|p| p.facts.comm = None)
                    }
                    _ => {}
                }
                r
            })
            .collect()
    };
    assert_eq!(without_comm(kept), left_out);
}
