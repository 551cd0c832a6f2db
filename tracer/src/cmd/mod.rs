//! The client subcommands (`flows`, `watch`, `diagnoses`), private to the binary: they see the
//! command line, the wire types of `tracer_model` and the HTTP client, nothing of the agent.
mod diagnoses;
mod flows;
mod nodes;
mod render;
mod watch;

use tracer::cli::Command;

/// Exit status of `flows`/`diagnoses` when some agents answered and others did not.
pub const EXIT_PARTIAL: u8 = 3;

/// Whether the answer printed lacks some agents ([`EXIT_PARTIAL`]).
pub fn partial() -> bool {
    nodes::partial()
}

/// Runs a client subcommand (`stop` ends a `watch`).
pub async fn execute(
    cmd: Command,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    match cmd {
        Command::Flows(args) => flows::run(args).await,
        Command::Watch(args) => watch::run(args, stop).await,
        Command::Diagnoses(args) => diagnoses::run(args).await,
        Command::Agent(_) | Command::Completions { .. } => Err("not a client command".into()),
    }
}
