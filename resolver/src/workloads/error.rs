//! Why a workloads file was refused.

use std::fmt;

use super::limits::{MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES};

/// A refused workloads file: which file (when it was read from one) and why.
#[derive(Debug)]
pub struct WorkloadsError {
    /// The path, for [`Workloads::load`](super::Workloads::load); `None` for parsed text.
    pub file: Option<String>,
    pub kind: WorkloadsErrorKind,
}

/// Why; every kind after the read names the line, and the key where there is one.
#[derive(Debug)]
#[non_exhaustive]
pub enum WorkloadsErrorKind {
    // The I/O error is in the message and not the error's source: a chain printer (anyhow's
    // `{:#}`) would print it twice.
    Read(std::io::Error),
    /// Larger than [`MAX_FILE_BYTES`].
    TooLarge,
    /// Nested deeper than [`MAX_DEPTH`], first at `line`.
    TooDeep {
        line: usize,
    },
    /// More than [`MAX_NODES`] YAML nodes, the bound passed at `line`.
    TooManyNodes {
        line: usize,
    },
    /// The YAML or a value in it; the parser's message names the key, line and column.
    Syntax(String),
    /// A check across the file: `key` is the value refused, at `line`.
    Refused {
        key: String,
        line: Option<usize>,
        reason: String,
    },
}

impl fmt::Display for WorkloadsError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "workloads file {file}: {}", self.kind),
            None => write!(f, "workloads file: {}", self.kind),
        }
    }
}

impl fmt::Display for WorkloadsErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            WorkloadsErrorKind::Read(e) => write!(f, "{e}"),
            WorkloadsErrorKind::TooLarge => {
                write!(f, "larger than {MAX_FILE_BYTES} bytes, the limit; not read")
            }
            WorkloadsErrorKind::TooDeep { line } => write!(
                f,
                "nested deeper than {MAX_DEPTH} levels, the limit, at line {line}"
            ),
            WorkloadsErrorKind::TooManyNodes { line } => write!(
                f,
                "more than {MAX_NODES} YAML nodes (a workload takes about ten), the limit, \
                 passed at line {line}; not parsed"
            ),
            WorkloadsErrorKind::Syntax(message) => f.write_str(message),
            WorkloadsErrorKind::Refused { key, line, reason } => {
                f.write_str(key)?;
                if let Some(line) = line {
                    write!(f, " (line {line})")?;
                }
                write!(f, ": {reason}")
            }
        }
    }
}

impl std::error::Error for WorkloadsError {}
