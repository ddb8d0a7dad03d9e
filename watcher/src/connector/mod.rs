//! The kernel's proc connector (NETLINK_CONNECTOR, CN_IDX_PROC): subscribe, receive, decode,
//! unsubscribe.
//!
//! - `codec`: the wire format, the messages zbridge sends and the decoder of those it
//!   receives ([`decode`]);
//! - [`wire`]: builders of kernel-shaped messages for tests and benchmarks of the decoder;
//! - `socket`: the subscribed socket ([`Connector`]);
//! - `batch`: its receive side, batched and coalesced under a storm ([`Connector::recv`]).

mod batch;
mod codec;
mod socket;
pub mod wire;

use std::io;
use std::time::Duration;

pub use batch::{
    Doorbell, ReceiveStats, Received, DEFAULT_COALESCE_WINDOW, FAST_WAKEUP, MAX_COALESCE_WINDOW,
    STORM_AFTER,
};
pub use codec::{
    decode, proc_input_message, subscribe_message, DecodeError, KernelEvent, Message, Messages,
    CN_IDX_PROC, CN_VAL_PROC, PROC_CN_MCAST_IGNORE, PROC_CN_MCAST_LISTEN, PROC_EVENT_EXEC,
    PROC_EVENT_EXIT, PROC_EVENT_FORK, PROC_EVENT_NONE, SUBSCRIBE_LEN,
};
pub use socket::Connector;

/// Errors of the proc connector.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    // Each cause is in the message and not the error's source (a field named `source` is one
    // for thiserror): a chain printer (anyhow's `{:#}`) would print it twice.
    #[error("proc connector: cannot open a NETLINK_CONNECTOR socket: {0}")]
    Socket(io::Error),
    #[error(
        "proc connector: bind to multicast group CN_IDX_PROC refused: {0} (zbridge must run as \
         root or with CAP_NET_ADMIN)"
    )]
    Bind(io::Error),
    #[error("proc connector: setsockopt {option} failed: {error}")]
    SocketOption {
        option: &'static str,
        error: io::Error,
    },
    #[error(
        "proc connector: subscribe refused with ECONNREFUSED: the connector exists only in the \
         host network namespace (run with hostNetwork)"
    )]
    NotHostNetns,
    #[error("proc connector: sending the {what} message failed: {error}")]
    Send {
        what: &'static str,
        error: io::Error,
    },
    #[error(
        "proc connector: subscribe refused by the kernel with EPERM: zbridge must run as root or \
         with CAP_NET_ADMIN in the host user namespace"
    )]
    NotPermitted,
    #[error("proc connector: subscribe refused by the kernel with error {errno} ({text})")]
    Refused { errno: u32, text: String },
    #[error(
        "proc connector: no acknowledgement of the subscribe within {0:?}: the kernel silently \
         ignores subscribers outside the host PID (and user) namespace (run with hostPID)"
    )]
    NoAck(Duration),
    #[error("proc connector: receive failed: {0}")]
    Recv(io::Error),
    #[error("proc connector: waiting on the doorbell during a coalescing window failed: {0}")]
    Doorbell(io::Error),
    #[error("proc connector: malformed datagram: {0}")]
    Decode(DecodeError),
}

impl From<DecodeError> for ConnectorError {
    fn from(error: DecodeError) -> Self {
        ConnectorError::Decode(error)
    }
}

/// How to open the connector.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    /// Socket receive buffer. A starved reader with the default buffer (about 200 KiB) loses
    /// events under a spawn storm; several MiB do not.
    pub recv_buffer_bytes: usize,
    /// How long to wait for the kernel's acknowledgement of the subscribe.
    pub ack_timeout: Duration,
    /// The receive timeout: how often a blocked reader wakes up to look at a stop request.
    pub recv_timeout: Duration,
    /// On kernels from 6.6, ask the kernel for fork, exec and exit only.
    pub event_mask: bool,
    /// Receive coalescing (interrupt moderation): while events keep arriving faster than one
    /// per [`FAST_WAKEUP`] (see [`STORM_AFTER`]), the reader sleeps this long instead of blocking on an empty socket,
    /// then reads everything that came meanwhile in one batch, so that a storm costs one
    /// wake-up per window instead of nearly one per event. Each event of a storm is delivered
    /// up to this much later (plus the timer's slack, 50 µs by default), except when a
    /// [`Doorbell`] rings (the exec tap's, for the first exec in a cgroup: the exec an
    /// enrolment waits for), which ends the window; under light load nothing changes. Zero
    /// turns it off; at most [`MAX_COALESCE_WINDOW`] is used.
    pub coalesce_window: Duration,
}

impl Default for ConnectorConfig {
    fn default() -> Self {
        ConnectorConfig {
            recv_buffer_bytes: 8 << 20,
            ack_timeout: Duration::from_secs(2),
            recv_timeout: Duration::from_millis(200),
            event_mask: true,
            coalesce_window: DEFAULT_COALESCE_WINDOW,
        }
    }
}
