//! zbridge's view of Kubernetes, one input source of the resolver beside the process watcher.
//!
//! Its one job: the pods of this node and all namespaces, listed and watched from the API
//! server with kube-rs on a tokio runtime of its own thread ([`KubeCache`]), kept in a shared
//! read-mostly [`KubeView`], and sent as [`Change`]s of the objects, which become the
//! resolver's [`resolver::Input`]s (their facts, [`change`]). Around it, what else speaks to
//! Kubernetes: recordings' `kube` records to and from objects ([`record`]), the pod status
//! writer that annotates captured pods, downstream of the programmer ([`status`]), the probe
//! that tells when a lost API server is back ([`probe`]), and the one way the agent's commands
//! find their client configuration ([`config`]).
//!
//! The resolver decides on facts alone and does not depend on this crate: kube-rs, tokio and
//! the API's types stop here.

pub mod background;
mod cache;
pub mod change;
pub mod config;
pub mod probe;
pub mod record;
pub mod recorded_facts;
pub mod shared_strings;
pub mod status;
mod tracker;
mod view;

pub use cache::{KubeCache, KubeError};
pub use change::{Change, Object};
pub use view::{KubeHealth, KubeView};
