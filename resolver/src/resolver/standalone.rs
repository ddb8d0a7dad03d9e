//! Standalone mode: the workloads file's subtrees, adopted before any process runs in them,
//! followed as their directories come and go, and replaced on SIGHUP.

use super::*;

impl Resolver {
    /// The workloads file's subtrees as their directories are now: one made since is enrolled
    /// (before any process runs in it), one removed loses its entries, one made again gets
    /// its new id. Only the subtrees themselves are asked about (`CgroupIds`), nothing else.
    pub(super) fn refresh_configured_subtrees(&mut self, out: &mut Vec<Update>) {
        let mut keys = self.adopt_configured_subtrees();
        // Owners of configured subtrees that existed already: their root may be gone, or
        // made again with a new id.
        for key in self.owners.keys() {
            if !matches!(key, OwnerKey::Pod(_)) && !keys.contains(key) {
                keys.push(key.clone());
            }
        }
        keys.sort();
        for key in keys {
            if let Some(owner) = self.owners.get_mut(&key) {
                owner.stale = true;
            }
            self.recompute(&key, out);
            if key == OwnerKey::Ztunnel {
                self.update_ztunnel(out);
            }
        }
    }

    /// Replaces the workloads file (standalone mode; `SIGHUP`) and re-decides every cgroup.
    pub fn set_workloads(&mut self, workloads: Workloads, out: &mut Vec<Update>) {
        self.config.workloads = Some(workloads);
        let mut old: Entries = BTreeMap::new();
        for owner in self.owners.values_mut() {
            old.append(&mut owner.take_emitted());
        }
        self.owners.clear();
        let mut ids: Vec<CgroupId> = self.cgroups.keys().copied().collect();
        ids.sort();
        for id in &ids {
            let path = self.cgroups[id].path.clone();
            let owner = self.classify(&path);
            if let Some((key, root)) = &owner {
                self.owners
                    .entry(key.clone())
                    .or_insert_with(|| Owner::new(root))
                    .live
                    .insert(*id);
            }
            self.cgroups.get_mut(id).expect("listed above").owner = owner.map(|(k, _)| k);
        }
        self.adopt_configured_subtrees();
        let mut keys: Vec<OwnerKey> = self.owners.keys().cloned().collect();
        keys.sort();
        let mut new: Entries = BTreeMap::new();
        for key in keys {
            let (decision, desired) = self.desired(&key);
            new.extend(desired.iter().map(|(k, v)| (*k, v.clone())));
            let label = self.owner_label(&key);
            let owner = self.owners.get_mut(&key).expect("listed above");
            // A new owner: its first decision, always logged.
            log_decision(
                &owner.root,
                &decision,
                decision.role == Role::None,
                label,
                "",
            );
            owner.stale = true;
            owner.set_decided(decision, desired);
            owner.stale = false;
        }
        for id in old.keys() {
            if !new.contains_key(id) {
                out.push(Update::Delete { cgroup_id: *id });
            }
        }
        for (id, enrolment) in &new {
            if old.get(id) != Some(enrolment) {
                out.push(Update::Upsert(Arc::clone(enrolment)));
            }
        }
        self.owners
            .retain(|_, o| !o.live.is_empty() || o.emitted().is_some_and(|e| !e.is_empty()));
        self.update_ztunnel(out);
    }

    /// Makes an owner for every subtree of the workloads file whose directory exists already,
    /// so that it is enrolled before any process in it is seen: the first connect of the first
    /// process started there is captured, with no race against the watcher. (A subtree that
    /// does not exist yet is enrolled when an exec is seen in it.) Returns the owners made.
    pub(super) fn adopt_configured_subtrees(&mut self) -> Vec<OwnerKey> {
        let Some(workloads) = &self.config.workloads else {
            return Vec::new();
        };
        let mut subtrees: Vec<(OwnerKey, String)> = Vec::new();
        if let Some(z) = &workloads.ztunnel {
            subtrees.push((OwnerKey::Ztunnel, z.cgroup.clone()));
        }
        // In-pod workloads wait for their first process, as a pod does in Kubernetes mode:
        // ztunnel must be handed the pod's network namespace (a process's), and an empty
        // subtree would only have the ZDS stage look for a process in it every few
        // milliseconds. Its owner is made by the first exec in it.
        if !workloads.in_pod() {
            for (i, w) in workloads.workloads.iter().enumerate() {
                subtrees.push((OwnerKey::Workload(i), w.cgroup.clone()));
            }
        }
        for (i, e) in workloads.exempt.iter().enumerate() {
            subtrees.push((OwnerKey::Exempt(i), e.clone()));
        }
        let mut adopted = Vec::new();
        for (key, root) in subtrees {
            if self.owners.contains_key(&key) || self.ids.id_of(&root).is_none() {
                continue;
            }
            self.owners.insert(key.clone(), Owner::new(&root));
            adopted.push(key);
        }
        adopted
    }
}
