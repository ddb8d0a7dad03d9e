//! `zbridge`: the node agent binary. It parses the command line and dispatches to the
//! subcommand ([`zbridge::cmd`]); the wiring and the stages live in the library and their crates.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = zbridge::cli::Cli::parse();
    let result = zbridge::cmd::dispatch(cli);
    // The log's last lines before the error and the exit (`zbridge run` writes it from a
    // thread of its own).
    log::logger().flush();
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("zbridge: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
