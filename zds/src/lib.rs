//! The ZDS stage of zbridge: the node-agent side of ztunnel's `istio.workload.zds` protocol.
//!
//! In ztunnel's `shared` mode (every current Istio ambient install) ztunnel connects to a node
//! agent over a Unix socket and is handed each ambient pod's network namespace; it opens its
//! listeners inside that namespace and acks. This crate is that agent side: the messages
//! ([`proto`]), the socket ([`socket`]), opening a pod's namespace safely from one of its
//! processes ([`netns`]), and the [`Server`] that sends pods and hears acks. It sits downstream
//! of the resolver beside the programmer: it is told which pods to serve ([`Command`]) and
//! reports acks ([`Event::Acked`]), after which the agent enrols the pod. It knows no BPF maps.

/// Where ztunnel looks for the node agent's ZDS socket unless told otherwise (its
/// `ZTUNNEL_SOCKET`; Istio's default).
pub const DEFAULT_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";

pub mod model;
pub mod netns;
pub mod proto;
pub mod server;
pub mod socket;
pub mod status_file;

pub use model::{Command, Counters, Event, PodSpec, PodState, PodStatus, Status, ZdsConfig};
pub use netns::{open_pod_netns, NetnsError, Roots};
pub use server::{Server, StatusHandle};
pub use status_file::read_status;
