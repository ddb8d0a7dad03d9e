//! The API server probe against testkit's FakeApiServer: the real kube-rs client lists one pod
//! of this node; the probe says reachable while the server answers, unreachable once it is
//! stopped, and reachable again when it is back.
//!
//! Every wait is bounded by a deadline (a hang guard, not a timing assertion).

use std::time::{Duration, Instant};

use kubecache::probe::ApiProbe;
use kubecache::KubeView;
use testkit::FakeApiServer;

const NODE: &str = "node-a";
/// Long enough for a few probe rounds and a probe's own timeout.
const DEADLINE: Duration = Duration::from_secs(30);

/// Waits (bounded) until `done`.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < DEADLINE, "not {what} within {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn reachable_while_the_server_answers_unreachable_once_it_is_stopped() {
    let server = FakeApiServer::start().unwrap();
    let port = server.addr().port();
    // No kube cache feeds this view: it stays disconnected, so the probe asks the server.
    let probe = ApiProbe::start(server.kube_config(), NODE, KubeView::default()).unwrap();

    let list = |server: &FakeApiServer| {
        server
            .requests()
            .into_iter()
            .find(|r| r.is_list() && r.path == "/api/v1/pods")
    };
    wait_until("asked by the probe", || list(&server).is_some());
    let asked = list(&server).unwrap();
    assert_eq!(asked.param("fieldSelector"), Some("spec.nodeName=node-a"));
    assert_eq!(asked.param("limit"), Some("1"));
    assert!(probe.reachable());

    drop(server);
    wait_until("unreachable after the server stopped", || {
        !probe.reachable()
    });

    let server = FakeApiServer::start_on(port).unwrap();
    wait_until("reachable again once the server is back", || {
        probe.reachable()
    });
    assert!(list(&server).is_some());
}
