//! A fake in-pod ztunnel (ztunnel's `shared` mode): a `zbt-net inpod-ztunnel` process that is
//! a ZDS client of the agent's socket, and reports every request it got and every connection
//! its listeners accepted as a typed [`ZdsEvent`].
//!
//! It runs in a test cgroup of the caller's choosing (ztunnel's, so that the agent never
//! captures its sockets) and in the test's own network namespace (the host's): like ztunnel,
//! it enters each pod's namespace itself, with the descriptor that came with the pod's `add`,
//! and opens ztunnel's listeners there (TCP `[::]:15001`, `[::]:15006`, `[::]:15008`, TCP and
//! UDP `127.0.0.1:15053` and `[::1]:15053`, marked 1337), acking the `add` only once they are
//! all bound. Its protobuf is coded by hand, apart from the agent's, so that a test checks the
//! agent's encoding against an independent one. What it does exactly is in the doc comment of
//! `helper/zbt_net/inpod_ztunnel.rs`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::ztunnel::{fields, Accepted, Helper};
use crate::TestCgroup;

/// ztunnel's DNS port in each pod's namespace (TCP and UDP, loopback only).
pub const DNS: u16 = 15053;

/// The error text of an `add` refused with `--nack`.
pub const FAKE_NACK: &str = "fake nack";

/// How the fake behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InPodOptions {
    /// `(uid, n)`: the first `n` adds of `uid` are answered with the error [`FAKE_NACK`] and
    /// open no listeners; later ones are acked normally.
    pub nack: Vec<(String, u32)>,
    /// Never answer any request (a hung ztunnel); requests are still reported and listeners
    /// still opened.
    pub no_ack: bool,
    /// Connect onward to each connection's original destination (from the pod's namespace,
    /// marked 1337, inbound bound to the client's address) and proxy, as ztunnel does, so that
    /// a capture loop shows as a growing number of accepted connections. Without it each
    /// connection gets its one byte echoed.
    pub pass_through: bool,
    /// The version in `ZdsHello` (ztunnel sends 1, `V1`).
    pub hello_version: u32,
    /// As ztunnel when its node agent restarts: the connection's end keeps the pods' listeners
    /// open and the fake connects again ([`ZdsEvent::Closed`], then [`ZdsEvent::Ready`]);
    /// each session's `snapshot_sent` closes the pods held that were neither added nor kept
    /// in it ([`ZdsEvent::Dropped`]).
    pub reconnect: bool,
}

impl Default for InPodOptions {
    fn default() -> Self {
        InPodOptions {
            nack: Vec::new(),
            no_ack: false,
            pass_through: false,
            hello_version: 1,
            reconnect: false,
        }
    }
}

/// What the fake reported, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZdsEvent {
    /// Connected to the ZDS socket and sent the hello.
    Ready,
    /// An `add` came (with its namespace descriptor, whose inode is `netns_inode`) and was
    /// carried out: the pod's listeners are open, unless a [`ZdsEvent::Nack`] follows. Its
    /// ack comes next (unless [`InPodOptions::no_ack`]).
    Add {
        uid: String,
        name: String,
        namespace: String,
        service_account: String,
        netns_inode: u64,
    },
    /// The last `add` of `uid` was answered with this (non-empty) error: `--nack`, or its
    /// listeners could not be opened.
    Nack {
        uid: String,
        error: String,
    },
    /// A `del` came; the pod's listeners were closed before the ack.
    Del {
        uid: String,
    },
    Keep {
        uid: String,
    },
    /// `snapshot_sent` came.
    Snapshot,
    /// With [`InPodOptions::reconnect`]: pod `uid` was held from an earlier session and was
    /// neither added nor kept before this session's `snapshot_sent`, so it was closed, as
    /// ztunnel's reconcile drops it.
    Dropped {
        uid: String,
    },
    /// A listener of pod `uid` accepted a TCP connection (`orig` only on 15001 and 15006;
    /// `upstream` only with pass-through, errno 40 (ELOOP) when the fake refused to connect
    /// to its own listener).
    Accepted {
        uid: String,
        accepted: Accepted,
    },
    /// A DNS datagram reached pod `uid`'s UDP 15053 (and was answered).
    Udp {
        uid: String,
        local: SocketAddr,
        peer: SocketAddr,
    },
    /// The agent closed the connection; the fake exits with status 0 (with
    /// [`InPodOptions::reconnect`], it connects again).
    Closed,
    /// A protocol violation (the fake exits with status 3, dropping the connection), or a
    /// fatal start-up failure (status 1). The text after `error`/`fatal`.
    Error(String),
}

impl ZdsEvent {
    /// Parses one helper line; `None` for a line that is no event.
    fn parse(line: &str) -> Option<ZdsEvent> {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        let f = fields(rest);
        let text = |key: &str| f.get(key).map(|v| decode(v));
        Some(match word {
            "ready" => ZdsEvent::Ready,
            "add" => ZdsEvent::Add {
                uid: text("uid")?,
                name: text("name")?,
                namespace: text("namespace")?,
                service_account: text("sa")?,
                netns_inode: f.get("netns")?.parse().ok()?,
            },
            "nack" => ZdsEvent::Nack {
                uid: text("uid")?,
                error: text("error")?,
            },
            "del" => ZdsEvent::Del { uid: text("uid")? },
            "keep" => ZdsEvent::Keep { uid: text("uid")? },
            "snapshot" => ZdsEvent::Snapshot,
            "dropped" => ZdsEvent::Dropped { uid: text("uid")? },
            "accept" => ZdsEvent::Accepted {
                uid: text("uid")?,
                accepted: Accepted::parse(line)?,
            },
            "udp" => ZdsEvent::Udp {
                uid: text("uid")?,
                local: f.get("local")?.parse().ok()?,
                peer: f.get("peer")?.parse().ok()?,
            },
            "closed" => ZdsEvent::Closed,
            "error" | "fatal" => ZdsEvent::Error(rest.to_string()),
            _ => return None,
        })
    }
}

/// Undoes the helper's `%XX` escapes (bytes outside `[A-Za-z0-9._:/-]`).
fn decode(s: &str) -> String {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let hex = s.get(i + 1..i + 3).filter(|_| bytes[i] == b'%');
        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The running fake, killed (by its PID) and reaped on drop.
pub struct InPodZtunnel {
    helper: Helper,
}

impl InPodZtunnel {
    /// Starts the fake in `cgroup`/`cgroup_path`, connecting to the ZDS socket `zds`, and
    /// waits (10 s at most) until it has connected and sent its hello. The socket must be
    /// listening by then (the fake retries for about 5 s): a server that has not called
    /// `listen` yet is fine only if it will within that time; use [`InPodZtunnel::launch`] to
    /// start the fake first.
    pub fn start(
        cgroup: &TestCgroup,
        cgroup_path: &str,
        zds: &Path,
        options: InPodOptions,
    ) -> std::io::Result<Self> {
        let fake = Self::launch(cgroup, cgroup_path, zds, options)?;
        match fake.next_event(Duration::from_secs(10)) {
            Some(ZdsEvent::Ready) => Ok(fake),
            Some(other) => Err(std::io::Error::other(format!(
                "fake in-pod ztunnel: {other:?}"
            ))),
            None => Err(std::io::Error::other(
                "fake in-pod ztunnel: not ready within 10 s",
            )),
        }
    }

    /// Like [`InPodZtunnel::start`] without waiting: its first event is [`ZdsEvent::Ready`]
    /// (or an error).
    pub fn launch(
        cgroup: &TestCgroup,
        cgroup_path: &str,
        zds: &Path,
        options: InPodOptions,
    ) -> std::io::Result<Self> {
        let zds = zds.to_str().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "ZDS path not UTF-8")
        })?;
        let mut args = vec![
            "inpod-ztunnel".to_string(),
            "--zds".into(),
            zds.into(),
            "--hello-version".into(),
            options.hello_version.to_string(),
        ];
        for (uid, n) in &options.nack {
            args.push("--nack".into());
            args.push(format!("{uid}:{n}"));
        }
        if options.no_ack {
            args.push("--no-ack".into());
        }
        if options.pass_through {
            args.push("--pass-through".into());
        }
        if options.reconnect {
            args.push("--reconnect".into());
        }
        Ok(InPodZtunnel {
            helper: Helper::spawn_in_cgroup(cgroup, cgroup_path, &args)?,
        })
    }

    /// The next event, waiting at most `timeout`; `None` on timeout or once the fake has
    /// exited and everything it said was read.
    pub fn next_event(&self, timeout: Duration) -> Option<ZdsEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let line = self
                .helper
                .line(deadline.saturating_duration_since(Instant::now()))?;
            match ZdsEvent::parse(&line) {
                Some(event) => return Some(event),
                None => eprintln!("testkit: unexpected in-pod ztunnel line: {line}"),
            }
        }
    }

    /// Waits at most `timeout` for the first event that `wanted` accepts, passing over the
    /// others; `Err` with every event seen when none came.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut wanted: impl FnMut(&ZdsEvent) -> bool,
    ) -> Result<ZdsEvent, Vec<ZdsEvent>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(event) = self.next_event(deadline.saturating_duration_since(Instant::now()))
        {
            if wanted(&event) {
                return Ok(event);
            }
            seen.push(event);
        }
        Err(seen)
    }

    /// Everything reported so far, without waiting.
    pub fn drain(&self) -> Vec<ZdsEvent> {
        std::iter::from_fn(|| self.next_event(Duration::ZERO)).collect()
    }

    /// Waits at most `timeout` for the fake to exit; its status, or `None` if it still runs.
    pub fn exit_status(&mut self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.helper.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.helper.pid()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_lines_parse_into_events() {
        assert_eq!(
            ZdsEvent::parse("add uid=u-1 name=p%20q namespace= sa=default netns=4026532438"),
            Some(ZdsEvent::Add {
                uid: "u-1".into(),
                name: "p q".into(),
                namespace: String::new(),
                service_account: "default".into(),
                netns_inode: 4026532438,
            })
        );
        assert_eq!(
            ZdsEvent::parse("nack uid=u error=fake%20nack"),
            Some(ZdsEvent::Nack {
                uid: "u".into(),
                error: FAKE_NACK.into()
            })
        );
        let accepted =
            ZdsEvent::parse("accept local=[::1]:15001 peer=[::1]:40058 uid=u orig-errno=2");
        let Some(ZdsEvent::Accepted { uid, accepted }) = accepted else {
            panic!("{accepted:?}");
        };
        assert_eq!(uid, "u");
        assert_eq!(accepted.local, "[::1]:15001".parse().unwrap());
        assert_eq!(accepted.orig, Some(Err(2)));
        assert_eq!(
            ZdsEvent::parse("error add uid=x with 0 descriptors, not 1"),
            Some(ZdsEvent::Error(
                "add uid=x with 0 descriptors, not 1".into()
            ))
        );
        assert_eq!(ZdsEvent::parse("snapshot"), Some(ZdsEvent::Snapshot));
        assert_eq!(
            ZdsEvent::parse("dropped uid=a%20b"),
            Some(ZdsEvent::Dropped { uid: "a b".into() })
        );
        assert_eq!(ZdsEvent::parse("bogus"), None);
    }

    #[test]
    fn escapes_decode_and_a_stray_percent_stays() {
        assert_eq!(decode("a%3Db%25"), "a=b%");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
    }
}
