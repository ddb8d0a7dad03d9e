//! Kubernetes mode with in-pod capture: an ambient pod's entry says where ztunnel listens
//! (its own namespace) and carries who the pod is, for ZDS; nothing else changes.

mod common;

use common::*;
use resolver::{Capture, Identity, ResolverConfig, Role};
use serde_json::json;

fn inpod(dns: bool) -> Harness {
    let mut config = ResolverConfig::new(NODE);
    config.capture = Capture::InPod { dns };
    let mut h = Harness::with(config);
    h.scan(&[(1, "/init.scope", 12)]);
    h.apply_obj(ambient_ns("shop"));
    h
}

#[test]
fn an_ambient_pod_is_captured_in_pod_with_its_identity() {
    let mut h = inpod(true);
    let mut p = pod(1, "shop", "cart", json!({}), "10.0.0.1");
    p["spec"]["serviceAccountName"] = json!("cart-sa");
    h.apply_obj(p);
    h.apply_obj(pod(2, "shop", "web", json!({}), "10.0.0.2"));
    h.synced_kube();
    h.exec(100, &container_path(1, 1), 501);
    h.exec(200, &container_path(2, 1), 502);
    let entries: Vec<_> = h.entries.values().collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    let cart = entries
        .iter()
        .find(|e| e.pod.as_deref() == Some("shop/cart"))
        .unwrap();
    assert_eq!(cart.role, Role::Ambient);
    assert_eq!(cart.capture, Capture::InPod { dns: true });
    assert_eq!(
        cart.identity,
        Some(Identity {
            uid: uid(1),
            namespace: "shop".into(),
            name: "cart".into(),
            service_account: "cart-sa".into(),
        })
    );
    let web = entries
        .iter()
        .find(|e| e.pod.as_deref() == Some("shop/web"))
        .unwrap();
    assert_eq!(
        web.identity.as_ref().map(|i| i.service_account.as_str()),
        Some("default"),
        "the API server's default service account when none is set"
    );
}

#[test]
fn a_pod_that_leaves_the_mesh_loses_its_entry_and_others_keep_node_capture() {
    let mut h = inpod(false);
    h.apply_obj(pod(1, "shop", "cart", json!({}), "10.0.0.1"));
    h.synced_kube();
    h.exec(100, &container_path(1, 1), 501);
    assert_eq!(h.entries.len(), 1);
    h.apply_obj(pod(
        1,
        "shop",
        "cart",
        json!({"istio.io/dataplane-mode": "none"}),
        "10.0.0.1",
    ));
    assert!(h.entries.is_empty(), "{:?}", h.entries);

    // Node capture (the default) carries no identity.
    let mut n = Harness::new();
    n.scan(&[(1, "/init.scope", 12)]);
    n.apply_obj(ambient_ns("shop"));
    n.apply_obj(pod(1, "shop", "cart", json!({}), "10.0.0.1"));
    n.synced_kube();
    n.exec(100, &container_path(1, 1), 501);
    let e = n.entries.values().next().unwrap();
    assert_eq!((e.capture, e.identity.clone()), (Capture::Node, None));
}
