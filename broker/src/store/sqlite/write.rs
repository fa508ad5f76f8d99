//! The write transaction of the SQLite backend. `BEGIN IMMEDIATE` takes the database's single
//! write lock up front, so batches commit one after another in revision order.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{Row, SqliteConnection, SqlitePool, pool::PoolConnection};

use super::{CHUNK, OBJECT_COLUMNS, dpu_row, json_text, key_tuples, labels_text, object_row, status_row};
use crate::{
    error::Result,
    model::{Key, Kind},
    store::{
        batch::WriteTx,
        rows::{Compacted, DpuRow, Flush, ObjectRow, StatusRow, route_columns},
    },
};

pub struct SqliteWriteTx {
    conn: PoolConnection<sqlx::Sqlite>,
    open: bool,
    compacted: Option<i64>,
}

impl SqliteWriteTx {
    pub async fn begin(pool: &SqlitePool) -> Result<SqliteWriteTx> {
        let mut conn = pool.acquire().await?;
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
        Ok(SqliteWriteTx { conn, open: true, compacted: None })
    }

    fn c(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }
}

impl Drop for SqliteWriteTx {
    fn drop(&mut self) {
        if self.open {
            // Not committed (an error): the connection must not go back to the pool mid-transaction.
            self.conn.close_on_drop();
        }
    }
}

fn opt_json(v: &Option<serde_json::Value>) -> Option<String> {
    v.as_ref().map(json_text)
}

impl WriteTx for SqliteWriteTx {
    async fn lock_head(&mut self) -> Result<i64> {
        let (revision, compacted): (i64, i64) =
            sqlx::query_as("SELECT revision, compacted_revision FROM xpu_meta WHERE id = 1")
                .fetch_one(self.c())
                .await?;
        self.compacted = Some(compacted);
        Ok(revision)
    }

    fn compacted_seen(&self) -> Option<i64> {
        self.compacted
    }

    async fn load_objects(&mut self, keys: Vec<Key>) -> Result<Vec<ObjectRow>> {
        let mut out = Vec::new();
        for chunk in keys.chunks(CHUNK) {
            let sql = format!(
                "SELECT {OBJECT_COLUMNS} FROM objects WHERE (kind, namespace, name) IN (VALUES {})",
                key_tuples(chunk.len(), 3)
            );
            let mut q = sqlx::query(&sql);
            for k in chunk {
                q = q.bind(k.kind.as_str()).bind(&k.namespace).bind(&k.name);
            }
            for r in q.fetch_all(self.c()).await? {
                out.push(object_row(&r)?);
            }
        }
        Ok(out)
    }

    async fn load_statuses(&mut self, pairs: Vec<(Key, String)>) -> Result<Vec<StatusRow>> {
        let mut out = Vec::new();
        for chunk in pairs.chunks(CHUNK) {
            let sql = format!(
                "SELECT * FROM statuses WHERE (kind, namespace, name, author) IN (VALUES {})",
                key_tuples(chunk.len(), 4)
            );
            let mut q = sqlx::query(&sql);
            for (k, a) in chunk {
                q = q.bind(k.kind.as_str()).bind(&k.namespace).bind(&k.name).bind(a);
            }
            for r in q.fetch_all(self.c()).await? {
                out.push(status_row(&r)?);
            }
        }
        Ok(out)
    }

    async fn live_netdev_namespaces(&mut self, names: Vec<String>) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for chunk in names.chunks(CHUNK) {
            let sql = format!(
                "SELECT name, namespace FROM objects WHERE kind = 'Netdev' AND deleted_revision IS NULL AND name IN ({})",
                vec!["?"; chunk.len()].join(",")
            );
            let mut q = sqlx::query(&sql);
            for n in chunk {
                q = q.bind(n);
            }
            for r in q.fetch_all(self.c()).await? {
                out.push((r.try_get(0)?, r.try_get(1)?));
            }
        }
        Ok(out)
    }

    async fn load_dpus(&mut self, serials: Vec<String>) -> Result<Vec<DpuRow>> {
        let mut out = Vec::new();
        for s in serials {
            if let Some(r) =
                sqlx::query("SELECT * FROM dpus WHERE serial = ?").bind(&s).fetch_optional(self.c()).await?
            {
                out.push(dpu_row(&r)?);
            }
        }
        Ok(out)
    }

    async fn lapsed_dpus(&mut self, now: DateTime<Utc>, limit: usize) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT * FROM dpus WHERE ready = 1").fetch_all(self.c()).await?;
        let mut out = Vec::new();
        for r in rows {
            let d = dpu_row(&r)?;
            if d.last_heartbeat + chrono::Duration::milliseconds(d.lease_duration_ms) < now {
                out.push((d.last_heartbeat, d.serial));
            }
        }
        out.sort();
        Ok(out.into_iter().take(limit).map(|(_, serial)| serial).collect())
    }

    async fn live_netdevs_on_dpu(&mut self, serial: String) -> Result<Vec<Key>> {
        let rows = sqlx::query(
            "SELECT namespace, name FROM objects WHERE dpu = ? AND kind = 'Netdev' AND deleted_revision IS NULL",
        )
        .bind(serial)
        .fetch_all(self.c())
        .await?;
        rows.iter()
            .map(|r| Ok(Key::new(Kind::Netdev, r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?)))
            .collect()
    }

    async fn count_allocations(&mut self, network: String) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM ip_allocations WHERE network = ?")
            .bind(network)
            .fetch_one(self.c())
            .await?)
    }

    async fn allocations_of(
        &mut self,
        netdevs: Vec<(String, String)>,
    ) -> Result<Vec<(String, String, String, String)>> {
        let mut out = Vec::new();
        for (namespace, name) in netdevs {
            let row = sqlx::query("SELECT network, address FROM ip_allocations WHERE namespace = ? AND name = ?")
                .bind(&namespace)
                .bind(&name)
                .fetch_optional(self.c())
                .await?;
            if let Some(r) = row {
                out.push((namespace, name, r.try_get(0)?, r.try_get(1)?));
            }
        }
        Ok(out)
    }

    async fn pool_offset(&mut self, network: String) -> Result<Option<u128>> {
        let v: Option<String> = sqlx::query_scalar("SELECT next_offset FROM ip_pools WHERE network = ?")
            .bind(network)
            .fetch_optional(self.c())
            .await?;
        Ok(v.and_then(|s| s.parse().ok()))
    }

    async fn taken(&mut self, network: String, addresses: Vec<String>) -> Result<HashMap<String, (String, String)>> {
        let mut out = HashMap::new();
        for chunk in addresses.chunks(CHUNK) {
            let sql = format!(
                "SELECT address, namespace, name FROM ip_allocations WHERE network = ? AND address IN ({})",
                vec!["?"; chunk.len()].join(",")
            );
            let mut q = sqlx::query(&sql).bind(&network);
            for a in chunk {
                q = q.bind(a);
            }
            for r in q.fetch_all(self.c()).await? {
                out.insert(r.try_get(0)?, (r.try_get(1)?, r.try_get(2)?));
            }
        }
        Ok(out)
    }

    async fn max_status_seqs(&mut self, authors: Vec<String>) -> Result<HashMap<String, i64>> {
        let mut out = HashMap::with_capacity(authors.len());
        for author in authors {
            let seq: i64 = sqlx::query_scalar("SELECT COALESCE(max(seq), 0) FROM statuses WHERE author = ?")
                .bind(&author)
                .fetch_one(self.c())
                .await?;
            out.insert(author, seq);
        }
        Ok(out)
    }

    async fn flush(&mut self, f: &Flush) -> Result<Compacted> {
        let c = self.c();
        for (o, route) in f.objects.iter().zip(&f.routes) {
            let (dpu, selector) = route_columns(route);
            sqlx::query(
                "INSERT INTO objects (kind, namespace, name, uid, generation, revision, labels, spec, dpu, selector, \
                     spec_author, created_at, updated_at, deleted_revision) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) \
                 ON CONFLICT (kind, namespace, name) DO UPDATE SET uid = excluded.uid, generation = excluded.generation, \
                     revision = excluded.revision, labels = excluded.labels, spec = excluded.spec, dpu = excluded.dpu, \
                     selector = excluded.selector, spec_author = excluded.spec_author, created_at = excluded.created_at, \
                     updated_at = excluded.updated_at, deleted_revision = excluded.deleted_revision",
            )
            .bind(o.key.kind.as_str())
            .bind(&o.key.namespace)
            .bind(&o.key.name)
            .bind(o.uid.to_string())
            .bind(o.generation)
            .bind(o.revision)
            .bind(labels_text(&o.labels))
            .bind(json_text(&o.spec))
            .bind(dpu)
            .bind(opt_json(&selector))
            .bind(&o.spec_author)
            .bind(o.created_at)
            .bind(o.updated_at)
            .bind(o.deleted_revision)
            .execute(&mut *c)
            .await?;
        }
        for k in &f.purge_statuses {
            sqlx::query("DELETE FROM statuses WHERE kind = ? AND namespace = ? AND name = ?")
                .bind(k.kind.as_str())
                .bind(&k.namespace)
                .bind(&k.name)
                .execute(&mut *c)
                .await?;
        }
        for (k, a) in &f.delete_statuses {
            sqlx::query("DELETE FROM statuses WHERE kind = ? AND namespace = ? AND name = ? AND author = ?")
                .bind(k.kind.as_str())
                .bind(&k.namespace)
                .bind(&k.name)
                .bind(a)
                .execute(&mut *c)
                .await?;
        }
        for s in &f.statuses {
            sqlx::query(
                "INSERT INTO statuses (kind, namespace, name, author, observed_generation, seq, revision, status, updated_at) \
                 VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (kind, namespace, name, author) DO UPDATE SET \
                     observed_generation = excluded.observed_generation, seq = excluded.seq, revision = excluded.revision, \
                     status = excluded.status, updated_at = excluded.updated_at",
            )
            .bind(s.key.kind.as_str())
            .bind(&s.key.namespace)
            .bind(&s.key.name)
            .bind(&s.author)
            .bind(s.observed_generation)
            .bind(s.seq)
            .bind(s.revision)
            .bind(json_text(&s.status))
            .bind(s.updated_at)
            .execute(&mut *c)
            .await?;
        }
        for e in &f.log {
            let (dpu, selector) = route_columns(&e.route);
            let prev = e.prev_route.as_ref().and_then(|p| route_columns(p).1);
            sqlx::query(
                "INSERT INTO log (revision, kind, namespace, name, uid, generation, change, author, observed_generation, \
                     labels, body, dpu, selector, prev_selector, at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            )
            .bind(e.revision)
            .bind(e.key.kind.as_str())
            .bind(&e.key.namespace)
            .bind(&e.key.name)
            .bind(e.uid.to_string())
            .bind(e.generation)
            .bind(e.change.code())
            .bind(&e.author)
            .bind(e.observed_generation)
            .bind(labels_text(&e.labels))
            .bind(opt_json(&e.body))
            .bind(dpu)
            .bind(opt_json(&selector))
            .bind(opt_json(&prev))
            .bind(e.at)
            .execute(&mut *c)
            .await?;
        }
        for (ns, n) in &f.release_allocations {
            sqlx::query("DELETE FROM ip_allocations WHERE namespace = ? AND name = ?")
                .bind(ns)
                .bind(n)
                .execute(&mut *c)
                .await?;
        }
        for a in &f.allocations {
            sqlx::query("INSERT INTO ip_allocations (network, address, namespace, name, revision) VALUES (?,?,?,?,?)")
                .bind(&a.network)
                .bind(&a.address)
                .bind(&a.namespace)
                .bind(&a.name)
                .bind(a.revision)
                .execute(&mut *c)
                .await?;
        }
        for (n, o) in &f.pool_offsets {
            sqlx::query("INSERT INTO ip_pools (network, next_offset) VALUES (?, ?) ON CONFLICT (network) DO UPDATE SET next_offset = excluded.next_offset")
                .bind(n)
                .bind(o.to_string())
                .execute(&mut *c)
                .await?;
        }
        for d in &f.dpus {
            sqlx::query(
                "INSERT INTO dpus (serial, ready, last_heartbeat, lease_duration_ms, applied_revision, registered_at) \
                 VALUES (?,?,?,?,?,?) ON CONFLICT (serial) DO UPDATE SET ready = excluded.ready, \
                     last_heartbeat = excluded.last_heartbeat, lease_duration_ms = excluded.lease_duration_ms, \
                     applied_revision = excluded.applied_revision, registered_at = excluded.registered_at",
            )
            .bind(&d.serial)
            .bind(d.ready)
            .bind(d.last_heartbeat)
            .bind(d.lease_duration_ms)
            .bind(d.applied_revision)
            .bind(d.registered_at)
            .execute(&mut *c)
            .await?;
        }
        for s in &f.delete_dpus {
            sqlx::query("DELETE FROM dpus WHERE serial = ?").bind(s).execute(&mut *c).await?;
        }
        let mut compacted = Compacted::default();
        if let Some(to) = f.compact_to {
            let log = sqlx::query("DELETE FROM log WHERE revision <= ?").bind(to).execute(&mut *c).await?;
            let tomb = sqlx::query("DELETE FROM objects WHERE deleted_revision IS NOT NULL AND deleted_revision <= ?")
                .bind(to)
                .execute(&mut *c)
                .await?;
            sqlx::query("UPDATE xpu_meta SET compacted_revision = max(compacted_revision, ?) WHERE id = 1")
                .bind(to)
                .execute(&mut *c)
                .await?;
            let now: i64 =
                sqlx::query_scalar("SELECT compacted_revision FROM xpu_meta WHERE id = 1").fetch_one(&mut *c).await?;
            compacted = Compacted {
                compacted_revision: now,
                log_entries_removed: log.rows_affected(),
                tombstones_removed: tomb.rows_affected(),
            };
        }
        if !f.log.is_empty() || f.force_head {
            sqlx::query("UPDATE xpu_meta SET revision = ? WHERE id = 1").bind(f.head).execute(&mut *c).await?;
        }
        Ok(compacted)
    }

    async fn commit(mut self) -> Result<()> {
        sqlx::query("COMMIT").execute(self.c()).await?;
        self.open = false;
        Ok(())
    }
}
