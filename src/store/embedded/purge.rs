//! `purge_tenant` on the embedded store: the tenant's durable records (devices with
//! their keys, enrollments with their codes, blocks, TOTP locks) go in one
//! transaction under `write_gate`, then its live challenges and per-user counts
//! from memory.

use std::collections::HashSet;

use redb::Durability;

use super::durable::DurableWrite;
use super::{Shared, UserKey};
use crate::domain::ids::TenantId;
use crate::store::{StoreError, TenantPurge};

impl Shared {
    pub(super) async fn purge_tenant(&self, tenant: &TenantId, dry_run: bool) -> Result<TenantPurge, StoreError> {
        let _gate = self.write_gate.lock().await;
        // Completed enrollments are in the file only (`finished.rs`).
        let completed = self.completed_of_tenant(tenant).await?;
        let (mut writes, mut users, devices, mut enrollments) = {
            let mirror = self.durable();
            let mut users: HashSet<UserKey> = HashSet::new();
            let mut writes = Vec::new();
            let devices: Vec<_> = mirror.all_devices().filter(|d| d.tenant == *tenant).collect();
            for device in &devices {
                users.insert((device.tenant.clone(), device.user_id.clone()));
                writes.push(DurableWrite::RemoveDevice(device.id.clone()));
            }
            let enrollments: Vec<_> = mirror.enrollments.values().filter(|e| e.tenant == *tenant).collect();
            for enrollment in &enrollments {
                users.insert((enrollment.tenant.clone(), enrollment.user_id.clone()));
                writes.push(DurableWrite::RemoveEnrollment(enrollment.id.clone()));
            }
            for user in mirror.blocks.keys().filter(|(owner, _)| owner == tenant) {
                users.insert(user.clone());
                writes.push(DurableWrite::RemoveBlock(user.clone()));
            }
            for user in mirror.totp_locks.keys().filter(|(owner, _)| owner == tenant) {
                users.insert(user.clone());
                writes.push(DurableWrite::RemoveTotpLock(user.clone()));
            }
            (writes, users, devices.len() as u64, enrollments.len() as u64)
        };
        for enrollment in completed {
            users.insert((enrollment.tenant, enrollment.user_id));
            writes.push(DurableWrite::RemoveEnrollment(enrollment.id));
            enrollments += 1;
        }
        if !dry_run && !writes.is_empty() {
            self.commit(writes, Durability::Immediate).await?;
        }
        let (challenges, live_users) = self.challenges().purge_tenant(tenant, dry_run);
        users.extend(live_users);
        Ok(TenantPurge { users: users.len() as u64, devices, enrollments, challenges })
    }
}
