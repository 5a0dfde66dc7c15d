//! `pushmatch phone`: an authenticator app on the command line, for developers
//! without a phone. It keeps its key and device id in a state file and signs its
//! calls as an app must (docs/device-proofs.md).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use tonic::Status;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::state::PhoneState;
use super::{P256Encoding, PhoneKey, SimulatedPhone, qr::decode_qr_png};
use crate::domain::time::{Clock as _, SystemClock};
use crate::domain::totp;
use crate::pb;

#[derive(Args)]
pub struct PhoneArgs {
    /// The file that keeps the device's id, private key and TOTP secret (written
    /// with mode 0600; never share it).
    #[arg(long, global = true, default_value = "pushmatch-phone.json")]
    pub state: PathBuf,
    /// The server to call (http://host:port or https://…) instead of the
    /// enrollment URI's `server`.
    #[arg(long, global = true)]
    pub server: Option<String>,
    /// A PEM CA certificate to trust for an https:// server (default: the public webpki roots).
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    #[command(subcommand)]
    pub command: PhoneCommand,
}

#[derive(Subcommand)]
pub enum PhoneCommand {
    /// Enrolls with a `pushmatch://enroll?…` URI or a PNG of its QR code.
    Enroll {
        /// The enrollment URI.
        #[arg(required_unless_present = "qr", conflicts_with = "qr")]
        uri: Option<String>,
        /// A PNG image of the QR code (BeginEnrollment's qr_png, or a screenshot).
        #[arg(long)]
        qr: Option<PathBuf>,
        /// An Ed25519 key instead of P-256.
        #[arg(long)]
        ed25519: bool,
        /// How to send the P-256 public key.
        #[arg(long, value_enum, default_value_t = KeyEncoding::Sec1Uncompressed)]
        key_encoding: KeyEncoding,
        /// Sign in ASN.1 DER (as iOS does) rather than raw r||s (P-256).
        #[arg(long)]
        der: bool,
        #[arg(long, value_enum, default_value_t = PlatformArg::Fcm)]
        platform: PlatformArg,
        /// The push token to register (default: a made-up one; pushes to it fail,
        /// and `pending` pulls instead).
        #[arg(long)]
        push_token: Option<String>,
        /// The device name the IdP shows.
        #[arg(long, default_value = "pushmatch phone (command line)")]
        name: String,
        /// Replace an existing state file (its key is lost).
        #[arg(long)]
        force: bool,
    },
    /// Lists the challenges waiting for an answer.
    Pending,
    /// Approves the pending challenge with the number shown on the sign-in page.
    Approve {
        number: String,
        /// The challenge to answer when several are pending.
        #[arg(long)]
        challenge: Option<String>,
    },
    /// Denies the pending challenge.
    Deny {
        #[arg(long)]
        challenge: Option<String>,
    },
    /// Reports the pending challenge as fraud ("this wasn't me"): the user is blocked.
    Fraud {
        #[arg(long)]
        challenge: Option<String>,
    },
    /// Prints the current TOTP code.
    Code,
    /// Forgets the device: deletes the state file. With --api-key, first removes
    /// the device on the server too (RemoveDevice, as the IdP's "my devices" page does).
    Remove {
        /// The tenant API key, for RemoveDevice.
        #[arg(long, env = "PUSHMATCH_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum KeyEncoding {
    Sec1Uncompressed,
    Sec1Compressed,
    Spki,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PlatformArg {
    Fcm,
    Apns,
}

/// Runs one `pushmatch phone` command.
pub async fn run(args: PhoneArgs) -> anyhow::Result<()> {
    match args.command {
        PhoneCommand::Enroll { ref uri, ref qr, ed25519, key_encoding, der, platform, ref push_token, ref name, force } => {
            let uri = match (uri, qr) {
                (Some(uri), _) => uri.clone(),
                (None, Some(path)) => {
                    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
                    decode_qr_png(&bytes).with_context(|| format!("{}", path.display()))?
                }
                (None, None) => anyhow::bail!("give the enrollment URI or --qr FILE.png"),
            };
            if args.state.exists() && !force {
                anyhow::bail!(
                    "{} exists (a device enrolled already): remove it first, pass --force, or use another --state",
                    args.state.display()
                );
            }
            let key = if ed25519 {
                PhoneKey::ed25519()
            } else {
                let encoding = match key_encoding {
                    KeyEncoding::Sec1Uncompressed => P256Encoding::Sec1Uncompressed,
                    KeyEncoding::Sec1Compressed => P256Encoding::Sec1Compressed,
                    KeyEncoding::Spki => P256Encoding::Spki,
                };
                match PhoneKey::p256(encoding) {
                    PhoneKey::P256 { key, encoding, .. } => PhoneKey::P256 { key, encoding, der_signatures: der },
                    other => other,
                }
            };
            enroll(&args, &uri, key, platform, push_token.clone(), name).await
        }
        PhoneCommand::Pending => pending(&args).await,
        PhoneCommand::Approve { ref number, ref challenge } => {
            respond(&args, challenge.as_deref(), pb::Decision::Approve, number).await
        }
        PhoneCommand::Deny { ref challenge } => respond(&args, challenge.as_deref(), pb::Decision::Deny, "").await,
        PhoneCommand::Fraud { ref challenge } => respond(&args, challenge.as_deref(), pb::Decision::ReportFraud, "").await,
        PhoneCommand::Code => code(&args),
        PhoneCommand::Remove { ref api_key } => remove(&args, api_key.as_deref()).await,
    }
}

/// A query parameter of the enrollment URI, percent-decoded.
fn uri_param(uri: &str, name: &str) -> Option<String> {
    let query = uri.strip_prefix("pushmatch://enroll?")?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
        .map(|value| percent_encoding::percent_decode_str(value).decode_utf8_lossy().into_owned())
}

async fn connect(server: &str, ca: Option<&std::path::Path>) -> anyhow::Result<Channel> {
    let mut endpoint = Endpoint::from_shared(server.to_owned())
        .with_context(|| format!("{server:?} is not a server address (http://host:port or https://…)"))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30));
    if server.starts_with("https://") {
        let tls = match ca {
            Some(path) => {
                let pem = std::fs::read(path).with_context(|| format!("cannot read the CA certificate {}", path.display()))?;
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
            }
            None => ClientTlsConfig::new().with_webpki_roots(),
        };
        endpoint = endpoint.tls_config(tls).context("cannot set up TLS")?;
    } else if ca.is_some() {
        anyhow::bail!("--ca is for https:// servers; {server} is plain http");
    }
    endpoint.connect().await.with_context(|| format!("cannot reach {server}"))
}

/// A failed call as the user should read it: the RPC, the gRPC code, the server's message.
fn failed(rpc: &str, status: &Status) -> anyhow::Error {
    anyhow::anyhow!("{rpc} failed: {:?}: {}", status.code(), status.message())
}

async fn enroll(
    args: &PhoneArgs,
    uri: &str,
    key: PhoneKey,
    platform: PlatformArg,
    push_token: Option<String>,
    name: &str,
) -> anyhow::Result<()> {
    let code = super::enrollment_code_from_uri(uri).context("not a pushmatch://enroll?… URI with a code")?;
    let server = match (args.server.clone(), uri_param(uri, "server")) {
        (Some(server), _) | (None, Some(server)) => server,
        (None, None) => anyhow::bail!("the URI names no server; pass --server"),
    };
    let (platform, platform_name) = match platform {
        PlatformArg::Fcm => (pb::Platform::Fcm, "fcm"),
        PlatformArg::Apns => (pb::Platform::Apns, "apns"),
    };
    let push_token = match push_token {
        Some(token) => token,
        None => {
            let mut random = [0u8; 32];
            crate::domain::ids::os_random(&mut random)?;
            match platform {
                pb::Platform::Apns => hex::encode(random),
                _ => format!("pushmatch-phone-{}", hex::encode(&random[..8])),
            }
        }
    };
    let channel = connect(&server, args.ca.as_deref()).await?;
    let mut phone = SimulatedPhone::new(channel, key.clone(), platform, push_token.clone());
    let response = phone.enroll_with_code(&code, name).await.map_err(|s| failed("CompleteEnrollment", &s))?;
    let (key_algorithm, private_key_hex, public_key_encoding, der_signatures) = PhoneState::from_key(&key);
    let state = PhoneState {
        server,
        // Absolute, so that later commands find it from any folder.
        ca: args.ca.as_ref().map(|path| std::fs::canonicalize(path).unwrap_or_else(|_| path.clone())),
        device_id: response.device_id.clone(),
        key_algorithm,
        private_key_hex,
        public_key_encoding,
        der_signatures,
        platform: platform_name.into(),
        push_token,
        account_name: response.account_name.clone(),
        issuer: response.issuer.clone(),
        totp_secret_base32: (!response.totp_secret.is_empty()).then(|| data_encoding::BASE32_NOPAD.encode(&response.totp_secret)),
    };
    state.save(&args.state)?;
    println!("enrolled {} for {} ({})", response.device_id, response.account_name, response.issuer);
    println!("state saved in {} (it holds the private key: keep it private)", args.state.display());
    Ok(())
}

/// The saved phone, connected to its server (or --server).
async fn saved_phone(args: &PhoneArgs) -> anyhow::Result<(PhoneState, SimulatedPhone)> {
    let state = PhoneState::load(&args.state)?;
    let server = args.server.clone().unwrap_or_else(|| state.server.clone());
    let ca = args.ca.clone().or_else(|| state.ca.clone());
    let channel = connect(&server, ca.as_deref()).await?;
    let phone = SimulatedPhone::enrolled(channel, state.key()?, state.platform(), state.push_token.clone(), &state.device_id);
    Ok((state, phone))
}

async fn pending(args: &PhoneArgs) -> anyhow::Result<()> {
    let (_, mut phone) = saved_phone(args).await?;
    let challenges = phone.pending().await.map_err(|s| failed("ListPendingChallenges", &s))?;
    if challenges.is_empty() {
        println!("no pending challenge");
    }
    let now = SystemClock.now().0 / 1000;
    for challenge in challenges {
        let context = challenge.context.unwrap_or_default();
        let expires_in = challenge.expires_at.map_or(0, |at| at.seconds - now).max(0);
        println!(
            "{}  {} ({})  application {:?}  from {:?} {:?}  browser {:?}  expires in {expires_in} s",
            challenge.challenge_id,
            challenge.account_name,
            challenge.issuer,
            context.application,
            context.ip_address,
            context.location,
            context.user_agent,
        );
    }
    Ok(())
}

async fn respond(args: &PhoneArgs, challenge: Option<&str>, decision: pb::Decision, number: &str) -> anyhow::Result<()> {
    let (_, mut phone) = saved_phone(args).await?;
    let challenge_id = match challenge {
        Some(id) => id.to_owned(),
        None => {
            let pending = phone.pending().await.map_err(|s| failed("ListPendingChallenges", &s))?;
            match pending.as_slice() {
                [] => anyhow::bail!("no pending challenge to answer"),
                [one] => one.challenge_id.clone(),
                several => anyhow::bail!(
                    "{} challenges are pending ({}): pick one with --challenge ID",
                    several.len(),
                    several.iter().map(|c| c.challenge_id.as_str()).collect::<Vec<_>>().join(", ")
                ),
            }
        }
    };
    let response = phone.respond(&challenge_id, decision, number).await.map_err(|s| failed("RespondToChallenge", &s))?;
    let state = response.state().as_str_name().trim_start_matches("CHALLENGE_STATE_");
    let outcome = match response.deny_reason() {
        pb::DenyReason::Unspecified => state.to_owned(),
        reason => format!("{state} ({})", reason.as_str_name().trim_start_matches("DENY_REASON_")),
    };
    if !response.accepted {
        anyhow::bail!("{challenge_id} had ended already: {outcome}; the answer changed nothing");
    }
    println!("{challenge_id}: {outcome}");
    if decision == pb::Decision::Approve && response.state() != pb::ChallengeState::Approved {
        anyhow::bail!("not approved: {outcome}");
    }
    Ok(())
}

fn code(args: &PhoneArgs) -> anyhow::Result<()> {
    let state = PhoneState::load(&args.state)?;
    let secret = state.totp_secret_base32.as_deref().context("this enrollment came without a TOTP secret")?;
    let secret = data_encoding::BASE32_NOPAD.decode(secret.as_bytes()).context("totp_secret_base32 is not base32")?;
    let now = SystemClock.now();
    let step = totp::step_at(now);
    let left = totp::STEP_SECONDS - u64::try_from(now.as_unix_seconds()).unwrap_or(0) % totp::STEP_SECONDS;
    println!("{}", totp::code_for_step(&secret, step));
    eprintln!("valid for another {left} s");
    Ok(())
}

async fn remove(args: &PhoneArgs, api_key: Option<&str>) -> anyhow::Result<()> {
    let state = PhoneState::load(&args.state)?;
    if let Some(api_key) = api_key {
        let server = args.server.clone().unwrap_or_else(|| state.server.clone());
        let ca = args.ca.clone().or_else(|| state.ca.clone());
        let channel = connect(&server, ca.as_deref()).await?;
        let bearer: tonic::metadata::MetadataValue<_> =
            format!("Bearer {api_key}").parse().map_err(|_| anyhow::anyhow!("the API key is not printable ASCII"))?;
        let mut client = pb::enrollment_service_client::EnrollmentServiceClient::with_interceptor(
            channel,
            move |mut request: tonic::Request<()>| {
                request.metadata_mut().insert("authorization", bearer.clone());
                Ok(request)
            },
        );
        client
            .remove_device(pb::RemoveDeviceRequest { device_id: state.device_id.clone() })
            .await
            .map_err(|s| failed("RemoveDevice", &s))?;
        println!("{} removed on the server", state.device_id);
    }
    std::fs::remove_file(&args.state).with_context(|| format!("cannot delete {}", args.state.display()))?;
    println!("{} deleted: the device's key is gone", args.state.display());
    if api_key.is_none() {
        println!("the server still lists {}: remove it there (RemoveDevice) or pass --api-key", state.device_id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn uri_parameters_are_percent_decoded() {
        let uri = "pushmatch://enroll?v=1&server=http%3A%2F%2F127.0.0.1%3A50051&code=00ff&issuer=Gors&account=jan";
        assert_eq!(super::uri_param(uri, "server").as_deref(), Some("http://127.0.0.1:50051"));
        assert_eq!(super::uri_param(uri, "v").as_deref(), Some("1"));
        assert_eq!(super::uri_param(uri, "serverx"), None);
        assert_eq!(super::uri_param("otpauth://totp/x?server=y", "server"), None);
    }
}
