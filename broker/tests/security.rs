//! mTLS and authorization: who may connect, and what each identity may read and write. Every
//! refusal leaves the store as it was.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use tonic::Code;
use xpu_broker::ca::{DevCa, IssueOptions};
use xpu_proto::broker::v1::{
    self as pb, admin_service_client::AdminServiceClient, agent_service_client::AgentServiceClient,
};

async fn head(b: &TestBroker) -> i64 {
    b.admin().await.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision
}

/// Connects with the given TLS settings and makes one admin call; returns the failure.
async fn admin_call_fails(b: &TestBroker, tls: tonic::transport::ClientTlsConfig) -> String {
    match b.channel_with(tls).await {
        Err(e) => format!("connect: {e}"),
        Ok(ch) => match AdminServiceClient::new(ch).fleet_status(pb::FleetStatusRequest {}).await {
            Ok(_) => panic!("the call must be refused"),
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
        },
    }
}

conformance!(only_verified_certificates_with_one_identity_get_in);
async fn only_verified_certificates_with_one_identity_get_in(b: TestBroker) {
    let ca = b.pki.ca.pem.cert.clone();

    // No client certificate.
    admin_call_fails(&b, b.tls_for(None, &ca)).await;

    // A certificate from another CA, with a valid-looking identity.
    let rogue = DevCa::generate("rogue CA").unwrap();
    let pem = rogue
        .issue_client(&xpu_broker::identity::Identity::Admin("x".into()), &IssueOptions::valid_for_days(1))
        .unwrap();
    admin_call_fails(&b, b.tls_for(Some(&pem), &ca)).await;

    // Expired and not yet valid.
    let now = time::OffsetDateTime::now_utc();
    let expired = IssueOptions {
        not_before: now - time::Duration::days(10),
        not_after: now - time::Duration::days(1),
        is_ca: false,
    };
    let pem = b.pki.ca.issue_client(&xpu_broker::identity::Identity::Admin("x".into()), &expired).unwrap();
    admin_call_fails(&b, b.tls_for(Some(&pem), &ca)).await;
    let future = IssueOptions {
        not_before: now + time::Duration::days(1),
        not_after: now + time::Duration::days(10),
        is_ca: false,
    };
    let pem = b.pki.ca.issue_client(&xpu_broker::identity::Identity::Admin("x".into()), &future).unwrap();
    admin_call_fails(&b, b.tls_for(Some(&pem), &ca)).await;

    // Signed by our CA but without an xpu:// identity, with two, or with a bad one.
    for uris in [vec![], vec!["spiffe://cluster/ns/x"], vec!["xpu://admin/a", "xpu://admin/b"], vec!["xpu://root/x"]] {
        let pem = b.pki.ca.issue_client_with_uris(&uris, &IssueOptions::valid_for_days(1)).unwrap();
        let err = admin_call_fails(&b, b.tls_for(Some(&pem), &ca)).await;
        assert!(err.starts_with("Unauthenticated"), "{uris:?}: {err}");
    }

    // A CA certificate is not a client identity.
    let ca_as_client = IssueOptions { is_ca: true, ..IssueOptions::valid_for_days(1) };
    let pem = b.pki.ca.issue_client(&xpu_broker::identity::Identity::Admin("x".into()), &ca_as_client).unwrap();
    admin_call_fails(&b, b.tls_for(Some(&pem), &ca)).await;
    b.stop().await;
}

conformance!(each_identity_reaches_only_its_own_objects);
async fn each_identity_reaches_only_its_own_objects(b: TestBroker) {
    seed_network(&b, "net-a", "10.8.0.0/24", "10.8.0.1").await;
    register(&b, "dpu-a").await;
    register(&b, "dpu-b").await;
    let mut admin = b.admin().await;
    admin.apply(apply_req(mk_netdev("pods", "dpu-b", 0, "node-b", "net-a"))).await.unwrap();
    let before = head(&b).await;

    // DPU A cannot act as B: register, heartbeat, watch, report.
    let mut a = b.agent("dpu-a").await;
    let e = a.register(pb::RegisterRequest { serial: "dpu-b".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "dpu dpu-a cannot act for dpu dpu-b");
    let e = a.heartbeat(pb::HeartbeatRequest { serial: "dpu-b".into(), applied_revision: 0 }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = a.watch_desired(pb::WatchDesiredRequest { serial: "dpu-b".into(), since_revision: 0 }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let k = key(pb::Kind::Netdev, "pods", "dpu-b-pf0-vf0");
    let e = a
        .report_status(pb::ReportStatusRequest {
            serial: "dpu-b".into(),
            reports: vec![report(k.clone(), 1, 1, netdev_status("Connected", ""))],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // …nor report, under its own name, for a netdev that belongs to B.
    let e = a
        .report_status(pb::ReportStatusRequest {
            serial: "dpu-a".into(),
            reports: vec![report(k.clone(), 1, 1, netdev_status("Connected", ""))],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("belongs to dpu dpu-b"), "{}", e.message());

    // Host node-a cannot attach, read or detach node-b's netdevs.
    let mut host_a = b.host("node-a").await;
    let e = host_a
        .attach_netdev(pb::AttachNetdevRequest {
            namespace: "pods".into(),
            spec: Some(mk_netdev_spec("dpu-b", 1, "node-b", "net-a")),
            timeout_ms: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "host node-a cannot attach netdevs of node node-b");
    // Claiming an existing netdev of node-b by naming itself as hostname is refused too.
    let e = host_a
        .attach_netdev(pb::AttachNetdevRequest {
            namespace: "pods".into(),
            spec: Some(mk_netdev_spec("dpu-b", 0, "node-a", "net-a")),
            timeout_ms: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = host_a
        .get_netdev(pb::GetNetdevRequest { namespace: "pods".into(), name: "dpu-b-pf0-vf0".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = host_a
        .detach_netdev(pb::DetachNetdevRequest { namespace: "pods".into(), name: "dpu-b-pf0-vf0".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // A tenant cluster cannot write fabric kinds or read DPUs; an infra cluster cannot write Netdevs.
    let mut tenant = b.sync("cluster/east/tenant").await;
    let e = tenant.apply(apply_req(mk_lb("lb-x", 20))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "cluster/east/tenant may not write LogicalBridge objects; it owns Netdev, FlowPolicy");
    let e = tenant.watch(pb::WatchRequest { kinds: vec![pb::Kind::Dpu as i32], since_revision: 0 }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = tenant
        .delete(pb::DeleteRequest { key: Some(key(pb::Kind::XpuNetwork, "", "net-a")), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut infra = b.sync("cluster/east/infra").await;
    let e = infra.apply(apply_req(mk_netdev("pods", "dpu-a", 5, "node-a", "net-a"))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Services are for their identities only.
    let e = AdminServiceClient::new(b.channel("cluster/east/infra").await)
        .fleet_status(pb::FleetStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = AgentServiceClient::new(b.channel("host/node-a").await)
        .register(pb::RegisterRequest { serial: "node-a".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut dpu_as_cluster =
        xpu_proto::broker::v1::sync_service_client::SyncServiceClient::new(b.channel("dpu/dpu-a").await);
    let e =
        dpu_as_cluster.list(pb::ListRequest { kind: pb::Kind::Netdev as i32, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    assert_eq!(head(&b).await, before, "no refused request wrote anything");

    // What each may do still works.
    let ok = tenant.apply(apply_req(mk_netdev("pods", "dpu-a", 6, "node-a", "net-a"))).await.unwrap();
    assert!(ok.into_inner().changed);
    infra.apply(apply_req(mk_lb("lb-y", 30))).await.unwrap();
    b.stop().await;
}
