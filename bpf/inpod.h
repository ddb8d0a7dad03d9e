/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * zbridge: what the in-pod programs share with the Rust programmer
 * (programmer/src/inbound.rs mirrors these). In-pod mode is ztunnel's `shared` proxy mode:
 * ztunnel listens inside each captured pod's network namespace.
 */
#ifndef ZBRIDGE_INPOD_H
#define ZBRIDGE_INPOD_H

/* ztunnel's listeners in a pod's namespace (host order, as sk_lookup's local_port is). */
#define ZB_PORT_OUTBOUND 15001 /* outbound capture */
#define ZB_PORT_INBOUND 15006  /* inbound plaintext capture */
#define ZB_PORT_HBONE 15008    /* inbound HBONE: reached directly */
#define ZB_PORT_DNS 15053      /* DNS proxy, on 127.0.0.1 and ::1 only */
#define ZB_PORT_DNS_SERVER 53  /* what an application's resolver asks */

/* Indices of the per-CPU `inbound_counters` array (values __u64, summed over CPUs). */
enum zb_inbound_counter {
	ZB_IN_REDIRECTED = 0,    /* handed to ztunnel's 15006 listener in the pod */
	ZB_IN_PASSED_NODE = 1,   /* from a node address (probes): to the pod directly */
	ZB_IN_NO_LISTENER = 2,   /* no listener for the address: not captured (yet) */
	ZB_IN_REFUSED_LOOP = 3,  /* from outside straight to 15001/15006: dropped */
	ZB_IN_ASSIGN_FAILED = 4, /* bpf_sk_assign refused the listener: to the pod directly */
	ZB_IN_NO_ZTUNNEL = 5,    /* a captured pod's address, ztunnel's listener gone: refused */
	ZB_IN_MAX = 6,
};

#endif /* ZBRIDGE_INPOD_H */
