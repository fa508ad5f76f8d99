//! The pod-attach flow end to end (DESIGN §5): kubelet stand-in → device plugin `Allocate` →
//! CNI `ADD` → host agent → broker → dpu-agent (linux dataplane, in a "DPU" namespace) → back,
//! then the VF in the pod's namespace; pods ping each other through the DPU. And pod deletion.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{kubelet::Kubelet, *};
use sqlx::PgPool;
use xpu_proto::broker::v1::{self as pb, admin_service_client::AdminServiceClient};
use xpu_testkit::*;

const SERIAL: &str = "bf3-node1";

fn agent_bin() -> std::path::PathBuf {
    workspace_binary("dpu-agent", "xpu-infra-sync")
}

struct Env {
    topo: Topology,
    node: Node,
    pki: Pki,
    broker: Broker,
    url: String,
    admin: AdminServiceClient<tonic::transport::Channel>,
    _agent: Agent,
    _agent_state: tempfile::TempDir,
}

async fn setup(pool: PgPool, vfs: usize) -> Env {
    let topo = Topology::new(0);
    let node = Node::new(&topo, vfs);
    let pki = Pki::new(&[&topo.root_ip]);
    let broker = Broker::start(pool, &pki, 0).await;
    let mut admin = AdminServiceClient::new(pki.channel(broker.grpc, "admin/test").await);
    seed_fabric(&mut admin).await;
    let url = format!("https://{}:{}", topo.root_ip, broker.grpc.port());
    let agent_state = tempfile::tempdir().unwrap();
    let certs = pki.issue(&format!("dpu/{SERIAL}"));
    let agent = Agent::spawn(&agent_bin(), Some(&topo.dpu), &url, &certs, SERIAL, agent_state.path(), &[]);
    Env { topo, node, pki, broker, url, admin, _agent: agent, _agent_state: agent_state }
}

fn ip_of(cidr: &str) -> String {
    cidr.split('/').next().unwrap().to_string()
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn pods_get_vfs_from_the_broker_ping_each_other_and_are_deleted_cleanly(pool: PgPool) {
    let mut env = setup(pool, 2).await;
    let host_certs = env.pki.issue("host/node-1");
    let _host_agent = env.node.spawn_host_agent(&env.url, &host_certs, "node-1", SERIAL);
    let kubelet = Kubelet::start(&env.node.path("kubelet"));
    let _plugin = env.node.spawn_device_plugin(&env.topo);

    // VF init: the plugin registers (serving first: the stand-in dials back) and lists the VFs.
    let devices = eventually(Duration::from_secs(15), "two healthy devices in ListAndWatch", || {
        let d = kubelet.devices();
        async move { (d.len() == 2 && d.iter().all(|d| d.health == "Healthy")).then_some(d) }
    })
    .await;
    assert_eq!(devices[0].id, Node::device_id(0));
    assert_eq!(devices[0].topology.as_ref().unwrap().nodes[0].id, 0, "NUMA node from sysfs");
    assert_eq!(kubelet.seen.lock().unwrap().registrations[0].resource_name, RESOURCE);

    // Pod creation: Allocate is local (no broker) and returns the NPWG-style environment.
    let alloc = kubelet.allocate(&[&Node::device_id(0)]).await.unwrap();
    assert_eq!(alloc.envs.get("PCIDEVICE_XPU_OPI_DEV_VF"), Some(&Node::device_id(0)));
    assert!(alloc.envs.get("PCIDEVICE_XPU_OPI_DEV_VF_INFO").unwrap().contains(&env.node.vfs[0]));
    let info = env.node.path(&format!("devinfo/xpu.opi.dev-vf-{}-device.json", Node::device_id(0)));
    assert!(std::fs::read_to_string(info).unwrap().contains("\"pci-address\""), "device-info file written");
    kubelet.allocate(&[&Node::device_id(1)]).await.unwrap();
    kubelet.allocations.lock().unwrap().push((
        "pods".into(),
        "web-1".into(),
        RESOURCE.into(),
        vec![Node::device_id(1)],
    ));

    // CNI ADD: pod 0 with the deviceID Multus passes; pod 1 without (found through PodResources).
    let pod0 = Sandbox::new(&format!("{}-web0", env.topo.prefix));
    let pod1 = Sandbox::new(&format!("{}-web1", env.topo.prefix));
    let add0 =
        cni("ADD", "c0", &pod0.path(), "net1", ("pods", "web-0"), &env.node.cni_config(Some(&Node::device_id(0))))
            .await;
    assert_eq!(add0.code, 0, "{}", add0.stdout);
    let add1 = cni("ADD", "c1", &pod1.path(), "net1", ("pods", "web-1"), &env.node.cni_config(None)).await;
    assert_eq!(add1.code, 0, "{}", add1.stdout);
    let ip0 = add0.json["ips"][0]["address"].as_str().unwrap().to_string();
    let ip1 = add1.json["ips"][0]["address"].as_str().unwrap().to_string();
    assert_ne!(ip0, ip1);
    assert_eq!(add0.json["ips"][0]["gateway"], "10.10.0.1");
    assert_eq!(add0.json["interfaces"][0]["sandbox"], pod0.path());
    assert!(pod0.ping(&ip_of(&ip1)), "pod0 → pod1 through the DPU");
    assert!(pod1.ping(&ip_of(&ip0)), "pod1 → pod0");
    assert!(pod0.ping("10.10.0.1"), "pod0 → gateway");

    // The broker holds the same story: Connected, same addresses.
    for (n, ip) in [(0, &ip0), (1, &ip1)] {
        let st = netdev_status(&mut env.admin, "pods", &format!("{SERIAL}-pf0-vf{n}")).await.unwrap();
        assert_eq!(st.phase, "Connected");
        assert_eq!(&st.ip, ip);
    }

    // CHECK verifies the interface for real.
    let mut check_conf = env.node.cni_config(Some(&Node::device_id(0)));
    check_conf["prevResult"] = add0.json.clone();
    assert_eq!(cni("CHECK", "c0", &pod0.path(), "net1", ("pods", "web-0"), &check_conf).await.code, 0);
    sh(&format!("ip -n {} addr flush dev net1", pod0.name));
    let bad = cni("CHECK", "c0", &pod0.path(), "net1", ("pods", "web-0"), &check_conf).await;
    assert_ne!(bad.code, 0);
    assert!(bad.json["msg"].as_str().unwrap().contains("lacks address"), "{}", bad.stdout);
    sh(&format!("ip -n {} addr add {ip0} dev net1", pod0.name));

    // Pod deletion: the VF goes back with its old name and MAC, the Netdev is tombstoned and
    // the DPU port removed; a second DEL succeeds.
    let del = cni("DEL", "c0", &pod0.path(), "net1", ("pods", "web-0"), &check_conf).await;
    assert_eq!(del.code, 0, "{}", del.stdout);
    let back = sh(&format!("ip -j link show dev {}", env.node.vfs[0]));
    assert!(back.contains(&env.node.macs[0]), "original MAC restored: {back}");
    assert!(get(&mut env.admin, pb::Kind::Netdev, "pods", &format!("{SERIAL}-pf0-vf0")).await.is_none(), "tombstoned");
    eventually(Duration::from_secs(15), "the DPU port removed", || {
        let released = !env.topo.in_dpu("ip -j link show dev pf0vf0").contains("\"master\"");
        async move { released.then_some(()) }
    })
    .await;
    assert_eq!(
        cni("DEL", "c0", &pod0.path(), "net1", ("pods", "web-0"), &check_conf).await.code,
        0,
        "a second DEL succeeds"
    );
    assert!(pod1.ping("10.10.0.1"), "the other pod is untouched");

    // Re-creating the pod works.
    kubelet.allocate(&[&Node::device_id(0)]).await.unwrap();
    let again =
        cni("ADD", "c0b", &pod0.path(), "net1", ("pods", "web-0"), &env.node.cni_config(Some(&Node::device_id(0))))
            .await;
    assert_eq!(again.code, 0, "{}", again.stdout);
    let ip0b = again.json["ips"][0]["address"].as_str().unwrap().to_string();
    assert!(pod0.ping(&ip_of(&ip1)));
    assert!(pod1.ping(&ip_of(&ip0b)));

    // A kubelet restart wipes the plugin socket: the plugin serves again and re-registers.
    kubelet.restart();
    eventually(Duration::from_secs(10), "re-registration", || {
        let n = kubelet.registrations();
        async move { (n >= 2).then_some(()) }
    })
    .await;
    drop((pod0, pod1));
    env.broker.stop().await;
}
