//! Line lengths are capped: any input, a gzip bomb or `/dev/zero` included, is refused with an
//! error naming the line after reading at most the cap, and a line at the cap is read.

use std::io::{Cursor, Write};
use std::path::Path;

use watcher::event::{ProcEvent, ProcFacts, Record, TimedRecord};
use watcher::recording::{
    Header, RecordingError, RecordingReader, RecordingWriter, MAX_HEADER_LINE, MAX_RECORD_LINE,
};

const HEADER: &str = "{\"format\":\"zbridge-events\",\"version\":1,\"node\":\"n1\"}\n";

/// Reads `input` to its end and returns the first error.
fn first_error(input: Vec<u8>) -> RecordingError {
    let mut reader = match RecordingReader::detect(Cursor::new(input)) {
        Ok(reader) => reader,
        Err(err) => return err,
    };
    loop {
        match reader.read_record() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("read to the end without an error"),
            Err(err) => return err,
        }
    }
}

fn assert_too_long(err: RecordingError, line: usize, limit: usize, what: &str) {
    match &err {
        RecordingError::LineTooLong {
            line: l,
            limit: m,
            what: w,
        } => assert_eq!((*l, *m, *w), (line, limit, what), "{err}"),
        other => panic!("expected LineTooLong, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("line {line}: longer than {limit} bytes")),
        "{text}"
    );
}

/// A `lost` record padded with an ignored field to exactly `len` bytes.
fn lost_record_of_len(len: usize) -> String {
    let start = "{\"ts\":1,\"type\":\"lost\",\"pad\":\"";
    let end = "\"}";
    let pad = len - start.len() - end.len();
    format!("{start}{}{end}", "a".repeat(pad))
}

/// A gzip stream of `members` members of 1 MiB of `a` each, after `prefix` (its first member):
/// small on disk, one line of `members` MiB once decompressed.
fn gzip_bomb(prefix: &[u8], members: usize) -> Vec<u8> {
    let gzip = |data: &[u8]| {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    };
    let mut out = gzip(prefix);
    let member = gzip(&vec![b'a'; 1 << 20]);
    for _ in 0..members {
        out.extend_from_slice(&member);
    }
    out
}

#[test]
fn a_record_line_at_the_cap_is_read_and_one_byte_more_is_refused() {
    let at_cap = lost_record_of_len(MAX_RECORD_LINE);
    let input = format!("{HEADER}{at_cap}\r\n");
    let mut reader = RecordingReader::new(Cursor::new(input.into_bytes())).unwrap();
    let record = reader.read_record().unwrap().unwrap();
    assert_eq!(record.record, Record::Proc(ProcEvent::Lost));
    assert!(reader.read_record().unwrap().is_none());

    let over = lost_record_of_len(MAX_RECORD_LINE + 1);
    let input = format!("{HEADER}# a comment\n{over}\n");
    assert_too_long(
        first_error(input.into_bytes()),
        3,
        MAX_RECORD_LINE,
        "a record",
    );
}

#[test]
fn a_long_line_before_the_header_is_refused_at_the_header_cap() {
    let comment = format!("#{}\n", "x".repeat(MAX_HEADER_LINE));
    let input = format!("# fixture\n{comment}{HEADER}");
    assert_too_long(
        first_error(input.into_bytes()),
        2,
        MAX_HEADER_LINE,
        "a header",
    );
    let header = format!(
        "{{\"format\":\"zbridge-events\",\"version\":1,\"node\":\"{}\"}}\n",
        "n".repeat(MAX_HEADER_LINE)
    );
    assert_too_long(
        first_error(header.into_bytes()),
        1,
        MAX_HEADER_LINE,
        "a header",
    );
}

#[test]
fn a_gzip_bomb_is_refused_at_the_cap() {
    let members = 2 * (MAX_RECORD_LINE >> 20);
    let bomb = gzip_bomb(HEADER.as_bytes(), members);
    assert!(bomb.len() < 200_000, "the bomb is {} bytes", bomb.len());
    assert_too_long(first_error(bomb), 2, MAX_RECORD_LINE, "a record");
    // One line and no header at all: the header's cap.
    assert_too_long(
        first_error(gzip_bomb(b"", 4)),
        1,
        MAX_HEADER_LINE,
        "a header",
    );
}

#[test]
fn dev_zero_is_refused_at_the_header_cap() {
    let err = match RecordingReader::open(Path::new("/dev/zero")) {
        Ok(_) => panic!("/dev/zero read as a recording"),
        Err(err) => err,
    };
    assert_too_long(err, 1, MAX_HEADER_LINE, "a header");
}

#[test]
fn the_writer_refuses_a_line_the_reader_would_refuse() {
    let mut writer = RecordingWriter::new(Vec::new(), &Header::new("n1")).unwrap();
    let exec = |comm: String| TimedRecord {
        ts: 1,
        record: Record::Proc(ProcEvent::Exec {
            pid: 1,
            tgid: 1,
            facts: ProcFacts {
                comm: Some(comm),
                ..ProcFacts::default()
            },
        }),
    };
    writer.write(&exec("sh".to_string())).unwrap();
    let err = writer
        .write(&exec("c".repeat(MAX_RECORD_LINE)))
        .unwrap_err();
    assert_too_long(err, 3, MAX_RECORD_LINE, "a record");
    // The refused line was not written: the next record is line 3.
    writer.write(&exec("sh".to_string())).unwrap();
    assert_eq!(writer.line(), 3);
    let mut huge = Header::new("n1");
    huge.extra.insert(
        "note".to_string(),
        serde_json::Value::from("h".repeat(MAX_HEADER_LINE)),
    );
    let err = match RecordingWriter::new(Vec::new(), &huge) {
        Ok(_) => panic!("a header over the cap was written"),
        Err(err) => err,
    };
    assert_too_long(err, 1, MAX_HEADER_LINE, "a header");
}
