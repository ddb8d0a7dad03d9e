//! `zbridge dump`.

use std::process::ExitCode;

/// Flags of `zbridge dump`.
#[derive(Debug, clap::Args)]
pub struct DumpArgs {}

pub fn main(_args: DumpArgs) -> anyhow::Result<ExitCode> {
    super::not_built("dump")
}
