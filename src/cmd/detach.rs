//! `zbridge detach`: removes everything zbridge pinned (links, which detaches the programs,
//! and maps), for every layout version under the pin directory.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

/// Flags of `zbridge detach`.
#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// The pin directory zbridge was run with.
    #[arg(long, default_value = "/sys/fs/bpf/zbridge")]
    pub pin_dir: PathBuf,
}

pub fn main(args: DetachArgs) -> anyhow::Result<ExitCode> {
    let removed = programmer::detach(&args.pin_dir)
        .with_context(|| format!("detaching the pins under {}", args.pin_dir.display()))?;
    if removed.is_empty() {
        println!("nothing pinned under {}", args.pin_dir.display());
    }
    for dir in removed {
        println!("removed {} (links detached, maps unpinned)", dir.display());
    }
    Ok(ExitCode::SUCCESS)
}
