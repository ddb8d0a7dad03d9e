use super::super::super::test_util::{fix_of, is_fail};
use super::*;

/// `/proc/net/unix` of a node running istio-cni: its ZDS listener, a connection it
/// accepted (same path, not listening), an abstract socket and unnamed ones.
const NET_UNIX: &str = "\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 20482 /run/systemd/journal/stdout
0000000000000000: 00000002 00000000 00010000 0005 01 918273 /var/run/ztunnel/ztunnel.sock
0000000000000000: 00000003 00000000 00000000 0005 03 918301 /var/run/ztunnel/ztunnel.sock
0000000000000000: 00000002 00000000 00010000 0001 01 30001 @/containerd-shim/abc.sock@
0000000000000000: 00000003 00000000 00000000 0001 03  4242
0000000000000000: 00000002 00000000 00010000 0001 01 777 /tmp/dir with space/s.sock
";

#[test]
fn listeners_are_read_from_proc_net_unix() {
    let listeners = parse_unix_listeners(NET_UNIX);
    let entry = |inode: u64, path: &str| UnixListenerEntry {
        inode,
        path: path.into(),
    };
    assert_eq!(
        listeners,
        [
            entry(20482, "/run/systemd/journal/stdout"),
            entry(918273, "/var/run/ztunnel/ztunnel.sock"),
            entry(777, "/tmp/dir with space/s.sock"),
        ]
    );
    assert!(parse_unix_listeners("").is_empty());
    assert!(parse_unix_listeners("Num RefCount\ngarbage line\n").is_empty());
}

#[test]
fn socket_links_name_their_inode() {
    assert_eq!(socket_inode(Path::new("socket:[918273]")), Some(918273));
    assert_eq!(socket_inode(Path::new("pipe:[918273]")), None);
    assert_eq!(socket_inode(Path::new("/dev/null")), None);
    assert_eq!(socket_inode(Path::new("socket:[x]")), None);
}

/// A simulated /proc: pid → (comm, exe, descriptor link targets).
fn fake_proc(processes: &[(u32, &str, &str, &[&str])]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for (pid, comm, exe, fds) in processes {
        let dir = root.path().join(pid.to_string());
        std::fs::create_dir_all(dir.join("fd")).unwrap();
        std::fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
        std::os::unix::fs::symlink(exe, dir.join("exe")).unwrap();
        for (n, target) in fds.iter().enumerate() {
            std::os::unix::fs::symlink(target, dir.join("fd").join(n.to_string())).unwrap();
        }
    }
    std::fs::create_dir_all(root.path().join("self")).unwrap();
    root
}

#[test]
fn holders_are_found_by_the_socket_inode() {
    let proc = fake_proc(&[
        (
            1,
            "systemd",
            "/usr/lib/systemd/systemd",
            &["socket:[20482]"],
        ),
        (
            812,
            "istio-cni",
            "/usr/local/bin/install-cni",
            &["/dev/null", "socket:[918301]", "socket:[918273]"],
        ),
        (
            913,
            "ztunnel",
            "/usr/local/bin/ztunnel",
            &["socket:[918302]"],
        ),
    ]);
    let holders = socket_holders(proc.path(), &[918273]);
    assert_eq!(
        holders,
        [Holder {
            pid: 812,
            comm: "istio-cni".into(),
            exe: Some("/usr/local/bin/install-cni".into()),
        }]
    );
    assert!(!holders[0].is_zbridge());
    assert!(socket_holders(proc.path(), &[1]).is_empty());
    assert!(socket_holders(Path::new("/nonexistent/proc"), &[918273]).is_empty());
}

fn holder(pid: u32, comm: &str, exe: Option<&str>) -> Holder {
    Holder {
        pid,
        comm: comm.into(),
        exe: exe.map(PathBuf::from),
    }
}

#[test]
fn zbridge_is_known_by_its_name_or_binary() {
    assert!(holder(1, "zbridge", None).is_zbridge());
    assert!(holder(1, "tokio-runtime-w", Some("/usr/local/bin/zbridge")).is_zbridge());
    assert!(holder(1, "x", Some("/usr/local/bin/zbridge (deleted)")).is_zbridge());
    assert!(!holder(1, "istio-cni", Some("/usr/local/bin/istio-cni")).is_zbridge());
}

#[test]
fn outcomes_name_the_holder_and_the_fix() {
    let path = Path::new("/var/run/ztunnel/ztunnel.sock");
    let absent = check_zds_socket(path, &ZdsSocket::Absent);
    assert!(
        matches!(&absent, Outcome::Pass(d) if d.contains("not served yet (zbridge run serves it)")),
        "{absent:?}"
    );
    assert!(matches!(
        check_zds_socket(path, &ZdsSocket::Stale),
        Outcome::Pass(d) if d.contains("zbridge run replaces it")
    ));
    let ours = ZdsSocket::Served {
        inodes: vec![5],
        holders: vec![holder(42, "zbridge", Some("/usr/local/bin/zbridge"))],
    };
    assert!(matches!(
        check_zds_socket(path, &ours),
        Outcome::Pass(d) if d.contains("served by zbridge (pid 42)")
    ));
    let theirs = ZdsSocket::Served {
        inodes: vec![5],
        holders: vec![holder(812, "istio-cni", Some("/usr/local/bin/istio-cni"))],
    };
    let outcome = check_zds_socket(path, &theirs);
    assert!(
        is_fail(
            &outcome,
            "/var/run/ztunnel/ztunnel.sock is served by pid 812 (istio-cni, \
             /usr/local/bin/istio-cni), not zbridge"
        ),
        "{outcome:?}"
    );
    assert_eq!(fix_of(&outcome), FIX_ZDS_HOLDER);
    let unseen = ZdsSocket::Served {
        inodes: vec![918273],
        holders: vec![],
    };
    assert!(matches!(
        check_zds_socket(path, &unseen),
        Outcome::Warn { what, fix } if what.contains("inode 918273") && fix.contains("hostPID")
    ));
    assert!(is_fail(
        &check_zds_socket(path, &ZdsSocket::NotASocket),
        "is not a socket"
    ));
}

#[test]
fn a_missing_path_and_a_plain_file_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let proc = Path::new("/proc");
    let path = dir.path().join("ztunnel.sock");
    assert_eq!(probe_zds_socket(&path, proc), ZdsSocket::Absent);
    std::fs::write(&path, "").unwrap();
    assert_eq!(probe_zds_socket(&path, proc), ZdsSocket::NotASocket);
}

#[test]
fn a_socket_bound_in_this_process_is_found_and_a_closed_one_is_stale() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztunnel.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    match probe_zds_socket(&path, Path::new("/proc")) {
        ZdsSocket::Served { inodes, holders } => {
            assert_eq!(inodes.len(), 1, "{inodes:?}");
            let me = std::process::id();
            assert!(holders.iter().any(|h| h.pid == me), "{holders:?}");
        }
        other => panic!("{other:?}"),
    }
    drop(listener);
    // Another test's child forked meanwhile holds a copy of the descriptor until it execs
    // (close-on-exec): the socket is stale once every copy is closed, within moments.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let probed = probe_zds_socket(&path, Path::new("/proc"));
        if probed == ZdsSocket::Stale {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{probed:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
