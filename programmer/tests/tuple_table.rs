//! `orig_dst_by_tuple` on a real kernel: the set-associative table sock_ops writes and
//! getsockopt reads (bpf/zbridge.h). Each test builds its own cgroup, bpffs and network
//! namespace: a "pod" whose connects to a service address go to a fake ztunnel on 127.0.0.1,
//! which asks `SO_ORIGINAL_DST` as ztunnel does (at once, or only after holding N
//! connections, so that records pile up).

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use common::{bpffs, config};
use programmer::layout::{self, CgroupInfo, ConnTuple};
use programmer::{Loaded, MapBackend, MapBatch, TupleRecord};
use testkit::ztunnel::{self, Accepted, ClientOptions, Listener, Questions};
use testkit::{BpfFs, NetNs, TestCgroup};
use watcher::CgroupId;

/// The service the pod connects to, and the second one of the reused-tuple test.
const SERVICE: &str = "10.200.0.99:80";
const OTHER_SERVICE: &str = "10.200.0.98:81";

/// ztunnel's outbound capture socket, in the test's namespace.
fn ztunnel_addr() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ztunnel::OUTBOUND)
}

/// ztunnel's outbound capture socket for IPv6.
fn ztunnel_addr6() -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), ztunnel::OUTBOUND)
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

    fn records(&self) -> Vec<TupleRecord> {
        programmer::read_tuple_records(self.loaded.pin_dir()).unwrap()
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

#[test]
fn records_go_to_the_overflow_region_when_the_hot_one_is_full_and_all_are_answered() {
    if !testkit::require_root(
        "records_go_to_the_overflow_region_when_the_hot_one_is_full_and_all_are_answered",
    ) {
        return;
    }
    // Twice as many waiting records as the hot region has slots.
    const N: usize = 2 * layout::TUPLE_HOT_SETS as usize * layout::TUPLE_WAYS;
    let s = Setup::new("tuple-overflow");
    let zt = s.deferred_ztunnel(ztunnel_addr(), N, Questions::AsZtunnel);
    s.connect(
        &[SERVICE.parse().unwrap()],
        ClientOptions {
            count: N as u64,
            no_echo: true,
            ..ClientOptions::default()
        },
    );
    let answers = accepted(&zt, N);
    for a in &answers {
        assert_eq!(a.orig, Some(Ok(SERVICE.parse().unwrap())), "{a:?}");
    }
    let records = s.records();
    assert_eq!(records.len(), N);
    assert!(records.iter().all(|r| r.answered));
    let hot = records
        .iter()
        .filter(|r| r.set < layout::TUPLE_HOT_SETS)
        .count();
    // Each hot set holds the newest records of its ports (the client connects one at a
    // time, so the order of the answers is the order of the writes); the older ones moved on
    // to the overflow region as newer ones came.
    let mut per_hot_set: HashMap<u32, Vec<ConnTuple>> = HashMap::new();
    for a in &answers {
        let tuple = ConnTuple::new(a.peer, a.local);
        per_hot_set.entry(tuple.hot_set()).or_default().push(tuple);
    }
    let mut want_hot: Vec<(u32, ConnTuple)> = per_hot_set
        .iter()
        .flat_map(|(set, tuples)| {
            let newest = tuples.len().saturating_sub(layout::TUPLE_WAYS);
            tuples[newest..].iter().map(move |t| (*set, *t))
        })
        .collect();
    let mut in_hot: Vec<(u32, ConnTuple)> = records
        .iter()
        .filter(|r| r.set < layout::TUPLE_HOT_SETS)
        .map(|r| (r.set, r.tuple))
        .collect();
    let key = |x: &(u32, ConnTuple)| (x.0, x.1.src, x.1.sport);
    want_hot.sort_by_key(key);
    in_hot.sort_by_key(key);
    assert_eq!(in_hot, want_hot);
    // Every record that left the hot region sits in its own overflow set.
    for r in records.iter().filter(|r| r.set >= layout::TUPLE_HOT_SETS) {
        assert_eq!(r.set, r.tuple.overflow_set(), "{r:?}");
    }
    assert!(hot < N, "the overflow region took none");
    let c = s.loaded.counters().unwrap();
    assert_eq!(c.orig_dst_hit, N as u64);
    assert_eq!(c.orig_dst_miss, 0);
    assert_eq!(c.orig_dst_evicted, 0);
}

/// Nine source addresses and ports whose records share one hot set (their ports fall in the
/// same window of the hot region) and one overflow set (found with the Rust mirror of the
/// programs' hash).
fn colliding_sources() -> Vec<SocketAddr> {
    const WANT: usize = 2 * layout::TUPLE_WAYS + 1;
    let tuple = |src: SocketAddr| ConnTuple::new(src, ztunnel_addr());
    let hot = |port: u16| tuple(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)).hot_set();
    let candidates = (2..=255u8).flat_map(move |b| {
        (1024..=u16::MAX)
            .filter(move |port| hot(*port) == hot(30_000))
            .map(move |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 9, b)), port))
    });
    let mut count: HashMap<u32, usize> = HashMap::new();
    for src in candidates.clone() {
        let set = tuple(src).overflow_set();
        let n = count.entry(set).or_default();
        *n += 1;
        if *n == WANT {
            let found: Vec<SocketAddr> = candidates
                .filter(|s| tuple(*s).overflow_set() == set)
                .collect();
            return found[..WANT].to_vec();
        }
    }
    panic!("no {WANT} colliding sources among the candidates");
}

#[test]
fn a_full_overflow_set_gives_way_oldest_first_and_counts_it() {
    if !testkit::require_root("a_full_overflow_set_gives_way_oldest_first_and_counts_it") {
        return;
    }
    let sources = colliding_sources();
    let s = Setup::new("tuple-evict");
    let zt = s.deferred_ztunnel(ztunnel_addr(), sources.len(), Questions::AsZtunnel);
    s.connect(
        &[SERVICE.parse().unwrap()],
        ClientOptions {
            count: sources.len() as u64,
            bind_addrs: sources.clone(),
            no_echo: true,
            ..ClientOptions::default()
        },
    );
    let answers: HashMap<SocketAddr, Accepted> = accepted(&zt, sources.len())
        .into_iter()
        .map(|a| (a.peer, a))
        .collect();
    // Four records filled the hot set; each of the next four moved the oldest there to the
    // overflow set and took its place; the ninth moved the fifth connection's record to the
    // full overflow set, which gave up its oldest waiting one: the first connection's, whose
    // ztunnel then found nothing.
    let evicted = sources[0];
    for src in &sources {
        let a = &answers[src];
        if *src == evicted {
            assert!(matches!(a.orig, Some(Err(_))), "{a:?}");
        } else {
            assert_eq!(a.orig, Some(Ok(SERVICE.parse().unwrap())), "{a:?}");
        }
    }
    let c = s.loaded.counters().unwrap();
    assert_eq!(c.orig_dst_evicted, 1);
    assert_eq!(c.orig_dst_hit, sources.len() as u64 - 1);
    let records = s.records();
    assert_eq!(records.len(), 2 * layout::TUPLE_WAYS);
    assert!(!records
        .iter()
        .any(|r| r.tuple == ConnTuple::new(evicted, ztunnel_addr())));
}

#[test]
fn a_connection_reusing_a_4_tuple_gets_its_own_original_destination() {
    if !testkit::require_root("a_connection_reusing_a_4_tuple_gets_its_own_original_destination") {
        return;
    }
    let s = Setup::new("tuple-reuse");
    let zt = s.fake_ztunnel();
    // The same source twice; closed with a reset, so that the 4-tuple is free again at once.
    let src: SocketAddr = "127.0.0.3:41000".parse().unwrap();
    let services: [SocketAddr; 2] = [SERVICE.parse().unwrap(), OTHER_SERVICE.parse().unwrap()];
    s.connect(
        &services,
        ClientOptions {
            count: 2,
            bind_addrs: vec![src],
            rst: true,
            ..ClientOptions::default()
        },
    );
    let answers = accepted(&zt.listener, 2);
    assert_eq!(answers[0].peer, src);
    assert_eq!(answers[1].peer, src);
    assert_eq!(answers[0].orig, Some(Ok(services[0])));
    assert_eq!(answers[1].orig, Some(Ok(services[1])));
    // One record for the tuple: the second connection's, written over the first in place.
    let records = s.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].tuple, ConnTuple::new(src, ztunnel_addr()));
    assert_eq!(
        records[0].dst.port,
        services[1].port().to_be(),
        "{records:?}"
    );
}

/// The table has no lock: writers claim a slot and readers validate their copy with
/// compare-and-swap on the slot's sequence word (bpf/zbridge.h). Four clients at once, on
/// both CPUs, each from its own source address to its own service, while ztunnel asks for
/// every connection: a record torn between two writers, or read half written, would give some
/// connection another client's destination.
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
    // A record that could not be stored (its slots kept being claimed by other writers) is
    // counted as evicted: every miss must be one, and there are none in practice.
    assert_eq!(missed, c.orig_dst_evicted, "{c:?}");
    assert_eq!(c.orig_dst_hit + missed, CLIENTS as u64 * EACH);
    assert_eq!(missed, 0, "{c:?}");
}

/// Writes `set` as set `index` of the pinned `orig_dst_by_tuple`, as the programs would have.
fn write_set(loaded: &Loaded, index: u32, set: &layout::TupleSet) {
    let mut table: aya::maps::Array<aya::maps::MapData, layout::TupleSet> =
        programmer::pins::open_typed(loaded.pin_dir(), layout::ORIG_DST_BY_TUPLE_MAP).unwrap();
    table.set(index, set, 0).unwrap();
}

/// A record of the tuple `src` → ztunnel, to `dst`, in state `state`.
fn slot(src: SocketAddr, dst: SocketAddr, state: u32) -> layout::TupleSlot {
    layout::TupleSlot {
        seq: (1 << layout::SLOT_STATE_BITS) | state,
        tuple: ConnTuple::new(src, ztunnel_addr()),
        dst: layout::OrigDst {
            addr: layout::PodAddr::from(dst.ip()).addr,
            port: dst.port().to_be(),
            family: 2,
        },
        evictions: 0,
    }
}

#[test]
fn an_older_record_of_a_reused_tuple_is_never_answered_once_the_newer_one_moves_on() {
    if !testkit::require_root(
        "an_older_record_of_a_reused_tuple_is_never_answered_once_the_newer_one_moves_on",
    ) {
        return;
    }
    let s = Setup::new("tuple-stale");
    // Two sources on one port: one hot set. `reused` had a connection before whose record
    // ztunnel never asked for; it waits in way 1 with that connection's destination.
    let reused: SocketAddr = "127.0.9.2:40000".parse().unwrap();
    let other: SocketAddr = "127.0.9.3:40000".parse().unwrap();
    let stale: SocketAddr = "10.200.0.66:66".parse().unwrap();
    let hot = ConnTuple::new(reused, ztunnel_addr()).hot_set();
    assert_eq!(hot, ConnTuple::new(other, ztunnel_addr()).hot_set());
    let filler = |b: u8| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 9, b)), 40000);
    write_set(
        &s.loaded,
        hot,
        &layout::TupleSet {
            way: [
                // Answered: the next record of the set goes here.
                slot(filler(9), stale, layout::SLOT_ANSWERED),
                slot(reused, stale, layout::SLOT_PENDING),
                slot(filler(10), stale, layout::SLOT_PENDING),
                slot(filler(11), stale, layout::SLOT_PENDING),
            ],
        },
    );
    let zt = s.deferred_ztunnel(ztunnel_addr(), 2, Questions::AsZtunnel);
    // The tuple's new connection takes way 0 (the first free or answered one); the other
    // source's then finds every way waiting, and way 0, next in turn, moves to the overflow
    // region to make room: the new record of `reused` leaves the hot set.
    for src in [reused, other] {
        s.connect(
            &[SERVICE.parse().unwrap()],
            ClientOptions {
                count: 1,
                bind_addrs: vec![src],
                no_echo: true,
                ..ClientOptions::default()
            },
        );
    }
    let answers: HashMap<SocketAddr, Accepted> =
        accepted(&zt, 2).into_iter().map(|a| (a.peer, a)).collect();
    for src in [reused, other] {
        assert_eq!(
            answers[&src].orig,
            Some(Ok(SERVICE.parse().unwrap())),
            "{:?}",
            answers[&src]
        );
    }
    let records = s.records();
    let of_reused: Vec<&TupleRecord> = records
        .iter()
        .filter(|r| r.tuple == ConnTuple::new(reused, ztunnel_addr()))
        .collect();
    assert_eq!(of_reused.len(), 1, "{records:?}");
    assert_eq!(
        of_reused[0].set,
        ConnTuple::new(reused, ztunnel_addr()).overflow_set()
    );
}

/// ztunnel asks `SO_ORIGINAL_DST` at `SOL_IP` first and, when that fails,
/// `IP6T_SO_ORIGINAL_DST` at `SOL_IPV6` (../shared/design.md). The first question about an
/// IPv6 connection must leave its record waiting: marked answered, its slot could be taken by
/// the pod's next connection (whose port, near this one's, picks the same hot set) before the
/// second question comes.
#[test]
fn an_ipv6_record_still_waits_after_the_sol_ip_question() {
    if !testkit::require_root("an_ipv6_record_still_waits_after_the_sol_ip_question") {
        return;
    }
    let s = Setup::new("tuple-v6-question");
    let zt = s.deferred_ztunnel(ztunnel_addr6(), 1, Questions::SolIpOnly);
    let service: SocketAddr = "[fd00:200::99]:80".parse().unwrap();
    s.connect(
        &[service],
        ClientOptions {
            count: 1,
            no_echo: true,
            ..ClientOptions::default()
        },
    );
    let answer = accepted(&zt, 1).remove(0);
    assert_eq!(answer.local, ztunnel_addr6(), "{answer:?}");
    // Not the IPv4 question's: the kernel's own answer (no conntrack entry) stands.
    assert!(matches!(answer.orig, Some(Err(_))), "{answer:?}");
    let records = s.records();
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(record.tuple, ConnTuple::new(answer.peer, answer.local));
    assert_eq!(record.dst.addr, layout::PodAddr::from(service.ip()).addr);
    assert_eq!(record.dst.port, service.port().to_be());
    assert!(
        !record.answered,
        "marked answered by the SOL_IP question: {record:?}"
    );
    let c = s.loaded.counters().unwrap();
    assert_eq!((c.orig_dst_hit, c.orig_dst_miss), (0, 0), "{c:?}");
}
