//! Recordings' `kube` records: their JSON to the resolver's changes (`zbridge replay`), and the
//! kube cache's changes to records (`zbridge record`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod, PodIP, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use resolver::KubeChange;
use serde::Deserialize;
use watcher::{KubeAction, KubeRecord, Record};

use crate::change::{Change, Object};
use crate::recorded_facts::read_facts;

/// Why a `kube` record could not be read; names the field.
#[derive(Debug, thiserror::Error)]
pub enum KubeRecordError {
    #[error("field `object.{field}`: {message}")]
    Field { field: String, message: String },
    #[error("field `object`: not a JSON object ({0})")]
    NotAnObject(String),
}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> KubeRecordError {
    KubeRecordError::Field {
        field: field.into(),
        message: message.into(),
    }
}

/// Turns a recording's `kube` record (JSON) into the resolver's change (the object's facts).
///
/// `kind` must be `Pod` or `Namespace` (`apiVersion` `v1`); pods need `metadata.uid`,
/// namespaces `metadata.name`. A field of the wrong type is named by its path.
pub fn kube_record_to_change(record: &KubeRecord) -> Result<KubeChange, KubeRecordError> {
    let text = record.object.get();
    // The common case in one reading of the text; anything else is read again step by step,
    // to name what is wrong (or to accept what only that reads, such as an escaped `kind`).
    if let Some(facts) = read_facts(text) {
        return Ok(facts.change(record.action));
    }
    let typed = read_checked(text)?;
    let change = match record.action {
        KubeAction::Apply => Change::Apply(typed),
        KubeAction::Delete => Change::Delete(typed),
    };
    Ok(change.to_resolver())
}

/// The object read step by step, each step naming the field it finds wrong.
fn read_checked(text: &str) -> Result<Object, KubeRecordError> {
    let head: TypeMeta = serde_json::from_str(text)
        .map_err(|e| KubeRecordError::NotAnObject(without_position(&e)))?;
    let kind = head
        .kind
        .as_ref()
        .ok_or_else(|| field_error("kind", "missing"))?
        .as_str()
        .ok_or_else(|| field_error("kind", "not a string"))?;
    match head.api_version.as_ref().map(|v| v.as_str()) {
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
            let pod = deserialize::<RecordedPod>(text)?.into_pod();
            if pod.metadata.uid.as_deref().unwrap_or("").is_empty() {
                return Err(field_error(
                    "metadata.uid",
                    "missing (pods are identified by uid)",
                ));
            }
            Object::Pod(Box::new(pod))
        }
        "Namespace" => {
            let ns = Namespace {
                metadata: deserialize::<RecordedObject>(text)?.metadata.into(),
                ..Namespace::default()
            };
            if ns.metadata.name.as_deref().unwrap_or("").is_empty() {
                return Err(field_error(
                    "metadata.name",
                    "missing (namespaces are identified by name)",
                ));
            }
            Object::Namespace(Box::new(ns))
        }
        other => {
            return Err(field_error(
                "kind",
                format!("`{other}`: only `Pod` and `Namespace` are read"),
            ))
        }
    };
    Ok(typed)
}

/// The parts of a recorded object that the facts are made of ([`crate::change::pod_facts`],
/// [`crate::change::namespace_facts`]), and only those. A recorded pod is the whole object as
/// the API server serves it (containers, volumes, conditions, ...): reading all of it into a
/// `Pod` cost more than everything else replay does with the record. These are read into a
/// `Pod` or `Namespace` with only these fields set, so that recorded and watched objects go
/// through the same facts functions; a field of the wrong type among them is named by its
/// path, and the others are not read.
#[derive(Deserialize)]
struct RecordedObject {
    #[serde(default)]
    metadata: RecordedMeta,
}

#[derive(Deserialize)]
struct RecordedPod {
    #[serde(default)]
    metadata: RecordedMeta,
    spec: Option<RecordedPodSpec>,
    status: Option<RecordedPodStatus>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RecordedMeta {
    uid: Option<String>,
    name: Option<String>,
    namespace: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
    creation_timestamp: Option<Time>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RecordedPodSpec {
    pub(crate) node_name: Option<String>,
    pub(crate) host_network: Option<bool>,
    pub(crate) service_account_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RecordedPodStatus {
    pub(crate) phase: Option<String>,
    pub(crate) pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub(crate) pod_ips: Option<Vec<PodIP>>,
}

impl From<RecordedMeta> for ObjectMeta {
    fn from(meta: RecordedMeta) -> ObjectMeta {
        ObjectMeta {
            uid: meta.uid,
            name: meta.name,
            namespace: meta.namespace,
            labels: meta.labels,
            annotations: meta.annotations,
            creation_timestamp: meta.creation_timestamp,
            ..ObjectMeta::default()
        }
    }
}

impl RecordedPod {
    fn into_pod(self) -> Pod {
        Pod {
            metadata: self.metadata.into(),
            spec: self.spec.map(|spec| PodSpec {
                node_name: spec.node_name,
                host_network: spec.host_network,
                service_account_name: spec.service_account_name,
                ..PodSpec::default()
            }),
            status: self.status.map(|status| PodStatus {
                phase: status.phase,
                pod_ip: status.pod_ip,
                pod_ips: status.pod_ips,
                ..PodStatus::default()
            }),
        }
    }
}

/// `apiVersion` and `kind`, as written (their type is checked by [`object_change`]).
#[derive(Deserialize)]
struct TypeMeta {
    #[serde(rename = "apiVersion")]
    api_version: Option<serde_json::Value>,
    kind: Option<serde_json::Value>,
}

/// Reads `T` from an object's text; a field of the wrong type is named by its path. The path
/// is tracked only on a second reading after a failure: tracking it costs an allocation per
/// field read.
fn deserialize<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, KubeRecordError> {
    if let Ok(value) = serde_json::from_str(text) {
        return Ok(value);
    }
    let mut json = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut json).map_err(|err| {
        let path = err.path().to_string();
        field_error(path, without_position(err.inner()))
    })
}

/// A JSON error's message without serde_json's "at line 1 column N": the position within the
/// object's text, which misleads beside the recording's own line number.
fn without_position(error: &serde_json::Error) -> String {
    let message = error.to_string();
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_string(),
        None => message,
    }
}

/// A kube cache change as a recording record: the object as the API server serves it
/// (`apiVersion` and `kind` included), without `metadata.managedFields` (bookkeeping of the
/// API server that nothing reads, and often the larger part of an object).
pub fn change_record(change: Change) -> serde_json::Result<Record> {
    let (action, object) = match change {
        Change::Apply(object) => (KubeAction::Apply, object),
        Change::Delete(object) => (KubeAction::Delete, object),
        Change::Synced => return Ok(Record::KubeSynced),
    };
    let object = match object {
        Object::Pod(mut pod) => {
            pod.metadata.managed_fields = None;
            serde_json::value::to_raw_value(&*pod)?
        }
        Object::Namespace(mut ns) => {
            ns.metadata.managed_fields = None;
            serde_json::value::to_raw_value(&*ns)?
        }
    };
    Ok(Record::Kube(KubeRecord { action, object }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(action: KubeAction, text: &str) -> KubeRecord {
        KubeRecord {
            action,
            object: serde_json::value::RawValue::from_string(text.to_string()).unwrap(),
        }
    }

    #[test]
    fn one_reading_gives_the_facts_the_checked_reading_gives() {
        let plain = [
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"uid":"u1","name":"a","namespace":"ns",
                "labels":{"app":"x","istio.io/dataplane-mode":"ambient"},
                "annotations":{"sidecar.istio.io/status":"{\"a\":1}"},
                "creationTimestamp":"2023-11-14T22:13:22Z"},
                "spec":{"nodeName":"n","hostNetwork":true,"serviceAccountName":"sa",
                "containers":[{"name":"c"}]},
                "status":{"phase":"Running","podIP":"10.0.0.1",
                "podIPs":[{"ip":"fd00::1"},{"ip":"10.0.0.1"}]}}"#,
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"uid":"u2"}}"#,
            // A label given twice keeps its last value; escapes in the kept strings.
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"uid":"u\u0033","name":"p\n",
                "labels":{"app":"ztunnel","app":"other","istio.io/dataplane-mode":"n\u006fne"},
                "annotations":{"x":"y"}},
                "spec":{"serviceAccountName":""},
                "status":{"phase":"Failed","podIP":"10.0.0.2","podIPs":[{"ip":"bad"}]}}"#,
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"uid":"u4","labels":null,
                "annotations":null},"spec":null,"status":{"podIPs":null,"podIP":"10.0.0.3"}}"#,
            r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"ns",
                "labels":{"istio.io/dataplane-mode":"ambient"}},
                "spec":{"finalizers":["kubernetes"]},"status":{"phase":"Active"}}"#,
            r#"{"kind":"Namespace","apiVersion":"v1","metadata":{"name":"ns2"}}"#,
        ];
        for text in plain {
            for action in [KubeAction::Apply, KubeAction::Delete] {
                let once = read_facts(text).expect(text).change(action);
                let typed = read_checked(text).unwrap();
                let checked = match action {
                    KubeAction::Apply => Change::Apply(typed),
                    KubeAction::Delete => Change::Delete(typed),
                };
                assert_eq!(once, checked.to_resolver(), "{text}");
                assert_eq!(
                    kube_record_to_change(&record(action, text)).unwrap(),
                    once,
                    "{text}"
                );
            }
        }
        // Not plain: declined, and read step by step, which accepts the first and names what
        // is wrong in the others.
        let escaped = r#"{"apiVersion":"v1","kind":"P\u006fd","metadata":{"uid":"u1"}}"#;
        assert!(read_facts(escaped).is_none());
        assert!(read_checked(escaped).is_ok());
        assert!(kube_record_to_change(&record(KubeAction::Apply, escaped)).is_ok());
        for (text, field) in [
            (
                r#"{"apiVersion":"v2","kind":"Pod","metadata":{"uid":"u"}}"#,
                "apiVersion",
            ),
            (
                r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a"}}"#,
                "metadata.uid",
            ),
            (
                r#"{"apiVersion":"v1","kind":"Pod","metadata":{"uid":""}}"#,
                "metadata.uid",
            ),
            (
                r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"uid":"u"}}"#,
                "metadata.name",
            ),
            (
                r#"{"apiVersion":"v1","kind":"Job","metadata":{"uid":"u"}}"#,
                "kind",
            ),
            (
                r#"{"apiVersion":"v1","kind":"Pod","metadata":{"uid":"u"},"spec":{"hostNetwork":"x"}}"#,
                "spec.hostNetwork",
            ),
            (
                r#"{"apiVersion":"v1","kind":"Pod","metadata":{"uid":"u","labels":{"a":1}}}"#,
                "metadata.labels.a",
            ),
            (
                r#"{"apiVersion":"v1","kind":"Pod","metadata":{"uid":"u","annotations":{"a":null}}}"#,
                "metadata.annotations.a",
            ),
            (
                r#"{"apiVersion":"v1","kind":"Pod","metadata":{"uid":"u","labels":["a"]}}"#,
                "metadata.labels",
            ),
            (
                r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"n","uid":"a","uid":"b"}}"#,
                "metadata",
            ),
            (
                r#"{"apiVersion":"v1","kind":"Pod","metadata":{"uid":"u","creationTimestamp":"x"}}"#,
                "metadata.creationTimestamp",
            ),
        ] {
            assert!(read_facts(text).is_none(), "{text}");
            let error = kube_record_to_change(&record(KubeAction::Apply, text))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(&format!("`object.{field}")),
                "{text}: {error}"
            );
        }
    }
}
