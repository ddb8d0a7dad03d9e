//! End to end: the running agent writes its log from a thread of its own, and a clean stop
//! still ends the log with the stop's own last line (an error's line comes after every line
//! logged before it: `e2e_hot_path`'s refusal).

mod e2e_support;

use e2e_support::running_world;

#[test]
fn a_clean_stop_ends_the_log_with_its_last_line() {
    if !testkit::require_root("a_clean_stop_ends_the_log_with_its_last_line") {
        return;
    }
    let mut world = running_world("e2e-log");
    let agent = world.agent.take().unwrap();
    agent.signal(libc::SIGTERM);
    let log_path = agent.log_path().to_path_buf();
    let status = agent.wait();
    assert!(status.success());
    let log = std::fs::read_to_string(log_path).unwrap();
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.ends_with("(traffic stays captured)")
            && last.contains("stopped; programs and maps stay pinned"),
        "last line: {last}\n{log}"
    );
    // Every line is whole: a timestamp, a level, a target.
    for line in log.lines() {
        assert!(line.starts_with("20") && line.contains("Z ["), "{line}");
    }
}
