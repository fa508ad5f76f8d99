//! limits: what the same machine gives without the broker, so the broker's figures can be read
//! as ratios: the raw batched-upsert rate of the same Postgres (UNNEST upserts of rows like the
//! broker's statuses into a scratch table) and the raw loopback mTLS gRPC message rate (a
//! trivial tonic echo service with rustls, in its own process).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use sqlx::{PgPool, postgres::PgPoolOptions};

use super::{PhaseMeter, connections_for};
use crate::{
    broker_proc,
    echo::EchoProc,
    report::{Row, ScenarioReport},
    run::Env,
    stats::{SharedLatency, per_sec},
};

/// Rows per upsert statement (the broker commits up to 1024 requests per transaction).
const BATCH: usize = 1000;

pub async fn run(env: &Env) -> ScenarioReport {
    let mut rep = ScenarioReport::new("limits");
    let p = &env.params;
    rep.setup = format!(
        "Postgres: {BATCH}-row UNNEST upserts, 1 and 4 writers; gRPC: unary echo, concurrency {} over {} connections, \
         and server streams; {:.0}s each",
        p.concurrency,
        connections_for(p.concurrency),
        p.duration.as_secs_f64()
    );
    if let Err(e) = postgres(env, &mut rep).await {
        rep.error = Some(format!("postgres limit: {e:#}"));
    }
    if let Err(e) = grpc(env, &mut rep).await {
        rep.error = Some(format!("gRPC limit: {e:#}"));
    }
    rep
}

const STATUS_JSON: &str = r#"{"phase":"Connected","ip":"10.0.0.5/8","macAddress":"02:00:00:00:00:05","operStatus":"UP","components":[{"name":"bridge-port","status":"SUCCESS","details":"report 1"}]}"#;

async fn upsert_loop(
    pool: PgPool,
    keys: std::ops::Range<usize>,
    deadline: Instant,
    rows: Arc<AtomicU64>,
    lat: Arc<SharedLatency>,
) -> anyhow::Result<()> {
    let status: serde_json::Value = serde_json::from_str(STATUS_JSON)?;
    let span = keys.len().max(1);
    let mut next = 0usize;
    let mut rev: i64 = 0;
    while Instant::now() < deadline {
        let mut names = Vec::with_capacity(BATCH);
        for _ in 0..BATCH.min(span) {
            names.push(format!("dpu-{:05}-pf0-vf{}", keys.start + next % span, next / span % 64));
            next += 1;
        }
        rev += 1;
        let n = names.len();
        let t = Instant::now();
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO bench_upsert (kind, namespace, name, author, observed_generation, seq, revision, status, updated_at) \
             SELECT 'Netdev', 'bench', name, 'dpu/x', 1, $2, $2, $3, now() FROM UNNEST($1::text[]) AS k(name) \
             ON CONFLICT (kind, namespace, name, author) DO UPDATE SET observed_generation = EXCLUDED.observed_generation, \
             seq = EXCLUDED.seq, revision = EXCLUDED.revision, status = EXCLUDED.status, updated_at = EXCLUDED.updated_at",
        )
        .bind(names)
        .bind(rev)
        .bind(&status)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        lat.record(t.elapsed());
        rows.fetch_add(n as u64, Ordering::Relaxed);
    }
    Ok(())
}

async fn postgres(env: &Env, rep: &mut ScenarioReport) -> anyhow::Result<()> {
    let p = &env.params;
    let url = broker_proc::create_database(&env.admin_url, &env.db).await?;
    let result = async {
        let pool = PgPoolOptions::new().max_connections(8).connect(&url).await?;
        sqlx::query(
            "CREATE TABLE bench_upsert (kind text NOT NULL, namespace text NOT NULL, name text NOT NULL, \
             author text NOT NULL, observed_generation bigint NOT NULL, seq bigint NOT NULL, revision bigint NOT NULL, \
             status jsonb NOT NULL, updated_at timestamptz NOT NULL, PRIMARY KEY (kind, namespace, name, author))",
        )
        .execute(&pool)
        .await?;
        // The key space: as many distinct rows as the status phase of `write` updates.
        let keyspace = (p.agents * p.report_batch).max(4 * BATCH);
        for writers in [1usize, 4] {
            let rows = Arc::new(AtomicU64::new(0));
            let lat = Arc::new(SharedLatency::default());
            let meter = PhaseMeter::start(&format!("pg upsert x{writers}"), None, None).await;
            let started = Instant::now();
            let deadline = started + p.duration;
            let part = keyspace.div_ceil(writers);
            let tasks: Vec<_> = (0..writers)
                .map(|w| {
                    tokio::spawn(upsert_loop(
                        pool.clone(),
                        w * part..(w + 1) * part,
                        deadline,
                        Arc::clone(&rows),
                        Arc::clone(&lat),
                    ))
                })
                .collect();
            for t in tasks {
                t.await??;
            }
            let elapsed = started.elapsed();
            rep.phases.push(meter.finish(None).await);
            let n = rows.load(Ordering::Relaxed);
            rep.push(
                Row::new(
                    &format!("limits.pg_upsert_{writers}"),
                    format!("Postgres batched upsert, {writers} writer(s)"),
                )
                .latency(lat.summary())
                .count(n)
                .rate(per_sec(n, elapsed))
                .note(format!("rows/s; {BATCH} rows per transaction; latency per commit")),
            );
        }
        let best = ["limits.pg_upsert_1", "limits.pg_upsert_4"]
            .iter()
            .filter_map(|id| rep.find(id).and_then(|r| r.rate))
            .fold(0.0f64, f64::max);
        rep.push(
            Row::new("limits.pg_upsert_best", "Postgres batched upsert, best")
                .rate(best)
                .note("rows/s: the limit used for ratios"),
        );
        pool.close().await;
        anyhow::Ok(())
    }
    .await;
    broker_proc::drop_database(&env.admin_url, &env.db).await?;
    result
}

async fn grpc(env: &Env, rep: &mut ScenarioReport) -> anyhow::Result<()> {
    let p = &env.params;
    let echo = EchoProc::start(&env.dir).await?;
    let result = async {
        let meter = PhaseMeter::start("grpc unary", None, Some(echo.pid)).await;
        let (n, elapsed, lat) =
            echo.unary_rate(&env.pki, p.concurrency, connections_for(p.concurrency), p.duration, 300).await?;
        rep.phases.push(meter.finish(None).await);
        rep.push(
            Row::new("limits.grpc_unary", "mTLS gRPC unary echo (300 B), closed loop")
                .latency(lat)
                .count(n)
                .rate(per_sec(n, elapsed))
                .note("msgs/s"),
        );
        let streams = p.agents.clamp(1, 100);
        let meter = PhaseMeter::start("grpc stream", None, Some(echo.pid)).await;
        let (n, elapsed) = echo.stream_rate(&env.pki, streams, p.duration, 300).await?;
        rep.phases.push(meter.finish(None).await);
        rep.push(
            Row::new("limits.grpc_stream", "mTLS gRPC server-stream messages (300 B)")
                .count(n)
                .rate(per_sec(n, elapsed))
                .note(format!("msgs/s over {streams} streams")),
        );
        rep.server_memory = crate::cpu::memory(echo.pid);
        anyhow::Ok(())
    }
    .await;
    echo.stop().await;
    result
}
