/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * zbridge: the maps and the small helpers the programs in zbridge.bpf.c share. BPF only
 * (the layouts the Rust side mirrors are in zbridge.h).
 */
#ifndef ZBRIDGE_HELPERS_H
#define ZBRIDGE_HELPERS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "kernel.h"
#include "zbridge.h"

/* From the libc and netfilter headers, which a BPF build does not include. */
#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80      /* linux/netfilter_ipv4.h */
#define IP6T_SO_ORIGINAL_DST 80 /* linux/netfilter_ipv6/ip6_tables.h */

/* Return values of cgroup sock_addr and sockopt programs. */
#define ZB_ALLOW 1
#define ZB_REFUSE 0 /* connect/bind fail with EPERM */

/* ---- maps (names are part of the interface: the programmer and `zbridge dump` use them) ---- */

/* HASH, not LRU: an evicted entry would let a pod's traffic bypass the mesh. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ZB_CGROUP_ENTRIES);
	__type(key, __u64);
	__type(value, struct cgroup_info);
} cgroup_info_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct settings);
} settings SEC(".maps");

/* Every address of an ambient pod on this node (value: the flags of its entry). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ZB_CGROUP_ENTRIES);
	__type(key, struct pod_addr);
	__type(value, __u32);
} pod_addr_map SEC(".maps");

/* connect → sockops: the original destination, kept in the calling thread's own storage.
 * connect4/6 and sock_ops' TCP_CONNECT callback run in the same connect() call of the same
 * thread (the source port is chosen between them), so one slot per thread is enough: it is
 * created on the thread's first redirected connect, overwritten by every later one (no
 * allocation, no delete, nothing left behind), and freed with the thread. sock_ops takes it
 * once, at the thread's next TCP_CONNECT (see `armed`). */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct connect_record);
} orig_dst_by_task SEC(".maps");

/* Per-CPU so that counting never contends between CPUs; the reader sums. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ZB_C_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* ---- helpers ---- */

/*
 * The id of `task`'s cgroup (cgroup v2): what bpf_get_current_cgroup_id() returns for the
 * current task (the cgroup's kernfs id, its directory's inode number), read through the task
 * pointer the caller holds already: three dependent loads instead of a helper call, which
 * is measurably cheaper per connect (BENCHMARKS.md). Calls are dear on this VM: its
 * kernel has retpolines and returns through the SRSO "safe RET" thunk. The programs run under
 * RCU, which keeps the css_set and the cgroup alive while they are read. (CO-RE: kernel.h;
 * CAP_PERFMON, which bpf_get_current_task_btf() needs already.)
 */
static __always_inline __u64 zb_task_cgroup_id(struct task_struct *task)
{
	return task->cgroups->dfl_cgrp->kn->id;
}

/* An address as four network-order words; IPv4 is IPv4-mapped (::ffff:a.b.c.d). */
struct zb_ip {
	__u32 w[4];
};

/* One 32-bit load of a context field: stops clang from merging neighbouring fields into a
 * 64-bit load or from addressing them off a moved context pointer, both of which the verifier
 * refuses for context structures. */
#define ZB_CTX(field) (*(volatile __typeof__(field) *)&(field))

/* One load of a word other CPUs change (settings.generation): read once, where the code
 * reads it, never merged with another read or repeated. */
#define ZB_READ_ONCE(x) (*(volatile __typeof__(x) *)&(x))

#define ZB_DEBUG(s, fmt, ...)                                                                      \
	do {                                                                                       \
		if ((s)->flags & ZB_S_DEBUG)                                                       \
			bpf_printk("zbridge: " fmt, ##__VA_ARGS__);                                \
	} while (0)

static __always_inline void zb_count(__u32 idx)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &idx);

	/* Atomic: sockops runs in softirq and may interrupt a connect on the same CPU. */
	if (value)
		__sync_fetch_and_add(value, 1);
}

/*
 * Memory ordering between CPUs: a reader's later loads stay after an earlier load
 * (settings.generation, then the entries it vouches for). x86 gives that to every plain load
 * (TSO: loads are not reordered with loads), so there only the compiler must be held back.
 * Elsewhere (arm64) BPF has no barrier instruction but its atomics that return a value,
 * which are fully ordered (an add whose result is unused compiles to one that is not). The
 * object is built for the target's architecture.
 */
#if defined(__TARGET_ARCH_x86)
static __always_inline void zb_load_barrier(void)
{
	asm volatile("" ::: "memory");
}
#else
/* A compare-and-swap that changes nothing (0 for 0) on this CPU's own counter line. */
static __always_inline void zb_load_barrier(void)
{
	__u32 idx = ZB_C_REDIRECTED_OUT;
	__u64 *value = bpf_map_lookup_elem(&counters, &idx);

	if (value)
		__sync_val_compare_and_swap(value, 0, 0);
}
#endif

static __always_inline const struct settings *zb_settings(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&settings, &zero);
}

static __always_inline void zb_ip_from_v4(struct zb_ip *ip, __u32 addr4)
{
	ip->w[0] = 0;
	ip->w[1] = 0;
	ip->w[2] = bpf_htonl(0xffff);
	ip->w[3] = addr4;
}

static __always_inline void zb_ip_from_bytes(struct zb_ip *ip, const __u8 *bytes)
{
	__builtin_memcpy(ip->w, bytes, 16);
}

static __always_inline int zb_ip_is_v4(const struct zb_ip *ip)
{
	return ip->w[0] == 0 && ip->w[1] == 0 && ip->w[2] == bpf_htonl(0xffff);
}

static __always_inline int zb_ip_eq(const struct zb_ip *a, const struct zb_ip *b)
{
	return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] &&
	       a->w[3] == b->w[3];
}

/* 127.0.0.0/8 (IPv4 or IPv4-mapped) and ::1. */
static __always_inline int zb_ip_is_loopback(const struct zb_ip *ip)
{
	if (zb_ip_is_v4(ip))
		return (ip->w[3] & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000);
	return ip->w[0] == 0 && ip->w[1] == 0 && ip->w[2] == 0 && ip->w[3] == bpf_htonl(1);
}

/* How many of ztunnel's addresses of `like`'s family the programs may use (0: none known). */
static __always_inline __u32 zb_ztunnel_count(const struct settings *s, const struct zb_ip *like)
{
	__u32 n = zb_ip_is_v4(like) ? s->ztunnel_count4 : s->ztunnel_count6;

	return n > ZB_MAX_ZTUNNEL_ADDRS ? ZB_MAX_ZTUNNEL_ADDRS : n;
}

/* ztunnel's address number `idx` of the same family as `like` (idx < ZB_MAX_ZTUNNEL_ADDRS). */
static __always_inline void zb_ztunnel_addr(const struct settings *s, const struct zb_ip *like,
					    __u32 idx, struct zb_ip *out)
{
	idx &= ZB_MAX_ZTUNNEL_ADDRS - 1;
	if (zb_ip_is_v4(like))
		zb_ip_from_v4(out, s->ztunnel_addr4[idx]);
	else
		zb_ip_from_bytes(out, s->ztunnel_addr6[idx]);
}

/* Whether `ip` is one of ztunnel's `n` addresses of its family. */
static __always_inline int zb_is_ztunnel_ip(const struct settings *s, const struct zb_ip *ip,
					    __u32 n)
{
	struct zb_ip zt = {};

	for (__u32 i = 0; i < ZB_MAX_ZTUNNEL_ADDRS; i++) {
		if (i >= n)
			break;
		zb_ztunnel_addr(s, ip, i, &zt);
		if (zb_ip_eq(&zt, ip))
			return 1;
	}
	return 0;
}

/*
 * Which of ztunnel's `n` addresses serves a destination (address and port, network order):
 * a hash of the destination, so that each destination always goes to the same ztunnel
 * address and the pod's connections spread over all of them. Mirrored by
 * programmer::layout::ztunnel_index (the end-to-end test predicts each landing with it):
 * the words are read as the CPU reads them, so that both sides agree on any byte order.
 */
static __always_inline __u32 zb_ztunnel_index(const struct zb_ip *dst, __u16 port, __u32 n)
{
	__u32 h = dst->w[0] ^ dst->w[1] ^ dst->w[2] ^ dst->w[3] ^ port;

	/* Fibonacci hashing spreads neighbouring addresses; the high half is the well-mixed one,
	 * and multiply-shift maps it onto [0, n) without a division. */
	h *= 0x9e3779b1u;
	return (__u32)(((__u64)(h >> 16) * n) >> 16);
}

/* Whether `ip` is the pod's own address (a pod talking to itself is never captured). */
static __always_inline int zb_is_own_ip(const struct cgroup_info *info, const struct zb_ip *ip)
{
	struct zb_ip own = {};

	if (zb_ip_is_v4(ip)) {
		if (!(info->flags & ZB_F_HAS_V4))
			return 0;
		zb_ip_from_v4(&own, info->addr4);
	} else {
		if (!(info->flags & ZB_F_HAS_V6))
			return 0;
		zb_ip_from_bytes(&own, info->addr6);
	}
	return zb_ip_eq(&own, ip);
}

/* The highest set bit of a non-zero `x` (BPF has no count-leading-zeros instruction). */
static __always_inline __u32 zb_fls(__u32 x)
{
	__u32 r = 0;

	if (x & 0xffff0000u) {
		x >>= 16;
		r += 16;
	}
	if (x & 0xff00u) {
		x >>= 8;
		r += 8;
	}
	if (x & 0xf0u) {
		x >>= 4;
		r += 4;
	}
	if (x & 0xcu) {
		x >>= 2;
		r += 2;
	}
	if (x & 0x2u)
		r += 1;
	return r;
}

/*
 * Copies to `*out` the entry of the calling process's cgroup or of its nearest enrolled
 * ancestor and returns 1, or returns 0 when there is none. Only the levels named in
 * settings.levels are looked up, deepest first (so the nearest wins), one step per set bit: a
 * node's entries sit at two or three levels, so the walk is two or three lookups, and with
 * nothing enrolled it costs none.
 *
 * A global function, not inlined: the verifier checks it once, on its own, and each caller
 * sees only its result. Inlined, the walk's 32 possible steps multiplied with every path of
 * connect4/6 (the unknown `levels`, the cache, the address checks) brought connect4 close to
 * the verifier's limit of processed instructions (BENCHMARKS.md). `out` may be NULL as far
 * as the verifier knows.
 */
__attribute__((noinline)) int zb_lookup_current(__u32 levels, struct cgroup_info *out)
{
	if (!out)
		return 0;
	for (int i = 0; i < ZB_MAX_LEVELS; i++) {
		const struct cgroup_info *info;
		__u32 level;
		__u64 id;

		if (!levels)
			break;
		level = zb_fls(levels);
		levels &= ~(1u << level);
		id = bpf_get_current_ancestor_cgroup_id(level);
		/* 0: the process's cgroup is shallower than this level. */
		if (!id)
			continue;
		info = bpf_map_lookup_elem(&cgroup_info_map, &id);
		if (info) {
			*out = *info;
			return 1;
		}
	}
	return 0;
}

/* Whether an original destination is IPv4 (stored IPv4-mapped). */
static __always_inline int zb_orig_dst_is_v4(const struct orig_dst *od)
{
	struct zb_ip ip = {};

	zb_ip_from_bytes(&ip, od->addr);
	return zb_ip_is_v4(&ip);
}

#endif /* ZBRIDGE_HELPERS_H */
