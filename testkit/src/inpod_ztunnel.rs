//! A fake in-pod ztunnel for end-to-end tests: `zbt-net inpod-ztunnel` (testkit's helper,
//! `helper/inpod.rs`), a process in ztunnel's test cgroup that connects to the agent's ZDS
//! socket, acks each pod once it has opened ztunnel's listeners inside the pod's network
//! namespace (the one handed over), and reports what it was sent and what it accepted.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::ztunnel::{fields, Accepted, Helper};
use crate::TestCgroup;

/// How the fake behaves.
#[derive(Debug, Clone, Default)]
pub struct InPodOptions {
    /// Refuse the first N `add`s of these pod uids (an ack with an error).
    pub nack: Vec<(String, u32)>,
    /// Connect onward to each connection's original destination, as ztunnel does.
    pub upstream: bool,
}

/// What the fake saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZdsEvent {
    /// A pod was added; its listeners are open in the namespace of inode `netns`.
    Add {
        uid: String,
        namespace: String,
        name: String,
        service_account: String,
        netns: u64,
    },
    /// An `add` refused (`InPodOptions::nack`).
    Nack {
        uid: String,
    },
    Del {
        uid: String,
    },
    Keep {
        uid: String,
    },
    Snapshot,
    /// A connection accepted on one of a pod's listeners.
    Accepted {
        uid: String,
        accepted: Accepted,
    },
    /// A DNS question over UDP (echoed back).
    Dns {
        uid: String,
        local: SocketAddr,
        peer: SocketAddr,
    },
    /// A malformed request (answered with an error).
    Error(String),
    /// The agent closed the connection.
    Closed,
}

impl ZdsEvent {
    fn parse(line: &str) -> Option<ZdsEvent> {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        let f = fields(rest);
        let text = |k: &str| f.get(k).map(|v| v.to_string());
        Some(match word {
            "add" => ZdsEvent::Add {
                uid: text("uid")?,
                namespace: text("namespace")?,
                name: text("name")?,
                service_account: text("sa")?,
                netns: f.get("netns")?.parse().ok()?,
            },
            "nack" => ZdsEvent::Nack { uid: text("uid")? },
            "del" => ZdsEvent::Del { uid: text("uid")? },
            "keep" => ZdsEvent::Keep { uid: text("uid")? },
            "snapshot" => ZdsEvent::Snapshot,
            "accept" => ZdsEvent::Accepted {
                uid: text("uid")?,
                accepted: Accepted::parse(line)?,
            },
            "dns" => ZdsEvent::Dns {
                uid: text("uid")?,
                local: f.get("local")?.parse().ok()?,
                peer: f.get("peer")?.parse().ok()?,
            },
            "error" => ZdsEvent::Error(rest.to_string()),
            "closed" => ZdsEvent::Closed,
            _ => return None,
        })
    }
}

/// The running fake; killed (by its PID) on drop, which closes its ZDS connection and every
/// listener it opened.
pub struct InPodZtunnel {
    helper: Helper,
}

impl InPodZtunnel {
    /// Starts the fake in `cgroup`/`path` (ztunnel's cgroup) and waits until it has connected
    /// to `zds` and said hello.
    pub fn start(
        cgroup: &TestCgroup,
        path: &str,
        zds: &Path,
        options: &InPodOptions,
    ) -> std::io::Result<InPodZtunnel> {
        let mut args = vec![
            "inpod-ztunnel".to_string(),
            "--zds".into(),
            zds.display().to_string(),
        ];
        for (uid, n) in &options.nack {
            args.push("--nack".into());
            args.push(format!("{uid}:{n}"));
        }
        if options.upstream {
            args.push("--upstream".into());
        }
        let helper = Helper::spawn_in_cgroup(cgroup, path, &args)?;
        helper.wait_ready()?;
        Ok(InPodZtunnel { helper })
    }

    /// The next event, waiting at most `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<ZdsEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.helper.line(left)?;
            match ZdsEvent::parse(&line) {
                Some(event) => return Some(event),
                None => eprintln!("testkit: unexpected inpod-ztunnel line: {line}"),
            }
        }
    }

    /// Events until one matches `want` (returned), failing after `timeout` with those seen.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        want: impl Fn(&ZdsEvent) -> bool,
    ) -> ZdsEvent {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some(e) if want(&e) => return e,
                Some(e) => seen.push(e),
                None => panic!("fake in-pod ztunnel: no {what} within {timeout:?}; saw {seen:?}"),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.helper.pid()
    }
}
