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
//! field for `SCHED_OTHER`. Raising the hot path's priority instead would need CAP_SYS_NICE,
//! which the DaemonSet does not grant.

use std::io;
use std::time::Duration;

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

/// Asks for the short slice on the calling thread, the stage `name`; a refusal is logged as a
/// warning (a kernel older than 6.12 ignores the field rather than refuse it, so a refusal is
/// a seccomp profile or a kernel that forbids it), and the stage runs with the default slice.
pub(super) fn enter(name: &str) {
    if let Err(e) = ask_short_slice() {
        log::warn!("{name}: no short scheduler slice for the hot path, running with the kernel's default ({e})");
    }
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
}
