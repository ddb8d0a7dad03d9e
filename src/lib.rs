//! `zbridge`, the node agent, as a library: the command line ([`cli`]), one module per
//! subcommand ([`cmd`]), the wiring of the stages on threads ([`pipeline`]) and the operations
//! endpoint ([`ops`]). The stages themselves live in their own crates (watcher → resolver →
//! programmer); `main.rs` only parses the command line and dispatches. Being a library lets the
//! tests use these modules as they are, without compiling source files into themselves.

pub mod cli;
pub mod cmd;
pub mod ops;
pub mod pipeline;
