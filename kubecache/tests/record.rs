//! Recordings' `kube` records: a bad one is refused naming its field; a good one becomes the
//! facts the resolver decides on, and a kube cache change becomes a record that reads back to
//! the same facts.

use kubecache::record::{change_record, kube_record_to_change};
use kubecache::{Change, Object};
use resolver::{KubeChange, NamespaceFacts};
use serde_json::json;
use watcher::{KubeAction, KubeRecord, Record};

const UID: &str = "00000000-0000-4000-8000-000000000001";

#[test]
fn kube_records_name_the_bad_field() {
    let bad = |object| {
        kube_record_to_change(&KubeRecord::from_value(KubeAction::Apply, &object))
            .unwrap_err()
            .to_string()
    };
    let e = bad(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}}));
    assert!(e.contains("metadata.uid"), "{e}");
    let e = bad(
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"uid": UID}, "spec": {"hostNetwork": "yes", "containers": []}}),
    );
    assert!(e.contains("spec.hostNetwork"), "{e}");
    assert!(
        !e.contains("column"),
        "no position within the object's text (the recording's line is the position): {e}"
    );
    // A field the facts do not read is not read, whatever its type.
    let ok = kube_record_to_change(&KubeRecord::from_value(
        KubeAction::Apply,
        &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"uid": UID}, "spec": {"containers": "none"}}),
    ));
    assert!(ok.is_ok(), "{ok:?}");
    let e = bad(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}}));
    assert!(e.contains("kind") && e.contains("Service"), "{e}");
    let e = bad(json!({"kind": "Pod", "metadata": {"uid": UID}}));
    assert!(e.contains("apiVersion"), "{e}");
}

#[test]
fn a_pod_record_becomes_every_fact_the_rules_read() {
    let object = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web",
            "namespace": "apps",
            "uid": UID,
            "creationTimestamp": "2024-01-02T03:04:05Z",
            "labels": {"istio.io/dataplane-mode": "ambient", "app": "web"},
            "annotations": {"sidecar.istio.io/status": "{}"},
            "managedFields": [{"manager": "kubectl"}],
        },
        "spec": {"nodeName": "node-a", "hostNetwork": false, "containers": []},
        "status": {"phase": "Failed", "podIP": "10.0.0.5",
                   "podIPs": [{"ip": "fd00::5"}, {"ip": "10.0.0.5"}]},
    });
    let record = KubeRecord::from_value(KubeAction::Apply, &object);
    let KubeChange::ApplyPod(facts) = kube_record_to_change(&record).unwrap() else {
        panic!("not a pod apply");
    };
    assert_eq!(&*facts.uid, UID);
    assert_eq!(facts.full_name(), "apps/web");
    assert_eq!(facts.node.as_deref(), Some("node-a"));
    assert_eq!(facts.dataplane_mode.as_deref(), Some("ambient"));
    assert_eq!(facts.app.as_deref(), Some("web"));
    assert!(!facts.host_network);
    assert!(facts.has_sidecar);
    assert!(facts.terminal);
    assert_eq!(
        facts.ips,
        vec![
            "10.0.0.5".parse::<std::net::IpAddr>().unwrap(),
            "fd00::5".parse().unwrap()
        ]
    );
    assert_eq!(facts.created, Some(1_704_164_645_000_000_000));
    assert_eq!(
        &*facts.service_account, "default",
        "as the API server fills it"
    );

    // Written back by `zbridge record`: without managedFields, and read to the same facts.
    let pod = serde_json::from_value(object).unwrap();
    let Record::Kube(written) = change_record(Change::Apply(Object::Pod(Box::new(pod)))).unwrap()
    else {
        panic!("not a kube record");
    };
    assert!(written.object_value()["metadata"]
        .get("managedFields")
        .is_none());
    assert_eq!(
        kube_record_to_change(&written).unwrap(),
        KubeChange::ApplyPod(facts)
    );
}

#[test]
fn deletes_need_only_the_identity_and_namespaces_keep_their_mode() {
    let change =
        |action, object| kube_record_to_change(&KubeRecord::from_value(action, &object)).unwrap();
    assert_eq!(
        change(
            KubeAction::Delete,
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"uid": UID}})
        ),
        KubeChange::DeletePod { uid: UID.into() }
    );
    assert_eq!(
        change(
            KubeAction::Apply,
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": "apps", "labels": {"istio.io/dataplane-mode": "ambient"}}})
        ),
        KubeChange::ApplyNamespace {
            name: "apps".into(),
            facts: NamespaceFacts {
                dataplane_mode: Some("ambient".into())
            }
        }
    );
    assert_eq!(
        change(
            KubeAction::Delete,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps"}})
        ),
        KubeChange::DeleteNamespace {
            name: "apps".into()
        }
    );
    assert_eq!(change_record(Change::Synced).unwrap(), Record::KubeSynced);
}
