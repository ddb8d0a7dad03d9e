//! The world of one end-to-end test: a mesh (cgroups, namespaces), a private bpffs, a
//! workloads file, listeners, and the real `zbridge run --standalone` binary. Everything is
//! removed on drop, the agent first.

#![allow(dead_code)] // each e2e test file uses its own part of this module

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use programmer::layout::CgroupInfo;
use programmer::MapBackend;
use testkit::mesh::{self, Mesh};
use testkit::ztunnel::{self, Helper, Listener};
use testkit::{BpfFs, FakeZtunnel};

/// The pod's own port (a listener on loopback and on the pod's addresses).
pub const POD_PORT: u16 = 8080;

/// How long a condition may take before the test fails (a deadline, not a measurement).
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A running agent, killed by its PID on drop; its log is printed when the test fails.
pub struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    /// Spawns `zbridge --log-level info run` with the mesh's attach cgroup, `pin_dir` and an
    /// ops endpoint on a free loopback port, plus what `mode` adds (the mode's flags and
    /// environment); its stderr goes to `log`.
    pub fn spawn(
        mesh: &Mesh,
        pin_dir: &Path,
        log: PathBuf,
        mode: impl FnOnce(&mut Command),
    ) -> Agent {
        let log_file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_zbridge"));
        cmd.args(["--log-level", "info", "run"])
            .arg("--attach-cgroup")
            .arg(mesh.attach_dir())
            .arg("--pin-dir")
            .arg(pin_dir)
            // Port 0: tests run in parallel; the log names the port (see `World::ops_addr`).
            .args(["--metrics-addr", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        mode(&mut cmd);
        // The agent lives in the test's cgroup, so that it is killed with it even if this
        // process dies; it stays in the host network namespace (the proc connector needs it).
        let join = mesh.cgroup.pre_exec_join(&mesh.outside);
        // SAFETY: the hook only writes to cgroup.procs.
        unsafe {
            cmd.pre_exec(join);
        }
        let child = cmd.spawn().expect("spawn zbridge");
        Agent { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal (SIGTERM, SIGHUP) to the agent.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the PID of our own child.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// Waits for the agent to exit; its exit status.
    pub fn wait(mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its exit status if it exits within `within` (polled every millisecond, so that the
    /// moment it exits is known to about that).
    pub fn exited_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Where its stderr goes.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- agent log ({}) ----\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// One test's world. Field order is drop order: the agent goes first, the mesh last.
pub struct World {
    pub agent: Option<Agent>,
    pub ztunnel: Option<FakeZtunnel>,
    pub service: Listener,
    /// The pod's own process: a listener on 127.0.0.1, ::1 and its addresses, port 8080.
    pub pod: Listener,
    pub sleepers: Vec<Helper>,
    pub bpffs: BpfFs,
    pub dir: tempfile::TempDir,
    pub workloads: PathBuf,
    pub mesh: Mesh,
}

impl World {
    /// A mesh with the service and the pod's listener running, a fake ztunnel (upstream
    /// connects on) unless `with_ztunnel` is false, and a bpffs. The agent is not started.
    pub fn new(prefix: &str, with_ztunnel: bool) -> World {
        let mesh = Mesh::new(prefix).expect("mesh");
        let bpffs = BpfFs::new(prefix).expect("bpffs");
        let dir = tempfile::tempdir().unwrap();
        let workloads = dir.path().join("workloads.yaml");
        let service = ztunnel::service(
            &mesh.node_ns,
            &mesh.cgroup,
            &mesh.outside,
            &mesh::service_addrs(),
        )
        .expect("service");
        let pod_addrs: Vec<SocketAddr> = ["127.0.0.1", "::1"]
            .iter()
            .map(|ip| ip.parse::<IpAddr>().unwrap())
            .chain([mesh::POD4, mesh::POD6])
            .map(|ip| SocketAddr::new(ip, POD_PORT))
            .collect();
        let pod = ztunnel::service(&mesh.pod_ns, &mesh.cgroup, &mesh.app, &pod_addrs).expect("pod");
        let ztunnel = with_ztunnel.then(|| {
            FakeZtunnel::start(
                &mesh.node_ns,
                &mesh.cgroup,
                &mesh.ztunnel,
                &[mesh::ZTUNNEL4, mesh::ZTUNNEL6],
                true,
            )
            .expect("fake ztunnel")
        });
        World {
            agent: None,
            ztunnel,
            service,
            pod,
            sleepers: Vec::new(),
            bpffs,
            dir,
            workloads,
            mesh,
        }
    }

    /// Writes the workloads file.
    pub fn write_workloads(&self, text: &str) {
        std::fs::write(&self.workloads, text).unwrap();
    }

    /// A long-lived process in a cgroup of the mesh (so the agent sees the cgroup live).
    pub fn sleeper(&mut self, path: &str) {
        let helper = Helper::spawn(
            &self.mesh.node_ns,
            &self.mesh.cgroup,
            path,
            &["sleep".to_string()],
        )
        .expect("sleeper");
        helper.wait_ready().expect("sleeper ready");
        self.sleepers.push(helper);
    }

    /// Starts `zbridge run --standalone` on this world, with `extra` flags.
    pub fn start_agent(&mut self, extra: &[&str]) {
        static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.dir.path().join(format!("agent-{run}.log"));
        let workloads = self.workloads.clone();
        let agent = Agent::spawn(&self.mesh, &self.pin_dir(), log, |cmd| {
            cmd.args(["--standalone", "--workloads"])
                .arg(workloads)
                .args(extra);
        });
        self.agent = Some(agent);
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs.pin_dir()
    }

    /// The pinned `cgroup_info_map`, or `None` while the agent has not made it yet.
    pub fn entries(&self) -> Option<BTreeMap<u64, CgroupInfo>> {
        let backend = programmer::KernelMaps::open(&self.pin_dir()).ok()?;
        Some(
            backend
                .cgroup_entries()
                .ok()?
                .into_iter()
                .map(|(id, info)| (id.0, info))
                .collect(),
        )
    }

    /// The ztunnel addresses the pinned `settings` hold.
    pub fn ztunnel_ips(&self) -> Option<Vec<IpAddr>> {
        let backend = programmer::KernelMaps::open(&self.pin_dir()).ok()?;
        Some(backend.settings().ok()?.ztunnel_ips())
    }

    /// Polls until `cond` holds on the pinned map, failing after [`DEADLINE`] with the agent's
    /// log.
    pub fn wait_for(&self, what: &str, cond: impl Fn(&BTreeMap<u64, CgroupInfo>) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(entries) = self.entries() {
                if cond(&entries) {
                    return;
                }
            }
            if let Some(agent) = &self.agent {
                // The agent may have exited with an error: say so rather than time out.
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for {what}; agent log:\n{}",
                    agent.log_text()
                );
            } else {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the pinned map holds entries for all of `paths`.
    pub fn wait_enrolled(&self, paths: &[&str]) {
        let ids: Vec<u64> = paths.iter().map(|p| self.mesh.id(p)).collect();
        self.wait_for(&format!("entries for {paths:?}"), |entries| {
            ids.iter().all(|id| entries.contains_key(id))
        });
    }

    /// Polls the agent's log until it contains `needle`.
    pub fn wait_log(&self, what: &str, needle: &str) {
        let agent = self.agent.as_ref().expect("agent running");
        let deadline = Instant::now() + DEADLINE;
        while !agent.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; agent log:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address of the agent's ops endpoint, from its log.
    pub fn ops_addr(&self) -> SocketAddr {
        self.wait_log("the ops endpoint", "ops endpoint listening on http://");
        let log = self.agent.as_ref().unwrap().log_text();
        let rest = log
            .split("ops endpoint listening on http://")
            .nth(1)
            .unwrap();
        rest.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// `GET path` on the ops endpoint: status code and body.
    pub fn ops_get(&self, path: &str) -> (u16, String) {
        http_get(self.ops_addr(), path)
    }

    /// `/readyz`'s body once `want` holds for it (within the deadline).
    pub fn wait_readyz(&self, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let (_, body) = self.ops_get("/readyz");
            if want(&body) {
                return body;
            }
            assert!(Instant::now() < deadline, "/readyz: {body}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn ztunnel(&self) -> &FakeZtunnel {
        self.ztunnel
            .as_ref()
            .expect("this world has a fake ztunnel")
    }
}

/// `GET path`: the status code (0 if the server answers nothing) and the body.
pub use testkit::http::get as http_get;

/// The default workloads file of a world (ztunnel with both addresses, the app pod ambient).
pub fn default_workloads(world: &World) -> String {
    world.mesh.workloads(&[mesh::ZTUNNEL4, mesh::ZTUNNEL6], "")
}

/// A world with the agent running and the app pod and ztunnel enrolled.
pub fn running_world(prefix: &str) -> World {
    let mut world = World::new(prefix, true);
    world.write_workloads(&default_workloads(&world));
    world.start_agent(&[]);
    world.wait_enrolled(&[&world.mesh.app.clone(), &world.mesh.ztunnel.clone()]);
    world
}
