//! Standalone mode: the workloads file decides subtrees; reload re-decides. (The file itself,
//! v2 and its checks: `workloads_file.rs`.)

mod common;

use common::*;
use resolver::{ResolverConfig, Role, Workloads};
use watcher::{CgroupId, CgroupRef, ProcEvent, ProcFacts};

const FILE: &str = r#"
version: 1
ztunnel:
  cgroup: /zb/ztunnel
  address: [10.99.0.1, "fd00:99::1"]
workloads:
  - name: demo/productpage
    cgroup: /zb/pods/productpage
    address: 10.99.0.2
    mode: ambient
  - name: demo/auto
    cgroup: /zb/pods/auto
    address: auto
    mode: ambient
  - name: demo/off
    cgroup: /zb/pods/off
    address: 10.99.0.4
    mode: none
exempt:
  - /system.slice/kubelet.service
"#;

fn standalone(text: &str) -> Harness {
    let mut config = ResolverConfig::new("dev-vm");
    config.workloads = Some(Workloads::parse(text).expect("valid file"));
    Harness::with(config)
}

fn exec_with_ips(h: &mut Harness, tgid: u32, path: &str, id: u64, ips: &[&str]) {
    h.feed(proc(ProcEvent::Exec {
        pid: tgid,
        tgid,
        facts: ProcFacts {
            cgroup: Some(CgroupRef {
                path: path.into(),
                id: CgroupId(id),
            }),
            ips: ips.iter().map(|s| ip(s)).collect(),
            ..ProcFacts::default()
        },
    }));
}

#[test]
fn subtrees_are_decided_by_the_file() {
    let mut h = standalone(FILE);
    h.scan(&[
        (1, "/init.scope", 12),
        (800, "/system.slice/kubelet.service", 40),
    ]);
    assert_eq!(h.synced, 1, "standalone is synced from the first scan");
    assert_eq!(h.ztunnel, Some(vec![ip("10.99.0.1"), ip("fd00:99::1")]));
    h.exec(10, "/zb/ztunnel", 900);
    h.exec(20, "/zb/pods/productpage/app", 911);
    h.exec(21, "/zb/pods/productpage/sidecar", 912);
    h.exec(30, "/zb/pods/off", 931);
    h.exec(40, "/zb/pods-other", 941);
    assert_eq!(h.entry(40), Some((Role::Exempt, vec![])));
    assert_eq!(
        h.entry(900),
        Some((Role::Ztunnel, vec![ip("10.99.0.1"), ip("fd00:99::1")]))
    );
    assert_eq!(h.entry(911), Some((Role::Ambient, vec![ip("10.99.0.2")])));
    assert_eq!(h.entry(912), Some((Role::Ambient, vec![ip("10.99.0.2")])));
    assert_eq!(h.entry(931), None, "mode none");
    assert_eq!(
        h.entry(941),
        None,
        "/zb/pods-other is not under /zb/pods/..."
    );
    assert_eq!(h.entry(12), None);
    // The subtree root itself appears: it carries the one entry.
    h.exec(22, "/zb/pods/productpage", 910);
    assert_eq!(
        h.entries
            .keys()
            .map(|k| k.0)
            .filter(|k| (910..920).contains(k))
            .collect::<Vec<_>>(),
        vec![910]
    );
    // Kubernetes inputs are ignored.
    h.take_updates();
    h.apply_obj(ambient_ns("demo"));
    assert!(h.take_updates().is_empty());
}

#[test]
fn auto_address_comes_from_the_first_process_with_addresses() {
    let mut h = standalone(FILE);
    h.scan(&[]);
    exec_with_ips(&mut h, 50, "/zb/pods/auto", 950, &[]);
    assert_eq!(h.entry(950), None, "no address seen yet: not captured");
    exec_with_ips(
        &mut h,
        51,
        "/zb/pods/auto",
        950,
        &["127.0.0.1", "fd00:99::5", "10.99.0.5"],
    );
    assert_eq!(
        h.entry(950),
        Some((Role::Ambient, vec![ip("10.99.0.5"), ip("fd00:99::5")]))
    );
}

#[test]
fn auto_ztunnel_address() {
    let mut h = standalone("version: 1\nztunnel:\n  cgroup: /zb/zt\n  address: auto\n");
    h.scan(&[]);
    assert_eq!(h.ztunnel, Some(vec![]));
    exec_with_ips(&mut h, 10, "/zb/zt", 900, &["10.99.0.1"]);
    assert_eq!(h.ztunnel, Some(vec![ip("10.99.0.1")]));
    h.exit(10);
    assert_eq!(h.ztunnel, Some(vec![]), "ztunnel gone: address unknown");
}

#[test]
fn reload_re_decides_everything() {
    let mut h = standalone(FILE);
    h.scan(&[(20, "/zb/pods/productpage", 910), (30, "/zb/pods/off", 931)]);
    assert!(h.entry(910).is_some() && h.entry(931).is_none());
    h.take_updates();
    let flipped = FILE
        .replace(
            "address: 10.99.0.4\n    mode: none",
            "address: 10.99.0.4\n    mode: ambient",
        )
        .replace(
            "address: 10.99.0.2\n    mode: ambient",
            "address: 10.99.0.2\n    mode: none",
        );
    let mut out = Vec::new();
    h.resolver
        .set_workloads(Workloads::parse(&flipped).unwrap(), &mut out);
    h.apply(out);
    assert_eq!(h.entry(910), None);
    assert_eq!(h.entry(931), Some((Role::Ambient, vec![ip("10.99.0.4")])));
    assert_eq!(
        h.take_updates().len(),
        2,
        "one delete, one upsert; the ztunnel is unchanged"
    );
}

#[test]
fn bad_files_are_refused_naming_the_key() {
    let err = |text: &str| Workloads::parse(text).unwrap_err().to_string();
    let e = err("version: 3\n");
    assert!(e.contains("version"), "{e}");
    let e = err("version: 1\nworkloads:\n  - name: a\n    cgroup: /a\n    address: 10.0.0.1\n    mode: sidecar\n");
    assert!(e.contains("mode") || e.contains("sidecar"), "{e}");
    let e = err("version: 1\nworkloads:\n  - name: a\n    cgroup: /a\n    address: 10.0.0.300\n    mode: ambient\n");
    assert!(
        e.contains("workloads[0].address") && e.contains("10.0.0.300"),
        "{e}"
    );
    let e = err("version: 1\nworkloads:\n  - name: a\n    cgroup: /a\n    address: 10.0.0.1\n    mode: ambient\n  - name: b\n    cgroup: /a/b\n    address: 10.0.0.2\n    mode: ambient\n");
    assert!(
        e.contains("workloads[1].cgroup") && e.contains("overlaps"),
        "{e}"
    );
    let e = err("version: 1\nworkloads:\n  - name: a\n    cgroup: relative\n    address: 10.0.0.1\n    mode: ambient\n");
    assert!(e.contains("workloads[0].cgroup"), "{e}");
    let e = err("version: 1\nzombies: []\n");
    assert!(e.contains("zombies"), "{e}");
    let e = err("version: 1\nexempt: [/a]\nztunnel:\n  cgroup: /a/z\n  address: auto\n");
    assert!(e.contains("overlaps"), "{e}");
}

#[test]
fn the_shipped_example_parses() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/workloads.yaml");
    let w = Workloads::load(std::path::Path::new(path)).expect("examples/workloads.yaml");
    assert_eq!(w.workloads.len(), 3);
    assert_eq!(w.exempt, vec!["/system.slice/kubelet.service".to_string()]);
}

/// Knows the ids of some directories, as the live agent's stat of the cgroup tree would.
struct KnownDirs(Vec<(&'static str, u64)>);

impl resolver::CgroupIds for KnownDirs {
    fn id_of(&mut self, path: &str) -> Option<CgroupId> {
        self.0
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, id)| CgroupId(*id))
    }
}

#[test]
fn existing_subtrees_are_enrolled_before_any_process_runs_in_them() {
    let mut config = ResolverConfig::new("dev-vm");
    config.workloads = Some(Workloads::parse(FILE).expect("valid file"));
    // /zb/pods/auto exists too, but has no address until a process shows one: not enrolled.
    let dirs = KnownDirs(vec![
        ("/zb/ztunnel", 500),
        ("/zb/pods/productpage", 510),
        ("/zb/pods/auto", 520),
    ]);
    let mut h = Harness::with(config);
    h.resolver = resolver::Resolver::with_cgroup_ids(h.resolver.config().clone(), Box::new(dirs));
    // A scan with nothing in the subtrees: they are enrolled all the same, so the first
    // connect of the first process started there is captured without waiting for its exec.
    h.scan(&[(1, "/init.scope", 12)]);
    assert_eq!(
        h.entry(500),
        Some((Role::Ztunnel, vec![ip("10.99.0.1"), ip("fd00:99::1")]))
    );
    assert_eq!(h.entry(510), Some((Role::Ambient, vec![ip("10.99.0.2")])));
    assert_eq!(h.entry(520), None, "address auto: nothing seen yet");
    assert_eq!(h.entries.len(), 2, "{:?}", h.entries);
    // A process comes and goes: the subtree keeps its one entry.
    h.exec(20, "/zb/pods/productpage/app", 511);
    h.exit(20);
    assert_eq!(h.entry(510), Some((Role::Ambient, vec![ip("10.99.0.2")])));
    assert_eq!(h.entries.len(), 2, "{:?}", h.entries);
    // Removed from the file on reload: its entry goes.
    let reduced = FILE.replace(
        "  - name: demo/productpage\n    cgroup: /zb/pods/productpage\n    address: 10.99.0.2\n    mode: ambient\n",
        "",
    );
    let mut out = Vec::new();
    h.resolver
        .set_workloads(Workloads::parse(&reduced).expect("valid file"), &mut out);
    h.apply(out);
    assert_eq!(h.entry(510), None);
    assert!(h.entry(500).is_some(), "ztunnel stays");
}

/// Directories the test makes and removes while the resolver runs.
#[derive(Clone, Default)]
struct LiveDirs(std::sync::Arc<std::sync::Mutex<Vec<(&'static str, u64)>>>);

impl resolver::CgroupIds for LiveDirs {
    fn id_of(&mut self, path: &str) -> Option<CgroupId> {
        let dirs = self.0.lock().unwrap();
        dirs.iter()
            .find(|(p, _)| *p == path)
            .map(|(_, id)| CgroupId(*id))
    }
}

#[test]
fn a_subtree_made_removed_and_made_again_follows_its_directory() {
    let mut config = ResolverConfig::new("dev-vm");
    config.workloads = Some(Workloads::parse(FILE).expect("valid file"));
    let dirs = LiveDirs::default();
    dirs.0.lock().unwrap().push(("/zb/ztunnel", 500));
    let mut h = Harness::with(config);
    h.resolver =
        resolver::Resolver::with_cgroup_ids(h.resolver.config().clone(), Box::new(dirs.clone()));
    h.scan(&[(1, "/init.scope", 12)]);
    assert_eq!(h.entry(510), None, "not made yet");
    // Made (mkdir): enrolled with no process in it yet.
    dirs.0.lock().unwrap().push(("/zb/pods/productpage", 510));
    h.feed(resolver::Input::ConfiguredCgroupsChanged);
    assert_eq!(h.entry(510), Some((Role::Ambient, vec![ip("10.99.0.2")])));
    // Removed (rmdir): its entry goes without a reload.
    dirs.0
        .lock()
        .unwrap()
        .retain(|(p, _)| *p != "/zb/pods/productpage");
    h.feed(resolver::Input::ConfiguredCgroupsChanged);
    assert_eq!(h.entry(510), None);
    // Made again: a new directory, a new id.
    dirs.0.lock().unwrap().push(("/zb/pods/productpage", 530));
    h.feed(resolver::Input::ConfiguredCgroupsChanged);
    assert_eq!(h.entry(530), Some((Role::Ambient, vec![ip("10.99.0.2")])));
    assert_eq!(
        h.entries.len(),
        2,
        "ztunnel and the new subtree: {:?}",
        h.entries
    );
}

/// A v2 file with ztunnel in-pod: its ambient workloads are captured in their own namespace
/// and carry who they are for ZDS; ztunnel's entry and a v1 file's stay as they were.
#[test]
fn a_v2_in_pod_file_captures_its_workloads_in_pod_with_their_identity() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/workloads-v2.yaml");
    let file = Workloads::load(std::path::Path::new(path)).expect("examples/workloads-v2.yaml");
    let mut config = ResolverConfig::new("dev-vm");
    config.workloads = Some(file);
    let mut h = Harness::with(config);
    h.scan(&[
        (1, "/init.scope", 12),
        (10, "/zb/ztunnel", 500),
        (20, "/zb/pods/productpage", 510),
    ]);
    let app = &h.entries[&CgroupId(510)];
    assert_eq!(app.capture, resolver::Capture::InPod { dns: true });
    assert_eq!(
        app.identity,
        Some(resolver::Identity {
            uid: resolver::workloads::derived_uid("demo/productpage"),
            namespace: "demo".into(),
            name: "productpage".into(),
            service_account: "bookinfo-productpage".into(),
        })
    );
    let zt = &h.entries[&CgroupId(500)];
    assert_eq!(
        (zt.role, zt.capture, zt.identity.clone()),
        (Role::Ztunnel, resolver::Capture::Node, None)
    );

    // The same workloads in a v1 file: node capture, no identity.
    let mut v1 = ResolverConfig::new("dev-vm");
    v1.workloads = Some(Workloads::parse(FILE).expect("valid file"));
    let mut h1 = Harness::with(v1);
    h1.scan(&[(1, "/init.scope", 12), (20, "/zb/pods/productpage", 510)]);
    let e = &h1.entries[&CgroupId(510)];
    assert_eq!(
        (e.capture, e.identity.clone()),
        (resolver::Capture::Node, None)
    );
}
