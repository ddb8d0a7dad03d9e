//! The third stage of zbridge: the BPF programs and their maps.
//!
//! The programmer loads the object clang built from `bpf/`, attaches its programs to a cgroup,
//! pins maps and links so redirection survives an agent restart, and applies the resolver's
//! [`resolver::Update`]s to the maps in batches ([`Programmer`]). Where the operations land is
//! a [`MapBackend`]: the kernel's maps, or memory ([`MemoryBackend`]) for replay and tests.

pub mod backend;
pub mod layout;
pub mod memory;
pub mod programmer;

pub use backend::{MapBackend, MapBatch};
pub use memory::MemoryBackend;
pub use programmer::{Programmer, ProgrammerConfig};

/// Errors of the programmer; each names the map or program concerned.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("map `{map}`: {op} failed: {source}")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}
