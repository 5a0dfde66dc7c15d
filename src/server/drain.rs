//! The drain on SIGTERM, in an order that loses no answer:
//!
//! 1. [`Drain::start`]: new calls are refused with UNAVAILABLE by [`DrainLayer`]
//!    (health stays open, to read NOT_SERVING), and the listener closes.
//! 2. [`Drain::finish_calls`] waits until every call already admitted has
//!    returned (up to the grace period): an answer in flight lands in the store.
//! 3. Then the watch streams close ([`Drain::watches_closing`]): each reads its
//!    challenge once more and sends the final state when there is one, else ends
//!    with UNAVAILABLE (the IdP watches again elsewhere). So a watcher whose
//!    challenge an in-flight answer resolved is told before the process exits.
//!
//! The admitted calls hold a read half of one lock and the drain takes its write
//! half: a call is admitted before the drain (and waited for) or refused after it;
//! none slips between the wait and the closing of the watches.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Request, Response};
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tower::{Layer, Service};

/// Calls that stay open while the server drains: health reports NOT_SERVING.
const ALWAYS_OPEN_PREFIX: &str = "/grpc.health.v1.Health/";

/// The drain's state, shared by the server, its layer and the watch streams.
#[derive(Clone, Default)]
pub struct Drain {
    refusing: CancellationToken,
    admitted: Arc<RwLock<()>>,
    watches: CancellationToken,
}

impl Drain {
    /// Step 1: refuse every new call (but health) from now on.
    pub fn start(&self) {
        self.refusing.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.refusing.is_cancelled()
    }

    /// Step 2 and 3: waits (up to `grace`) for the calls admitted before
    /// [`Drain::start`], then tells the watch streams to close. Returns false when
    /// calls were still running at the end of `grace`.
    pub async fn finish_calls(&self, grace: Duration) -> bool {
        let finished = tokio::time::timeout(grace, self.admitted.write()).await.is_ok();
        self.watches.cancel();
        finished
    }

    /// Fires when open watch streams should send their last word and end.
    pub fn watches_closing(&self) -> CancellationToken {
        self.watches.clone()
    }

    pub fn layer(&self) -> DrainLayer {
        DrainLayer { drain: self.clone() }
    }
}

fn refusal() -> Status {
    Status::unavailable("the server is shutting down; retry on another replica")
}

/// Refuses calls once the drain started and holds each admitted one until it returns.
#[derive(Clone)]
pub struct DrainLayer {
    drain: Drain,
}

impl<S> Layer<S> for DrainLayer {
    type Service = DrainService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DrainService { inner, drain: self.drain.clone() }
    }
}

#[derive(Clone)]
pub struct DrainService<S> {
    inner: S,
    drain: Drain,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for DrainService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The service polled ready is the one that must take the call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if request.uri().path().starts_with(ALWAYS_OPEN_PREFIX) {
            return Box::pin(inner.call(request));
        }
        let drain = self.drain.clone();
        Box::pin(async move {
            if drain.is_draining() {
                return Ok(refusal().into_http());
            }
            // Waits only while the drain holds the write half; then it refuses.
            let admitted = Arc::clone(&drain.admitted).read_owned().await;
            if drain.is_draining() {
                return Ok(refusal().into_http());
            }
            let response = inner.call(request).await;
            // A streaming call's handler has returned here; its stream runs on, and
            // ends through `watches_closing`.
            drop(admitted);
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_admitted_before_the_drain_is_waited_for_and_later_ones_are_refused() {
        let drain = Drain::default();
        let admitted = Arc::clone(&drain.admitted).read_owned().await;
        drain.start();
        let finishing = tokio::spawn({
            let drain = drain.clone();
            async move { drain.finish_calls(Duration::from_secs(10)).await }
        });
        // The watches stay open while the admitted call runs.
        tokio::task::yield_now().await;
        assert!(!drain.watches_closing().is_cancelled());
        drop(admitted);
        assert!(finishing.await.expect("joins"), "finished within the grace");
        assert!(drain.watches_closing().is_cancelled());
    }

    #[tokio::test]
    async fn the_grace_period_bounds_the_wait() {
        let drain = Drain::default();
        let _stuck = Arc::clone(&drain.admitted).read_owned().await;
        drain.start();
        assert!(!drain.finish_calls(Duration::from_millis(10)).await);
        assert!(drain.watches_closing().is_cancelled());
    }
}
