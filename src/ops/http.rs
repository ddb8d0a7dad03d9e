//! The HTTP server: `/healthz`, `/readyz` and `/metrics` over hyper's HTTP/1, on a thread of
//! its own with a current-thread tokio runtime (the endpoint answers from memory: one thread
//! keeps up with any probe or scrape rate, and the agent's stages are not disturbed).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;

use super::conns::{Conns, Slot, WarnLimiter};
use super::{Metrics, Readiness};

/// At most this many connections are answered at once (a complete request head read, the
/// answer being written). A probe or scrape is one short request: many at once is a flood,
/// not a client.
const MAX_CONNECTIONS: usize = 16;
/// At most this many connections are open at once, most of them still reading their request
/// head; a new one beyond it closes the oldest unfinished one (`conns` says why). Kept well
/// below a container's usual descriptor limit.
const MAX_OPEN: usize = 256;
/// A client gets this long, from its connection being accepted, to send its request and read
/// the answer: one deadline for the whole request, not per read, so that trickling a byte
/// now and then does not keep a connection.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request head read (the request line and headers); longer is answered 431.
/// Hyper's smallest read buffer, so its limit is exactly this.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A warning that may repeat per connection is logged at most once per this period.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// After a failed accept, wait this long before the next: a connection refused for want of
/// descriptors stays queued, and retrying at once would spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// Connections the kernel queues until the thread accepts them (std's default is small): in a
/// burst of connections, a probe's is queued rather than dropped, which a client retries only
/// a second later.
const LISTEN_BACKLOG: u32 = 1024;

/// The running endpoint. Dropping it closes the listening socket (before `drop` returns) and
/// waits for the server's thread.
///
/// A restart in the same process (tests, a reload) needs the port free when `drop` returns,
/// which is why the listener lives on the server's thread and `drop` joins it (tiny_http,
/// once used here, closed its socket on a detached thread some time after the drop).
pub struct OpsServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
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
        // The thread's runtime stops at the signal (or at the sender's drop, were the send to
        // fail), dropping the listener and every connection before the thread returns.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
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
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("ops endpoint: cannot start its runtime")?;
    // Bound here, not on the thread, so that a taken address is the caller's error.
    let listener = {
        let _entered = runtime.enter();
        listen(addr).with_context(|| format!("ops endpoint: cannot listen on {addr}"))?
    };
    let local = listener
        .local_addr()
        .with_context(|| format!("ops endpoint: no local address for {addr}"))?;
    let (stop, stopped) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("ops-http".to_string())
        .spawn(move || {
            runtime.block_on(async move {
                tokio::select! {
                    () = accept(listener, metrics, readiness) => {}
                    _ = stopped => {}
                }
            });
        })
        .context("ops endpoint: cannot start its thread")?;
    log::info!("ops endpoint listening on http://{local} (/healthz, /readyz, /metrics)");
    Ok(OpsServer {
        addr: local,
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// A listening socket on the first address `addr` resolves to that can be bound, with room
/// for [`LISTEN_BACKLOG`] connections not accepted yet.
fn listen(addr: &str) -> io::Result<TcpListener> {
    let mut failed = None;
    for candidate in addr.to_socket_addrs()? {
        let socket = match candidate {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        // As std does: a restarted agent can listen again while old connections linger.
        socket.set_reuseaddr(true)?;
        match socket.bind(candidate) {
            Ok(()) => return socket.listen(LISTEN_BACKLOG),
            Err(err) => failed = Some(err),
        }
    }
    Err(failed.unwrap_or_else(|| io::Error::other("the address resolves to nothing")))
}

/// Accepts connections forever, each served by a task of its own.
async fn accept(listener: TcpListener, metrics: Metrics, readiness: Readiness) {
    let conns = Arc::new(Conns::new(MAX_OPEN, MAX_CONNECTIONS, WARN_EVERY));
    let mut accept_failed = WarnLimiter::new(WARN_EVERY);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(err) => {
                // Per-connection failures (the client reset before accept, EMFILE): the
                // listener itself is fine, keep serving.
                if let Some(suppressed) = accept_failed.hit(Instant::now()) {
                    log::warn!(
                        "ops endpoint: accept failed: {err} \
                         ({suppressed} more failures since the previous warning)"
                    );
                }
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let (slot, closed) = conns.open();
        tokio::spawn(connection(
            stream,
            slot,
            closed,
            metrics.clone(),
            readiness.clone(),
        ));
        // The new connection reads what it was sent before the next accept: a probe's head
        // is usually there already, and once read it is answered rather than closed for room
        // by a burst of later connections.
        tokio::task::yield_now().await;
    }
}

/// Serves one request on `stream` within [`CLIENT_TIMEOUT`], or until the connection table
/// closes it for room; the connection is closed afterwards.
async fn connection(
    stream: TcpStream,
    slot: Slot,
    closed: oneshot::Receiver<()>,
    metrics: Metrics,
    readiness: Readiness,
) {
    let slot = Arc::new(slot);
    let service = {
        let slot = Arc::clone(&slot);
        hyper::service::service_fn(move |request: Request<Incoming>| {
            slot.answering();
            let response = answer(&request, &metrics, &readiness);
            async move { Ok::<_, Infallible>(response) }
        })
    };
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(CLIENT_TIMEOUT)
        .max_buf_size(MAX_REQUEST_HEAD)
        .max_header_size(MAX_REQUEST_HEAD)
        .keep_alive(false)
        .title_case_headers(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        served = tokio::time::timeout(CLIENT_TIMEOUT, served) => match served {
            Ok(Ok(())) => {}
            Ok(Err(err)) => log::debug!("ops endpoint: answering failed: {err}"),
            Err(_) => log::debug!("ops endpoint: a client took longer than {CLIENT_TIMEOUT:?}"),
        },
        // The connection is dropped (closed) with this future.
        _ = closed => log::debug!("ops endpoint: a connection closed for room"),
    }
}

const TEXT: &str = "text/plain; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The response to one request (hyper leaves the body out for HEAD).
fn answer(
    request: &Request<Incoming>,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) =
        route(request.method(), request.uri().path(), metrics, readiness);
    let length = HeaderValue::from(body.len());
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CONTENT_LENGTH, length);
    response
}

/// The status, content type and body for one request.
fn route(
    method: &Method,
    path: &str,
    metrics: &Metrics,
    readiness: &Readiness,
) -> (StatusCode, &'static str, String) {
    if !matches!(*method, Method::GET | Method::HEAD) {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET and HEAD\n".to_string(),
        );
    }
    match path {
        "/healthz" => (StatusCode::OK, TEXT, "ok\n".to_string()),
        "/readyz" => {
            let missing = readiness.not_ready();
            if missing.is_empty() {
                let mut body = String::from("ready\n");
                for warning in readiness.warnings() {
                    let _ = writeln!(body, "warning: {warning}");
                }
                (StatusCode::OK, TEXT, body)
            } else {
                let mut body = String::from("not ready:\n");
                for step in missing {
                    let _ = writeln!(body, "- {step}");
                }
                (StatusCode::SERVICE_UNAVAILABLE, TEXT, body)
            }
        }
        "/metrics" => (StatusCode::OK, OPENMETRICS, metrics.encode()),
        _ => (
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /healthz, /readyz or /metrics\n".to_string(),
        ),
    }
}
