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
#include "inpod_capture.h"
#include "tuple_map.h"
#include "steps.h"

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
 * Copies to `*entry` the cgroup_info entry that applies to the calling thread `task` (its
 * cgroup's, or its nearest enrolled ancestor's), from the thread's cached decision when it
 * still holds (struct connect_record says when), else from the walk, whose result is then
 * cached. With no entry, `*entry` stays as the caller zeroed it: flags 0, no role. `*rec` is
 * the thread's storage or NULL; a found entry creates it.
 */
static __always_inline void zb_current_entry(const struct settings *s, struct task_struct *task,
					     struct connect_record **rec, struct cgroup_info *entry)
{
	struct connect_record *r = *rec;
	__u64 cgroup = zb_task_cgroup_id(task);
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
		r = bpf_task_storage_get(&orig_dst_by_task, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
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
 * *rewrite is set; when the socket must also be bound to the pod's own address first (in-pod
 * outbound), *bind is set and `bind_addr` holds it. Returns ZB_ALLOW or ZB_REFUSE.
 */
static __always_inline int zb_connect(struct bpf_sock_addr *ctx, struct zb_ip *dst, __u16 *port,
				      int *rewrite, int *bind, struct zb_ip *bind_addr)
{
	const struct settings *s = zb_settings();
	/* Zeroed: no role, unless zb_current_entry finds one. */
	struct cgroup_info entry = {};
	struct connect_record *rec;
	struct task_struct *task;
	struct zb_ip zt = {};
	__u16 capture_port;
	__u32 counter, n;

	ZB_STEPS_START;
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

	ZB_STEP(ZB_STEP_CONNECT_SETTINGS);
	task = bpf_get_current_task_btf();
	rec = bpf_task_storage_get(&orig_dst_by_task, task, 0, 0);
	ZB_STEP(ZB_STEP_CONNECT_RECORD);
	zb_current_entry(s, task, &rec, &entry);
	ZB_STEP(ZB_STEP_CONNECT_ENTRY);
	if (entry.flags & ZB_F_ZTUNNEL)
		/* ztunnel's own connects go where ztunnel wants them. */
		return ZB_ALLOW;
	if ((entry.flags & ZB_F_AMBIENT) && (entry.flags & ZB_F_INPOD)) {
		/* In-pod: ztunnel listens in this pod's own namespace (inpod_capture.h). */
		switch (zb_inpod_decide(s, &entry, dst, *port, ctx->type)) {
		case ZB_INPOD_PASS:
			return ZB_ALLOW;
		case ZB_INPOD_REFUSE:
			return ZB_REFUSE;
		case ZB_INPOD_DNS:
			/* UDP replies must look as if from the server asked: remember it. Without
			 * storage the query goes to the server itself, uncaptured but answered. */
			if (ctx->type == SOCK_DGRAM && !zb_dns_remember(ctx->sk, dst, *port))
				return ZB_ALLOW;
			zb_inpod_loopback(dst, &zt);
			*dst = zt;
			*port = bpf_htons(ZB_PORT_DNS);
			*rewrite = 1;
			zb_count(ZB_C_REDIRECTED_DNS);
			return ZB_ALLOW;
		case ZB_INPOD_OUTBOUND:
			break;
		}
		/* No address of the destination's family: the connect could not carry the pod's
		 * identity to ztunnel, and uncaptured it would bypass the mesh. */
		if (!zb_inpod_own_addr(&entry, dst, bind_addr)) {
			zb_count(ZB_C_FAIL_CLOSED);
			return ZB_REFUSE;
		}
		*bind = 1;
		zb_inpod_outbound_addr(dst, *port, &zt);
		capture_port = ZB_PORT_OUTBOUND;
		counter = ZB_C_REDIRECTED_OUT;
		goto record;
	}
	/* Outside in-pod DNS capture only TCP is captured: a UDP connect (a resolver's) keeps
	 * its destination. */
	if (ctx->type != SOCK_STREAM)
		return ZB_ALLOW;
	if (entry.flags & ZB_F_AMBIENT) {
		/* Loopback stays in the pod; a pod talking to itself is not mesh traffic. */
		if (zb_ip_is_loopback(dst) || zb_is_own_ip(&entry, dst)) {
			zb_count(ZB_C_PASSED);
			return ZB_ALLOW;
		}
		/* ztunnel's capture ports on any other address: ztunnel listens on every address
		 * of its namespace (a node or service address there, a hostNetwork ztunnel), and
		 * would pass such a connection on to that address, its own listener again, in a
		 * loop. These ports are reserved (docs/design-notes.md). */
		if (bpf_ntohs(*port) == s->outbound_port || bpf_ntohs(*port) == s->inbound_port) {
			zb_count(ZB_C_REFUSED_LOOP);
			ZB_DEBUG(s, "connect to capture port %d refused", bpf_ntohs(*port));
			return ZB_REFUSE;
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
	zb_ztunnel_addr(s, dst, zb_ztunnel_index(dst, *port, n), &zt);

record:
	/* The record rides on the thread: overwritten by each redirected connect, read by
	 * sock_ops before this connect() returns. A thread of an enrolled cgroup has its storage
	 * from zb_current_entry; a host process connecting to a pod gets it here. */
	if (!rec)
		rec = bpf_task_storage_get(&orig_dst_by_task, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	/* Without the record ztunnel could not tell where to go; refusing is the safe answer. */
	if (!rec) {
		zb_count(ZB_C_FAIL_CLOSED);
		return ZB_REFUSE;
	}
	rec->armed = 1;
	rec->flags = (entry.flags & ZB_F_INPOD) ? ZB_REC_INPOD : 0;
	__builtin_memcpy(rec->dst.addr, dst->w, 16);
	rec->dst.port = *port;
	rec->dst.family = zb_ip_is_v4(dst) ? AF_INET : AF_INET6;
	ZB_DEBUG(s, "connect to port %d redirected to %d", bpf_ntohs(*port), capture_port);
	*dst = zt;
	*port = bpf_htons(capture_port);
	*rewrite = 1;
	ZB_STEP(ZB_STEP_CONNECT_REDIRECT);
	zb_count(counter);
	ZB_STEP(ZB_STEP_CONNECT_COUNT);
	ZB_STEP(ZB_STEP_CONNECT_CLOCK);
	return ZB_ALLOW;
}

/* Whether connect4/6 look at a socket at all: TCP, and UDP to the DNS port (captured for
 * in-pod pods with DNS capture); other UDP goes its own way. */
static __always_inline int zb_connect_considered(const struct bpf_sock_addr *ctx)
{
	return ctx->type == SOCK_STREAM ||
	       (ctx->type == SOCK_DGRAM && ctx->user_port == bpf_htons(ZB_PORT_DNS_SERVER));
}

SEC("cgroup/connect4")
int connect4(struct bpf_sock_addr *ctx)
{
	struct zb_ip dst = {}, own = {};
	__u16 port = ctx->user_port;
	int rewrite = 0, bind = 0;
	int verdict;

	if (!zb_connect_considered(ctx))
		return ZB_ALLOW;
	zb_ip_from_v4(&dst, ctx->user_ip4);
	verdict = zb_connect(ctx, &dst, &port, &rewrite, &bind, &own);
	if (bind) {
		struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr.s_addr = own.w[3] };

		/* From the pod's address, as iptables' REDIRECT leaves it (inpod_capture.h). A
		 * socket the application bound already keeps its address (the call fails): its
		 * tuple is still its own. */
		bpf_bind(ctx, (struct sockaddr *)&sin, sizeof(sin));
	}
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
	struct zb_ip own = {};
	int rewrite = 0, bind = 0;
	int verdict;

	if (!zb_connect_considered(ctx))
		return ZB_ALLOW;
	/* An IPv4-mapped destination arrives here too (a dual-stack socket): it is decided as
	 * IPv4 and rewritten to ztunnel's IPv4-mapped address. */
	dst.w[0] = ctx->user_ip6[0];
	dst.w[1] = ctx->user_ip6[1];
	dst.w[2] = ctx->user_ip6[2];
	dst.w[3] = ctx->user_ip6[3];
	verdict = zb_connect(ctx, &dst, &port, &rewrite, &bind, &own);
	if (bind) {
		struct sockaddr_in6 sin6 = { .sin6_family = AF_INET6 };

		/* As in connect4; an IPv4-mapped destination gets the IPv4-mapped pod address. */
		__builtin_memcpy(&sin6.sin6_addr, own.w, 16);
		bpf_bind(ctx, (struct sockaddr *)&sin6, sizeof(sin6));
	}
	if (rewrite) {
		ctx->user_ip6[0] = dst.w[0];
		ctx->user_ip6[1] = dst.w[1];
		ctx->user_ip6[2] = dst.w[2];
		ctx->user_ip6[3] = dst.w[3];
		ctx->user_port = port;
	}
	return verdict;
}

SEC("sockops")
int sock_ops(struct bpf_sock_ops *skops)
{
	const struct settings *s;
	struct conn_tuple tuple = {};
	struct connect_record *rec;
	__u32 remote_port;
	__u16 dport;

	/* The kernel calls this program five times for every connect in the subtree (timeout,
	 * receive window, ECN, connect, established) and more for accepted sockets, whatever it
	 * wants: all but the one it needs leave on the first comparison. TCP_CONNECT comes once
	 * the source address and port are chosen and before the SYN leaves, so the record is in
	 * place before ztunnel can accept the connection. */
	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
		return 1;
	ZB_STEPS_START;
	rec = bpf_task_storage_get(&orig_dst_by_task, bpf_get_current_task_btf(), 0, 0);
	/* No redirect is waiting for its TCP_CONNECT in this thread. */
	if (!rec || !rec->armed)
		return 1;
	ZB_STEP(ZB_STEP_SOCKOPS_RECORD);
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

	/* This socket is the client's. */
	if (!zb_tuple_of(&tuple, family, l4, &l6, bpf_htons((__u16)ZB_CTX(skops->local_port)), r4,
			 &r6, dport))
		return 1;
	/* In-pod: to ztunnel's listener on loopback in the pod's own namespace. */
	if (rec->flags & ZB_REC_INPOD)
		zb_tuple_fold_netns(&tuple, bpf_get_netns_cookie(skops));
	ZB_STEP(ZB_STEP_SOCKOPS_TUPLE);

	zb_tuple_store(&tuple, &rec->dst);
	ZB_STEP(ZB_STEP_SOCKOPS_STORE);
	ZB_STEP(ZB_STEP_SOCKOPS_CLOCK);
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

/*
 * Writes `ip`:`port` (network order) as the answer to the SO_ORIGINAL_DST question asked
 * (`question`), as the kernel would: an IPv4 destination only to SOL_IP, an IPv6 one only to
 * SOL_IPV6. Returns 1 when it answered (the caller counts); 0 leaves the kernel's own answer.
 */
static __always_inline int zb_write_orig_dst(struct bpf_sockopt *ctx, const struct zb_ip *ip,
					     __u16 port, int question_v4)
{
	if (question_v4) {
		struct zb_sockaddr_in *sin = ctx->optval;

		if (!zb_ip_is_v4(ip))
			return 0;
		/* The caller's buffer is too small for a sockaddr_in: the kernel's error stands. */
		if ((void *)(sin + 1) > ctx->optval_end)
			return 0;
		sin->family = AF_INET;
		sin->port = port;
		sin->addr = ip->w[3];
		__builtin_memset(sin->zero, 0, sizeof(sin->zero));
		ctx->optlen = sizeof(*sin);
	} else {
		struct zb_sockaddr_in6 *sin6 = ctx->optval;

		if (zb_ip_is_v4(ip))
			return 0;
		if ((void *)(sin6 + 1) > ctx->optval_end)
			return 0;
		sin6->family = AF_INET6;
		sin6->port = port;
		sin6->flowinfo = 0;
		sin6->addr[0] = ip->w[0];
		sin6->addr[1] = ip->w[1];
		sin6->addr[2] = ip->w[2];
		sin6->addr[3] = ip->w[3];
		sin6->scope_id = 0;
		ctx->optlen = sizeof(*sin6);
	}
	ctx->retval = 0;
	return 1;
}

/* SO_ORIGINAL_DST of a socket whose local address is the original destination. */
static __always_inline int zb_answer_local(struct bpf_sockopt *ctx, struct bpf_sock *sk)
{
	__u32 family = ZB_CTX(sk->family);
	__u32 l4 = ZB_CTX(sk->src_ip4);
	__u16 local_port = (__u16)ZB_CTX(sk->src_port);
	struct zb_ip l6 = { { ZB_CTX(sk->src_ip6[0]), ZB_CTX(sk->src_ip6[1]),
			      ZB_CTX(sk->src_ip6[2]), ZB_CTX(sk->src_ip6[3]) } };
	struct zb_ip ip = {};

	if (family == AF_INET)
		zb_ip_from_v4(&ip, l4);
	else if (family == AF_INET6)
		ip = l6;
	else
		return 1;
	if (zb_write_orig_dst(ctx, &ip, bpf_htons(local_port), ctx->level == SOL_IP))
		zb_count(ZB_C_ORIG_DST_LOCAL);
	return 1;
}

SEC("cgroup/getsockopt")
int getsockopt(struct bpf_sockopt *ctx)
{
	const struct settings *s;
	struct conn_tuple tuple = {};
	struct orig_dst od = {};
	struct bpf_sock *sk;
	struct zb_ip ip = {};
	__u16 local_port;
	enum zb_question question;
	enum zb_take found;

	/* Every getsockopt of the subtree comes here: all but SO_ORIGINAL_DST leave untouched
	 * at once (SO_ORIGINAL_DST and IP6T_SO_ORIGINAL_DST share the number 80). */
	if (ctx->optname != SO_ORIGINAL_DST)
		return 1;
	if (ctx->level != SOL_IP && ctx->level != SOL_IPV6)
		return 1;
	sk = ctx->sk;
	if (!sk)
		return 1;
	ZB_STEPS_START;
	s = zb_settings();
	if (!s)
		return 1;
	local_port = (__u16)ZB_CTX(sk->src_port);
	/* In a pod's namespace (in-pod), a socket ztunnel accepted on its 15006 listener through
	 * the sk_lookup program keeps the original destination as its local address: that is
	 * the answer (ztunnel would fall back to it anyway, after a warning per connection).
	 * Sockets on ztunnel's own ports are not such sockets (15008's peers name their
	 * destination inside HBONE; answering its own port would invite a loop). */
	if (!zb_inpod_is_ztunnel_port(local_port) && zb_inpod_netns_entry(bpf_get_netns_cookie(ctx)))
		return zb_answer_local(ctx, sk);
	/* Only ztunnel's capture sockets have an original destination to give. */
	if (local_port != s->outbound_port && local_port != s->inbound_port)
		return 1;
	ZB_STEP(ZB_STEP_GETSOCKOPT_SETTINGS);

	/* Read up front, unconditionally, for the reason given in sock_ops. */
	__u32 family = ZB_CTX(sk->family);
	__u32 l4 = ZB_CTX(sk->src_ip4), r4 = ZB_CTX(sk->dst_ip4);
	__u16 peer_port = ZB_CTX(sk->dst_port);
	struct zb_ip l6 = { { ZB_CTX(sk->src_ip6[0]), ZB_CTX(sk->src_ip6[1]),
			      ZB_CTX(sk->src_ip6[2]), ZB_CTX(sk->src_ip6[3]) } };
	struct zb_ip r6 = { { ZB_CTX(sk->dst_ip6[0]), ZB_CTX(sk->dst_ip6[1]),
			      ZB_CTX(sk->dst_ip6[2]), ZB_CTX(sk->dst_ip6[3]) } };

	/* The accepted socket is the server's: its peer is the client. */
	if (!zb_tuple_of(&tuple, family, r4, &r6, peer_port, l4, &l6, bpf_htons(local_port)))
		return 1;
	ZB_STEP(ZB_STEP_GETSOCKOPT_TUPLE);
	question = ctx->level == SOL_IP ? ZB_ASK_V4 : ZB_ASK_V6;
	if (zb_tuple_dst_is_loopback(&tuple)) {
		/* In-pod: keyed by the namespace as sock_ops keyed it (the same one: ztunnel's
		 * listener is in the pod's namespace). Looked up so first whether or not this
		 * namespace is an enrolled pod's yet: the agent writes a pod's entry before
		 * ztunnel's ack and enrols its namespace after it, and ztunnel listens (and may be
		 * asked) in between. A ztunnel listening on loopback in its own namespace (node
		 * mode, a dev box) has its records keyed without it. */
		struct conn_tuple in_pod = tuple;

		zb_tuple_fold_netns(&in_pod, bpf_get_netns_cookie(ctx));
		found = zb_tuple_take(&in_pod, question, &od);
		if (found == ZB_TAKE_ABSENT)
			found = zb_tuple_take(&tuple, question, &od);
	} else {
		found = zb_tuple_take(&tuple, question, &od);
	}
	ZB_STEP(ZB_STEP_GETSOCKOPT_TAKE);
	if (found == ZB_TAKE_ABSENT) {
		/* Keep the kernel's own answer (netfilter's, or its error). ztunnel asks the IPv6
		 * question whenever the IPv4 one found nothing, whatever the socket's family: the
		 * connection's miss is counted there, once, not at each of its two questions. */
		if (question == ZB_ASK_V6)
			zb_count(ZB_C_ORIG_DST_MISS);
		ZB_DEBUG(s, "SO_ORIGINAL_DST: no record for peer port %d", bpf_ntohs(tuple.sport));
		return 1;
	}
	/* An IPv6 destination is given to the IPv6 question, which ztunnel asks next, and an
	 * IPv4 one only to SOL_IP, as the kernel would. */
	if (found == ZB_TAKE_OTHER_FAMILY)
		return 1;
	zb_ip_from_bytes(&ip, od.addr);
	if (zb_write_orig_dst(ctx, &ip, od.port, question == ZB_ASK_V4)) {
		ZB_STEP(ZB_STEP_GETSOCKOPT_ANSWER);
		zb_count(ZB_C_ORIG_DST_HIT);
		ZB_STEP(ZB_STEP_GETSOCKOPT_COUNT);
		ZB_STEP(ZB_STEP_GETSOCKOPT_CLOCK);
	}
	return 1;
}

/*
 * The bind decision shared by bind4 and bind6: ztunnel binding an ambient pod's address gets
 * one of its own addresses instead (by a hash of the pod's address, so each pod keeps one and
 * ztunnel's upstream connections spread too), same port. Returns 1 when `addr` was replaced.
 */
static __always_inline int zb_bind(struct bpf_sock_addr *ctx, struct zb_ip *addr)
{
	const struct settings *s = zb_settings();
	const struct cgroup_info *pod;
	struct cgroup_info info = {};
	struct zb_ip zt = {};
	__u32 n;

	/* Nothing enrolled: no pod address to rewrite. */
	if (!s || !s->levels)
		return 0;
	/* In an in-pod pod's namespace, ztunnel's upstream sockets bind the client's address
	 * (original source, IP_FREEBIND): nothing would route the app's replies to that address
	 * back to ztunnel, so the bind takes the pod's own address. Its own addresses and
	 * loopback are the pod's to bind. */
	pod = zb_inpod_netns_entry(bpf_get_netns_cookie(ctx));
	if (pod) {
		if (zb_ip_is_loopback(addr) || zb_is_own_ip(pod, addr))
			return 0;
		if (!zb_inpod_own_addr(pod, addr, &zt))
			return 0;
		if (!zb_lookup_current(s->levels, &info) || !(info.flags & ZB_F_ZTUNNEL))
			return 0;
		*addr = zt;
		zb_count(ZB_C_BIND_REWRITTEN);
		ZB_DEBUG(s, "in-pod: ztunnel bind to a foreign address rewritten to the pod's");
		return 1;
	}
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
	if (zb_bind(ctx, &addr))
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
	if (zb_bind(ctx, &addr)) {
		ctx->user_ip6[0] = addr.w[0];
		ctx->user_ip6[1] = addr.w[1];
		ctx->user_ip6[2] = addr.w[2];
		ctx->user_ip6[3] = addr.w[3];
	}
	return ZB_ALLOW;
}

/*
 * DNS of in-pod pods with DNS capture (inpod_capture.h): a UDP query sent with an address
 * (sendto; a connected socket went through connect4/6) to port 53 goes to ztunnel's 15053 in
 * the pod, and the reply is shown as coming from the server asked.
 */
static __always_inline int zb_dns_sendmsg(struct bpf_sock_addr *ctx, struct zb_ip *dst)
{
	const struct settings *s = zb_settings();
	struct cgroup_info entry = {};

	if (!s || !s->levels)
		return 0;
	if (!zb_lookup_current(s->levels, &entry))
		return 0;
	if ((entry.flags & (ZB_F_AMBIENT | ZB_F_INPOD | ZB_F_DNS)) !=
	    (ZB_F_AMBIENT | ZB_F_INPOD | ZB_F_DNS))
		return 0;
	if (!zb_dns_remember(ctx->sk, dst, ctx->user_port))
		return 0;
	zb_inpod_loopback(dst, dst);
	zb_count(ZB_C_REDIRECTED_DNS);
	return 1;
}

SEC("cgroup/sendmsg4")
int sendmsg4(struct bpf_sock_addr *ctx)
{
	struct zb_ip dst = {};

	/* Only DNS; every other datagram leaves at this comparison. */
	if (ctx->user_port != bpf_htons(ZB_PORT_DNS_SERVER))
		return ZB_ALLOW;
	zb_ip_from_v4(&dst, ctx->user_ip4);
	if (zb_dns_sendmsg(ctx, &dst)) {
		ctx->user_ip4 = dst.w[3];
		ctx->user_port = bpf_htons(ZB_PORT_DNS);
	}
	return ZB_ALLOW;
}

SEC("cgroup/sendmsg6")
int sendmsg6(struct bpf_sock_addr *ctx)
{
	struct zb_ip dst = {};

	if (ctx->user_port != bpf_htons(ZB_PORT_DNS_SERVER))
		return ZB_ALLOW;
	dst.w[0] = ctx->user_ip6[0];
	dst.w[1] = ctx->user_ip6[1];
	dst.w[2] = ctx->user_ip6[2];
	dst.w[3] = ctx->user_ip6[3];
	if (zb_dns_sendmsg(ctx, &dst)) {
		ctx->user_ip6[0] = dst.w[0];
		ctx->user_ip6[1] = dst.w[1];
		ctx->user_ip6[2] = dst.w[2];
		ctx->user_ip6[3] = dst.w[3];
		ctx->user_port = bpf_htons(ZB_PORT_DNS);
	}
	return ZB_ALLOW;
}

/* The server a socket's DNS query was sent to, when `src` is ztunnel's DNS proxy (its
 * loopback address and 15053) and the socket sent a captured query. */
static __always_inline struct orig_dst *zb_dns_reply_from(struct bpf_sock_addr *ctx,
							   const struct zb_ip *src)
{
	if (ctx->user_port != bpf_htons(ZB_PORT_DNS) || !zb_ip_is_loopback(src) || !ctx->sk)
		return 0;
	return bpf_sk_storage_get(&dns_orig_dst, ctx->sk, 0, 0);
}

SEC("cgroup/recvmsg4")
int recvmsg4(struct bpf_sock_addr *ctx)
{
	struct orig_dst *od;
	struct zb_ip src = {};

	zb_ip_from_v4(&src, ctx->user_ip4);
	od = zb_dns_reply_from(ctx, &src);
	/* Only an IPv4 server can be shown on an IPv4 socket. */
	if (od && od->family == AF_INET) {
		zb_ip_from_bytes(&src, od->addr);
		ctx->user_ip4 = src.w[3];
		ctx->user_port = od->port;
	}
	return 1;
}

SEC("cgroup/recvmsg6")
int recvmsg6(struct bpf_sock_addr *ctx)
{
	struct orig_dst *od;
	struct zb_ip src = {};

	src.w[0] = ctx->user_ip6[0];
	src.w[1] = ctx->user_ip6[1];
	src.w[2] = ctx->user_ip6[2];
	src.w[3] = ctx->user_ip6[3];
	od = zb_dns_reply_from(ctx, &src);
	if (od) {
		/* The address as it was asked (IPv4-mapped on a dual-stack socket). */
		zb_ip_from_bytes(&src, od->addr);
		ctx->user_ip6[0] = src.w[0];
		ctx->user_ip6[1] = src.w[1];
		ctx->user_ip6[2] = src.w[2];
		ctx->user_ip6[3] = src.w[3];
		ctx->user_port = od->port;
	}
	return 1;
}
