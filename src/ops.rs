//! The operations endpoint: `/healthz`, `/readyz` and `/metrics` over HTTP, for the kubelet's
//! probes and for Prometheus.
//!
//! The stages update a [`Metrics`] (cheap to clone, updated from any thread with atomics) and a
//! [`Readiness`] (one flag per start-up step); [`serve`] answers from both on its own thread
//! until the returned [`OpsServer`] is dropped.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use resolver::Role;
use watcher::ProcEvent;

/// One label, as prometheus-client wants a label set: `[("type", "exec")]`.
type Label = [(&'static str, &'static str); 1];

/// The kinds of process events counted in `zbridge_events_total{type=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Exec,
    Fork,
    Exit,
    Lost,
    Scan,
    /// A connector message the watcher does not decode (uid/gid/sid/ptrace/comm/coredump).
    Unknown,
}

impl EventKind {
    /// Every kind, in declaration order (the order of `Metrics::events`).
    pub const ALL: [EventKind; 6] = [
        EventKind::Exec,
        EventKind::Fork,
        EventKind::Exit,
        EventKind::Lost,
        EventKind::Scan,
        EventKind::Unknown,
    ];

    /// The kind of a decoded event.
    pub fn of(event: &ProcEvent) -> EventKind {
        match event {
            ProcEvent::Exec { .. } => EventKind::Exec,
            ProcEvent::Fork { .. } => EventKind::Fork,
            ProcEvent::Exit { .. } => EventKind::Exit,
            ProcEvent::Lost => EventKind::Lost,
            ProcEvent::Scan { .. } => EventKind::Scan,
        }
    }

    /// The value of the `type` label.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Exec => "exec",
            EventKind::Fork => "fork",
            EventKind::Exit => "exit",
            EventKind::Lost => "lost",
            EventKind::Scan => "scan",
            EventKind::Unknown => "unknown",
        }
    }
}

/// The roles of `zbridge_decisions{role=...}`.
const ROLES: [Role; 4] = [Role::Ambient, Role::Ztunnel, Role::Exempt, Role::None];

/// The BPF programs' counters exported as `zbridge_bpf_counter{counter=...}`: the names of
/// `enum zb_counter` in `bpf/zbridge.h`, every one of them (series exist from the start, at 0).
pub const BPF_COUNTERS: [&str; programmer::layout::COUNTER_COUNT] =
    programmer::layout::COUNTER_NAMES;

/// The watcher's counters exported as `zbridge_watcher_counter{counter=...}`: where each exec's
/// facts came from (the exec tap, or /proc when the tap is not loaded or missed a record), the
/// tap's losses, and what the proc connector sent that could not be used (each also logged):
/// undecodable messages (a cut datagram among them), event types this build does not know (a
/// newer kernel), and events dropped because a rescan after a loss superseded them.
pub const WATCHER_COUNTERS: [&str; 8] = [
    "execs_from_tap",
    "execs_from_proc",
    "execs_without_facts",
    "exec_tap_dropped",
    "exec_tap_unmatched",
    "proc_messages_malformed",
    "proc_event_types_unknown",
    "events_superseded_by_rescan",
];

/// The agent's metrics. Clones share the same values; every update is an atomic operation, so
/// any thread may update without coordination.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// The `zbridge_events_total` series, in [`EventKind::ALL`] order: held directly so that
    /// counting an event is one atomic add, not a lookup under the family's lock.
    events: [Counter; 6],
    lost_events: Counter,
    resyncs: Counter,
    /// The `zbridge_decisions` series, in [`ROLES`] order.
    decisions: [Gauge; 4],
    map_entries: Gauge,
    batch_size: Histogram,
    batch_apply_seconds: Histogram,
    enrolment_latency_seconds: Histogram,
    bpf_counters: Family<[(&'static str, String); 1], Gauge<u64, std::sync::atomic::AtomicU64>>,
    watcher_counters:
        Family<[(&'static str, &'static str); 1], Gauge<u64, std::sync::atomic::AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// All families registered, every labelled series present at zero (so that a dashboard
    /// sees `exec 0` rather than no series before the first exec).
    pub fn new() -> Metrics {
        let events = Family::<Label, Counter>::default();
        let lost_events = Counter::default();
        let resyncs = Counter::default();
        let decisions = Family::<Label, Gauge>::default();
        let map_entries = Gauge::default();
        // 1 .. 4096 updates per batch.
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        // 10 µs .. 1.3 s per batch applied to the maps.
        let batch_apply_seconds = Histogram::new(exponential_buckets(1e-5, 2.0, 18));
        // 100 µs .. 13 s from the kernel's exec timestamp to the map write.
        let enrolment_latency_seconds = Histogram::new(exponential_buckets(1e-4, 2.0, 18));
        let bpf_counters = Family::default();
        let watcher_counters = Family::default();

        let event_series =
            EventKind::ALL.map(|kind| events.get_or_create(&[("type", kind.as_str())]).clone());
        let decision_series =
            ROLES.map(|role| decisions.get_or_create(&[("role", role.as_str())]).clone());
        for name in BPF_COUNTERS {
            let _ = bpf_counters.get_or_create(&[("counter", name.to_string())]);
        }
        for name in WATCHER_COUNTERS {
            let _ = watcher_counters.get_or_create(&[("counter", name)]);
        }

        let mut registry = Registry::with_prefix("zbridge");
        registry.register("events", "Process events received, by type", events.clone());
        registry.register(
            "lost_events",
            "Times the kernel dropped process events (ENOBUFS)",
            lost_events.clone(),
        );
        registry.register(
            "resyncs",
            "Rescans of /proc after lost events",
            resyncs.clone(),
        );
        registry.register(
            "decisions",
            "Cgroups currently decided, by role",
            decisions.clone(),
        );
        registry.register(
            "map_entries",
            "Entries in cgroup_info_map",
            map_entries.clone(),
        );
        registry.register(
            "batch_size",
            "Map updates per batch applied",
            batch_size.clone(),
        );
        registry.register_with_unit(
            "batch_apply",
            "Time to apply one batch of map updates",
            Unit::Seconds,
            batch_apply_seconds.clone(),
        );
        registry.register_with_unit(
            "enrolment_latency",
            "From the kernel's exec timestamp to the map write that enrolled the cgroup",
            Unit::Seconds,
            enrolment_latency_seconds.clone(),
        );
        registry.register(
            "bpf_counter",
            "The BPF programs' counters summed over CPUs, as last read from the counters map",
            bpf_counters.clone(),
        );
        registry.register(
            "watcher_counter",
            "The process watcher's counters: where exec facts came from (exec tap or /proc) \
             and the exec tap's losses",
            watcher_counters.clone(),
        );

        Metrics {
            registry: Arc::new(registry),
            events: event_series,
            lost_events,
            resyncs,
            decisions: decision_series,
            map_entries,
            batch_size,
            batch_apply_seconds,
            enrolment_latency_seconds,
            bpf_counters,
            watcher_counters,
        }
    }

    /// Counts one process event.
    pub fn event(&self, kind: EventKind) {
        self.add_events(kind, 1);
    }

    /// Counts `n` process events of one kind.
    pub fn add_events(&self, kind: EventKind, n: u64) {
        self.events[kind as usize].inc_by(n);
    }

    /// Counts one loss of events reported by the kernel.
    pub fn lost_events(&self) {
        self.lost_events.inc();
    }

    /// Counts one rescan of /proc after a loss.
    pub fn resync(&self) {
        self.resyncs.inc();
    }

    /// How many cgroups currently hold `role`.
    pub fn set_decisions(&self, role: Role, count: usize) {
        let index = ROLES
            .iter()
            .position(|r| *r == role)
            .expect("ROLES lists every role");
        self.decisions[index].set(count as i64);
    }

    /// How many entries `cgroup_info_map` holds.
    pub fn set_map_entries(&self, count: usize) {
        self.map_entries.set(count as i64);
    }

    /// One batch of `size` map updates, applied in `apply`.
    pub fn observe_batch(&self, size: usize, apply: Duration) {
        self.batch_size.observe(size as f64);
        self.batch_apply_seconds.observe(apply.as_secs_f64());
    }

    /// The time from an exec to the map write that enrolled its cgroup.
    pub fn observe_enrolment_latency(&self, latency: Duration) {
        self.enrolment_latency_seconds
            .observe(latency.as_secs_f64());
    }

    /// An enrolment written now for an exec the kernel stamped `exec_ts_ns` (CLOCK_MONOTONIC,
    /// the proc connector's clock). A timestamp in the future (a recording's `ts`, not a
    /// kernel time) is not a latency and is not observed.
    pub fn observe_enrolment_since(&self, exec_ts_ns: u64) {
        let now = watcher::live::monotonic_now_ns();
        if let Some(elapsed) = now.checked_sub(exec_ts_ns) {
            self.observe_enrolment_latency(Duration::from_nanos(elapsed));
        }
    }

    /// Sets one BPF counter (`name` from `programmer::layout::COUNTER_NAMES`) to its value as
    /// summed over CPUs.
    pub fn set_bpf_counter(&self, name: &str, value: u64) {
        self.bpf_counters
            .get_or_create(&[("counter", name.to_string())])
            .set(value);
    }

    /// Sets every one of [`WATCHER_COUNTERS`] from the watcher's counters.
    pub fn set_watcher_counters(&self, c: &watcher::live::CounterSnapshot) {
        let values = [
            c.execs_from_tap,
            c.execs_from_proc,
            c.execs_without_facts,
            c.tap_dropped,
            c.tap_unmatched,
            c.malformed,
            c.unknown,
            c.superseded,
        ];
        for (name, value) in WATCHER_COUNTERS.into_iter().zip(values) {
            self.set_watcher_counter(name, value);
        }
    }

    /// Sets one of [`WATCHER_COUNTERS`] (other names are not exported).
    pub fn set_watcher_counter(&self, name: &str, value: u64) {
        if let Some(name) = WATCHER_COUNTERS.iter().find(|n| **n == name) {
            self.watcher_counters
                .get_or_create(&[("counter", name)])
                .set(value);
        }
    }

    /// The exposition, OpenMetrics text format (which Prometheus scrapes).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

/// What `/readyz` waits for: one flag per start-up step, set by the stage that completes it.
/// Clones share the same flags.
#[derive(Clone, Default)]
pub struct Readiness {
    cache_synced: Arc<AtomicBool>,
    first_scan_resolved: Arc<AtomicBool>,
    maps_programmed: Arc<AtomicBool>,
    /// Kubernetes mode: the API server cannot be reached now (set while it is lost; the
    /// programmed state is kept meanwhile).
    api_server_lost: Arc<AtomicBool>,
}

impl Readiness {
    /// Nothing ready yet.
    pub fn new() -> Readiness {
        Readiness::default()
    }

    /// The kube cache listed pods and namespaces (or, standalone, the workloads file is read).
    pub fn set_cache_synced(&self, ready: bool) {
        self.cache_synced.store(ready, Ordering::Release);
    }

    /// The resolver decided every process of the first /proc scan.
    pub fn set_first_scan_resolved(&self, ready: bool) {
        self.first_scan_resolved.store(ready, Ordering::Release);
    }

    /// The programs are attached and the maps hold the first full set of decisions.
    pub fn set_maps_programmed(&self, ready: bool) {
        self.maps_programmed.store(ready, Ordering::Release);
    }

    /// The Kubernetes API server is lost (`true`) or reachable again (`false`).
    pub fn set_api_server_lost(&self, lost: bool) {
        self.api_server_lost.store(lost, Ordering::Release);
    }

    /// The steps not done yet, in words; empty when ready.
    pub fn not_ready(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if !self.cache_synced.load(Ordering::Acquire) {
            missing.push("kube cache not synced");
        }
        if !self.first_scan_resolved.load(Ordering::Acquire) {
            missing.push("first /proc scan not resolved");
        }
        if !self.maps_programmed.load(Ordering::Acquire) {
            missing.push("BPF maps not programmed");
        }
        if self.api_server_lost.load(Ordering::Acquire) {
            missing
                .push("Kubernetes API server unreachable (the programmed state is kept; retrying)");
        }
        missing
    }
}

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
