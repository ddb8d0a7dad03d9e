//! Loading the object, checking pinned maps against it, attaching the programs to a cgroup as
//! pinned links, and removing all of it again ([`detach`]). Where the pins go, and who may
//! write there: [`crate::pins`].
//!
//! A pinned map is reused only when its type, key size, value size and max entries are what
//! the object wants (aya would reuse it without looking); otherwise it is removed and created
//! afresh, and the report says so. Pinned links keep the programs attached while no agent
//! runs; on the next start they are re-pointed at the newly loaded programs in place
//! (`BPF_LINK_UPDATE`), so redirection never stops.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::MapInfo;
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, CgroupSockopt, SockOps};
use aya::{Ebpf, EbpfLoader};

use crate::kernel_maps::KernelMaps;
use crate::layout::{self, Counters};
use crate::object::{self, MapSpec, ProgramKind};
use crate::pins::{self, links_dir, map_io_error, maps_dir};
use crate::sys;
use crate::ProgramError;

/// Where and how to load.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// The object; `None`: the one embedded in the binary ([`object::OBJECT`]).
    pub object: Option<Vec<u8>>,
    /// The base pin directory on a bpffs (e.g. `/sys/fs/bpf/zbridge`); the layout version's
    /// subdirectory is made under it.
    pub pin_dir: PathBuf,
    /// The cgroup directory the programs attach to (the cgroup2 root for a node agent).
    pub attach_cgroup: PathBuf,
    /// Size of `cgroup_info_map` and `pod_addr_map`.
    pub max_entries: u32,
}

impl LoaderConfig {
    /// The embedded object, default sizes.
    pub fn new(pin_dir: impl Into<PathBuf>, attach_cgroup: impl Into<PathBuf>) -> Self {
        LoaderConfig {
            object: None,
            pin_dir: pin_dir.into(),
            attach_cgroup: attach_cgroup.into(),
            max_entries: layout::DEFAULT_MAX_ENTRIES,
        }
    }
}

/// What loading found and did, for the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Maps reused from the pin directory, with their entries.
    pub maps_reused: Vec<String>,
    /// Pinned maps whose layout differed from the object's, one message each (removed and
    /// created afresh).
    pub maps_recreated: Vec<String>,
    /// Programs attached with a new link.
    pub links_created: Vec<String>,
    /// Programs whose pinned link was re-pointed at the new program.
    pub links_updated: Vec<String>,
    /// Pin directories of other layout versions, removed (their links detached).
    pub old_versions_removed: Vec<PathBuf>,
}

/// The loaded object with its programs attached. Dropping it leaves everything pinned and
/// attached; [`detach`] removes it.
pub struct Loaded {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    attach_cgroup: PathBuf,
    report: LoadReport,
}

/// Checks each pinned map against the object; removes those that differ. Returns the messages
/// for the removed ones.
fn check_pinned_maps(
    maps_dir: &Path,
    specs: &BTreeMap<String, MapSpec>,
) -> Result<(Vec<String>, Vec<String>), ProgramError> {
    let mut reused = Vec::new();
    let mut recreated = Vec::new();
    for (name, want) in specs {
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        let found = MapInfo::from_pin(&path).map_err(map_io_error);
        let problem = match found {
            Err(e) => Some(format!("cannot be read ({e})")),
            Ok(info) => {
                let mut diffs = Vec::new();
                let mut diff = |what: &str, has: u32, wants: u32| {
                    if has != wants {
                        diffs.push(format!("{what} {has}, object wants {wants}"));
                    }
                };
                // aya knows every type the object has; an unknown one differs anyway.
                let map_type = info.map_type().map_or(u32::MAX, |t| t as u32);
                diff("type", map_type, want.map_type);
                diff("key size", info.key_size(), want.key_size);
                diff("value size", info.value_size(), want.value_size);
                diff("max entries", info.max_entries(), want.max_entries);
                diff("flags", info.map_flags(), want.map_flags);
                (!diffs.is_empty()).then(|| format!("has {}", diffs.join(", ")))
            }
        };
        match problem {
            None => reused.push(name.clone()),
            Some(problem) => {
                std::fs::remove_file(&path)
                    .map_err(|e| ProgramError::path(&path, "remove mismatched map", e))?;
                let msg = format!(
                    "map `{name}`: pinned at {} {problem}: recreated",
                    path.display()
                );
                log::warn!("{msg}");
                recreated.push(msg);
            }
        }
    }
    forget_caches_of_a_new_settings_map(maps_dir, &mut reused, &mut recreated)?;
    Ok((reused, recreated))
}

/// The thread records (`orig_dst_by_task`) cache cgroup entries under
/// `settings.generation`. A `settings` map created afresh (recreated above, or its pin gone)
/// starts its generation again at 0, where a cache made under the old map could match: the
/// thread records are not reused then either.
fn forget_caches_of_a_new_settings_map(
    maps_dir: &Path,
    reused: &mut Vec<String>,
    recreated: &mut Vec<String>,
) -> Result<(), ProgramError> {
    if reused.iter().any(|n| n == layout::SETTINGS_MAP) {
        return Ok(());
    }
    let Some(pos) = reused
        .iter()
        .position(|n| n == layout::ORIG_DST_BY_TASK_MAP)
    else {
        return Ok(());
    };
    reused.remove(pos);
    let path = maps_dir.join(layout::ORIG_DST_BY_TASK_MAP);
    std::fs::remove_file(&path)
        .map_err(|e| ProgramError::path(&path, "remove thread records", e))?;
    let msg = format!(
        "map `{}`: pinned at {} holds decisions cached under the `{}` map that is no longer \
         pinned: recreated",
        layout::ORIG_DST_BY_TASK_MAP,
        path.display(),
        layout::SETTINGS_MAP
    );
    log::warn!("{msg}");
    recreated.push(msg);
    Ok(())
}

/// An aya error with its causes: its own message leaves out the kernel's (EPERM, say).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text.push_str(&format!(": {c_text}"));
        }
        cause = c.source();
    }
    text
}

pub(crate) fn load_error(program: &str, e: aya::programs::ProgramError) -> ProgramError {
    let detail = match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            // The verifier's conclusion is at the end of its log.
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log.lines().rev().take(12).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!("verifier rejected: {io_error}:\n{}", tail.join("\n"))
        }
        other => format!("load failed: {}", error_chain(&other)),
    };
    ProgramError::Program {
        program: program.to_string(),
        detail,
    }
}

impl Loaded {
    /// Loads the object, checks and pins its maps, loads every program and attaches it to
    /// `attach_cgroup` as a pinned link (or re-points the pinned link of a previous run).
    pub fn load_and_attach(config: LoaderConfig) -> Result<Loaded, ProgramError> {
        let bytes: &[u8] = config.object.as_deref().unwrap_or(object::OBJECT);
        let cgroup = std::fs::File::open(&config.attach_cgroup)
            .map_err(|e| ProgramError::path(&config.attach_cgroup, "open cgroup", e))?;
        let cgroup_id = cgroup
            .metadata()
            .map_err(|e| ProgramError::path(&config.attach_cgroup, "stat cgroup", e))?
            .ino();

        pins::prepare_pin_dir(&config.pin_dir)?;
        let maps_dir = maps_dir(&config.pin_dir);
        let links_dir = links_dir(&config.pin_dir);

        let mut specs = object::map_specs(bytes)?;
        for name in [layout::CGROUP_INFO_MAP, layout::POD_ADDR_MAP] {
            match specs.get_mut(name) {
                Some(spec) => spec.max_entries = config.max_entries,
                None => {
                    return Err(ProgramError::Object(format!("has no map `{name}`")));
                }
            }
        }
        let (maps_reused, maps_recreated) = check_pinned_maps(&maps_dir, &specs)?;

        let pin_paths: Vec<(String, PathBuf)> = specs
            .keys()
            .map(|name| (name.clone(), maps_dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        // aya 0.14 has no typed wrapper for TASK_STORAGE (`orig_dst_by_task`); the map is
        // created, pinned and used by the programs all the same.
        loader.allow_unsupported_maps();
        for (name, path) in &pin_paths {
            loader.map_pin_path(name.as_str(), path.as_path());
        }
        loader
            .map_max_entries(layout::CGROUP_INFO_MAP, config.max_entries)
            .map_max_entries(layout::POD_ADDR_MAP, config.max_entries);
        let mut ebpf = loader
            .load(bytes)
            .map_err(|e| ProgramError::Object(format!("load: {e}")))?;

        let mut report = LoadReport {
            maps_reused,
            maps_recreated,
            ..LoadReport::default()
        };
        for (name, kind, attach_type) in object::PROGRAMS {
            let link_path = links_dir.join(name);
            let attach_err = |detail: String| ProgramError::Attach {
                program: name.to_string(),
                cgroup: config.attach_cgroup.clone(),
                detail,
            };
            let program = ebpf
                .program_mut(name)
                .ok_or_else(|| ProgramError::Object(format!("has no program `{name}`")))?;
            // Loads the program, then re-points its pinned link at it or attaches it with a new
            // pinned link: through aya where aya can pin the link, by `BPF_LINK_CREATE`
            // otherwise.
            macro_rules! load_attach {
                ($ty:ty, $new_link:ident) => {{
                    let prog: &mut $ty = program.try_into().map_err(|e| load_error(name, e))?;
                    prog.load().map_err(|e| load_error(name, e))?;
                    let prog_fd = prog.fd().map_err(|e| load_error(name, e))?;
                    if reuse_link(&link_path, cgroup_id, prog_fd.as_fd()).map_err(attach_err)? {
                        report.links_updated.push(name.to_string());
                    } else {
                        load_attach!(@$new_link prog);
                        report.links_created.push(name.to_string());
                    }
                }};
                (@aya $prog:ident) => {{
                    let id = $prog
                        .attach(&cgroup, CgroupAttachMode::Single)
                        .map_err(|e| attach_err(format!("attach: {}", error_chain(&e))))?;
                    let link: FdLink = $prog
                        .take_link(id)
                        .map_err(|e| attach_err(format!("take link: {}", error_chain(&e))))?
                        .try_into()
                        .map_err(|e| attach_err(format!("link: {}", error_chain(&e))))?;
                    link.pin(&link_path).map_err(|e| {
                        attach_err(format!(
                            "pin link at {}: {}",
                            link_path.display(),
                            error_chain(&e)
                        ))
                    })?;
                }};
                (@raw $prog:ident) => {{
                    let prog_fd = $prog.fd().map_err(|e| load_error(name, e))?;
                    let link = sys::link_create(prog_fd.as_fd(), cgroup.as_fd(), attach_type)
                        .map_err(|e| attach_err(format!("BPF_LINK_CREATE: {e}")))?;
                    sys::obj_pin(link.as_fd(), &link_path).map_err(|e| {
                        attach_err(format!("pin link at {}: {e}", link_path.display()))
                    })?;
                }};
            }
            match kind {
                ProgramKind::SockAddr => load_attach!(CgroupSockAddr, aya),
                ProgramKind::SockOps => load_attach!(SockOps, aya),
                ProgramKind::Sockopt => load_attach!(CgroupSockopt, raw),
            }
        }

        // Links of another layout version would run old programs beside the new ones.
        report.old_versions_removed =
            remove_versions(&config.pin_dir, Some(layout::LAYOUT_VERSION))?;
        for old in &report.old_versions_removed {
            log::warn!(
                "removed the pins of another layout version: {}",
                old.display()
            );
        }

        Ok(Loaded {
            ebpf,
            pin_dir: config.pin_dir,
            attach_cgroup: config.attach_cgroup,
            report,
        })
    }

    pub fn report(&self) -> &LoadReport {
        &self.report
    }

    /// The base pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn attach_cgroup(&self) -> &Path {
        &self.attach_cgroup
    }

    /// The pinned maps as a backend (its own file descriptors).
    pub fn backend(&self) -> Result<KernelMaps, ProgramError> {
        KernelMaps::open(&self.pin_dir)
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, ProgramError> {
        crate::inspect::read_counters(&self.pin_dir)
    }

    /// The loaded programs (for run-time statistics).
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }
}

/// Re-points a pinned link at `prog` when it is attached to the wanted cgroup. Returns
/// `false` (after removing the pin, which detaches it) when there is no usable link.
fn reuse_link(
    link_path: &Path,
    cgroup_id: u64,
    prog: std::os::fd::BorrowedFd<'_>,
) -> Result<bool, String> {
    if !link_path.exists() {
        return Ok(false);
    }
    let usable = sys::obj_get(link_path).and_then(|fd| {
        let info = sys::link_info(fd.as_fd())?;
        if info.link_type == sys::BPF_LINK_TYPE_CGROUP && info.cgroup_id == cgroup_id {
            sys::link_update(fd.as_fd(), prog)?;
            Ok(true)
        } else {
            Ok(false)
        }
    });
    match usable {
        Ok(true) => Ok(true),
        Ok(false) | Err(_) => {
            if let Err(e) = &usable {
                log::warn!("pinned link {}: {e}: attaching anew", link_path.display());
            } else {
                log::info!(
                    "pinned link {} is attached elsewhere: detaching it",
                    link_path.display()
                );
            }
            std::fs::remove_file(link_path)
                .map_err(|e| format!("remove stale link pin {}: {e}", link_path.display()))?;
            Ok(false)
        }
    }
}

/// Removes the layout-version directories under `pin_dir` except `keep`: links first (which
/// detaches their programs), then maps. Returns the directories removed.
fn remove_versions(pin_dir: &Path, keep: Option<&str>) -> Result<Vec<PathBuf>, ProgramError> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(ProgramError::path(pin_dir, "read directory", e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| ProgramError::path(pin_dir, "read directory", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_version = name.len() > 1
            && name.starts_with('v')
            && name[1..].chars().all(|c| c.is_ascii_digit());
        if !is_version || Some(name.as_str()) == keep {
            continue;
        }
        let dir = entry.path();
        for sub in ["links", "maps"] {
            remove_dir_files(&dir.join(sub))?;
        }
        std::fs::remove_dir_all(&dir).map_err(|e| ProgramError::path(&dir, "remove", e))?;
        removed.push(dir);
    }
    Ok(removed)
}

fn remove_dir_files(dir: &Path) -> Result<(), ProgramError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ProgramError::path(dir, "read directory", e)),
    };
    for entry in entries {
        let path = entry
            .map_err(|e| ProgramError::path(dir, "read directory", e))?
            .path();
        std::fs::remove_file(&path).map_err(|e| ProgramError::path(&path, "unpin", e))?;
    }
    std::fs::remove_dir(dir).map_err(|e| ProgramError::path(dir, "remove", e))
}

/// Removes everything zbridge pinned under `pin_dir` (every layout version): the links, which
/// detaches the programs once no running agent holds them, and the maps. Returns the version
/// directories removed; `pin_dir` itself goes too when it is left empty.
pub fn detach(pin_dir: &Path) -> Result<Vec<PathBuf>, ProgramError> {
    let removed = remove_versions(pin_dir, None)?;
    // Only an empty directory is removed: anything else in it is not ours.
    if pin_dir.exists() && std::fs::read_dir(pin_dir).is_ok_and(|mut d| d.next().is_none()) {
        std::fs::remove_dir(pin_dir).map_err(|e| ProgramError::path(pin_dir, "remove", e))?;
    }
    Ok(removed)
}

/// A program the verifier accepted, and how much of the verifier's budget it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedProgram {
    pub name: &'static str,
    /// The instructions the verifier processed (its limit is 1,000,000 on every kernel since
    /// 5.2); `None` on kernels before 5.16, which do not report it.
    pub verified_insns: Option<u32>,
}

/// The verifier's limit of processed instructions per program (`BPF_COMPLEXITY_LIMIT_INSNS`).
pub const VERIFIER_INSN_LIMIT: u32 = 1_000_000;

/// Loads the embedded object's maps and programs into the kernel, so that the verifier checks
/// every program, without pinning or attaching anything; all of it is released on return.
/// Returns the programs the verifier accepted, in [`object::PROGRAMS`] order. For
/// `zbridge doctor`.
pub fn verify_object() -> Result<Vec<VerifiedProgram>, ProgramError> {
    verify_object_bytes(object::OBJECT)
}

/// [`verify_object`] for a given object (tests feed it a broken one).
pub fn verify_object_bytes(bytes: &[u8]) -> Result<Vec<VerifiedProgram>, ProgramError> {
    // No map pin paths: the maps are created afresh and vanish with `ebpf`.
    let mut ebpf = EbpfLoader::new()
        .allow_unsupported_maps()
        .load(bytes)
        .map_err(|e| ProgramError::Object(format!("load: {}", error_chain(&e))))?;
    let mut verified = Vec::with_capacity(object::PROGRAMS.len());
    for (name, kind, _) in object::PROGRAMS {
        let program = ebpf
            .program_mut(name)
            .ok_or_else(|| ProgramError::Object(format!("has no program `{name}`")))?;
        macro_rules! load {
            ($ty:ty) => {{
                let prog: &mut $ty = program.try_into().map_err(|e| load_error(name, e))?;
                prog.load().map_err(|e| load_error(name, e))?;
                prog.info()
                    .map_err(|e| load_error(name, e))?
                    .verified_instruction_count()
            }};
        }
        let verified_insns = match kind {
            ProgramKind::SockAddr => load!(CgroupSockAddr),
            ProgramKind::SockOps => load!(SockOps),
            ProgramKind::Sockopt => load!(CgroupSockopt),
        };
        verified.push(VerifiedProgram {
            name,
            verified_insns,
        });
    }
    Ok(verified)
}
