// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * zbridge's exec tap: for every exec on the machine, one record of what the watcher would
 * otherwise read from /proc (several syscalls per exec; BENCHMARKS.md, "Exec tap"): the
 * process id, its cgroup v2 id and its network namespace inode, with the time.
 *
 * The program is a raw tracepoint on sched_process_exec (BPF_PROG_TYPE_RAW_TRACEPOINT): it
 * attaches by name (BPF_RAW_TRACEPOINT_OPEN), so it needs neither tracefs (classic tracepoints
 * look their id up there) nor the BTF-typed "tracing" programs (fentry, tp_btf) that some
 * kernels refuse.
 *
 * Ordering: exec_binprm() calls trace_sched_process_exec() and then proc_exec_connector(), in
 * the execing task. The record is committed to the ring buffer before the proc connector's
 * exec event is even built, so a watcher that receives the event can already read the record.
 *
 * Built by watcher/build.rs with `clang -g` (CO-RE relocations need the BTF); loaded by
 * watcher/src/exec_tap.rs, which mirrors `struct exec_tap_record`.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

/* The kernel fields the program reads (CO-RE). */
#include "kernel.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* One exec. The layout is part of the interface: exec_tap.rs decodes it (24 bytes). */
struct exec_tap_record {
	__u64 ktime_ns;   /* bpf_ktime_get_ns(): CLOCK_MONOTONIC, the connector's clock */
	__u64 cgroup_id;  /* the cgroup v2 id: the inode of the cgroup's directory */
	__u32 tgid;       /* the process id, as the connector's exec event reports it */
	__u32 netns_inum; /* the inode of /proc/<tgid>/ns/net; 0 if it could not be read */
};

/* 1 MiB: 32,768 records (24 bytes + 8 of header). The watcher drains it on every exec event;
 * sized so that a stalled watcher overruns its connector socket (and rescans, which resets the
 * matching) about when this ring fills, not long after (BENCHMARKS.md, "Watcher"). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} exec_tap_events SEC(".maps");

/* The doorbell: the cgroup id of each exec that is the first the tap has seen in its cgroup,
 * with a wakeup. Such an exec is the one an enrolment waits for: a watcher sleeping a storm's
 * coalescing window polls this ring and ends the window early (watcher/src/connector/batch.rs);
 * every other exec waits for the window. Only a hint, so small: when the watcher does not
 * drain it (no storm), records that do not fit are not written, and nothing is counted. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 12);
} exec_tap_new_cgroups SEC(".maps");

/* The cgroups the tap has seen an exec in. LRU: a cgroup forgotten after about 4,096 others
 * is only rung for again (one window ended early); a pod's first exec is what matters, and it
 * comes soon after its cgroup is made. Small, as an LRU hash allocates all its elements up
 * front (about 64 bytes each) on every node. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1 << 12);
	__type(key, __u64);
	__type(value, __u8);
} exec_tap_seen_cgroups SEC(".maps");

/* Records that did not fit in the ring. Per-CPU so that counting never contends. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} exec_tap_dropped SEC(".maps");

/* The ring is full: the watcher reads /proc for this exec; the count makes it visible. */
static __always_inline void count_dropped(void)
{
	__u32 zero = 0;
	__u64 *dropped = bpf_map_lookup_elem(&exec_tap_dropped, &zero);

	/* The array always holds key 0; the check is for the verifier. */
	if (dropped)
		__sync_fetch_and_add(dropped, 1);
}

/* Rings the doorbell if this is the first exec the tap sees in `cgroup_id`. After the record
 * (if the ring had room): a watcher woken by the doorbell finds it in the ring. BPF_NOEXIST makes one of two
 * first execs racing on two CPUs the first. The wakeup is forced: it is rare (once per
 * cgroup), and it is what the doorbell is for. */
static __always_inline void ring_new_cgroup(__u64 cgroup_id)
{
	__u8 seen = 1;

	if (bpf_map_lookup_elem(&exec_tap_seen_cgroups, &cgroup_id))
		return;
	if (bpf_map_update_elem(&exec_tap_seen_cgroups, &cgroup_id, &seen, BPF_NOEXIST) != 0)
		return;
	bpf_ringbuf_output(&exec_tap_new_cgroups, &cgroup_id, sizeof(cgroup_id),
			   BPF_RB_FORCE_WAKEUP);
}

SEC("raw_tracepoint/sched_process_exec")
int exec_tap(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct exec_tap_record rec;

	/* Taken first: the connector stamps its event later in the same exec, so the record's
	 * time is never after the event's (the watcher matches on that). */
	rec.ktime_ns = bpf_ktime_get_ns();
	/* After de_thread(): a non-leader thread that execs has taken the leader's pid, so the
	 * upper half is the tgid the connector reports. */
	rec.tgid = bpf_get_current_pid_tgid() >> 32;
	rec.cgroup_id = bpf_get_current_cgroup_id();
	/* A failed read leaves 0 (BPF_CORE_READ zeroes on fault); nsproxy is only NULL for an
	 * exiting task, which cannot be execing. The watcher reads /proc when it sees 0. */
	rec.netns_inum = BPF_CORE_READ(task, nsproxy, net_ns, ns.inum);

	/* Copied in (not reserve + commit around the reads above): the record is reserved and
	 * committed within a few instructions, so a slower exec on another CPU holds back the
	 * records after its own for the least time. No wakeup: the watcher never sleeps on this
	 * ring (it reads it when the connector's event arrives), and a wakeup would cost an
	 * irq_work on every exec of the machine. */
	if (bpf_ringbuf_output(&exec_tap_events, &rec, sizeof(rec), BPF_RB_NO_WAKEUP) != 0)
		count_dropped();
	ring_new_cgroup(rec.cgroup_id);
	return 0;
}
