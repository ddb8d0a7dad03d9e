//! The HTTP server: `/healthz`, `/readyz` and `/metrics` on a thread of its own.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;

use super::{Metrics, Readiness};

/// At most this many connections are answered at once; more are closed unanswered (a probe or
/// scrape is one short request: many at once is a flood, not a client).
const MAX_CONNECTIONS: usize = 16;
/// A client gets this long to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request head read (the request line and headers).
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// The running endpoint. Dropping it closes the listening socket (before `drop` returns) and
/// waits for the accepting thread.
///
/// The server is a few lines of HTTP/1.1 on std rather than tiny_http: tiny_http closes its
/// listening socket on a detached thread some time after the server is dropped, or logs an
/// accept error when it is closed under it, and a restart in the same process (tests, a
/// reload) needs the port free when `drop` returns.
pub struct OpsServer {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl OpsServer {
    /// The address it listens on (the real port when `:0` was asked for). The agent logs it
    /// from `serve`; tests/ops_endpoint.rs reads it here.
    #[allow(dead_code)]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for OpsServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        // Wake the thread blocked in accept(); it sees `stopping` and returns, closing the
        // listener. A wildcard address is reached through loopback.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            });
        }
        if let Err(err) = TcpStream::connect_timeout(&wake, CLIENT_TIMEOUT) {
            log::error!(
                "ops endpoint {}: cannot wake its thread to stop: {err}",
                self.addr
            );
            return; // joining would hang; the thread ends with the process
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("ops endpoint {}: its thread panicked", self.addr);
            }
        }
    }
}

/// Listens on `addr` (`HOST:PORT`) and answers `/healthz`, `/readyz` and `/metrics` on a thread
/// of its own until the returned server is dropped.
pub fn serve(addr: &str, metrics: Metrics, readiness: Readiness) -> anyhow::Result<OpsServer> {
    let listener = TcpListener::bind(addr)
        .with_context(|| format!("ops endpoint: cannot listen on {addr}"))?;
    let local = listener
        .local_addr()
        .with_context(|| format!("ops endpoint: no local address for {addr}"))?;
    let stopping = Arc::new(AtomicBool::new(false));
    let thread = std::thread::Builder::new()
        .name("ops-http".to_string())
        .spawn({
            let stopping = Arc::clone(&stopping);
            move || accept_until_stopped(listener, &stopping, metrics, readiness)
        })
        .context("ops endpoint: cannot start its thread")?;
    log::info!("ops endpoint listening on http://{local} (/healthz, /readyz, /metrics)");
    Ok(OpsServer {
        addr: local,
        stopping,
        thread: Some(thread),
    })
}

fn accept_until_stopped(
    listener: TcpListener,
    stopping: &AtomicBool,
    metrics: Metrics,
    readiness: Readiness,
) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if stopping.load(Ordering::Acquire) {
            return;
        }
        let stream = match stream {
            Ok(stream) => stream,
            Err(err) => {
                // Per-connection failures (the client reset before accept, EMFILE): the
                // listener itself is fine, keep serving.
                log::warn!("ops endpoint: accept failed: {err}");
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            log::warn!(
                "ops endpoint: more than {MAX_CONNECTIONS} connections at once; closing one"
            );
            continue;
        }
        let (metrics, readiness, conn_active) =
            (metrics.clone(), readiness.clone(), Arc::clone(&active));
        let spawned = std::thread::Builder::new()
            .name("ops-http-conn".to_string())
            .spawn(move || {
                if let Err(err) = answer(stream, &metrics, &readiness) {
                    log::debug!("ops endpoint: answering failed: {err}");
                }
                conn_active.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(err) = spawned {
            // The closure (and its count) was dropped with the error: undo the count.
            active.fetch_sub(1, Ordering::AcqRel);
            log::warn!("ops endpoint: cannot start a connection thread: {err}");
        }
    }
}

/// Reads one request from `stream` and answers it; the connection is closed afterwards.
fn answer(mut stream: TcpStream, metrics: &Metrics, readiness: &Readiness) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST_HEAD {
            return respond(&mut stream, false, 431, TEXT, "request head too large\n");
        }
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            return Ok(()); // closed before a full request: nothing to answer
        }
        head.extend_from_slice(&chunk[..read]);
    }
    let request_line = head
        .split(|&b| b == b'\r')
        .next()
        .and_then(|line| std::str::from_utf8(line).ok())
        .unwrap_or("");
    let mut parts = request_line.split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return respond(&mut stream, false, 400, TEXT, "bad request line\n");
    };
    if !version.starts_with("HTTP/1.") {
        return respond(&mut stream, false, 505, TEXT, "HTTP/1.x only\n");
    }
    let head_only = method == "HEAD";
    let (status, content_type, body) = route(method, target, metrics, readiness);
    respond(&mut stream, head_only, status, content_type, &body)
}

const TEXT: &str = "text/plain; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn respond(
    stream: &mut TcpStream,
    head_only: bool,
    status: u16,
    content_type: &str,
    body: &str,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    };
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        response.push_str(body);
    }
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

/// The status, content type and body for one request.
fn route(
    method: &str,
    target: &str,
    metrics: &Metrics,
    readiness: &Readiness,
) -> (u16, &'static str, String) {
    if !matches!(method, "GET" | "HEAD") {
        return (405, TEXT, "only GET and HEAD\n".to_string());
    }
    let path = target.split('?').next().unwrap_or(target);
    match path {
        "/healthz" => (200, TEXT, "ok\n".to_string()),
        "/readyz" => {
            let missing = readiness.not_ready();
            if missing.is_empty() {
                (200, TEXT, "ready\n".to_string())
            } else {
                let mut body = String::from("not ready:\n");
                for step in missing {
                    let _ = writeln!(body, "- {step}");
                }
                (503, TEXT, body)
            }
        }
        "/metrics" => (200, OPENMETRICS, metrics.encode()),
        _ => (
            404,
            TEXT,
            "not found: try /healthz, /readyz or /metrics\n".to_string(),
        ),
    }
}
