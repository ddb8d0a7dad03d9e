//! A fake ztunnel, a "remote service" and clients, as `zbt-net` helper processes placed in a
//! test cgroup and network namespace, reporting what really happened over channels.
//!
//! The fake ztunnel listens on 15001 and 15006 of its addresses; for each connection it asks
//! `SO_ORIGINAL_DST` (then `IP6T_SO_ORIGINAL_DST`, whatever the family) as ztunnel does,
//! reports the port it accepted on, the peer and the original destination (or the errno),
//! optionally connects upstream binding the client's address (as ztunnel does under TPROXY),
//! then echoes one byte.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::{NetNs, TestCgroup};

/// ztunnel's outbound and inbound capture ports.
pub const OUTBOUND: u16 = 15001;
pub const INBOUND: u16 = 15006;
/// ztunnel's HBONE port (reached directly, never captured).
pub const HBONE: u16 = 15008;

/// The path of the `zbt-net` helper binary built by testkit's build script.
pub fn helper_path() -> &'static str {
    concat!(env!("OUT_DIR"), "/zbt-net")
}

/// A running helper process, killed (by its PID) and reaped on drop; its stdout lines arrive
/// on a channel.
pub struct Helper {
    child: Child,
    lines: Receiver<String>,
}

impl Helper {
    /// Spawns `zbt-net ARGS` in `cgroup`/`path` and `ns`.
    pub fn spawn(
        ns: &NetNs,
        cgroup: &TestCgroup,
        path: &str,
        args: &[String],
    ) -> std::io::Result<Self> {
        let mut cmd = Command::new(helper_path());
        ns.place(&mut cmd, cgroup, path)?;
        Self::spawn_command(cmd, args)
    }

    /// Spawns `zbt-net ARGS` in `cgroup`/`path`, in the test process's own network namespace
    /// (the host's, for a process such as in-pod ztunnel that enters namespaces itself).
    pub fn spawn_in_cgroup(
        cgroup: &TestCgroup,
        path: &str,
        args: &[String],
    ) -> std::io::Result<Self> {
        let mut cmd = Command::new(helper_path());
        cgroup.joiner(path).apply(&mut cmd);
        Self::spawn_command(cmd, args)
    }

    fn spawn_command(mut cmd: Command, args: &[String]) -> std::io::Result<Self> {
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Helper { child, lines })
    }

    /// The next line, waiting at most `timeout`.
    pub fn line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Waits for `ready` (or fails with the helper's fatal line).
    pub fn wait_ready(&self) -> std::io::Result<()> {
        match self.lines.recv_timeout(Duration::from_secs(10)) {
            Ok(line) if line == "ready" => Ok(()),
            Ok(line) => Err(std::io::Error::other(format!("zbt-net: {line}"))),
            Err(e) => Err(std::io::Error::other(format!("zbt-net: not ready: {e}"))),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the process has exited (it is reaped then).
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key=value` fields of a helper line.
pub(crate) fn fields(line: &str) -> HashMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|f| f.split_once('='))
        .collect()
}

/// One connection a listener accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The address and port it was accepted on.
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// The original destination, or the errno of `getsockopt` (fake ztunnel only; `None`
    /// for a plain listener).
    pub orig: Option<Result<SocketAddr, i32>>,
    /// The local address of ztunnel's upstream connect, or its errno (when asked for).
    pub upstream: Option<Result<SocketAddr, i32>>,
}

impl Accepted {
    pub(crate) fn parse(line: &str) -> Option<Accepted> {
        let rest = line.strip_prefix("accept ")?;
        let f = fields(rest);
        let orig = if let Some(o) = f.get("orig") {
            Some(Ok(o.parse().ok()?))
        } else {
            f.get("orig-errno").map(|e| Err(e.parse().unwrap_or(-1)))
        };
        let upstream = if let Some(u) = f.get("upstream-local") {
            Some(Ok(u.parse().ok()?))
        } else {
            f.get("upstream-errno")
                .map(|e| Err(e.parse().unwrap_or(-1)))
        };
        Some(Accepted {
            local: f.get("local")?.parse().ok()?,
            peer: f.get("peer")?.parse().ok()?,
            orig,
            upstream,
        })
    }
}

/// A listener process (fake ztunnel or service) and what it accepted.
pub struct Listener {
    helper: Helper,
}

impl Listener {
    fn start(
        ns: &NetNs,
        cgroup: &TestCgroup,
        path: &str,
        args: Vec<String>,
    ) -> std::io::Result<Self> {
        let helper = Helper::spawn(ns, cgroup, path, &args)?;
        helper.wait_ready()?;
        Ok(Listener { helper })
    }

    /// The next accepted connection, waiting at most `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Accepted> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.helper.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(a) = Accepted::parse(&line) {
                        return Some(a);
                    }
                    eprintln!("testkit: unexpected listener line: {line}");
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Everything accepted so far (without waiting).
    pub fn drain(&self) -> Vec<Accepted> {
        let mut out = Vec::new();
        while let Ok(line) = self.helper.lines.try_recv() {
            out.extend(Accepted::parse(&line));
        }
        out
    }

    pub fn pid(&self) -> u32 {
        self.helper.pid()
    }
}

/// A fake ztunnel: listens on 15001, 15006 and 15008 of each address, asks the original destination,
/// and (with `upstream`) connects to it binding the client's address.
pub struct FakeZtunnel {
    pub listener: Listener,
}

impl FakeZtunnel {
    pub fn start(
        ns: &NetNs,
        cgroup: &TestCgroup,
        path: &str,
        addrs: &[IpAddr],
        upstream: bool,
    ) -> std::io::Result<Self> {
        let mut args = vec!["serve".to_string(), "--orig-dst".to_string()];
        if upstream {
            args.push("--upstream".into());
        }
        for ip in addrs {
            for port in [OUTBOUND, INBOUND, HBONE] {
                args.push("--listen".into());
                args.push(SocketAddr::new(*ip, port).to_string());
            }
        }
        Ok(FakeZtunnel {
            listener: Listener::start(ns, cgroup, path, args)?,
        })
    }

    pub fn next(&self, timeout: Duration) -> Option<Accepted> {
        self.listener.next(timeout)
    }

    pub fn drain(&self) -> Vec<Accepted> {
        self.listener.drain()
    }
}

/// Which of ztunnel's questions a fake ztunnel asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Questions {
    /// As ztunnel does: `SO_ORIGINAL_DST` at `SOL_IP`, then, when that fails,
    /// `IP6T_SO_ORIGINAL_DST` at `SOL_IPV6`.
    AsZtunnel,
    /// Only the first, `SOL_IP`'s (to look at the table between the two questions).
    SolIpOnly,
    /// As ztunnel, and then both questions once more (as a ztunnel whose connection's
    /// record is gone would ask them): the answer reported is the first round's.
    AsZtunnelTwice,
}

/// A fake ztunnel slow to ask: it listens on `listen`, holds `n` accepted connections, and
/// only then asks each its original destination (reported like [`FakeZtunnel`]'s).
pub fn deferred_ztunnel(
    ns: &NetNs,
    cgroup: &TestCgroup,
    path: &str,
    listen: SocketAddr,
    n: usize,
    questions: Questions,
) -> std::io::Result<Listener> {
    let mut args = vec![
        "serve".to_string(),
        "--listen".into(),
        listen.to_string(),
        "--ask-after".into(),
        n.to_string(),
    ];
    match questions {
        Questions::AsZtunnel => {}
        Questions::SolIpOnly => args.push("--sol-ip-only".into()),
        Questions::AsZtunnelTwice => args.push("--ask-twice".into()),
    }
    Listener::start(ns, cgroup, path, args)
}

/// A plain listener ("remote service") on the given addresses; it echoes one byte.
pub fn service(
    ns: &NetNs,
    cgroup: &TestCgroup,
    path: &str,
    addrs: &[SocketAddr],
) -> std::io::Result<Listener> {
    let mut args = vec!["serve".to_string()];
    for a in addrs {
        args.push("--listen".into());
        args.push(a.to_string());
    }
    Listener::start(ns, cgroup, path, args)
}

/// What one client connection saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Connected and got its byte echoed: the socket's local address and the peer the kernel
    /// reports (the rewritten destination when redirected).
    Ok { local: SocketAddr, peer: SocketAddr },
    /// Failed at `stage` (`socket`, `bind`, `connect`, `io`) with `errno`.
    Err { stage: String, errno: i32 },
}

impl Outcome {
    fn parse(line: &str) -> Option<Outcome> {
        if let Some(rest) = line.strip_prefix("ok ") {
            let f = fields(rest);
            return Some(Outcome::Ok {
                local: f.get("local")?.parse().ok()?,
                peer: f.get("peer")?.parse().ok()?,
            });
        }
        let rest = line.strip_prefix("err ")?;
        let f = fields(rest);
        Some(Outcome::Err {
            stage: f.get("stage")?.to_string(),
            errno: f.get("errno")?.parse().ok()?,
        })
    }

    pub fn errno(&self) -> Option<i32> {
        match self {
            Outcome::Err { errno, .. } => Some(*errno),
            Outcome::Ok { .. } => None,
        }
    }
}

/// Options of a client run.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    pub count: u64,
    /// Bind the source address before connecting.
    pub bind: Option<IpAddr>,
    /// Bind these source addresses and ports, round-robin (instead of `bind`).
    pub bind_addrs: Vec<SocketAddr>,
    /// Close right after the connect, without the one-byte exchange.
    pub no_echo: bool,
    /// Close with a reset (no TIME_WAIT on either side: the 4-tuple is free again at once).
    pub rst: bool,
}

/// Runs a client process in `cgroup`/`path` and `ns` that connects `count` times (round-robin
/// over `to`), writes a byte, reads the echo and closes; returns each connection's outcome.
pub fn connect(
    ns: &NetNs,
    cgroup: &TestCgroup,
    path: &str,
    to: &[SocketAddr],
    options: &ClientOptions,
) -> std::io::Result<Vec<Outcome>> {
    let mut args = vec![
        "connect".to_string(),
        "--count".into(),
        options.count.max(1).to_string(),
    ];
    for a in to {
        args.push("--to".into());
        args.push(a.to_string());
    }
    if let Some(ip) = options.bind {
        args.push("--bind".into());
        args.push(ip.to_string());
    }
    for addr in &options.bind_addrs {
        args.push("--bind".into());
        args.push(addr.to_string());
    }
    if options.no_echo {
        args.push("--no-echo".into());
    }
    if options.rst {
        args.push("--rst".into());
    }
    run_client(ns, cgroup, path, &args)
}

/// Runs `zbt-net ARGS` placed in `cgroup`/`path` and `ns` until it says `done`; the outcomes
/// it reported, in order.
fn run_client(
    ns: &NetNs,
    cgroup: &TestCgroup,
    path: &str,
    args: &[String],
) -> std::io::Result<Vec<Outcome>> {
    let mut cmd = Command::new(helper_path());
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    ns.place(&mut cmd, cgroup, path)?;
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.lines().any(|l| l == "done") {
        return Err(std::io::Error::other(format!(
            "zbt-net {} failed ({}): {text}",
            args[0], out.status
        )));
    }
    Ok(text.lines().filter_map(Outcome::parse).collect())
}

/// A UDP `connect()` to `to` from a process placed like [`connect`]'s: where the kernel
/// says the socket is connected to.
pub fn udp_connect_once(
    ns: &NetNs,
    cgroup: &TestCgroup,
    path: &str,
    to: SocketAddr,
) -> std::io::Result<Outcome> {
    let args = ["udp-connect".to_string(), "--to".into(), to.to_string()];
    run_client(ns, cgroup, path, &args)?
        .pop()
        .ok_or_else(|| std::io::Error::other("zbt-net udp-connect reported nothing"))
}

/// A UDP question to `to` from a process placed like [`connect`]'s (sent with the address,
/// or on a connected socket): the reply's source as `recvfrom` shows it, in `peer`.
pub fn udp_ask(
    ns: &NetNs,
    cgroup: &TestCgroup,
    path: &str,
    to: SocketAddr,
    connected: bool,
) -> std::io::Result<Outcome> {
    let mut args = vec!["udp-ask".to_string(), "--to".into(), to.to_string()];
    if connected {
        args.push("--connected".into());
    }
    run_client(ns, cgroup, path, &args)?
        .pop()
        .ok_or_else(|| std::io::Error::other("zbt-net udp-ask reported nothing"))
}

/// A UDP server answering every datagram on `addrs`; its [`Helper::line`]s read
/// `udp local=ADDR peer=ADDR` per datagram.
pub fn udp_echo(
    ns: &NetNs,
    cgroup: &TestCgroup,
    path: &str,
    addrs: &[SocketAddr],
) -> std::io::Result<Helper> {
    let mut args = vec!["udp-echo".to_string()];
    for a in addrs {
        args.push("--listen".into());
        args.push(a.to_string());
    }
    let helper = Helper::spawn(ns, cgroup, path, &args)?;
    helper.wait_ready()?;
    Ok(helper)
}

/// Like [`connect`] with one connection.
pub fn connect_once(
    ns: &NetNs,
    cgroup: &TestCgroup,
    path: &str,
    to: SocketAddr,
) -> std::io::Result<Outcome> {
    let mut all = connect(
        ns,
        cgroup,
        path,
        &[to],
        &ClientOptions {
            count: 1,
            bind: None,
            ..ClientOptions::default()
        },
    )?;
    all.pop()
        .ok_or_else(|| std::io::Error::other("zbt-net connect reported nothing"))
}
