//! Real `uplink-worker` processes for tests that kill workers (SIGKILL is not something an
//! in-process task can suffer).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::stack::{amqp_uri_via, mongo_uri, Stack};

/// A workspace binary, built beside the test executables (`target/<profile>/<name>`).
pub fn binary(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().expect("test exe path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --bins` first",
        path.display()
    );
    path
}

pub struct WorkerProcess {
    pub id: String,
    child: Child,
}

impl WorkerProcess {
    /// Starts `uplink-worker run` against the stack's queues and database.
    pub fn spawn(stack: &Stack, id: &str, extra_env: &[(&str, &str)]) -> Self {
        let log_dir = std::env::temp_dir().join("uplink-tests");
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let log = std::fs::File::create(log_dir.join(format!("{}-{id}.log", stack.name))).expect("log file");
        let mut cmd = Command::new(binary("uplink-worker"));
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MONGO_URI", mongo_uri(&stack.name, stack.opts.mongo_via))
            .env("AMQP_URL", amqp_uri_via(stack.opts.worker_amqp_via))
            .env("UPLINK_QUEUE_PREFIX", &stack.name)
            .env("UPLINK_PARTITIONS", stack.opts.partitions.to_string())
            .env("UPLINK_WORKER_ADMIN_ADDR", "127.0.0.1:0")
            .env("UPLINK_WORKER_ID", format!("{}-{id}", stack.name))
            .env("UPLINK_RETRY_MIN_SECONDS", "0.05")
            .env("UPLINK_RETRY_MAX_SECONDS", "0.5")
            .env("UPLINK_LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log fd")))
            .stderr(Stdio::from(log));
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("uplink-worker starts");
        Self {
            id: id.to_owned(),
            child,
        }
    }

    /// SIGKILL: no graceful shutdown, no acks for the batches in hand.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the graceful exit and returns whether it exited cleanly.
    pub fn terminate(mut self) -> bool {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
