//! The failure paths of the pod-attach flow (DESIGN §5, issue 4), each with the real broker,
//! dpu-agent (linux dataplane in a "DPU" namespace), host agent, device plugin and CNI binaries:
//! the broker down at ADD and at DEL, the DPU refusing the port, CNI misuse answered with CNI
//! error JSON, a host agent restarting mid-flow, and a host certificate used for another node.

#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::HashMap, time::Duration};

use common::{cluster::*, *};
use serde_json::json;
use sqlx::PgPool;
use xpu_proto::broker::v1 as pb;
use xpu_testkit::*;

fn assert_cni_error(run: &CniRun, code: u64, what: &str) {
    assert_ne!(run.code, 0, "{what}: must fail: {}", run.stdout);
    assert_eq!(run.json["code"], code, "{what}: {}", run.stdout);
    assert!(run.json["cniVersion"].is_string(), "{what}: CNI error JSON: {}", run.stdout);
    assert!(!run.json["msg"].as_str().unwrap_or_default().is_empty(), "{what}: {}", run.stdout);
}

async fn tombstones(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM objects WHERE kind = 'Netdev' AND namespace = 'pods' AND name = $1 \
         AND deleted_revision IS NOT NULL",
    )
    .bind(Cluster::netdev_name(0))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Detaches the host agent still owes the broker (from its state file).
fn pending_detaches(c: &Cluster) -> usize {
    let state = std::fs::read_to_string(c.node.path("host-agent/host-agent-state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let pending = state["pending_detaches"].as_array().cloned().unwrap_or_default();
    assert!(pending.iter().all(|p| p["netdev_id"] == Cluster::netdev_name(0)), "{state}");
    pending.len()
}

fn msg(run: &CniRun) -> String {
    format!("{} {}", run.json["msg"].as_str().unwrap_or_default(), run.json["details"].as_str().unwrap_or_default())
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn with_the_broker_down_allocate_works_and_add_fails_until_it_is_back(pool: PgPool) {
    let mut c = Cluster::start(pool, 1).await;
    c.stop_broker().await;

    // Allocate is local: no broker needed.
    c.allocate(0).await;
    let pod = Sandbox::new(&format!("{}-web0", c.topo.prefix));
    let add = c.cni("ADD", &pod, 0).await;
    assert_cni_error(&add, 11, "ADD with the broker down");
    assert!(msg(&add).contains("the broker is unreachable"), "{}", add.stdout);
    assert!(c.vf_at_home(0), "the VF stays in the host namespace until the attach succeeded");

    // The kubelet retries ADD; once the broker is back it succeeds and the pod reaches its gateway.
    c.start_broker().await;
    let add = c.cni("ADD", &pod, 0).await;
    assert_eq!(add.code, 0, "{}\n{}", add.stdout, c.host_agent.log_text());
    let ip = add.json["ips"][0]["address"].as_str().unwrap().to_string();
    assert!(ip.starts_with("10.10.0."), "{ip}");
    assert!(ping(&pod.name, "10.10.0.1").await, "the pod reaches its gateway");
    let pb::resource::Kind::Netdev(nd) = c.netdev(0).await.unwrap().kind.unwrap() else { panic!() };
    let st = nd.status.unwrap();
    assert_eq!((st.phase.as_str(), st.ip.as_str()), ("Connected", ip.as_str()));
    drop(pod);
    c.stop_broker().await;
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn a_port_the_dpu_refuses_fails_add_with_the_reason(pool: PgPool) {
    let mut c = Cluster::start(pool, 1).await;
    // A trunk network: this kernel has no bridge VLAN filtering, so the DPU cannot build the port.
    c.admin
        .apply(apply(pb::resource::Kind::XpuNetwork(pb::XpuNetwork {
            metadata: meta("trunks", ""),
            spec: Some(pb::XpuNetworkSpec {
                logical_bridges: vec!["lb-10".into()],
                vrf: "blue".into(),
                port_type: "trunk".into(),
                ipam: Some(pb::IpPool {
                    cidr: "10.20.0.0/24".into(),
                    gateway: "10.20.0.1".into(),
                    ..Default::default()
                }),
                mtu: 1500,
                ..Default::default()
            }),
            status: None,
        })))
        .await
        .unwrap();
    c.allocate(0).await;
    let pod = Sandbox::new(&format!("{}-trunk", c.topo.prefix));
    let mut conf = c.node.cni_config(Some(&Node::device_id(0)));
    conf["xpuNetwork"] = json!("trunks");
    let add = c.cni_with("ADD", &pod, &conf).await;
    assert_cni_error(&add, 101, "ADD of a port the DPU refuses");
    assert!(msg(&add).contains("VLAN filtering"), "the reason is given: {}", add.stdout);
    assert!(msg(&add).contains(&Cluster::netdev_name(0)), "{}", add.stdout);
    assert!(c.vf_at_home(0), "the VF was not moved");
    let pb::resource::Kind::Netdev(nd) = c.netdev(0).await.unwrap().kind.unwrap() else { panic!() };
    assert_eq!(nd.status.unwrap().phase, "Error");
    assert!(!c.port_programmed(0));

    // The pod is given up: DEL cleans up after the failed ADD.
    let del = c.cni_with("DEL", &pod, &conf).await;
    assert_eq!(del.code, 0, "{}", del.stdout);
    assert!(c.netdev(0).await.is_none(), "the Netdev is gone");
    drop(pod);
    c.stop_broker().await;
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn cni_misuse_is_answered_with_cni_error_json(pool: PgPool) {
    let mut c = Cluster::start(pool, 2).await;
    let pod = Sandbox::new(&format!("{}-misuse", c.topo.prefix));

    // A device the device plugin never allocated (a real VF, and an unknown id).
    let add = c.cni("ADD", &pod, 1).await;
    assert_cni_error(&add, 100, "ADD without Allocate");
    assert!(msg(&add).contains(&format!("device {} was not allocated", Node::device_id(1))), "{}", add.stdout);
    let conf = c.node.cni_config(Some("0000:99:00.7"));
    let add = c.cni_with("ADD", &pod, &conf).await;
    assert_cni_error(&add, 100, "ADD of an unknown device");
    assert!(c.vf_at_home(1));

    // Malformed stdin: a decoding failure.
    let env = |drop_vars: &[&str]| -> HashMap<&'static str, String> {
        let mut env = HashMap::from([
            ("CNI_COMMAND", "ADD".to_string()),
            ("CNI_CONTAINERID", "c-misuse".to_string()),
            ("CNI_NETNS", pod.path()),
            ("CNI_IFNAME", "net1".to_string()),
            ("CNI_PATH", "/opt/cni/bin".to_string()),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=pods;K8S_POD_NAME=misuse".to_string()),
        ]);
        env.retain(|k, _| !drop_vars.contains(k));
        env
    };
    let good = c.node.cni_config(Some(&Node::device_id(0))).to_string();
    let bad = cni_raw(env(&[]), "{\"cniVersion\": \"1.0.0\", \"name\": ".into()).await;
    assert_cni_error(&bad, 6, "malformed stdin");
    assert!(msg(&bad).contains("decode"), "{}", bad.stdout);

    // A version it does not speak.
    let mut future = c.node.cni_config(Some(&Node::device_id(0)));
    future["cniVersion"] = json!("9.9.9");
    let run = cni_raw(env(&[]), future.to_string()).await;
    assert_cni_error(&run, 1, "unsupported cniVersion");
    assert!(msg(&run).contains("9.9.9"), "{}", run.stdout);

    // Missing environment: code 4, naming what is missing.
    let run = cni_raw(env(&["CNI_NETNS", "CNI_IFNAME"]), good.clone()).await;
    assert_cni_error(&run, 4, "missing env");
    assert!(msg(&run).contains("CNI_NETNS") && msg(&run).contains("CNI_IFNAME"), "{}", run.stdout);
    assert!(!msg(&run).contains("CNI_CONTAINERID"), "only what is missing: {}", run.stdout);
    let run = cni_raw(env(&["CNI_COMMAND"]), good.clone()).await;
    assert_cni_error(&run, 4, "missing CNI_COMMAND");
    assert!(msg(&run).contains("CNI_COMMAND"), "{}", run.stdout);

    // VERSION: the versions it supports.
    let version = cni_raw(HashMap::from([("CNI_COMMAND", "VERSION".to_string())]), String::new()).await;
    assert_eq!(version.code, 0, "{}", version.stdout);
    let supported = version.json["supportedVersions"].as_array().unwrap();
    for v in ["0.3.1", "0.4.0", "1.0.0"] {
        assert!(supported.contains(&json!(v)), "{v}: {}", version.stdout);
    }
    assert_eq!(version.json["cniVersion"], "1.0.0");

    // None of it reached the broker, and the VFs are where they were.
    assert_eq!(c.netdev_count().await, 0);
    assert!(c.vf_at_home(0) && c.vf_at_home(1));
    drop(pod);
    c.stop_broker().await;
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn a_host_agent_restart_mid_flow_loses_nothing(pool: PgPool) {
    let mut c = Cluster::start(pool, 1).await;
    let pod = Sandbox::new(&format!("{}-web0", c.topo.prefix));

    // Allocate, then the host agent dies before ADD: the reservation survives it.
    c.allocate(0).await;
    c.kill_host_agent();
    let add = c.cni("ADD", &pod, 0).await;
    assert_cni_error(&add, 11, "ADD while the host agent is down");
    c.start_host_agent().await;
    let add = c.cni("ADD", &pod, 0).await;
    assert_eq!(add.code, 0, "{}\n{}", add.stdout, c.host_agent.log_text());
    assert!(ping(&pod.name, "10.10.0.1").await);
    assert!(c.port_programmed(0));

    // It dies again between ADD and DEL: the attachment survives too.
    c.kill_host_agent();
    c.start_host_agent().await;
    let del = c.cni("DEL", &pod, 0).await;
    assert_eq!(del.code, 0, "{}\n{}", del.stdout, c.host_agent.log_text());
    assert!(c.vf_at_home(0), "the VF is back with its name and MAC: {:?}", host_link(&c.node.vfs[0]));
    assert!(c.netdev(0).await.is_none(), "the Netdev is gone from the broker");
    eventually(Duration::from_secs(15), "the DPU port removed", || {
        let released = !c.port_programmed(0);
        async move { released.then_some(()) }
    })
    .await;
    drop(pod);
    c.stop_broker().await;
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn a_host_certificate_for_node_a_cannot_attach_on_node_b(pool: PgPool) {
    // The host agent claims node-b, but its certificate says host/node-a.
    let mut c = Cluster::start_as(pool, 1, "host/node-a", "node-b").await;
    c.allocate(0).await;
    let pod = Sandbox::new(&format!("{}-evil", c.topo.prefix));
    let add = c.cni("ADD", &pod, 0).await;
    assert_ne!(add.code, 0, "{}", add.stdout);
    assert_eq!(add.json["code"], 103, "a permission error: {}", add.stdout);
    assert!(msg(&add).contains("host node-a cannot attach netdevs of node node-b"), "{}", add.stdout);
    assert!(c.vf_at_home(0));
    assert_eq!(c.netdev_count().await, 0, "nothing was written in the broker");
    assert!(!c.port_programmed(0));
    // The runtime gives up on the pod: DEL succeeds and leaves nothing owed to the broker.
    let del = c.cni("DEL", &pod, 0).await;
    assert_eq!(del.code, 0, "{}", del.stdout);
    assert_eq!(pending_detaches(&c), 0, "{}", c.host_agent.log_text());
    drop(pod);
    c.stop_broker().await;
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn del_with_the_broker_down_is_queued_until_it_is_back(pool: PgPool) {
    let mut c = Cluster::start(pool, 1).await;
    let pod = Sandbox::new(&format!("{}-web0", c.topo.prefix));
    c.allocate(0).await;
    let add = c.cni("ADD", &pod, 0).await;
    assert_eq!(add.code, 0, "{}", add.stdout);
    assert!(c.port_programmed(0));

    c.stop_broker().await;
    let del = c.cni("DEL", &pod, 0).await;
    assert_eq!(del.code, 0, "DEL succeeds while the broker is down: {}", del.stdout);
    assert!(c.vf_at_home(0));
    assert_eq!(pending_detaches(&c), 1, "the detach is queued");
    assert!(c.port_programmed(0), "the DPU keeps its port until the broker hears of the detach");
    assert_eq!(tombstones(&c.pool).await, 0, "the broker has not heard of it yet");
    // The queue survives a host agent restart.
    c.kill_host_agent();
    c.start_host_agent().await;

    c.start_broker().await;
    eventually(Duration::from_secs(20), "the queued detach delivered", || {
        let mut admin = c.admin.clone();
        async move { get(&mut admin, pb::Kind::Netdev, "pods", &Cluster::netdev_name(0)).await.is_none().then_some(()) }
    })
    .await;
    assert_eq!(tombstones(&c.pool).await, 1, "the Netdev is tombstoned");
    eventually(Duration::from_secs(5), "the queue emptied", || {
        let n = pending_detaches(&c);
        async move { (n == 0).then_some(()) }
    })
    .await;
    eventually(Duration::from_secs(15), "the DPU port removed", || {
        let released = !c.port_programmed(0);
        async move { released.then_some(()) }
    })
    .await;
    drop(pod);
    c.stop_broker().await;
}
