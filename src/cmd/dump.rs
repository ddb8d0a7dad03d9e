//! `zbridge dump`: the pinned maps, decoded for a person (cgroup path, role, addresses), and
//! the counters.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use programmer::layout::{self, CgroupInfo};
use programmer::{KernelMaps, MapBackend};

/// Flags of `zbridge dump`.
#[derive(Debug, clap::Args)]
pub struct DumpArgs {
    /// The pin directory zbridge runs with.
    #[arg(long, default_value = "/sys/fs/bpf/zbridge")]
    pub pin_dir: PathBuf,

    /// The ZDS state file `zbridge run --ztunnel-mode inpod` writes (`--zds-status-file`).
    #[arg(long, value_name = "FILE", default_value = ZDS_STATUS_FILE)]
    pub zds_status_file: PathBuf,
}

/// How many waiting `orig_dst_by_tuple` records `dump` lists (it counts them all): a node
/// whose ztunnel stopped asking can hold tens of thousands.
const TUPLE_RECORDS_SHOWN: usize = 20;

/// Where the running agent writes its ZDS state by default.
pub const ZDS_STATUS_FILE: &str = "/run/zbridge/zds.json";

/// Where an ambient entry's connections go: ztunnel in its own namespace (`node`) or in the
/// pod's (`inpod`, `+dns` with DNS capture).
fn capture_of(flags: u32) -> &'static str {
    if flags & layout::F_AMBIENT == 0 {
        "-"
    } else if flags & layout::F_INPOD == 0 {
        "node"
    } else if flags & layout::F_DNS != 0 {
        "inpod+dns"
    } else {
        "inpod"
    }
}

/// The role a cgroup entry's flags give it.
fn role_of(flags: u32) -> &'static str {
    if flags & layout::F_ZTUNNEL != 0 {
        "ztunnel"
    } else if flags & layout::F_AMBIENT != 0 {
        "ambient"
    } else if flags & layout::F_EXEMPT != 0 {
        "exempt"
    } else {
        "none"
    }
}

/// Cgroup id → path relative to the cgroup2 root, for the ids asked about (one walk).
fn cgroup_paths(root: &Path, wanted: &[u64]) -> HashMap<u64, String> {
    let mut found = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if found.len() == wanted.len() {
            break;
        }
        if let Ok(meta) = std::fs::metadata(&dir) {
            if wanted.contains(&meta.ino()) {
                let rel = dir.strip_prefix(root).unwrap_or(&dir);
                found.insert(meta.ino(), format!("/{}", rel.display()));
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
    }
    found
}

pub fn main(args: DumpArgs) -> anyhow::Result<ExitCode> {
    let backend = KernelMaps::open(&args.pin_dir).with_context(|| {
        format!(
            "opening the maps pinned under {} (is zbridge running, or was it run with \
             another --pin-dir?)",
            args.pin_dir.display()
        )
    })?;
    let settings = backend.settings()?;
    // Each family's addresses in the order the programs index them (a destination's hash
    // picks one; docs/tuple-space.md).
    let ztunnel: Vec<String> = settings
        .ztunnel_ips()
        .iter()
        .map(|ip| ip.to_string())
        .collect();
    let levels: Vec<String> = (0..32)
        .filter(|l| settings.levels & (1 << l) != 0)
        .map(|l| l.to_string())
        .collect();
    println!(
        "pin dir: {}",
        programmer::pins::versioned_dir(&args.pin_dir).display()
    );
    println!(
        "settings: ztunnel {} ({} IPv4, {} IPv6, spread by destination); ports outbound {} inbound {}; {}; debug {}; levels [{}]; generation {} (moves with each change of the entries or settings)",
        if ztunnel.is_empty() {
            "unknown".to_string()
        } else {
            ztunnel.join(", ")
        },
        settings.ztunnel_count4,
        settings.ztunnel_count6,
        settings.outbound_port,
        settings.inbound_port,
        if settings.flags & layout::S_FAIL_OPEN != 0 {
            "fail open"
        } else {
            "fail closed"
        },
        if settings.flags & layout::S_DEBUG != 0 {
            "on"
        } else {
            "off"
        },
        levels.join(","),
        settings.generation
    );

    let entries: Vec<(watcher::CgroupId, CgroupInfo)> = backend.cgroup_entries()?;
    let ids: Vec<u64> = entries.iter().map(|(id, _)| id.0).collect();
    let paths = match watcher::procfs::cgroup2_mount() {
        Ok(root) => cgroup_paths(&root, &ids),
        Err(e) => {
            log::warn!("cgroup paths not shown: {e}");
            HashMap::new()
        }
    };
    println!("{} ({} entries):", layout::CGROUP_INFO_MAP, entries.len());
    for (id, info) in &entries {
        let ips: Vec<String> = info.ips().iter().map(|ip| ip.to_string()).collect();
        println!(
            "  {id:>12}  {:<8} {:<9} {:<32} {}",
            role_of(info.flags),
            capture_of(info.flags),
            if ips.is_empty() {
                "-".to_string()
            } else {
                ips.join(",")
            },
            paths
                .get(&id.0)
                .map(String::as_str)
                .unwrap_or("(cgroup gone)")
        );
    }
    let addrs = backend.addr_entries()?;
    println!("{} ({} entries):", layout::POD_ADDR_MAP, addrs.len());
    for (addr, flags) in &addrs {
        println!("  {:<40} {}", addr.ip(), role_of(*flags));
    }
    // The thread-storage map (the connect-time records) cannot be iterated: only the
    // tuple records, which ztunnel's questions are answered from, are shown. Answered
    // records are deleted: those left are connections ztunnel has not asked about (yet: a
    // record lives microseconds; many, or old ones, are clients that gave up or a ztunnel
    // that does not ask).
    let by_tuple = programmer::read_tuple_records(&args.pin_dir)?;
    println!(
        "{}: {} records waiting for ztunnel's question (holds {}):",
        layout::ORIG_DST_BY_TUPLE_MAP,
        by_tuple.len(),
        layout::TUPLE_RECORDS
    );
    for record in by_tuple.iter().take(TUPLE_RECORDS_SHOWN) {
        println!(
            "  client {:<46} to {}",
            record.client().to_string(),
            record.orig_dst()
        );
    }
    if by_tuple.len() > TUPLE_RECORDS_SHOWN {
        println!("  ... and {} more", by_tuple.len() - TUPLE_RECORDS_SHOWN);
    }
    inpod_section(&args);
    println!("counters:");
    for (name, value) in programmer::read_counters(&args.pin_dir)?.pairs() {
        println!("  {name:<20} {value}");
    }
    if let Some(inbound) = programmer::inspect::read_inbound_counters(&args.pin_dir)? {
        for (name, value) in inbound.pairs() {
            println!("  {name:<22} {value}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The in-pod pods: those enrolled in the kernel (their namespace links pinned under
/// `<pin dir>/<version>/inpod`) and what ztunnel said of each (the agent's ZDS state file).
fn inpod_section(args: &DumpArgs) {
    let links = programmer::pins::versioned_dir(&args.pin_dir).join("inpod");
    let enrolled: Vec<String> = std::fs::read_dir(&links)
        .map(|d| {
            d.flatten()
                .filter_map(|e| programmer::inpod::uid_of_pin(&e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    match zds::read_status(&args.zds_status_file) {
        Ok((pid, pods)) => {
            println!(
                "in-pod pods ({} enrolled in the kernel; ZDS: {}):",
                enrolled.len(),
                match pid {
                    Some(pid) => format!("ztunnel pid {pid} connected"),
                    None => "no ztunnel connected".to_string(),
                }
            );
            for [uid, name, state, error] in &pods {
                let kernel = if enrolled.contains(uid) {
                    "enrolled"
                } else {
                    "not enrolled"
                };
                let error = if error.is_empty() {
                    String::new()
                } else {
                    format!("  error: {error}")
                };
                println!("  {name:<40} {uid:<36}  zds {state:<8} {kernel}{error}");
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !enrolled.is_empty() {
                println!(
                    "in-pod pods ({} enrolled in the kernel; no ZDS state at {}):",
                    enrolled.len(),
                    args.zds_status_file.display()
                );
                for uid in &enrolled {
                    println!("  {uid}");
                }
            }
        }
        Err(e) => println!(
            "in-pod pods: the ZDS state {} cannot be read: {e}",
            args.zds_status_file.display()
        ),
    }
}
