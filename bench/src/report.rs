//! What a scenario reports, printed as a table or JSON, and the summary that sets every figure
//! against its limit, against etcd and against the targets of issue 7.

use std::fmt::Write as _;

use serde::Serialize;

use crate::{
    cpu::{CpuUse, Memory},
    stats::Summary,
};

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Stable id the summary looks rows up by, e.g. `write.spec`.
    pub id: String,
    pub metric: String,
    pub count: u64,
    /// Per second, where the row is a rate.
    pub rate: Option<f64>,
    pub latency: Option<Summary>,
    pub note: String,
}

impl Row {
    pub fn new(id: &str, metric: impl Into<String>) -> Row {
        Row { id: id.into(), metric: metric.into(), count: 0, rate: None, latency: None, note: String::new() }
    }

    pub fn count(mut self, n: u64) -> Row {
        self.count = n;
        self
    }

    pub fn rate(mut self, r: f64) -> Row {
        self.rate = Some(r);
        self
    }

    pub fn latency(mut self, s: Option<Summary>) -> Row {
        if let Some(s) = s {
            if self.count == 0 {
                self.count = s.count;
            }
            self.latency = Some(s);
        }
        self
    }

    pub fn note(mut self, n: impl Into<String>) -> Row {
        self.note = n.into();
        self
    }
}

/// Resources of one measured phase.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseUse {
    pub phase: String,
    pub cpu: CpuUse,
    /// From the broker's /metrics: commits, requests per commit, mean commit time, and the share
    /// of the phase the single writer spent committing.
    pub commits: Option<u64>,
    pub requests_per_commit: Option<f64>,
    pub mean_commit_ms: Option<f64>,
    pub writer_busy_pct: Option<f64>,
    /// Postgres work for the broker's database during the phase (pg_stat_database).
    pub pg: Option<PgUse>,
    pub profile: Option<crate::perf::Profile>,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PgUse {
    pub transactions: f64,
    /// Rows read by scans (tup_returned) and fetched by index (tup_fetched).
    pub rows_returned: f64,
    pub rows_fetched: f64,
    pub rows_written: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ScenarioReport {
    pub name: String,
    pub setup: String,
    pub rows: Vec<Row>,
    pub phases: Vec<PhaseUse>,
    /// The process under test (the broker; etcd for etcd rows is in `notes`).
    pub server_memory: Option<Memory>,
    pub bench_memory: Option<Memory>,
    pub notes: Vec<String>,
    pub error: Option<String>,
    pub seconds: f64,
}

impl ScenarioReport {
    pub fn new(name: &str) -> ScenarioReport {
        ScenarioReport { name: name.into(), ..Default::default() }
    }

    pub fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    pub fn find(&self, id: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.id == id)
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"))
}

pub fn table(r: &ScenarioReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n== {} ({})", r.name, r.setup);
    if let Some(e) = &r.error {
        let _ = writeln!(out, "FAILED: {e}");
    }
    if !r.rows.is_empty() {
        let _ = writeln!(
            out,
            "{:<52} {:>9} {:>11} {:>8} {:>8} {:>8} {:>8} {:>8}  note",
            "metric", "count", "rate/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        );
        for row in &r.rows {
            let l = row.latency;
            let _ = writeln!(
                out,
                "{:<52} {:>9} {:>11} {:>8} {:>8} {:>8} {:>8} {:>8}  {}",
                row.metric,
                row.count,
                opt(row.rate, 1),
                opt(l.map(|l| l.p50_ms), 2),
                opt(l.map(|l| l.p90_ms), 2),
                opt(l.map(|l| l.p99_ms), 2),
                opt(l.map(|l| l.p999_ms), 2),
                opt(l.map(|l| l.max_ms), 1),
                row.note
            );
        }
    }
    for p in &r.phases {
        let mut line = format!(
            "  cpu during {:<22} server {:>4.0}%  postgres {:>4.0}%  bench {:>4.0}%  other {:>4.0}%",
            p.phase, p.cpu.server_pct, p.cpu.postgres_pct, p.cpu.bench_pct, p.cpu.other_pct
        );
        if let (Some(c), Some(b), Some(m), Some(w)) =
            (p.commits, p.requests_per_commit, p.mean_commit_ms, p.writer_busy_pct)
        {
            let _ = write!(line, "  | {c} commits, {b:.1} req/commit, {m:.2} ms/commit, writer busy {w:.0}%");
        }
        let _ = writeln!(out, "{line}");
        if let Some(pg) = p.pg {
            let _ = writeln!(
                out,
                "    postgres: {:.0} transactions, {:.0} rows scanned, {:.0} rows fetched by index, {:.0} rows written",
                pg.transactions, pg.rows_returned, pg.rows_fetched, pg.rows_written
            );
        }
        if let Some(prof) = &p.profile {
            let cats: Vec<String> = prof.categories.iter().map(|(c, v)| format!("{c} {v:.1}%")).collect();
            let _ = writeln!(out, "    server profile ({} samples): {}", prof.samples, cats.join(", "));
            for (s, v) in prof.top_symbols.iter().take(8) {
                let _ = writeln!(out, "      {v:>5.1}%  {s}");
            }
        }
    }
    if let Some(m) = r.server_memory {
        let _ = writeln!(out, "  server peak RSS (VmHWM) {}, RSS at end {}", mib(m.peak_rss_kib), mib(m.rss_kib));
    }
    if let Some(m) = r.bench_memory {
        let _ = writeln!(out, "  bench peak RSS {}", mib(m.peak_rss_kib));
    }
    for n in &r.notes {
        let _ = writeln!(out, "  note: {n}");
    }
    let _ = writeln!(out, "  ({:.1} s)", r.seconds);
    out
}

#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub what: String,
    pub value: f64,
    pub against: String,
    pub limit: f64,
    pub ratio: f64,
    pub target: String,
}

fn rate_of(reports: &[ScenarioReport], id: &str) -> Option<f64> {
    reports.iter().find_map(|r| r.find(id)).and_then(|row| row.rate)
}

fn p99_of(reports: &[ScenarioReport], id: &str) -> Option<f64> {
    reports.iter().find_map(|r| r.find(id)).and_then(|row| row.latency).map(|l| l.p99_ms)
}

/// Every figure that has a limit or a peer measured in this run, as a ratio.
pub fn comparisons(reports: &[ScenarioReport]) -> Vec<Comparison> {
    let mut out = Vec::new();
    let mut cmp = |what: &str, v: Option<f64>, against: &str, lim: Option<f64>, target: &str| {
        if let (Some(value), Some(limit)) = (v, lim)
            && limit > 0.0
        {
            out.push(Comparison {
                what: what.into(),
                value,
                against: against.into(),
                limit,
                ratio: value / limit,
                target: target.into(),
            });
        }
    };
    let pg = rate_of(reports, "limits.pg_upsert_best");
    let unary = rate_of(reports, "limits.grpc_unary");
    let stream = rate_of(reports, "limits.grpc_stream");
    cmp("write: status writes/s", rate_of(reports, "write.status"), "raw Postgres upsert rows/s", pg, ">= 0.5");
    cmp("write: spec writes/s", rate_of(reports, "write.spec"), "raw Postgres upsert rows/s", pg, "-");
    cmp("write: spec writes/s", rate_of(reports, "write.spec"), "raw mTLS gRPC unary msgs/s", unary, "-");
    cmp("write: status calls/s", rate_of(reports, "write.status_calls"), "raw mTLS gRPC unary msgs/s", unary, "-");
    cmp("attach: attaches/s", rate_of(reports, "attach.rtt"), "raw mTLS gRPC unary msgs/s", unary, "-");
    cmp(
        "fanout: deliveries/s (offered)",
        rate_of(reports, "fanout.fabric"),
        "raw mTLS gRPC stream msgs/s",
        stream,
        "-",
    );
    cmp(
        "etcd: spec writes/s",
        rate_of(reports, "etcd.broker.write"),
        "etcd puts/s",
        rate_of(reports, "etcd.etcd.write"),
        ">= 2",
    );
    cmp(
        "etcd: fabric p99 delivery ms",
        p99_of(reports, "etcd.broker.fabric"),
        "etcd p99 ms",
        p99_of(reports, "etcd.etcd.fabric"),
        "<= 1",
    );
    cmp(
        "etcd: per-DPU p99 ms",
        p99_of(reports, "etcd.broker.netdev"),
        "etcd p99 ms",
        p99_of(reports, "etcd.etcd.netdev"),
        "<= 1",
    );
    out
}

pub fn comparisons_table(c: &[Comparison]) -> String {
    let mut out = String::new();
    if c.is_empty() {
        return out;
    }
    let _ = writeln!(out, "\n== ratios (this run)");
    let _ =
        writeln!(out, "{:<34} {:>12}   {:<30} {:>12} {:>8}  target", "figure", "value", "against", "limit", "ratio");
    for x in c {
        let _ = writeln!(
            out,
            "{:<34} {:>12.1}   {:<30} {:>12.1} {:>8.3}  {}",
            x.what, x.value, x.against, x.limit, x.ratio, x.target
        );
    }
    out
}
