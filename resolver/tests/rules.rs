//! Istio's membership rules, one case per rule and per exclusion, and decisions that change
//! while the pods run. Each test feeds inputs and checks the exact entries programmed.

mod common;

use common::*;
use resolver::{ResolverConfig, Role, Update};
use serde_json::json;

/// A harness with pod 1 running (one process in one container) in namespace `ns`.
fn one_pod(ns_labels: serde_json::Value, pod_obj: serde_json::Value) -> Harness {
    let mut h = Harness::new();
    h.scan(&[(100, &container_path(1, 1), 501)]);
    let ns = pod_obj["metadata"]["namespace"]
        .as_str()
        .unwrap()
        .to_string();
    h.apply_obj(namespace(&ns, ns_labels));
    h.apply_obj(pod_obj);
    h.synced_kube();
    h
}

#[test]
fn pod_label_opts_in_in_any_namespace() {
    let h = one_pod(
        json!({}),
        pod(
            1,
            "default",
            "a",
            json!({"istio.io/dataplane-mode": "ambient"}),
            "10.0.0.1",
        ),
    );
    assert_eq!(h.entry(501), Some((Role::Ambient, vec![ip("10.0.0.1")])));
    assert_eq!(h.entries.len(), 1);
    assert_eq!(h.synced, 1);
}

#[test]
fn namespace_label_opts_in() {
    let h = one_pod(
        json!({"istio.io/dataplane-mode": "ambient"}),
        pod(1, "shop", "a", json!({}), "10.0.0.1"),
    );
    assert_eq!(h.entry(501), Some((Role::Ambient, vec![ip("10.0.0.1")])));
}

#[test]
fn no_label_is_not_captured() {
    let h = one_pod(json!({}), pod(1, "shop", "a", json!({}), "10.0.0.1"));
    assert!(h.entries.is_empty());
    assert_eq!(
        h.live(),
        vec![(501, container_path(1, 1), Some("shop/a".to_string()))]
    );
}

#[test]
fn pod_opting_out_with_none_beats_the_namespace() {
    let h = one_pod(
        json!({"istio.io/dataplane-mode": "ambient"}),
        pod(
            1,
            "shop",
            "a",
            json!({"istio.io/dataplane-mode": "none"}),
            "10.0.0.1",
        ),
    );
    assert!(h.entries.is_empty());
}

#[test]
fn host_network_is_never_captured() {
    let mut p = pod(
        1,
        "shop",
        "a",
        json!({"istio.io/dataplane-mode": "ambient"}),
        "10.0.0.1",
    );
    p["spec"]["hostNetwork"] = json!(true);
    let h = one_pod(json!({"istio.io/dataplane-mode": "ambient"}), p);
    assert!(h.entries.is_empty());
}

#[test]
fn sidecar_pods_are_never_captured() {
    let mut p = pod(1, "shop", "a", json!({}), "10.0.0.1");
    p["metadata"]["annotations"] = json!({"sidecar.istio.io/status": "{}"});
    let h = one_pod(json!({"istio.io/dataplane-mode": "ambient"}), p);
    assert!(h.entries.is_empty());
}

#[test]
fn excluded_namespace_is_never_captured() {
    let h = one_pod(
        json!({"istio.io/dataplane-mode": "ambient"}),
        pod(
            1,
            "kube-system",
            "dns",
            json!({"istio.io/dataplane-mode": "ambient"}),
            "10.0.0.1",
        ),
    );
    assert!(h.entries.is_empty());
}

#[test]
fn excluded_namespaces_are_configurable() {
    let mut config = ResolverConfig::new(NODE);
    config.excluded_namespaces = vec!["legacy".to_string()];
    let mut h = Harness::with(config);
    h.scan(&[
        (100, &container_path(1, 1), 501),
        (101, &container_path(2, 1), 502),
    ]);
    h.apply_obj(pod(
        1,
        "legacy",
        "a",
        json!({"istio.io/dataplane-mode": "ambient"}),
        "10.0.0.1",
    ));
    h.apply_obj(pod(
        2,
        "kube-system",
        "b",
        json!({"istio.io/dataplane-mode": "ambient"}),
        "10.0.0.2",
    ));
    assert_eq!(h.entry(501), None);
    assert_eq!(h.entry(502), Some((Role::Ambient, vec![ip("10.0.0.2")])));
}

#[test]
fn terminal_phases_are_not_captured() {
    for phase in ["Succeeded", "Failed"] {
        let mut p = pod(1, "shop", "a", json!({}), "10.0.0.1");
        p["status"]["phase"] = json!(phase);
        let h = one_pod(json!({"istio.io/dataplane-mode": "ambient"}), p);
        assert!(h.entries.is_empty(), "{phase}");
    }
}

#[test]
fn a_pod_without_ip_is_not_captured_until_it_has_one() {
    let mut p = pod(1, "shop", "a", json!({}), "10.0.0.1");
    p["status"] = json!({"phase": "Pending"});
    let mut h = one_pod(json!({"istio.io/dataplane-mode": "ambient"}), p);
    assert!(h.entries.is_empty());
    h.apply_obj(pod(1, "shop", "a", json!({}), "10.0.0.1"));
    assert_eq!(h.entry(501), Some((Role::Ambient, vec![ip("10.0.0.1")])));
}

/// A pod of this node whose status has no address yet (the kubelet has not reported it).
fn pending_pod(n: u32, ns: &str, name: &str) -> serde_json::Value {
    let mut p = pod(n, ns, name, json!({}), "10.0.0.1");
    p["status"] = json!({"phase": "Pending"});
    p
}

/// A synced harness with pod 1 (`shop/a`, no process yet) pending in the ambient namespace
/// `shop`.
fn pending_pod_in_an_ambient_namespace() -> Harness {
    pending_pod_in_an_ambient_namespace_with(ResolverConfig::new(NODE))
}

/// [`pending_pod_in_an_ambient_namespace`] with the resolver configured by `config`.
fn pending_pod_in_an_ambient_namespace_with(config: ResolverConfig) -> Harness {
    let mut h = Harness::with(config);
    h.scan(&[]);
    h.apply_obj(ambient_ns("shop"));
    h.apply_obj(pending_pod(1, "shop", "a"));
    h.synced_kube();
    h
}

#[test]
fn a_pod_without_ip_in_its_status_is_captured_with_its_network_namespace_address() {
    let mut h = pending_pod_in_an_ambient_namespace();
    h.exec_with_ips(100, &container_path(1, 1), 501, &["fd00::7", "10.0.0.7"]);
    assert_eq!(
        h.entry(501),
        Some((Role::Ambient, vec![ip("10.0.0.7"), ip("fd00::7")]))
    );
    // The kubelet reports the same addresses: nothing changes, nothing is written again.
    h.take_updates();
    let mut reported = pod(1, "shop", "a", json!({}), "10.0.0.7");
    reported["status"]["podIPs"] = json!([{"ip": "10.0.0.7"}, {"ip": "fd00::7"}]);
    h.apply_obj(reported);
    assert_eq!(h.take_updates(), vec![]);
    // The status says otherwise (a second interface in the namespace, say): the status wins.
    h.apply_obj(pod(1, "shop", "a", json!({}), "10.0.0.8"));
    assert_eq!(h.entry(501), Some((Role::Ambient, vec![ip("10.0.0.8")])));
}

#[test]
fn a_pod_without_ip_anywhere_waits_for_the_first_address_seen() {
    let mut h = pending_pod_in_an_ambient_namespace();
    // Its first process's namespace had no address yet (or it was gone before it was read).
    h.exec(100, &container_path(1, 1), 501);
    assert!(h.entries.is_empty());
    // A later process of the pod shows the namespace's address.
    h.exec_with_ips(101, &container_path(1, 2), 502, &["10.0.0.7"]);
    assert_eq!(h.entry(501), Some((Role::Ambient, vec![ip("10.0.0.7")])));
    assert_eq!(h.entry(502), Some((Role::Ambient, vec![ip("10.0.0.7")])));
    // Those processes exit: the addresses they showed go with them.
    h.exit(101);
    assert!(h.entries.is_empty(), "{:?}", h.entries);
}

#[test]
fn the_nodes_namespace_never_lends_a_pod_its_addresses() {
    const NODE_NETNS: u64 = 4026531840;
    let mut h = Harness::new();
    // PID 1 (the node's init) tells which namespace is the node's. A process of the pod that
    // has not joined the pod's namespace yet (the runtime's init, caught by the scan) shows
    // the node's addresses: they are not the pod's.
    h.feed(proc(watcher::ProcEvent::Scan {
        processes: vec![
            watcher::ScannedProcess {
                pid: 1,
                facts: facts_in_netns("/init.scope", 2, NODE_NETNS, &["192.168.1.5"]),
            },
            watcher::ScannedProcess {
                pid: 100,
                facts: facts_in_netns(&container_path(1, 1), 501, NODE_NETNS, &["192.168.1.5"]),
            },
        ],
    }));
    h.apply_obj(ambient_ns("shop"));
    h.apply_obj(pending_pod(1, "shop", "a"));
    h.synced_kube();
    assert!(h.entries.is_empty(), "{:?}", h.entries);
    // The pod's own process, in the pod's namespace: its address is the pod's.
    h.exec_in_netns(101, &container_path(1, 1), 501, 4026532001, &["10.0.0.7"]);
    assert_eq!(h.entry(501), Some((Role::Ambient, vec![ip("10.0.0.7")])));
}

#[test]
fn a_pid_1_shown_in_a_pods_cgroup_does_not_name_the_nodes_namespace() {
    const POD_NETNS: u64 = 4026532001;
    let mut h = pending_pod_in_an_ambient_namespace();
    // A recording may say anything: PID 1 in the pod's cgroup, in the pod's namespace.
    h.exec_in_netns(1, &container_path(1, 1), 501, POD_NETNS, &["10.0.0.7"]);
    assert_eq!(h.entry(501), Some((Role::Ambient, vec![ip("10.0.0.7")])));
    // The pod's other processes show the same namespace: still the pod's.
    h.exec_in_netns(101, &container_path(1, 2), 502, POD_NETNS, &["10.0.0.7"]);
    assert_eq!(h.entry(502), Some((Role::Ambient, vec![ip("10.0.0.7")])));
}

#[test]
fn the_configured_node_namespace_stands_in_for_pid_1s() {
    const NODE_NETNS: u64 = 4026531840;
    let mut config = ResolverConfig::new(NODE);
    config.node_netns = Some(NODE_NETNS);
    let mut h = pending_pod_in_an_ambient_namespace_with(config);
    // No PID 1 facts: the configured namespace is the node's.
    h.exec_in_netns(
        100,
        &container_path(1, 1),
        501,
        NODE_NETNS,
        &["192.168.1.5"],
    );
    assert!(h.entries.is_empty(), "{:?}", h.entries);
    h.exec_in_netns(101, &container_path(1, 1), 501, 4026532001, &["10.0.0.7"]);
    assert_eq!(h.entry(501), Some((Role::Ambient, vec![ip("10.0.0.7")])));
}

#[test]
fn ztunnels_address_comes_from_its_status_only() {
    let mut zt = pending_pod(1, "istio-system", "ztunnel-a");
    zt["metadata"]["labels"] = json!({"app": "ztunnel"});
    let mut h = Harness::new();
    h.scan(&[]);
    h.apply_obj(namespace("istio-system", json!({})));
    h.apply_obj(zt);
    h.synced_kube();
    h.exec_with_ips(100, &container_path(1, 1), 501, &["10.0.0.3"]);
    // ztunnel's cgroup is ztunnel's, but no address is sent to the programs before its
    // status has one: every captured connect goes to that address.
    assert_eq!(h.entry(501), Some((Role::Ztunnel, vec![])));
    assert_eq!(h.ztunnel, Some(vec![]));
}

#[test]
fn a_namespace_address_does_not_override_the_rules() {
    // hostNetwork: the namespace's addresses are the node's.
    let mut host = pending_pod(1, "shop", "a");
    host["spec"]["hostNetwork"] = json!(true);
    // Not ambient at all.
    let plain = pending_pod(2, "plain", "b");
    let mut h = Harness::new();
    h.scan(&[]);
    h.apply_obj(ambient_ns("shop"));
    h.apply_obj(namespace("plain", json!({})));
    h.apply_obj(host);
    h.apply_obj(plain);
    h.synced_kube();
    h.exec_with_ips(100, &container_path(1, 1), 501, &["192.168.1.5"]);
    h.exec_with_ips(200, &container_path(2, 1), 601, &["10.0.0.9"]);
    assert!(h.entries.is_empty(), "{:?}", h.entries);
}

#[test]
fn dual_stack_pod_gets_both_addresses_ipv4_first() {
    let mut p = pod(1, "shop", "a", json!({}), "fd00::1");
    p["status"]["podIPs"] = json!([{"ip": "fd00::1"}, {"ip": "10.0.0.1"}]);
    let h = one_pod(json!({"istio.io/dataplane-mode": "ambient"}), p);
    assert_eq!(
        h.entry(501),
        Some((Role::Ambient, vec![ip("10.0.0.1"), ip("fd00::1")]))
    );
}

#[test]
fn pods_of_other_nodes_are_ignored() {
    let mut p = pod(
        1,
        "shop",
        "a",
        json!({"istio.io/dataplane-mode": "ambient"}),
        "10.0.0.1",
    );
    p["spec"]["nodeName"] = json!("worker-2");
    let h = one_pod(json!({}), p);
    assert!(h.entries.is_empty());
    assert_eq!(
        h.live()[0].2,
        None,
        "a pod of another node has no name here"
    );
}

#[test]
fn ztunnel_of_this_node_in_the_system_namespace() {
    let mut h = one_pod(
        json!({}),
        pod(
            1,
            "istio-system",
            "ztunnel-x",
            json!({"app": "ztunnel"}),
            "10.0.0.3",
        ),
    );
    assert_eq!(h.entry(501), Some((Role::Ztunnel, vec![ip("10.0.0.3")])));
    assert_eq!(h.ztunnel, Some(vec![ip("10.0.0.3")]));
    // Deleted: the address is cleared and the entry goes.
    h.delete_obj(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"uid": uid(1)}}));
    assert_eq!(h.ztunnel, Some(vec![]));
    assert!(h.entries.is_empty());
    // Recreated (new pod, new address, new cgroup).
    h.exec(200, &container_path(2, 1), 601);
    h.apply_obj(pod(
        2,
        "istio-system",
        "ztunnel-y",
        json!({"app": "ztunnel"}),
        "10.0.0.33",
    ));
    assert_eq!(h.ztunnel, Some(vec![ip("10.0.0.33")]));
    assert_eq!(h.entry(601), Some((Role::Ztunnel, vec![ip("10.0.0.33")])));
}

#[test]
fn during_a_ztunnel_rollout_the_newest_with_an_address_is_used() {
    let created = |mut object: serde_json::Value, at: &str| {
        object["metadata"]["creationTimestamp"] = json!(at);
        object
    };
    let ztunnel =
        |n, name, address| pod(n, "istio-system", name, json!({"app": "ztunnel"}), address);
    let mut h = one_pod(
        json!({}),
        created(
            ztunnel(1, "ztunnel-old", "10.0.0.3"),
            "2024-01-01T00:00:00Z",
        ),
    );
    assert_eq!(h.ztunnel, Some(vec![ip("10.0.0.3")]));
    // The new one, not yet with an address: the old one stays.
    let mut new = created(
        ztunnel(2, "ztunnel-new", "10.0.0.4"),
        "2024-01-02T00:00:00Z",
    );
    new["status"] = json!({"phase": "Pending"});
    h.apply_obj(new);
    assert_eq!(h.ztunnel, Some(vec![ip("10.0.0.3")]));
    // It has one: it is the newest.
    h.apply_obj(created(
        ztunnel(2, "ztunnel-new", "10.0.0.4"),
        "2024-01-02T00:00:00Z",
    ));
    assert_eq!(h.ztunnel, Some(vec![ip("10.0.0.4")]));
    // An older one changing does not take over.
    h.apply_obj(created(
        ztunnel(1, "ztunnel-old", "10.0.0.5"),
        "2024-01-01T00:00:00Z",
    ));
    assert_eq!(h.ztunnel, Some(vec![ip("10.0.0.4")]));
    // The newest ends (terminal): back to the other.
    let mut ended = created(
        ztunnel(2, "ztunnel-new", "10.0.0.4"),
        "2024-01-02T00:00:00Z",
    );
    ended["status"]["phase"] = json!("Failed");
    h.apply_obj(ended);
    assert_eq!(h.ztunnel, Some(vec![ip("10.0.0.5")]));
    // Same creation time: by name.
    h.apply_obj(created(
        ztunnel(3, "ztunnel-a", "10.0.0.6"),
        "2024-01-01T00:00:00Z",
    ));
    assert_eq!(
        h.ztunnel,
        Some(vec![ip("10.0.0.5")]),
        "ztunnel-old > ztunnel-a"
    );
    h.delete_obj(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"uid": uid(1)}}));
    assert_eq!(h.ztunnel, Some(vec![ip("10.0.0.6")]));
}

#[test]
fn system_namespace_is_configurable() {
    let mut config = ResolverConfig::new(NODE);
    config.system_namespace = "mesh".to_string();
    let mut h = Harness::with(config);
    h.scan(&[(100, &container_path(1, 1), 501)]);
    h.apply_obj(pod(
        1,
        "mesh",
        "ztunnel-x",
        json!({"app": "ztunnel"}),
        "10.0.0.3",
    ));
    assert_eq!(h.ztunnel, Some(vec![ip("10.0.0.3")]));
}

#[test]
fn a_ztunnel_labelled_pod_elsewhere_is_not_trusted() {
    // In an ambient namespace: it is an ordinary ambient pod, and no ztunnel address is set.
    let mut h = one_pod(
        json!({"istio.io/dataplane-mode": "ambient"}),
        pod(
            1,
            "evil",
            "ztunnel-fake",
            json!({"app": "ztunnel"}),
            "10.0.0.66",
        ),
    );
    assert_eq!(h.entry(501), Some((Role::Ambient, vec![ip("10.0.0.66")])));
    assert!(matches!(h.ztunnel.as_deref(), Some([])), "{:?}", h.ztunnel);
    // In the system namespace but on another node: not this node's ztunnel.
    let mut other = pod(
        2,
        "istio-system",
        "ztunnel-remote",
        json!({"app": "ztunnel"}),
        "10.0.9.3",
    );
    other["spec"]["nodeName"] = json!("worker-2");
    h.apply_obj(other);
    assert!(matches!(h.ztunnel.as_deref(), Some([])));
}

#[test]
fn namespace_label_flipped_both_ways_while_pods_run() {
    let mut h = Harness::new();
    h.scan(&[
        (100, &container_path(1, 1), 501),
        (101, &container_path(1, 2), 502),
        (102, &container_path(2, 1), 511),
    ]);
    h.apply_obj(namespace("shop", json!({})));
    h.apply_obj(pod(1, "shop", "a", json!({}), "10.0.0.1"));
    h.apply_obj(pod(2, "shop", "b", json!({}), "10.0.0.2"));
    h.synced_kube();
    assert!(h.entries.is_empty());
    h.take_updates();
    h.apply_obj(ambient_ns("shop"));
    assert_eq!(
        h.entries.keys().map(|k| k.0).collect::<Vec<_>>(),
        vec![501, 502, 511]
    );
    assert_eq!(h.take_updates().len(), 3, "one upsert per container cgroup");
    // The same label again: nothing emitted.
    h.apply_obj(ambient_ns("shop"));
    assert!(h.take_updates().is_empty());
    h.apply_obj(namespace("shop", json!({"other": "x"})));
    assert!(h.entries.is_empty());
    assert_eq!(h.take_updates().len(), 3, "one delete per entry");
    h.apply_obj(ambient_ns("shop"));
    assert_eq!(h.entries.len(), 3);
    // Namespace deleted: its label is gone too.
    h.delete_obj(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}));
    assert!(h.entries.is_empty());
}

#[test]
fn a_namespace_flipped_back_enrols_what_changed_while_it_was_off() {
    let mut h = Harness::new();
    h.scan(&[
        (100, &container_path(1, 1), 501),
        (101, &container_path(1, 2), 502),
    ]);
    h.apply_obj(ambient_ns("shop"));
    h.apply_obj(pod(1, "shop", "a", json!({}), "10.0.0.1"));
    h.synced_kube();
    let before = h.entries.clone();
    assert_eq!(before.keys().map(|k| k.0).collect::<Vec<_>>(), [501, 502]);
    // Off and on again with nothing else changed: the very same entries.
    h.apply_obj(namespace("shop", json!({})));
    assert!(h.entries.is_empty());
    h.apply_obj(ambient_ns("shop"));
    assert_eq!(h.entries, before);
    // Off; meanwhile a container ends, another starts and the pod is renamed; then on: the
    // entries are those of the pod as it is now, not those it had when last on.
    h.apply_obj(namespace("shop", json!({})));
    h.exit(101);
    h.exec(102, &container_path(1, 3), 503);
    h.apply_obj(pod(1, "shop", "renamed", json!({}), "10.0.0.1"));
    assert!(h.entries.is_empty());
    h.apply_obj(ambient_ns("shop"));
    assert_eq!(
        h.entries
            .values()
            .map(|e| (e.cgroup_id.0, e.pod.clone(), e.role))
            .collect::<Vec<_>>(),
        [
            (501, Some("shop/renamed".to_string()), Role::Ambient),
            (503, Some("shop/renamed".to_string()), Role::Ambient),
        ]
    );
}

#[test]
fn pod_opted_out_and_back_in() {
    let mut h = one_pod(
        json!({"istio.io/dataplane-mode": "ambient"}),
        pod(1, "shop", "a", json!({}), "10.0.0.1"),
    );
    assert!(h.entry(501).is_some());
    h.apply_obj(pod(
        1,
        "shop",
        "a",
        json!({"istio.io/dataplane-mode": "none"}),
        "10.0.0.1",
    ));
    assert_eq!(h.entry(501), None);
    h.apply_obj(pod(1, "shop", "a", json!({}), "10.0.0.1"));
    assert_eq!(h.entry(501), Some((Role::Ambient, vec![ip("10.0.0.1")])));
}

#[test]
fn pod_level_cgroup_with_a_process_carries_the_entry() {
    // A process in the pod's own cgroup gives its id: one entry there covers every container.
    let mut h = Harness::new();
    h.scan(&[
        (100, &container_path(1, 1), 501),
        (101, &container_path(1, 2), 502),
    ]);
    h.apply_obj(ambient_ns("shop"));
    h.apply_obj(pod(1, "shop", "a", json!({}), "10.0.0.1"));
    assert_eq!(h.entries.len(), 2);
    h.exec(150, &pod_path(1), 500);
    assert_eq!(h.entries.keys().map(|k| k.0).collect::<Vec<_>>(), vec![500]);
    assert_eq!(&*h.entries[&watcher::CgroupId(500)].cgroup, pod_path(1));
    h.exit(150);
    assert_eq!(
        h.entries.keys().map(|k| k.0).collect::<Vec<_>>(),
        vec![501, 502]
    );
}

#[test]
fn injected_cgroup_ids_enroll_the_pod_level_cgroup() {
    struct Ids;
    impl resolver::CgroupIds for Ids {
        fn id_of(&mut self, path: &str) -> Option<watcher::CgroupId> {
            (path == pod_path(1)).then_some(watcher::CgroupId(500))
        }
    }
    let mut h = Harness::new();
    h.resolver = resolver::Resolver::with_cgroup_ids(ResolverConfig::new(NODE), Box::new(Ids));
    h.scan(&[(100, &container_path(1, 1), 501)]);
    h.apply_obj(ambient_ns("shop"));
    h.apply_obj(pod(1, "shop", "a", json!({}), "10.0.0.1"));
    assert_eq!(h.entries.keys().map(|k| k.0).collect::<Vec<_>>(), vec![500]);
    // The container's processes all exit: the pod-level entry stays for containers to come.
    h.exit(100);
    assert_eq!(h.entries.keys().map(|k| k.0).collect::<Vec<_>>(), vec![500]);
    // The pod is deleted: the entry goes.
    h.delete_obj(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"uid": uid(1)}}));
    assert!(h.entries.is_empty());
}

#[test]
fn a_pod_known_before_its_processes_is_enrolled_at_first_exec() {
    let mut h = Harness::new();
    h.scan(&[]);
    h.apply_obj(ambient_ns("shop"));
    h.apply_obj(pod(1, "shop", "a", json!({}), "10.0.0.1"));
    h.synced_kube();
    assert!(h.entries.is_empty());
    h.exec(100, &container_path(1, 1), 501);
    assert_eq!(h.entry(501), Some((Role::Ambient, vec![ip("10.0.0.1")])));
}

#[test]
fn synced_waits_for_both_the_scan_and_the_kube_cache() {
    let mut h = Harness::new();
    h.synced_kube();
    assert_eq!(h.synced, 0);
    h.scan(&[]);
    assert_eq!(h.synced, 1);
    h.scan(&[]);
    h.synced_kube();
    assert_eq!(h.synced, 1, "emitted once");
    assert!(h
        .log
        .iter()
        .any(|u| matches!(u, Update::SetZtunnel { ips } if ips.is_empty())));
}

/// "No ztunnel" is not said before the first full picture: the address a previous run pinned
/// stays in force while the kube cache lists, and is cleared at `Synced` only if still none.
#[test]
fn no_ztunnel_is_said_only_once_synced() {
    let mut h = Harness::new();
    h.scan(&[(1, "/init.scope", 12)]);
    assert_eq!(h.ztunnel, None, "nothing said before the kube cache synced");
    h.synced_kube();
    assert_eq!(
        h.ztunnel,
        Some(vec![]),
        "no ztunnel pod after sync: now it is the truth"
    );
    assert_eq!(h.synced, 1);
    let order: Vec<bool> = h
        .take_updates()
        .iter()
        .filter_map(|u| match u {
            Update::SetZtunnel { .. } => Some(false),
            Update::Synced => Some(true),
            _ => None,
        })
        .collect();
    assert_eq!(
        order,
        vec![false, true],
        "the address is settled before Synced"
    );
}
