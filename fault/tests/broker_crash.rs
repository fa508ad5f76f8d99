//! Broker crash: SIGKILL the real broker at random moments under a mixed load (spec writes,
//! attaches with real dpu-agents reporting status, many watchers), restart it, and check that
//! nothing acknowledged was lost, revisions never reorder or repeat, every watcher resumed
//! from its revision to exactly the store's state, and every agent converged.
//!
//! Short form (CI): 3 crashes. Long form: `XPU_FAULT_LONG=1` (20 crashes).
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
use rand::Rng;
use sqlx::PgPool;
use xpu_fault::{report, scale};
use xpu_proto::broker::v1 as pb;
use xpu_testkit::{Pki, apply, meta};

const SCENARIO: &str = "broker-crash";
const DPUS: usize = 3;
const WATCHERS: usize = 8;

fn bridge(name: &str, vlan: u32) -> pb::ApplyRequest {
    // Selects no DPU: a pure store write.
    apply(pb::resource::Kind::LogicalBridge(pb::LogicalBridge {
        metadata: meta(name, ""),
        spec: Some(pb::LogicalBridgeSpec {
            vlan_id: vlan,
            dpu_selector: Some(pb::LabelSelector { match_labels: [("fault".to_string(), "none".to_string())].into() }),
            ..Default::default()
        }),
        status: None,
    }))
}

#[sqlx::test(migrations = false)]
async fn acknowledged_writes_survive_sigkill_and_everyone_resumes(pool: PgPool) {
    let kills: usize = scale(3, 20);
    let work = tempfile::tempdir().unwrap();
    let pki = Pki::new(&[]);
    let args = ["--lease-duration", "10s", "--heartbeat-interval", "1s"];
    let Seeded { mut broker, url, admin } = seeded_broker(&pool, &pki, work.path(), &args).await;
    let mut dpus = Vec::new();
    for i in 0..DPUS {
        dpus.push(Dpu::start(&pki, &url, &format!("bf3-crash{i}"), &[]).await);
    }

    let stop = Arc::new(AtomicBool::new(false));
    // Watchers.
    let mut replicas = Vec::new();
    for _ in 0..WATCHERS {
        replicas.push(spawn_replica(pki.channel(broker.grpc, "admin/watcher").await, Arc::clone(&stop)));
    }
    // Spec writer: bridges created, then updated; acknowledged generations recorded.
    let acked_writes: Arc<Mutex<BTreeMap<String, i64>>> = Arc::default();
    let write_errors = Arc::new(AtomicU64::new(0));
    let acked_total = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, acked, errors) = (Arc::clone(&stop), Arc::clone(&acked_writes), Arc::clone(&write_errors));
        let total = Arc::clone(&acked_total);
        let mut admin = admin.clone();
        tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("lb-w{}", i / 2);
                match admin.apply(bridge(&name, 100 + (i / 2) % 3000)).await {
                    Ok(r) => {
                        let generation =
                            r.into_inner().object.as_ref().and_then(meta_of).map_or(0, |(_, m)| m.generation);
                        acked.lock().unwrap().insert(name, generation);
                        total.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        })
    };
    // Attacher: pods on every DPU; an attach returns once the real agent programmed the port.
    let acked_attaches: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let attach_errors = Arc::new(AtomicU64::new(0));
    let attacher = {
        let (stop, acked, errors) = (Arc::clone(&stop), Arc::clone(&acked_attaches), Arc::clone(&attach_errors));
        let mut host = host(&pki, &broker, "node-crash").await;
        let serials: Vec<String> = dpus.iter().map(|d| d.serial.clone()).collect();
        tokio::spawn(async move {
            let mut vf = 0u32;
            while !stop.load(Ordering::Relaxed) && vf < 200 {
                let serial = &serials[vf as usize % serials.len()];
                let vf_on_dpu = vf / serials.len() as u32;
                match xpu_testkit::attach(&mut host, serial, vf_on_dpu, "node-crash").await {
                    Ok(r) => {
                        let ip = r.attachment.map(|a| a.address).unwrap_or_default();
                        acked.lock().unwrap().push((format!("{serial}-pf0-vf{vf_on_dpu}"), ip));
                        vf += 1;
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
    };

    // The crashes.
    let mut downtimes = Vec::new();
    let mut rng = rand::rng();
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2500))).await;
        downtimes.push(broker.crash_and_restart().await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    attacher.await.unwrap();

    // Everything acknowledged is in the store.
    let mut admin = self::admin(&pki, &broker).await;
    let acked_writes = acked_writes.lock().unwrap().clone();
    let acked_attaches = acked_attaches.lock().unwrap().clone();
    assert!(acked_writes.len() > 10 && !acked_attaches.is_empty(), "the load ran");
    let store = store_state(&mut admin).await;
    let mut lost = Vec::new();
    for (name, generation) in &acked_writes {
        let id = Id { kind: pb::Kind::LogicalBridge as i32, namespace: String::new(), name: name.clone() };
        if store.get(&id).is_none_or(|v| v.generation < *generation) {
            lost.push(name.clone());
        }
    }
    for (netdev, _) in &acked_attaches {
        let id = Id { kind: pb::Kind::Netdev as i32, namespace: "pods".into(), name: netdev.clone() };
        if !store.contains_key(&id) {
            lost.push(netdev.clone());
        }
    }
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");

    // The log is continuous: every revision once, in order.
    let head = head(&mut admin).await;
    let revs = replayed(&mut admin, 1, head).await;
    assert_eq!(revs, (2..=head).collect::<Vec<_>>(), "revisions 2..={head} exactly once, in order");

    // Every agent converges: it applied the head, and every acknowledged attach is Connected
    // with the address it was given.
    let started = Instant::now();
    for d in &dpus {
        let ok = xpu_fault::wait_for(Duration::from_secs(60), || {
            let mut admin = admin.clone();
            async move { applied_revision(&mut admin, &d.serial).await.filter(|r| *r >= head) }
        })
        .await;
        assert!(ok.is_some(), "{} did not converge to {head}:\n{}", d.serial, d.agent.log_text());
    }
    for (netdev, ip) in &acked_attaches {
        let st = xpu_testkit::netdev_status(&mut admin, "pods", netdev).await.unwrap();
        assert_eq!((st.phase.as_str(), st.ip.as_str()), ("Connected", ip.as_str()), "{netdev}");
    }
    let convergence = started.elapsed();
    let ports: usize = dpus.iter().map(|d| d.sim.counts().bridge_ports).sum();
    assert_eq!(ports, acked_attaches.len(), "one dataplane port per attached netdev, none leaked");

    // Every watcher resumed (no full resync) and holds exactly the store's state.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let store = store_state(&mut admin).await;
    let mut reconnects = 0;
    for r in replicas {
        let replica = r.await.unwrap();
        replica_matches(&replica, &store).await.unwrap();
        assert_eq!(replica.resyncs, 0, "watchers resume from their revision");
        reconnects += replica.reconnects;
    }

    let max_down = downtimes.iter().max().unwrap();
    report(SCENARIO, "crashes", kills);
    report(SCENARIO, "acknowledged_spec_writes", acked_total.load(Ordering::Relaxed));
    report(SCENARIO, "objects_checked", acked_writes.len() + acked_attaches.len());
    report(SCENARIO, "acknowledged_attaches", acked_attaches.len());
    report(
        SCENARIO,
        "refused_or_failed_during_crashes",
        write_errors.load(Ordering::Relaxed) + attach_errors.load(Ordering::Relaxed),
    );
    report(SCENARIO, "lost", 0);
    report(SCENARIO, "revisions_checked", revs.len());
    report(SCENARIO, "watchers", WATCHERS);
    report(SCENARIO, "watcher_reconnects", reconnects);
    report(SCENARIO, "full_resyncs", 0);
    report(SCENARIO, "max_restart_to_ready_ms", max_down.as_millis());
    report(SCENARIO, "agent_convergence_after_load_ms", convergence.as_millis());
    drop(dpus);
}
