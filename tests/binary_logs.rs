//! The real `pushmatch serve` binary's text log, read through a pipe as a log
//! collector (journald, a container runtime, a file) reads it.

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[path = "faults/load.rs"]
mod load;
#[path = "faults/process.rs"]
mod process;

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn a_text_log_written_to_a_pipe_has_no_colour_codes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = process::config(&dir.path().join("data"), "").replace(r#"format = "json""#, r#"format = "text""#);
    let path = dir.path().join("pushmatch.toml");
    std::fs::write(&path, file).expect("write the config file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_pushmatch"));
    for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("PUSHMATCH_")) {
        command.env_remove(key);
    }
    let mut child = command
        .args(["serve", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the pushmatch binary");
    let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
    let mut read = Vec::new();
    let serving = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("read the log") {
            let done = line.contains("serving gRPC");
            read.push(line);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(serving, Ok(true), "no \"serving gRPC\" line; the log: {read:#?}");
    // The line is text (not JSON) and names its level, without escape codes.
    let line = read.last().expect("a line");
    assert!(line.contains(" INFO ") && !line.starts_with('{'), "{line:?}");
    for line in &read {
        assert!(!line.contains('\u{1b}'), "a colour code in {line:?}");
    }
}
