//! The operations endpoint over real HTTP: /healthz, /readyz, /metrics.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

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

/// The value of the sample line `name` (exact series, labels included).
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split(' ').next()?.parse().ok()
    })
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
    // 3 ms: above the 1.6 ms bucket, inside the 3.2 ms one.
    assert_eq!(
        value("zbridge_enrolment_latency_seconds_bucket{le=\"0.0016\"}"),
        0.0
    );
    assert_eq!(
        value("zbridge_enrolment_latency_seconds_bucket{le=\"0.0032\"}"),
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
        ],
        "{text}"
    );
}

#[test]
fn enrolment_since_a_kernel_timestamp_is_observed() {
    let metrics = Metrics::new();
    let exec_ts = watcher::live::monotonic_now_ns();
    metrics.observe_enrolment_since(exec_ts);
    // A timestamp from the future is not a kernel time: not observed.
    metrics.observe_enrolment_since(u64::MAX);
    let text = metrics.encode();
    assert_eq!(
        sample(&text, "zbridge_enrolment_latency_seconds_count"),
        Some(1.0),
        "{text}"
    );
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
