//! Processes: the watcher's events, each process's cgroup, live cgroups and their owners.

use super::*;

impl Resolver {
    // ---- processes ----

    pub(super) fn handle_proc(&mut self, event: ProcEvent, out: &mut Vec<Update>) {
        match event {
            ProcEvent::Exec { tgid, facts, .. } => self.exec(tgid, facts, out),
            ProcEvent::Fork {
                parent_tgid,
                child_pid,
                child_tgid,
                ..
            } => {
                // A new thread changes no process and no cgroup. The kernel reports a thread's
                // parent as the parent of the whole process (`real_parent`), so
                // `parent_tgid != child_tgid` for it: only `child_pid != child_tgid` tells a
                // thread on a real kernel. The spec's rule (`child_tgid == parent_tgid`) is
                // kept too, for recordings written by hand to the letter of it.
                if child_pid != child_tgid || child_tgid == parent_tgid {
                    return;
                }
                let cgroup = self.procs.get(&parent_tgid).copied().flatten();
                if let Some(id) = cgroup {
                    self.cgroups.get_mut(&id).expect("live cgroup").live += 1;
                }
                debug!("fork {parent_tgid} -> {child_tgid}");
                if let Some(Some(old)) = self.procs.insert(child_tgid, cgroup) {
                    // A pid reused without its exit seen: the old process is gone.
                    self.release(old, out);
                }
            }
            ProcEvent::Exit { pid, tgid, .. } => {
                if pid != tgid {
                    return; // a thread
                }
                debug!("exit {tgid}");
                if let Some(Some(old)) = self.procs.remove(&tgid) {
                    self.release(old, out);
                }
            }
            ProcEvent::Lost => {
                self.lost_since_scan += 1;
                if self.lost_since_scan == 1 {
                    info!("events were lost; waiting for the rescan");
                }
            }
            ProcEvent::Scan { processes } => {
                let lost = std::mem::take(&mut self.lost_since_scan);
                if lost > 1 {
                    info!("rescan after {lost} losses of events");
                }
                // The node's namespace first, so that no process listed before PID 1 lends a
                // pod the node's addresses.
                if let Some(init) = processes.iter().find(|p| p.pid == INIT_PID) {
                    self.learn_host_netns(INIT_PID, &init.facts);
                }
                let mut listed: FxHashSet<Pid> = FxHashSet::default();
                listed.reserve(processes.len());
                for p in processes {
                    listed.insert(p.pid);
                    self.exec(p.pid, p.facts, out);
                }
                let mut gone: Vec<Pid> = self
                    .procs
                    .keys()
                    .filter(|pid| !listed.contains(pid))
                    .copied()
                    .collect();
                gone.sort_unstable();
                debug!("scan: {} processes, {} gone", listed.len(), gone.len());
                for pid in gone {
                    if let Some(Some(old)) = self.procs.remove(&pid) {
                        self.release(old, out);
                    }
                }
                self.scan_seen = true;
            }
        }
    }

    /// A process is (now) in the cgroup its facts name; without facts, it stays where it was.
    pub(super) fn exec(&mut self, tgid: Pid, facts: ProcFacts, out: &mut Vec<Update>) {
        self.learn_host_netns(tgid, &facts);
        let Some(cgroup) = facts.cgroup else {
            debug!("process {tgid}: no cgroup (gone before /proc was read)");
            self.procs.entry(tgid).or_insert(None);
            return;
        };
        let id = cgroup.id;
        if self.procs.get(&tgid) == Some(&Some(id)) {
            return;
        }
        self.acquire(cgroup, facts.netns, facts.ips, out);
        if let Some(Some(old)) = self.procs.insert(tgid, Some(id)) {
            self.release(old, out);
        }
    }

    /// PID 1's network namespace is the node's; not when its facts put it in a pod's cgroup,
    /// which no node's init is in (a recording may say anything).
    fn learn_host_netns(&mut self, tgid: Pid, facts: &ProcFacts) {
        if tgid != INIT_PID || facts.netns.is_none() {
            return;
        }
        let in_a_pod = facts
            .cgroup
            .as_ref()
            .is_some_and(|c| matches!(find_pod(&c.path), PodOf::Pod { .. }));
        if !in_a_pod {
            self.host_netns = facts.netns;
        }
    }

    /// The addresses a process in a cgroup of `owner` shows, as the cgroup keeps them: for a
    /// pod, none from the node's namespace `host_netns` (a process on its way into the pod,
    /// such as the runtime's init before it joins the pod's namespace, must not lend the pod
    /// the node's addresses while its status has none: host connects to them would go to
    /// ztunnel).
    fn shown_ips(
        host_netns: Option<u64>,
        owner: Option<&OwnerKey>,
        netns: Option<u64>,
        ips: Vec<IpAddr>,
    ) -> Vec<IpAddr> {
        let in_node_namespace = netns.is_some() && netns == host_netns;
        if in_node_namespace && matches!(owner, Some(OwnerKey::Pod(_))) {
            return Vec::new();
        }
        usable_ips(ips)
    }

    /// One more live process in `cgroup`.
    pub(super) fn acquire(
        &mut self,
        cgroup: CgroupRef,
        netns: Option<u64>,
        ips: Vec<IpAddr>,
        out: &mut Vec<Update>,
    ) {
        let host_netns = self.host_netns;
        if let Some(state) = self.cgroups.get_mut(&cgroup.id) {
            state.live += 1;
            // Compared only for the line: the path is long, and most execs are into a cgroup
            // already live.
            if log::log_enabled!(log::Level::Debug) && *state.path != *cgroup.path {
                debug!(
                    "cgroup {} is named both {} and {}; keeping the first",
                    cgroup.id, state.path, cgroup.path
                );
            }
            if state.ips.is_empty() && !ips.is_empty() {
                state.ips = Self::shown_ips(host_netns, state.owner.as_ref(), netns, ips);
                if let (false, Some(key)) = (state.ips.is_empty(), state.owner.clone()) {
                    self.on_addresses_seen(key, out);
                }
            }
            return;
        }
        let owner = self.classify(&cgroup.path);
        let ips = Self::shown_ips(host_netns, owner.as_ref().map(|(key, _)| key), netns, ips);
        debug!("cgroup {} {}: first process", cgroup.id, cgroup.path);
        let path = cgroup.path;
        self.by_path.insert(Arc::clone(&path), cgroup.id);
        self.cgroups.insert(
            cgroup.id,
            CgroupState {
                path,
                live: 1,
                owner: owner.as_ref().map(|(k, _)| k.clone()),
                ips,
            },
        );
        if let Some((key, root)) = owner {
            let owner = self
                .owners
                .entry(key.clone())
                .or_insert_with(|| Owner::new(&root));
            owner.live.insert(cgroup.id);
            owner.stale = true;
            self.recompute(&key, out);
            if key == OwnerKey::Ztunnel {
                self.update_ztunnel(out);
            }
        }
    }

    /// One less live process in cgroup `id`.
    pub(super) fn release(&mut self, id: CgroupId, out: &mut Vec<Update>) {
        let Some(state) = self.cgroups.get_mut(&id) else {
            return;
        };
        state.live -= 1;
        if state.live > 0 {
            return;
        }
        let state = self.cgroups.remove(&id).expect("present above");
        debug!("cgroup {id} {}: no process left", state.path);
        self.by_path.remove(&state.path);
        if let Some(key) = state.owner {
            if let Some(owner) = self.owners.get_mut(&key) {
                owner.live.remove(&id);
                owner.stale = true;
            }
            self.recompute(&key, out);
            if key == OwnerKey::Ztunnel {
                self.update_ztunnel(out);
            }
        }
    }

    /// The first addresses seen in a cgroup may give an `auto` owner its address, or a pod
    /// whose status has none yet ([`Rules::addresses`]).
    pub(super) fn on_addresses_seen(&mut self, key: OwnerKey, out: &mut Vec<Update>) {
        let waits_for_address = match &key {
            OwnerKey::Workload(_) | OwnerKey::Ztunnel => true,
            OwnerKey::Pod(uid) => self.pods.get(uid).is_some_and(|p| p.ips.is_empty()),
            OwnerKey::Exempt(_) => false,
        };
        if waits_for_address {
            self.recompute(&key, out);
            if key == OwnerKey::Ztunnel {
                self.update_ztunnel(out);
            }
        }
    }

    /// Who owns a cgroup path, and that owner's root (pod-level cgroup or subtree).
    pub(super) fn classify(&mut self, path: &str) -> Option<(OwnerKey, String)> {
        if let Some(workloads) = &self.config.workloads {
            if let Some(z) = &workloads.ztunnel {
                if is_within(path, &z.cgroup) {
                    return Some((OwnerKey::Ztunnel, z.cgroup.clone()));
                }
            }
            for (i, w) in workloads.workloads.iter().enumerate() {
                if is_within(path, &w.cgroup) {
                    return Some((OwnerKey::Workload(i), w.cgroup.clone()));
                }
            }
            for (i, e) in workloads.exempt.iter().enumerate() {
                if is_within(path, e) {
                    return Some((OwnerKey::Exempt(i), e.clone()));
                }
            }
            return None;
        }
        match find_pod(path) {
            PodOf::Pod { uid, pod_path, .. } => {
                return Some((OwnerKey::Pod(uid.into()), pod_path.to_string()));
            }
            PodOf::Unrecognized => {
                if self.unrecognized_logged.len() < UNRECOGNIZED_LOG_LIMIT
                    && self.unrecognized_logged.insert(path.to_string())
                {
                    warn!(
                        "cgroup {path} is under kubepods but no pod uid could be read from it; \
                         treated as a host cgroup (role none)"
                    );
                }
            }
            PodOf::Host => {}
        }
        for (i, e) in self.config.exempt_cgroups.iter().enumerate() {
            if is_within(path, e) {
                return Some((OwnerKey::Exempt(i), e.clone()));
            }
        }
        None
    }
}
