//! The log's lines written to stderr by a thread of their own (`zbridge run`): a thread that
//! logs formats its line and queues it, instead of waiting for the write to the log file or
//! pipe. The resolver logs each pod's decision on the hot path between a new pod's first exec
//! and its map entry, and a write there is a system call on a file or pipe shared with
//! everything else the node logs (BENCHMARKS.md, "Enrolment latency of new pods").
//!
//! Lines keep their order and none is dropped: a full queue makes the logging thread wait, as
//! a slow stderr did before. [`std::io::Write::flush`] (reached through `log::logger().flush()`)
//! waits until every line queued before it is written; the binary flushes before it prints an
//! error and before it exits, so the log ends with the last line and the error comes after it.

use std::io::{self, Write};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

/// Lines queued before a logging thread waits.
const QUEUE_LINES: usize = 4096;

enum Message {
    Line(Vec<u8>),
    /// Answered once everything queued before it is written.
    Flush(Sender<()>),
}

/// A `Write` that queues each complete line for the writing thread.
pub struct BackgroundStderr {
    queue: Sender<Message>,
    /// The line being formatted (a record is written in several pieces).
    partial: Vec<u8>,
    _thread: JoinHandle<()>,
}

impl BackgroundStderr {
    /// Starts the thread that writes to `out` (stderr in the binary).
    pub fn start(out: impl Write + Send + 'static) -> io::Result<BackgroundStderr> {
        let (queue, lines) = bounded(QUEUE_LINES);
        let thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_lines(lines, out))?;
        Ok(BackgroundStderr {
            queue,
            partial: Vec::new(),
            _thread: thread,
        })
    }
}

/// The writing thread: lines in order; a write error is reported on the next line's place
/// once, as there is nowhere else to say it.
fn write_lines(lines: Receiver<Message>, mut out: impl Write) {
    let mut failed = false;
    for message in lines {
        match message {
            Message::Line(line) => {
                if let Err(e) = out.write_all(&line) {
                    if !failed {
                        // Best effort: the stream itself is what failed.
                        let _ = writeln!(out, "zbridge: writing the log failed: {e}");
                    }
                    failed = true;
                }
            }
            Message::Flush(done) => {
                let _ = out.flush();
                let _ = done.send(());
            }
        }
    }
}

impl Write for BackgroundStderr {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.partial.extend_from_slice(bytes);
        // A record ends with its newline (simplelog's `writeln!`); one inside the message
        // stays with the rest of its record.
        if self.partial.ends_with(b"\n") {
            let line = std::mem::take(&mut self.partial);
            self.queue
                .send(Message::Line(line))
                .map_err(|_| io::Error::other("the log writer thread has ended"))?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            let _ = self.queue.send(Message::Line(line));
        }
        let (done, written) = bounded(1);
        self.queue
            .send(Message::Flush(done))
            .map_err(|_| io::Error::other("the log writer thread has ended"))?;
        written
            .recv()
            .map_err(|_| io::Error::other("the log writer thread has ended"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A `Write` whose bytes the test can read, counting the write calls.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Shared {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let mut inner = self.0.lock().unwrap();
            inner.0.extend_from_slice(bytes);
            inner.1 += 1;
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_whole_in_order_and_flush_waits_for_them() {
        let out = Shared::default();
        let mut writer = BackgroundStderr::start(out.clone()).unwrap();
        for i in 0..10_000 {
            // A record in pieces, as simplelog writes it; one has a newline inside.
            write!(writer, "2026 [INFO] ").unwrap();
            if i == 5 {
                writeln!(writer, "first half\nsecond half").unwrap();
            } else {
                writeln!(writer, "line {i}").unwrap();
            }
        }
        writer.flush().unwrap();
        let (bytes, writes) = out.0.lock().unwrap().clone();
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 10_001);
        assert_eq!(lines[5], "2026 [INFO] first half");
        assert_eq!(lines[6], "second half");
        assert_eq!(lines[10_000], "2026 [INFO] line 9999");
        assert!(lines
            .iter()
            .skip(7)
            .enumerate()
            .all(|(i, l)| *l == format!("2026 [INFO] line {}", i + 6)));
        // One write per record: a record is never split across writes.
        assert_eq!(writes, 10_000);
    }
}
