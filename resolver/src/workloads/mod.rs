//! The standalone workloads file (`shared/spec/workloads-v1.md`, `workloads-v2.md`): which
//! cgroup subtrees are ambient workloads, which one is the ztunnel (and, from version 2, where
//! ztunnel listens), which host cgroups are exempt.
//!
//! Reading goes in steps, each refusing what it can see: the size ([`MAX_FILE_BYTES`]) and
//! the nesting ([`MAX_DEPTH`]) before the YAML parser runs (`limits`); each value as serde
//! reads it, so that the parser names its key, line and column (`raw`); then what only the
//! whole file shows, such as overlapping subtrees or duplicate names (`check`).

mod check;
mod error;
mod limits;
mod raw;
mod uid;

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use error::{WorkloadsError, WorkloadsErrorKind};
pub use limits::{MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES};
pub use uid::derived_uid;

/// The namespace of a workload whose `name` has no `/`: Kubernetes' own default.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The `service_account` of a workload that gives none: Kubernetes' own default.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// A workload's or ztunnel's address: fixed, or `auto` (the addresses of the network namespace
/// of the first process seen in the subtree).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Auto,
    /// IPv4 first, then IPv6, each in file order.
    Fixed(Vec<IpAddr>),
}

/// `mode` of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Ambient,
    None,
}

/// Where ztunnel listens (`ztunnel.mode`, version 2; a version 1 file is always `Node`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZtunnelMode {
    /// In its own network namespace, on `address` (ztunnel's `PROXY_MODE=dedicated`).
    Node,
    /// Inside each workload's network namespace; the agent serves ZDS on the Unix socket `zds`.
    InPod { zds: PathBuf },
}

/// The node's ztunnel in standalone mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZtunnelSpec {
    /// Normalised: see [`WorkloadSpec::cgroup`].
    pub cgroup: String,
    /// In-pod mode without `address` in the file: `Fixed` and empty (unused there).
    pub address: Address,
    pub mode: ZtunnelMode,
}

/// One workload: a cgroup subtree with a mode and an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSpec {
    pub name: String,
    /// Normalised as the kernel writes cgroup paths: no `//`, no trailing `/`.
    pub cgroup: String,
    pub address: Address,
    pub mode: Mode,
    /// ZDS `WorkloadInfo.service_account`: the file's, or [`DEFAULT_SERVICE_ACCOUNT`].
    pub service_account: String,
    /// ZDS `AddWorkload.uid`: the file's, or [`derived_uid`] of the name.
    pub uid: String,
}

impl WorkloadSpec {
    /// ZDS `WorkloadInfo`'s namespace and name: `demo/productpage` is namespace `demo`, name
    /// `productpage` (split at the first `/`); a name without `/` is in [`DEFAULT_NAMESPACE`].
    /// A version 2 file has neither part empty.
    pub fn zds_namespace_and_name(&self) -> (&str, &str) {
        match self.name.split_once('/') {
            Some((namespace, name)) => (namespace, name),
            None => (DEFAULT_NAMESPACE, &self.name),
        }
    }
}

/// A parsed and checked workloads file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workloads {
    /// The file's `version`: 1 or 2.
    pub version: u32,
    pub ztunnel: Option<ZtunnelSpec>,
    pub workloads: Vec<WorkloadSpec>,
    /// Host cgroup subtrees whose connects to workloads are not sent to ztunnel's inbound port.
    pub exempt: Vec<String>,
    /// UDP and TCP to port 53 of ambient workloads go to ztunnel's 15053 (in-pod mode only).
    pub dns_capture: bool,
}

impl Default for Workloads {
    /// An empty version 1 file.
    fn default() -> Self {
        Workloads {
            version: 1,
            ztunnel: None,
            workloads: Vec::new(),
            exempt: Vec::new(),
            dns_capture: false,
        }
    }
}

impl Workloads {
    /// Reads and checks a workloads file. A file larger than [`MAX_FILE_BYTES`] is refused
    /// without being read to its end. Errors name the file.
    pub fn load(path: &Path) -> Result<Workloads, WorkloadsError> {
        let in_file = |kind| WorkloadsError {
            file: Some(path.display().to_string()),
            kind,
        };
        let bytes = std::fs::File::open(path)
            .and_then(limits::read_bounded)
            .map_err(|e| in_file(WorkloadsErrorKind::Read(e)))?
            .ok_or_else(|| in_file(WorkloadsErrorKind::TooLarge))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            in_file(WorkloadsErrorKind::Read(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not UTF-8 text: {}", e.utf8_error()),
            )))
        })?;
        parse(&text).map_err(in_file)
    }

    /// Parses and checks the text of a workloads file.
    pub fn parse(text: &str) -> Result<Workloads, WorkloadsError> {
        parse(text).map_err(|kind| WorkloadsError { file: None, kind })
    }

    /// Whether ztunnel listens in each workload's own namespace (v2 `ztunnel.mode: inpod`).
    pub fn in_pod(&self) -> bool {
        self.ztunnel
            .as_ref()
            .is_some_and(|z| matches!(z.mode, ZtunnelMode::InPod { .. }))
    }

    /// What in a valid file is probably not what was meant, one sentence each (for the log
    /// and `/readyz`).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.ztunnel.is_none() && self.workloads.iter().any(|w| w.mode == Mode::Ambient) {
            warnings.push(
                "ambient workloads but no ztunnel: every captured connect is refused \
                 (with --fail-open, not captured)"
                    .to_string(),
            );
        }
        warnings
    }
}

fn parse(text: &str) -> Result<Workloads, WorkloadsErrorKind> {
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(WorkloadsErrorKind::TooLarge);
    }
    // Editors on some systems start UTF-8 files with a byte order mark; it is no content, but
    // the YAML parser refuses it before a `---`.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    match limits::beyond_bounds(text) {
        Some((limits::Beyond::Depth, line)) => return Err(WorkloadsErrorKind::TooDeep { line }),
        Some((limits::Beyond::Nodes, line)) => {
            return Err(WorkloadsErrorKind::TooManyNodes { line })
        }
        None => {}
    }
    let raw = raw::read(text).map_err(|e| WorkloadsErrorKind::Syntax(e.to_string()))?;
    check::build(raw, text)
}

/// Orders addresses IPv4 first (stable), without duplicates.
pub fn ipv4_first(mut ips: Vec<IpAddr>) -> Vec<IpAddr> {
    ips.sort_by_key(|ip| ip.is_ipv6());
    // A set, not a search of the addresses kept: a file's list can be long.
    let mut seen = HashSet::with_capacity(ips.len());
    ips.retain(|ip| seen.insert(*ip));
    ips
}

/// Whether `path` is `root` or below it (`/a/b` is within `/a`, `/ab` is not).
pub fn is_within(path: &str, root: &str) -> bool {
    if root == "/" {
        return path.starts_with('/');
    }
    path == root
        || (path.len() > root.len()
            && path.starts_with(root)
            && path.as_bytes()[root.len()] == b'/')
}

/// `s` with its control characters escaped, so that quoting a refused value in an error
/// cannot forge a log line either.
fn shown(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() || limits::is_break(c) {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}
