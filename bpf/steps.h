/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * zbridge: step markers, for `scripts/bpf-steps.sh` (where a program's run time goes).
 *
 * ZB_STEPS_START takes a timestamp; each ZB_STEP(n) adds the time since the previous marker to
 * slot n of the per-CPU `zb_steps` array and takes a new timestamp (so each step's figure also
 * holds one timestamp's own cost: the steps named "a timestamp alone" measure it). Built with
 * -DZB_STEPS only (ZBRIDGE_BPF_STEPS=1 in the build's environment); otherwise the markers
 * compile to nothing and the map does not exist, so they stay in the sources at no cost and
 * never drift from the code they time.
 */
#ifndef ZBRIDGE_STEPS_H
#define ZBRIDGE_STEPS_H

/* The slots; scripts/bpf-steps.sh names them in its table. */
enum zb_step {
	ZB_STEP_GETSOCKOPT_SETTINGS = 0, /* settings, local port */
	ZB_STEP_GETSOCKOPT_TUPLE = 1,    /* the tuple from the socket's fields */
	ZB_STEP_GETSOCKOPT_TAKE = 2,     /* record looked up and deleted */
	ZB_STEP_GETSOCKOPT_ANSWER = 3,   /* answer written */
	ZB_STEP_GETSOCKOPT_COUNT = 4,    /* counter */
	ZB_STEP_GETSOCKOPT_CLOCK = 5,    /* a timestamp alone */
	ZB_STEP_SOCKOPS_RECORD = 10,     /* thread storage, armed */
	ZB_STEP_SOCKOPS_TUPLE = 11,      /* settings, ports, tuple */
	ZB_STEP_SOCKOPS_STORE = 13,      /* record stored (map update) */
	ZB_STEP_SOCKOPS_CLOCK = 14,      /* a timestamp alone */
	ZB_STEP_CONNECT_SETTINGS = 20,   /* settings, ztunnel address checks */
	ZB_STEP_CONNECT_RECORD = 21,     /* thread storage lookup */
	ZB_STEP_CONNECT_ENTRY = 22,      /* cgroup id, cached entry */
	ZB_STEP_CONNECT_REDIRECT = 23,   /* record armed, ztunnel chosen */
	ZB_STEP_CONNECT_COUNT = 24,      /* counter */
	ZB_STEP_CONNECT_CLOCK = 25,      /* a timestamp alone */
	ZB_STEP_MAX = 32,
};

#ifdef ZB_STEPS
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ZB_STEP_MAX);
	__type(key, __u32);
	__type(value, __u64);
} zb_steps SEC(".maps");

static __always_inline void zb_step_end(__u64 *last, __u32 step)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 *sum = bpf_map_lookup_elem(&zb_steps, &step);

	if (sum)
		*sum += now - *last;
	*last = bpf_ktime_get_ns();
}
#define ZB_STEPS_START __u64 zb_step_clock = bpf_ktime_get_ns()
#define ZB_STEP(step) zb_step_end(&zb_step_clock, step)
#else
#define ZB_STEPS_START do { } while (0)
#define ZB_STEP(step) do { } while (0)
#endif

#endif /* ZBRIDGE_STEPS_H */
