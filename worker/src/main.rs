use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use uplink_common::config::Env;
use uplink_common::telemetry::{init_tracing, LogFormat};
use uplink_worker::config::WorkerConfig;
use uplink_worker::Worker;

/// uplink-worker: applies upload batches from RabbitMQ to MongoDB.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume and apply batches (the default).
    Run,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run().await,
    }
}

async fn run() -> anyhow::Result<()> {
    let env = Env::process();
    init_tracing(LogFormat::from_env(&env)?);
    let config = WorkerConfig::from_env(&env).context("invalid configuration")?;
    let cancel = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(cancel.clone()));
    Worker::build(config, cancel).await?.run_until_stopped().await
}

async fn shutdown_on_signal(cancel: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown requested: finishing the batch in hand");
    cancel.cancel();
}
