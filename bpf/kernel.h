/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * zbridge: the few kernel structures its BPF objects read through BTF (the exec tap and the
 * socket hooks), declared with only the fields read. With preserve_access_index clang records
 * each access as a CO-RE relocation, and the loader (aya) rewrites the offsets against the
 * running kernel's BTF (/sys/kernel/btf/vmlinux): no vmlinux.h is needed, and a kernel whose
 * layout moved these fields still loads. Reading through a task pointer needs CAP_PERFMON.
 */
#ifndef ZBRIDGE_KERNEL_H
#define ZBRIDGE_KERNEL_H

#include <linux/types.h>

/* The network namespace: exec_tap reads task->nsproxy->net_ns->ns.inum. */
struct ns_common {
	unsigned int inum;
} __attribute__((preserve_access_index));

struct net {
	struct ns_common ns;
} __attribute__((preserve_access_index));

struct nsproxy {
	struct net *net_ns;
} __attribute__((preserve_access_index));

/* The cgroup v2 id: connect4/6 read task->cgroups->dfl_cgrp->kn->id (zb_task_cgroup_id). */
struct kernfs_node {
	__u64 id;
} __attribute__((preserve_access_index));

struct cgroup {
	struct kernfs_node *kn;
} __attribute__((preserve_access_index));

struct css_set {
	struct cgroup *dfl_cgrp;
} __attribute__((preserve_access_index));

struct task_struct {
	struct nsproxy *nsproxy;
	struct css_set *cgroups;
} __attribute__((preserve_access_index));

#endif /* ZBRIDGE_KERNEL_H */
