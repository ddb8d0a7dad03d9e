//! The operations endpoint: `/healthz`, `/readyz` and `/metrics` over HTTP, for the kubelet's
//! probes and for Prometheus.
//!
//! The stages update a [`Metrics`] (cheap to clone, updated from any thread with atomics) and a
//! [`Readiness`] (one flag per start-up step); [`serve`] answers from both on its own thread
//! until the returned [`OpsServer`] is dropped.
//!
//! One file per concern: `metrics` (the families and their exposition), `readiness` (the
//! start-up steps), `http` (the server), `conns`
//! (which connections it holds, and which it closes when a new one does not fit); every public name is re-exported here, so callers
//! name `zbridge::ops::Metrics` and so on.

mod conns;
mod http;
mod metrics;
mod readiness;

pub use http::{serve, OpsServer};
pub use metrics::{EnrolmentStage, EventKind, Metrics, BPF_COUNTERS, WATCHER_COUNTERS};
pub use readiness::Readiness;
