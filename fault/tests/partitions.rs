//! Partitions, through a TCP proxy between the clients and the real broker: an agent cut off
//! (blackholed: half-open, nothing answers) keeps its dataplane, both ends notice the dead
//! connection through keepalives within a bound, and after the heal the agent resumes from its
//! revision (no full resync) and converges; a slow consumer is cut off without slowing the
//! other watchers.
//!
//! Short form (CI): a 40 s cut. Long form: `XPU_FAULT_LONG=1` (a 3 minute cut).
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use sqlx::PgPool;
use xpu_fault::{
    broker::BrokerProcess,
    http::metric,
    proxy::{Mode, Proxy},
    report, scale,
};
use xpu_proto::broker::v1::{self as pb, admin_service_client::AdminServiceClient};
use xpu_testkit::{Pki, apply, meta};

const SCENARIO: &str = "partitions";

async fn agent_streams(b: &BrokerProcess) -> Option<f64> {
    metric(&b.metrics().await, "xpu_streams_active{class=\"agent\"}")
}

async fn lease(admin: &mut AdminServiceClient<tonic::transport::Channel>, serial: &str) -> String {
    match xpu_testkit::get(admin, pb::Kind::Dpu, "", serial).await.and_then(|r| r.kind) {
        Some(pb::resource::Kind::Dpu(d)) => d.status.map(|s| s.lease_state).unwrap_or_default(),
        _ => String::new(),
    }
}

#[sqlx::test(migrations = false)]
async fn a_cut_off_agent_keeps_its_dataplane_and_resumes(pool: PgPool) {
    let cut = Duration::from_secs(scale(40, 180));
    let work = tempfile::tempdir().unwrap();
    let pki = Pki::new(&[]);
    let args = ["--lease-duration", "10s", "--heartbeat-interval", "2s"];
    let Seeded { broker, url: _, admin } = seeded_broker(&pool, &pki, work.path(), &args).await;
    let proxy = Proxy::start(broker.grpc).await;
    let via_proxy = format!("https://127.0.0.1:{}", proxy.addr.port());
    let serial = "bf3-part";
    let dpu = Dpu::start(&pki, &via_proxy, serial, &[]).await;
    let mut host = host(&pki, &broker, "node-p").await;
    for vf in 0..2 {
        xpu_testkit::attach(&mut host, serial, vf, "node-p").await.unwrap();
    }
    let ports_before = dpu.sim.counts().bridge_ports;
    assert_eq!(ports_before, 2);
    assert_eq!(agent_streams(&broker).await, Some(1.0));

    // Cut: the agent's connection stays open, nothing passes.
    proxy.set(Mode::Blackhole);
    let cut_at = Instant::now();
    let log_len = dpu.agent.log_text().len();
    // Meanwhile the tenant asks for another pod interface on that DPU.
    let pending_attach = {
        let mut host = host.clone();
        tokio::spawn(async move {
            host.attach_netdev(pb::AttachNetdevRequest {
                namespace: "pods".into(),
                spec: Some(pb::NetdevSpec {
                    netdev_id: format!("{serial}-pf0-vf2"),
                    hostname: "node-p".into(),
                    network: "tenant-a".into(),
                    ..Default::default()
                }),
                timeout_ms: 300_000,
                ..Default::default()
            })
            .await
        })
    };
    // Both ends watched at once: each is timed from the cut.
    let (broker_noticed, agent_noticed) = tokio::join!(
        xpu_fault::wait_for(Duration::from_secs(60), || async {
            (agent_streams(&broker).await == Some(0.0)).then(|| cut_at.elapsed())
        }),
        xpu_fault::wait_for(Duration::from_secs(60), || async {
            dpu.agent.log_text()[log_len..].contains("broker session failed").then(|| cut_at.elapsed())
        })
    );
    let broker_noticed = broker_noticed.expect("the broker notices the half-open agent stream");
    let agent_noticed = agent_noticed.expect("the agent notices the dead connection");
    let stale = xpu_fault::wait_for(Duration::from_secs(30), || {
        let mut admin = admin.clone();
        async move { (lease(&mut admin, serial).await == "Unknown").then_some(()) }
    })
    .await;
    assert!(stale.is_some(), "the DPU's lease lapses while it is cut off");
    let rest = cut.saturating_sub(cut_at.elapsed());
    tokio::time::sleep(rest).await;
    assert_eq!(dpu.sim.counts().bridge_ports, ports_before, "the dataplane is kept while cut off");
    assert!(!pending_attach.is_finished(), "the attach waits for the DPU");

    // Heal: the stalled connections are dead; the agent reconnects through the healed path.
    proxy.set(Mode::Pass);
    proxy.reset_all();
    let healed_at = Instant::now();
    let attached = tokio::time::timeout(Duration::from_secs(90), pending_attach).await;
    let attached = attached.expect("the attach completes after the heal").unwrap();
    assert!(attached.is_ok(), "{attached:?}\n{}", dpu.agent.log_text());
    let ready = xpu_fault::wait_for(Duration::from_secs(30), || {
        let mut admin = admin.clone();
        async move { (lease(&mut admin, serial).await == "Ready").then_some(()) }
    })
    .await;
    assert!(ready.is_some(), "the DPU is Ready again");
    let converged = healed_at.elapsed();
    assert_eq!(dpu.sim.counts().bridge_ports, 3, "the new port, the old ones untouched");
    let log = dpu.agent.log_text();
    let snapshots = log.matches("the broker sends a snapshot").count();
    assert_eq!(snapshots, 1, "resumed from its revision, no full resync after the heal:\n{log}");

    report(SCENARIO, "cut_seconds", cut.as_secs());
    report(SCENARIO, "broker_detected_half_open_ms", broker_noticed.as_millis());
    report(SCENARIO, "agent_detected_half_open_ms", agent_noticed.as_millis());
    report(SCENARIO, "dataplane_ports_kept", ports_before);
    report(SCENARIO, "full_resyncs_after_heal", snapshots - 1);
    report(SCENARIO, "converged_after_heal_ms", converged.as_millis());
}

/// (revision, when a watcher received it).
type Deliveries = Vec<(i64, Instant)>;

/// A watcher that stops reading (behind a slow link, too) is cut off and told where to resume,
/// while the others keep up with the write burst. The objects are large enough that the burst
/// overflows the HTTP/2 window and the stream's queue.
#[sqlx::test(migrations = false)]
async fn a_slow_consumer_is_cut_off_without_slowing_the_others(pool: PgPool) {
    const WRITES: usize = 2000;
    const WRITERS: usize = 4;
    const FAST: usize = 3;
    let work = tempfile::tempdir().unwrap();
    let pki = Pki::new(&[]);
    let broker = BrokerProcess::start(&database_url(&pool), &pki, work.path(), &["--stream-buffer", "64"]).await;
    let admin = admin(&pki, &broker).await;
    let slow_link = Proxy::start(broker.grpc).await;
    slow_link.set(Mode::Delay(Duration::from_millis(250)));

    // Each fast watcher records when it saw each revision.
    let seen: Arc<Mutex<Vec<Deliveries>>> = Arc::new(Mutex::new(vec![Vec::new(); FAST]));
    let mut fast = Vec::new();
    for w in 0..FAST {
        let mut client = AdminServiceClient::new(pki.channel(broker.grpc, "admin/fast").await);
        let seen = Arc::clone(&seen);
        let mut stream =
            client.watch(pb::WatchRequest { since_revision: 1, ..Default::default() }).await.unwrap().into_inner();
        fast.push(tokio::spawn(async move {
            while let Ok(Ok(Some(ev))) = tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
                if let Some(pb::watch_event::Event::Change(_)) = ev.event {
                    seen.lock().unwrap()[w].push((ev.revision, Instant::now()));
                    if seen.lock().unwrap()[w].len() == WRITES {
                        break;
                    }
                }
            }
        }));
    }
    let burst_done = Arc::new(tokio::sync::Notify::new());
    let slow = {
        let mut client = AdminServiceClient::new(pki.channel(slow_link.addr, "admin/slow").await);
        let burst_done = Arc::clone(&burst_done);
        tokio::spawn(async move {
            let mut stream =
                client.watch(pb::WatchRequest { since_revision: 1, ..Default::default() }).await.unwrap().into_inner();
            // Reads nothing during the burst, then drains what was buffered.
            burst_done.notified().await;
            loop {
                match tokio::time::timeout(Duration::from_secs(60), stream.message()).await {
                    Ok(Ok(Some(_))) => {}
                    Ok(Err(status)) => return Some(status),
                    _ => return None,
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The burst; each write's acknowledgement time by revision.
    let acks: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::default();
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut admin = admin.clone();
        let acks = Arc::clone(&acks);
        writers.push(tokio::spawn(async move {
            for i in 0..WRITES / WRITERS {
                let name = format!("lb-s{w}-{i}");
                let mut metadata = meta(&name, "").unwrap();
                metadata.labels = (0..30).map(|j| (format!("label-{j:02}"), "v".repeat(60))).collect();
                let r = admin
                    .apply(apply(pb::resource::Kind::LogicalBridge(pb::LogicalBridge {
                        metadata: Some(metadata),
                        spec: Some(pb::LogicalBridgeSpec { vlan_id: 100, ..Default::default() }),
                        status: None,
                    })))
                    .await
                    .unwrap()
                    .into_inner();
                let revision = r.object.as_ref().and_then(meta_of).map_or(0, |(_, m)| m.revision);
                acks.lock().unwrap().push((revision, Instant::now()));
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let burst = started.elapsed();
    for f in fast {
        f.await.unwrap();
    }
    burst_done.notify_one();
    let status = tokio::time::timeout(Duration::from_secs(120), slow).await.unwrap().unwrap();
    let status = status.expect("the slow watcher is cut off with a status");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("resume from revision"), "{}", status.message());

    // Every fast watcher saw every write; delivery delay after the acknowledgement.
    let acks: std::collections::HashMap<i64, Instant> = acks.lock().unwrap().iter().copied().collect();
    let mut delays = Vec::new();
    for w in seen.lock().unwrap().iter() {
        assert_eq!(w.len(), WRITES, "a fast watcher missed changes");
        for (rev, at) in w {
            if let Some(acked) = acks.get(rev) {
                delays.push(at.saturating_duration_since(*acked));
            }
        }
    }
    delays.sort();
    let p99 = delays[delays.len() * 99 / 100];
    let max = *delays.last().unwrap();
    assert!(max < Duration::from_secs(5), "fast watchers were held up: max delay {max:?}");
    report(SCENARIO, "slow_consumer_cut_off", "RESOURCE_EXHAUSTED");
    report(SCENARIO, "burst_writes", WRITES);
    report(SCENARIO, "burst_ms", burst.as_millis());
    report(SCENARIO, "fast_watchers", FAST);
    report(SCENARIO, "fast_delivery_after_ack_p99_ms", p99.as_millis());
    report(SCENARIO, "fast_delivery_after_ack_max_ms", max.as_millis());
}
