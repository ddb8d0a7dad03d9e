//! The kernel's proc connector (NETLINK_CONNECTOR, CN_IDX_PROC): subscribe, decode, unsubscribe.

/// Errors of the proc connector.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("proc connector: not implemented yet")]
    NotImplemented,
}
