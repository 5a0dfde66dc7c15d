use super::*;
use crate::domain::ids::TenantId;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

const TENANT: &str = r#"
[[tenants]]
id = "gors"
display_name = "Gors"
api_key_sha256 = ["6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b"]
"#;

fn file(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), text).expect("write");
    file
}

#[test]
fn no_file_gives_the_development_defaults() {
    let loaded = Config::load(None, env(&[("HOME", "/root")])).expect("loads");
    assert!(loaded.development);
    assert_eq!(loaded.config.server.listen, "127.0.0.1:50051");
    assert_eq!(loaded.config.store.backend, StoreBackend::Embedded);
    assert_eq!(loaded.config.tenants[0].id, DEVELOPMENT_TENANT);
    assert_eq!(loaded.config.challenge.default_ttl_seconds, 60);
}

#[test]
fn development_mode_exposed_to_the_network_refuses_to_start() {
    for (key, addr) in [
        ("PUSHMATCH_SERVER__LISTEN", "0.0.0.0:50051"),
        ("PUSHMATCH_SERVER__LISTEN", "[::]:50051"),
        ("PUSHMATCH_SERVER__LISTEN", "192.0.2.7:50051"),
        ("PUSHMATCH_SERVER__METRICS_LISTEN", "0.0.0.0:9464"),
    ] {
        let error = Config::load(None, env(&[(key, addr)])).expect_err(addr).to_string();
        assert!(error.contains("development mode") && error.contains("--config"), "{error}");
        let named = if key.ends_with("METRICS_LISTEN") { "server.metrics_listen: " } else { "server.listen: " };
        assert!(error.starts_with(named), "{error}");
    }
    for addr in ["127.0.0.1:50051", "[::1]:50051", "127.0.0.2:1"] {
        Config::load(None, env(&[("PUSHMATCH_SERVER__LISTEN", addr)])).expect(addr);
    }
    // With a file of its own tenants, any address is the operator's choice.
    let file = file(&format!("[server]\nlisten = \"0.0.0.0:50051\"\n{TENANT}"));
    assert!(!Config::load(Some(file.path()), env(&[])).expect("a file").development);
}

#[test]
fn tenant_key_digests_come_from_a_mounted_secret_file() {
    let digest = crate::domain::api_key::api_key_digest_hex("a-key-from-the-secret-store");
    let secret = file(&format!("# rotated 2026-12\n\n{digest}\n"));
    let config = format!("[[tenants]]\nid = \"t\"\ndisplay_name = \"T\"\napi_key_sha256_file = {:?}\n", secret.path());
    let loaded = Config::load(Some(file(&config).path()), env(&[])).expect("loads");
    assert_eq!(loaded.config.tenants[0].api_key_sha256, vec![digest]);

    let missing = "[[tenants]]\nid = \"t\"\ndisplay_name = \"T\"\napi_key_sha256_file = \"/nonexistent/keys\"\n";
    let error = Config::load(Some(file(missing).path()), env(&[])).expect_err("missing file").to_string();
    assert!(error.starts_with("tenants.api_key_sha256_file: ") && error.contains("/nonexistent/keys"), "{error}");
}

#[test]
fn a_tenants_own_limits_override_the_global_ones_for_it_alone() {
    let text = format!(
        "{TENANT}[tenants.limits]\nmax_ttl_seconds = 120\ndefault_ttl_seconds = 30\nmax_pending_per_user = 1\n\
         max_devices_per_user = 2\ncreates_share = 0.1\npush_queue_share = 0.01\n[[tenants]]\nid = \"other\"\ndisplay_name = \"Other\"\n\
         api_key_sha256 = [\"{}\"]\n",
        "a".repeat(64)
    );
    let loaded = Config::load(Some(file(&text).path()), env(&[])).expect("loads");
    let settings = loaded.config.broker_settings();
    let own = settings.limits_of(&TenantId("gors".into()));
    assert_eq!((own.default_ttl.as_secs(), own.max_ttl.as_secs()), (30, 120));
    assert_eq!((own.admission.max_pending, own.enrollment_limits.max_devices), (1, 2));
    // What the tenant left out, and the other tenant, stay global.
    assert_eq!(own.admission.max_per_window, loaded.config.limits.max_challenges_per_window);
    let other = settings.limits_of(&TenantId("other".into()));
    assert_eq!(other.max_ttl.as_secs(), u64::from(loaded.config.challenge.max_ttl_seconds));
    assert_eq!(other.admission.max_pending, loaded.config.limits.max_pending_per_user);
    // Shares: the tenant's own part of the create cap (256) and of each push queue
    // (10,000), rounded up; the other tenant's by the global shares (half).
    assert_eq!((own.max_creates_in_flight, other.max_creates_in_flight), (26, 128));
    let queues = loaded.config.tenant_queue_shares();
    assert_eq!(queues, vec![(TenantId("gors".into()), 100), (TenantId("other".into()), 5_000)]);

    for (limits, key) in [
        ("max_ttl_seconds = 301", "tenants.limits.max_ttl_seconds: "),
        ("max_ttl_seconds = 20\ndefault_ttl_seconds = 30", "tenants.limits.default_ttl_seconds: "),
        ("max_pending_per_user = 0", "tenants.limits.max_pending_per_user: "),
        ("creates_share = 0.0", "tenants.limits.creates_share: "),
        ("push_queue_share = 1.01", "tenants.limits.push_queue_share: "),
    ] {
        let text = format!("{TENANT}[tenants.limits]\n{limits}\n");
        let error = Config::load(Some(file(&text).path()), env(&[])).expect_err(limits).to_string();
        assert!(error.starts_with(key) && error.contains("\"gors\""), "{limits}: {error}");
    }
    let unknown = format!("{TENANT}[tenants.limits]\nmax_pending = 1\n");
    let error = Config::load(Some(file(&unknown).path()), env(&[])).expect_err("unknown key").to_string();
    assert!(error.contains("max_pending"), "{error}");
}

#[test]
fn environment_overrides_the_file() {
    let file = file(&format!("[server]\nlisten = \"127.0.0.1:7000\"\n[challenge]\ndefault_ttl_seconds = 30\n{TENANT}"));
    let loaded = Config::load(
        Some(file.path()),
        env(&[
            ("PUSHMATCH_SERVER__LISTEN", "0.0.0.0:50051"),
            ("PUSHMATCH_CHALLENGE__MAX_TTL_SECONDS", "120"),
            ("PUSHMATCH_CONFIG", "/ignored"),
            ("OTHER", "x"),
        ]),
    )
    .expect("loads");
    assert!(!loaded.development);
    assert_eq!(loaded.config.server.listen, "0.0.0.0:50051");
    assert_eq!(loaded.config.challenge.default_ttl_seconds, 30);
    assert_eq!(loaded.config.challenge.max_ttl_seconds, 120);
    assert_eq!(loaded.config.tenants[0].display_name, "Gors");
}

#[test]
fn numeric_looking_strings_stay_strings() {
    let file = file(TENANT);
    let loaded = Config::load(Some(file.path()), env(&[("PUSHMATCH_SERVER__METRICS_LISTEN", "")])).expect("loads");
    assert_eq!(loaded.config.server.metrics_listen, "");
}

#[test]
fn mistakes_are_named() {
    type Case = (String, Vec<(String, String)>, &'static str);
    let cases: Vec<Case> = vec![
        (format!("[server]\nlisten = \"nowhere\"\n{TENANT}"), vec![], "server.listen"),
        (format!("[challenge]\ndefault_ttl_seconds = 400\n{TENANT}"), vec![], "challenge.default_ttl_seconds"),
        (format!("[server]\nlisten_typo = \"x\"\n{TENANT}"), vec![], "listen_typo"),
        ("".into(), vec![], "tenants"),
        (TENANT.replace("6b86", "zz86"), vec![], "tenants.api_key_sha256"),
        (TENANT.into(), env(&[("PUSHMATCH_LIMITS__MAX_PENDING_PER_USER", "0")]), "limits.max_pending_per_user"),
        (TENANT.into(), env(&[("PUSHMATCH_SERVER__MAX_CREATES_IN_FLIGHT", "0")]), "server.max_creates_in_flight"),
        (TENANT.into(), env(&[("PUSHMATCH_SERVER__WORKER_THREADS", "1025")]), "server.worker_threads"),
        (TENANT.into(), env(&[("PUSHMATCH_SERVER__CREATES_SHARE_PER_TENANT", "0")]), "server.creates_share_per_tenant"),
        (TENANT.into(), env(&[("PUSHMATCH_SERVER__CREATES_SHARE_PER_TENANT", "nan")]), "server.creates_share_per_tenant"),
        (TENANT.into(), env(&[("PUSHMATCH_PUSH__QUEUE_SHARE_PER_TENANT", "1.5")]), "push.queue_share_per_tenant"),
        (TENANT.into(), env(&[("PUSHMATCH_PUSH__QUEUE_SHARE_PER_TENANT", "-0.5")]), "push.queue_share_per_tenant"),
        (TENANT.into(), env(&[("PUSHMATCH_STORE__BACKEND", "mysql")]), "backend"),
    ];
    for (text, env, expected) in cases {
        let file = file(&text);
        let error = Config::load(Some(file.path()), env).expect_err("invalid");
        assert!(error.to_string().contains(expected), "{error} should name {expected}");
    }
}

#[test]
fn each_tenants_share_is_a_rounded_up_part_of_the_whole_and_a_lone_tenant_has_all() {
    let second = TENANT.replace("gors", "acme").replace("Gors", "Acme").replace("6b86", "7b86");
    let two = file(&format!("{TENANT}{second}"));
    let parts = |file: &tempfile::NamedTempFile, pairs: &[(&str, &str)]| {
        let config = Config::load(Some(file.path()), env(pairs)).expect("loads").config;
        let dispatcher = config.dispatcher_settings();
        let queued = dispatcher.tenants.iter().map(|(_, limit)| *limit).max().unwrap_or(0);
        (config.broker_settings().max_creates_in_flight_per_tenant, queued, dispatcher.tenants.len())
    };
    assert_eq!(parts(&two, &[]), (128, 5_000, 2), "half of 256 and of 10000 by default");
    let small = [
        ("PUSHMATCH_SERVER__MAX_CREATES_IN_FLIGHT", "3"),
        ("PUSHMATCH_SERVER__CREATES_SHARE_PER_TENANT", "0.5"),
        ("PUSHMATCH_PUSH__QUEUE_SHARE_PER_TENANT", "0.00001"),
    ];
    assert_eq!(parts(&two, &small), (2, 1, 2), "rounded up: every tenant gets at least one");
    let whole = [("PUSHMATCH_SERVER__CREATES_SHARE_PER_TENANT", "1"), ("PUSHMATCH_PUSH__QUEUE_SHARE_PER_TENANT", "1.0")];
    assert_eq!(parts(&two, &whole), (256, 10_000, 2));
    assert_eq!(parts(&file(TENANT), &[]), (256, 10_000, 1), "a lone tenant has nobody to share with");
}

#[test]
fn a_missing_file_is_named() {
    let error = Config::load(Some(Path::new("/nonexistent/pushmatch.toml")), vec![]).expect_err("missing");
    assert!(error.to_string().contains("/nonexistent/pushmatch.toml"));
}
