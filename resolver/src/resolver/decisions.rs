//! Decisions: an owner's role by Istio's rules or the workloads file, the entries it needs,
//! and the difference from what was emitted.

use super::*;

impl Resolver {
    // ---- decisions ----

    /// The decision for an owner and the entries it needs.
    pub(super) fn desired(&mut self, key: &OwnerKey) -> (Decision, Entries) {
        let decision = self.decide(key);
        let desired = self.desired_for(key, &decision);
        (decision, desired)
    }

    /// The entries an owner needs under `decision`.
    pub(super) fn desired_for(&mut self, key: &OwnerKey, decision: &Decision) -> Entries {
        let mut desired = BTreeMap::new();
        if decision.role == Role::None {
            return desired;
        }
        let Some(owner) = self.owners.get(key) else {
            return desired;
        };
        let pod = self.owner_name(key);
        let root_id = match self.by_path.get(&*owner.root) {
            Some(id) => Some(*id),
            None => {
                let root = owner.root.clone();
                self.ids.id_of(&root)
            }
        };
        let (capture, identity) = match decision.role {
            Role::Ambient => self.capture_of(key),
            _ => (Capture::Node, None),
        };
        let owner = &self.owners[key];
        let enrol = |id: CgroupId, path: &Arc<str>| {
            Arc::new(Enrolment {
                cgroup_id: id,
                cgroup: Arc::clone(path),
                pod: pod.clone(),
                role: decision.role,
                ips: decision.ips.clone(),
                capture,
                identity: identity.clone(),
            })
        };
        match root_id {
            Some(id) => {
                desired.insert(id, enrol(id, &owner.root));
            }
            None => {
                for id in &owner.live {
                    desired.insert(*id, enrol(*id, &self.cgroups[id].path));
                }
            }
        }
        desired
    }

    /// Where an ambient owner is captured to, and for in-pod capture who it is.
    pub(super) fn capture_of(&self, key: &OwnerKey) -> (Capture, Option<Identity>) {
        match key {
            OwnerKey::Pod(uid) => match (self.config.capture, self.pods.get(uid)) {
                (capture @ Capture::InPod { .. }, Some(pod)) => (
                    capture,
                    Some(Identity {
                        uid: pod.uid.to_string(),
                        namespace: pod.namespace.to_string(),
                        name: pod.name.to_string(),
                        service_account: pod.service_account.to_string(),
                    }),
                ),
                _ => (Capture::Node, None),
            },
            // Standalone: the workloads file says where ztunnel listens (v2 `ztunnel.mode`).
            OwnerKey::Workload(i) => {
                let Some(file) = self.config.workloads.as_ref() else {
                    return (Capture::Node, None);
                };
                match (file.in_pod(), file.workloads.get(*i)) {
                    (true, Some(w)) => {
                        let (namespace, name) = w.zds_namespace_and_name();
                        (
                            Capture::InPod {
                                dns: file.dns_capture,
                            },
                            Some(Identity {
                                uid: w.uid.clone(),
                                namespace: namespace.to_string(),
                                name: name.to_string(),
                                service_account: w.service_account.clone(),
                            }),
                        )
                    }
                    _ => (Capture::Node, None),
                }
            }
            _ => (Capture::Node, None),
        }
    }

    pub(super) fn decide(&self, key: &OwnerKey) -> Decision {
        match key {
            OwnerKey::Pod(uid) => match self.pods.get(uid) {
                Some(pod) => self
                    .rules
                    .decide(pod, self.namespaces.get(&*pod.namespace), || {
                        self.seen_ips(key)
                    }),
                None => Decision::none("not known on this node"),
            },
            OwnerKey::Workload(i) => {
                let Some(w) = self
                    .config
                    .workloads
                    .as_ref()
                    .and_then(|w| w.workloads.get(*i))
                else {
                    return Decision::none("workload no longer in the workloads file");
                };
                if w.mode == Mode::None {
                    return Decision::none("workloads file: mode none");
                }
                let ips = self.address_of(key, &w.address);
                if ips.is_empty() {
                    return Decision::none(
                        "workloads file: address auto, and no address seen in the subtree yet",
                    );
                }
                Decision {
                    role: Role::Ambient,
                    ips,
                    reason: "workloads file: mode ambient",
                }
            }
            OwnerKey::Ztunnel => {
                let address = self
                    .config
                    .workloads
                    .as_ref()
                    .and_then(|w| w.ztunnel.as_ref())
                    .map(|z| z.address.clone())
                    .unwrap_or(Address::Fixed(Vec::new()));
                Decision {
                    role: Role::Ztunnel,
                    ips: self.address_of(key, &address),
                    reason: "workloads file: ztunnel",
                }
            }
            OwnerKey::Exempt(_) => Decision {
                role: Role::Exempt,
                ips: Vec::new(),
                reason: "exempt host cgroup",
            },
        }
    }

    /// Whether an owner's decision is `role` with `ips`; for a pod, found without building the
    /// decision (no addresses copied).
    pub(super) fn decides_same(&self, key: &OwnerKey, role: Role, ips: &[IpAddr]) -> bool {
        if let OwnerKey::Pod(uid) = key {
            if let Some(pod) = self.pods.get(uid) {
                let namespace = self.namespaces.get(&*pod.namespace);
                let now_ips = self.rules.addresses(pod, || self.seen_ips(key));
                let (now, _) = self.rules.role(pod, namespace, now_ips);
                return now == role
                    && match now {
                        Role::None => ips.is_empty(),
                        _ => now_ips == ips,
                    };
            }
        }
        let decision = self.decide(key);
        decision.role == role && decision.ips == ips
    }

    /// For a pod known on this node, what [`Resolver::decide`] gives (role, reason, addresses:
    /// the pod's, none for `none`) without copying the addresses; `None` for any other owner.
    pub(super) fn pod_decision(&self, key: &OwnerKey) -> Option<(Role, &'static str, &[IpAddr])> {
        let OwnerKey::Pod(uid) = key else {
            return None;
        };
        let pod = self.pods.get(uid)?;
        let namespace = self.namespaces.get(&*pod.namespace);
        let ips = self.rules.addresses(pod, || self.seen_ips(key));
        let (role, reason) = self.rules.role(pod, namespace, ips);
        let ips: &[IpAddr] = match role {
            Role::None => &[],
            _ => ips,
        };
        Some((role, reason, ips))
    }

    /// The addresses seen in an owner's network namespace: those of its first live cgroup
    /// (lowest id first, so that a replay decides the same) whose processes showed any. Only
    /// asked for a pod whose status has no address yet.
    pub(super) fn seen_ips(&self, key: &OwnerKey) -> &[IpAddr] {
        self.owners
            .get(key)
            .into_iter()
            .flat_map(|o| o.live.iter())
            .filter_map(|id| self.cgroups.get(id))
            .find(|c| !c.ips.is_empty())
            .map_or(&[], |c| c.ips.as_slice())
    }

    /// A fixed address, or for `auto` the first addresses seen in the owner's live cgroups
    /// (lowest cgroup id first, so that a reload decides the same).
    pub(super) fn address_of(&self, key: &OwnerKey, address: &Address) -> Vec<IpAddr> {
        match address {
            Address::Fixed(ips) => ips.clone(),
            Address::Auto => self.seen_ips(key).to_vec(),
        }
    }

    /// Re-decides one owner and emits the difference in its entries.
    pub(super) fn recompute(&mut self, key: &OwnerKey, out: &mut Vec<Update>) {
        let Some(owner) = self.owners.get(key) else {
            return;
        };
        // Nothing but the decision could have changed, and it did not: the entries are
        // those emitted (a namespace change re-decides every pod in it; many stay the same).
        // A known pod's decision is looked up once, for the check and the decision.
        let pod_decision = self.pod_decision(key);
        if !owner.stale
            && owner
                .decision()
                .is_some_and(|(role, ips)| match pod_decision {
                    Some((now, _, now_ips)) => now == role && now_ips == ips,
                    None => self.decides_same(key, role, ips),
                })
        {
            return;
        }
        let decision = match pod_decision {
            Some((role, reason, ips)) => Decision {
                role,
                ips: ips.to_vec(),
                reason,
            },
            None => self.decide(key),
        };
        let logged_same = owner
            .decision()
            .is_some_and(|(role, ips)| role == decision.role && ips == decision.ips);
        let first_none = owner.decided.is_none() && decision.role == Role::None;
        // Back to the decision that built `enrolled`, with nothing else changed: its entries
        // are those that would be built. Only while the owner has live cgroups: then its
        // pod-level cgroup exists throughout (a live cgroup below it pins it), so the id that
        // `desired_for` would find for it is the one found before. (Then nothing is emitted
        // now: the decision that enrolled it would have been found the same above.)
        let reuse = !owner.stale
            && !owner.live.is_empty()
            && owner.emitted().is_none()
            && owner
                .enrolled
                .as_ref()
                .is_some_and(|e| e.role == decision.role && e.ips == decision.ips);
        // The owner's name is made only for a line that is written.
        let label = (!logged_same && log::log_enabled!(log::Level::Info)).then(|| {
            let (name, quiet) = self.owner_label(key);
            (name, quiet, self.ips_note(key, &decision))
        });
        if reuse {
            let owner = self.owners.get_mut(key).expect("checked above");
            let enrolled = owner.enrolled.as_ref().expect("checked above");
            for enrolment in enrolled.entries.values() {
                out.push(Update::Upsert(Arc::clone(enrolment)));
            }
            if let Some((name, quiet, note)) = label {
                log_decision(&owner.root, &decision, first_none, (name, quiet), note);
            }
            owner.decided = Some(Decided::Enrolled);
            owner.stale = false;
            return;
        }
        let desired = self.desired_for(key, &decision);
        let owner = self.owners.get_mut(key).expect("checked above");
        if let Some(emitted) = owner.emitted() {
            for id in emitted.keys() {
                if !desired.contains_key(id) {
                    out.push(Update::Delete { cgroup_id: *id });
                }
            }
        }
        for (id, enrolment) in &desired {
            if owner.emitted().and_then(|e| e.get(id)) != Some(enrolment) {
                out.push(Update::Upsert(Arc::clone(enrolment)));
            }
        }
        if let Some((name, quiet, note)) = label {
            log_decision(&owner.root, &decision, first_none, (name, quiet), note);
        }
        let nothing = desired.is_empty();
        owner.set_decided(decision, desired);
        owner.stale = false;
        if owner.live.is_empty() && nothing {
            self.owners.remove(key);
        }
    }

    /// What the decision's line says of where its addresses came from: for a pod captured
    /// before its status has an address, that they are its network namespace's.
    pub(super) fn ips_note(&self, key: &OwnerKey, decision: &Decision) -> &'static str {
        let from_namespace = match key {
            OwnerKey::Pod(uid) => {
                !decision.ips.is_empty() && self.pods.get(uid).is_some_and(|p| p.ips.is_empty())
            }
            _ => false,
        };
        if from_namespace {
            "; the address of its network namespace, not yet in its status"
        } else {
            ""
        }
    }

    /// Re-decides every owner whose pod is in `namespace`.
    pub(super) fn recompute_namespace(&mut self, namespace: &str, out: &mut Vec<Update>) {
        // Taken out while its owners are re-decided (recompute needs `self`), then put back.
        let Some((name, keys)) = self.pods_by_namespace.remove_entry(namespace) else {
            return;
        };
        for key in &keys {
            self.recompute(key, out);
        }
        self.pods_by_namespace.insert(name, keys);
    }

    /// The ztunnel address the programs should use; emitted when it changes.
    pub(super) fn update_ztunnel(&mut self, out: &mut Vec<Update>) {
        let ips = if let Some(workloads) = &self.config.workloads {
            match &workloads.ztunnel {
                Some(z) => self.address_of(&OwnerKey::Ztunnel, &z.address),
                None => Vec::new(),
            }
        } else {
            // Several during a rollout: the newest (then by name, uid) that has an address.
            self.ztunnel_pods
                .last()
                .and_then(|rank| self.pods.get(&rank.uid))
                .map(|p| p.ips.clone())
                .unwrap_or_default()
        };
        if self.ztunnel_emitted.as_ref() == Some(&ips) {
            return;
        }
        // Before the first full picture, "no ztunnel" is not known to be true (the kube cache
        // may not have listed the ztunnel pod yet), and the address a previous run pinned is
        // still right: clearing it would fail every captured pod closed while the agent
        // restarts. It is said, if still true, right before `Synced`.
        if ips.is_empty() && !self.synced_emitted {
            return;
        }
        if self.ztunnel_emitted.is_some() || !ips.is_empty() {
            info!("ztunnel address: {}", join_ips(&ips));
        }
        self.ztunnel_emitted = Some(ips.clone());
        out.push(Update::SetZtunnel { ips });
    }

    pub(super) fn maybe_synced(&mut self, out: &mut Vec<Update>) {
        if self.synced_emitted || !self.scan_seen || !(self.standalone() || self.kube_synced) {
            return;
        }
        self.synced_emitted = true;
        info!("synced: the process scan and the pod and namespace lists are complete");
        self.update_ztunnel(out);
        out.push(Update::Synced);
    }
}

/// Logs a decision that differs from the last one of the owner whose cgroup is `root`;
/// `label` is the owner's name and whether its first `none` (`first_none`: this one) is quiet
/// (debug) ([`Resolver::owner_label`]).
pub(super) fn log_decision(
    root: &str,
    decision: &Decision,
    first_none: bool,
    (name, quiet): (String, bool),
    note: &str,
) {
    let ips = if decision.ips.is_empty() {
        String::new()
    } else {
        format!(" {}", join_ips(&decision.ips))
    };
    if quiet && first_none {
        debug!("{name}: cgroup {root} → none ({})", decision.reason);
    } else {
        info!(
            "{name}: cgroup {root} → {}{ips} ({}{note})",
            decision.role.as_str(),
            decision.reason
        );
    }
}

pub(super) fn join_ips(ips: &[IpAddr]) -> String {
    if ips.is_empty() {
        return "none".to_string();
    }
    ips.iter()
        .map(|ip| ip.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Unicast, non-loopback addresses, IPv4 first.
pub(super) fn usable_ips(ips: Vec<IpAddr>) -> Vec<IpAddr> {
    ipv4_first(
        ips.into_iter()
            .filter(|ip| !ip.is_loopback() && !ip.is_multicast() && !ip.is_unspecified())
            .collect(),
    )
}
