use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use uplink_common::config::{AmqpConfig, Env};
use uplink_common::telemetry::{init_tracing, LogFormat};
use uplink_worker::config::WorkerConfig;
use uplink_worker::deadletter::now_ms;
use uplink_worker::dlq::{self, Dlq, PurgePlan, Selection};
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
    /// Inspect, replay, export or purge dead-lettered batches.
    ///
    /// Reads the worker's broker settings (AMQP_URL, UPLINK_QUEUE_PREFIX, UPLINK_PARTITIONS);
    /// it never talks to MongoDB, so MONGO_URI is not needed. Messages are only ever removed
    /// from the dead-letter queue after their replayed copy was confirmed by the broker, or
    /// after a confirmed purge.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Table of the selected dead letters, with counts by reason and by collection.
    List {
        #[command(flatten)]
        select: SelectArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Everything about the selected dead letters: properties, headers, body.
    Show {
        /// The batch id (same as --batch-id).
        #[arg(value_name = "BATCH_ID")]
        id: Option<String>,
        #[command(flatten)]
        select: SelectArgs,
        /// Print JSON (one object per line).
        #[arg(long)]
        json: bool,
    },
    /// Re-publish the selected batches to their original partition (batch id kept, replay
    /// count raised) and remove each from the dead-letter queue once the broker confirmed it.
    Replay {
        #[command(flatten)]
        select: SelectArgs,
        /// Show what would be replayed and where; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove the selected dead letters, after typing `yes` on the terminal.
    Purge {
        #[command(flatten)]
        select: SelectArgs,
        /// Do not ask (for scripts). Without it, purge refuses when stdin is not a terminal.
        #[arg(long)]
        yes: bool,
    },
    /// Write the selected dead letters as JSON lines (properties, headers, body), removing
    /// nothing.
    Export {
        #[command(flatten)]
        select: SelectArgs,
        /// Write to this file instead of stdout.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

/// Which dead letters to act on. A flag given several times matches any of its values;
/// different flags must all match; no flag selects everything.
#[derive(Args)]
struct SelectArgs {
    /// Only this batch id.
    #[arg(long = "batch-id", value_name = "ID")]
    batch_id: Vec<String>,
    /// Only this reason: permanent, attempts_exhausted, undecodable or delivery_limit.
    #[arg(long, value_name = "REASON")]
    reason: Vec<String>,
    /// Only batches whose failing op, or any op, writes to this collection.
    #[arg(long, value_name = "NAME")]
    collection: Vec<String>,
    /// Only this user's batches.
    #[arg(long, value_name = "USER_ID")]
    user: Vec<String>,
    /// Only batches dead-lettered at least this long ago (30s, 10m, 2h, 1d, 1w).
    #[arg(long, value_name = "AGE", value_parser = dlq::parse_duration)]
    older_than: Option<Duration>,
    /// At most this many dead letters, in queue order.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
}

impl SelectArgs {
    fn selection(self) -> Selection {
        Selection {
            batch_ids: self.batch_id,
            reasons: self.reason,
            collections: self.collection,
            users: self.user,
            older_than: self.older_than,
            limit: self.limit,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run().await,
        Command::Dlq { command } => dead_letters(command).await,
    }
}

async fn run() -> anyhow::Result<()> {
    let env = Env::process();
    init_tracing(LogFormat::from_env(&env)?);
    let config = WorkerConfig::from_env(&env).context("invalid configuration")?;
    let cancel = CancellationToken::new();
    tokio::spawn(uplink_common::shutdown::cancel_on_signal(cancel.clone()));
    Worker::build(config, cancel).await?.run_until_stopped().await
}

async fn dead_letters(command: DlqCommand) -> anyhow::Result<()> {
    // No tracing subscriber: stdout carries the command's output (JSON for scripts).
    let amqp = AmqpConfig::from_env(&Env::process()).context("invalid configuration")?;
    uplink_common::amqp::validate_url(&amqp.url)
        .map_err(|e| anyhow::anyhow!("invalid configuration: AMQP_URL: {e}"))?;
    let tool = Dlq::new(&amqp);
    let mut stdout = std::io::stdout().lock();
    match command {
        DlqCommand::List { select, json } => {
            let listing = tool.list(&select.selection()).await?;
            if json {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&listing)?)?;
            } else {
                write!(stdout, "{}", dlq::render_listing(&listing, now_ms()))?;
            }
        }
        DlqCommand::Show { id, select, json } => {
            let mut selection = select.selection();
            selection.batch_ids.extend(id);
            if selection.is_unfiltered() {
                bail!("show needs a batch id (or a selection flag; `list` gives an overview)");
            }
            let letters = tool.read(&selection).await?;
            if letters.is_empty() {
                bail!("no dead letter matches");
            }
            for (i, letter) in letters.iter().enumerate() {
                if json {
                    writeln!(stdout, "{}", serde_json::to_string(letter)?)?;
                } else {
                    if i > 0 {
                        writeln!(stdout, "\n{}\n", "-".repeat(72))?;
                    }
                    write!(stdout, "{}", dlq::render_letter(letter, now_ms()))?;
                }
            }
        }
        DlqCommand::Replay { select, dry_run, json } => {
            let report = tool.replay(&select.selection(), dry_run).await?;
            if json {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                write!(stdout, "{}", dlq::render_replay(&report))?;
            }
            if let Some(e) = &report.aborted {
                bail!("replay stopped part-way: {e}");
            }
            if !report.failed.is_empty() {
                bail!("{} selected batch(es) were not replayed", report.failed.len());
            }
        }
        DlqCommand::Purge { select, yes } => {
            let selection = select.selection();
            let report = tool.purge(&selection, |plan| yes || confirm_purge(plan)).await?;
            if report.selected == 0 {
                writeln!(
                    stdout,
                    "nothing to purge: no dead letter matches ({} looked at)",
                    report.scanned
                )?;
            } else if !report.confirmed {
                bail!("not confirmed: nothing purged");
            } else {
                writeln!(
                    stdout,
                    "purged {} dead letter(s) of {} looked at",
                    report.purged, report.scanned
                )?;
            }
        }
        DlqCommand::Export { select, output } => {
            let selection = select.selection();
            let count = match &output {
                Some(path) => {
                    let file =
                        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
                    tool.export(&selection, &mut std::io::BufWriter::new(file)).await?
                }
                None => tool.export(&selection, &mut stdout).await?,
            };
            eprintln!("exported {count} dead letter(s); nothing was removed");
        }
    }
    Ok(())
}

/// Asks on the terminal; refuses outright when stdin is not one (scripts pass `--yes`).
fn confirm_purge(plan: &PurgePlan<'_>) -> bool {
    let n = plan.selected.len();
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        eprintln!(
            "refusing to purge {n} dead letter(s) of {} in {} without confirmation: stdin is not a terminal (pass --yes)",
            plan.scanned, plan.queue
        );
        return false;
    }
    let mut stderr = std::io::stderr();
    let _ = writeln!(
        stderr,
        "about to purge {n} dead letter(s) of {} in {}:",
        plan.scanned, plan.queue
    );
    for s in plan.selected.iter().take(20) {
        let _ = writeln!(
            stderr,
            "  {}  user {}  {}",
            s.batch_id.as_deref().unwrap_or("-"),
            s.user_id.as_deref().unwrap_or("-"),
            s.reason
        );
    }
    if n > 20 {
        let _ = writeln!(stderr, "  … and {} more", n - 20);
    }
    // Reading the terminal blocks; let the runtime move other tasks (the broker connection's
    // heartbeats) off this thread meanwhile.
    tokio::task::block_in_place(|| {
        dlq::ask_yes(&format!("Purge {n} dead letter(s)?"), &mut stdin.lock(), &mut stderr).unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn show_takes_the_batch_id_as_an_argument_or_a_flag() {
        let cli = Cli::try_parse_from(["uplink-worker", "dlq", "show", "b1", "--batch-id", "b2"]).expect("parses");
        let Some(Command::Dlq {
            command: DlqCommand::Show { id, select, .. },
        }) = cli.command
        else {
            panic!("not dlq show");
        };
        assert_eq!(id.as_deref(), Some("b1"));
        assert_eq!(select.batch_id, ["b2"]);
    }
}
