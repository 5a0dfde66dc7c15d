//! `/metrics` of the real `pushmatch serve` binary: what only the binary sets up,
//! its allocator's heap gauges (`pushmatch_heap_allocated_bytes`,
//! `pushmatch_heap_resident_bytes`), read back and held against the process's own
//! RSS from `/proc`.

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[path = "support/http.rs"]
mod http;
#[path = "faults/load.rs"]
mod load;
#[path = "faults/process.rs"]
mod process;

use http::scrape;
use process::{BrokerProcess, config};
use pushmatch::telemetry::metrics::names;

/// The value of the unlabelled series `name`.
fn gauge(text: &str, name: &str) -> f64 {
    let line = text.lines().find(|line| line.split_once(' ').is_some_and(|(series, _)| series == name));
    let line = line.unwrap_or_else(|| panic!("no series {name} on /metrics:\n{text}"));
    line.rsplit_once(' ').expect("a value").1.parse().expect("a number")
}

/// A kB field of /proc/<pid>/status, in bytes.
#[cfg(target_os = "linux")]
fn proc_status_bytes(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    let line = status.lines().find(|line| line.starts_with(&format!("{field}:"))).expect("the field");
    let kb: f64 = line.split_whitespace().nth(1).expect("a figure").parse().expect("a number");
    kb * 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reports_its_heap_within_its_rss() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = config(&dir.path().join("data"), "").replace(r#"metrics_listen = """#, r#"metrics_listen = "127.0.0.1:0""#);
    let mut broker = BrokerProcess::start(dir.path(), &file).await;
    let serving = broker.wait_log("serving /metrics and /healthz").await;
    // Logged as `Some(127.0.0.1:PORT)`.
    let addr = serving["addr"].as_str().expect("the addr field").trim_start_matches("Some(").trim_end_matches(')');

    let text = scrape(addr.parse().expect("a socket address")).await;
    let (allocated, resident) = (gauge(&text, names::HEAP_ALLOCATED), gauge(&text, names::HEAP_RESIDENT));
    // A running broker holds at least its runtime, store and tenants: well over 64 KiB.
    assert!(allocated > 64.0 * 1024.0, "{allocated} bytes allocated");
    assert!(resident >= allocated, "the allocator keeps at least what is allocated: {resident} < {allocated}");
    #[cfg(target_os = "linux")]
    {
        // Bytes, and this process's: the heap is part of the RSS, read after it.
        let rss = proc_status_bytes(broker.pid(), "VmRSS");
        assert!(resident <= rss, "heap resident {resident} B above the process's RSS {rss} B");
        assert!(allocated > rss / 100.0, "heap {allocated} B is not this process's (RSS {rss} B)");
    }
}

/// The binary's allocator returns freed memory by itself: jemalloc is built with a
/// background thread (`.cargo/config.toml`), which keeps the broker's RSS flat
/// under a steady load (BENCHMARKS.md, issue 19).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binarys_allocator_purges_in_the_background() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = BrokerProcess::start(dir.path(), &config(&dir.path().join("data"), "")).await;
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", broker.pid()))
        .expect("the process's threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect();
    assert!(threads.iter().any(|name| name == "jemalloc_bg_thd"), "no jemalloc background thread among {threads:?}");
}
