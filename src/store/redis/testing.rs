//! Real `redis-server` processes for tests, on free loopback ports with nothing
//! saved to disk (`--save ""`). A missing binary fails loudly with how to install
//! it; no test skips silently.
//!
//! A [`RedisServer`] from `start` belongs to one test and is killed when dropped.
//! [`RedisServer::shared`] and [`RedisCluster::shared`] start one server (or one
//! three-master cluster) for every test of the process that asks for it: it is
//! never dropped, and dies with the test process instead, however that ends.

// Test support: a failed expectation here is a failed test, so panicking is the point.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::future::Future;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::OnceCell;

const READY_DEADLINE: Duration = Duration::from_secs(20);

/// Runs `redis-server` (`$2...`, with directory `$1`) for a shared server and kills it,
/// and removes the directory, once its standard input closes: the test process holds
/// the other end, which the kernel closes when that process ends.
const TIED_TO_PARENT: &str = r#"dir="$1"; shift
"$@" &
server=$!
cat > /dev/null
kill -9 "$server"
wait "$server" 2>/dev/null
rm -rf -- "$dir""#;

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("addr").port()
}

fn missing_binary(name: &str, error: std::io::Error) -> ! {
    panic!(
        "cannot run `{name}` ({error}): the Redis tests start their own Redis. Install it: \
         `apt-get install redis-server` on Debian or Ubuntu (it brings redis-cli too)"
    )
}

/// One redis-server; killed when dropped.
pub struct RedisServer {
    port: u16,
    /// Arguments before the common ones: a sentinel's configuration file and `--sentinel`.
    leading: Vec<String>,
    extra: Vec<String>,
    /// The line of its output that says it is ready.
    ready: &'static str,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// For a shared server: the standard input of the shell that kills it when the
    /// test process ends (see [`TIED_TO_PARENT`]).
    lifeline: Option<ChildStdin>,
    shared: bool,
}

impl RedisServer {
    pub async fn start() -> Self {
        Self::start_with(Vec::new(), false).await
    }

    /// With an append-only file fsynced on every write, so a restart keeps the data
    /// (what operators run: see the README on AOF).
    pub async fn start_durable() -> Self {
        Self::start_with(["--appendonly", "yes", "--appendfsync", "always"].map(str::to_owned).to_vec(), false).await
    }

    /// The server that every test of this process shares. Tests on it must keep out
    /// of each other's keys (the conformance cases name tenants of their own) and must
    /// not flush it, since tests run in parallel.
    pub async fn shared() -> &'static str {
        static URL: OnceCell<String> = OnceCell::const_new();
        URL.get_or_init(|| {
            keep_for_the_process(|| async {
                let server = Self::start_with(Vec::new(), true).await;
                let url = server.url();
                (server, url)
            })
        })
        .await
    }

    /// With arguments of the test's own, made from the server's port, after the common
    /// ones (which they override: `--port 0 --tls-port <port>` serves TLS only).
    pub async fn start_with_args(extra: impl FnOnce(u16) -> Vec<String>) -> Self {
        let port = free_port();
        Self::start_on(port, extra(port), false).await
    }

    async fn start_with(extra: Vec<String>, shared: bool) -> Self {
        Self::start_on(free_port(), extra, shared).await
    }

    async fn start_on(port: u16, extra: Vec<String>, shared: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = Self {
            port,
            leading: Vec::new(),
            extra,
            ready: "Ready to accept connections",
            dir,
            child: None,
            lifeline: None,
            shared,
        };
        server.spawn().await;
        server
    }

    /// A Redis Sentinel (`redis-server <file> --sentinel`) with `extra` arguments,
    /// which must include a `--sentinel monitor` line: it is ready when it monitors.
    pub async fn start_sentinel(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("sentinel.conf");
        std::fs::write(&config, "").expect("sentinel config file");
        let mut server = Self {
            port: free_port(),
            leading: vec![config.display().to_string(), "--sentinel".to_owned()],
            extra: extra.iter().map(|arg| (*arg).to_owned()).collect(),
            ready: "+monitor master",
            dir,
            child: None,
            lifeline: None,
            shared: false,
        };
        server.spawn().await;
        server
    }

    /// The process id, for signals of the test's own.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the process and waits for its "Ready to accept connections" line.
    async fn spawn(&mut self) {
        let mut command = if self.shared {
            // The shell's failure to find the binary would only show as an early exit.
            if let Err(error) = Command::new("redis-server").arg("--version").output().await {
                missing_binary("redis-server", error);
            }
            let mut shell = Command::new("sh");
            shell.args(["-c", TIED_TO_PARENT, "sh"]).arg(self.dir.path()).arg("redis-server").stdin(Stdio::piped());
            shell
        } else {
            Command::new("redis-server")
        };
        command
            .args(&self.leading)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--dir", &self.dir.path().display().to_string(), "--logfile", ""])
            .args(if self.extra.iter().any(|a| a == "--appendonly") { &[][..] } else { &["--appendonly", "no"][..] })
            .args(&self.extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // A shared server's shell is not killed (that would orphan the server): the
            // lifeline closing makes it kill the server.
            .kill_on_drop(!self.shared);
        let mut child = command.spawn().unwrap_or_else(|error| missing_binary("redis-server", error));
        self.lifeline = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        tokio::time::timeout(READY_DEADLINE, async {
            while let Some(line) = lines.next_line().await.expect("redis-server output") {
                if line.contains(self.ready) {
                    return;
                }
            }
            panic!("redis-server on port {} exited before it was ready", self.port);
        })
        .await
        .expect("redis-server ready in time");
        // Keep draining its output so the pipe never fills.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
    }

    /// Kills the process (SIGKILL): what a crash or an unplugged cable looks like.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill redis-server");
        }
    }

    /// Freezes the process (SIGSTOP) or thaws it (SIGCONT): a server that holds its
    /// connections open and answers nothing, as an overloaded one does.
    pub async fn freeze(&self, frozen: bool) {
        let pid = self.child.as_ref().and_then(Child::id).expect("redis-server runs");
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = tokio::process::Command::new("kill").arg(signal).arg(pid.to_string()).status().await.expect("kill(1)");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Starts it again on the same port, empty (nothing was saved).
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }
}

/// A Redis Cluster of masters only, no replicas.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// A three-master cluster that every test of this process shares; the same rules
    /// as for [`RedisServer::shared`] apply.
    pub async fn shared() -> &'static [String] {
        static URLS: OnceCell<Vec<String>> = OnceCell::const_new();
        URLS.get_or_init(|| {
            keep_for_the_process(|| async {
                let cluster = Self::start_shared(3).await;
                let urls = cluster.urls();
                (cluster, urls)
            })
        })
        .await
    }

    /// Nodes that die with the test process (see [`RedisServer::shared`]).
    async fn start_shared(masters: usize) -> Self {
        let mut nodes = Vec::new();
        for _ in 0..masters {
            let config = format!("nodes-{}.conf", free_port());
            let extra = ["--cluster-enabled", "yes", "--cluster-config-file", &config, "--cluster-node-timeout", "5000"];
            nodes.push(RedisServer::start_with(extra.iter().map(|s| (*s).to_owned()).collect(), true).await);
        }
        let addresses: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .await
            .unwrap_or_else(|error| missing_binary("redis-cli", error));
        assert!(output.status.success(), "redis-cli --cluster create failed: {}", String::from_utf8_lossy(&output.stdout));
        let cluster = Self { nodes };
        cluster.wait_until_ok().await;
        cluster
    }

    /// Waits until every node reports `cluster_state:ok` (the slots are agreed).
    async fn wait_until_ok(&self) {
        tokio::time::timeout(READY_DEADLINE, async {
            for url in self.urls() {
                let client = redis::Client::open(url.as_str()).expect("url");
                loop {
                    if let Ok(mut connection) = client.get_multiplexed_async_connection().await {
                        let info: String =
                            redis::cmd("CLUSTER").arg("INFO").query_async(&mut connection).await.unwrap_or_default();
                        if info.contains("cluster_state:ok") {
                            break;
                        }
                    }
                    // The cluster bus converges on its own; look again shortly.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        })
        .await
        .expect("the cluster agrees on its slots in time");
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// Runs `start` on a thread of its own, whose runtime keeps what it started (and
/// drains the servers' output) until the process exits, so shared servers outlive
/// the test, and the runtime, that started them. Returns what `start` reports.
async fn keep_for_the_process<T, R, F, Fut>(start: F) -> R
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = (T, R)>,
    R: Send + 'static,
{
    let (report, reported) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("shared-redis".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            runtime.block_on(async move {
                let (_kept, answer) = start().await;
                // Kept even if the test that asked has gone: they are cleaned up at exit.
                let _ = report.send(answer);
                std::future::pending::<()>().await;
            });
        })
        .expect("a thread for the shared Redis");
    reported.await.expect("the shared Redis starts (its panic is above)")
}
