//! The hot path's threads (watcher, resolver, programmer) ask the scheduler for a short time
//! slice, so that their wake-ups preempt longer-running work.
//!
//! An enrolment passes three thread wake-ups (the kernel wakes the watcher, the watcher the
//! resolver, the resolver the programmer), each with tens of µs of work; on a busy node each
//! woken thread waited for a CPU behind whatever ran there, for up to a slice of the
//! scheduler's (BENCHMARKS.md, "Enrolment latency of new pods": the hot threads were runnable
//! and not running most of the time). Since Linux 6.12 a `SCHED_OTHER` thread may ask for its
//! own slice (`sched_setattr` with `sched_runtime`, 0.1 to 100 ms), and the scheduler
//! (EEVDF, `PREEMPT_SHORT`) lets a woken thread with a shorter slice preempt a running one with
//! a longer slice. It needs no capability and changes neither the thread's weight (nice) nor
//! its policy: the hot path gets the CPU sooner, not more of it. Older kernels ignore the
//! field for `SCHED_OTHER`.
//!
//! Two opt-in settings go further ([`HotPathScheduling`], `zbridge run --realtime-priority`
//! and `--hot-path-cpu`), for nodes where a pod's first exec must be enrolled within a
//! hundred µs or so:
//! - a real-time policy (`SCHED_FIFO`): a woken hot-path thread preempts any `SCHED_OTHER`
//!   work at once instead of after a slice. It needs CAP_SYS_NICE, which the DaemonSet does
//!   not grant unless the operator adds it. The threads sleep between events; a storm keeps
//!   them busy, and then the kernel's real-time throttling (`sched_rt_runtime_us`) and fair
//!   server still leave the other work of that CPU a share;
//! - one CPU for the three threads: a hand-off then wakes a thread on the CPU that is running
//!   anyway, instead of waking another CPU, which in a virtual machine means waking an idle
//!   vCPU through the hypervisor. The price: the three stages share one CPU in a storm.
//!
//! A setting the operator asked for and the kernel refuses is an error: the agent does not
//! start (checked on a probe thread before anything is attached, [`HotPathScheduling::check`]).

use std::io;
use std::time::Duration;

/// How the hot path's threads are scheduled, beyond the short slice they always ask for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HotPathScheduling {
    /// `SCHED_FIFO` at this priority (1 to 99) instead of `SCHED_OTHER`.
    pub realtime_priority: Option<u8>,
    /// The CPU the three threads run on, all of them.
    pub cpu: Option<usize>,
}

impl HotPathScheduling {
    /// The settings in words, for the log ("SCHED_FIFO priority 1, on CPU 0"); `None` when
    /// none is set.
    pub fn describe(&self) -> Option<String> {
        let parts: Vec<String> = [
            self.realtime_priority
                .map(|p| format!("SCHED_FIFO priority {p}")),
            self.cpu.map(|c| format!("on CPU {c}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    }

    /// Applies the settings to a short-lived thread and says why the kernel refused, if it
    /// did, in the flags' words: the agent checks before it touches anything.
    pub fn check(&self) -> anyhow::Result<()> {
        let settings = *self;
        let result = std::thread::Builder::new()
            .name("hot-path-check".into())
            .spawn(move || settings.apply())
            .map_err(|e| {
                anyhow::anyhow!("cannot start a thread to check the hot path's scheduling: {e}")
            })?
            .join()
            .map_err(|_| anyhow::anyhow!("the hot path's scheduling check panicked"))?;
        result
    }

    /// Puts the calling thread under these settings; a refusal says which flag and the likely
    /// cause.
    pub fn apply(&self) -> anyhow::Result<()> {
        if let Some(cpu) = self.cpu {
            pin_to_cpu(cpu).map_err(|e| {
                anyhow::anyhow!(
                    "--hot-path-cpu {cpu}: the kernel refused to run the hot path there ({e}); \
                     the CPUs this process may use: {}",
                    allowed_cpus().unwrap_or_else(|e| format!("unknown ({e})"))
                )
            })?;
        }
        if let Some(priority) = self.realtime_priority {
            set_fifo(priority).map_err(|e| {
                let hint = if e.raw_os_error() == Some(libc::EPERM) {
                    " (it needs CAP_SYS_NICE; with cgroup v1 real-time group scheduling, also \
                     real-time runtime in the agent's cgroup)"
                } else {
                    ""
                };
                anyhow::anyhow!(
                    "--realtime-priority {priority}: the kernel refused SCHED_FIFO for the hot \
                     path's threads: {e}{hint}"
                )
            })?;
        }
        Ok(())
    }
}

/// Runs the calling thread on `cpu` only.
fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `cpu` is within the set's bits (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: a valid set of the size given, for this thread (0).
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPUs the calling thread may run on, as a list ("0,1").
fn allowed_cpus() -> io::Result<String> {
    let cpus = cpus_of(0)?;
    Ok(cpus
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(","))
}

/// The CPUs thread `tid` (0: this thread) may run on.
pub(super) fn cpus_of(tid: libc::pid_t) -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; the kernel fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid set of the size given.
    let rc =
        unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let bits = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: every index is within the set's bits.
    Ok((0..bits)
        .filter(|c| unsafe { libc::CPU_ISSET(*c, &set) })
        .collect())
}

/// `SCHED_FIFO` at `priority` for the calling thread.
fn set_fifo(priority: u8) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: a valid sched_param, for this thread (0).
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The policy and real-time priority of thread `tid` (0: this thread).
#[cfg(test)]
pub(super) fn policy_of(tid: libc::pid_t) -> io::Result<(u32, u32)> {
    let attr = get_attr(tid)?;
    Ok((attr.policy, attr.priority))
}

/// The slice asked for: the kernel's shortest. A stage's work per wake-up is well within it.
pub const HOT_PATH_SLICE: Duration = Duration::from_micros(100);

/// `struct sched_attr` (include/uapi/linux/sched/types.h), version 1 (with utilization
/// clamps; 56 bytes).
#[repr(C)]
#[derive(Debug, Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// Asks for [`HOT_PATH_SLICE`] for the calling thread, keeping its policy (`SCHED_OTHER`) and
/// nice value.
pub fn ask_short_slice() -> io::Result<()> {
    let mut attr = get_attr(0)?;
    attr.size = std::mem::size_of::<SchedAttr>() as u32;
    attr.flags = 0;
    attr.runtime = HOT_PATH_SLICE.as_nanos() as u64;
    // SAFETY: a valid sched_attr of the size it says, for this thread (0).
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The slice of thread `tid` (0: this thread): the one it asked for, else the kernel's.
#[cfg(test)]
pub(super) fn slice_of(tid: libc::pid_t) -> io::Result<Duration> {
    Ok(Duration::from_nanos(get_attr(tid)?.runtime))
}

fn get_attr(tid: libc::pid_t) -> io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    // SAFETY: the kernel writes at most `size` bytes into `attr`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid,
            &mut attr as *mut SchedAttr,
            std::mem::size_of::<SchedAttr>() as u32,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr)
}

/// Puts the calling thread, the stage `name`, on the hot path's scheduling. The short slice
/// is asked for first (it stays the thread's slice if it ever runs `SCHED_OTHER`); its refusal
/// is logged as a warning (a kernel older than 6.12 ignores the field rather than refuse it,
/// so a refusal is a seccomp profile or a kernel that forbids it), and the stage runs with
/// the default slice. A refused setting the operator asked for is the stage's error (checked
/// before start, so only a changed system gets here).
pub(super) fn enter(name: &str, settings: &HotPathScheduling) -> anyhow::Result<()> {
    if let Err(e) = ask_short_slice() {
        log::warn!("{name}: no short scheduler slice for the hot path, running with the kernel's default ({e})");
    }
    settings
        .apply()
        .map_err(|e| e.context(format!("{name}: the hot path's scheduling")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slice_is_the_threads_own_and_its_policy_and_nice_stay() {
        let before = get_attr(0).unwrap();
        let after = std::thread::spawn(|| {
            ask_short_slice().expect("no capability needed");
            get_attr(0).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(Duration::from_nanos(after.runtime), HOT_PATH_SLICE);
        assert_eq!((after.policy, after.nice), (before.policy, before.nice));
        assert_eq!(slice_of(0).unwrap(), Duration::from_nanos(before.runtime));
    }

    #[test]
    fn a_pinned_real_time_thread_runs_fifo_on_its_one_cpu() {
        if !testkit::require_root("a_pinned_real_time_thread_runs_fifo_on_its_one_cpu") {
            return;
        }
        let cpu = *cpus_of(0).unwrap().last().unwrap();
        let settings = HotPathScheduling {
            realtime_priority: Some(3),
            cpu: Some(cpu),
        };
        settings.check().expect("root may");
        let (policy, cpus) = std::thread::spawn(move || {
            enter("test", &settings).unwrap();
            (policy_of(0).unwrap(), cpus_of(0).unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(policy, (libc::SCHED_FIFO as u32, 3));
        assert_eq!(cpus, vec![cpu]);
        // The checking thread's settings did not leak into this one.
        assert_eq!(policy_of(0).unwrap().0, libc::SCHED_OTHER as u32);
    }

    #[test]
    fn a_cpu_the_process_may_not_use_is_refused_in_the_flags_words() {
        let settings = HotPathScheduling {
            realtime_priority: None,
            cpu: Some(1000),
        };
        let err = format!("{:#}", settings.check().unwrap_err());
        assert!(
            err.starts_with("--hot-path-cpu 1000: the kernel refused"),
            "{err}"
        );
        let allowed = allowed_cpus().unwrap();
        assert!(
            err.ends_with(&format!("the CPUs this process may use: {allowed}")),
            "{err}"
        );
    }

    #[test]
    fn without_cap_sys_nice_real_time_is_refused_and_says_so() {
        // Root has CAP_SYS_NICE; a thread that drops it shows what an unprivileged agent gets.
        if !testkit::require_root("without_cap_sys_nice_real_time_is_refused_and_says_so") {
            return;
        }
        let err = std::thread::spawn(|| {
            drop_cap_sys_nice();
            HotPathScheduling {
                realtime_priority: Some(1),
                cpu: None,
            }
            .apply()
            .unwrap_err()
        })
        .join()
        .unwrap();
        let err = format!("{err:#}");
        assert!(
            err.starts_with("--realtime-priority 1: the kernel refused SCHED_FIFO"),
            "{err}"
        );
        assert!(err.contains("it needs CAP_SYS_NICE"), "{err}");
    }

    /// Drops CAP_SYS_NICE from the calling thread's effective set (capabilities are per thread).
    fn drop_cap_sys_nice() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Default, Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        const CAP_SYS_NICE: u32 = 23; // include/uapi/linux/capability.h
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: version 3 takes two data structs; both point at valid memory.
        let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
        assert_eq!(rc, 0, "capget: {}", io::Error::last_os_error());
        data[0].effective &= !(1 << CAP_SYS_NICE);
        // SAFETY: as above; only this thread's effective set shrinks.
        let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
        assert_eq!(rc, 0, "capset: {}", io::Error::last_os_error());
    }
}
