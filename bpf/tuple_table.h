/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * zbridge: the tuple table, `orig_dst_by_tuple`. sock_ops writes a redirected connection's
 * original destination there by the connection's 4-tuple (the only thing ztunnel's accepted
 * socket has in common with the client's), and getsockopt reads it when ztunnel asks
 * SO_ORIGINAL_DST. Included by zbridge.bpf.c after helpers.h; the slot and set layouts are
 * in zbridge.h, shared with the Rust programmer.
 *
 * A set-associative table in an ARRAY map: a connection's record goes into one of the
 * ZB_TUPLE_WAYS slots of a set (an array element). A slot is reused once ztunnel has asked
 * about it.
 *
 * Why this shape: the record is written once per connection and read once, on another CPU,
 * and what both pay for is the memory they touch, not the instructions: a cache line no CPU
 * touched lately costs far more than the rest of the work (BENCHMARKS.md, "Where the
 * programs' time goes"). A hash map's update (bucket, element, free list) and a set of a large array picked
 * by a hash both touch more cold lines than this does. So:
 *
 * - The array has two regions. The first ZB_TUPLE_HOT_SETS sets take every record while they
 *   have room: small, and records leave it within microseconds, once ztunnel asks. When a hot
 *   set is full of waiting records (a burst, or records ztunnel never asks about), its oldest
 *   one in turn moves to its own set in the overflow region (the other ZB_TUPLE_OVERFLOW_SETS
 *   sets, chosen by a hash of the tuple) and the new record takes its place: the hot region
 *   always holds the newest records, and records nobody asks about drift out of it. Only when
 *   an overflow set is full too is its oldest waiting record replaced (and counted).
 *   getsockopt looks in the hot set first, then in the overflow set.
 * - The hot set is chosen by the client's source port, ZB_TUPLE_PORTS_PER_SET ports to a set,
 *   not by a hash: a client's successive connections to ztunnel (one destination for all of
 *   them) take nearby ports, since the kernel moves its per-destination port offset a few
 *   ports per connect, so its records fall in the set of the one before or the next one, on
 *   lines still warm from it, instead of anywhere in the region (BENCHMARKS.md, "Programs'
 *   run time per connection"). The ways are tried in order from way 0, so the common case, an answered record in
 *   way 0, is one line. The writer does not look past the way it takes, so a reused 4-tuple's
 *   older record can wait in a later way; the newest is always first in that order, and a
 *   record leaving its set frees the older ones of its tuple (zb_tuple_drop_after).
 * - A slot is one cache line: its sequence word, tuple and record come together. The map is
 *   BPF_F_MMAPABLE, whose elements start on a page, so each 256-byte set is four whole lines
 *   (a plain array's elements start part-way into a line).
 *
 * No lock: each slot has a sequence word (`seq`: a generation above ZB_SLOT_STATE_BITS bits
 * of state). A writer claims a slot by compare-and-swap to ZB_SLOT_BUSY with the next
 * generation, writes it and publishes it as PENDING; a reader copies a slot and keeps the
 * copy only if its compare-and-swap of the same `seq` to ANSWERED succeeds, i.e. nobody
 * claimed the slot meanwhile. A bpf_spin_lock pair turns interrupts off and on around every
 * program run, which cost more than the rest of sock_ops and getsockopt together.
 *
 * Built with -DZBRIDGE_TUPLE_LRU (a second object, built beside the shipped one, never loaded by
 * the agent), the
 * kernel's LRU hash keyed by the tuple (tuple_lru.h) takes this table's place, so that the
 * datapath bench can compare the two; the tuple and the question and answer enums below are
 * shared by both.
 */
#ifndef ZBRIDGE_TUPLE_TABLE_H
#define ZBRIDGE_TUPLE_TABLE_H

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

/* What zb_tuple_take (or tuple_lru.h's zb_tuple_lru_take) found. */
enum zb_take {
	ZB_TAKE_ABSENT,       /* no record of the tuple in the set */
	ZB_TAKEN,             /* copied, and marked answered (the LRU: deleted) */
	ZB_TAKE_OTHER_FAMILY, /* a record for the other question, left waiting */
};

/* The question zb_tuple_take answers. ztunnel asks SOL_IP first and SOL_IPV6 next: the first
 * question leaves an IPv6 record waiting, so that its slot is not reused before the second. */
enum zb_question {
	ZB_ASK_ANY, /* any record (a duplicate marked answered) */
	ZB_ASK_V4,  /* SO_ORIGINAL_DST: an IPv4 destination */
	ZB_ASK_V6,  /* IP6T_SO_ORIGINAL_DST: an IPv6 destination */
};

#ifndef ZBRIDGE_TUPLE_LRU /* otherwise the LRU hash of tuple_lru.h takes its place */
/* An ARRAY, so that its lookup is inlined and a write allocates nothing. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, ZB_TUPLE_SETS);
	__type(key, __u32);
	__type(value, struct tuple_set);
} orig_dst_by_tuple SEC(".maps");

/* The words of a conn_tuple (36 bytes, 4-byte aligned). */
#define ZB_TUPLE_WORDS (sizeof(struct conn_tuple) / 4)

static __always_inline int zb_tuple_eq(const struct conn_tuple *a, const struct conn_tuple *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;
	__u32 diff = 0;

	/* No early exit: nine loads and ors are cheaper than the branches. */
#pragma unroll
	for (int i = 0; i < ZB_TUPLE_WORDS; i++)
		diff |= x[i] ^ y[i];
	return diff == 0;
}

/* The hash of a connection's 4-tuple, which picks its set in the overflow region of
 * orig_dst_by_tuple. Every output bit depends on every input bit (a multiply alone carries
 * only upwards: the shifts bring the high bits down, so that the last octet of a pod's
 * address and the low byte of its port count for the set too). No secret is mixed in, and
 * none is needed: a pod can only aim at another pod's waiting record by guessing its source
 * port (the kernel's ephemeral pick), within the microseconds the record waits for ztunnel.
 * (A pod can crowd the hot set of any port range, by binding its own source ports there;
 * that only moves the waiting records there to their overflow sets.) */
static __always_inline __u32 zb_tuple_hash(const struct conn_tuple *t)
{
	const __u32 *w = (const __u32 *)t;
	__u32 h = 0;

#pragma unroll
	for (int i = 0; i < ZB_TUPLE_WORDS; i++) {
		h = (h ^ w[i]) * 0x9e3779b1u;
		h ^= h >> 16;
	}
	/* murmur3's finalizer. */
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	h *= 0xc2b2ae35u;
	return h ^ (h >> 16);
}

/* A record's set in the hot region of orig_dst_by_tuple (the first ZB_TUPLE_HOT_SETS): by
 * the client's source port (network order in the tuple), so that a client's successive
 * connections share sets and lines (zbridge.h says why). */
static __always_inline __u32 zb_tuple_hot_set(const struct conn_tuple *t)
{
	return (bpf_ntohs(t->sport) / ZB_TUPLE_PORTS_PER_SET) & (ZB_TUPLE_HOT_SETS - 1);
}

/* A record's set in the overflow region (the ZB_TUPLE_OVERFLOW_SETS after the hot ones): by
 * the tuple's hash, so that records crowding one hot set spread over many overflow sets. */
static __always_inline __u32 zb_tuple_overflow_set(__u32 hash)
{
	return ZB_TUPLE_HOT_SETS + (hash & (ZB_TUPLE_OVERFLOW_SETS - 1));
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
 * Whether `slot` holds a record (waiting or answered) of `tuple`; `*seq` is its sequence word
 * as read, taken for writing (zb_read_for_update), so that a compare-and-swap of it next
 * finds the line in place, and the slot's loads stay after it.
 */
static __always_inline int zb_slot_holds(struct tuple_slot *slot, const struct conn_tuple *tuple,
					 __u32 *seq)
{
	__u32 state;

	*seq = zb_read_for_update(&slot->seq);
	state = *seq & ZB_SLOT_STATE_MASK;
	if (state != ZB_SLOT_PENDING && state != ZB_SLOT_ANSWERED)
		return 0;
	return zb_tuple_eq(&slot->tuple, tuple);
}

/*
 * Frees the records of `tuple` in the ways after `way`. A writer takes the first way, from
 * way 0, that is free, answered or holds the same tuple, so a tuple's newest record is in its
 * lowest way and any later one is older: a 4-tuple's earlier connection whose record ztunnel
 * never asked about. Called before the newest one leaves the set, since getsockopt would then
 * meet the older one first and answer its destination.
 */
static __always_inline void zb_tuple_drop_after(struct tuple_set *set, __u32 way,
						const struct conn_tuple *tuple)
{
#pragma nounroll
	for (__u32 later = 1; later < ZB_TUPLE_WAYS; later++) {
		struct tuple_slot *slot = &set->way[later];
		__u32 seq;

		if (later <= way || !zb_slot_holds(slot, tuple, &seq))
			continue;
		/* Free with a new generation: a copy being taken of it fails its compare-and-swap.
		 * A claim by a writer since makes this one fail, which is as good. */
		__sync_val_compare_and_swap(&slot->seq, seq, zb_seq_next(seq, ZB_SLOT_FREE));
	}
}

/* Writes `tuple`'s record into `slot`, claimed (sequence word `busy`), and publishes it. */
static __always_inline void zb_slot_fill(struct tuple_slot *slot, __u32 busy,
					 const struct conn_tuple *tuple, const struct orig_dst *dst)
{
	slot->tuple = *tuple;
	slot->dst = *dst;
	/* Publish: the record is visible before its state. Only the claimer changes a BUSY
	 * word, so the word still holds `busy`. */
	zb_store_release(&slot->seq, busy, (busy & ~ZB_SLOT_STATE_MASK) | ZB_SLOT_PENDING);
}

/*
 * Writes a connection's record into `set`: in the first slot, from way 0 on, that is free,
 * answered, or holds this same tuple (a new connection reusing the tuple of an old one leaves
 * no older record before its own, where getsockopt, looking in the same order, would meet it
 * first); with `evict`, when every slot waits for ztunnel, in place of the next one in turn.
 * The common case reads and writes one cache line, way 0's. The slot is claimed by
 * compare-and-swap (see zbridge.h), so nothing waits for a lock: a claim that loses to
 * another CPU chooses again.
 */
static __always_inline enum zb_store zb_tuple_store(struct tuple_set *set,
						    const struct conn_tuple *tuple,
						    const struct orig_dst *dst, int evict)
{
	for (int attempt = 0; attempt < ZB_STORE_TRIES; attempt++) {
		enum zb_store result = ZB_STORED;
		__u32 pick = ZB_TUPLE_WAYS, old = 0, busy;
		struct tuple_slot *slot;

		/* A loop, not unrolled: sock_ops inlines this three times, and unrolled copies
		 * took its stack past BPF's 512 bytes. */
#pragma nounroll
		for (__u32 way = 0; way < ZB_TUPLE_WAYS; way++) {
			__u32 seq = zb_read_for_update(&set->way[way].seq);
			__u32 state = seq & ZB_SLOT_STATE_MASK;

			/* Another writer's, half written: neither this tuple's nor free. */
			if (state == ZB_SLOT_BUSY)
				continue;
			/* Waiting for ztunnel's question about another connection. */
			if (state == ZB_SLOT_PENDING && !zb_tuple_eq(&set->way[way].tuple, tuple))
				continue;
			pick = way;
			old = seq;
			break;
		}
		if (pick == ZB_TUPLE_WAYS) {
			if (!evict)
				return ZB_FULL;
			/* More connections wait here at once than the set holds: the oldest in
			 * turn gives way, and its ztunnel will find no record. */
			pick = __sync_fetch_and_add(&set->way[0].evictions, 1);
			pick &= ZB_TUPLE_WAYS - 1;
			old = zb_read_for_update(&set->way[pick].seq);
			/* Being written by another CPU: choose again. */
			if ((old & ZB_SLOT_STATE_MASK) == ZB_SLOT_BUSY)
				continue;
			result = ZB_EVICTED;
		}
		slot = &set->way[pick & (ZB_TUPLE_WAYS - 1)];
		busy = zb_seq_next(old, ZB_SLOT_BUSY);
		if (__sync_val_compare_and_swap(&slot->seq, old, busy) != old)
			continue;
		/* Claimed: no reader takes a copy of it until it is published. */
		zb_slot_fill(slot, busy, tuple, dst);
		/* In the overflow region (the only caller that evicts) a record stays until it is
		 * evicted, so older records of the tuple go now; in the hot region, when it
		 * leaves (zb_tuple_demote), to keep the common write to one line. */
		if (evict)
			zb_tuple_drop_after(set, pick & (ZB_TUPLE_WAYS - 1), tuple);
		return result;
	}
	return ZB_FULL;
}

/*
 * Copies the record of `tuple` to `out` and marks it answered (its slot may be reused, but
 * the record stays until then), when it answers `question`; a record of the other family is
 * left waiting for ztunnel's other question. The slots are tried in the writer's order,
 * so the newest record of the tuple comes first; way 0 holds it unless that way was waiting
 * for another connection. The copy counts only if the slot's sequence word is unchanged from
 * before the copy to the compare-and-swap that marks it: then no writer claimed the slot in
 * between, and the copy is whole.
 */
static __always_inline enum zb_take zb_tuple_take(struct tuple_set *set,
						  const struct conn_tuple *tuple,
						  enum zb_question question, struct orig_dst *out)
{
#pragma unroll
	for (__u32 way = 0; way < ZB_TUPLE_WAYS; way++) {
		struct tuple_slot *slot = &set->way[way];
		struct orig_dst copy;
		__u32 seq;

		if (!zb_slot_holds(slot, tuple, &seq))
			continue;
		copy = slot->dst;
		if (question != ZB_ASK_ANY && (question == ZB_ASK_V4) != zb_orig_dst_is_v4(&copy))
			/* Not this question's: left waiting for the other one. */
			return ZB_TAKE_OTHER_FAMILY;
		if (__sync_val_compare_and_swap(&slot->seq, seq,
						(seq & ~ZB_SLOT_STATE_MASK) | ZB_SLOT_ANSWERED) != seq)
			/* Claimed by a writer since: this record was just replaced. */
			continue;
		*out = copy;
		return ZB_TAKEN;
	}
	return ZB_TAKE_ABSENT;
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
					   const struct orig_dst *dst)
{
	struct conn_tuple old_tuple;
	struct orig_dst old_dst, scratch;
	struct tuple_set *overflow;
	struct tuple_slot *slot;
	__u32 pick, seq, busy, idx;
	enum zb_store moved;

	pick = __sync_fetch_and_add(&hot->way[0].evictions, 1) & (ZB_TUPLE_WAYS - 1);
	slot = &hot->way[pick];
	seq = zb_read_for_update(&slot->seq);
	if ((seq & ZB_SLOT_STATE_MASK) != ZB_SLOT_PENDING)
		return 0;
	old_tuple = slot->tuple;
	old_dst = slot->dst;
	/* The copy is whole only if nobody claimed the slot while it was read. */
	if (zb_read_for_update(&slot->seq) != seq)
		return 0;
	/* Older records of its tuple would be met first once it is gone. */
	zb_tuple_drop_after(hot, pick, &old_tuple);
	idx = zb_tuple_overflow_set(zb_tuple_hash(&old_tuple));
	overflow = bpf_map_lookup_elem(&orig_dst_by_tuple, &idx);
	if (!overflow)
		return 0;
	/* The copy goes in first, so that getsockopt finds the record in one region or the
	 * other at every moment. */
	moved = zb_tuple_store(overflow, &old_tuple, &old_dst, 1);
	if (moved == ZB_FULL)
		/* Not moved: it keeps its place. */
		return 0;
	if (moved == ZB_EVICTED)
		zb_count(ZB_C_ORIG_DST_EVICTED);
	busy = zb_seq_next(seq, ZB_SLOT_BUSY);
	if (__sync_val_compare_and_swap(&slot->seq, seq, busy) != seq) {
		/* ztunnel asked for it (or another writer moved it) meanwhile: the copy is a
		 * duplicate, marked answered so that it is reused like one. */
		zb_tuple_take(overflow, &old_tuple, ZB_ASK_ANY, &scratch);
		return 0;
	}
	zb_slot_fill(slot, busy, tuple, dst);
	return 1;
}
#endif /* !ZBRIDGE_TUPLE_LRU */

#endif /* ZBRIDGE_TUPLE_TABLE_H */
