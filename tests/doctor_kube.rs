//! `zbridge doctor` with its Kubernetes checks, the real binary against the in-process fake
//! API server through a kubeconfig file: all allowed passes, a missing RBAC rule or an
//! unreachable server fails with the words that say what to do. Root: the host checks run too
//! (on a private bpffs), and must pass for the exit code to be the Kubernetes checks' verdict.

mod doctor_support;

use std::net::SocketAddr;

use doctor_support::{check_lines, doctor_with_env, pin_dir};

/// What a doctor run with Kubernetes checks needs: a private bpffs (the host checks run on it)
/// and a kubeconfig file for the API server at an address; both removed on drop.
struct KubeDoctor {
    bpffs: testkit::BpfFs,
    _dir: tempfile::TempDir,
    kubeconfig: String,
}

impl KubeDoctor {
    fn new(api: SocketAddr) -> KubeDoctor {
        let bpffs = testkit::BpfFs::new("doctor-kube").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, testkit::apiserver::kubeconfig_yaml_for(api)).unwrap();
        KubeDoctor {
            bpffs,
            _dir: dir,
            kubeconfig: path.to_string_lossy().into_owned(),
        }
    }

    /// Runs `zbridge doctor --pin-dir PIN --kubeconfig FILE ARGS` with `env` set; (exit code,
    /// stdout).
    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
        let pin_dir = pin_dir(&self.bpffs);
        let mut all = vec!["--pin-dir", &pin_dir, "--kubeconfig", &self.kubeconfig];
        all.extend_from_slice(args);
        doctor_with_env(&[], &all, env)
    }
}

#[test]
fn everything_allowed_passes() {
    if !testkit::require_root("doctor_kube_everything_allowed_passes") {
        return;
    }
    let server = testkit::FakeApiServer::start().unwrap();
    let (code, out) = KubeDoctor::new(server.addr()).run(&["--node-name", "node-a"], &[]);
    assert_eq!(code, 0, "{out}");
    for name in [
        "node name",
        "kube config",
        "api server",
        "rbac pods",
        "rbac namespaces",
        "rbac pods/status",
    ] {
        assert!(
            check_lines(&out, name).starts_with("PASS"),
            "{name}:\n{out}"
        );
    }
    assert!(!out.contains("FAIL"), "{out}");
    assert!(
        check_lines(&out, "api server").contains(&format!("GET {}/version", server.url())),
        "{out}"
    );
    // Five access reviews reached the server.
    let reviews = server
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/selfsubjectaccessreviews"))
        .count();
    assert_eq!(reviews, 5);
}

#[test]
fn denied_patch_of_pod_status_is_named_and_fails() {
    if !testkit::require_root("doctor_kube_denied_patch_of_pod_status") {
        return;
    }
    let server = testkit::FakeApiServer::start().unwrap();
    server.deny_access("patch", "pods/status");
    let (code, out) = KubeDoctor::new(server.addr()).run(&[], &[("NODE_NAME", "node-a")]);
    assert_ne!(code, 0, "{out}");
    let status = check_lines(&out, "rbac pods/status");
    assert!(status.starts_with("FAIL"), "{out}");
    assert!(
        status.contains("patch pods/status in all namespaces is not allowed"),
        "{out}"
    );
    assert!(
        status.contains(r#"{apiGroups: [""], resources: ["pods/status"], verbs: ["patch"]}"#),
        "{out}"
    );
    assert!(status.contains("deploy/clusterrole.yaml"), "{out}");
    // The node name came from NODE_NAME; nothing else failed.
    assert!(check_lines(&out, "node name").contains("node-a"), "{out}");
    assert_eq!(out.matches("FAIL  ").count(), 1, "{out}");
}

#[test]
fn unreachable_server_fails_with_what_was_tried() {
    if !testkit::require_root("doctor_kube_unreachable_server") {
        return;
    }
    // A port that was just free: nothing listens there.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (code, out) = KubeDoctor::new(addr).run(&["--node-name", "node-a"], &[]);
    assert_ne!(code, 0, "{out}");
    let api = check_lines(&out, "api server");
    assert!(api.starts_with("FAIL"), "{out}");
    assert!(
        api.contains(&format!("GET http://{addr}/version failed")),
        "{out}"
    );
    assert!(api.contains("reachable from this node"), "{out}");
    assert!(check_lines(&out, "rbac").contains("not checked"), "{out}");
}

#[test]
fn missing_node_name_fails_and_standalone_leaves_it_out() {
    if !testkit::require_root("doctor_kube_missing_node_name") {
        return;
    }
    let server = testkit::FakeApiServer::start().unwrap();
    let kube = KubeDoctor::new(server.addr());
    let (code, out) = kube.run(&[], &[]);
    assert_ne!(code, 0, "{out}");
    let node = check_lines(&out, "node name");
    assert!(node.starts_with("FAIL"), "{out}");
    assert!(
        node.contains("set NODE_NAME from the downward API"),
        "{out}"
    );
    assert_eq!(out.matches("FAIL  ").count(), 1, "{out}");
    // --standalone: no Kubernetes check at all, and no request to the server.
    let before = server.requests().len();
    let (code, out) = kube.run(&["--standalone"], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("node name") && !out.contains("rbac"), "{out}");
    assert_eq!(server.requests().len(), before);
}
