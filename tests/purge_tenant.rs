//! `pushmatch purge-tenant`, run as the real binary on the embedded store a real
//! server wrote: refused while the tenant is configured and while a server holds
//! the store; a dry run counts and removes nothing; the purge removes the tenant's
//! devices and enrollments and leaves the other tenant's. (Each store's purge, the
//! Redis ones included, is the conformance case
//! `purging_a_tenant_removes_its_records_and_nothing_else`.)

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod support;

use std::path::Path;

use pushmatch::config::Config;
use pushmatch::pb;
use support::*;

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn purge(config: &Path, args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pushmatch"));
    // Only the file configures it: none of the caller's PUSHMATCH_* variables (CI sets
    // PUSHMATCH_BROWSER_TEST, which the configuration refuses as an unknown setting).
    for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("PUSHMATCH_")) {
        command.env_remove(key);
    }
    let output = tokio::time::timeout(
        DEADLINE,
        command.arg("purge-tenant").args(args).arg("--config").arg(config).env("RUST_LOG", "warn").kill_on_drop(true).output(),
    )
    .await
    .expect("purge-tenant ends before the deadline")
    .expect("the binary runs");
    Run {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn write(file: &Path, config: &Config) {
    std::fs::write(file, toml::to_string(config).expect("toml")).expect("write the configuration");
}

async fn device_count(server: &TestServer, key: &str, user: &str) -> usize {
    let request = pb::ListDevicesRequest { user_id: user.into() };
    server.enrollments(key).list_devices(request).await.expect("list devices").into_inner().devices.len()
}

#[tokio::test]
async fn purge_tenant_counts_then_removes_a_removed_tenants_records_and_only_those() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("pushmatch.toml");
    let mut both = support::test_config(&dir.path().join("store"));
    both.server.config_reload_interval_seconds = 0;
    write(&file, &both);
    let server = TestServer::start_from_file(&file).await;
    server.enrolled_phone_as(KEY_A, "jan", pb::Platform::Fcm, FCM_TOKEN).await;
    server.enrolled_phone_as(KEY_B, "jan", pb::Platform::Fcm, FCM_TOKEN).await;
    server.enrolled_phone_as(KEY_B, "piet", pb::Platform::Fcm, FCM_TOKEN).await;

    let refused = purge(&file, &["b"]).await;
    assert!(!refused.ok && refused.stderr.contains("still in the configuration"), "{}", refused.stderr);

    let mut only_a = both.clone();
    only_a.tenants.retain(|tenant| tenant.id == "a");
    write(&file, &only_a);
    let busy = purge(&file, &["b", "--dry-run"]).await;
    assert!(!busy.ok, "the embedded store is the running server's: {}", busy.stdout);
    assert!(busy.stderr.contains("stop the server that uses it"), "{}", busy.stderr);
    let store_dir = server.stop().await;
    drop(store_dir);

    let dry = purge(&file, &["b", "--dry-run"]).await;
    assert!(dry.ok, "{}", dry.stderr);
    let counts = "2 users, 2 devices, 2 enrollments, 0 challenges";
    assert_eq!(dry.stdout.trim(), format!("tenant b: would remove (dry run, nothing removed) {counts}"));
    let removed = purge(&file, &["b"]).await;
    assert!(removed.ok, "{}", removed.stderr);
    assert_eq!(removed.stdout.trim(), format!("tenant b: removed {counts}"));
    let again = purge(&file, &["b", "--dry-run"]).await;
    assert!(again.stdout.contains("0 users, 0 devices, 0 enrollments, 0 challenges"), "{}", again.stdout);

    // Both tenants again: b's users have no devices left; a's user of the same id
    // still signs in.
    write(&file, &both);
    let server = TestServer::start_from_file(&file).await;
    assert_eq!((device_count(&server, KEY_B, "jan").await, device_count(&server, KEY_B, "piet").await), (0, 0));
    assert_eq!(device_count(&server, KEY_A, "jan").await, 1);
    server
        .challenges(KEY_A)
        .create_challenge(pb::CreateChallengeRequest { user_id: "jan".into(), ..Default::default() })
        .await
        .expect("a signs in");
}
