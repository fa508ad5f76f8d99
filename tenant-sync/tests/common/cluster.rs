//! A whole tenant node wired to a whole DPU, for tests that break parts of it: the real broker
//! (which can be stopped and started again on the same port and database), the real dpu-agent
//! (linux dataplane, in the DPU namespace), the real host agent and device plugin, and the
//! kubelet stand-in. Processes are killed and namespaces removed on drop, also on failure.

use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use tonic::transport::Channel;
use xpu_proto::broker::v1::{self as pb, admin_service_client::AdminServiceClient};
use xpu_testkit::*;

use super::{CniRun, Node, Process, Sandbox, cni, kubelet::Kubelet};

pub const SERIAL: &str = "bf3-fail";

/// What `ip -j link show` says about a link in the root namespace, if it is there.
pub fn host_link(name: &str) -> Option<Value> {
    let out = std::process::Command::new("ip").args(["-j", "link", "show", "dev", name]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v.as_array()?.first().cloned()
}

/// Whether the namespace `ns` reaches `ip`, without blocking the runtime the broker runs on.
pub async fn ping(ns: &str, ip: &str) -> bool {
    let cmd = format!("ip netns exec {ns} ping -c 2 -i 0.2 -W 1 {ip}");
    tokio::task::spawn_blocking(move || sh_ok(&cmd)).await.unwrap()
}

// Fields drop in order: processes first, the namespaces last.
pub struct Cluster {
    pub host_agent: Process,
    pub plugin: Process,
    pub agent: Agent,
    pub broker: Option<Broker>,
    pub admin: AdminServiceClient<Channel>,
    pub kubelet: Kubelet,
    pub pool: PgPool,
    pub pki: Pki,
    pub port: u16,
    pub url: String,
    pub host_certs: std::path::PathBuf,
    pub host_node: String,
    host_agent_starts: usize,
    _agent_state: tempfile::TempDir,
    pub node: Node,
    pub topo: Topology,
}

impl Cluster {
    /// `vfs` VFs on node `node-1`, whose host agent holds a certificate for `host/node-1`.
    pub async fn start(pool: PgPool, vfs: usize) -> Cluster {
        Cluster::start_as(pool, vfs, "host/node-1", "node-1").await
    }

    /// As [`Cluster::start`], with the host agent's certificate identity and `--node` given.
    pub async fn start_as(pool: PgPool, vfs: usize, identity: &str, host_node: &str) -> Cluster {
        let topo = Topology::new(0);
        let node = Node::new(&topo, vfs);
        let pki = Pki::new(&[&topo.root_ip]);
        let broker = Broker::start(pool.clone(), &pki, 0).await;
        let port = broker.grpc.port();
        let mut admin = AdminServiceClient::new(pki.channel(broker.grpc, "admin/test").await);
        seed_fabric(&mut admin).await;
        let url = format!("https://{}:{port}", topo.root_ip);
        let agent_state = tempfile::tempdir().unwrap();
        let certs = pki.issue(&format!("dpu/{SERIAL}"));
        let agent_bin = workspace_binary("dpu-agent", "xpu-infra-sync");
        let agent = Agent::spawn(&agent_bin, Some(&topo.dpu), &url, &certs, SERIAL, agent_state.path(), &[]);
        let kubelet = Kubelet::start(&node.path("kubelet"));
        let host_certs = pki.issue(identity);
        let host_agent = node.spawn_host_agent(&url, &host_certs, host_node, SERIAL);
        let plugin = node.spawn_device_plugin(&topo);
        let c = Cluster {
            host_agent,
            plugin,
            agent,
            broker: Some(broker),
            admin,
            kubelet,
            pool,
            pki,
            port,
            url,
            host_certs,
            host_node: host_node.to_string(),
            host_agent_starts: 1,
            _agent_state: agent_state,
            node,
            topo,
        };
        c.host_agent_serving().await;
        eventually(Duration::from_secs(15), "healthy devices in ListAndWatch", || {
            let d = c.kubelet.devices();
            async move { (d.len() == vfs && d.iter().all(|d| d.health == "Healthy")).then_some(()) }
        })
        .await;
        c
    }

    async fn host_agent_serving(&self) {
        let (process, starts) = (&self.host_agent, self.host_agent_starts);
        eventually(Duration::from_secs(10), "the host agent serving", || {
            let n = process.log_text().matches("host agent serving").count();
            async move { (n >= starts).then_some(()) }
        })
        .await;
    }

    pub fn kill_host_agent(&mut self) {
        self.host_agent.kill();
    }

    /// Starts the host agent again on the same state directory and socket, and waits until it serves.
    pub async fn start_host_agent(&mut self) {
        self.host_agent = self.node.spawn_host_agent(&self.url, &self.host_certs, &self.host_node, SERIAL);
        self.host_agent_starts += 1;
        self.host_agent_serving().await;
    }

    pub async fn stop_broker(&mut self) {
        if let Some(b) = self.broker.take() {
            b.stop().await;
        }
    }

    /// A new broker on the same port and database.
    pub async fn start_broker(&mut self) {
        let broker = Broker::start(self.pool.clone(), &self.pki, self.port).await;
        self.admin = AdminServiceClient::new(self.pki.channel(broker.grpc, "admin/test").await);
        self.broker = Some(broker);
    }

    /// The kubelet's `Allocate` of VF `vf`.
    pub async fn allocate(&self, vf: usize) {
        let alloc = self.kubelet.allocate(&[&Node::device_id(vf)]).await.unwrap();
        assert_eq!(alloc.envs.get("PCIDEVICE_XPU_OPI_DEV_VF"), Some(&Node::device_id(vf)));
    }

    /// CNI `ADD` (or another command) of VF `vf` into `pod` as the runtime runs it, with the
    /// deviceID Multus passes.
    pub async fn cni(&self, command: &str, pod: &Sandbox, vf: usize) -> CniRun {
        self.cni_with(command, pod, &self.node.cni_config(Some(&Node::device_id(vf)))).await
    }

    pub async fn cni_with(&self, command: &str, pod: &Sandbox, conf: &Value) -> CniRun {
        cni(command, &format!("c-{}", pod.name), &pod.path(), "net1", ("pods", &pod.name), conf).await
    }

    pub fn netdev_name(vf: usize) -> String {
        format!("{SERIAL}-pf0-vf{vf}")
    }

    pub async fn netdev(&mut self, vf: usize) -> Option<pb::Resource> {
        get(&mut self.admin, pb::Kind::Netdev, "pods", &Cluster::netdev_name(vf)).await
    }

    pub async fn netdev_count(&mut self) -> usize {
        let req = pb::ListRequest { kind: pb::Kind::Netdev as i32, ..Default::default() };
        self.admin.list(req).await.unwrap().into_inner().items.len()
    }

    /// Whether VF `vf`'s representor is a bridge port on the DPU.
    pub fn port_programmed(&self, vf: usize) -> bool {
        self.topo.in_dpu(&format!("ip -j link show dev pf0vf{vf}")).contains("\"master\"")
    }

    /// The VF is back in the host namespace under its own name, with its own MAC.
    pub fn vf_at_home(&self, vf: usize) -> bool {
        host_link(&self.node.vfs[vf]).is_some_and(|l| l["address"] == self.node.macs[vf].as_str())
    }
}
