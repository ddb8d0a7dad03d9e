//! The agent's metrics: what the stages count and set, and their OpenMetrics exposition.

use std::sync::Arc;
use std::time::Duration;

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

/// The points an enrolment passes between the kernel's exec and the map write, for
/// `zbridge_enrolment_stage_seconds{stage=...}`: each is observed as the time from the exec's
/// kernel timestamp until the enrolment got there, so the difference between two stages is
/// the time spent between them (waiting in a channel, or the stage's own work). The watcher's
/// part, which comes before anyone knows whether an exec enrols, is
/// `zbridge_exec_delivery_seconds`; the end is `zbridge_enrolment_latency_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EnrolmentStage {
    /// The resolver took the exec from its input channel.
    ResolverReceived,
    /// The resolver decided: the exec's cgroup gets an entry.
    Decided,
    /// The programmer took the update from its channel.
    ProgrammerReceived,
}

impl EnrolmentStage {
    /// Every stage, in the order an enrolment passes them (the order of
    /// `Metrics::enrolment_stages`).
    pub const ALL: [EnrolmentStage; 3] = [
        EnrolmentStage::ResolverReceived,
        EnrolmentStage::Decided,
        EnrolmentStage::ProgrammerReceived,
    ];

    /// The value of the `stage` label.
    pub fn as_str(self) -> &'static str {
        match self {
            EnrolmentStage::ResolverReceived => "resolver_received",
            EnrolmentStage::Decided => "decided",
            EnrolmentStage::ProgrammerReceived => "programmer_received",
        }
    }
}

/// The states of `zbridge_zds_pods{state=...}`.
const ZDS_POD_STATES: [zds::PodState; 4] = [
    zds::PodState::Pending,
    zds::PodState::Sent,
    zds::PodState::Acked,
    zds::PodState::Error,
];

/// The types of `zbridge_zds_total{type=...}`.
const ZDS_EVENTS: [&str; 8] = [
    "connection",
    "add",
    "keep",
    "del",
    "ack",
    "nack",
    "netns_error",
    "peer_error",
];

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
/// newer kernel), and events dropped because a rescan after a loss superseded them; the
/// coalescing windows slept under a storm, and those the exec tap's doorbell ended (a first
/// exec in a cgroup came).
pub const WATCHER_COUNTERS: [&str; 10] = [
    "execs_from_tap",
    "execs_from_proc",
    "execs_without_facts",
    "exec_tap_dropped",
    "exec_tap_unmatched",
    "proc_messages_malformed",
    "proc_event_types_unknown",
    "events_superseded_by_rescan",
    "coalescing_windows",
    "coalescing_windows_ended_by_doorbell",
];

/// The buckets of the enrolment's histograms: 10 µs .. 10.5 s from the kernel's exec timestamp,
/// fine enough at the bottom to tell whether an enrolment took less than 100 µs.
fn enrolment_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(1e-5, 2.0, 21)
}

/// Seconds from `from_ns` to `to_ns` (both CLOCK_MONOTONIC); `None` when `from_ns` is later
/// (a recording's `ts`, not a kernel time), which is not a latency.
fn seconds_between(from_ns: u64, to_ns: u64) -> Option<f64> {
    to_ns
        .checked_sub(from_ns)
        .map(|ns| Duration::from_nanos(ns).as_secs_f64())
}

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
    /// The `zbridge_enrolment_stage_seconds` series, in [`EnrolmentStage::ALL`] order.
    enrolment_stages: [Histogram; 3],
    exec_delivery_seconds: Histogram,
    inpod_enrolment_latency_seconds: Histogram,
    inpod_enrolment_failures: Counter,
    zds_connected: Gauge,
    zds_pods: Family<Label, Gauge>,
    zds_events: Family<Label, Counter>,
    /// The ZDS counters last exported, so that each export adds only what is new.
    zds_last: Arc<std::sync::Mutex<zds::Counters>>,
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
        let enrolment_latency_seconds = Histogram::new(enrolment_buckets());
        let enrolment_stage_seconds =
            Family::<Label, Histogram, fn() -> Histogram>::new_with_constructor(|| {
                Histogram::new(enrolment_buckets())
            });
        let enrolment_stages = EnrolmentStage::ALL.map(|stage| {
            enrolment_stage_seconds
                .get_or_create(&[("stage", stage.as_str())])
                .clone()
        });
        let exec_delivery_seconds = Histogram::new(enrolment_buckets());
        // 100 µs .. 13 s from the exec to the entry written after ztunnel's ack: this span holds
        // a round trip to ztunnel over ZDS, so buckets below 100 µs would stay empty.
        let inpod_enrolment_latency_seconds = Histogram::new(exponential_buckets(1e-4, 2.0, 18));
        let inpod_enrolment_failures = Counter::default();
        let zds_connected = Gauge::default();
        let zds_pods = Family::<Label, Gauge>::default();
        let zds_events = Family::<Label, Counter>::default();
        for state in ZDS_POD_STATES {
            let _ = zds_pods.get_or_create(&[("state", state.as_str())]);
        }
        for kind in ZDS_EVENTS {
            let _ = zds_events.get_or_create(&[("type", kind)]);
        }
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
        registry.register_with_unit(
            "enrolment_stage",
            "From the kernel's exec timestamp until an enrolment reached a stage: the resolver \
             took the exec, decided, the programmer took the update (the map write is \
             zbridge_enrolment_latency_seconds)",
            Unit::Seconds,
            enrolment_stage_seconds,
        );
        registry.register_with_unit(
            "exec_delivery",
            "From the kernel's exec timestamp until the watcher has the exec and its facts, \
             every exec",
            Unit::Seconds,
            exec_delivery_seconds.clone(),
        );
        registry.register_with_unit(
            "inpod_enrolment_latency",
            "In-pod pods: from the kernel's exec timestamp until ztunnel serves the pod (acked \
             it over ZDS, and its namespace was enrolled)",
            Unit::Seconds,
            inpod_enrolment_latency_seconds.clone(),
        );
        registry.register(
            "inpod_enrolment_failures",
            "In-pod pods: enrolments of a pod ztunnel serves that failed in the kernel (each is \
             tried again, and logged with its pod and cause)",
            inpod_enrolment_failures.clone(),
        );
        registry.register(
            "zds_connected",
            "1 while a ztunnel is connected to the ZDS socket and has said hello",
            zds_connected.clone(),
        );
        registry.register(
            "zds_pods",
            "In-pod pods by ZDS state: pending (not sent to the connected ztunnel yet), sent \
             (no answer yet), acked, error (refused by ztunnel, or no network namespace yet)",
            zds_pods.clone(),
        );
        registry.register(
            "zds",
            "ZDS: connections from ztunnel, adds and dels sent, acks, refusals (nacks), pods \
             whose namespace could not be opened, connections dropped for a protocol error or \
             a timeout",
            zds_events.clone(),
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
            enrolment_stages,
            exec_delivery_seconds,
            inpod_enrolment_latency_seconds,
            inpod_enrolment_failures,
            zds_connected,
            zds_pods,
            zds_events,
            zds_last: Arc::default(),
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

    /// An enrolment written at `written_ns` for an exec the kernel stamped `exec_ts_ns` (both
    /// CLOCK_MONOTONIC, the proc connector's clock). An exec stamped after the write (a
    /// recording's `ts`, not a kernel time) is not a latency and is not observed; so for every
    /// `observe_*_between` and `_since` below.
    pub fn observe_enrolment_between(&self, exec_ts_ns: u64, written_ns: u64) {
        if let Some(seconds) = seconds_between(exec_ts_ns, written_ns) {
            self.enrolment_latency_seconds.observe(seconds);
        }
    }

    /// An enrolment, caused by an exec the kernel stamped `exec_ts_ns`, reached `stage` at
    /// `at_ns`.
    pub fn observe_enrolment_stage_between(
        &self,
        stage: EnrolmentStage,
        exec_ts_ns: u64,
        at_ns: u64,
    ) {
        if let Some(seconds) = seconds_between(exec_ts_ns, at_ns) {
            self.enrolment_stages[stage as usize].observe(seconds);
        }
    }

    /// As [`Metrics::observe_enrolment_stage_between`], reached now.
    pub fn observe_enrolment_stage_since(&self, stage: EnrolmentStage, exec_ts_ns: u64) {
        self.observe_enrolment_stage_between(stage, exec_ts_ns, watcher::live::monotonic_now_ns());
    }

    /// The watcher has now an exec the kernel stamped `exec_ts_ns`, with its facts.
    pub fn observe_exec_delivery_since(&self, exec_ts_ns: u64) {
        if let Some(seconds) = seconds_between(exec_ts_ns, watcher::live::monotonic_now_ns()) {
            self.exec_delivery_seconds.observe(seconds);
        }
    }

    /// An in-pod pod served by ztunnel at `served_ns` (acked, its namespace enrolled), whose
    /// first exec the kernel stamped `exec_ts_ns`.
    pub fn observe_inpod_enrolment_between(&self, exec_ts_ns: u64, served_ns: u64) {
        if let Some(seconds) = seconds_between(exec_ts_ns, served_ns) {
            self.inpod_enrolment_latency_seconds.observe(seconds);
        }
    }

    /// The enrolment of an in-pod pod failed in the kernel.
    pub fn inpod_enrolment_failed(&self) {
        self.inpod_enrolment_failures.inc();
    }

    /// The ZDS server's state: connection, pods by state, and what happened since the last
    /// export.
    pub fn set_zds(&self, status: &zds::Status) {
        self.zds_connected
            .set(i64::from(status.ztunnel_pid.is_some()));
        for state in ZDS_POD_STATES {
            let n = status.pods.values().filter(|p| p.state == state).count();
            self.zds_pods
                .get_or_create(&[("state", state.as_str())])
                .set(n as i64);
        }
        let mut last = self.zds_last.lock().expect("zds metrics lock");
        let (now, then) = (status.counters, *last);
        for (kind, new, old) in [
            ("connection", now.connections, then.connections),
            ("add", now.adds, then.adds),
            ("keep", now.keeps, then.keeps),
            ("del", now.dels, then.dels),
            ("ack", now.acks, then.acks),
            ("nack", now.nacks, then.nacks),
            ("netns_error", now.netns_errors, then.netns_errors),
            ("peer_error", now.peer_errors, then.peer_errors),
        ] {
            self.zds_events
                .get_or_create(&[("type", kind)])
                .inc_by(new.saturating_sub(old));
        }
        *last = now;
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
            c.coalescing_windows,
            c.windows_ended_by_doorbell,
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
