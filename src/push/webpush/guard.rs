//! The endpoint of a Web Push subscription comes from a device, so pushmatch must
//! not be made to send requests into the network it runs in (server-side request
//! forgery): to the cloud's metadata service at 169.254.169.254, to an admin port on
//! 10.0.0.1, to a Redis on localhost.
//!
//! The rules, checked at enrollment (and UpdatePushToken) and again at each send:
//! - `https` only, no user name or password in the URL;
//! - no host that is, or resolves to, an address outside the public internet:
//!   private (RFC 1918, unique local), loopback, link-local, shared (CGNAT),
//!   documentation, benchmarking, multicast or reserved ranges, IPv4 inside IPv6
//!   included ([`is_public`]); a name with any such address is refused whole;
//! - no `localhost` name;
//! - within `push.webpush.allowed_hosts` when that is set.
//!
//! At send time the connection goes only to addresses checked here: the HTTP
//! client's resolver is [`PublicResolver`], so a name that resolved to a public
//! address at enrollment and to a private one since (DNS rebinding) is refused, not
//! connected. Redirects are not followed. `insecure_allow_loopback` (tests only)
//! lets loopback addresses through for a mock push service on this machine.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::dns::Name;

/// How long a name may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);
/// Lookups at once: each is `getaddrinfo` on a blocking thread, which a timeout
/// does not stop, so names whose DNS servers stall cannot take every thread.
const MAX_LOOKUPS: usize = 32;
static LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_LOOKUPS);

/// What a refused name is told: the same for a name that does not resolve and for
/// one that resolves inside, so a device cannot map internal names through the
/// broker (the detail is logged at debug level, host only).
fn not_public(host: &str) -> String {
    format!("host {host} is not a reachable public push service")
}

/// The host's addresses, at most [`MAX_LOOKUPS`] lookups at once, within
/// [`RESOLVE_TIMEOUT`] (waiting for a turn included).
async fn lookup(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let found = tokio::time::timeout(RESOLVE_TIMEOUT, async {
        let _turn = LOOKUPS.acquire().await.map_err(|_| "closed".to_owned())?;
        tokio::net::lookup_host((host, port)).await.map(Iterator::collect::<Vec<_>>).map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|_| Err("timed out".into()));
    found.map_err(|error| {
        tracing::debug!(host, %error, "web push host did not resolve");
        not_public(host)
    })
}

/// Which endpoints are allowed, from `[push.webpush]`.
#[derive(Clone, Debug, Default)]
pub struct EndpointPolicy {
    /// Push services' host names (lower case): an entry `push.example.net` allows
    /// that host, `*.example.net` any host under it. Empty: any public host.
    pub allowed_hosts: Vec<String>,
    /// Tests only: loopback addresses (and `localhost`) are allowed.
    pub allow_loopback: bool,
}

impl EndpointPolicy {
    fn allows_host(&self, host: &str) -> bool {
        self.allowed_hosts.is_empty()
            || self.allowed_hosts.iter().any(|allowed| match allowed.strip_prefix("*.") {
                Some(domain) => host.strip_suffix(domain).is_some_and(|sub| sub.ends_with('.') && sub.len() > 1),
                None => host == allowed,
            })
    }

    fn allows_address(&self, ip: IpAddr) -> bool {
        is_public(ip) || (self.allow_loopback && ip.is_loopback())
    }
}

/// Whether `ip` is an address of the public internet (see the module's rules).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0                                    // "this network"
        || a == 10                              // private
        || a == 127                             // loopback
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 169 && b == 254)               // link-local, cloud metadata services
        || (a == 172 && (16..32).contains(&b))  // private
        || (a == 192 && b == 0 && c == 0)       // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2)       // documentation
        || (a == 192 && b == 88 && c == 99)     // 6to4 relay anycast
        || (a == 192 && b == 168)               // private
        || (a == 198 && (b == 18 || b == 19))   // benchmarking
        || (a == 198 && b == 51 && c == 100)    // documentation
        || (a == 203 && b == 0 && c == 113)     // documentation
        || a >= 224) // multicast, reserved, broadcast
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let segments = ip.segments();
    // An IPv4 address carried inside IPv6 is judged as that address: mapped
    // (::ffff:a.b.c.d), NAT64 (64:ff9b::/96) and 6to4 (2002::/16).
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_public_v4(Ipv4Addr::from((u32::from(segments[6]) << 16) | u32::from(segments[7])));
    }
    // Local-use NAT64 (64:ff9b:1::/48, RFC 8215) and SIIT (::ffff:0:0:0/96) may
    // lead into a site's private IPv4 space: refused whole.
    if segments[..3] == [0x64, 0xff9b, 1] || segments[..6] == [0, 0, 0, 0, 0xffff, 0] {
        return false;
    }
    if segments[0] == 0x2002 {
        return is_public_v4(Ipv4Addr::from((u32::from(segments[1]) << 16) | u32::from(segments[2])));
    }
    !(ip.is_unspecified()
        || ip.is_loopback()
        || segments[..6] == [0, 0, 0, 0, 0, 0]  // IPv4-compatible (deprecated)
        || (segments[0] & 0xfe00) == 0xfc00     // unique local
        || (segments[0] & 0xffc0) == 0xfe80     // link-local
        || (segments[0] & 0xffc0) == 0xfec0     // site-local (deprecated)
        || (segments[0] & 0xff00) == 0xff00     // multicast
        || (segments[0] == 0x2001 && segments[1] == 0x0db8) // documentation
        || (segments[0] & 0xfff0) == 0x3ff0                  // documentation (3fff::/20)
        || segments[0] == 0x5f00                             // SRv6 SIDs
        || (segments[0] == 0x2001 && segments[1] == 0)      // Teredo
        || segments[0] == 0x0100) // discard-only (100::/64)
}

/// The endpoint's host without IPv6 brackets, lower case.
fn host_of(uri: &Uri) -> Option<String> {
    let host = uri.host()?;
    Some(host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase())
}

/// Checks what can be checked without resolving: scheme, credentials, a literal
/// address, `localhost`, the allow-list. The error says what is wrong.
pub fn check_form(uri: &Uri, policy: &EndpointPolicy) -> Result<(), String> {
    if uri.scheme_str() != Some("https") {
        return Err("must be an https URL".into());
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    if authority.contains('@') {
        return Err("must not carry a user name or password".into());
    }
    let host = host_of(uri).filter(|host| !host.is_empty()).ok_or_else(|| "has no host".to_owned())?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        if !policy.allows_address(ip) {
            return Err(format!("{ip} is a private, loopback, link-local or reserved address"));
        }
    } else if let name = host.trim_end_matches('.')
        && (name == "localhost" || name.ends_with(".localhost"))
        && !policy.allow_loopback
    {
        return Err("must not name localhost".into());
    }
    if !policy.allows_host(&host) {
        return Err(format!("host {host} is not among push.webpush.allowed_hosts"));
    }
    Ok(())
}

/// Resolves the endpoint's host and checks every address it has; the error says
/// why it is refused (it names the host, never the URL's path: that is the
/// subscription's secret).
pub async fn resolve(uri: &Uri, policy: &EndpointPolicy) -> Result<Vec<SocketAddr>, String> {
    check_form(uri, policy)?;
    let host = host_of(uri).unwrap_or_default();
    let port = uri.port_u16().unwrap_or(443);
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let found = lookup(&host, port).await?;
    vetted(&host, found, policy)
}

fn vetted(host: &str, addresses: Vec<SocketAddr>, policy: &EndpointPolicy) -> Result<Vec<SocketAddr>, String> {
    if addresses.is_empty() || addresses.iter().any(|address| !policy.allows_address(address.ip())) {
        tracing::debug!(host, "web push host resolves to no address or to one that is not public");
        return Err(not_public(host));
    }
    Ok(addresses)
}

/// The resolver of the Web Push HTTP client: only public addresses (see the module).
#[derive(Clone)]
pub struct PublicResolver {
    pub policy: Arc<EndpointPolicy>,
}

/// Why the resolver refused a name.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(String);

impl tower::Service<Name> for PublicResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = Refused;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Refused>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Refused>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = Arc::clone(&self.policy);
        Box::pin(async move {
            let host = name.as_str().to_ascii_lowercase();
            // The connector puts the URL's port on each address.
            let found = lookup(&host, 0).await.map_err(Refused)?;
            vetted(&host, found, &policy).map(Vec::into_iter).map_err(Refused)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn refused(url: &str) -> String {
        check_form(&url.parse().expect("uri"), &EndpointPolicy::default()).expect_err(url)
    }

    #[test]
    fn private_loopback_and_link_local_addresses_are_not_public() {
        for ip in [
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "127.0.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "198.18.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "fc00::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:a00:1::",
            "2001:db8::1",
            "64:ff9b:1::a00:1",
            "::ffff:0:a00:1",
            "3fff::1",
            "5f00::1",
        ] {
            assert!(!is_public(ip.parse().expect(ip)), "{ip} is not public");
        }
        for ip in ["8.8.8.8", "142.250.74.110", "172.32.0.1", "100.128.0.1", "2a00:1450:4001::200e", "::ffff:8.8.8.8"] {
            assert!(is_public(ip.parse().expect(ip)), "{ip} is public");
        }
    }

    #[test]
    fn the_form_of_an_endpoint_is_checked_before_any_lookup() {
        assert!(refused("http://push.example.net/x").contains("https"));
        assert!(refused("https://10.0.0.1/x").contains("10.0.0.1"));
        assert!(refused("https://169.254.169.254/latest/meta-data").contains("169.254.169.254"));
        assert!(refused("https://[::1]:8443/x").contains("::1"));
        assert!(refused("https://localhost/x").contains("localhost"));
        assert!(refused("https://admin.localhost/x").contains("localhost"));
        assert!(refused("https://user:pw@push.example.net/x").contains("password"));
        assert!(check_form(&"https://push.example.net/x".parse().unwrap(), &EndpointPolicy::default()).is_ok());
        let loopback = EndpointPolicy { allow_loopback: true, ..EndpointPolicy::default() };
        assert!(check_form(&"https://127.0.0.1:8443/x".parse().unwrap(), &loopback).is_ok());
        assert!(check_form(&"https://10.0.0.1/x".parse().unwrap(), &loopback).is_err(), "loopback only");
    }

    #[test]
    fn the_allow_list_takes_hosts_and_domains() {
        let policy = EndpointPolicy {
            allowed_hosts: vec!["fcm.googleapis.com".into(), "*.push.services.mozilla.com".into()],
            allow_loopback: false,
        };
        let ok = |url: &str| check_form(&url.parse().unwrap(), &policy).is_ok();
        assert!(ok("https://fcm.googleapis.com/fcm/send/x"));
        assert!(ok("https://updates.push.services.mozilla.com/wpush/v2/x"));
        assert!(!ok("https://push.services.mozilla.com/x"), "the domain itself is not under it");
        assert!(!ok("https://evilpush.services.mozilla.com.attacker.net/x"));
        assert!(!ok("https://ntfy.sh/up123"));
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_refused() {
        let uri: Uri = "https://localhost.:8443/x".parse().unwrap();
        let refused = resolve(&uri, &EndpointPolicy::default()).await.expect_err("refused");
        assert!(refused.contains("localhost"), "{refused}");
        let mut resolver = PublicResolver { policy: Arc::new(EndpointPolicy::default()) };
        let name: Name = "localhost".parse().expect("name");
        assert!(tower::Service::call(&mut resolver, name).await.is_err());
    }
}
