//! `DeviceService`: the authenticator app's side. CompleteEnrollment is authorised
//! by the one-time code; every other call by a `DeviceProof`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{decision_from_pb, deny_reason_to_pb, pending_to_pb, proof_from_pb, push_token, state_to_pb};
use crate::broker::{Broker, DeviceEnrollment};
use crate::domain::challenge::Decision;
use crate::domain::error::DomainError;
use crate::domain::ids::{ChallengeId, ChallengeNumber};
use crate::pb;
use crate::pb::device_service_server::DeviceService;

pub struct DeviceApi {
    broker: Arc<Broker>,
}

impl DeviceApi {
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

#[tonic::async_trait]
impl DeviceService for DeviceApi {
    async fn complete_enrollment(
        &self,
        request: Request<pb::CompleteEnrollmentRequest>,
    ) -> Result<Response<pb::CompleteEnrollmentResponse>, Status> {
        let enrollment = DeviceEnrollment::try_from(request.into_inner())?;
        let completed = self.broker.complete_enrollment(enrollment).await?;
        Ok(Response::new(pb::CompleteEnrollmentResponse {
            device_id: completed.device.id.to_string(),
            account_name: completed.account_name,
            issuer: completed.issuer,
            totp_secret: completed.totp_secret,
        }))
    }

    async fn update_push_token(
        &self,
        request: Request<pb::UpdatePushTokenRequest>,
    ) -> Result<Response<pb::UpdatePushTokenResponse>, Status> {
        let request = request.into_inner();
        let proof = proof_from_pb(request.proof)?;
        if request.push_token.is_empty() {
            return Err(DomainError::invalid("push_token", "is required").into());
        }
        // The rules of the token's form need the device's platform (APNs hex, a Web
        // Push subscription's JSON): the broker checks them after the proof.
        let token = push_token(None, &request.push_token)?;
        self.broker.update_push_token(&proof, &token).await?;
        Ok(Response::new(pb::UpdatePushTokenResponse {}))
    }

    async fn list_pending_challenges(
        &self,
        request: Request<pb::ListPendingChallengesRequest>,
    ) -> Result<Response<pb::ListPendingChallengesResponse>, Status> {
        let proof = proof_from_pb(request.into_inner().proof)?;
        let pending = self.broker.pending_for_device(&proof).await?;
        let challenges = pending.challenges.iter().map(|c| pending_to_pb(c, &pending.account_name, &pending.issuer)).collect();
        Ok(Response::new(pb::ListPendingChallengesResponse { challenges }))
    }

    async fn respond_to_challenge(
        &self,
        request: Request<pb::RespondToChallengeRequest>,
    ) -> Result<Response<pb::RespondToChallengeResponse>, Status> {
        let request = request.into_inner();
        let proof = proof_from_pb(request.proof)?;
        let challenge_id = ChallengeId::parse(&request.challenge_id)?;
        let decision = decision_from_pb(request.decision)?;
        if decision == Decision::Approve && ChallengeNumber::parse_typed(&request.number).is_none() {
            return Err(DomainError::invalid("number", "an approval carries the two digits the user typed").into());
        }
        if request.number.len() > 2 || !request.number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(DomainError::invalid("number", "is two digits or empty").into());
        }
        let outcome = self.broker.respond(&proof, &challenge_id, decision, &request.number).await?;
        Ok(Response::new(pb::RespondToChallengeResponse {
            state: state_to_pb(outcome.challenge.state).into(),
            deny_reason: deny_reason_to_pb(outcome.challenge.deny_reason).into(),
            accepted: outcome.accepted,
        }))
    }
}
