//! SIGHUP's re-read of the workloads file, off the main thread. The main thread answers the
//! signals; a file within the limits can still take seconds to parse (millions of YAML
//! events), and a SIGTERM must not wait for that. The read runs on a thread of its own and
//! sends the parsed file back; the main loop applies it when it arrives, so an agent stopped
//! meanwhile never applies it.
//!
//! A read is never waited for: on SIGTERM the agent stops and the reading thread ends with
//! the process. It is safe to drop wherever it is, because it only reads the file and parses
//! it into memory of its own; nothing reaches the maps but through the main loop. Until the
//! process exits it still takes a CPU and the parser's memory; joining it, even with a bound,
//! would make the stop wait for the very parse this avoids waiting for.

use std::path::PathBuf;

use crossbeam_channel::{bounded, Receiver, Sender};
use resolver::Workloads;

use super::load_workloads;

/// The result of one read of the file.
pub(super) type Read = anyhow::Result<Workloads>;

/// The re-reads of a standalone agent's workloads file: at most one under way.
pub(super) struct Reloads {
    /// The workloads file; `None` in Kubernetes mode, which has none.
    path: Option<PathBuf>,
    /// Whether the running agent serves ZDS: a file that changes this cannot be applied.
    in_pod: bool,
    tx: Sender<Read>,
    rx: Receiver<Read>,
    /// A read is under way.
    reading: bool,
    /// A SIGHUP came during that read: the file may have changed after the read began, so it
    /// is read once more when the read ends.
    again: bool,
}

impl Reloads {
    pub(super) fn new(path: Option<PathBuf>, in_pod: bool) -> Reloads {
        // One read at a time, and the main loop takes each result: one slot never blocks.
        let (tx, rx) = bounded(1);
        Reloads {
            path,
            in_pod,
            tx,
            rx,
            reading: false,
            again: false,
        }
    }

    /// On SIGHUP: starts a read of the file, or, while one is under way, asks for another
    /// after it.
    pub(super) fn request(&mut self) {
        let Some(path) = &self.path else {
            log::info!("SIGHUP: nothing to re-read in Kubernetes mode");
            return;
        };
        if self.reading {
            log::info!(
                "SIGHUP: {} is being read; it is read again when that read ends",
                path.display()
            );
            self.again = true;
            return;
        }
        let (file, tx) = (path.clone(), self.tx.clone());
        let started = std::thread::Builder::new()
            .name("reload".into())
            .spawn(move || {
                // The receiver is gone only when the agent stops: the result is not wanted.
                let _ = tx.send(load_workloads(&file));
            });
        match started {
            // The thread's handle is dropped: it is never joined (see the module's comment).
            Ok(_) => {
                log::info!("SIGHUP: reading {}", path.display());
                self.reading = true;
            }
            Err(e) => log::error!(
                "SIGHUP: cannot start a thread to read {}: {e}; the previous workloads file \
                 stays in force",
                path.display()
            ),
        }
    }

    /// Where the reads' results arrive, for the main loop's `select!`.
    pub(super) fn done(&self) -> &Receiver<Read> {
        &self.rx
    }

    /// Takes a read's result from [`done`](Self::done): the file to apply, or `None` when it
    /// is refused (said in the log). Starts the read asked for meanwhile, if any.
    pub(super) fn finished(&mut self, read: Read) -> Option<Workloads> {
        self.reading = false;
        if std::mem::take(&mut self.again) {
            self.request();
        }
        let path = self.path.as_ref()?;
        match read {
            Ok(new) if new.in_pod() != self.in_pod => {
                log::error!(
                    "SIGHUP: {}: ztunnel.mode changed ({} → {}); the ZDS server starts or \
                     stops only with the agent: restart it to apply this file; the previous \
                     workloads file stays in force",
                    path.display(),
                    if self.in_pod { "inpod" } else { "node" },
                    if self.in_pod { "node" } else { "inpod" }
                );
                None
            }
            Ok(new) => {
                log::info!("SIGHUP: re-read {}", path.display());
                Some(new)
            }
            Err(e) => {
                log::error!("SIGHUP: {e:#}; the previous workloads file stays in force");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const NODE: &str = "version: 1\nztunnel: {cgroup: /zt, address: 10.0.0.1}\n";
    const INPOD: &str = "version: 2\nztunnel: {cgroup: /zt, mode: inpod, zds: /run/zds.sock}\n";

    /// Replaces the file whole, as a read under way may be reading it.
    fn put(path: &std::path::Path, text: &str) {
        let new = path.with_extension("new");
        std::fs::write(&new, text).unwrap();
        std::fs::rename(new, path).unwrap();
    }

    fn next(reloads: &mut Reloads) -> Option<Workloads> {
        let read = reloads.done().recv_timeout(Duration::from_secs(10));
        reloads.finished(read.expect("a read ends"))
    }

    #[test]
    fn a_sighup_during_a_read_reads_again_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.yaml");
        put(&path, NODE);
        let mut reloads = Reloads::new(Some(path.clone()), false);
        reloads.request();
        reloads.request();
        put(&path, &NODE.replace("10.0.0.1", "10.0.0.2"));
        assert!(next(&mut reloads).is_some());
        // The second read started when the first ended, so it saw the file as it is now.
        let second = next(&mut reloads).expect("read again");
        assert_eq!(
            second,
            Workloads::parse(&NODE.replace("10.0.0.1", "10.0.0.2")).unwrap()
        );
        assert!(reloads.done().try_recv().is_err(), "two SIGHUPs, two reads");
    }

    #[test]
    fn refused_files_and_a_changed_mode_are_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.yaml");
        let mut reloads = Reloads::new(Some(path.clone()), false);
        put(&path, "version: 1\nzombies: []\n");
        reloads.request();
        assert!(next(&mut reloads).is_none());
        put(&path, INPOD);
        reloads.request();
        assert!(next(&mut reloads).is_none());
    }

    #[test]
    fn kubernetes_mode_reads_nothing() {
        let mut reloads = Reloads::new(None, false);
        reloads.request();
        assert!(!reloads.reading);
        assert!(reloads
            .done()
            .recv_timeout(Duration::from_millis(50))
            .is_err());
    }
}
