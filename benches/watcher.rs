//! Watcher benchmarks (a bench binary: `cargo bench --bench watcher`).
//!
//! 1. Decode throughput: synthetic kernel datagrams (fork, exec, exit) through
//!    `connector::decode`, in events per second.
//! 2. Spawn storm (root): spawner threads start `/bin/true` as fast as they can for
//!    `WATCHER_BENCH_SECS` seconds (default 5) while a watcher thread reads the machine's
//!    events: once through the raw connector (decode only), once through `LiveSource` with the
//!    exec tap (`live-source`: facts of execs from the tap's records and caches), once through
//!    `LiveSource` without it (`live-source-proc`: /proc reads for every exec). Reports events/s
//!    received, events lost, and the watcher thread's CPU time (getrusage RUSAGE_THREAD) per
//!    event and per 10,000 events. With the tap it also reports the tap program's own run time
//!    per exec (`BPF_ENABLE_STATS`): the cost moved into every exec of the machine.
//!    The baseline, in the same storm and with the same CPU measure: `benches/c_subscriber.c`,
//!    a plain C subscriber (one recv per datagram, counting fork/exec/exit), compiled here
//!    with `cc -O2` and run as a child process (skipped when there is no `cc`). The Rust
//!    readers run as threads of this process, whose spawner threads fork and start threads;
//!    `raw-connector-process` and `live-source-process` run them in a child process instead
//!    (this binary again, with `WATCHER_BENCH_READER`), as the C subscriber runs, so that the
//!    difference between the two placements is visible. The Rust readers receive with the
//!    connector's coalescing window (`ConnectorConfig::coalesce_window`, the default or
//!    `WATCHER_BENCH_WINDOW_US`); `live-source-no-coalesce` (and its `-process` twin) is the
//!    LiveSource with the window off. Each Rust reader also reports its context switches per
//!    event and the delivery latency of events: the kernel's timestamp of the event
//!    (CLOCK_MONOTONIC) against the moment the reader has it in hand, p50/p90/p99/max.
//!    `WATCHER_BENCH_READERS=a,b,...` runs only the readers named.

use std::hint::black_box;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use watcher::connector::{
    decode, wire, Connector, ConnectorConfig, Message, ReceiveStats, Received,
};
use watcher::live::{monotonic_now_ns, LiveConfig, LiveSource};
use watcher::{EventSource, ProcEvent, Record};

/// Set in a child process of the storm: the reader it runs (see [`reader_process`]).
const READER_ENV: &str = "WATCHER_BENCH_READER";

fn main() {
    if let Ok(reader) = std::env::var(READER_ENV) {
        reader_process(&reader);
        return;
    }
    // `cargo bench` passes `--bench`; a filter argument selects one part.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let want = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    if want("decode") {
        bench_decode();
    }
    if want("facts") {
        bench_facts();
    }
    // `-- storm` runs every storm, `-- storm/processes` the readers of one storm,
    // `-- storm/processes/live-source` one reader.
    let want_storm = |name: &str| {
        filter.as_deref().is_none_or(|f| {
            f == "storm" || name == f || name.starts_with(&format!("{}/", f.trim_end_matches('/')))
        })
    };
    if filter.as_deref().is_none_or(|f| f.starts_with("storm")) {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("storm: SKIPPED (needs root for the proc connector)");
            return;
        }
        let secs: u64 = std::env::var("WATCHER_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5);
        let spawners: usize = std::env::var("WATCHER_BENCH_SPAWNERS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        let c_subscriber = build_c_subscriber();
        type Watcher = fn(Arc<AtomicBool>, Arc<AtomicBool>) -> WatcherResult;
        let mut readers: Vec<(&str, Watcher)> = Vec::new();
        if c_subscriber.is_some() {
            readers.push(("c-subscriber", c_watcher));
        }
        readers.push(("raw-connector", raw_watcher));
        readers.push(("live-source", live_watcher_tap));
        readers.push(("live-source-no-coalesce", live_watcher_no_coalesce));
        readers.push(("live-source-proc", live_watcher_proc));
        readers.push(("raw-connector-process", |stop, ready| {
            own_process_watcher("raw-connector", stop, ready)
        }));
        readers.push(("live-source-process", |stop, ready| {
            own_process_watcher("live-source", stop, ready)
        }));
        readers.push(("live-source-no-coalesce-process", |stop, ready| {
            own_process_watcher("live-source-no-coalesce", stop, ready)
        }));
        readers.push(("live-source-proc-process", |stop, ready| {
            own_process_watcher("live-source-proc", stop, ready)
        }));
        if let Ok(only) = std::env::var("WATCHER_BENCH_READERS") {
            let only: Vec<&str> = only.split(',').map(str::trim).collect();
            readers.retain(|(name, _)| only.contains(name));
        }
        println!(
            "storm: coalescing window of the Rust readers {:?} (live-source-no-coalesce: off)",
            coalesce_window()
        );
        // Rounds run the readers in turn, again and again: a CPU figure per event varies a lot
        // between runs on a shared machine (how often the reader sleeps and is woken depends
        // on timing), so the summary compares medians over interleaved rounds.
        let rounds: usize = std::env::var("WATCHER_BENCH_ROUNDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1)
            .max(1);
        let mut kinds = vec![Storm::Processes, Storm::Threads { per_second: 6000 }];
        // Light load (400 events/s, one event every 2.5 ms on average): what the coalescing
        // window adds when events do not come fast. Only when named:
        // `-- storm/threads-200-per-s`.
        if filter
            .as_deref()
            .is_some_and(|f| f.starts_with("storm/threads-200-per-s"))
        {
            kinds = vec![Storm::Threads { per_second: 200 }];
        }
        for kind in kinds {
            let mut figures: Vec<(String, Vec<Figures>)> = Vec::new();
            for _ in 0..rounds {
                for (reader, watcher) in &readers {
                    let name = format!("storm/{kind}/{reader}");
                    if want_storm(&name) {
                        let got = storm(&name, kind, secs, spawners, *watcher);
                        match figures.iter_mut().find(|(n, _)| *n == name) {
                            Some((_, v)) => v.push(got),
                            None => figures.push((name, vec![got])),
                        }
                    }
                }
            }
            summarize(&figures);
        }
        if let Some(binary) = c_subscriber {
            let _ = std::fs::remove_file(binary);
        }
    }
}

fn bench_decode() {
    // One message per datagram, as the kernel sends them; and a 3-message datagram.
    let single: Vec<Vec<u8>> = (0..3000u32)
        .map(|i| match i % 3 {
            0 => wire::fork(i as u64, 1000 + i, 1000 + i, 2000 + i, 2000 + i),
            1 => wire::exec(i as u64, 2000 + i, 2000 + i),
            _ => wire::exit(i as u64, 2000 + i, 2000 + i, 0),
        })
        .collect();
    let triple: Vec<u8> = single[..3].concat();
    for (name, datagrams, per) in [
        ("decode/one-message-datagrams", single.clone(), 1u64),
        ("decode/three-message-datagram", vec![triple; 1000], 3u64),
    ] {
        let rounds = 2000;
        let start = Instant::now();
        let mut events = 0u64;
        for _ in 0..rounds {
            for d in &datagrams {
                for m in decode(black_box(d)) {
                    if let Ok(Message::Event { .. }) = black_box(m) {
                        events += 1;
                    }
                }
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        assert_eq!(events, rounds * datagrams.len() as u64 * per);
        println!(
            "{name}: {:.1} M events/s ({:.1} ns/event, {events} events)",
            events as f64 / elapsed / 1e6,
            elapsed * 1e9 / events as f64
        );
    }
}

/// `ProcReader::read_facts` of a live process (this one): the per-exec cost of the watcher.
fn bench_facts() {
    let Ok(mut reader) = watcher::procfs::ProcReader::new() else {
        println!("facts: SKIPPED (no cgroup2 mount)");
        return;
    };
    let pid = std::process::id();
    let rounds = 20_000u32;
    type Read = fn(&mut watcher::procfs::ProcReader, u32) -> watcher::ProcFacts;
    let variants: [(&str, Read); 2] = [
        ("read_facts (scan: with comm)", |r, pid| r.read_facts(pid)),
        ("read_facts_without_comm (exec events)", |r, pid| {
            r.read_facts_without_comm(pid)
        }),
    ];
    for (name, read) in variants {
        let cpu0 = thread_cpu_seconds();
        let start = Instant::now();
        for _ in 0..rounds {
            black_box(read(&mut reader, black_box(pid)));
        }
        let elapsed = start.elapsed().as_secs_f64();
        let cpu = thread_cpu_seconds() - cpu0;
        println!(
            "facts/{name}: {:.2} µs/call wall, {:.2} µs/call CPU ({rounds} calls)",
            elapsed * 1e6 / rounds as f64,
            cpu * 1e6 / rounds as f64
        );
    }
}

/// The watcher thread's CPU seconds so far (user + system).
fn thread_cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is valid; getrusage writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid rusage to write to.
    unsafe {
        libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Context switches of the calling thread so far (voluntary + involuntary): a reader's CPU per
/// event depends mostly on how often it sleeps and is woken again.
fn thread_switches() -> u64 {
    // SAFETY: an all-zero rusage is valid; getrusage writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid rusage to write to.
    unsafe {
        libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
    }
    (usage.ru_nvcsw + usage.ru_nivcsw) as u64
}

/// "N context switches (X per event)".
fn switches_note(switches: u64, events: u64) -> String {
    format!(
        "{switches} context switches ({:.2} per event)",
        switches as f64 / events.max(1) as f64
    )
}

/// What a watcher thread measured.
struct WatcherResult {
    events: u64,
    lost: u64,
    cpu_seconds: f64,
    /// Context switches of the reader per event (the Rust readers).
    switches_per_event: Option<f64>,
    /// Delivery latency of the events (the Rust readers).
    latency: Option<Latency>,
    /// More to print after the figures (may be empty).
    notes: String,
}

/// One reader's figures in one round, for the summary.
#[derive(Debug, Clone, Copy)]
struct Figures {
    us_per_event: f64,
    switches_per_event: Option<f64>,
    latency: Option<Latency>,
}

/// Percentiles of the delivery latency of events, in µs: from the kernel's timestamp of the
/// event (`ktime_get_ns()`, CLOCK_MONOTONIC, taken as the connector builds the message) to the
/// moment the reader has the event in hand (CLOCK_MONOTONIC read right after the receive, or
/// after `next_record` returned it).
#[derive(Debug, Clone, Copy)]
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Latency {
    /// From latencies in ns (sorted here); `None` for none.
    fn of(mut ns: Vec<u64>) -> Option<Latency> {
        if ns.is_empty() {
            return None;
        }
        ns.sort_unstable();
        let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
        Some(Latency {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: at(1.0),
        })
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "latency p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
            self.p50, self.p90, self.p99, self.max
        )
    }
}

/// The coalescing window of the Rust readers: `WATCHER_BENCH_WINDOW_US`, else the default.
fn coalesce_window() -> Duration {
    std::env::var("WATCHER_BENCH_WINDOW_US")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_micros)
        .unwrap_or(ConnectorConfig::default().coalesce_window)
}

/// "receives: D datagrams in R reads (B per read), W wake-ups, N windows (E empty)".
fn receive_note(r: ReceiveStats) -> String {
    format!(
        "receives: {} datagrams in {} reads ({:.2} per read), {} wake-ups, {} windows ({} \
         empty), {} truncated",
        r.datagrams,
        r.reads,
        r.datagrams as f64 / r.reads.max(1) as f64,
        r.wakeups,
        r.windows,
        r.empty_windows,
        r.truncated
    )
}

/// Reads raw connector datagrams until `stop`, counting events.
fn raw_watcher(stop: Arc<AtomicBool>, ready: Arc<AtomicBool>) -> WatcherResult {
    let config = ConnectorConfig {
        coalesce_window: coalesce_window(),
        ..ConnectorConfig::default()
    };
    let mut connector = Connector::subscribe(&config).expect("subscribe");
    let mut latencies: Vec<u64> = Vec::with_capacity(1 << 20);
    ready.store(true, Ordering::SeqCst);
    let (cpu0, switches0) = (thread_cpu_seconds(), thread_switches());
    let stats0 = connector.receive_stats();
    let (mut events, mut lost) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        match connector.recv().expect("recv") {
            Received::Timeout => {}
            Received::Overrun => lost += 1,
            Received::Datagram(d) => {
                let now = monotonic_now_ns();
                for m in decode(d) {
                    if let Ok(Message::Event { ts_ns, .. }) = m {
                        events += 1;
                        latencies.push(now.saturating_sub(ts_ns));
                    }
                }
            }
        }
    }
    let cpu_seconds = thread_cpu_seconds() - cpu0;
    let switches = thread_switches() - switches0;
    let stats = connector.receive_stats().since(&stats0);
    WatcherResult {
        events,
        lost,
        cpu_seconds,
        switches_per_event: Some(switches as f64 / events.max(1) as f64),
        latency: Latency::of(latencies),
        notes: format!(
            "{}; {}",
            switches_note(switches, events),
            receive_note(stats)
        ),
    }
}

/// Compiles `benches/c_subscriber.c` into the target directory; `None` (said why) when it
/// cannot be built.
fn build_c_subscriber() -> Option<PathBuf> {
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/c_subscriber.c");
    let out = std::env::temp_dir().join(format!("zbridge-c-subscriber-{}", std::process::id()));
    match Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&out)
        .arg(&source)
        .status()
    {
        Ok(status) if status.success() => {
            C_SUBSCRIBER.set(out.clone()).expect("built once");
            Some(out)
        }
        Ok(status) => {
            println!(
                "storm/c-subscriber: SKIPPED (cc {}: {status})",
                source.display()
            );
            None
        }
        Err(e) => {
            println!("storm/c-subscriber: SKIPPED (no cc: {e})");
            None
        }
    }
}

static C_SUBSCRIBER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Whether the running kernel takes the proc connector's event mask (6.6 and later), as the
/// Rust connector asks for it there.
fn kernel_takes_event_mask() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']);
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (6, 6)
}

/// Runs the C subscriber as a child until `stop`, and reads its counts and CPU time.
fn c_watcher(stop: Arc<AtomicBool>, ready: Arc<AtomicBool>) -> WatcherResult {
    let binary = C_SUBSCRIBER.get().expect("built before the storm");
    let mut command = Command::new(binary);
    if kernel_takes_event_mask() {
        command.arg("--mask");
    }
    child_watcher(command, stop, ready)
}

/// Runs one of the Rust readers in a child process (this binary), as the C subscriber runs.
fn own_process_watcher(
    reader: &str,
    stop: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
) -> WatcherResult {
    let mut command = Command::new(std::env::current_exe().expect("this binary"));
    command.env(READER_ENV, reader);
    child_watcher(command, stop, ready)
}

/// The child side of [`own_process_watcher`]: runs `reader` on its main thread until SIGTERM,
/// speaking the C subscriber's protocol ("ready", then "events N lost L cpu_s S", here
/// followed by "notes ...").
fn reader_process(reader: &str) {
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(libc::SIGTERM, Arc::clone(&stop)).expect("SIGTERM handler");
    let ready = Arc::new(AtomicBool::new(false));
    {
        let ready = Arc::clone(&ready);
        std::thread::spawn(move || {
            while !ready.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            println!("ready");
        });
    }
    let r = match reader {
        "raw-connector" => raw_watcher(stop, ready),
        "live-source" => live_watcher_tap(stop, ready),
        "live-source-no-coalesce" => live_watcher_no_coalesce(stop, ready),
        "live-source-proc" => live_watcher_proc(stop, ready),
        other => panic!("{READER_ENV}={other}: no such reader"),
    };
    let mut line = format!(
        "events {} lost {} cpu_s {:.6}",
        r.events, r.lost, r.cpu_seconds
    );
    if let Some(sw) = r.switches_per_event {
        line += &format!(" switches_per_event {sw:.6}");
    }
    if let Some(l) = r.latency {
        line += &format!(
            " p50_us {:.3} p90_us {:.3} p99_us {:.3} max_us {:.3}",
            l.p50, l.p90, l.p99, l.max
        );
    }
    println!("{line} notes {}", r.notes);
}

/// Runs a reader process until `stop`, and reads its counts and CPU time.
fn child_watcher(
    mut command: Command,
    stop: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
) -> WatcherResult {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the reader process");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("read the reader process");
    assert_eq!(line.trim(), "ready", "the reader process did not start");
    // The C subscriber counts no context switches itself: its (only) thread's are read here.
    let switches0 = process_switches(child.id());
    ready.store(true, Ordering::SeqCst);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let switches = process_switches(child.id()).saturating_sub(switches0);
    // SAFETY: kill has no memory preconditions; the pid is our own child, not yet reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    line.clear();
    stdout
        .read_line(&mut line)
        .expect("read the reader process");
    assert!(
        child.wait().expect("wait").success(),
        "the reader process failed"
    );
    // "events N lost L cpu_s S", and from a Rust reader "switches_per_event X p50_us ...
    // notes ...".
    let (line, notes) = line.split_once(" notes ").unwrap_or((line.as_str(), ""));
    let fields: Vec<&str> = line.split_whitespace().collect();
    let optional = |name: &str| -> Option<f64> {
        let at = fields.iter().position(|f| *f == name)?;
        fields.get(at + 1)?.parse().ok()
    };
    let field = |name: &str| -> f64 { optional(name).expect(name) };
    let latency = optional("p50_us").map(|p50| Latency {
        p50,
        p90: field("p90_us"),
        p99: field("p99_us"),
        max: field("max_us"),
    });
    let events = field("events") as u64;
    let switches_per_event = optional("switches_per_event");
    let mut notes = notes.trim_end().to_string();
    if switches_per_event.is_none() {
        // A single-threaded C reader: its process's switches are its thread's.
        notes = switches_note(switches, events);
    }
    WatcherResult {
        events,
        lost: field("lost") as u64,
        cpu_seconds: field("cpu_s"),
        switches_per_event: switches_per_event.or(Some(switches as f64 / events.max(1) as f64)),
        latency,
        notes,
    }
}

/// Voluntary + involuntary context switches of the main thread of process `pid`, from
/// `/proc/PID/status` (0 if it cannot be read).
fn process_switches(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .filter(|l| {
            l.starts_with("voluntary_ctxt_switches") || l.starts_with("nonvoluntary_ctxt_switches")
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// `LiveSource` with the exec tap (the default).
fn live_watcher_tap(stop: Arc<AtomicBool>, ready: Arc<AtomicBool>) -> WatcherResult {
    live_watcher(stop, ready, true, coalesce_window())
}

/// `LiveSource` with the exec tap and without receive coalescing.
fn live_watcher_no_coalesce(stop: Arc<AtomicBool>, ready: Arc<AtomicBool>) -> WatcherResult {
    live_watcher(stop, ready, true, Duration::ZERO)
}

/// `LiveSource` reading /proc for every exec.
fn live_watcher_proc(stop: Arc<AtomicBool>, ready: Arc<AtomicBool>) -> WatcherResult {
    live_watcher(stop, ready, false, coalesce_window())
}

/// Reads `LiveSource` records until `stop`, counting events (not scans).
fn live_watcher(
    stop: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
    exec_tap: bool,
    coalesce_window: Duration,
) -> WatcherResult {
    let config = LiveConfig {
        exec_tap,
        connector: ConnectorConfig {
            coalesce_window,
            ..ConnectorConfig::default()
        },
        ..LiveConfig::default()
    };
    let mut source = LiveSource::start(&config).expect("live source");
    assert_eq!(
        source.exec_tap().is_some(),
        exec_tap,
        "the exec tap loads as root (see the warning above)"
    );
    // The kernel counts programs' run time only while this fd is open.
    let _stats =
        exec_tap.then(|| programmer::sys::enable_run_time_stats().expect("BPF_ENABLE_STATS"));
    let tap_stats = |source: &LiveSource| {
        source
            .exec_tap()
            .map(|tap| tap.run_stats().expect("exec tap run stats"))
    };
    let stats0 = tap_stats(&source);
    let stop_source = source.stop_handle();
    // Forward the bench's stop to the source's own stop handle.
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        stop_source.stop();
    });
    source.next_record().expect("scan").expect("scan record");
    let mut latencies: Vec<u64> = Vec::with_capacity(1 << 20);
    ready.store(true, Ordering::SeqCst);
    let (cpu0, switches0) = (thread_cpu_seconds(), thread_switches());
    let receives0 = source.receive_stats();
    while let Some(rec) = source.next_record().expect("next record") {
        // The record's ts is the kernel's event time (raised to the previous record's when an
        // event of another CPU was stamped a little earlier: never by more than that).
        if let Record::Proc(
            ProcEvent::Fork { .. } | ProcEvent::Exec { .. } | ProcEvent::Exit { .. },
        ) = rec.record
        {
            latencies.push(monotonic_now_ns().saturating_sub(rec.ts));
        }
        black_box(&rec);
    }
    let cpu_seconds = thread_cpu_seconds() - cpu0;
    let switches = thread_switches() - switches0;
    let c = source.counters().snapshot();
    let events = c.forks + c.execs + c.exits;
    let stats = source.receive_stats().since(&receives0);
    let mut notes = format!(
        "{}; {}; execs {} (facts from the tap {}, from /proc {}, without facts {}); tap \
         dropped {}, unmatched {}",
        switches_note(switches, events),
        receive_note(stats),
        c.execs,
        c.execs_from_tap,
        c.execs_from_proc,
        c.execs_without_facts,
        c.tap_dropped,
        c.tap_unmatched
    );
    if let (Some((runs0, time0)), Some((runs1, time1))) = (stats0, tap_stats(&source)) {
        let runs = runs1 - runs0;
        notes += &format!(
            "; tap program: {runs} runs, {:.0} ns/run (BPF_ENABLE_STATS, in the execing task)",
            (time1 - time0).as_nanos() as f64 / runs.max(1) as f64
        );
    }
    WatcherResult {
        events,
        lost: c.lost,
        cpu_seconds,
        switches_per_event: Some(switches as f64 / events.max(1) as f64),
        latency: Latency::of(latencies),
        notes,
    }
}

/// What the spawners start.
#[derive(Debug, Clone, Copy)]
enum Storm {
    /// `/bin/true` as fast as possible: fork, exec and exit events, /proc reads on exec.
    Processes,
    /// Threads started and joined at a fixed total rate: a fork and an exit event each, so
    /// 6000/s is about 12,000 events/s, the target load.
    Threads { per_second: u32 },
}

impl std::fmt::Display for Storm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storm::Processes => write!(f, "processes"),
            Storm::Threads { per_second } => write!(f, "threads-{per_second}-per-s"),
        }
    }
}

/// The median CPU µs per event of each reader over the rounds, and its ratio to the C
/// subscriber's median; the medians of its switches per event and latency percentiles.
fn summarize(figures: &[(String, Vec<Figures>)]) {
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let median_of = |v: &[Figures], f: &dyn Fn(&Figures) -> Option<f64>| {
        let got: Vec<f64> = v.iter().filter_map(f).collect();
        (!got.is_empty()).then(|| median(&got))
    };
    let baseline = figures
        .iter()
        .find(|(n, _)| n.ends_with("/c-subscriber"))
        .map(|(_, v)| median(&v.iter().map(|f| f.us_per_event).collect::<Vec<_>>()));
    for (name, v) in figures {
        let us: Vec<f64> = v.iter().map(|f| f.us_per_event).collect();
        let m = median(&us);
        let all: Vec<String> = us.iter().map(|x| format!("{x:.2}")).collect();
        let mut line = format!("summary {name}: median {m:.2} µs/event");
        if let Some(b) = baseline {
            line += &format!(" ({:.2}x the C subscriber)", m / b);
        }
        line += &format!(" over {} rounds: {}", v.len(), all.join(" "));
        if let Some(sw) = median_of(v, &|f| f.switches_per_event) {
            let all: Vec<String> = v
                .iter()
                .filter_map(|f| f.switches_per_event)
                .map(|x| format!("{x:.2}"))
                .collect();
            line += &format!("; switches/event median {sw:.2} ({})", all.join(" "));
        }
        if let (Some(p50), Some(p99)) = (
            median_of(v, &|f| f.latency.map(|l| l.p50)),
            median_of(v, &|f| f.latency.map(|l| l.p99)),
        ) {
            line += &format!("; latency median of p50 {p50:.0} µs, of p99 {p99:.0} µs");
        }
        println!("{line}");
    }
}

/// One storm with one reader; returns the reader's figures.
fn storm(
    name: &str,
    kind: Storm,
    secs: u64,
    spawners: usize,
    watcher: fn(Arc<AtomicBool>, Arc<AtomicBool>) -> WatcherResult,
) -> Figures {
    let stop_watcher = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    let handle = {
        let (stop, ready) = (stop_watcher.clone(), ready.clone());
        std::thread::Builder::new()
            .name("watcher".into())
            .spawn(move || watcher(stop, ready))
            .expect("spawn the watcher thread")
    };
    while !ready.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let spawned: u64 = (0..spawners)
        .map(|_| {
            std::thread::spawn(move || {
                let mut n = 0u64;
                match kind {
                    Storm::Processes => {
                        while Instant::now() < deadline {
                            std::process::Command::new("/bin/true")
                                .status()
                                .expect("spawn /bin/true");
                            n += 1;
                        }
                    }
                    Storm::Threads { per_second } => {
                        let interval = Duration::from_secs_f64(spawners as f64 / per_second as f64);
                        let mut next = Instant::now();
                        while next < deadline {
                            std::thread::spawn(|| black_box(0)).join().unwrap();
                            n += 1;
                            next += interval;
                            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                                std::thread::sleep(wait);
                            }
                        }
                    }
                }
                n
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .sum();
    // Let the watcher drain what is queued (events/s below are per second of storm).
    std::thread::sleep(Duration::from_millis(500));
    stop_watcher.store(true, Ordering::SeqCst);
    let r = handle.join().unwrap();
    println!(
        "{name}: {secs} s, {spawned} spawned ({:.0}/s); watcher received {} events \
         ({:.0} events/s), lost (ENOBUFS) {}, watcher thread CPU {:.3} s = {:.2} µs/event = {:.4} \
         CPU s per 10,000 events",
        spawned as f64 / secs as f64,
        r.events,
        r.events as f64 / secs as f64,
        r.lost,
        r.cpu_seconds,
        r.cpu_seconds * 1e6 / r.events.max(1) as f64,
        r.cpu_seconds * 1e4 / r.events.max(1) as f64,
    );
    if let Some(latency) = r.latency {
        println!("  {name}: {latency}");
    }
    if !r.notes.is_empty() {
        println!("  {name}: {}", r.notes);
    }
    Figures {
        us_per_event: r.cpu_seconds * 1e6 / r.events.max(1) as f64,
        switches_per_event: r.switches_per_event,
        latency: r.latency,
    }
}
