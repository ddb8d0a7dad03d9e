//! `zbridge`: the node agent binary. It parses the command line and wires the stages
//! (watcher → resolver → programmer); the stages themselves live in their own crates.

mod cli;
mod cmd;
mod ops;
mod pipeline;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    match cmd::dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("zbridge: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
