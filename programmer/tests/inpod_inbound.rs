//! In-pod inbound capture in the kernel: the `sk_lookup` program attached to a pod's network
//! namespace hands connections from another namespace to ztunnel's 15006 listener there, with
//! the original destination as the accepted socket's local address; HBONE (15008), the node's
//! own addresses and addresses without a listener reach their own sockets. Root only.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use programmer::inbound::InboundCapture;
use programmer::ztunnel_socket::take_listener;
use testkit::{require_root, unique_name, NetNs};

const POD4: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 2);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 1, 0, 0, 0, 0, 2);
/// The node's own addresses (the kubelet's probes come from here).
const NODE4: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 1, 0, 0, 0, 0, 1);
/// Another pod on the same link (not a node address).
const PEER4: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 3);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 1, 0, 0, 0, 0, 3);

/// A pod namespace with an app on 8080, ztunnel's 15006 and 15008 listeners (all dual-stack,
/// as ztunnel opens them), and a peer namespace on the other end of a veth pair.
struct World {
    pod: NetNs,
    peer: NetNs,
    app: TcpListener,
    inbound: TcpListener,
    hbone: TcpListener,
}

impl World {
    fn new(prefix: &str) -> World {
        let pod = NetNs::new(&format!("{prefix}p")).expect("pod netns");
        let peer = NetNs::new(&format!("{prefix}q")).expect("peer netns");
        let (here, there) = (unique_name("vp"), unique_name("vq"));
        // Interface names are at most 15 bytes: keep the unique tail.
        let here = &here[here.len().saturating_sub(15)..];
        let there = &there[there.len().saturating_sub(15)..];
        peer.veth(here, &pod, there).expect("veth");
        peer.addr(here, &format!("{NODE4}/24")).unwrap();
        peer.addr(here, &format!("{PEER4}/24")).unwrap();
        peer.addr(here, &format!("{NODE6}/64")).unwrap();
        peer.addr(here, &format!("{PEER6}/64")).unwrap();
        pod.addr(there, &format!("{POD4}/24")).unwrap();
        pod.addr(there, &format!("{POD6}/64")).unwrap();
        pod.ip(&["link", "set", "lo", "up"]).unwrap();
        peer.ip(&["link", "set", "lo", "up"]).unwrap();
        let (app, inbound, hbone) = pod
            .in_thread(|| {
                let bind = |port| TcpListener::bind(("::", port)).expect("listen in the pod");
                (bind(8080), bind(15006), bind(15008))
            })
            .expect("pod thread");
        for l in [&app, &inbound, &hbone] {
            l.set_nonblocking(true).unwrap();
        }
        World {
            pod,
            peer,
            app,
            inbound,
            hbone,
        }
    }

    /// Connects from the peer namespace, from `src`, to `dst`; returns which listener
    /// accepted the connection and the accepted socket's local address.
    fn connect(&self, src: IpAddr, dst: SocketAddr) -> (&'static str, SocketAddr) {
        let client = self
            .peer
            .in_thread(move || -> std::io::Result<TcpStream> {
                let socket = match dst {
                    SocketAddr::V4(_) => socket2_like::tcp4()?,
                    SocketAddr::V6(_) => socket2_like::tcp6()?,
                };
                socket2_like::bind(&socket, SocketAddr::new(src, 0))?;
                socket2_like::connect(socket, dst)
            })
            .expect("peer thread")
            .unwrap_or_else(|e| panic!("connect {src} → {dst}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for (name, listener) in [
                ("app", &self.app),
                ("ztunnel-15006", &self.inbound),
                ("ztunnel-15008", &self.hbone),
            ] {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let local = stream.local_addr().unwrap();
                        drop(client);
                        return (
                            name,
                            SocketAddr::new(local.ip().to_canonical(), local.port()),
                        );
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("accept on {name}: {e}"),
                }
            }
            assert!(
                Instant::now() < deadline,
                "{src} → {dst}: accepted nowhere in 5 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Plain sockets bound to a chosen source before connecting (std cannot bind a client).
mod socket2_like {
    use std::net::{SocketAddr, TcpStream};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    pub fn tcp4() -> std::io::Result<OwnedFd> {
        socket(libc::AF_INET)
    }
    pub fn tcp6() -> std::io::Result<OwnedFd> {
        socket(libc::AF_INET6)
    }
    fn socket(family: i32) -> std::io::Result<OwnedFd> {
        // SAFETY: socket(2) with constant arguments; the fd is owned at once.
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
    fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_in fits in sockaddr_storage.
                unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as u16,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                // SAFETY: sockaddr_in6 fits in sockaddr_storage.
                unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (storage, len as libc::socklen_t)
    }
    pub fn bind(fd: &OwnedFd, addr: SocketAddr) -> std::io::Result<()> {
        let (sa, len) = sockaddr(addr);
        // SAFETY: a valid socket and address of the given length.
        if unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                len,
            )
        } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
    pub fn connect(fd: OwnedFd, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let (sa, len) = sockaddr(addr);
        // SAFETY: a valid socket and address of the given length.
        if unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                len,
            )
        } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(TcpStream::from(fd))
    }
}

#[test]
fn inbound_connections_land_on_ztunnels_15006_with_the_original_destination() {
    if !require_root("inbound_connections_land_on_ztunnels_15006_with_the_original_destination") {
        return;
    }
    let world = World::new("inb");
    let mut capture = InboundCapture::load().expect("load the sk_lookup program");
    let _link = capture
        .attach(world.pod.file().unwrap())
        .expect("attach to the pod's namespace");
    capture
        .set_node_addrs(&[NODE4.into(), NODE6.into()])
        .unwrap();

    // Before ztunnel's listener is known for the pod, nothing is captured.
    let app8080_4 = SocketAddr::new(POD4.into(), 8080);
    assert_eq!(world.connect(PEER4.into(), app8080_4), ("app", app8080_4));

    // ztunnel's listener, found as the agent finds it: among the descriptors of the process
    // (this one, here), by port and namespace, and duplicated with pidfd_getfd.
    let pod_ns_inode = std::fs::metadata(format!("/run/netns/{}", world.pod.name))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    let me = std::process::id() as i32;
    assert!(
        take_listener(me, pod_ns_inode, 15007).unwrap().is_none(),
        "no listener on another port"
    );
    assert!(
        take_listener(me, pod_ns_inode + 1, 15006)
            .unwrap()
            .is_none(),
        "no listener in another namespace"
    );
    let listener = take_listener(me, pod_ns_inode, 15006)
        .unwrap()
        .expect("ztunnel's 15006 listener in the pod's namespace");
    capture
        .set_listener(&[POD4.into(), POD6.into()], &listener)
        .unwrap();
    drop(listener); // the map holds the socket, not the descriptor

    let app8080_6 = SocketAddr::new(POD6.into(), 8080);
    // From another pod: to ztunnel's 15006, the accepted socket's local address the pod's.
    assert_eq!(
        world.connect(PEER4.into(), app8080_4),
        ("ztunnel-15006", app8080_4)
    );
    assert_eq!(
        world.connect(PEER6.into(), app8080_6),
        ("ztunnel-15006", app8080_6)
    );
    // HBONE reaches 15008 directly.
    let hbone4 = SocketAddr::new(POD4.into(), 15008);
    let hbone6 = SocketAddr::new(POD6.into(), 15008);
    assert_eq!(
        world.connect(PEER4.into(), hbone4),
        ("ztunnel-15008", hbone4)
    );
    assert_eq!(
        world.connect(PEER6.into(), hbone6),
        ("ztunnel-15008", hbone6)
    );
    // From the node's own address (the kubelet's probes): the app.
    assert_eq!(world.connect(NODE4.into(), app8080_4), ("app", app8080_4));
    assert_eq!(world.connect(NODE6.into(), app8080_6), ("app", app8080_6));

    // From inside the pod (loopback and its own address): never to 15006.
    let own = world
        .pod
        .in_thread(move || TcpStream::connect(app8080_4).map(|s| s.local_addr().unwrap()))
        .unwrap()
        .expect("the pod reaches its own app");
    assert_eq!(own.ip().to_canonical(), IpAddr::from(POD4));
    let mut accepted = None;
    for _ in 0..500 {
        if let Ok((s, _)) = world.app.accept() {
            accepted = Some(s.local_addr().unwrap());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let on_inbound = world.inbound.accept().map(|(s, _)| s.local_addr().unwrap());
    assert_eq!(
        accepted.map(|a| SocketAddr::new(a.ip().to_canonical(), a.port())),
        Some(app8080_4),
        "the pod's connection to itself reached its app (15006 got {on_inbound:?})"
    );
    assert!(
        matches!(world.inbound.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "nothing from inside the pod went to 15006"
    );

    // Removed: the pod's connections reach the app again.
    capture
        .remove_listener(&[POD4.into(), POD6.into()])
        .unwrap();
    assert_eq!(world.connect(PEER4.into(), app8080_4), ("app", app8080_4));

    let counters = capture.counters().unwrap();
    assert_eq!(counters.redirected, 2, "{counters:?}");
    assert_eq!(counters.passed_node, 2, "{counters:?}");
    assert_eq!(counters.assign_failed, 0, "{counters:?}");
}

/// ztunnel restarting: its listener in the pod's namespace closes, and with it the listener's
/// map entry. The pod stays enrolled, so its inbound connections are refused (fail closed, as
/// istio-cni's REDIRECT to a closed port is) and never reach the app behind ztunnel's back;
/// once a new listener is set they land on it.
#[test]
fn inbound_to_an_enrolled_pod_without_ztunnel_is_dropped_not_passed_to_the_app() {
    if !require_root("inbound_to_an_enrolled_pod_without_ztunnel_is_dropped_not_passed_to_the_app")
    {
        return;
    }
    let world = World::new("inz");
    let mut capture = InboundCapture::load().expect("load the sk_lookup program");
    let _link = capture
        .attach(world.pod.file().unwrap())
        .expect("attach to the pod's namespace");
    // A ztunnel listener of its own, so that this test can close it.
    let restarting = world
        .pod
        .in_thread(|| TcpListener::bind(("::", 15106)).expect("listen in the pod"))
        .unwrap();
    capture
        .set_listener(&[POD4.into(), POD6.into()], &restarting)
        .unwrap();
    drop(restarting); // ztunnel stops: the socket closes, its map entry goes

    let app8080_4 = SocketAddr::new(POD4.into(), 8080);
    let peer = PEER4;
    let attempt = world
        .peer
        .in_thread(move || -> std::io::Result<()> {
            let socket = socket2_like::tcp4()?;
            socket2_like::bind(&socket, SocketAddr::new(peer.into(), 0))?;
            // A bounded connect, should the SYN be dropped without an answer.
            let tv = libc::timeval {
                tv_sec: 1,
                tv_usec: 0,
            };
            // SAFETY: a valid socket and a timeval of the right size.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&socket),
                    libc::SOL_SOCKET,
                    libc::SO_SNDTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            socket2_like::connect(socket, app8080_4).map(drop)
        })
        .unwrap();
    assert!(attempt.is_err(), "the connection was not refused");
    assert!(
        matches!(world.app.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "the app got a connection behind ztunnel's back"
    );
    assert!(capture.counters().unwrap().no_ztunnel >= 1);

    // ztunnel is back: its new listener takes the pod's connections again.
    let pod_ns_inode = std::fs::metadata(format!("/run/netns/{}", world.pod.name))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    let listener = take_listener(std::process::id() as i32, pod_ns_inode, 15006)
        .unwrap()
        .expect("the 15006 listener");
    capture
        .set_listener(&[POD4.into(), POD6.into()], &listener)
        .unwrap();
    assert_eq!(
        world.connect(PEER4.into(), app8080_4),
        ("ztunnel-15006", app8080_4)
    );
}
