//! The SQLite backend (the embedded default): the only place that speaks SQL to SQLite.
//!
//! One broker process per file: an exclusive lock on `<file>.lock` is taken at open and held
//! for the life of the process. WAL mode with `synchronous=FULL`: a committed write survives a
//! crash of the process or the machine.

mod write;

use std::{collections::HashMap, path::Path, str::FromStr, time::Duration};

use serde_json::Value;
use sqlx::{
    Row, Sqlite, SqlitePool, Transaction,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous},
};

pub use self::write::SqliteWriteTx;
use super::{
    FleetCounts, LogFilter,
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

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// Keys per statement when loading by key (SQLite bounds the number of bound parameters).
const CHUNK: usize = 300;

/// The open database and the lock that makes this process its only writer.
pub struct Opened {
    pub pool: SqlitePool,
    pub lock: std::fs::File,
}

pub async fn open(path: &Path, max_connections: u32) -> Result<Opened> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::internal(format!("{}: {e}", dir.display())))?;
    }
    let lock_path = path.with_extension("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::internal(format!("{}: {e}", lock_path.display())))?;
    if lock.try_lock().is_err() {
        return Err(Error::FailedPrecondition(format!(
            "another broker process already uses {}; the SQLite store serves a single process (use Postgres for replicas)",
            path.display()
        )));
    }
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
        .map_err(|e| Error::invalid("database", e.to_string()))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new().max_connections(max_connections.max(2)).connect_with(options).await?;
    Ok(Opened { pool, lock })
}

pub async fn migrate(pool: &SqlitePool) -> Result<()> {
    MIGRATOR.run(pool).await.map_err(|e| Error::internal(format!("migration failed: {e}")))
}

fn kind_of(s: &str) -> Result<Kind> {
    Kind::parse_stored(s).ok_or_else(|| Error::internal(format!("unknown stored kind {s:?}")))
}

fn json_of(text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| Error::internal(format!("stored JSON does not parse: {e}")))
}

pub(crate) fn json_text(v: &Value) -> String {
    v.to_string()
}

fn labels_of(text: &str) -> Labels {
    serde_json::from_str(text).unwrap_or_default()
}

pub(crate) fn labels_text(l: &Labels) -> String {
    serde_json::to_string(l).unwrap_or_else(|_| "{}".into())
}

fn key_of(r: &SqliteRow) -> Result<Key> {
    Ok(Key::new(kind_of(r.try_get("kind")?)?, r.try_get::<String, _>("namespace")?, r.try_get::<String, _>("name")?))
}

fn uid_of(r: &SqliteRow) -> Result<uuid::Uuid> {
    let s: String = r.try_get("uid")?;
    s.parse().map_err(|_| Error::internal(format!("stored uid {s:?} is not a UUID")))
}

fn object_row(r: &SqliteRow) -> Result<ObjectRow> {
    Ok(ObjectRow {
        key: key_of(r)?,
        uid: uid_of(r)?,
        generation: r.try_get("generation")?,
        revision: r.try_get("revision")?,
        labels: labels_of(r.try_get("labels")?),
        spec: json_of(r.try_get("spec")?)?,
        spec_author: r.try_get("spec_author")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        deleted_revision: r.try_get("deleted_revision")?,
    })
}

fn status_row(r: &SqliteRow) -> Result<StatusRow> {
    Ok(StatusRow {
        key: key_of(r)?,
        author: r.try_get("author")?,
        observed_generation: r.try_get("observed_generation")?,
        seq: r.try_get("seq")?,
        revision: r.try_get("revision")?,
        status: json_of(r.try_get("status")?)?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn dpu_row(r: &SqliteRow) -> Result<DpuRow> {
    Ok(DpuRow {
        serial: r.try_get("serial")?,
        ready: r.try_get("ready")?,
        last_heartbeat: r.try_get("last_heartbeat")?,
        lease_duration_ms: r.try_get("lease_duration_ms")?,
        applied_revision: r.try_get("applied_revision")?,
        registered_at: r.try_get("registered_at")?,
    })
}

fn event_row(r: &SqliteRow) -> Result<Event> {
    let change: i64 = r.try_get("change")?;
    let parse =
        |c: &str| -> Result<Option<Value>> { r.try_get::<Option<String>, _>(c)?.map(|t| json_of(&t)).transpose() };
    let prev = parse("prev_selector")?;
    Ok(Event {
        revision: r.try_get("revision")?,
        key: key_of(r)?,
        uid: uid_of(r)?,
        generation: r.try_get("generation")?,
        change: i16::try_from(change)
            .ok()
            .and_then(ChangeKind::from_code)
            .ok_or_else(|| Error::internal(format!("unknown change {change}")))?,
        labels: labels_of(r.try_get("labels")?),
        body: parse("body")?,
        author: r.try_get("author")?,
        observed_generation: r.try_get("observed_generation")?,
        route: route_from_columns(r.try_get("dpu")?, parse("selector")?),
        prev_route: prev.map(|p| route_from_columns(None, Some(p))),
        at: r.try_get("at")?,
    })
}

/// `(?,?,?),(?,?,?),…` for `n` keys.
fn key_tuples(n: usize, width: usize) -> String {
    let one = format!("({})", vec!["?"; width].join(","));
    vec![one; n].join(",")
}

const OBJECT_COLUMNS: &str = "kind, namespace, name, uid, generation, revision, labels, spec, spec_author, \
     created_at, updated_at, deleted_revision";

async fn statuses_of(exec: &mut sqlx::SqliteConnection, keys: &[Key]) -> Result<Vec<(StatusRow, bool)>> {
    let mut out = Vec::new();
    for chunk in keys.chunks(CHUNK) {
        let sql = format!(
            "SELECT s.*, COALESCE(d.ready = 0, 0) AS stale FROM statuses s LEFT JOIN dpus d ON d.serial = substr(s.author, 5) AND s.author LIKE 'dpu/%' \
             WHERE (s.kind, s.namespace, s.name) IN (VALUES {})",
            key_tuples(chunk.len(), 3)
        );
        let mut q = sqlx::query(&sql);
        for k in chunk {
            q = q.bind(k.kind.as_str()).bind(&k.namespace).bind(&k.name);
        }
        for r in q.fetch_all(&mut *exec).await? {
            out.push((status_row(&r)?, r.try_get::<bool, _>("stale")?));
        }
    }
    Ok(out)
}

async fn complete(exec: &mut sqlx::SqliteConnection, rows: Vec<ObjectRow>, extras: bool) -> Result<Vec<StoredObject>> {
    if rows.is_empty() {
        return Ok(vec![]);
    }
    let keys: Vec<Key> = rows.iter().map(|r| r.key.clone()).collect();
    let statuses = statuses_of(exec, &keys).await?;
    let mut leases = HashMap::new();
    let mut allocated = HashMap::new();
    if extras {
        for k in keys.iter().filter(|k| k.kind == Kind::Dpu) {
            if let Some(r) =
                sqlx::query("SELECT * FROM dpus WHERE serial = ?").bind(&k.name).fetch_optional(&mut *exec).await?
            {
                let d = dpu_row(&r)?;
                leases.insert(d.serial.clone(), d.lease());
            }
        }
        for k in keys.iter().filter(|k| k.kind == Kind::XpuNetwork) {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM ip_allocations WHERE network = ?")
                .bind(&k.name)
                .fetch_one(&mut *exec)
                .await?;
            allocated.insert(k.name.clone(), n);
        }
    }
    Ok(assemble(rows, statuses, &leases, &allocated))
}

pub async fn head(pool: &SqlitePool) -> Result<(i64, i64)> {
    let row = sqlx::query("SELECT revision, compacted_revision FROM xpu_meta WHERE id = 1").fetch_one(pool).await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

pub async fn get(pool: &SqlitePool, key: &Key, include_deleted: bool) -> Result<Option<StoredObject>> {
    let mut conn = pool.acquire().await?;
    let sql = format!(
        "SELECT {OBJECT_COLUMNS} FROM objects WHERE kind = ? AND namespace = ? AND name = ? \
         AND (? OR deleted_revision IS NULL)"
    );
    let row = sqlx::query(&sql)
        .bind(key.kind.as_str())
        .bind(&key.namespace)
        .bind(&key.name)
        .bind(include_deleted)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(complete(&mut conn, vec![object_row(&row)?], true).await?.into_iter().next())
}

/// The live object's spec and metadata only: no statuses, leases or pool usage.
pub async fn get_spec(pool: &SqlitePool, key: &Key) -> Result<Option<StoredObject>> {
    let sql = format!(
        "SELECT {OBJECT_COLUMNS} FROM objects WHERE kind = ? AND namespace = ? AND name = ? AND deleted_revision IS NULL"
    );
    let row =
        sqlx::query(&sql).bind(key.kind.as_str()).bind(&key.namespace).bind(&key.name).fetch_optional(pool).await?;
    row.map(|r| Ok(object_row(&r)?.into_stored(vec![], None, None))).transpose()
}

pub async fn list(
    pool: &SqlitePool,
    kind: Kind,
    namespace: Option<&str>,
    selector: &Labels,
    after: Option<(String, String)>,
    limit: usize,
) -> Result<Vec<StoredObject>> {
    let mut conn = pool.acquire().await?;
    let (after_ns, after_name) = after.unwrap_or_default();
    // Label selectors: every pair must match (json_extract on the stored labels).
    let mut sql = format!(
        "SELECT {OBJECT_COLUMNS} FROM objects WHERE kind = ? AND deleted_revision IS NULL \
         AND (? IS NULL OR namespace = ?) AND (namespace, name) > (?, ?)"
    );
    for _ in selector {
        sql.push_str(" AND json_extract(labels, ?) = ?");
    }
    sql.push_str(" ORDER BY namespace, name LIMIT ?");
    let mut q = sqlx::query(&sql).bind(kind.as_str()).bind(namespace).bind(namespace).bind(after_ns).bind(after_name);
    for (k, v) in selector {
        q = q.bind(format!("$.\"{}\"", k.replace('"', ""))).bind(v);
    }
    let rows = q.bind(i64::try_from(limit).unwrap_or(i64::MAX)).fetch_all(&mut *conn).await?;
    let rows = rows.iter().map(object_row).collect::<Result<Vec<_>>>()?;
    complete(&mut conn, rows, true).await
}

pub async fn read_log(pool: &SqlitePool, after: i64, limit: usize, filter: &LogFilter) -> Result<(Vec<Event>, i64)> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = match filter {
        LogFilter::All => {
            sqlx::query("SELECT * FROM log WHERE revision > ? ORDER BY revision LIMIT ?").bind(after).bind(limit).fetch_all(pool).await?
        }
        LogFilter::Kinds(kinds) => {
            let sql = format!(
                "SELECT * FROM log WHERE revision > ? AND kind IN ({}) ORDER BY revision LIMIT ?",
                vec!["?"; kinds.len().max(1)].join(",")
            );
            let mut q = sqlx::query(&sql).bind(after);
            if kinds.is_empty() {
                q = q.bind("");
            }
            for k in kinds {
                q = q.bind(k.as_str());
            }
            q.bind(limit).fetch_all(pool).await?
        }
        LogFilter::Dpu { serial, .. } => {
            // Three index range scans (its Netdevs, the selector-routed kinds, its Dpu record)
            // merged by revision, instead of filtering every entry since `after`.
            sqlx::query(
                "SELECT * FROM (SELECT * FROM log WHERE dpu = ?2 AND revision > ?1 AND change <> 2 \
                   ORDER BY revision LIMIT ?3) \
                 UNION ALL SELECT * FROM (SELECT * FROM log WHERE kind IN ('LogicalBridge', 'Vrf', 'Svi', 'FlowPolicy') \
                   AND revision > ?1 AND change <> 2 ORDER BY revision LIMIT ?3) \
                 UNION ALL SELECT * FROM (SELECT * FROM log WHERE kind = 'Dpu' AND namespace = '' AND name = ?2 \
                   AND revision > ?1 AND change <> 2 ORDER BY revision LIMIT ?3) \
                 ORDER BY revision LIMIT ?3",
            )
            .bind(after)
            .bind(serial)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }
        LogFilter::Object(key) => {
            sqlx::query(
                "SELECT * FROM log WHERE revision > ? AND kind = ? AND namespace = ? AND name = ? ORDER BY revision LIMIT ?",
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

/// A consistent view at one revision: in WAL mode a read transaction sees one snapshot.
pub struct Snapshot {
    tx: Transaction<'static, Sqlite>,
    pub revision: i64,
    pub compacted: i64,
}

impl Snapshot {
    pub async fn begin(pool: &SqlitePool) -> Result<Snapshot> {
        let mut tx = pool.begin().await?;
        let row =
            sqlx::query("SELECT revision, compacted_revision FROM xpu_meta WHERE id = 1").fetch_one(&mut *tx).await?;
        Ok(Snapshot { revision: row.try_get(0)?, compacted: row.try_get(1)?, tx })
    }

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
        let sql = format!(
            "SELECT {OBJECT_COLUMNS} FROM objects WHERE kind IN ({}) AND deleted_revision IS NULL \
             AND (? IS NULL OR kind <> 'Netdev' OR dpu = ?) AND (kind, namespace, name) > (?, ?, ?) \
             ORDER BY kind, namespace, name LIMIT ?",
            vec!["?"; kinds.len().max(1)].join(",")
        );
        let mut q = sqlx::query(&sql);
        if kinds.is_empty() {
            q = q.bind("");
        }
        for k in kinds {
            q = q.bind(k.as_str());
        }
        let rows = q
            .bind(dpu)
            .bind(dpu)
            .bind(ak)
            .bind(ans)
            .bind(an)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *self.tx)
            .await?;
        let rows = rows.iter().map(object_row).collect::<Result<Vec<_>>>()?;
        if !statuses {
            return Ok(assemble(rows, Vec::new(), &HashMap::new(), &HashMap::new()));
        }
        complete(&mut self.tx, rows, false).await
    }
}

pub async fn dpu_labels(pool: &SqlitePool, serial: &str) -> Result<Option<Labels>> {
    let row = sqlx::query(
        "SELECT labels FROM objects WHERE kind = 'Dpu' AND namespace = '' AND name = ? AND deleted_revision IS NULL",
    )
    .bind(serial)
    .fetch_optional(pool)
    .await?;
    row.map(|r| Ok(labels_of(r.try_get(0)?))).transpose()
}

pub async fn fleet_counts(pool: &SqlitePool) -> Result<FleetCounts> {
    let row =
        sqlx::query("SELECT COALESCE(sum(ready), 0), COALESCE(sum(1 - ready), 0) FROM dpus").fetch_one(pool).await?;
    let (ready, unknown): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    let pairs = |rows: Vec<SqliteRow>| -> Result<Vec<(String, u64)>> {
        rows.iter()
            .map(|r| Ok((r.try_get::<String, _>(0)?, u64::try_from(r.try_get::<i64, _>(1)?).unwrap_or(0))))
            .collect()
    };
    let phases = sqlx::query(
        "SELECT COALESCE(json_extract(s.status, '$.phase'), 'Pending') AS phase, count(*) FROM objects o \
         LEFT JOIN statuses s ON s.kind = o.kind AND s.namespace = o.namespace AND s.name = o.name \
         WHERE o.kind = 'Netdev' AND o.deleted_revision IS NULL GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    let stale: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM objects o JOIN dpus d ON d.serial = o.dpu \
         WHERE o.kind = 'Netdev' AND o.deleted_revision IS NULL AND d.ready = 0",
    )
    .fetch_one(pool)
    .await?;
    let kinds =
        sqlx::query("SELECT kind, count(*) FROM objects WHERE deleted_revision IS NULL GROUP BY kind ORDER BY kind")
            .fetch_all(pool)
            .await?;
    Ok(FleetCounts {
        dpus_ready: u32::try_from(ready).unwrap_or(u32::MAX),
        dpus_unknown: u32::try_from(unknown).unwrap_or(u32::MAX),
        netdevs_by_phase: pairs(phases)?,
        netdevs_stale: u64::try_from(stale).unwrap_or(0),
        objects_by_kind: pairs(kinds)?,
    })
}

/// A page of live Netdevs matching `q`, ordered by (namespace, name), after `after`. A phase
/// other than Pending is looked up through the status index, so a rare phase costs no scan.
pub async fn list_netdevs(
    pool: &SqlitePool,
    q: &NetdevQuery,
    after: Option<(String, String)>,
    limit: usize,
) -> Result<Vec<StoredObject>> {
    let mut conn = pool.acquire().await?;
    let (after_ns, after_name) = after.unwrap_or_default();
    let cols = "o.kind, o.namespace, o.name, o.uid, o.generation, o.revision, o.labels, o.spec, o.spec_author, \
         o.created_at, o.updated_at, o.deleted_revision";
    let common = "o.kind = 'Netdev' AND o.deleted_revision IS NULL AND (?1 IS NULL OR o.dpu = ?1) \
         AND (?2 IS NULL OR json_extract(o.spec, '$.hostname') = ?2) AND (?3 IS NULL OR o.namespace = ?3) \
         AND (o.namespace, o.name) > (?4, ?5)";
    let sql = match q.phase.as_deref() {
        None => format!("SELECT {cols} FROM objects o WHERE {common} ORDER BY o.namespace, o.name LIMIT ?6"),
        Some("Pending") => format!(
            "SELECT {cols} FROM objects o WHERE {common} AND COALESCE((SELECT json_extract(s.status, '$.phase') \
             FROM statuses s WHERE s.kind = 'Netdev' AND s.namespace = o.namespace AND s.name = o.name \
             AND s.author = 'dpu/' || o.dpu), 'Pending') = 'Pending' ORDER BY o.namespace, o.name LIMIT ?6"
        ),
        Some(_) => format!(
            "SELECT {cols} FROM statuses s JOIN objects o ON o.kind = s.kind AND o.namespace = s.namespace \
             AND o.name = s.name WHERE s.kind = 'Netdev' AND json_extract(s.status, '$.phase') = ?7 \
             AND s.author = 'dpu/' || o.dpu AND (s.namespace, s.name) > (?4, ?5) AND {common} \
             ORDER BY s.namespace, s.name LIMIT ?6"
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
    let rows = query.fetch_all(&mut *conn).await?;
    let rows = rows.iter().map(object_row).collect::<Result<Vec<_>>>()?;
    complete(&mut conn, rows, true).await
}

/// The Netdev with this id (its name), live or else its latest tombstone.
pub async fn netdev_by_id(pool: &SqlitePool, id: &str) -> Result<Option<StoredObject>> {
    let mut conn = pool.acquire().await?;
    let sql = format!(
        "SELECT {OBJECT_COLUMNS} FROM objects WHERE kind = 'Netdev' AND name = ? \
         ORDER BY deleted_revision IS NULL DESC, deleted_revision DESC LIMIT 1"
    );
    let Some(row) = sqlx::query(&sql).bind(id).fetch_optional(&mut *conn).await? else { return Ok(None) };
    Ok(complete(&mut conn, vec![object_row(&row)?], true).await?.into_iter().next())
}

/// The newest `limit` log entries of one object, newest first.
pub async fn history(pool: &SqlitePool, key: &Key, limit: usize) -> Result<Vec<Event>> {
    let rows =
        sqlx::query("SELECT * FROM log WHERE kind = ? AND namespace = ? AND name = ? ORDER BY revision DESC LIMIT ?")
            .bind(key.kind.as_str())
            .bind(&key.namespace)
            .bind(&key.name)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(pool)
            .await?;
    rows.iter().map(event_row).collect()
}

/// Netdev totals and not-yet-realised counts of the given DPUs.
pub async fn dpu_netdev_counts(pool: &SqlitePool, serials: &[String]) -> Result<HashMap<String, DpuNetdevCounts>> {
    let mut out = HashMap::new();
    for chunk in serials.chunks(CHUNK) {
        let sql = format!(
            "SELECT o.dpu, count(*), COALESCE(sum(s.observed_generation IS NULL OR s.observed_generation < o.generation), 0) \
             FROM objects o LEFT JOIN statuses s ON s.kind = o.kind AND s.namespace = o.namespace AND s.name = o.name \
             AND s.author = 'dpu/' || o.dpu WHERE o.kind = 'Netdev' AND o.deleted_revision IS NULL \
             AND o.dpu IN ({}) GROUP BY o.dpu",
            vec!["?"; chunk.len()].join(",")
        );
        let mut q = sqlx::query(&sql);
        for s in chunk {
            q = q.bind(s);
        }
        for r in q.fetch_all(pool).await? {
            let (total, pending): (i64, i64) = (r.try_get(1)?, r.try_get(2)?);
            out.insert(
                r.try_get::<String, _>(0)?,
                DpuNetdevCounts {
                    total: u64::try_from(total).unwrap_or(0),
                    pending: u64::try_from(pending).unwrap_or(0),
                },
            );
        }
    }
    Ok(out)
}

/// The newest error each of the given DPUs reported (as "<Kind> <namespace/name>: <message>").
pub async fn dpu_last_errors(pool: &SqlitePool, serials: &[String]) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for chunk in serials.chunks(CHUNK) {
        // SQLite takes the bare columns from the row holding max(updated_at).
        let sql = format!(
            "SELECT author, kind, namespace, name, COALESCE(json_extract(status, '$.message'), ''), max(updated_at) \
             FROM statuses WHERE author IN ({}) AND json_extract(status, '$.phase') = 'Error' GROUP BY author",
            vec!["?"; chunk.len()].join(",")
        );
        let mut q = sqlx::query(&sql);
        for s in chunk {
            q = q.bind(format!("dpu/{s}"));
        }
        for r in q.fetch_all(pool).await? {
            let author: String = r.try_get(0)?;
            let (kind, ns, name, msg): (String, String, String, String) =
                (r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?);
            let serial = author.strip_prefix("dpu/").unwrap_or(&author).to_string();
            out.insert(serial, super::rows::error_line(&kind, &ns, &name, &msg));
        }
    }
    Ok(out)
}

pub async fn ping(pool: &SqlitePool) -> Result<()> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

/// Everything in the store (for `migrate --from/--to`).
pub async fn dump(pool: &SqlitePool) -> Result<super::rows::Dump> {
    let (head, compacted) = head(pool).await?;
    let sql = format!("SELECT {OBJECT_COLUMNS}, dpu, selector FROM objects ORDER BY kind, namespace, name");
    let mut objects = Vec::new();
    for r in sqlx::query(&sql).fetch_all(pool).await? {
        let selector = r.try_get::<Option<String>, _>("selector")?.map(|t| json_of(&t)).transpose()?;
        objects.push((object_row(&r)?, route_from_columns(r.try_get("dpu")?, selector)));
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
