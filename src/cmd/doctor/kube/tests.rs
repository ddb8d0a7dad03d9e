use std::path::PathBuf;

use super::super::render;
use super::super::test_util::{fix_of, is_fail, outcome_of};
use super::*;

/// A kubeconfig file for `yaml`, in a temp dir that lives as long as the returned guard.
fn kubeconfig(yaml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, yaml).unwrap();
    (dir, path)
}

/// The access reviews the server received: (verb, resource, subresource, namespace).
fn reviews(server: &testkit::FakeApiServer) -> Vec<(String, String, String, String)> {
    server
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/selfsubjectaccessreviews"))
        .map(|r| {
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            let attr = &body["spec"]["resourceAttributes"];
            let field = |k: &str| attr[k].as_str().unwrap_or_default().to_string();
            (
                field("verb"),
                field("resource"),
                field("subresource"),
                field("namespace"),
            )
        })
        .collect()
}

#[test]
fn kube_checks_pass_against_a_server_that_allows_everything() {
    let server = testkit::FakeApiServer::start().unwrap();
    let (_dir, path) = kubeconfig(&server.kubeconfig_yaml());
    let checks = kube_checks(&KubeTarget {
        kubeconfig: Some(path.clone()),
        node_name: Some("node-a".into()),
    });
    let names: Vec<&str> = checks.iter().map(|c| c.name).collect();
    assert_eq!(
        names,
        [
            "node name",
            "kube config",
            "api server",
            "rbac pods",
            "rbac namespaces",
            "rbac pods/status"
        ]
    );
    for check in &checks {
        assert!(matches!(check.outcome, Outcome::Pass(_)), "{check:?}");
    }
    assert!(
        matches!(outcome_of(&checks, "api server"), Outcome::Pass(d) if d.contains("/version: Kubernetes v1.33.0")),
        "{checks:?}"
    );
    assert!(
        matches!(outcome_of(&checks, "kube config"), Outcome::Pass(d) if d.contains(&*path.to_string_lossy()) && d.contains(&server.url())),
        "{checks:?}"
    );
    let s = |x: &str| x.to_string();
    assert_eq!(
        reviews(&server),
        vec![
            (s("list"), s("pods"), s(""), s("")),
            (s("watch"), s("pods"), s(""), s("")),
            (s("list"), s("namespaces"), s(""), s("")),
            (s("watch"), s("namespaces"), s(""), s("")),
            (s("patch"), s("pods"), s("status"), s("")),
        ]
    );
    let mut out = String::new();
    assert!(!render(&checks, &mut out), "{out}");
}

#[test]
fn kube_checks_name_a_denied_verb_and_its_rule() {
    let server = testkit::FakeApiServer::start().unwrap();
    server.deny_access("patch", "pods/status");
    server.deny_access("watch", "namespaces");
    let (_dir, path) = kubeconfig(&server.kubeconfig_yaml());
    let checks = kube_checks(&KubeTarget {
        kubeconfig: Some(path),
        node_name: Some("node-a".into()),
    });
    assert!(matches!(outcome_of(&checks, "rbac pods"), Outcome::Pass(_)));
    let status = outcome_of(&checks, "rbac pods/status");
    assert!(
        is_fail(status, "patch pods/status in all namespaces is not allowed"),
        "{status:?}"
    );
    assert!(is_fail(status, "pods/status"), "{status:?}");
    assert!(
        fix_of(status).contains(r#"resources: ["pods/status"], verbs: ["patch"]"#),
        "{status:?}"
    );
    let namespaces = outcome_of(&checks, "rbac namespaces");
    assert!(
        matches!(namespaces, Outcome::Fail { what, fix } if what.starts_with("watch namespaces cluster-wide is not allowed") && fix.contains(r#"resources: ["pods", "namespaces"]"#)),
        "{namespaces:?}"
    );
    let mut out = String::new();
    assert!(render(&checks, &mut out));
    assert!(out.contains("FAIL  rbac pods/status"), "{out}");
}

#[test]
fn kube_checks_say_what_was_tried_when_the_server_is_unreachable() {
    // A port that was just free: nothing listens there.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (_dir, path) = kubeconfig(&testkit::apiserver::kubeconfig_yaml_for(addr));
    let checks = kube_checks(&KubeTarget {
        kubeconfig: Some(path),
        node_name: Some("node-a".into()),
    });
    let api = outcome_of(&checks, "api server");
    assert!(
        is_fail(api, &format!("GET http://{addr}/version failed")),
        "{api:?}"
    );
    assert!(fix_of(api).contains("reachable from this node"), "{api:?}");
    // RBAC is not asked of a server that does not answer, and says so.
    assert!(is_fail(outcome_of(&checks, "rbac"), "not checked"));
    assert_eq!(checks.len(), 4, "{checks:?}");
}

#[test]
fn kube_checks_report_refused_credentials() {
    let server = testkit::FakeApiServer::start().unwrap();
    server.set_forbidden(true);
    let (_dir, path) = kubeconfig(&server.kubeconfig_yaml());
    let checks = kube_checks(&KubeTarget {
        kubeconfig: Some(path),
        node_name: Some("node-a".into()),
    });
    let api = outcome_of(&checks, "api server");
    assert!(is_fail(api, "credentials were refused"), "{api:?}");
}

#[test]
fn node_name_is_required_and_never_guessed() {
    let server = testkit::FakeApiServer::start().unwrap();
    let (_dir, path) = kubeconfig(&server.kubeconfig_yaml());
    for missing in [None, Some(""), Some("  ")] {
        let checks = kube_checks(&KubeTarget {
            kubeconfig: Some(path.clone()),
            node_name: missing.map(str::to_string),
        });
        let node = outcome_of(&checks, "node name");
        assert!(is_fail(node, "NODE_NAME"), "{node:?}");
        assert!(
            fix_of(node).contains("fieldPath: spec.nodeName"),
            "{node:?}"
        );
    }
    assert!(matches!(
        check_node_name(Some("node-a")),
        Outcome::Pass(d) if d.contains("spec.nodeName=node-a")
    ));
}

#[test]
fn unreadable_kubeconfig_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent");
    let checks = kube_checks(&KubeTarget {
        kubeconfig: Some(path.clone()),
        node_name: Some("node-a".into()),
    });
    let config = outcome_of(&checks, "kube config");
    assert!(
        is_fail(
            config,
            &format!("cannot use the kubeconfig {}", path.display())
        ),
        "{config:?}"
    );
    assert!(is_fail(outcome_of(&checks, "api server"), "not checked"));
}
