//! Turning [`Update`]s into map operations: translation, coalescing, batching, reconciliation.

use rustc_hash::{FxHashMap, FxHashSet};
use std::net::IpAddr;
use std::time::Duration;

use resolver::{Capture, Enrolment, Role, Update};
use watcher::CgroupId;

use crate::backend::{MapBackend, MapBatch};
use crate::layout::{self, CgroupInfo, PodAddr, Settings};
use crate::ProgramError;

/// The level of an entry found in the maps at start (a previous run's): unknown, so the levels
/// of the previous `settings` stay set while any such entry remains.
const UNKNOWN_LEVEL: u32 = u32::MAX;

/// What the programmer is told by the operator (not by the resolver).
#[derive(Debug, Clone, Default)]
pub struct ProgrammerConfig {
    /// Connect as if not in the mesh when no ztunnel address is known.
    pub fail_open: bool,
    /// Let the programs `bpf_printk` their decisions.
    pub debug: bool,
    /// How updates are gathered into batches and batches into backend calls.
    pub batching: Batching,
}

/// How updates are gathered into batches: the one place for the batch limit and the
/// coalescing window, read by [`Programmer::flush`] and by the agent's programmer thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// After the first update of a burst, how long the agent's programmer thread waits for more
    /// before it flushes. Zero (the default) flushes what is already queued at once: while a
    /// batch is being written the next updates queue up and make the next batch, so batches
    /// grow with the load without delaying a lone enrolment (the first connect of a new pod
    /// races it). A window makes updates of the same cgroup within it one operation, at the
    /// cost of that delay on every enrolment.
    pub window: Duration,
    /// At most this many updates gathered into one flush, and at most this many map
    /// operations in one backend call (one batch syscall per map and kind; a larger flush is
    /// split). 0 means no limit.
    pub max: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            window: Duration::ZERO,
            max: 4096,
        }
    }
}

/// Applies the resolver's updates to a [`MapBackend`].
///
/// Updates are queued with [`Programmer::queue`] and written with [`Programmer::flush`]; within
/// one flush, later updates of the same key replace earlier ones, so an upsert followed by a
/// delete of the same cgroup is one delete.
pub struct Programmer<B: MapBackend> {
    backend: B,
    config: ProgrammerConfig,
    /// Pending writes of cgroup entries: `Some` = upsert, `None` = delete.
    /// Hashed (a burst queues hundreds), and sorted by id when flushed: a batch's order does
    /// not depend on the hash.
    pending: FxHashMap<CgroupId, Option<(CgroupInfo, u32)>>,
    pending_ztunnel: Option<Vec<IpAddr>>,
    /// What is programmed now, by cgroup: the entry and the cgroup's level.
    programmed: FxHashMap<CgroupId, (CgroupInfo, u32)>,
    /// Entries of a previous run that the resolver has not upserted since start: on
    /// [`Update::Synced`] they are removed. It only shrinks: a set of every cgroup upserted
    /// since start, the other way to tell them apart, would grow with every cgroup the node
    /// ever makes.
    unconfirmed: FxHashSet<CgroupId>,
    /// How many ambient entries use each pod address.
    addr_refs: FxHashMap<PodAddr, u32>,
    /// How many entries sit at each cgroup level.
    level_refs: [u32; 32],
    settings: Settings,
    /// What the `settings` map holds (read once at start, then what was written): a flush
    /// writes `settings` only when it differs, with no map read per flush. Its `generation`
    /// is the one read at start, as is `settings`'s: the backend counts the real one.
    settings_in_map: Settings,
    reconcile_pending: bool,
}

impl<B: MapBackend> Programmer<B> {
    /// Starts from what the backend holds now (pinned maps of a previous run).
    pub fn new(backend: B, config: ProgrammerConfig) -> Result<Self, ProgramError> {
        let settings_in_map = backend.settings()?;
        let mut settings = settings_in_map;
        settings.outbound_port = layout::OUTBOUND_PORT;
        settings.inbound_port = layout::INBOUND_PORT;
        Self::set_flag(&mut settings.flags, layout::S_FAIL_OPEN, config.fail_open);
        Self::set_flag(&mut settings.flags, layout::S_DEBUG, config.debug);
        let mut me = Programmer {
            backend,
            config,
            pending: FxHashMap::default(),
            pending_ztunnel: None,
            programmed: FxHashMap::default(),
            unconfirmed: FxHashSet::default(),
            addr_refs: FxHashMap::default(),
            level_refs: [0; 32],
            settings,
            settings_in_map,
            reconcile_pending: false,
        };
        // Entries of a previous run are kept (traffic stays captured) until the resolver has
        // confirmed or replaced them; their levels stay in `settings` meanwhile.
        for (id, info) in me.backend.cgroup_entries()? {
            me.programmed.insert(id, (info, UNKNOWN_LEVEL));
            me.unconfirmed.insert(id);
            // Their addresses are held by them until they are released or replaced.
            if captured_inbound_by_ztunnel_node(&info) {
                for ip in info.ips() {
                    *me.addr_refs.entry(PodAddr::from(ip)).or_insert(0) += 1;
                }
            }
        }
        Ok(me)
    }

    fn set_flag(flags: &mut u32, bit: u32, on: bool) {
        if on {
            *flags |= bit;
        } else {
            *flags &= !bit;
        }
    }

    /// The backend, for inspection (replay output, tests).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn config(&self) -> &ProgrammerConfig {
        &self.config
    }

    /// How updates are gathered before [`Programmer::flush`].
    pub fn batching(&self) -> Batching {
        self.config.batching
    }

    /// The backend, mutably (tests and benchmarks switch its mode).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// How many updates wait for the next flush.
    pub fn pending_len(&self) -> usize {
        self.pending.len() + usize::from(self.pending_ztunnel.is_some())
    }

    /// How many entries `cgroup_info_map` holds as of the last flush (including entries of a
    /// previous run not yet reconciled), without reading the map.
    pub fn entry_count(&self) -> usize {
        self.programmed.len()
    }

    /// Queues one update; nothing is written until [`Programmer::flush`].
    pub fn queue(&mut self, update: &Update) {
        match update {
            Update::Upsert(enrolment) => {
                self.unconfirmed.remove(&enrolment.cgroup_id);
                let info = entry_of(enrolment);
                self.pending.insert(
                    enrolment.cgroup_id,
                    Some((info, level_of(&enrolment.cgroup))),
                );
            }
            Update::Delete { cgroup_id } => {
                self.pending.insert(*cgroup_id, None);
            }
            Update::SetZtunnel { ips } => self.pending_ztunnel = Some(ips.clone()),
            Update::Synced => self.reconcile_pending = true,
        }
    }

    /// Writes everything queued: one backend call per [`Batching::max`] operations.
    pub fn flush(&mut self) -> Result<(), ProgramError> {
        let mut stale_addrs = Vec::new();
        if self.reconcile_pending {
            // Addresses in the map that no entry holds (left by a previous run).
            for (addr, _) in self.backend.addr_entries()? {
                if !self.addr_refs.contains_key(&addr) {
                    stale_addrs.push(addr);
                }
            }
            self.reconcile_pending = false;
            // Every entry left is this run's from now on: the set is done with.
            for id in std::mem::take(&mut self.unconfirmed) {
                if self.programmed.contains_key(&id) && !self.pending.contains_key(&id) {
                    self.pending.insert(id, None);
                }
            }
        }
        let mut batch = MapBatch {
            addr_deletes: stale_addrs,
            ..MapBatch::default()
        };
        let mut settings = self.settings;
        let mut pending: Vec<_> = self.pending.drain().collect();
        pending.sort_unstable_by_key(|(id, _)| *id);
        // Each list grows once, not by doubling over a burst.
        batch.cgroup_upserts.reserve(pending.len());
        for (id, write) in pending {
            let old = self.programmed.remove(&id);
            if let Some((old_info, old_level)) = old {
                self.release(&old_info, old_level, &mut batch);
            }
            match write {
                Some((info, level)) => {
                    self.retain(&info, level, &mut batch);
                    self.programmed.insert(id, (info, level));
                    batch.cgroup_upserts.push((id, info));
                }
                None => {
                    if old.is_some() {
                        batch.cgroup_deletes.push(id);
                    }
                }
            }
        }
        settings.levels = self.levels_mask();
        if let Some(ips) = self.pending_ztunnel.take() {
            let left_out = settings.set_ztunnel_ips(&ips);
            if !left_out.is_empty() {
                log::warn!(
                    "ztunnel has more than {} addresses of a family: {} not used for capture",
                    layout::MAX_ZTUNNEL_ADDRS,
                    left_out
                        .iter()
                        .map(IpAddr::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        if settings != self.settings_in_map {
            batch.settings = Some(settings);
        }
        // Dedupe address operations: an address released and retained in one batch stays.
        // (A set: a burst such as a namespace flipped back and forth within one batch has
        // hundreds of each.)
        if !batch.addr_deletes.is_empty() && !batch.addr_upserts.is_empty() {
            let retained: FxHashSet<PodAddr> = batch.addr_upserts.iter().map(|(u, _)| *u).collect();
            batch.addr_deletes.retain(|a| !retained.contains(a));
        }
        if batch.is_empty() {
            return Ok(());
        }
        for chunk in split_batch(batch, self.config.batching.max) {
            self.backend.apply(&chunk)?;
        }
        self.settings = settings;
        self.settings_in_map = settings;
        Ok(())
    }

    fn levels_mask(&self) -> u32 {
        let mut mask = 0;
        for (level, refs) in self.level_refs.iter().enumerate() {
            if *refs > 0 {
                mask |= 1 << level;
            }
        }
        // Entries left by a previous run whose level is unknown keep the old levels visible.
        if self
            .programmed
            .values()
            .any(|(_, level)| *level == UNKNOWN_LEVEL)
        {
            mask |= self.settings.levels;
        }
        mask
    }

    fn retain(&mut self, info: &CgroupInfo, level: u32, batch: &mut MapBatch) {
        if let Some(refs) = self.level_refs.get_mut(level as usize) {
            *refs += 1;
        }
        if captured_inbound_by_ztunnel_node(info) {
            for ip in info.addresses() {
                let addr = PodAddr::from(ip);
                let refs = self.addr_refs.entry(addr).or_insert(0);
                *refs += 1;
                if *refs == 1 {
                    batch.addr_upserts.push((addr, info.flags));
                }
            }
        }
    }

    fn release(&mut self, info: &CgroupInfo, level: u32, batch: &mut MapBatch) {
        if let Some(refs) = self.level_refs.get_mut(level as usize) {
            *refs = refs.saturating_sub(1);
        }
        if captured_inbound_by_ztunnel_node(info) {
            for ip in info.addresses() {
                let addr = PodAddr::from(ip);
                if let Some(refs) = self.addr_refs.get_mut(&addr) {
                    *refs -= 1;
                    if *refs == 0 {
                        self.addr_refs.remove(&addr);
                        batch.addr_deletes.push(addr);
                    }
                }
            }
        }
    }
}

/// Splits a batch into batches of at most `max` operations, in the order the backend applies
/// them (cgroup deletes, cgroup upserts, address deletes, address upserts); `settings` rides
/// with the last. A key appears once per list, so the split keeps the outcome.
pub fn split_batch(batch: MapBatch, max: usize) -> Vec<MapBatch> {
    let total = batch.cgroup_deletes.len()
        + batch.cgroup_upserts.len()
        + batch.addr_deletes.len()
        + batch.addr_upserts.len();
    if max == 0 || total <= max {
        return vec![batch];
    }
    let MapBatch {
        cgroup_upserts,
        cgroup_deletes,
        addr_upserts,
        addr_deletes,
        settings,
    } = batch;
    let mut out = vec![MapBatch::default()];
    let mut room = max;
    fn next(out: &mut Vec<MapBatch>, room: &mut usize, max: usize) {
        if *room == 0 {
            out.push(MapBatch::default());
            *room = max;
        }
        *room -= 1;
    }
    for id in cgroup_deletes {
        next(&mut out, &mut room, max);
        out.last_mut().expect("non-empty").cgroup_deletes.push(id);
    }
    for entry in cgroup_upserts {
        next(&mut out, &mut room, max);
        out.last_mut()
            .expect("non-empty")
            .cgroup_upserts
            .push(entry);
    }
    for addr in addr_deletes {
        next(&mut out, &mut room, max);
        out.last_mut().expect("non-empty").addr_deletes.push(addr);
    }
    for entry in addr_upserts {
        next(&mut out, &mut room, max);
        out.last_mut().expect("non-empty").addr_upserts.push(entry);
    }
    out.last_mut().expect("non-empty").settings = settings;
    out
}

/// The level of a cgroup path: `/` is 0, `/a` is 1, `/a/b` is 2.
pub fn level_of(path: &str) -> u32 {
    // Non-empty components, counted by their first byte (one that is not `/` and follows a
    // `/` or the start), as a sum over the byte pairs without a branch: this runs on every
    // queued upsert, and the paths are long.
    let bytes = path.as_bytes();
    let Some(&first) = bytes.first() else {
        return 0;
    };
    let (before, after) = (&bytes[..bytes.len() - 1], &bytes[1..]);
    let mut level = u32::from(first != b'/');
    // Counted in blocks whose count fits a byte: the compiler counts many pairs at once.
    for (before, after) in before.chunks(255).zip(after.chunks(255)) {
        let mut block: u8 = 0;
        for (prev, byte) in before.iter().zip(after) {
            block += u8::from((*prev == b'/') & (*byte != b'/'));
        }
        level += u32::from(block);
    }
    level
}

/// Whether an entry's addresses go to `pod_addr_map`, whose pods a host process's connect
/// sends to ztunnel's inbound port on ztunnel's own address: node-mode ambient pods only. An
/// in-pod pod's inbound is captured in its own namespace (`crate::inpod`), and host traffic
/// to it reaches it directly, as with Istio.
fn captured_inbound_by_ztunnel_node(info: &CgroupInfo) -> bool {
    info.flags & layout::F_AMBIENT != 0 && info.flags & layout::F_INPOD == 0
}

/// The map entry for an enrolment.
pub fn entry_of(enrolment: &Enrolment) -> CgroupInfo {
    let mut info = CgroupInfo {
        flags: match enrolment.role {
            Role::Ambient => layout::F_AMBIENT,
            Role::Ztunnel => layout::F_ZTUNNEL,
            Role::Exempt => layout::F_EXEMPT,
            Role::None => 0,
        },
        ..CgroupInfo::default()
    };
    if let (Role::Ambient, Capture::InPod { dns }) = (enrolment.role, enrolment.capture) {
        info.flags |= layout::F_INPOD;
        if dns {
            info.flags |= layout::F_DNS;
        }
    }
    if let Some(v4) = enrolment.ips.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    }) {
        info.flags |= layout::F_HAS_V4;
        info.addr4 = u32::from(v4).to_be();
    }
    if let Some(v6) = enrolment.ips.iter().find_map(|ip| match ip {
        IpAddr::V6(v6) => Some(*v6),
        IpAddr::V4(_) => None,
    }) {
        info.flags |= layout::F_HAS_V6;
        info.addr6 = v6.octets();
    }
    info
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use super::*;
    use crate::memory::MemoryBackend;

    #[test]
    fn level_counts_the_non_empty_components() {
        for (path, level) in [
            ("/", 0),
            ("", 0),
            ("/a", 1),
            ("a", 1),
            ("/a/b", 2),
            ("/a/b/", 2),
            ("//a///bc//d", 3),
            (
                "/kubepods.slice/kubepods-pod1.slice/cri-containerd-1.scope",
                3,
            ),
        ] {
            assert_eq!(level_of(path), level, "{path:?}");
        }
        // Long paths (more than one block of the count), against counting the components.
        let long = [
            "/a".repeat(300),
            format!("{}/{}", "x".repeat(254), "/y".repeat(200)),
            format!("//{}//", "ab/".repeat(170)),
            "/".repeat(600),
            format!("{}z", "/".repeat(255)),
        ];
        for path in &long {
            let components = path.split('/').filter(|c| !c.is_empty()).count() as u32;
            assert_eq!(level_of(path), components, "{path:?}");
        }
    }

    fn upsert(id: u64, ip: &str) -> Update {
        Update::Upsert(Arc::new(Enrolment {
            cgroup_id: CgroupId(id),
            cgroup: format!("/kubepods/pod{id}").into(),
            pod: Some(format!("ns/p{id}")),
            role: Role::Ambient,
            ips: vec![ip.parse().unwrap()],
            capture: Default::default(),
            identity: None,
        }))
    }

    #[test]
    fn a_flush_larger_than_the_batch_limit_is_split_and_lands_whole() {
        let config = ProgrammerConfig {
            batching: Batching {
                max: 3,
                ..Batching::default()
            },
            ..ProgrammerConfig::default()
        };
        let mut p = Programmer::new(MemoryBackend::default(), config).unwrap();
        for i in 0..5 {
            p.queue(&upsert(i, &format!("10.0.0.{i}")));
        }
        p.flush().unwrap();
        // 5 cgroup upserts + 5 address upserts = 10 operations: 4 backend calls of <= 3.
        assert_eq!(p.backend().batches, 4);
        assert_eq!(p.backend().cgroups.len(), 5);
        assert_eq!(p.backend().addrs.len(), 5);
        assert_eq!(p.backend().settings.levels, 1 << 2);
    }

    #[test]
    fn synced_removes_unconfirmed_entries_and_the_addresses_only_they_held() {
        let mut first =
            Programmer::new(MemoryBackend::default(), ProgrammerConfig::default()).unwrap();
        first.queue(&upsert(1, "10.0.0.1"));
        first.queue(&upsert(2, "10.0.0.2"));
        first.flush().unwrap();
        let mut previous = first.backend().clone();
        // An address no entry holds (a previous run crashed between the two writes).
        previous
            .addrs
            .insert(PodAddr::from("10.0.0.9".parse::<IpAddr>().unwrap()), 1);

        let mut second = Programmer::new(previous, ProgrammerConfig::default()).unwrap();
        second.queue(&upsert(1, "10.0.0.1"));
        second.queue(&Update::Synced);
        second.flush().unwrap();
        assert_eq!(
            second.backend().cgroups.keys().copied().collect::<Vec<_>>(),
            vec![CgroupId(1)]
        );
        assert_eq!(
            second
                .backend()
                .addrs
                .keys()
                .map(PodAddr::ip)
                .collect::<Vec<_>>(),
            vec!["10.0.0.1".parse::<IpAddr>().unwrap()]
        );
    }

    /// What the programmer holds per cgroup, in all its maps and sets.
    fn per_cgroup_state(p: &Programmer<MemoryBackend>) -> usize {
        p.programmed.len() + p.pending.len() + p.unconfirmed.len()
    }

    #[test]
    fn cgroups_made_and_removed_leave_nothing_behind() {
        // A previous run's entry, and churn before and after the first full picture: each
        // cycle a new cgroup (ids are never reused) enrolled, then removed.
        let mut first =
            Programmer::new(MemoryBackend::default(), ProgrammerConfig::default()).unwrap();
        first.queue(&upsert(1, "10.0.0.1"));
        first.flush().unwrap();
        let mut p = Programmer::new(first.backend().clone(), ProgrammerConfig::default()).unwrap();
        p.queue(&upsert(1, "10.0.0.1"));
        let cycle = |p: &mut Programmer<MemoryBackend>, id: u64| {
            p.queue(&upsert(id, "10.0.1.1"));
            p.flush().unwrap();
            p.queue(&Update::Delete {
                cgroup_id: CgroupId(id),
            });
            p.flush().unwrap();
        };
        for id in 100..1_100 {
            cycle(&mut p, id);
        }
        p.queue(&Update::Synced);
        p.flush().unwrap();
        for id in 10_000..20_000 {
            cycle(&mut p, id);
        }
        assert_eq!(p.backend().cgroups.len(), 1);
        assert_eq!(per_cgroup_state(&p), 1, "only the one entry there is");
    }

    #[test]
    fn ztunnel_addresses_are_kept_in_order_up_to_four_per_family() {
        let mut p = Programmer::new(MemoryBackend::default(), ProgrammerConfig::default()).unwrap();
        let ips: Vec<IpAddr> = [
            "10.99.0.1",
            "fd00::1",
            "10.99.0.2",
            "10.99.0.1",
            "10.99.0.3",
            "10.99.0.4",
            "10.99.0.5",
            "fd00::2",
        ]
        .iter()
        .map(|ip| ip.parse().unwrap())
        .collect();
        p.queue(&Update::SetZtunnel { ips });
        p.flush().unwrap();
        let settings = p.backend().settings;
        let want: Vec<IpAddr> = [
            "10.99.0.1",
            "10.99.0.2",
            "10.99.0.3",
            "10.99.0.4",
            "fd00::1",
            "fd00::2",
        ]
        .iter()
        .map(|ip| ip.parse().unwrap())
        .collect();
        assert_eq!(settings.ztunnel_ips(), want);
        assert_eq!((settings.ztunnel_count4, settings.ztunnel_count6), (4, 2));
        assert_eq!(
            settings.flags & (layout::S_HAS_ZTUNNEL4 | layout::S_HAS_ZTUNNEL6),
            layout::S_HAS_ZTUNNEL4 | layout::S_HAS_ZTUNNEL6
        );

        // Down to one v6 address: the v4 ones and the second v6 one are gone.
        p.queue(&Update::SetZtunnel {
            ips: vec!["fd00::2".parse().unwrap()],
        });
        p.flush().unwrap();
        let settings = p.backend().settings;
        assert_eq!(
            settings.ztunnel_ips(),
            vec!["fd00::2".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(settings.flags & layout::S_HAS_ZTUNNEL4, 0);
        assert_eq!(settings.ztunnel_addr4, [0; layout::MAX_ZTUNNEL_ADDRS]);
        assert_eq!(settings.ztunnel_addr6[1], [0; 16]);
    }

    #[test]
    fn each_destination_keeps_one_ztunnel_address_and_both_are_used() {
        let mut settings = Settings::default();
        let (a, b): (IpAddr, IpAddr) = ("10.99.0.1".parse().unwrap(), "10.99.0.2".parse().unwrap());
        settings.set_ztunnel_ips(&[a, b]);
        let mut seen = BTreeSet::new();
        for i in 1..=20u8 {
            let dst: std::net::SocketAddr = format!("10.96.1.{i}:80").parse().unwrap();
            let picked = settings.ztunnel_for(dst).unwrap();
            assert!(picked == a || picked == b);
            // The same destination, asked again or through a dual-stack socket.
            assert_eq!(settings.ztunnel_for(dst), Some(picked));
            let mapped: std::net::SocketAddr = format!("[::ffff:10.96.1.{i}]:80").parse().unwrap();
            assert_eq!(settings.ztunnel_for(mapped), Some(picked));
            seen.insert(picked);
        }
        assert_eq!(seen.len(), 2, "20 destinations all on one address");
        // No IPv6 address: no choice for an IPv6 destination.
        assert_eq!(settings.ztunnel_for("[fd00::5]:80".parse().unwrap()), None);
    }
}
