//! What the ZDS server is told and what it tells: its configuration, the pods to serve, the
//! commands and events between it and the pipeline, and its state for dumps and metrics.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use crate::netns::Roots;

/// How the server is run.
#[derive(Debug, Clone)]
pub struct ZdsConfig {
    /// The Unix socket ztunnel connects to.
    pub socket: PathBuf,
    /// Where pods' processes and cgroups are read.
    pub roots: Roots,
    /// How long ztunnel may take to answer a request before the connection is dropped.
    pub ack_timeout: Duration,
    /// How long a new connection may take to say hello.
    pub hello_timeout: Duration,
    /// The first retry of a refused `add`; each next one waits twice as long, up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// How soon a pod whose network namespace could not be opened (no process in it yet) is
    /// looked at again.
    pub netns_retry: Duration,
    /// Where the state is written as JSON whenever it changes (for `zbridge dump`), if set.
    pub status_file: Option<PathBuf>,
    /// Send no `snapshot_sent` until the caller says [`Command::Synced`]: ztunnel drops, at the
    /// snapshot's end, every pod it was not sent, and an agent that has just started has not
    /// decided its pods yet (its first scan, the kube cache's lists). Off by default.
    pub hold_snapshot_until_synced: bool,
}

impl ZdsConfig {
    pub fn new(socket: impl Into<PathBuf>, roots: Roots) -> ZdsConfig {
        ZdsConfig {
            socket: socket.into(),
            roots,
            ack_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(5),
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            netns_retry: Duration::from_millis(20),
            status_file: None,
            hold_snapshot_until_synced: false,
        }
    }
}

/// A pod ztunnel should serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// `AddWorkload.uid`: the pod's `metadata.uid` (standalone: the workload's uid).
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    /// The pod's cgroup (relative to the cgroup2 root): where a process to take the network
    /// namespace from is found.
    pub cgroup: String,
}

impl PodSpec {
    /// How logs name the pod.
    pub(crate) fn label(&self) -> String {
        format!("{}/{} (uid {})", self.namespace, self.name, self.uid)
    }
}

/// What the caller asks.
#[derive(Debug)]
pub enum Command {
    /// Serve this pod (again, if its facts changed).
    Serve(PodSpec),
    /// Stop serving this pod: its entries are gone, ztunnel may close its listeners.
    Release { uid: String },
    /// The caller has decided every pod it will serve for now (its first full picture): the
    /// snapshot's end may be sent ([`ZdsConfig::hold_snapshot_until_synced`]).
    Synced,
}

/// What the caller hears.
#[derive(Debug)]
pub enum Event {
    /// ztunnel (this process) said hello on a new connection.
    Connected { ztunnel_pid: i32 },
    /// The connection ended (ztunnel stopped, or was dropped for the reason given).
    Disconnected { reason: String },
    /// ztunnel acked a pod's `add`: its listeners are open in `netns`. The caller enrols now.
    Acked {
        uid: String,
        netns: OwnedFd,
        ztunnel_pid: i32,
    },
}

/// Where a pod stands with ztunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodState {
    /// Not sent to the current ztunnel yet (or no ztunnel connected).
    Pending,
    /// Sent; no answer yet.
    Sent,
    Acked,
    /// Refused by ztunnel, or its namespace could not be opened; retried.
    Error,
}

impl PodState {
    pub fn as_str(self) -> &'static str {
        match self {
            PodState::Pending => "pending",
            PodState::Sent => "sent",
            PodState::Acked => "acked",
            PodState::Error => "error",
        }
    }
}

/// One pod, for dumps and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub state: PodState,
    /// The last error (ztunnel's, or opening the namespace), until acked.
    pub error: Option<String>,
    /// `add`s sent for it on the current connection.
    pub attempts: u32,
}

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub connections: u64,
    pub adds: u64,
    pub dels: u64,
    pub acks: u64,
    /// Acks carrying an error.
    pub nacks: u64,
    /// Pods whose namespace could not be opened when an `add` was due.
    pub netns_errors: u64,
    /// `keep`s sent: pods in a snapshot whose namespace could not be opened, which ztunnel is
    /// asked to keep serving if it already does.
    pub keeps: u64,
    /// Connections dropped for a protocol error or a timeout.
    pub peer_errors: u64,
}

/// The server's state, readable from any thread.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// ztunnel's process id while a ztunnel is connected and has said hello.
    pub ztunnel_pid: Option<i32>,
    pub pods: BTreeMap<String, PodStatus>,
    pub counters: Counters,
}
