/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * zbridge: `orig_dst_by_tuple` as the kernel's LRU hash, keyed by the connection's tuple, the
 * original destination as its value. Built only with -DZBRIDGE_TUPLE_LRU (programmer/build.rs),
 * as a second object beside the shipped one (never loaded by the agent), so that the datapath
 * bench can measure it against the set-associative table of tuple_table.h (which is left out
 * of this build); docs/tuple-space.md has the result. Included by zbridge.bpf.c after
 * tuple_table.h (zb_tuple_of, enum zb_take, enum zb_question).
 *
 * What the table's own logic does maps onto the map's:
 * - sock_ops stores a record: an update, which replaces a record of the same tuple (a
 *   reused 4-tuple) as the table's writer does;
 * - getsockopt takes it: a lookup, then a delete once it is answered (the table marks the
 *   slot answered, to be reused), so that the map holds only records waiting for ztunnel
 *   and an answered record's element is free for the next update; a record of the other
 *   family is left for ztunnel's other question, as in the table;
 * - a full table replaces its oldest waiting record: the LRU evicts, by its own notion of
 *   age, without telling anyone (the table counts it).
 * The map is preallocated (the default), so an update allocates nothing; the common LRU
 * list (no BPF_F_NO_COMMON_LRU), as the map comes by default.
 */
#ifndef ZBRIDGE_TUPLE_LRU_H
#define ZBRIDGE_TUPLE_LRU_H

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	/* As many records as the table has slots. */
	__uint(max_entries, ZB_TUPLE_SETS * ZB_TUPLE_WAYS);
	__type(key, struct conn_tuple);
	__type(value, struct orig_dst);
} orig_dst_by_tuple SEC(".maps");

/* sock_ops: records `dst` for `tuple`. A failed update (the LRU found no element to take
 * back, or its bucket's lock was busy) is counted as the table counts a record it had to
 * drop. */
static __always_inline void zb_tuple_lru_store(const struct conn_tuple *tuple,
					       const struct orig_dst *dst)
{
	if (bpf_map_update_elem(&orig_dst_by_tuple, tuple, dst, BPF_ANY))
		zb_count(ZB_C_ORIG_DST_EVICTED);
}

/*
 * getsockopt: copies the record of `tuple` to `out` and deletes it, when it answers
 * `question` (ZB_ASK_V4 or ZB_ASK_V6). The copy is read through the map's pointer: a writer
 * replacing the same tuple at that moment could tear it, which takes a client reusing its
 * 4-tuple within the microseconds between ztunnel's accept and its question.
 */
static __always_inline enum zb_take zb_tuple_lru_take(const struct conn_tuple *tuple,
						      enum zb_question question,
						      struct orig_dst *out)
{
	struct orig_dst *dst = bpf_map_lookup_elem(&orig_dst_by_tuple, tuple);

	if (!dst)
		return ZB_TAKE_ABSENT;
	if ((question == ZB_ASK_V4) != zb_orig_dst_is_v4(dst))
		/* Not this question's: left for the other one. */
		return ZB_TAKE_OTHER_FAMILY;
	*out = *dst;
	bpf_map_delete_elem(&orig_dst_by_tuple, tuple);
	return ZB_TAKEN;
}

#endif /* ZBRIDGE_TUPLE_LRU_H */
