// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * zbridge's in-pod inbound capture: a TCP connection arriving at an ambient pod is handed to
 * ztunnel's inbound listener (15006) inside that pod's network namespace, as istio-cni's
 * `REDIRECT --to-ports 15006` rule does, but without NAT: the socket lookup itself picks
 * ztunnel's listener, so the accepted socket's local address IS the original destination
 * (ztunnel falls back to it, and zbridge's getsockopt answers SO_ORIGINAL_DST with it).
 *
 *   inpod_inbound   BPF_PROG_TYPE_SK_LOOKUP, attached to each in-pod pod's network
 *                   namespace by a link (one program, many namespaces).
 *
 * Maps:
 *   inbound_listener  SOCKHASH: pod address (IPv4-mapped like pod_addr) → ztunnel's 15006
 *                     listener in that pod's namespace. Filled by the agent once ztunnel has
 *                     acked the pod over ZDS (the listener's fd taken from ztunnel's process).
 *                     An entry leaves with its socket: when ztunnel stops, its listeners
 *                     close and their entries vanish.
 *   inbound_pods      HASH: the addresses of the pods enrolled (set and removed with their
 *                     listener, but not removed when the listener closes). An enrolled pod's
 *                     address without a listener means ztunnel is down or restarting: the
 *                     lookup fails and the connection is refused, as istio-cni's REDIRECT to
 *                     a closed port is, never handed to the app behind ztunnel's back.
 *   node_addr_map     HASH: the node's own addresses. Traffic from them (the kubelet's
 *                     probes, host processes) goes to the pod directly, as in Istio.
 *   inbound_counters  per-CPU counters (enum zb_inbound_counter).
 *
 * Built by programmer/build.rs with `clang -g` (the loader needs the BTF).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "zbridge.h"
#include "inpod.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, ZB_CGROUP_ENTRIES);
	__type(key, struct pod_addr);
	__type(value, __u32); /* the socket's fd on insert */
} inbound_listener SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ZB_CGROUP_ENTRIES);
	__type(key, struct pod_addr);
	__type(value, __u32);
} inbound_pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct pod_addr);
	__type(value, __u32);
} node_addr_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ZB_IN_MAX);
	__type(key, __u32);
	__type(value, __u64);
} inbound_counters SEC(".maps");

static __always_inline void zb_in_count(__u32 counter)
{
	__u64 *value = bpf_map_lookup_elem(&inbound_counters, &counter);

	if (value)
		*value += 1;
}

/* An address from the lookup context, IPv4-mapped for IPv4 (::ffff:a.b.c.d). */
static __always_inline void zb_ctx_addr(struct pod_addr *out, __u32 family, __u32 ip4,
					const __u32 *ip6)
{
	__u32 *words = (__u32 *)out->addr;

	if (family == AF_INET) {
		words[0] = 0;
		words[1] = 0;
		words[2] = bpf_htonl(0xffff);
		words[3] = ip4;
	} else {
		words[0] = ip6[0];
		words[1] = ip6[1];
		words[2] = ip6[2];
		words[3] = ip6[3];
	}
}

static __always_inline int zb_same_addr(const struct pod_addr *a, const struct pod_addr *b)
{
	const __u32 *x = (const __u32 *)a->addr, *y = (const __u32 *)b->addr;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

SEC("sk_lookup")
int inpod_inbound(struct bpf_sk_lookup *ctx)
{
	struct pod_addr local = {}, remote = {};
	struct bpf_sock *listener;
	__u32 local_ip6[4], remote_ip6[4];
	long err;

	/* Istio captures inbound TCP only; UDP reaches the pod as it is. */
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	/* HBONE (15008) is ztunnel's own listener: reached directly, never redirected. */
	if (ctx->local_port == ZB_PORT_HBONE)
		return SK_PASS;
	/* The context's IPv6 fields are read one word at a time (the verifier allows 4-byte
	 * loads of them); only the family's own fields are read. */
	if (ctx->family == AF_INET6) {
		local_ip6[0] = ctx->local_ip6[0];
		local_ip6[1] = ctx->local_ip6[1];
		local_ip6[2] = ctx->local_ip6[2];
		local_ip6[3] = ctx->local_ip6[3];
		remote_ip6[0] = ctx->remote_ip6[0];
		remote_ip6[1] = ctx->remote_ip6[1];
		remote_ip6[2] = ctx->remote_ip6[2];
		remote_ip6[3] = ctx->remote_ip6[3];
		zb_ctx_addr(&local, AF_INET6, 0, local_ip6);
		zb_ctx_addr(&remote, AF_INET6, 0, remote_ip6);
	} else {
		zb_ctx_addr(&local, AF_INET, ctx->local_ip4, local_ip6);
		zb_ctx_addr(&remote, AF_INET, ctx->remote_ip4, remote_ip6);
	}

	/* To a loopback address: the pod's outbound connections redirected to ztunnel's 15001
	 * (127.1.x.y, ::1), its DNS to 15053, or local traffic. Never a pod's inbound; said
	 * before any map lookup, since every captured outbound connection passes here. */
	if ((ctx->family == AF_INET && (bpf_ntohl(ctx->local_ip4) >> 24) == 127) ||
	    (ctx->family == AF_INET6 && local_ip6[0] == 0 && local_ip6[1] == 0 && local_ip6[2] == 0 &&
	     local_ip6[3] == bpf_htonl(1)))
		return SK_PASS;

	/* From the pod's own address: the pod talking to itself, or ztunnel's in-pod socket
	 * delivering an accepted connection to the app (zbridge's bind program makes ztunnel's
	 * upstream sockets in a pod's namespace use the pod's address, not the client's, since no
	 * TPROXY routing would bring the replies back). Sending those to 15006 would loop.
	 * (Locally generated packets cannot be told by their interface here: the lookup's
	 * ingress_ifindex is the device that owns the address, not `lo`.) */
	if (zb_same_addr(&remote, &local))
		return SK_PASS;

	/* From one of the node's own addresses: host-originated (kubelet probes), which Istio
	 * lets reach the pod directly. */
	if (bpf_map_lookup_elem(&node_addr_map, &remote)) {
		zb_in_count(ZB_IN_PASSED_NODE);
		return SK_PASS;
	}

	listener = bpf_map_lookup_elem(&inbound_listener, &local);
	if (!listener) {
		/* An enrolled pod whose ztunnel listener closed (ztunnel restarting): fail closed,
		 * as istio-cni's REDIRECT to a port nobody listens on does. */
		if (bpf_map_lookup_elem(&inbound_pods, &local)) {
			zb_in_count(ZB_IN_NO_ZTUNNEL);
			return SK_DROP;
		}
		/* Not an in-pod pod's address (loopback, a link-local address). */
		zb_in_count(ZB_IN_NO_LISTENER);
		return SK_PASS;
	}
	/* A connection from outside straight to a capture port would reach ztunnel's listener
	 * with that port as its original destination, and ztunnel would pass it on to the same
	 * listener again: refuse it (the SYN is dropped). */
	if (ctx->local_port == ZB_PORT_OUTBOUND || ctx->local_port == ZB_PORT_INBOUND) {
		bpf_sk_release(listener);
		zb_in_count(ZB_IN_REFUSED_LOOP);
		return SK_DROP;
	}
	err = bpf_sk_assign(ctx, listener, 0);
	bpf_sk_release(listener);
	if (err) {
		/* The listener is gone or of the wrong family (an IPv6-only socket for an IPv4
		 * connection): the pod's own socket answers, and the count shows it. */
		zb_in_count(ZB_IN_ASSIGN_FAILED);
		return SK_PASS;
	}
	zb_in_count(ZB_IN_REDIRECTED);
	return SK_PASS;
}
