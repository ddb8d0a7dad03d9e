/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * zbridge: map layouts shared by the BPF programs and the Rust programmer
 * (programmer/src/layout.rs mirrors these structs; a test checks the two against the
 * object's BTF). Map names are part of the interface: `zbridge dump` and the tests use them.
 */
#ifndef ZBRIDGE_H
#define ZBRIDGE_H

/* cgroup_info.flags */
#define ZB_F_AMBIENT (1u << 0) /* an ambient pod: its connects go to ztunnel */
#define ZB_F_ZTUNNEL (1u << 1) /* the node's ztunnel: never redirected, binds rewritten */
#define ZB_F_EXEMPT (1u << 2)  /* a host cgroup exempt from inbound capture (kubelet) */
#define ZB_F_HAS_V4 (1u << 3)  /* addr4 is set */
#define ZB_F_HAS_V6 (1u << 4)  /* addr6 is set */
#define ZB_F_INPOD (1u << 5)   /* ambient, in-pod: ztunnel listens inside the pod's own network
				* namespace (ztunnel's `shared` mode, fed over ZDS), not on its
				* own address (bpf/inpod.h) */
#define ZB_F_DNS (1u << 6)     /* in-pod: DNS (port 53) goes to ztunnel's 15053 in the pod */

/* Value of cgroup_info_map, keyed by the __u64 cgroup id (inode of the cgroup directory). */
struct cgroup_info {
	__u32 flags;
	__u32 addr4;     /* the pod's IPv4 address, network byte order */
	__u8 addr6[16];  /* the pod's IPv6 address */
};

/* settings.flags */
#define ZB_S_HAS_ZTUNNEL4 (1u << 0) /* ztunnel_count4 > 0 */
#define ZB_S_HAS_ZTUNNEL6 (1u << 1) /* ztunnel_count6 > 0 */
#define ZB_S_FAIL_OPEN (1u << 2)    /* no ztunnel known: connect as if not in the mesh */
#define ZB_S_DEBUG (1u << 3)        /* bpf_printk what the programs decide */

/* How many ztunnel addresses of each family the programs spread connections over. Every
 * redirected connection of a pod shares one 4-tuple space per (ztunnel address, port): each
 * address more multiplies the connections a pod can hold in TIME_WAIT toward ztunnel
 * (docs/tuple-space.md). A power of two (the index is masked with it). */
#define ZB_MAX_ZTUNNEL_ADDRS 4

/* The single value (key 0) of the `settings` ARRAY map. */
struct settings {
	__u32 flags;
	__u16 outbound_port;    /* host order; 15001 */
	__u16 inbound_port;     /* host order; 15006 */
	__u32 levels;           /* bit N set: some entry sits at cgroup level N (root = 0) */
	__u8 ztunnel_count4;    /* addresses used in ztunnel_addr4, 0..ZB_MAX_ZTUNNEL_ADDRS */
	__u8 ztunnel_count6;    /* addresses used in ztunnel_addr6 */
	__u16 reserved;         /* 0 */
	__u32 generation;       /* bumped by the programmer after every change of cgroup_info_map
				 * or of these settings: a thread's cached decision (see
				 * connect_record) is good only for the generation it was made in */
	__u32 ztunnel_addr4[ZB_MAX_ZTUNNEL_ADDRS];     /* network byte order */
	__u8 ztunnel_addr6[ZB_MAX_ZTUNNEL_ADDRS][16];
};

/* Key of `pod_addr_map` (value: __u32 flags of the pod's entry): every address of an ambient
 * pod on this node, so that a host process connecting to it is sent to ztunnel's inbound port.
 * IPv4 addresses are stored IPv4-mapped (::ffff:a.b.c.d). */
struct pod_addr {
	__u8 addr[16];
};

/* Value of the original-destination maps: where a redirected connect was going. */
struct orig_dst {
	__u8 addr[16];  /* IPv4 stored IPv4-mapped (::ffff:a.b.c.d) */
	__u16 port;     /* network byte order */
	__u16 family;   /* AF_INET (2) or AF_INET6 (10): what the application asked for */
};

/* Value of `orig_dst_by_task`, a thread's own storage, created on its first connect from an
 * enrolled cgroup (or a host thread's first connect redirected to a pod). User space only
 * reads it (`programmer::layout::ConnectRecord`, for tests and diagnostics).
 *
 * The last redirected connect of the thread, handed from connect4/6 to sock_ops within the
 * same connect() call (armed, dst); and the thread's cached decision: the cgroup_info entry
 * that applied to its cgroup, so that its next connects skip the walk to the nearest enrolled
 * ancestor and the hash lookup (a good part of connect4's time: BENCHMARKS.md). The cache is
 * good while the thread is still in `cached_cgroup` (cgroup ids are never reused) and
 * settings.generation is still `cached_generation` (the programmer bumps it after every change
 * of cgroup_info_map). Only found entries are cached: a thread with no enrolled ancestor walks
 * every time, and so sees its pod's enrolment on its very next connect. */
/* connect_record.flags */
#define ZB_REC_INPOD (1u << 0) /* to ztunnel's listener in the pod's own namespace: the
				* tuple record is keyed by that namespace too (inpod_capture.h) */

struct connect_record {
	__u32 armed;         /* 1 from connect4/6's redirect to the next TCP_CONNECT of the thread,
			      * which takes the record and disarms it */
	__u32 flags;         /* ZB_REC_*: how the armed redirect went */
	struct orig_dst dst;
	__u32 reserved;
	__u64 cached_cgroup; /* 0: nothing cached */
	__u32 cached_generation;
	__u32 reserved2;
	struct cgroup_info cached_info;
};

/* Key of `orig_dst_by_tuple`: a TCP connection seen from its client (src = the client).
 * Addresses IPv4-mapped like pod_addr, so that IPv4 sockets and IPv4-mapped IPv6 sockets
 * agree; ports in network byte order. */
struct conn_tuple {
	__u8 src[16];
	__u8 dst[16];
	__u16 sport;
	__u16 dport;
};

/* The tuple table's shape (shared with the Rust programmer); how it works and why it has
 * this shape: tuple_table.h. */
#define ZB_TUPLE_WAYS 4                /* a power of two */
#define ZB_TUPLE_HOT_SETS 256          /* a power of two: 1,024 slots, 64 KiB */
#define ZB_TUPLE_PORTS_PER_SET 8       /* a power of two: source ports sharing a hot set */
#define ZB_TUPLE_OVERFLOW_SETS 16384   /* a power of two: 65,536 slots, 4 MiB */
#define ZB_TUPLE_SETS (ZB_TUPLE_HOT_SETS + ZB_TUPLE_OVERFLOW_SETS)

/* The state in the low bits of tuple_slot.seq; the generation above it counts the slot's
 * claims, so that a reader's copy is known to be whole. */
#define ZB_SLOT_STATE_BITS 2
#define ZB_SLOT_STATE_MASK 3u
#define ZB_SLOT_FREE 0     /* never written, or an older record of a reused tuple, freed */
#define ZB_SLOT_PENDING 1  /* written by sock_ops, ztunnel has not asked yet */
#define ZB_SLOT_ANSWERED 2 /* ztunnel asked; kept for a repeated question until reused */
#define ZB_SLOT_BUSY 3     /* being written (claimed, not yet published) */

/* One record of orig_dst_by_tuple, one cache line: its sequence word, its tuple and its
 * record travel between the writer's CPU and the reader's together, in one transfer. */
struct tuple_slot {
	__u32 seq;                /* generation << ZB_SLOT_STATE_BITS | ZB_SLOT_* */
	struct conn_tuple tuple;
	struct orig_dst dst;
	__u32 evictions;          /* way 0's only: the set's count of evictions, whose low bits
				   * name the way replaced next (round robin); 0 in the others */
};
_Static_assert(sizeof(struct tuple_slot) == 64, "a slot is one cache line");

/* The value of `orig_dst_by_tuple` (key: the set's index): 256 bytes. */
struct tuple_set {
	struct tuple_slot way[ZB_TUPLE_WAYS];
};
_Static_assert(sizeof(struct tuple_set) == 256, "a set is four whole cache lines");

/* Indices of the per-CPU `counters` array (values __u64, summed over CPUs by the reader). */
enum zb_counter {
	ZB_C_REDIRECTED_OUT = 0, /* an ambient pod's connect sent to ztunnel's outbound port */
	ZB_C_REDIRECTED_IN = 1,  /* a host process's connect to an ambient pod sent to inbound */
	ZB_C_PASSED = 2,         /* an ambient pod's connect left alone by a rule (loopback...) */
	ZB_C_FAIL_CLOSED = 3,    /* no ztunnel known: the connect was refused */
	ZB_C_FAIL_OPEN = 4,      /* no ztunnel known: the connect went out uncaptured */
	ZB_C_ORIG_DST_HIT = 5,   /* SO_ORIGINAL_DST answered from orig_dst_by_tuple */
	ZB_C_ORIG_DST_MISS = 6,  /* SO_ORIGINAL_DST on a capture socket with no entry */
	ZB_C_REFUSED_LOOP = 7,   /* a connect straight to a capture port, refused */
	ZB_C_BIND_REWRITTEN = 8, /* ztunnel's bind to a pod address moved to its own */
	ZB_C_ORIG_DST_EVICTED = 9, /* a record replaced before ztunnel asked (its set was full),
				    * or not stored (other writers kept taking its slots) */
	ZB_C_REDIRECTED_DNS = 10,  /* in-pod: a DNS query sent to ztunnel's 15053 in the pod */
	ZB_C_ORIG_DST_LOCAL = 11,  /* in-pod: SO_ORIGINAL_DST of an accepted inbound socket
				    * answered with its local address (sk_lookup kept it) */
	ZB_C_MAX = 12,
};

/* Default sizes; cgroup_info_map and pod_addr_map are resized by the loader. */
#define ZB_CGROUP_ENTRIES 65536
/* Deepest cgroup level the programs look at (bits of settings.levels). */
#define ZB_MAX_LEVELS 32

#endif /* ZBRIDGE_H */
