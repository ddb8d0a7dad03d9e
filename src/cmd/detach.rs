//! `zbridge detach`.

use std::process::ExitCode;

/// Flags of `zbridge detach`.
#[derive(Debug, clap::Args)]
pub struct DetachArgs {}

pub fn main(_args: DetachArgs) -> anyhow::Result<ExitCode> {
    super::not_built("detach")
}
