//! The revision log's guarantees over the real gRPC API: order = commit order under concurrent
//! writers, replay equals the live stream, resume from a revision, compaction, tombstones, and
//! several broker replicas on one database.

#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use xpu_proto::broker::v1::{self as pb, watch_event::Event as E};

/// (revision, change type, kind, namespace/name) of every change a stream delivers.
type Seen = Vec<(i64, i32, String)>;

fn describe(ev: &pb::WatchEvent) -> Option<(i64, i32, String)> {
    let Some(E::Change(c)) = &ev.event else {
        return None;
    };
    let obj = c.object.as_ref()?;
    let key = xpu_broker::model::convert::resource_key(obj)?;
    Some((ev.revision, c.r#type, key.to_string()))
}

async fn collect_until(stream: &mut tonic::Streaming<pb::WatchEvent>, head: i64) -> Seen {
    let mut seen = Vec::new();
    let mut last = 0;
    while last < head {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("stream stalled")
            .expect("stream error")
            .expect("stream ended");
        if let Some(d) = describe(&ev) {
            seen.push(d);
        }
        if !matches!(ev.event, Some(E::Resync(_))) {
            last = last.max(ev.revision);
        }
    }
    seen
}

conformance!(concurrent_writers_commit_in_revision_order_and_replay_equals_live);
async fn concurrent_writers_commit_in_revision_order_and_replay_equals_live(b: TestBroker) {
    let mut admin = b.admin().await;
    let start = admin.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision;
    let mut live = admin.watch(pb::WatchRequest { kinds: vec![], since_revision: start }).await.unwrap().into_inner();

    // 8 writers × 40 writes (creates and updates of overlapping objects) in parallel.
    let mut tasks = Vec::new();
    for w in 0..8u32 {
        let mut c = b.admin().await;
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..40u32 {
                let name = format!("lb-{}", (w * 7 + i) % 25);
                let resp = c.apply(apply_req(mk_lb(&name, 1 + (w * 40 + i) % 4000))).await.unwrap().into_inner();
                if resp.changed {
                    let meta =
                        xpu_broker::model::convert::resource_meta(resp.object.as_ref().unwrap()).unwrap().clone();
                    revs.push(meta.revision);
                }
            }
            revs
        }));
    }
    let mut acked: Vec<i64> = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    acked.sort_unstable();
    let head = *acked.last().unwrap();

    let seen = collect_until(&mut live, head).await;
    let revs: Vec<i64> = seen.iter().map(|s| s.0).collect();
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "revisions must strictly increase: {revs:?}");
    assert_eq!(revs, acked, "the watcher sees every acknowledged change exactly once");
    // Revisions are dense: commit order leaves no holes.
    assert_eq!(acked, ((start + 1)..=head).collect::<Vec<_>>());

    // Replay from any revision equals the suffix of the live stream.
    // (since_revision 0 asks for a snapshot instead: covered elsewhere.)
    for from in [start + 1, start + 57, head - 3, head] {
        let mut replay =
            admin.watch(pb::WatchRequest { kinds: vec![], since_revision: from }).await.unwrap().into_inner();
        let got = if from == head { vec![] } else { collect_until(&mut replay, head).await };
        let want: Seen = seen.iter().filter(|s| s.0 > from).cloned().collect();
        assert_eq!(got, want, "replay from {from}");
    }
    b.stop().await;
}

conformance!(resume_compaction_and_tombstones);
async fn resume_compaction_and_tombstones(b: TestBroker) {
    seed_network(&b, "net-a", "10.1.0.0/24", "10.1.0.1").await;
    register(&b, "dpu-a").await;
    let mut agent = b.agent("dpu-a").await;
    let mut host = b.host("node-1").await;

    // The agent watches from scratch: snapshot (nothing for it yet) then live.
    let mut desired = agent
        .watch_desired(pb::WatchDesiredRequest { serial: "dpu-a".into(), since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let last_applied = snapshot_end(&mut desired).await;
    // The LogicalBridge (no selector) is desired by every DPU: it came in the snapshot.
    assert!(last_applied > 0);

    // Two netdevs created while the agent's stream is cut.
    drop(desired);
    let mut created = Vec::new();
    for vf in 0..2 {
        let spec = mk_netdev_spec("dpu-a", vf, "node-1", "net-a");
        created.push(spec.netdev_id.clone());
        let h = host.clone();
        let req = pb::AttachNetdevRequest {
            namespace: "pods".into(),
            spec: Some(spec),
            timeout_ms: 50,
            ..Default::default()
        };
        let mut h2 = h;
        let err = h2.attach_netdev(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "nobody reports status yet: {err:?}");
    }
    // One is detached again (a tombstone the agent must learn about).
    host.detach_netdev(pb::DetachNetdevRequest { namespace: "pods".into(), name: created[0].clone() }).await.unwrap();

    // Reopened with its revision it gets exactly the changes after it, no snapshot.
    let mut desired = agent
        .watch_desired(pb::WatchDesiredRequest { serial: "dpu-a".into(), since_revision: last_applied })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while got.len() < 3 {
        let ev = next_change(&mut desired, Duration::from_secs(5)).await.expect("replayed change");
        let Some(E::Change(c)) = &ev.event else { panic!("expected only changes, got {ev:?}") };
        let key = xpu_broker::model::convert::resource_key(c.object.as_ref().unwrap()).unwrap();
        got.push((pb::ChangeType::try_from(c.r#type).unwrap(), key.name));
    }
    assert_eq!(
        got,
        vec![
            (pb::ChangeType::Spec, created[0].clone()),
            (pb::ChangeType::Spec, created[1].clone()),
            (pb::ChangeType::Deleted, created[0].clone()),
        ]
    );
    drop(desired);

    // Compact past the agent's position: it must resync, and the snapshot holds only live objects.
    let mut admin = b.admin().await;
    let head = admin.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision;
    let c = admin.compact(pb::CompactRequest { revision: head }).await.unwrap().into_inner();
    assert_eq!(c.compacted_revision, head);
    assert!(c.tombstones_removed >= 1, "the detached netdev's tombstone is compacted");
    let mut desired = agent
        .watch_desired(pb::WatchDesiredRequest { serial: "dpu-a".into(), since_revision: last_applied })
        .await
        .unwrap()
        .into_inner();
    let first = next_change(&mut desired, Duration::from_secs(5)).await.unwrap();
    let Some(E::Resync(r)) = first.event else { panic!("expected RESYNC_REQUIRED, got {first:?}") };
    assert_eq!(r.reason, pb::resync::Reason::ResyncRequired as i32);
    assert_eq!(first.revision, head, "the snapshot is tagged with its revision");
    let mut names = BTreeMap::new();
    loop {
        let ev = next_change(&mut desired, Duration::from_secs(5)).await.unwrap();
        match ev.event {
            Some(E::Change(c)) => {
                assert_eq!(c.r#type, pb::ChangeType::Snapshot as i32);
                let key = xpu_broker::model::convert::resource_key(c.object.as_ref().unwrap()).unwrap();
                names.insert(key.name, key.kind);
            }
            Some(E::SnapshotEnd(_)) => {
                assert_eq!(ev.revision, head);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(names.contains_key(&created[1]));
    assert!(!names.contains_key(&created[0]), "deleted netdevs are not in a snapshot");
    assert!(names.contains_key("lb-10"));
    b.stop().await;
}

conformance!(idle_streams_get_bookmarks_that_move_past_foreign_changes);
async fn idle_streams_get_bookmarks_that_move_past_foreign_changes(b: TestBroker) {
    register(&b, "dpu-a").await;
    register(&b, "dpu-b").await;
    let mut agent = b.agent("dpu-a").await;
    let head = b.admin().await.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision;
    let mut desired = agent
        .watch_desired(pb::WatchDesiredRequest { serial: "dpu-a".into(), since_revision: head })
        .await
        .unwrap()
        .into_inner();
    // Resumed at the head: a bookmark says it is current, before any change.
    let ev = tokio::time::timeout(Duration::from_secs(5), desired.message()).await.unwrap().unwrap().unwrap();
    assert!(matches!(ev.event, Some(E::Bookmark(_))), "a bookmark at the head: {ev:?}");
    assert_eq!(ev.revision, head);
    // A change that is not for dpu-a: dpu-b registering again with new labels.
    b.agent("dpu-b")
        .await
        .register(pb::RegisterRequest {
            serial: "dpu-b".into(),
            labels: [("rack".to_string(), "r9".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let new_head = b.admin().await.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision;
    assert!(new_head > head);
    let ev = tokio::time::timeout(Duration::from_secs(5), desired.message()).await.unwrap().unwrap().unwrap();
    assert!(matches!(ev.event, Some(E::Bookmark(_))), "only a bookmark reaches dpu-a: {ev:?}");
    assert_eq!(ev.revision, new_head);
    b.stop().await;
}

/// Postgres only: replicas share one database and hear each other through LISTEN/NOTIFY (an
/// embedded SQLite store serves one process).
#[sqlx::test(migrations = "../migrations/postgres")]
async fn two_replicas_on_one_database_stay_consistent(pool: sqlx::PgPool) {
    let a = TestBroker::start(pool.clone()).await;
    let b = TestBroker::start(pool).await;
    seed_network(&a, "net-a", "10.2.0.0/24", "10.2.0.1").await;
    register(&b, "dpu-r").await;

    // A watcher on replica B sees what replica A commits, in order.
    let mut admin_b = b.admin().await;
    let head = admin_b.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision;
    let mut watch_b =
        admin_b.watch(pb::WatchRequest { kinds: vec![], since_revision: head }).await.unwrap().into_inner();
    let mut admin_a = a.admin().await;
    for v in 0..20 {
        admin_a.apply(apply_req(mk_lb(&format!("lb-r{v}"), 100 + v))).await.unwrap();
    }
    let seen = collect_until(&mut watch_b, head + 20).await;
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), ((head + 1)..=(head + 20)).collect::<Vec<_>>());

    // The attach round trip across replicas: host on A, agent on B.
    let mut agent_b = b.agent("dpu-r").await;
    let mut desired = agent_b
        .watch_desired(pb::WatchDesiredRequest { serial: "dpu-r".into(), since_revision: head + 20 })
        .await
        .unwrap()
        .into_inner();
    let mut host_a = a.host("node-1").await;
    let spec = mk_netdev_spec("dpu-r", 3, "node-1", "net-a");
    let attach = tokio::spawn(async move {
        host_a
            .attach_netdev(pb::AttachNetdevRequest { namespace: "pods".into(), spec: Some(spec), ..Default::default() })
            .await
    });
    let ev = next_change(&mut desired, Duration::from_secs(5)).await.expect("the netdev reaches the agent on B");
    let Some(E::Change(c)) = ev.event else { panic!("{ev:?}") };
    let Some(pb::resource::Kind::Netdev(nd)) = c.object.unwrap().kind else { panic!("not a netdev") };
    let meta = nd.metadata.unwrap();
    let spec = nd.spec.unwrap();
    let k = key(pb::Kind::Netdev, &meta.namespace, &meta.name);
    let address = spec.ipam.unwrap().address;
    agent_b
        .report_status(pb::ReportStatusRequest {
            serial: "dpu-r".into(),
            reports: vec![report(k, meta.generation, 1, netdev_status("Connected", &address))],
        })
        .await
        .unwrap();
    let resp = attach.await.unwrap().expect("attach completes on A").into_inner();
    assert_eq!(resp.attachment.unwrap().address, "10.2.0.2/24");
    a.stop().await;
    b.stop().await;
}

/// Each replica's writer starts a batch from what its own last commit left, while the
/// database's head is still where that commit put it. Replicas taking turns on one object and
/// one status slot must each build on the other's writes: every spec write moves the generation
/// by one, and a status sequence number the other replica accepted is stale here.
#[sqlx::test(migrations = "../migrations/postgres")]
async fn replicas_taking_turns_on_one_object_build_on_each_others_writes(pool: sqlx::PgPool) {
    // The serial writer (the default) keeps its last commit; the pipelined one does not.
    let serial = |pki: &Pki| {
        let mut config = test_config(pki);
        config.store.pipeline = false;
        config
    };
    let (pki_a, pki_b) = (Pki::new(), Pki::new());
    let (config_a, config_b) = (serial(&pki_a), serial(&pki_b));
    let a = TestBroker::start_with(pool.clone(), pki_a, config_a).await;
    let b = TestBroker::start_with(pool, pki_b, config_b).await;
    let mut admins = [a.admin().await, b.admin().await];
    let mut generation = 0;
    for round in 0..6u32 {
        // Two writes in a row on one replica: the second starts from the first.
        for i in 0..2 {
            let vlan = 10 + round * 2 + i;
            let r = admins[round as usize % 2].apply(apply_req(mk_lb("lb-turns", vlan))).await.unwrap().into_inner();
            generation += 1;
            assert_eq!(lb_generation(r.object.as_ref().unwrap()), generation, "write {vlan}");
        }
    }

    seed_network(&a, "net-t", "10.9.0.0/24", "10.9.0.1").await;
    register(&a, "dpu-t").await;
    let created =
        admins[0].apply(apply_req(mk_netdev("pods", "dpu-t", 1, "node-1", "net-t"))).await.unwrap().into_inner();
    let Some(pb::resource::Kind::Netdev(nd)) = created.object.unwrap().kind else { panic!("not a netdev") };
    let k = key(pb::Kind::Netdev, "pods", &nd.metadata.unwrap().name);
    let mut agents = [a.agent("dpu-t").await, b.agent("dpu-t").await];
    let mut send = async |on: usize, seq: u64| {
        // Each report differs from the one before it (an identical one is answered Unchanged).
        let phase = if seq.is_multiple_of(2) { "Connected" } else { "Connecting" };
        let reports = vec![report(k.clone(), 1, seq, netdev_status(phase, "10.9.0.2/24"))];
        let r = agents[on].report_status(pb::ReportStatusRequest { serial: "dpu-t".into(), reports }).await.unwrap();
        pb::ReportOutcome::try_from(r.into_inner().results[0].outcome).unwrap()
    };
    assert_eq!(send(0, 1).await, pb::ReportOutcome::Accepted);
    assert_eq!(send(0, 2).await, pb::ReportOutcome::Accepted);
    assert_eq!(send(1, 5).await, pb::ReportOutcome::Accepted);
    // Replica A last saw sequence number 2; B has since stored 5.
    assert_eq!(send(0, 4).await, pb::ReportOutcome::Stale);
    assert_eq!(send(0, 6).await, pb::ReportOutcome::Accepted);
    a.stop().await;
    b.stop().await;
}
