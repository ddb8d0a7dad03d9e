//! `orig_dst_by_tuple` on a real kernel: the LRU hash sock_ops stores each redirected
//! connection's original destination in and getsockopt takes it from, deleting it once
//! answered (bpf/tuple_map.h). Each test builds its own cgroup, bpffs and network namespace: a
//! "pod" whose connects to a service address go to a fake ztunnel on loopback, which asks
//! `SO_ORIGINAL_DST` as ztunnel does (at once, or only after holding N connections, so that
//! records pile up), or a plain listener in ztunnel's place that never asks.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use common::{bpffs, config};
use programmer::layout::{self, CgroupInfo};
use programmer::{Loaded, MapBackend, MapBatch};
use testkit::ztunnel::{self, Accepted, ClientOptions, Listener, Questions};
use testkit::{BpfFs, NetNs, TestCgroup};
use watcher::CgroupId;

/// The services the pod connects to.
const SERVICE: &str = "10.200.0.99:80";
const OTHER_SERVICE: &str = "10.200.0.98:81";
const SERVICE6: &str = "[fd00:200::99]:80";

/// ztunnel's outbound capture socket, in the test's namespace.
fn ztunnel_addr() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ztunnel::OUTBOUND)
}

/// ztunnel's outbound capture socket on every address of both families (dual stack), as
/// ztunnel binds it when IPv6 is on: IPv4 connections are accepted on IPv6 sockets there,
/// their addresses IPv4-mapped.
fn ztunnel_dual_stack() -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), ztunnel::OUTBOUND)
}

/// A pod cgroup enrolled as ambient and a ztunnel cgroup, both under the attach cgroup, in a
/// namespace of their own (loopback only), with ztunnel on 127.0.0.1 and ::1.
struct Setup {
    cg: TestCgroup,
    _fs: BpfFs,
    ns: NetNs,
    loaded: Loaded,
    pod: String,
    zt: String,
}

impl Setup {
    fn new(prefix: &str) -> Setup {
        let cg = TestCgroup::new(prefix).unwrap();
        let fs = bpffs(prefix);
        let ns = NetNs::new(prefix).unwrap();
        let loaded = Loaded::load_and_attach(config(&fs, &cg)).unwrap();
        let pod = cg.child("pod").unwrap();
        let zt = cg.child("ztunnel").unwrap();
        let mut backend = loaded.backend().unwrap();
        let mut settings = backend.settings().unwrap();
        settings.set_ztunnel_ips(&[
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]);
        settings.outbound_port = ztunnel::OUTBOUND;
        settings.inbound_port = ztunnel::INBOUND;
        settings.levels = 1 << 2;
        let info = |flags| CgroupInfo {
            flags,
            addr4: u32::from(Ipv4Addr::new(10, 200, 0, 5)).to_be(),
            addr6: [0; 16],
        };
        backend
            .apply(&MapBatch {
                cgroup_upserts: vec![
                    (
                        CgroupId(cg.id_of(&pod).unwrap()),
                        info(layout::F_AMBIENT | layout::F_HAS_V4),
                    ),
                    (CgroupId(cg.id_of(&zt).unwrap()), info(layout::F_ZTUNNEL)),
                ],
                settings: Some(settings),
                ..MapBatch::default()
            })
            .unwrap();
        Setup {
            cg,
            _fs: fs,
            ns,
            loaded,
            pod,
            zt,
        }
    }

    /// Runs the pod's client; every connect must succeed.
    fn connect(&self, to: &[SocketAddr], options: ClientOptions) {
        let outcomes =
            ztunnel::connect(&self.ns, &self.cg, &self.pod, to, &options).expect("client");
        assert_eq!(outcomes.len() as u64, options.count);
        for o in &outcomes {
            assert!(o.errno().is_none(), "{o:?}");
        }
    }

    /// A fake ztunnel on 127.0.0.1 that asks `SO_ORIGINAL_DST` for each connection at once.
    fn fake_ztunnel(&self) -> ztunnel::FakeZtunnel {
        ztunnel::FakeZtunnel::start(
            &self.ns,
            &self.cg,
            &self.zt,
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            false,
        )
        .unwrap()
    }

    /// A fake ztunnel on `listen` that holds `n` connections before it asks
    /// ([`ztunnel::deferred_ztunnel`]), so that records pile up.
    fn deferred_ztunnel(&self, listen: SocketAddr, n: usize, questions: Questions) -> Listener {
        ztunnel::deferred_ztunnel(&self.ns, &self.cg, &self.zt, listen, n, questions).unwrap()
    }

    /// `n` connections of the pod, alternately to the IPv4 and the IPv6 service, through a
    /// dual-stack ztunnel that asks as `questions` says: what it accepted.
    fn dual_stack_round(&self, n: usize, questions: Questions) -> Vec<Accepted> {
        let zt = self.deferred_ztunnel(ztunnel_dual_stack(), n, questions);
        self.connect(
            &[addr(SERVICE), addr(SERVICE6)],
            ClientOptions {
                count: n as u64,
                no_echo: true,
                ..ClientOptions::default()
            },
        );
        accepted(&zt, n)
    }

    /// A listener in ztunnel's place on 127.0.0.1 that never asks `SO_ORIGINAL_DST`: the
    /// records of its connections stay in the map.
    fn silent_ztunnel(&self) -> Listener {
        ztunnel::service(&self.ns, &self.cg, &self.zt, &[ztunnel_addr()]).unwrap()
    }

    /// The map's records as (client, original destination).
    fn records(&self) -> BTreeSet<(SocketAddr, SocketAddr)> {
        programmer::read_tuple_records(self.loaded.pin_dir())
            .unwrap()
            .iter()
            .map(|r| (r.client(), r.orig_dst()))
            .collect()
    }
}

/// Everything `listener` reports, until `n` connections (or 10 s of silence).
fn accepted(listener: &Listener, n: usize) -> Vec<Accepted> {
    let all: Vec<Accepted> = std::iter::from_fn(|| listener.next(Duration::from_secs(10)))
        .take(n)
        .collect();
    assert_eq!(all.len(), n, "accepted {all:?}");
    all
}

/// An accepted connection's client as the map keys it (an IPv4 client of a dual-stack
/// socket is reported IPv4-mapped).
fn client(a: &Accepted) -> SocketAddr {
    SocketAddr::new(a.peer.ip().to_canonical(), a.peer.port())
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// ztunnel asks `SO_ORIGINAL_DST` at `SOL_IP` first and, when that fails,
/// `IP6T_SO_ORIGINAL_DST` at `SOL_IPV6` (ztunnel's `orig_dst_addr`), whatever the family of
/// the connection. The `SOL_IP` question takes an IPv4 connection's record and must leave
/// an IPv6 connection's for the second question: deleted, or answered with it, the IPv6
/// connection would be lost.
#[test]
fn the_sol_ip_question_takes_an_ipv4_record_and_leaves_an_ipv6_one_for_sol_ipv6() {
    if !testkit::require_root(
        "the_sol_ip_question_takes_an_ipv4_record_and_leaves_an_ipv6_one_for_sol_ipv6",
    ) {
        return;
    }
    let s = Setup::new("tuple-sol-ip");
    // Asks only the first question, of both connections once both are held.
    let answers = s.dual_stack_round(2, Questions::SolIpOnly);
    let (v4, v6) = (&answers[0], &answers[1]);
    assert!(client(v4).is_ipv4() && client(v6).is_ipv6(), "{answers:?}");
    assert_eq!(v4.orig, Some(Ok(addr(SERVICE))), "{v4:?}");
    // Not the IPv4 question's: the kernel's own answer (no conntrack entry) stands.
    assert!(matches!(v6.orig, Some(Err(_))), "{v6:?}");
    // The IPv4 record answered and gone; the IPv6 one waiting, unchanged.
    assert_eq!(s.records(), BTreeSet::from([(client(v6), addr(SERVICE6))]));
    let c = s.loaded.counters().unwrap();
    assert_eq!((c.orig_dst_hit, c.orig_dst_miss), (1, 0), "{c:?}");
}

/// Both questions, as ztunnel asks them, on a dual-stack listener: each connection gets its
/// own destination at the question of its family, no question misses, and nothing is left
/// in the map.
#[test]
fn ztunnels_two_questions_answer_each_family_and_leave_no_record() {
    if !testkit::require_root("ztunnels_two_questions_answer_each_family_and_leave_no_record") {
        return;
    }
    const N: usize = 20;
    let s = Setup::new("tuple-two-questions");
    for a in s.dual_stack_round(N, Questions::AsZtunnel) {
        let want = if client(&a).is_ipv4() {
            SERVICE
        } else {
            SERVICE6
        };
        assert_eq!(a.orig, Some(Ok(addr(want))), "{a:?}");
    }
    assert_eq!(s.records(), BTreeSet::new());
    let c = s.loaded.counters().unwrap();
    assert_eq!((c.orig_dst_hit, c.orig_dst_miss), (N as u64, 0), "{c:?}");
}

/// A connection whose record is gone (answered already here; evicted or never stored alike)
/// counts one `orig_dst_miss`, not one per question: ztunnel asks both questions about it,
/// whatever its family.
#[test]
fn a_connection_with_no_record_counts_one_miss_for_both_questions() {
    if !testkit::require_root("a_connection_with_no_record_counts_one_miss_for_both_questions") {
        return;
    }
    const N: usize = 10;
    let s = Setup::new("tuple-one-miss");
    let answers = s.dual_stack_round(N, Questions::AsZtunnelTwice);
    let v6 = answers.iter().filter(|a| client(a).is_ipv6()).count();
    assert_eq!((N - v6, v6), (N / 2, N / 2), "{answers:?}");
    for a in &answers {
        assert!(matches!(a.orig, Some(Ok(_))), "{a:?}");
    }
    let c = s.loaded.counters().unwrap();
    // The first round answered every connection; the second found nothing, once each.
    assert_eq!(
        (c.orig_dst_hit, c.orig_dst_miss),
        (N as u64, N as u64),
        "{c:?}"
    );
    assert_eq!(s.records(), BTreeSet::new());
}

/// Connections nobody asks about keep their records; answered ones are deleted. First a
/// listener in ztunnel's place that never asks (a client that gave up, a ztunnel that
/// dropped the connection), then a ztunnel that asks: the map holds exactly the first
/// connections' records, each with its own destination, before and after.
#[test]
fn the_map_holds_exactly_the_records_of_connections_not_asked_about() {
    if !testkit::require_root("the_map_holds_exactly_the_records_of_connections_not_asked_about") {
        return;
    }
    const N: u64 = 10;
    let s = Setup::new("tuple-unasked");
    let services = [addr(SERVICE), addr(OTHER_SERVICE)];
    let silent = s.silent_ztunnel();
    s.connect(
        &services,
        ClientOptions {
            count: N,
            ..ClientOptions::default()
        },
    );
    // The client connects round-robin over `services`, one at a time, in accept order.
    let unasked: BTreeSet<(SocketAddr, SocketAddr)> = accepted(&silent, N as usize)
        .iter()
        .zip(services.iter().cycle())
        .map(|(a, service)| (client(a), *service))
        .collect();
    assert_eq!(unasked.len(), N as usize);
    assert_eq!(s.records(), unasked);
    drop(silent);

    let zt = s.fake_ztunnel();
    s.connect(
        &services,
        ClientOptions {
            count: N,
            ..ClientOptions::default()
        },
    );
    for (a, service) in accepted(&zt.listener, N as usize)
        .iter()
        .zip(services.iter().cycle())
    {
        assert_eq!(a.orig, Some(Ok(*service)), "{a:?}");
    }
    assert_eq!(s.records(), unasked);
    let c = s.loaded.counters().unwrap();
    assert_eq!((c.orig_dst_hit, c.orig_dst_miss), (N, 0), "{c:?}");
    assert_eq!(c.orig_dst_not_stored, 0, "{c:?}");
}

/// A client that reuses its 4-tuple (same source address and port, closed with a reset so
/// that the tuple is free at once) for another destination: the new connection's ztunnel
/// gets the new destination, whether the first connection's record was answered (deleted)
/// or is still waiting (replaced).
#[test]
fn a_connection_reusing_a_4_tuple_gets_its_own_original_destination() {
    if !testkit::require_root("a_connection_reusing_a_4_tuple_gets_its_own_original_destination") {
        return;
    }
    let s = Setup::new("tuple-reuse");
    let src: SocketAddr = "127.0.0.3:41000".parse().unwrap();
    let services: [SocketAddr; 2] = [addr(SERVICE), addr(OTHER_SERVICE)];
    let from_src = |count| ClientOptions {
        count,
        bind_addrs: vec![src],
        rst: true,
        ..ClientOptions::default()
    };

    // Answered in between: each connection gets its own.
    let zt = s.fake_ztunnel();
    s.connect(&services, from_src(2));
    let answers = accepted(&zt.listener, 2);
    assert_eq!((answers[0].peer, answers[1].peer), (src, src));
    assert_eq!(answers[0].orig, Some(Ok(services[0])));
    assert_eq!(answers[1].orig, Some(Ok(services[1])));
    assert_eq!(s.records(), BTreeSet::new());
    drop(zt);

    // Never asked about: the first connection's record still waits when the tuple comes
    // again.
    let silent = s.silent_ztunnel();
    s.connect(&services[..1], from_src(1));
    assert_eq!(accepted(&silent, 1)[0].peer, src);
    assert_eq!(s.records(), BTreeSet::from([(src, services[0])]));
    drop(silent);
    let zt = s.fake_ztunnel();
    s.connect(&services[1..], from_src(1));
    let answer = accepted(&zt.listener, 1).remove(0);
    assert_eq!(answer.peer, src);
    assert_eq!(answer.orig, Some(Ok(services[1])), "{answer:?}");
    assert_eq!(s.records(), BTreeSet::new());
    let c = s.loaded.counters().unwrap();
    assert_eq!((c.orig_dst_hit, c.orig_dst_miss), (3, 0), "{c:?}");
}

/// More records waiting at once than a burst of connects on a busy node leaves: ztunnel holds
/// them all before it asks; each is answered with its own destination and none is left.
#[test]
fn many_waiting_records_are_all_answered_and_deleted() {
    if !testkit::require_root("many_waiting_records_are_all_answered_and_deleted") {
        return;
    }
    const N: usize = 2048;
    let s = Setup::new("tuple-many");
    let services = [addr(SERVICE), addr(OTHER_SERVICE)];
    let zt = s.deferred_ztunnel(ztunnel_addr(), N, Questions::AsZtunnel);
    s.connect(
        &services,
        ClientOptions {
            count: N as u64,
            no_echo: true,
            ..ClientOptions::default()
        },
    );
    for (a, service) in accepted(&zt, N).iter().zip(services.iter().cycle()) {
        assert_eq!(a.orig, Some(Ok(*service)), "{a:?}");
    }
    assert_eq!(s.records(), BTreeSet::new());
    let c = s.loaded.counters().unwrap();
    assert_eq!((c.orig_dst_hit, c.orig_dst_miss), (N as u64, 0), "{c:?}");
}

/// Four clients at once, on both CPUs, each from its own source address to its own service,
/// while ztunnel asks for every connection: stores and deletes on both CPUs at once (the
/// LRU's free lists are per CPU) must give each connection its own destination and lose
/// none.
#[test]
fn concurrent_clients_each_get_their_own_original_destination() {
    if !testkit::require_root("concurrent_clients_each_get_their_own_original_destination") {
        return;
    }
    const CLIENTS: u8 = 4;
    const EACH: u64 = 500;
    let s = Setup::new("tuple-concurrent");
    let zt = s.fake_ztunnel();
    // Client i binds 127.0.0.(10+i) and connects to 10.200.1.(10+i):80.
    let source = |i: u8| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + i));
    let service = |i: u8| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 200, 1, 10 + i)), 80);
    std::thread::scope(|scope| {
        for i in 0..CLIENTS {
            let s = &s;
            scope.spawn(move || {
                s.connect(
                    &[service(i)],
                    ClientOptions {
                        count: EACH,
                        bind: Some(source(i)),
                        ..ClientOptions::default()
                    },
                )
            });
        }
    });
    let answers = accepted(&zt.listener, CLIENTS as usize * EACH as usize);
    let want: HashMap<IpAddr, SocketAddr> = (0..CLIENTS).map(|i| (source(i), service(i))).collect();
    let mut wrong = Vec::new();
    let mut missed = 0u64;
    for a in &answers {
        match &a.orig {
            Some(Ok(orig)) if *orig == want[&a.peer.ip()] => {}
            Some(Err(_)) => missed += 1,
            _ => wrong.push(a.clone()),
        }
    }
    assert!(
        wrong.is_empty(),
        "connections given another's destination: {wrong:?}"
    );
    let c = s.loaded.counters().unwrap();
    assert_eq!(missed, 0, "{c:?}");
    assert_eq!(c.orig_dst_hit, CLIENTS as u64 * EACH, "{c:?}");
    assert_eq!((c.orig_dst_miss, c.orig_dst_not_stored), (0, 0), "{c:?}");
    assert_eq!(s.records(), BTreeSet::new());
}
