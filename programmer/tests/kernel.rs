//! The object on a real kernel: load, verifier, links on a test cgroup, pins that outlive
//! the loader, layout checks, batch writes, reconciliation and a first datapath check.
//! Each test has its own cgroup and its own bpffs mount.

mod common;

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use common::{bpffs, config, connect_from};
use programmer::layout::{self, CgroupInfo, ConnTuple, OrigDst, PodAddr};
use programmer::{sys, BatchMode, Loaded, MapBackend, MapBatch, Programmer, ProgrammerConfig};
use resolver::{Enrolment, Role, Update};
use testkit::{BpfFs, TestCgroup};
use watcher::CgroupId;

fn entry(i: u64) -> (CgroupId, CgroupInfo) {
    (
        CgroupId(1_000_000 + i),
        CgroupInfo {
            flags: layout::F_AMBIENT | layout::F_HAS_V4,
            addr4: (0x0a00_0000u32 + i as u32).to_be(),
            addr6: [i as u8; 16],
        },
    )
}

/// Every program passes the verifier with room to spare: at most a quarter of the limit of
/// processed instructions. Other kernels prune differently; a program near the limit here is
/// the first one a kernel refuses (an inlined cgroup walk took connect4 most of the way there:
/// BENCHMARKS.md, "Verifier instruction counts").
#[test]
fn every_program_verifies_within_a_quarter_of_the_verifier_limit() {
    if !testkit::require_root("every_program_verifies_within_a_quarter_of_the_verifier_limit") {
        return;
    }
    let verified = programmer::loader::verify_object().unwrap();
    let names: Vec<&str> = verified.iter().map(|p| p.name).collect();
    let expected: Vec<&str> = programmer::object::PROGRAMS.iter().map(|p| p.0).collect();
    assert_eq!(names, expected);
    assert_within_a_quarter_of_the_limit(verified);
}

/// Each program took at most a quarter of the verifier's limit of processed instructions.
fn assert_within_a_quarter_of_the_limit(verified: Vec<programmer::loader::VerifiedProgram>) {
    for program in verified {
        // Reported since Linux 5.16; CI runs 6.18.
        let insns = program
            .verified_insns
            .expect("the kernel reports verified_insns");
        assert!(
            insns <= programmer::loader::VERIFIER_INSN_LIMIT / 4,
            "{} took {insns} of the verifier's {} instructions",
            program.name,
            programmer::loader::VERIFIER_INSN_LIMIT
        );
    }
}

#[test]
fn object_loads_attaches_every_program_and_pins_outlive_the_loader() {
    if !testkit::require_root("object_loads_attaches_every_program_and_pins_outlive_the_loader") {
        return;
    }
    let (cg, fs, loaded) = common::attached("prog-load");
    let created: Vec<&str> = loaded
        .report()
        .links_created
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(
        created,
        [
            "sock_ops",
            "getsockopt",
            "bind4",
            "bind6",
            "recvmsg4",
            "recvmsg6",
            "sendmsg4",
            "sendmsg6",
            "connect4",
            "connect6"
        ]
    );
    for (name, _, attach_type) in programmer::object::PROGRAMS {
        let pin = fs
            .pin_dir()
            .join(format!("{}/links", layout::LAYOUT_VERSION))
            .join(name);
        let fd = sys::obj_get(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
        let info = sys::link_info(fd.as_fd()).unwrap();
        assert_eq!(info.link_type, sys::BPF_LINK_TYPE_CGROUP, "{name}");
        assert_eq!(
            info.cgroup_id,
            cg.id(),
            "{name} attached to the test cgroup"
        );
        assert_eq!(info.attach_type, attach_type, "{name}");
    }
    let mut backend = loaded.backend().unwrap();
    let (id, info) = entry(7);
    backend
        .apply(&MapBatch {
            cgroup_upserts: vec![(id, info)],
            ..MapBatch::default()
        })
        .unwrap();
    let first_prog_ids: Vec<u32> = link_prog_ids(&fs);
    drop(backend);
    drop(loaded);

    // A second load reuses the pinned maps (the entry is still there) and re-points the
    // pinned links at its programs instead of attaching a second set.
    let again = Loaded::load_and_attach(config(&fs, &cg)).unwrap();
    assert!(
        again.report().maps_recreated.is_empty(),
        "{:?}",
        again.report()
    );
    assert!(
        again.report().links_created.is_empty(),
        "{:?}",
        again.report()
    );
    assert_eq!(
        again.report().links_updated.len(),
        programmer::object::PROGRAMS.len()
    );
    assert!(again
        .report()
        .maps_reused
        .contains(&layout::CGROUP_INFO_MAP.to_string()));
    assert_eq!(
        again.backend().unwrap().cgroup_entries().unwrap(),
        vec![(id, info)]
    );
    let second_prog_ids = link_prog_ids(&fs);
    for (a, b) in first_prog_ids.iter().zip(&second_prog_ids) {
        assert_ne!(a, b, "the link now runs the newly loaded program");
    }

    // detach removes every pin; the directory goes too.
    drop(again);
    let removed = programmer::detach(&fs.pin_dir()).unwrap();
    assert_eq!(removed, vec![fs.pin_dir().join(layout::LAYOUT_VERSION)]);
    assert!(!fs.pin_dir().exists());
}

fn link_prog_ids(fs: &BpfFs) -> Vec<u32> {
    programmer::object::PROGRAMS
        .iter()
        .map(|(name, _, _)| {
            let fd = sys::obj_get(
                &fs.pin_dir()
                    .join(format!("{}/links", layout::LAYOUT_VERSION))
                    .join(name),
            )
            .unwrap();
            sys::link_info(fd.as_fd()).unwrap().prog_id
        })
        .collect()
}

#[test]
fn pinned_map_with_a_wrong_layout_is_recreated() {
    if !testkit::require_root("pinned_map_with_a_wrong_layout_is_recreated") {
        return;
    }
    let cg = TestCgroup::new("prog-layout").unwrap();
    let fs = bpffs("prog-layout");
    let maps = fs
        .pin_dir()
        .join(format!("{}/maps", layout::LAYOUT_VERSION));
    std::fs::create_dir_all(&maps).unwrap();
    // An older layout: a 28-byte value where the object wants 24.
    let wrong = aya::maps::HashMap::<aya::maps::MapData, u64, [u8; 28]>::create(1024, 0).unwrap();
    aya::maps::IterableMap::map(&wrong)
        .pin(maps.join("cgroup_info_map"))
        .unwrap();

    let loaded = Loaded::load_and_attach(config(&fs, &cg)).unwrap();
    let path = maps.join("cgroup_info_map");
    assert_eq!(
        loaded.report().maps_recreated,
        vec![format!(
            "map `cgroup_info_map`: pinned at {} has value size 28, object wants 24, \
             max entries 1024, object wants 65536: recreated",
            path.display()
        )]
    );
    let info = aya::maps::MapInfo::from_pin(&path).unwrap();
    assert_eq!(
        (
            info.map_type().unwrap(),
            info.key_size(),
            info.value_size(),
            info.max_entries()
        ),
        (aya::maps::MapType::Hash, 8, 24, 65536)
    );
}

/// A `settings` map created afresh restarts its generation at 0: the thread records, whose
/// cached decisions are good for a generation of the old map, are recreated with it.
#[test]
fn a_new_settings_map_takes_the_thread_records_with_it() {
    if !testkit::require_root("a_new_settings_map_takes_the_thread_records_with_it") {
        return;
    }
    let cg = TestCgroup::new("prog-newsettings").unwrap();
    let fs = bpffs("prog-newsettings");
    let maps = fs
        .pin_dir()
        .join(format!("{}/maps", layout::LAYOUT_VERSION));
    let inode = |name: &str| std::fs::metadata(maps.join(name)).unwrap().ino();
    let first = Loaded::load_and_attach(config(&fs, &cg)).unwrap();
    let (task_map, info_map) = (
        inode(layout::ORIG_DST_BY_TASK_MAP),
        inode(layout::CGROUP_INFO_MAP),
    );
    drop(first);

    // Everything reused while `settings` stays.
    let second = Loaded::load_and_attach(config(&fs, &cg)).unwrap();
    assert!(second.report().maps_recreated.is_empty());
    assert_eq!(inode(layout::ORIG_DST_BY_TASK_MAP), task_map);
    drop(second);

    std::fs::remove_file(maps.join(layout::SETTINGS_MAP)).unwrap();
    let third = Loaded::load_and_attach(config(&fs, &cg)).unwrap();
    let report = third.report();
    assert_eq!(
        report.maps_recreated,
        vec![format!(
            "map `orig_dst_by_task`: pinned at {} holds decisions cached under the `settings` \
             map that is no longer pinned: recreated",
            maps.join(layout::ORIG_DST_BY_TASK_MAP).display()
        )]
    );
    assert!(!report
        .maps_reused
        .iter()
        .any(|m| m == layout::ORIG_DST_BY_TASK_MAP));
    assert_ne!(inode(layout::ORIG_DST_BY_TASK_MAP), task_map);
    // The other maps keep their entries.
    assert_eq!(inode(layout::CGROUP_INFO_MAP), info_map);
}

#[test]
fn batch_update_and_delete_of_10000_entries_land_exactly_and_single_ops_agree() {
    if !testkit::require_root("batch_update_and_delete_of_10000_entries_land_exactly") {
        return;
    }
    let (_cg, _fs, loaded) = common::attached("prog-batch");
    let entries: Vec<(CgroupId, CgroupInfo)> = (0..10_000).map(entry).collect();
    let addrs: Vec<(PodAddr, u32)> = (0..10_000u32)
        .map(|i| {
            (
                PodAddr::from(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))),
                layout::F_AMBIENT,
            )
        })
        .collect();
    let write = MapBatch {
        cgroup_upserts: entries.clone(),
        addr_upserts: addrs.clone(),
        ..MapBatch::default()
    };
    // Deleting every other entry, plus keys that are not there (skipped, not an error).
    let deleted: Vec<CgroupId> = (0..10_000)
        .step_by(2)
        .map(|i| entry(i).0)
        .chain([CgroupId(1), CgroupId(2)])
        .collect();
    let delete = MapBatch {
        cgroup_deletes: deleted,
        addr_deletes: addrs.iter().step_by(2).map(|(a, _)| *a).collect(),
        ..MapBatch::default()
    };
    let want_after: Vec<(CgroupId, CgroupInfo)> =
        entries.iter().skip(1).step_by(2).copied().collect();
    let mut want_addrs: Vec<(PodAddr, u32)> = addrs.iter().skip(1).step_by(2).copied().collect();
    want_addrs.sort();

    let mut results = Vec::new();
    for mode in [BatchMode::Auto, BatchMode::SingleOps] {
        let mut backend = loaded.backend().unwrap();
        backend.set_mode(mode);
        backend.apply(&write).unwrap();
        assert_eq!(backend.cgroup_entries().unwrap(), entries, "{mode:?}");
        let mut sorted_addrs = addrs.clone();
        sorted_addrs.sort();
        assert_eq!(backend.addr_entries().unwrap(), sorted_addrs, "{mode:?}");
        backend.apply(&delete).unwrap();
        assert_eq!(backend.cgroup_entries().unwrap(), want_after, "{mode:?}");
        // One entry looked up alone: a kept one, and a deleted one.
        assert_eq!(
            backend.cgroup_entry(want_after[0].0).unwrap(),
            Some(want_after[0].1)
        );
        assert_eq!(backend.cgroup_entry(entries[0].0).unwrap(), None);
        assert_eq!(backend.addr_entries().unwrap(), want_addrs, "{mode:?}");
        let stats = backend.stats();
        match mode {
            BatchMode::Auto => {
                assert!(backend.batches_supported());
                assert_eq!(stats.single_ops, 0, "every entry went by batch");
            }
            BatchMode::SingleOps => assert_eq!(stats.batch_calls, 0),
        }
        results.push((
            backend.cgroup_entries().unwrap(),
            backend.addr_entries().unwrap(),
        ));
        // Empty the maps for the next mode.
        backend
            .apply(&MapBatch {
                cgroup_deletes: want_after.iter().map(|(id, _)| *id).collect(),
                addr_deletes: want_addrs.iter().map(|(a, _)| *a).collect(),
                ..MapBatch::default()
            })
            .unwrap();
        assert!(backend.cgroup_entries().unwrap().is_empty());
    }
    assert_eq!(results[0], results[1]);
}

fn enrolment(cg: &TestCgroup, path: &str, role: Role, ips: Vec<IpAddr>) -> Update {
    Update::Upsert(Arc::new(Enrolment {
        cgroup_id: CgroupId(cg.id_of(path).unwrap()),
        cgroup: path.to_string().into(),
        pod: Some(format!("test/{path}")),
        role,
        ips,
        capture: Default::default(),
        identity: None,
    }))
}

#[test]
fn reconciliation_removes_entries_not_confirmed_after_synced() {
    if !testkit::require_root("reconciliation_removes_entries_not_confirmed_after_synced") {
        return;
    }
    let (cg, _fs, loaded) = common::attached("prog-reconcile");
    let kept = cg.child("kept").unwrap();
    let gone = cg.child("gone").unwrap();
    let kept_ip: IpAddr = "10.77.0.1".parse().unwrap();
    let gone_ip: IpAddr = "10.77.0.2".parse().unwrap();

    // A previous run programmed two pods.
    {
        let mut first =
            Programmer::new(loaded.backend().unwrap(), ProgrammerConfig::default()).unwrap();
        first.queue(&enrolment(&cg, &kept, Role::Ambient, vec![kept_ip]));
        first.queue(&enrolment(&cg, &gone, Role::Ambient, vec![gone_ip]));
        first.flush().unwrap();
        assert_eq!(first.backend().cgroup_entries().unwrap().len(), 2);
    }
    // The next run: the resolver confirms only one; until Synced both stay.
    let mut second =
        Programmer::new(loaded.backend().unwrap(), ProgrammerConfig::default()).unwrap();
    second.queue(&enrolment(&cg, &kept, Role::Ambient, vec![kept_ip]));
    second.flush().unwrap();
    assert_eq!(second.backend().cgroup_entries().unwrap().len(), 2);
    second.queue(&Update::Synced);
    second.flush().unwrap();
    let kept_id = CgroupId(cg.id_of(&kept).unwrap());
    let entries = second.backend().cgroup_entries().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0, kept_id);
    assert_eq!(
        second.backend().addr_entries().unwrap(),
        vec![(PodAddr::from(kept_ip), layout::F_AMBIENT | layout::F_HAS_V4)]
    );
    // The level of the kept entry (2: /zbt-.../kept) is what settings names.
    assert_eq!(second.backend().settings().unwrap().levels, 1 << 2);
}

#[test]
fn ambient_process_loopback_passes_no_ztunnel_fails_closed_and_redirect_lands() {
    if !testkit::require_root("ambient_process_loopback_passes_no_ztunnel_fails_closed") {
        return;
    }
    let (cg, fs, loaded) = common::attached("prog-smoke");
    let pod = cg.child("pod").unwrap();
    let mut prog = Programmer::new(loaded.backend().unwrap(), ProgrammerConfig::default()).unwrap();
    prog.queue(&enrolment(
        &cg,
        &pod,
        Role::Ambient,
        vec!["10.200.0.5".parse().unwrap()],
    ));
    prog.flush().unwrap();

    // Loopback is never redirected: the connection lands on the test's listener.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let out = connect_from(&cg, &pod, "127.0.0.1", port);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_conn, _) = listener.accept().unwrap();
    let c = loaded.counters().unwrap();
    assert_eq!((c.passed, c.redirected_out), (1, 0), "{c:?}");

    // No ztunnel known, fail-closed (the default): the connect fails, and is counted.
    let out = connect_from(&cg, &pod, "10.200.0.99", 80);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(loaded.counters().unwrap().fail_closed, 1);

    // ztunnel at 127.0.0.1 with the test's listener as outbound port: the connect to
    // 10.200.0.99:80 lands on the listener, and sockops recorded the original destination
    // under the connection's 4-tuple.
    let mut backend = loaded.backend().unwrap();
    let mut settings = backend.settings().unwrap();
    settings.set_ztunnel_ips(&[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    settings.outbound_port = port;
    backend
        .apply(&MapBatch {
            settings: Some(settings),
            ..MapBatch::default()
        })
        .unwrap();
    let out = connect_from(&cg, &pod, "10.200.0.99", 80);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_conn, peer) = listener.accept().unwrap();
    assert_eq!(loaded.counters().unwrap().redirected_out, 1);
    let tuples = programmer::read_tuple_records(&fs.pin_dir()).unwrap();
    let mapped = |ip: Ipv4Addr| ip.to_ipv6_mapped().octets();
    let want_key = ConnTuple {
        src: mapped(Ipv4Addr::LOCALHOST),
        dst: mapped(Ipv4Addr::LOCALHOST),
        sport: peer.port().to_be(),
        dport: port.to_be(),
    };
    let want_value = OrigDst {
        addr: mapped(Ipv4Addr::new(10, 200, 0, 99)),
        port: 80u16.to_be(),
        family: libc::AF_INET as u16,
    };
    let record = programmer::TupleRecord {
        tuple: want_key,
        dst: want_value,
    };
    assert_eq!(tuples, vec![record]);

    // A connect straight to the capture port is refused (ztunnel would loop on it).
    let out = connect_from(&cg, &pod, "127.0.0.1", port);
    assert!(!out.status.success());
    let c = loaded.counters().unwrap();
    assert_eq!(c.refused_loop, 1, "{c:?}");
}

/// What the per-thread tests share: cgroup `pod` enrolled ambient (10.200.0.5) and `zt`
/// enrolled as ztunnel, the programs sending connections to `ztunnel_ip`; a namespace of the
/// test's own (loopback only: a connect that is not redirected, or redirected to an address
/// other than loopback, fails at once and sends nothing) with a fake ztunnel on its loopback;
/// and a one-thread shell in the pod. Fields drop in order: the shell and the fake ztunnel
/// (killed by their PIDs) before the namespace; tests that take the fields apart bind `_ns`
/// first, so that it drops last.
struct ThreadWorld {
    shell: common::ConnectShell,
    ztunnel: testkit::ztunnel::FakeZtunnel,
    _ns: testkit::NetNs,
    prog: Programmer<programmer::KernelMaps>,
    pod: String,
}

impl ThreadWorld {
    fn new(cg: &TestCgroup, loaded: &Loaded, name: &str, ztunnel_ip: IpAddr) -> ThreadWorld {
        let pod = cg.child("pod").unwrap();
        let zt = cg.child("zt").unwrap();
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut prog =
            Programmer::new(loaded.backend().unwrap(), ProgrammerConfig::default()).unwrap();
        prog.queue(&enrolment(cg, &zt, Role::Ztunnel, vec![loopback]));
        prog.queue(&Update::SetZtunnel {
            ips: vec![ztunnel_ip],
        });
        prog.queue(&enrolment(
            cg,
            &pod,
            Role::Ambient,
            vec!["10.200.0.5".parse().unwrap()],
        ));
        prog.flush().unwrap();
        let ns = testkit::NetNs::new(name).unwrap();
        let ztunnel =
            testkit::ztunnel::FakeZtunnel::start(&ns, cg, &zt, &[loopback], false).unwrap();
        let shell = common::ConnectShell::start(&ns, cg, &pod);
        ThreadWorld {
            shell,
            ztunnel,
            _ns: ns,
            prog,
            pod,
        }
    }
}

/// A redirect arms the thread's record for its next TCP_CONNECT to a capture port: a redirected
/// connect that fails before its SYN leaves it armed, another socket's connect to another port
/// leaves it armed (a `TCP_FASTOPEN_CONNECT` socket sends its SYN only with its first write),
/// and the next redirected connection takes it, with its own destination.
#[test]
fn a_redirect_stays_armed_until_a_connect_to_a_capture_port_takes_it() {
    use std::time::Duration;

    if !testkit::require_root("a_redirect_stays_armed_until_a_connect_to_a_capture_port") {
        return;
    }
    let (cg, fs, loaded) = common::attached("prog-armed");
    // First a ztunnel address nothing routes to in the test's namespace: the redirected
    // connect fails at the route lookup, before TCP_CONNECT.
    // `_ns` is bound first, to keep the namespace until the end and drop it last (a `..`
    // would drop it here).
    let ThreadWorld {
        _ns,
        mut prog,
        mut shell,
        ztunnel,
        ..
    } = ThreadWorld::new(&cg, &loaded, "prog-armed", "10.9.9.9".parse().unwrap());
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let pid = shell.pid();
    let record = || {
        programmer::read_thread_record(&fs.pin_dir(), pid)
            .unwrap()
            .expect("the thread has its record")
    };

    assert!(!shell.connect("10.200.0.98", 80), "no route to 10.9.9.9");
    assert_eq!(loaded.counters().unwrap().redirected_out, 1);
    let armed = record();
    assert_eq!(armed.armed, 1);
    assert_eq!(armed.dst.port, 80u16.to_be());

    // Loopback is not redirected; its TCP_CONNECT (port 80, refused) leaves the record armed.
    assert!(!shell.connect("127.0.0.1", 80));
    assert_eq!(loaded.counters().unwrap().redirected_out, 1);
    assert_eq!(record().armed, 1);

    // ztunnel reachable now: the next redirected connection takes the record, with its own
    // destination, and disarms it.
    prog.queue(&Update::SetZtunnel {
        ips: vec![loopback],
    });
    prog.flush().unwrap();
    assert!(shell.connect("10.200.0.99", 8080));
    let accepted = ztunnel
        .next(Duration::from_secs(5))
        .expect("no connection on ztunnel");
    assert_eq!(accepted.orig, Some(Ok("10.200.0.99:8080".parse().unwrap())));
    assert_eq!(record().armed, 0);
    assert_eq!(loaded.counters().unwrap().redirected_out, 2);
}

/// The thread's cached decision holds only while the thread stays in its cgroup: a thread moved
/// out of its pod's cgroup, to one with no entry, is decided as a host process on its very
/// next connect, and moved back, as the pod's again. (connect4 reads the thread's cgroup id
/// through the task's BTF, `zb_task_cgroup_id`: a wrong read would keep the pod's decision for
/// a thread that left, or never find the cache.)
#[test]
fn a_thread_moved_to_another_cgroup_is_decided_for_its_new_cgroup() {
    use std::time::Duration;

    if !testkit::require_root("a_thread_moved_to_another_cgroup_is_decided_for_its_new_cgroup") {
        return;
    }
    let (cg, fs, loaded) = common::attached("prog-moved");
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    // Bound in this order so that they drop in reverse: the shell and the fake ztunnel before
    // the namespace.
    let ThreadWorld {
        _ns,
        prog: _prog,
        pod,
        mut shell,
        ztunnel,
    } = ThreadWorld::new(&cg, &loaded, "prog-moved", loopback);
    let host = cg.child("host").unwrap();
    let pod_id = cg.id_of(&pod).unwrap();
    let pid = shell.pid();
    let record = || {
        programmer::read_thread_record(&fs.pin_dir(), pid)
            .unwrap()
            .expect("the thread has its record")
    };
    let redirected = || loaded.counters().unwrap().redirected_out;
    let landed = || {
        let a = ztunnel
            .next(Duration::from_secs(5))
            .expect("no connection on ztunnel");
        assert_eq!(a.orig, Some(Ok("10.200.0.99:80".parse().unwrap())));
    };

    // In the pod: redirected, and the decision cached for the pod's cgroup.
    assert!(shell.connect("10.200.0.99", 80));
    landed();
    assert_eq!(redirected(), 1);
    assert_eq!(record().cached_cgroup, pod_id);

    // Moved to a cgroup with no entry: a host process now, not redirected (nothing routes
    // to the service in the namespace, so the connect fails), and nothing cached.
    cg.enter(&host, pid).unwrap();
    assert!(!shell.connect("10.200.0.99", 80));
    assert_eq!(redirected(), 1);
    assert_eq!(record().cached_cgroup, 0);

    // Back in the pod: captured again at once.
    cg.enter(&pod, pid).unwrap();
    assert!(shell.connect("10.200.0.99", 80));
    landed();
    assert_eq!(redirected(), 2);
    assert_eq!(record().cached_cgroup, pod_id);
}

/// connect4 caches a thread's cgroup entry in the thread's storage (`struct connect_record`),
/// good for one `settings.generation`. One long-lived shell (one thread) connects again and
/// again while the programmer changes its pod's entry: each change takes effect on the very
/// next connect of the thread that had the old entry cached.
#[test]
fn a_changed_entry_takes_effect_for_a_thread_that_has_it_cached() {
    use std::time::Duration;

    if !testkit::require_root("a_changed_entry_takes_effect_for_a_thread_that_has_it_cached") {
        return;
    }
    let (cg, fs, loaded) = common::attached("prog-cache");
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    // Bound in this order so that they drop in reverse: the shell and the fake ztunnel before
    // the namespace.
    let ThreadWorld {
        _ns,
        mut prog,
        pod,
        mut shell,
        ztunnel,
    } = ThreadWorld::new(&cg, &loaded, "prog-cache", loopback);
    let pod_id = cg.id_of(&pod).unwrap();
    let pid = shell.pid();
    let mut connect = || {
        if shell.connect("10.200.0.99", 80) {
            "ok"
        } else {
            "fail"
        }
    };
    let generation = || loaded.backend().unwrap().settings().unwrap().generation;
    let record = || programmer::read_thread_record(&fs.pin_dir(), pid).unwrap();
    let redirected = |want: u64| {
        assert_eq!(loaded.counters().unwrap().redirected_out, want);
    };
    let landed = || {
        let a = ztunnel
            .next(Duration::from_secs(5))
            .expect("no connection on ztunnel");
        assert_eq!(a.orig, Some(Ok("10.200.0.99:80".parse().unwrap())));
    };

    // Redirected, and the thread's entry is cached under the current generation.
    assert_eq!(connect(), "ok");
    landed();
    redirected(1);
    let cached = record().expect("the thread has its record");
    assert_eq!(cached.cached_cgroup, pod_id);
    assert_eq!(cached.cached_generation, generation());
    assert_eq!(
        cached.cached_info.flags & layout::F_AMBIENT,
        layout::F_AMBIENT
    );
    // The second connect is decided from the cache (nothing changed): still redirected.
    assert_eq!(connect(), "ok");
    landed();
    redirected(2);

    // The entry changes in place: the pod's own address becomes the destination, which a pod
    // reaches directly. The cached entry must not be used: the connect passes (and fails, as
    // nothing routes there).
    let before = generation();
    prog.queue(&enrolment(
        &cg,
        &pod,
        Role::Ambient,
        vec!["10.200.0.99".parse().unwrap()],
    ));
    prog.flush().unwrap();
    assert!(generation() > before, "the programmer bumps the generation");
    let passed = loaded.counters().unwrap().passed;
    assert_eq!(connect(), "fail");
    redirected(2);
    assert_eq!(loaded.counters().unwrap().passed, passed + 1);
    let cached = record().unwrap();
    assert_eq!(
        (cached.cached_cgroup, cached.cached_generation),
        (pod_id, generation())
    );
    assert_eq!(
        cached.cached_info.addr4,
        u32::from(Ipv4Addr::new(10, 200, 0, 99)).to_be()
    );

    // The entry is deleted: the thread is a host process now (not redirected), and its cache
    // is dropped, not kept.
    prog.queue(&Update::Delete {
        cgroup_id: CgroupId(pod_id),
    });
    prog.flush().unwrap();
    assert_eq!(connect(), "fail");
    redirected(2);
    assert_eq!(record().unwrap().cached_cgroup, 0);

    // Enrolled again: captured on the thread's very next connect.
    prog.queue(&enrolment(
        &cg,
        &pod,
        Role::Ambient,
        vec!["10.200.0.5".parse().unwrap()],
    ));
    prog.flush().unwrap();
    assert_eq!(connect(), "ok");
    landed();
    redirected(3);
    assert_eq!(record().unwrap().cached_generation, generation());
}
