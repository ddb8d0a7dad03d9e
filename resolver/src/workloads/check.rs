//! The checks across the file (which keys go with which version and mode, overlapping
//! subtrees, duplicate names and uids), and the [`Workloads`] they build.

use std::cmp::Ordering;

use super::raw::{self, At, Cgroup, RawFile, RawWorkload, RawZtunnel, ZtunnelModeName};
use super::{
    is_within, uid, Address, WorkloadSpec, Workloads, WorkloadsErrorKind, ZtunnelMode, ZtunnelSpec,
    DEFAULT_SERVICE_ACCOUNT,
};

/// Builds the workloads of a file that serde has read, refusing what no single value shows.
pub(super) fn build(raw: RawFile, text: &str) -> Result<Workloads, WorkloadsErrorKind> {
    let version = raw.version.value.0;
    if version < 2 {
        if let Some((key, ordinal)) = first_v2_key(&raw) {
            return Err(refuse(
                text,
                key,
                ordinal,
                "unknown field in a version 1 file; it is a version 2 key (`version: 2`)".into(),
            ));
        }
    }
    let (ztunnel, ztunnel_cgroup) = match raw.ztunnel {
        Some(z) => {
            let (spec, cgroup) = ztunnel(z, text)?;
            (Some(spec), Some(cgroup))
        }
        None => (None, None),
    };
    let inpod = matches!(&ztunnel, Some(z) if matches!(z.mode, ZtunnelMode::InPod { .. }));
    let dns_capture = match raw.dns_capture {
        Some(At {
            value: true,
            ordinal,
        }) if !inpod => {
            return Err(refuse(
                text,
                "dns_capture".into(),
                ordinal,
                "only with `ztunnel.mode: inpod`: DNS goes to ztunnel's port 15053 in the \
                 pod's own namespace"
                    .into(),
            ))
        }
        Some(d) => d.value,
        None => false,
    };
    check_subtrees(ztunnel_cgroup.as_ref(), &raw.workloads, &raw.exempt, text)?;
    check_names(&raw.workloads, text)?;
    let workloads = workload_specs(raw.workloads, version, text)?;
    Ok(Workloads {
        version,
        ztunnel,
        workloads,
        exempt: raw.exempt.into_iter().map(|e| e.value.path).collect(),
        dns_capture,
    })
}

/// A refusal of the value read `ordinal`-th, with its line.
fn refuse(text: &str, key: String, ordinal: usize, reason: String) -> WorkloadsErrorKind {
    WorkloadsErrorKind::Refused {
        key,
        line: raw::line_of(text, ordinal),
        reason,
    }
}

/// The ztunnel: its mode, with the keys each mode needs and refuses.
fn ztunnel(z: RawZtunnel, text: &str) -> Result<(ZtunnelSpec, At<Cgroup>), WorkloadsErrorKind> {
    let inpod = z
        .mode
        .as_ref()
        .filter(|m| m.value == ZtunnelModeName::InPod);
    let mode = match (inpod, z.zds) {
        (Some(_), Some(zds)) => ZtunnelMode::InPod { zds: zds.value.0 },
        (Some(m), None) => {
            return Err(refuse(
                text,
                "ztunnel".into(),
                m.ordinal,
                "missing field `zds`: `mode: inpod` needs the path of the ZDS socket".into(),
            ))
        }
        (None, Some(zds)) => {
            return Err(refuse(
                text,
                "ztunnel.zds".into(),
                zds.ordinal,
                "only with `mode: inpod`; in node mode there is no ZDS socket".into(),
            ))
        }
        (None, None) => ZtunnelMode::Node,
    };
    let address = match (z.address, &mode) {
        (Some(a), _) => a.0,
        // In-pod, ztunnel listens in each pod's namespace: no address of its own.
        (None, ZtunnelMode::InPod { .. }) => Address::Fixed(Vec::new()),
        (None, ZtunnelMode::Node) => {
            return Err(refuse(
                text,
                "ztunnel".into(),
                z.cgroup.ordinal,
                "missing field `address`: node mode sends captured connects to it".into(),
            ))
        }
    };
    let spec = ZtunnelSpec {
        cgroup: z.cgroup.value.path.clone(),
        address,
        mode,
    };
    Ok((spec, z.cgroup))
}

/// Refuses two subtrees one within the other (or the same), whoever's they are. Sorted so
/// that every subtree is followed by those within it, only neighbours need comparing.
fn check_subtrees(
    ztunnel: Option<&At<Cgroup>>,
    workloads: &[RawWorkload],
    exempt: &[At<Cgroup>],
    text: &str,
) -> Result<(), WorkloadsErrorKind> {
    let mut subtrees: Vec<(&Cgroup, Key, usize)> = Vec::new();
    if let Some(c) = ztunnel {
        subtrees.push((&c.value, Key::Ztunnel, c.ordinal));
    }
    for (i, w) in workloads.iter().enumerate() {
        subtrees.push((&w.cgroup.value, Key::Workload(i), w.cgroup.ordinal));
    }
    for (i, e) in exempt.iter().enumerate() {
        subtrees.push((&e.value, Key::Exempt(i), e.ordinal));
    }
    subtrees.sort_by(|a, b| subtree_order(&a.0.path, &b.0.path));
    for pair in subtrees.windows(2) {
        let (outer, inner) = (&pair[0], &pair[1]);
        if is_within(&inner.0.path, &outer.0.path) {
            let (this, other) = later_first(inner, outer, |s| s.2);
            let same = if inner.0.path == outer.0.path {
                ", the same subtree"
            } else {
                ""
            };
            return Err(refuse(
                text,
                this.1.to_string(),
                this.2,
                format!(
                    "{} overlaps {} {}{}{same}: subtrees must be disjoint",
                    spelled(this.0),
                    other.1,
                    spelled(other.0),
                    at_line(text, other.2),
                ),
            ));
        }
    }
    Ok(())
}

/// Names are how logs, dumps and ZDS tell workloads apart: one each.
fn check_names(workloads: &[RawWorkload], text: &str) -> Result<(), WorkloadsErrorKind> {
    let mut names: Vec<Keyed> = (workloads.iter().enumerate())
        .map(|(i, w)| (w.name.value.0.as_str(), i, w.name.ordinal))
        .collect();
    match first_duplicate(&mut names) {
        Some((this, other)) => Err(refuse(
            text,
            format!("workloads[{}].name", this.1),
            this.2,
            format!(
                "duplicate name `{}`: workloads[{}] has it too{}",
                this.0,
                other.1,
                at_line(text, other.2)
            ),
        )),
        None => Ok(()),
    }
}

/// The workloads, with the defaults of version 2's keys filled in.
fn workload_specs(
    raw: Vec<RawWorkload>,
    version: u32,
    text: &str,
) -> Result<Vec<WorkloadSpec>, WorkloadsErrorKind> {
    let mut workloads = Vec::with_capacity(raw.len());
    // Where each uid came from (given, or derived from the name), to point at it.
    let mut uid_sources: Vec<(bool, usize)> = Vec::with_capacity(raw.len());
    for (i, w) in raw.into_iter().enumerate() {
        let name = w.name.value.0;
        if version >= 2 {
            if let Some((namespace, pod)) = name.split_once('/') {
                if namespace.is_empty() || pod.is_empty() {
                    return Err(refuse(
                        text,
                        format!("workloads[{i}].name"),
                        w.name.ordinal,
                        format!("`{name}`: `namespace/name` with an empty part; ZDS needs both"),
                    ));
                }
            }
        }
        let uid = match w.uid {
            Some(u) => {
                uid_sources.push((true, u.ordinal));
                u.value.0
            }
            None => {
                uid_sources.push((false, w.name.ordinal));
                uid::derived_uid(&name)
            }
        };
        workloads.push(WorkloadSpec {
            name,
            cgroup: w.cgroup.value.path,
            address: w.address.0,
            mode: w.mode,
            service_account: w
                .service_account
                .map(|s| s.value.0)
                .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_string()),
            uid,
        });
    }

    // ZDS tells workloads apart by uid: a given uid must not repeat another's.
    let mut uids: Vec<Keyed> = (workloads.iter().enumerate())
        .map(|(i, w)| (w.uid.as_str(), i, uid_sources[i].1))
        .collect();
    if let Some((this, other)) = first_duplicate(&mut uids) {
        let key = |i: usize| match uid_sources[i].0 {
            true => format!("workloads[{i}].uid"),
            false => format!("workloads[{i}].name (its derived uid)"),
        };
        return Err(refuse(
            text,
            key(this.1),
            this.2,
            format!(
                "duplicate uid `{}`: {} has it too{}",
                this.0,
                key(other.1),
                at_line(text, other.2)
            ),
        ));
    }
    Ok(workloads)
}

/// A value of a workload: the value, the workload's index, the order the value was read in.
type Keyed<'a> = (&'a str, usize, usize);

/// The first pair of equal values, by sorting: the one read later first.
fn first_duplicate<'a>(items: &mut [Keyed<'a>]) -> Option<(Keyed<'a>, Keyed<'a>)> {
    items.sort_unstable();
    items
        .windows(2)
        .find(|pair| pair[0].0 == pair[1].0)
        .map(|pair| later_first(&pair[1], &pair[0], |x| x.2))
        .map(|(a, b)| (*a, *b))
}

/// The two, the one read later first.
fn later_first<'t, T>(a: &'t T, b: &'t T, ordinal: impl Fn(&T) -> usize) -> (&'t T, &'t T) {
    if ordinal(a) > ordinal(b) {
        (a, b)
    } else {
        (b, a)
    }
}

/// Who a subtree belongs to, named as its key in the file.
#[derive(Clone, Copy)]
enum Key {
    Ztunnel,
    Workload(usize),
    Exempt(usize),
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Key::Ztunnel => f.write_str("ztunnel.cgroup"),
            Key::Workload(i) => write!(f, "workloads[{i}].cgroup"),
            Key::Exempt(i) => write!(f, "exempt[{i}]"),
        }
    }
}

/// Orders normalised paths component by component, so that the subtrees within a path come
/// right after it (byte order would put `/a!b` between `/a` and `/a/b`): then an overlap, if
/// there is one, is between neighbours.
pub(super) fn subtree_order(a: &str, b: &str) -> Ordering {
    a.split('/').cmp(b.split('/'))
}

/// A path as the file wrote it, and its normal form when that differs.
fn spelled(c: &Cgroup) -> String {
    if c.written == c.path {
        format!("`{}`", c.path)
    } else {
        format!("`{}` (that is `{}`)", c.written, c.path)
    }
}

fn at_line(text: &str, ordinal: usize) -> String {
    match raw::line_of(text, ordinal) {
        Some(line) => format!(" (line {line})"),
        None => String::new(),
    }
}

/// The first key (in the order read) of a version 1 file that only version 2 knows.
fn first_v2_key(raw: &RawFile) -> Option<(String, usize)> {
    let mut keys: Vec<(String, usize)> = Vec::new();
    if let Some(z) = &raw.ztunnel {
        if let Some(m) = &z.mode {
            keys.push(("ztunnel.mode".to_string(), m.ordinal));
        }
        if let Some(zds) = &z.zds {
            keys.push(("ztunnel.zds".to_string(), zds.ordinal));
        }
    }
    if let Some(d) = &raw.dns_capture {
        keys.push(("dns_capture".to_string(), d.ordinal));
    }
    for (i, w) in raw.workloads.iter().enumerate() {
        if let Some(s) = &w.service_account {
            keys.push((format!("workloads[{i}].service_account"), s.ordinal));
        }
        if let Some(u) = &w.uid {
            keys.push((format!("workloads[{i}].uid"), u.ordinal));
        }
    }
    keys.into_iter().min_by_key(|(_, ordinal)| *ordinal)
}
