//! End to end: the agent answers SIGTERM while SIGHUP's re-read of a large workloads file is
//! under way, and the re-read it stops in changes nothing (issue 15, defect 6: "keep signals
//! answered within 100 ms while a file is read").

mod e2e_support;

use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use e2e_support::{running_world, DEADLINE};
use resolver::workloads::{MAX_FILE_BYTES, MAX_NODES};
use resolver::Workloads;

/// The target: from SIGTERM to the agent saying it stops, by the agent's own clock.
const ANSWERED_WITHIN: Duration = Duration::from_millis(100);

#[test]
fn sigterm_during_a_reload_of_a_large_file_is_answered_at_once_and_changes_nothing() {
    if !testkit::require_root(
        "sigterm_during_a_reload_of_a_large_file_is_answered_at_once_and_changes_nothing",
    ) {
        return;
    }
    let mut world = running_world("e2e-reload");
    let entries = world.entries().unwrap();
    let ztunnel_ips = world.ztunnel_ips().unwrap();

    // The file is replaced whole (rename), so that the agent never reads half of it.
    let text = large_file(&world.mesh.ztunnel, &world.mesh.attach);
    let next = world.dir.path().join("next.yaml");
    std::fs::write(&next, &text).unwrap();
    std::fs::rename(&next, &world.workloads).unwrap();

    let mut agent = world.agent.take().unwrap();
    agent.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(20));
    let sent = SystemTime::now();
    let start = Instant::now();
    agent.signal(libc::SIGTERM);
    let status = agent.exited_within(DEADLINE);
    let exited = start.elapsed();
    let log = agent.log_text();
    assert!(
        status.is_some_and(|s| s.success()),
        "the agent's exit, {exited:?} after SIGTERM: {status:?}; its log:\n{log}"
    );
    // The target, on the agent's log: the process's exit also waits for the pipeline's orderly
    // stop (the watcher's reader sees the stop when its receive times out), which a busy
    // machine can stretch to many times its usual length.
    let answered = logged_at(&log, "signal 15: stopping")
        .expect("the agent logs when it stops")
        .saturating_sub(sent.duration_since(UNIX_EPOCH).unwrap());
    assert!(
        answered <= ANSWERED_WITHIN,
        "SIGTERM answered after {answered:?}, the target is {ANSWERED_WITHIN:?}:\n{log}"
    );
    assert!(
        log.contains("SIGHUP: reading"),
        "the re-read had begun when SIGTERM came:\n{log}"
    );
    assert!(
        !log.contains("SIGHUP: re-read"),
        "the re-read was stopped, not finished:\n{log}"
    );
    // The agent did not wait for the read either: it was gone before the file could have been
    // parsed, timed here by the same code in the same build, on the same machine as busy.
    let parse_start = Instant::now();
    let parsed = Workloads::parse(&text);
    let parse = parse_start.elapsed();
    assert!(
        parsed.is_ok(),
        "the file is valid: applied, it would change the maps"
    );
    println!(
        "SIGTERM answered after {answered:?}, the agent gone after {exited:?}, \
         the file parses in {parse:?}"
    );
    assert!(
        exited < parse,
        "the agent was gone after {exited:?}, the file parses in {parse:?}: it waited for the \
         read"
    );

    // Nothing of the new file reached the maps: the pins keep what the old file made.
    assert_eq!(world.entries().unwrap(), entries, "cgroup_info_map changed");
    assert_eq!(
        world.ztunnel_ips().unwrap(),
        ztunnel_ips,
        "settings changed"
    );
}

/// A valid workloads file as large as the agent accepts, of as many workloads as fit under
/// both its bounds (one byte under the size limit, or just under the node limit, whichever
/// comes first): a long parse for a valid file (only invalid ones, nested as deep as
/// allowed, take longer). Applied, it would change both maps: ztunnel has another
/// address, and the mesh's app pod is not in it.
fn large_file(ztunnel: &str, attach: &str) -> String {
    let mut text =
        format!("version: 1\nztunnel: {{cgroup: {ztunnel}, address: 10.99.0.7}}\nworkloads:\n");
    let limit = MAX_FILE_BYTES as usize - 1;
    // Nodes as the bound counts them: the header's 9, and per entry its `-`, its mapping,
    // four keys and four values.
    const ENTRY_NODES: usize = 10;
    let mut nodes = 9;
    let mut entry = String::new();
    for i in 0.. {
        entry.clear();
        writeln!(
            entry,
            "- {{name: big/w{i}, cgroup: {attach}/absent/w{i}, address: auto, mode: none}}"
        )
        .unwrap();
        if text.len() + entry.len() > limit || nodes + ENTRY_NODES > MAX_NODES {
            break;
        }
        text.push_str(&entry);
        nodes += ENTRY_NODES;
    }
    text
}

/// When the agent logged the first line holding `needle`, from the line's timestamp (RFC
/// 3339, UTC, as the agent's logger writes it), as time since the Unix epoch: the agent's own
/// clock, so that how busy this test process is does not count.
fn logged_at(log: &str, needle: &str) -> Option<Duration> {
    let line = log.lines().find(|line| line.contains(needle))?;
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let numbers =
        |s: &str, sep: char| -> Option<Vec<i64>> { s.split(sep).map(|n| n.parse().ok()).collect() };
    let [year, month, day] = numbers(date, '-')?[..] else {
        return None;
    };
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let [h, m, s] = numbers(hms, ':')?[..] else {
        return None;
    };
    let nanos: u32 = format!("{fraction:0<9}").get(..9)?.parse().ok()?;
    let secs = days_since_epoch(year, month, day) * 86_400 + h * 3_600 + m * 60 + s;
    Some(Duration::new(u64::try_from(secs).ok()?, nanos))
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (H. Hinnant's
/// `days_from_civil`).
fn days_since_epoch(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}
