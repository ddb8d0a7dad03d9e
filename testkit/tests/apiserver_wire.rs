//! The fake API server's watch streams on the wire: a dropped watch is cut (no final chunk)
//! after what came before the cut, and a 410 watch ends properly with its one `ERROR` event.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use testkit::FakeApiServer;

/// Sends a GET of `target`, runs `during`, and returns the raw response, read until the
/// server closes the connection.
fn get_until_closed(server: &FakeApiServer, target: &str, during: impl FnOnce()) -> String {
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    write!(stream, "GET {target} HTTP/1.1\r\nHost: fake\r\n\r\n").unwrap();
    during();
    let mut all = Vec::new();
    if let Err(e) = stream.read_to_end(&mut all) {
        panic!("{e}, after: {}", String::from_utf8_lossy(&all));
    }
    String::from_utf8(all).unwrap()
}

fn wait_for_open_watches(server: &FakeApiServer, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.open_watch_count() != count {
        assert!(Instant::now() < deadline, "never {count} open watches");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_dropped_watch_sends_what_came_before_and_is_cut() {
    let server = FakeApiServer::start().unwrap();
    let text = get_until_closed(
        &server,
        "/api/v1/namespaces?watch=true&allowWatchBookmarks=true&resourceVersion=1",
        || {
            wait_for_open_watches(&server, 1);
            server.bookmark();
            server.drop_watches();
        },
    );
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
    assert_eq!(text.matches("\"type\":\"BOOKMARK\"").count(), 1, "{text}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a cut watch ended properly: {text}"
    );
    wait_for_open_watches(&server, 0);
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].param("allowWatchBookmarks"), Some("true"));
    assert!(requests[0].is_watch());
}

#[test]
fn a_watch_from_a_compacted_version_ends_with_one_410_event() {
    let server = FakeApiServer::start().unwrap();
    let mut namespace = Namespace::default();
    namespace.metadata.name = Some("apps".to_string());
    server.apply_namespace(&namespace);
    server.expire_history();
    let text = get_until_closed(
        &server,
        "/api/v1/namespaces?watch=true&resourceVersion=1",
        || {},
    );
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert_eq!(text.matches("\"type\":\"ERROR\"").count(), 1, "{text}");
    assert!(text.contains("\"code\":410"), "{text}");
    assert!(text.ends_with("0\r\n\r\n"), "not ended properly: {text}");
    assert_eq!(server.open_watch_count(), 0);
}
