//! In-pod capture in the kernel (ztunnel's `shared` mode): ztunnel listens inside each pod's
//! own network namespace, and the programs send the pod's traffic there. Two pods, each in its
//! own namespace wired to a "node" namespace by a veth pair, each with a fake ztunnel of its
//! own (in ztunnel's cgroup, in the pod's namespace, on `[::]`), as in-pod ztunnel opens its
//! listeners. Root only.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use programmer::inpod::InPodCapture;
use programmer::programmer::entry_of;
use programmer::ztunnel_socket::take_listener;
use programmer::{KernelMaps, Loaded, LoaderConfig, Programmer, ProgrammerConfig};
use resolver::{Capture, Enrolment, Role, Update};
use testkit::ztunnel::{self, Accepted, ClientOptions, FakeZtunnel, Listener, Outcome};
use testkit::{BpfFs, NetNs, TestCgroup};
use watcher::CgroupId;

const EPERM: i32 = 1;
const ECONNREFUSED: i32 = 111;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// `a` with IPv4-mapped addresses shown as IPv4 (a dual-stack listener reports them mapped).
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// One pod: its cgroup, its namespace (veth to the node: pod side `.2`, node side `.1`), and
/// the fake in-pod ztunnel listening in it.
struct Pod {
    path: String,
    ns: NetNs,
    v4: IpAddr,
    v6: IpAddr,
    ztunnel: FakeZtunnel,
}

/// Two pods, a node namespace, the programs attached to `T/attach` (pods and ztunnel below,
/// `T/outside` not), and a programmer on the pinned maps.
struct World {
    pods: Vec<Pod>,
    node: NetNs,
    ztunnel_path: String,
    outside: String,
    programmer: Programmer<KernelMaps>,
    inpod: InPodCapture,
    loaded: Loaded,
    _fs: BpfFs,
    cg: TestCgroup,
}

impl World {
    /// `upstream`: the fake ztunnels connect on to each original destination (binding the
    /// client's address, as ztunnel does), for inbound; outbound destinations do not exist here.
    fn new(prefix: &str, dns: [bool; 2], upstream: bool) -> World {
        let cg = TestCgroup::new(prefix).expect("test cgroup");
        let attach = cg.child("attach").unwrap();
        let ztunnel_path = cg.child("attach/ztunnel").unwrap();
        let outside = cg.child("outside").unwrap();
        let fs = common::bpffs(prefix);
        let loaded = Loaded::load_and_attach(LoaderConfig::new(fs.pin_dir(), cg.dir_of(&attach)))
            .expect("load and attach");
        let node = NetNs::new(&format!("{prefix}n")).expect("node netns");
        node.ip(&["link", "set", "lo", "up"]).unwrap();
        let mut programmer =
            Programmer::new(loaded.backend().unwrap(), ProgrammerConfig::default()).unwrap();
        programmer.queue(&upsert(
            &cg,
            &ztunnel_path,
            Role::Ztunnel,
            vec![],
            Capture::Node,
        ));
        let mut inpod = InPodCapture::open(loaded.pin_dir()).expect("in-pod capture");
        let mut pods = Vec::new();
        for (i, dns) in dns.into_iter().enumerate() {
            let n = i + 1;
            let path = cg.child(&format!("attach/pods/p{n}")).unwrap();
            let ns = NetNs::new(&format!("{prefix}{n}")).expect("pod netns");
            let (here, there) = (
                format!("zbn{n}{}", std::process::id() % 100000),
                format!("eth{n}"),
            );
            node.veth(&here, &ns, &there).expect("veth");
            node.addr(&here, &format!("10.88.{n}.1/24")).unwrap();
            // A second address on the node side: another pod's, not the node's own.
            node.addr(&here, &format!("10.88.{n}.3/24")).unwrap();
            node.addr(&here, &format!("fd00:88:{n}::1/64")).unwrap();
            ns.addr(&there, &format!("10.88.{n}.2/24")).unwrap();
            ns.addr(&there, &format!("fd00:88:{n}::2/64")).unwrap();
            ns.ip(&["link", "set", "lo", "up"]).unwrap();
            ns.route("default", &format!("10.88.{n}.1")).unwrap();
            let (v4, v6) = (ip(&format!("10.88.{n}.2")), ip(&format!("fd00:88:{n}::2")));
            let ztunnel = FakeZtunnel::start(&ns, &cg, &ztunnel_path, &[ip("::")], upstream)
                .expect("fake in-pod ztunnel");
            // As the agent does once ztunnel acked the pod: its namespace's capture first (with
            // ztunnel's 15006 listener there), then its cgroup entry.
            let enrolment = upsert(
                &cg,
                &path,
                Role::Ambient,
                vec![v4, v6],
                Capture::InPod { dns },
            );
            let Update::Upsert(entry) = &enrolment else {
                unreachable!()
            };
            let netns = ns.file().unwrap();
            let listener = take_listener(
                ztunnel.listener.pid() as i32,
                netns.metadata().unwrap().ino(),
                15006,
            )
            .unwrap()
            .expect("ztunnel's 15006 listener in the pod");
            inpod
                .enrol(
                    &format!("uid-{n}"),
                    netns.as_fd(),
                    &listener,
                    entry_of(entry),
                )
                .unwrap();
            programmer.queue(&enrolment);
            pods.push(Pod {
                path,
                ns,
                v4,
                v6,
                ztunnel,
            });
        }
        programmer.flush().unwrap();
        inpod
            .set_node_addrs(&[
                ip("10.88.1.1"),
                ip("fd00:88:1::1"),
                ip("10.88.2.1"),
                ip("fd00:88:2::1"),
            ])
            .unwrap();
        World {
            pods,
            node,
            ztunnel_path,
            outside,
            programmer,
            inpod,
            loaded,
            _fs: fs,
            cg,
        }
    }

    /// One connection from pod `i` to `to`.
    fn connect(&self, i: usize, to: &str) -> Outcome {
        let pod = &self.pods[i];
        ztunnel::connect_once(&pod.ns, &self.cg, &pod.path, sa(to)).expect("client")
    }

    /// What pod `i`'s ztunnel accepted next.
    fn accepted(&self, i: usize) -> Accepted {
        self.pods[i]
            .ztunnel
            .next(Duration::from_secs(5))
            .expect("pod's ztunnel accepted a connection")
    }
}

fn upsert(cg: &TestCgroup, path: &str, role: Role, ips: Vec<IpAddr>, capture: Capture) -> Update {
    Update::Upsert(Arc::new(Enrolment {
        cgroup_id: CgroupId(cg.id_of(path).unwrap()),
        cgroup: path.to_string().into(),
        pod: Some(format!("test/{path}")),
        role,
        ips,
        capture,
        identity: None,
    }))
}

#[test]
fn outbound_lands_on_the_pods_own_listener_with_its_original_destination() {
    if !testkit::require_root(
        "outbound_lands_on_the_pods_own_listener_with_its_original_destination",
    ) {
        return;
    }
    let world = World::new("inpod-out", [false, false], false);
    for (i, pod) in world.pods.iter().enumerate() {
        // IPv4: to 15001 on a loopback address of 127.1.0.0/16 in the pod's own namespace
        // (picked by the destination), from the pod's address.
        let out = world.connect(i, "10.96.0.10:80");
        let Outcome::Ok { local, peer } = out else {
            panic!("pod {i}: v4 connect failed: {out:?}")
        };
        assert!(in_pod_outbound(peer), "pod {i}: {peer}");
        assert_eq!(local.ip(), pod.v4, "pod {i}: from its own address");
        let got = world.accepted(i);
        assert_eq!(canonical(got.local), peer);
        assert_eq!(canonical(got.peer), local, "pod {i}");
        assert_eq!(got.orig, Some(Ok(sa("10.96.0.10:80"))), "pod {i}");

        // IPv6: to [::1]:15001, from the pod's IPv6 address.
        let out = world.connect(i, "[fd00:96::10]:443");
        let Outcome::Ok { local, peer } = out else {
            panic!("pod {i}: v6 connect failed: {out:?}")
        };
        assert_eq!(peer, sa("[::1]:15001"), "pod {i}");
        assert_eq!(local.ip(), pod.v6, "pod {i}");
        let got = world.accepted(i);
        assert_eq!(got.peer, local, "pod {i}");
        assert_eq!(got.orig, Some(Ok(sa("[fd00:96::10]:443"))), "pod {i}");
    }
    // Nothing crossed to the other pod's ztunnel.
    for pod in &world.pods {
        assert!(pod.ztunnel.drain().is_empty());
    }
    // Each destination has a loopback address (and so a 4-tuple space) of its own, the same
    // one every time: 100 destinations, each connected twice.
    let mut by_destination = std::collections::BTreeMap::new();
    for round in 0..2 {
        for n in 1..=100u8 {
            let dst = format!("10.97.0.{n}:80");
            let Outcome::Ok { peer, .. } = world.connect(0, &dst) else {
                panic!("{dst}: not captured")
            };
            assert!(in_pod_outbound(peer), "{dst}: {peer}");
            assert_eq!(world.accepted(0).orig, Some(Ok(sa(&dst))));
            let first = *by_destination.entry(dst.clone()).or_insert(peer.ip());
            assert_eq!(first, peer.ip(), "{dst}: round {round} went elsewhere");
        }
    }
    let addresses: std::collections::BTreeSet<_> = by_destination.values().collect();
    assert!(
        addresses.len() >= 90,
        "only {} addresses for 100 destinations",
        addresses.len()
    );
}

/// Where an in-pod IPv4 connect goes: ztunnel's 15001 on an address of 127.1.0.0/16.
fn in_pod_outbound(peer: SocketAddr) -> bool {
    matches!(peer.ip(), IpAddr::V4(v4) if v4.octets()[..2] == [127, 1]) && peer.port() == 15001
}

#[test]
fn two_pods_connecting_from_the_same_source_port_get_their_own_destinations() {
    if !testkit::require_root(
        "two_pods_connecting_from_the_same_source_port_get_their_own_destinations",
    ) {
        return;
    }
    let world = World::new("inpod-port", [false, false], false);
    // Both bind 0.0.0.0:40123 themselves (the programs cannot move such a socket to the pod's
    // address): both connections are 127.0.0.1:40123 → 127.1.x.y:15001, each in its own
    // namespace; and then both bind their own address with one port.
    for (round, bind) in [(0, None), (1, Some(()))] {
        let dsts = ["10.96.0.10:80", "10.96.7.7:8080"];
        for (i, pod) in world.pods.iter().enumerate() {
            let source = match bind {
                None => sa("0.0.0.0:40123"),
                Some(()) => SocketAddr::new(pod.v4, 40124),
            };
            let outcomes = ztunnel::connect(
                &pod.ns,
                &world.cg,
                &pod.path,
                &[sa(dsts[i])],
                &ClientOptions {
                    count: 1,
                    bind_addrs: vec![source],
                    rst: true,
                    ..ClientOptions::default()
                },
            )
            .unwrap();
            assert!(
                matches!(outcomes[..], [Outcome::Ok { local, .. }] if local.port() == source.port()),
                "round {round} pod {i}: {outcomes:?}"
            );
        }
        for (i, dst) in dsts.iter().enumerate() {
            let got = world.accepted(i);
            assert_eq!(got.peer.port(), if round == 0 { 40123 } else { 40124 });
            assert_eq!(got.orig, Some(Ok(sa(dst))), "round {round} pod {i}");
        }
    }
}

#[test]
fn connects_straight_to_ztunnels_capture_ports_are_refused_and_loopback_passes() {
    if !testkit::require_root(
        "connects_straight_to_ztunnels_capture_ports_are_refused_and_loopback_passes",
    ) {
        return;
    }
    let world = World::new("inpod-loop", [false, false], false);
    let other_pod = world.pods[1].v4;
    for to in [
        "127.0.0.1:15001".to_string(),
        "127.0.0.1:15006".to_string(),
        "[::1]:15001".to_string(),
        format!("{}:15001", world.pods[0].v4),
        format!("{other_pod}:15006"),
        "10.96.0.10:15001".to_string(),
    ] {
        let out = world.connect(0, &to);
        assert_eq!(out.errno(), Some(EPERM), "{to}: {out:?}");
    }
    // Loopback and the pod's own address on other ports: not captured (nothing listens).
    for to in [
        "127.0.0.1:8080".to_string(),
        format!("{}:8080", world.pods[0].v4),
    ] {
        let out = world.connect(0, &to);
        assert_eq!(out.errno(), Some(ECONNREFUSED), "{to}: {out:?}");
    }
    // HBONE on the pod's own address is ztunnel's, reached directly.
    let out = world.connect(0, &format!("{}:15008", world.pods[0].v4));
    assert!(matches!(out, Outcome::Ok { .. }), "{out:?}");
    assert_eq!(world.accepted(0).local.port(), 15008);
    let counters = world.loaded.counters().unwrap();
    assert_eq!(counters.refused_loop, 6, "{counters:?}");
}

#[test]
fn dns_goes_to_ztunnels_15053_and_replies_come_from_the_server_asked() {
    if !testkit::require_root("dns_goes_to_ztunnels_15053_and_replies_come_from_the_server_asked") {
        return;
    }
    // Pod 0 has DNS capture, pod 1 not.
    let world = World::new("inpod-dns", [true, false], false);
    let dns: Vec<_> = world
        .pods
        .iter()
        .map(|pod| {
            ztunnel::udp_echo(
                &pod.ns,
                &world.cg,
                &world.ztunnel_path,
                &[sa("127.0.0.1:15053"), sa("[::1]:15053")],
            )
            .expect("ztunnel's DNS proxy")
        })
        .collect();
    let tcp_dns = ztunnel::service(
        &world.pods[0].ns,
        &world.cg,
        &world.ztunnel_path,
        &[sa("127.0.0.1:15053")],
    )
    .unwrap();
    let pod = &world.pods[0];
    for (server, proxy, connected) in [
        ("10.96.0.10:53", "127.0.0.1:15053", false),
        ("10.96.0.10:53", "127.0.0.1:15053", true),
        ("[fd00:96::10]:53", "[::1]:15053", false),
        ("[fd00:96::10]:53", "[::1]:15053", true),
    ] {
        let out = ztunnel::udp_ask(&pod.ns, &world.cg, &pod.path, sa(server), connected).unwrap();
        let Outcome::Ok { peer, local } = out else {
            panic!("{server} (connected: {connected}): {out:?}")
        };
        assert_eq!(peer, sa(server), "the reply is shown from the server asked");
        let line = dns[0]
            .line(Duration::from_secs(5))
            .expect("the proxy got the query");
        assert!(line.starts_with(&format!("udp local={proxy} ")), "{line}");
        assert!(line.ends_with(&format!(":{}", local.port())), "{line}");
    }
    // TCP DNS too.
    let out = world.connect(0, "10.96.0.10:53");
    assert!(
        matches!(out, Outcome::Ok { peer, .. } if peer == sa("127.0.0.1:15053")),
        "{out:?}"
    );
    let got = tcp_dns
        .next(Duration::from_secs(5))
        .expect("TCP DNS at 15053");
    assert_eq!(canonical(got.local), sa("127.0.0.1:15053"));
    // Without DNS capture the query goes to the server itself (which does not exist here).
    let out = ztunnel::udp_ask(
        &world.pods[1].ns,
        &world.cg,
        &world.pods[1].path,
        sa("10.96.0.10:53"),
        false,
    )
    .unwrap();
    assert!(matches!(out, Outcome::Err { .. }), "{out:?}");
    assert!(
        dns[1].line(Duration::from_millis(300)).is_none(),
        "pod 1's proxy got nothing"
    );
    assert_eq!(world.loaded.counters().unwrap().redirected_dns, 5);
}

#[test]
fn inbound_goes_to_ztunnels_15006_which_learns_the_destination_and_reaches_the_app() {
    if !testkit::require_root(
        "inbound_goes_to_ztunnels_15006_which_learns_the_destination_and_reaches_the_app",
    ) {
        return;
    }
    let mut world = World::new("inpod-in", [false, false], true);
    let pod = &world.pods[0];
    let app: Listener =
        ztunnel::service(&pod.ns, &world.cg, &pod.path, &[sa("[::]:8080")]).unwrap();

    // From another pod's address (not the node's): ztunnel's 15006, which asks the original
    // destination, is answered the pod's address and port, and connects on to the app from
    // the pod's own address (its bind of the client's address moved there).
    let client = |src: &str, to: &str| {
        ztunnel::connect(
            &world.node,
            &world.cg,
            &world.outside,
            &[sa(to)],
            &ClientOptions {
                count: 1,
                bind: Some(ip(src)),
                ..ClientOptions::default()
            },
        )
        .unwrap()
    };
    let out = client("10.88.1.3", "10.88.1.2:8080");
    assert!(matches!(out[..], [Outcome::Ok { .. }]), "{out:?}");
    let got = world.accepted(0);
    assert_eq!(canonical(got.local), sa("10.88.1.2:8080"));
    assert_eq!(canonical(got.peer).ip(), ip("10.88.1.3"));
    assert_eq!(
        got.orig.map(|o| o.map(canonical)),
        Some(Ok(sa("10.88.1.2:8080")))
    );
    assert_eq!(
        got.upstream.map(|u| u.map(|a| canonical(a).ip())),
        Some(Ok(pod.v4)),
        "ztunnel's upstream socket bound the pod's address, not the client's"
    );
    let at_app = app
        .next(Duration::from_secs(5))
        .expect("ztunnel reached the app");
    assert_eq!(canonical(at_app.peer).ip(), pod.v4);

    // HBONE: to 15008 directly. From the node's address: to the app directly.
    let out = client("10.88.1.3", "10.88.1.2:15008");
    assert!(matches!(out[..], [Outcome::Ok { .. }]), "{out:?}");
    assert_eq!(world.accepted(0).local.port(), 15008);
    let out = client("10.88.1.1", "10.88.1.2:8080");
    assert!(matches!(out[..], [Outcome::Ok { .. }]), "{out:?}");
    let direct = app
        .next(Duration::from_secs(5))
        .expect("the node reaches the app");
    assert_eq!(canonical(direct.peer).ip(), ip("10.88.1.1"));
    assert!(
        pod.ztunnel.drain().is_empty(),
        "nothing more reached ztunnel"
    );

    let counters = world.loaded.counters().unwrap();
    assert_eq!(counters.orig_dst_local, 1, "{counters:?}");
    assert_eq!(counters.bind_rewritten, 1, "{counters:?}");

    // Released: inbound reaches the app directly again.
    world.inpod.remove("uid-1").unwrap();
    let out = client("10.88.1.3", "10.88.1.2:8080");
    assert!(matches!(out[..], [Outcome::Ok { .. }]), "{out:?}");
    assert!(app.next(Duration::from_secs(5)).is_some());
    let _ = &world.programmer;
}

#[test]
fn inbound_capture_outlives_the_agent_and_a_new_one_keeps_only_the_pods_acked_again() {
    if !testkit::require_root(
        "inbound_capture_outlives_the_agent_and_a_new_one_keeps_only_the_pods_acked_again",
    ) {
        return;
    }
    let mut world = World::new("inpod-restart", [false, false], false);
    let apps: Vec<Listener> = world
        .pods
        .iter()
        .map(|pod| ztunnel::service(&pod.ns, &world.cg, &pod.path, &[sa("[::]:8080")]).unwrap())
        .collect();
    let inbound = |world: &World, n: usize| {
        let out = ztunnel::connect(
            &world.node,
            &world.cg,
            &world.outside,
            &[sa(&format!("10.88.{n}.2:8080"))],
            &ClientOptions {
                count: 1,
                bind: Some(ip(&format!("10.88.{n}.3"))),
                ..ClientOptions::default()
            },
        )
        .unwrap();
        assert!(matches!(out[..], [Outcome::Ok { .. }]), "{out:?}");
    };

    // The agent stops: its in-pod state is dropped, the pins stay.
    let pin_dir = world.loaded.pin_dir().to_path_buf();
    drop(std::mem::replace(
        &mut world.inpod,
        InPodCapture::open(&pin_dir).expect("reopen"),
    ));
    inbound(&world, 1);
    let got = world.accepted(0);
    assert_eq!(canonical(got.local), sa("10.88.1.2:8080"), "still captured");

    // The new agent (world.inpod now) finds both pods; ztunnel acks pod 1 again, pod 2 is
    // gone.
    assert_eq!(world.inpod.pods(), ["uid-1", "uid-2"]);
    let pod = &world.pods[0];
    let netns = pod.ns.file().unwrap();
    let listener = take_listener(
        pod.ztunnel.listener.pid() as i32,
        netns.metadata().unwrap().ino(),
        15006,
    )
    .unwrap()
    .unwrap();
    let Update::Upsert(enrolment) = upsert(
        &world.cg,
        &pod.path,
        Role::Ambient,
        vec![pod.v4, pod.v6],
        Capture::InPod { dns: false },
    ) else {
        unreachable!()
    };
    world
        .inpod
        .enrol("uid-1", netns.as_fd(), &listener, entry_of(&enrolment))
        .unwrap();
    world
        .inpod
        .retain(&["uid-1".to_string()].into_iter().collect())
        .unwrap();
    assert_eq!(world.inpod.pods(), ["uid-1"]);

    inbound(&world, 1);
    assert_eq!(canonical(world.accepted(0).local), sa("10.88.1.2:8080"));
    inbound(&world, 2);
    let at_app = apps[1]
        .next(Duration::from_secs(5))
        .expect("pod 2 released");
    assert_eq!(canonical(at_app.local), sa("10.88.2.2:8080"));
    assert!(world.pods[1].ztunnel.drain().is_empty());
}
