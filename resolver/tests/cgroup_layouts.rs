//! Every cgroup layout of the design: pod UID, pod-level path and container id read right, and
//! host or unknown paths told apart.

use resolver::cgroup_path::{parse_cgroup_path, CgroupKind, PodCgroup, QosClass};

const UID: &str = "0f8e0e4c-7d4b-4a5e-9d3b-1c2d3e4f5a6b";
const UID_: &str = "0f8e0e4c_7d4b_4a5e_9d3b_1c2d3e4f5a6b";
const CID: &str = "4b1e0f3c9d2a8b7e6f5a4c3b2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4dc9";

fn pod(path: &str) -> PodCgroup {
    match parse_cgroup_path(path) {
        CgroupKind::Pod(p) => p,
        other => panic!("{path}: expected a pod, got {other:?}"),
    }
}

fn check(path: &str, pod_path: &str, container: Option<&str>, qos: QosClass) {
    let p = pod(path);
    assert_eq!(p.uid, UID, "{path}");
    assert_eq!(p.pod_path, pod_path, "{path}");
    assert_eq!(p.container_id.as_deref(), container, "{path}");
    assert_eq!(p.qos, qos, "{path}");
}

#[test]
fn systemd_containerd_burstable() {
    let pod_path =
        format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
    check(
        &format!("{pod_path}/cri-containerd-{CID}.scope"),
        &pod_path,
        Some(CID),
        QosClass::Burstable,
    );
}

#[test]
fn systemd_containerd_besteffort() {
    let pod_path =
        format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice");
    check(
        &format!("{pod_path}/cri-containerd-{CID}.scope"),
        &pod_path,
        Some(CID),
        QosClass::BestEffort,
    );
}

#[test]
fn systemd_containerd_guaranteed() {
    let pod_path = format!("/kubepods.slice/kubepods-pod{UID_}.slice");
    check(
        &format!("{pod_path}/cri-containerd-{CID}.scope"),
        &pod_path,
        Some(CID),
        QosClass::Guaranteed,
    );
}

#[test]
fn systemd_crio() {
    let pod_path =
        format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
    check(
        &format!("{pod_path}/crio-{CID}.scope"),
        &pod_path,
        Some(CID),
        QosClass::Burstable,
    );
    // CRI-O's conmon sits in the pod's slice too: it is the pod's.
    check(
        &format!("{pod_path}/crio-conmon-{CID}.scope"),
        &pod_path,
        Some(CID),
        QosClass::Burstable,
    );
}

#[test]
fn systemd_docker() {
    let pod_path =
        format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice");
    check(
        &format!("{pod_path}/docker-{CID}.scope"),
        &pod_path,
        Some(CID),
        QosClass::BestEffort,
    );
}

#[test]
fn cgroupfs_burstable_besteffort_guaranteed() {
    check(
        &format!("/kubepods/burstable/pod{UID}/{CID}"),
        &format!("/kubepods/burstable/pod{UID}"),
        Some(CID),
        QosClass::Burstable,
    );
    check(
        &format!("/kubepods/besteffort/pod{UID}/{CID}"),
        &format!("/kubepods/besteffort/pod{UID}"),
        Some(CID),
        QosClass::BestEffort,
    );
    check(
        &format!("/kubepods/pod{UID}/{CID}"),
        &format!("/kubepods/pod{UID}"),
        Some(CID),
        QosClass::Guaranteed,
    );
}

#[test]
fn cgroupfs_crio() {
    check(
        &format!("/kubepods/burstable/pod{UID}/crio-{CID}"),
        &format!("/kubepods/burstable/pod{UID}"),
        Some(CID),
        QosClass::Burstable,
    );
}

#[test]
fn nested_kind_node() {
    // kind runs kubelet with --cgroup-root=/kubelet inside a docker container's cgroup.
    let pod_path = format!(
        "/system.slice/docker-{CID}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice"
    );
    check(
        &format!("{pod_path}/cri-containerd-{CID}.scope"),
        &pod_path,
        Some(CID),
        QosClass::BestEffort,
    );
}

#[test]
fn nested_k3d_cgroupfs() {
    let pod_path = format!("/docker/{CID}/kubepods/burstable/pod{UID}");
    check(
        &format!("{pod_path}/{CID}"),
        &pod_path,
        Some(CID),
        QosClass::Burstable,
    );
}

#[test]
fn below_a_container_is_still_the_pod() {
    // systemd inside a container makes cgroups below the container's.
    let pod_path = format!("/kubepods.slice/kubepods-pod{UID_}.slice");
    check(
        &format!("{pod_path}/cri-containerd-{CID}.scope/init.scope"),
        &pod_path,
        Some(CID),
        QosClass::Guaranteed,
    );
}

#[test]
fn the_pod_level_cgroup_itself() {
    let pod_path = format!("/kubepods/burstable/pod{UID}");
    check(&pod_path, &pod_path, None, QosClass::Burstable);
}

#[test]
fn host_cgroups_are_not_pods() {
    for path in [
        "/init.scope",
        "/",
        "/system.slice/kubelet.service",
        "/system.slice/containerd.service",
        "/user.slice/user-1000.slice/session-3.scope",
        "/kubepods.slice",
        "/kubepods.slice/kubepods-burstable.slice",
        "/kubepods/besteffort",
        // A slice that only looks like a pod's: "pod" in a name outside kubepods.
        "/system.slice/mypod0f8e0e4c.service",
    ] {
        assert_eq!(parse_cgroup_path(path), CgroupKind::Host, "{path}");
    }
}

#[test]
fn pod_like_paths_that_do_not_parse_are_unrecognized() {
    for path in [
        // A UID cut short.
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f8e0e4c_7d4b.slice/cri-containerd-x.scope",
        "/kubepods/burstable/podnotauid/abc",
        "/kubepods/burstable/something-else",
    ] {
        assert_eq!(parse_cgroup_path(path), CgroupKind::Unrecognized, "{path}");
    }
}
