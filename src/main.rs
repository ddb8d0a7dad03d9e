//! `zbridge`: the node agent binary. It parses the command line and dispatches to the
//! subcommand ([`zbridge::cmd`]); the wiring and the stages live in the library and their crates.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = zbridge::cli::Cli::parse();
    match zbridge::cmd::dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("zbridge: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
