//! Every error of the watcher that carries an I/O error says its text once, also when printed
//! with its chain of sources (as anyhow's `{:#}` does in the binary).

use std::error::Error;
use std::io;

use watcher::connector::ConnectorError;
use watcher::hostns::HostNsError;
use watcher::procfs::MountError;
use watcher::recording::RecordingError;

/// The error and its sources, joined as anyhow's `{:#}` joins them.
fn with_sources(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

fn io_error() -> io::Error {
    io::Error::from_raw_os_error(libc::EISDIR)
}

#[test]
fn io_errors_are_printed_once() {
    let errors: Vec<Box<dyn Error>> = vec![
        Box::new(ConnectorError::Socket(io_error())),
        Box::new(ConnectorError::Bind(io_error())),
        Box::new(ConnectorError::Recv(io_error())),
        Box::new(ConnectorError::SocketOption {
            option: "SO_RCVBUF",
            error: io_error(),
        }),
        Box::new(ConnectorError::Send {
            what: "subscribe",
            error: io_error(),
        }),
        Box::new(RecordingError::Read {
            line: 1,
            error: io_error(),
        }),
        Box::new(RecordingError::Write {
            line: 1,
            error: io_error(),
        }),
        Box::new(RecordingError::Open {
            path: "/x".into(),
            error: io_error(),
        }),
        Box::new(RecordingError::Create {
            path: "/x".into(),
            error: io_error(),
        }),
        Box::new(MountError::Read {
            path: "/proc/self/mountinfo",
            error: io_error(),
        }),
        Box::new(HostNsError::Read {
            path: "/proc/1/ns/cgroup".to_string(),
            error: io_error(),
        }),
        Box::new(HostNsError::Setns {
            path: "/proc/1/ns/cgroup".to_string(),
            error: io_error(),
        }),
    ];
    let io_text = io_error().to_string();
    for error in errors {
        let text = with_sources(error.as_ref());
        assert_eq!(text.matches(&io_text).count(), 1, "{text}");
    }
}
