//! The drain on SIGTERM, in an order that loses no answer:
//!
//! 1. [`Drain::start`]: new calls are refused with UNAVAILABLE by [`DrainLayer`]
//!    (health stays open, to read NOT_SERVING), and the listener closes
//!    ([`accept_until`]); only once it has closed does health turn NOT_SERVING, so
//!    a client told NOT_SERVING that connects anew is refused by the kernel, never
//!    accepted and then reset. The connections already open stay open, so a call
//!    sent on one reads that UNAVAILABLE, never a connection closing under it.
//! 2. [`Drain::finish`] waits until every call already admitted has returned (up
//!    to the grace period): an answer in flight lands in the store.
//! 3. Then the watch streams close ([`Drain::watches_closing`]): each reads its
//!    challenge once more and sends the final state when there is one, else ends
//!    with UNAVAILABLE (the IdP watches again elsewhere). So a watcher whose
//!    challenge an in-flight answer resolved is told before the process exits.
//! 4. When the last watch stream has ended and neither it nor any call (but
//!    health) has come for [`QUIET`], [`Drain::finish`] returns, and only then does the HTTP/2
//!    server send GOAWAY and close its connections. A client that was just told a
//!    final state sends its next call at once: it reads the refusal instead of
//!    racing the close. Sending GOAWAY at step 1 raced those calls: one handed to
//!    the client's connection as it closed read CANCELLED (seen in CI) in tonic,
//!    whose client does not retry a request the closing connection never sent.
//!
//! The admitted calls hold a read half of one lock and the drain takes its write
//! half: a call is admitted before the drain (and waited for) or refused after it;
//! none slips between the wait and the closing of the watches. Each open watch
//! stream holds a read half of a second lock ([`Drain::open_stream`]) for step 4.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use http::{Request, Response};
use tokio::sync::{OwnedRwLockReadGuard, RwLock};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tower::{Layer, Service};

/// Calls that stay open while the server drains: health reports NOT_SERVING.
const ALWAYS_OPEN_PREFIX: &str = "/grpc.health.v1.Health/";

/// How long the connections must have been quiet (no call but health) before the
/// drain closes them: clients that keep calling read UNAVAILABLE meanwhile.
pub const QUIET: Duration = Duration::from_millis(250);

/// The drain's state, shared by the server, its layer and the watch streams.
#[derive(Clone)]
pub struct Drain {
    refusing: CancellationToken,
    admitted: Arc<RwLock<()>>,
    watches: CancellationToken,
    streams: Arc<RwLock<()>>,
    /// When the last call (but health) was refused, in milliseconds since `epoch`.
    last_call_ms: Arc<AtomicU64>,
    epoch: Instant,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            refusing: CancellationToken::new(),
            admitted: Arc::default(),
            watches: CancellationToken::new(),
            streams: Arc::default(),
            last_call_ms: Arc::default(),
            epoch: Instant::now(),
        }
    }
}

/// Held by an open watch stream: the drain's last step waits until none is left.
pub struct OpenStream(#[allow(dead_code)] OwnedRwLockReadGuard<()>);

impl Drain {
    /// Step 1: refuse every new call (but health) from now on.
    pub fn start(&self) {
        self.refusing.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.refusing.is_cancelled()
    }

    /// Steps 2 to 4: waits for the calls admitted before [`Drain::start`], then
    /// tells the watch streams to close and waits until they have, all within
    /// `grace`. Returns false when calls or streams were still open at its end.
    pub async fn finish(&self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        let calls_done = tokio::time::timeout_at(deadline, self.admitted.write()).await.is_ok();
        self.watches.cancel();
        let streams_done = tokio::time::timeout_at(deadline, self.streams.write()).await.is_ok();
        // The last stream just ended (or the last admitted call returned): its
        // client, told a final state, calls again at once. The quiet counts from
        // here too, so that call reads the refusal instead of racing the close (on
        // one worker thread, under load, the close won: CI saw "connection lost").
        self.saw_call();
        // Step 4's quiet: wait until QUIET has passed since the last call arrived.
        loop {
            let quiet_at = self.epoch + Duration::from_millis(self.last_call_ms.load(Ordering::Relaxed)) + QUIET;
            if Instant::now() >= quiet_at || quiet_at > deadline {
                break;
            }
            tokio::time::sleep_until(quiet_at).await;
        }
        calls_done && streams_done
    }

    /// Notes that a call arrived now and was refused (only calls during the drain
    /// count for the quiet; the ones before it are waited for as admitted calls,
    /// and the clock is not read on every call while serving).
    fn saw_call(&self) {
        let since = Instant::now().saturating_duration_since(self.epoch);
        self.last_call_ms.fetch_max(u64::try_from(since.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Registers a watch stream; drop the ticket when the stream ends. Taken by
    /// the watch call's handler, which is admitted, so before [`Drain::finish`]
    /// starts waiting for the streams.
    pub async fn open_stream(&self) -> OpenStream {
        OpenStream(Arc::clone(&self.streams).read_owned().await)
    }

    /// Fires when open watch streams should send their last word and end.
    pub fn watches_closing(&self) -> CancellationToken {
        self.watches.clone()
    }

    pub fn layer(&self) -> DrainLayer {
        DrainLayer { drain: self.clone() }
    }
}

/// The accepted connections of `incoming` until `stop` fires; then `incoming` is
/// dropped at once (which closes the listening socket: new clients are refused by
/// the kernel), `closed` fires, and the stream stays pending without ending,
/// because tonic reads the end of its incoming stream as the signal to close every
/// open connection.
pub fn accept_until<S>(incoming: S, stop: CancellationToken, closed: CancellationToken) -> impl Stream<Item = S::Item> + Send
where
    S: Stream + Send + 'static,
    S::Item: Send,
{
    futures::stream::unfold(Some(Box::pin(incoming)), move |incoming| {
        let (stop, closed) = (stop.clone(), closed.clone());
        async move {
            let mut incoming = incoming?;
            tokio::select! {
                biased;
                () = stop.cancelled() => {
                    drop(incoming);
                    closed.cancel();
                    std::future::pending::<Option<(S::Item, _)>>().await
                }
                item = incoming.next() => item.map(|item| (item, Some(incoming))),
            }
        }
    })
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
                drain.saw_call();
                return Ok(refusal().into_http());
            }
            // Waits only while the drain holds the write half; then it refuses.
            let admitted = Arc::clone(&drain.admitted).read_owned().await;
            if drain.is_draining() {
                drain.saw_call();
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
            async move { drain.finish(Duration::from_secs(10)).await }
        });
        // The watches stay open while the admitted call runs.
        tokio::task::yield_now().await;
        assert!(!drain.watches_closing().is_cancelled());
        drop(admitted);
        assert!(finishing.await.expect("joins"), "finished within the grace");
        assert!(drain.watches_closing().is_cancelled());
    }

    // Paused time: the runtime moves the clock only when every task waits, so the
    // short timeout below fires only once `finish` is truly stuck on the stream.
    #[tokio::test(start_paused = true)]
    async fn the_drain_ends_only_when_the_last_watch_stream_has() {
        let drain = Drain::default();
        let stream = drain.open_stream().await;
        drain.start();
        let mut finishing = tokio::spawn({
            let drain = drain.clone();
            async move { drain.finish(Duration::from_secs(10)).await }
        });
        // No call is admitted: the watches are told to close at once...
        tokio::time::timeout(Duration::from_secs(10), drain.watches_closing().cancelled()).await.expect("watches told");
        // ...and the drain waits for the stream to end.
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut finishing).await.is_err(), "still waiting");
        drop(stream);
        assert!(finishing.await.expect("joins"), "finished within the grace");
    }

    #[tokio::test(start_paused = true)]
    async fn the_connections_close_only_once_no_call_arrived_for_the_quiet_period() {
        let drain = Drain::default();
        drain.start();
        tokio::time::advance(Duration::from_secs(1)).await;
        // A client told a final state calls again at once: it is refused...
        drain.saw_call();
        let called = Instant::now();
        // ...and the connections stay open for QUIET after that call.
        assert!(drain.finish(Duration::from_secs(10)).await);
        assert!(called.elapsed() >= QUIET, "closed {:?} after the last call", called.elapsed());
        assert!(called.elapsed() < QUIET * 2, "then at once: {:?}", called.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn the_connections_stay_open_for_the_quiet_period_after_the_last_stream_ends() {
        let drain = Drain::default();
        let stream = drain.open_stream().await;
        drain.start();
        let finishing = tokio::spawn({
            let drain = drain.clone();
            async move { drain.finish(Duration::from_secs(10)).await }
        });
        tokio::time::timeout(Duration::from_secs(10), drain.watches_closing().cancelled()).await.expect("watches told");
        // The stream sends its final state a while after the last refused call...
        tokio::time::advance(QUIET * 4).await;
        drop(stream);
        let ended = Instant::now();
        // ...and its client's next call, sent at once, must still find the
        // connection open: the quiet counts from the stream's end.
        assert!(finishing.await.expect("joins"), "finished within the grace");
        assert!(ended.elapsed() >= QUIET, "closed {:?} after the last stream ended", ended.elapsed());
    }

    #[tokio::test]
    async fn a_stream_still_open_at_the_end_of_the_grace_is_reported() {
        let drain = Drain::default();
        let _stream = drain.open_stream().await;
        drain.start();
        assert!(!drain.finish(Duration::from_millis(10)).await);
    }

    #[tokio::test]
    async fn the_listener_closes_at_the_stop_and_the_stream_does_not_end() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, closed) = (CancellationToken::new(), CancellationToken::new());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let mut incoming = Box::pin(accept_until(incoming, stop.clone(), closed.clone()));
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connects before the stop");
        let accepted = tokio::time::timeout(Duration::from_secs(10), incoming.next()).await.expect("accepted");
        assert!(matches!(accepted, Some(Ok(_))));
        stop.cancel();
        assert!(!closed.is_cancelled(), "not before the stop is seen");
        // The stop is seen on the next poll, which must neither end nor yield.
        assert!(futures::poll!(incoming.next()).is_pending(), "pending, not ended");
        assert!(closed.is_cancelled(), "told once the listener is gone");
        let refused = tokio::net::TcpStream::connect(addr).await;
        assert!(refused.is_err(), "the port is closed: {refused:?}");
    }

    #[tokio::test]
    async fn the_grace_period_bounds_the_wait() {
        let drain = Drain::default();
        let _stuck = Arc::clone(&drain.admitted).read_owned().await;
        drain.start();
        assert!(!drain.finish(Duration::from_millis(10)).await);
        assert!(drain.watches_closing().is_cancelled());
    }
}
