//! The `pushmatch` binary: a thin CLI over the library.

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use pushmatch::config::{CONFIG_FILE_VAR, Config, DEVELOPMENT_TENANT};

/// jemalloc rather than the system's malloc: over an hour of steady sign-ins it held
/// the broker's RSS some 45 MB lower than glibc's malloc did, and its creep after
/// the first 20 minutes went from 5 % to 2 %; built with a background thread that
/// returns freed pages (`.cargo/config.toml`), the RSS stays flat once the store is
/// full (BENCHMARKS.md, issue 19). Its counters
/// give `/metrics` the heap's own figures (`pushmatch_heap_allocated_bytes`,
/// `pushmatch_heap_resident_bytes`), which tell a growing heap from an allocator
/// that keeps freed pages.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's counters, refreshed (its statistics are a snapshot taken at each
/// `epoch` advance).
#[cfg(not(target_env = "msvc"))]
fn heap_stats() -> Option<pushmatch::telemetry::metrics::HeapStats> {
    use tikv_jemalloc_ctl::{epoch, stats};
    epoch::advance().ok()?;
    let allocated = u64::try_from(stats::allocated::read().ok()?).ok()?;
    let resident = u64::try_from(stats::resident::read().ok()?).ok()?;
    Some(pushmatch::telemetry::metrics::HeapStats { allocated, resident })
}

#[derive(Parser)]
#[command(name = "pushmatch", version, about = "Push-notification challenge broker for multi-factor sign-in")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the broker. With no configuration file: 127.0.0.1:50051, the embedded
    /// store in ./pushmatch-data, and the development tenant.
    Serve {
        /// The TOML configuration file.
        #[arg(long, env = CONFIG_FILE_VAR)]
        config: Option<PathBuf>,
    },
    /// Walks through enrolling a phone and approving a sign-in, all in one process.
    Demo,
    /// Prints the SHA-256 of an API key (read from standard input) for
    /// `[[tenants]] api_key_sha256`; with --generate, makes a new key first. A key
    /// under 128 bits (fewer than 32 characters of A-Z a-z 0-9 - _) is refused.
    HashKey {
        #[arg(long)]
        generate: bool,
    },
    /// An authenticator app on the command line, for developers without a phone:
    /// enroll, pending, approve NUMBER, deny, fraud, code, remove.
    Phone(pushmatch::phone::cli::PhoneArgs),
    /// Removes everything the store holds of a tenant that was removed from the
    /// configuration (devices, enrollments, challenges, blocks); --dry-run counts
    /// only. Refuses a tenant still configured. The embedded store must not be in
    /// use by a running server; the Redis store may be.
    PurgeTenant {
        /// The tenant's id, as it was in `[[tenants]] id`.
        tenant: String,
        /// Count what would go, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// The TOML configuration file (for the store).
        #[arg(long, env = CONFIG_FILE_VAR)]
        config: Option<PathBuf>,
    },
    /// Prints the public VAPID key of `[push.webpush]` (base64url): the
    /// `applicationServerKey` browsers and UnifiedPush clients subscribe with.
    WebpushKey {
        /// The TOML configuration file.
        #[arg(long, env = CONFIG_FILE_VAR)]
        config: Option<PathBuf>,
    },
    /// Exits 0 when the server's `/healthz` answers 200 (for container health checks).
    Healthcheck {
        /// The TOML configuration file, for `server.metrics_listen`.
        #[arg(long, env = CONFIG_FILE_VAR)]
        config: Option<PathBuf>,
        /// The metrics address to ask instead (host:port).
        #[arg(long)]
        addr: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::Demo => {
            let runtime = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
            runtime.block_on(pushmatch::demo::run())?;
            Ok(())
        }
        Command::HashKey { generate } => hash_key(generate),
        Command::Phone(args) => {
            let runtime = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
            runtime.block_on(pushmatch::phone::cli::run(args))
        }
        Command::Healthcheck { config, addr } => healthcheck(config, addr),
        Command::PurgeTenant { tenant, dry_run, config } => purge_tenant(config, &tenant, dry_run),
        Command::WebpushKey { config } => webpush_key(config),
    }
}

/// `pushmatch webpush-key`: the public half of the configured VAPID key.
fn webpush_key(file: Option<PathBuf>) -> anyhow::Result<()> {
    let loaded = Config::load(file.as_deref(), std::env::vars())?;
    let webpush = loaded.config.push.webpush.as_ref().context("the configuration has no [push.webpush] section")?;
    let path = &webpush.vapid_private_key_path;
    let pem = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read it", path.display()))?;
    let keys = pushmatch::push::webpush::vapid::VapidKeys::from_pkcs8_pem(&pem, &webpush.subject)
        .map_err(|message| anyhow::anyhow!("{}: {message}", path.display()))?;
    println!("{}", keys.public_key());
    Ok(())
}

/// `pushmatch purge-tenant`: prints what was found (and removed, unless a dry run).
fn purge_tenant(file: Option<PathBuf>, tenant: &str, dry_run: bool) -> anyhow::Result<()> {
    let loaded = Config::load(file.as_deref(), std::env::vars())?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    let purged = runtime.block_on(pushmatch::server::admin::purge_tenant(&loaded.config, tenant, dry_run))?;
    let verb = if dry_run { "would remove (dry run, nothing removed)" } else { "removed" };
    println!(
        "tenant {tenant}: {verb} {} users, {} devices, {} enrollments, {} challenges",
        purged.users, purged.devices, purged.enrollments, purged.challenges
    );
    Ok(())
}

/// Asks the running server's `/healthz` (the container's HEALTHCHECK: the runtime
/// image has no shell and no curl).
fn healthcheck(file: Option<PathBuf>, addr: Option<String>) -> anyhow::Result<()> {
    let addr = match addr {
        Some(addr) => addr,
        None => Config::load(file.as_deref(), std::env::vars())?.config.server.metrics_listen,
    };
    anyhow::ensure!(!addr.is_empty(), "server.metrics_listen is \"\": no /healthz to ask");
    let addr: std::net::SocketAddr = addr.parse().with_context(|| format!("{addr:?} is not an address"))?;
    pushmatch::server::ops::check_health(addr, std::time::Duration::from_secs(3))?;
    Ok(())
}

fn serve(file: Option<PathBuf>) -> anyhow::Result<()> {
    // Only the PUSHMATCH_* variables: the rest of the environment (other programs'
    // secrets among it) is not kept for the reloads.
    let env: Vec<(String, String)> = std::env::vars().filter(|(key, _)| key.starts_with("PUSHMATCH_")).collect();
    let loaded = Config::load(file.as_deref(), env.clone())?;
    // The runtime comes first: the OTLP exporter's channel (feature `otlp`) lives on it.
    let runtime = pushmatch::server::runtime(&loaded.config.server).context("cannot start the tokio runtime")?;
    #[cfg(not(target_env = "msvc"))]
    pushmatch::telemetry::metrics::set_heap_probe(heap_stats);
    let traces = {
        let _inside = runtime.enter();
        pushmatch::telemetry::init_with_traces(&loaded.config.log, &loaded.config.tracing)?
    };
    if loaded.development {
        tracing::warn!(
            tenant = DEVELOPMENT_TENANT,
            "no configuration file: development mode with the embedded store and the development tenant \
             (its API key is in the README); never expose this"
        );
    }
    for (section, configured) in
        [("[push.apns]", loaded.config.push.apns.is_some()), ("[push.fcm]", loaded.config.push.fcm.is_some())]
    {
        if !configured {
            tracing::warn!(
                section,
                "no push provider configured: its deliveries read FAILED / \"not configured\" (apps still pull)"
            );
        }
    }
    let served = runtime.block_on(async {
        let addr = loaded.config.listen_addr()?;
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let mut dependencies = pushmatch::server::Dependencies::from_config(&loaded.config).await?;
        // The tenants in the file are reloaded on SIGHUP and when it changes.
        dependencies.config_source = file.map(|file| pushmatch::server::ConfigSource { file, env });
        pushmatch::server::run_with(listener, loaded.config, dependencies, shutdown_signal()).await?;
        anyhow::Ok(())
    });
    // The last spans go out through the exporter's channel, whose tasks run on the
    // runtime: on one thread (`server.worker_threads = 1`) only inside block_on, so
    // the flush (which blocks) is made from there.
    runtime.block_on(async move {
        if tokio::task::spawn_blocking(move || drop(traces)).await.is_err() {
            tracing::error!("the span exporter's flush panicked");
        }
    });
    served
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

fn hash_key(generate: bool) -> anyhow::Result<()> {
    let key = if generate {
        let mut bytes = [0u8; 32];
        pushmatch::domain::ids::os_random(&mut bytes)?;
        let key = data_encoding::BASE64URL_NOPAD.encode(&bytes);
        println!("api key:        {key}");
        key
    } else {
        let mut key = String::new();
        std::io::stdin().read_to_string(&mut key).context("cannot read the key from standard input")?;
        key.trim().to_owned()
    };
    anyhow::ensure!(!key.is_empty(), "no key on standard input (or use --generate)");
    if let Err(weakness) = pushmatch::domain::api_key::check_key_strength(&key) {
        anyhow::bail!("refused: {weakness}");
    }
    println!("api_key_sha256: {}", pushmatch::domain::api_key::api_key_digest_hex(&key));
    Ok(())
}
