/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * zbridge: `orig_dst_by_tuple`, the record that answers ztunnel's SO_ORIGINAL_DST. sock_ops
 * stores a redirected connection's original destination under the connection's tuple (the
 * only key ztunnel's accepted socket shares with the client's); getsockopt takes it when
 * ztunnel asks, and deletes it. The map therefore holds the records of connections ztunnel
 * has not asked about yet: for microseconds each, unless a client gave up before ztunnel
 * accepted it, or ztunnel never asks (one not running, a connection it drops).
 *
 * It is the kernel's LRU hash, so that such stale records never fill it: when it is full, an
 * update takes back the least recently used element. That eviction is silent (nothing tells
 * the program); the evicted connection's ztunnel finds nothing (ZB_C_ORIG_DST_MISS).
 * docs/tuple-space.md says why this map and not a table of zbridge's own.
 */
#ifndef ZBRIDGE_TUPLE_MAP_H
#define ZBRIDGE_TUPLE_MAP_H

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, ZB_TUPLE_RECORDS);
	__type(key, struct conn_tuple);
	__type(value, struct orig_dst);
} orig_dst_by_tuple SEC(".maps");

/*
 * A connection's tuple as sock_ops and getsockopt both key it: seen from its client,
 * addresses IPv4-mapped, ports in network order. The caller reads the socket's fields up
 * front, unconditionally (with per-family reads clang merges the branches into loads off a
 * moved context pointer, which the verifier refuses), and passes the client's side and the
 * server's. Returns 0 for a socket that is not IP (nothing ztunnel will ask about).
 */
static __always_inline int zb_tuple_of(struct conn_tuple *t, __u32 family, __u32 client4,
				       const struct zb_ip *client6, __u16 client_port,
				       __u32 server4, const struct zb_ip *server6,
				       __u16 server_port)
{
	struct zb_ip ip = {};

	if (family == AF_INET) {
		zb_ip_from_v4(&ip, client4);
		__builtin_memcpy(t->src, ip.w, 16);
		zb_ip_from_v4(&ip, server4);
		__builtin_memcpy(t->dst, ip.w, 16);
	} else if (family == AF_INET6) {
		/* IPv4-mapped on a dual-stack socket already has the key's form. */
		__builtin_memcpy(t->src, client6->w, 16);
		__builtin_memcpy(t->dst, server6->w, 16);
	} else {
		return 0;
	}
	t->sport = client_port;
	t->dport = server_port;
	return 1;
}

/*
 * sock_ops: records `dst` for `tuple`. BPF_ANY: a record of the same tuple still waiting is
 * an earlier connection's (the client reused its 4-tuple before ztunnel asked about the
 * first), and the new connection's destination is the one its ztunnel must get.
 */
static __always_inline void zb_tuple_store(const struct conn_tuple *tuple,
					   const struct orig_dst *dst)
{
	if (bpf_map_update_elem(&orig_dst_by_tuple, tuple, dst, BPF_ANY))
		/* No element to take back (other CPUs held the free ones), or the bucket's lock
		 * was taken on this CPU: this connection's ztunnel will find nothing. */
		zb_count(ZB_C_ORIG_DST_NOT_STORED);
}

/* What zb_tuple_take found. */
enum zb_take {
	ZB_TAKE_ABSENT,       /* no record of the tuple */
	ZB_TAKEN,             /* copied, and deleted */
	ZB_TAKE_OTHER_FAMILY, /* a record for the other question, left in the map */
};

/* The question zb_tuple_take answers. ztunnel asks SOL_IP first and, when that fails,
 * SOL_IPV6: the first question about an IPv6 connection must leave its record for the
 * second. */
enum zb_question {
	ZB_ASK_V4, /* SO_ORIGINAL_DST: an IPv4 destination */
	ZB_ASK_V6, /* IP6T_SO_ORIGINAL_DST: an IPv6 destination */
};

/*
 * getsockopt: copies the record of `tuple` to `out` and deletes it, when it answers
 * `question`. Deleted, so that the map holds only records still waiting and the element is
 * free for the next update.
 */
static __always_inline enum zb_take zb_tuple_take(const struct conn_tuple *tuple,
						  enum zb_question question, struct orig_dst *out)
{
	struct orig_dst *dst = bpf_map_lookup_elem(&orig_dst_by_tuple, tuple);

	/* Evicted, never stored, already answered, or not a redirected connection. */
	if (!dst)
		return ZB_TAKE_ABSENT;
	/* Not this question's: left for the other one. */
	if ((question == ZB_ASK_V4) != zb_orig_dst_is_v4(dst))
		return ZB_TAKE_OTHER_FAMILY;
	/* Copied through the map's pointer: a sock_ops replacing this tuple's record at this
	 * moment could tear the copy, which takes a client reusing its 4-tuple within the
	 * microseconds between ztunnel's accept and its question. */
	*out = *dst;
	/* A failure means the record is already gone (evicted, or another question of the
	 * same connection on another thread took it): the copy is still this connection's. */
	bpf_map_delete_elem(&orig_dst_by_tuple, tuple);
	return ZB_TAKEN;
}

#endif /* ZBRIDGE_TUPLE_MAP_H */
