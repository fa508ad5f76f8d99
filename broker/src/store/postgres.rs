//! The Postgres backend: the only place that speaks SQL to Postgres.

use std::{collections::HashMap, str::FromStr, time::Duration};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{
    PgPool, Postgres, Row, Transaction,
    postgres::{PgConnectOptions, PgPoolOptions, PgRow},
};
use uuid::Uuid;

use super::{
    LogFilter,
    batch::WriteTx,
    rows::{Compacted, DpuRow, Flush, ObjectRow, StatusRow, route_columns, route_from_columns},
};
use crate::{
    error::{Error, Result},
    model::{
        Key, Kind, Labels,
        event::{ChangeKind, Event},
        object::{StoredObject, StoredStatus},
    },
};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// NOTIFY channel carrying `<replica>:<revision>` after every commit.
pub const NOTIFY_CHANNEL: &str = "xpu_revision";

pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| Error::invalid("database-url", e.to_string()))?
        // A stalled statement must fail (and be retried by the caller), not hang a writer.
        .options([("statement_timeout", "15s"), ("idle_in_transaction_session_timeout", "60s")]);
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Applies the embedded migrations. sqlx's migrator holds a Postgres advisory lock while it
/// runs, so replicas starting together apply each migration exactly once.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(db) => Error::from(db),
        other => Error::internal(format!("migration failed: {other}")),
    })
}

fn kind_of(s: &str) -> Result<Kind> {
    Kind::parse_stored(s).ok_or_else(|| Error::internal(format!("unknown stored kind {s:?}")))
}

fn labels_of(v: Value) -> Labels {
    serde_json::from_value(v).unwrap_or_default()
}

fn labels_json(l: &Labels) -> Value {
    serde_json::to_value(l).unwrap_or(Value::Object(Default::default()))
}

const OBJECT_COLUMNS: &str = "o.kind, o.namespace, o.name, o.uid, o.generation, o.revision, o.labels, o.spec, \
     o.spec_author, o.created_at, o.updated_at, o.deleted_revision";

fn object_row(r: &PgRow) -> Result<ObjectRow> {
    Ok(ObjectRow {
        key: Key::new(kind_of(r.try_get("kind")?)?, r.try_get::<String, _>("namespace")?, r.try_get::<String, _>("name")?),
        uid: r.try_get("uid")?,
        generation: r.try_get("generation")?,
        revision: r.try_get("revision")?,
        labels: labels_of(r.try_get("labels")?),
        spec: r.try_get("spec")?,
        spec_author: r.try_get("spec_author")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        deleted_revision: r.try_get("deleted_revision")?,
    })
}

fn status_row(r: &PgRow) -> Result<StatusRow> {
    Ok(StatusRow {
        key: Key::new(kind_of(r.try_get("kind")?)?, r.try_get::<String, _>("namespace")?, r.try_get::<String, _>("name")?),
        author: r.try_get("author")?,
        observed_generation: r.try_get("observed_generation")?,
        seq: r.try_get("seq")?,
        revision: r.try_get("revision")?,
        status: r.try_get("status")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn dpu_row(r: &PgRow) -> Result<DpuRow> {
    Ok(DpuRow {
        serial: r.try_get("serial")?,
        ready: r.try_get("ready")?,
        last_heartbeat: r.try_get("last_heartbeat")?,
        lease_duration_ms: r.try_get("lease_duration_ms")?,
        applied_revision: r.try_get("applied_revision")?,
        registered_at: r.try_get("registered_at")?,
    })
}

fn event_row(r: &PgRow) -> Result<Event> {
    let change: i16 = r.try_get("change")?;
    let prev: Option<Value> = r.try_get("prev_selector")?;
    Ok(Event {
        revision: r.try_get("revision")?,
        key: Key::new(kind_of(r.try_get("kind")?)?, r.try_get::<String, _>("namespace")?, r.try_get::<String, _>("name")?),
        uid: r.try_get("uid")?,
        generation: r.try_get("generation")?,
        change: ChangeKind::from_code(change).ok_or_else(|| Error::internal(format!("unknown change {change}")))?,
        labels: labels_of(r.try_get("labels")?),
        body: r.try_get("body")?,
        author: r.try_get("author")?,
        observed_generation: r.try_get("observed_generation")?,
        route: route_from_columns(r.try_get("dpu")?, r.try_get("selector")?),
        prev_route: prev.map(|p| route_from_columns(None, Some(p))),
        at: r.try_get("at")?,
    })
}

fn key_arrays(keys: &[Key]) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut k = Vec::with_capacity(keys.len());
    let mut ns = Vec::with_capacity(keys.len());
    let mut n = Vec::with_capacity(keys.len());
    for key in keys {
        k.push(key.kind.as_str().to_string());
        ns.push(key.namespace.clone());
        n.push(key.name.clone());
    }
    (k, ns, n)
}

pub struct PgWriteTx {
    tx: Transaction<'static, Postgres>,
    replica: String,
}

impl PgWriteTx {
    pub async fn begin(pool: &PgPool, replica: &str) -> Result<PgWriteTx> {
        Ok(PgWriteTx { tx: pool.begin().await?, replica: replica.to_string() })
    }
}

impl WriteTx for PgWriteTx {
    async fn lock_head(&mut self) -> Result<i64> {
        let row = sqlx::query("SELECT revision FROM xpu_meta WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut *self.tx)
            .await?;
        Ok(row.try_get(0)?)
    }

    async fn load_objects(&mut self, keys: Vec<Key>) -> Result<Vec<ObjectRow>> {
        let (k, ns, n) = key_arrays(&keys);
        let sql = format!(
            "SELECT {OBJECT_COLUMNS} FROM objects o \
             JOIN UNNEST($1::text[], $2::text[], $3::text[]) AS k(kind, namespace, name) \
             ON o.kind = k.kind AND o.namespace = k.namespace AND o.name = k.name"
        );
        let rows = sqlx::query(&sql).bind(k).bind(ns).bind(n).fetch_all(&mut *self.tx).await?;
        rows.iter().map(object_row).collect()
    }

    async fn load_statuses(&mut self, pairs: Vec<(Key, String)>) -> Result<Vec<StatusRow>> {
        let keys: Vec<Key> = pairs.iter().map(|(k, _)| k.clone()).collect();
        let authors: Vec<String> = pairs.into_iter().map(|(_, a)| a).collect();
        let (k, ns, n) = key_arrays(&keys);
        let rows = sqlx::query(
            "SELECT s.* FROM statuses s \
             JOIN UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS k(kind, namespace, name, author) \
             ON s.kind = k.kind AND s.namespace = k.namespace AND s.name = k.name AND s.author = k.author",
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
            "SELECT name, namespace FROM objects \
             WHERE kind = 'Netdev' AND deleted_revision IS NULL AND name = ANY($1)",
        )
        .bind(names)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
    }

    async fn load_dpus(&mut self, serials: Vec<String>) -> Result<Vec<DpuRow>> {
        let rows = sqlx::query("SELECT * FROM dpus WHERE serial = ANY($1)")
            .bind(serials)
            .fetch_all(&mut *self.tx)
            .await?;
        rows.iter().map(dpu_row).collect()
    }

    async fn lapsed_dpus(&mut self, now: DateTime<Utc>) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT serial FROM dpus \
             WHERE ready AND last_heartbeat + lease_duration_ms * interval '1 millisecond' < $1",
        )
        .bind(now)
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

    async fn allocation_of(&mut self, namespace: String, name: String) -> Result<Option<(String, String)>> {
        let row = sqlx::query("SELECT network, address FROM ip_allocations WHERE namespace = $1 AND name = $2")
            .bind(namespace)
            .bind(name)
            .fetch_optional(&mut *self.tx)
            .await?;
        row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
    }

    async fn pool_offset(&mut self, network: String) -> Result<Option<u128>> {
        let row = sqlx::query("SELECT next_offset FROM ip_pools WHERE network = $1")
            .bind(network)
            .fetch_optional(&mut *self.tx)
            .await?;
        Ok(row.and_then(|r| r.try_get::<String, _>(0).ok()).and_then(|s| s.parse().ok()))
    }

    async fn taken(&mut self, network: String, addresses: Vec<String>) -> Result<HashMap<String, (String, String)>> {
        let rows = sqlx::query(
            "SELECT address, namespace, name FROM ip_allocations WHERE network = $1 AND address = ANY($2)",
        )
        .bind(network)
        .bind(addresses)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, (r.try_get(1)?, r.try_get(2)?)))).collect()
    }

    async fn max_status_seq(&mut self, author: String) -> Result<i64> {
        let row = sqlx::query("SELECT COALESCE(max(seq), 0)::int8 FROM statuses WHERE author = $1")
            .bind(author)
            .fetch_one(&mut *self.tx)
            .await?;
        Ok(row.try_get(0)?)
    }

    async fn flush(&mut self, f: Flush) -> Result<Compacted> {
        let tx = &mut *self.tx;
        if !f.objects.is_empty() {
            let keys: Vec<Key> = f.objects.iter().map(|o| o.key.clone()).collect();
            let (k, ns, n) = key_arrays(&keys);
            let (mut dpus, mut selectors) = (Vec::new(), Vec::new());
            for route in &f.routes {
                let (d, s) = route_columns(route);
                dpus.push(d);
                selectors.push(s);
            }
            sqlx::query(
                "INSERT INTO objects (kind, namespace, name, uid, generation, revision, labels, spec, dpu, \
                     selector, spec_author, created_at, updated_at, deleted_revision) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::uuid[], $5::int8[], $6::int8[], \
                     $7::jsonb[], $8::jsonb[], $9::text[], $10::jsonb[], $11::text[], $12::timestamptz[], \
                     $13::timestamptz[], $14::int8[]) \
                 ON CONFLICT (kind, namespace, name) DO UPDATE SET uid = EXCLUDED.uid, \
                     generation = EXCLUDED.generation, revision = EXCLUDED.revision, labels = EXCLUDED.labels, \
                     spec = EXCLUDED.spec, dpu = EXCLUDED.dpu, selector = EXCLUDED.selector, \
                     spec_author = EXCLUDED.spec_author, created_at = EXCLUDED.created_at, \
                     updated_at = EXCLUDED.updated_at, deleted_revision = EXCLUDED.deleted_revision",
            )
            .bind(k)
            .bind(ns)
            .bind(n)
            .bind(f.objects.iter().map(|o| o.uid).collect::<Vec<Uuid>>())
            .bind(f.objects.iter().map(|o| o.generation).collect::<Vec<_>>())
            .bind(f.objects.iter().map(|o| o.revision).collect::<Vec<_>>())
            .bind(f.objects.iter().map(|o| labels_json(&o.labels)).collect::<Vec<_>>())
            .bind(f.objects.iter().map(|o| o.spec.clone()).collect::<Vec<_>>())
            .bind(dpus)
            .bind(selectors)
            .bind(f.objects.iter().map(|o| o.spec_author.clone()).collect::<Vec<_>>())
            .bind(f.objects.iter().map(|o| o.created_at).collect::<Vec<_>>())
            .bind(f.objects.iter().map(|o| o.updated_at).collect::<Vec<_>>())
            .bind(f.objects.iter().map(|o| o.deleted_revision).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
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
        if !f.statuses.is_empty() {
            let keys: Vec<Key> = f.statuses.iter().map(|s| s.key.clone()).collect();
            let (k, ns, n) = key_arrays(&keys);
            sqlx::query(
                "INSERT INTO statuses (kind, namespace, name, author, observed_generation, seq, revision, status, updated_at) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], \
                     $7::int8[], $8::jsonb[], $9::timestamptz[]) \
                 ON CONFLICT (kind, namespace, name, author) DO UPDATE SET \
                     observed_generation = EXCLUDED.observed_generation, seq = EXCLUDED.seq, \
                     revision = EXCLUDED.revision, status = EXCLUDED.status, updated_at = EXCLUDED.updated_at",
            )
            .bind(k)
            .bind(ns)
            .bind(n)
            .bind(f.statuses.iter().map(|s| s.author.clone()).collect::<Vec<_>>())
            .bind(f.statuses.iter().map(|s| s.observed_generation).collect::<Vec<_>>())
            .bind(f.statuses.iter().map(|s| s.seq).collect::<Vec<_>>())
            .bind(f.statuses.iter().map(|s| s.revision).collect::<Vec<_>>())
            .bind(f.statuses.iter().map(|s| s.status.clone()).collect::<Vec<_>>())
            .bind(f.statuses.iter().map(|s| s.updated_at).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
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
            sqlx::query(
                "INSERT INTO log (revision, kind, namespace, name, uid, generation, change, author, \
                     observed_generation, labels, body, dpu, selector, prev_selector, at) \
                 SELECT * FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::text[], $5::uuid[], $6::int8[], \
                     $7::int2[], $8::text[], $9::int8[], $10::jsonb[], $11::jsonb[], $12::text[], $13::jsonb[], \
                     $14::jsonb[], $15::timestamptz[])",
            )
            .bind(f.log.iter().map(|e| e.revision).collect::<Vec<_>>())
            .bind(k)
            .bind(ns)
            .bind(n)
            .bind(f.log.iter().map(|e| e.uid).collect::<Vec<_>>())
            .bind(f.log.iter().map(|e| e.generation).collect::<Vec<_>>())
            .bind(f.log.iter().map(|e| e.change.code()).collect::<Vec<_>>())
            .bind(f.log.iter().map(|e| e.author.clone()).collect::<Vec<_>>())
            .bind(f.log.iter().map(|e| e.observed_generation).collect::<Vec<_>>())
            .bind(f.log.iter().map(|e| labels_json(&e.labels)).collect::<Vec<_>>())
            .bind(f.log.iter().map(|e| e.body.clone()).collect::<Vec<_>>())
            .bind(dpus)
            .bind(selectors)
            .bind(prev)
            .bind(f.log.iter().map(|e| e.at).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        if !f.release_allocations.is_empty() {
            let (ns, n): (Vec<String>, Vec<String>) = f.release_allocations.iter().cloned().unzip();
            sqlx::query(
                "DELETE FROM ip_allocations a USING UNNEST($1::text[], $2::text[]) AS k(namespace, name) \
                 WHERE a.namespace = k.namespace AND a.name = k.name",
            )
            .bind(ns)
            .bind(n)
            .execute(&mut *tx)
            .await?;
        }
        if !f.allocations.is_empty() {
            sqlx::query(
                "INSERT INTO ip_allocations (network, address, namespace, name, revision) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[])",
            )
            .bind(f.allocations.iter().map(|a| a.network.clone()).collect::<Vec<_>>())
            .bind(f.allocations.iter().map(|a| a.address.clone()).collect::<Vec<_>>())
            .bind(f.allocations.iter().map(|a| a.namespace.clone()).collect::<Vec<_>>())
            .bind(f.allocations.iter().map(|a| a.name.clone()).collect::<Vec<_>>())
            .bind(f.allocations.iter().map(|a| a.revision).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        if !f.pool_offsets.is_empty() {
            sqlx::query(
                "INSERT INTO ip_pools (network, next_offset) SELECT * FROM UNNEST($1::text[], $2::text[]) \
                 ON CONFLICT (network) DO UPDATE SET next_offset = EXCLUDED.next_offset",
            )
            .bind(f.pool_offsets.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>())
            .bind(f.pool_offsets.iter().map(|(_, o)| o.to_string()).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        if !f.dpus.is_empty() {
            sqlx::query(
                "INSERT INTO dpus (serial, ready, last_heartbeat, lease_duration_ms, applied_revision, registered_at) \
                 SELECT * FROM UNNEST($1::text[], $2::bool[], $3::timestamptz[], $4::int8[], $5::int8[], $6::timestamptz[]) \
                 ON CONFLICT (serial) DO UPDATE SET ready = EXCLUDED.ready, last_heartbeat = EXCLUDED.last_heartbeat, \
                     lease_duration_ms = EXCLUDED.lease_duration_ms, applied_revision = EXCLUDED.applied_revision, \
                     registered_at = EXCLUDED.registered_at",
            )
            .bind(f.dpus.iter().map(|d| d.serial.clone()).collect::<Vec<_>>())
            .bind(f.dpus.iter().map(|d| d.ready).collect::<Vec<_>>())
            .bind(f.dpus.iter().map(|d| d.last_heartbeat).collect::<Vec<_>>())
            .bind(f.dpus.iter().map(|d| d.lease_duration_ms).collect::<Vec<_>>())
            .bind(f.dpus.iter().map(|d| d.applied_revision).collect::<Vec<_>>())
            .bind(f.dpus.iter().map(|d| d.registered_at).collect::<Vec<_>>())
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
        if !f.log.is_empty() {
            sqlx::query("UPDATE xpu_meta SET revision = $1 WHERE id = 1").bind(f.head).execute(&mut *tx).await?;
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(NOTIFY_CHANNEL)
                .bind(format!("{}:{}", self.replica, f.head))
                .execute(&mut *tx)
                .await?;
        }
        Ok(compacted)
    }

    async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        Ok(())
    }
}

// ---- reads ----

/// Attaches statuses (with staleness from the authors' leases), leases and pool usage.
async fn complete(pool: &PgPool, rows: Vec<ObjectRow>) -> Result<Vec<StoredObject>> {
    if rows.is_empty() {
        return Ok(vec![]);
    }
    let keys: Vec<Key> = rows.iter().map(|r| r.key.clone()).collect();
    let (k, ns, n) = key_arrays(&keys);
    let status_rows = sqlx::query(
        "SELECT s.*, COALESCE(NOT d.ready, false) AS stale FROM statuses s \
         JOIN UNNEST($1::text[], $2::text[], $3::text[]) AS k(kind, namespace, name) \
           ON s.kind = k.kind AND s.namespace = k.namespace AND s.name = k.name \
         LEFT JOIN dpus d ON s.author = 'dpu/' || d.serial \
         ORDER BY s.author",
    )
    .bind(k)
    .bind(ns)
    .bind(n)
    .fetch_all(pool)
    .await?;
    let mut statuses: HashMap<Key, Vec<StoredStatus>> = HashMap::new();
    for r in &status_rows {
        let s = status_row(r)?;
        statuses.entry(s.key.clone()).or_default().push(StoredStatus {
            author: s.author,
            observed_generation: s.observed_generation,
            seq: s.seq,
            revision: s.revision,
            status: s.status,
            updated_at: s.updated_at,
            stale: r.try_get("stale")?,
        });
    }
    let dpu_serials: Vec<String> = keys.iter().filter(|k| k.kind == Kind::Dpu).map(|k| k.name.clone()).collect();
    let mut leases = HashMap::new();
    if !dpu_serials.is_empty() {
        for r in sqlx::query("SELECT * FROM dpus WHERE serial = ANY($1)").bind(dpu_serials).fetch_all(pool).await? {
            let d = dpu_row(&r)?;
            leases.insert(d.serial.clone(), d.lease());
        }
    }
    let networks: Vec<String> = keys.iter().filter(|k| k.kind == Kind::XpuNetwork).map(|k| k.name.clone()).collect();
    let mut allocated = HashMap::new();
    if !networks.is_empty() {
        let q = "SELECT network, count(*)::int8 FROM ip_allocations WHERE network = ANY($1) GROUP BY network";
        for r in sqlx::query(q).bind(networks).fetch_all(pool).await? {
            allocated.insert(r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)?);
        }
    }
    Ok(rows
        .into_iter()
        .map(|row| {
            let st = statuses.remove(&row.key).unwrap_or_default();
            let lease = (row.key.kind == Kind::Dpu).then(|| leases.get(&row.key.name).cloned()).flatten();
            let alloc = (row.key.kind == Kind::XpuNetwork)
                .then(|| allocated.get(&row.key.name).map_or(0, |n| u64::try_from(*n).unwrap_or(0)));
            row.into_stored(st, lease, alloc)
        })
        .collect())
}

pub async fn head(pool: &PgPool) -> Result<(i64, i64)> {
    let row = sqlx::query("SELECT revision, compacted_revision FROM xpu_meta WHERE id = 1").fetch_one(pool).await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

pub async fn get(pool: &PgPool, key: &Key, include_deleted: bool) -> Result<Option<StoredObject>> {
    let sql = format!(
        "SELECT {OBJECT_COLUMNS} FROM objects o WHERE o.kind = $1 AND o.namespace = $2 AND o.name = $3 \
         AND ($4 OR o.deleted_revision IS NULL)"
    );
    let row = sqlx::query(&sql)
        .bind(key.kind.as_str())
        .bind(&key.namespace)
        .bind(&key.name)
        .bind(include_deleted)
        .fetch_optional(pool)
        .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(complete(pool, vec![object_row(&row)?]).await?.into_iter().next())
}

/// One page of live objects of a kind, ordered by (namespace, name), after `after`.
pub async fn list(
    pool: &PgPool,
    kind: Kind,
    namespace: Option<&str>,
    selector: &Labels,
    after: Option<(String, String)>,
    limit: usize,
) -> Result<Vec<StoredObject>> {
    let (after_ns, after_name) = after.unwrap_or_default();
    let sql = format!(
        "SELECT {OBJECT_COLUMNS} FROM objects o WHERE o.kind = $1 AND o.deleted_revision IS NULL \
         AND ($2::text IS NULL OR o.namespace = $2) AND o.labels @> $3 \
         AND (o.namespace, o.name) > ($4, $5) ORDER BY o.namespace, o.name LIMIT $6"
    );
    let rows = sqlx::query(&sql)
        .bind(kind.as_str())
        .bind(namespace)
        .bind(labels_json(selector))
        .bind(after_ns)
        .bind(after_name)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(pool)
        .await?;
    let rows = rows.iter().map(object_row).collect::<Result<Vec<_>>>()?;
    complete(pool, rows).await
}

/// Log entries after `after` that `filter` selects, in revision order, with the compaction
/// horizon read after them (a horizon past `after` means entries may be missing).
pub async fn read_log(pool: &PgPool, after: i64, limit: usize, filter: &LogFilter) -> Result<(Vec<Event>, i64)> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = match filter {
        LogFilter::All => {
            sqlx::query("SELECT * FROM log WHERE revision > $1 ORDER BY revision LIMIT $2")
                .bind(after)
                .bind(limit)
                .fetch_all(pool)
                .await?
        }
        LogFilter::Kinds(kinds) => {
            let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
            sqlx::query("SELECT * FROM log WHERE revision > $1 AND kind = ANY($2) ORDER BY revision LIMIT $3")
                .bind(after)
                .bind(kinds)
                .bind(limit)
                .fetch_all(pool)
                .await?
        }
        LogFilter::Dpu(serial) => {
            let kinds: Vec<&str> = Kind::SELECTOR_ROUTED.iter().map(|k| k.as_str()).collect();
            sqlx::query(
                "SELECT * FROM log WHERE revision > $1 AND change <> 2 \
                 AND (dpu = $2 OR kind = ANY($3) OR (kind = 'Dpu' AND name = $2)) ORDER BY revision LIMIT $4",
            )
            .bind(after)
            .bind(serial)
            .bind(kinds)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }
        LogFilter::Object(key) => {
            sqlx::query(
                "SELECT * FROM log WHERE revision > $1 AND kind = $2 AND namespace = $3 AND name = $4 \
                 ORDER BY revision LIMIT $5",
            )
            .bind(after)
            .bind(key.kind.as_str())
            .bind(&key.namespace)
            .bind(&key.name)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }
    };
    let events = rows.iter().map(event_row).collect::<Result<Vec<_>>>()?;
    let (_, compacted) = head(pool).await?;
    Ok((events, compacted))
}

/// A consistent view of the store at one revision, read page by page.
pub struct Snapshot {
    tx: Transaction<'static, Postgres>,
    pub revision: i64,
}

impl Snapshot {
    pub async fn begin(pool: &PgPool) -> Result<Snapshot> {
        let mut tx = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
        let row = sqlx::query("SELECT revision FROM xpu_meta WHERE id = 1").fetch_one(&mut *tx).await?;
        Ok(Snapshot { revision: row.try_get(0)?, tx })
    }

    /// Live objects of `kinds` (optionally only Netdevs of one DPU), after `after` in
    /// (kind, namespace, name) order.
    pub async fn page(
        &mut self,
        kinds: &[Kind],
        dpu: Option<&str>,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<StoredObject>> {
        let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        let (ak, ans, an) = after
            .map(|k| (k.kind.as_str().to_string(), k.namespace.clone(), k.name.clone()))
            .unwrap_or_default();
        let sql = format!(
            "SELECT {OBJECT_COLUMNS} FROM objects o WHERE o.kind = ANY($1) AND o.deleted_revision IS NULL \
             AND ($2::text IS NULL OR o.kind <> 'Netdev' OR o.dpu = $2) \
             AND (o.kind, o.namespace, o.name) > ($3, $4, $5) ORDER BY o.kind, o.namespace, o.name LIMIT $6"
        );
        let rows = sqlx::query(&sql)
            .bind(kinds)
            .bind(dpu)
            .bind(ak)
            .bind(ans)
            .bind(an)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *self.tx)
            .await?;
        let rows = rows.iter().map(object_row).collect::<Result<Vec<_>>>()?;
        // Statuses are read in the same snapshot as the objects.
        complete_in(&mut self.tx, rows).await
    }
}

async fn complete_in(tx: &mut Transaction<'static, Postgres>, rows: Vec<ObjectRow>) -> Result<Vec<StoredObject>> {
    if rows.is_empty() {
        return Ok(vec![]);
    }
    let keys: Vec<Key> = rows.iter().map(|r| r.key.clone()).collect();
    let (k, ns, n) = key_arrays(&keys);
    let status_rows = sqlx::query(
        "SELECT s.*, COALESCE(NOT d.ready, false) AS stale FROM statuses s \
         JOIN UNNEST($1::text[], $2::text[], $3::text[]) AS k(kind, namespace, name) \
           ON s.kind = k.kind AND s.namespace = k.namespace AND s.name = k.name \
         LEFT JOIN dpus d ON s.author = 'dpu/' || d.serial ORDER BY s.author",
    )
    .bind(k)
    .bind(ns)
    .bind(n)
    .fetch_all(&mut **tx)
    .await?;
    let mut statuses: HashMap<Key, Vec<StoredStatus>> = HashMap::new();
    for r in &status_rows {
        let s = status_row(r)?;
        statuses.entry(s.key.clone()).or_default().push(StoredStatus {
            author: s.author,
            observed_generation: s.observed_generation,
            seq: s.seq,
            revision: s.revision,
            status: s.status,
            updated_at: s.updated_at,
            stale: r.try_get("stale")?,
        });
    }
    Ok(rows
        .into_iter()
        .map(|row| {
            let st = statuses.remove(&row.key).unwrap_or_default();
            row.into_stored(st, None, None)
        })
        .collect())
}

pub async fn dpu_labels(pool: &PgPool, serial: &str) -> Result<Option<Labels>> {
    let row = sqlx::query("SELECT labels FROM objects WHERE kind = 'Dpu' AND namespace = '' AND name = $1 AND deleted_revision IS NULL")
        .bind(serial)
        .fetch_optional(pool)
        .await?;
    row.map(|r| Ok(labels_of(r.try_get(0)?))).transpose()
}

pub struct FleetCounts {
    pub dpus_ready: u32,
    pub dpus_unknown: u32,
    pub netdevs_by_phase: Vec<(String, u64)>,
    pub objects_by_kind: Vec<(String, u64)>,
}

pub async fn fleet_counts(pool: &PgPool) -> Result<FleetCounts> {
    let row = sqlx::query("SELECT count(*) FILTER (WHERE ready)::int8, count(*) FILTER (WHERE NOT ready)::int8 FROM dpus")
        .fetch_one(pool)
        .await?;
    let (ready, unknown): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    let phases = sqlx::query(
        "SELECT COALESCE(s.status->>'phase', 'Pending') AS phase, count(*)::int8 FROM objects o \
         LEFT JOIN statuses s ON s.kind = o.kind AND s.namespace = o.namespace AND s.name = o.name \
         WHERE o.kind = 'Netdev' AND o.deleted_revision IS NULL GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    let kinds = sqlx::query(
        "SELECT kind, count(*)::int8 FROM objects WHERE deleted_revision IS NULL GROUP BY kind ORDER BY kind",
    )
    .fetch_all(pool)
    .await?;
    let pairs = |rows: Vec<PgRow>| -> Result<Vec<(String, u64)>> {
        rows.iter()
            .map(|r| Ok((r.try_get::<String, _>(0)?, u64::try_from(r.try_get::<i64, _>(1)?).unwrap_or(0))))
            .collect()
    };
    Ok(FleetCounts {
        dpus_ready: u32::try_from(ready).unwrap_or(u32::MAX),
        dpus_unknown: u32::try_from(unknown).unwrap_or(u32::MAX),
        netdevs_by_phase: pairs(phases)?,
        objects_by_kind: pairs(kinds)?,
    })
}

pub async fn ping(pool: &PgPool) -> Result<()> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

/// Follows NOTIFYs from other replicas and forwards their revisions. A lost connection is
/// reported as `None` (anything may have been missed) and re-established.
pub async fn listen(pool: PgPool, replica: String, wakeups: tokio::sync::mpsc::Sender<Option<i64>>) {
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for other replicas' commits; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(NOTIFY_CHANNEL).await {
            tracing::warn!(error = %e, "LISTEN failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // Whatever was committed while not listening is picked up from the log.
        if wakeups.send(None).await.is_err() {
            return;
        }
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => {
                    let Some((from, rev)) = n.payload().split_once(':') else { continue };
                    if from == replica {
                        continue;
                    }
                    if let Ok(rev) = rev.parse::<i64>() {
                        if wakeups.send(Some(rev)).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(None) => {
                    if wakeups.send(None).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lost the LISTEN connection; reconnecting");
                    break;
                }
            }
        }
    }
}
