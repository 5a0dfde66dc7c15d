//! `ChallengeService`: the IdP's side of a sign-in.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};

use super::auth::tenant_of;
use super::convert::challenge_to_pb;
use super::drain::{Drain, OpenStream};
use crate::broker::{Broker, ChallengeRequest};
use crate::domain::ids::{ChallengeId, UserId};
use crate::domain::ports::ChallengeWatch;
use crate::pb;
use crate::pb::challenge_service_server::ChallengeService;

pub struct ChallengeApi {
    broker: Arc<Broker>,
    /// When the server drains, after the calls in flight have returned, each open
    /// watch stream reads its challenge once more and sends its final state, or ends
    /// with UNAVAILABLE so the IdP re-attaches to another replica; the drain waits
    /// for every stream to end before the connections close.
    drain: Drain,
}

impl ChallengeApi {
    pub fn new(broker: Arc<Broker>, drain: Drain) -> Self {
        Self { broker, drain }
    }
}

pub type ChallengeStream = Pin<Box<dyn Stream<Item = Result<pb::Challenge, Status>> + Send>>;

#[tonic::async_trait]
impl ChallengeService for ChallengeApi {
    async fn create_challenge(&self, request: Request<pb::CreateChallengeRequest>) -> Result<Response<pb::Challenge>, Status> {
        let tenant = tenant_of(&request)?;
        if request.get_ref().final_state_only {
            return Err(Status::invalid_argument(
                "final_state_only: CreateChallenge has no stream; set it on CreateAndWatchChallenge or WatchChallenge",
            ));
        }
        let request = ChallengeRequest::try_from(request.into_inner())?;
        let challenge = self.broker.create_challenge(&tenant, request).await?;
        Ok(Response::new(challenge_to_pb(&challenge)))
    }

    async fn get_challenge(&self, request: Request<pb::GetChallengeRequest>) -> Result<Response<pb::Challenge>, Status> {
        let tenant = tenant_of(&request)?;
        let id = ChallengeId::parse(&request.get_ref().challenge_id)?;
        let challenge = self.broker.get_challenge(&tenant, &id).await?;
        Ok(Response::new(challenge_to_pb(&challenge)))
    }

    type WatchChallengeStream = ChallengeStream;

    async fn watch_challenge(&self, request: Request<pb::WatchChallengeRequest>) -> Result<Response<ChallengeStream>, Status> {
        let tenant = tenant_of(&request)?;
        let id = ChallengeId::parse(&request.get_ref().challenge_id)?;
        let updates = Updates::asked(request.get_ref().final_state_only);
        let watch = self.broker.watch_challenge(&tenant, &id).await?;
        let last_word = LastWord { broker: Arc::clone(&self.broker), tenant, id };
        let open = self.drain.open_stream().await;
        Ok(Response::new(watch_stream(watch, updates, &self.drain, open, last_word)))
    }

    type CreateAndWatchChallengeStream = ChallengeStream;

    /// CreateChallenge, then WatchChallenge on what it made: the stream's first
    /// message is the challenge with its number. Should the watch fail after the
    /// create (the store unreachable between the two), the call fails and a retry
    /// with the same request_id finds the same challenge.
    async fn create_and_watch_challenge(
        &self,
        request: Request<pb::CreateChallengeRequest>,
    ) -> Result<Response<ChallengeStream>, Status> {
        let tenant = tenant_of(&request)?;
        let updates = Updates::asked(request.get_ref().final_state_only);
        let request = ChallengeRequest::try_from(request.into_inner())?;
        let challenge = self.broker.create_challenge(&tenant, request).await?;
        let watch = self.broker.watch_challenge(&tenant, &challenge.id).await?;
        let last_word = LastWord { broker: Arc::clone(&self.broker), tenant, id: challenge.id };
        let open = self.drain.open_stream().await;
        Ok(Response::new(watch_stream(watch, updates, &self.drain, open, last_word)))
    }

    async fn cancel_challenge(&self, request: Request<pb::CancelChallengeRequest>) -> Result<Response<pb::Challenge>, Status> {
        let tenant = tenant_of(&request)?;
        let id = ChallengeId::parse(&request.get_ref().challenge_id)?;
        let challenge = self.broker.cancel_challenge(&tenant, &id).await?;
        Ok(Response::new(challenge_to_pb(&challenge)))
    }

    async fn verify_totp(&self, request: Request<pb::VerifyTotpRequest>) -> Result<Response<pb::VerifyTotpResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let request = request.into_inner();
        let user_id = UserId::parse(&request.user_id)?;
        let verdict = self.broker.verify_totp(&tenant, &user_id, &request.code).await?;
        Ok(Response::new(pb::VerifyTotpResponse {
            valid: verdict.valid,
            device_id: verdict.device_id.map(|id| id.to_string()).unwrap_or_default(),
        }))
    }
}

/// What a watch stream sends after the current state.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Updates {
    /// Every change, delivery updates included.
    Every,
    /// The final state alone (`final_state_only`).
    FinalOnly,
}

impl Updates {
    fn asked(final_state_only: bool) -> Self {
        if final_state_only { Self::FinalOnly } else { Self::Every }
    }
}

enum WatchState {
    First(ChallengeWatch),
    Following(ChallengeWatch),
    Done,
}

/// What a watch stream needs to read its challenge once more when the server drains.
#[derive(Clone)]
struct LastWord {
    broker: Arc<Broker>,
    tenant: crate::domain::ids::TenantId,
    id: ChallengeId,
}

impl LastWord {
    /// The final state when the challenge has one now (an answer that was in flight
    /// when the drain began has landed by then), else UNAVAILABLE: watch again.
    async fn say(&self) -> Result<pb::Challenge, Status> {
        match self.broker.get_challenge(&self.tenant, &self.id).await {
            Ok(challenge) if challenge.state.is_final() => Ok(challenge_to_pb(&challenge)),
            _ => Err(Status::unavailable("the server is shutting down; watch the challenge again")),
        }
    }
}

/// The current state at once, then every change (or, with [`Updates::FinalOnly`],
/// only the final state); ends after the first final state. A slow reader may skip
/// intermediate delivery updates (each message is the latest state), never the
/// final one. When the server drains, the stream's last message is the final state
/// if the challenge has one by then, else UNAVAILABLE; `open` lives as long as the
/// stream, so the drain knows when it has ended.
fn watch_stream(
    watch: ChallengeWatch,
    updates: Updates,
    drain: &Drain,
    open: OpenStream,
    last_word: LastWord,
) -> ChallengeStream {
    let shutdown = drain.watches_closing();
    Box::pin(futures::stream::unfold(WatchState::First(watch), move |state| {
        let _open = &open;
        let shutdown = shutdown.clone();
        let last_word = last_word.clone();
        async move {
            let mut watch = match state {
                WatchState::Done => return None,
                WatchState::First(mut watch) => {
                    let current = watch.borrow_and_update().clone();
                    let next = if current.state.is_final() { WatchState::Done } else { WatchState::Following(watch) };
                    return Some((Ok(challenge_to_pb(&current)), next));
                }
                WatchState::Following(watch) => watch,
            };
            loop {
                tokio::select! {
                    // A change that is there already goes out before the drain's last word.
                    biased;
                    changed = watch.changed() => {
                        // The challenge left the store (purged): its final state was sent already.
                        changed.ok()?;
                        let current = watch.borrow_and_update();
                        if current.state.is_final() {
                            let last = challenge_to_pb(&current);
                            return Some((Ok(last), WatchState::Done));
                        }
                        if updates == Updates::Every {
                            let update = challenge_to_pb(&current);
                            drop(current);
                            return Some((Ok(update), WatchState::Following(watch)));
                        }
                    }
                    () = shutdown.cancelled() => return Some((last_word.say().await, WatchState::Done)),
                }
            }
        }
    }))
}
