//! What `/readyz` answers: one flag per start-up step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// What `/readyz` waits for: one flag per start-up step, set by the stage that completes it.
/// Clones share the same flags.
#[derive(Clone, Default)]
pub struct Readiness {
    cache_synced: Arc<AtomicBool>,
    first_scan_resolved: Arc<AtomicBool>,
    maps_programmed: Arc<AtomicBool>,
    /// Kubernetes mode: the API server cannot be reached now (set while it is lost; the
    /// programmed state is kept meanwhile).
    api_server_lost: Arc<AtomicBool>,
    /// What is valid but probably not meant in the configuration (a workloads file with
    /// ambient workloads and no ztunnel): said by `/readyz` while ready, since the agent does
    /// what it was told.
    warnings: Arc<Mutex<Vec<String>>>,
    /// In-pod mode: why ambient pods are not served now (no ztunnel connected), said by
    /// `/readyz` beside the configuration's warnings.
    inpod_warning: Arc<Mutex<Option<String>>>,
}

impl Readiness {
    /// Nothing ready yet.
    pub fn new() -> Readiness {
        Readiness::default()
    }

    /// The kube cache listed pods and namespaces (or, standalone, the workloads file is read).
    pub fn set_cache_synced(&self, ready: bool) {
        self.cache_synced.store(ready, Ordering::Release);
    }

    /// The resolver decided every process of the first /proc scan.
    pub fn set_first_scan_resolved(&self, ready: bool) {
        self.first_scan_resolved.store(ready, Ordering::Release);
    }

    /// The programs are attached and the maps hold the first full set of decisions.
    pub fn set_maps_programmed(&self, ready: bool) {
        self.maps_programmed.store(ready, Ordering::Release);
    }

    /// The Kubernetes API server is lost (`true`) or reachable again (`false`).
    pub fn set_api_server_lost(&self, lost: bool) {
        self.api_server_lost.store(lost, Ordering::Release);
    }

    /// Replaces the configuration's warnings (each workloads file read).
    pub fn set_warnings(&self, warnings: Vec<String>) {
        *self.warnings.lock().expect("readiness warnings") = warnings;
    }

    /// Sets (or clears) in-pod mode's warning: ambient pods are not served now, and why.
    pub fn set_inpod_warning(&self, warning: Option<String>) {
        *self.inpod_warning.lock().expect("readiness in-pod warning") = warning;
    }

    /// The configuration's warnings, then in-pod mode's.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = self.warnings.lock().expect("readiness warnings").clone();
        warnings.extend(
            self.inpod_warning
                .lock()
                .expect("readiness in-pod warning")
                .clone(),
        );
        warnings
    }

    /// The steps not done yet, in words; empty when ready.
    pub fn not_ready(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if !self.cache_synced.load(Ordering::Acquire) {
            missing.push("kube cache not synced");
        }
        if !self.first_scan_resolved.load(Ordering::Acquire) {
            missing.push("first /proc scan not resolved");
        }
        if !self.maps_programmed.load(Ordering::Acquire) {
            missing.push("BPF maps not programmed");
        }
        if self.api_server_lost.load(Ordering::Acquire) {
            missing
                .push("Kubernetes API server unreachable (the programmed state is kept; retrying)");
        }
        missing
    }
}
