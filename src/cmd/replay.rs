//! `zbridge replay`: a recording through the resolver and the programmer with the in-memory map
//! backend, as fast as the file can be read; prints what the maps say about every live cgroup
//! (`shared/spec/recording-v1.md`, "What replay prints").

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use kubecache::recorded_facts::PlainFacts;
use programmer::layout::{self, CgroupInfo};
use programmer::{HashedMemoryBackend, Programmer, ProgrammerConfig};
use resolver::{Input, KubeChange, Resolver, ResolverConfig, Update, Workloads};
use serde::Serialize;
use watcher::recording::{RecordWithObject, RecordingReader};
use watcher::Record;

/// How many updates are queued before the programmer writes a batch. A fixed count, not the
/// live agent's rule (what is queued when the programmer thread gets to it, which follows the
/// load): the output's `batches` must be the same on every run.
const FLUSH_EVERY: usize = 1024;
/// Records the reading thread hands over at a time: enough that the channel costs little per
/// record, few enough that the resolver starts at once.
const CHUNK: usize = 512;
/// Chunks the reading thread may be ahead of the resolver: bounds the memory of a fast reader.
const CHUNKS_AHEAD: usize = 8;

/// How replay prints the final state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// One JSON document (the format of `shared/spec/recording-v1.md`).
    Json,
    /// A table for a person: pod, role, address, cgroup.
    Table,
}

/// Flags of `zbridge replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The recording (format v1, plain or gzip).
    pub file: PathBuf,
    /// What to print: `json` (for programs; the same bytes on every run) or `table`.
    #[arg(long, value_enum, default_value = "json")]
    pub output: OutputFormat,
    /// Standalone mode: decide by this workloads file (format v1) instead of the recording's
    /// Kubernetes records.
    #[arg(long, value_name = "FILE")]
    pub workloads: Option<PathBuf>,
    /// The namespace of the node's ztunnel (`app=ztunnel`).
    #[arg(long, default_value = "istio-system")]
    pub system_namespace: String,
    /// Namespaces whose pods are never captured (repeat the flag for several).
    #[arg(long = "exclude-namespace", value_name = "NAMESPACE", default_values = ["kube-system"])]
    pub exclude_namespaces: Vec<String>,
    /// Host cgroup subtrees exempt from inbound capture (Kubernetes mode; repeatable).
    #[arg(long = "exempt-cgroup", value_name = "PATH")]
    pub exempt_cgroups: Vec<String>,
}

/// The document replay prints.
#[derive(Debug, Serialize)]
pub struct ReplayOutput {
    pub node: String,
    pub ztunnel: ZtunnelOutput,
    pub workloads: Vec<WorkloadOutput>,
    pub stats: Stats,
}

#[derive(Debug, Serialize)]
pub struct ZtunnelOutput {
    pub ips: Vec<String>,
}

/// One cgroup that holds live processes at the end of the recording.
#[derive(Debug, Serialize)]
pub struct WorkloadOutput {
    pub cgroup_id: u64,
    pub cgroup: String,
    pub pod: Option<String>,
    pub ip: Option<String>,
    pub role: &'static str,
}

/// Counters of the run (deterministic: no timings).
#[derive(Debug, Serialize)]
pub struct Stats {
    pub records: u64,
    pub live_processes: usize,
    pub map_entries: usize,
    pub updates: u64,
    pub batches: u64,
}

pub fn main(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let output = replay(&args)?;
    let mut text = match args.output {
        OutputFormat::Json => serde_json::to_string_pretty(&output)?,
        OutputFormat::Table => table(&output),
    };
    text.push('\n');
    // Printed only once the whole file was read: an error leaves stdout empty.
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("writing the replay output")?;
    Ok(ExitCode::SUCCESS)
}

/// Runs the recording through the pipeline and reads the final state off the maps.
pub fn replay(args: &ReplayArgs) -> anyhow::Result<ReplayOutput> {
    let path = args.file.display();
    // The resolver never reads a process's `comm`: not copied out of the line.
    let reader = RecordingReader::open(&args.file)
        .with_context(|| format!("replay {path}: cannot read the recording"))?
        .keep_comm(false);
    let node = reader.header().node.clone();
    let mut config = ResolverConfig::new(node.clone());
    config.system_namespace = args.system_namespace.clone();
    config.excluded_namespaces = args.exclude_namespaces.clone();
    config.exempt_cgroups = args.exempt_cgroups.clone();
    if let Some(file) = &args.workloads {
        config.workloads = Some(Workloads::load(file).with_context(|| format!("replay {path}"))?);
    }
    let mut resolver = Resolver::new(config);
    let mut programmer =
        Programmer::new(HashedMemoryBackend::default(), ProgrammerConfig::default())
            .context("replay: starting the in-memory programmer")?;
    let mut updates: Vec<Update> = Vec::with_capacity(FLUSH_EVERY * 2);
    let mut records = 0u64;
    let mut total_updates = 0u64;
    // Reading and parsing run on a thread of their own, a chunk ahead of the resolver and the
    // programmer: the two halves take about as long as each other, and the records stay in
    // file order (one channel, one reader).
    let (chunks, received) = crossbeam_channel::bounded::<anyhow::Result<Vec<Input>>>(CHUNKS_AHEAD);
    // Emptied chunks go back to the reading thread to be filled again: a chunk is allocated
    // and freed by that thread, not freed by this one (a free of another thread's large
    // block costs this thread a consolidation of that thread's heap).
    let (spent, reusable) = crossbeam_channel::bounded::<Vec<Input>>(CHUNKS_AHEAD + 2);
    let reading = {
        let path = args.file.display().to_string();
        std::thread::Builder::new()
            .name("replay-read".into())
            .spawn(move || read_inputs(reader, &path, &chunks, &reusable))
            .context("replay: cannot start the reading thread")?
    };
    let result = (|| {
        for chunk in &received {
            let mut chunk = chunk?;
            for input in chunk.drain(..) {
                records += 1;
                resolver.handle(input, &mut updates);
                if updates.len() >= FLUSH_EVERY {
                    total_updates += updates.len() as u64;
                    for update in updates.drain(..) {
                        programmer.queue(&update);
                    }
                    programmer.flush().context("replay: applying updates")?;
                }
            }
            // Full (the reader has enough) or the reader gone: dropped here instead.
            let _ = spent.try_send(chunk);
        }
        anyhow::Ok(())
    })();
    // An error here drops the receiver, which ends the reading thread at its next chunk.
    drop(received);
    if reading.join().is_err() {
        anyhow::bail!("replay {path}: the reading thread panicked");
    }
    result?;
    total_updates += updates.len() as u64;
    for update in updates.drain(..) {
        programmer.queue(&update);
    }
    programmer.flush().context("replay: applying updates")?;

    let backend = programmer.backend();
    let mut workloads = Vec::new();
    for cgroup in resolver.live_cgroups() {
        let entry = effective_entry(backend, &resolver, cgroup.id, cgroup.path);
        let (role, ip) = match entry {
            Some(info) if info.flags & layout::F_ZTUNNEL != 0 => ("ztunnel", first_ip(&info)),
            Some(info) if info.flags & layout::F_AMBIENT != 0 => ("ambient", first_ip(&info)),
            _ => ("none", None),
        };
        workloads.push(WorkloadOutput {
            cgroup_id: cgroup.id.0,
            cgroup: cgroup.path.to_string(),
            pod: cgroup.pod,
            ip,
            role,
        });
    }
    Ok(ReplayOutput {
        node,
        ztunnel: ZtunnelOutput {
            ips: backend
                .settings
                .ztunnel_ips()
                .iter()
                .map(|ip| ip.to_string())
                .collect(),
        },
        workloads,
        stats: Stats {
            records,
            live_processes: resolver.live_processes(),
            map_entries: backend.cgroups.len(),
            updates: total_updates,
            batches: backend.batches,
        },
    })
}

/// Reads the recording into chunks of resolver inputs, in file order, and sends them on
/// `chunks` until the end of the file, the first error (sent after the records read before
/// it) or the receiver is gone. A chunk is filled again once it comes back on `reusable`.
fn read_inputs<R: std::io::BufRead>(
    mut reader: RecordingReader<R>,
    path: &str,
    chunks: &crossbeam_channel::Sender<anyhow::Result<Vec<Input>>>,
    reusable: &crossbeam_channel::Receiver<Vec<Input>>,
) {
    let mut chunk = Vec::with_capacity(CHUNK);
    let read = (|| {
        while let Some(read) = reader
            .read_record_with_objects::<PlainFacts>()
            .with_context(|| format!("replay {path}: malformed recording"))?
        {
            let input = match read {
                // Read in the parse of its line, when plain (the common case).
                RecordWithObject::Kube { action, object, .. } => Input::Kube(object.change(action)),
                RecordWithObject::Record(timed) => match timed.record {
                    Record::Proc(event) => Input::Proc {
                        ts: timed.ts,
                        event,
                    },
                    Record::Kube(kube) => Input::Kube(
                        kubecache::record::kube_record_to_change(&kube).with_context(|| {
                            format!(
                                "replay {path}: malformed recording: line {}: kube record",
                                reader.line()
                            )
                        })?,
                    ),
                    Record::KubeSynced => Input::Kube(KubeChange::Synced),
                },
            };
            chunk.push(input);
            if chunk.len() == CHUNK {
                let next = reusable
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
                let full = std::mem::replace(&mut chunk, next);
                if chunks.send(Ok(full)).is_err() {
                    // The resolver's side ended (its own error): nothing more is wanted.
                    return Ok(());
                }
            }
        }
        anyhow::Ok(())
    })();
    let _ = chunks.send(Ok(chunk));
    if let Err(e) = read {
        let _ = chunks.send(Err(e));
    }
}

/// The entry the BPF programs would find for a process in this cgroup: its own, else the
/// nearest ancestor's (the programs walk the ancestor levels the same way). Ancestors are
/// known by id only when they hold live processes: a recording carries no other cgroup ids.
fn effective_entry(
    backend: &HashedMemoryBackend,
    resolver: &Resolver,
    id: watcher::CgroupId,
    path: &str,
) -> Option<CgroupInfo> {
    if let Some(info) = backend.cgroups.get(&id) {
        return Some(*info);
    }
    let mut path = path;
    while let Some((parent, _)) = path.rsplit_once('/') {
        let lookup = if parent.is_empty() { "/" } else { parent };
        if let Some(info) = resolver
            .live_cgroup_id(lookup)
            .and_then(|ancestor| backend.cgroups.get(&ancestor))
        {
            return Some(*info);
        }
        if parent.is_empty() {
            break;
        }
        path = parent;
    }
    None
}

fn first_ip(info: &CgroupInfo) -> Option<String> {
    info.ips().first().map(|ip| ip.to_string())
}

/// A table for a person.
fn table(output: &ReplayOutput) -> String {
    let mut rows: Vec<[String; 5]> = vec![[
        "POD".into(),
        "ROLE".into(),
        "ADDRESS".into(),
        "CGROUP_ID".into(),
        "CGROUP".into(),
    ]];
    for w in &output.workloads {
        rows.push([
            w.pod.clone().unwrap_or_else(|| "-".into()),
            w.role.into(),
            w.ip.clone().unwrap_or_else(|| "-".into()),
            w.cgroup_id.to_string(),
            w.cgroup.clone(),
        ]);
    }
    let mut widths = [0usize; 4];
    for row in &rows {
        for (i, width) in widths.iter_mut().enumerate() {
            *width = (*width).max(row[i].chars().count());
        }
    }
    let ztunnel = if output.ztunnel.ips.is_empty() {
        "none".to_string()
    } else {
        output.ztunnel.ips.join(", ")
    };
    let mut text = format!("node: {}\nztunnel: {ztunnel}\n\n", output.node);
    for row in &rows {
        let line = format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
        );
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text.pop();
    text
}
