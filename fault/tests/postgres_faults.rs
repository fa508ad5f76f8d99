//! Postgres restart and stall under load: the broker (real binary) on a throwaway cluster of
//! the test's own, behind a TCP proxy that can stall the database connections. While the
//! database is away the broker reports not-ready and refuses writes with a retryable status
//! within a bound instead of hanging; it recovers by itself, without a restart, and loses
//! nothing it acknowledged.
//!
//! Short form (CI): one restart, one stall, one outage. Long form: `XPU_FAULT_LONG=1`.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use xpu_fault::{
    broker::BrokerProcess,
    pg::TempPostgres,
    proxy::{Mode, Proxy},
    report, scale,
};
use xpu_proto::broker::v1 as pb;
use xpu_testkit::{Pki, apply, meta};

const SCENARIO: &str = "postgres-faults";

fn bridge(name: &str, vlan: u32) -> pb::ApplyRequest {
    apply(pb::resource::Kind::LogicalBridge(pb::LogicalBridge {
        metadata: meta(name, ""),
        spec: Some(pb::LogicalBridgeSpec { vlan_id: vlan, ..Default::default() }),
        status: None,
    }))
}

#[derive(Default)]
struct Outcomes {
    acked: BTreeMap<String, i64>,
    /// Status codes of refused writes.
    refused: BTreeMap<String, u64>,
    /// Longest any single call took.
    slowest: Duration,
}

#[tokio::test]
async fn the_broker_rides_out_database_restarts_and_stalls() {
    let Some(pg) = TempPostgres::start() else {
        println!("SKIPPED: no PostgreSQL server binaries under /usr/lib/postgresql (scripts/test.sh installs them)");
        return;
    };
    let rounds: usize = scale(1, 5);
    let proxy = Proxy::start(format!("127.0.0.1:{}", pg.port).parse().unwrap()).await;
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.addr.port());
    let work = tempfile::tempdir().unwrap();
    let pki = Pki::new(&[]);
    // A short database timeout so the test sees refusals quickly; production default is 10s.
    let broker = BrokerProcess::start(&url, &pki, work.path(), &["--db-timeout", "3s"]).await;
    let pid = broker.pid();
    let admin = admin(&pki, &broker).await;

    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<Outcomes>> = Arc::default();
    let calls = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, outcomes, calls) = (Arc::clone(&stop), Arc::clone(&outcomes), Arc::clone(&calls));
        let mut admin = admin.clone();
        tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("lb-p{i}");
                let t = Instant::now();
                let r = admin.apply(bridge(&name, 100 + i % 3000)).await;
                calls.fetch_add(1, Ordering::Relaxed);
                let refused = {
                    let mut o = outcomes.lock().unwrap();
                    o.slowest = o.slowest.max(t.elapsed());
                    match r {
                        Ok(r) => {
                            let generation =
                                r.into_inner().object.as_ref().and_then(meta_of).map_or(0, |(_, m)| m.generation);
                            o.acked.insert(name, generation);
                            i += 1;
                            false
                        }
                        Err(status) => {
                            *o.refused.entry(format!("{:?}", status.code())).or_default() += 1;
                            true
                        }
                    }
                };
                if refused {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        })
    };
    let acked_now = || outcomes.lock().unwrap().acked.len();
    let progress = |before: usize| {
        let outcomes = Arc::clone(&outcomes);
        async move {
            xpu_fault::wait_for(Duration::from_secs(30), || {
                let n = outcomes.lock().unwrap().acked.len();
                async move { (n > before + 5).then_some(()) }
            })
            .await
            .is_some()
        }
    };
    assert!(progress(0).await, "writes flow");

    let mut not_ready_seen = 0;
    let mut recoveries = Vec::new();
    for _ in 0..rounds {
        // 1. Restart: connections are terminated; the pool reconnects.
        assert!(pg.restart(), "pg_ctl restart");
        let t = Instant::now();
        assert!(progress(acked_now()).await, "writes resume after a database restart");
        recoveries.push(t.elapsed());

        // 2. Stall: the connections stay open but nothing comes back.
        proxy.set(Mode::Blackhole);
        let t = Instant::now();
        let not_ready = xpu_fault::wait_for(Duration::from_secs(15), || async {
            (broker.readyz().await == Some(503)).then_some(())
        })
        .await;
        assert!(not_ready.is_some(), "the broker reports not-ready while the database stalls");
        not_ready_seen += 1;
        let refused_before: u64 = outcomes.lock().unwrap().refused.values().sum();
        let refusal = xpu_fault::wait_for(Duration::from_secs(15), || {
            let n: u64 = outcomes.lock().unwrap().refused.values().sum();
            async move { (n > refused_before).then_some(()) }
        })
        .await;
        assert!(refusal.is_some(), "writes are refused during the stall, not left hanging");
        report(SCENARIO, "stall_detected_ms", t.elapsed().as_millis());
        // The stalled connections are dead to the client: heal the path and drop them.
        proxy.set(Mode::Pass);
        proxy.reset_all();
        let t = Instant::now();
        assert!(progress(acked_now()).await, "writes resume after the stall");
        recoveries.push(t.elapsed());
        assert!(broker.wait_ready(Duration::from_secs(15)).await.is_some(), "ready again");

        // 3. Outage: the server is down for a while.
        assert!(pg.stop(), "pg_ctl stop");
        let down = xpu_fault::wait_for(Duration::from_secs(15), || async {
            (broker.readyz().await == Some(503)).then_some(())
        })
        .await;
        assert!(down.is_some(), "not ready while the database is down");
        not_ready_seen += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(pg.start_again(), "pg_ctl start");
        let t = Instant::now();
        assert!(progress(acked_now()).await, "writes resume after the outage");
        recoveries.push(t.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert_eq!(broker.pid(), pid, "recovered without a restart");

    // Nothing acknowledged is lost; the log is continuous.
    let o = std::mem::take(&mut *outcomes.lock().unwrap());
    let mut admin = admin.clone();
    let store = store_state(&mut admin).await;
    let lost: Vec<&String> = o
        .acked
        .iter()
        .filter(|(name, generation)| {
            let id = Id { kind: pb::Kind::LogicalBridge as i32, namespace: String::new(), name: (*name).clone() };
            store.get(&id).is_none_or(|v| v.generation < **generation)
        })
        .map(|(n, _)| n)
        .collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    let head = head(&mut admin).await;
    let revs = replayed(&mut admin, 1, head).await;
    assert_eq!(revs, (2..=head).collect::<Vec<_>>());
    // Refusals are retryable: UNAVAILABLE (never INTERNAL, never a hang).
    assert!(o.refused.keys().all(|c| c == "Unavailable"), "refusals: {:?}", o.refused);
    assert!(o.slowest < Duration::from_secs(15), "no call hung: slowest {:?}", o.slowest);

    report(SCENARIO, "rounds", rounds);
    report(SCENARIO, "faults_injected", rounds * 3);
    report(SCENARIO, "write_calls", calls.load(Ordering::Relaxed));
    report(SCENARIO, "acknowledged_writes", o.acked.len());
    report(SCENARIO, "refused_unavailable", o.refused.values().sum::<u64>());
    report(SCENARIO, "lost", 0);
    report(SCENARIO, "not_ready_reported", not_ready_seen);
    report(SCENARIO, "slowest_call_ms", o.slowest.as_millis());
    report(SCENARIO, "max_recovery_ms", recoveries.iter().max().unwrap().as_millis());
    drop(proxy);
}
