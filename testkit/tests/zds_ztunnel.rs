//! The fake in-pod ztunnel against a minimal ZDS server written here with libc (the agent's
//! is not used: these tests check the fake alone). The server's messages are hand-encoded too.
//!
//! Root: the fake runs in a test cgroup, and pods are network namespaces of the test's own.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use testkit::zds_ztunnel::FAKE_NACK;
use testkit::{InPodOptions, InPodZtunnel, NetNs, TestCgroup, ZdsEvent};

const WAIT: Duration = Duration::from_secs(10);

/// A directory of the test's own under the temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(testkit::unique_name(prefix));
        std::fs::create_dir(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn check(rc: libc::c_int, what: &str) -> libc::c_int {
    assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
    rc
}

/// Waits until `fd` is readable; false on timeout.
fn readable(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    check(n, "poll") > 0
}

/// The agent's side of ZDS, reduced to what the tests need: a SOCK_SEQPACKET listener.
struct ZdsServer {
    listener: OwnedFd,
    path: PathBuf,
    _dir: TempDir,
}

impl ZdsServer {
    fn new() -> ZdsServer {
        let dir = TempDir::new("zds");
        let path = dir.0.join("ztunnel.sock");
        // SAFETY: socket, bind and listen on a descriptor owned here; addr is a zeroed
        // sockaddr_un with a path shorter than sun_path.
        unsafe {
            let fd = check(
                libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0),
                "socket",
            );
            let listener = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            let bytes = path.as_os_str().as_encoded_bytes();
            assert!(bytes.len() < addr.sun_path.len());
            for (i, b) in bytes.iter().enumerate() {
                addr.sun_path[i] = *b as libc::c_char;
            }
            check(
                libc::bind(
                    fd,
                    &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                ),
                "bind",
            );
            check(libc::listen(fd, 4), "listen");
            ZdsServer {
                listener,
                path,
                _dir: dir,
            }
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// The next ztunnel connection.
    fn accept(&self) -> ZdsConn {
        assert!(
            readable(self.listener.as_raw_fd(), WAIT),
            "no ztunnel connected"
        );
        // SAFETY: accept on the listener; the new descriptor is owned by the result.
        let fd = unsafe {
            check(
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                ),
                "accept",
            )
        };
        ZdsConn(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// One ztunnel connection, from the agent's side.
struct ZdsConn(OwnedFd);

impl ZdsConn {
    /// The next packet; `None` on timeout, empty when the peer closed.
    fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        if !readable(self.0.as_raw_fd(), timeout) {
            return None;
        }
        let mut buf = [0u8; 2048];
        // SAFETY: buf is live and of the stated length.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECONNRESET) {
            return Some(Vec::new());
        }
        Some(buf[..check(n as libc::c_int, "recv") as usize].to_vec())
    }

    /// Sends one message, with `netns` in SCM_RIGHTS when given.
    fn send(&self, bytes: &[u8], netns: Option<RawFd>) {
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        let mut control = [0u64; 4];
        // SAFETY: msghdr and the cmsg built in `control` (32 bytes, 8-aligned, at least
        // CMSG_SPACE(4)) point at live buffers.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            if let Some(fd) = netns {
                let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
                assert!(space <= std::mem::size_of_val(&control));
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = space as _;
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut RawFd, fd);
            }
            let n = libc::sendmsg(self.0.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
            assert_eq!(
                check(n as libc::c_int, "sendmsg") as usize,
                bytes.len(),
                "sent in part"
            );
        }
    }

    /// Sends a request and returns the ack's error ("" for ok).
    fn request(&self, bytes: &[u8], netns: Option<RawFd>) -> String {
        self.send(bytes, netns);
        let answer = self.recv(WAIT).expect("no answer");
        ack_error(&answer).unwrap_or_else(|| panic!("not an ack: {answer:02x?}"))
    }
}

// --- istio.workload.zds, by hand ----------------------------------------------------------

/// A length-delimited field (all fields sent here are; lengths stay under 128).
fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
    assert!(bytes.len() < 128);
    let mut out = vec![number << 3 | 2, bytes.len() as u8];
    out.extend_from_slice(bytes);
    out
}

fn add(uid: &str, name: &str, namespace: &str, service_account: &str) -> Vec<u8> {
    let info = [
        field(1, name.as_bytes()),
        field(2, namespace.as_bytes()),
        field(3, service_account.as_bytes()),
    ]
    .concat();
    field(1, &[field(1, uid.as_bytes()), field(2, &info)].concat())
}

fn del(uid: &str) -> Vec<u8> {
    field(2, &field(2, uid.as_bytes()))
}

fn keep(uid: &str) -> Vec<u8> {
    field(5, &field(1, uid.as_bytes()))
}

fn snapshot_sent() -> Vec<u8> {
    field(3, &[])
}

/// `WorkloadResponse{ack: Ack{error}}` → `error` (short messages only: one-byte lengths).
fn ack_error(bytes: &[u8]) -> Option<String> {
    let ack = match bytes {
        [0x0a, len, ack @ ..] if usize::from(*len) == ack.len() => ack,
        _ => return None,
    };
    match ack {
        [] => Some(String::new()),
        [0x0a, len, error @ ..] if usize::from(*len) == error.len() => {
            String::from_utf8(error.to_vec()).ok()
        }
        _ => None,
    }
}

// --- a pod's side -------------------------------------------------------------------------

fn inode(ns: &NetNs) -> u64 {
    ns.file().unwrap().metadata().unwrap().ino()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// From inside `ns`: a TCP connect to `to` that writes `data` and reads as much back.
fn tcp_exchange(ns: &NetNs, to: SocketAddr, data: &'static [u8]) -> std::io::Result<Vec<u8>> {
    ns.in_thread(move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(data)?;
        let mut back = vec![0u8; data.len()];
        s.read_exact(&mut back)?;
        Ok(back)
    })
    .unwrap()
}

/// From inside `ns`: one datagram to `to` and its answer.
fn udp_exchange(ns: &NetNs, to: SocketAddr, data: &'static [u8]) -> std::io::Result<Vec<u8>> {
    ns.in_thread(move || {
        let s = UdpSocket::bind(SocketAddr::new(to.ip(), 0))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.send_to(data, to)?;
        let mut buf = [0u8; 256];
        let (n, from) = s.recv_from(&mut buf)?;
        assert_eq!(from, to);
        Ok(buf[..n].to_vec())
    })
    .unwrap()
}

fn refused(result: std::io::Result<Vec<u8>>) -> bool {
    matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// A fake started against a new server, its connection accepted and its hello read.
struct World {
    cgroup: TestCgroup,
    server: ZdsServer,
    fake: InPodZtunnel,
    conn: ZdsConn,
    hello: Vec<u8>,
}

impl World {
    fn new(options: InPodOptions) -> World {
        let cgroup = TestCgroup::new("zds-ztunnel").unwrap();
        let server = ZdsServer::new();
        let fake = InPodZtunnel::start(&cgroup, &cgroup.path, server.path(), options).unwrap();
        let conn = server.accept();
        let hello = conn.recv(WAIT).expect("no hello");
        World {
            cgroup,
            server,
            fake,
            conn,
            hello,
        }
    }

    fn wait_for(&self, what: &str, wanted: impl FnMut(&ZdsEvent) -> bool) -> ZdsEvent {
        self.fake
            .wait_for(WAIT, wanted)
            .unwrap_or_else(|seen| panic!("no {what}; the fake reported {seen:?}"))
    }
}

#[test]
fn an_add_opens_ztunnels_listeners_in_the_pods_namespace_and_del_closes_them() {
    if !testkit::require_root(
        "an_add_opens_ztunnels_listeners_in_the_pods_namespace_and_del_closes_them",
    ) {
        return;
    }
    let world = World::new(InPodOptions::default());
    assert_eq!(world.hello, [0x08, 0x01], "ZdsHello{{version: V1}}");
    let pod = NetNs::new("zds-pod").unwrap();
    let other = NetNs::new("zds-other").unwrap();

    let netns = pod.file().unwrap();
    let error = world.conn.request(
        &add("uid-1", "pod-a", "apps", "sa-a"),
        Some(netns.as_raw_fd()),
    );
    assert_eq!(error, "", "the add was not acked");
    drop(netns);
    let added = world.wait_for("add", |e| matches!(e, ZdsEvent::Add { .. }));
    assert_eq!(
        added,
        ZdsEvent::Add {
            uid: "uid-1".into(),
            name: "pod-a".into(),
            namespace: "apps".into(),
            service_account: "sa-a".into(),
            netns_inode: inode(&pod),
        }
    );

    // The ack came after the listeners were bound: they answer at once, in the pod.
    assert_eq!(
        udp_exchange(&pod, sa("127.0.0.1:15053"), b"q4").unwrap(),
        b"zbt-dns:q4"
    );
    assert_eq!(
        udp_exchange(&pod, sa("[::1]:15053"), b"q6").unwrap(),
        b"zbt-dns:q6"
    );
    assert_eq!(
        tcp_exchange(&pod, sa("127.0.0.1:15053"), b"dns?").unwrap(),
        b"dns?"
    );
    assert_eq!(tcp_exchange(&pod, sa("[::1]:15001"), b"x").unwrap(), b"x");
    assert_eq!(
        tcp_exchange(&pod, sa("127.0.0.1:15006"), b"y").unwrap(),
        b"y"
    );
    assert_eq!(tcp_exchange(&pod, sa("[::1]:15008"), b"z").unwrap(), b"z");
    // Nothing of it in a namespace the fake was not given.
    assert!(refused(tcp_exchange(&other, sa("[::1]:15001"), b"x")));
    assert!(refused(tcp_exchange(&other, sa("127.0.0.1:15053"), b"x")));

    let udp = world.wait_for("udp", |e| matches!(e, ZdsEvent::Udp { .. }));
    assert!(
        matches!(&udp, ZdsEvent::Udp { uid, local, .. } if uid == "uid-1" && *local == sa("127.0.0.1:15053")),
        "{udp:?}"
    );
    let outbound = world.wait_for(
        "accept on 15001",
        |e| matches!(e, ZdsEvent::Accepted { accepted, .. } if accepted.local.port() == 15001),
    );
    let ZdsEvent::Accepted { uid, accepted } = outbound else {
        unreachable!()
    };
    assert_eq!(uid, "uid-1");
    assert_eq!(accepted.local, sa("[::1]:15001"));
    // No capture here: the original destination is asked, and not known.
    assert!(matches!(accepted.orig, Some(Err(_))), "{accepted:?}");
    assert_eq!(accepted.upstream, None);

    // A keep comes only before the snapshot's end (after it, ztunnel refuses it).
    assert_eq!(world.conn.request(&keep("uid-1"), None), "");
    world.wait_for(
        "keep",
        |e| matches!(e, ZdsEvent::Keep { uid } if uid == "uid-1"),
    );
    assert_eq!(world.conn.request(&snapshot_sent(), None), "");
    world.wait_for("snapshot", |e| *e == ZdsEvent::Snapshot);

    // The del is acked once the listeners are closed.
    assert_eq!(world.conn.request(&del("uid-1"), None), "");
    world.wait_for(
        "del",
        |e| matches!(e, ZdsEvent::Del { uid } if uid == "uid-1"),
    );
    for to in [
        "[::1]:15001",
        "127.0.0.1:15006",
        "[::1]:15008",
        "[::1]:15053",
    ] {
        assert!(
            refused(tcp_exchange(&pod, sa(to), b"x")),
            "{to} still open after del"
        );
    }
    let udp_after = udp_exchange(&pod, sa("127.0.0.1:15053"), b"q");
    assert!(udp_after.is_err(), "UDP 15053 answered after del");

    // The agent goes away: the fake says so and exits cleanly.
    let World { mut fake, conn, .. } = world;
    drop(conn);
    assert_eq!(fake.next_event(WAIT), Some(ZdsEvent::Closed));
    assert_eq!(
        fake.exit_status(WAIT).unwrap().and_then(|s| s.code()),
        Some(0)
    );
}

/// The inode of the TCP socket listening on `port` in `ns` (from `/proc/thread-self/net/tcp6`
/// read inside it), if one is.
fn tcp6_listener_inode(ns: &NetNs, port: u16) -> Option<u64> {
    ns.in_thread(move || {
        let table = std::fs::read_to_string("/proc/thread-self/net/tcp6").unwrap();
        table.lines().skip(1).find_map(|line| {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok()?;
            (local_port == port && f[3] == "0A").then(|| f[9].parse().unwrap())
        })
    })
    .unwrap()
}

/// A second `add` of a pod the fake serves, in the same namespace, changes nothing (ztunnel's
/// statemanager treats it as idempotent): the listeners are the same sockets and were open
/// throughout. In another namespace (a sandbox made again) it moves the pod there.
#[test]
fn a_second_add_in_the_same_namespace_keeps_the_listeners_and_in_another_moves_them() {
    if !testkit::require_root(
        "a_second_add_in_the_same_namespace_keeps_the_listeners_and_in_another_moves_them",
    ) {
        return;
    }
    let world = World::new(InPodOptions::default());
    let pod = NetNs::new("zds-again").unwrap();
    let other = NetNs::new("zds-again2").unwrap();
    let message = add("uid-a", "pod-a", "apps", "default");
    assert_eq!(
        world
            .conn
            .request(&message, Some(pod.file().unwrap().as_raw_fd())),
        ""
    );
    let listener = tcp6_listener_inode(&pod, 15001).expect("listening on 15001");

    // The same namespace through a new descriptor, as the agent sends it after a restart.
    assert_eq!(
        world
            .conn
            .request(&message, Some(pod.file().unwrap().as_raw_fd())),
        ""
    );
    world.wait_for(
        "the second add",
        |e| matches!(e, ZdsEvent::Add { netns_inode, .. } if *netns_inode == inode(&pod)),
    );
    assert_eq!(tcp6_listener_inode(&pod, 15001), Some(listener));
    assert_eq!(tcp_exchange(&pod, sa("[::1]:15001"), b"x").unwrap(), b"x");

    // Another namespace: the pod moves.
    assert_eq!(
        world
            .conn
            .request(&message, Some(other.file().unwrap().as_raw_fd())),
        ""
    );
    assert_eq!(tcp6_listener_inode(&pod, 15001), None);
    assert!(refused(tcp_exchange(&pod, sa("[::1]:15001"), b"x")));
    assert_eq!(tcp_exchange(&other, sa("[::1]:15001"), b"x").unwrap(), b"x");
}

#[test]
fn a_nacked_add_opens_nothing_and_its_resend_is_acked() {
    if !testkit::require_root("a_nacked_add_opens_nothing_and_its_resend_is_acked") {
        return;
    }
    let world = World::new(InPodOptions {
        nack: vec![("uid-n".into(), 1)],
        ..InPodOptions::default()
    });
    let pod = NetNs::new("zds-nack").unwrap();
    let netns = pod.file().unwrap();
    let message = add("uid-n", "pod-n", "apps", "default");

    assert_eq!(
        world.conn.request(&message, Some(netns.as_raw_fd())),
        FAKE_NACK
    );
    world.wait_for("nack", |e| {
        *e == ZdsEvent::Nack {
            uid: "uid-n".into(),
            error: FAKE_NACK.into(),
        }
    });
    assert!(refused(tcp_exchange(&pod, sa("[::1]:15001"), b"x")));

    assert_eq!(
        world.conn.request(&message, Some(netns.as_raw_fd())),
        "",
        "the resend was not acked"
    );
    assert_eq!(tcp_exchange(&pod, sa("[::1]:15001"), b"x").unwrap(), b"x");
    // Another pod is not nacked at all.
    let second = NetNs::new("zds-nack2").unwrap();
    let error = world.conn.request(
        &add("uid-m", "pod-m", "apps", "default"),
        Some(second.file().unwrap().as_raw_fd()),
    );
    assert_eq!(error, "");
}

#[test]
fn messages_without_their_namespace_or_with_a_stray_one_are_refused() {
    if !testkit::require_root("messages_without_their_namespace_or_with_a_stray_one_are_refused") {
        return;
    }
    // An add without its descriptor: no ack, an error, the connection dropped (status 3).
    let mut world = World::new(InPodOptions::default());
    world
        .conn
        .send(&add("uid-x", "pod-x", "apps", "default"), None);
    assert_eq!(
        world.conn.recv(WAIT),
        Some(Vec::new()),
        "the fake answered instead of dropping the connection"
    );
    let error = world.wait_for("error", |e| matches!(e, ZdsEvent::Error(_)));
    assert!(
        matches!(&error, ZdsEvent::Error(text) if text.contains("uid-x")),
        "{error:?}"
    );
    let status = world.fake.exit_status(WAIT).unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(3));

    // A keep with a descriptor, and a request with no payload.
    let pod = NetNs::new("zds-stray").unwrap();
    for (message, netns) in [
        (keep("uid-y"), Some(pod.file().unwrap())),
        (field(4, b"unknown"), None),
    ] {
        let world = World::new(InPodOptions::default());
        world
            .conn
            .send(&message, netns.as_ref().map(|f| f.as_raw_fd()));
        assert_eq!(world.conn.recv(WAIT), Some(Vec::new()));
        world.wait_for("error", |e| matches!(e, ZdsEvent::Error(_)));
    }
}

#[test]
fn a_restarted_ztunnel_says_hello_again_on_its_own_connection() {
    if !testkit::require_root("a_restarted_ztunnel_says_hello_again_on_its_own_connection") {
        return;
    }
    let World {
        cgroup,
        server,
        fake,
        conn,
        hello,
    } = World::new(InPodOptions::default());
    assert_eq!(hello, [0x08, 0x01]);
    // ztunnel dies: the agent sees its connection end.
    drop(fake);
    assert_eq!(conn.recv(WAIT), Some(Vec::new()));

    let options = InPodOptions {
        hello_version: 2,
        ..InPodOptions::default()
    };
    let restarted = InPodZtunnel::start(&cgroup, &cgroup.path, server.path(), options).unwrap();
    let conn = server.accept();
    assert_eq!(conn.recv(WAIT).expect("no hello"), [0x08, 0x02]);
    assert_eq!(conn.request(&snapshot_sent(), None), "");
    assert_eq!(restarted.next_event(WAIT), Some(ZdsEvent::Snapshot));
}

#[test]
fn a_fake_started_before_the_agent_connects_once_the_socket_exists() {
    if !testkit::require_root("a_fake_started_before_the_agent_connects_once_the_socket_exists") {
        return;
    }
    let cgroup = TestCgroup::new("zds-early").unwrap();
    let dir = TempDir::new("zds-early");
    let path = dir.0.join("later.sock");
    let fake = InPodZtunnel::launch(&cgroup, &cgroup.path, &path, InPodOptions::default()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fake.drain(), [], "ready before the socket existed");
    // The server binds where the fake looks.
    let server = ZdsServer::new();
    std::fs::rename(server.path(), &path).unwrap();
    let conn = server.accept();
    assert_eq!(conn.recv(WAIT).expect("no hello"), [0x08, 0x01]);
    assert_eq!(fake.next_event(WAIT), Some(ZdsEvent::Ready));
}

#[test]
fn a_fake_that_never_acks_still_reports() {
    if !testkit::require_root("a_fake_that_never_acks_still_reports") {
        return;
    }
    let world = World::new(InPodOptions {
        no_ack: true,
        ..InPodOptions::default()
    });
    world.conn.send(&snapshot_sent(), None);
    world.wait_for("snapshot", |e| *e == ZdsEvent::Snapshot);
    assert_eq!(
        world.conn.recv(Duration::from_millis(500)),
        None,
        "a --no-ack fake answered"
    );
}

#[test]
fn a_message_over_ztunnels_1024_bytes_is_refused_as_truncated() {
    if !testkit::require_root("a_message_over_ztunnels_1024_bytes_is_refused_as_truncated") {
        return;
    }
    let mut world = World::new(InPodOptions::default());
    // An unknown field 4 of 1100 bytes (length as a two-byte varint): well-formed, too long.
    let mut message = vec![4 << 3 | 2, 0x80 | (1100 & 0x7f) as u8, (1100 >> 7) as u8];
    message.resize(3 + 1100, b'a');
    world.conn.send(&message, None);
    assert_eq!(world.conn.recv(WAIT), Some(Vec::new()));
    let error = world.wait_for("error", |e| matches!(e, ZdsEvent::Error(_)));
    assert!(
        matches!(&error, ZdsEvent::Error(text) if text.contains("truncated")),
        "{error:?}"
    );
    assert_eq!(
        world.fake.exit_status(WAIT).unwrap().and_then(|s| s.code()),
        Some(3)
    );
}

#[test]
fn pass_through_proxies_to_the_original_destination_from_the_pod_with_ztunnels_mark() {
    if !testkit::require_root(
        "pass_through_proxies_to_the_original_destination_from_the_pod_with_ztunnels_mark",
    ) {
        return;
    }
    let world = World::new(InPodOptions {
        pass_through: true,
        ..InPodOptions::default()
    });
    let pod = NetNs::new("zds-pass").unwrap();
    // istio-cni's capture, reduced: the pod's connects to port 9999 go to 15001, except
    // ztunnel's own (mark 1337), which would otherwise come back to 15001 for ever.
    pod.exec(
        "iptables",
        &[
            "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "mark", "--mark", "1337", "-j",
            "RETURN",
        ],
    )
    .unwrap();
    pod.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            "9999",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ],
    )
    .unwrap();
    let service = pod
        .in_thread(|| std::net::TcpListener::bind("127.0.0.1:9999"))
        .unwrap()
        .unwrap();
    let served = std::thread::spawn(move || {
        let (mut s, peer) = service.accept().unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        s.write_all(b"S").unwrap();
        peer
    });
    let netns = pod.file().unwrap();
    let error = world.conn.request(
        &add("uid-p", "pod-p", "apps", "default"),
        Some(netns.as_raw_fd()),
    );
    assert_eq!(error, "");

    // The service's answer comes back through the fake.
    assert_eq!(
        tcp_exchange(&pod, sa("127.0.0.1:9999"), b"x").unwrap(),
        b"S"
    );
    let peer = served.join().unwrap();
    let accepted = world.wait_for("accept", |e| matches!(e, ZdsEvent::Accepted { .. }));
    let ZdsEvent::Accepted { uid, accepted } = accepted else {
        unreachable!()
    };
    assert_eq!(uid, "uid-p");
    assert_eq!(accepted.orig, Some(Ok(sa("127.0.0.1:9999"))));
    assert_eq!(accepted.upstream, Some(Ok(peer)));
    // One connection only: the onward one was not captured again.
    std::thread::sleep(Duration::from_millis(200));
    let more: Vec<_> = world
        .fake
        .drain()
        .into_iter()
        .filter(|e| matches!(e, ZdsEvent::Accepted { .. }))
        .collect();
    assert_eq!(more, [], "the onward connect was captured again");

    // Without an original destination the fake falls back to the listener itself, and
    // refuses that as ztunnel does (ELOOP), closing the connection.
    assert!(tcp_exchange(&pod, sa("[::1]:15001"), b"x").is_err());
    let refused = world.wait_for("accept", |e| matches!(e, ZdsEvent::Accepted { .. }));
    let ZdsEvent::Accepted { accepted, .. } = refused else {
        unreachable!()
    };
    assert_eq!(accepted.upstream, Some(Err(libc::ELOOP)));
}

/// With `reconnect`, the fake outlives the agent's connection as ztunnel does: its pods stay
/// served, it connects again with a new hello, and the new session's `snapshot_sent` closes
/// the pods that were neither added nor kept in it (`dropped`), keeping the others; a `keep`
/// after `snapshot_sent` is a protocol violation.
#[test]
fn a_reconnecting_fake_keeps_its_pods_and_reconciles_each_snapshot() {
    if !testkit::require_root("a_reconnecting_fake_keeps_its_pods_and_reconciles_each_snapshot") {
        return;
    }
    let world = World::new(InPodOptions {
        reconnect: true,
        ..InPodOptions::default()
    });
    let pods: Vec<NetNs> = ["zds-rc-a", "zds-rc-b", "zds-rc-c"]
        .iter()
        .map(|name| NetNs::new(name).unwrap())
        .collect();
    for (i, pod) in pods.iter().enumerate() {
        let netns = pod.file().unwrap();
        let uid = format!("uid-{i}");
        let error = world
            .conn
            .request(&add(&uid, "p", "apps", "sa"), Some(netns.as_raw_fd()));
        assert_eq!(error, "");
    }
    assert_eq!(world.conn.request(&snapshot_sent(), None), "");
    world.wait_for("the first snapshot", |e| *e == ZdsEvent::Snapshot);

    // The agent goes away: the pods are still served.
    let World {
        cgroup: _cgroup,
        server,
        fake,
        conn,
        hello: _,
    } = world;
    drop(conn);
    fake.wait_for(WAIT, |e| *e == ZdsEvent::Closed)
        .expect("the end of the session");
    for pod in &pods {
        assert_eq!(tcp_exchange(pod, sa("[::1]:15001"), b"x").unwrap(), b"x");
    }
    // A new agent: a new hello; pod 0 added again, pod 1 kept, pod 2 not named.
    let conn = server.accept();
    assert_eq!(conn.recv(WAIT).expect("no hello"), [0x08, 0x01]);
    fake.wait_for(WAIT, |e| *e == ZdsEvent::Ready)
        .expect("ready again");
    let netns = pods[0].file().unwrap();
    assert_eq!(
        conn.request(&add("uid-0", "p", "apps", "sa"), Some(netns.as_raw_fd())),
        ""
    );
    assert_eq!(conn.request(&keep("uid-1"), None), "");
    assert_eq!(conn.request(&snapshot_sent(), None), "");
    let mut seen = Vec::new();
    fake.wait_for(WAIT, |e| {
        seen.push(e.clone());
        matches!(e, ZdsEvent::Dropped { .. })
    })
    .expect("a dropped pod");
    assert_eq!(
        seen.last(),
        Some(&ZdsEvent::Dropped {
            uid: "uid-2".into()
        }),
        "{seen:?}"
    );
    assert!(seen.contains(&ZdsEvent::Keep {
        uid: "uid-1".into()
    }));
    assert_eq!(
        tcp_exchange(&pods[0], sa("[::1]:15001"), b"x").unwrap(),
        b"x"
    );
    assert_eq!(
        tcp_exchange(&pods[1], sa("[::1]:15001"), b"x").unwrap(),
        b"x"
    );
    assert!(refused(tcp_exchange(&pods[2], sa("[::1]:15001"), b"x")));

    // A keep after the snapshot's end is refused as ztunnel refuses it.
    conn.send(&keep("uid-1"), None);
    fake.wait_for(WAIT, |e| matches!(e, ZdsEvent::Error(_)))
        .expect("a protocol violation");
}
