//! `EnrollmentService`: the setup page's side of enrollment, and device management.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::tenant_of;
use super::convert::{device_to_pb, enrollment_kind_from_pb, enrollment_to_pb};
use crate::broker::Broker;
use crate::domain::ids::{DeviceId, EnrollmentId, UserId, check_text};
use crate::pb;
use crate::pb::enrollment_service_server::EnrollmentService;

pub const MAX_ACCOUNT_NAME_BYTES: usize = 256;

pub struct EnrollmentApi {
    broker: Arc<Broker>,
}

impl EnrollmentApi {
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

#[tonic::async_trait]
impl EnrollmentService for EnrollmentApi {
    async fn begin_enrollment(&self, request: Request<pb::BeginEnrollmentRequest>) -> Result<Response<pb::Enrollment>, Status> {
        let tenant = tenant_of(&request)?;
        let request = request.into_inner();
        let user_id = UserId::parse(&request.user_id)?;
        check_text("account_name", &request.account_name, MAX_ACCOUNT_NAME_BYTES)?;
        let account_name = if request.account_name.is_empty() { user_id.to_string() } else { request.account_name };
        let kind = enrollment_kind_from_pb(request.kind)?;
        let begun = self.broker.begin_enrollment(&tenant, user_id, account_name, kind).await?;
        let state = self.broker.enrollment_state(&begun.enrollment);
        Ok(Response::new(enrollment_to_pb(&begun.enrollment, state, begun.uri, begun.qr_png)))
    }

    /// The URI and QR code are shown once, by BeginEnrollment: only the code's digest
    /// is stored, so GetEnrollment leaves them empty.
    async fn get_enrollment(&self, request: Request<pb::GetEnrollmentRequest>) -> Result<Response<pb::Enrollment>, Status> {
        let tenant = tenant_of(&request)?;
        let id = EnrollmentId::parse(&request.get_ref().enrollment_id)?;
        let enrollment = self.broker.get_enrollment(&tenant, &id).await?;
        let state = self.broker.enrollment_state(&enrollment);
        Ok(Response::new(enrollment_to_pb(&enrollment, state, String::new(), Vec::new())))
    }

    async fn confirm_totp_enrollment(
        &self,
        request: Request<pb::ConfirmTotpEnrollmentRequest>,
    ) -> Result<Response<pb::Enrollment>, Status> {
        let tenant = tenant_of(&request)?;
        let request = request.into_inner();
        let id = EnrollmentId::parse(&request.enrollment_id)?;
        let enrollment = self.broker.confirm_totp_enrollment(&tenant, &id, &request.code).await?;
        let state = self.broker.enrollment_state(&enrollment);
        Ok(Response::new(enrollment_to_pb(&enrollment, state, String::new(), Vec::new())))
    }

    async fn list_devices(&self, request: Request<pb::ListDevicesRequest>) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let user_id = UserId::parse(&request.get_ref().user_id)?;
        let devices = self.broker.list_devices(&tenant, &user_id).await?;
        Ok(Response::new(pb::ListDevicesResponse { devices: devices.iter().map(device_to_pb).collect() }))
    }

    async fn remove_device(
        &self,
        request: Request<pb::RemoveDeviceRequest>,
    ) -> Result<Response<pb::RemoveDeviceResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let id = DeviceId::parse(&request.get_ref().device_id)?;
        self.broker.remove_device(&tenant, &id).await?;
        Ok(Response::new(pb::RemoveDeviceResponse {}))
    }

    async fn unblock_user(&self, request: Request<pb::UnblockUserRequest>) -> Result<Response<pb::UnblockUserResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let user_id = UserId::parse(&request.get_ref().user_id)?;
        self.broker.unblock_user(&tenant, &user_id).await?;
        Ok(Response::new(pb::UnblockUserResponse {}))
    }
}
