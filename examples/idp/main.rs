//! `cargo run --example idp`: reference identity-provider pages for pushmatch.
//!
//! A small web app that talks to a running pushmatch over gRPC the way an IdP's
//! backend does: the security-info page (add the authenticator app by QR code,
//! then try it), the sign-in page (the number, the live outcome, a verification
//! code instead) and "my devices". Dutch or English from the browser's
//! `Accept-Language`. Start `pushmatch serve` (development mode) first; the
//! defaults here match it.
//!
//! This is a reference for the calls and the screens, not a complete IdP: the
//! user name typed on the page stands in for the signed-in session a real IdP
//! has, so run it on loopback only.

mod app;

use clap::Parser;
use tonic::transport::Endpoint;

#[derive(Parser)]
#[command(about = "Reference IdP pages (setup, sign-in, my devices) for a running pushmatch")]
struct Args {
    /// pushmatch's gRPC address.
    #[arg(long, env = "PUSHMATCH_URL", default_value = "http://127.0.0.1:50051")]
    pushmatch_url: String,
    /// The tenant's API key (the default is `serve`'s development key).
    #[arg(long, env = "PUSHMATCH_API_KEY", default_value = "pushmatch-dev-key", hide_env_values = true)]
    api_key: String,
    /// Where the pages are served.
    #[arg(long, env = "IDP_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new("info")).init();
    let args = Args::parse();
    let channel = Endpoint::from_shared(args.pushmatch_url.clone())?.connect_lazy();
    let idp = app::Idp::new(channel, &args.api_key)?;
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let addr = listener.local_addr()?;
    // The address only: never the API key.
    tracing::info!(pushmatch = %args.pushmatch_url, "IdP pages on http://{addr}/");
    println!("Open http://{addr}/ (pushmatch at {})", args.pushmatch_url);
    axum::serve(listener, app::router(idp)).await?;
    Ok(())
}
