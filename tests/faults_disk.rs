//! The disk under the embedded store fills up mid-run, then space returns: the
//! real binary on a 1 MiB tmpfs. Mounting needs root, so this test is ignored by
//! default; run it with `cargo test --test faults_disk -- --ignored` as root.
//!
//! What it checks: while the disk is full, durable writes (enrollments) fail with
//! UNAVAILABLE, never UNKNOWN or INTERNAL, and sign-ins of enrolled users go on
//! (challenges live in memory); once space returns, enrollments succeed again
//! without a restart; after a restart every acknowledged device is there (no
//! corruption).

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[path = "faults/enroll.rs"]
mod enroll;
#[path = "faults/load.rs"]
mod load;
#[path = "faults/process.rs"]
mod process;

use std::io::Write as _;
use std::path::Path;

use enroll::{device_ids, enroll};
use parking_lot::Mutex;
use process::{API_KEY, BrokerProcess, config};
use tonic::Code;

struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Self {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(at)
            .status()
            .expect("run mount(8)");
        assert!(status.success(), "mount a tmpfs (needs root)");
        Self(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Fills the file system at `dir` with a file of zeros until it refuses more.
fn fill(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).expect("create the filler");
    let chunk = vec![0u8; 4096];
    while file.write_all(&chunk).and_then(|()| file.sync_all()).is_ok() {}
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root to mount a tmpfs: cargo test --test faults_disk -- --ignored"]
async fn a_full_disk_refuses_durable_writes_with_unavailable_and_recovers_when_space_returns() {
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).expect("mount point");
    let _tmpfs = Tmpfs::mount(&disk);
    let data = disk.join("data");
    let broker = BrokerProcess::start(dir.path(), &config(&data, "")).await;
    let mut acknowledged = Vec::new();
    for i in 0..5 {
        let worker = enroll(&broker.channel, &broker.connection(), API_KEY, &format!("before-{i}")).await.expect("enroll");
        acknowledged.push((worker.user.clone(), worker.device_id.clone()));
    }
    let survivor = enroll(&broker.channel, &broker.connection(), API_KEY, "signs-in").await.expect("enroll");

    let filler = fill(&disk);
    let mut refused = Vec::new();
    for i in 0..5 {
        match enroll(&broker.channel, &broker.connection(), API_KEY, &format!("full-{i}")).await {
            Ok(worker) => acknowledged.push((worker.user.clone(), worker.device_id.clone())),
            Err(status) => refused.push(status),
        }
    }
    eprintln!(
        "disk full: {} enrollments refused: {:?}",
        refused.len(),
        refused.iter().map(tonic::Status::code).collect::<Vec<_>>()
    );
    assert!(!refused.is_empty(), "a full disk refuses durable writes");
    for status in &refused {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    // Sign-ins of enrolled users go on: challenges live in memory.
    let tally = Mutex::new(load::Tally::default());
    assert!(load::sign_in(&survivor, API_KEY, &tally, false).await, "{}", tally.lock().summary());

    std::fs::remove_file(filler).expect("space returns");
    let after = enroll(&broker.channel, &broker.connection(), API_KEY, "after").await;
    let after = after.expect("enrollments succeed again once space returns, without a restart");
    acknowledged.push((after.user.clone(), after.device_id.clone()));

    broker.kill9().await;
    let broker = BrokerProcess::start(dir.path(), &config(&data, "")).await;
    for (user, device) in &acknowledged {
        assert_eq!(device_ids(&broker.channel, API_KEY, user).await.expect("list"), std::slice::from_ref(device), "{user}");
    }
}
