//! Process-wide metrics of the store, the fan-out and the attach round trip, rendered in the
//! Prometheus text format by the HTTP `/metrics` endpoint.

use std::{
    collections::{HashMap, VecDeque},
    fmt::Write,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};

use crate::{
    hub::{StreamClass, StreamInfo},
    model::{
        Kind,
        event::{ChangeKind, Event},
    },
};

/// A cumulative histogram with fixed bucket bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    buckets: [AtomicU64; 16],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    const fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: [const { AtomicU64::new(0) }; 16],
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Observes a plain number (sizes); the sum is kept in millionths like durations.
    fn observe_value(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add((v * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Cumulative counts per bucket, the last one being +Inf.
    fn snapshot(&self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.bounds.len() + 1);
        let mut cumulative = 0;
        for i in 0..self.bounds.len() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            out.push(cumulative);
        }
        out.push(self.count.load(Ordering::Relaxed));
        out
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {:.6}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

const LATENCY_BOUNDS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

const SIZE_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0];

pub static ATTACH: Histogram = Histogram::new(LATENCY_BOUNDS);
pub static FIRST_STATUS: Histogram = Histogram::new(LATENCY_BOUNDS);
pub static BATCH_SIZE: Histogram = Histogram::new(SIZE_BOUNDS);
pub static CHANGES_SPEC: AtomicU64 = AtomicU64::new(0);
pub static CHANGES_STATUS: AtomicU64 = AtomicU64::new(0);
pub static CHANGES_DELETED: AtomicU64 = AtomicU64::new(0);
pub static COMMIT: Histogram = Histogram::new(LATENCY_BOUNDS);
pub static BATCHES: AtomicU64 = AtomicU64::new(0);
pub static BATCH_REQUESTS: AtomicU64 = AtomicU64::new(0);
pub static BATCHES_AHEAD: AtomicU64 = AtomicU64::new(0);
pub static BATCHES_REDECIDED: AtomicU64 = AtomicU64::new(0);
pub static BATCHES_WARM: AtomicU64 = AtomicU64::new(0);
pub static RENEWAL_BATCHES: AtomicU64 = AtomicU64::new(0);
pub static RENEWALS: AtomicU64 = AtomicU64::new(0);
pub static RENEWAL: Histogram = Histogram::new(LATENCY_BOUNDS);
pub static ATTACH_FAILURES: AtomicU64 = AtomicU64::new(0);
pub static HANDSHAKE_FAILURES: AtomicU64 = AtomicU64::new(0);
pub static LEASES_LAPSED: AtomicU64 = AtomicU64::new(0);

pub fn record_batch(size: usize, took: Duration) {
    BATCHES.fetch_add(1, Ordering::Relaxed);
    BATCH_SIZE.observe_value(size as f64);
    BATCH_REQUESTS.fetch_add(size as u64, Ordering::Relaxed);
    COMMIT.observe(took);
}

/// A batch decided while the one before it committed: `true` when what it read held, `false`
/// when it had to be decided again.
pub fn record_decided_ahead(held: bool) {
    if held { &BATCHES_AHEAD } else { &BATCHES_REDECIDED }.fetch_add(1, Ordering::Relaxed);
}

/// A batch that started from what the writer's last commit left (its slots not reloaded).
pub fn record_warm_batch() {
    BATCHES_WARM.fetch_add(1, Ordering::Relaxed);
}

pub fn record_renewals(size: usize, took: Duration) {
    RENEWAL_BATCHES.fetch_add(1, Ordering::Relaxed);
    RENEWALS.fetch_add(size as u64, Ordering::Relaxed);
    RENEWAL.observe(took);
}

pub fn record_attach(took: Duration, ok: bool) {
    ATTACH.observe(took);
    if !ok {
        ATTACH_FAILURES.fetch_add(1, Ordering::Relaxed);
    }
}

pub fn record_handshake_failure() {
    HANDSHAKE_FAILURES.fetch_add(1, Ordering::Relaxed);
}

/// Netdev spec changes waiting for their DPU's first status at that generation.
/// (namespace, name) → (generation, when its spec change was dispatched).
type Awaiting = HashMap<(String, String), (i64, Instant)>;
static AWAITING_STATUS: Mutex<Option<Awaiting>> = Mutex::new(None);
const AWAITING_MAX: usize = 200_000;

/// Counts a change the fan-out delivered and times a Netdev from its spec change to the first
/// status its DPU reports for that generation.
pub fn observe_event(ev: &Event) {
    match ev.change {
        ChangeKind::Spec => CHANGES_SPEC.fetch_add(1, Ordering::Relaxed),
        ChangeKind::Status => CHANGES_STATUS.fetch_add(1, Ordering::Relaxed),
        ChangeKind::Deleted => CHANGES_DELETED.fetch_add(1, Ordering::Relaxed),
    };
    if ev.key.kind != Kind::Netdev {
        return;
    }
    let mut guard = AWAITING_STATUS.lock().unwrap_or_else(|p| p.into_inner());
    let awaiting = guard.get_or_insert_with(HashMap::new);
    let key = (ev.key.namespace.clone(), ev.key.name.clone());
    match ev.change {
        ChangeKind::Spec => {
            if awaiting.len() < AWAITING_MAX || awaiting.contains_key(&key) {
                awaiting.insert(key, (ev.generation, Instant::now()));
            }
        }
        ChangeKind::Status if ev.author.starts_with("dpu/") && ev.body.is_some() => {
            if let Some((generation, since)) = awaiting.get(&key).copied()
                && ev.observed_generation >= generation
            {
                FIRST_STATUS.observe(since.elapsed());
                awaiting.remove(&key);
            }
        }
        ChangeKind::Deleted => {
            awaiting.remove(&key);
        }
        ChangeKind::Status => {}
    }
}

/// One sample of the sync SLIs (cumulative counters; rates come from differences).
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: DateTime<Utc>,
    /// Cumulative attach counts per latency bucket, +Inf last.
    attach: Vec<u64>,
    writes: u64,
    statuses: u64,
    pub streams: usize,
}

/// A point of the SLI series: rates since the previous sample, attach quantiles over the
/// trailing window.
#[derive(Clone, Debug, PartialEq)]
pub struct SliPoint {
    pub at: DateTime<Utc>,
    pub attach_p50: Option<f64>,
    pub attach_p99: Option<f64>,
    pub attaches: u64,
    pub writes_per_second: f64,
    pub statuses_per_second: f64,
    pub streams: usize,
}

/// Samples kept: ten minutes at the default interval.
pub const SAMPLES_KEPT: usize = 120;
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Samples the attach quantiles look back over (one minute).
const QUANTILE_WINDOW: usize = 12;

static SAMPLES: Mutex<VecDeque<Sample>> = Mutex::new(VecDeque::new());

pub fn take_sample(streams: usize) {
    let sample = Sample {
        at: Utc::now(),
        attach: ATTACH.snapshot(),
        writes: CHANGES_SPEC.load(Ordering::Relaxed) + CHANGES_DELETED.load(Ordering::Relaxed),
        statuses: CHANGES_STATUS.load(Ordering::Relaxed),
        streams,
    };
    let mut s = SAMPLES.lock().unwrap_or_else(|p| p.into_inner());
    if s.len() >= SAMPLES_KEPT {
        s.pop_front();
    }
    s.push_back(sample);
}

/// The `q` quantile (seconds) of the observations between two cumulative bucket snapshots,
/// interpolated linearly inside the bucket that holds it; `None` without observations.
fn quantile(bounds: &[f64], before: &[u64], after: &[u64], q: f64) -> Option<f64> {
    let total = after.last()? - before.last()?;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut lower_bound = 0.0;
    let mut lower_count = 0.0;
    for (i, bound) in bounds.iter().enumerate() {
        let count = (after[i] - before[i]) as f64;
        if count >= rank {
            let in_bucket = count - lower_count;
            let frac = if in_bucket > 0.0 { (rank - lower_count) / in_bucket } else { 1.0 };
            return Some(lower_bound + (bound - lower_bound) * frac);
        }
        lower_bound = *bound;
        lower_count = count;
    }
    // Beyond the last bound: report the last bound (a lower bound on the truth).
    Some(lower_bound)
}

/// The SLI series, oldest first.
pub fn sli_series() -> Vec<SliPoint> {
    let s = SAMPLES.lock().unwrap_or_else(|p| p.into_inner());
    let samples: Vec<&Sample> = s.iter().collect();
    let mut out = Vec::with_capacity(samples.len());
    for (i, cur) in samples.iter().enumerate() {
        let prev = if i > 0 { samples[i - 1] } else { cur };
        let window_start = samples[i.saturating_sub(QUANTILE_WINDOW)];
        let dt = (cur.at - prev.at).num_milliseconds() as f64 / 1000.0;
        let rate = |a: u64, b: u64| if dt > 0.0 { a.saturating_sub(b) as f64 / dt } else { 0.0 };
        let attaches = cur.attach.last().copied().unwrap_or(0) - window_start.attach.last().copied().unwrap_or(0);
        out.push(SliPoint {
            at: cur.at,
            attach_p50: quantile(LATENCY_BOUNDS, &window_start.attach, &cur.attach, 0.5),
            attach_p99: quantile(LATENCY_BOUNDS, &window_start.attach, &cur.attach, 0.99),
            attaches,
            writes_per_second: rate(cur.writes, prev.writes),
            statuses_per_second: rate(cur.statuses, prev.statuses),
            streams: cur.streams,
        });
    }
    out
}

/// Write and status rates over the last minute of samples.
pub fn recent_rates() -> (f64, f64) {
    let s = SAMPLES.lock().unwrap_or_else(|p| p.into_inner());
    let (Some(last), Some(first)) = (s.back(), s.get(s.len().saturating_sub(QUANTILE_WINDOW + 1))) else {
        return (0.0, 0.0);
    };
    let dt = (last.at - first.at).num_milliseconds() as f64 / 1000.0;
    if dt <= 0.0 {
        return (0.0, 0.0);
    }
    (last.writes.saturating_sub(first.writes) as f64 / dt, last.statuses.saturating_sub(first.statuses) as f64 / dt)
}

/// Live values the caller reads from the running process.
pub struct Gauges {
    pub streams: Vec<StreamInfo>,
    pub streams_lagged: u64,
    pub revision: i64,
}

pub fn render(g: &Gauges) -> String {
    let mut out = String::new();
    let mut line = |name: &str, help: &str, kind: &str, value: String| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
    line("xpu_store_batches_total", "Write transactions committed.", "counter", load(&BATCHES));
    line("xpu_store_batch_requests_total", "Write requests handled in batches.", "counter", load(&BATCH_REQUESTS));
    line(
        "xpu_store_batches_decided_ahead_total",
        "Write transactions decided while the one before them committed.",
        "counter",
        load(&BATCHES_AHEAD),
    );
    line(
        "xpu_store_batches_redecided_total",
        "Write transactions decided ahead whose reads did not hold (the one before failed, or another replica wrote): decided again.",
        "counter",
        load(&BATCHES_REDECIDED),
    );
    line(
        "xpu_store_batches_warm_total",
        "Write transactions that started from what the writer's own last commit left, without reloading those rows.",
        "counter",
        load(&BATCHES_WARM),
    );
    line("xpu_lease_renewal_batches_total", "Lease renewal statements run.", "counter", load(&RENEWAL_BATCHES));
    line("xpu_lease_renewals_total", "Heartbeats handled by the lease renewer.", "counter", load(&RENEWALS));
    line("xpu_attach_failures_total", "AttachNetdev calls that failed.", "counter", load(&ATTACH_FAILURES));
    line("xpu_tls_handshake_failures_total", "Refused TLS handshakes.", "counter", load(&HANDSHAKE_FAILURES));
    line("xpu_lease_expirations_total", "DPU leases that lapsed.", "counter", load(&LEASES_LAPSED));
    line(
        "xpu_streams_lagged_total",
        "Streams cut off because they fell behind.",
        "counter",
        g.streams_lagged.to_string(),
    );
    line("xpu_revision", "Last revision dispatched to streams.", "gauge", g.revision.to_string());
    let _ = writeln!(
        out,
        "# HELP xpu_changes_total Changes delivered by the fan-out, by type (writes: spec and deleted).\n# TYPE xpu_changes_total counter"
    );
    for (change, v) in [("spec", &CHANGES_SPEC), ("status", &CHANGES_STATUS), ("deleted", &CHANGES_DELETED)] {
        let _ = writeln!(out, "xpu_changes_total{{change=\"{change}\"}} {}", v.load(Ordering::Relaxed));
    }
    let _ = writeln!(
        out,
        "# HELP xpu_streams_active Watch streams open on this process, by client class.\n# TYPE xpu_streams_active gauge"
    );
    for class in StreamClass::ALL {
        let n = g.streams.iter().filter(|s| s.class == class).count();
        let _ = writeln!(out, "xpu_streams_active{{class=\"{}\"}} {n}", class.as_str());
    }
    let _ = writeln!(
        out,
        "# HELP xpu_stream_revision_lag Largest gap between the head and a stream's last delivered revision, by client class.\n# TYPE xpu_stream_revision_lag gauge"
    );
    for class in StreamClass::ALL {
        let lag = g.streams.iter().filter(|s| s.class == class).map(|s| (g.revision - s.delivered).max(0)).max();
        let _ = writeln!(out, "xpu_stream_revision_lag{{class=\"{}\"}} {}", class.as_str(), lag.unwrap_or(0));
    }
    ATTACH.render(&mut out, "xpu_attach_duration_seconds", "AttachNetdev round trip as the host sees it.");
    FIRST_STATUS.render(
        &mut out,
        "xpu_first_status_seconds",
        "From a Netdev spec change to the first status its DPU reports for that generation.",
    );
    COMMIT.render(&mut out, "xpu_store_commit_duration_seconds", "Duration of one group commit.");
    RENEWAL.render(&mut out, "xpu_lease_renewal_duration_seconds", "Duration of one lease renewal statement.");
    BATCH_SIZE.render(&mut out, "xpu_store_batch_size", "Write requests per group commit.");
    process::render(&mut out);
    out
}

/// `process_*` metrics from /proc (Linux); nothing elsewhere.
mod process {
    use std::fmt::Write;

    pub fn render(out: &mut String) {
        let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return };
        // Fields after the parenthesised command name, which may itself contain spaces.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { return };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // Field numbers per proc(5), minus the 3 before `rest` (pid, comm, and 1-based).
        let ticks = 100.0; // USER_HZ on every Linux ABI we build for.
        let cpu = (num(11) + num(12)) / ticks;
        let start_ticks = num(19);
        let vsize = num(20);
        let rss_pages = num(21);
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<f64>().ok())))
            .unwrap_or(0.0);
        let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0);
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse::<f64>().ok()))
            })
            .unwrap_or(0.0);
        let mut line = |name: &str, help: &str, kind: &str, value: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        line("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", "counter", cpu);
        line("process_resident_memory_bytes", "Resident memory size in bytes.", "gauge", rss_pages * 4096.0);
        line("process_virtual_memory_bytes", "Virtual memory size in bytes.", "gauge", vsize);
        line("process_open_fds", "Number of open file descriptors.", "gauge", fds as f64);
        line("process_max_fds", "Maximum number of open file descriptors.", "gauge", max_fds);
        line(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            "gauge",
            boot + start_ticks / ticks,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let bounds = [1.0, 2.0, 4.0];
        // 10 observations in (1, 2], none elsewhere.
        let before = [0, 0, 0, 0];
        let after = [0, 10, 10, 10];
        assert_eq!(quantile(&bounds, &before, &after, 0.5), Some(1.5));
        assert_eq!(quantile(&bounds, &before, &after, 1.0), Some(2.0));
        assert_eq!(quantile(&bounds, &after, &after, 0.5), None);
        // Everything beyond the last bound.
        assert_eq!(quantile(&bounds, &before, &[0, 0, 0, 5], 0.5), Some(4.0));
    }
}
