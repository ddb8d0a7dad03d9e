//! Recordings' `kube` records: their JSON to the resolver's changes (`zbridge replay`), and the
//! kube cache's changes to records (`zbridge record`).

use k8s_openapi::api::core::v1::{Namespace, Pod};
use resolver::KubeChange;
use watcher::{KubeAction, KubeRecord, Record};

use crate::change::{Change, Object};

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

/// Turns a recording's `kube` record (JSON) into the resolver's change (the object's facts).
///
/// `kind` must be `Pod` or `Namespace` (`apiVersion` `v1`); pods need `metadata.uid`,
/// namespaces `metadata.name`. A field of the wrong type is named by its path.
pub fn kube_record_to_change(record: &KubeRecord) -> Result<KubeChange, KubeRecordError> {
    Ok(object_change(record)?.to_resolver())
}

/// The record as a change of a typed object.
fn object_change(record: &KubeRecord) -> Result<Change, KubeRecordError> {
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
            Object::Pod(Box::new(pod))
        }
        "Namespace" => {
            let ns: Namespace = deserialize(object)?;
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
    Ok(match record.action {
        KubeAction::Apply => Change::Apply(typed),
        KubeAction::Delete => Change::Delete(typed),
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
            serde_json::to_value(&*pod)?
        }
        Object::Namespace(mut ns) => {
            ns.metadata.managed_fields = None;
            serde_json::to_value(&*ns)?
        }
    };
    Ok(Record::Kube(KubeRecord { action, object }))
}
