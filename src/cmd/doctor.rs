//! `zbridge doctor`.

use std::process::ExitCode;

/// Flags of `zbridge doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {}

pub fn main(_args: DoctorArgs) -> anyhow::Result<ExitCode> {
    super::not_built("doctor")
}
