//! The second stage of zbridge: which cgroups on this node are captured, and by whom.
//!
//! The resolver keeps the node's state (live processes → cgroups → pods) from the watcher's
//! events and the pod and namespace facts of the kube cache (or a standalone workloads file),
//! decides each cgroup's [`Role`] by Istio's ambient rules, and emits [`Update`]s for the
//! programmer. It is a pure function of its inputs: it reads no files and no clock while
//! deciding, so a recording replays to the same updates anywhere. It knows no BPF map layout.

pub mod cgroup_path;
pub mod decide;
pub mod facts;
pub mod input;
mod resolver;
pub mod update;
pub mod workloads;

pub use facts::{NamespaceFacts, PodFacts};
pub use input::{Input, KubeChange};
pub use resolver::{CgroupIds, LiveCgroup, NoCgroupIds, Resolver, ResolverConfig};
pub use update::{Capture, Enrolment, Identity, PodName, Role, Update};
pub use workloads::{Workloads, WorkloadsError};
