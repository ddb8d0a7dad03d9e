//! A recorded object's facts read straight from its text, in one pass: what replay reads of a
//! `kube` record when the object is a plain `v1` Pod or Namespace (the common case), inside the
//! parse of the record's line ([`watcher::recording::ObjectReading`]).
//!
//! It reads the fields [`crate::change::pod_facts`] and [`crate::change::namespace_facts`] read,
//! with the types the step-by-step reading in [`crate::record`] gives them, so it accepts no
//! object that reading refuses, and it gives the same facts; a pod's strings are borrowed from
//! the line and kept as this thread's shared copies ([`crate::shared_strings`]), and the
//! labels and annotations not read are passed over without being kept. Anything
//! else (an escape in `apiVersion` or `kind`, another kind, a field of the wrong type) is
//! declined, and read step by step, which names what is wrong.

use std::fmt;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use resolver::facts::{
    NamespaceFacts, PodFacts, APP_LABEL, DATAPLANE_MODE_LABEL, DEFAULT_SERVICE_ACCOUNT,
    SIDECAR_STATUS_ANNOTATION,
};
use resolver::KubeChange;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use watcher::recording::{ObjectReading, Text};
use watcher::KubeAction;

use crate::change::status_ips;
use crate::record::RecordedPodStatus;
use crate::shared_strings::shared;

/// The facts of a recorded `v1` Pod (its uid not empty) or Namespace (its name not empty).
#[derive(Debug, Clone, PartialEq)]
pub enum ObjectFacts {
    /// Boxed: the reader moves what it reads several times on the way out of a line's parse,
    /// and a pod's facts are most of a record's size.
    Pod(Box<PodFacts>),
    Namespace {
        name: String,
        facts: NamespaceFacts,
    },
}

impl ObjectFacts {
    /// The resolver's change for a record of `action` on this object (the same as
    /// [`crate::Change::to_resolver`] gives for the object read step by step).
    pub fn change(self, action: KubeAction) -> KubeChange {
        match (action, self) {
            (KubeAction::Apply, ObjectFacts::Pod(facts)) => KubeChange::ApplyPod(*facts),
            (KubeAction::Delete, ObjectFacts::Pod(facts)) => {
                KubeChange::DeletePod { uid: facts.uid }
            }
            (KubeAction::Apply, ObjectFacts::Namespace { name, facts }) => {
                KubeChange::ApplyNamespace { name, facts }
            }
            (KubeAction::Delete, ObjectFacts::Namespace { name, .. }) => {
                KubeChange::DeleteNamespace { name }
            }
        }
    }
}

/// An object's facts when it is plain, `None` when it is not (then read it step by step).
pub fn read_facts(text: &str) -> Option<ObjectFacts> {
    serde_json::from_str::<PlainFacts>(text).ok()?.0
}

/// The [`ObjectReading`] of recorded objects: their facts when plain, else declined.
#[derive(Debug)]
pub struct PlainFacts(Option<ObjectFacts>);

impl<'de> Deserialize<'de> for PlainFacts {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        PlainObject::deserialize(deserializer).map(|object| PlainFacts(object.into_facts()))
    }
}

impl ObjectReading for PlainFacts {
    type Object = ObjectFacts;

    fn into_object(self) -> Option<ObjectFacts> {
        self.0
    }
}

/// The object's fields that its facts are made of.
#[derive(Deserialize)]
struct PlainObject<'a> {
    #[serde(rename = "apiVersion", borrow)]
    api_version: Option<&'a str>,
    #[serde(borrow)]
    kind: Option<&'a str>,
    #[serde(default, borrow)]
    metadata: PlainMeta<'a>,
    #[serde(borrow)]
    spec: Option<PlainSpec<'a>>,
    status: Option<RecordedPodStatus>,
}

/// The strings are borrowed from the line (when they have no escapes) and turned into this
/// thread's shared copies ([`shared`]): no allocation per record for a string seen before.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PlainMeta<'a> {
    #[serde(borrow)]
    uid: Option<Text<'a>>,
    #[serde(borrow)]
    name: Option<Text<'a>>,
    #[serde(borrow)]
    namespace: Option<Text<'a>>,
    labels: Option<RuleLabels>,
    annotations: Option<SidecarAnnotation>,
    creation_timestamp: Option<Time>,
}

/// `spec`, as [`crate::record`] reads it, its strings borrowed.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PlainSpec<'a> {
    #[serde(borrow)]
    node_name: Option<Text<'a>>,
    host_network: Option<bool>,
    #[serde(borrow)]
    service_account_name: Option<Text<'a>>,
}

impl PlainObject<'_> {
    fn into_facts(self) -> Option<ObjectFacts> {
        if self.api_version != Some("v1") {
            return None;
        }
        let meta = self.metadata;
        match self.kind? {
            "Pod" => {
                let uid = shared(&meta.uid.filter(|uid| !uid.0.is_empty())?.0);
                let spec = self.spec;
                let status = self.status;
                let mut ips = Vec::new();
                let mut terminal = false;
                if let Some(status) = &status {
                    ips = status_ips(status.pod_ips.as_deref(), status.pod_ip.as_deref());
                    let phase = status.phase.as_deref().unwrap_or("");
                    terminal = phase == "Succeeded" || phase == "Failed";
                }
                let labels = meta.labels.unwrap_or_default();
                let (node, host_network, service_account) = match spec {
                    Some(spec) => (
                        spec.node_name.map(|n| shared(&n.0)),
                        spec.host_network.unwrap_or(false),
                        spec.service_account_name,
                    ),
                    None => (None, false, None),
                };
                let service_account = service_account
                    .as_ref()
                    .map(|s| &*s.0)
                    .filter(|s| !s.is_empty())
                    .unwrap_or(DEFAULT_SERVICE_ACCOUNT);
                Some(ObjectFacts::Pod(Box::new(PodFacts {
                    uid,
                    namespace: shared(meta.namespace.as_ref().map_or("", |n| &*n.0)),
                    name: shared(meta.name.as_ref().map_or("", |n| &*n.0)),
                    node,
                    dataplane_mode: labels.dataplane_mode,
                    app: labels.app,
                    host_network,
                    has_sidecar: meta.annotations.is_some_and(|a| a.0),
                    terminal,
                    ips,
                    created: meta.creation_timestamp.map(|t| t.0.as_nanosecond()),
                    service_account: shared(service_account),
                })))
            }
            "Namespace" => {
                let name = meta.name.filter(|name| !name.0.is_empty())?.0.into_owned();
                Some(ObjectFacts::Namespace {
                    name,
                    facts: NamespaceFacts {
                        dataplane_mode: meta
                            .labels
                            .and_then(|l| l.dataplane_mode)
                            .map(|m| m.to_string()),
                    },
                })
            }
            _ => None,
        }
    }
}

/// The labels the ambient rules read, out of a map of string labels (every value must be a
/// string, as in a `BTreeMap<String, String>`; a key given twice keeps its last value, as
/// there).
#[derive(Default)]
struct RuleLabels {
    dataplane_mode: Option<Arc<str>>,
    app: Option<Arc<str>>,
}

impl<'de> Deserialize<'de> for RuleLabels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LabelsVisitor;
        impl<'de> Visitor<'de> for LabelsVisitor {
            type Value = RuleLabels;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RuleLabels, A::Error> {
                let mut labels = RuleLabels::default();
                while let Some(key) = map.next_key::<Text>()? {
                    let value = map.next_value::<Text>()?;
                    match key.0.as_ref() {
                        DATAPLANE_MODE_LABEL => labels.dataplane_mode = Some(shared(&value.0)),
                        APP_LABEL => labels.app = Some(shared(&value.0)),
                        _ => {}
                    }
                }
                Ok(labels)
            }
        }
        deserializer.deserialize_map(LabelsVisitor)
    }
}

/// Whether a map of string annotations has the sidecar's (every value must be a string).
struct SidecarAnnotation(bool);

impl<'de> Deserialize<'de> for SidecarAnnotation {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AnnotationsVisitor;
        impl<'de> Visitor<'de> for AnnotationsVisitor {
            type Value = SidecarAnnotation;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of strings")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<SidecarAnnotation, A::Error> {
                let mut sidecar = false;
                while let Some(key) = map.next_key::<Text>()? {
                    map.next_value::<AnyText>()?;
                    sidecar |= key.0 == SIDECAR_STATUS_ANNOTATION;
                }
                Ok(SidecarAnnotation(sidecar))
            }
        }
        deserializer.deserialize_map(AnnotationsVisitor)
    }
}

/// A string whose value is not kept.
struct AnyText;

impl<'de> Deserialize<'de> for AnyText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AnyTextVisitor;
        impl Visitor<'_> for AnyTextVisitor {
            type Value = AnyText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<AnyText, E> {
                Ok(AnyText)
            }
        }
        deserializer.deserialize_str(AnyTextVisitor)
    }
}
