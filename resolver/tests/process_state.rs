//! Process state: forks inherit, execs move, leaders' exits remove, scans replace, pids are
//! reused, and cgroups that empty lose their entries.

mod common;

use common::*;
use resolver::Role;
use serde_json::json;
use watcher::ProcEvent;

/// Pods 1 and 2 ambient in `shop`; no process yet.
fn two_ambient_pods() -> Harness {
    let mut h = Harness::new();
    h.scan(&[(1, "/init.scope", 12)]);
    h.apply_obj(ambient_ns("shop"));
    h.apply_obj(pod(1, "shop", "a", json!({}), "10.0.0.1"));
    h.apply_obj(pod(2, "shop", "b", json!({}), "10.0.0.2"));
    h.synced_kube();
    h
}

fn live_ids(h: &Harness) -> Vec<u64> {
    h.live().into_iter().map(|(id, _, _)| id).collect()
}

#[test]
fn fork_child_outlives_its_parent() {
    let mut h = two_ambient_pods();
    h.exec(100, &container_path(1, 1), 501);
    h.fork(100, 101);
    h.exit(100);
    assert_eq!(
        live_ids(&h),
        vec![12, 501],
        "the child keeps the cgroup alive"
    );
    assert_eq!(h.entry(501), Some((Role::Ambient, vec![ip("10.0.0.1")])));
    h.exit(101);
    assert_eq!(live_ids(&h), vec![12]);
    assert!(
        h.entries.is_empty(),
        "the last process gone, the entry goes"
    );
}

#[test]
fn threads_are_not_processes() {
    let mut h = two_ambient_pods();
    h.exec(100, &container_path(1, 1), 501);
    // A thread: child_tgid == parent_tgid.
    h.feed(proc(ProcEvent::Fork {
        parent_pid: 100,
        parent_tgid: 100,
        child_pid: 102,
        child_tgid: 100,
    }));
    // A thread's exit does not end the process.
    h.feed(proc(ProcEvent::Exit {
        pid: 102,
        tgid: 100,
        exit_code: 0,
    }));
    assert_eq!(live_ids(&h), vec![12, 501]);
    assert_eq!(h.resolver.live_processes(), 2);
}

/// What a real kernel reports for a new thread: its parent is the parent of the whole process
/// (`real_parent`), here the shell 1 in /init.scope. Taken for a process, it would move process
/// 100 into its grandparent's cgroup and drop the pod's entry.
#[test]
fn a_thread_as_the_kernel_reports_it_moves_nothing() {
    let mut h = two_ambient_pods();
    h.exec(100, &container_path(1, 1), 501);
    let entries = h.entries.clone();
    h.feed(proc(ProcEvent::Fork {
        parent_pid: 1,
        parent_tgid: 1,
        child_pid: 103,
        child_tgid: 100,
    }));
    assert_eq!(live_ids(&h), vec![12, 501]);
    assert_eq!(h.resolver.live_processes(), 2);
    assert_eq!(h.entries, entries, "no entry changed");
}

#[test]
fn exec_moves_a_process_into_a_container() {
    // How a container starts: the runtime's child execs the entrypoint, now in the new cgroup.
    let mut h = two_ambient_pods();
    h.exec(700, "/system.slice/containerd.service", 41);
    h.fork(700, 701);
    h.exec(701, &container_path(2, 1), 521);
    assert_eq!(live_ids(&h), vec![12, 41, 521]);
    assert_eq!(h.entry(521), Some((Role::Ambient, vec![ip("10.0.0.2")])));
}

#[test]
fn pid_reuse_across_cgroups_is_a_new_process() {
    let mut h = two_ambient_pods();
    h.exec(100, &container_path(1, 1), 501);
    h.exec(200, &container_path(2, 1), 521);
    // 100 exits but its exit was not seen; its pid is reused by a fork in pod 2.
    h.fork(200, 100);
    assert_eq!(
        live_ids(&h),
        vec![12, 521],
        "pod 1's cgroup lost its only process"
    );
    assert_eq!(h.entry(501), None);
    assert_eq!(h.resolver.live_processes(), 3);
    // And reused again by an exec in pod 1's cgroup.
    h.exec(100, &container_path(1, 1), 501);
    assert_eq!(live_ids(&h), vec![12, 501, 521]);
    assert_eq!(h.entry(501), Some((Role::Ambient, vec![ip("10.0.0.1")])));
}

#[test]
fn lost_then_scan_drops_processes() {
    let mut h = two_ambient_pods();
    h.exec(100, &container_path(1, 1), 501);
    h.exec(200, &container_path(2, 1), 521);
    h.fork(200, 201);
    h.feed(proc(ProcEvent::Lost));
    assert_eq!(
        live_ids(&h),
        vec![12, 501, 521],
        "nothing changes until the scan"
    );
    // The scan lists only pod 2's child (and a process not seen before).
    h.scan(&[
        (1, "/init.scope", 12),
        (201, &container_path(2, 1), 521),
        (300, &container_path(2, 2), 522),
    ]);
    assert_eq!(live_ids(&h), vec![12, 521, 522]);
    assert_eq!(h.resolver.live_processes(), 3);
    assert_eq!(
        h.entries.keys().map(|k| k.0).collect::<Vec<_>>(),
        vec![521, 522]
    );
}

#[test]
fn exec_without_facts_disturbs_nothing() {
    let mut h = two_ambient_pods();
    h.exec(100, &container_path(1, 1), 501);
    h.feed(proc(ProcEvent::Exec {
        pid: 100,
        tgid: 100,
        facts: Default::default(),
    }));
    assert_eq!(
        live_ids(&h),
        vec![12, 501],
        "a known process stays where it was"
    );
    h.feed(proc(ProcEvent::Exec {
        pid: 900,
        tgid: 900,
        facts: Default::default(),
    }));
    assert_eq!(live_ids(&h), vec![12, 501]);
    h.exit(900);
    assert_eq!(h.resolver.live_processes(), 2);
}

#[test]
fn nothing_is_emitted_twice() {
    let mut h = two_ambient_pods();
    h.exec(100, &container_path(1, 1), 501);
    h.take_updates();
    h.fork(100, 101);
    h.exec(101, &container_path(1, 1), 501);
    h.apply_obj(pod(1, "shop", "a", json!({}), "10.0.0.1"));
    h.apply_obj(ambient_ns("shop"));
    h.scan(&[
        (1, "/init.scope", 12),
        (100, &container_path(1, 1), 501),
        (101, &container_path(1, 1), 501),
    ]);
    assert_eq!(h.take_updates(), vec![], "no change, no update");
}

#[test]
fn memory_follows_live_processes_not_history() {
    let mut h = two_ambient_pods();
    for round in 0..200u32 {
        let pid = 1000 + round;
        let id = 10_000 + u64::from(round);
        h.exec(pid, &container_path(3 + round, 1), id);
        h.fork(pid, pid + 100_000);
        h.exit(pid);
        h.exit(pid + 100_000);
    }
    assert_eq!(live_ids(&h), vec![12]);
    assert_eq!(h.resolver.live_processes(), 1);
}

/// What `zbridge_decisions{role="none"}` counts: live cgroups with no entry that belong to no
/// owner with entries.
#[test]
fn live_cgroups_without_entries_are_those_of_no_owner_with_entries() {
    let mut h = two_ambient_pods();
    assert_eq!(
        h.resolver.live_cgroups_without_entries(),
        1,
        "the scan's init"
    );
    // Pod 1: a process in its pod-level cgroup (the entry) and one in a container (covered).
    h.exec(100, &pod_path(1), 500);
    h.exec(101, &container_path(1, 1), 501);
    assert_eq!(h.entries.keys().map(|c| c.0).collect::<Vec<_>>(), vec![500]);
    assert_eq!(h.resolver.live_cgroups_without_entries(), 1);
    // A pod outside the mesh.
    h.apply_obj(pod(3, "plain", "c", json!({}), "10.0.0.3"));
    h.exec(102, &container_path(3, 1), 503);
    assert_eq!(h.resolver.live_cgroups_without_entries(), 2);
    h.exit(102);
    assert_eq!(h.resolver.live_cgroups_without_entries(), 1);
}
