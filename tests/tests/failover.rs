//! Order and exactly-once effect survive worker crashes: real `uplink-worker` processes are
//! killed with SIGKILL mid-stream, and each user's final state must equal applying that user's
//! batches in order, with checkpoints at each client's highest op id.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use uplink_tests::process::WorkerProcess;
use uplink_tests::{eventually, Model, Stack, StackOptions};

/// Each client's highest op id, keyed by `(user_id, client_id)`.
type Checkpoints = BTreeMap<(String, String), i64>;

/// `users` users, each uploading `batches` SDK-form batches in order from one client.
/// Returns the in-order model and each client's highest op id.
fn plan(users: usize, batches: usize) -> (Vec<Vec<Value>>, Model, Checkpoints) {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let mut model = Model::default();
    let mut checkpoints = BTreeMap::new();
    let mut bodies = Vec::new();
    for user in 0..users {
        let mut op_id = 0i64;
        let mut mine = Vec::new();
        for b in 0..batches {
            let ops: Vec<Value> = (0..rng.gen_range(1..=4))
                .map(|i| {
                    op_id += 1;
                    let id = format!("u{user}-{}", rng.gen_range(0..3));
                    match rng.gen_range(0..10) {
                        0..=5 => {
                            json!({"op_id": op_id, "op": "PUT", "type": "rows", "id": id, "data": {"b": b, "i": i}})
                        }
                        6..=8 => json!({"op_id": op_id, "op": "PATCH", "type": "rows", "id": id, "data": {"p": b}}),
                        _ => json!({"op_id": op_id, "op": "DELETE", "type": "rows", "id": id}),
                    }
                })
                .collect();
            model.apply_batch(&ops);
            mine.push(json!({"client_id": format!("device-{user}"), "batch": ops}));
        }
        checkpoints.insert((format!("user-{user}"), format!("device-{user}")), op_id);
        bodies.push(mine);
    }
    (bodies, model, checkpoints)
}

async fn upload_all(stack: &Stack, bodies: Vec<Vec<Value>>) {
    let uploads = bodies.into_iter().enumerate().map(|(user, batches)| async move {
        let token = stack.token(&format!("user-{user}")).await;
        for body in batches {
            stack.upload_ok(&token, &body).await;
        }
    });
    futures::future::join_all(uploads).await;
}

async fn assert_in_order_state(stack: &Stack, model: &Model, checkpoints: &Checkpoints) {
    let started = std::time::Instant::now();
    let expected = model.collection("rows");
    eventually(Duration::from_secs(180), "every batch applied in order", || async {
        let depth: u32 = stack.queue_depths().await.iter().sum();
        (depth == 0 && stack.docs("rows").await == expected && &stack.checkpoints().await == checkpoints).then_some(())
    })
    .await;
    assert_eq!(stack.dead_letter_depth().await, 0, "nothing was dead-lettered");
    eprintln!("drained {:.1?} after the last upload", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_and_restarted_loses_and_repeats_nothing() {
    // Arrange: one worker process, uploads running.
    let stack = Stack::start(StackOptions {
        workers: 0,
        partitions: 4,
        ..StackOptions::default()
    })
    .await;
    let (bodies, model, checkpoints) = plan(40, 25);
    let mut worker = Some(WorkerProcess::spawn(&stack, "a", &[]));

    // Act: SIGKILL it twice while batches are flowing, restarting it each time.
    let killer = async {
        for round in 0..2 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            if let Some(w) = worker.take() {
                w.kill();
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            worker = Some(WorkerProcess::spawn(&stack, &format!("a{round}"), &[]));
        }
    };
    tokio::join!(upload_all(&stack, bodies), killer);

    // Assert
    assert_in_order_state(&stack, &model, &checkpoints).await;
    drop(worker);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_active_worker_repeatedly_keeps_every_user_in_order() {
    // Arrange: two, then three worker processes; 100 users × 30 batches.
    let stack = Stack::start(StackOptions {
        workers: 0,
        partitions: 4,
        ..StackOptions::default()
    })
    .await;
    let (bodies, model, checkpoints) = plan(100, 30);
    let mut workers = std::collections::VecDeque::new();
    workers.push_back(WorkerProcess::spawn(&stack, "w0", &[]));
    workers.push_back(WorkerProcess::spawn(&stack, "w1", &[]));

    // Act: the oldest worker holds every partition (it subscribed first; single active
    // consumer); kill it with SIGKILL again and again, adding a fresh standby each time.
    let killer = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        workers.push_back(WorkerProcess::spawn(&stack, "w2", &[]));
        for round in 0..5 {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            if let Some(active) = workers.pop_front() {
                active.kill();
            }
            workers.push_back(WorkerProcess::spawn(&stack, &format!("r{round}"), &[]));
        }
    };
    let started = std::time::Instant::now();
    tokio::join!(upload_all(&stack, bodies), killer);
    eprintln!("uploads and kills took {:.1?}", started.elapsed());

    // Assert
    assert_in_order_state(&stack, &model, &checkpoints).await;
    drop(workers);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_batch_in_hand_and_exits_cleanly() {
    let stack = Stack::start(StackOptions {
        workers: 0,
        partitions: 2,
        ..StackOptions::default()
    })
    .await;
    let (bodies, model, checkpoints) = plan(10, 10);
    let worker = WorkerProcess::spawn(&stack, "graceful", &[]);
    upload_all(&stack, bodies).await;
    let clean = worker.terminate();
    assert!(clean, "uplink-worker exits 0 on SIGTERM");
    let replacement = WorkerProcess::spawn(&stack, "after", &[]);
    assert_in_order_state(&stack, &model, &checkpoints).await;
    drop(replacement);
    stack.finish().await;
}
