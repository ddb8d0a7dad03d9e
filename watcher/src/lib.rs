//! The first stage of zbridge: what processes do on this host.
//!
//! The watcher turns the kernel's proc connector (fork, exec, exit) into [`ProcEvent`]s, each
//! carrying the facts `/proc` held about the process at that moment ([`ProcFacts`]: its cgroup
//! v2 path and id, its network namespace and addresses). It knows nothing of pods or BPF maps.
//!
//! Events come from an [`EventSource`]: the live kernel ([`live::LiveSource`]) or a recording
//! ([`recording::RecordingReader`], format v1 of `shared/spec/recording-v1.md`). Recordings also
//! carry Kubernetes records, which the watcher passes through as opaque JSON for the resolver.
//! [`dirwatch`] reports directories (the standalone mode's cgroup subtrees) coming and going.

mod cgroup_paths;
pub mod connector;
pub mod dirwatch;
pub mod event;
pub mod exec_tap;
pub mod hostns;
pub mod live;
pub mod procfs;
pub mod recording;

pub use event::{
    CgroupId, CgroupRef, KubeAction, KubeRecord, Pid, ProcEvent, ProcFacts, Record, ScannedProcess,
    TimedRecord,
};

/// Anything that yields timestamped records: the kernel, or a recording.
///
/// `Ok(None)` means the source is finished (end of file, or a stop was requested).
pub trait EventSource {
    /// The next record, blocking until one is available or the source ends.
    fn next_record(&mut self) -> Result<Option<TimedRecord>, SourceError>;
}

/// Why a source could not produce its next record.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Connector(#[from] connector::ConnectorError),
    #[error(transparent)]
    Recording(#[from] recording::RecordingError),
}
