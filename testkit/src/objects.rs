//! Kubernetes objects as the fake API server serves them to the agent: a namespace, with or
//! without the ambient label, and a running pod of a node.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde_json::json;

/// A namespace; `ambient` labels it `istio.io/dataplane-mode=ambient`.
pub fn namespace(name: &str, ambient: bool) -> Namespace {
    let labels = if ambient {
        json!({"istio.io/dataplane-mode": "ambient"})
    } else {
        json!({})
    };
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels},
    }))
    .expect("a namespace")
}

/// A running pod of `node` with addresses `ips` (the first is `status.podIP`) and `labels`.
pub fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    ips: &[IpAddr],
    labels: serde_json::Value,
) -> Pod {
    let pod_ips: Vec<_> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ips[0].to_string(), "podIPs": pod_ips},
    }))
    .expect("a pod")
}
