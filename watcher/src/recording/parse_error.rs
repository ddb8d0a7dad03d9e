//! The error path of the reader: a record line that did not parse, turned into an error naming
//! its line and field.

use serde::de::IgnoredAny;
use serde_json::Value;

use super::{describe, RecordingError};

/// serde_json's message without its " at line L column C" (the line is always 1 here: it is
/// one line of the recording), with the column kept.
pub(super) fn message_without_position(err: &serde_json::Error) -> String {
    let message = err.to_string();
    match message.rfind(" at line ") {
        Some(cut) => format!("{} (column {})", &message[..cut], err.column()),
        None => message,
    }
}

/// Turns a failed parse of a record line into an error naming the field. The fast typed parse
/// does not say which field had the wrong type, so the line is parsed again (this is the error
/// path only) as a tree and each known field is checked on its own.
pub(super) fn json_error(err: &serde_json::Error, text: &[u8], line: usize) -> RecordingError {
    if !err.is_data() {
        return RecordingError::InvalidJson {
            line,
            message: message_without_position(err),
        };
    }
    let value: Value = match serde_json::from_slice(text) {
        Ok(value) => value,
        Err(err) => {
            return RecordingError::InvalidJson {
                line,
                message: message_without_position(&err),
            }
        }
    };
    let Value::Object(map) = &value else {
        return RecordingError::WrongType {
            line,
            field: "(record)".to_string(),
            message: format!("a record must be a JSON object, found {}", describe(&value)),
        };
    };
    if let Some((field, message)) = find_wrong_field(map, RECORD_FIELDS, "") {
        return RecordingError::WrongType {
            line,
            field,
            message,
        };
    }
    if let Some(Value::Array(entries)) = map.get("processes") {
        for (i, entry) in entries.iter().enumerate() {
            let prefix = format!("processes[{i}].");
            let Value::Object(entry) = entry else {
                return RecordingError::WrongType {
                    line,
                    field: format!("processes[{i}]"),
                    message: format!("expected a JSON object, found {}", describe(entry)),
                };
            };
            if let Some((field, message)) = find_wrong_field(entry, PROCESS_FIELDS, &prefix) {
                return RecordingError::WrongType {
                    line,
                    field,
                    message,
                };
            }
        }
    }
    // Not a type error of one field (e.g. a field given twice): name the field if serde did.
    let message = message_without_position(err);
    let field = message.split('`').nth(1).unwrap_or("(record)").to_string();
    RecordingError::InvalidValue {
        line,
        field,
        reason: message,
    }
}

/// A check that a JSON value fits a field's type, with serde's message when it does not.
type FieldCheck = fn(&Value) -> Result<(), String>;

fn fits<T: serde::de::DeserializeOwned>(value: &Value) -> Result<(), String> {
    T::deserialize(value)
        .map(|_| ())
        .map_err(|e| expected_found(&e.to_string()))
}

/// serde's "invalid type: string \"1\", expected u32" as "expected u32, found string \"1\"".
fn expected_found(message: &str) -> String {
    let found_expected = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "));
    match found_expected.and_then(|rest| rest.rsplit_once(", expected ")) {
        Some((found, expected)) => format!("expected {expected}, found {found}"),
        None => message.to_string(),
    }
}

fn fits_ips(value: &Value) -> Result<(), String> {
    fits::<Option<Vec<IgnoredAny>>>(value)?;
    if let Value::Array(items) = value {
        for (i, item) in items.iter().enumerate() {
            fits::<String>(item).map_err(|e| format!("[{i}]: {e}"))?;
        }
    }
    Ok(())
}

const PROCESS_FIELDS: &[(&str, FieldCheck)] = &[
    ("pid", fits::<Option<u32>>),
    ("cgroup", fits::<Option<String>>),
    ("cgroup_id", fits::<Option<u64>>),
    ("netns", fits::<Option<u64>>),
    ("ips", fits_ips),
    ("comm", fits::<Option<String>>),
];

const RECORD_FIELDS: &[(&str, FieldCheck)] = &[
    ("ts", fits::<Option<u64>>),
    ("type", fits::<Option<String>>),
    ("pid", fits::<Option<u32>>),
    ("tgid", fits::<Option<u32>>),
    ("cgroup", fits::<Option<String>>),
    ("cgroup_id", fits::<Option<u64>>),
    ("netns", fits::<Option<u64>>),
    ("ips", fits_ips),
    ("comm", fits::<Option<String>>),
    ("parent_pid", fits::<Option<u32>>),
    ("parent_tgid", fits::<Option<u32>>),
    ("child_pid", fits::<Option<u32>>),
    ("child_tgid", fits::<Option<u32>>),
    ("exit_code", fits::<Option<u32>>),
    ("processes", fits::<Option<Vec<IgnoredAny>>>),
    ("action", fits::<Option<String>>),
];

/// The first field of `map` (in `checks` order) whose value does not fit its type: its path
/// (with `prefix`) and why.
fn find_wrong_field(
    map: &serde_json::Map<String, Value>,
    checks: &[(&str, FieldCheck)],
    prefix: &str,
) -> Option<(String, String)> {
    checks.iter().find_map(|(name, check)| {
        let value = map.get(*name)?;
        match check(value) {
            Ok(()) => None,
            Err(message) => match message.strip_prefix('[') {
                // An `ips` item: name it in the path.
                Some(rest) => {
                    let (index, why) = rest.split_once("]: ").unwrap_or((rest, ""));
                    Some((format!("{prefix}{name}[{index}]"), why.to_string()))
                }
                None => Some((format!("{prefix}{name}"), message)),
            },
        }
    })
}
