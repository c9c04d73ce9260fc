use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use uplink_api::config::ApiConfig;
use uplink_api::keys::SigningKey;
use uplink_api::Application;
use uplink_common::config::Env;
use uplink_common::telemetry::{init_tracing, LogFormat};

/// uplink-api: PowerSync tokens, JWKS and confirmed uploads into RabbitMQ.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new RSA key pair as POWERSYNC_PRIVATE_KEY=… and POWERSYNC_PUBLIC_KEY=… lines
    /// (base64 of the JWK JSON, the format CloudCode and the PowerSync Node demo use).
    Generate {
        /// Modulus size in bits (at least 2048).
        #[arg(long, default_value_t = 2048)]
        bits: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Keys {
            command: KeysCommand::Generate { bits },
        } => {
            let key = SigningKey::generate(bits)?;
            println!("POWERSYNC_PRIVATE_KEY={}", key.private_env_value());
            println!("POWERSYNC_PUBLIC_KEY={}", key.public_env_value());
            Ok(())
        }
        Command::Serve => serve().await,
    }
}

async fn serve() -> anyhow::Result<()> {
    let env = Env::process();
    init_tracing(LogFormat::from_env(&env)?);
    let config = ApiConfig::from_env(&env).context("invalid configuration")?;
    let cancel = CancellationToken::new();
    tokio::spawn(uplink_common::shutdown::cancel_on_signal(cancel.clone()));
    let app = Application::build(config, cancel).await?;
    app.run_until_stopped().await?;
    tracing::info!("uplink-api stopped");
    Ok(())
}
