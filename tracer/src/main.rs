use std::process::ExitCode;

use clap::Parser;
use tracer::cli::{Cli, Command, Output};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
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
            Command::Agent(args) => tracer::agent::run(args.to_config(), shutdown_signal())
                .await
                .map_err(|e| e.to_string()),
            Command::Flows(args) => flows(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tracer: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
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

async fn flows(args: tracer::cli::FlowsArgs) -> Result<(), String> {
    let q = args.query_string();
    let path = if q.is_empty() {
        "/flows".to_string()
    } else {
        format!("/flows?{q}")
    };
    let v = tracer::client::get_json(&args.agent, &path)
        .await
        .map_err(|e| e.to_string())?;
    match args.output {
        Output::Json => {
            if let Some(flows) = v.get("flows").and_then(|f| f.as_array()) {
                for f in flows {
                    println!("{f}");
                }
            }
        }
        Output::Table => print!("{}", tracer::report::flows_table(&v)),
    }
    Ok(())
}
