//! Optional sampling profile of the process under test during each phase (`--perf`): `perf
//! record` on its pid, then the samples bucketed by what the code is (TLS, HTTP/2 and gRPC,
//! protobuf, JSON, the Postgres client, the runtime, the broker's own code, kernel, libc).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Stdio,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::process::{Child, Command};

static DIR: OnceLock<PathBuf> = OnceLock::new();
static NEXT: AtomicU64 = AtomicU64::new(0);

pub fn enable(dir: PathBuf) {
    let _ = DIR.set(dir);
}

pub struct Recording {
    child: Child,
    out: PathBuf,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Profile {
    /// Share of the process's samples, by kind of code, largest first.
    pub categories: Vec<(String, f64)>,
    pub top_symbols: Vec<(String, f64)>,
    pub samples: u64,
}

pub fn start(pid: u32) -> Option<Recording> {
    let dir = DIR.get()?;
    let out = dir.join(format!("perf-{pid}-{}.data", NEXT.fetch_add(1, Ordering::Relaxed)));
    let child = Command::new("perf")
        .args(["record", "-F", "499", "-q", "-p", &pid.to_string(), "-o"])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    Some(Recording { child, out })
}

fn category(dso: &str, kernel: bool, sym: &str) -> &'static str {
    let has = |s: &str| sym.contains(s);
    if kernel {
        "kernel (syscalls, TCP, scheduler)"
    } else if dso.starts_with("libc") || dso.starts_with("ld-linux") {
        "libc (memcpy, malloc, ...)"
    } else if has("ring_core") || has("ring::") || has("rustls") || has("tokio_rustls") || has("webpki") {
        "TLS (rustls + ring)"
    } else if has("h2::") || has("hyper") || has("tonic::") || has("tower") || has("http_body") || has("http::") {
        "HTTP/2 + gRPC (h2, hyper, tonic)"
    } else if has("prost") {
        "protobuf (prost)"
    } else if has("serde") || has("pbjson") {
        "JSON (serde_json, pbjson)"
    } else if has("sqlx") {
        "Postgres client (sqlx)"
    } else if has("tokio::") || has("mio::") || has("parking_lot") {
        "async runtime (tokio)"
    } else if has("xpu_broker::") {
        "broker code (xpu_broker)"
    } else if has("tracing") {
        "logging (tracing)"
    } else if has("alloc::") || has("core::") || has("std::") || has("hashbrown") || has("memchr") {
        "std (collections, alloc, fmt)"
    } else {
        "other"
    }
}

impl Recording {
    pub async fn finish(mut self) -> Option<Profile> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()?).ok()?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
            return None;
        }
        let out = Command::new("perf")
            .args(["report", "--stdio", "--no-children", "--sort", "dso,sym", "--percent-limit", "0.05", "-i"])
            .arg(&self.out)
            .stderr(Stdio::null())
            .output()
            .await
            .ok()?;
        let _ = std::fs::remove_file(&self.out);
        let text = String::from_utf8_lossy(&out.stdout);
        let mut cats: BTreeMap<&'static str, f64> = BTreeMap::new();
        let mut top = Vec::new();
        let mut samples = 0;
        for line in text.lines() {
            let t = line.trim();
            if let Some(rest) = t.strip_prefix("# Samples:") {
                samples = rest.split_whitespace().next().and_then(parse_count).unwrap_or(0);
                continue;
            }
            if t.starts_with('#') || t.is_empty() {
                continue;
            }
            let mut parts = t.split_whitespace();
            let Some(pct) = parts.next().and_then(|p| p.strip_suffix('%')).and_then(|p| p.parse::<f64>().ok()) else {
                continue;
            };
            let dso = parts.next().unwrap_or_default().to_string();
            let marker = parts.next().unwrap_or_default();
            let sym: String = parts.collect::<Vec<_>>().join(" ");
            *cats.entry(category(&dso, marker == "[k]", &sym)).or_default() += pct;
            if top.len() < 15 {
                let short: String = sym.chars().take(110).collect();
                top.push((short, pct));
            }
        }
        let mut categories: Vec<(String, f64)> = cats.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        categories.sort_by(|a, b| b.1.total_cmp(&a.1));
        Some(Profile { categories, top_symbols: top, samples })
    }
}

fn parse_count(s: &str) -> Option<u64> {
    let (num, mult) = match s.chars().last()? {
        'K' => (&s[..s.len() - 1], 1_000.0),
        'M' => (&s[..s.len() - 1], 1_000_000.0),
        _ => (s, 1.0),
    };
    num.parse::<f64>().ok().map(|n| (n * mult) as u64)
}
