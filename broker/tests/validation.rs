//! Every class of bad input gets INVALID_ARGUMENT naming the field, and writes nothing.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use xpu_proto::broker::v1::{self as pb, resource::Kind as R};

async fn head(b: &TestBroker) -> i64 {
    b.admin().await.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision
}

fn lb(name: &str, spec: pb::LogicalBridgeSpec) -> pb::Resource {
    pb::Resource {
        kind: Some(R::LogicalBridge(pb::LogicalBridge { metadata: meta(name, ""), spec: Some(spec), status: None })),
    }
}

fn network(spec: pb::XpuNetworkSpec) -> pb::Resource {
    pb::Resource {
        kind: Some(R::XpuNetwork(pb::XpuNetwork { metadata: meta("net-x", ""), spec: Some(spec), status: None })),
    }
}

fn netdev(ns: &str, name: &str, f: impl FnOnce(&mut pb::NetdevSpec)) -> pb::Resource {
    let mut spec = mk_netdev_spec("dpu-a", 0, "node-1", "net-a");
    f(&mut spec);
    pb::Resource { kind: Some(R::Netdev(pb::Netdev { metadata: meta(name, ns), spec: Some(spec), status: None })) }
}

fn pool(cidr: &str, gateway: &str) -> Option<pb::IpPool> {
    Some(pb::IpPool { cidr: cidr.into(), gateway: gateway.into(), ..Default::default() })
}

conformance!(bad_objects_are_refused_naming_the_field);
async fn bad_objects_are_refused_naming_the_field(b: TestBroker) {
    seed_network(&b, "net-a", "10.9.0.0/24", "10.9.0.1").await;
    let mut admin = b.admin().await;
    let before = head(&b).await;
    let ok_lb = pb::LogicalBridgeSpec { vlan_id: 10, ..Default::default() };
    let id = "dpu-a-pf0-vf0";
    let cases: Vec<(&str, pb::Resource)> = vec![
        // names and scope
        ("metadata.name", lb("Bad_Name", ok_lb.clone())),
        ("metadata.name", lb("", ok_lb.clone())),
        ("metadata.name", lb(&"a".repeat(254), ok_lb.clone())),
        ("metadata.namespace", netdev("", id, |_| {})),
        ("metadata.namespace", netdev("Pods", id, |_| {})),
        ("metadata.namespace", {
            let mut r = lb("lb-ns", ok_lb.clone());
            if let Some(R::LogicalBridge(l)) = r.kind.as_mut() {
                l.metadata.as_mut().unwrap().namespace = "pods".into();
            }
            r
        }),
        ("metadata.labels[\"-bad\"]", {
            let mut r = lb("lb-l", ok_lb.clone());
            if let Some(R::LogicalBridge(l)) = r.kind.as_mut() {
                l.metadata.as_mut().unwrap().labels.insert("-bad".into(), "x".into());
            }
            r
        }),
        // unknown kind / missing parts
        ("object", pb::Resource { kind: None }),
        ("spec", pb::Resource { kind: Some(R::Vrf(pb::Vrf { metadata: meta("v", ""), spec: None, status: None })) }),
        (
            "metadata",
            pb::Resource {
                kind: Some(R::Vrf(pb::Vrf { metadata: None, spec: Some(Default::default()), status: None })),
            },
        ),
        // VLAN / VNI ranges
        ("spec.vlanId", lb("lb-v", pb::LogicalBridgeSpec { vlan_id: 0, ..Default::default() })),
        ("spec.vlanId", lb("lb-v", pb::LogicalBridgeSpec { vlan_id: 4095, ..Default::default() })),
        ("spec.vni", lb("lb-v", pb::LogicalBridgeSpec { vlan_id: 5, vni: Some(1 << 24), ..Default::default() })),
        ("spec.vni", lb("lb-v", pb::LogicalBridgeSpec { vlan_id: 5, vni: Some(0), ..Default::default() })),
        // addresses, prefixes
        (
            "spec.vtepIpPrefix",
            lb("lb-v", pb::LogicalBridgeSpec { vlan_id: 5, vtep_ip_prefix: "10.0.0.1".into(), ..Default::default() }),
        ),
        ("spec.ipam.cidr", network(pb::XpuNetworkSpec { ipam: pool("10.0.0.0/33", ""), ..Default::default() })),
        ("spec.ipam.cidr", network(pb::XpuNetworkSpec { ipam: pool("10.0.0.1/24", ""), ..Default::default() })),
        (
            "spec.ipam.gateway",
            network(pb::XpuNetworkSpec { ipam: pool("10.0.0.0/24", "10.0.0.256"), ..Default::default() }),
        ),
        (
            "spec.ipam.gateway",
            network(pb::XpuNetworkSpec { ipam: pool("10.0.0.0/24", "10.0.1.1"), ..Default::default() }),
        ),
        (
            "spec.ipam.exclude[0]",
            network(pb::XpuNetworkSpec {
                ipam: Some(pb::IpPool {
                    cidr: "10.0.0.0/24".into(),
                    exclude: vec!["fd00::1".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        (
            "spec.routes[0].dst",
            network(pb::XpuNetworkSpec {
                routes: vec![pb::Route { dst: "x".into(), gw: String::new() }],
                ..Default::default()
            }),
        ),
        ("spec.mtu", network(pb::XpuNetworkSpec { mtu: 20, ..Default::default() })),
        ("spec.portType", network(pb::XpuNetworkSpec { port_type: "hybrid".into(), ..Default::default() })),
        // MACs and netdev fields
        ("spec.macAddress", netdev("pods", id, |s| s.mac_address = "zz:zz:zz:zz:zz:zz".into())),
        ("spec.macAddress", netdev("pods", id, |s| s.mac_address = "01:00:5e:00:00:01".into())),
        ("spec.netdevId", netdev("pods", "dpu-a-pf0-vf9", |_| {})),
        ("spec.netdevId", netdev("pods", "dpu-a-vf9", |s| s.netdev_id = "dpu-a-vf9".into())),
        ("spec.backend", netdev("pods", id, |s| s.backend = "sf".into())),
        ("spec.hostname", netdev("pods", id, |s| s.hostname = "Node_1".into())),
        (
            "spec.ipam.mode",
            netdev("pods", id, |s| s.ipam = Some(pb::NetdevIpam { mode: "dhcp".into(), ..Default::default() })),
        ),
        (
            "spec.ipam.address",
            netdev("pods", id, |s| s.ipam = Some(pb::NetdevIpam { mode: "host".into(), ..Default::default() })),
        ),
        (
            "spec.podRef.interface",
            netdev("pods", id, |s| s.pod_ref = Some(pb::PodRef { interface: "a/b".into(), ..Default::default() })),
        ),
        // references to missing objects
        ("spec.network", netdev("pods", id, |s| s.network = "nope".into())),
        ("spec.logicalBridges[0]", netdev("pods", id, |s| s.logical_bridges = vec!["lb-missing".into()])),
        (
            "spec.logicalBridges[0]",
            network(pb::XpuNetworkSpec { logical_bridges: vec!["lb-missing".into()], ..Default::default() }),
        ),
        (
            "spec.vrf",
            pb::Resource {
                kind: Some(R::Svi(pb::Svi {
                    metadata: meta("svi-1", ""),
                    spec: Some(pb::SviSpec {
                        vrf: "red".into(),
                        logical_bridge: "lb-10".into(),
                        gw_ip_prefix: vec!["10.9.0.1/24".into()],
                        ..Default::default()
                    }),
                    status: None,
                })),
            },
        ),
        (
            "spec.gwIpPrefix",
            pb::Resource {
                kind: Some(R::Svi(pb::Svi {
                    metadata: meta("svi-1", ""),
                    spec: Some(pb::SviSpec { vrf: "red".into(), logical_bridge: "lb-10".into(), ..Default::default() }),
                    status: None,
                })),
            },
        ),
        (
            "spec.loopbackIpPrefix",
            pb::Resource {
                kind: Some(R::Vrf(pb::Vrf { metadata: meta("red", ""), spec: Some(Default::default()), status: None })),
            },
        ),
        // flow rules
        (
            "spec.rules[0].dstPorts[0]",
            pb::Resource {
                kind: Some(R::FlowPolicy(pb::FlowPolicy {
                    metadata: meta("fp", "pods"),
                    spec: Some(pb::FlowPolicySpec {
                        rules: vec![pb::FlowRule {
                            name: "r".into(),
                            action: "deny".into(),
                            protocol: "tcp".into(),
                            dst_ports: vec![pb::PortRange { from: 0, to: 0 }],
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    status: None,
                })),
            },
        ),
        (
            "spec.rules[0].action",
            pb::Resource {
                kind: Some(R::FlowPolicy(pb::FlowPolicy {
                    metadata: meta("fp", "pods"),
                    spec: Some(pb::FlowPolicySpec {
                        rules: vec![pb::FlowRule { name: "r".into(), action: "drop".into(), ..Default::default() }],
                        ..Default::default()
                    }),
                    status: None,
                })),
            },
        ),
        // sizes
        (
            "spec",
            pb::Resource {
                kind: Some(R::FlowPolicy(pb::FlowPolicy {
                    metadata: meta("fp", "pods"),
                    spec: Some(pb::FlowPolicySpec {
                        rules: (0..1000)
                            .map(|i| pb::FlowRule {
                                name: format!("rule-{i}-{}", "x".repeat(50)),
                                action: "allow".into(),
                                src_prefix: "10.0.0.0/8".into(),
                                dst_prefix: "192.168.0.0/16".into(),
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    }),
                    status: None,
                })),
            },
        ),
        (
            "spec.dpuSelector.matchLabels",
            lb(
                "lb-big",
                pb::LogicalBridgeSpec {
                    vlan_id: 5,
                    dpu_selector: Some(pb::LabelSelector {
                        match_labels: (0..65).map(|i| (format!("k{i}"), "v".into())).collect(),
                    }),
                    ..Default::default()
                },
            ),
        ),
        (
            "spec.rules",
            pb::Resource {
                kind: Some(R::FlowPolicy(pb::FlowPolicy {
                    metadata: meta("fp", "pods"),
                    spec: Some(pb::FlowPolicySpec {
                        rules: (0..1025)
                            .map(|i| pb::FlowRule {
                                name: format!("r{i}"),
                                action: "allow".into(),
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    }),
                    status: None,
                })),
            },
        ),
    ];
    for (field, res) in cases {
        let err = admin.apply(apply_req(res)).await.expect_err(field);
        assert_invalid(&err, field);
    }
    // Dpu objects are the broker's to write.
    let dpu = pb::Resource {
        kind: Some(R::Dpu(pb::Dpu {
            metadata: meta("dpu-z", ""),
            spec: Some(pb::DpuSpec { serial: "dpu-z".into(), ..Default::default() }),
            status: None,
        })),
    };
    let e = admin.apply(apply_req(dpu)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert_eq!(head(&b).await, before, "nothing was written");
    b.stop().await;
}

conformance!(bad_requests_are_refused_naming_the_field);
async fn bad_requests_are_refused_naming_the_field(b: TestBroker) {
    seed_network(&b, "net-a", "10.10.0.0/24", "10.10.0.1").await;
    register(&b, "dpu-a").await;
    let mut admin = b.admin().await;
    admin.apply(apply_req(mk_netdev("pods", "dpu-a", 0, "node-1", "net-a"))).await.unwrap();
    let before = head(&b).await;

    // Keys and kinds.
    let e = admin
        .get(pb::GetRequest { key: Some(pb::ObjectKey { kind: 99, namespace: String::new(), name: "x".into() }) })
        .await
        .unwrap_err();
    assert_invalid(&e, "key.kind");
    let e = admin.get(pb::GetRequest { key: Some(key(pb::Kind::Unspecified, "", "x")) }).await.unwrap_err();
    assert_invalid(&e, "key.kind");
    let e = admin.get(pb::GetRequest { key: None }).await.unwrap_err();
    assert_invalid(&e, "key");
    let e = admin
        .delete(pb::DeleteRequest {
            key: Some(key(pb::Kind::Netdev, "pods", "x")),
            uid: "not-a-uuid".into(),
            expected_generation: 0,
        })
        .await
        .unwrap_err();
    assert_invalid(&e, "uid");
    let e = admin
        .list(pb::ListRequest { kind: pb::Kind::Netdev as i32, limit: 100_000, ..Default::default() })
        .await
        .unwrap_err();
    assert_invalid(&e, "limit");
    let e = admin
        .list(pb::ListRequest { kind: pb::Kind::Netdev as i32, continue_token: "zz".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_invalid(&e, "continueToken");
    let e = admin.watch(pb::WatchRequest { kinds: vec![42], since_revision: 0 }).await.unwrap_err();
    assert_invalid(&e, "kinds[0]");
    let e = admin.watch(pb::WatchRequest { kinds: vec![], since_revision: -1 }).await.unwrap_err();
    assert_invalid(&e, "sinceRevision");

    // Status reports.
    let mut agent = b.agent("dpu-a").await;
    let k = key(pb::Kind::Netdev, "pods", "dpu-a-pf0-vf0");
    let send = |r: pb::StatusReport| pb::ReportStatusRequest { serial: "dpu-a".into(), reports: vec![r] };
    let e = agent.report_status(send(report(k.clone(), 1, 1, netdev_status("Up", "")))).await.unwrap_err();
    assert_invalid(&e, "reports[0].status.phase");
    let e = agent.report_status(send(report(k.clone(), 1, 0, netdev_status("Connected", "")))).await.unwrap_err();
    assert_invalid(&e, "reports[0].seq");
    let e = agent
        .report_status(send(report(k.clone(), 1, 1, netdev_status("Connected", "10.1.1.1/99"))))
        .await
        .unwrap_err();
    assert_invalid(&e, "reports[0].status.ip");
    let e = agent
        .report_status(send(report(key(pb::Kind::XpuNetwork, "", "net-a"), 1, 1, netdev_status("Connected", ""))))
        .await
        .unwrap_err();
    assert_invalid(&e, "reports[0].key.kind");
    let mut wrong = report(k.clone(), 1, 1, netdev_status("Connected", ""));
    wrong.status = Some(pb::status_report::Status::Object(pb::DpuObjectStatus {
        phase: "Programmed".into(),
        ..Default::default()
    }));
    assert_invalid(&agent.report_status(send(wrong)).await.unwrap_err(), "reports[0].status.netdev");
    let e = agent
        .report_status(pb::ReportStatusRequest {
            serial: "dpu-a".into(),
            reports: (0..4097).map(|i| report(k.clone(), 1, i + 1, netdev_status("Connected", ""))).collect(),
        })
        .await
        .unwrap_err();
    assert_invalid(&e, "reports");
    let e = agent.heartbeat(pb::HeartbeatRequest { serial: "dpu-a".into(), applied_revision: -5 }).await.unwrap_err();
    assert_invalid(&e, "appliedRevision");
    let e = agent
        .register(pb::RegisterRequest {
            serial: "dpu-a".into(),
            tenant_node_name: "Node 1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&e, "tenantNodeName");

    // Host requests.
    let mut host = b.host("node-1").await;
    let e = host
        .attach_netdev(pb::AttachNetdevRequest { namespace: "pods".into(), spec: None, ..Default::default() })
        .await
        .unwrap_err();
    assert_invalid(&e, "spec");
    let e = host
        .attach_netdev(pb::AttachNetdevRequest {
            namespace: "".into(),
            spec: Some(mk_netdev_spec("dpu-a", 1, "node-1", "net-a")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&e, "namespace");
    let e = host
        .attach_netdev(pb::AttachNetdevRequest {
            namespace: "pods".into(),
            spec: Some(mk_netdev_spec("dpu-a", 1, "node-1", "net-a")),
            labels: [("a b".to_string(), "c".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&e, "labels[\"a b\"]");
    let e = host.get_netdev(pb::GetNetdevRequest { namespace: "pods".into(), name: "".into() }).await.unwrap_err();
    assert_invalid(&e, "name");

    assert_eq!(head(&b).await, before, "nothing was written");
    b.stop().await;
}

conformance!(empty_and_oversized_messages_never_crash_the_broker);
async fn empty_and_oversized_messages_never_crash_the_broker(b: TestBroker) {
    let mut admin = b.admin().await;
    let mut agent = b.agent("dpu-a").await;
    let mut host = b.host("node-1").await;
    let mut sync = b.sync("cluster/c/tenant").await;
    // Every RPC with an empty request answers with a status, never a crash.
    assert!(admin.get(pb::GetRequest::default()).await.is_err());
    assert!(admin.list(pb::ListRequest::default()).await.is_err());
    assert!(admin.apply(pb::ApplyRequest::default()).await.is_err());
    assert!(admin.delete(pb::DeleteRequest::default()).await.is_err());
    assert!(admin.decommission_dpu(pb::DecommissionDpuRequest::default()).await.is_err());
    assert!(agent.heartbeat(pb::HeartbeatRequest::default()).await.is_err(), "not registered");
    assert!(agent.watch_desired(pb::WatchDesiredRequest::default()).await.is_ok_and(|_| true));
    assert!(agent.report_status(pb::ReportStatusRequest::default()).await.is_ok(), "an empty report is fine");
    assert!(host.attach_netdev(pb::AttachNetdevRequest::default()).await.is_err());
    assert!(host.detach_netdev(pb::DetachNetdevRequest::default()).await.is_err());
    assert!(sync.apply(pb::ApplyRequest::default()).await.is_err());
    // A message larger than the configured cap is refused by the transport.
    let huge = mk_lb(&"a".repeat(63), 5);
    let mut huge = huge;
    if let Some(R::LogicalBridge(l)) = huge.kind.as_mut() {
        l.metadata.as_mut().unwrap().labels.insert("x".into(), "y".repeat(5 * 1024 * 1024));
    }
    let e = admin.apply(apply_req(huge)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("message length too large"), "{e:?}");
    // …and the broker keeps serving.
    admin.fleet_status(pb::FleetStatusRequest {}).await.unwrap();
    b.stop().await;
}
