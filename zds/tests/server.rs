//! The ZDS server against a peer written in the test: what ztunnel is sent, in which order,
//! and what the agent hears back. The pods' processes are this test's own (its cgroup), so
//! the namespaces handed over are real and need no root.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use prost::Message;
use zds::proto::{self, workload_request::Payload, workload_response};
use zds::socket::{Conn, Received};
use zds::{Command, Event, PodSpec, PodState, Roots, Server, ZdsConfig};

/// A ztunnel in the test: connects, says hello, reads requests, answers as told.
struct Peer {
    conn: Conn,
}

impl Peer {
    fn connect(path: &std::path::Path) -> Peer {
        let conn = Conn::connect(path).expect("connect to the agent's socket");
        conn.set_recv_timeout(Some(Duration::from_secs(5))).unwrap();
        Peer { conn }
    }

    fn hello(&self) {
        let hello = proto::ZdsHello {
            version: proto::Version::V1 as i32,
        };
        self.conn.send(&hello.encode_to_vec(), None).unwrap();
    }

    /// The next request (`None`: the agent closed the connection).
    fn request(&self) -> Option<Payload> {
        match self.conn.recv().expect("a request within 5 s") {
            Received::Message(bytes) => Some(
                proto::WorkloadRequest::decode(bytes.as_slice())
                    .expect("a WorkloadRequest")
                    .payload
                    .expect("a payload"),
            ),
            Received::Closed => None,
        }
    }

    /// Asserts that the agent sends nothing for `wait` (`why` says what must not come yet).
    fn expect_nothing_for(&self, wait: Duration, why: &str) {
        self.conn.set_recv_timeout(Some(wait)).unwrap();
        assert!(self.conn.recv().is_err(), "{why}");
        self.conn
            .set_recv_timeout(Some(Duration::from_secs(5)))
            .unwrap();
    }

    fn ack(&self, error: &str) {
        let ack = proto::WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(proto::Ack {
                error: error.to_string(),
            })),
        };
        self.conn.send(&ack.encode_to_vec(), None).unwrap();
    }
}

fn own_cgroup() -> String {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    watcher::procfs::cgroup_v2_path(&text)
        .expect("this test needs a cgroup v2 path")
        .to_string()
}

fn pod(uid: &str) -> PodSpec {
    PodSpec {
        uid: uid.to_string(),
        namespace: "demo".to_string(),
        name: format!("pod-{uid}"),
        service_account: "sa".to_string(),
        cgroup: own_cgroup(),
    }
}

struct Fixture {
    server: Server,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

fn start() -> Fixture {
    start_with(|_| {})
}

/// [`start`] with the configuration changed by `change` first.
fn start_with(change: impl FnOnce(&mut ZdsConfig)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ztunnel.sock");
    let roots = Roots {
        proc: "/proc".into(),
        cgroup: watcher::procfs::cgroup2_mount().unwrap(),
    };
    let mut config = ZdsConfig::new(&socket, roots);
    config.ack_timeout = Duration::from_millis(500);
    config.hello_timeout = Duration::from_millis(500);
    config.retry_min = Duration::from_millis(100);
    config.status_file = Some(dir.path().join("state/zds.json"));
    change(&mut config);
    Fixture {
        server: Server::start(config).unwrap(),
        socket,
        _dir: dir,
    }
}

/// Hands the server `spec` and waits until it has taken it: a peer that connects after that
/// is sent the pod before the snapshot's end (the server may take a connection and a command
/// that are both waiting in either order).
fn serve(server: &Server, spec: PodSpec) {
    let uid = spec.uid.clone();
    server.commands().send(Command::Serve(spec)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !server.status().pods.contains_key(&uid) {
        assert!(
            std::time::Instant::now() < deadline,
            "pod {uid} never taken"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn event(server: &Server) -> Event {
    server
        .events()
        .recv_timeout(Duration::from_secs(5))
        .expect("an event within 5 s")
}

fn expect_add(peer: &Peer, uid: &str) {
    match peer.request() {
        Some(Payload::Add(add)) => {
            assert_eq!(add.uid, uid);
            let info = add.workload_info.expect("workload info");
            assert_eq!(
                (
                    info.namespace.as_str(),
                    info.name.as_str(),
                    info.service_account.as_str()
                ),
                ("demo", format!("pod-{uid}").as_str(), "sa")
            );
        }
        other => panic!("expected the add of {uid}, got {other:?}"),
    }
}

fn expect_keep(peer: &Peer, uid: &str) {
    match peer.request() {
        Some(Payload::Keep(keep)) => assert_eq!(keep.uid, uid),
        other => panic!("expected the keep of {uid}, got {other:?}"),
    }
}

fn expect_acked(server: &Server, uid: &str) {
    loop {
        match event(server) {
            Event::Acked {
                uid: got, netns, ..
            } => {
                assert_eq!(got, uid);
                let ino = std::fs::File::from(netns).metadata().unwrap().ino();
                let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
                assert_eq!(ino, own, "the namespace of the pod's process");
                return;
            }
            Event::Connected { .. } | Event::Disconnected { .. } => continue,
        }
    }
}

#[test]
fn snapshot_on_hello_then_adds_and_dels_one_at_a_time() {
    let f = start();
    let cmds = f.server.commands();
    cmds.send(Command::Serve(pod("a"))).unwrap();
    cmds.send(Command::Serve(pod("b"))).unwrap();
    let peer = Peer::connect(&f.socket);
    peer.hello();
    expect_add(&peer, "a");
    peer.ack("");
    expect_acked(&f.server, "a");
    expect_add(&peer, "b");
    peer.ack("");
    expect_acked(&f.server, "b");
    assert!(matches!(peer.request(), Some(Payload::SnapshotSent(_))));
    peer.ack("");

    cmds.send(Command::Serve(pod("c"))).unwrap();
    expect_add(&peer, "c");
    peer.ack("");
    expect_acked(&f.server, "c");
    cmds.send(Command::Release { uid: "a".into() }).unwrap();
    match peer.request() {
        Some(Payload::Del(del)) => assert_eq!(del.uid, "a"),
        other => panic!("expected del of a, got {other:?}"),
    }
    peer.ack("");
    std::thread::sleep(Duration::from_millis(200));
    let status = f.server.status();
    assert_eq!(status.pods.keys().collect::<Vec<_>>(), ["b", "c"]);
    assert!(status.pods.values().all(|p| p.state == PodState::Acked));
    assert_eq!((status.counters.adds, status.counters.dels), (3, 1));
    assert_eq!(status.ztunnel_pid, Some(std::process::id() as i32));
    // What `zbridge dump` reads.
    let (pid, pods) = zds::read_status(&f._dir.path().join("state/zds.json")).unwrap();
    assert_eq!(pid, Some(std::process::id() as i32));
    let states: Vec<(&str, &str)> = pods
        .iter()
        .map(|p| (p[1].as_str(), p[2].as_str()))
        .collect();
    assert_eq!(states, [("demo/pod-b", "acked"), ("demo/pod-c", "acked")]);
}

#[test]
fn a_refused_pod_is_retried_and_not_acked_meanwhile() {
    let f = start();
    serve(&f.server, pod("a"));
    let peer = Peer::connect(&f.socket);
    peer.hello();
    expect_add(&peer, "a");
    peer.ack("no certificate yet");
    assert!(matches!(peer.request(), Some(Payload::SnapshotSent(_))));
    peer.ack("");
    assert!(matches!(event(&f.server), Event::Connected { .. }));
    // Not acked: no event (the caller must not enrol) until the retry is acked.
    assert!(f.server.events().try_recv().is_err());
    // The state is published after each step: wait for the refusal to show.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let status = loop {
        let status = f.server.status();
        if status.pods["a"].error.is_some() || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Refused, or its retry already in flight: never acked.
    assert_ne!(status.pods["a"].state, PodState::Acked);
    assert!(status.pods["a"]
        .error
        .as_deref()
        .expect("the refusal is kept until an ack")
        .contains("no certificate yet"));
    expect_add(&peer, "a");
    peer.ack("");
    expect_acked(&f.server, "a");
    assert_eq!(f.server.status().counters.nacks, 1);
}

#[test]
fn a_restarted_ztunnel_gets_the_whole_snapshot_and_replaces_the_old_connection() {
    let f = start();
    serve(&f.server, pod("a"));
    let first = Peer::connect(&f.socket);
    first.hello();
    expect_add(&first, "a");
    first.ack("");
    expect_acked(&f.server, "a");
    assert!(matches!(first.request(), Some(Payload::SnapshotSent(_))));
    first.ack("");

    let second = Peer::connect(&f.socket);
    second.hello();
    expect_add(&second, "a");
    second.ack("");
    expect_acked(&f.server, "a");
    assert!(matches!(second.request(), Some(Payload::SnapshotSent(_))));
    // The first connection was closed by the agent.
    assert!(first.request().is_none());
}

#[test]
fn a_peer_that_never_acks_or_garbles_is_dropped_and_the_next_one_served() {
    let f = start();
    serve(&f.server, pod("a"));
    // Never acks: dropped after the ack timeout.
    let mute = Peer::connect(&f.socket);
    mute.hello();
    expect_add(&mute, "a");
    assert!(mute.request().is_none(), "dropped after the ack timeout");
    // Garbles: a frame that is no protobuf.
    let garbler = Peer::connect(&f.socket);
    garbler.hello();
    expect_add(&garbler, "a");
    garbler.conn.send(&[0xff, 0xff, 0xff], None).unwrap();
    assert!(garbler.request().is_none(), "dropped for a malformed frame");
    // Never says hello.
    let silent = Peer::connect(&f.socket);
    assert!(silent.request().is_none(), "dropped without a hello");
    // A well-behaved ztunnel still gets everything.
    let good = Peer::connect(&f.socket);
    good.hello();
    expect_add(&good, "a");
    good.ack("");
    expect_acked(&f.server, "a");
    assert_eq!(f.server.status().counters.peer_errors, 3);
}

#[test]
fn a_pod_without_a_live_process_is_kept_in_the_snapshot_and_an_error_after_it() {
    let f = start();
    let mut ghost = pod("ghost");
    ghost.cgroup = "/zbridge-test-no-such-cgroup".into();
    serve(&f.server, pod("a"));
    serve(&f.server, ghost);
    let peer = Peer::connect(&f.socket);
    peer.hello();
    expect_add(&peer, "a");
    peer.ack("");
    // No namespace to send for the ghost: ztunnel is asked to keep it (if it serves it), so
    // that the snapshot's end does not drop it, before that end.
    expect_keep(&peer, "ghost");
    peer.ack("");
    assert!(matches!(peer.request(), Some(Payload::SnapshotSent(_))));
    peer.ack("");
    // After the snapshot a keep means nothing to ztunnel: the ghost is looked at again, as an
    // error, and nothing more is sent for it.
    std::thread::sleep(Duration::from_millis(200));
    let status = f.server.status();
    assert_eq!(status.pods["a"].state, PodState::Acked);
    assert_eq!(status.pods["ghost"].state, PodState::Error);
    assert!(status.pods["ghost"]
        .error
        .as_deref()
        .unwrap()
        .contains("no-such-cgroup"));
    assert_eq!(status.counters.keeps, 1);
    assert!(status.counters.netns_errors > 1, "{:?}", status.counters);
    assert_eq!(status.counters.adds, 1);
}

/// An agent that has just started has not decided its pods yet: the snapshot's end waits for
/// its first full picture, and the pods it decides meanwhile (added, or kept without a
/// process) come before that end, so that ztunnel drops none of them.
#[test]
fn the_snapshots_end_waits_for_the_agents_first_full_picture() {
    let f = start_with(|config| config.hold_snapshot_until_synced = true);
    let peer = Peer::connect(&f.socket);
    peer.hello();
    // Nothing decided yet, and no end of the snapshot either.
    peer.expect_nothing_for(
        Duration::from_millis(300),
        "nothing is sent before the agent's picture",
    );
    // Decided meanwhile: one pod with a process, one without.
    let mut ghost = pod("ghost");
    ghost.cgroup = "/zbridge-test-no-such-cgroup".into();
    serve(&f.server, pod("a"));
    serve(&f.server, ghost);
    expect_add(&peer, "a");
    peer.ack("");
    expect_keep(&peer, "ghost");
    peer.ack("");
    peer.expect_nothing_for(
        Duration::from_millis(300),
        "no end before the picture is whole",
    );
    // The picture is whole: the end follows.
    f.server.commands().send(Command::Synced).unwrap();
    assert!(matches!(peer.request(), Some(Payload::SnapshotSent(_))));
    peer.ack("");
    // A ztunnel that connects from now on gets the end right after the pods.
    let second = Peer::connect(&f.socket);
    second.hello();
    expect_add(&second, "a");
    second.ack("");
    expect_keep(&second, "ghost");
    second.ack("");
    assert!(matches!(second.request(), Some(Payload::SnapshotSent(_))));
}

/// A kept pod is added once its namespace can be opened. The cgroup root is a directory of
/// the test's (its `cgroup.procs` written by the test), so that no root is needed.
#[test]
fn a_kept_pod_is_added_once_a_process_is_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ztunnel.sock");
    let cgroup_root = dir.path().join("cgroup");
    let config = ZdsConfig::new(
        &socket,
        Roots {
            proc: "/proc".into(),
            cgroup: cgroup_root.clone(),
        },
    );
    let server = Server::start(config).unwrap();
    // The pod's cgroup is this test's own (what /proc says of its process), not yet there.
    serve(&server, pod("late"));
    let peer = Peer::connect(&socket);
    peer.hello();
    expect_keep(&peer, "late");
    peer.ack("");
    assert!(matches!(peer.request(), Some(Payload::SnapshotSent(_))));
    peer.ack("");
    let dir_of_pod = cgroup_root.join(own_cgroup().trim_start_matches('/'));
    std::fs::create_dir_all(&dir_of_pod).unwrap();
    std::fs::write(
        dir_of_pod.join("cgroup.procs"),
        format!("{}\n", std::process::id()),
    )
    .unwrap();
    expect_add(&peer, "late");
    peer.ack("");
    expect_acked(&server, "late");
    assert_eq!(server.status().counters.keeps, 1);
}

#[test]
fn a_socket_another_agent_serves_is_not_taken_over_and_a_stale_one_is() {
    let f = start();
    let roots = Roots {
        proc: "/proc".into(),
        cgroup: watcher::procfs::cgroup2_mount().unwrap(),
    };
    let err = match Server::start(ZdsConfig::new(&f.socket, roots.clone())) {
        Err(e) => e,
        Ok(_) => panic!("a served socket was taken over"),
    };
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    assert!(err.to_string().contains("istio-cni"), "{err}");
    // The first server still serves.
    serve(&f.server, pod("a"));
    let peer = Peer::connect(&f.socket);
    peer.hello();
    expect_add(&peer, "a");

    // A socket file nobody serves (an agent killed with -9) is replaced.
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists(), "the socket file outlives its listener");
    let second = Server::start(ZdsConfig::new(&stale, roots)).expect("a stale socket is replaced");
    second.stop();
}
