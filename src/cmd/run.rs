//! `zbridge run`.

use std::process::ExitCode;

/// Flags of `zbridge run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {}

pub fn main(_args: RunArgs) -> anyhow::Result<ExitCode> {
    super::not_built("run")
}
