//! Reading a recording: header, then records, validated line by line.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufRead, BufReader, Cursor, Read};
use std::net::IpAddr;
use std::path::Path;

use serde::de::{self, Deserializer, IgnoredAny};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::parse_error::{json_error, message_without_position};
use super::{
    describe, validate_kube_object, Header, RecordingError, FORMAT, MAX_HEADER_LINE,
    MAX_RECORD_LINE, VERSION,
};
use crate::event::{
    CgroupId, CgroupRef, KubeAction, KubeRecord, ProcEvent, ProcFacts, Record, ScannedProcess,
    TimedRecord,
};
use crate::{EventSource, SourceError};

mod flat_line;
mod path_table;

use path_table::PathTable;

/// Size of the read buffer: large enough that a replay is not bound by read calls.
const READ_BUFFER: usize = 256 * 1024;

/// Reads a recording, format v1: [`RecordingReader::header`], then records one by one
/// ([`RecordingReader::read_record`], or as an [`EventSource`]).
///
/// Comment and empty lines may also precede the header (hand-written fixtures start with a
/// comment saying what they test); the header is the first line that is neither.
///
/// After an error the reader stands after the bad line; callers are expected to stop (replay
/// exits non-zero), since the records after it were written on the same wrong assumptions.
pub struct RecordingReader<R> {
    input: R,
    header: Header,
    header_line: usize,
    /// The number of the last line read (1-based).
    line: usize,
    last_ts: Option<u64>,
    /// The current line, reused across lines.
    buf: Vec<u8>,
    /// How processes' facts are read, and what is kept between lines to read them.
    facts: FactsReading,
}

/// How processes' facts are read ([`RecordingReader::keep_comm`]), and the cgroup paths read
/// so far, each handed out again for the same cgroup.
#[derive(Debug, Default)]
struct FactsReading {
    paths: PathTable,
    skip_comm: bool,
}

impl RecordingReader<Box<dyn BufRead + Send>> {
    /// Opens the recording at `path`, plain or gzip (told apart by the gzip magic bytes, not
    /// the name), and reads its header.
    pub fn open(path: &Path) -> Result<Self, RecordingError> {
        let file = File::open(path).map_err(|error| RecordingError::Open {
            path: path.to_path_buf(),
            error,
        })?;
        Self::detect(file)
    }

    /// Reads a recording from any byte stream (a file, stdin), plain or gzip (told apart by the
    /// gzip magic bytes), and reads its header.
    pub fn detect(mut input: impl Read + Send + 'static) -> Result<Self, RecordingError> {
        let mut magic = Vec::with_capacity(2);
        (&mut input)
            .take(2)
            .read_to_end(&mut magic)
            .map_err(|error| RecordingError::Read { line: 1, error })?;
        let is_gzip = magic == [0x1f, 0x8b];
        let whole = Cursor::new(magic).chain(input);
        let reader: Box<dyn BufRead + Send> = if is_gzip {
            Box::new(BufReader::with_capacity(
                READ_BUFFER,
                flate2::read::MultiGzDecoder::new(whole),
            ))
        } else {
            Box::new(BufReader::with_capacity(READ_BUFFER, whole))
        };
        Self::new(reader)
    }
}

impl<R: BufRead> RecordingReader<R> {
    /// Reads a plain (not compressed) recording from `input`, starting with its header.
    pub fn new(input: R) -> Result<Self, RecordingError> {
        let mut reader = RecordingReader {
            input,
            header: Header::default(),
            header_line: 0,
            line: 0,
            last_ts: None,
            buf: Vec::with_capacity(4096),
            facts: FactsReading::default(),
        };
        if !reader.next_content_line()? {
            return Err(RecordingError::NoHeader {
                line: reader.line.max(1),
            });
        }
        reader.header = parse_header(&reader.buf, reader.line)?;
        reader.header_line = reader.line;
        Ok(reader)
    }

    /// The recording's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Whether the processes' `comm` is read (the default) or left out (`None`), for a user
    /// that never reads it: replay's resolver does not, and a copy per exec costs it.
    pub fn keep_comm(mut self, keep: bool) -> Self {
        self.facts.skip_comm = !keep;
        self
    }

    /// The number of the last line read (1-based, counting comments and empty lines).
    pub fn line(&self) -> usize {
        self.line
    }

    /// The next record, or `None` at the end of the recording.
    pub fn read_record(&mut self) -> Result<Option<TimedRecord>, RecordingError> {
        if !self.next_content_line()? {
            return Ok(None);
        }
        self.record_of_line().map(Some)
    }

    /// The next record, a `kube` record's object read by `O` in the one parse of its line: what
    /// [`RecordingReader::read_record`] reads and then the caller's reading of the object would
    /// give, without the object copied out of the line and parsed again. An object that `O`
    /// does not read (or does not read as plain) leaves its line read as
    /// [`RecordingReader::read_record`] reads it, checks and errors included.
    pub fn read_record_with_objects<O: ObjectReading>(
        &mut self,
    ) -> Result<Option<RecordWithObject<O::Object>>, RecordingError> {
        if !self.next_content_line()? {
            return Ok(None);
        }
        let line = self.line;
        // Any error is left to the reading that names it: the line is read again below.
        let Some(Ok(raw)) = parse_line::<O>(&self.buf) else {
            return self
                .record_of_line()
                .map(|r| Some(RecordWithObject::Record(r)));
        };
        let ts = self.check_position(&raw, line)?;
        let record = match convert(raw, line, &mut self.facts)? {
            Converted::Record(record) => RecordWithObject::Record(TimedRecord { ts, record }),
            Converted::Kube { action, object } => match object.into_object() {
                Some(object) => RecordWithObject::Kube { ts, action, object },
                None => {
                    return self
                        .record_of_line()
                        .map(|r| Some(RecordWithObject::Record(r)))
                }
            },
        };
        self.last_ts = Some(ts);
        Ok(Some(record))
    }

    /// The record on the current line (`self.buf`), its kube object kept as text and checked.
    fn record_of_line(&mut self) -> Result<TimedRecord, RecordingError> {
        let line = self.line;
        let raw = match parse_line::<Box<RawValue>>(&self.buf) {
            Some(Ok(raw)) => raw,
            // Not UTF-8, or not a record: parsed as bytes, as it always was, for the error.
            _ => match serde_json::from_slice::<RawRecord<Box<RawValue>>>(&self.buf) {
                Ok(raw) => raw,
                Err(err) => return Err(json_error(&err, &self.buf, line)),
            },
        };
        let ts = self.check_position(&raw, line)?;
        let record = match convert(raw, line, &mut self.facts)? {
            Converted::Record(record) => record,
            Converted::Kube { action, object } => {
                validate_kube_object(&object, line)?;
                Record::Kube(KubeRecord { action, object })
            }
        };
        self.last_ts = Some(ts);
        Ok(TimedRecord { ts, record })
    }

    /// The checks of a parsed line that come before its type's: not a second header, and a
    /// `ts` that does not go back. The record's `ts`.
    fn check_position<O>(&self, raw: &RawRecord<O>, line: usize) -> Result<u64, RecordingError> {
        if raw.format.is_some() {
            return Err(RecordingError::SecondHeader {
                line,
                field: "format".to_string(),
                header_line: self.header_line,
            });
        }
        let ts = required(raw.ts, line, "ts", "every record has it")?;
        if let Some(previous) = self.last_ts {
            if ts < previous {
                return Err(RecordingError::TsBackwards {
                    line,
                    field: "ts".to_string(),
                    ts,
                    previous,
                });
            }
        }
        Ok(ts)
    }

    /// Reads lines until one that is not a comment or empty, leaving it (trimmed of its line
    /// end) in `self.buf`. False at the end of the input. A line longer than the limit (the
    /// header's until the header is read, then a record's) is an error, found without reading
    /// more of it than the limit.
    fn next_content_line(&mut self) -> Result<bool, RecordingError> {
        let (limit, what) = match self.header_line {
            0 => (MAX_HEADER_LINE, "a header"),
            _ => (MAX_RECORD_LINE, "a record"),
        };
        loop {
            self.buf.clear();
            // Room for the line and a `\r\n`: reading stops there, whatever follows.
            let cap = limit as u64 + 2;
            let read = (&mut self.input)
                .take(cap)
                .read_until(b'\n', &mut self.buf)
                .map_err(|error| RecordingError::Read {
                    line: self.line + 1,
                    error,
                })?;
            if read == 0 {
                return Ok(false);
            }
            let ended = self.buf.last() == Some(&b'\n');
            while matches!(self.buf.last(), Some(b'\n' | b'\r')) {
                self.buf.pop();
            }
            if (read as u64 == cap && !ended) || self.buf.len() > limit {
                // Not kept: the buffer is reused for every line.
                self.buf = Vec::new();
                return Err(RecordingError::LineTooLong {
                    line: self.line + 1,
                    limit,
                    what,
                });
            }
            self.line += 1;
            match self.buf.iter().find(|b| !b.is_ascii_whitespace()) {
                None | Some(b'#') => continue,
                Some(_) => return Ok(true),
            }
        }
    }
}

impl<R: BufRead> EventSource for RecordingReader<R> {
    fn next_record(&mut self) -> Result<Option<TimedRecord>, SourceError> {
        Ok(self.read_record()?)
    }
}

/// A record line's fields when it is UTF-8 (`None` when it is not): checked as text once,
/// instead of each of its strings on its own as a parse of bytes does. An error here is the
/// same as the parse of the bytes would give, which is what the error paths use.
fn parse_line<'a, O: Deserialize<'a>>(
    line: &'a [u8],
) -> Option<serde_json::Result<RawRecord<'a, O>>> {
    let text = std::str::from_utf8(line).ok()?;
    // Most lines are process records as the writer writes them: read without the JSON parse.
    if let Some(raw) = flat_line::read(text) {
        return Some(Ok(raw));
    }
    Some(serde_json::from_str(text))
}

/// How a caller that knows the Kubernetes objects (the watcher does not) reads a `kube`
/// record's `object` within the one parse of the record's line
/// ([`RecordingReader::read_record_with_objects`]).
///
/// A reading may fail, or decline the object ([`ObjectReading::into_object`] `None`), for any
/// object it does not read as it is: the line is then read again as
/// [`RecordingReader::read_record`] reads it, which keeps the object as text, checks it and
/// names what is wrong. It must decline every object that the reader's check would refuse:
/// one that is not a `v1` `Pod` with a non-empty `metadata.uid` or a `v1` `Namespace` with a
/// non-empty `metadata.name`.
pub trait ObjectReading: for<'de> Deserialize<'de> {
    /// What an object is read into.
    type Object;
    /// The object read, or `None` when this reading declines it.
    fn into_object(self) -> Option<Self::Object>;
}

/// A record of [`RecordingReader::read_record_with_objects`].
#[derive(Debug, Clone, PartialEq)]
pub enum RecordWithObject<T> {
    /// A `kube` record whose object the caller's [`ObjectReading`] read.
    Kube {
        ts: u64,
        action: KubeAction,
        object: T,
    },
    /// Any other record, as [`RecordingReader::read_record`] reads it (a `kube` record among
    /// them when the reading declined its object).
    Record(TimedRecord),
}

/// Parses and checks the header line.
fn parse_header(text: &[u8], line: usize) -> Result<Header, RecordingError> {
    let value: Value = serde_json::from_slice(text).map_err(|err| RecordingError::InvalidJson {
        line,
        message: message_without_position(&err),
    })?;
    let Value::Object(mut map) = value else {
        return Err(RecordingError::BadHeader {
            line,
            field: "format".to_string(),
            reason: format!(
                "the header must be a JSON object with \"format\":\"{FORMAT}\", found {}",
                describe(&value)
            ),
        });
    };
    let context = "the header must have it";
    let missing = |field: &str| RecordingError::MissingField {
        line,
        field: field.to_string(),
        context: context.to_string(),
    };
    let wrong_type = |field: &str, expected: &str, found: &Value| RecordingError::WrongType {
        line,
        field: field.to_string(),
        message: format!("expected {expected}, found {}", describe(found)),
    };
    match map.remove("format") {
        None => return Err(missing("format")),
        Some(Value::String(format)) if format == FORMAT => {}
        Some(Value::String(other)) => {
            return Err(RecordingError::BadHeader {
                line,
                field: "format".to_string(),
                reason: format!("expected \"{FORMAT}\", found {other:?}"),
            })
        }
        Some(other) => return Err(wrong_type("format", "a string", &other)),
    }
    match map.remove("version") {
        None => return Err(missing("version")),
        Some(Value::Number(n)) if n.as_u64() == Some(VERSION) => {}
        Some(Value::Number(n)) if n.is_u64() => {
            return Err(RecordingError::BadHeader {
                line,
                field: "version".to_string(),
                reason: format!("unsupported version {n}: this reader reads version {VERSION}"),
            })
        }
        Some(other) => return Err(wrong_type("version", "an unsigned integer", &other)),
    }
    let node = match map.remove("node") {
        None => return Err(missing("node")),
        Some(Value::String(node)) => node,
        Some(other) => return Err(wrong_type("node", "a string", &other)),
    };
    let cgroup_root = match map.remove("cgroup_root") {
        None | Some(Value::Null) => None,
        Some(Value::String(root)) => Some(root),
        Some(other) => return Err(wrong_type("cgroup_root", "a string", &other)),
    };
    Ok(Header {
        node,
        cgroup_root,
        extra: map,
    })
}

/// The `type` of a record, read without allocating for the known ones.
enum RecordType {
    Exec,
    Fork,
    Exit,
    Lost,
    Scan,
    Kube,
    KubeSynced,
    Unknown(String),
}

impl<'de> Deserialize<'de> for RecordType {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TypeVisitor;
        impl de::Visitor<'_> for TypeVisitor {
            type Value = RecordType;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RecordType, E> {
                Ok(match v {
                    "exec" => RecordType::Exec,
                    "fork" => RecordType::Fork,
                    "exit" => RecordType::Exit,
                    "lost" => RecordType::Lost,
                    "scan" => RecordType::Scan,
                    "kube" => RecordType::Kube,
                    "kube_synced" => RecordType::KubeSynced,
                    other => RecordType::Unknown(other.to_string()),
                })
            }
        }
        deserializer.deserialize_str(TypeVisitor)
    }
}

/// A JSON string, borrowed from the text when it has no escapes (then it needs no copy).
pub struct Text<'a>(pub Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> de::Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

/// One record line as written, every field optional: which ones are required depends on the
/// type, and is checked after parsing so that the error can name the missing field. (No
/// `#[serde(flatten)]`: it buffers every field and halves the speed.)
#[derive(Deserialize)]
#[serde(bound(deserialize = "O: Deserialize<'de>"))]
struct RawRecord<'a, O> {
    ts: Option<u64>,
    #[serde(rename = "type")]
    kind: Option<RecordType>,
    /// Only a header has it: its presence on a later line is a second header.
    format: Option<IgnoredAny>,
    pid: Option<u32>,
    tgid: Option<u32>,
    #[serde(borrow)]
    cgroup: Option<Text<'a>>,
    cgroup_id: Option<u64>,
    netns: Option<u64>,
    #[serde(borrow)]
    ips: Option<Vec<Text<'a>>>,
    #[serde(borrow)]
    comm: Option<Text<'a>>,
    parent_pid: Option<u32>,
    parent_tgid: Option<u32>,
    child_pid: Option<u32>,
    child_tgid: Option<u32>,
    exit_code: Option<u32>,
    #[serde(borrow)]
    processes: Option<Vec<RawProcess<'a>>>,
    #[serde(borrow)]
    action: Option<Text<'a>>,
    /// Kept as text ([`RecordingReader::read_record`]), or read by the caller's
    /// [`ObjectReading`].
    object: Option<O>,
}

impl<O> RawRecord<'_, O> {
    /// No field set.
    fn empty() -> Self {
        RawRecord {
            ts: None,
            kind: None,
            format: None,
            pid: None,
            tgid: None,
            cgroup: None,
            cgroup_id: None,
            netns: None,
            ips: None,
            comm: None,
            parent_pid: None,
            parent_tgid: None,
            child_pid: None,
            child_tgid: None,
            exit_code: None,
            processes: None,
            action: None,
            object: None,
        }
    }
}

/// One entry of a `scan` record.
#[derive(Deserialize)]
struct RawProcess<'a> {
    pid: Option<u32>,
    #[serde(borrow)]
    cgroup: Option<Text<'a>>,
    cgroup_id: Option<u64>,
    netns: Option<u64>,
    #[serde(borrow)]
    ips: Option<Vec<Text<'a>>>,
    #[serde(borrow)]
    comm: Option<Text<'a>>,
}

/// The /proc facts fields as written, for an `exec` record or a `scan` entry.
struct RawFacts<'a> {
    cgroup: Option<Text<'a>>,
    cgroup_id: Option<u64>,
    netns: Option<u64>,
    ips: Option<Vec<Text<'a>>>,
    comm: Option<Text<'a>>,
}

/// A required field's value, or the error naming it.
fn required<T>(
    value: Option<T>,
    line: usize,
    field: &str,
    context: &str,
) -> Result<T, RecordingError> {
    value.ok_or_else(|| RecordingError::MissingField {
        line,
        field: field.to_string(),
        context: context.to_string(),
    })
}

/// A parsed line with its type's required fields checked: a record, or a `kube` record's parts
/// (its object not checked yet: that depends on how it was read).
enum Converted<O> {
    Record(Record),
    Kube { action: KubeAction, object: O },
}

/// Checks the required fields of a parsed record for its type and builds the event.
/// `reading` makes the processes' facts.
fn convert<O>(
    raw: RawRecord<O>,
    line: usize,
    reading: &mut FactsReading,
) -> Result<Converted<O>, RecordingError> {
    let kind = required(raw.kind, line, "type", "every record has it")?;
    let record = match kind {
        RecordType::Exec => {
            let context = "required in exec records";
            Record::Proc(ProcEvent::Exec {
                pid: required(raw.pid, line, "pid", context)?,
                tgid: required(raw.tgid, line, "tgid", context)?,
                facts: facts(
                    RawFacts {
                        cgroup: raw.cgroup,
                        cgroup_id: raw.cgroup_id,
                        netns: raw.netns,
                        ips: raw.ips,
                        comm: raw.comm,
                    },
                    line,
                    "",
                    reading,
                )?,
            })
        }
        RecordType::Fork => {
            let context = "required in fork records";
            Record::Proc(ProcEvent::Fork {
                parent_pid: required(raw.parent_pid, line, "parent_pid", context)?,
                parent_tgid: required(raw.parent_tgid, line, "parent_tgid", context)?,
                child_pid: required(raw.child_pid, line, "child_pid", context)?,
                child_tgid: required(raw.child_tgid, line, "child_tgid", context)?,
            })
        }
        RecordType::Exit => {
            let context = "required in exit records";
            Record::Proc(ProcEvent::Exit {
                pid: required(raw.pid, line, "pid", context)?,
                tgid: required(raw.tgid, line, "tgid", context)?,
                exit_code: required(raw.exit_code, line, "exit_code", context)?,
            })
        }
        RecordType::Lost => Record::Proc(ProcEvent::Lost),
        RecordType::Scan => {
            let entries = required(raw.processes, line, "processes", "required in scan records")?;
            let mut processes = Vec::with_capacity(entries.len());
            for (i, entry) in entries.into_iter().enumerate() {
                let prefix = format!("processes[{i}].");
                let pid = required(
                    entry.pid,
                    line,
                    &format!("{prefix}pid"),
                    "required in every scan entry",
                )?;
                let facts = facts(
                    RawFacts {
                        cgroup: entry.cgroup,
                        cgroup_id: entry.cgroup_id,
                        netns: entry.netns,
                        ips: entry.ips,
                        comm: entry.comm,
                    },
                    line,
                    &prefix,
                    reading,
                )?;
                processes.push(ScannedProcess { pid, facts });
            }
            Record::Proc(ProcEvent::Scan { processes })
        }
        RecordType::Kube => {
            let context = "required in kube records";
            let action = match required(raw.action, line, "action", context)?.0.as_ref() {
                "apply" => KubeAction::Apply,
                "delete" => KubeAction::Delete,
                other => {
                    return Err(RecordingError::InvalidValue {
                        line,
                        field: "action".to_string(),
                        reason: format!("expected \"apply\" or \"delete\", found {other:?}"),
                    })
                }
            };
            let object = required(raw.object, line, "object", context)?;
            return Ok(Converted::Kube { action, object });
        }
        RecordType::KubeSynced => Record::KubeSynced,
        RecordType::Unknown(value) => {
            return Err(RecordingError::UnknownType {
                line,
                field: "type".to_string(),
                value,
            })
        }
    };
    Ok(Converted::Record(record))
}

/// Builds [`ProcFacts`] from the fields as written; `prefix` is the JSON path of the object
/// holding them (`""` for an exec record, `processes[3].` for a scan entry).
fn facts(
    raw: RawFacts,
    line: usize,
    prefix: &str,
    reading: &mut FactsReading,
) -> Result<ProcFacts, RecordingError> {
    let cgroup = match (raw.cgroup, raw.cgroup_id) {
        (Some(path), Some(id)) => Some(CgroupRef {
            path: reading.paths.path(CgroupId(id), &path.0),
            id: CgroupId(id),
        }),
        (None, None) => None,
        (Some(_), None) => {
            return Err(RecordingError::MissingField {
                line,
                field: format!("{prefix}cgroup_id"),
                context: "required when \"cgroup\" is present".to_string(),
            })
        }
        (None, Some(_)) => {
            return Err(RecordingError::MissingField {
                line,
                field: format!("{prefix}cgroup"),
                context: "required when \"cgroup_id\" is present".to_string(),
            })
        }
    };
    let mut ips = Vec::new();
    if let Some(texts) = raw.ips {
        ips.reserve_exact(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let ip: IpAddr = text.0.parse().map_err(|_| RecordingError::InvalidValue {
                line,
                field: format!("{prefix}ips[{i}]"),
                reason: format!("not an IP address: {:?}", text.0),
            })?;
            ips.push(ip);
        }
    }
    Ok(ProcFacts {
        cgroup,
        netns: raw.netns,
        ips,
        comm: match raw.comm {
            Some(comm) if !reading.skip_comm => Some(comm.0.into_owned()),
            _ => None,
        },
    })
}
