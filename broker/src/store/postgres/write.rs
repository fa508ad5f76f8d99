//! The write transaction of the Postgres backend: the working set's loads and one bulk flush.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use super::{NOTIFY_CHANNEL, OBJECT_COLUMNS, dpu_row, key_arrays, labels_json, object_row, status_row};
use crate::{
    error::Result,
    model::Key,
    model::Kind,
    store::{
        batch::WriteTx,
        rows::{Compacted, DpuRow, Flush, ObjectRow, StatusRow, route_columns},
    },
};

pub struct PgWriteTx {
    tx: Transaction<'static, Postgres>,
    replica: String,
    compacted: Option<i64>,
}

impl PgWriteTx {
    pub async fn begin(pool: &PgPool, replica: &str) -> Result<PgWriteTx> {
        Ok(PgWriteTx { tx: pool.begin().await?, replica: replica.to_string(), compacted: None })
    }
}

impl WriteTx for PgWriteTx {
    async fn lock_head(&mut self) -> Result<i64> {
        let row = sqlx::query("SELECT revision, compacted_revision FROM xpu_meta WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut *self.tx)
            .await?;
        self.compacted = Some(row.try_get(1)?);
        Ok(row.try_get(0)?)
    }

    fn compacted_seen(&self) -> Option<i64> {
        self.compacted
    }

    async fn load_objects(&mut self, keys: Vec<Key>) -> Result<Vec<ObjectRow>> {
        let (k, ns, n) = key_arrays(&keys);
        // One primary-key probe per key (the LATERAL with LIMIT is not flattened into a join):
        // a hash join would scan the table once the batch is large enough to look cheaper.
        let sql = format!(
            "SELECT o.* FROM UNNEST($1::text[], $2::text[], $3::text[]) AS k(kind, namespace, name) \
             CROSS JOIN LATERAL (SELECT {OBJECT_COLUMNS} FROM objects o \
                 WHERE o.kind = k.kind AND o.namespace = k.namespace AND o.name = k.name LIMIT 1) o"
        );
        let rows = sqlx::query(&sql).bind(k).bind(ns).bind(n).fetch_all(&mut *self.tx).await?;
        rows.iter().map(object_row).collect()
    }

    async fn load_statuses(&mut self, pairs: Vec<(Key, String)>) -> Result<Vec<StatusRow>> {
        let keys: Vec<Key> = pairs.iter().map(|(k, _)| k.clone()).collect();
        let authors: Vec<String> = pairs.into_iter().map(|(_, a)| a).collect();
        let (k, ns, n) = key_arrays(&keys);
        let rows = sqlx::query(
            "SELECT s.* FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS k(kind, namespace, name, author) \
             CROSS JOIN LATERAL (SELECT * FROM statuses s WHERE s.kind = k.kind AND s.namespace = k.namespace \
                 AND s.name = k.name AND s.author = k.author LIMIT 1) s",
        )
        .bind(k)
        .bind(ns)
        .bind(n)
        .bind(authors)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter().map(status_row).collect()
    }

    async fn live_netdev_namespaces(&mut self, names: Vec<String>) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT o.name, o.namespace FROM UNNEST($1::text[]) AS k(name) \
             CROSS JOIN LATERAL (SELECT name, namespace FROM objects \
                 WHERE kind = 'Netdev' AND deleted_revision IS NULL AND name = k.name LIMIT 1) o",
        )
        .bind(names)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
    }

    async fn load_dpus(&mut self, serials: Vec<String>) -> Result<Vec<DpuRow>> {
        let rows = sqlx::query(
            "SELECT d.* FROM UNNEST($1::text[]) AS k(serial) \
                 CROSS JOIN LATERAL (SELECT * FROM dpus WHERE serial = k.serial LIMIT 1) d",
        )
        .bind(serials)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter().map(dpu_row).collect()
    }

    async fn lapsed_dpus(&mut self, now: DateTime<Utc>, limit: usize) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT serial FROM dpus \
             WHERE ready AND last_heartbeat + lease_duration_ms * interval '1 millisecond' < $1 \
             ORDER BY last_heartbeat LIMIT $2 FOR UPDATE",
        )
        .bind(now)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    async fn live_netdevs_on_dpu(&mut self, serial: String) -> Result<Vec<Key>> {
        let rows = sqlx::query(
            "SELECT namespace, name FROM objects WHERE dpu = $1 AND kind = 'Netdev' AND deleted_revision IS NULL",
        )
        .bind(serial)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter()
            .map(|r| Ok(Key::new(Kind::Netdev, r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?)))
            .collect()
    }

    async fn count_allocations(&mut self, network: String) -> Result<i64> {
        let row = sqlx::query("SELECT count(*) FROM ip_allocations WHERE network = $1")
            .bind(network)
            .fetch_one(&mut *self.tx)
            .await?;
        Ok(row.try_get(0)?)
    }

    async fn allocations_of(
        &mut self,
        netdevs: Vec<(String, String)>,
    ) -> Result<Vec<(String, String, String, String)>> {
        let (ns, n): (Vec<String>, Vec<String>) = netdevs.into_iter().unzip();
        let rows = sqlx::query(
            "SELECT a.namespace, a.name, a.network, a.address FROM UNNEST($1::text[], $2::text[]) AS k(namespace, name) \
             CROSS JOIN LATERAL (SELECT * FROM ip_allocations \
                 WHERE namespace = k.namespace AND name = k.name LIMIT 1) a",
        )
        .bind(ns)
        .bind(n)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?))).collect()
    }

    async fn pool_offset(&mut self, network: String) -> Result<Option<u128>> {
        let row = sqlx::query("SELECT next_offset FROM ip_pools WHERE network = $1")
            .bind(network)
            .fetch_optional(&mut *self.tx)
            .await?;
        Ok(row.and_then(|r| r.try_get::<String, _>(0).ok()).and_then(|s| s.parse().ok()))
    }

    async fn taken(&mut self, network: String, addresses: Vec<String>) -> Result<HashMap<String, (String, String)>> {
        // One primary-key probe per address (LIMIT 1 keeps the lateral from being flattened):
        // planned as `address = ANY(..)` against statistics taken while the table was empty,
        // every allocation of the pool is read and filtered.
        let rows = sqlx::query(
            "SELECT a.address, a.namespace, a.name FROM UNNEST($2::text[]) AS k(address) \
             CROSS JOIN LATERAL (SELECT address, namespace, name FROM ip_allocations \
                 WHERE network = $1 AND address = k.address LIMIT 1) a",
        )
        .bind(network)
        .bind(addresses)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, (r.try_get(1)?, r.try_get(2)?)))).collect()
    }

    async fn max_status_seqs(&mut self, authors: Vec<String>) -> Result<HashMap<String, i64>> {
        // Each author's highest sequence number is the last entry of `statuses_by_author`.
        let rows = sqlx::query(
            "SELECT k.author, COALESCE((SELECT max(s.seq) FROM statuses s WHERE s.author = k.author), 0)::int8 \
             FROM UNNEST($1::text[]) AS k(author)",
        )
        .bind(authors)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
    }

    async fn flush(&mut self, f: &Flush) -> Result<Compacted> {
        let tx = &mut *self.tx;
        // Deletes first, each on its own (the combined write below inserts into the same tables).
        if !f.purge_statuses.is_empty() {
            let (k, ns, n) = key_arrays(&f.purge_statuses);
            sqlx::query(
                "DELETE FROM statuses s USING UNNEST($1::text[], $2::text[], $3::text[]) AS k(kind, namespace, name) \
                 WHERE s.kind = k.kind AND s.namespace = k.namespace AND s.name = k.name",
            )
            .bind(k)
            .bind(ns)
            .bind(n)
            .execute(&mut *tx)
            .await?;
        }
        if !f.delete_statuses.is_empty() {
            let keys: Vec<Key> = f.delete_statuses.iter().map(|(k, _)| k.clone()).collect();
            let (k, ns, n) = key_arrays(&keys);
            let authors: Vec<String> = f.delete_statuses.iter().map(|(_, a)| a.clone()).collect();
            sqlx::query(
                "DELETE FROM statuses s \
                 USING UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS k(kind, namespace, name, author) \
                 WHERE s.kind = k.kind AND s.namespace = k.namespace AND s.name = k.name AND s.author = k.author",
            )
            .bind(k)
            .bind(ns)
            .bind(n)
            .bind(authors)
            .execute(&mut *tx)
            .await?;
        }
        if !f.release_allocations.is_empty() {
            let (ns, n): (Vec<String>, Vec<String>) = f.release_allocations.iter().cloned().unzip();
            sqlx::query(
                "DELETE FROM ip_allocations WHERE ctid = ANY(ARRAY( \
                     SELECT a.ctid FROM UNNEST($1::text[], $2::text[]) AS k(namespace, name) \
                     CROSS JOIN LATERAL (SELECT ctid FROM ip_allocations \
                         WHERE namespace = k.namespace AND name = k.name LIMIT 1) a))",
            )
            .bind(ns)
            .bind(n)
            .execute(&mut *tx)
            .await?;
        }
        if !f.delete_dpus.is_empty() {
            sqlx::query("DELETE FROM dpus WHERE serial = ANY($1)").bind(&f.delete_dpus).execute(&mut *tx).await?;
        }
        let mut compacted = Compacted::default();
        if let Some(to) = f.compact_to {
            let log = sqlx::query("DELETE FROM log WHERE revision <= $1").bind(to).execute(&mut *tx).await?;
            let tomb = sqlx::query("DELETE FROM objects WHERE deleted_revision IS NOT NULL AND deleted_revision <= $1")
                .bind(to)
                .execute(&mut *tx)
                .await?;
            let row = sqlx::query(
                "UPDATE xpu_meta SET compacted_revision = GREATEST(compacted_revision, $1) WHERE id = 1 \
                 RETURNING compacted_revision",
            )
            .bind(to)
            .fetch_one(&mut *tx)
            .await?;
            compacted = Compacted {
                compacted_revision: row.try_get(0)?,
                log_entries_removed: log.rows_affected(),
                tombstones_removed: tomb.rows_affected(),
            };
        }
        combined_write(tx, f, &self.replica).await?;
        Ok(compacted)
    }

    async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        Ok(())
    }
}

/// Numbers the parameters of a statement built from optional parts.
struct Params(usize);

impl Params {
    /// The next `n` placeholders.
    fn take(&mut self, n: usize) -> Vec<String> {
        let out = (self.0 + 1..=self.0 + n).map(|i| format!("${i}")).collect();
        self.0 += n;
        out
    }
}

/// The inserts and upserts of a flush, each into its own table, and the new head with its
/// notification: one statement (one round trip) of data-modifying CTEs. No two parts touch the
/// same table, so their order within the statement does not matter; the foreign key of
/// `statuses` is checked at the end of the statement, when the objects are in.
async fn combined_write(tx: &mut sqlx::PgConnection, f: &Flush, replica: &str) -> Result<()> {
    let mut params = Params(0);
    let mut parts: Vec<String> = Vec::new();
    if !f.objects.is_empty() {
        let p = params.take(14);
        parts.push(format!(
            "INSERT INTO objects (kind, namespace, name, uid, generation, revision, labels, spec, dpu, \
                 selector, spec_author, created_at, updated_at, deleted_revision) \
             SELECT * FROM UNNEST({}::text[], {}::text[], {}::text[], {}::uuid[], {}::int8[], {}::int8[], \
                 {}::jsonb[], {}::jsonb[], {}::text[], {}::jsonb[], {}::text[], {}::timestamptz[], \
                 {}::timestamptz[], {}::int8[]) \
             ON CONFLICT (kind, namespace, name) DO UPDATE SET uid = EXCLUDED.uid, \
                 generation = EXCLUDED.generation, revision = EXCLUDED.revision, labels = EXCLUDED.labels, \
                 spec = EXCLUDED.spec, dpu = EXCLUDED.dpu, selector = EXCLUDED.selector, \
                 spec_author = EXCLUDED.spec_author, created_at = EXCLUDED.created_at, \
                 updated_at = EXCLUDED.updated_at, deleted_revision = EXCLUDED.deleted_revision",
            p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12], p[13]
        ));
    }
    if !f.statuses.is_empty() {
        let p = params.take(9);
        parts.push(format!(
            "INSERT INTO statuses (kind, namespace, name, author, observed_generation, seq, revision, status, \
                 updated_at) \
             SELECT * FROM UNNEST({}::text[], {}::text[], {}::text[], {}::text[], {}::int8[], {}::int8[], \
                 {}::int8[], {}::jsonb[], {}::timestamptz[]) \
             ON CONFLICT (kind, namespace, name, author) DO UPDATE SET \
                 observed_generation = EXCLUDED.observed_generation, seq = EXCLUDED.seq, \
                 revision = EXCLUDED.revision, status = EXCLUDED.status, updated_at = EXCLUDED.updated_at",
            p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]
        ));
    }
    if !f.log.is_empty() {
        let p = params.take(15);
        parts.push(format!(
            "INSERT INTO log (revision, kind, namespace, name, uid, generation, change, author, \
                 observed_generation, labels, body, dpu, selector, prev_selector, at) \
             SELECT * FROM UNNEST({}::int8[], {}::text[], {}::text[], {}::text[], {}::uuid[], {}::int8[], \
                 {}::int2[], {}::text[], {}::int8[], {}::jsonb[], {}::jsonb[], {}::text[], {}::jsonb[], \
                 {}::jsonb[], {}::timestamptz[])",
            p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12], p[13], p[14]
        ));
    }
    if !f.allocations.is_empty() {
        let p = params.take(5);
        parts.push(format!(
            "INSERT INTO ip_allocations (network, address, namespace, name, revision) \
             SELECT * FROM UNNEST({}::text[], {}::text[], {}::text[], {}::text[], {}::int8[])",
            p[0], p[1], p[2], p[3], p[4]
        ));
    }
    if !f.pool_offsets.is_empty() {
        let p = params.take(2);
        parts.push(format!(
            "INSERT INTO ip_pools (network, next_offset) SELECT * FROM UNNEST({}::text[], {}::text[]) \
             ON CONFLICT (network) DO UPDATE SET next_offset = EXCLUDED.next_offset",
            p[0], p[1]
        ));
    }
    if !f.dpus.is_empty() {
        let p = params.take(6);
        parts.push(format!(
            "INSERT INTO dpus (serial, ready, last_heartbeat, lease_duration_ms, applied_revision, registered_at) \
             SELECT * FROM UNNEST({}::text[], {}::bool[], {}::timestamptz[], {}::int8[], {}::int8[], \
                 {}::timestamptz[]) \
             ON CONFLICT (serial) DO UPDATE SET ready = EXCLUDED.ready, last_heartbeat = EXCLUDED.last_heartbeat, \
                 lease_duration_ms = EXCLUDED.lease_duration_ms, applied_revision = EXCLUDED.applied_revision, \
                 registered_at = EXCLUDED.registered_at",
            p[0], p[1], p[2], p[3], p[4], p[5]
        ));
    }
    // The new head and the notification other replicas wake on.
    let head = !f.log.is_empty() || f.force_head;
    let last = if head {
        let p = params.take(3);
        parts.push(format!("UPDATE xpu_meta SET revision = {} WHERE id = 1 RETURNING revision", p[0]));
        format!("SELECT pg_notify({}, {}) FROM w{}", p[1], p[2], parts.len() - 1)
    } else {
        "SELECT 1".to_string()
    };
    if parts.is_empty() {
        return Ok(());
    }
    let ctes: Vec<String> = parts.iter().enumerate().map(|(i, part)| format!("w{i} AS ({part})")).collect();
    let sql = format!("WITH {} {last}", ctes.join(", "));

    let mut q = sqlx::query(&sql);
    if !f.objects.is_empty() {
        let keys: Vec<Key> = f.objects.iter().map(|o| o.key.clone()).collect();
        let (k, ns, n) = key_arrays(&keys);
        let (mut dpus, mut selectors) = (Vec::new(), Vec::new());
        for route in &f.routes {
            let (d, s) = route_columns(route);
            dpus.push(d);
            selectors.push(s);
        }
        q = q
            .bind(k)
            .bind(ns)
            .bind(n)
            .bind(f.objects.iter().map(|o| o.uid).collect::<Vec<Uuid>>())
            .bind(f.objects.iter().map(|o| o.generation).collect::<Vec<_>>())
            .bind(f.objects.iter().map(|o| o.revision).collect::<Vec<_>>())
            .bind(f.objects.iter().map(|o| labels_json(&o.labels)).collect::<Vec<_>>())
            .bind(f.objects.iter().map(|o| &o.spec).collect::<Vec<&Value>>())
            .bind(dpus)
            .bind(selectors)
            .bind(f.objects.iter().map(|o| o.spec_author.as_str()).collect::<Vec<_>>())
            .bind(f.objects.iter().map(|o| o.created_at).collect::<Vec<_>>())
            .bind(f.objects.iter().map(|o| o.updated_at).collect::<Vec<_>>())
            .bind(f.objects.iter().map(|o| o.deleted_revision).collect::<Vec<_>>());
    }
    if !f.statuses.is_empty() {
        let keys: Vec<Key> = f.statuses.iter().map(|s| s.key.clone()).collect();
        let (k, ns, n) = key_arrays(&keys);
        q = q
            .bind(k)
            .bind(ns)
            .bind(n)
            .bind(f.statuses.iter().map(|s| s.author.as_str()).collect::<Vec<_>>())
            .bind(f.statuses.iter().map(|s| s.observed_generation).collect::<Vec<_>>())
            .bind(f.statuses.iter().map(|s| s.seq).collect::<Vec<_>>())
            .bind(f.statuses.iter().map(|s| s.revision).collect::<Vec<_>>())
            .bind(f.statuses.iter().map(|s| &s.status).collect::<Vec<&Value>>())
            .bind(f.statuses.iter().map(|s| s.updated_at).collect::<Vec<_>>());
    }
    if !f.log.is_empty() {
        let keys: Vec<Key> = f.log.iter().map(|e| e.key.clone()).collect();
        let (k, ns, n) = key_arrays(&keys);
        let (mut dpus, mut selectors, mut prev) = (Vec::new(), Vec::new(), Vec::new());
        for e in &f.log {
            let (d, s) = route_columns(&e.route);
            dpus.push(d);
            selectors.push(s);
            prev.push(e.prev_route.as_ref().and_then(|p| route_columns(p).1));
        }
        q = q
            .bind(f.log.iter().map(|e| e.revision).collect::<Vec<_>>())
            .bind(k)
            .bind(ns)
            .bind(n)
            .bind(f.log.iter().map(|e| e.uid).collect::<Vec<_>>())
            .bind(f.log.iter().map(|e| e.generation).collect::<Vec<_>>())
            .bind(f.log.iter().map(|e| e.change.code()).collect::<Vec<_>>())
            .bind(f.log.iter().map(|e| e.author.as_str()).collect::<Vec<_>>())
            .bind(f.log.iter().map(|e| e.observed_generation).collect::<Vec<_>>())
            .bind(f.log.iter().map(|e| labels_json(&e.labels)).collect::<Vec<_>>())
            .bind(f.log.iter().map(|e| e.body.as_ref()).collect::<Vec<Option<&Value>>>())
            .bind(dpus)
            .bind(selectors)
            .bind(prev)
            .bind(f.log.iter().map(|e| e.at).collect::<Vec<_>>());
    }
    if !f.allocations.is_empty() {
        q = q
            .bind(f.allocations.iter().map(|a| a.network.as_str()).collect::<Vec<_>>())
            .bind(f.allocations.iter().map(|a| a.address.as_str()).collect::<Vec<_>>())
            .bind(f.allocations.iter().map(|a| a.namespace.as_str()).collect::<Vec<_>>())
            .bind(f.allocations.iter().map(|a| a.name.as_str()).collect::<Vec<_>>())
            .bind(f.allocations.iter().map(|a| a.revision).collect::<Vec<_>>());
    }
    if !f.pool_offsets.is_empty() {
        q = q
            .bind(f.pool_offsets.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>())
            .bind(f.pool_offsets.iter().map(|(_, o)| o.to_string()).collect::<Vec<_>>());
    }
    if !f.dpus.is_empty() {
        q = q
            .bind(f.dpus.iter().map(|d| d.serial.as_str()).collect::<Vec<_>>())
            .bind(f.dpus.iter().map(|d| d.ready).collect::<Vec<_>>())
            .bind(f.dpus.iter().map(|d| d.last_heartbeat).collect::<Vec<_>>())
            .bind(f.dpus.iter().map(|d| d.lease_duration_ms).collect::<Vec<_>>())
            .bind(f.dpus.iter().map(|d| d.applied_revision).collect::<Vec<_>>())
            .bind(f.dpus.iter().map(|d| d.registered_at).collect::<Vec<_>>());
    }
    if head {
        q = q.bind(f.head).bind(NOTIFY_CHANNEL).bind(format!("{replica}:{}", f.head));
    }
    q.execute(&mut *tx).await?;
    Ok(())
}
