//! Command-line flags and the parameters each scenario runs with (`--quick` shrinks them).

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "xpu-bench",
    version,
    about = "Load generator for xpu-broker: a real broker process, real Postgres, real mTLS, simulated agents",
    after_help = "Scenarios: attach, write, fanout, reconnect, limits, etcd (or all). Without --scenario, every \
                  scenario runs; --quick runs them briefly (a smoke test that never asserts speed)."
)]
pub struct Args {
    /// Scenarios to run, comma-separated: attach, write, fanout, reconnect, limits, etcd, all.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub scenario: Vec<String>,
    /// Run briefly with small sizes (every scenario unless --scenario is given).
    #[arg(long)]
    pub quick: bool,
    /// Target rate of the open-loop load (attaches/s, netdev updates/s). Default 1000, quick 100.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Measured time of each phase, e.g. 20s. Default 20s, quick 2s.
    #[arg(long, value_parser = xpu_broker::cli::parse_duration)]
    pub duration: Option<Duration>,
    /// Simulated DPU agents (one certificate, connection and WatchDesired stream each). Default 1000, quick 50.
    #[arg(long)]
    pub agents: Option<usize>,
    /// Host-agent identities for attach (each its own connection). Default: one per agent, at most 5000.
    #[arg(long)]
    pub hosts: Option<usize>,
    /// Objects pre-loaded (fanout, write) or written over (write). Default 10000, quick 500.
    #[arg(long)]
    pub objects: Option<usize>,
    /// Extra bytes of labels per written object (labels are capped at 64 x 63 characters).
    #[arg(long, default_value_t = 0)]
    pub payload: usize,
    /// Requests in flight in the closed-loop write phases. Default 256, quick 32.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Updates/s of the fabric object every agent watches (fanout, etcd). Default 10, quick 5.
    #[arg(long)]
    pub fabric_rate: Option<f64>,
    /// A simulated agent sends at most one ReportStatus per this interval (batching what queued).
    #[arg(long, default_value = "5ms", value_parser = xpu_broker::cli::parse_duration)]
    pub flush_interval: Duration,
    /// Status reports per ReportStatus call in the write scenario. Default 10.
    #[arg(long, default_value_t = 10)]
    pub report_batch: usize,
    /// The broker binary. Default: `xpu-broker` next to this binary, built with cargo if missing.
    #[arg(long)]
    pub broker_bin: Option<PathBuf>,
    /// Postgres server to use; the bench creates (and drops) a database `xpu_bench_<pid>` on it.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub database_url: String,
    /// Leave the (last) broker running, its database and certificates in place, for inspection.
    #[arg(long)]
    pub keep: bool,
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Log filter of the spawned broker (its log goes to a file in the bench's temporary directory).
    #[arg(long, default_value = "warn")]
    pub broker_log: String,
    /// Profile the server (broker, etcd, echo) during each phase with `perf record` and print where
    /// its CPU went (TLS, HTTP/2, protobuf, JSON, Postgres client, runtime, broker code, kernel).
    #[arg(long)]
    pub perf: bool,
    #[command(subcommand)]
    pub internal: Option<Internal>,
}

#[derive(Debug, Subcommand)]
pub enum Internal {
    /// (internal) The echo server of the `limits` scenario, run as its own process.
    #[command(hide = true)]
    EchoServer {
        #[arg(long)]
        dir: PathBuf,
    },
}

/// What every scenario runs with.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Params {
    pub quick: bool,
    pub rate: f64,
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    pub agents: usize,
    pub hosts: usize,
    pub objects: usize,
    pub payload: usize,
    pub concurrency: usize,
    pub fabric_rate: f64,
    #[serde(serialize_with = "secs")]
    pub flush_interval: Duration,
    pub report_batch: usize,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Most host identities: each is a connection in this process and in the broker, and both
/// share the file-descriptor limit with the agents' connections.
const MAX_DEFAULT_HOSTS: usize = 5000;

impl Params {
    pub fn from_args(a: &Args) -> Params {
        let q = a.quick;
        let agents = a.agents.unwrap_or(if q { 50 } else { 1000 }).max(1);
        Params {
            quick: q,
            rate: a.rate.unwrap_or(if q { 100.0 } else { 1000.0 }).max(0.1),
            duration: a.duration.unwrap_or(if q { Duration::from_secs(2) } else { Duration::from_secs(20) }),
            agents,
            hosts: a.hosts.unwrap_or(agents.min(MAX_DEFAULT_HOSTS)).clamp(1, agents),
            objects: a.objects.unwrap_or(if q { 500 } else { 10_000 }),
            payload: a.payload,
            concurrency: a.concurrency.unwrap_or(if q { 32 } else { 256 }).max(1),
            fabric_rate: a.fabric_rate.unwrap_or(if q { 5.0 } else { 10.0 }).max(0.1),
            flush_interval: a.flush_interval,
            report_batch: a.report_batch.max(1),
        }
    }
}

pub const SCENARIOS: [&str; 6] = ["limits", "attach", "write", "fanout", "reconnect", "etcd"];

/// The scenarios to run, in a fixed order (limits first, so the others can be set against it).
pub fn selected(a: &Args) -> anyhow::Result<Vec<&'static str>> {
    let mut want = Vec::new();
    for s in &a.scenario {
        let s = s.trim();
        if s == "all" {
            want.extend(SCENARIOS);
            continue;
        }
        let Some(found) = SCENARIOS.iter().find(|n| **n == s) else {
            anyhow::bail!("unknown scenario {s:?}; choose from {} or all", SCENARIOS.join(", "));
        };
        want.push(*found);
    }
    Ok(SCENARIOS.into_iter().filter(|s| want.contains(s)).collect())
}
