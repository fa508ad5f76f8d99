//! Process-wide metrics of the store, the fan-out and the attach round trip, rendered in the
//! Prometheus text format by the HTTP `/metrics` endpoint.

use std::{
    fmt::Write,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
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

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
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

pub static ATTACH: Histogram = Histogram::new(LATENCY_BOUNDS);
pub static COMMIT: Histogram = Histogram::new(LATENCY_BOUNDS);
pub static BATCHES: AtomicU64 = AtomicU64::new(0);
pub static BATCH_REQUESTS: AtomicU64 = AtomicU64::new(0);
pub static ATTACH_FAILURES: AtomicU64 = AtomicU64::new(0);
pub static HANDSHAKE_FAILURES: AtomicU64 = AtomicU64::new(0);
pub static LEASES_LAPSED: AtomicU64 = AtomicU64::new(0);

pub fn record_batch(size: usize, took: Duration) {
    BATCHES.fetch_add(1, Ordering::Relaxed);
    BATCH_REQUESTS.fetch_add(size as u64, Ordering::Relaxed);
    COMMIT.observe(took);
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

/// Live gauges the caller reads from the running process.
pub struct Gauges {
    pub streams: usize,
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
    line("xpu_attach_failures_total", "AttachNetdev calls that failed.", "counter", load(&ATTACH_FAILURES));
    line("xpu_tls_handshake_failures_total", "Refused TLS handshakes.", "counter", load(&HANDSHAKE_FAILURES));
    line("xpu_lease_expirations_total", "DPU leases that lapsed.", "counter", load(&LEASES_LAPSED));
    line("xpu_streams_active", "Watch streams open on this process.", "gauge", g.streams.to_string());
    line(
        "xpu_streams_lagged_total",
        "Streams cut off because they fell behind.",
        "counter",
        g.streams_lagged.to_string(),
    );
    line("xpu_revision", "Last revision dispatched to streams.", "gauge", g.revision.to_string());
    ATTACH.render(&mut out, "xpu_attach_duration_seconds", "AttachNetdev round trip as the host sees it.");
    COMMIT.render(&mut out, "xpu_store_commit_duration_seconds", "Duration of one group commit.");
    out
}
