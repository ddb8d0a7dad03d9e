//! Recordings, format v1 (`shared/spec/recording-v1.md`): reader and writer.
//!
//! A recording is JSON Lines: a header, then one record per line. The reader is strict (every
//! problem is an error naming the line and the field, nothing is guessed) and fast (process
//! records are parsed straight into typed structs, the line buffer is reused). The writer
//! writes exactly the spec's field names and refuses what the reader would refuse.
//!
//! Line lengths are capped, so that reading any input, a gzip bomb or `/dev/zero` included,
//! takes bounded memory: a record line at [`MAX_RECORD_LINE`] bytes (32 MiB), the header (and
//! any comment or empty line before it) at [`MAX_HEADER_LINE`] bytes (64 KiB), line ends not
//! counted. A longer line is an error naming it ([`RecordingError::LineTooLong`]); the writer
//! refuses to write one. The largest legitimate record is a `scan` of every process on the
//! node, about 200 bytes a process, so the cap holds a scan of over 150,000 processes, and a
//! Kubernetes object is smaller still (the API server refuses objects over about 1.5 MB).

mod parse_error;
mod reader;
mod writer;

pub use reader::{ObjectReading, RecordWithObject, RecordingReader, Text};
pub use writer::RecordingWriter;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The value of the header's `format` field.
pub const FORMAT: &str = "zbridge-events";
/// The only format version this module reads and writes.
pub const VERSION: u64 = 1;
/// The longest record line read or written, in bytes, its line end not counted.
pub const MAX_RECORD_LINE: usize = 32 << 20;
/// The longest header line (and comment or empty line before it), its line end not counted.
pub const MAX_HEADER_LINE: usize = 64 << 10;

/// The header of a recording (its line 1).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Header {
    /// The Kubernetes node the agent ran on: only pods whose `spec.nodeName` equals it are local.
    pub node: String,
    /// Where the cgroup2 hierarchy was mounted on the recording host (informative).
    pub cgroup_root: Option<String>,
    /// Every other header field (`recorded_at`, `kernel`, ...), kept as is (informative).
    pub extra: Map<String, Value>,
}

impl Header {
    /// A header for `node` with no informative fields.
    pub fn new(node: impl Into<String>) -> Header {
        Header {
            node: node.into(),
            cgroup_root: None,
            extra: Map::new(),
        }
    }
}

/// Errors reading or writing a recording. Every error about content names the line (1-based,
/// counting comments and empty lines) and the field (a JSON path such as `processes[2].pid`).
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    // The I/O errors are in the messages and not `source` fields (thiserror makes a field of
    // that name the error's source): a chain printer (anyhow's `{:#}`) would print them twice.
    #[error("{}: cannot open: {error}", path.display())]
    Open {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("{}: cannot create: {error}", path.display())]
    Create {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("line {line}: read failed: {error}")]
    Read { line: usize, error: std::io::Error },
    #[error("line {line}: write failed: {error}")]
    Write { line: usize, error: std::io::Error },
    #[error(
        "line {line}: longer than {limit} bytes, the limit of {what} line: not a recording, or a \
         damaged one"
    )]
    LineTooLong {
        line: usize,
        limit: usize,
        /// `a header` (the header and the comments before it) or `a record`.
        what: &'static str,
    },
    #[error("line {line}: the recording is empty: line 1 must be the header")]
    NoHeader { line: usize },
    #[error("line {line}: invalid JSON: {message}")]
    InvalidJson { line: usize, message: String },
    #[error("line {line}: field \"{field}\": missing ({context})")]
    MissingField {
        line: usize,
        field: String,
        /// Why the field is required here, e.g. `required in exec records`.
        context: String,
    },
    #[error("line {line}: field \"{field}\": wrong type: {message}")]
    WrongType {
        line: usize,
        field: String,
        message: String,
    },
    #[error("line {line}: field \"{field}\": unknown record type \"{value}\"")]
    UnknownType {
        line: usize,
        field: String,
        value: String,
    },
    #[error("line {line}: field \"{field}\": goes backwards ({ts} after {previous})")]
    TsBackwards {
        line: usize,
        field: String,
        ts: u64,
        previous: u64,
    },
    #[error("line {line}: field \"{field}\": a second header (the header is line {header_line})")]
    SecondHeader {
        line: usize,
        field: String,
        header_line: usize,
    },
    #[error("line {line}: field \"{field}\": bad header: {reason}")]
    BadHeader {
        line: usize,
        field: String,
        reason: String,
    },
    #[error("line {line}: field \"{field}\": {reason}")]
    InvalidValue {
        line: usize,
        field: String,
        reason: String,
    },
}

impl RecordingError {
    /// The line the error is about, if it is about one.
    pub fn line(&self) -> Option<usize> {
        use RecordingError::*;
        match self {
            Open { .. } | Create { .. } => None,
            Read { line, .. }
            | Write { line, .. }
            | LineTooLong { line, .. }
            | NoHeader { line }
            | InvalidJson { line, .. }
            | MissingField { line, .. }
            | WrongType { line, .. }
            | UnknownType { line, .. }
            | TsBackwards { line, .. }
            | SecondHeader { line, .. }
            | BadHeader { line, .. }
            | InvalidValue { line, .. } => Some(*line),
        }
    }

    /// The field the error is about, if it is about one.
    pub fn field(&self) -> Option<&str> {
        use RecordingError::*;
        match self {
            MissingField { field, .. }
            | WrongType { field, .. }
            | UnknownType { field, .. }
            | TsBackwards { field, .. }
            | SecondHeader { field, .. }
            | BadHeader { field, .. }
            | InvalidValue { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// A short description of a JSON value for error messages: its type and, for scalars, itself.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "an array".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

/// Checks that a kube record's `object` is a `v1` `Pod` (with `metadata.uid`) or `v1`
/// `Namespace` (with `metadata.name`): what the resolver needs to identify it.
///
/// Only the fields checked are parsed into values; the rest of the object is passed over. An
/// object whose shape surprises that parse (it or its metadata not a JSON object) is parsed
/// whole, for the error that names the field and its type.
fn validate_kube_object(object: &RawValue, line: usize) -> Result<(), RecordingError> {
    if is_plainly_valid(object.get()) {
        return Ok(());
    }
    #[derive(serde::Deserialize)]
    struct Identity {
        #[serde(rename = "apiVersion")]
        api_version: Option<Value>,
        kind: Option<Value>,
        metadata: Option<IdentityMeta>,
    }
    #[derive(serde::Deserialize)]
    struct IdentityMeta {
        uid: Option<Value>,
        name: Option<Value>,
    }
    let identity = match serde_json::from_str::<Identity>(object.get()) {
        Ok(identity) => {
            let mut fields = Map::new();
            let put = |map: &mut Map<String, Value>, name: &str, value: Option<Value>| {
                if let Some(value) = value {
                    map.insert(name.to_string(), value);
                }
            };
            put(&mut fields, "apiVersion", identity.api_version);
            put(&mut fields, "kind", identity.kind);
            if let Some(meta) = identity.metadata {
                let mut metadata = Map::new();
                put(&mut metadata, "uid", meta.uid);
                put(&mut metadata, "name", meta.name);
                fields.insert("metadata".to_string(), Value::Object(metadata));
            }
            Value::Object(fields)
        }
        Err(_) => {
            serde_json::from_str(object.get()).map_err(|error| RecordingError::InvalidJson {
                line,
                message: error.to_string(),
            })?
        }
    };
    validate_identity(&identity, line)
}

/// Whether an object is a `v1` Pod or Namespace with its identity, its identifying fields
/// read as strings borrowed from the text (no escapes): the common case, checked without
/// building JSON values. Anything else is not decided here: [`validate_kube_object`] reads it
/// into values and names what is wrong, if anything is.
fn is_plainly_valid(text: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Identity<'a> {
        #[serde(rename = "apiVersion", borrow)]
        api_version: Option<&'a str>,
        #[serde(borrow)]
        kind: Option<&'a str>,
        #[serde(borrow)]
        metadata: Option<IdentityMeta<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct IdentityMeta<'a> {
        #[serde(borrow)]
        uid: Option<&'a str>,
        #[serde(borrow)]
        name: Option<&'a str>,
    }
    let Ok(identity) = serde_json::from_str::<Identity>(text) else {
        return false;
    };
    let Some(metadata) = identity.metadata else {
        return false;
    };
    let id = match identity.kind {
        Some("Pod") => metadata.uid,
        Some("Namespace") => metadata.name,
        _ => return false,
    };
    identity.api_version == Some("v1") && id.is_some_and(|id| !id.is_empty())
}

/// [`validate_kube_object`] on the fields that identify the object.
fn validate_identity(object: &Value, line: usize) -> Result<(), RecordingError> {
    let wrong_type = |field: &str, expected: &str, found: &Value| RecordingError::WrongType {
        line,
        field: field.to_string(),
        message: format!("expected {expected}, found {}", describe(found)),
    };
    let missing = |field: &str, context: &str| RecordingError::MissingField {
        line,
        field: field.to_string(),
        context: context.to_string(),
    };
    let Value::Object(map) = object else {
        return Err(wrong_type("object", "a JSON object", object));
    };
    let api_version = string_field(
        map,
        "apiVersion",
        "object.apiVersion",
        "every kube object has it",
        line,
    )?;
    if api_version != "v1" {
        return Err(RecordingError::InvalidValue {
            line,
            field: "object.apiVersion".to_string(),
            reason: format!("expected \"v1\" (a core v1 Pod or Namespace), found {api_version:?}"),
        });
    }
    let kind = string_field(map, "kind", "object.kind", "every kube object has it", line)?;
    let (id_field, id_path, context) = match kind {
        "Pod" => ("uid", "object.metadata.uid", "pods are identified by it"),
        "Namespace" => (
            "name",
            "object.metadata.name",
            "namespaces are identified by it",
        ),
        other => {
            return Err(RecordingError::InvalidValue {
                line,
                field: "object.kind".to_string(),
                reason: format!("expected \"Pod\" or \"Namespace\", found {other:?}"),
            })
        }
    };
    let metadata = match map.get("metadata") {
        None | Some(Value::Null) => return Err(missing("object.metadata", context)),
        Some(Value::Object(metadata)) => metadata,
        Some(other) => return Err(wrong_type("object.metadata", "a JSON object", other)),
    };
    string_field(metadata, id_field, id_path, context, line)?;
    Ok(())
}

/// A required, non-empty string field `name` of `map` (whose JSON path is `path`).
fn string_field<'m>(
    map: &'m Map<String, Value>,
    name: &str,
    path: &str,
    context: &str,
    line: usize,
) -> Result<&'m str, RecordingError> {
    match map.get(name) {
        None | Some(Value::Null) => Err(RecordingError::MissingField {
            line,
            field: path.to_string(),
            context: context.to_string(),
        }),
        Some(Value::String(s)) if s.is_empty() => Err(RecordingError::InvalidValue {
            line,
            field: path.to_string(),
            reason: "empty".to_string(),
        }),
        Some(Value::String(s)) => Ok(s.as_str()),
        Some(other) => Err(RecordingError::WrongType {
            line,
            field: path.to_string(),
            message: format!("expected a string, found {}", describe(other)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).unwrap()
    }

    #[test]
    fn plain_objects_pass_at_once_and_the_others_are_read_whole() {
        let plain = [
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"uid":"u1","name":"a"}}"#,
            r#"{"kind":"Namespace","metadata":{"name":"ns"},"apiVersion":"v1"}"#,
        ];
        for text in plain {
            assert!(is_plainly_valid(text), "{text}");
            assert!(validate_kube_object(&raw(text), 1).is_ok(), "{text}");
        }
        // Valid, but with an escape in a field read: not plain, and still accepted.
        let escaped = r#"{"apiVersion":"v1","kind":"P\u006fd","metadata":{"uid":"u1"}}"#;
        assert!(!is_plainly_valid(escaped));
        assert!(validate_kube_object(&raw(escaped), 1).is_ok());
        // Invalid: not plain, and the error names the field.
        for (text, field) in [
            (
                r#"{"apiVersion":"v2","kind":"Pod","metadata":{"uid":"u"}}"#,
                "object.apiVersion",
            ),
            (
                r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a"}}"#,
                "object.metadata.uid",
            ),
            (
                r#"{"apiVersion":"v1","kind":"Pod","metadata":{"uid":""}}"#,
                "object.metadata.uid",
            ),
            (
                r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"uid":"u"}}"#,
                "object.metadata.name",
            ),
            (
                r#"{"apiVersion":"v1","kind":"Job","metadata":{"uid":"u"}}"#,
                "object.kind",
            ),
            (
                r#"{"apiVersion":"v1","kind":"Pod","metadata":{"uid":7}}"#,
                "object.metadata.uid",
            ),
            (r#"{"apiVersion":"v1","kind":"Pod"}"#, "object.metadata"),
        ] {
            assert!(!is_plainly_valid(text), "{text}");
            let error = validate_kube_object(&raw(text), 1).unwrap_err().to_string();
            assert!(error.contains(field), "{text}: {error}");
        }
    }
}
