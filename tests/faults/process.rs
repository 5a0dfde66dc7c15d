//! The real `pushmatch serve` binary as a child process: a configuration file in a
//! temp dir, the embedded store under it, listening on a port the kernel picks
//! (read back from its JSON log), JSON logs read line by line so tests wait on
//! events ("serving gRPC", "stopped") instead of on timers.

#![allow(dead_code)] // each test file uses part of the harness

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use pushmatch::domain::api_key::api_key_digest_hex;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use super::load::DEADLINE;

pub const API_KEY: &str = "faults-test-api-key-0123456789abcdef";

/// The configuration file of a broker whose embedded store lives in `data`, with
/// `server_extra` added to its `[server]` table.
pub fn config(data: &Path, server_extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
public_url = "http://127.0.0.1:50051"
metrics_listen = ""
{server_extra}

[store]
backend = "embedded"
path = "{data}"

[limits]
max_challenges_per_window = 100000
max_pending_per_user = 10

[log]
level = "info"
format = "json"

[[tenants]]
id = "a"
display_name = "Gors"
api_key_sha256 = ["{key}"]
"#,
        data = data.display(),
        key = api_key_digest_hex(API_KEY),
    )
}

/// Writes `config` to `dir/pushmatch.toml` and starts `pushmatch serve` on it, its
/// stderr (the log) piped.
pub fn serve(dir: &Path, config: &str) -> Child {
    let path: PathBuf = dir.join("pushmatch.toml");
    std::fs::write(&path, config).expect("write the config file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_pushmatch"));
    // Only the file configures it: none of the caller's PUSHMATCH_* variables (CI
    // sets PUSHMATCH_BROWSER_TEST, which `serve` refuses as an unknown setting).
    for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("PUSHMATCH_")) {
        command.env_remove(key);
    }
    command
        .args(["serve", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the pushmatch binary")
}

pub struct BrokerProcess {
    child: Child,
    pub addr: SocketAddr,
    pub channel: Channel,
    /// Every log line so far, each a JSON object.
    logs: watch::Receiver<Vec<serde_json::Value>>,
}

impl BrokerProcess {
    /// Writes `config` to `dir/pushmatch.toml`, starts the binary on it, and waits
    /// for its "serving gRPC" line.
    pub async fn start(dir: &Path, config: &str) -> Self {
        let mut child = serve(dir, config);
        let (record, logs) = watch::channel(Vec::new());
        let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let entry = serde_json::from_str(&line).unwrap_or_else(|_| serde_json::json!({ "message": line }));
                record.send_modify(|all| all.push(entry));
            }
        });
        let mut process = Self { child, addr: SocketAddr::from(([127, 0, 0, 1], 0)), channel: lazy("127.0.0.1:1"), logs };
        let serving = process.wait_log("serving gRPC").await;
        let addr = serving["addr"].as_str().expect("the addr field");
        // Logged as `Some(127.0.0.1:PORT)`.
        let addr = addr.trim_start_matches("Some(").trim_end_matches(')');
        process.addr = addr.parse().expect("a socket address");
        process.channel = lazy(addr);
        process
    }

    /// A new connection (not shared with the other clients).
    pub fn connection(&self) -> Channel {
        lazy(&self.addr.to_string())
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the broker runs")
    }

    /// Waits for a log line whose message is `message`; returns it.
    pub async fn wait_log(&mut self, message: &str) -> serde_json::Value {
        let mut logs = self.logs.clone();
        let found = tokio::time::timeout(DEADLINE, logs.wait_for(|all| all.iter().any(|e| e["message"] == message))).await;
        let entry = match found {
            Ok(Ok(all)) => all.iter().find(|e| e["message"] == message).cloned(),
            _ => None,
        };
        entry.unwrap_or_else(|| panic!("no log line {message:?} within {DEADLINE:?}; the log: {:#?}", *self.logs.borrow()))
    }

    /// SIGKILL: no drain, no flush, as a crash or the OOM killer.
    pub async fn kill9(mut self) {
        self.child.kill().await.expect("kill -9 the broker");
    }

    /// SIGTERM: what an orchestrator sends to stop it.
    pub fn sigterm(&self) {
        let status = std::process::Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("run kill(1)");
        assert!(status.success(), "kill -TERM");
    }

    /// SIGHUP: reload the configuration's tenants (and the TLS files).
    pub fn sighup(&self) {
        let status = std::process::Command::new("kill").args(["-HUP", &self.pid().to_string()]).status().expect("run kill(1)");
        assert!(status.success(), "kill -HUP");
    }

    /// The log's warnings and errors so far (for a failed assertion's message).
    pub fn warnings(&self) -> Vec<serde_json::Value> {
        self.logs.borrow().iter().filter(|e| e["level"] == "WARN" || e["level"] == "ERROR").cloned().collect()
    }

    /// How many log lines with `message` there are so far.
    pub fn count_logs(&self, message: &str) -> usize {
        self.logs.borrow().iter().filter(|e| e["message"] == message).count()
    }

    /// Waits until there are `n` log lines with `message`.
    pub async fn wait_logs(&mut self, message: &str, n: usize) {
        let mut logs = self.logs.clone();
        let counted = |all: &Vec<serde_json::Value>| all.iter().filter(|e| e["message"] == message).count() >= n;
        if tokio::time::timeout(DEADLINE, logs.wait_for(counted)).await.is_err() {
            panic!("fewer than {n} log lines {message:?} within {DEADLINE:?}; the log: {:#?}", *self.logs.borrow());
        }
    }

    pub async fn wait_exit(&mut self) -> ExitStatus {
        tokio::time::timeout(DEADLINE, self.child.wait()).await.expect("the broker exits in time").expect("wait")
    }
}

fn lazy(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}")).expect("uri").tcp_nodelay(true).connect_lazy()
}
