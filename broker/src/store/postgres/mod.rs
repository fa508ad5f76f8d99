//! The Postgres backend: the only place that speaks SQL to Postgres.

use std::{collections::HashMap, str::FromStr, time::Duration};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{
    PgPool, Postgres, Row, Transaction,
    postgres::{PgConnectOptions, PgPoolOptions, PgRow},
};

use super::{
    LogFilter,
    rows::{DpuNetdevCounts, DpuRow, NetdevQuery, ObjectRow, StatusRow, assemble, route_from_columns},
};
use crate::{
    error::{Error, Result},
    model::{
        Key, Kind, Labels,
        event::{ChangeKind, Event},
        object::StoredObject,
    },
};

mod write;

pub use self::write::PgWriteTx;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// NOTIFY channel carrying `<replica>:<revision>` after every commit.
pub const NOTIFY_CHANNEL: &str = "xpu_revision";

pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| Error::invalid("database-url", e.to_string()))?
        // A stalled statement must fail (and be retried by the caller), not hang a writer.
        .options([
            ("statement_timeout", "15s"),
            ("idle_in_transaction_session_timeout", "60s"),
            // Plans for the parameters at hand: a generic plan of the key-list joins scans tables.
            ("plan_cache_mode", "force_custom_plan"),
        ]);
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// The connections of the writer and the lease renewer, apart from the readers' pool (same
/// options): a burst of reads — thousands of streams opening at once — must never leave a
/// commit waiting for a connection. Three: the batch committing, the batch decided behind it
/// (see `store::writer`), and the lease renewer.
pub fn write_pool(readers: &PgPool) -> PgPool {
    PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with((*readers.connect_options()).clone())
}

/// Applies the embedded migrations. sqlx's migrator holds a Postgres advisory lock while it
/// runs, so replicas starting together apply each migration exactly once.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(db) => Error::from(db),
        other => Error::internal(format!("migration failed: {other}")),
    })?;
    // Without autovacuum nothing refreshes the planner statistics: tables that grew from empty
    // keep being planned as empty, and key lookups turn into scans.
    let autovacuum: Option<String> =
        sqlx::query_scalar("SELECT current_setting('autovacuum')").fetch_optional(pool).await?;
    if autovacuum.as_deref() == Some("off") {
        tracing::warn!(
            "the PostgreSQL server runs with autovacuum off: run ANALYZE regularly (or turn autovacuum on), \
             or queries slow down as the tables grow"
        );
    }
    Ok(())
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
        key: Key::new(
            kind_of(r.try_get("kind")?)?,
            r.try_get::<String, _>("namespace")?,
            r.try_get::<String, _>("name")?,
        ),
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
        key: Key::new(
            kind_of(r.try_get("kind")?)?,
            r.try_get::<String, _>("namespace")?,
            r.try_get::<String, _>("name")?,
        ),
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
        key: Key::new(
            kind_of(r.try_get("kind")?)?,
            r.try_get::<String, _>("namespace")?,
            r.try_get::<String, _>("name")?,
        ),
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

// ---- reads ----

const STATUSES_OF_KEYS: &str = "SELECT s.*, COALESCE(NOT d.ready, false) AS stale FROM statuses s \
     JOIN UNNEST($1::text[], $2::text[], $3::text[]) AS k(kind, namespace, name) \
       ON s.kind = k.kind AND s.namespace = k.namespace AND s.name = k.name \
     LEFT JOIN dpus d ON d.serial = substr(s.author, 5) AND s.author LIKE 'dpu/%'";

fn stale_statuses(rows: &[PgRow]) -> Result<Vec<(StatusRow, bool)>> {
    rows.iter().map(|r| Ok((status_row(r)?, r.try_get("stale")?))).collect()
}

/// Attaches statuses (with staleness from the authors' leases), leases and pool usage.
async fn complete(pool: &PgPool, rows: Vec<ObjectRow>) -> Result<Vec<StoredObject>> {
    if rows.is_empty() {
        return Ok(vec![]);
    }
    let keys: Vec<Key> = rows.iter().map(|r| r.key.clone()).collect();
    let (k, ns, n) = key_arrays(&keys);
    let status_rows = sqlx::query(STATUSES_OF_KEYS).bind(k).bind(ns).bind(n).fetch_all(pool).await?;
    let statuses = stale_statuses(&status_rows)?;
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
    Ok(assemble(rows, statuses, &leases, &allocated))
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

/// The live object's spec and metadata only: no statuses, leases or pool usage.
pub async fn get_spec(pool: &PgPool, key: &Key) -> Result<Option<StoredObject>> {
    let sql = format!(
        "SELECT {OBJECT_COLUMNS} FROM objects o WHERE o.kind = $1 AND o.namespace = $2 AND o.name = $3 \
         AND o.deleted_revision IS NULL"
    );
    let row =
        sqlx::query(&sql).bind(key.kind.as_str()).bind(&key.namespace).bind(&key.name).fetch_optional(pool).await?;
    row.map(|r| Ok(object_row(&r)?.into_stored(vec![], None, None))).transpose()
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
            // One ordered range scan per kind, each stopping at the limit (`kind = ANY(..)` with
            // `ORDER BY revision` reads every entry of the kinds since `after` for each page).
            // Each kind is its own parameter, so that its plan uses the kind's statistics.
            if kinds.is_empty() {
                return Ok((Vec::new(), head(pool).await?.1));
            }
            let arms: Vec<String> = (0..kinds.len())
                .map(|i| {
                    format!("(SELECT * FROM log WHERE kind = ${} AND revision > $1 ORDER BY revision LIMIT $2)", i + 3)
                })
                .collect();
            let sql = format!("{} ORDER BY revision LIMIT $2", arms.join(" UNION ALL "));
            let mut q = sqlx::query(&sql).bind(after).bind(limit);
            for k in kinds {
                q = q.bind(k.as_str());
            }
            q.fetch_all(pool).await?
        }
        LogFilter::Dpu { serial, labels } => {
            // Index range scans (its Netdevs, each selector-routed kind, its Dpu record) merged
            // by revision, each stopping at the page, instead of filtering every entry since
            // `after`. Selector-routed entries are matched against the DPU's labels here (a
            // match-labels selector matches when the labels contain it), so that a DPU resuming
            // after many fabric changes for other DPUs reads past them instead of receiving
            // them page by page.
            let fabric: Vec<String> = (0..Kind::SELECTOR_ROUTED.len())
                .map(|i| {
                    format!(
                        "(SELECT * FROM log WHERE kind = ${} AND revision > $1 AND change <> 2 \
                         AND ($4::jsonb @> selector OR $4::jsonb @> prev_selector) ORDER BY revision LIMIT $3)",
                        i + 5
                    )
                })
                .collect();
            let sql = format!(
                "(SELECT * FROM log WHERE dpu = $2 AND revision > $1 AND change <> 2 ORDER BY revision LIMIT $3) \
                 UNION ALL {} \
                 UNION ALL (SELECT * FROM log WHERE kind = 'Dpu' AND namespace = '' AND name = $2 AND revision > $1 \
                   AND change <> 2 ORDER BY revision LIMIT $3) \
                 ORDER BY revision LIMIT $3",
                fabric.join(" UNION ALL ")
            );
            let mut q = sqlx::query(&sql).bind(after).bind(serial).bind(limit).bind(labels_json(labels));
            for k in Kind::SELECTOR_ROUTED {
                q = q.bind(k.as_str());
            }
            q.fetch_all(pool).await?
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
    pub compacted: i64,
}

impl Snapshot {
    pub async fn begin(pool: &PgPool) -> Result<Snapshot> {
        let mut tx = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
        let row =
            sqlx::query("SELECT revision, compacted_revision FROM xpu_meta WHERE id = 1").fetch_one(&mut *tx).await?;
        Ok(Snapshot { revision: row.try_get(0)?, compacted: row.try_get(1)?, tx })
    }

    /// Live objects of `kinds` (optionally only Netdevs of one DPU), after `after` in
    /// (kind, namespace, name) order.
    pub async fn page(
        &mut self,
        kinds: &[Kind],
        dpu: Option<&str>,
        statuses: bool,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<StoredObject>> {
        let (ak, ans, an) =
            after.map(|k| (k.kind.as_str().to_string(), k.namespace.clone(), k.name.clone())).unwrap_or_default();
        let after_cond = "o.deleted_revision IS NULL AND (o.kind, o.namespace, o.name) > ($3, $4, $5)";
        let order = "ORDER BY o.kind, o.namespace, o.name LIMIT $6";
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match dpu {
            Some(serial) => {
                // A DPU holds a few of the fleet's Netdevs: all of them come from its own index
                // entries and are paged after materializing (with the page bound in the scan, the
                // planner may walk every Netdev in key order looking for them); the other kinds
                // come from the primary key; the two merged in key order.
                let others: Vec<&str> = kinds.iter().filter(|k| **k != Kind::Netdev).map(|k| k.as_str()).collect();
                let sql = format!(
                    "WITH nd AS MATERIALIZED ( \
                       SELECT {OBJECT_COLUMNS} FROM objects o \
                       WHERE o.dpu = $2 AND o.kind = 'Netdev' AND $7 AND o.deleted_revision IS NULL) \
                     SELECT * FROM ( \
                       (SELECT {OBJECT_COLUMNS} FROM objects o WHERE o.kind = ANY($1) AND {after_cond} {order}) \
                       UNION ALL \
                       (SELECT * FROM nd o WHERE (o.kind, o.namespace, o.name) > ($3, $4, $5) {order}) \
                     ) o {order}"
                );
                sqlx::query(&sql)
                    .bind(others)
                    .bind(serial)
                    .bind(ak)
                    .bind(ans)
                    .bind(an)
                    .bind(limit)
                    .bind(kinds.contains(&Kind::Netdev))
                    .fetch_all(&mut *self.tx)
                    .await?
            }
            None => {
                let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
                let sql = format!(
                    "SELECT {OBJECT_COLUMNS} FROM objects o WHERE o.kind = ANY($1) AND o.deleted_revision IS NULL \
                     AND (o.kind, o.namespace, o.name) > ($2, $3, $4) ORDER BY o.kind, o.namespace, o.name LIMIT $5"
                );
                sqlx::query(&sql).bind(kinds).bind(ak).bind(ans).bind(an).bind(limit).fetch_all(&mut *self.tx).await?
            }
        };
        let rows = rows.iter().map(object_row).collect::<Result<Vec<_>>>()?;
        if !statuses {
            return Ok(assemble(rows, Vec::new(), &HashMap::new(), &HashMap::new()));
        }
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
    let status_rows = sqlx::query(STATUSES_OF_KEYS).bind(k).bind(ns).bind(n).fetch_all(&mut **tx).await?;
    Ok(assemble(rows, stale_statuses(&status_rows)?, &HashMap::new(), &HashMap::new()))
}

pub async fn dpu_labels(pool: &PgPool, serial: &str) -> Result<Option<Labels>> {
    let row = sqlx::query(
        "SELECT labels FROM objects WHERE kind = 'Dpu' AND namespace = '' AND name = $1 AND deleted_revision IS NULL",
    )
    .bind(serial)
    .fetch_optional(pool)
    .await?;
    row.map(|r| Ok(labels_of(r.try_get(0)?))).transpose()
}

/// A page of live Netdevs matching `q`, ordered by (namespace, name), after `after`. A phase
/// other than Pending is looked up through the status index, so a rare phase costs no scan.
pub async fn list_netdevs(
    pool: &PgPool,
    q: &NetdevQuery,
    after: Option<(String, String)>,
    limit: usize,
) -> Result<Vec<StoredObject>> {
    let (after_ns, after_name) = after.unwrap_or_default();
    let common = "o.kind = 'Netdev' AND o.deleted_revision IS NULL AND ($1::text IS NULL OR o.dpu = $1) \
         AND ($2::text IS NULL OR o.spec->>'hostname' = $2) AND ($3::text IS NULL OR o.namespace = $3) \
         AND (o.namespace, o.name) > ($4, $5)";
    let sql = match q.phase.as_deref() {
        None => format!("SELECT {OBJECT_COLUMNS} FROM objects o WHERE {common} ORDER BY o.namespace, o.name LIMIT $6"),
        Some("Pending") => format!(
            "SELECT {OBJECT_COLUMNS} FROM objects o WHERE {common} AND COALESCE((SELECT s.status->>'phase' \
             FROM statuses s WHERE s.kind = 'Netdev' AND s.namespace = o.namespace AND s.name = o.name \
             AND s.author = 'dpu/' || o.dpu), 'Pending') = 'Pending' ORDER BY o.namespace, o.name LIMIT $6"
        ),
        Some(_) => format!(
            "SELECT {OBJECT_COLUMNS} FROM statuses s JOIN objects o ON o.kind = s.kind AND o.namespace = s.namespace \
             AND o.name = s.name WHERE s.kind = 'Netdev' AND s.status->>'phase' = $7 AND s.author = 'dpu/' || o.dpu \
             AND (s.namespace, s.name) > ($4, $5) AND {common} ORDER BY s.namespace, s.name LIMIT $6"
        ),
    };
    let mut query = sqlx::query(&sql)
        .bind(q.dpu.as_deref())
        .bind(q.node.as_deref())
        .bind(q.namespace.as_deref())
        .bind(after_ns)
        .bind(after_name)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX));
    if let Some(phase) = q.phase.as_deref().filter(|p| *p != "Pending") {
        query = query.bind(phase);
    }
    let rows = query.fetch_all(pool).await?;
    let rows = rows.iter().map(object_row).collect::<Result<Vec<_>>>()?;
    complete(pool, rows).await
}

/// The Netdev with this id (its name), live or else its latest tombstone.
pub async fn netdev_by_id(pool: &PgPool, id: &str) -> Result<Option<StoredObject>> {
    let sql = format!(
        "SELECT {OBJECT_COLUMNS} FROM objects o WHERE o.kind = 'Netdev' AND o.name = $1 \
         ORDER BY o.deleted_revision IS NULL DESC, o.deleted_revision DESC LIMIT 1"
    );
    let Some(row) = sqlx::query(&sql).bind(id).fetch_optional(pool).await? else { return Ok(None) };
    Ok(complete(pool, vec![object_row(&row)?]).await?.into_iter().next())
}

/// The newest `limit` log entries of one object, newest first.
pub async fn history(pool: &PgPool, key: &Key, limit: usize) -> Result<Vec<Event>> {
    let rows = sqlx::query(
        "SELECT * FROM log WHERE kind = $1 AND namespace = $2 AND name = $3 ORDER BY revision DESC LIMIT $4",
    )
    .bind(key.kind.as_str())
    .bind(&key.namespace)
    .bind(&key.name)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?;
    rows.iter().map(event_row).collect()
}

/// Netdev totals and not-yet-realised counts of the given DPUs.
pub async fn dpu_netdev_counts(pool: &PgPool, serials: &[String]) -> Result<HashMap<String, DpuNetdevCounts>> {
    let rows = sqlx::query(
        "SELECT o.dpu, count(*)::int8, count(*) FILTER (WHERE s.observed_generation IS NULL \
         OR s.observed_generation < o.generation)::int8 FROM objects o LEFT JOIN statuses s ON s.kind = o.kind \
         AND s.namespace = o.namespace AND s.name = o.name AND s.author = 'dpu/' || o.dpu \
         WHERE o.kind = 'Netdev' AND o.deleted_revision IS NULL AND o.dpu = ANY($1) GROUP BY o.dpu",
    )
    .bind(serials)
    .fetch_all(pool)
    .await?;
    let mut out = HashMap::new();
    for r in rows {
        let (total, pending): (i64, i64) = (r.try_get(1)?, r.try_get(2)?);
        out.insert(
            r.try_get::<String, _>(0)?,
            DpuNetdevCounts { total: u64::try_from(total).unwrap_or(0), pending: u64::try_from(pending).unwrap_or(0) },
        );
    }
    Ok(out)
}

/// The newest error each of the given DPUs reported (as "<Kind> <namespace/name>: <message>").
pub async fn dpu_last_errors(pool: &PgPool, serials: &[String]) -> Result<HashMap<String, String>> {
    let authors: Vec<String> = serials.iter().map(|s| format!("dpu/{s}")).collect();
    let rows = sqlx::query(
        "SELECT DISTINCT ON (author) author, kind, namespace, name, COALESCE(status->>'message', '') \
         FROM statuses WHERE author = ANY($1) AND status->>'phase' = 'Error' ORDER BY author, updated_at DESC",
    )
    .bind(authors)
    .fetch_all(pool)
    .await?;
    let mut out = HashMap::new();
    for r in rows {
        let author: String = r.try_get(0)?;
        let (kind, ns, name, msg): (String, String, String, String) =
            (r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?);
        let serial = author.strip_prefix("dpu/").unwrap_or(&author).to_string();
        out.insert(serial, super::rows::error_line(&kind, &ns, &name, &msg));
    }
    Ok(out)
}

pub struct FleetCounts {
    pub dpus_ready: u32,
    pub dpus_unknown: u32,
    pub netdevs_by_phase: Vec<(String, u64)>,
    /// Netdevs on DPUs whose lease lapsed.
    pub netdevs_stale: u64,
    pub objects_by_kind: Vec<(String, u64)>,
}

pub async fn fleet_counts(pool: &PgPool) -> Result<FleetCounts> {
    let row =
        sqlx::query("SELECT count(*) FILTER (WHERE ready)::int8, count(*) FILTER (WHERE NOT ready)::int8 FROM dpus")
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
    let stale: i64 = sqlx::query_scalar(
        "SELECT count(*)::int8 FROM objects o JOIN dpus d ON d.serial = o.dpu \
         WHERE o.kind = 'Netdev' AND o.deleted_revision IS NULL AND NOT d.ready",
    )
    .fetch_one(pool)
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
        netdevs_stale: u64::try_from(stale).unwrap_or(0),
        objects_by_kind: pairs(kinds)?,
    })
}

/// Renews the leases of registered, ready DPUs in one statement, outside the writer (a renewal
/// changes no object and no revision). Returns the serials renewed; the others (unknown, or
/// lapsed and so needing a status change) go through the writer.
pub async fn renew_leases(
    pool: &PgPool,
    now: DateTime<Utc>,
    serials: &[String],
    applied_revisions: &[i64],
) -> Result<Vec<String>> {
    let rows = sqlx::query(
        "UPDATE dpus d SET last_heartbeat = $1, applied_revision = h.applied \
         FROM UNNEST($2::text[], $3::bigint[]) AS h(serial, applied) \
         WHERE d.serial = h.serial AND d.ready \
         RETURNING d.serial",
    )
    .bind(now)
    .bind(serials)
    .bind(applied_revisions)
    .fetch_all(pool)
    .await?;
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
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
                    let Some((from, rev)) = n.payload().split_once(':') else {
                        continue;
                    };
                    if from == replica {
                        continue;
                    }
                    if let Ok(rev) = rev.parse::<i64>()
                        && wakeups.send(Some(rev)).await.is_err()
                    {
                        return;
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

/// Everything in the store (for `migrate --from/--to`).
pub async fn dump(pool: &PgPool) -> Result<super::rows::Dump> {
    let (head, compacted) = head(pool).await?;
    let sql = format!("SELECT {OBJECT_COLUMNS}, o.dpu, o.selector FROM objects o ORDER BY o.kind, o.namespace, o.name");
    let mut objects = Vec::new();
    for r in sqlx::query(&sql).fetch_all(pool).await? {
        objects.push((object_row(&r)?, route_from_columns(r.try_get("dpu")?, r.try_get("selector")?)));
    }
    let statuses =
        sqlx::query("SELECT * FROM statuses").fetch_all(pool).await?.iter().map(status_row).collect::<Result<_>>()?;
    let log = sqlx::query("SELECT * FROM log ORDER BY revision")
        .fetch_all(pool)
        .await?
        .iter()
        .map(event_row)
        .collect::<Result<_>>()?;
    let dpus = sqlx::query("SELECT * FROM dpus").fetch_all(pool).await?.iter().map(dpu_row).collect::<Result<_>>()?;
    let mut allocations = Vec::new();
    for r in sqlx::query("SELECT * FROM ip_allocations").fetch_all(pool).await? {
        allocations.push(super::rows::Allocation {
            network: r.try_get("network")?,
            address: r.try_get("address")?,
            namespace: r.try_get("namespace")?,
            name: r.try_get("name")?,
            revision: r.try_get("revision")?,
        });
    }
    let mut pools = Vec::new();
    for r in sqlx::query("SELECT * FROM ip_pools").fetch_all(pool).await? {
        let off: String = r.try_get("next_offset")?;
        pools.push((r.try_get("network")?, off.parse().unwrap_or(0)));
    }
    Ok(super::rows::Dump { head, compacted, objects, statuses, log, dpus, allocations, pools })
}
