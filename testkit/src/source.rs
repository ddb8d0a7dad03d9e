//! An event source the test feeds: records sent on a channel come out of `next_record` one at
//! a time, until the stop handle is stopped (as the live watcher ends).

use std::time::Duration;

use crossbeam_channel::Receiver;
use watcher::live::StopHandle;
use watcher::{EventSource, SourceError, TimedRecord};

/// A source fed by the test, one record at a time, until `stop`.
pub struct FedSource {
    pub records: Receiver<TimedRecord>,
    pub stop: StopHandle,
}

impl EventSource for FedSource {
    fn next_record(&mut self) -> Result<Option<TimedRecord>, SourceError> {
        loop {
            if self.stop.is_stopped() {
                return Ok(None);
            }
            if let Ok(r) = self.records.recv_timeout(Duration::from_millis(1)) {
                return Ok(Some(r));
            }
        }
    }
}
