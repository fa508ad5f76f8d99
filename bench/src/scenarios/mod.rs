//! The scenarios of issue 7 and what they share: a broker per scenario, phase meters (CPU of the
//! broker, Postgres and the bench; the broker's commit metrics), open-loop scheduling, seeding.

pub mod attach;
pub mod etcd;
pub mod fanout;
pub mod limits;
pub mod reconnect;
pub mod write;

use std::{
    future::Future,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use xpu_proto::broker::v1::admin_service_client::AdminServiceClient;

use crate::{
    broker_proc::{self, BrokerProc, Metrics},
    cpu::CpuSnap,
    fixtures,
    report::{PhaseUse, ScenarioReport},
    run::Env,
};

/// Runs `body` against a fresh broker (fresh database), then records its memory and stops it.
pub async fn with_broker<F>(env: &Env, rep: &mut ScenarioReport, extra: &[&str], body: F)
where
    F: AsyncFnOnce(&BrokerProc, &mut ScenarioReport) -> anyhow::Result<()>,
{
    let broker = match env.broker(extra).await {
        Ok(b) => b,
        Err(e) => {
            rep.error = Some(format!("starting the broker: {e:#}"));
            return;
        }
    };
    if let Err(e) = body(&broker, rep).await {
        rep.error = Some(format!("{e:#}"));
        let tail = std::fs::read_to_string(&broker.log).unwrap_or_default();
        let last: Vec<&str> = tail.lines().rev().take(5).collect();
        if !last.is_empty() {
            rep.notes.push(format!("broker log tail: {}", last.into_iter().rev().collect::<Vec<_>>().join(" | ")));
        }
    }
    rep.server_memory = broker.memory();
    for s in broker_proc::seq_scans(&broker.db_url).await {
        rep.notes.push(format!("postgres reads: {s}"));
    }
    let keep = env.keep_for.is_some_and(|k| k == rep.name);
    if let Err(e) = broker.stop(keep).await {
        rep.notes.push(format!("stopping the broker: {e:#}"));
    }
}

/// Set for `--quick` runs: phases skip waiting for Postgres's statistics.
pub static QUICK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Measures one phase: CPU of the server, Postgres and the bench, and the broker's commits.
pub struct PhaseMeter {
    name: String,
    cpu: CpuSnap,
    metrics: Option<Metrics>,
    pg: Option<[f64; 4]>,
    perf: Option<crate::perf::Recording>,
    at: Instant,
}

impl PhaseMeter {
    /// With a broker, the phase starts with fresh planner statistics of its database, as a
    /// long-running one has them from autovacuum (a fresh bench database would otherwise be planned
    /// from the statistics of its empty tables).
    pub async fn start(name: &str, broker: Option<&BrokerProc>, server_pid: Option<u32>) -> PhaseMeter {
        if let Some(b) = broker
            && let Err(e) = broker_proc::analyze(&b.db_url).await
        {
            eprintln!("  ANALYZE before {name} failed: {e}");
        }
        let metrics = match broker {
            Some(b) => Some(b.metrics().await),
            None => None,
        };
        let pg = match broker {
            Some(b) => broker_proc::pg_counters(&b.db_url).await,
            None => None,
        };
        let pid = server_pid.or(broker.map(|b| b.pid));
        let perf = pid.and_then(crate::perf::start);
        PhaseMeter { name: name.into(), cpu: CpuSnap::take(pid), metrics, pg, perf, at: Instant::now() }
    }

    pub async fn finish(self, broker: Option<&BrokerProc>) -> PhaseUse {
        let cpu = self.cpu.since();
        let wall = self.at.elapsed().as_secs_f64().max(1e-9);
        let profile = match self.perf {
            Some(r) => r.finish().await,
            None => None,
        };
        let mut p = PhaseUse {
            phase: self.name,
            cpu,
            commits: None,
            requests_per_commit: None,
            mean_commit_ms: None,
            writer_busy_pct: None,
            pg: None,
            profile,
        };
        if let (Some(b), Some(before)) = (broker, self.metrics) {
            let after = b.metrics().await;
            let d = |n: &str| after.get(n) - before.get(n);
            let commits = d("xpu_store_batches_total");
            let requests = d("xpu_store_batch_requests_total");
            let commit_secs = d("xpu_store_commit_duration_seconds_sum");
            p.commits = Some(commits.max(0.0) as u64);
            if commits > 0.0 {
                p.requests_per_commit = Some(requests / commits);
                p.mean_commit_ms = Some(commit_secs / commits * 1000.0);
            }
            p.writer_busy_pct = Some(commit_secs / wall * 100.0);
            // Postgres publishes a backend's counters about once a second (not waited for in --quick).
            if !QUICK.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
            }
            if let (Some(a), Some(b)) = (broker_proc::pg_counters(&b.db_url).await, self.pg) {
                p.pg = Some(crate::report::PgUse {
                    transactions: a[0] - b[0],
                    rows_returned: a[1] - b[1],
                    rows_fetched: a[2] - b[2],
                    rows_written: a[3] - b[3],
                });
            }
        }
        p
    }
}

/// Starts `call(i, scheduled)` at `rate`/s for `duration`, numbering from `first`: an open loop,
/// whose schedule never waits for answers; callers time from `scheduled` (no coordinated
/// omission). Returns the number started and their tasks.
pub async fn open_loop<F, Fut>(rate: f64, duration: Duration, first: u64, call: F) -> (u64, Vec<JoinHandle<()>>)
where
    F: Fn(u64, Instant) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let n = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for k in 0..n {
        let at = start + Duration::from_secs_f64(k as f64 / rate);
        tokio::time::sleep_until(at.into()).await;
        tasks.push(tokio::spawn(call(first + k, at)));
    }
    (n, tasks)
}

/// Waits for tasks, at most `timeout`; returns how many had not finished.
pub async fn join_all(tasks: Vec<JoinHandle<()>>, timeout: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut late = 0;
    for t in tasks {
        if tokio::time::timeout_at(deadline, t).await.is_err() {
            late += 1;
        }
    }
    late
}

/// The fabric object every agent watches and the network Netdevs attach to (10.0.0.0/8).
pub async fn seed(admin: &mut AdminServiceClient<Channel>) -> anyhow::Result<()> {
    let lb = fixtures::logical_bridge(fixtures::FABRIC_LB, 10, Default::default(), Default::default());
    admin.apply(fixtures::apply(lb)).await?;
    let net = fixtures::network(fixtures::NETWORK, fixtures::FABRIC_LB, "10.0.0.0/8", "10.0.0.1");
    admin.apply(fixtures::apply(net)).await?;
    Ok(())
}

/// Creates `count` Netdevs spread round-robin over `agents` DPUs (vf = i / agents) through
/// AdminService, `concurrency` at a time over the given connections. Returns (created, seconds).
pub async fn preload_netdevs(
    admins: &[AdminServiceClient<Channel>],
    agents: usize,
    count: usize,
    concurrency: usize,
    payload: &std::collections::HashMap<String, String>,
) -> anyhow::Result<(usize, f64)> {
    let t = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter((0..count).map(|i| {
        let mut admin = admins[i % admins.len()].clone();
        let dpu = i % agents.max(1);
        let res = fixtures::netdev(&fixtures::serial(dpu), i / agents.max(1), &fixtures::node(dpu), payload.clone());
        async move {
            admin.apply(fixtures::apply(res)).await?;
            Ok(())
        }
    }))
    .buffer_unordered(concurrency.max(1))
    .collect()
    .await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
        anyhow::bail!("{failed} of {count} netdevs could not be created; first error: {e:#}");
    }
    Ok((count, t.elapsed().as_secs_f64()))
}

/// Connections for `concurrency` requests in flight (HTTP/2 multiplexes up to ~100 well).
pub fn connections_for(concurrency: usize) -> usize {
    concurrency.div_ceil(32).max(1)
}
