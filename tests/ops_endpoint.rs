//! The operations endpoint over real HTTP: /healthz, /readyz, /metrics.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::http::sample;
use zbridge::ops::{self, EventKind, Metrics, Readiness};

/// A plain HTTP/1.1 GET; returns the status code and the body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {response:?}"));
    let status_line = head.lines().next().unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    (status, body.to_string())
}

#[test]
fn healthz_answers_while_alive() {
    let server = ops::serve("127.0.0.1:0", Metrics::new(), Readiness::new()).unwrap();
    assert_eq!(
        get(server.local_addr(), "/healthz"),
        (200, "ok\n".to_string())
    );
    assert_eq!(get(server.local_addr(), "/nope").0, 404);
}

#[test]
fn readyz_is_503_until_every_step_is_ready() {
    let readiness = Readiness::new();
    let server = ops::serve("127.0.0.1:0", Metrics::new(), readiness.clone()).unwrap();
    let addr = server.local_addr();

    let (status, body) = get(addr, "/readyz");
    assert_eq!(status, 503);
    assert_eq!(
        body,
        "not ready:\n- kube cache not synced\n- first /proc scan not resolved\n- BPF maps not programmed\n"
    );

    readiness.set_cache_synced(true);
    readiness.set_first_scan_resolved(true);
    let (status, body) = get(addr, "/readyz");
    assert_eq!(status, 503);
    assert_eq!(body, "not ready:\n- BPF maps not programmed\n");

    readiness.set_maps_programmed(true);
    assert_eq!(get(addr, "/readyz"), (200, "ready\n".to_string()));

    // What the configuration probably did not mean is said while ready.
    readiness.set_warnings(vec!["ambient workloads but no ztunnel".to_string()]);
    assert_eq!(
        get(addr, "/readyz"),
        (
            200,
            "ready\nwarning: ambient workloads but no ztunnel\n".to_string()
        )
    );

    // Losing a step makes it unready again.
    readiness.set_cache_synced(false);
    assert_eq!(get(addr, "/readyz").0, 503);
}

#[test]
fn metrics_expose_every_family_with_the_values_set() {
    let metrics = Metrics::new();
    let server = ops::serve("127.0.0.1:0", metrics.clone(), Readiness::new()).unwrap();

    // Updated from another thread through a clone: the server sees the same values.
    let updater = metrics.clone();
    std::thread::spawn(move || {
        updater.event(EventKind::Exec);
        updater.event(EventKind::Exec);
        updater.add_events(EventKind::Fork, 5);
        updater.add_events(EventKind::Exit, 7);
        updater.lost_events();
        updater.resync();
        updater.set_decisions(resolver::Role::Ambient, 12);
        updater.set_decisions(resolver::Role::Ztunnel, 1);
        updater.set_map_entries(13);
        updater.observe_batch(3, Duration::from_micros(40));
        updater.observe_enrolment_latency(Duration::from_millis(3));
        updater.set_bpf_counter("redirected_out", 42);
        updater.set_bpf_counter("orig_dst_miss", 2);
        updater.set_watcher_counter("execs_from_proc", 3);
        updater.set_watcher_counter("no_such_counter", 9);
    })
    .join()
    .unwrap();

    let (status, text) = get(server.local_addr(), "/metrics");
    assert_eq!(status, 200);
    for family in [
        "# TYPE zbridge_events counter",
        "# TYPE zbridge_lost_events counter",
        "# TYPE zbridge_resyncs counter",
        "# TYPE zbridge_decisions gauge",
        "# TYPE zbridge_map_entries gauge",
        "# TYPE zbridge_batch_size histogram",
        "# TYPE zbridge_batch_apply_seconds histogram",
        "# TYPE zbridge_enrolment_latency_seconds histogram",
        "# TYPE zbridge_bpf_counter gauge",
    ] {
        assert!(text.contains(family), "missing {family:?} in:\n{text}");
    }
    assert!(text.ends_with("# EOF\n"), "{text}");

    let value = |series: &str| {
        sample(&text, series).unwrap_or_else(|| panic!("no sample {series:?} in:\n{text}"))
    };
    assert_eq!(value("zbridge_events_total{type=\"exec\"}"), 2.0);
    assert_eq!(value("zbridge_events_total{type=\"fork\"}"), 5.0);
    assert_eq!(value("zbridge_events_total{type=\"exit\"}"), 7.0);
    assert_eq!(value("zbridge_events_total{type=\"scan\"}"), 0.0);
    assert_eq!(value("zbridge_events_total{type=\"unknown\"}"), 0.0);
    assert_eq!(value("zbridge_lost_events_total"), 1.0);
    assert_eq!(value("zbridge_resyncs_total"), 1.0);
    assert_eq!(value("zbridge_decisions{role=\"ambient\"}"), 12.0);
    assert_eq!(value("zbridge_decisions{role=\"ztunnel\"}"), 1.0);
    assert_eq!(value("zbridge_decisions{role=\"none\"}"), 0.0);
    assert_eq!(value("zbridge_map_entries"), 13.0);
    assert_eq!(value("zbridge_batch_size_count"), 1.0);
    assert_eq!(value("zbridge_batch_size_sum"), 3.0);
    // 3 updates fall in the bucket le=4, not le=2.
    assert_eq!(value("zbridge_batch_size_bucket{le=\"2.0\"}"), 0.0);
    assert_eq!(value("zbridge_batch_size_bucket{le=\"4.0\"}"), 1.0);
    assert_eq!(value("zbridge_batch_apply_seconds_count"), 1.0);
    assert_eq!(value("zbridge_enrolment_latency_seconds_count"), 1.0);
    assert_eq!(value("zbridge_enrolment_latency_seconds_sum"), 0.003);
    // 3 ms: above the 2.56 ms bucket, inside the 5.12 ms one.
    assert_eq!(
        value("zbridge_enrolment_latency_seconds_bucket{le=\"0.00256\"}"),
        0.0
    );
    assert_eq!(
        value("zbridge_enrolment_latency_seconds_bucket{le=\"0.00512\"}"),
        1.0
    );
    assert_eq!(
        value("zbridge_enrolment_latency_seconds_bucket{le=\"+Inf\"}"),
        1.0
    );
    assert_eq!(
        value("zbridge_bpf_counter{counter=\"redirected_out\"}"),
        42.0
    );
    assert_eq!(value("zbridge_bpf_counter{counter=\"orig_dst_miss\"}"), 2.0);
    assert_eq!(
        value("zbridge_watcher_counter{counter=\"execs_from_proc\"}"),
        3.0
    );
    assert_eq!(
        value("zbridge_watcher_counter{counter=\"execs_from_tap\"}"),
        0.0
    );
    assert!(!text.contains("no_such_counter"));
    for name in ops::BPF_COUNTERS {
        let series = format!("zbridge_bpf_counter{{counter=\"{name}\"}}");
        assert!(sample(&text, &series).is_some(), "no {series} in:\n{text}");
    }
    for name in ops::WATCHER_COUNTERS {
        let series = format!("zbridge_watcher_counter{{counter=\"{name}\"}}");
        assert!(sample(&text, &series).is_some(), "no {series} in:\n{text}");
    }
}

/// Each of the watcher's counters lands in its own series: every field of the snapshot gets
/// a distinct value, and each series must show the value of the field it names.
#[test]
fn watcher_counters_are_exported_each_under_its_own_name() {
    let metrics = Metrics::new();
    let snapshot = watcher::live::CounterSnapshot {
        execs_from_tap: 1,
        execs_from_proc: 2,
        execs_without_facts: 3,
        tap_dropped: 4,
        tap_unmatched: 5,
        malformed: 6,
        unknown: 7,
        superseded: 8,
        coalescing_windows: 9,
        windows_ended_by_doorbell: 10,
        ..Default::default()
    };
    metrics.set_watcher_counters(&snapshot);
    let text = metrics.encode();
    let exported: Vec<(&str, f64)> = ops::WATCHER_COUNTERS
        .iter()
        .map(|name| {
            let series = format!("zbridge_watcher_counter{{counter=\"{name}\"}}");
            (*name, sample(&text, &series).unwrap_or(-1.0))
        })
        .collect();
    assert_eq!(
        exported,
        vec![
            ("execs_from_tap", 1.0),
            ("execs_from_proc", 2.0),
            ("execs_without_facts", 3.0),
            ("exec_tap_dropped", 4.0),
            ("exec_tap_unmatched", 5.0),
            ("proc_messages_malformed", 6.0),
            ("proc_event_types_unknown", 7.0),
            ("events_superseded_by_rescan", 8.0),
            ("coalescing_windows", 9.0),
            ("coalescing_windows_ended_by_doorbell", 10.0),
        ],
        "{text}"
    );
}

#[test]
fn enrolment_since_a_kernel_timestamp_is_observed() {
    let metrics = Metrics::new();
    let exec_ts = watcher::live::monotonic_now_ns();
    metrics.observe_enrolment_between(exec_ts, watcher::live::monotonic_now_ns());
    // A timestamp from the future is not a kernel time: not observed.
    metrics.observe_enrolment_between(u64::MAX, watcher::live::monotonic_now_ns());
    let text = metrics.encode();
    assert_eq!(
        sample(&text, "zbridge_enrolment_latency_seconds_count"),
        Some(1.0),
        "{text}"
    );
}

/// The upper bounds of a histogram's buckets, in exposition order (`+Inf` last).
fn bucket_bounds(exposition: &str, name: &str) -> Vec<f64> {
    let prefix = format!("{name}_bucket{{le=\"");
    exposition
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix)?.split_once('"'))
        .map(|(le, _)| {
            if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or_else(|_| panic!("bucket bound {le:?}"))
            }
        })
        .collect()
}

/// The exec path's enrolment latency has buckets from 10 µs (doubling up to about 10 s), fine
/// enough to tell an enrolment under 100 µs; the in-pod one, which waits for ztunnel, keeps
/// 100 µs .. 13 s.
#[test]
fn enrolment_latency_buckets_start_at_10_us_and_in_pod_at_100_us() {
    let metrics = Metrics::new();
    metrics.observe_enrolment_latency(Duration::from_micros(50));
    let text = metrics.encode();
    let expect = |start: f64, count: i32| -> Vec<f64> {
        (0..count)
            .map(|k| start * 2f64.powi(k))
            .chain([f64::INFINITY])
            .collect()
    };
    let close = |got: &[f64], want: &[f64]| {
        got.len() == want.len()
            && got
                .iter()
                .zip(want)
                .all(|(g, w)| g == w || ((g - w) / w).abs() < 1e-9)
    };
    let exec = bucket_bounds(&text, "zbridge_enrolment_latency_seconds");
    assert!(close(&exec, &expect(1e-5, 21)), "{exec:?}\n{text}");
    let inpod = bucket_bounds(&text, "zbridge_inpod_enrolment_latency_seconds");
    assert!(close(&inpod, &expect(1e-4, 18)), "{inpod:?}\n{text}");
    // 50 µs: above the 40 µs bucket, inside the 80 µs one.
    let cumulative = |le: f64| {
        let prefix = "zbridge_enrolment_latency_seconds_bucket{le=\"";
        text.lines()
            .filter_map(|line| line.strip_prefix(prefix)?.split_once("\"} "))
            .find(|(bound, _)| {
                bound
                    .parse::<f64>()
                    .is_ok_and(|b| ((b - le) / le).abs() < 1e-9)
            })
            .and_then(|(_, value)| value.split(' ').next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no bucket {le} in:\n{text}"))
    };
    assert_eq!(cumulative(4e-5), 0.0);
    assert_eq!(cumulative(8e-5), 1.0);
}

#[test]
fn dropping_the_server_stops_it() {
    let server = ops::serve("127.0.0.1:0", Metrics::new(), Readiness::new()).unwrap();
    let addr = server.local_addr();
    assert_eq!(get(addr, "/healthz").0, 200);
    drop(server);
    assert!(
        TcpStream::connect(addr).is_err(),
        "still listening on {addr}"
    );
}

#[test]
fn a_taken_address_is_an_error_naming_it() {
    let first = ops::serve("127.0.0.1:0", Metrics::new(), Readiness::new()).unwrap();
    let addr = first.local_addr().to_string();
    let err = ops::serve(&addr, Metrics::new(), Readiness::new())
        .err()
        .expect("a second server on one port");
    assert!(format!("{err:#}").contains(&addr), "{err:#}");
}

/// Sends `request` as is (possibly in pieces) and returns the whole response.
fn exchange(addr: SocketAddr, pieces: &[&str]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    for piece in pieces {
        stream.write_all(piece.as_bytes()).unwrap();
        stream.flush().unwrap();
    }
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn head_post_and_split_requests_are_answered_correctly() {
    let server = ops::serve("127.0.0.1:0", Metrics::new(), Readiness::new()).unwrap();
    let addr = server.local_addr();

    let head = exchange(addr, &["HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n"]);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("Content-Length: 3\r\n"), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head:?}");

    let post = exchange(
        addr,
        &["POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"],
    );
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");

    // A request head that arrives in several writes.
    let split = exchange(
        addr,
        &["GET /rea", "dyz HTTP/1.1\r\nHo", "st: x\r\n", "\r\n"],
    );
    assert!(split.starts_with("HTTP/1.1 503 "), "{split}");
    assert!(split.ends_with("- BPF maps not programmed\n"), "{split}");

    let garbage = exchange(addr, &["hello\r\n\r\n"]);
    assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
}

#[test]
fn an_oversized_request_head_is_refused_with_431() {
    let server = ops::serve("127.0.0.1:0", Metrics::new(), Readiness::new()).unwrap();
    let padding = "a".repeat(9 * 1024);
    let request = format!("GET /healthz HTTP/1.1\r\nX-Padding: {padding}\r\n\r\n");
    let response = exchange(server.local_addr(), &[&request]);
    assert!(response.starts_with("HTTP/1.1 431 "), "{response}");
}

/// Raises this process's soft limit of open descriptors to its hard limit: the starvation test
/// holds several hundred sockets at once, both ends of some of them.
fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

/// One hostile client: connected and silent (idle), or sending its request head one byte per
/// tick and never finishing it (slow). Reconnects whenever the server closes it, as a
/// determined client would.
struct Hog {
    slow: bool,
    stream: Option<TcpStream>,
    sent: usize,
}

impl Hog {
    const HEAD: &'static [u8] = b"GET /healthz HTTP/1.1\r\nX-Slow: ";

    /// One tick: reconnect if the server closed the connection, then (slow) send one byte.
    /// Returns whether it had to reconnect.
    fn tick(&mut self, addr: SocketAddr) -> bool {
        let open = self.stream.as_mut().is_some_and(|stream| {
            let mut byte = [0u8; 1];
            matches!(stream.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        });
        let reconnected = !open;
        if !open {
            self.stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                .ok()
                .filter(|stream| stream.set_nonblocking(true).is_ok());
            self.sent = 0;
        }
        if let (true, Some(stream)) = (self.slow, self.stream.as_mut()) {
            let byte = Self::HEAD.get(self.sent).copied().unwrap_or(b'a');
            if stream.write(&[byte]).is_ok() {
                self.sent += 1;
            }
        }
        reconnected
    }
}

/// A GET of /healthz that must be answered within `within`; the status, or why not.
fn probe(addr: SocketAddr, within: Duration) -> Result<u16, String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, within).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(within)).unwrap();
    stream.set_write_timeout(Some(within)).unwrap();
    write!(stream, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("read: {e} after {response:?}"))?;
    response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status in {response:?}"))
}

/// Issue 15, item 2: slow and idle clients must not starve the liveness probe. 200 clients
/// trickling a request head and 500 silent ones (all reconnecting when closed) are connected
/// before and during the polls; every poll of /healthz is answered 200 within 1 s.
#[test]
fn slow_and_idle_clients_do_not_starve_the_liveness_probe() {
    raise_descriptor_limit();
    let server = ops::serve("127.0.0.1:0", Metrics::new(), Readiness::new()).unwrap();
    let addr = server.local_addr();

    let stop = Arc::new(AtomicBool::new(false));
    let (connected_tx, connected) = std::sync::mpsc::channel();
    let hogs = std::thread::spawn({
        let stop = Arc::clone(&stop);
        move || {
            let mut hogs: Vec<Hog> = (0..700)
                .map(|i| Hog {
                    slow: i < 200,
                    stream: None,
                    sent: 0,
                })
                .collect();
            let mut reconnects = 0usize;
            let mut first = true;
            while !stop.load(Ordering::Acquire) {
                let tick = Instant::now();
                for hog in &mut hogs {
                    reconnects += usize::from(hog.tick(addr));
                }
                if first {
                    first = false;
                    reconnects = 0;
                    connected_tx.send(()).unwrap();
                }
                std::thread::sleep(Duration::from_millis(500).saturating_sub(tick.elapsed()));
            }
            let open = hogs.iter().filter(|hog| hog.stream.is_some()).count();
            (reconnects, open)
        }
    });
    connected.recv().unwrap();

    let within = Duration::from_secs(1);
    let mut failures = Vec::new();
    let mut slowest = Duration::ZERO;
    for poll in 0..20 {
        let start = Instant::now();
        let outcome = probe(addr, within);
        let took = start.elapsed();
        slowest = slowest.max(took);
        if outcome != Ok(200) || took > within {
            failures.push(format!("poll {poll}: {outcome:?} in {took:?}"));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    stop.store(true, Ordering::Release);
    let (reconnects, open) = hogs.join().unwrap();
    eprintln!(
        "20 polls, slowest {slowest:?}; the hogs reconnected {reconnects} times, {open} connected at the end"
    );
    assert!(
        failures.is_empty(),
        "{} of 20 polls failed: {failures:#?}",
        failures.len()
    );
}

/// The deadline is for the whole request, not per read: a client that sends a byte of its
/// request head every quarter second, each read well within any per-read timeout, is closed
/// once the request's time is up, with no other client around.
#[test]
fn a_trickled_request_is_cut_at_the_deadline() {
    let server = ops::serve("127.0.0.1:0", Metrics::new(), Readiness::new()).unwrap();
    let mut stream = TcpStream::connect(server.local_addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(250)))
        .unwrap();
    let start = Instant::now();
    let head = b"GET /healthz HTTP/1.1\r\nX-Slow: ";
    let mut sent = 0;
    let closed_after = loop {
        let byte = head.get(sent).copied().unwrap_or(b'a');
        if stream.write_all(&[byte]).is_err() {
            break start.elapsed();
        }
        sent += 1;
        let mut buf = [0u8; 64];
        match stream.read(&mut buf) {
            Ok(_) => break start.elapsed(), // closed, or answered: either way not held
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break start.elapsed(),
        }
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "still connected after {sent} bytes trickled over {:?}",
            start.elapsed()
        );
    };
    assert!(
        closed_after >= Duration::from_secs(4),
        "closed after only {closed_after:?}"
    );
}
