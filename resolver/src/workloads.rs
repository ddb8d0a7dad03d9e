//! The standalone workloads file, v1 (`shared/spec/workloads-v1.md`): which cgroup subtrees
//! are ambient workloads, which one is the ztunnel, which host cgroups are exempt.

use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;

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

/// The node's ztunnel in standalone mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZtunnelSpec {
    pub cgroup: String,
    pub address: Address,
}

/// One workload: a cgroup subtree with a mode and an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSpec {
    pub name: String,
    pub cgroup: String,
    pub address: Address,
    pub mode: Mode,
}

/// A parsed and checked workloads file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Workloads {
    pub ztunnel: Option<ZtunnelSpec>,
    pub workloads: Vec<WorkloadSpec>,
    /// Host cgroup subtrees whose connects to workloads are not sent to ztunnel's inbound port.
    pub exempt: Vec<String>,
}

/// Why a workloads file was refused; each names the key concerned.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadsError {
    // The I/O error is in the message and not the error's source: a chain printer (anyhow's
    // `{:#}`) would print it twice.
    #[error("workloads file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    /// The YAML does not fit the schema; serde names the key and the line.
    #[error("workloads file: {0}")]
    Syntax(String),
    #[error("workloads file: `version` is {0}; only 1 is known")]
    Version(u64),
    #[error("workloads file: `{key}`: address `{value}` does not parse as an IP address")]
    BadAddress { key: String, value: String },
    #[error("workloads file: `{key}`: an empty address list")]
    EmptyAddress { key: String },
    #[error("workloads file: `{key}`: cgroup `{value}` must be an absolute path (start with `/`) without `..`")]
    BadCgroup { key: String, value: String },
    #[error("workloads file: `{key}` ({a}) overlaps `{other}` ({b}): subtrees must be disjoint")]
    Overlap {
        key: String,
        a: String,
        other: String,
        b: String,
    },
    #[error("workloads file: `{key}`: name is empty")]
    EmptyName { key: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    version: u64,
    #[serde(default)]
    ztunnel: Option<RawZtunnel>,
    #[serde(default)]
    workloads: Vec<RawWorkload>,
    #[serde(default)]
    exempt: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawZtunnel {
    cgroup: String,
    address: RawAddress,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    name: String,
    cgroup: String,
    address: RawAddress,
    mode: Mode,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawAddress {
    One(String),
    List(Vec<String>),
}

impl Workloads {
    /// Reads and checks a workloads file.
    pub fn load(path: &Path) -> Result<Workloads, WorkloadsError> {
        let text = std::fs::read_to_string(path).map_err(|error| WorkloadsError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Workloads::parse(&text)
    }

    /// Parses and checks the text of a workloads file.
    pub fn parse(text: &str) -> Result<Workloads, WorkloadsError> {
        let raw: RawFile =
            serde_norway::from_str(text).map_err(|e| WorkloadsError::Syntax(e.to_string()))?;
        if raw.version != 1 {
            return Err(WorkloadsError::Version(raw.version));
        }
        let mut subtrees: Vec<(String, String)> = Vec::new();
        let ztunnel = match raw.ztunnel {
            Some(z) => {
                let cgroup = check_cgroup("ztunnel.cgroup", &z.cgroup, &mut subtrees)?;
                let address = check_address("ztunnel.address", z.address)?;
                Some(ZtunnelSpec { cgroup, address })
            }
            None => None,
        };
        let mut workloads = Vec::new();
        for (i, w) in raw.workloads.into_iter().enumerate() {
            if w.name.trim().is_empty() {
                return Err(WorkloadsError::EmptyName {
                    key: format!("workloads[{i}].name"),
                });
            }
            let cgroup = check_cgroup(&format!("workloads[{i}].cgroup"), &w.cgroup, &mut subtrees)?;
            let address = check_address(&format!("workloads[{i}].address"), w.address)?;
            workloads.push(WorkloadSpec {
                name: w.name,
                cgroup,
                address,
                mode: w.mode,
            });
        }
        let mut exempt = Vec::new();
        for (i, e) in raw.exempt.iter().enumerate() {
            exempt.push(check_cgroup(&format!("exempt[{i}]"), e, &mut subtrees)?);
        }
        Ok(Workloads {
            ztunnel,
            workloads,
            exempt,
        })
    }
}

/// Checks a subtree path and that it overlaps no earlier one; returns it without a trailing `/`.
fn check_cgroup(
    key: &str,
    value: &str,
    subtrees: &mut Vec<(String, String)>,
) -> Result<String, WorkloadsError> {
    let bad = || WorkloadsError::BadCgroup {
        key: key.to_string(),
        value: value.to_string(),
    };
    if !value.starts_with('/') || value.split('/').any(|s| s == ".." || s == ".") {
        return Err(bad());
    }
    let path = if value == "/" {
        "/".to_string()
    } else {
        value.trim_end_matches('/').to_string()
    };
    for (other_key, other) in subtrees.iter() {
        if is_within(&path, other) || is_within(other, &path) {
            return Err(WorkloadsError::Overlap {
                key: key.to_string(),
                a: path,
                other: other_key.clone(),
                b: other.clone(),
            });
        }
    }
    subtrees.push((key.to_string(), path.clone()));
    Ok(path)
}

fn check_address(key: &str, raw: RawAddress) -> Result<Address, WorkloadsError> {
    let items = match raw {
        RawAddress::One(s) if s == "auto" => return Ok(Address::Auto),
        RawAddress::One(s) => vec![s],
        RawAddress::List(list) => list,
    };
    if items.is_empty() {
        return Err(WorkloadsError::EmptyAddress {
            key: key.to_string(),
        });
    }
    let mut ips = Vec::new();
    for item in items {
        let ip: IpAddr = item
            .trim()
            .parse()
            .map_err(|_| WorkloadsError::BadAddress {
                key: key.to_string(),
                value: item.clone(),
            })?;
        ips.push(ip);
    }
    Ok(Address::Fixed(ipv4_first(ips)))
}

/// Orders addresses IPv4 first (stable), without duplicates.
pub fn ipv4_first(mut ips: Vec<IpAddr>) -> Vec<IpAddr> {
    ips.sort_by_key(|ip| ip.is_ipv6());
    let mut seen = Vec::with_capacity(ips.len());
    for ip in ips {
        if !seen.contains(&ip) {
            seen.push(ip);
        }
    }
    seen
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
