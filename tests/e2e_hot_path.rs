//! End to end: `--realtime-priority` and `--hot-path-cpu` put the agent's hot-path threads
//! (watcher, resolver, programmer) under SCHED_FIFO on the one CPU asked for, leave its other
//! threads as they were, and the agent still enrols; a CPU it may not use stops it before
//! anything is attached.

mod e2e_support;

use std::time::Duration;

use e2e_support::{default_workloads, World};
use testkit::mesh::{ZTUNNEL4, ZTUNNEL6};

/// A thread's scheduling as /proc shows it: policy, real-time priority, allowed CPUs.
#[derive(Debug, PartialEq, Eq)]
struct ThreadScheduling {
    policy: u32,
    rt_priority: u32,
    cpus: String,
}

/// The scheduling of each thread of `pid`, by thread name.
fn threads_of(pid: u32) -> Vec<(String, ThreadScheduling)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        // Fields after the command's closing parenthesis start at field 3 (state); the
        // real-time priority is field 40 and the policy field 41 (proc_pid_stat(5)).
        let after: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or_default()
            .trim()
            .to_string();
        threads.push((
            comm.trim_end().to_string(),
            ThreadScheduling {
                rt_priority: after[40 - 3].parse().unwrap(),
                policy: after[41 - 3].parse().unwrap(),
                cpus,
            },
        ));
    }
    threads
}

/// The last CPU this process may run on.
fn last_allowed_cpu() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    let last = list.rsplit(',').next().unwrap();
    last.rsplit('-').next().unwrap().parse().unwrap()
}

#[test]
fn the_hot_path_runs_fifo_on_the_cpu_asked_and_the_agent_still_enrols() {
    if !testkit::require_root("the_hot_path_runs_fifo_on_the_cpu_asked_and_the_agent_still_enrols")
    {
        return;
    }
    let mut world = World::new("e2e-hot", true);
    let later = format!("{}/later", world.mesh.cgroup.child("attach/pods").unwrap());
    let extra = format!(
        "  - name: e2e/later\n    cgroup: {later}\n    address: 10.99.1.4\n    mode: ambient\n"
    );
    world.write_workloads(&world.mesh.workloads(&[ZTUNNEL4, ZTUNNEL6], &extra));
    let cpu = last_allowed_cpu().to_string();
    world.start_agent(&["--realtime-priority", "2", "--hot-path-cpu", &cpu]);
    let (app, ztunnel) = (world.mesh.app.clone(), world.mesh.ztunnel.clone());
    world.wait_enrolled(&[&app, &ztunnel]);
    // A workload whose subtree is made and run in now passes the pipeline's threads.
    std::fs::create_dir(world.mesh.cgroup.dir_of(&later)).unwrap();
    world.sleeper(&later);
    world.wait_enrolled(&[&later]);
    world.wait_log(
        "the hot path's settings",
        &format!(
            "hot path (watcher, resolver, programmer threads): SCHED_FIFO priority 2, on CPU {cpu}"
        ),
    );

    let pid = world.agent.as_ref().unwrap().pid();
    let threads = threads_of(pid);
    let fifo = ThreadScheduling {
        policy: libc::SCHED_FIFO as u32,
        rt_priority: 2,
        cpus: cpu.clone(),
    };
    for stage in ["watcher", "resolver", "programmer"] {
        let found: Vec<&ThreadScheduling> = threads
            .iter()
            .filter(|(name, _)| name == stage)
            .map(|(_, s)| s)
            .collect();
        assert_eq!(found, vec![&fifo], "{stage}: {threads:?}");
    }
    // Every other thread keeps the normal policy.
    for (name, scheduling) in &threads {
        if !["watcher", "resolver", "programmer"].contains(&name.as_str()) {
            assert_eq!(
                (scheduling.policy, scheduling.rt_priority),
                (libc::SCHED_OTHER as u32, 0),
                "{name}: {threads:?}"
            );
        }
    }
}

#[test]
fn a_cpu_the_agent_may_not_use_stops_it_before_anything_is_attached() {
    if !testkit::require_root("a_cpu_the_agent_may_not_use_stops_it_before_anything_is_attached") {
        return;
    }
    let mut world = World::new("e2e-hotcpu", true);
    world.write_workloads(&default_workloads(&world));
    world.start_agent(&["--hot-path-cpu", "1000"]);
    let agent = world.agent.as_mut().unwrap();
    let status = agent
        .exited_within(Duration::from_secs(10))
        .expect("the agent refused to start");
    let log = agent.log_text();
    assert!(!status.success(), "{log}");
    // The error is the log's last line, after every line logged before it.
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(
            "zbridge: error: --hot-path-cpu 1000: the kernel refused to run the hot path there"
        ),
        "{log}"
    );
    let pins: Vec<_> = std::fs::read_dir(world.pin_dir())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(pins.is_empty(), "pinned before the refusal: {pins:?}");
}
