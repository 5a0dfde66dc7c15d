//! A device's `last_used_at` on its way to the file: every answer changes it in the
//! mirror at once (`Shared::touch_device`), and a task writes the devices touched
//! since its last round to the `device_last_used` table every two seconds, in one
//! transaction, so that answers never queue behind a disk write for it.

use std::sync::Weak;

use redb::Durability;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::durable::DurableWrite;
use crate::domain::ids::DeviceId;
use crate::store::StoreError;

/// Writes batched `last_used_at` changes every few seconds, one transaction each
/// time (see [`Shared::write_touches`]).
pub(super) async fn flush_touches(shared: Weak<Shared>, closing: CancellationToken) {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(2);
    loop {
        tokio::select! {
            () = closing.cancelled() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
        let Some(shared) = shared.upgrade() else { return };
        if let Err(error) = shared.write_touches().await {
            tracing::warn!(%error, "could not write devices' last use; retrying");
        }
    }
}

impl Shared {
    /// Writes the devices touched since the last call in one durable commit; on an
    /// error they stay marked for the next call.
    ///
    /// Durable, not `Durability::None`, although a lost `last_used_at` would be
    /// harmless: redb frees the pages a commit replaces only at a durable commit,
    /// so when touches were the only writes (a steady stream of sign-ins, nobody
    /// enrolling) the file, and the allocator state redb keeps in memory for it,
    /// grew with every flush for as long as the broker ran (issue 19's soak). One
    /// fsync every two seconds is the price.
    pub(super) async fn write_touches(&self) -> Result<(), StoreError> {
        let touched: Vec<DeviceId> = self.touched.lock().drain().collect();
        if touched.is_empty() {
            return Ok(());
        }
        let _gate = self.write_gate.lock().await;
        // Removals hold `write_gate` too: a device removed since its touch is
        // left out here, and none goes between this read and the commit.
        let writes: Vec<DurableWrite> = {
            let mirror = self.durable();
            touched.iter().filter_map(|id| mirror.last_used(id).map(|at| DurableWrite::DeviceUsed(id.clone(), at))).collect()
        };
        let written = self.commit(writes, Durability::Immediate).await;
        if written.is_err() {
            self.touched.lock().extend(touched);
        }
        written
    }
}
