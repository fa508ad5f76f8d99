//! The agent across failures: a restart resumes from its persisted revision (no full resync)
//! and removes orphans; a broker outage leaves the dataplane untouched; a certificate for one
//! DPU cannot act for another.

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

async fn programmed(
    admin: &AdminServiceClient<tonic::transport::Channel>,
    kind: pb::Kind,
    name: &'static str,
    serial: &'static str,
) {
    eventually(Duration::from_secs(20), name, || {
        let mut admin = admin.clone();
        async move { dpu_status(&mut admin, kind, "", name, serial).await.filter(|s| s.phase == "Programmed") }
    })
    .await;
}

fn persisted_revision(dir: &std::path::Path) -> i64 {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap();
    v["revision"].as_i64().unwrap()
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn a_restarted_agent_resumes_from_its_revision_and_removes_orphans(pool: PgPool) {
    const SERIAL: &str = "bf3-restart";
    let topo = Topology::new(0);
    let pki = Pki::new(&[&topo.root_ip]);
    let broker = Broker::start(pool, &pki, 0).await;
    let mut admin = AdminServiceClient::new(pki.channel(broker.grpc, "admin/test").await);
    seed_fabric(&mut admin).await;
    let state = tempfile::tempdir().unwrap();
    let certs = pki.issue(&format!("dpu/{SERIAL}"));
    let url = format!("https://{}:{}", topo.root_ip, broker.grpc.port());
    let mut agent = Agent::spawn(&agent_bin(), Some(&topo.dpu), &url, &certs, SERIAL, state.path(), &[]);
    programmed(&admin, pb::Kind::Svi, "svi-10", SERIAL).await;
    // Let a bookmark reach it and be persisted, then kill it hard.
    tokio::time::sleep(Duration::from_millis(800)).await;
    agent.kill();
    let revision = persisted_revision(state.path());
    assert!(revision > 0);

    // While it is down: a new bridge is desired, and a stray device carrying our mark appears.
    admin
        .apply(apply(pb::resource::Kind::LogicalBridge(pb::LogicalBridge {
            metadata: meta("lb-20", ""),
            spec: Some(pb::LogicalBridgeSpec { vlan_id: 20, ..Default::default() }),
            status: None,
        })))
        .await
        .unwrap();
    topo.in_dpu("ip link add xbdeadbeef type bridge");
    topo.in_dpu("ip link set dev xbdeadbeef alias xpu:LogicalBridge/ghost");
    let before_restart = std::fs::read_to_string(&agent.log).unwrap().len();

    let agent = Agent::spawn(&agent_bin(), Some(&topo.dpu), &url, &certs, SERIAL, state.path(), &[]);
    programmed(&admin, pb::Kind::LogicalBridge, "lb-20", SERIAL).await;
    eventually(Duration::from_secs(10), "the orphan removed", || {
        let gone = !topo.in_dpu("ip -j link show").contains("xbdeadbeef");
        async move { gone.then_some(()) }
    })
    .await;
    let log = agent.log_text()[before_restart..].to_string();
    assert!(log.contains("resuming from the persisted state"), "{log}");
    assert!(log.contains(&format!("since_revision={revision}")), "it asks for exactly its revision: {log}");
    assert!(!log.contains("sends a snapshot"), "no full resync: {log}");
    assert!(log.contains("removing an orphan") && log.contains("ghost"), "{log}");
    // The fabric it had was kept (re-applied idempotently), not torn down.
    assert!(topo.in_dpu("ip -j link show").contains("xpu:LogicalBridge/lb-10"));
    drop(agent);
    broker.stop().await;
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn a_broker_outage_leaves_the_dataplane_alone_and_the_agent_reconnects(pool: PgPool) {
    const SERIAL: &str = "bf3-outage";
    let topo = Topology::new(2);
    let pki = Pki::new(&[&topo.root_ip]);
    let broker = Broker::start(pool.clone(), &pki, 0).await;
    let port = broker.grpc.port();
    let mut admin = AdminServiceClient::new(pki.channel(broker.grpc, "admin/test").await);
    let mut host = HostServiceClient::new(pki.channel(broker.grpc, "host/node-1").await);
    seed_fabric(&mut admin).await;
    let state = tempfile::tempdir().unwrap();
    let certs = pki.issue(&format!("dpu/{SERIAL}"));
    let url = format!("https://{}:{}", topo.root_ip, port);
    let agent = Agent::spawn(&agent_bin(), Some(&topo.dpu), &url, &certs, SERIAL, state.path(), &[]);
    let mut ips = Vec::new();
    for vf in 0..2u32 {
        let att = attach(&mut host, SERIAL, vf, "node-1").await.unwrap().attachment.unwrap();
        topo.configure_pod(vf as usize, &att.address, &att.gateway, &att.mac_address);
        ips.push(att.address.split('/').next().unwrap().to_string());
    }
    assert!(topo.ping(0, &ips[1]));

    broker.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(topo.ping(0, &ips[1]), "pods keep talking while the broker is down");
    assert!(topo.ping(1, "10.10.0.1"));
    let registrations = agent.log_text().matches("registered with the broker").count();

    let broker = Broker::start(pool, &pki, port).await;
    let mut admin = AdminServiceClient::new(pki.channel(broker.grpc, "admin/test").await);
    eventually(Duration::from_secs(20), "the agent to reconnect and re-report", || {
        let log = agent.log_text();
        async move {
            let again = log.matches("registered with the broker").count() > registrations;
            let reported = log
                .rsplit("registered with the broker")
                .next()
                .is_some_and(|after| after.contains("statuses reported"));
            (again && reported).then_some(())
        }
    })
    .await;
    let dpu = get(&mut admin, pb::Kind::Dpu, "", SERIAL).await.unwrap();
    let pb::resource::Kind::Dpu(dpu) = dpu.kind.unwrap() else { panic!() };
    assert_eq!(dpu.status.unwrap().lease_state, "Ready");
    assert!(topo.ping(0, &ips[1]));
    drop(agent);
    broker.stop().await;
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn an_agent_cannot_act_for_another_dpu(pool: PgPool) {
    let topo = Topology::new(0);
    let pki = Pki::new(&[&topo.root_ip]);
    let broker = Broker::start(pool, &pki, 0).await;
    let mut admin = AdminServiceClient::new(pki.channel(broker.grpc, "admin/test").await);
    let state = tempfile::tempdir().unwrap();
    let certs = pki.issue("dpu/dpu-a");
    let url = format!("https://{}:{}", topo.root_ip, broker.grpc.port());
    let agent = Agent::spawn(&agent_bin(), Some(&topo.dpu), &url, &certs, "dpu-b", state.path(), &[]);
    eventually(Duration::from_secs(10), "the refusal in the agent's log", || {
        let log = agent.log_text();
        async move { log.contains("dpu dpu-a cannot act for dpu dpu-b").then_some(()) }
    })
    .await;
    assert!(get(&mut admin, pb::Kind::Dpu, "", "dpu-b").await.is_none(), "nothing registered as dpu-b");
    assert!(get(&mut admin, pb::Kind::Dpu, "", "dpu-a").await.is_none());
    drop(agent);
    broker.stop().await;
}
