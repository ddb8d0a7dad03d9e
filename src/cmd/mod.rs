//! One module per subcommand: its flags and its `main`.

pub mod detach;
pub mod doctor;
pub mod dump;
pub mod record;
pub mod replay;
pub mod run;

use std::process::ExitCode;

use crate::cli::{Cli, Command};

/// Sets up logging and runs the chosen subcommand.
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    init_logging(cli.log_level);
    match cli.command {
        Command::Run(args) => run::main(args),
        Command::Replay(args) => replay::main(args),
        Command::Record(args) => record::main(args),
        Command::Doctor(args) => doctor::main(args),
        Command::Dump(args) => dump::main(args),
        Command::Detach(args) => detach::main(args),
    }
}

/// Logs go to stderr (stdout carries command output such as replay's JSON).
fn init_logging(level: log::LevelFilter) {
    let config = simplelog::ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_target_level(log::LevelFilter::Error)
        .build();
    // Ignoring the error is right: it only fails when a logger is already installed.
    let _ = simplelog::TermLogger::init(
        level,
        config,
        simplelog::TerminalMode::Stderr,
        simplelog::ColorChoice::Never,
    );
}
