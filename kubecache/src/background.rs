//! Background threads yield the CPU to the agent's hot path.
//!
//! The pod status writer's work grows with the pods enrolled (a PATCH per newly captured pod,
//! its response parsed), and at a high rate of new pods it is most of the agent's CPU; none of
//! it is on the path of an enrolment (it runs after the map write). On a busy node it would
//! compete with the watcher, the resolver and the programmer for the same cores and delay the
//! next enrolments (BENCHMARKS.md, "Enrolment latency of new pods"). So its thread runs at a
//! lower priority: nice 10 (about a tenth of a nice-0 thread's share when both want the CPU)
//! and `SCHED_BATCH` (its wake-ups do not preempt a running thread). Not `SCHED_IDLE`: under a
//! sustained load that would hold the annotations back indefinitely. Lowering a thread's own
//! priority needs no capability; the hot path's is not raised (that would need CAP_SYS_NICE,
//! which the DaemonSet does not grant).

use std::io;

/// The nice value of a background thread.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's priority to [`BACKGROUND_NICE`] under `SCHED_BATCH`. Threads
/// it starts afterwards inherit it. A thread already nicer than that stays so.
pub fn lower_this_thread() -> io::Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // On Linux, PRIO_PROCESS with a thread id sets that thread's nice value only.
    // SAFETY: plain syscalls on this thread's own id; errno is read right after.
    unsafe {
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        if *libc::__errno_location() != 0 {
            return Err(io::Error::last_os_error());
        }
        if now < BACKGROUND_NICE
            && libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_is_lowered_and_no_other() {
        let own_policy = unsafe { libc::sched_getscheduler(0) };
        let (policy, nice) = std::thread::spawn(|| {
            lower_this_thread().expect("lowering its own priority needs no privilege");
            // SAFETY: plain syscalls on this thread.
            unsafe {
                let tid = libc::gettid() as libc::id_t;
                (
                    libc::sched_getscheduler(0),
                    libc::getpriority(libc::PRIO_PROCESS, tid),
                )
            }
        })
        .join()
        .unwrap();
        assert_eq!(policy, libc::SCHED_BATCH);
        assert!(nice >= BACKGROUND_NICE, "nice {nice}");
        // SAFETY: a plain syscall on this thread.
        assert_eq!(
            unsafe { libc::sched_getscheduler(0) },
            own_policy,
            "this thread untouched"
        );
    }
}
