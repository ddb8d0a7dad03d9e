//! Recording read speed (issue 2): replay must read more than a million records a second on
//! one core. Reads an in-memory recording of a realistic mix (fork, exec with pod cgroup
//! paths, exit, in equal parts, as a busy node's proc connector delivers them), plain and gzip.

use std::io::Cursor;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use watcher::recording::{Header, RecordingReader, RecordingWriter};
use watcher::{CgroupId, CgroupRef, ProcEvent, ProcFacts, Record, TimedRecord};

const RECORDS: u64 = 300_000;

fn recording(gzip: bool) -> Vec<u8> {
    let header = Header::new("worker-1");
    let mut writer = if gzip {
        RecordingWriter::new_gzip(Vec::new(), &header).unwrap()
    } else {
        RecordingWriter::new(Vec::new(), &header).unwrap()
    };
    for i in 0..RECORDS {
        let pid = 10_000 + (i / 3) as u32;
        let record = match i % 3 {
            0 => ProcEvent::Fork {
                parent_pid: 4242,
                parent_tgid: 4242,
                child_pid: pid,
                child_tgid: pid,
            },
            1 => ProcEvent::Exec {
                pid,
                tgid: pid,
                facts: ProcFacts {
                    cgroup: Some(CgroupRef {
                        path: format!(
                            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f8e0e4c_7d4b_4a5e_9d3b_{:012x}.slice/cri-containerd-{:064x}.scope",
                            i % 97,
                            i % 89
                        )
                        .into(),
                        id: CgroupId(7000 + i % 97),
                    }),
                    netns: Some(4026532000 + i % 97),
                    ips: vec![],
                    comm: Some("curl".to_string()),
                },
            },
            _ => ProcEvent::Exit {
                pid,
                tgid: pid,
                exit_code: 0,
            },
        };
        writer
            .write(&TimedRecord {
                ts: i * 1000,
                record: Record::Proc(record),
            })
            .unwrap();
    }
    writer.finish().unwrap()
}

fn read_all(bytes: &'static [u8]) -> u64 {
    let mut reader = RecordingReader::detect(Cursor::new(bytes)).unwrap();
    let mut count = 0;
    while reader.read_record().unwrap().is_some() {
        count += 1;
    }
    assert_eq!(count, RECORDS);
    count
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("recording_read");
    group.throughput(Throughput::Elements(RECORDS));
    group.sample_size(20);
    for (name, gzip) in [("plain", false), ("gzip", true)] {
        // Leaked so that each iteration reads it in place, without copying tens of MiB.
        let bytes: &'static [u8] = recording(gzip).leak();
        group.bench_function(name, |b| b.iter(|| read_all(bytes)));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
