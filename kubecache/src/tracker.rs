//! Turns one watcher's events into [`Change`]s against the view, including the deletes
//! that a relist implies: kube-runtime's watcher reports a relist as `Init`, `InitApply`...,
//! `InitDone`, and an object that vanished while the watch was down is simply not listed.

use std::collections::HashSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::watcher::Event;

use crate::change::{Change, Object};
use crate::view::KubeView;

/// A kind of object the kube cache holds: how it is keyed and stored in the view.
pub(crate) trait Cached: Clone + PartialEq + Sized {
    const KIND: &'static str;
    /// The identity the resolver uses (pods: `metadata.uid`; namespaces: `metadata.name`).
    fn key(&self) -> Option<String>;
    fn get(view: &KubeView, key: &str) -> Option<Arc<Self>>;
    fn put(view: &KubeView, key: String, object: Arc<Self>);
    fn remove(view: &KubeView, key: &str) -> Option<Arc<Self>>;
    fn keys(view: &KubeView) -> Vec<String>;
    fn into_object(self) -> Object;
}

impl Cached for Pod {
    const KIND: &'static str = "pod";
    fn key(&self) -> Option<String> {
        self.metadata.uid.clone().filter(|u| !u.is_empty())
    }
    fn get(view: &KubeView, key: &str) -> Option<Arc<Self>> {
        view.pod(key)
    }
    fn put(view: &KubeView, key: String, object: Arc<Self>) {
        view.put_pod(key, object)
    }
    fn remove(view: &KubeView, key: &str) -> Option<Arc<Self>> {
        view.remove_pod(key)
    }
    fn keys(view: &KubeView) -> Vec<String> {
        view.pod_uids()
    }
    fn into_object(self) -> Object {
        Object::Pod(Box::new(self))
    }
}

impl Cached for Namespace {
    const KIND: &'static str = "namespace";
    fn key(&self) -> Option<String> {
        self.metadata.name.clone().filter(|n| !n.is_empty())
    }
    fn get(view: &KubeView, key: &str) -> Option<Arc<Self>> {
        view.namespace(key)
    }
    fn put(view: &KubeView, key: String, object: Arc<Self>) {
        view.put_namespace(key, object)
    }
    fn remove(view: &KubeView, key: &str) -> Option<Arc<Self>> {
        view.remove_namespace(key)
    }
    fn keys(view: &KubeView) -> Vec<String> {
        view.namespace_names()
    }
    fn into_object(self) -> Object {
        Object::Namespace(Box::new(self))
    }
}

/// One watcher's progress through lists.
#[derive(Default)]
pub(crate) struct Tracker {
    /// During a (re)list: the keys listed so far.
    listing: Option<HashSet<String>>,
    /// A list has completed at least once.
    pub(crate) listed_once: bool,
}

/// What one event did.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Outcome {
    pub(crate) changes: Vec<Change>,
    /// A (re)list completed with this event.
    pub(crate) list_done: bool,
}

impl Tracker {
    /// Applies one watcher event to the view (first) and says what changed.
    pub(crate) fn on_event<K: Cached>(&mut self, view: &KubeView, event: Event<K>) -> Outcome {
        let mut out = Outcome::default();
        match event {
            Event::Init => self.listing = Some(HashSet::new()),
            Event::InitApply(object) => {
                if let Some(key) = object.key() {
                    if let Some(listing) = self.listing.as_mut() {
                        listing.insert(key.clone());
                    }
                    out.changes.extend(apply(view, key, object));
                } else {
                    log::warn!("kube cache: a listed {} has no identity; skipped", K::KIND);
                }
            }
            Event::Apply(object) => match object.key() {
                Some(key) => out.changes.extend(apply(view, key, object)),
                None => log::warn!("kube cache: a watched {} has no identity; skipped", K::KIND),
            },
            Event::Delete(object) => match object.key() {
                // Only what the view held is news to the resolver.
                Some(key) => {
                    if K::remove(view, &key).is_some() {
                        out.changes.push(Change::Delete(object.into_object()));
                    }
                }
                None => log::warn!("kube cache: a deleted {} has no identity; skipped", K::KIND),
            },
            Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                for key in K::keys(view) {
                    if listed.contains(&key) {
                        continue;
                    }
                    if let Some(gone) = K::remove(view, &key) {
                        log::debug!(
                            "kube cache: {} {key} was not in the relist: deleted meanwhile",
                            K::KIND
                        );
                        out.changes
                            .push(Change::Delete(Arc::unwrap_or_clone(gone).into_object()));
                    }
                }
                self.listed_once = true;
                out.list_done = true;
            }
        }
        out
    }
}

/// Stores `object`; an Apply unless the view already holds exactly this version.
fn apply<K: Cached>(view: &KubeView, key: String, object: K) -> Option<Change> {
    if K::get(view, &key).is_some_and(|held| *held == object) {
        return None;
    }
    K::put(view, key, Arc::new(object.clone()));
    Some(Change::Apply(object.into_object()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(uid: &str, rv: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(format!("pod-{uid}")),
                namespace: Some("ns".into()),
                uid: Some(uid.into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    fn apply_of(p: Pod) -> Change {
        Change::Apply(Object::Pod(Box::new(p)))
    }

    fn delete_of(p: Pod) -> Change {
        Change::Delete(Object::Pod(Box::new(p)))
    }

    #[test]
    fn relist_yields_deletes_for_the_missing_and_applies_for_the_changed_only() {
        let view = KubeView::default();
        let mut t = Tracker::default();
        assert!(t.on_event::<Pod>(&view, Event::Init).changes.is_empty());
        let a = t.on_event(&view, Event::InitApply(pod("a", "1")));
        assert_eq!(a.changes, vec![apply_of(pod("a", "1"))]);
        t.on_event(&view, Event::InitApply(pod("b", "2")));
        t.on_event(&view, Event::InitApply(pod("c", "3")));
        let done = t.on_event::<Pod>(&view, Event::InitDone);
        assert_eq!(
            done,
            Outcome {
                changes: vec![],
                list_done: true
            }
        );
        assert!(t.listed_once);

        // Relist: a unchanged, b changed, c gone.
        t.on_event::<Pod>(&view, Event::Init);
        assert!(t
            .on_event(&view, Event::InitApply(pod("a", "1")))
            .changes
            .is_empty());
        assert_eq!(
            t.on_event(&view, Event::InitApply(pod("b", "7"))).changes,
            vec![apply_of(pod("b", "7"))]
        );
        let done = t.on_event::<Pod>(&view, Event::InitDone);
        assert_eq!(done.changes, vec![delete_of(pod("c", "3"))]);
        let mut uids = view.pod_uids();
        uids.sort();
        assert_eq!(uids, ["a", "b"]);
    }

    #[test]
    fn watch_events_apply_and_delete_once() {
        let view = KubeView::default();
        let mut t = Tracker::default();
        assert_eq!(
            t.on_event(&view, Event::Apply(pod("a", "1"))).changes,
            vec![apply_of(pod("a", "1"))]
        );
        assert_eq!(
            t.on_event(&view, Event::Delete(pod("a", "2"))).changes,
            vec![delete_of(pod("a", "2"))]
        );
        // Already gone: nothing new to say.
        assert!(t
            .on_event(&view, Event::Delete(pod("a", "2")))
            .changes
            .is_empty());
        // No UID: skipped, not stored under an empty key.
        let mut p = pod("x", "3");
        p.metadata.uid = None;
        assert!(t.on_event(&view, Event::Apply(p)).changes.is_empty());
        assert_eq!(view.pod_count(), 0);
    }
}
