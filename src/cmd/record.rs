//! `zbridge record`.

use std::process::ExitCode;

/// Flags of `zbridge record`.
#[derive(Debug, clap::Args)]
pub struct RecordArgs {}

pub fn main(_args: RecordArgs) -> anyhow::Result<ExitCode> {
    super::not_built("record")
}
