//! A device as the embedded store's mirror keeps it (`durable.rs`): one record,
//! with the part every answer changes where it can change in place.

use super::BACKEND;
use crate::domain::device::Device;
use crate::domain::time::Millis;
use crate::store::StoreError;

/// A device as kept in the mirror: its last use as 8 bytes in front, then the
/// device in postcard. Every answer changes the last use, and it changes it in
/// place (`touch_device`: 118 ns, against 1.05 µs to decode and re-encode the
/// whole device, BENCHMARKS.md's hot paths), and the touch flush reads it without
/// decoding the device either.
/// The 8 bytes are what counts: the postcard part keeps the `last_used_at` the
/// device had when it was packed, and unpacking sets it from the front.
pub(super) struct DeviceRecord(Box<[u8]>);

/// The front of a record for a device never used.
const NEVER_USED: i64 = i64::MIN;

impl DeviceRecord {
    pub(super) fn pack(device: &Device) -> Result<Self, StoreError> {
        let front = device.last_used_at.map_or(NEVER_USED, |at| at.0).to_le_bytes().to_vec();
        postcard::to_extend(device, front)
            .map(|record| Self(record.into_boxed_slice()))
            .map_err(|e| StoreError::corrupt(BACKEND, e))
    }

    pub(super) fn unpack(&self) -> Option<Device> {
        let decoded = self.0.get(8..).map(postcard::from_bytes::<Device>);
        match decoded {
            Some(Ok(mut device)) => {
                device.last_used_at = self.last_used();
                Some(device)
            }
            Some(Err(error)) => {
                tracing::error!(%error, "a device in the mirror does not decode");
                None
            }
            None => {
                tracing::error!("a device in the mirror is shorter than its last use");
                None
            }
        }
    }

    pub(super) fn last_used(&self) -> Option<Millis> {
        let front = i64::from_le_bytes(*self.0.first_chunk::<8>()?);
        (front != NEVER_USED).then_some(Millis(front))
    }

    pub(super) fn set_last_used(&mut self, at: Millis) {
        if let Some(front) = self.0.first_chunk_mut::<8>() {
            *front = at.0.to_le_bytes();
        }
    }

    /// Sets the last use to `at` unless the record holds a later one.
    pub(super) fn keep_later(&mut self, at: Millis) {
        if self.last_used().is_none_or(|known| known < at) {
            self.set_last_used(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::{TenantId, UserId};

    #[test]
    fn a_record_gives_back_its_device_and_a_last_use_changed_in_place() {
        let user = UserId::parse("jan").expect("user");
        let mut device = crate::store::conformance::sample_device(&TenantId("t".into()), &user, Millis(1_700_000_000_000));
        device.last_used_at = None;
        let never = DeviceRecord::pack(&device).expect("pack");
        assert_eq!((never.last_used(), never.unpack()), (None, Some(device.clone())), "never used stays never used");

        device.last_used_at = Some(Millis(1_700_000_123_456));
        let mut record = DeviceRecord::pack(&device).expect("pack");
        assert_eq!(record.last_used(), Some(Millis(1_700_000_123_456)));
        record.set_last_used(Millis(1_700_000_999_000));
        let touched = record.unpack().expect("unpack");
        assert_eq!(touched.last_used_at, Some(Millis(1_700_000_999_000)), "the front is what counts");
        assert_eq!(Device { last_used_at: device.last_used_at, ..touched }, device, "the rest is unchanged");
    }
}
