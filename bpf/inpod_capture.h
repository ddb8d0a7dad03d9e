/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * zbridge: the in-pod side of the socket hooks in zbridge.bpf.c (BPF only).
 *
 * In-pod mode (an entry with ZB_F_INPOD) is ztunnel's `shared` proxy mode: ztunnel was handed
 * the pod's network namespace over ZDS and listens inside it, on every address, on 15001
 * (outbound), 15006 (inbound plaintext), 15008 (HBONE) and on 127.0.0.1/::1:15053 (DNS). What
 * istio-cni does there with iptables, these helpers do at the socket:
 *
 *   outbound   a connect goes to 127.1.x.y:15001 (::1 for IPv6) from the pod's own address
 *              (bpf_bind), as iptables' REDIRECT does: ztunnel sees the pod's address as the
 *              peer, and the 4-tuple record keeps pods apart (pod addresses are unique on a
 *              node, while every pod's listener is the same loopback address and port). A
 *              record ztunnel cannot find leaves it with a loopback local address on a
 *              capture port, which ztunnel refuses rather than proxying to itself.
 *   inbound    bpf/inpod_inbound.bpf.c (sk_lookup); the accepted socket's local address is
 *              the original destination, and getsockopt answers SO_ORIGINAL_DST with it.
 *   ztunnel    its upstream sockets in a pod's namespace bind the client's address (original
 *              source, IP_FREEBIND); no TPROXY routing brings the replies back, so the bind
 *              takes the pod's own address instead.
 *   DNS        (ZB_F_DNS) UDP and TCP to port 53 go to 127.0.0.1:15053 (::1), and UDP
 *              replies are shown as coming from the server the application asked.
 */
#ifndef ZBRIDGE_INPOD_CAPTURE_H
#define ZBRIDGE_INPOD_CAPTURE_H

#include <linux/in.h>
#include <linux/in6.h>

#include "helpers.h"
#include "inpod.h"

#define SOCK_DGRAM 2

/* The network namespaces of in-pod pods (key: the namespace's cookie, value: the pod's
 * entry), for the hooks that run in a pod's namespace for ztunnel's sockets (bind, and
 * getsockopt on accepted inbound sockets), where the cgroup says "ztunnel" but not which pod.
 * Filled by the programmer with each in-pod pod's entry. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ZB_CGROUP_ENTRIES);
	__type(key, __u64);
	__type(value, struct cgroup_info);
} inpod_netns SEC(".maps");

/* A UDP socket's DNS server as the application addressed it (sendmsg or connect to port 53,
 * rewritten to ztunnel's 15053), so that recvmsg shows replies as coming from it: resolvers
 * drop answers from an address they did not ask. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct orig_dst);
} dns_orig_dst SEC(".maps");

/* 127.0.0.1 for an IPv4 (or IPv4-mapped) destination, ::1 for IPv6. */
static __always_inline void zb_inpod_loopback(const struct zb_ip *like, struct zb_ip *out)
{
	if (zb_ip_is_v4(like)) {
		zb_ip_from_v4(out, bpf_htonl(0x7f000001));
	} else {
		out->w[0] = 0;
		out->w[1] = 0;
		out->w[2] = 0;
		out->w[3] = bpf_htonl(1);
	}
}

/*
 * Where an in-pod outbound connect goes: ztunnel's 15001 listens on every address of the
 * pod's namespace, so an IPv4 connect goes to an address of 127.1.0.0/16 picked by a hash of
 * the original destination rather than to 127.0.0.1 alone. Each destination then has a
 * 4-tuple space of its own, as it has with iptables' REDIRECT (whose client socket keeps the
 * original destination): a client that closes first leaves its ports in TIME_WAIT towards
 * that address only, and one address for every destination would run out of ports
 * (docs/tuple-space.md). IPv6 has one loopback address, ::1.
 */
static __always_inline void zb_inpod_outbound_addr(const struct zb_ip *dst, __u16 port,
						   struct zb_ip *out)
{
	__u32 h;

	if (!zb_ip_is_v4(dst)) {
		zb_inpod_loopback(dst, out);
		return;
	}
	h = (bpf_ntohl(dst->w[3]) ^ ((__u32)port << 16)) * 0x9e3779b1u;
	h ^= h >> 16;
	zb_ip_from_v4(out, bpf_htonl(0x7f010000 | (h & 0xffff)));
}

/* The pod's own address of `like`'s family, from its entry; 0 when it has none. */
static __always_inline int zb_inpod_own_addr(const struct cgroup_info *entry,
					     const struct zb_ip *like, struct zb_ip *out)
{
	if (zb_ip_is_v4(like)) {
		if (!(entry->flags & ZB_F_HAS_V4))
			return 0;
		zb_ip_from_v4(out, entry->addr4);
		return 1;
	}
	if (!(entry->flags & ZB_F_HAS_V6))
		return 0;
	zb_ip_from_bytes(out, entry->addr6);
	return 1;
}

/* What zb_inpod_decide chose for a connect of an in-pod pod. */
enum zb_inpod_verdict {
	ZB_INPOD_PASS,     /* leave the connect alone */
	ZB_INPOD_REFUSE,   /* refuse it (a loop) */
	ZB_INPOD_OUTBOUND, /* to ztunnel's 15001 in the pod, with a record and a bind */
	ZB_INPOD_DNS,      /* to ztunnel's 15053 in the pod, no record */
};

/*
 * The decision for an in-pod pod's connect to `dst`:`port` (network order) on a socket of
 * `type` (SOCK_STREAM or SOCK_DGRAM).
 */
static __always_inline enum zb_inpod_verdict
zb_inpod_decide(const struct settings *s, const struct cgroup_info *entry, const struct zb_ip *dst,
		__u16 port, __u32 type)
{
	__u16 p = bpf_ntohs(port);

	/* ztunnel's capture ports, on any address: ztunnel listens on every address of the
	 * pod's namespace, so a connect to one of them, here or in another pod, reaches a
	 * ztunnel listener with no original destination to give, and ztunnel would proxy it to
	 * the same port again, in a loop. */
	if (p == ZB_PORT_OUTBOUND || p == ZB_PORT_INBOUND) {
		zb_count(ZB_C_REFUSED_LOOP);
		ZB_DEBUG(s, "in-pod connect to capture port %d refused", p);
		return ZB_INPOD_REFUSE;
	}
	/* DNS, when the pod's DNS is captured: to ztunnel's DNS proxy, UDP and TCP alike (it
	 * answers from its own view of the mesh's names and forwards the rest). Loopback too:
	 * a local resolver stub on 127.0.0.53 is still the pod's DNS. */
	if (p == ZB_PORT_DNS_SERVER && (entry->flags & ZB_F_DNS))
		return ZB_INPOD_DNS;
	/* Other UDP is not captured (Istio captures TCP and DNS only). */
	if (type != SOCK_STREAM)
		return ZB_INPOD_PASS;
	/* Loopback stays in the pod; a pod talking to itself is not mesh traffic. */
	if (zb_ip_is_loopback(dst) || zb_is_own_ip(entry, dst)) {
		zb_count(ZB_C_PASSED);
		return ZB_INPOD_PASS;
	}
	return ZB_INPOD_OUTBOUND;
}

/* Remembers a UDP socket's DNS server (for recvmsg). Returns 0 when there is no storage (out
 * of memory): the caller then leaves the datagram alone rather than break the resolver. */
static __always_inline int zb_dns_remember(struct bpf_sock *sk, const struct zb_ip *dst,
					   __u16 port)
{
	struct orig_dst *od;

	if (!sk)
		return 0;
	od = bpf_sk_storage_get(&dns_orig_dst, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!od)
		return 0;
	__builtin_memcpy(od->addr, dst->w, 16);
	od->port = port;
	od->family = zb_ip_is_v4(dst) ? AF_INET : AF_INET6;
	return 1;
}

/*
 * In-pod, every pod's ztunnel listens on the same loopback address and port, each in its own
 * namespace: a connection whose destination is loopback is keyed by its namespace too. The
 * namespace's cookie takes the place of the destination's first 8 bytes (zero in a loopback
 * address, IPv4-mapped or ::1), so that two pods' connections from the same source (an
 * application that bound its own port, whose socket bpf_bind could not move to the pod's
 * address) still have records of their own.
 */
static __always_inline void zb_tuple_fold_netns(struct conn_tuple *t, __u64 netns_cookie)
{
	__builtin_memcpy(t->dst, &netns_cookie, sizeof(netns_cookie));
}

static __always_inline int zb_tuple_dst_is_loopback(const struct conn_tuple *t)
{
	struct zb_ip dst;

	zb_ip_from_bytes(&dst, t->dst);
	return zb_ip_is_loopback(&dst);
}

/* ztunnel's listening ports in a pod's namespace (host order). */
static __always_inline int zb_inpod_is_ztunnel_port(__u16 port)
{
	return port == ZB_PORT_OUTBOUND || port == ZB_PORT_INBOUND || port == ZB_PORT_HBONE ||
	       port == ZB_PORT_DNS;
}

/* The pod entry of the network namespace the hook runs in, when it is an in-pod pod's. */
static __always_inline const struct cgroup_info *zb_inpod_netns_entry(__u64 cookie)
{
	return bpf_map_lookup_elem(&inpod_netns, &cookie);
}

#endif /* ZBRIDGE_INPOD_CAPTURE_H */
