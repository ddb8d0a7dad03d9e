//! `zbridge replay`.

use std::process::ExitCode;

/// Flags of `zbridge replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {}

pub fn main(_args: ReplayArgs) -> anyhow::Result<ExitCode> {
    super::not_built("replay")
}
