//! Soak: a steady mixed load (spec writes at a fixed rate, attach/detach cycles with real
//! agents, watchers) against the real broker; memory and file descriptors must stay flat and
//! latency must not creep up.
//!
//! Short form (CI): 60 s. Long form: `XPU_FAULT_LONG=1` (one hour).
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use sqlx::PgPool;
use xpu_fault::{report, scale};
use xpu_proto::broker::v1 as pb;
use xpu_testkit::{Pki, apply, meta};

const SCENARIO: &str = "soak";
const WRITES_PER_SECOND: u64 = 50;
const SAMPLE: Duration = Duration::from_secs(5);

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

#[sqlx::test(migrations = false)]
async fn memory_descriptors_and_latency_stay_flat(pool: PgPool) {
    let duration = Duration::from_secs(
        std::env::var("XPU_SOAK_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(scale(60, 3600)),
    );
    let work = tempfile::tempdir().unwrap();
    let pki = Pki::new(&[]);
    let Seeded { broker, url, mut admin } = seeded_broker(&pool, &pki, work.path(), &[]).await;
    let dpus = [Dpu::start(&pki, &url, "bf3-soak0", &[]).await, Dpu::start(&pki, &url, "bf3-soak1", &[]).await];
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();

    let mut replicas = Vec::new();
    for _ in 0..4 {
        replicas.push(spawn_replica(pki.channel(broker.grpc, "admin/soak").await, Arc::clone(&stop)));
    }
    // Spec writes at a fixed rate over a bounded set of names (updates, not growth).
    let writer = {
        let (stop, errors, latencies) = (Arc::clone(&stop), Arc::clone(&errors), Arc::clone(&latencies));
        let mut admin = admin.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / WRITES_PER_SECOND));
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let t = Instant::now();
                let r = admin
                    .apply(apply(pb::resource::Kind::LogicalBridge(pb::LogicalBridge {
                        metadata: meta(&format!("lb-soak{}", i % 500), ""),
                        // Store-only objects: selected by no DPU (the agents' load is the churn).
                        spec: Some(pb::LogicalBridgeSpec {
                            vlan_id: 100 + i % 3000,
                            dpu_selector: Some(pb::LabelSelector {
                                match_labels: [("soak".to_string(), "none".to_string())].into(),
                            }),
                            ..Default::default()
                        }),
                        status: None,
                    })))
                    .await;
                match r {
                    Ok(_) => latencies.lock().unwrap().push(t.elapsed()),
                    Err(e) => {
                        println!("soak: write failed: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
        })
    };
    // Pods come and go: attach, and detach the one attached five cycles ago.
    let cycles = Arc::new(AtomicU64::new(0));
    let churn = {
        let (stop, errors, cycles) = (Arc::clone(&stop), Arc::clone(&errors), Arc::clone(&cycles));
        let mut host = host(&pki, &broker, "node-soak").await;
        tokio::spawn(async move {
            let mut live: VecDeque<(String, u32)> = VecDeque::new();
            let mut vf = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let serial = if vf.is_multiple_of(2) { "bf3-soak0" } else { "bf3-soak1" };
                match xpu_testkit::attach(&mut host, serial, vf, "node-soak").await {
                    Ok(_) => live.push_back((serial.to_string(), vf)),
                    Err(e) => {
                        println!("soak: attach {serial} vf{vf} failed: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                vf += 1;
                if live.len() > 5
                    && let Some((serial, old)) = live.pop_front()
                {
                    let name = format!("{serial}-pf0-vf{old}");
                    if host.detach_netdev(pb::DetachNetdevRequest { namespace: "pods".into(), name }).await.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                cycles.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // Samples: resident memory, descriptors, write latency of the interval.
    let started = Instant::now();
    let mut samples: Vec<(u64, usize, Duration)> = Vec::new();
    while started.elapsed() < duration {
        tokio::time::sleep(SAMPLE).await;
        let (rss, fds) = broker.resources().expect("the broker runs");
        let mut lat = std::mem::take(&mut *latencies.lock().unwrap());
        lat.sort();
        samples.push((rss, fds, percentile(&lat, 99)));
        println!(
            "soak t={:>5}s rss={:.1}MiB fds={fds} write_p99={:?} cycles={}",
            started.elapsed().as_secs(),
            rss as f64 / 1048576.0,
            percentile(&lat, 99),
            cycles.load(Ordering::Relaxed)
        );
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    churn.await.unwrap();

    // The watchers still agree with the store.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let store = store_state(&mut admin).await;
    for r in replicas {
        replica_matches(&r.await.unwrap(), &store).await.unwrap();
    }
    assert_eq!(errors.load(Ordering::Relaxed), 0, "no call failed under steady load");

    // Flat after warm-up (the first fifth): memory within 25% (+16 MiB), descriptors within 16,
    // and the write p99 not creeping up (last third against the first third after warm-up).
    let warm = &samples[samples.len() / 5..];
    let rss_start = warm.first().unwrap().0;
    let rss_max = warm.iter().map(|s| s.0).max().unwrap();
    let fds_min = warm.iter().map(|s| s.1).min().unwrap();
    let fds_max = warm.iter().map(|s| s.1).max().unwrap();
    assert!(rss_max <= rss_start + rss_start / 4 + 16 * 1048576, "memory grew: {rss_start} → {rss_max} bytes");
    assert!(fds_max - fds_min <= 16, "descriptors grew: {fds_min} → {fds_max}");
    let third = (warm.len() / 3).max(1);
    let early = warm[..third].iter().map(|s| s.2).max().unwrap();
    let late = warm[warm.len() - third..].iter().map(|s| s.2).max().unwrap();
    assert!(late <= early * 4 + Duration::from_millis(100), "write p99 crept up: {early:?} → {late:?}");
    let ports: usize = dpus.iter().map(|d| d.sim.counts().bridge_ports).sum();

    report(SCENARIO, "seconds", duration.as_secs());
    report(SCENARIO, "spec_writes_per_second", WRITES_PER_SECOND);
    report(SCENARIO, "attach_detach_cycles", cycles.load(Ordering::Relaxed));
    report(SCENARIO, "errors", 0);
    report(SCENARIO, "rss_after_warmup_mib", format!("{:.1}", rss_start as f64 / 1048576.0));
    report(SCENARIO, "rss_max_mib", format!("{:.1}", rss_max as f64 / 1048576.0));
    report(SCENARIO, "fds_min_max", format!("{fds_min}-{fds_max}"));
    report(SCENARIO, "write_p99_early_ms", early.as_millis());
    report(SCENARIO, "write_p99_late_ms", late.as_millis());
    report(SCENARIO, "dataplane_ports_at_end", ports);
}
