//! The store's writing tasks: the group-committing writer (every spec, status and lease change)
//! and the lease renewer beside it.
//!
//! The writer decides, writes and commits one batch at a time, or, on Postgres with
//! `StoreConfig::pipeline`, decides batch N+1 on another connection while batch N is written and
//! committed, reading past N (see `batch::speculative`). N+1 is written only once N has
//! committed, so the revision order stays the commit order, and the replies and the fan-out of
//! N go out before N+1 is written.

use std::{sync::Arc, time::Instant};

use chrono::Utc;
use sqlx::PgPool;
use tokio::{
    sync::{mpsc, watch},
    task::{JoinError, JoinHandle},
};

use super::{
    Backend, Beat, Committed, Pending, StoreConfig,
    batch::{self, Ahead, BatchContext, BatchResult, Prepared, Request, Speculative, Warm, WriteTx},
    bounded, postgres, sqlite,
};
use crate::error::{Error, Result};

/// The same failure for every request of a failed batch.
pub(super) fn duplicate(err: &Error) -> Error {
    match err {
        Error::Unavailable(cause) => Error::Unavailable(cause.to_string().into()),
        Error::Internal(cause) => Error::Internal(cause.to_string().into()),
        other => Error::internal(other.to_string()),
    }
}

/// The group commit's intake: waits for one item, then takes whatever else is waiting, up to
/// `max` in all. `None` when every sender is gone.
async fn next_batch<T>(rx: &mut mpsc::Receiver<T>, max: usize) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    let mut batch = Vec::with_capacity(max.min(rx.len() + 1));
    batch.push(first);
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    Some(batch)
}

fn context(config: &StoreConfig) -> BatchContext {
    BatchContext {
        now: Utc::now(),
        lease_duration_ms: i64::try_from(config.lease_duration.as_millis()).unwrap_or(i64::MAX),
    }
}

async fn run_batch(backend: &Backend, config: &StoreConfig, requests: &[&Request]) -> Result<BatchResult> {
    run_warm(backend, config, requests, None).await.map(|(res, _)| res)
}

/// One batch, starting from what the last commit left when it still holds.
async fn run_warm(
    backend: &Backend,
    config: &StoreConfig,
    requests: &[&Request],
    warm: Option<Warm>,
) -> Result<(BatchResult, Option<Warm>)> {
    let ctx = context(config);
    match backend {
        Backend::Postgres(pool) => {
            let tx = postgres::PgWriteTx::begin(pool, &config.replica).await?;
            batch::finish(batch::prepare(tx, requests, &ctx, warm).await?).await
        }
        Backend::Sqlite(pool, _) => {
            let tx = sqlite::SqliteWriteTx::begin(pool).await?;
            batch::finish(batch::prepare(tx, requests, &ctx, warm).await?).await
        }
    }
}

pub(super) async fn writer(
    backend: Backend,
    config: Arc<StoreConfig>,
    rx: mpsc::Receiver<Pending>,
    committed: mpsc::Sender<Committed>,
) {
    match backend {
        Backend::Postgres(pool) if config.pipeline => pipelined(pool, config, rx, committed).await,
        backend => serial(backend, config, rx, committed).await,
    }
    tracing::debug!("store writer stopped");
}

/// One batch at a time, each starting from what the one before left (see `batch::Warm`).
async fn serial(
    backend: Backend,
    config: Arc<StoreConfig>,
    mut rx: mpsc::Receiver<Pending>,
    committed: mpsc::Sender<Committed>,
) {
    let mut warm = None;
    while let Some(batch) = next_batch(&mut rx, config.max_batch).await {
        warm = commit_alone(&backend, &config, batch, Instant::now(), warm, &committed).await;
    }
}

/// Decides, writes and commits one batch with nothing else in flight, and answers it; returns
/// what the next batch may start from.
async fn commit_alone(
    backend: &Backend,
    config: &StoreConfig,
    batch: Vec<Pending>,
    started: Instant,
    warm: Option<Warm>,
    committed: &mpsc::Sender<Committed>,
) -> Option<Warm> {
    let requests: Vec<&Request> = batch.iter().map(|p| &p.request).collect();
    // A batch that outlives the limit may or may not have committed: its callers get
    // UNAVAILABLE (retry), and the fan-out finds any commit in the log. Nothing is kept from a
    // batch that failed: its working set may hold what was not written.
    let (result, warm) = match bounded(config.op_timeout, run_warm(backend, config, &requests, warm)).await {
        Ok((res, warm)) => (Ok(res), warm),
        Err(e) => (Err(e), None),
    };
    land(backend, config, batch, started, result, committed).await;
    warm.filter(|w| config.warm_slots > 0 && w.len() <= config.warm_slots)
}

/// Answers a batch that was written, or failed; `true` when it committed.
async fn land(
    backend: &Backend,
    config: &StoreConfig,
    batch: Vec<Pending>,
    started: Instant,
    result: Result<BatchResult>,
    committed: &mpsc::Sender<Committed>,
) -> bool {
    crate::metrics::record_batch(batch.len(), started.elapsed());
    match result {
        Ok(res) => {
            deliver(res, batch, committed).await;
            true
        }
        Err(err) if batch.len() > 1 && !matches!(err, Error::Unavailable(_)) => {
            // Find the request that broke the transaction: commit each on its own.
            tracing::warn!(error = %err, size = batch.len(), "batch failed, retrying requests one by one");
            for p in batch {
                match bounded(config.op_timeout, run_batch(backend, config, &[&p.request])).await {
                    Ok(res) => deliver(res, vec![p], committed).await,
                    Err(e) => {
                        let _ = p.reply.send(Err(e));
                    }
                }
            }
            false
        }
        Err(err) => {
            for p in batch {
                let _ = p.reply.send(Err(duplicate(&err)));
            }
            false
        }
    }
}

/// A batch being written and committed while the next one is decided.
struct InFlight {
    batch: Vec<Pending>,
    started: Instant,
    flush: Arc<crate::store::rows::Flush>,
    /// The compaction horizon it locked at.
    compacted: Option<i64>,
    /// `Some(true)` once committed, `Some(false)` if not.
    outcome: watch::Receiver<Option<bool>>,
    task: JoinHandle<Result<BatchResult>>,
}

impl InFlight {
    fn launch<T: WriteTx + 'static>(
        p: Prepared<T>,
        batch: Vec<Pending>,
        started: Instant,
        config: &StoreConfig,
    ) -> Self {
        let flush = Arc::clone(&p.flush);
        let compacted = p.tx.compacted_seen();
        let (done, outcome) = watch::channel(None);
        let limit = config.op_timeout;
        let task = tokio::spawn(async move {
            let result = bounded(limit, batch::finish(p)).await.map(|(res, _)| res);
            let _ = done.send(Some(result.is_ok()));
            result
        });
        InFlight { batch, started, flush, compacted, outcome, task }
    }

    /// Whether the next batch may be decided before this one commits: not past a compaction,
    /// which removes rows the next batch could otherwise still read.
    fn readable(&self) -> bool {
        self.flush.compact_to.is_none()
    }
}

fn joined(done: std::result::Result<Result<BatchResult>, JoinError>) -> Result<BatchResult> {
    done.unwrap_or_else(|e| Err(Error::internal(format!("the commit task ended: {e}"))))
}

enum Next {
    Landed(std::result::Result<Result<BatchResult>, JoinError>),
    Batch(Option<Vec<Pending>>),
}

/// Batch N+1 is decided while batch N commits.
async fn pipelined(
    pool: PgPool,
    config: Arc<StoreConfig>,
    mut rx: mpsc::Receiver<Pending>,
    committed: mpsc::Sender<Committed>,
) {
    let backend = Backend::Postgres(pool.clone());
    let mut in_flight: Option<InFlight> = None;
    loop {
        let next = match in_flight.as_mut() {
            Some(f) => tokio::select! {
                biased;
                done = &mut f.task => Next::Landed(done),
                batch = next_batch(&mut rx, config.max_batch) => Next::Batch(batch),
            },
            None => Next::Batch(next_batch(&mut rx, config.max_batch).await),
        };
        let batch = match next {
            Next::Landed(done) => {
                if let Some(f) = in_flight.take() {
                    land(&backend, &config, f.batch, f.started, joined(done), &committed).await;
                }
                continue;
            }
            Next::Batch(Some(batch)) => batch,
            Next::Batch(None) => {
                if let Some(f) = in_flight.take() {
                    let done = f.task.await;
                    land(&backend, &config, f.batch, f.started, joined(done), &committed).await;
                }
                return;
            }
        };
        let started = Instant::now();
        let requests: Vec<&Request> = batch.iter().map(|p| &p.request).collect();
        let ctx = context(&config);
        // Decide this batch while the one ahead commits; the one ahead is answered (and fanned
        // out) as soon as it has committed, before this one is written: revision order.
        let ahead = in_flight.take();
        let readable =
            ahead.as_ref().filter(|f| f.readable()).map(|f| (Arc::clone(&f.flush), f.compacted, f.outcome.clone()));
        let decide_ahead = async {
            match readable {
                Some((flush, compacted, outcome)) => {
                    let view = Arc::new(Ahead::of(flush, compacted));
                    Some(
                        bounded(config.op_timeout, async {
                            let tx = postgres::PgWriteTx::begin(&pool, &config.replica).await?;
                            batch::prepare(Speculative::new(tx, view, outcome), &requests, &ctx, None).await
                        })
                        .await,
                    )
                }
                None => None,
            }
        };
        let land_ahead = async {
            match ahead {
                Some(f) => {
                    let done = f.task.await;
                    land(&backend, &config, f.batch, f.started, joined(done), &committed).await
                }
                None => true,
            }
        };
        let (speculative, ahead_committed) = tokio::join!(decide_ahead, land_ahead);
        let ahead_speculated = speculative.is_some();
        let confirmed = match speculative {
            Some(Ok(mut p)) if ahead_committed => match bounded(config.op_timeout, p.tx.confirm()).await {
                Ok(true) => Some(p),
                _ => None,
            },
            _ => None,
        };
        if ahead_speculated {
            crate::metrics::record_decided_ahead(confirmed.is_some());
        }
        if let Some(p) = confirmed {
            in_flight = Some(InFlight::launch(p, batch, started, &config));
            continue;
        }
        // Nothing ahead, or what this batch was decided on did not hold: decide it now.
        let ctx = context(&config);
        let prepared = bounded(config.op_timeout, async {
            let tx = postgres::PgWriteTx::begin(&pool, &config.replica).await?;
            batch::prepare(tx, &requests, &ctx, None).await
        })
        .await;
        match prepared {
            Ok(p) => in_flight = Some(InFlight::launch(p, batch, started, &config)),
            // Its requests are tried again one by one where that can help.
            Err(err) => {
                land(&backend, &config, batch, started, Err(err), &committed).await;
            }
        }
    }
}

/// Group-commits lease renewals: everything waiting (up to `max_batch`) in one statement.
pub(super) async fn renewer(pool: PgPool, config: Arc<StoreConfig>, mut rx: mpsc::Receiver<Beat>) {
    while let Some(batch) = next_batch(&mut rx, config.max_batch).await {
        // One row per DPU: the latest applied revision reported wins.
        let mut latest: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
        for b in &batch {
            let rev = latest.entry(b.serial.as_str()).or_insert(b.applied_revision);
            *rev = (*rev).max(b.applied_revision);
        }
        let (serials, revisions): (Vec<String>, Vec<i64>) = latest.into_iter().map(|(s, r)| (s.to_string(), r)).unzip();
        let started = Instant::now();
        let result = bounded(config.op_timeout, postgres::renew_leases(&pool, Utc::now(), &serials, &revisions)).await;
        crate::metrics::record_renewals(batch.len(), started.elapsed());
        match result {
            Ok(renewed) => {
                let renewed: std::collections::HashSet<String> = renewed.into_iter().collect();
                for b in batch {
                    let _ = b.reply.send(Ok(renewed.contains(&b.serial)));
                }
            }
            Err(err) => {
                for b in batch {
                    let _ = b.reply.send(Err(duplicate(&err)));
                }
            }
        }
    }
    tracing::debug!("lease renewer stopped");
}

async fn deliver(res: BatchResult, batch: Vec<Pending>, committed: &mpsc::Sender<Committed>) {
    if !res.events.is_empty() {
        // The fan-out must see every commit in order; waiting here applies back-pressure.
        if committed.send(Committed { events: res.events, head: res.head }).await.is_err() {
            tracing::debug!("fan-out stopped; committed changes reach watchers through the log");
        }
    }
    for (p, reply) in batch.into_iter().zip(res.replies) {
        let _ = p.reply.send(reply);
    }
}
