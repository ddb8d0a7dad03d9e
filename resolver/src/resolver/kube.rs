//! Kubernetes: pods and namespaces from the kube cache (or a recording), as facts.

use super::*;

impl Resolver {
    // ---- Kubernetes ----

    pub(super) fn handle_kube(&mut self, change: KubeChange, out: &mut Vec<Update>) {
        match change {
            KubeChange::ApplyPod(facts) if facts.uid.is_empty() => {
                warn!("a pod without metadata.uid was ignored")
            }
            KubeChange::ApplyPod(facts) => {
                if facts.node.as_deref() == Some(self.config.node.as_str()) {
                    self.set_pod(Arc::clone(&facts.uid), Some(facts), out)
                } else {
                    // Not on this node: forget it if it was (a recording may say so).
                    self.set_pod(facts.uid, None, out)
                }
            }
            KubeChange::DeletePod { uid } if uid.is_empty() => {
                warn!("a pod delete without metadata.uid was ignored")
            }
            KubeChange::DeletePod { uid } => self.set_pod(uid, None, out),
            KubeChange::ApplyNamespace { name, .. } if name.is_empty() => {
                warn!("a namespace without metadata.name was ignored")
            }
            KubeChange::ApplyNamespace { name, facts } => {
                if self.namespaces.get(&name) != Some(&facts) {
                    debug!("namespace {name}: {facts:?}");
                    let opted_in = namespace_opts_in(Some(&facts));
                    let before = self.namespaces.insert(name.clone(), facts);
                    // The rules read no more of a namespace than whether it opts in.
                    if namespace_opts_in(before.as_ref()) != opted_in {
                        self.recompute_namespace(&name, out);
                    }
                }
            }
            KubeChange::DeleteNamespace { name } if name.is_empty() => {
                warn!("a namespace delete without metadata.name was ignored")
            }
            KubeChange::DeleteNamespace { name } => {
                if namespace_opts_in(self.namespaces.remove(&name).as_ref()) {
                    self.recompute_namespace(&name, out);
                }
            }
            KubeChange::Synced => {
                if !self.kube_synced {
                    info!("kube cache synced");
                }
                self.kube_synced = true;
            }
        }
    }

    pub(super) fn set_pod(
        &mut self,
        uid: Arc<str>,
        facts: Option<PodFacts>,
        out: &mut Vec<Update>,
    ) {
        if self.pods.get(&uid) == facts.as_ref() {
            return;
        }
        let mut was_ztunnel = false;
        // A pod stays in its namespace's set while it stays in the namespace (most changes).
        let new_namespace = facts.as_ref().map(|f| &*f.namespace);
        let mut stayed = false;
        if let Some(old) = self.pods.remove(&uid) {
            if self.rules.is_node_ztunnel(&old) {
                was_ztunnel = true;
                self.ztunnel_pods.remove(&ZtunnelRank::of(&uid, &old));
            }
            stayed = new_namespace == Some(&*old.namespace);
            if !stayed {
                if let Some(set) = self.pods_by_namespace.get_mut(&*old.namespace) {
                    set.remove(&OwnerKey::Pod(uid.clone()));
                    if set.is_empty() {
                        self.pods_by_namespace.remove(&*old.namespace);
                    }
                }
            }
        }
        let mut is_ztunnel = false;
        if let Some(facts) = facts {
            if self.rules.is_node_ztunnel(&facts) {
                is_ztunnel = true;
                if !facts.ips.is_empty() {
                    self.ztunnel_pods.insert(ZtunnelRank::of(&uid, &facts));
                }
            }
            if !stayed {
                self.pods_by_namespace
                    .entry(facts.namespace.clone())
                    .or_default()
                    .insert(OwnerKey::Pod(uid.clone()));
            }
            self.pods.insert(uid.clone(), facts);
        }
        let key = OwnerKey::Pod(uid);
        // Its name, addresses or identity may have changed, not only its decision.
        if let Some(owner) = self.owners.get_mut(&key) {
            owner.stale = true;
        }
        self.recompute(&key, out);
        if was_ztunnel || is_ztunnel {
            self.update_ztunnel(out);
        }
    }
}
