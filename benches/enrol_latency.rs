//! Enrolment latency at a steady exec rate (root, real kernel, the real agent in Kubernetes
//! mode; cgroups, a bpffs and an API server of its own, all removed at the end, also on
//! failure): the agent's own `zbridge_enrolment_latency_seconds` (from the kernel's exec
//! timestamp to the map write that enrolled the cgroup) while new pods start their first
//! process at `RATE` execs per second.
//!
//! The agent runs `zbridge run --ztunnel-mode node` against testkit's in-process fake API
//! server, which knows `PODS` running pods of this node in an ambient namespace and a ztunnel
//! pod (with a process in its cgroup) before the agent starts. No pod's cgroup exists then: on
//! a fixed schedule (pod i at start + i / `RATE`, never "as fast as possible") a spawner
//! process makes pod i's cgroups in the kubelet's systemd layout below the agent's attach
//! cgroup (the pod's slice, then its container's scope) and starts `/bin/sleep` in the
//! container (created there by `clone3` with `CLONE_INTO_CGROUP`), so each exec is the first
//! of a new pod cgroup and enrols it. The sleepers stay until the end, so every pod is live
//! when the map is read.
//!
//! The histogram is read from the agent's /metrics before and after; p50 and p99 come from
//! the bucket deltas, so they are bucket upper bounds (the bucket a quantile falls in is
//! printed), the mean is exact (sum / count). Also printed: the rate asked and achieved (and
//! how far the spawns fell behind the schedule), how many of the pods' entries the pinned
//! `cgroup_info_map` holds, and the agent's CPU time (user + system, all threads) from the
//! first exec until the last enrolment was seen.
//!
//! `cargo bench --bench enrol_latency` (env: `PODS`, default 2,000; `RATE`, default 1,000;
//! `SPAWNERS`, the spawner's threads, default 2; `AGENT_ARGS`, more flags for `zbridge run`,
//! e.g. `--no-pod-status`, `--coalesce-window-us 0` or `--realtime-priority 1 --hot-path-cpu 1`,
//! to compare). What the machine itself takes, without the agent: `benches/exec_delivery_floor.c`.
//! Without `--bench` (`cargo test --benches`) it is a quick run of 20 pods that checks the
//! bench works.

mod common;
use common::{env_or, root_bench};

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use programmer::{KernelMaps, MapBackend};
use serde_json::json;
use testkit::http::{get as http_get, sample};
use testkit::mesh::{Mesh, ZTUNNEL4};
use testkit::objects::{namespace, pod};
use testkit::{BpfFs, FakeApiServer};

/// [`testkit::wait_until`] with this bench's [`DEADLINE`].
fn wait_until(what: &str, context: impl Fn() -> String, cond: impl Fn() -> bool) {
    testkit::wait_until(what, DEADLINE, context, cond)
}

const METRIC: &str = "zbridge_enrolment_latency_seconds";
/// The watcher's coalescing windows, and those the exec tap's doorbell ended (as of the
/// watcher's last receive).
const WINDOWS: &str = "zbridge_watcher_counter{counter=\"coalescing_windows\"}";
const WINDOWS_RUNG: &str =
    "zbridge_watcher_counter{counter=\"coalescing_windows_ended_by_doorbell\"}";
/// Longer than the agent's interval between exports of its watcher counters (5 s).
const COUNTERS_EXPORTED_WITHIN: Duration = Duration::from_millis(5_500);
/// The time of each batch's map write.
const BATCH_APPLY: &str = "zbridge_batch_apply_seconds";
/// The agent's measures of the points an enrolment passes before [`METRIC`]'s map write, in
/// order: (the bench's name, the histogram, its label). The watcher's is of every exec, the
/// others of the execs that enrolled (here, all but none).
const STAGES: [(&str, &str, &str); 4] = [
    ("watcher has it", "zbridge_exec_delivery_seconds", ""),
    (
        "resolver took it",
        "zbridge_enrolment_stage_seconds",
        "stage=\"resolver_received\"",
    ),
    (
        "resolver decided",
        "zbridge_enrolment_stage_seconds",
        "stage=\"decided\"",
    ),
    (
        "programmer took it",
        "zbridge_enrolment_stage_seconds",
        "stage=\"programmer_received\"",
    ),
];
/// How long any one wait may take (a hang guard, not a measurement).
const DEADLINE: Duration = Duration::from_secs(60);
/// The pods' namespace, labelled ambient.
const NAMESPACE: &str = "bench";

fn main() {
    if std::env::var_os(SPAWNER_ROLE).is_some() {
        return spawner_main();
    }
    let Some(benching) = root_bench("benches/enrol_latency") else {
        return;
    };
    let pods = env_or("PODS", if benching { 2_000 } else { 20 }) as usize;
    let rate = env_or("RATE", 1_000).max(1);
    let spawners = env_or("SPAWNERS", 2).max(1);
    let agent_args: Vec<String> = std::env::var("AGENT_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();

    // Dropped in reverse order: the spawner (with its processes), the agent, ztunnel's
    // process, the API server, ..., the mesh last.
    let mesh = Mesh::new("bench-enrolat").expect("mesh");
    let bpffs = BpfFs::new("bench-enrolat").expect("bpffs");
    let dir = tempfile::tempdir().expect("temp dir");
    let server = FakeApiServer::start().expect("fake API server");
    let node = testkit::unique_name("enrolat");

    // The kubelet's layout below the attach cgroup: the QoS slices exist, pods come and go.
    let qos = mesh
        .cgroup
        .child("attach/kubepods.slice/kubepods-besteffort.slice")
        .expect("QoS slice");
    let pod_cgroup = |uid: &str| {
        format!(
            "{qos}/kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        )
    };
    let container = |pod: &str, i: usize| format!("{pod}/cri-containerd-{i:064x}.scope");

    // ztunnel: a pod of istio-system with app=ztunnel and a process in its container.
    server.apply_namespace(&namespace("istio-system", false));
    server.apply_namespace(&namespace(NAMESPACE, true));
    let zt_uid = uid(u32::MAX as usize);
    server.apply_pod(&pod(
        "istio-system",
        "ztunnel-bench",
        &zt_uid,
        &node,
        &[ZTUNNEL4],
        json!({"app": "ztunnel"}),
    ));
    let zt_pod = pod_cgroup(&zt_uid);
    let zt_container = container(&zt_pod, usize::MAX);
    std::fs::create_dir_all(mesh.cgroup.dir_of(&zt_container)).expect("ztunnel's cgroups");
    let mut sleepers = Sleepers::default();
    sleepers.spawn(&mesh.cgroup.dir_of(&zt_container));

    // The pods: known to the API server, no cgroup yet.
    let uids: Vec<String> = (0..pods).map(uid).collect();
    for (i, uid) in uids.iter().enumerate() {
        server.apply_pod(&pod(
            NAMESPACE,
            &format!("p{i}"),
            uid,
            &node,
            &[pod_ip(i)],
            json!({}),
        ));
    }

    let agent = Agent::spawn(
        &mesh,
        &bpffs.pin_dir(),
        &server,
        &node,
        dir.path(),
        &agent_args,
    );
    let ops = agent.ops_addr();
    wait_until(
        "/readyz 200",
        || agent.log_tail(),
        || http_get(ops, "/readyz").0 == 200,
    );
    let maps = KernelMaps::open(&bpffs.pin_dir()).expect("the agent's pinned maps");
    let entries = || -> BTreeSet<u64> {
        maps.cgroup_entries()
            .map(|e| e.into_iter().map(|(id, _)| id.0).collect())
            .unwrap_or_default()
    };
    let zt_id = mesh.id(&zt_pod);
    wait_until(
        "ztunnel's entry",
        || agent.log_tail(),
        || entries().contains(&zt_id),
    );
    // Let the start-up's own work (status patches, the first batches) finish, and the agent
    // export its watcher counters (every few seconds) once it is idle, so that their values
    // before the run are not older than its last event.
    std::thread::sleep(COUNTERS_EXPORTED_WITHIN);

    // The pods' cgroups are made and their processes started by a spawner process of its own
    // (this program in its spawner role), on a fixed schedule: pod i at start + i / rate.
    let pod_dirs: Vec<String> = uids.iter().map(|u| pod_cgroup(u)).collect();
    let plan: Vec<(PathBuf, PathBuf)> = pod_dirs
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            (
                mesh.cgroup.dir_of(pod),
                mesh.cgroup.dir_of(&container(pod, i)),
            )
        })
        .collect();
    let mut spawner = SpawnerProcess::start(&mesh, rate, spawners, &plan);
    drop(plan);

    let before = Histogram::read(ops);
    let stages_before = Histogram::read_all(ops);
    let batches_before = Histogram::read_named(ops, BATCH_APPLY);
    let lost_before = metric(ops, "zbridge_lost_events_total");
    let windows_before = metric(ops, WINDOWS);
    let rung_before = metric(ops, WINDOWS_RUNG);
    let cpu_before = cpu_seconds(agent.pid());
    let own_cpu_before = cpu_seconds(std::process::id());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let start = Instant::now();
    let (spawned, behind) = spawner.run();
    let pod_ids: Vec<u64> = pod_dirs.iter().map(|p| mesh.id(p)).collect();

    // Until every pod's entry is written and its enrolment observed (or the deadline).
    let want: BTreeSet<u64> = pod_ids.iter().copied().collect();
    let deadline = Instant::now() + DEADLINE;
    let mut written = 0;
    while Instant::now() < deadline {
        written = want.intersection(&entries()).count();
        if written == pods {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut after = Histogram::read(ops);
    while after.count - before.count < written as f64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        after = Histogram::read(ops);
    }
    let settled = start.elapsed();
    let stages_after = Histogram::read_all(ops);
    let batches_after = Histogram::read_named(ops, BATCH_APPLY);
    let cpu = cpu_seconds(agent.pid()) - cpu_before;
    let own_cpu = cpu_seconds(std::process::id()) - own_cpu_before;
    let lost = metric(ops, "zbridge_lost_events_total") - lost_before;
    // The watcher counters once exported after the last exec (they lag by up to an export).
    std::thread::sleep(COUNTERS_EXPORTED_WITHIN);
    let windows = metric(ops, WINDOWS) - windows_before;
    let rung = metric(ops, WINDOWS_RUNG) - rung_before;
    let delta = after.minus(&before);

    // From the first exec's due time to the last exec's return.
    let achieved = pods as f64 / spawned.as_secs_f64();
    println!(
        "enrolment latency: {pods} new pod cgroups, one exec each, at {rate}/s (kube mode, \
         node ztunnel{}; load average at the start {})",
        if agent_args.is_empty() {
            String::new()
        } else {
            format!(", agent flags {}", agent_args.join(" "))
        },
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "  schedule: {pods} execs in {:.3} s, at most {:.2} ms behind the schedule",
        spawned.as_secs_f64(),
        behind.as_secs_f64() * 1e3
    );
    println!(
        "  {METRIC} (from the agent's /metrics, bucket deltas: p50 and p99 are bucket upper \
         bounds):"
    );
    println!(
        "  | rate asked | rate achieved | execs | enrolments observed | p50 | p99 | max bucket | mean | entries written / expected | agent CPU |"
    );
    println!("  |---|---|---|---|---|---|---|---|---|---|");
    println!(
        "  | {rate}/s | {achieved:.0}/s | {pods} | {:.0} | {} | {} | {} | {} | {written} / {pods} | {:.2} s over {:.2} s ({:.0} µs per exec, {:.0}% of a core) |",
        delta.count,
        delta.quantile_text(0.5),
        delta.quantile_text(0.99),
        delta.max_text(),
        delta.mean_text(),
        cpu,
        settled.as_secs_f64(),
        cpu * 1e6 / pods as f64,
        cpu * 100.0 / settled.as_secs_f64(),
    );
    println!("  by bucket: {}", delta.buckets_text());
    println!(
        "  by stage, time from the exec's kernel timestamp until the enrolment got there (the \
         watcher's of every exec):"
    );
    println!("  | point | count | p50 | p99 | mean |");
    println!("  |---|---|---|---|---|");
    let stages: Vec<(&str, Histogram)> = stages_after
        .iter()
        .zip(&stages_before)
        .map(|((name, after), (_, before))| (*name, after.minus(before)))
        .collect();
    for (name, h) in &stages {
        println!(
            "  | {name} | {:.0} | {} | {} | {} |",
            h.count,
            h.quantile_text(0.5),
            h.quantile_text(0.99),
            h.mean_text()
        );
    }
    let batches = batches_after.minus(&batches_before);
    println!(
        "  map writes (zbridge_batch_apply_seconds, part of the last step): {:.0} batches, \
         {:.1} updates per batch, p50 {}, p99 {}, mean {}",
        batches.count,
        if batches.count > 0.0 {
            pods as f64 / batches.count
        } else {
            0.0
        },
        batches.quantile_text(0.5),
        batches.quantile_text(0.99),
        batches.mean_text()
    );
    println!(
        "  CPU meanwhile of the bench process (the fake API server answering the agent's \
         status patches, the map reads): {own_cpu:.2} s"
    );
    println!(
        "  the watcher's coalescing windows during the run: {windows:.0}, of which ended by a \
         new cgroup's first exec (the exec tap's doorbell): {rung:.0}"
    );
    println!(
        "  target p99 < 100 µs: {}; events lost by the kernel during the run: {lost:.0}",
        match delta.quantile(0.99) {
            Some((_, upper)) if upper <= 1e-4 => "met",
            Some(_) => "not met",
            None => "no observation",
        }
    );

    drop(spawner);
    drop(agent);
    drop(sleepers);
    assert_eq!(written, pods, "pods whose entry was written");
    assert_eq!(
        delta.count, pods as f64,
        "enrolments observed by the agent's histogram"
    );
}

/// A pod UID of this run (the agent sees every process on the machine, and other runs').
fn uid(i: usize) -> String {
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        std::process::id(),
        i as u64 & 0xffff_ffff_ffff
    )
}

/// Pod i's address, on 10.100.0.0/14.
fn pod_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(10, 100, 0, 1)) + i as u32,
    ))
}

/// The environment variable that makes this program the spawner (see [`spawner_main`]).
const SPAWNER_ROLE: &str = "ZBRIDGE_BENCH_ENROL_SPAWNER";

/// The spawner, as the bench drives it: this program again, in its spawner role, in the
/// mesh's `outside` cgroup. On drop its stdin is closed, and it kills and reaps its processes
/// and exits (killed by its PID if it does not within [`DEADLINE`]).
struct SpawnerProcess {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl SpawnerProcess {
    /// Starts the spawner and hands it the plan: the rate, its threads, and per pod (in
    /// order) the pod's and the container's cgroup directories. Returns once it is ready.
    fn start(mesh: &Mesh, rate: u64, threads: u64, plan: &[(PathBuf, PathBuf)]) -> SpawnerProcess {
        let mut cmd = Command::new(std::env::current_exe().expect("this program's path"));
        cmd.env(SPAWNER_ROLE, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        mesh.cgroup.joiner(&mesh.outside).apply(&mut cmd);
        let mut child = cmd.spawn().expect("spawn the spawner");
        let mut stdin = child.stdin.take().expect("piped");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut text = format!("{rate} {threads}\n");
        for (pod, container) in plan {
            text.push_str(&format!("{}\t{}\n", pod.display(), container.display()));
        }
        text.push_str("end\n");
        stdin
            .write_all(text.as_bytes())
            .expect("the plan to the spawner");
        let mut spawner = SpawnerProcess {
            child,
            stdin: Some(stdin),
            stdout,
        };
        assert_eq!(spawner.line(), "ready");
        spawner
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut self.stdout, &mut line);
        assert!(
            !line.is_empty(),
            "the spawner failed (see its message above)"
        );
        line.trim_end().to_string()
    }

    /// Runs the plan; returns when the last exec has returned: from the start to then, and
    /// how far behind its due time the latest pod was started.
    fn run(&mut self) -> (Duration, Duration) {
        let stdin = self.stdin.as_mut().expect("open until drop");
        stdin.write_all(b"go\n").expect("go to the spawner");
        let line = self.line();
        let nanos: Vec<u64> = line
            .strip_prefix("done ")
            .map(|rest| rest.split(' ').filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_default();
        assert_eq!(nanos.len(), 2, "the spawner said {line:?}");
        (
            Duration::from_nanos(nanos[0]),
            Duration::from_nanos(nanos[1]),
        )
    }
}

impl Drop for SpawnerProcess {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The spawner: a small process of its own, so that starting a process (a copy of the
/// spawner's memory until it execs) costs little; a copy of the bench, with its API server
/// and its objects, is slower to make than the schedule allows.
///
/// Reads from stdin `RATE THREADS`, then one line per pod `POD_DIR<TAB>CONTAINER_DIR`, then
/// `end`; answers `ready`. On `go`, pod i's directories are made and `/bin/sleep` started in
/// its container at start + i / RATE, by THREADS threads (thread k takes every k-th pod, so
/// that one slow mkdir or exec does not hold back the pods due after it); answers `done
/// ELAPSED_NS BEHIND_NS`. At the end of stdin it kills and reaps its processes and exits.
fn spawner_main() {
    use std::io::BufRead;
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines().map_while(Result::ok);
    let head = lines.next().expect("the spawner's plan");
    let mut head = head.split(' ').filter_map(|n| n.parse::<u64>().ok());
    let (rate, threads) = (head.next().expect("rate"), head.next().expect("threads"));
    let mut plan: Vec<(PathBuf, PathBuf)> = Vec::new();
    for line in lines.by_ref() {
        if line == "end" {
            break;
        }
        let (pod, container) = line.split_once('\t').expect("POD_DIR<TAB>CONTAINER_DIR");
        plan.push((pod.into(), container.into()));
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    assert_eq!(lines.next().as_deref(), Some("go"));

    let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let threads = threads.max(1) as usize;
    let start = Instant::now();
    let plan = &plan;
    let runs: Vec<(Sleepers, Duration, Duration)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|k| {
                scope.spawn(move || {
                    let mut sleepers = Sleepers::default();
                    let (mut behind, mut done) = (Duration::ZERO, Duration::ZERO);
                    for i in (k..plan.len()).step_by(threads) {
                        let due = start + period * i as u32;
                        let now = Instant::now();
                        if now < due {
                            std::thread::sleep(due - now);
                        } else {
                            behind = behind.max(now - due);
                        }
                        let (pod, container) = &plan[i];
                        std::fs::create_dir(pod).expect("mkdir the pod's cgroup");
                        std::fs::create_dir(container).expect("mkdir the container's cgroup");
                        sleepers.spawn(container);
                        done = start.elapsed();
                    }
                    (sleepers, behind, done)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a spawner thread"))
            .collect()
    });
    let mut all = Sleepers::default();
    let (mut behind, mut done) = (Duration::ZERO, Duration::ZERO);
    for (mut sleepers, b, d) in runs {
        all.0.append(&mut sleepers.0);
        behind = behind.max(b);
        done = done.max(d);
    }
    let _ = writeln!(out, "done {} {}", done.as_nanos(), behind.as_nanos());
    let _ = out.flush();
    // Until the bench closes stdin; then `all` kills and reaps the processes.
    for _ in lines {}
}

/// The processes started in pods' containers, by PID; killed and reaped on drop.
#[derive(Default)]
struct Sleepers(Vec<libc::pid_t>);

/// `clone3`'s flag for a child created in the cgroup `clone_args.cgroup` names (Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

impl Sleepers {
    /// Starts `/bin/sleep 3600` in the cgroup directory `dir`, returning once it has exec'd.
    /// The child is created in that cgroup (`clone3` with `CLONE_INTO_CGROUP`), so its exec is
    /// already there, as a container's first process is: a child that moved itself by writing
    /// to `cgroup.procs` before its exec would take the cgroup hierarchy's global lock for
    /// writing, which on this shared machine is too slow to start 1,000 processes a second.
    fn spawn(&mut self, dir: &Path) {
        let cgroup =
            std::fs::File::open(dir).unwrap_or_else(|e| panic!("open {}: {e}", dir.display()));
        let argv: [*const libc::c_char; 3] =
            [c"/bin/sleep".as_ptr(), c"3600".as_ptr(), std::ptr::null()];
        let envp: [*const libc::c_char; 1] = [std::ptr::null()];
        // SAFETY: all-zero is a valid clone_args (no optional field set).
        let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
        // CLONE_VFORK without CLONE_VM: the child has its own copy of memory, and this thread
        // waits until it has exec'd (or exited).
        args.flags = CLONE_INTO_CGROUP | libc::CLONE_VFORK as u64;
        args.exit_signal = libc::SIGCHLD as u64;
        args.cgroup = std::os::fd::AsRawFd::as_raw_fd(&cgroup) as u64;
        // SAFETY: clone3 with a valid clone_args of the size given. In the child (0) only
        // execve and _exit run, on pointers made before the clone (async-signal-safe).
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &mut args as *mut libc::clone_args,
                std::mem::size_of::<libc::clone_args>(),
            )
        };
        if pid == 0 {
            // SAFETY: see above; the arrays are null-terminated and live in this copy.
            unsafe {
                libc::execve(argv[0], argv.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
        }
        assert!(
            pid > 0,
            "clone3 into {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
        let pid = pid as libc::pid_t;
        self.0.push(pid);
        // It exec'd, unless it has exited already (execve failed).
        // SAFETY: waitpid on our own child, no status wanted.
        let exited = unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        assert_eq!(exited, 0, "/bin/sleep did not start in {}", dir.display());
    }
}

impl Drop for Sleepers {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: kill(2) on a PID of our own child, not reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        for &pid in &self.0 {
            // SAFETY: waitpid on our own child, no status wanted.
            unsafe {
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// `zbridge run` in Kubernetes mode, node ztunnel; killed by its PID and reaped on drop.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    /// The agent at its default log level (info, as the DaemonSet runs it), its programs on
    /// the mesh's attach cgroup, its maps under `pin_dir`, the ops endpoint on a free
    /// loopback port, in the mesh's `outside` cgroup (so that it dies with the bench's
    /// cgroups even if the bench is killed), plus `extra` flags; stderr to `dir`/agent.log.
    fn spawn(
        mesh: &Mesh,
        pin_dir: &Path,
        server: &FakeApiServer,
        node: &str,
        dir: &Path,
        extra: &[String],
    ) -> Agent {
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig_yaml()).expect("kubeconfig");
        let log = dir.join("agent.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_zbridge"));
        cmd.args(["--log-level", "info", "run", "--ztunnel-mode", "node"])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--node-name", node])
            .arg("--attach-cgroup")
            .arg(mesh.attach_dir())
            .arg("--pin-dir")
            .arg(pin_dir)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(extra)
            .env_remove("NODE_NAME")
            .env_remove("KUBECONFIG")
            .env_remove("ZBRIDGE_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"));
        mesh.cgroup.joiner(&mesh.outside).apply(&mut cmd);
        let child = cmd.spawn().expect("spawn zbridge");
        Agent { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log's last lines, for a failed wait.
    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The ops endpoint's address, from the log.
    fn ops_addr(&self) -> SocketAddr {
        const NEEDLE: &str = "ops endpoint listening on http://";
        wait_until(
            "the ops endpoint",
            || self.log_tail(),
            || self.log_text().contains(NEEDLE),
        );
        let log = self.log_text();
        let rest = log.split(NEEDLE).nth(1).expect("checked above");
        rest.split_whitespace()
            .next()
            .and_then(|a| a.parse().ok())
            .expect("the ops endpoint's address")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- agent log (last lines) ----\n{}", self.log_tail());
        }
    }
}

/// The value of one sample (exact series, labels included) of the agent's /metrics.
fn metric(ops: SocketAddr, series: &str) -> f64 {
    sample(&http_get(ops, "/metrics").1, series).unwrap_or(f64::NAN)
}

/// One histogram as exposed: cumulative counts by upper bound (ascending, `+Inf` last), the
/// count and the sum.
#[derive(Debug, Clone)]
struct Histogram {
    buckets: Vec<(f64, f64)>,
    count: f64,
    sum: f64,
}

impl Histogram {
    /// [`METRIC`] from the agent's /metrics.
    fn read(ops: SocketAddr) -> Histogram {
        Histogram::read_named(ops, METRIC)
    }

    /// The histogram `name` (without labels) from the agent's /metrics.
    fn read_named(ops: SocketAddr, name: &str) -> Histogram {
        let (code, text) = http_get(ops, "/metrics");
        assert_eq!(code, 200, "GET /metrics: {text}");
        Histogram::parse(&text, name, "").unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    }

    /// The stages of an enrolment in order, each as the histogram of the time from the exec
    /// until it got there: [`STAGES`], then [`METRIC`] (the map written).
    fn read_all(ops: SocketAddr) -> Vec<(&'static str, Histogram)> {
        let (code, text) = http_get(ops, "/metrics");
        assert_eq!(code, 200, "GET /metrics: {text}");
        let mut all: Vec<(&'static str, Histogram)> = STAGES
            .iter()
            .map(|&(label, name, selector)| {
                let histogram = Histogram::parse(&text, name, selector)
                    .unwrap_or_else(|| panic!("no {name}{{{selector}}} in:\n{text}"));
                (label, histogram)
            })
            .collect();
        let written = Histogram::parse(&text, METRIC, "")
            .unwrap_or_else(|| panic!("no {METRIC} in:\n{text}"));
        all.push(("written", written));
        all
    }

    /// The histogram `name` whose series carry the label `selector` (`stage="decided"`; empty:
    /// a histogram without labels).
    fn parse(text: &str, name: &str, selector: &str) -> Option<Histogram> {
        let prefix = format!("{name}_bucket{{");
        let mut buckets = Vec::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            let (labels, rest) = rest.split_once('}')?;
            if !labels.split(',').any(|l| l == selector) && !selector.is_empty() {
                continue;
            }
            let le = labels
                .split(',')
                .find_map(|l| l.strip_prefix("le=\""))?
                .trim_end_matches('"');
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let value = rest.split_whitespace().next()?.parse().ok()?;
            buckets.push((le, value));
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let series = |suffix: &str| {
            if selector.is_empty() {
                format!("{name}_{suffix}")
            } else {
                format!("{name}_{suffix}{{{selector}}}")
            }
        };
        Some(Histogram {
            buckets,
            count: sample(text, &series("count"))?,
            sum: sample(text, &series("sum"))?,
        })
    }

    /// What was observed since `earlier` (same buckets).
    fn minus(&self, earlier: &Histogram) -> Histogram {
        assert_eq!(
            self.buckets.len(),
            earlier.buckets.len(),
            "the buckets changed"
        );
        Histogram {
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|(now, then)| (now.0, now.1 - then.1))
                .collect(),
            count: self.count - earlier.count,
            sum: self.sum - earlier.sum,
        }
    }

    /// The bucket (lower, upper bound) holding the `p` quantile; `None` when empty.
    fn quantile(&self, p: f64) -> Option<(f64, f64)> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = (p * self.count).ceil().max(1.0);
        let mut lower = 0.0;
        for &(le, cumulative) in &self.buckets {
            if cumulative >= rank {
                return Some((lower, le));
            }
            lower = le;
        }
        None
    }

    fn quantile_text(&self, p: f64) -> String {
        bucket_text(self.quantile(p))
    }

    /// The exact mean (sum / count), or `-` when nothing was observed.
    fn mean_text(&self) -> String {
        if self.count > 0.0 {
            duration_text(self.sum / self.count)
        } else {
            "-".to_string()
        }
    }

    /// The observations per bucket, from the first bucket holding one to the last: `≤ 5.12 ms
    /// 3, ≤ 10.24 ms 1990, ...`.
    fn buckets_text(&self) -> String {
        let mut per_bucket = Vec::new();
        let mut below = 0.0;
        for &(le, cumulative) in &self.buckets {
            per_bucket.push((le, cumulative - below));
            below = cumulative;
        }
        let first = per_bucket.iter().position(|b| b.1 > 0.0);
        let last = per_bucket.iter().rposition(|b| b.1 > 0.0);
        let (Some(first), Some(last)) = (first, last) else {
            return "-".to_string();
        };
        per_bucket[first..=last]
            .iter()
            .map(|&(le, n)| {
                if le.is_infinite() {
                    format!("+Inf {n:.0}")
                } else {
                    format!("≤ {} {n:.0}", duration_text(le))
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The bucket of the largest observation.
    fn max_text(&self) -> String {
        bucket_text(self.quantile(1.0))
    }
}

/// `≤ 5.12 ms (> 2.56 ms)`.
fn bucket_text(bucket: Option<(f64, f64)>) -> String {
    match bucket {
        None => "-".to_string(),
        Some((lower, upper)) if upper.is_infinite() => format!("> {}", duration_text(lower)),
        Some((lower, upper)) => format!("≤ {} (> {})", duration_text(upper), duration_text(lower)),
    }
}

fn duration_text(seconds: f64) -> String {
    if seconds < 1e-3 {
        format!("{:.0} µs", seconds * 1e6)
    } else if seconds < 1.0 {
        format!("{:.2} ms", seconds * 1e3)
    } else {
        format!("{seconds:.2} s")
    }
}

/// A process's CPU time so far (user + system of all its threads), from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields
        .get(11..13)
        .map(|t| t.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}
