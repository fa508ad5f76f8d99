//! The attach round trip, stale-status and stale-spec refusal, and broker IPAM, over the real
//! gRPC API.

#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::HashSet, time::Duration};

use common::*;
use xpu_proto::broker::v1::{self as pb, watch_event::Event as E};

fn netdev_of(res: &pb::Resource) -> pb::Netdev {
    match res.kind.clone() {
        Some(pb::resource::Kind::Netdev(n)) => n,
        other => panic!("not a netdev: {other:?}"),
    }
}

async fn get_netdev(b: &TestBroker, ns: &str, name: &str) -> pb::Netdev {
    let res = b.admin().await.get(pb::GetRequest { key: Some(key(pb::Kind::Netdev, ns, name)) }).await.unwrap();
    netdev_of(&res.into_inner())
}

conformance!(attach_returns_connected_once_the_dpu_reports);
async fn attach_returns_connected_once_the_dpu_reports(b: TestBroker) {
    seed_network(&b, "net-a", "10.3.0.0/24", "10.3.0.1").await;
    register(&b, "dpu-a").await;
    let mut agent = b.agent("dpu-a").await;
    let mut desired = agent
        .watch_desired(pb::WatchDesiredRequest { serial: "dpu-a".into(), since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    // Written after the snapshot, the netdev comes as a live change.
    snapshot_end(&mut desired).await;

    let mut host = b.host("node-1").await;
    let spec = mk_netdev_spec("dpu-a", 7, "node-1", "net-a");
    let name = spec.netdev_id.clone();
    let attach = {
        let mut host = host.clone();
        let spec = spec.clone();
        tokio::spawn(async move {
            host.attach_netdev(pb::AttachNetdevRequest {
                namespace: "pods".into(),
                spec: Some(spec),
                labels: [("app".to_string(), "web".to_string())].into(),
                timeout_ms: 10_000,
            })
            .await
        })
    };
    // The agent receives the netdev with the broker-allocated address.
    let nd = loop {
        let ev = next_change(&mut desired, Duration::from_secs(5)).await.expect("desired change");
        if let Some(E::Change(c)) = ev.event
            && c.r#type == pb::ChangeType::Spec as i32
        {
            break netdev_of(c.object.as_ref().unwrap());
        }
    };
    let nd_spec = nd.spec.clone().unwrap();
    assert_eq!(nd_spec.ipam.as_ref().unwrap().address, "10.3.0.2/24");
    assert_eq!(nd_spec.ipam.as_ref().unwrap().gateway, "10.3.0.1");
    assert_eq!(nd_spec.logical_bridges, vec!["lb-10"], "defaults come from the network");
    assert_eq!(nd_spec.port_type, "access");
    assert!(!nd_spec.mac_address.is_empty(), "the broker generates a MAC when none is given");
    let meta = nd.metadata.unwrap();
    assert!(!attach.is_finished(), "attach waits for the DPU");

    // Connecting first (not done), then Connected.
    let k = key(pb::Kind::Netdev, "pods", &name);
    agent
        .report_status(pb::ReportStatusRequest {
            serial: "dpu-a".into(),
            reports: vec![report(k.clone(), meta.generation, 1, netdev_status("Connecting", ""))],
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!attach.is_finished(), "Connecting is not Connected");
    let mut st = netdev_status("Connected", "10.3.0.2/24");
    st.mac_address = nd_spec.mac_address.clone();
    let r = agent
        .report_status(pb::ReportStatusRequest {
            serial: "dpu-a".into(),
            reports: vec![report(k.clone(), meta.generation, 2, st)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results[0].outcome, pb::ReportOutcome::Accepted as i32);
    let resp = tokio::time::timeout(Duration::from_secs(5), attach).await.unwrap().unwrap().unwrap().into_inner();
    let att = resp.attachment.unwrap();
    assert_eq!(att.address, "10.3.0.2/24");
    assert_eq!(att.gateway, "10.3.0.1");
    assert_eq!(att.mtu, 1500);
    assert_eq!(att.mac_address, nd_spec.mac_address);
    let status = resp.netdev.unwrap().status.unwrap();
    assert_eq!(status.phase, "Connected");
    assert_eq!(status.dpu, "dpu-a");

    // A repeat is idempotent: same address, same generation, answers at once.
    let again = host
        .attach_netdev(pb::AttachNetdevRequest {
            namespace: "pods".into(),
            spec: Some(spec),
            labels: [("app".to_string(), "web".to_string())].into(),
            timeout_ms: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.attachment.unwrap().address, "10.3.0.2/24");
    assert_eq!(again.netdev.unwrap().metadata.unwrap().generation, meta.generation);
    b.stop().await;
}

conformance!(attach_times_out_cleanly_and_fails_on_dpu_error);
async fn attach_times_out_cleanly_and_fails_on_dpu_error(b: TestBroker) {
    seed_network(&b, "net-a", "10.4.0.0/24", "10.4.0.1").await;
    register(&b, "dpu-a").await;
    let mut host = b.host("node-1").await;
    let spec = mk_netdev_spec("dpu-a", 1, "node-1", "net-a");
    let started = std::time::Instant::now();
    let err = host
        .attach_netdev(pb::AttachNetdevRequest {
            namespace: "pods".into(),
            spec: Some(spec.clone()),
            timeout_ms: 300,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
    assert!(err.message().contains("keeps converging"), "{}", err.message());
    assert!(started.elapsed() < Duration::from_secs(3));
    // The netdev stays, pending.
    let nd = get_netdev(&b, "pods", &spec.netdev_id).await;
    assert_eq!(nd.status.unwrap().phase, "Pending");

    // The DPU rejects it: the next attach fails with the DPU's reason.
    let mut agent = b.agent("dpu-a").await;
    let mut st = netdev_status("Error", "");
    st.message = "bridge lb-10 refused the port: MAC already in use".into();
    agent
        .report_status(pb::ReportStatusRequest {
            serial: "dpu-a".into(),
            reports: vec![report(key(pb::Kind::Netdev, "pods", &spec.netdev_id), 1, 1, st)],
        })
        .await
        .unwrap();
    let err = host
        .attach_netdev(pb::AttachNetdevRequest {
            namespace: "pods".into(),
            spec: Some(spec),
            timeout_ms: 2000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("MAC already in use"), "{}", err.message());
    b.stop().await;
}

conformance!(stale_status_is_dropped_and_stale_spec_refused);
async fn stale_status_is_dropped_and_stale_spec_refused(b: TestBroker) {
    seed_network(&b, "net-a", "10.5.0.0/24", "10.5.0.1").await;
    register(&b, "dpu-a").await;
    let mut admin = b.admin().await;
    let created = admin.apply(apply_req(mk_netdev("pods", "dpu-a", 2, "node-1", "net-a"))).await.unwrap().into_inner();
    let name = netdev_of(created.object.as_ref().unwrap()).metadata.unwrap().name;
    let k = key(pb::Kind::Netdev, "pods", &name);

    // Spec change → generation 2.
    let mut changed = mk_netdev("pods", "dpu-a", 2, "node-1", "net-a");
    if let Some(pb::resource::Kind::Netdev(n)) = changed.kind.as_mut() {
        n.spec.as_mut().unwrap().mtu = 9000;
    }
    let r = admin.apply(pb::ApplyRequest { object: Some(changed.clone()), expected_generation: 1 }).await.unwrap();
    assert_eq!(netdev_of(r.get_ref().object.as_ref().unwrap()).metadata.unwrap().generation, 2);
    // A write based on generation 1 is now stale.
    let err =
        admin.apply(pb::ApplyRequest { object: Some(changed.clone()), expected_generation: 1 }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Aborted);
    assert!(err.message().contains("generation 2"), "{}", err.message());
    // Same spec again: no change, no new generation.
    let same = admin.apply(apply_req(changed)).await.unwrap().into_inner();
    assert!(!same.changed);

    let mut agent = b.agent("dpu-a").await;
    let send = |seq: u64, generation: i64, phase: &str| pb::ReportStatusRequest {
        serial: "dpu-a".into(),
        reports: vec![report(k.clone(), generation, seq, netdev_status(phase, "10.5.0.2/24"))],
    };
    let outcome = |r: pb::ReportStatusResponse| pb::ReportOutcome::try_from(r.results[0].outcome).unwrap();
    assert_eq!(
        outcome(agent.report_status(send(10, 2, "Connected")).await.unwrap().into_inner()),
        pb::ReportOutcome::Accepted
    );
    // Older sequence number: dropped.
    assert_eq!(outcome(agent.report_status(send(9, 2, "Error")).await.unwrap().into_inner()), pb::ReportOutcome::Stale);
    // Same sequence number again: dropped.
    assert_eq!(
        outcome(agent.report_status(send(10, 2, "Error")).await.unwrap().into_inner()),
        pb::ReportOutcome::Stale
    );
    // Newer sequence but older observed generation: dropped.
    assert_eq!(
        outcome(agent.report_status(send(11, 1, "Error")).await.unwrap().into_inner()),
        pb::ReportOutcome::Stale
    );
    // A generation the object never had: dropped.
    assert_eq!(
        outcome(agent.report_status(send(12, 3, "Error")).await.unwrap().into_inner()),
        pb::ReportOutcome::Stale
    );
    // Identical status: nothing written.
    assert_eq!(
        outcome(agent.report_status(send(13, 2, "Connected")).await.unwrap().into_inner()),
        pb::ReportOutcome::Unchanged
    );
    let nd = get_netdev(&b, "pods", &name).await;
    let st = nd.status.unwrap();
    assert_eq!(st.phase, "Connected");
    assert_eq!(st.observed_generation, 2);

    // Re-registering tells the agent where its sequence numbers stand.
    let reg = agent.register(pb::RegisterRequest { serial: "dpu-a".into(), ..Default::default() }).await.unwrap();
    assert_eq!(reg.into_inner().last_status_seq, 10);
    b.stop().await;
}

conformance!(dpus_re_registering_together_each_learn_their_own_last_sequence_number);
/// Registrations arriving together are decided in one batch, which reads every registering
/// DPU's last status sequence number at once: each must get its own.
async fn dpus_re_registering_together_each_learn_their_own_last_sequence_number(b: TestBroker) {
    use futures::StreamExt;
    const DPUS: u64 = 24;
    seed_network(&b, "net-a", "10.6.0.0/24", "10.6.0.1").await;
    let mut admin = b.admin().await;
    let broker = &b;
    for i in 0..DPUS {
        let serial = format!("dpu-{i:02}");
        register(&b, &serial).await;
        let created =
            admin.apply(apply_req(mk_netdev("pods", &serial, 1, "node-1", "net-a"))).await.unwrap().into_inner();
        let name = netdev_of(created.object.as_ref().unwrap()).metadata.unwrap().name;
        // DPU i has reported up to sequence number 100 + i (every third one: none at all).
        if i % 3 != 0 {
            let reports =
                vec![report(key(pb::Kind::Netdev, "pods", &name), 1, 100 + i, netdev_status("Connected", ""))];
            let r = b.agent(&serial).await.report_status(pb::ReportStatusRequest { serial, reports }).await.unwrap();
            assert_eq!(r.into_inner().results[0].outcome, pb::ReportOutcome::Accepted as i32);
        }
    }
    let answers: Vec<(u64, u64)> = futures::stream::iter(0..DPUS)
        .map(|i| async move {
            let serial = format!("dpu-{i:02}");
            let reg = broker
                .agent(&serial)
                .await
                .register(pb::RegisterRequest { serial, ..Default::default() })
                .await
                .unwrap()
                .into_inner();
            (i, reg.last_status_seq)
        })
        .buffer_unordered(DPUS as usize)
        .collect()
        .await;
    for (i, seq) in answers {
        let expected = if i % 3 == 0 { 0 } else { 100 + i };
        assert_eq!(seq, expected, "dpu-{i:02}");
    }
    b.stop().await;
}

conformance!(concurrent_attaches_never_share_an_address_and_exhaustion_is_clear);
async fn concurrent_attaches_never_share_an_address_and_exhaustion_is_clear(b: TestBroker) {
    // A /27 holds 30 host addresses; the gateway and the exclusions leave 26.
    let mut admin = b.admin().await;
    admin.apply(apply_req(mk_lb("lb-10", 10))).await.unwrap();
    let mut net = mk_network("small", "lb-10", "10.6.0.0/27", "10.6.0.1");
    if let Some(pb::resource::Kind::XpuNetwork(n)) = net.kind.as_mut() {
        n.spec.as_mut().unwrap().ipam.as_mut().unwrap().exclude = vec!["10.6.0.10".into(), "10.6.0.20/31".into()];
    }
    admin.apply(apply_req(net)).await.unwrap();

    // 40 attaches from 4 hosts at once on a pool of 26: 26 distinct addresses, 14 clear refusals.
    let mut tasks = Vec::new();
    for h in 0..4u32 {
        let host = b.host(&format!("node-{h}")).await;
        for i in 0..10u32 {
            let mut host = host.clone();
            let spec = mk_netdev_spec(&format!("dpu-{h}"), i, &format!("node-{h}"), "small");
            tasks.push(tokio::spawn(async move {
                host.attach_netdev(pb::AttachNetdevRequest {
                    namespace: "pods".into(),
                    spec: Some(spec),
                    timeout_ms: 1,
                    ..Default::default()
                })
                .await
            }));
        }
    }
    let mut exhausted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Err(e) if e.code() == tonic::Code::DeadlineExceeded => {}
            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                assert!(e.message().contains("address pool of XpuNetwork small is exhausted"), "{}", e.message());
                exhausted += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(exhausted, 14);
    let list = admin
        .list(pb::ListRequest { kind: pb::Kind::Netdev as i32, limit: 1000, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let addrs: Vec<String> = list.items.iter().map(|r| netdev_of(r).spec.unwrap().ipam.unwrap().address).collect();
    assert_eq!(addrs.len(), 26);
    let unique: HashSet<&String> = addrs.iter().collect();
    assert_eq!(unique.len(), 26, "no address handed out twice: {addrs:?}");
    for bad in ["10.6.0.1/27", "10.6.0.10/27", "10.6.0.20/27", "10.6.0.21/27", "10.6.0.0/27", "10.6.0.31/27"] {
        assert!(!unique.contains(&bad.to_string()), "{bad} must never be handed out");
    }
    let network =
        admin.get(pb::GetRequest { key: Some(key(pb::Kind::XpuNetwork, "", "small")) }).await.unwrap().into_inner();
    let Some(pb::resource::Kind::XpuNetwork(n)) = network.kind else { panic!() };
    assert_eq!(n.status.unwrap(), pb::XpuNetworkStatus { allocated: 26, capacity: 26 });

    // The database, not the allocator, is what guarantees uniqueness.
    let dup = b
        .execute_sql(
            "INSERT INTO ip_allocations (network, address, namespace, name, revision) \
             SELECT network, address, 'x', 'y', 0 FROM ip_allocations LIMIT 1",
        )
        .await;
    assert!(dup.is_err(), "a second allocation of one address violates the primary key");

    // Releasing one address makes room again; a network in use cannot be deleted.
    let victim = list.items[0].clone();
    let vm = netdev_of(&victim).metadata.unwrap();
    admin
        .delete(pb::DeleteRequest { key: Some(key(pb::Kind::Netdev, &vm.namespace, &vm.name)), ..Default::default() })
        .await
        .unwrap();
    let err = admin
        .delete(pb::DeleteRequest { key: Some(key(pb::Kind::XpuNetwork, "", "small")), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("in use by 25 netdevs"), "{}", err.message());
    let mut host = b.host("node-9").await;
    let err = host
        .attach_netdev(pb::AttachNetdevRequest {
            namespace: "pods".into(),
            spec: Some(mk_netdev_spec("dpu-9", 0, "node-9", "small")),
            timeout_ms: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "an address was free again: {err:?}");
    b.stop().await;
}

conformance!(host_mode_addresses_are_reserved_in_the_pool);
async fn host_mode_addresses_are_reserved_in_the_pool(b: TestBroker) {
    seed_network(&b, "net-a", "10.7.0.0/24", "10.7.0.1").await;
    let mut host = b.host("node-1").await;
    let mut spec = mk_netdev_spec("dpu-a", 0, "node-1", "net-a");
    spec.ipam = Some(pb::NetdevIpam { mode: "host".into(), address: "10.7.0.50/24".into(), gateway: String::new() });
    let err = host
        .attach_netdev(pb::AttachNetdevRequest {
            namespace: "pods".into(),
            spec: Some(spec.clone()),
            timeout_ms: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
    let mut other = mk_netdev_spec("dpu-a", 1, "node-1", "net-a");
    other.ipam = spec.ipam.clone();
    let err = host
        .attach_netdev(pb::AttachNetdevRequest {
            namespace: "pods".into(),
            spec: Some(other),
            timeout_ms: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert!(
        err.message().contains("10.7.0.50 of XpuNetwork net-a is in use by netdev pods/dpu-a-pf0-vf0"),
        "{}",
        err.message()
    );
    // The same id in another namespace is refused: one VF, one Netdev.
    let err = host
        .attach_netdev(pb::AttachNetdevRequest {
            namespace: "other".into(),
            spec: Some(spec),
            timeout_ms: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    b.stop().await;
}

conformance!(the_allocator_finds_freed_addresses_past_many_taken_ones);
/// The allocator is next-fit from the pool's stored offset: with the pool full but for two freed
/// addresses far apart, new Netdevs get exactly those two (the search wraps around and crosses
/// windows of addresses that are all taken), and the next one is refused as exhausted.
async fn the_allocator_finds_freed_addresses_past_many_taken_ones(b: TestBroker) {
    // A /25 holds 126 host addresses; the gateway leaves 125.
    seed_network(&b, "wide", "10.9.0.0/25", "10.9.0.1").await;
    let mut admin = b.admin().await;
    let name = |i: u32| (format!("dpu-{}", i / 50), i % 50);
    // Concurrent writes land in shared transactions as well as in their own.
    let mut tasks = Vec::new();
    for i in 0..125u32 {
        let mut admin = admin.clone();
        let (serial, vf) = name(i);
        tasks.push(tokio::spawn(async move {
            let res = admin.apply(apply_req(mk_netdev("pods", &serial, vf, "node-1", "wide"))).await.unwrap();
            netdev_of(&res.into_inner().object.unwrap()).spec.unwrap().ipam.unwrap().address
        }));
    }
    let mut by_address = std::collections::HashMap::new();
    for (i, t) in (0u32..).zip(tasks) {
        assert!(by_address.insert(t.await.unwrap(), i).is_none(), "an address handed out twice");
    }
    assert_eq!(by_address.len(), 125);
    // Free two addresses far apart (.4 and .100), then ask for two more and one too many.
    let mut freed = Vec::new();
    for addr in ["10.9.0.4/25", "10.9.0.100/25"] {
        let (serial, vf) = name(by_address[addr]);
        admin
            .delete(pb::DeleteRequest {
                key: Some(key(pb::Kind::Netdev, "pods", &format!("{serial}-pf0-vf{vf}"))),
                ..Default::default()
            })
            .await
            .unwrap();
        freed.push(addr.to_string());
    }
    let mut got = Vec::new();
    for vf in 0..2u32 {
        let res = admin.apply(apply_req(mk_netdev("pods", "dpu-new", vf, "node-1", "wide"))).await.unwrap();
        got.push(netdev_of(&res.into_inner().object.unwrap()).spec.unwrap().ipam.unwrap().address);
    }
    got.sort();
    freed.sort();
    assert_eq!(got, freed);
    let err = admin.apply(apply_req(mk_netdev("pods", "dpu-new", 2, "node-1", "wide"))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("address pool of XpuNetwork wide is exhausted"), "{}", err.message());
    b.stop().await;
}
