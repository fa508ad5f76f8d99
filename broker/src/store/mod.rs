//! The store: Postgres as the source of truth, written by one group-committing writer task.
//!
//! Writes are queued to the writer, which takes everything waiting (up to `max_batch`), applies
//! it in one transaction and publishes the committed changes, in revision order, to the fan-out.
//! Reads go straight to the database.

mod batch;
pub mod copy;
pub mod postgres;
pub mod rows;
pub mod sqlite;
mod writer;

use std::{path::PathBuf, sync::Arc, time::Duration};

use sqlx::{PgPool, SqlitePool};
use tokio::sync::{mpsc, oneshot};

pub use self::postgres::FleetCounts;
use self::{
    batch::{Reply, Request},
    rows::*,
};
use crate::{
    error::{Error, Result},
    model::{Key, Kind, Labels, event::Event, object::StoredObject},
};

/// Which log entries a reader wants.
#[derive(Clone, Debug)]
pub enum LogFilter {
    All,
    Kinds(Vec<Kind>),
    /// What a DPU's desired-state stream may carry: its Netdevs, the selector-routed objects
    /// whose selector (or previous selector) matches `labels`, its own Dpu object; no status
    /// changes. A backend may return more (the caller filters again), never less.
    Dpu {
        serial: String,
        labels: Labels,
    },
    Object(Key),
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Most requests committed in one transaction.
    pub max_batch: usize,
    /// Requests waiting for the writer before submitters wait for room.
    pub queue_capacity: usize,
    pub lease_duration: Duration,
    /// Name of this broker process among replicas sharing the database.
    pub replica: String,
    /// Longest a read or a write transaction may wait for the database before the caller gets
    /// UNAVAILABLE (a stalled connection must not hang requests).
    pub op_timeout: Duration,
    /// Snapshots (initial syncs, resyncs) read at once; each holds a pooled connection, so this
    /// stays well below the pool size.
    pub max_snapshots: usize,
    /// Streams reading their start (labels, head, log replay) at once. Thousands of agents
    /// reconnecting together wait their turn here instead of queueing on the pool, where they
    /// would time out and leave nothing for attaches and the fan-out's catch-up.
    pub max_stream_openings: usize,
    /// Decide the next batch while the previous one commits (Postgres). Off by default: it
    /// raises the status write rate but, on a small machine shared with Postgres, not the
    /// attach round trip (BENCHMARKS.md, "writer pipeline").
    pub pipeline: bool,
    /// Rows the serial writer keeps from its last commit for the next batch (`batch::Warm`);
    /// when a commit leaves more, it keeps none.
    pub warm_slots: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_batch: 1024,
            queue_capacity: 16 * 1024,
            lease_duration: Duration::from_secs(30),
            replica: uuid::Uuid::new_v4().to_string(),
            op_timeout: Duration::from_secs(10),
            max_snapshots: 4,
            max_stream_openings: 8,
            pipeline: false,
            warm_slots: 50_000,
        }
    }
}

/// Changes of one commit, in revision order, for the fan-out.
#[derive(Debug)]
pub struct Committed {
    pub events: Vec<Arc<Event>>,
    pub head: i64,
}

struct Pending {
    request: Request,
    reply: oneshot::Sender<Result<Reply>>,
}

/// A heartbeat waiting for the lease renewer: answered `true` when the lease was renewed.
struct Beat {
    serial: String,
    applied_revision: i64,
    reply: oneshot::Sender<Result<bool>>,
}

/// Where the store lives: Postgres (production, replicas) or an embedded SQLite file.
#[derive(Clone)]
pub enum Backend {
    Postgres(PgPool),
    /// The file lock keeps a second process off the same file for as long as any clone lives.
    Sqlite(SqlitePool, Arc<std::fs::File>),
}

/// What to open: a `postgres://` URL, or a SQLite file.
#[derive(Clone, Debug)]
pub enum Location {
    Postgres(String),
    Sqlite(PathBuf),
}

impl Location {
    /// `postgres://…`/`postgresql://…` or `sqlite://<path>`.
    pub fn parse(url: &str) -> Result<Location> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Location::Postgres(url.to_string()))
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            Ok(Location::Sqlite(PathBuf::from(path)))
        } else {
            Err(Error::invalid("database-url", format!("{url:?} is neither postgres://… nor sqlite://…")))
        }
    }
}

impl Backend {
    /// Connects and applies the migrations.
    pub async fn open(location: &Location, max_connections: u32) -> Result<Backend> {
        match location {
            Location::Postgres(url) => {
                let pool = postgres::connect(url, max_connections).await?;
                postgres::migrate(&pool).await?;
                Ok(Backend::Postgres(pool))
            }
            Location::Sqlite(path) => {
                let opened = sqlite::open(path, max_connections).await?;
                sqlite::migrate(&opened.pool).await?;
                Ok(Backend::Sqlite(opened.pool, Arc::new(opened.lock)))
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Postgres(_) => "postgres",
            Backend::Sqlite(..) => "sqlite",
        }
    }
}

/// A consistent view of the store at one revision, read page by page.
pub struct Snapshot {
    inner: SnapshotTx,
    /// Bounds concurrent snapshots so they never take every pooled connection.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

enum SnapshotTx {
    Postgres(postgres::Snapshot),
    Sqlite(sqlite::Snapshot),
}

impl Snapshot {
    pub fn revision(&self) -> i64 {
        match &self.inner {
            SnapshotTx::Postgres(s) => s.revision,
            SnapshotTx::Sqlite(s) => s.revision,
        }
    }

    /// The compaction horizon, read in the snapshot.
    pub fn compacted(&self) -> i64 {
        match &self.inner {
            SnapshotTx::Postgres(s) => s.compacted,
            SnapshotTx::Sqlite(s) => s.compacted,
        }
    }

    /// Live objects of `kinds` (optionally only Netdevs of one DPU), after `after` in
    /// (kind, namespace, name) order; with their statuses if `statuses` (a DPU's view is specs
    /// only, and reading statuses it drops would double the snapshot's work). A page shorter
    /// than `limit` is the last one.
    pub async fn page(
        &mut self,
        kinds: &[Kind],
        dpu: Option<&str>,
        statuses: bool,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<StoredObject>> {
        match &mut self.inner {
            SnapshotTx::Postgres(s) => s.page(kinds, dpu, statuses, after, limit).await,
            SnapshotTx::Sqlite(s) => s.page(kinds, dpu, statuses, after, limit).await,
        }
    }
}

#[derive(Clone)]
pub struct Store {
    backend: Backend,
    writer: mpsc::Sender<Pending>,
    /// Lease renewals outside the writer (Postgres; the embedded store has one writer anyway).
    renewer: Option<mpsc::Sender<Beat>>,
    config: Arc<StoreConfig>,
    snapshots: Arc<tokio::sync::Semaphore>,
    openings: Arc<tokio::sync::Semaphore>,
}

/// A stream's turn to read its start (see [`StoreConfig::max_stream_openings`]).
pub struct OpeningTurn {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Store {
    /// Starts the writer task. Committed changes go to `committed`.
    pub fn start(backend: Backend, config: StoreConfig, committed: mpsc::Sender<Committed>) -> Store {
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let config = Arc::new(config);
        // Postgres: the writes have connections of their own (see `postgres::write_pool`).
        let writes = match &backend {
            Backend::Postgres(pool) => Backend::Postgres(postgres::write_pool(pool)),
            Backend::Sqlite(..) => backend.clone(),
        };
        tokio::spawn(writer::writer(writes.clone(), Arc::clone(&config), rx, committed));
        let renewer = match &writes {
            Backend::Postgres(pool) => {
                let (beats, rx) = mpsc::channel(config.queue_capacity);
                tokio::spawn(writer::renewer(pool.clone(), Arc::clone(&config), rx));
                Some(beats)
            }
            Backend::Sqlite(..) => None,
        };
        let snapshots = Arc::new(tokio::sync::Semaphore::new(config.max_snapshots.max(1)));
        let openings = Arc::new(tokio::sync::Semaphore::new(config.max_stream_openings.max(1)));
        Store { backend, writer: tx, renewer, config, snapshots, openings }
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn replica(&self) -> &str {
        &self.config.replica
    }

    async fn submit(&self, request: Request) -> Result<Reply> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(Pending { request, reply })
            .await
            .map_err(|_| Error::Unavailable("the store writer has stopped".into()))?;
        rx.await.map_err(|_| Error::Unavailable("the store writer has stopped".into()))?
    }

    pub async fn apply(&self, req: ApplyRequest) -> Result<ApplyOutcome> {
        match self.submit(Request::Apply(req)).await? {
            Reply::Apply(o) => Ok(o),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn delete(&self, req: DeleteRequest) -> Result<DeleteOutcome> {
        match self.submit(Request::Delete(req)).await? {
            Reply::Delete(o) => Ok(o),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn report_status(&self, serial: &str, writes: Vec<StatusWrite>) -> Result<Vec<StatusOutcome>> {
        match self.submit(Request::Status { serial: serial.to_string(), writes }).await? {
            Reply::Status(o) => Ok(o),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn register(&self, req: RegisterRequest) -> Result<RegisterOutcome> {
        match self.submit(Request::Register(req)).await? {
            Reply::Register(o) => Ok(o),
            other => Err(unexpected(&other)),
        }
    }

    /// Renews the DPU's lease. A ready DPU's renewal is one row update batched with other
    /// renewals, outside the writer; a lapsed lease (its Dpu status changes) or an unknown DPU
    /// goes through the writer.
    pub async fn heartbeat(&self, serial: &str, applied_revision: i64) -> Result<()> {
        if let Some(renewer) = &self.renewer {
            let (reply, rx) = oneshot::channel();
            let beat = Beat { serial: serial.to_string(), applied_revision: applied_revision.max(0), reply };
            renewer.send(beat).await.map_err(|_| Error::Unavailable("the lease renewer has stopped".into()))?;
            if rx.await.map_err(|_| Error::Unavailable("the lease renewer has stopped".into()))?? {
                return Ok(());
            }
        }
        match self.submit(Request::Heartbeat { serial: serial.to_string(), applied_revision }).await? {
            Reply::Heartbeat => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Marks DPUs whose lease lapsed, one slice at a time (other writes get in between slices);
    /// returns how many.
    pub async fn sweep_leases(&self) -> Result<usize> {
        let mut total = 0;
        loop {
            match self.submit(Request::SweepLeases).await? {
                Reply::Swept { lapsed, more } => {
                    total += lapsed;
                    if !more {
                        return Ok(total);
                    }
                }
                other => return Err(unexpected(&other)),
            }
        }
    }

    /// Drops log entries and tombstones at or below `to` (capped at the current revision).
    pub async fn compact(&self, to: i64) -> Result<Compacted> {
        match self.submit(Request::Compact { to }).await? {
            Reply::Compacted(c) => Ok(c),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn decommission(&self, serial: &str) -> Result<(i64, u32)> {
        match self.submit(Request::Decommission { serial: serial.to_string() }).await? {
            Reply::Decommissioned { revision, netdevs } => Ok((revision, netdevs)),
            other => Err(unexpected(&other)),
        }
    }

    // ---- reads ----

    /// Current revision and compaction horizon.
    pub async fn head(&self) -> Result<(i64, i64)> {
        bounded(self.config.op_timeout, async {
            match &self.backend {
                Backend::Postgres(p) => postgres::head(p).await,
                Backend::Sqlite(p, _) => sqlite::head(p).await,
            }
        })
        .await
    }

    pub async fn get(&self, key: &Key) -> Result<Option<StoredObject>> {
        bounded(self.config.op_timeout, async {
            match &self.backend {
                Backend::Postgres(p) => postgres::get(p, key, false).await,
                Backend::Sqlite(p, _) => sqlite::get(p, key, false).await,
            }
        })
        .await
    }

    /// The live object without its statuses (cheaper: for reading a spec).
    pub async fn get_spec(&self, key: &Key) -> Result<Option<StoredObject>> {
        bounded(self.config.op_timeout, async {
            match &self.backend {
                Backend::Postgres(p) => postgres::get_spec(p, key).await,
                Backend::Sqlite(p, _) => sqlite::get_spec(p, key).await,
            }
        })
        .await
    }

    pub async fn get_including_deleted(&self, key: &Key) -> Result<Option<StoredObject>> {
        bounded(self.config.op_timeout, async {
            match &self.backend {
                Backend::Postgres(p) => postgres::get(p, key, true).await,
                Backend::Sqlite(p, _) => sqlite::get(p, key, true).await,
            }
        })
        .await
    }

    pub async fn list(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        selector: &Labels,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<StoredObject>> {
        bounded(self.config.op_timeout, async {
            match &self.backend {
                Backend::Postgres(p) => postgres::list(p, kind, namespace, selector, after, limit).await,
                Backend::Sqlite(p, _) => sqlite::list(p, kind, namespace, selector, after, limit).await,
            }
        })
        .await
    }

    /// Log entries after `after`, and the compaction horizon read after them.
    pub async fn read_log(&self, after: i64, limit: usize, filter: &LogFilter) -> Result<(Vec<Event>, i64)> {
        bounded(self.config.op_timeout, async {
            match &self.backend {
                Backend::Postgres(p) => postgres::read_log(p, after, limit, filter).await,
                Backend::Sqlite(p, _) => sqlite::read_log(p, after, limit, filter).await,
            }
        })
        .await
    }

    /// Waits for a turn to read a stream's start. Like a snapshot's, the wait is not bounded:
    /// a stream is only slow to open, never refused.
    pub async fn opening_turn(&self) -> Result<OpeningTurn> {
        Ok(OpeningTurn { _permit: turn(&self.openings).await? })
    }

    pub async fn snapshot(&self) -> Result<Snapshot> {
        // Waiting for a turn is not bounded: a snapshot is only slow to start, never refused.
        let permit = turn(&self.snapshots).await?;
        let inner = bounded(self.config.op_timeout, async {
            Ok(match &self.backend {
                Backend::Postgres(p) => SnapshotTx::Postgres(postgres::Snapshot::begin(p).await?),
                Backend::Sqlite(p, _) => SnapshotTx::Sqlite(sqlite::Snapshot::begin(p).await?),
            })
        })
        .await?;
        Ok(Snapshot { inner, _permit: permit })
    }

    pub async fn dpu_labels(&self, serial: &str) -> Result<Option<Labels>> {
        bounded(self.config.op_timeout, async {
            match &self.backend {
                Backend::Postgres(p) => postgres::dpu_labels(p, serial).await,
                Backend::Sqlite(p, _) => sqlite::dpu_labels(p, serial).await,
            }
        })
        .await
    }

    pub async fn fleet_counts(&self) -> Result<FleetCounts> {
        bounded(self.config.op_timeout, async {
            match &self.backend {
                Backend::Postgres(p) => postgres::fleet_counts(p).await,
                Backend::Sqlite(p, _) => sqlite::fleet_counts(p).await,
            }
        })
        .await
    }

    pub async fn list_netdevs(
        &self,
        q: &NetdevQuery,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<StoredObject>> {
        bounded(self.config.op_timeout, async {
            match &self.backend {
                Backend::Postgres(p) => postgres::list_netdevs(p, q, after, limit).await,
                Backend::Sqlite(p, _) => sqlite::list_netdevs(p, q, after, limit).await,
            }
        })
        .await
    }

    pub async fn netdev_by_id(&self, id: &str) -> Result<Option<StoredObject>> {
        bounded(self.config.op_timeout, async {
            match &self.backend {
                Backend::Postgres(p) => postgres::netdev_by_id(p, id).await,
                Backend::Sqlite(p, _) => sqlite::netdev_by_id(p, id).await,
            }
        })
        .await
    }

    /// The newest `limit` log entries of one object (still in the log), newest first.
    pub async fn history(&self, key: &Key, limit: usize) -> Result<Vec<Event>> {
        bounded(self.config.op_timeout, async {
            match &self.backend {
                Backend::Postgres(p) => postgres::history(p, key, limit).await,
                Backend::Sqlite(p, _) => sqlite::history(p, key, limit).await,
            }
        })
        .await
    }

    pub async fn dpu_netdev_counts(
        &self,
        serials: &[String],
    ) -> Result<std::collections::HashMap<String, DpuNetdevCounts>> {
        bounded(self.config.op_timeout, async {
            match &self.backend {
                Backend::Postgres(p) => postgres::dpu_netdev_counts(p, serials).await,
                Backend::Sqlite(p, _) => sqlite::dpu_netdev_counts(p, serials).await,
            }
        })
        .await
    }

    pub async fn dpu_last_errors(&self, serials: &[String]) -> Result<std::collections::HashMap<String, String>> {
        bounded(self.config.op_timeout, async {
            match &self.backend {
                Backend::Postgres(p) => postgres::dpu_last_errors(p, serials).await,
                Backend::Sqlite(p, _) => sqlite::dpu_last_errors(p, serials).await,
            }
        })
        .await
    }

    pub async fn ping(&self) -> Result<()> {
        bounded(self.config.op_timeout, async {
            match &self.backend {
                Backend::Postgres(p) => postgres::ping(p).await,
                Backend::Sqlite(p, _) => sqlite::ping(p).await,
            }
        })
        .await
    }
}

/// `f`, or UNAVAILABLE when the database does not answer within `limit`.
async fn bounded<T>(limit: Duration, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => {
            Err(Error::Unavailable(format!("the database did not answer within {}s", limit.as_secs_f64()).into()))
        }
    }
}

/// A turn of a bounded kind of read; waits as long as it takes.
async fn turn(kind: &Arc<tokio::sync::Semaphore>) -> Result<tokio::sync::OwnedSemaphorePermit> {
    Arc::clone(kind).acquire_owned().await.map_err(|_| Error::Unavailable("the store is closing".into()))
}

fn unexpected(reply: &Reply) -> Error {
    Error::internal(format!("store writer answered with {reply:?}"))
}
