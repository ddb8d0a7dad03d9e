// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * zbridge's socket hooks: send the TCP connects of ambient pods (and of host processes to
 * ambient pods) to the node's ztunnel, and give ztunnel back the original destination.
 *
 *   connect4/6   rewrite the destination to ztunnel:15001 (outbound) or :15006 (inbound) and
 *                remember the original one in the thread's own storage; with several
 *                ztunnel addresses, a hash of the destination picks one;
 *   sock_ops     once the client's source port is chosen (TCP_CONNECT, before the SYN
 *                leaves), copy that record to the connection's 4-tuple (the only key
 *                ztunnel's accepted socket shares);
 *   getsockopt   answer ztunnel's SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST from that record;
 *   bind4/6      ztunnel binding a pod's address (as under TPROXY) binds its own instead,
 *                since no TPROXY routing brings the replies back.
 *
 * Built by programmer/build.rs with `clang -g` (the loader needs the BTF).
 */
#include "helpers.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* The refusal a failing policy gives: fail open lets the connect out uncaptured. */
static __always_inline int zb_no_ztunnel(const struct settings *s)
{
	if (s->flags & ZB_S_FAIL_OPEN) {
		zb_count(ZB_C_FAIL_OPEN);
		return ZB_ALLOW;
	}
	zb_count(ZB_C_FAIL_CLOSED);
	ZB_DEBUG(s, "no ztunnel address: connect refused");
	return ZB_REFUSE;
}

/*
 * Copies to `*entry` the cgroup_info entry that applies to the calling thread (its cgroup's,
 * or its nearest enrolled ancestor's), from the thread's cached decision when it still holds
 * (struct connect_record says when), else from the walk, whose result is then cached. With
 * no entry, `*entry` stays as the caller zeroed it: flags 0, no role. `*rec` is the thread's
 * storage or NULL; a found entry creates it.
 */
static __always_inline void
zb_current_entry(const struct settings *s, struct connect_record **rec, struct cgroup_info *entry)
{
	struct connect_record *r = *rec;
	__u64 cgroup = bpf_get_current_cgroup_id();
	/* Read before the walk: an entry changed after this read bumps the generation past it,
	 * so a decision cached from a walk that saw the old entry is not used again. */
	__u32 generation = ZB_READ_ONCE(s->generation);

	if (r && r->cached_cgroup == cgroup && r->cached_generation == generation) {
		*entry = r->cached_info;
		return;
	}
	/* The walk's loads stay after the generation's (a weakly ordered CPU could otherwise
	 * load an old entry and cache it under a newer generation). */
	zb_load_barrier();
	if (!zb_lookup_current(s->levels, entry)) {
		/* Left its pod's cgroup, or the pod left the mesh. */
		if (r)
			r->cached_cgroup = 0;
		return;
	}
	if (!r)
		r = bpf_task_storage_get(&orig_dst_by_task, bpf_get_current_task_btf(), 0,
					 BPF_LOCAL_STORAGE_GET_F_CREATE);
	/* No storage (out of memory): the decision stands, only uncached. */
	if (r) {
		r->cached_cgroup = cgroup;
		r->cached_generation = generation;
		r->cached_info = *entry;
	}
	*rec = r;
}

/*
 * The connect decision shared by connect4 and connect6. `dst`/`port` (network order) are the
 * requested destination; on a redirect they are replaced by ztunnel's address and port and
 * *rewrite is set. Returns ZB_ALLOW or ZB_REFUSE.
 */
static __always_inline int zb_connect(struct bpf_sock_addr *ctx, struct zb_ip *dst, __u16 *port,
				      int *rewrite)
{
	const struct settings *s = zb_settings();
	/* Zeroed: no role, unless zb_current_entry finds one. */
	struct cgroup_info entry = {};
	struct connect_record *rec;
	struct zb_ip zt = {};
	__u16 capture_port;
	__u32 counter, n;

	/* The array always holds key 0; the check is for the verifier. */
	if (!s)
		return ZB_ALLOW;
	n = zb_ztunnel_count(s, dst);
	if (n && zb_is_ztunnel_ip(s, dst, n)) {
		__u16 p = bpf_ntohs(*port);

		/* Straight to a capture port, not rewritten here: ztunnel would find no original
		 * destination, fall back to the local address and proxy to itself in a loop. */
		if (p == s->outbound_port || p == s->inbound_port) {
			zb_count(ZB_C_REFUSED_LOOP);
			ZB_DEBUG(s, "connect to capture port %d refused", p);
			return ZB_REFUSE;
		}
		/* ztunnel's other ports (15008 HBONE, 15053 DNS, ...) are reached directly. */
		return ZB_ALLOW;
	}
	/* Nothing enrolled on this node: no pod to capture and no pod address to protect. */
	if (!s->levels)
		return ZB_ALLOW;

	rec = bpf_task_storage_get(&orig_dst_by_task, bpf_get_current_task_btf(), 0, 0);
	zb_current_entry(s, &rec, &entry);
	if (entry.flags & ZB_F_ZTUNNEL)
		/* ztunnel's own connects go where ztunnel wants them. */
		return ZB_ALLOW;
	if (entry.flags & ZB_F_AMBIENT) {
		/* Loopback stays in the pod; a pod talking to itself is not mesh traffic. */
		if (zb_ip_is_loopback(dst) || zb_is_own_ip(&entry, dst)) {
			zb_count(ZB_C_PASSED);
			return ZB_ALLOW;
		}
		if (!n)
			return zb_no_ztunnel(s);
		capture_port = s->outbound_port;
		counter = ZB_C_REDIRECTED_OUT;
	} else {
		/* A host process (no enrolled ancestor, or one not in the mesh). Exempt cgroups
		 * (the kubelet) reach pods directly, so that probes work. */
		if (entry.flags & ZB_F_EXEMPT)
			return ZB_ALLOW;
		/* Loopback is never a pod's address: spare the lookup. */
		if (zb_ip_is_loopback(dst))
			return ZB_ALLOW;
		/* Only ambient pods on this node are captured inbound. */
		if (!bpf_map_lookup_elem(&pod_addr_map, dst))
			return ZB_ALLOW;
		if (!n)
			return zb_no_ztunnel(s);
		capture_port = s->inbound_port;
		counter = ZB_C_REDIRECTED_IN;
	}

	/* The record rides on the thread: overwritten by each redirected connect, read by
	 * sock_ops before this connect() returns. A thread of an enrolled cgroup has its storage
	 * from zb_current_entry; a host process connecting to a pod gets it here. */
	if (!rec)
		rec = bpf_task_storage_get(&orig_dst_by_task, bpf_get_current_task_btf(), 0,
					   BPF_LOCAL_STORAGE_GET_F_CREATE);
	/* Without the record ztunnel could not tell where to go; refusing is the safe answer. */
	if (!rec) {
		zb_count(ZB_C_FAIL_CLOSED);
		return ZB_REFUSE;
	}
	rec->armed = 1;
	__builtin_memcpy(rec->dst.addr, dst->w, 16);
	rec->dst.port = *port;
	rec->dst.family = zb_ip_is_v4(dst) ? AF_INET : AF_INET6;
	zb_ztunnel_addr(s, dst, zb_ztunnel_index(dst, *port, n), &zt);
	ZB_DEBUG(s, "connect to port %d redirected to %d", bpf_ntohs(*port), capture_port);
	*dst = zt;
	*port = bpf_htons(capture_port);
	*rewrite = 1;
	zb_count(counter);
	return ZB_ALLOW;
}

SEC("cgroup/connect4")
int connect4(struct bpf_sock_addr *ctx)
{
	struct zb_ip dst = {};
	__u16 port = ctx->user_port;
	int rewrite = 0;
	int verdict;

	/* Only TCP is captured (UDP, DNS included, goes its own way). */
	if (ctx->type != SOCK_STREAM)
		return ZB_ALLOW;
	zb_ip_from_v4(&dst, ctx->user_ip4);
	verdict = zb_connect(ctx, &dst, &port, &rewrite);
	if (rewrite) {
		ctx->user_ip4 = dst.w[3];
		ctx->user_port = port;
	}
	return verdict;
}

SEC("cgroup/connect6")
int connect6(struct bpf_sock_addr *ctx)
{
	struct zb_ip dst = {};
	__u16 port = ctx->user_port;
	int rewrite = 0;
	int verdict;

	/* Only TCP is captured. */
	if (ctx->type != SOCK_STREAM)
		return ZB_ALLOW;
	/* An IPv4-mapped destination arrives here too (a dual-stack socket): it is decided as
	 * IPv4 and rewritten to ztunnel's IPv4-mapped address. */
	dst.w[0] = ctx->user_ip6[0];
	dst.w[1] = ctx->user_ip6[1];
	dst.w[2] = ctx->user_ip6[2];
	dst.w[3] = ctx->user_ip6[3];
	verdict = zb_connect(ctx, &dst, &port, &rewrite);
	if (rewrite) {
		ctx->user_ip6[0] = dst.w[0];
		ctx->user_ip6[1] = dst.w[1];
		ctx->user_ip6[2] = dst.w[2];
		ctx->user_ip6[3] = dst.w[3];
		ctx->user_port = port;
	}
	return verdict;
}

/* What zb_tuple_store did. */
enum zb_store {
	ZB_STORED,  /* in a slot that held this tuple, nothing, or an answered record */
	ZB_EVICTED, /* in place of a record still waiting for ztunnel's question */
	ZB_FULL,    /* not at all: every slot waits (only when `evict` is 0), or other writers
		     * kept claiming the slots it chose */
};

/* Rounds of choosing and claiming a slot before zb_tuple_store gives up. A claim fails only
 * when another CPU changed that slot since it was read: another writer took it, or ztunnel
 * marked it answered. */
#define ZB_STORE_TRIES 3

/* The next generation of a slot's sequence word `seq`, in state `state`. */
static __always_inline __u32 zb_seq_next(__u32 seq, __u32 state)
{
	return ((seq >> ZB_SLOT_STATE_BITS) + 1) << ZB_SLOT_STATE_BITS | state;
}

/*
 * Writes a connection's record into `set`. The slot is, in order: the one already holding
 * this 4-tuple (a new connection reusing the tuple of an old one must not leave the old
 * record where getsockopt could find it), a free one, one ztunnel has asked about, and, with
 * `evict`, the next waiting one in turn. The choice reads the set's first cache line only
 * (sequence words and tags); a slot's tuple is read only when its tag matches. The slot is
 * claimed by compare-and-swap (see zbridge.h), so nothing waits for a lock: a claim that
 * loses to another CPU chooses again.
 */
static __always_inline enum zb_store zb_tuple_store(struct tuple_set *set,
						    const struct conn_tuple *tuple, __u32 hash,
						    const struct orig_dst *dst, int evict)
{
	__u16 tag = zb_tuple_tag(hash);

	for (int attempt = 0; attempt < ZB_STORE_TRIES; attempt++) {
		__u32 pick = ZB_TUPLE_WAYS, free = ZB_TUPLE_WAYS, answered = ZB_TUPLE_WAYS;
		enum zb_store result = ZB_STORED;
		__u32 old, busy;

#pragma unroll
		for (__u32 i = 0; i < ZB_TUPLE_WAYS; i++) {
			__u32 state = ZB_READ_ONCE(set->seq[i]) & ZB_SLOT_STATE_MASK;

			if (state == ZB_SLOT_FREE) {
				if (free == ZB_TUPLE_WAYS)
					free = i;
				continue;
			}
			/* Another writer's, half written: neither this tuple's nor free. */
			if (state == ZB_SLOT_BUSY)
				continue;
			if (set->tag[i] == tag && zb_tuple_eq(&set->way[i].tuple, tuple)) {
				pick = i;
				break;
			}
			if (state == ZB_SLOT_ANSWERED && answered == ZB_TUPLE_WAYS)
				answered = i;
		}
		if (pick == ZB_TUPLE_WAYS)
			pick = free != ZB_TUPLE_WAYS ? free : answered;
		if (pick == ZB_TUPLE_WAYS) {
			if (!evict)
				return ZB_FULL;
			/* More connections wait here at once than the set holds: the oldest in
			 * turn gives way, and its ztunnel will find no record. */
			pick = __sync_fetch_and_add(&set->next, 1);
			result = ZB_EVICTED;
		}
		pick &= ZB_TUPLE_WAYS - 1;
		old = ZB_READ_ONCE(set->seq[pick]);
		/* Being written by another CPU: choose again. */
		if ((old & ZB_SLOT_STATE_MASK) == ZB_SLOT_BUSY)
			continue;
		busy = zb_seq_next(old, ZB_SLOT_BUSY);
		if (__sync_val_compare_and_swap(&set->seq[pick], old, busy) != old)
			continue;
		/* Claimed: no reader takes a copy of it until it is published. */
		set->way[pick].tuple = *tuple;
		set->way[pick].dst = *dst;
		set->tag[pick] = tag;
		/* Publish: the record is visible before its state. Only the claimer changes a
		 * BUSY word, so the word still holds `busy`. */
		zb_store_release(&set->seq[pick], busy, (busy & ~ZB_SLOT_STATE_MASK) | ZB_SLOT_PENDING);
		return result;
	}
	return ZB_FULL;
}

/*
 * Copies the record of `tuple` to `out` and marks it answered (its slot may be reused, but
 * the record stays until then: ztunnel asks SOL_IP first and SOL_IPV6 next for an IPv6
 * destination). Returns 1 when the set holds it. The copy counts only if the slot's sequence
 * word is unchanged from before the copy to the compare-and-swap that marks it: then no
 * writer claimed the slot in between, and the copy is whole.
 */
static __always_inline int zb_tuple_take(struct tuple_set *set, const struct conn_tuple *tuple,
					 __u32 hash, struct orig_dst *out)
{
	__u16 tag = zb_tuple_tag(hash);

#pragma unroll
	for (__u32 i = 0; i < ZB_TUPLE_WAYS; i++) {
		struct tuple_slot copy;
		__u32 seq, state;

		if (set->tag[i] != tag)
			continue;
		/* The copy below cannot be read before it. */
		seq = zb_load_acquire(&set->seq[i]);
		state = seq & ZB_SLOT_STATE_MASK;
		if (state != ZB_SLOT_PENDING && state != ZB_SLOT_ANSWERED)
			continue;
		copy = set->way[i];
		if (!zb_tuple_eq(&copy.tuple, tuple))
			continue;
		if (__sync_val_compare_and_swap(&set->seq[i], seq,
						(seq & ~ZB_SLOT_STATE_MASK) | ZB_SLOT_ANSWERED) != seq)
			/* Claimed by a writer since: this record was just replaced. */
			continue;
		*out = copy.dst;
		return 1;
	}
	return 0;
}

/*
 * The hot set is full of records ztunnel has not asked about: moves its oldest in turn
 * (round robin) to that record's overflow set and writes `tuple`'s record in its place, so
 * that the hot region always holds the newest records. Records never asked about (a client
 * that gave up before ztunnel accepted) would otherwise stay in the hot region for good and
 * send every later record to the cold overflow region. Returns 0 when it did not (the slot
 * changed meanwhile, or the move failed): the caller stores the record in the overflow
 * region itself.
 */
static __always_inline int zb_tuple_demote(struct tuple_set *hot, const struct conn_tuple *tuple,
					   __u32 hash, const struct orig_dst *dst)
{
	struct tuple_slot old;
	struct tuple_set *overflow;
	struct orig_dst scratch;
	__u32 pick, seq, busy, old_hash, idx;
	enum zb_store moved;

	pick = __sync_fetch_and_add(&hot->next, 1) & (ZB_TUPLE_WAYS - 1);
	seq = __sync_fetch_and_add(&hot->seq[pick], 0);
	if ((seq & ZB_SLOT_STATE_MASK) != ZB_SLOT_PENDING)
		return 0;
	old = hot->way[pick];
	/* The copy is whole only if nobody claimed the slot while it was read. */
	if (__sync_fetch_and_add(&hot->seq[pick], 0) != seq)
		return 0;
	old_hash = zb_tuple_hash(&old.tuple);
	idx = zb_tuple_overflow_set(old_hash);
	overflow = bpf_map_lookup_elem(&orig_dst_by_tuple, &idx);
	if (!overflow)
		return 0;
	/* The copy goes in first, so that getsockopt finds the record in one region or the
	 * other at every moment. */
	moved = zb_tuple_store(overflow, &old.tuple, old_hash, &old.dst, 1);
	if (moved == ZB_FULL)
		/* Not moved: it keeps its place. */
		return 0;
	if (moved == ZB_EVICTED)
		zb_count(ZB_C_ORIG_DST_EVICTED);
	busy = zb_seq_next(seq, ZB_SLOT_BUSY);
	if (__sync_val_compare_and_swap(&hot->seq[pick], seq, busy) != seq) {
		/* ztunnel asked for it (or another writer moved it) meanwhile: the copy is a
		 * duplicate, marked answered so that it is reused like one. */
		zb_tuple_take(overflow, &old.tuple, old_hash, &scratch);
		return 0;
	}
	hot->way[pick].tuple = *tuple;
	hot->way[pick].dst = *dst;
	hot->tag[pick] = zb_tuple_tag(hash);
	zb_store_release(&hot->seq[pick], busy, (busy & ~ZB_SLOT_STATE_MASK) | ZB_SLOT_PENDING);
	return 1;
}

SEC("sockops")
int sock_ops(struct bpf_sock_ops *skops)
{
	const struct settings *s;
	struct conn_tuple tuple = {};
	struct connect_record *rec;
	struct tuple_set *set;
	struct zb_ip ip = {};
	__u32 remote_port, hash, idx;
	__u16 dport;

	/* The kernel calls this program five times for every connect in the subtree (timeout,
	 * receive window, ECN, connect, established) and more for accepted sockets, whatever it
	 * wants: all but the one it needs leave on the first comparison. TCP_CONNECT comes once
	 * the source address and port are chosen and before the SYN leaves, so the record is in
	 * place before ztunnel can accept the connection. */
	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
		return 1;
	rec = bpf_task_storage_get(&orig_dst_by_task, bpf_get_current_task_btf(), 0, 0);
	/* No redirect is waiting for its TCP_CONNECT in this thread. */
	if (!rec || !rec->armed)
		return 1;
	remote_port = ZB_CTX(skops->remote_port);
	/* remote_port is network order, in the upper 16 bits on current kernels (older ones put
	 * it in the lower 16: take whichever half is set); local_port is host order. */
	dport = remote_port > 0xffff ? (__u16)(remote_port >> 16) : (__u16)remote_port;
	s = zb_settings();
	if (!s)
		return 1;
	/* Not to a capture port: not the redirected connection (a connect of another socket
	 * while a redirected one waits for its SYN, a TCP_FASTOPEN_CONNECT sends it with the
	 * first write). The record stays armed for it. */
	if (bpf_ntohs(dport) != s->outbound_port && bpf_ntohs(dport) != s->inbound_port)
		return 1;
	/* The first TCP_CONNECT to a capture port after a redirect is the redirected socket's
	 * (connect4/6 and this callback run in the same connect() call), unless that connect
	 * failed before its SYN (no source port, no route) and this thread now connects, without
	 * a redirect, to a capture port on an address that is not ztunnel's (connect4/6 refuse
	 * ztunnel's): a record then stands for a connection no ztunnel of this node accepts. */
	rec->armed = 0;

	/* Every field is read up front, unconditionally: with per-family reads clang merges the
	 * branches into loads off a moved context pointer, which the verifier refuses. */
	__u32 family = ZB_CTX(skops->family);
	__u32 l4 = ZB_CTX(skops->local_ip4), r4 = ZB_CTX(skops->remote_ip4);
	struct zb_ip l6 = { { ZB_CTX(skops->local_ip6[0]), ZB_CTX(skops->local_ip6[1]),
			      ZB_CTX(skops->local_ip6[2]), ZB_CTX(skops->local_ip6[3]) } };
	struct zb_ip r6 = { { ZB_CTX(skops->remote_ip6[0]), ZB_CTX(skops->remote_ip6[1]),
			      ZB_CTX(skops->remote_ip6[2]), ZB_CTX(skops->remote_ip6[3]) } };

	if (family == AF_INET) {
		zb_ip_from_v4(&ip, l4);
		__builtin_memcpy(tuple.src, ip.w, 16);
		zb_ip_from_v4(&ip, r4);
		__builtin_memcpy(tuple.dst, ip.w, 16);
	} else if (family == AF_INET6) {
		/* IPv4-mapped on a dual-stack socket already has the key's form. */
		__builtin_memcpy(tuple.src, l6.w, 16);
		__builtin_memcpy(tuple.dst, r6.w, 16);
	} else {
		/* Not an IP socket: nothing ztunnel will ask about. */
		return 1;
	}
	tuple.sport = bpf_htons((__u16)ZB_CTX(skops->local_port));
	tuple.dport = dport;

	hash = zb_tuple_hash(&tuple);
	idx = zb_tuple_hot_set(hash);
	set = bpf_map_lookup_elem(&orig_dst_by_tuple, &idx);
	/* The array holds every index below ZB_TUPLE_SETS; the check is for the verifier. */
	if (!set)
		return 1;
	if (zb_tuple_store(set, &tuple, hash, &rec->dst, 0) != ZB_FULL)
		return 1;
	/* The hot set is full of waiting records (a burst, or records never asked about): its
	 * oldest moves to the overflow region and this one takes its place. */
	if (zb_tuple_demote(set, &tuple, hash, &rec->dst))
		return 1;
	/* That failed (rare: the slot changed meanwhile): the overflow region takes this one. */
	idx = zb_tuple_overflow_set(hash);
	set = bpf_map_lookup_elem(&orig_dst_by_tuple, &idx);
	if (!set)
		return 1;
	if (zb_tuple_store(set, &tuple, hash, &rec->dst, 1) == ZB_EVICTED)
		zb_count(ZB_C_ORIG_DST_EVICTED);
	return 1;
}

/* The sockaddr_in / sockaddr_in6 that SO_ORIGINAL_DST returns. */
struct zb_sockaddr_in {
	__u16 family;
	__u16 port;
	__u32 addr;
	__u8 zero[8];
};

struct zb_sockaddr_in6 {
	__u16 family;
	__u16 port;
	__u32 flowinfo;
	__u32 addr[4];
	__u32 scope_id;
};

SEC("cgroup/getsockopt")
int getsockopt(struct bpf_sockopt *ctx)
{
	const struct settings *s;
	struct conn_tuple tuple = {};
	struct orig_dst od = {};
	struct tuple_set *set;
	struct bpf_sock *sk;
	struct zb_ip ip = {};
	__u16 local_port;
	__u32 hash, idx;
	int found, v4;

	/* Every getsockopt of the subtree comes here: all but SO_ORIGINAL_DST leave untouched
	 * at once (SO_ORIGINAL_DST and IP6T_SO_ORIGINAL_DST share the number 80). */
	if (ctx->optname != SO_ORIGINAL_DST)
		return 1;
	if (ctx->level != SOL_IP && ctx->level != SOL_IPV6)
		return 1;
	sk = ctx->sk;
	if (!sk)
		return 1;
	s = zb_settings();
	if (!s)
		return 1;
	/* Only ztunnel's capture sockets have an original destination to give. */
	local_port = (__u16)ZB_CTX(sk->src_port);
	if (local_port != s->outbound_port && local_port != s->inbound_port)
		return 1;

	/* Read up front, unconditionally, for the reason given in sock_ops. */
	__u32 family = ZB_CTX(sk->family);
	__u32 l4 = ZB_CTX(sk->src_ip4), r4 = ZB_CTX(sk->dst_ip4);
	__u16 peer_port = ZB_CTX(sk->dst_port);
	struct zb_ip l6 = { { ZB_CTX(sk->src_ip6[0]), ZB_CTX(sk->src_ip6[1]),
			      ZB_CTX(sk->src_ip6[2]), ZB_CTX(sk->src_ip6[3]) } };
	struct zb_ip r6 = { { ZB_CTX(sk->dst_ip6[0]), ZB_CTX(sk->dst_ip6[1]),
			      ZB_CTX(sk->dst_ip6[2]), ZB_CTX(sk->dst_ip6[3]) } };

	/* The accepted socket sees the connection from the server side: swap. */
	if (family == AF_INET) {
		zb_ip_from_v4(&ip, r4);
		__builtin_memcpy(tuple.src, ip.w, 16);
		zb_ip_from_v4(&ip, l4);
		__builtin_memcpy(tuple.dst, ip.w, 16);
	} else if (family == AF_INET6) {
		__builtin_memcpy(tuple.src, r6.w, 16);
		__builtin_memcpy(tuple.dst, l6.w, 16);
	} else {
		return 1;
	}
	tuple.sport = peer_port;
	tuple.dport = bpf_htons(local_port);

	/* The hot set first: the writer only goes on to the overflow set when the hot one is
	 * full, and it never leaves a record of the same tuple behind in the hot one. */
	hash = zb_tuple_hash(&tuple);
	idx = zb_tuple_hot_set(hash);
	set = bpf_map_lookup_elem(&orig_dst_by_tuple, &idx);
	found = set && zb_tuple_take(set, &tuple, hash, &od);
	if (!found) {
		idx = zb_tuple_overflow_set(hash);
		set = bpf_map_lookup_elem(&orig_dst_by_tuple, &idx);
		found = set && zb_tuple_take(set, &tuple, hash, &od);
	}
	if (!found) {
		/* Keep the kernel's own answer (netfilter's, or its error). */
		zb_count(ZB_C_ORIG_DST_MISS);
		ZB_DEBUG(s, "SO_ORIGINAL_DST: no record for peer port %d", bpf_ntohs(tuple.sport));
		return 1;
	}
	zb_ip_from_bytes(&ip, od.addr);
	v4 = zb_ip_is_v4(&ip);

	if (ctx->level == SOL_IP) {
		struct zb_sockaddr_in *sin = ctx->optval;

		/* An IPv6 destination is given to the IPv6 question, which ztunnel asks next. */
		if (!v4)
			return 1;
		/* The caller's buffer is too small for a sockaddr_in: the kernel's error stands. */
		if ((void *)(sin + 1) > ctx->optval_end)
			return 1;
		sin->family = AF_INET;
		sin->port = od.port;
		sin->addr = ip.w[3];
		__builtin_memset(sin->zero, 0, sizeof(sin->zero));
		ctx->optlen = sizeof(*sin);
	} else {
		struct zb_sockaddr_in6 *sin6 = ctx->optval;

		/* An IPv4 destination was answered to SOL_IP, as the kernel would. */
		if (v4)
			return 1;
		if ((void *)(sin6 + 1) > ctx->optval_end)
			return 1;
		sin6->family = AF_INET6;
		sin6->port = od.port;
		sin6->flowinfo = 0;
		sin6->addr[0] = ip.w[0];
		sin6->addr[1] = ip.w[1];
		sin6->addr[2] = ip.w[2];
		sin6->addr[3] = ip.w[3];
		sin6->scope_id = 0;
		ctx->optlen = sizeof(*sin6);
	}
	ctx->retval = 0;
	zb_count(ZB_C_ORIG_DST_HIT);
	return 1;
}

/*
 * The bind decision shared by bind4 and bind6: ztunnel binding an ambient pod's address gets
 * one of its own addresses instead (by a hash of the pod's address, so each pod keeps one and
 * ztunnel's upstream connections spread too), same port. Returns 1 when `addr` was replaced.
 */
static __always_inline int zb_bind(struct zb_ip *addr)
{
	const struct settings *s = zb_settings();
	struct cgroup_info info = {};
	struct zb_ip zt = {};
	__u32 n;

	/* Nothing enrolled: no pod address to rewrite. */
	if (!s || !s->levels)
		return 0;
	/* Most binds are to other addresses: one lookup, before the cgroup walk. */
	if (!bpf_map_lookup_elem(&pod_addr_map, addr))
		return 0;
	/* Only ztunnel's binds are rewritten; a pod binding its own address is normal. */
	if (!zb_lookup_current(s->levels, &info) || !(info.flags & ZB_F_ZTUNNEL))
		return 0;
	/* No own address to use: the bind goes on and fails or succeeds as it would. */
	n = zb_ztunnel_count(s, addr);
	if (!n)
		return 0;
	zb_ztunnel_addr(s, addr, zb_ztunnel_index(addr, 0, n), &zt);
	*addr = zt;
	zb_count(ZB_C_BIND_REWRITTEN);
	ZB_DEBUG(s, "ztunnel bind to a pod address rewritten");
	return 1;
}

SEC("cgroup/bind4")
int bind4(struct bpf_sock_addr *ctx)
{
	struct zb_ip addr = {};

	/* INADDR_ANY is never a pod's address. */
	if (!ctx->user_ip4)
		return ZB_ALLOW;
	zb_ip_from_v4(&addr, ctx->user_ip4);
	if (zb_bind(&addr))
		ctx->user_ip4 = addr.w[3];
	return ZB_ALLOW;
}

SEC("cgroup/bind6")
int bind6(struct bpf_sock_addr *ctx)
{
	struct zb_ip addr = {};

	addr.w[0] = ctx->user_ip6[0];
	addr.w[1] = ctx->user_ip6[1];
	addr.w[2] = ctx->user_ip6[2];
	addr.w[3] = ctx->user_ip6[3];
	/* The unspecified address (::) is never a pod's address. */
	if (!(addr.w[0] | addr.w[1] | addr.w[2] | addr.w[3]))
		return ZB_ALLOW;
	if (zb_bind(&addr)) {
		ctx->user_ip6[0] = addr.w[0];
		ctx->user_ip6[1] = addr.w[1];
		ctx->user_ip6[2] = addr.w[2];
		ctx->user_ip6[3] = addr.w[3];
	}
	return ZB_ALLOW;
}
