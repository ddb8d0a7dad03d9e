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

/* Records `orig_dst_by_tuple` holds (its max_entries). A record waits only between the
 * connect and ztunnel's question, so this many wait at once only when records are left
 * behind (clients that gave up, a ztunnel that never asks): the LRU then takes back the
 * oldest (tuple_map.h). A power of two, as the hash's bucket count is rounded up to one. */
#define ZB_TUPLE_RECORDS 65536

/* Indices of the per-CPU `counters` array (values __u64, summed over CPUs by the reader). */
enum zb_counter {
	ZB_C_REDIRECTED_OUT = 0, /* an ambient pod's connect sent to ztunnel's outbound port */
	ZB_C_REDIRECTED_IN = 1,  /* a host process's connect to an ambient pod sent to inbound */
	ZB_C_PASSED = 2,         /* an ambient pod's connect left alone by a rule (loopback...) */
	ZB_C_FAIL_CLOSED = 3,    /* no ztunnel known: the connect was refused */
	ZB_C_FAIL_OPEN = 4,      /* no ztunnel known: the connect went out uncaptured */
	ZB_C_ORIG_DST_HIT = 5,   /* SO_ORIGINAL_DST answered from orig_dst_by_tuple */
	ZB_C_ORIG_DST_MISS = 6,  /* SO_ORIGINAL_DST on a capture socket with no record: not
				  * stored, evicted by the LRU, already answered, or a
				  * connection that was not redirected; counted at the IPv6
				  * question, ztunnel's last, so once per connection */
	ZB_C_REFUSED_LOOP = 7,   /* a connect straight to a capture port, refused */
	ZB_C_BIND_REWRITTEN = 8, /* ztunnel's bind to a pod address moved to its own */
	ZB_C_ORIG_DST_NOT_STORED = 9, /* sock_ops could not store a connection's record (the
				       * LRU update failed): its ztunnel will find nothing */
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
