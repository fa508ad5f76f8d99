//! The linux dataplane end to end: the real broker, the real `dpu-agent` inside a "DPU" network
//! namespace, and two "pod" namespaces whose VFs are veth pairs with the representor end in the
//! DPU namespace. Pods must ping each other and their gateway through what the agent programmed.

#![allow(clippy::unwrap_used)]

fn agent_bin() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_dpu-agent"))
}

use std::time::Duration;

use sqlx::PgPool;
use xpu_proto::broker::v1::{
    self as pb, admin_service_client::AdminServiceClient, host_service_client::HostServiceClient,
};
use xpu_testkit::*;

const SERIAL: &str = "bf3-e2e";

#[sqlx::test(migrations = "../migrations/postgres")]
async fn pods_ping_through_the_linux_dataplane_and_flow_rules_count(pool: PgPool) {
    let topo = Topology::new(2);
    let pki = Pki::new(&[&topo.root_ip]);
    let broker = Broker::start(pool.clone(), &pki, 0).await;
    let mut admin = AdminServiceClient::new(pki.channel(broker.grpc, "admin/test").await);
    let mut host = HostServiceClient::new(pki.channel(broker.grpc, "host/node-1").await);
    seed_fabric(&mut admin).await;

    let state = tempfile::tempdir().unwrap();
    let certs = pki.issue(&format!("dpu/{SERIAL}"));
    let url = format!("https://{}:{}", topo.root_ip, broker.grpc.port());
    let agent = Agent::spawn(
        &agent_bin(),
        Some(&topo.dpu),
        &url,
        &certs,
        SERIAL,
        state.path(),
        &["--dataplane", "linux", "--label", "rack=r1"],
    );

    // The fabric is programmed on the DPU and reported per DPU.
    for (kind, name) in [(pb::Kind::LogicalBridge, "lb-10"), (pb::Kind::Vrf, "blue"), (pb::Kind::Svi, "svi-10")] {
        let st = eventually(Duration::from_secs(20), name, || {
            let mut admin = admin.clone();
            async move { dpu_status(&mut admin, kind, "", name, SERIAL).await.filter(|s| s.phase != "Pending") }
        })
        .await;
        assert_eq!(st.phase, "Programmed", "{name}: {st:?}\n{}", agent.log_text());
    }
    let caps = match get(&mut admin, pb::Kind::Dpu, "", SERIAL).await.unwrap().kind.unwrap() {
        pb::resource::Kind::Dpu(d) => d.status.unwrap().inventory.unwrap().capabilities,
        _ => panic!(),
    };
    assert_eq!(caps.get("nftables-netdev-ingress"), Some(&true), "{caps:?}");
    assert!(caps.contains_key("bridge-vlan-filtering"), "the probe reports what the kernel lacks too: {caps:?}");

    // Two pods attach; AttachNetdev returns once the DPU reports Connected.
    let mut pods = Vec::new();
    for vf in 0..2u32 {
        let resp = attach(&mut host, SERIAL, vf, "node-1")
            .await
            .unwrap_or_else(|e| panic!("attach vf{vf}: {e:?}\n{}", agent.log_text()));
        let att = resp.attachment.unwrap();
        assert_eq!(resp.netdev.unwrap().status.unwrap().phase, "Connected");
        topo.configure_pod(vf as usize, &att.address, &att.gateway, &att.mac_address);
        pods.push(att.address.split('/').next().unwrap().to_string());
    }
    let bridge = topo.in_dpu("ip -j link show dev pf0vf0");
    assert!(bridge.contains("\"master\":\"xb"), "the representor is a port of the LogicalBridge's bridge: {bridge}");
    assert!(topo.ping(0, &pods[1]), "pod0 → pod1");
    assert!(topo.ping(1, &pods[0]), "pod1 → pod0");
    assert!(topo.ping(0, "10.10.0.1"), "pod0 → its gateway (the Svi)");

    // A FlowPolicy denying ICMP between them: ping fails, the rule's counter rises.
    admin
        .apply(apply(pb::resource::Kind::FlowPolicy(pb::FlowPolicy {
            metadata: meta("no-ping", "pods"),
            spec: Some(pb::FlowPolicySpec {
                netdev_selector: Some(pb::LabelSelector {
                    match_labels: [("app".to_string(), "web".to_string())].into(),
                }),
                rules: vec![pb::FlowRule {
                    name: "deny-icmp".into(),
                    priority: 10,
                    action: "deny".into(),
                    protocol: "icmp".into(),
                    dst_prefix: "10.10.0.0/24".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: None,
        })))
        .await
        .unwrap();
    let st = eventually(Duration::from_secs(15), "flow policy programmed", || {
        let mut admin = admin.clone();
        async move {
            dpu_status(&mut admin, pb::Kind::FlowPolicy, "pods", "no-ping", SERIAL)
                .await
                .filter(|s| s.phase == "Programmed")
        }
    })
    .await;
    assert_eq!(st.rules[0].offload, "software", "this kernel has no offload: the slow path is reported honestly");
    assert!(st.rules[0].programmed);
    assert!(!topo.ping(0, &pods[1]), "ICMP is denied");
    let counted = eventually(Duration::from_secs(10), "the rule's counter to rise", || {
        let mut admin = admin.clone();
        async move {
            dpu_status(&mut admin, pb::Kind::FlowPolicy, "pods", "no-ping", SERIAL)
                .await
                .map(|s| s.rules[0].packets)
                .filter(|p| *p >= 2)
        }
    })
    .await;
    assert!(counted >= 2);

    // A bad object (a trunk port this kernel cannot do) is an Error with the reason; the others
    // stay programmed and the agent keeps running.
    let mut trunk = pb::NetdevSpec {
        netdev_id: format!("{SERIAL}-pf0-vf7"),
        hostname: "node-1".into(),
        network: "tenant-a".into(),
        port_type: "trunk".into(),
        ..Default::default()
    };
    trunk.logical_bridges = vec!["lb-10".into()];
    let err = host
        .attach_netdev(pb::AttachNetdevRequest {
            namespace: "pods".into(),
            spec: Some(trunk),
            timeout_ms: 15_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("VLAN filtering"), "{}", err.message());
    let vf0 = netdev_status(&mut admin, "pods", &format!("{SERIAL}-pf0-vf0")).await.unwrap();
    assert_eq!(vf0.phase, "Connected");

    // Delete the policy and the netdevs: rules and ports go, tombstones are acknowledged.
    admin
        .delete(pb::DeleteRequest {
            key: Some(pb::ObjectKey {
                kind: pb::Kind::FlowPolicy as i32,
                namespace: "pods".into(),
                name: "no-ping".into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    for vf in [0, 1, 7] {
        host.detach_netdev(pb::DetachNetdevRequest { namespace: "pods".into(), name: format!("{SERIAL}-pf0-vf{vf}") })
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(15), "ports and rules removed", || {
        let topo = &topo;
        async move {
            let released = ["pf0vf0", "pf0vf1"]
                .iter()
                .all(|r| !topo.in_dpu(&format!("ip -j link show dev {r}")).contains("\"master\""));
            let no_rules = !topo.in_dpu("nft list tables netdev").contains("xpu_");
            (released && no_rules).then_some(())
        }
    })
    .await;
    let pending: i64 = eventually(Duration::from_secs(10), "tombstones acknowledged", || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM statuses s JOIN objects o USING (kind, namespace, name) WHERE o.deleted_revision IS NOT NULL",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (n == 0).then_some(n)
        }
    })
    .await;
    assert_eq!(pending, 0);
    drop(agent);
    broker.stop().await;
}
