//! The manifests in deploy/ parse into the Kubernetes API types and have the properties the
//! agent depends on (host namespaces, mounts, capabilities, RBAC verbs, downward API).

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::de::DeserializeOwned;

fn load<T: DeserializeOwned>(file: &str) -> T {
    let path = format!("{}/deploy/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{path}: not a valid object: {e}"))
}

fn agent(ds: &DaemonSet) -> &Container {
    let spec = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    spec.containers
        .iter()
        .find(|c| c.name == "zbridge")
        .expect("container zbridge")
}

#[test]
fn daemonset_runs_in_the_host_namespaces_on_every_node() {
    let ds: DaemonSet = load("daemonset.yaml");
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(
        pod.host_pid,
        Some(true),
        "the proc connector needs the host PID namespace"
    );
    assert_eq!(
        pod.host_network,
        Some(true),
        "the proc connector needs the host netns"
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("zbridge"));
    let tolerations = pod.tolerations.as_ref().expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "must tolerate every taint, to run on every node"
    );
}

#[test]
fn daemonset_gets_node_name_from_the_downward_api() {
    let ds: DaemonSet = load("daemonset.yaml");
    let env = agent(&ds).env.as_ref().expect("env");
    let node = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME from a fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");
}

#[test]
fn daemonset_mounts_cgroup_and_bpffs_from_the_host() {
    let ds: DaemonSet = load("daemonset.yaml");
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let volumes = pod.volumes.as_ref().expect("volumes");
    let host_path = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };
    let mounts = agent(&ds).volume_mounts.as_ref().expect("volumeMounts");
    let cgroup = mounts
        .iter()
        .find(|m| m.mount_path == "/sys/fs/cgroup")
        .expect("cgroup");
    assert_eq!(host_path(&cgroup.name).as_deref(), Some("/sys/fs/cgroup"));
    let bpffs = mounts
        .iter()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("bpffs");
    assert_eq!(host_path(&bpffs.name).as_deref(), Some("/sys/fs/bpf"));
    assert_eq!(
        bpffs.mount_propagation.as_deref(),
        Some("HostToContainer"),
        "pins on the host's bpffs must be visible to the agent"
    );
    // In-pod mode: ztunnel finds the ZDS socket in the host's /var/run/ztunnel.
    let zds = mounts
        .iter()
        .find(|m| m.mount_path == "/var/run/ztunnel")
        .expect("the ZDS socket's directory");
    assert_eq!(host_path(&zds.name).as_deref(), Some("/var/run/ztunnel"));
    // The ZDS state file under a read-only root.
    assert!(mounts.iter().any(|m| m.mount_path == "/run/zbridge"));
}

#[test]
fn daemonset_uses_capabilities_not_privileged_and_probes_the_ops_endpoint() {
    let ds: DaemonSet = load("daemonset.yaml");
    let c = agent(&ds);
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.privileged, Some(false));
    let caps = sc
        .capabilities
        .as_ref()
        .unwrap()
        .add
        .clone()
        .unwrap_or_default();
    // Exactly the capabilities the README names and explains, nothing more.
    let mut caps = caps;
    caps.sort();
    assert_eq!(caps, ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]);
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    // The paragraph that starts "Capabilities (exactly these):".
    let start = readme
        .find("Capabilities (exactly these):")
        .expect("README states the capabilities");
    let line = readme[start..].split("\n\n").next().unwrap();
    for cap in &caps {
        assert!(
            line.contains(cap.as_str()),
            "README's capability line lacks {cap}: {line}"
        );
    }
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    let pod_seccomp = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.security_context.as_ref())
        .and_then(|s| s.seccomp_profile.as_ref())
        .map(|p| p.type_.clone());
    assert_eq!(pod_seccomp.as_deref(), Some("RuntimeDefault"));
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(path(&c.readiness_probe).as_deref(), Some("/readyz"));
    assert_eq!(path(&c.liveness_probe).as_deref(), Some("/healthz"));
    let requests = c
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .expect("requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
}

#[test]
fn rbac_grants_exactly_the_verbs_the_agent_uses() {
    let role: ClusterRole = load("clusterrole.yaml");
    let mut grants: Vec<(String, String)> = Vec::new();
    for rule in role.rules.unwrap_or_default() {
        assert_eq!(
            rule.api_groups.as_deref(),
            Some(&[String::new()][..]),
            "core group only"
        );
        for resource in rule.resources.unwrap_or_default() {
            for verb in &rule.verbs {
                grants.push((resource.clone(), verb.clone()));
            }
        }
    }
    grants.sort();
    let expected: Vec<(String, String)> = [
        ("namespaces", "get"),
        ("namespaces", "list"),
        ("namespaces", "watch"),
        ("pods", "get"),
        ("pods", "list"),
        ("pods", "watch"),
        ("pods/status", "patch"),
    ]
    .iter()
    .map(|(r, v)| (r.to_string(), v.to_string()))
    .collect();
    assert_eq!(grants, expected);

    let binding: ClusterRoleBinding = load("clusterrolebinding.yaml");
    let sa: ServiceAccount = load("serviceaccount.yaml");
    assert_eq!(binding.role_ref.name, "zbridge");
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(Some(subject.name.clone()), sa.metadata.name);
    assert_eq!(subject.namespace, sa.metadata.namespace);
}

#[test]
fn kustomization_lists_every_manifest() {
    let path = format!("{}/deploy/kustomization.yaml", env!("CARGO_MANIFEST_DIR"));
    let k: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let resources: Vec<&str> = k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for file in std::fs::read_dir(format!("{}/deploy", env!("CARGO_MANIFEST_DIR"))).unwrap() {
        let name = file.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(
                resources.contains(&name.as_str()),
                "{name} not in kustomization"
            );
        }
    }
}
