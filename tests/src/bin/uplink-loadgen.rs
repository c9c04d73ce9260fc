//! Load generator: drives a running uplink (api + workers) with many users uploading batches
//! concurrently and prints throughput and latency figures. Used for the benchmarks in the
//! README; it asserts nothing.
//!
//! ```sh
//! cargo run --release -p uplink-tests --bin uplink-loadgen -- \
//!     --api http://127.0.0.1:8080 --users 200 --batches 20 --ops 5 \
//!     --worker http://127.0.0.1:9091 --worker http://127.0.0.1:9092
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
struct Args {
    /// Base URL of the api.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api: String,
    /// Number of simulated users (each uploads its batches one after another).
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Batches per user.
    #[arg(long, default_value_t = 20)]
    batches: usize,
    /// Ops per batch.
    #[arg(long, default_value_t = 5)]
    ops: usize,
    /// Users uploading at the same time.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Send SDK-form ops with op_id and client_id (exercises checkpoints and dedupe).
    #[arg(long)]
    sdk: bool,
    /// Shared secret for /token, when the api is not in development mode.
    #[arg(long, env = "UPLINK_TOKEN_SHARED_SECRET")]
    token_secret: Option<String>,
    /// Worker admin URLs; when given, waits until they applied every batch and reports the
    /// drain rate.
    #[arg(long = "worker")]
    workers: Vec<String>,
    /// Collection prefix for the generated rows.
    #[arg(long, default_value = "bench")]
    table: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .timeout(Duration::from_secs(60))
        .build()?;
    let applied_before = applied_total(&http, &args.workers).await?;
    let run_id = uuid::Uuid::new_v4().simple().to_string();

    let started = Instant::now();
    let results: Vec<Vec<(u16, Duration)>> = futures::stream::iter(0..args.users)
        .map(|user| {
            let http = http.clone();
            let args = &args;
            let run_id = &run_id;
            async move { run_user(&http, args, run_id, user).await }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed();

    let mut latencies: Vec<Duration> = Vec::new();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for (status, latency) in results.into_iter().flatten() {
        *statuses.entry(status).or_default() += 1;
        if status == 200 {
            latencies.push(latency);
        }
    }
    latencies.sort();
    let ok = latencies.len();
    let pct = |p: f64| {
        latencies
            .get(((ok as f64 * p) as usize).min(ok.saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "uploads: {} accepted of {} sent in {:.2?}; statuses {statuses:?}",
        ok,
        args.users * args.batches,
        elapsed
    );
    println!(
        "api throughput: {:.0} uploads/s, {:.0} ops/s (users {}, concurrency {}, {} ops/batch)",
        ok as f64 / elapsed.as_secs_f64(),
        (ok * args.ops) as f64 / elapsed.as_secs_f64(),
        args.users,
        args.concurrency,
        args.ops
    );
    println!(
        "upload latency: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(pct(0.50)),
        ms(pct(0.90)),
        ms(pct(0.99)),
        ms(latencies.last().copied().unwrap_or_default())
    );

    if !args.workers.is_empty() {
        let target = applied_before + ok as u64;
        let drain_started = Instant::now();
        loop {
            let applied = applied_total(&http, &args.workers).await?;
            if applied >= target {
                break;
            }
            if drain_started.elapsed() > Duration::from_secs(600) {
                anyhow::bail!(
                    "workers applied {} of {} batches within 10 minutes",
                    applied - applied_before,
                    ok
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let total = started.elapsed();
        println!(
            "workers: all {} batches applied {:.2?} after the first upload ({:.0} batches/s end to end, {:.2?} after the last 200)",
            ok,
            total,
            ok as f64 / total.as_secs_f64(),
            drain_started.elapsed()
        );
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn run_user(http: &reqwest::Client, args: &Args, run_id: &str, user: usize) -> Vec<(u16, Duration)> {
    let user_id = format!("bench-{run_id}-{user}");
    let mut request = http.get(format!("{}/token", args.api)).query(&[("user_id", &user_id)]);
    if let Some(secret) = &args.token_secret {
        request = request.bearer_auth(secret);
    }
    let token = match request.send().await {
        Ok(r) if r.status().is_success() => r
            .json::<Value>()
            .await
            .ok()
            .and_then(|v| v["token"].as_str().map(str::to_owned)),
        _ => None,
    };
    let Some(token) = token else {
        return vec![(0, Duration::ZERO); args.batches];
    };
    let mut out = Vec::with_capacity(args.batches);
    let mut op_id = 0u64;
    for batch in 0..args.batches {
        let ops: Vec<Value> = (0..args.ops)
            .map(|i| {
                op_id += 1;
                let id = format!("{user_id}-{}", (batch * args.ops + i) % 50);
                let data = json!({"user": user_id, "batch": batch, "i": i, "text": "lorem ipsum dolor sit amet"});
                if args.sdk {
                    json!({"op_id": op_id, "op": "PUT", "type": args.table, "id": id, "tx_id": batch, "data": data})
                } else {
                    json!({"op": "PUT", "table": args.table, "id": id, "data": data})
                }
            })
            .collect();
        let body = if args.sdk {
            json!({"client_id": format!("{user_id}-device"), "batch": ops})
        } else {
            json!({"batch": ops})
        };
        let started = Instant::now();
        let status = match http
            .post(format!("{}/upload", args.api))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
        {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        };
        out.push((status, started.elapsed()));
    }
    out
}

/// Sum of `uplink_worker_batches_total{outcome="applied"}` over the workers.
async fn applied_total(http: &reqwest::Client, workers: &[String]) -> anyhow::Result<u64> {
    let mut total = 0;
    for w in workers {
        let text = http.get(format!("{w}/metrics")).send().await?.text().await?;
        total += text
            .lines()
            .find(|l| l.starts_with(r#"uplink_worker_batches_total{outcome="applied"}"#))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
    }
    Ok(total)
}
