use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use tracer::cli::{Cli, Command, LogFormat};

mod cmd;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let argv = match tracer::config::expand(std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("tracer: {e}");
            return ExitCode::from(2);
        }
    };
    // Installed as `kubectl-tracer`, kubectl runs it for `kubectl tracer ...`: it says so in
    // its usage and errors.
    let mut command = Cli::command();
    if tracer::cli::invoked_as_plugin() {
        command = command.name("kubectl tracer").bin_name("kubectl tracer");
    }
    let cli = match Cli::from_arg_matches(&command.get_matches_from(argv)) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if !matches!(cli.command, Command::Agent(_)) {
        // `tracer flows -o json | head`: a closed pipe ends a client quietly, as for any CLI
        // tool, instead of a panic in println!. Never for the agent: a client hanging up on
        // the API must not kill it.
        // SAFETY: restoring the default disposition of SIGPIPE before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // One object per line, fields at the top level, no colour codes: what Loki, Fluent Bit
        // and Elasticsearch ingest as is.
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Judging and rendering run on the blocking pool, a few jobs at a time (api::HEAVY_JOBS);
        // the ring reader has its own thread.
        .max_blocking_threads(16)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tracer: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Agent(args) => match args.to_config() {
                Ok(cfg) => tracer::agent::run(cfg, shutdown_signal())
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Command::Completions { shell } => {
                let mut command = <Cli as clap::CommandFactory>::command();
                clap_complete::generate(shell, &mut command, "tracer", &mut std::io::stdout());
                Ok(())
            }
            client => cmd::execute(client, shutdown_signal()).await,
        }
    });
    match result {
        Ok(()) if cmd::partial() => ExitCode::from(cmd::EXIT_PARTIAL),
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tracer: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Registers SIGTERM/SIGINT handlers now (not at first poll), so a signal that arrives while
/// the agent is still starting shuts it down cleanly instead of killing it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
