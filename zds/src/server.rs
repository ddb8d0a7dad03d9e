//! The ZDS server: one thread that owns the pods to serve and the connection from ztunnel.
//!
//! ztunnel connects and says hello; the server sends every pod it serves as `add` (with the
//! pod's network namespace), one at a time, each waiting for its ack, then `snapshot_sent`;
//! afterwards `add` and `del` as pods come and go. A new connection (ztunnel restarted) gets the
//! whole snapshot again and replaces the old one. A pod of the snapshot whose namespace cannot
//! be opened (no process in it at that moment) is sent as `keep` instead: ztunnel then keeps
//! serving it if it already did (the agent restarted, ztunnel did not) rather than drop it at
//! the snapshot's end; its `add` follows once its namespace opens. With
//! [`crate::ZdsConfig::hold_snapshot_until_synced`] the snapshot's end waits for the caller's
//! [`Command::Synced`]: an agent that has just started has not decided its pods yet, and ztunnel
//! drops at that end every pod it was not sent. An ack carrying an error is logged with the
//! pod and the `add` retried with backoff. A peer that stops answering, says something that
//! does not parse, or answers what was not asked is logged and disconnected; ztunnel
//! reconnects and is sent the snapshot again. Nothing here touches what is programmed: the
//! caller hears [`Event::Acked`] and enrols.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};
use prost::Message;

use crate::model::{Command, Counters, Event, PodSpec, PodState, PodStatus, Status, ZdsConfig};
use crate::netns::open_pod_netns;
use crate::proto::{self, workload_request::Payload, workload_response};
use crate::socket::{Conn, Listener, Received};
use crate::status_file::write_status;

/// The running server. Dropping [`Server::commands`]' senders and calling [`Server::stop`]
/// ends it.
pub struct Server {
    commands: Sender<Command>,
    events: Receiver<Event>,
    status: Arc<Mutex<Status>>,
    listener: Arc<Listener>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds the socket and starts the server's threads.
    pub fn start(config: ZdsConfig) -> std::io::Result<Server> {
        let listener = Arc::new(Listener::bind(&config.socket)?);
        let (commands, commands_rx) = unbounded();
        let (events_tx, events) = unbounded();
        let (conn_tx, conn_rx) = bounded(64);
        let status = Arc::new(Mutex::new(Status::default()));
        {
            let (listener, conn_tx) = (listener.clone(), conn_tx.clone());
            std::thread::Builder::new()
                .name("zds-accept".into())
                .spawn(move || accept_loop(&listener, conn_tx))?;
        }
        let thread = {
            let status = status.clone();
            std::thread::Builder::new()
                .name("zds".into())
                .spawn(move || {
                    let mut state = State {
                        synced: !config.hold_snapshot_until_synced,
                        config,
                        pods: BTreeMap::new(),
                        session: None,
                        events: events_tx,
                        conn_tx,
                        status,
                        counters: Counters::default(),
                        next_id: 0,
                        dirty: true,
                    };
                    state.run(commands_rx, conn_rx);
                })?
        };
        log::info!("zds: serving ztunnel on {}", listener.path().display());
        Ok(Server {
            commands,
            events,
            status,
            listener,
            thread: Some(thread),
        })
    }

    /// Where commands go.
    pub fn commands(&self) -> Sender<Command> {
        self.commands.clone()
    }

    /// Where events arrive.
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// A copy of the current state.
    pub fn status(&self) -> Status {
        self.status.lock().expect("zds status lock").clone()
    }

    /// A handle that reads the state from another thread.
    pub fn status_handle(&self) -> StatusHandle {
        StatusHandle(self.status.clone())
    }

    /// Stops serving: the connection is closed and the socket file removed. ztunnel keeps
    /// serving the pods it has until a new agent sends its snapshot.
    pub fn stop(mut self) {
        let (dead, _) = unbounded();
        self.commands = dead; // the thread ends once every sender is gone
        self.listener.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads the server's state from any thread.
#[derive(Debug, Clone)]
pub struct StatusHandle(Arc<Mutex<Status>>);

impl StatusHandle {
    pub fn get(&self) -> Status {
        self.0.lock().expect("zds status lock").clone()
    }
}

/// What the connection threads report.
enum ConnEvent {
    Accepted(Conn),
    Message(u64, Vec<u8>),
    Closed(u64, Option<std::io::Error>),
}

fn accept_loop(listener: &Listener, out: Sender<ConnEvent>) {
    loop {
        match listener.accept() {
            Ok(conn) => {
                if out.send(ConnEvent::Accepted(conn)).is_err() {
                    return;
                }
            }
            // `shutdown` at stop, or the socket broken: either way no more connections.
            Err(e) => {
                if out.send(ConnEvent::Closed(u64::MAX, Some(e))).is_err() {
                    return;
                }
                return;
            }
        }
    }
}

fn read_loop(id: u64, conn: Conn, out: Sender<ConnEvent>) {
    loop {
        let event = match conn.recv() {
            Ok(Received::Message(bytes)) => ConnEvent::Message(id, bytes),
            Ok(Received::Closed) => ConnEvent::Closed(id, None),
            Err(e) => ConnEvent::Closed(id, Some(e)),
        };
        let end = matches!(event, ConnEvent::Closed(..));
        if out.send(event).is_err() || end {
            return;
        }
    }
}

/// A request sent or to send.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Add(String),
    /// Keep a pod ztunnel may already serve (only before the snapshot's end).
    Keep(String),
    Del(String),
    Snapshot,
}

struct Pod {
    spec: PodSpec,
    state: PodState,
    error: Option<String>,
    attempts: u32,
    retry_at: Option<Instant>,
    /// Sent as `keep` to the current ztunnel: once is enough while its snapshot is open.
    kept: bool,
}

struct Session {
    id: u64,
    conn: Conn,
    pid: i32,
    since: Instant,
    hello: bool,
    /// The snapshot's end is not sent yet: a pod that cannot be sent is kept instead.
    in_snapshot: bool,
    /// The snapshot's end is in the queue (it waits for the caller's picture otherwise).
    snapshot_queued: bool,
    queue: VecDeque<Op>,
    /// The request awaiting its ack, when it was sent, and for an `add` the namespace sent.
    outstanding: Option<(Op, Instant, Option<OwnedFd>)>,
}

struct State {
    config: ZdsConfig,
    pods: BTreeMap<String, Pod>,
    session: Option<Session>,
    events: Sender<Event>,
    conn_tx: Sender<ConnEvent>,
    status: Arc<Mutex<Status>>,
    counters: Counters,
    next_id: u64,
    /// Something changed since the state was last published (idle ticks publish nothing).
    dirty: bool,
    /// The caller's picture is whole: a snapshot's end may be sent.
    synced: bool,
}

impl State {
    fn run(&mut self, commands: Receiver<Command>, conns: Receiver<ConnEvent>) {
        let tick = crossbeam_channel::tick(self.config.netns_retry.min(Duration::from_millis(100)));
        loop {
            select! {
                recv(commands) -> cmd => match cmd {
                    Ok(cmd) => {
                        self.dirty = true;
                        self.command(cmd);
                    }
                    Err(_) => break,
                },
                recv(conns) -> ev => match ev {
                    Ok(ev) => {
                        self.dirty = true;
                        self.conn_event(ev);
                    }
                    Err(_) => break,
                },
                recv(tick) -> _ => self.timers(),
            }
            self.pump();
            self.publish();
        }
        if let Some(s) = self.session.take() {
            s.conn.shutdown();
        }
        log::info!("zds: stopped");
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Serve(spec) => {
                let uid = spec.uid.clone();
                if let Some(pod) = self.pods.get(&uid) {
                    if pod.spec == spec {
                        return; // nothing changed: acked stays acked
                    }
                }
                log::info!("zds: serving pod {} (cgroup {})", spec.label(), spec.cgroup);
                self.pods.insert(
                    uid.clone(),
                    Pod {
                        spec,
                        state: PodState::Pending,
                        error: None,
                        attempts: 0,
                        retry_at: None,
                        kept: false,
                    },
                );
                if let Some(s) = self.session.as_mut().filter(|s| s.hello) {
                    if !s.queue.contains(&Op::Add(uid.clone())) {
                        s.queue.push_back(Op::Add(uid));
                    }
                }
            }
            Command::Release { uid } => {
                let Some(pod) = self.pods.remove(&uid) else {
                    return;
                };
                log::info!("zds: releasing pod {}", pod.spec.label());
                if let Some(s) = self.session.as_mut().filter(|s| s.hello) {
                    s.queue.retain(|op| *op != Op::Add(uid.clone()));
                    // ztunnel knows the pod if it was sent (acked or not): tell it to stop.
                    if matches!(
                        pod.state,
                        PodState::Sent | PodState::Acked | PodState::Error
                    ) && pod.attempts > 0
                    {
                        s.queue.push_back(Op::Del(uid));
                    }
                }
            }
            Command::Synced => {
                self.synced = true;
                if let Some(s) = self.session.as_mut().filter(|s| s.hello) {
                    if s.in_snapshot && !s.snapshot_queued {
                        s.queue.push_back(Op::Snapshot);
                        s.snapshot_queued = true;
                    }
                }
            }
        }
    }

    fn conn_event(&mut self, ev: ConnEvent) {
        match ev {
            ConnEvent::Accepted(conn) => self.accepted(conn),
            ConnEvent::Message(id, bytes) => {
                if self.session.as_ref().map(|s| s.id) == Some(id) {
                    self.message(bytes);
                }
            }
            ConnEvent::Closed(u64::MAX, e) => {
                log::error!(
                    "zds: the socket {} stopped accepting connections{}",
                    self.config.socket.display(),
                    e.map(|e| format!(": {e}")).unwrap_or_default()
                );
            }
            ConnEvent::Closed(id, e) => {
                if self.session.as_ref().map(|s| s.id) == Some(id) {
                    let reason = match e {
                        Some(e) => format!("read failed: {e}"),
                        None => "ztunnel closed the connection".to_string(),
                    };
                    self.drop_session(&reason, false);
                }
            }
        }
    }

    fn accepted(&mut self, conn: Conn) {
        let pid = conn.peer_pid().unwrap_or(0);
        self.next_id += 1;
        let id = self.next_id;
        let reader = match conn.try_clone() {
            Ok(r) => r,
            Err(e) => {
                log::error!("zds: a connection from pid {pid} could not be read: {e}");
                return;
            }
        };
        if self.session.is_some() {
            self.drop_session(
                &format!("a new connection from pid {pid} replaces it (ztunnel restarted?)"),
                false,
            );
        }
        let tx = self.conn_tx.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("zds-read".into())
            .spawn(move || read_loop(id, reader, tx))
        {
            log::error!("zds: cannot start a reader for pid {pid}: {e}");
            return;
        }
        log::info!("zds: connection from pid {pid}; waiting for its hello");
        self.counters.connections += 1;
        self.session = Some(Session {
            id,
            conn,
            pid,
            since: Instant::now(),
            hello: false,
            in_snapshot: false,
            snapshot_queued: false,
            queue: VecDeque::new(),
            outstanding: None,
        });
    }

    fn message(&mut self, bytes: Vec<u8>) {
        let session = self.session.as_mut().expect("checked by the caller");
        if !session.hello {
            match proto::ZdsHello::decode(bytes.as_slice()) {
                Ok(h) if h.version == proto::Version::V1 as i32 => {
                    session.hello = true;
                    let pid = session.pid;
                    // The new ztunnel holds nothing: every pod is sent again, then the
                    // snapshot's end, after which it drops what it was not sent.
                    for pod in self.pods.values_mut() {
                        pod.state = PodState::Pending;
                        pod.attempts = 0;
                        pod.retry_at = None;
                        pod.kept = false;
                    }
                    session.queue = self.pods.keys().cloned().map(Op::Add).collect();
                    session.in_snapshot = true;
                    // Until the caller's picture is whole, more pods are to come: the end
                    // waits, and the pods decided meanwhile are sent before it.
                    if self.synced {
                        session.queue.push_back(Op::Snapshot);
                        session.snapshot_queued = true;
                    } else {
                        log::info!(
                            "zds: the snapshot's end waits for the agent's first full picture"
                        );
                    }
                    log::info!(
                        "zds: ztunnel (pid {pid}) said hello; sending {} pods",
                        self.pods.len()
                    );
                    let _ = self.events.send(Event::Connected { ztunnel_pid: pid });
                }
                Ok(h) => self.drop_session(
                    &format!(
                        "its hello asks for protocol version {} (only V1 = 1 is spoken)",
                        h.version
                    ),
                    true,
                ),
                Err(e) => self.drop_session(
                    &format!("its hello ({} bytes) does not parse: {e}", bytes.len()),
                    true,
                ),
            }
            return;
        }
        let ack = match proto::WorkloadResponse::decode(bytes.as_slice()) {
            Ok(proto::WorkloadResponse {
                payload: Some(workload_response::Payload::Ack(ack)),
            }) => ack,
            Ok(_) => {
                return self.drop_session("it sent a response with no ack in it", true);
            }
            Err(e) => {
                return self.drop_session(
                    &format!("a response of {} bytes does not parse: {e}", bytes.len()),
                    true,
                );
            }
        };
        let Some((op, _, netns)) = session.outstanding.take() else {
            return self.drop_session("it acked a request that was not sent", true);
        };
        let pid = session.pid;
        self.counters.acks += 1;
        match op {
            Op::Add(uid) => {
                let Some(pod) = self.pods.get_mut(&uid) else {
                    return; // released while in flight; its `del` is queued
                };
                if ack.error.is_empty() {
                    pod.state = PodState::Acked;
                    pod.error = None;
                    pod.retry_at = None;
                    log::info!("zds: ztunnel serves pod {}", pod.spec.label());
                    let netns = netns.expect("an add carries its namespace");
                    let _ = self.events.send(Event::Acked {
                        uid,
                        netns,
                        ztunnel_pid: pid,
                    });
                } else {
                    self.counters.nacks += 1;
                    let wait = backoff(&self.config, pod.attempts);
                    log::warn!(
                        "zds: ztunnel refused pod {}: {}; not captured; retrying in {wait:?}",
                        pod.spec.label(),
                        ack.error
                    );
                    pod.state = PodState::Error;
                    pod.error = Some(format!("ztunnel: {}", ack.error));
                    pod.retry_at = Some(Instant::now() + wait);
                }
            }
            Op::Keep(uid) => {
                let label = self.pods.get(&uid).map_or(uid.clone(), |p| p.spec.label());
                if ack.error.is_empty() {
                    log::info!(
                        "zds: ztunnel keeps pod {label} if it serves it (its namespace could not be opened for the snapshot)"
                    );
                } else {
                    log::warn!(
                        "zds: ztunnel answered the keep of pod {label} with an error: {}",
                        ack.error
                    );
                }
            }
            Op::Del(uid) => {
                if ack.error.is_empty() {
                    log::info!("zds: ztunnel released pod uid {uid}");
                } else {
                    log::warn!(
                        "zds: ztunnel answered the release of pod uid {uid} with an error: {}",
                        ack.error
                    );
                }
            }
            Op::Snapshot => {
                if !ack.error.is_empty() {
                    log::warn!(
                        "zds: ztunnel answered the end of the snapshot with an error: {}",
                        ack.error
                    );
                } else {
                    log::info!("zds: ztunnel acked the snapshot");
                }
            }
        }
    }

    fn timers(&mut self) {
        let now = Instant::now();
        if let Some(s) = &self.session {
            if !s.hello && now - s.since > self.config.hello_timeout {
                let t = self.config.hello_timeout;
                return self.drop_session(&format!("no hello within {t:?}"), true);
            }
            if let Some((op, sent, _)) = &s.outstanding {
                if now - *sent > self.config.ack_timeout {
                    let what = format!(
                        "no answer to {} within {:?}; ztunnel gets the full snapshot when it reconnects",
                        describe(op),
                        self.config.ack_timeout
                    );
                    return self.drop_session(&what, true);
                }
            }
        }
        let Some(s) = self.session.as_mut().filter(|s| s.hello) else {
            return;
        };
        for (uid, pod) in self.pods.iter_mut() {
            if pod.state == PodState::Error && pod.retry_at.is_some_and(|t| t <= now) {
                self.dirty = true;
                pod.retry_at = None;
                pod.state = PodState::Pending;
                if !s.queue.contains(&Op::Add(uid.clone())) {
                    s.queue.push_back(Op::Add(uid.clone()));
                }
            }
        }
    }

    /// Sends the next request if none is awaiting its ack.
    fn pump(&mut self) {
        loop {
            let Some(s) = self
                .session
                .as_mut()
                .filter(|s| s.hello && s.outstanding.is_none())
            else {
                return;
            };
            let Some(op) = s.queue.pop_front() else {
                return;
            };
            self.dirty = true;
            let in_snapshot = s.in_snapshot;
            let (op, payload, netns) = match op {
                Op::Add(uid) => {
                    let Some(pod) = self.pods.get_mut(&uid) else {
                        continue;
                    };
                    match open_pod_netns(&self.config.roots, &pod.spec.cgroup) {
                        Ok((netns, _pid)) => {
                            pod.attempts += 1;
                            pod.state = PodState::Sent;
                            self.counters.adds += 1;
                            let add = proto::AddWorkload {
                                uid: uid.clone(),
                                workload_info: Some(proto::WorkloadInfo {
                                    name: pod.spec.name.clone(),
                                    namespace: pod.spec.namespace.clone(),
                                    service_account: pod.spec.service_account.clone(),
                                }),
                            };
                            (Op::Add(uid), Payload::Add(add), Some(netns))
                        }
                        Err(e) => {
                            // Most often no process has started in the pod yet (a subtree
                            // made before its first process): looked at again shortly, so
                            // that the pod is sent soon after its first process starts; said
                            // once, not at every look.
                            self.counters.netns_errors += 1;
                            let message = e.to_string();
                            if pod.error.as_deref() != Some(message.as_str()) {
                                log::info!(
                                    "zds: pod {}: no network namespace to hand ztunnel yet ({message}); looking again every {:?}",
                                    pod.spec.label(),
                                    self.config.netns_retry
                                );
                            }
                            pod.state = PodState::Error;
                            pod.error = Some(message);
                            pod.retry_at = Some(Instant::now() + self.config.netns_retry);
                            // Kept once already (the snapshot's end may wait for the agent's
                            // picture, and the pod is looked at again meanwhile).
                            if !in_snapshot || pod.kept {
                                continue;
                            }
                            pod.kept = true;
                            // ztunnel drops at the snapshot's end what it was not sent, though
                            // it may serve this pod already (the agent restarted, it did not).
                            self.counters.keeps += 1;
                            let keep = proto::KeepWorkload { uid: uid.clone() };
                            (Op::Keep(uid), Payload::Keep(keep), None)
                        }
                    }
                }
                Op::Keep(_) => unreachable!("a keep is sent in place of an add, never queued"),
                Op::Del(uid) => {
                    self.counters.dels += 1;
                    let del = proto::DelWorkload { uid: uid.clone() };
                    (Op::Del(uid), Payload::Del(del), None)
                }
                Op::Snapshot => {
                    s.in_snapshot = false;
                    (
                        Op::Snapshot,
                        Payload::SnapshotSent(proto::SnapshotSent {}),
                        None,
                    )
                }
            };
            let bytes = proto::WorkloadRequest {
                payload: Some(payload),
            }
            .encode_to_vec();
            let s = self.session.as_mut().expect("checked above");
            match s.conn.send(&bytes, netns.as_ref().map(|fd| fd.as_fd())) {
                Ok(()) => {
                    s.outstanding = Some((op, Instant::now(), netns));
                }
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                    // Too large for ztunnel's buffer: no retry can help; said once, loudly.
                    if let Op::Add(uid) = &op {
                        if let Some(pod) = self.pods.get_mut(uid) {
                            log::error!("zds: pod {} cannot be sent: {e}", pod.spec.label());
                            pod.state = PodState::Error;
                            pod.error = Some(e.to_string());
                        }
                    }
                }
                Err(e) => {
                    let what = format!("sending {} failed: {e}", describe(&op));
                    return self.drop_session(&what, false);
                }
            }
        }
    }

    fn drop_session(&mut self, reason: &str, peer_error: bool) {
        self.dirty = true;
        let Some(s) = self.session.take() else {
            return;
        };
        s.conn.shutdown();
        if peer_error {
            self.counters.peer_errors += 1;
            log::error!(
                "zds: dropping the connection of ztunnel (pid {}): {reason}",
                s.pid
            );
        } else {
            log::warn!("zds: connection of ztunnel (pid {}) ended: {reason}", s.pid);
        }
        // What is programmed stays: the pods keep their capture (connections wait for a
        // ztunnel, as with Istio's CNI), and the next ztunnel is sent every pod again.
        for pod in self.pods.values_mut() {
            if pod.state == PodState::Sent {
                pod.state = PodState::Pending;
            }
        }
        let _ = self.events.send(Event::Disconnected {
            reason: reason.to_string(),
        });
    }

    fn publish(&mut self) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        let mut status = self.status.lock().expect("zds status lock");
        let before = (status.ztunnel_pid, status.pods.clone());
        status.ztunnel_pid = self.session.as_ref().filter(|s| s.hello).map(|s| s.pid);
        status.counters = self.counters;
        status.pods = self
            .pods
            .iter()
            .map(|(uid, p)| {
                (
                    uid.clone(),
                    PodStatus {
                        namespace: p.spec.namespace.clone(),
                        name: p.spec.name.clone(),
                        state: p.state,
                        error: p.error.clone(),
                        attempts: p.attempts,
                    },
                )
            })
            .collect();
        if let Some(path) = &self.config.status_file {
            if before != (status.ztunnel_pid, status.pods.clone()) {
                if let Err(e) = write_status(path, &status) {
                    log::warn!("zds: writing the state to {}: {e}", path.display());
                }
            }
        }
    }
}

fn describe(op: &Op) -> String {
    match op {
        Op::Add(uid) => format!("the add of pod uid {uid}"),
        Op::Keep(uid) => format!("the keep of pod uid {uid}"),
        Op::Del(uid) => format!("the del of pod uid {uid}"),
        Op::Snapshot => "the end of the snapshot".to_string(),
    }
}

/// `retry_min` doubled per earlier attempt, at most `retry_max`.
fn backoff(config: &ZdsConfig, attempts: u32) -> Duration {
    let factor = 1u32 << attempts.min(16);
    config
        .retry_min
        .saturating_mul(factor)
        .min(config.retry_max)
}
