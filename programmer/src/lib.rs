//! The third stage of zbridge: the BPF programs and their maps.
//!
//! The programmer loads the object clang built from `bpf/` ([`object`]), attaches its programs
//! to a cgroup and pins maps and links so redirection survives an agent restart
//! ([`loader`], in a pin directory only root can write: [`pins`]), and applies the resolver's
//! [`resolver::Update`]s to the maps in batches ([`Programmer`]). Where the operations land is
//! a [`MapBackend`]: the kernel's maps ([`KernelMaps`]), or memory: sorted for tests
//! ([`MemoryBackend`]), hashed for replay ([`HashedMemoryBackend`]).

pub mod backend;
pub mod inbound;
pub mod inpod;
pub mod inspect;
pub mod kernel_maps;
pub mod layout;
pub mod loader;
pub mod memory;
pub mod object;
pub mod pins;
pub mod programmer;
pub mod sys;
pub mod ztunnel_socket;

use std::path::PathBuf;

pub use backend::{MapBackend, MapBatch};
pub use inspect::{read_counters, read_thread_record, read_tuple_records, TupleRecord};
pub use kernel_maps::{BatchMode, KernelMaps};
pub use layout::Counters;
pub use loader::{detach, LoadReport, Loaded, LoaderConfig};
pub use memory::{HashedMemoryBackend, MemoryBackend};
pub use pins::{check_pin_dir, PinDirError, PinDirStatus};
pub use programmer::{Batching, Programmer, ProgrammerConfig};

/// Errors of the programmer; each names the map, program or path concerned.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("map `{map}`: {op} failed: {error}")]
    Map {
        map: &'static str,
        op: &'static str,
        // Not named `source` (thiserror takes such a field as the cause): the message ends
        // with it, and a chain printer (anyhow's
        // `{:#}`) would print it twice.
        error: std::io::Error,
    },
    /// The BPF object could not be parsed or lacks something the loader needs.
    #[error("BPF object: {0}")]
    Object(String),
    /// A program did not load; `detail` holds the verifier's last words when it refused.
    #[error("program `{program}`: {detail}")]
    Program { program: String, detail: String },
    /// A program could not be attached to (or its link re-pointed at) a cgroup.
    #[error("program `{program}`: attach to cgroup {cgroup}: {detail}")]
    Attach {
        program: String,
        cgroup: PathBuf,
        detail: String,
    },
    /// A file operation on the pin directory or a cgroup.
    #[error("{path}: {op}: {error}")]
    Path {
        path: PathBuf,
        op: &'static str,
        // Not named `source` (thiserror takes such a field as the cause): the message ends
        // with it, and a chain printer (anyhow's
        // `{:#}`) would print it twice.
        error: std::io::Error,
    },
    /// The pin directory is not on a bpffs, or someone other than root could change it.
    #[error(transparent)]
    PinDir(#[from] pins::PinDirError),
}

impl ProgramError {
    pub(crate) fn path(path: impl Into<PathBuf>, op: &'static str, error: std::io::Error) -> Self {
        ProgramError::Path {
            path: path.into(),
            op,
            error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain printer (anyhow's `{:#}`) prints a message and then each `source()`: the I/O
    /// error is in the message, so it must not be a source too.
    #[test]
    fn an_io_error_is_printed_once_in_a_chain() {
        let errors = [
            ProgramError::path("/x", "open", std::io::Error::from_raw_os_error(21)),
            ProgramError::Map {
                map: "settings",
                op: "lookup",
                error: std::io::Error::from_raw_os_error(21),
            },
        ];
        for e in errors {
            let mut chain = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                chain.push_str(&format!(": {c}"));
                cause = c.source();
            }
            assert_eq!(chain.matches("Is a directory").count(), 1, "{chain}");
        }
    }
}
