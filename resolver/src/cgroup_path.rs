//! Cgroup v2 paths to pods: the pod UID and container id in every kubelet layout.
//!
//! Layouts (`shared/design.md`, "Cgroup paths to parse"):
//! - systemd driver: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<UID with
//!   _>.slice/<runtime>-<64 hex>.scope`, besteffort alike, guaranteed as
//!   `/kubepods.slice/kubepods-pod<UID>.slice/...`; runtimes `cri-containerd`, `crio`, `docker`.
//! - cgroupfs driver: `/kubepods/burstable/pod<UID>/<64 hex>`, `/kubepods/pod<UID>/<64 hex>`
//!   (CRI-O prefixes `crio-`).
//! - Nested prefixes before `kubepods` (kind's `/kubelet.slice/kubelet-kubepods...`, k3d's
//!   `/docker/<id>/kubepods/...`, systemd-in-container): matched anywhere in the path.

/// The Kubernetes QoS class a pod cgroup sits under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// A cgroup that belongs to a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    /// The pod's `metadata.uid`, with dashes (`0f8e0e4c-7d4b-...`).
    pub uid: String,
    /// The pod-level cgroup: the path up to and including the pod's own directory.
    pub pod_path: String,
    /// The container id (64 hex) when the path goes below the pod into a container's cgroup.
    pub container_id: Option<String>,
    pub qos: QosClass,
}

/// What a cgroup path says about its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupKind {
    /// A pod's cgroup (the pod-level one or anything below it).
    Pod(PodCgroup),
    /// Not a pod's: a host cgroup (`/init.scope`, `/system.slice/...`, `/kubepods.slice` itself).
    Host,
    /// Under a `kubepods` hierarchy but no pod could be read from it: a layout this parser does
    /// not know. Treated as a host cgroup, and logged (once per path) by the resolver.
    Unrecognized,
}

/// Reads the pod and container out of a cgroup v2 path (relative to the cgroup2 root).
pub fn parse_cgroup_path(path: &str) -> CgroupKind {
    match find_pod(path) {
        PodOf::Pod {
            uid,
            pod_path,
            next,
        } => CgroupKind::Pod(PodCgroup {
            uid,
            qos: qos_of_pod_path(pod_path),
            pod_path: pod_path.to_string(),
            container_id: next.and_then(container_segment),
        }),
        PodOf::Host => CgroupKind::Host,
        PodOf::Unrecognized => CgroupKind::Unrecognized,
    }
}

/// Whose a cgroup path is, as far as the resolver asks ([`find_pod`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PodOf<'a> {
    /// A pod's: its uid, its pod-level cgroup (a prefix of the path) and the segment after it.
    Pod {
        uid: String,
        pod_path: &'a str,
        next: Option<&'a str>,
    },
    Host,
    Unrecognized,
}

/// The pod a path belongs to, without the container id and QoS class that
/// [`parse_cgroup_path`] reads too: the resolver classifies every new cgroup by its owner only.
pub(crate) fn find_pod(path: &str) -> PodOf<'_> {
    let mut offset = 0usize;
    let mut under_kubepods = false;
    let mut segments = path.split('/').peekable();
    while let Some(segment) = segments.next() {
        let end = offset + segment.len();
        // Once under kubepods, no need to look again (the pod's segment is long).
        if !under_kubepods && is_kubepods_segment(segment) {
            under_kubepods = true;
        }
        let pod = systemd_pod_segment(segment).or_else(|| {
            if under_kubepods {
                cgroupfs_pod_segment(segment)
            } else {
                None
            }
        });
        if let Some(uid) = pod {
            return PodOf::Pod {
                uid,
                pod_path: &path[..end],
                next: segments.peek().copied(),
            };
        }
        offset = end + 1;
    }
    if under_kubepods && !is_qos_level(path) {
        PodOf::Unrecognized
    } else {
        PodOf::Host
    }
}

/// `kubepods`, `kubepods.slice`, `kubepods-burstable.slice`, `kubelet-kubepods.slice`, ...
fn is_kubepods_segment(segment: &str) -> bool {
    // `contains("kubepods-") || contains("kubepods.")` in one pass, without building a
    // substring searcher for each segment of each new cgroup's path.
    segment == "kubepods"
        || segment
            .as_bytes()
            .windows(9)
            .any(|w| w.starts_with(b"kubepods") && matches!(w[8], b'-' | b'.'))
}

/// The cgroups kubelet makes above the pods: `/kubepods.slice`, `.../kubepods-burstable.slice`,
/// `/kubepods/besteffort`: real cgroups, but nobody's pod.
fn is_qos_level(path: &str) -> bool {
    let Some(start) = path.split('/').position(is_kubepods_segment) else {
        return false;
    };
    path.split('/').skip(start).all(|s| {
        s.is_empty()
            || s == "kubepods"
            || s == "burstable"
            || s == "besteffort"
            || (s.ends_with(".slice")
                && s.contains("kubepods")
                && !s.trim_end_matches(".slice").contains("-pod"))
    })
}

/// `kubepods-pod<UID>.slice`, `kubepods-burstable-pod<UID>.slice`,
/// `kubelet-kubepods-besteffort-pod<UID>.slice` (UID with `_` for `-`).
fn systemd_pod_segment(segment: &str) -> Option<String> {
    let stem = segment.strip_suffix(".slice")?;
    // The last `-pod` (`rsplit_once("-pod")`), found without building a substring searcher
    // for each segment of each new cgroup's path.
    let at = stem.as_bytes().windows(4).rposition(|w| w == b"-pod")?;
    let (prefix, uid) = (&stem[..at], &stem[at + 4..]);
    if !(prefix.ends_with("kubepods-burstable")
        || prefix.ends_with("kubepods-besteffort")
        || prefix.ends_with("kubepods"))
    {
        return None;
    }
    // A UID with `_` for `-`: checked as it is written, and copied with `-` only if it is one.
    let is_written_uid = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'_' || b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    if !is_written_uid {
        return None;
    }
    // All ASCII once checked: rewritten byte by byte.
    let mut bytes = uid.as_bytes().to_vec();
    for b in &mut bytes {
        if *b == b'_' {
            *b = b'-';
        }
    }
    String::from_utf8(bytes).ok()
}

/// `pod<UID>` under a cgroupfs `kubepods` hierarchy.
fn cgroupfs_pod_segment(segment: &str) -> Option<String> {
    let uid = segment.strip_prefix("pod")?;
    is_uid(uid).then(|| uid.to_string())
}

/// `cri-containerd-<64 hex>.scope`, `crio-<64 hex>.scope`, `docker-<64 hex>.scope`, a bare
/// `<64 hex>` (cgroupfs), `crio-<64 hex>` (CRI-O on cgroupfs), `crio-conmon-<64 hex>.scope`.
fn container_segment(segment: &str) -> Option<String> {
    let stem = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = stem.rsplit('-').next()?;
    is_container_id(id).then(|| id.to_string())
}

fn is_container_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A Kubernetes UID: 8-4-4-4-12 hex digits.
fn is_uid(uid: &str) -> bool {
    let bytes = uid.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// The QoS class of a pod path, from its cgroupfs parent (`burstable`, `besteffort`) or its
/// systemd slice name.
pub fn qos_of_pod_path(pod_path: &str) -> QosClass {
    let mut parts = pod_path.rsplit('/');
    let own = parts.next().unwrap_or("");
    let parent = parts.next().unwrap_or("");
    if own.contains("kubepods-burstable-") || parent == "burstable" {
        QosClass::Burstable
    } else if own.contains("kubepods-besteffort-") || parent == "besteffort" {
        QosClass::BestEffort
    } else {
        QosClass::Guaranteed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubepods_segments_are_those_naming_kubepods_then_a_dash_or_dot() {
        for segment in [
            "kubepods",
            "kubepods.slice",
            "kubepods-burstable.slice",
            "kubelet-kubepods.slice",
            "kubelet-kubepods-besteffort.slice",
            "xkubepods.",
            "kubepods_",
            "kubepod-s",
            "kubepodsx",
            "kube",
            "burstable",
            "",
        ] {
            let expected = segment == "kubepods"
                || segment.contains("kubepods-")
                || segment.contains("kubepods.");
            assert_eq!(is_kubepods_segment(segment), expected, "{segment:?}");
        }
    }

    #[test]
    fn systemd_pod_segments_read_as_a_rsplit_and_a_replace_would() {
        let uid = "0f8e0e4c-7d4b-4a5e-9d3b-1c2d3e4f5a6b";
        let written = uid.replace('-', "_");
        for (segment, expected) in [
            (format!("kubepods-pod{written}.slice"), Some(uid)),
            (format!("kubepods-burstable-pod{written}.slice"), Some(uid)),
            (
                format!("kubelet-kubepods-besteffort-pod{written}.slice"),
                Some(uid),
            ),
            (format!("kubepods-pod{uid}.slice"), Some(uid)),
            (format!("kubepods-pod-pod{written}.slice"), None),
            (format!("kubepods-pod{written}"), None),
            (format!("kubepods-pod{written}x.slice"), None),
            (format!("kubepods-podx{written}.slice"), None),
            (format!("kubepods-foo-pod{written}.slice"), None),
            (
                format!("kubepods-pod{}.slice", written.replacen('_', "x", 1)),
                None,
            ),
            (
                format!("kubepods-pod{}.slice", written.replacen('0', "_", 1)),
                None,
            ),
            (
                format!("kubepods-pod{}.slice", written.replacen('f', "é", 1)),
                None,
            ),
            ("kubepods-pod.slice".to_string(), None),
            ("-pod.slice".to_string(), None),
        ] {
            assert_eq!(
                systemd_pod_segment(&segment).as_deref(),
                expected,
                "{segment}"
            );
            // What the parse was before: `rsplit_once`, then `replace`, then the UID's shape.
            let before = segment
                .strip_suffix(".slice")
                .and_then(|stem| stem.rsplit_once("-pod"))
                .filter(|(prefix, _)| {
                    prefix.ends_with("kubepods-burstable")
                        || prefix.ends_with("kubepods-besteffort")
                        || prefix.ends_with("kubepods")
                })
                .map(|(_, uid)| uid.replace('_', "-"))
                .filter(|uid| is_uid(uid));
            assert_eq!(before.as_deref(), expected, "{segment}");
        }
    }

    #[test]
    fn uid_shape_is_checked() {
        assert!(is_uid("0f8e0e4c-7d4b-4a5e-9d3b-1c2d3e4f5a6b"));
        assert!(!is_uid("0f8e0e4c-7d4b-4a5e-9d3b-1c2d3e4f5a6"));
        assert!(!is_uid("0f8e0e4c_7d4b_4a5e_9d3b_1c2d3e4f5a6b"));
        assert!(!is_uid("0f8e0e4cx7d4b-4a5e-9d3b-1c2d3e4f5a6b"));
    }
}
