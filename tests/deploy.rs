//! The configuration and deployment files cannot drift from the code: the example
//! configuration names every key and loads; the Compose file and the Kubernetes
//! manifests parse, and the configuration they give pushmatch (file plus
//! `PUSHMATCH_*` environment) loads through `Config::load`, which refuses unknown
//! keys. The image itself needs a container engine to build (deploy/README.md).

// Tests: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use pushmatch::config::{ApnsConfig, Config, FcmConfig, LoadedConfig, StoreBackend};
use serde::Deserialize as _;
use serde_norway::Value;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every document of a YAML file.
fn yaml_documents(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).unwrap_or_else(|e| panic!("{path}: {e}")))
        .filter(|document| !document.is_null())
        .collect()
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    let mut node = value;
    for key in path {
        node = node.get(*key).unwrap_or_else(|| panic!("no {key} in {path:?}"));
    }
    node.as_str().unwrap_or_else(|| panic!("{path:?} is not a string"))
}

/// Dotted key paths of a TOML value; arrays of tables count by their first element.
fn key_paths(value: &toml::Value, prefix: &str, into: &mut BTreeSet<String>) {
    let table = match value {
        toml::Value::Table(table) => table,
        // An array of tables ([[tenants]]): the keys of any of them.
        toml::Value::Array(items) if items.first().is_some_and(toml::Value::is_table) => {
            return items.iter().for_each(|item| key_paths(item, prefix, into));
        }
        _ => return,
    };
    for (key, value) in table {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        into.insert(path.clone());
        key_paths(value, &path, into);
    }
}

/// Every key the configuration has, optional ones included.
fn schema_keys() -> BTreeSet<String> {
    let mut full = Config::default();
    full.server.tls_cert_path = Some("cert.pem".into());
    full.server.tls_key_path = Some("key.pem".into());
    full.server.tls_client_ca_path = Some("client-ca.pem".into());
    let apns = r#"team_id = "T"
key_id = "K"
private_key_path = "k.p8"
topic = "t""#;
    full.push.apns = Some(toml::from_str::<ApnsConfig>(apns).expect("apns"));
    full.push.fcm = Some(toml::from_str::<FcmConfig>(r#"service_account_path = "sa.json""#).expect("fcm"));
    full.tenants.push(pushmatch::config::TenantConfig {
        id: "t".into(),
        display_name: "T".into(),
        api_key_sha256: vec!["0".repeat(64)],
        api_key_sha256_file: Some("keys.sha256".into()),
        limits: pushmatch::config::TenantLimitsConfig {
            default_ttl_seconds: Some(1),
            max_ttl_seconds: Some(1),
            max_pending_per_user: Some(1),
            max_challenges_per_window: Some(1),
            challenge_window_seconds: Some(1),
            max_devices_per_user: Some(1),
            max_open_enrollments_per_user: Some(1),
            creates_share: Some(0.5),
            push_queue_share: Some(0.5),
        },
        push: pushmatch::config::TenantPushConfig { apns: full.push.apns.clone(), fcm: full.push.fcm.clone() },
    });
    let mut keys = BTreeSet::new();
    key_paths(&toml::Value::try_from(&full).expect("serializes"), "", &mut keys);
    keys
}

/// The example with its optional ("# key = value") lines switched on.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|line| {
            let rest = line.strip_prefix("# ").unwrap_or(line);
            let is_setting = rest.starts_with('[') || rest.split_once(" = ").is_some_and(|(key, _)| is_key(key));
            if line.starts_with("# ") && is_setting { rest.to_owned() } else { line.to_owned() }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_key(word: &str) -> bool {
    !word.is_empty() && word.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The `api_key_sha256_file` of the configuration's tenant; no deployment file
/// ships a key (or its digest) of its own.
fn api_key_file(text: &str) -> Option<String> {
    let table: toml::Table = toml::from_str(text).expect("TOML");
    let tenants = table.get("tenants")?.as_array()?;
    assert!(tenants.iter().all(|t| t.get("api_key_sha256").is_none()), "a deployment file ships an API-key digest");
    tenants.first()?.get("api_key_sha256_file")?.as_str().map(str::to_owned)
}

/// `text` with the tenant's key file replaced by a temporary one holding a digest,
/// as the mounted secret would; keep the file while the text is used.
fn with_key_file_stood_in(text: &str, key_file: &str) -> (String, tempfile::NamedTempFile) {
    let stand_in = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(stand_in.path(), format!("{}\n", "ab".repeat(32))).expect("write");
    (text.replace(key_file, &stand_in.path().display().to_string()), stand_in)
}

fn load_text(text: &str, env: Vec<(String, String)>) -> LoadedConfig {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), text).expect("write");
    Config::load(Some(file.path()), env).unwrap_or_else(|e| panic!("does not load: {e}\n{text}"))
}

#[test]
fn the_example_configuration_loads_and_names_every_key() {
    let text = read("pushmatch.example.toml");
    let loaded = Config::load(Some(&repo("pushmatch.example.toml")), Vec::new()).expect("the example loads as it is");
    assert_eq!(loaded.config.tenants[0].id, "gors");
    // It shows the defaults: as it is, it configures nothing but its tenant.
    let mut as_shown = loaded.config;
    as_shown.tenants.clear();
    assert_eq!(
        toml::to_string(&as_shown).expect("toml"),
        toml::to_string(&Config::default()).expect("toml"),
        "pushmatch.example.toml shows a value that is not the default"
    );

    // With every optional key switched on it still loads, and then it names every key
    // the configuration has.
    let full = uncommented(&text);
    let (loadable, _stand_in) = with_key_file_stood_in(&full, "/run/secrets/pushmatch-api-keys");
    let loaded = load_text(&loadable, Vec::new());
    assert!(loaded.config.push.apns.is_some() && loaded.config.push.fcm.is_some());
    assert!(loaded.config.server.tls_client_ca_path.is_some());
    let mut named = BTreeSet::new();
    key_paths(&toml::from_str::<toml::Value>(&full).expect("toml"), "", &mut named);
    let missing: Vec<_> = schema_keys().difference(&named).cloned().collect();
    assert!(missing.is_empty(), "pushmatch.example.toml lacks {missing:?}");

    // Every key has a comment: the line above it is one (or the key it belongs with).
    let lines: Vec<&str> = full.lines().collect();
    for (index, line) in lines.iter().enumerate() {
        let Some((key, _)) = line.split_once(" = ") else { continue };
        if !is_key(key) {
            continue;
        }
        let commented = text.lines().nth(index).is_some_and(|original| original.starts_with('#'))
            || lines[..index].iter().rev().take_while(|above| !above.is_empty()).any(|above| above.starts_with('#'));
        assert!(commented, "pushmatch.example.toml: {key} has no comment");
    }
}

/// `${NAME:?message}` and `${NAME}` as Compose fills them in, with a stand-in value.
fn compose_value(raw: &str) -> String {
    if raw.starts_with("${") { "ab".repeat(32) } else { raw.to_owned() }
}

#[test]
fn the_compose_file_runs_two_replicas_on_redis_behind_a_proxy() {
    let compose = yaml_documents("deploy/compose.yaml").remove(0);
    let services = compose.get("services").and_then(Value::as_mapping).expect("services");
    let service = |name: &str| services.get(name).unwrap_or_else(|| panic!("service {name}"));

    // Redis: AOF on, noeviction.
    let redis_command: Vec<&str> =
        service("redis").get("command").and_then(Value::as_sequence).expect("command").iter().filter_map(Value::as_str).collect();
    let flag = |name: &str| redis_command.iter().position(|arg| *arg == name).map(|i| redis_command[i + 1]);
    assert_eq!(flag("--appendonly"), Some("yes"));
    assert_eq!(flag("--maxmemory-policy"), Some("noeviction"));

    // pushmatch: two replicas; its file plus its environment load.
    let broker = service("pushmatch");
    assert_eq!(broker.get("deploy").and_then(|d| d.get("replicas")).and_then(Value::as_u64), Some(2));
    assert_eq!(str_at(broker, &["build", "dockerfile"]), "deploy/Dockerfile");
    let env: Vec<(String, String)> = broker
        .get("environment")
        .and_then(Value::as_mapping)
        .expect("environment")
        .iter()
        .map(|(key, value)| (key.as_str().expect("key").to_owned(), compose_value(value.as_str().expect("a string value"))))
        .collect();
    assert!(env.iter().all(|(key, _)| key.starts_with("PUSHMATCH_")));
    let config_path = &env.iter().find(|(key, _)| key == "PUSHMATCH_CONFIG").expect("PUSHMATCH_CONFIG").1;
    let volumes: Vec<&str> =
        broker.get("volumes").and_then(Value::as_sequence).expect("volumes").iter().filter_map(Value::as_str).collect();
    let host_file = volumes
        .iter()
        .find_map(|volume| {
            let mut parts = volume.split(':');
            let (host, container) = (parts.next()?, parts.next()?);
            (container == config_path).then_some(host)
        })
        .expect("the configuration file is mounted where PUSHMATCH_CONFIG says");
    let host_file = repo("deploy").join(host_file);
    // The API-key digests come from a Compose secret, mounted at /run/secrets/<name>
    // from a file the operator makes and git ignores: no key ships in the repository.
    let text = std::fs::read_to_string(&host_file).expect("the compose configuration");
    let key_file = api_key_file(&text).expect("the tenant's keys come from a file");
    let secret_name = key_file.strip_prefix("/run/secrets/").expect("a Compose secret");
    assert!(
        sequence(&broker["secrets"]).iter().any(|s| s.as_str() == Some(secret_name)),
        "the pushmatch service mounts the secret {secret_name}"
    );
    let secret_file = str_at(&compose, &["secrets", secret_name, "file"]);
    assert!(
        read(".gitignore").contains(&format!("/deploy/{}", secret_file.trim_start_matches("./"))),
        "git ignores {secret_file}"
    );
    let (text, _stand_in) = with_key_file_stood_in(&text, &key_file);
    let config = load_text(&text, env).config;
    assert_eq!(config.store.backend, StoreBackend::Redis);
    assert!(config.store.redis_url.starts_with("redis://redis:"), "{}", config.store.redis_url);
    assert!(!config.secrets.key_hex.is_empty(), "replicas share one secret key");
    assert!(config.server.listen.starts_with("0.0.0.0:") && config.server.metrics_listen.starts_with("0.0.0.0:"));
    let healthcheck: Vec<&str> = broker
        .get("healthcheck")
        .and_then(|h| h.get("test"))
        .and_then(Value::as_sequence)
        .expect("healthcheck")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(healthcheck, ["CMD", "/usr/local/bin/pushmatch", "healthcheck"]);

    // Envoy balances calls over the replicas over HTTP/2 and health-checks them.
    assert!(str_at(service("envoy"), &["image"]).starts_with("envoyproxy/envoy"));
    let envoy = yaml_documents("deploy/compose/envoy.yaml").remove(0);
    let cluster = &envoy["static_resources"]["clusters"][0];
    assert_eq!(cluster["type"].as_str(), Some("STRICT_DNS"));
    let upstream = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
    assert_eq!(upstream["address"].as_str(), Some("pushmatch"));
    assert_eq!(upstream["port_value"].as_u64(), Some(u64::from(config.listen_addr().expect("addr").port())));
    assert!(!cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
        ["http2_protocol_options"]
        .is_null());
    assert!(!cluster["health_checks"][0]["grpc_health_check"].is_null());

    // Prometheus scrapes the metrics port.
    let prometheus = yaml_documents("deploy/compose/prometheus.yml").remove(0);
    let port = prometheus["scrape_configs"][0]["dns_sd_configs"][0]["port"].as_u64();
    assert_eq!(port.map(|p| p.to_string()), config.server.metrics_listen.rsplit(':').next().map(str::to_owned));
}

#[test]
fn the_dockerfile_sets_only_keys_that_exist() {
    let dockerfile = read("deploy/Dockerfile");
    let env: Vec<(String, String)> = dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("ENV "))
        .flat_map(|rest| rest.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|pair| pair.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    assert!(!env.is_empty());
    Config::load(None, env).expect("the image's environment loads");
    assert!(dockerfile.contains("USER 65532"), "the runtime image runs as non-root");
    assert!(dockerfile.contains("HEALTHCHECK"));
    assert!(dockerfile.contains("cargo chef cook"), "dependencies build in their own cached layer");
}

struct Manifests {
    documents: Vec<Value>,
}

impl Manifests {
    fn load() -> Self {
        let kustomization = yaml_documents("deploy/k8s/kustomization.yaml").remove(0);
        let listed: BTreeSet<String> = kustomization["resources"]
            .as_sequence()
            .expect("resources")
            .iter()
            .map(|r| r.as_str().expect("a file").to_owned())
            .collect();
        let present: BTreeSet<String> = std::fs::read_dir(repo("deploy/k8s"))
            .expect("k8s folder")
            .map(|entry| entry.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
            .collect();
        assert_eq!(listed, present, "kustomization.yaml lists every manifest");
        let documents = listed.iter().flat_map(|file| yaml_documents(&format!("deploy/k8s/{file}"))).collect();
        Self { documents }
    }

    fn find(&self, kind: &str, name: &str) -> &Value {
        self.documents
            .iter()
            .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }
}

fn sequence(value: &Value) -> &[Value] {
    value.as_sequence().map_or(&[], Vec::as_slice)
}

#[test]
fn the_kubernetes_manifests_fit_together_and_their_configuration_loads() {
    let manifests = Manifests::load();
    for document in &manifests.documents {
        assert!(document["apiVersion"].as_str().is_some() && document["kind"].as_str().is_some(), "{document:?}");
    }
    let deployment = manifests.find("Deployment", "pushmatch");
    let pod = &deployment["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    let container = &pod["spec"]["containers"][0];

    // The configuration: the ConfigMap's file where PUSHMATCH_CONFIG points, plus the
    // container's environment (values from Secrets stand in as placeholders).
    let mounts = sequence(&container["volumeMounts"]);
    let volumes = sequence(&pod["spec"]["volumes"]);
    let volume = |name: &str| volumes.iter().find(|v| v["name"].as_str() == Some(name)).expect("volume");
    // Values from Secrets stand in as placeholders; optional ones are also left out,
    // as they are when the Secret does not exist.
    let vars = sequence(&container["env"]);
    let env: Vec<(String, String)> = vars
        .iter()
        .map(|var| {
            let name = var["name"].as_str().expect("name").to_owned();
            let value = var["value"].as_str().map_or_else(|| "redis://redis-from-secret:6379".to_owned(), str::to_owned);
            (name, value)
        })
        .collect();
    let without_optional: Vec<(String, String)> = vars
        .iter()
        .zip(&env)
        .filter(|(var, _)| var["valueFrom"]["secretKeyRef"]["optional"].as_bool() != Some(true))
        .map(|(_, pair)| pair.clone())
        .collect();
    assert!(env.iter().all(|(key, _)| key.starts_with("PUSHMATCH_")));
    let config_path = Path::new(&env.iter().find(|(k, _)| k == "PUSHMATCH_CONFIG").expect("PUSHMATCH_CONFIG").1).to_owned();
    let config_mount = mounts
        .iter()
        .find(|m| config_path.parent() == Some(Path::new(m["mountPath"].as_str().expect("path"))))
        .expect("the configuration folder is mounted");
    let config_map_name =
        volume(config_mount["name"].as_str().expect("name"))["configMap"]["name"].as_str().expect("a ConfigMap");
    let file_name = config_path.file_name().expect("file").to_string_lossy();
    let text =
        manifests.find("ConfigMap", config_map_name)["data"][file_name.as_ref()].as_str().expect("the file in the ConfigMap");
    let key_file = api_key_file(text).expect("the tenant's keys come from a file");
    let (text, _stand_in) = with_key_file_stood_in(text, &key_file);
    let text = text.as_str();
    load_text(text, env);
    let config = load_text(text, without_optional).config;
    assert_eq!(config.store.backend, StoreBackend::Redis);
    assert!(config.server.max_connection_age_seconds > 0, "L4 clients reconnect and reach new replicas");

    // Every file the configuration names is mounted from a Secret.
    let apns = config.push.apns.as_ref().expect("[push.apns]");
    let fcm = config.push.fcm.as_ref().expect("[push.fcm]");
    let mut secrets = BTreeSet::new();
    for file in [
        apns.private_key_path.clone(),
        fcm.service_account_path.clone(),
        PathBuf::from(&config.secrets.key_file),
        PathBuf::from(&key_file),
    ] {
        let mount = mounts
            .iter()
            .find(|m| file.parent() == Some(Path::new(m["mountPath"].as_str().expect("path"))))
            .unwrap_or_else(|| panic!("{} is not mounted", file.display()));
        let secret = volume(mount["name"].as_str().expect("name"))["secret"]["secretName"].as_str();
        secrets.insert(secret.unwrap_or_else(|| panic!("{} is not from a Secret", file.display())).to_owned());
    }
    let expected = ["pushmatch-apns", "pushmatch-fcm", "pushmatch-secret-key", "pushmatch-api-keys"];
    assert_eq!(secrets, expected.into_iter().map(str::to_owned).collect::<BTreeSet<_>>());
    let data_mount =
        mounts.iter().find(|m| m["mountPath"].as_str() == config.store.path.to_str()).expect("store.path is writable");
    assert!(!volume(data_mount["name"].as_str().expect("name"))["emptyDir"].is_null());

    // Probes ask gRPC health on the gRPC port; the drain starts after a preStop pause.
    let grpc_port = config.listen_addr().expect("addr").port();
    let ports = sequence(&container["ports"]);
    let port_named =
        |name: &str| ports.iter().find(|p| p["name"].as_str() == Some(name)).and_then(|p| p["containerPort"].as_u64());
    assert_eq!(port_named("grpc"), Some(u64::from(grpc_port)));
    assert_eq!(port_named("metrics").map(|p| p.to_string()), config.server.metrics_listen.rsplit(':').next().map(str::to_owned));
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(container[probe]["grpc"]["port"].as_u64(), Some(u64::from(grpc_port)), "{probe}");
    }
    assert!(!container["lifecycle"]["preStop"].is_null());
    let termination = pod["spec"]["terminationGracePeriodSeconds"].as_u64().expect("termination grace");
    assert!(termination > u64::from(config.server.shutdown_grace_seconds) + 5, "the drain fits in the termination grace");
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"].as_bool(), Some(true));

    // Service, PDB and HPA point at these pods.
    let selects_pods = |selector: &Value| {
        selector.as_mapping().expect("selector").iter().all(|(key, value)| labels.get(key.as_str().expect("key")) == Some(value))
    };
    let service = manifests.find("Service", "pushmatch");
    assert!(selects_pods(&service["spec"]["selector"]));
    for port in sequence(&service["spec"]["ports"]) {
        assert!(port_named(port["targetPort"].as_str().expect("named target port")).is_some());
    }
    assert!(selects_pods(&manifests.find("PodDisruptionBudget", "pushmatch")["spec"]["selector"]["matchLabels"]));
    assert!(selects_pods(&deployment["spec"]["selector"]["matchLabels"]));
    let hpa = manifests.find("HorizontalPodAutoscaler", "pushmatch");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"].as_str(), Some("Deployment"));
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"].as_str(), Some("pushmatch"));
    assert!(hpa["spec"]["minReplicas"].as_u64() >= Some(2), "two pods at least, so the PDB can let one go");

    // The Redis of redis.yaml is the one the configuration names: AOF on, noeviction.
    let redis_service = manifests.find("Service", "pushmatch-redis");
    assert!(config.store.redis_url.contains(redis_service["metadata"]["name"].as_str().expect("name")));
    let redis = manifests.find("StatefulSet", "pushmatch-redis");
    let args: Vec<&str> =
        sequence(&redis["spec"]["template"]["spec"]["containers"][0]["args"]).iter().filter_map(Value::as_str).collect();
    let flag = |name: &str| args.iter().position(|arg| *arg == name).map(|i| args[i + 1]);
    assert_eq!(flag("--appendonly"), Some("yes"));
    assert_eq!(flag("--maxmemory-policy"), Some("noeviction"));
}
