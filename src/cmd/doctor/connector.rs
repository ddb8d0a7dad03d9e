//! The proc connector probe: subscribe, wait for the kernel's ACK, unsubscribe.

#[cfg(test)]
use std::time::Duration;

use watcher::connector::{Connector, ConnectorConfig, ConnectorError};

use super::Outcome;

/// The fix for a proc connector refusal for lack of privilege.
const FIX_NET_ADMIN: &str = "run as root, or add NET_ADMIN to the container's securityContext \
                             capabilities (older kernels refuse the proc connector's subscribe \
                             without CAP_NET_ADMIN in the host user namespace, and every kernel \
                             refuses the large receive buffer without it)";

/// Subscribes to the proc connector, waits for the kernel's ACK, and unsubscribes: the
/// start-up self-check of `zbridge run`, which proves the host network and PID namespaces
/// and the privilege to listen.
pub fn probe_proc_connector() -> Outcome {
    let config = ConnectorConfig {
        // The plain subscribe is the one the kernel acknowledges.
        event_mask: false,
        ..ConnectorConfig::default()
    };
    match Connector::subscribe(&config) {
        Ok(mut connector) => {
            let granted = connector.recv_buffer_bytes();
            check_proc_connector(
                Ok(granted),
                config.recv_buffer_bytes,
                connector.unsubscribe(),
            )
        }
        Err(e) => check_proc_connector(Err(e), config.recv_buffer_bytes, Ok(())),
    }
}

/// The words for the subscribe's result (the receive buffer the kernel granted, as `SO_RCVBUF`
/// reads it), against the buffer the agent asks for, and for the unsubscribe after it.
pub fn check_proc_connector(
    subscribe: Result<usize, ConnectorError>,
    wanted_buffer: usize,
    unsubscribe: Result<(), ConnectorError>,
) -> Outcome {
    let error = match subscribe {
        Ok(granted) => {
            if let Err(e) = unsubscribe {
                return Outcome::Warn {
                    what: format!("subscribed, but the unsubscribe failed: {e}"),
                    fix: "the kernel keeps producing proc events until the socket closes; \
                          report this with the error above"
                        .into(),
                };
            }
            // SO_RCVBUF reads back twice what was set (the kernel's bookkeeping overhead);
            // SO_RCVBUFFORCE (CAP_NET_ADMIN) is what lifts the net.core.rmem_max cap.
            if granted < 2 * wanted_buffer {
                return Outcome::Warn {
                    what: format!(
                        "the kernel acknowledged the subscribe, but granted a receive buffer \
                         of {} KiB, not {} KiB: SO_RCVBUFFORCE was refused (no CAP_NET_ADMIN), \
                         so events may be lost under a burst of process starts",
                        (granted / 2) >> 10,
                        wanted_buffer >> 10
                    ),
                    fix: FIX_NET_ADMIN.into(),
                };
            }
            return Outcome::Pass(format!(
                "the kernel acknowledged the subscribe (host network and PID namespaces); \
                 receive buffer {} KiB; unsubscribed",
                (granted / 2) >> 10
            ));
        }
        Err(e) => e,
    };
    let fix = match &error {
        ConnectorError::Bind(_) | ConnectorError::NotPermitted => FIX_NET_ADMIN.to_string(),
        ConnectorError::NotHostNetns => {
            "run in the host network namespace: `hostNetwork: true` in the DaemonSet's pod spec"
                .to_string()
        }
        ConnectorError::NoAck(_) => "run in the host PID namespace (and the host user \
                                     namespace): `hostPID: true` in the DaemonSet's pod spec"
            .to_string(),
        ConnectorError::Socket(e) if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) => {
            "use a kernel built with CONFIG_CONNECTOR=y and CONFIG_PROC_EVENTS=y".to_string()
        }
        ConnectorError::SocketOption { error: e, .. } if e.raw_os_error() == Some(libc::EPERM) => {
            FIX_NET_ADMIN.to_string()
        }
        _ => "report this as a bug, with the error above and the kernel version".to_string(),
    };
    Outcome::Fail {
        what: error.to_string(),
        fix,
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{fix_of, is_fail};
    use super::*;

    #[test]
    fn proc_connector_errors_say_what_to_do() {
        let ok = check_proc_connector(Ok(16 << 20), 8 << 20, Ok(()));
        assert!(
            matches!(&ok, Outcome::Pass(d) if d.contains("acknowledged") && d.contains("8192 KiB")),
            "{ok:?}"
        );
        let cases: [(ConnectorError, &str); 5] = [
            (ConnectorError::NotPermitted, "add NET_ADMIN"),
            (
                ConnectorError::Bind(std::io::Error::from_raw_os_error(libc::EPERM)),
                "add NET_ADMIN",
            ),
            (ConnectorError::NotHostNetns, "hostNetwork: true"),
            (
                ConnectorError::NoAck(Duration::from_secs(2)),
                "hostPID: true",
            ),
            (
                ConnectorError::Socket(std::io::Error::from_raw_os_error(libc::EPROTONOSUPPORT)),
                "CONFIG_PROC_EVENTS=y",
            ),
        ];
        for (error, words) in cases {
            let text = error.to_string();
            let outcome = check_proc_connector(Err(error), 8 << 20, Ok(()));
            assert!(is_fail(&outcome, words), "{text}: {outcome:?}");
            // The kernel's own reason is kept.
            assert!(
                matches!(&outcome, Outcome::Fail { what, .. } if *what == text),
                "{outcome:?}"
            );
        }
        // A capped buffer (no SO_RCVBUFFORCE) works, with a warning naming the capability.
        let capped = check_proc_connector(Ok(8 << 20), 8 << 20, Ok(()));
        assert!(
            matches!(&capped, Outcome::Warn { what, fix } if what.contains("4096 KiB, not 8192 KiB") && fix.contains("NET_ADMIN")),
            "{capped:?}"
        );
        let stuck = check_proc_connector(
            Ok(16 << 20),
            8 << 20,
            Err(ConnectorError::Send {
                what: "unsubscribe",
                error: std::io::Error::from_raw_os_error(libc::ENOBUFS),
            }),
        );
        assert!(
            matches!(&stuck, Outcome::Warn { what, .. } if what.contains("unsubscribe failed")),
            "{stuck:?}"
        );
    }

    #[test]
    fn proc_connector_outside_the_host_network_namespace_fails() {
        if !testkit::require_root("doctor_proc_connector_outside_the_host_network_namespace") {
            return;
        }
        let netns = testkit::NetNs::new("doctor").expect("create a netns");
        let outcome = netns
            .in_thread(probe_proc_connector)
            .expect("run the probe in the netns");
        assert!(is_fail(&outcome, "ECONNREFUSED"), "{outcome:?}");
        assert!(
            fix_of(&outcome).contains("hostNetwork: true"),
            "{outcome:?}"
        );
    }
}
