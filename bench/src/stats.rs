//! Latency histograms (HDR, microsecond resolution, three significant digits) and rates.

use std::{sync::Mutex, time::Duration};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Longest latency recorded exactly (one hour); longer ones are clamped.
const MAX_MICROS: u64 = 3_600_000_000;

pub struct Latency {
    hist: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
}

impl Latency {
    pub fn new() -> Latency {
        let hist = Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("constant histogram bounds are valid");
        Latency { hist }
    }

    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(MAX_MICROS).clamp(1, MAX_MICROS);
        self.hist.saturating_record(us);
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    pub fn summary(&self) -> Option<Summary> {
        if self.hist.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Summary {
            count: self.hist.len(),
            p50_ms: ms(self.hist.value_at_quantile(0.50)),
            p90_ms: ms(self.hist.value_at_quantile(0.90)),
            p99_ms: ms(self.hist.value_at_quantile(0.99)),
            p999_ms: ms(self.hist.value_at_quantile(0.999)),
            max_ms: ms(self.hist.max()),
            mean_ms: self.hist.mean() / 1000.0,
        })
    }
}

/// A histogram many tasks record into.
#[derive(Default)]
pub struct SharedLatency(Mutex<Latency>);

impl SharedLatency {
    pub fn record(&self, d: Duration) {
        if let Ok(mut h) = self.0.lock() {
            h.record(d);
        }
    }

    pub fn summary(&self) -> Option<Summary> {
        self.0.lock().ok().and_then(|h| h.summary())
    }

    pub fn count(&self) -> u64 {
        self.0.lock().map(|h| h.count()).unwrap_or(0)
    }
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

pub fn per_sec(count: u64, over: Duration) -> f64 {
    let s = over.as_secs_f64();
    if s <= 0.0 { 0.0 } else { count as f64 / s }
}
