//! Copies a whole store into an empty one (e.g. the embedded SQLite file into Postgres): every
//! object, tombstone, status, log entry, lease, allocation and the revision counter, so agents
//! and syncers resume from their revisions without a full resync.

use std::fmt;

use super::{
    Backend,
    batch::WriteTx,
    postgres,
    rows::{Dump, Flush},
    sqlite,
};
use crate::error::{Error, Result};

pub struct Copied {
    pub revision: i64,
    pub objects: usize,
    pub statuses: usize,
    pub log_entries: usize,
}

impl fmt::Display for Copied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "copied {} objects, {} statuses and {} log entries; revision {}",
            self.objects, self.statuses, self.log_entries, self.revision
        )
    }
}

async fn dump(backend: &Backend) -> Result<Dump> {
    match backend {
        Backend::Postgres(p) => postgres::dump(p).await,
        Backend::Sqlite(p, _) => sqlite::dump(p).await,
    }
}

async fn load<T: WriteTx>(mut tx: T, d: Dump) -> Result<()> {
    if tx.lock_head().await? != 0 {
        return Err(Error::FailedPrecondition("the target store is not empty".into()));
    }
    let (objects, routes) = d.objects.into_iter().unzip();
    let flush = Flush {
        objects,
        routes,
        statuses: d.statuses,
        log: d.log.into_iter().map(std::sync::Arc::new).collect(),
        allocations: d.allocations,
        pool_offsets: d.pools,
        dpus: d.dpus,
        head: d.head,
        force_head: true,
        compact_to: (d.compacted > 0).then_some(d.compacted),
        ..Default::default()
    };
    tx.flush(&flush).await?;
    tx.commit().await
}

pub async fn copy(from: &Backend, to: &Backend) -> Result<Copied> {
    let d = dump(from).await?;
    let copied =
        Copied { revision: d.head, objects: d.objects.len(), statuses: d.statuses.len(), log_entries: d.log.len() };
    match to {
        Backend::Postgres(p) => load(postgres::PgWriteTx::begin(p, "copy").await?, d).await?,
        Backend::Sqlite(p, _) => load(sqlite::SqliteWriteTx::begin(p).await?, d).await?,
    }
    Ok(copied)
}
