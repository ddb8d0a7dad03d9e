//! One module per subcommand: its flags and its `main`.

pub mod detach;
pub mod doctor;
pub mod dump;
mod log_writer;
pub mod record;
pub mod replay;
pub mod run;

use std::process::ExitCode;

use crate::cli::{Cli, Command};

/// Sets up logging and runs the chosen subcommand.
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    init_logging(cli.log_level, matches!(cli.command, Command::Run(_)));
    match cli.command {
        Command::Run(args) => run::main(args),
        Command::Replay(args) => replay::main(args),
        Command::Record(args) => record::main(args),
        Command::Doctor(args) => doctor::main(args),
        Command::Dump(args) => dump::main(args),
        Command::Detach(args) => detach::main(args),
    }
}

/// Logs go to stderr (stdout carries command output such as replay's JSON). The running
/// agent's through a thread of their own ([`log_writer`]), so that no stage waits for the
/// write; the caller flushes (`log::logger().flush()`) before it exits.
fn init_logging(level: log::LevelFilter, background: bool) {
    let config = simplelog::ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_target_level(log::LevelFilter::Error)
        .build();
    if background {
        match log_writer::BackgroundStderr::start(std::io::stderr()) {
            // Ignoring the error is right: it only fails when a logger is already installed.
            Ok(writer) => {
                let _ = simplelog::WriteLogger::init(level, config, writer);
                return;
            }
            Err(e) => eprintln!("zbridge: no log writer thread ({e}); the log is written in place"),
        }
    }
    // Ignoring the error is right: it only fails when a logger is already installed.
    let _ = simplelog::TermLogger::init(
        level,
        config,
        simplelog::TerminalMode::Stderr,
        simplelog::ColorChoice::Never,
    );
}

/// Reads /proc with the host's cgroup paths: joins PID 1's cgroup namespace when the agent runs
/// in one of its own (a container). Call before any thread starts; threads inherit it.
pub fn use_host_cgroup_view() -> anyhow::Result<()> {
    use watcher::hostns::{enter_host_cgroup_namespace, HostNsError};
    match enter_host_cgroup_namespace() {
        Ok(true) => {
            log::info!("joined the host's cgroup namespace (PID 1's): cgroup paths are the host's")
        }
        Ok(false) => {}
        // Cannot look at PID 1 (no hostPID, or a sandbox that hides it): carry on, and say so.
        Err(e @ HostNsError::Read { .. }) => {
            log::warn!("{e}; cgroup paths are read in this process's own cgroup namespace")
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}
