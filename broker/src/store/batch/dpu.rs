//! DPU registration, heartbeats and leases inside a batch.

use serde_json::Value;
use xpu_proto::broker::v1 as pb;

use super::{Reply, Working, WriteTx, decode, encode};
use crate::{
    error::{Error, Result},
    model::{BROKER_AUTHOR, Key, Kind, dpu_author, object::Spec},
    store::rows::{DeleteRequest, DpuRow, ObjectRow, RegisterOutcome, RegisterRequest},
};

/// Most leases one sweep marks lapsed in one transaction (≈ 500 status writes: tens of ms).
pub(super) const SWEEP_SLICE: usize = 500;

impl Working<'_> {
    pub(super) async fn register<T: WriteTx>(&mut self, tx: &mut T, req: &RegisterRequest) -> Result<RegisterOutcome> {
        let key = Key::cluster(Kind::Dpu, &req.serial);
        let author = dpu_author(&req.serial);
        self.ensure(tx, vec![key.clone()]).await?;
        self.ensure_dpus(tx, vec![req.serial.clone()]).await?;
        let (row, _) = self.put_spec(&key, &req.labels, &Spec::Dpu(req.spec.clone()), &author)?;
        let now = self.ctx.now;
        let lease = self.dpus.get(&req.serial).cloned().flatten();
        let registered_at = lease.as_ref().map_or(now, |l| l.registered_at);
        self.set_dpu(
            &req.serial,
            Some(DpuRow {
                serial: req.serial.clone(),
                ready: true,
                last_heartbeat: now,
                lease_duration_ms: self.ctx.lease_duration_ms,
                applied_revision: lease.as_ref().map_or(0, |l| l.applied_revision),
                registered_at,
            }),
        );
        self.dpus_dirty.push(req.serial.clone());
        let status = pb::DpuStatus {
            lease_state: "Ready".into(),
            inventory: Some(req.inventory.clone()),
            registered_at: crate::model::convert::timestamp(registered_at),
            ..Default::default()
        };
        self.put_broker_status(tx, &row, encode(&status)?).await?;
        self.ensure_status_seqs(tx, vec![author.clone()]).await?;
        let last_status_seq = self.status_seqs.get(&author).copied().unwrap_or(0);
        Ok(RegisterOutcome { object: row.into_stored(vec![], None, None), last_status_seq })
    }

    /// Writes the broker-authored status of a Dpu when it differs from the stored one.
    pub(super) async fn put_broker_status<T: WriteTx>(
        &mut self,
        tx: &mut T,
        row: &ObjectRow,
        status: Value,
    ) -> Result<()> {
        let existing = self.status_of(tx, &row.key, BROKER_AUTHOR).await?;
        if existing.as_ref().is_some_and(|s| s.status == status && s.observed_generation == row.generation) {
            return Ok(());
        }
        let seq = existing.map_or(1, |s| s.seq + 1);
        self.put_status(row, BROKER_AUTHOR, row.generation, seq, Some(status));
        Ok(())
    }

    pub(super) async fn set_lease_state<T: WriteTx>(&mut self, tx: &mut T, serial: &str, ready: bool) -> Result<()> {
        let key = Key::cluster(Kind::Dpu, serial);
        self.ensure(tx, vec![key.clone()]).await?;
        let Some(row) = self.live(&key).cloned() else {
            return Ok(());
        };
        let mut status: pb::DpuStatus = match self.status_of(tx, &key, BROKER_AUTHOR).await? {
            Some(s) => decode(&s.status, "Dpu status")?,
            None => pb::DpuStatus::default(),
        };
        status.lease_state = if ready { "Ready" } else { "Unknown" }.into();
        self.put_broker_status(tx, &row, encode(&status)?).await
    }

    pub(super) async fn heartbeat<T: WriteTx>(
        &mut self,
        tx: &mut T,
        serial: &str,
        applied_revision: i64,
    ) -> Result<()> {
        self.ensure_dpus(tx, vec![serial.to_string()]).await?;
        let Some(mut lease) = self.dpus.get(serial).cloned().flatten() else {
            return Err(Error::NotFound(format!("dpu {serial} (register first)")));
        };
        let was_ready = lease.ready;
        lease.ready = true;
        lease.last_heartbeat = self.ctx.now;
        lease.applied_revision = applied_revision.max(0);
        self.set_dpu(serial, Some(lease));
        self.dpus_dirty.push(serial.to_string());
        if !was_ready {
            self.set_lease_state(tx, serial, true).await?;
        }
        Ok(())
    }

    /// Marks lapsed leases, at most [`SWEEP_SLICE`] per transaction so that a fleet lapsing at
    /// once does not hold up every other write for one long commit; returns how many lapsed and
    /// whether the slice was full (the caller sweeps again at once).
    pub(super) async fn sweep<T: WriteTx>(&mut self, tx: &mut T) -> Result<(usize, bool)> {
        let lapsed = tx.lapsed_dpus(self.ctx.now, SWEEP_SLICE).await?;
        let more = lapsed.len() >= SWEEP_SLICE;
        self.ensure_dpus(tx, lapsed.clone()).await?;
        // The Dpu objects and broker statuses of every lapsed lease in one round trip each (a
        // fleet that went away at once lapses at once).
        let keys: Vec<Key> = lapsed.iter().map(|s| Key::cluster(Kind::Dpu, s)).collect();
        self.ensure(tx, keys.clone()).await?;
        self.ensure_statuses(tx, keys.into_iter().map(|k| (k, BROKER_AUTHOR.to_string())).collect()).await?;
        let mut n = 0;
        for serial in lapsed {
            let Some(mut lease) = self.dpus.get(&serial).cloned().flatten() else {
                continue;
            };
            // A heartbeat earlier in this batch may have renewed it.
            let deadline = lease.last_heartbeat + chrono::Duration::milliseconds(lease.lease_duration_ms);
            if !lease.ready || deadline >= self.ctx.now {
                continue;
            }
            lease.ready = false;
            self.set_dpu(&serial, Some(lease));
            self.dpus_dirty.push(serial.clone());
            self.set_lease_state(tx, &serial, false).await?;
            tracing::warn!(dpu = %serial, "lease lapsed");
            crate::metrics::LEASES_LAPSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            n += 1;
        }
        Ok((n, more))
    }

    pub(super) async fn decommission<T: WriteTx>(&mut self, tx: &mut T, serial: &str) -> Result<Reply> {
        let netdevs = tx.live_netdevs_on_dpu(serial.to_string()).await?;
        let author = "admin/decommission".to_string();
        let mut count = 0u32;
        for key in netdevs {
            let req = DeleteRequest { key, uid: None, expected_generation: 0, author: author.clone(), node: None };
            if self.delete(tx, &req).await?.existed {
                count += 1;
            }
        }
        let req = DeleteRequest {
            key: Key::cluster(Kind::Dpu, serial),
            uid: None,
            expected_generation: 0,
            author,
            node: None,
        };
        let outcome = self.delete(tx, &req).await?;
        if !outcome.existed && count == 0 {
            return Err(Error::NotFound(format!("dpu {serial}")));
        }
        self.set_dpu(serial, None);
        self.dpus_deleted.push(serial.to_string());
        Ok(Reply::Decommissioned { revision: self.head, netdevs: count })
    }
}
