//! Recordings, format v1 (`shared/spec/recording-v1.md`): reader and writer.

/// Errors reading or writing a recording.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("recording: not implemented yet")]
    NotImplemented,
}
