//! Writing a recording: the header, then one line per record, plain or gzip.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::IpAddr;
use std::path::Path;

use flate2::write::GzEncoder;
use serde::Serialize;
use serde_json::Value;

use super::{
    validate_kube_object, Header, RecordingError, FORMAT, MAX_HEADER_LINE, MAX_RECORD_LINE, VERSION,
};
use crate::event::{KubeAction, ProcEvent, ProcFacts, Record, TimedRecord};

/// Size of the write buffer of [`RecordingWriter::create`].
const WRITE_BUFFER: usize = 256 * 1024;

/// Where the lines go: as is, or through gzip.
enum Sink<W: Write> {
    Plain(W),
    Gzip(GzEncoder<W>),
}

/// Writes a recording, format v1: the header on creation, then [`RecordingWriter::write`] for
/// each record, then [`RecordingWriter::finish`].
///
/// It writes exactly the spec's field names, omits absent optional fields, and refuses what the
/// reader would refuse (a `ts` going backwards, a kube object that is not a v1 Pod or
/// Namespace with its identifying metadata), so that a recording it wrote always replays.
pub struct RecordingWriter<W: Write> {
    sink: Sink<W>,
    /// The number of the last line written (1-based; the header is line 1).
    line: usize,
    last_ts: Option<u64>,
    /// The current line, reused across records.
    buf: Vec<u8>,
}

impl RecordingWriter<BufWriter<File>> {
    /// Creates (or truncates) the file at `path` and writes the header; gzip-compressed when
    /// `gzip` is true.
    pub fn create(path: &Path, header: &Header, gzip: bool) -> Result<Self, RecordingError> {
        let file = File::create(path).map_err(|error| RecordingError::Create {
            path: path.to_path_buf(),
            error,
        })?;
        let out = BufWriter::with_capacity(WRITE_BUFFER, file);
        if gzip {
            Self::new_gzip(out, header)
        } else {
            Self::new(out, header)
        }
    }
}

impl<W: Write> RecordingWriter<W> {
    /// Writes a plain recording to `out`, starting with `header`.
    pub fn new(out: W, header: &Header) -> Result<Self, RecordingError> {
        Self::start(Sink::Plain(out), header)
    }

    /// Writes a gzip-compressed recording to `out`, starting with `header`.
    pub fn new_gzip(out: W, header: &Header) -> Result<Self, RecordingError> {
        Self::start(
            Sink::Gzip(GzEncoder::new(out, flate2::Compression::default())),
            header,
        )
    }

    fn start(sink: Sink<W>, header: &Header) -> Result<Self, RecordingError> {
        let mut writer = RecordingWriter {
            sink,
            line: 0,
            last_ts: None,
            buf: Vec::with_capacity(4096),
        };
        write_header(&mut writer.buf, header);
        writer.emit()?;
        Ok(writer)
    }

    /// The number of the last line written (the header is line 1).
    pub fn line(&self) -> usize {
        self.line
    }

    /// Appends one record. Its `ts` must not be smaller than the previous record's.
    pub fn write(&mut self, rec: &TimedRecord) -> Result<(), RecordingError> {
        let line = self.line + 1;
        if let Some(previous) = self.last_ts {
            if rec.ts < previous {
                return Err(RecordingError::TsBackwards {
                    line,
                    field: "ts".to_string(),
                    ts: rec.ts,
                    previous,
                });
            }
        }
        if let Record::Kube(kube) = &rec.record {
            validate_kube_object(&kube.object, line)?;
        }
        let out = OutRecord::of(rec);
        serde_json::to_writer(&mut self.buf, &out).map_err(|err| RecordingError::Write {
            line,
            error: err.into(),
        })?;
        self.emit()?;
        self.last_ts = Some(rec.ts);
        Ok(())
    }

    /// Pushes what was written so far to the underlying writer (a gzip sync flush), so that a
    /// recording cut short (the agent killed) still holds every record written before.
    pub fn flush(&mut self) -> Result<(), RecordingError> {
        let line = self.line;
        let result = match &mut self.sink {
            Sink::Plain(out) => out.flush(),
            Sink::Gzip(out) => out.flush(),
        };
        result.map_err(|error| RecordingError::Write { line, error })
    }

    /// Flushes, writes the gzip trailer (when compressed), and returns the underlying writer.
    pub fn finish(self) -> Result<W, RecordingError> {
        let line = self.line;
        let write_error = |error| RecordingError::Write { line, error };
        let mut out = match self.sink {
            Sink::Plain(out) => out,
            Sink::Gzip(out) => out.finish().map_err(write_error)?,
        };
        out.flush().map_err(write_error)?;
        Ok(out)
    }

    /// Writes `self.buf` plus a line end as the next line, and empties `self.buf`; refuses a
    /// line the reader would refuse as too long.
    fn emit(&mut self) -> Result<(), RecordingError> {
        let (limit, what) = match self.line {
            0 => (MAX_HEADER_LINE, "a header"),
            _ => (MAX_RECORD_LINE, "a record"),
        };
        if self.buf.len() > limit {
            self.buf.clear();
            return Err(RecordingError::LineTooLong {
                line: self.line + 1,
                limit,
                what,
            });
        }
        self.buf.push(b'\n');
        let result = match &mut self.sink {
            Sink::Plain(out) => out.write_all(&self.buf),
            Sink::Gzip(out) => out.write_all(&self.buf),
        };
        self.buf.clear();
        self.line += 1;
        result.map_err(|error| RecordingError::Write {
            line: self.line,
            error,
        })
    }
}

/// The header line: `format` and `version` first, so that a person (and `head -1`) sees what
/// the file is; then `node`, `cgroup_root`, and the informative fields.
fn write_header(buf: &mut Vec<u8>, header: &Header) {
    let mut text = format!(
        "{{\"format\":\"{FORMAT}\",\"version\":{VERSION},\"node\":{}",
        Value::from(header.node.as_str())
    );
    if let Some(root) = &header.cgroup_root {
        text.push_str(&format!(",\"cgroup_root\":{}", Value::from(root.as_str())));
    }
    for (key, value) in &header.extra {
        if matches!(key.as_str(), "format" | "version" | "node" | "cgroup_root") {
            continue;
        }
        text.push_str(&format!(",{}:{}", Value::from(key.as_str()), value));
    }
    text.push('}');
    buf.extend_from_slice(text.as_bytes());
}

/// One record as the spec spells it; `None` fields are left out.
#[derive(Serialize, Default)]
struct OutRecord<'a> {
    ts: u64,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tgid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    comm: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    netns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ips: Option<&'a [IpAddr]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_tgid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    child_pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    child_tgid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    processes: Option<Vec<OutProcess<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    object: Option<&'a serde_json::value::RawValue>,
}

/// One entry of a `scan` record.
#[derive(Serialize)]
struct OutProcess<'a> {
    pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    comm: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    netns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ips: Option<&'a [IpAddr]>,
}

/// The facts fields as written (comm, cgroup, cgroup_id, netns, ips).
type FactsFields<'a> = (
    Option<&'a str>,
    Option<&'a str>,
    Option<u64>,
    Option<u64>,
    Option<&'a [IpAddr]>,
);

/// The facts fields as written: `ips` left out when empty.
fn facts_fields(facts: &ProcFacts) -> FactsFields<'_> {
    (
        facts.comm.as_deref(),
        facts.cgroup.as_ref().map(|c| &*c.path),
        facts.cgroup.as_ref().map(|c| c.id.0),
        facts.netns,
        (!facts.ips.is_empty()).then_some(facts.ips.as_slice()),
    )
}

impl<'a> OutRecord<'a> {
    fn of(rec: &'a TimedRecord) -> OutRecord<'a> {
        let ts = rec.ts;
        match &rec.record {
            Record::Proc(ProcEvent::Exec { pid, tgid, facts }) => {
                let (comm, cgroup, cgroup_id, netns, ips) = facts_fields(facts);
                OutRecord {
                    ts,
                    kind: "exec",
                    pid: Some(*pid),
                    tgid: Some(*tgid),
                    comm,
                    cgroup,
                    cgroup_id,
                    netns,
                    ips,
                    ..OutRecord::default()
                }
            }
            Record::Proc(ProcEvent::Fork {
                parent_pid,
                parent_tgid,
                child_pid,
                child_tgid,
            }) => OutRecord {
                ts,
                kind: "fork",
                parent_pid: Some(*parent_pid),
                parent_tgid: Some(*parent_tgid),
                child_pid: Some(*child_pid),
                child_tgid: Some(*child_tgid),
                ..OutRecord::default()
            },
            Record::Proc(ProcEvent::Exit {
                pid,
                tgid,
                exit_code,
            }) => OutRecord {
                ts,
                kind: "exit",
                pid: Some(*pid),
                tgid: Some(*tgid),
                exit_code: Some(*exit_code),
                ..OutRecord::default()
            },
            Record::Proc(ProcEvent::Lost) => OutRecord {
                ts,
                kind: "lost",
                ..OutRecord::default()
            },
            Record::Proc(ProcEvent::Scan { processes }) => OutRecord {
                ts,
                kind: "scan",
                processes: Some(
                    processes
                        .iter()
                        .map(|p| {
                            let (comm, cgroup, cgroup_id, netns, ips) = facts_fields(&p.facts);
                            OutProcess {
                                pid: p.pid,
                                comm,
                                cgroup,
                                cgroup_id,
                                netns,
                                ips,
                            }
                        })
                        .collect(),
                ),
                ..OutRecord::default()
            },
            Record::Kube(kube) => OutRecord {
                ts,
                kind: "kube",
                action: Some(match kube.action {
                    KubeAction::Apply => "apply",
                    KubeAction::Delete => "delete",
                }),
                object: Some(&kube.object),
                ..OutRecord::default()
            },
            Record::KubeSynced => OutRecord {
                ts,
                kind: "kube_synced",
                ..OutRecord::default()
            },
        }
    }
}
