//! The real `pushmatch serve` binary's text log, read through a pipe as a log
//! collector (journald, a container runtime, a file) reads it.

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[path = "faults/load.rs"]
mod load;
#[path = "faults/process.rs"]
mod process;

use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};

#[tokio::test]
async fn a_text_log_written_to_a_pipe_has_no_colour_codes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = process::config(&dir.path().join("data"), "").replace(r#"format = "json""#, r#"format = "text""#);
    let mut child = process::serve(dir.path(), &file);
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
