//! Kubernetes objects as the resolver needs them: recordings' JSON to typed objects, and typed
//! objects to the few facts the ambient rules read.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use watcher::{KubeAction, KubeRecord};

use crate::input::{KubeChange, KubeObject};
use crate::workloads::ipv4_first;

/// The label that opts a pod or namespace into (or, on a pod, out of) ambient.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Present on pods that carry an Istio sidecar: never captured by ambient.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// The label ztunnel's pods carry (`app=ztunnel`).
pub const APP_LABEL: &str = "app";

/// Why a `kube` record could not be read; names the field.
#[derive(Debug, thiserror::Error)]
pub enum KubeRecordError {
    #[error("field `object.{field}`: {message}")]
    Field { field: String, message: String },
}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> KubeRecordError {
    KubeRecordError::Field {
        field: field.into(),
        message: message.into(),
    }
}

/// Turns a recording's `kube` record (JSON) into a typed change.
///
/// `kind` must be `Pod` or `Namespace` (`apiVersion` `v1`); pods need `metadata.uid`,
/// namespaces `metadata.name`. A field of the wrong type is named by its path.
pub fn kube_record_to_change(record: &KubeRecord) -> Result<KubeChange, KubeRecordError> {
    let object = &record.object;
    let kind = object
        .get("kind")
        .ok_or_else(|| field_error("kind", "missing"))?
        .as_str()
        .ok_or_else(|| field_error("kind", "not a string"))?;
    match object.get("apiVersion").map(|v| v.as_str()) {
        Some(Some("v1")) => {}
        Some(Some(other)) => {
            return Err(field_error(
                "apiVersion",
                format!("`{other}`: only `v1` Pod and Namespace objects are read"),
            ))
        }
        Some(None) => return Err(field_error("apiVersion", "not a string")),
        None => return Err(field_error("apiVersion", "missing")),
    }
    let typed = match kind {
        "Pod" => {
            let pod: Pod = deserialize(object)?;
            if pod.metadata.uid.as_deref().unwrap_or("").is_empty() {
                return Err(field_error(
                    "metadata.uid",
                    "missing (pods are identified by uid)",
                ));
            }
            KubeObject::Pod(Box::new(pod))
        }
        "Namespace" => {
            let ns: Namespace = deserialize(object)?;
            if ns.metadata.name.as_deref().unwrap_or("").is_empty() {
                return Err(field_error(
                    "metadata.name",
                    "missing (namespaces are identified by name)",
                ));
            }
            KubeObject::Namespace(Box::new(ns))
        }
        other => {
            return Err(field_error(
                "kind",
                format!("`{other}`: only `Pod` and `Namespace` are read"),
            ))
        }
    };
    Ok(match record.action {
        KubeAction::Apply => KubeChange::Apply(typed),
        KubeAction::Delete => KubeChange::Delete(typed),
    })
}

fn deserialize<T: serde::de::DeserializeOwned>(
    value: &serde_json::Value,
) -> Result<T, KubeRecordError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        field_error(path, err.inner().to_string())
    })
}

/// What the ambient rules read from a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    /// The pod's `istio.io/dataplane-mode` label.
    pub dataplane_mode: Option<String>,
    /// The pod's `app` label.
    pub app: Option<String>,
    pub host_network: bool,
    pub has_sidecar: bool,
    /// `Succeeded` or `Failed`.
    pub terminal: bool,
    /// `status.podIPs` (or `status.podIP`), IPv4 first.
    pub ips: Vec<IpAddr>,
    /// `metadata.creationTimestamp` in ns since the epoch; `None` when absent (sorts first).
    pub created: Option<i128>,
    /// `spec.serviceAccountName` (`default` when unset, as the API server fills it): the
    /// identity ztunnel serves an in-pod pod with.
    pub service_account: String,
}

impl PodFacts {
    /// The facts of a typed pod; `None` without a uid.
    pub fn of(pod: &Pod) -> Option<PodFacts> {
        let meta = &pod.metadata;
        let uid = meta.uid.clone().filter(|u| !u.is_empty())?;
        let labels = meta.labels.as_ref();
        let label = |k: &str| labels.and_then(|l| l.get(k)).cloned();
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = Vec::new();
        if let Some(status) = status {
            for pod_ip in status.pod_ips.iter().flatten() {
                if let Ok(ip) = pod_ip.ip.parse() {
                    ips.push(ip);
                }
            }
            if ips.is_empty() {
                if let Some(ip) = status.pod_ip.as_deref().and_then(|s| s.parse().ok()) {
                    ips.push(ip);
                }
            }
        }
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
        Some(PodFacts {
            uid,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            node: spec.and_then(|s| s.node_name.clone()),
            dataplane_mode: label(DATAPLANE_MODE_LABEL),
            app: label(APP_LABEL),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            has_sidecar: meta
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(SIDECAR_STATUS_ANNOTATION)),
            terminal: phase == "Succeeded" || phase == "Failed",
            ips: ipv4_first(ips),
            created: meta
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_nanosecond()),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_string()),
        })
    }

    /// `NAMESPACE/NAME`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What the ambient rules read from a namespace: its labels that matter.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NamespaceFacts {
    /// The namespace's `istio.io/dataplane-mode` label.
    pub dataplane_mode: Option<String>,
}

impl NamespaceFacts {
    pub fn of(ns: &Namespace) -> NamespaceFacts {
        let labels: Option<&BTreeMap<String, String>> = ns.metadata.labels.as_ref();
        NamespaceFacts {
            dataplane_mode: labels.and_then(|l| l.get(DATAPLANE_MODE_LABEL)).cloned(),
        }
    }
}
