//! The events the watcher emits, shared by the live connector and recordings.

use serde_json::value::RawValue;
use std::net::IpAddr;
use std::sync::Arc;

/// A kernel process or thread id.
pub type Pid = u32;

/// The id of a cgroup v2 directory: its inode number, which is what the BPF helper
/// `bpf_get_current_cgroup_id()` returns for a process in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupId(pub u64);

impl std::fmt::Display for CgroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A cgroup as `/proc/PID/cgroup` names it (relative to the cgroup2 root) and its id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CgroupRef {
    /// The path of the `0::` line, e.g. `/kubepods.slice/.../cri-containerd-<id>.scope`.
    /// Shared: a cgroup's path is read once and handed out with each of its processes.
    pub path: Arc<str>,
    pub id: CgroupId,
}

/// What `/proc` said about a process right when its event arrived.
///
/// Every field is optional: a process may be gone before it can be read (a normal race).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcFacts {
    pub cgroup: Option<CgroupRef>,
    /// Inode of `/proc/PID/ns/net`.
    pub netns: Option<u64>,
    /// Unicast addresses configured in the process's network namespace.
    pub ips: Vec<IpAddr>,
    pub comm: Option<String>,
}

/// One live process in a [`ProcEvent::Scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedProcess {
    /// The process id (tgid).
    pub pid: Pid,
    pub facts: ProcFacts,
}

/// A process event, as the proc connector reports it plus what `/proc` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcEvent {
    /// A thread called execve. `pid` is the thread id, `tgid` the process id.
    Exec {
        pid: Pid,
        tgid: Pid,
        facts: ProcFacts,
    },
    /// A new process or thread (a thread when `child_tgid == parent_tgid`). The child is in its
    /// parent's cgroup.
    Fork {
        parent_pid: Pid,
        parent_tgid: Pid,
        child_pid: Pid,
        child_tgid: Pid,
    },
    /// A thread exited; the process is gone when `pid == tgid`.
    Exit { pid: Pid, tgid: Pid, exit_code: u32 },
    /// The kernel dropped events (ENOBUFS). A [`ProcEvent::Scan`] follows.
    Lost,
    /// The full set of live processes at one moment: processes not listed are gone.
    Scan { processes: Vec<ScannedProcess> },
}

/// `apply` (added or modified) or `delete` of a Kubernetes object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubeAction {
    Apply,
    Delete,
}

/// A Kubernetes record of a recording, passed through untouched: the watcher knows no pods.
#[derive(Debug, Clone)]
pub struct KubeRecord {
    pub action: KubeAction,
    /// A `v1` `Pod` or `v1` `Namespace` as the API server serves it, as JSON text. It stays
    /// text here: only the reader of the facts (the `kubecache` crate) knows which of its
    /// fields matter, and building a JSON tree of every whole object cost a replay more than
    /// deciding on it.
    pub object: Box<RawValue>,
}

impl KubeRecord {
    /// A record of `object` (a JSON value: always serializable).
    pub fn from_value(action: KubeAction, object: &serde_json::Value) -> KubeRecord {
        KubeRecord {
            action,
            object: serde_json::value::to_raw_value(object)
                .expect("a JSON value serializes to JSON text"),
        }
    }

    /// The object as a JSON value (parses the text).
    pub fn object_value(&self) -> serde_json::Value {
        serde_json::from_str(self.object.get()).expect("the text of a RawValue is valid JSON")
    }
}

/// Two records are equal when their actions are and their objects are the same JSON value,
/// however it is spelled.
impl PartialEq for KubeRecord {
    fn eq(&self, other: &KubeRecord) -> bool {
        self.action == other.action && self.object_value() == other.object_value()
    }
}

/// One record of an event source.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Proc(ProcEvent),
    Kube(KubeRecord),
    /// The initial list of pods and namespaces is complete.
    KubeSynced,
}

/// A record with its time: nanoseconds since the recording started (recordings), or the
/// kernel's monotonic timestamp of the event (live).
#[derive(Debug, Clone, PartialEq)]
pub struct TimedRecord {
    pub ts: u64,
    pub record: Record,
}
