//! Routing of fabric objects by DPU labels, slow-consumer cut-off, DPU leases, and the gRPC
//! health and reflection services.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use xpu_proto::broker::v1::{self as pb, watch_event::Event as E};

async fn register_with(b: &TestBroker, serial: &str, labels: &[(&str, &str)]) {
    b.agent(serial)
        .await
        .register(pb::RegisterRequest {
            serial: serial.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
}

fn selected_lb(name: &str, vlan: u32, rack: &str) -> pb::Resource {
    let mut r = mk_lb(name, vlan);
    if let Some(pb::resource::Kind::LogicalBridge(l)) = r.kind.as_mut() {
        l.spec.as_mut().unwrap().dpu_selector =
            Some(pb::LabelSelector { match_labels: [("rack".to_string(), rack.to_string())].into() });
    }
    r
}

/// `serial`'s desired-state stream from `since`.
async fn desired(b: &TestBroker, serial: &str, since: i64) -> tonic::Streaming<pb::WatchEvent> {
    let req = pb::WatchDesiredRequest { serial: serial.into(), since_revision: since };
    b.agent(serial).await.watch_desired(req).await.unwrap().into_inner()
}

/// The next change a DPU stream delivers: (type, name).
async fn next(stream: &mut tonic::Streaming<pb::WatchEvent>) -> Option<(pb::ChangeType, String)> {
    let ev = next_change(stream, Duration::from_millis(800)).await?;
    let Some(E::Change(c)) = ev.event else {
        return None;
    };
    let key = xpu_broker::model::convert::resource_key(c.object.as_ref()?)?;
    Some((pb::ChangeType::try_from(c.r#type).ok()?, key.name))
}

conformance!(fabric_objects_reach_the_dpus_their_selector_matches);
async fn fabric_objects_reach_the_dpus_their_selector_matches(b: TestBroker) {
    register_with(&b, "dpu-1", &[("rack", "r1")]).await;
    register_with(&b, "dpu-2", &[("rack", "r2")]).await;
    let head = b.admin().await.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision;
    let mut s1 = desired(&b, "dpu-1", head).await;
    let mut s2 = desired(&b, "dpu-2", head).await;
    let mut admin = b.admin().await;

    admin.apply(apply_req(selected_lb("lb-r1", 11, "r1"))).await.unwrap();
    admin.apply(apply_req(mk_lb("lb-all", 12))).await.unwrap();
    assert_eq!(next(&mut s1).await, Some((pb::ChangeType::Spec, "lb-r1".into())));
    assert_eq!(next(&mut s1).await, Some((pb::ChangeType::Spec, "lb-all".into())));
    assert_eq!(next(&mut s2).await, Some((pb::ChangeType::Spec, "lb-all".into())), "dpu-2 never sees lb-r1");

    // Moving lb-r1 to rack r2: a delete for dpu-1, a create for dpu-2.
    admin.apply(apply_req(selected_lb("lb-r1", 11, "r2"))).await.unwrap();
    assert_eq!(next(&mut s1).await, Some((pb::ChangeType::Deleted, "lb-r1".into())));
    assert_eq!(next(&mut s2).await, Some((pb::ChangeType::Spec, "lb-r1".into())));

    // A DPU whose labels change gets a fresh snapshot of what it should now hold.
    register_with(&b, "dpu-1", &[("rack", "r2")]).await;
    let ev = next_change(&mut s1, Duration::from_secs(3)).await.unwrap();
    assert!(matches!(ev.event, Some(E::Resync(_))), "{ev:?}");
    let mut names = Vec::new();
    loop {
        let ev = next_change(&mut s1, Duration::from_secs(3)).await.unwrap();
        match ev.event {
            Some(E::Change(c)) => {
                names.push(xpu_broker::model::convert::resource_key(c.object.as_ref().unwrap()).unwrap().name)
            }
            Some(E::SnapshotEnd(_)) => break,
            other => panic!("{other:?}"),
        }
    }
    names.sort();
    assert_eq!(names, vec!["lb-all", "lb-r1"]);

    // A status report for an object not routed to the reporter is NOT_FOUND, not written.
    let r = b
        .agent("dpu-2")
        .await
        .report_status(pb::ReportStatusRequest {
            serial: "dpu-2".into(),
            reports: vec![pb::StatusReport {
                key: Some(key(pb::Kind::LogicalBridge, "", "lb-all")),
                observed_generation: 1,
                seq: 1,
                status: Some(pb::status_report::Status::Object(pb::DpuObjectStatus {
                    phase: "Programmed".into(),
                    oper_status: "UP".into(),
                    ..Default::default()
                })),
                removed: false,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results[0].outcome, pb::ReportOutcome::Accepted as i32);
    let lb =
        admin.get(pb::GetRequest { key: Some(key(pb::Kind::LogicalBridge, "", "lb-all")) }).await.unwrap().into_inner();
    let Some(pb::resource::Kind::LogicalBridge(lb)) = lb.kind else { panic!() };
    let st = lb.status.unwrap();
    assert_eq!(st.dpus.len(), 1);
    assert_eq!(st.dpus[0].dpu, "dpu-2");
    assert_eq!(st.conditions[0].status, "True", "every reporting DPU programmed it: {:?}", st.conditions);
    b.stop().await;
}

conformance!(a_resuming_dpu_replays_only_the_fabric_objects_for_it);
/// A DPU that was away while many fabric objects for other DPUs changed replays exactly what
/// concerns it, in order: the objects its labels match, a delete for one that moved away from
/// it, and nothing of the others (more of them than one replay page holds), then a bookmark at
/// the head.
async fn a_resuming_dpu_replays_only_the_fabric_objects_for_it(b: TestBroker) {
    use futures::StreamExt;
    register_with(&b, "dpu-1", &[("rack", "r1")]).await;
    let mut admin = b.admin().await;
    let since = admin.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision;
    admin.apply(apply_req(selected_lb("lb-r1", 11, "r1"))).await.unwrap();
    admin.apply(apply_req(selected_lb("lb-moved", 12, "r1"))).await.unwrap();
    let others = futures::stream::iter(0..600u32)
        .map(|i| {
            let mut admin = admin.clone();
            async move { admin.apply(apply_req(selected_lb(&format!("lb-other-{i}"), 100 + i, "r2"))).await.unwrap() }
        })
        .buffer_unordered(16)
        .count()
        .await;
    assert_eq!(others, 600);
    admin.apply(apply_req(selected_lb("lb-moved", 12, "r2"))).await.unwrap();
    admin.apply(apply_req(mk_lb("lb-all", 13))).await.unwrap();
    admin.apply(apply_req(selected_lb("lb-r2", 14, "r2"))).await.unwrap();
    let head = admin.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision;

    let mut s1 = desired(&b, "dpu-1", since).await;
    let mut seen = Vec::new();
    let bookmark = loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), s1.message()).await.unwrap().unwrap().unwrap();
        match ev.event {
            Some(E::Change(c)) => {
                let key = xpu_broker::model::convert::resource_key(c.object.as_ref().unwrap()).unwrap();
                seen.push((pb::ChangeType::try_from(c.r#type).unwrap(), key.name));
            }
            Some(E::Bookmark(_)) => break ev.revision,
            other => panic!("{other:?}"),
        }
    };
    use pb::ChangeType::{Deleted, Spec};
    assert_eq!(
        seen,
        vec![
            (Spec, "lb-r1".to_string()),
            (Spec, "lb-moved".to_string()),
            (Deleted, "lb-moved".to_string()),
            (Spec, "lb-all".to_string()),
        ]
    );
    assert_eq!(bookmark, head, "the replay ends with a bookmark at the head");
    b.stop().await;
}

fn small_buffers(pki: &Pki) -> xpu_broker::Config {
    let mut config = test_config(pki);
    config.stream_buffer = 16;
    config
}

conformance!(a_slow_consumer_is_cut_off_and_told_where_to_resume, config = small_buffers);
async fn a_slow_consumer_is_cut_off_and_told_where_to_resume(b: TestBroker) {
    register_with(&b, "dpu-slow", &[]).await;
    register_with(&b, "dpu-fast", &[]).await;
    let head = b.admin().await.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision;
    let mut slow = desired(&b, "dpu-slow", head).await;
    let mut fast = desired(&b, "dpu-fast", head).await;
    let reader = tokio::spawn(async move {
        let mut n = 0;
        while n < 3000 {
            match next(&mut fast).await {
                Some(_) => n += 1,
                None => break,
            }
        }
        n
    });
    let mut admin = b.admin().await;
    // 3000 changes every DPU wants, far more than the slow stream's buffers hold.
    let mut writers = Vec::new();
    for w in 0..4u32 {
        let mut admin = admin.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..750u32 {
                // ~3 KiB per change, so that HTTP/2 flow-control windows fill up too.
                let mut lb = mk_lb(&format!("lb-{w}-{i}"), 1 + i);
                if let Some(pb::resource::Kind::LogicalBridge(l)) = lb.kind.as_mut() {
                    l.metadata.as_mut().unwrap().labels =
                        (0..48).map(|k| (format!("label-{k}"), "v".repeat(60))).collect();
                }
                admin.apply(apply_req(lb)).await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(reader.await.unwrap(), 3000, "the fast stream got everything");
    // The slow one, read now, ends with a clear error naming the revision to resume from.
    let mut last_rev = head;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), slow.message()).await.expect("slow stream answers") {
            Ok(Some(ev)) => last_rev = ev.revision,
            Ok(None) => panic!("the slow stream must end with an error"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(
        status.message().contains(&format!("resume from revision {last_rev}")),
        "{} (last {last_rev})",
        status.message()
    );
    // Resuming from there yields the rest without a snapshot.
    let mut again = desired(&b, "dpu-slow", last_rev).await;
    let ev = next_change(&mut again, Duration::from_secs(5)).await.unwrap();
    assert!(matches!(ev.event, Some(E::Change(_))), "{ev:?}");
    assert_eq!(ev.revision, last_rev + 1);
    let _ = admin.fleet_status(pb::FleetStatusRequest {}).await.unwrap();
    b.stop().await;
}

fn short_leases(pki: &Pki) -> xpu_broker::Config {
    let mut config = test_config(pki);
    config.service.lease_duration = Duration::from_millis(800);
    config.service.heartbeat_interval = Duration::from_millis(200);
    config
}

conformance!(leases_lapse_without_heartbeats_and_come_back, config = short_leases);
async fn leases_lapse_without_heartbeats_and_come_back(b: TestBroker) {
    seed_network(&b, "net-a", "10.11.0.0/24", "10.11.0.1").await;
    let mut agent = b.agent("dpu-l").await;
    let reg = agent
        .register(pb::RegisterRequest { serial: "dpu-l".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reg.heartbeat_interval_ms, 200);
    assert_eq!(reg.lease_duration_ms, 800);
    assert_eq!(reg.dpu.unwrap().status.unwrap().lease_state, "Ready");
    let mut admin = b.admin().await;
    admin.apply(apply_req(mk_netdev("pods", "dpu-l", 0, "node-1", "net-a"))).await.unwrap();
    let k = key(pb::Kind::Netdev, "pods", "dpu-l-pf0-vf0");
    agent
        .report_status(pb::ReportStatusRequest {
            serial: "dpu-l".into(),
            reports: vec![report(k.clone(), 1, 1, netdev_status("Connected", "10.11.0.2/24"))],
        })
        .await
        .unwrap();
    let lease = |admin: &mut xpu_proto::broker::v1::admin_service_client::AdminServiceClient<
        tonic::transport::Channel,
    >| {
        let mut admin = admin.clone();
        async move {
            let d =
                admin.get(pb::GetRequest { key: Some(key(pb::Kind::Dpu, "", "dpu-l")) }).await.unwrap().into_inner();
            let Some(pb::resource::Kind::Dpu(d)) = d.kind else { panic!() };
            d.status.unwrap()
        }
    };
    let netdev_stale =
        |admin: &mut xpu_proto::broker::v1::admin_service_client::AdminServiceClient<tonic::transport::Channel>| {
            let mut admin = admin.clone();
            let k = k.clone();
            async move {
                let n = admin.get(pb::GetRequest { key: Some(k) }).await.unwrap().into_inner();
                let Some(pb::resource::Kind::Netdev(n)) = n.kind else { panic!() };
                n.status.unwrap().stale
            }
        };
    // Heartbeats keep it Ready.
    for _ in 0..6 {
        agent.heartbeat(pb::HeartbeatRequest { serial: "dpu-l".into(), applied_revision: 3 }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let st = lease(&mut admin).await;
    assert_eq!(st.lease_state, "Ready");
    assert_eq!(st.applied_revision, 3);
    assert!(!netdev_stale(&mut admin).await);
    // Silence: the lease lapses, the DPU is Unknown and what it reported is flagged stale; nothing is evicted.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let st = lease(&mut admin).await;
    assert_eq!(st.lease_state, "Unknown");
    assert_eq!(st.conditions[0].reason, "LeaseLapsed");
    assert!(netdev_stale(&mut admin).await);
    let fleet = admin.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!((fleet.dpus_ready, fleet.dpus_unknown), (0, 1));
    assert_eq!(fleet.netdevs_by_phase.get("Connected"), Some(&1));
    // A heartbeat brings it back.
    agent.heartbeat(pb::HeartbeatRequest { serial: "dpu-l".into(), applied_revision: 4 }).await.unwrap();
    assert_eq!(lease(&mut admin).await.lease_state, "Ready");
    assert!(!netdev_stale(&mut admin).await);
    // An unregistered DPU must register before heartbeating.
    let e = b
        .agent("dpu-new")
        .await
        .heartbeat(pb::HeartbeatRequest { serial: "dpu-new".into(), applied_revision: 0 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains("register first"));
    b.stop().await;
}

conformance!(an_agent_watching_from_its_registration_revision_needs_no_resync);
/// Register answers a revision at or past the registration's own commit, even while the fan-out
/// is still behind it: watching from there neither replays the agent's own registration nor
/// costs it a snapshot, for first registrations and for re-registrations that change labels.
async fn an_agent_watching_from_its_registration_revision_needs_no_resync(b: TestBroker) {
    use futures::StreamExt;
    let broker = &b;
    let check = |serial: String, rack: &'static str| async move {
        let mut agent = broker.agent(&serial).await;
        let resp = agent
            .register(pb::RegisterRequest {
                serial: serial.clone(),
                labels: [("rack".to_string(), rack.to_string())].into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let own = resp.dpu.and_then(|d| d.metadata).unwrap().revision;
        assert!(resp.current_revision >= own, "{serial}: current {} below its own {own}", resp.current_revision);
        let mut stream = agent
            .watch_desired(pb::WatchDesiredRequest { serial: serial.clone(), since_revision: resp.current_revision })
            .await
            .unwrap()
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
        assert!(matches!(first.event, Some(E::Bookmark(_))), "{serial}: {first:?}");
    };
    for rack in ["r1", "r2"] {
        futures::stream::iter(0..48)
            .map(|i| check(format!("dpu-{i:02}"), rack))
            .buffer_unordered(48)
            .collect::<Vec<()>>()
            .await;
    }
    b.stop().await;
}

conformance!(a_fleet_that_lapses_at_once_is_swept_in_slices, config = short_leases);
/// More leases lapse at once than one sweep transaction takes: they are all marked, slice after
/// slice (other writes get in between), and each Dpu says so.
async fn a_fleet_that_lapses_at_once_is_swept_in_slices(b: TestBroker) {
    use futures::StreamExt;
    const FLEET: usize = 1_100;
    let broker = &b;
    futures::stream::iter(0..FLEET)
        .map(|i| async move { register(broker, &format!("dpu-{i:04}")).await })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    let mut admin = b.admin().await;
    let all_unknown = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let fleet = admin.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner();
            if fleet.dpus_unknown as usize == FLEET {
                return fleet;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("every lease is marked lapsed");
    assert_eq!(all_unknown.dpus_ready, 0);
    for serial in ["dpu-0000", "dpu-0550", "dpu-1099"] {
        let d = admin.get(pb::GetRequest { key: Some(key(pb::Kind::Dpu, "", serial)) }).await.unwrap().into_inner();
        let Some(pb::resource::Kind::Dpu(d)) = d.kind else { panic!("{serial} is not a Dpu") };
        assert_eq!(d.status.unwrap().lease_state, "Unknown", "{serial}");
    }
    b.stop().await;
}

conformance!(health_and_reflection_are_served);
async fn health_and_reflection_are_served(b: TestBroker) {
    let ch = b.channel("admin/test").await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    for service in ["", "xpu.broker.v1.AgentService", "xpu.broker.v1.HostService"] {
        let r =
            health.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "{service}");
    }
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else { panic!("{msg:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in [
        "xpu.broker.v1.AgentService",
        "xpu.broker.v1.SyncService",
        "xpu.broker.v1.HostService",
        "xpu.broker.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&s.to_string()), "{s} in {names:?}");
    }
    b.stop().await;
}

conformance!(a_dpu_snapshot_over_many_pages_holds_exactly_its_objects);
/// A snapshot longer than one page, with fabric kinds ordered before (LogicalBridge) and after
/// (Vrf) the Netdevs: the DPU gets each of its Netdevs and each fabric object exactly once, and
/// none of another DPU's Netdevs.
async fn a_dpu_snapshot_over_many_pages_holds_exactly_its_objects(b: TestBroker) {
    register(&b, "dpu-a").await;
    register(&b, "dpu-b").await;
    seed_network(&b, "net-a", "10.8.0.0/16", "10.8.0.1").await;
    let mut admin = b.admin().await;
    admin
        .apply(apply_req(pb::Resource {
            kind: Some(pb::resource::Kind::Vrf(pb::Vrf {
                metadata: meta("vrf-blue", ""),
                spec: Some(pb::VrfSpec {
                    vni: Some(500),
                    loopback_ip_prefix: "10.255.0.1/32".into(),
                    ..Default::default()
                }),
                status: None,
            })),
        }))
        .await
        .unwrap();
    let mut expected = vec!["lb-10".to_string(), "vrf-blue".to_string()];
    for vf in 0..1100 {
        let serial = if vf % 10 == 0 { "dpu-b" } else { "dpu-a" };
        let namespace = if vf % 3 == 0 { "team-x" } else { "default" };
        let nd = mk_netdev(namespace, serial, vf, "node-1", "net-a");
        admin.apply(apply_req(nd)).await.unwrap();
        if serial == "dpu-a" {
            expected.push(format!("{serial}-pf0-vf{vf}"));
        }
    }
    let mut stream = desired(&b, "dpu-a", 0).await;
    let mut names = Vec::new();
    loop {
        let ev = next_change(&mut stream, Duration::from_secs(10)).await.expect("the snapshot ends");
        match ev.event {
            Some(E::Change(c)) => {
                names.push(xpu_broker::model::convert::resource_key(c.object.as_ref().unwrap()).unwrap().name)
            }
            Some(E::SnapshotEnd(_)) => break,
            Some(E::Resync(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    let received = names.len();
    names.sort();
    names.dedup();
    assert_eq!(received, names.len(), "every object once");
    expected.sort();
    assert_eq!(names, expected);
    b.stop().await;
}
