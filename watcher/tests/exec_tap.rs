//! The exec tap against the real kernel (root): its records carry the right process, cgroup id
//! and network namespace, and each is readable by the time the proc connector's exec event
//! arrives, stamped no later than that event.
//!
//! The tap and the connector see the whole machine: every check filters by our children's pids.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::TestCgroup;
use watcher::connector::Doorbell;
use watcher::connector::{decode, Connector, ConnectorConfig, KernelEvent, Message, Received};
use watcher::exec_tap::{ExecTap, TapRecord};
use watcher::CgroupId;

/// Kills a child by its pid and reaps it, also when the test fails.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_in(cg: &TestCgroup, argv: &[&str], stdin: Stdio) -> ChildGuard {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]).stdin(stdin).stdout(Stdio::null());
    // SAFETY: the hook only writes to a file (open/write/close).
    unsafe {
        cmd.pre_exec(cg.pre_exec_join(&cg.path));
    }
    ChildGuard(cmd.spawn().expect("spawn child"))
}

#[test]
fn tap_records_the_exec_of_a_child_with_its_cgroup_and_netns() {
    if !testkit::require_root("tap_records_the_exec_of_a_child_with_its_cgroup_and_netns") {
        return;
    }
    let cg = TestCgroup::new("tap-rec").unwrap();
    let mut tap = ExecTap::load().expect("the exec tap loads as root");
    // The child waits on its stdin: alive while its /proc/PID/ns/net is read.
    let child = spawn_in(&cg, &["/bin/sh", "-c", "read x"], Stdio::piped());
    let pid = child.0.id();
    let netns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .ino();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut found: Option<TapRecord> = None;
    while found.is_none() && Instant::now() < deadline {
        tap.drain(|r| {
            if r.tgid == pid {
                found = Some(r);
            }
        });
        std::thread::sleep(Duration::from_millis(5));
    }
    let record = found.expect("a record of the child's exec");
    assert_eq!(
        record.cgroup,
        CgroupId(cg.id()),
        "cgroup id == inode of its directory"
    );
    assert_eq!(
        record.netns,
        Some(netns),
        "netns == inode of /proc/PID/ns/net"
    );
    assert!(record.ktime_ns <= watcher::live::monotonic_now_ns());
    assert_eq!(tap.dropped().unwrap(), 0);
}

/// Whether `fd` polls readable now.
fn readable(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    let mut poll = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    unsafe { libc::poll(&mut poll, 1, 0) == 1 }
}

#[test]
fn the_doorbell_rings_for_the_first_exec_of_a_cgroup_only() {
    if !testkit::require_root("the_doorbell_rings_for_the_first_exec_of_a_cgroup_only") {
        return;
    }
    let cg = TestCgroup::new("tap-bell").unwrap();
    let mut tap = ExecTap::load().expect("the exec tap loads as root");
    let mut bell = tap.take_doorbell().expect("the tap has a doorbell");
    assert!(tap.take_doorbell().is_none(), "one doorbell");
    bell.drain_cgroups(|_| {});
    let rings = |bell: &mut watcher::exec_tap::NewCgroupDoorbell| {
        let mut n = 0;
        bell.drain_cgroups(|id| n += usize::from(id == CgroupId(cg.id())));
        n
    };
    // Each child has exec'd when `wait` returns (it exits at once).
    let first = spawn_in(&cg, &["/bin/true"], Stdio::null())
        .0
        .wait()
        .unwrap();
    assert!(first.success());
    assert!(
        readable(bell.fd()),
        "the ring polls readable, as a coalescing window waits for it"
    );
    assert_eq!(rings(&mut bell), 1, "the cgroup's first exec rang");
    let second = spawn_in(&cg, &["/bin/true"], Stdio::null())
        .0
        .wait()
        .unwrap();
    assert!(second.success());
    assert_eq!(rings(&mut bell), 0, "its second exec did not");
}

#[test]
fn tap_record_is_readable_when_the_connector_event_arrives() {
    if !testkit::require_root("tap_record_is_readable_when_the_connector_event_arrives") {
        return;
    }
    let cg = TestCgroup::new("tap-order").unwrap();
    // The tap first: every exec the connector reports afterwards has its record.
    let mut tap = ExecTap::load().expect("the exec tap loads as root");
    let mut connector = Connector::subscribe(&ConnectorConfig::default()).unwrap();
    const CHILDREN: usize = 300;
    let spawner = {
        let join = cg.joiner(&cg.path);
        std::thread::spawn(move || {
            (0..CHILDREN)
                .map(|_| {
                    let mut cmd = Command::new("/bin/true");
                    join.apply(&mut cmd);
                    let mut child = cmd.spawn().expect("spawn /bin/true");
                    let pid = child.id();
                    child.wait().unwrap();
                    pid
                })
                .collect::<Vec<u32>>()
        })
    };
    // For every exec event: was its process's record in the ring at that moment (drained
    // right when the event is read), and by how much did it precede the event?
    let mut records: HashMap<u32, Vec<TapRecord>> = HashMap::new();
    // tgid -> (event ts, the record found then, if any)
    let mut seen: HashMap<u32, (u64, Option<TapRecord>)> = HashMap::new();
    // The spawner's events are all queued once it is done; a little more reading takes them.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut stop_at = None;
    loop {
        let now = Instant::now();
        assert!(now < deadline, "the spawner did not finish");
        if spawner.is_finished() && stop_at.is_none() {
            stop_at = Some(now + Duration::from_secs(1));
        }
        if stop_at.is_some_and(|t| now >= t) {
            break;
        }
        let datagram = match connector.recv().unwrap() {
            Received::Datagram(d) => d,
            Received::Overrun => panic!("the connector overran: the check needs every event"),
            Received::Timeout => continue,
        };
        for message in decode(datagram) {
            let Ok(Message::Event {
                ts_ns,
                event: KernelEvent::Exec { tgid, .. },
            }) = message
            else {
                continue;
            };
            tap.drain(|r| records.entry(r.tgid).or_default().push(r));
            let record = records
                .get_mut(&tgid)
                .and_then(|rs| (!rs.is_empty()).then(|| rs.remove(0)));
            seen.insert(tgid, (ts_ns, record));
        }
    }
    let pids = spawner.join().unwrap();
    assert_eq!(pids.len(), CHILDREN);
    let mut gaps = Vec::new();
    for pid in &pids {
        let (event_ns, record) = seen
            .get(pid)
            .unwrap_or_else(|| panic!("the exec event of child {pid} arrived"));
        let record = record.unwrap_or_else(|| {
            panic!("the record of child {pid} was in the ring when its exec event arrived")
        });
        assert_eq!(record.cgroup, CgroupId(cg.id()));
        assert!(
            record.ktime_ns <= *event_ns,
            "bpf_ktime_get_ns of the record ({}) is not after the connector's ktime_get_ns \
             ({event_ns})",
            record.ktime_ns
        );
        gaps.push(event_ns - record.ktime_ns);
    }
    gaps.sort_unstable();
    eprintln!(
        "record -> connector event: median {} ns, max {} ns ({} execs)",
        gaps[gaps.len() / 2],
        gaps[gaps.len() - 1],
        gaps.len()
    );
}

#[test]
fn tap_load_errors_name_the_program_and_cause() {
    // A broken object: no root needed to see the error's wording.
    let err = match ExecTap::load_bytes(b"not an ELF object") {
        Ok(_) => panic!("a broken object loads"),
        Err(e) => e,
    };
    let text = err.to_string();
    assert!(
        text.starts_with("exec tap: loading the BPF object"),
        "{text}"
    );
}
