//! Authentication, once for every call: [`TenantAuthLayer`] is the tower layer in
//! front of the services. For the IdP's services (`ChallengeService`,
//! `EnrollmentService`) it reads `authorization: Bearer <API key>`, finds the
//! key's tenant ([`TenantKeys`], constant-time over digests), and, with mutual TLS,
//! checks that the connection's verified client certificate names that tenant.
//! The tenant then rides in the request's extensions as [`AuthenticatedTenant`];
//! handlers read it with [`tenant_of`] and never see a key.
//!
//! `DeviceService` is authorised per call by the device's proof (or the enrollment
//! code), and health and reflection stay open, so the layer passes them through.
//!
//! Mutual TLS (`server.tls_client_ca_path`): phones have no client certificates,
//! so the handshake only *asks* for one (`crate::tls`); here a call to the IdP's
//! services over a connection without a verified certificate is refused
//! (UNAUTHENTICATED). A certificate may name tenants: each URI subject alternative
//! name `urn:pushmatch:tenant:<tenant id>` names one, and then the call's API key
//! must belong to one of them. A certificate that names no tenant serves any
//! tenant's key.

use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures::future::Either;
use http::{Request, Response};
use tonic::Status;
use tower::{Layer, Service};

pub use crate::domain::api_key::TenantKeys;
use crate::domain::ids::TenantId;
use crate::tls::TlsConnectInfo;

/// The services whose calls carry an API key: the IdP's side.
const IDP_SERVICE_PREFIXES: [&str; 2] = ["/pushmatch.v1.ChallengeService/", "/pushmatch.v1.EnrollmentService/"];

/// The tenant a call authenticated as; put in the request's extensions by
/// [`TenantAuthLayer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthenticatedTenant(pub TenantId);

/// The tenant [`TenantAuthLayer`] found for this call. Only the IdP's services
/// call it, and the layer runs in front of every one of them.
pub fn tenant_of<T>(request: &tonic::Request<T>) -> Result<TenantId, Status> {
    request
        .extensions()
        .get::<AuthenticatedTenant>()
        .map(|tenant| tenant.0.clone())
        .ok_or_else(|| Status::unauthenticated("authorization: missing; send `authorization: Bearer <API key>`"))
}

/// The key in `authorization: Bearer <key>`, or why there is none.
fn bearer_key(headers: &http::HeaderMap) -> Result<&str, Status> {
    let header = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(|| Status::unauthenticated("authorization: missing; send `authorization: Bearer <API key>`"))?;
    header
        .to_str()
        .ok()
        .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|key| !key.is_empty())
        .ok_or_else(|| Status::unauthenticated("authorization: expected `Bearer <API key>`"))
}

/// Checks every call to the IdP's services; see the module docs.
#[derive(Clone)]
pub struct TenantAuthLayer {
    keys: Arc<ArcSwap<TenantKeys>>,
    mutual_tls: bool,
}

impl TenantAuthLayer {
    /// `keys` may be replaced while serving (a configuration reload): each call
    /// checks against the keys in force when it arrives.
    pub fn new(keys: Arc<ArcSwap<TenantKeys>>, mutual_tls: bool) -> Self {
        Self { keys, mutual_tls }
    }

    /// The call's tenant, or the refusal to send instead of calling the service.
    fn authenticate<B>(&self, request: &Request<B>) -> Result<TenantId, Status> {
        let client = if self.mutual_tls {
            let client = request.extensions().get::<TlsConnectInfo>().and_then(|info| info.client.clone()).ok_or_else(|| {
                Status::unauthenticated(
                    "this service requires a client certificate (mutual TLS) issued by the configured client CA",
                )
            })?;
            Some(client)
        } else {
            None
        };
        let key = bearer_key(request.headers())?;
        let tenant = self.keys.load().tenant_of(key).ok_or_else(|| Status::unauthenticated("authorization: unknown API key"))?;
        if let Some(client) = client
            && !client.allows(&tenant)
        {
            tracing::warn!(tenant = %tenant, "API key used with a client certificate of another tenant");
            return Err(Status::unauthenticated("the client certificate does not name this API key's tenant"));
        }
        Ok(tenant)
    }
}

impl<S> Layer<S> for TenantAuthLayer {
    type Service = TenantAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TenantAuth { inner, auth: self.clone() }
    }
}

#[derive(Clone)]
pub struct TenantAuth<S> {
    inner: S,
    auth: TenantAuthLayer,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for TenantAuth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Either<std::future::Ready<Result<Response<ResBody>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        if IDP_SERVICE_PREFIXES.iter().any(|prefix| path.starts_with(prefix)) {
            match self.auth.authenticate(&request) {
                Ok(tenant) => {
                    request.extensions_mut().insert(AuthenticatedTenant(tenant));
                }
                Err(refusal) => return Either::Left(std::future::ready(Ok(refusal.into_http()))),
            }
        }
        Either::Right(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::api_key::api_key_digest_hex;

    fn layer() -> TenantAuthLayer {
        let (a, b) = ([api_key_digest_hex("key-a")], [api_key_digest_hex("key-b")]);
        let keys = TenantKeys::new([(TenantId("a".into()), &a[..]), (TenantId("b".into()), &b[..])]);
        TenantAuthLayer::new(Arc::new(ArcSwap::from_pointee(keys)), false)
    }

    fn call(authorization: Option<&str>) -> Request<()> {
        let mut builder = Request::builder().uri("/pushmatch.v1.ChallengeService/GetChallenge");
        if let Some(value) = authorization {
            builder = builder.header("authorization", value);
        }
        builder.body(()).expect("request")
    }

    #[test]
    fn keys_name_their_tenant() {
        assert_eq!(layer().authenticate(&call(Some("Bearer key-b"))).expect("known"), TenantId("b".into()));
        assert_eq!(layer().authenticate(&call(Some("bearer key-a"))).expect("known"), TenantId("a".into()));
    }

    #[test]
    fn missing_malformed_and_unknown_keys_are_unauthenticated() {
        for value in [None, Some("key-a"), Some("Bearer "), Some("Basic a2V5LWE="), Some("Bearer key-c")] {
            let error = layer().authenticate(&call(value)).expect_err("refused");
            assert_eq!(error.code(), tonic::Code::Unauthenticated);
            assert!(!error.message().contains("key-"), "the key is not echoed back");
        }
    }

    #[test]
    fn with_mutual_tls_a_call_without_a_client_certificate_is_refused() {
        let layer = TenantAuthLayer { mutual_tls: true, ..layer() };
        let error = layer.authenticate(&call(Some("Bearer key-a"))).expect_err("no certificate");
        assert!(error.message().contains("client certificate"));
    }
}
