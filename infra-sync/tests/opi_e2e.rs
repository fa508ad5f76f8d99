//! The opi dataplane end to end: the real broker, the real `dpu-agent --dataplane opi`, and the
//! OPI EVPN gateway simulator in-process. Fabric objects and Netdevs become OPI objects; a
//! Netdev's status goes Connecting (the server's DOWN/PENDING) → Connected/UP; a port the server
//! refuses is an Error while the rest stays; a restarted agent resumes from its revision.

#![allow(clippy::unwrap_used)]

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use sqlx::PgPool;
use tonic::transport::Channel;
use xpu_infra_sync::opisim::{NAME_PREFIX, OpiSim, SimCounts, SimHandle};
use xpu_proto::{
    broker::v1::{self as pb, admin_service_client::AdminServiceClient, host_service_client::HostServiceClient},
    opi::evpn_gw::{self as gw, bridge_port_service_client::BridgePortServiceClient},
};
use xpu_testkit::*;

const SERIAL: &str = "bf3-opi";
/// Long enough for the pending phase to be seen, short enough for a quick test.
const UP_DELAY: Duration = Duration::from_millis(500);

fn agent_bin() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_dpu-agent"))
}

struct Env {
    sim: OpiSim,
    sim_handle: SimHandle,
    pki: Pki,
    broker: Broker,
    admin: AdminServiceClient<Channel>,
    host: HostServiceClient<Channel>,
    state: tempfile::TempDir,
}

async fn setup(pool: PgPool) -> Env {
    let sim = OpiSim::new(UP_DELAY);
    let sim_handle = sim.clone().start("127.0.0.1:0").await.unwrap();
    let pki = Pki::new(&[]);
    let broker = Broker::start(pool, &pki, 0).await;
    let mut admin = AdminServiceClient::new(pki.channel(broker.grpc, "admin/test").await);
    let host = HostServiceClient::new(pki.channel(broker.grpc, "host/node-1").await);
    seed_fabric(&mut admin).await;
    Env { sim, sim_handle, pki, broker, admin, host, state: tempfile::tempdir().unwrap() }
}

impl Env {
    /// The real agent with the opi dataplane, on the persistent state directory of this test.
    fn spawn_agent(&self) -> Agent {
        let certs = self.pki.issue(&format!("dpu/{SERIAL}"));
        let url = format!("https://127.0.0.1:{}", self.broker.grpc.port());
        let opi = self.sim_handle.addr.to_string();
        let extra = ["--dataplane", "opi", "--opi-endpoint", &opi];
        Agent::spawn(&agent_bin(), None, &url, &certs, SERIAL, self.state.path(), &extra)
    }

    async fn fabric_up(&self, agent: &Agent) {
        for (kind, name) in [(pb::Kind::Vrf, "blue"), (pb::Kind::LogicalBridge, "lb-10"), (pb::Kind::Svi, "svi-10")] {
            let st = eventually(Duration::from_secs(20), name, || {
                let mut admin = self.admin.clone();
                async move { dpu_status(&mut admin, kind, "", name, SERIAL).await.filter(|s| s.phase != "Pending") }
            })
            .await;
            assert_eq!(st.phase, "Programmed", "{name}: {st:?}\n{}", agent.log_text());
            assert_up(&st.oper_status, &st.components, name);
        }
    }
}

fn netdev_name(vf: u32) -> String {
    format!("{SERIAL}-pf0-vf{vf}")
}

fn port_name(vf: u32) -> String {
    format!("{NAME_PREFIX}ports/xpu-pods-{}", netdev_name(vf))
}

fn assert_up(oper: &str, components: &[pb::Component], what: &str) {
    assert_eq!(oper, "UP", "{what}: {components:?}");
    assert!(!components.is_empty() && components.iter().all(|c| c.status == "SUCCESS"), "{what}: {components:?}");
}

/// Every status the broker publishes for one Netdev, in order (an admin Watch of kind Netdev).
struct StatusLog {
    seen: Arc<Mutex<Vec<pb::NetdevStatus>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusLog {
    async fn start(admin: &AdminServiceClient<Channel>, name: String) -> StatusLog {
        let req = pb::WatchRequest { kinds: vec![pb::Kind::Netdev as i32], since_revision: 0 };
        let mut stream = admin.clone().watch(req).await.unwrap().into_inner();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let out = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            while let Some(Ok(ev)) = stream.next().await {
                let Some(pb::watch_event::Event::Change(c)) = ev.event else { continue };
                let Some(pb::resource::Kind::Netdev(nd)) = c.object.and_then(|o| o.kind) else { continue };
                if nd.metadata.is_some_and(|m| m.name == name)
                    && let Some(st) = nd.status
                {
                    out.lock().unwrap().push(st);
                }
            }
        });
        StatusLog { seen, task }
    }

    fn phases(&self) -> Vec<String> {
        let mut phases: Vec<String> = self.seen.lock().unwrap().iter().map(|s| s.phase.clone()).collect();
        phases.dedup();
        phases
    }
}

impl Drop for StatusLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An OPI oper status and the statuses of the components.
type Sample = (i32, Vec<i32>);

/// The oper status and component statuses the simulator shows for one port, sampled every 20 ms.
struct SimSampler {
    seen: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SimSampler {
    async fn start(sim: &SimHandle, name: String) -> SimSampler {
        let channel = Channel::from_shared(sim.endpoint()).unwrap().connect().await.unwrap();
        let mut ports = BridgePortServiceClient::new(channel);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let out = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                if let Ok(p) = ports.get_bridge_port(gw::GetBridgePortRequest { name: name.clone() }).await
                    && let Some(st) = p.into_inner().status
                {
                    out.lock().unwrap().push((st.oper_status, st.components.iter().map(|c| c.status).collect()));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        SimSampler { seen, task }
    }
}

impl Drop for SimSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn netdevs_become_opi_bridge_ports_that_go_from_pending_to_up(pool: PgPool) {
    let mut env = setup(pool.clone()).await;
    let mut agent = env.spawn_agent();

    // The fabric reaches the OPI server as OPI objects, UP with every component SUCCESS.
    env.fabric_up(&agent).await;
    assert_eq!(env.sim.counts(), SimCounts { vrfs: 1, logical_bridges: 1, bridge_ports: 0, svis: 1 });
    let names = env.sim.names();
    for n in ["vrfs/xpu-blue", "bridges/xpu-lb-10", "svis/xpu-svi-10"] {
        assert!(names.contains(&format!("{NAME_PREFIX}{n}")), "{n} in {names:?}");
    }

    // Attach: the broker answers once the port is UP; meanwhile it was Connecting in the broker
    // and DOWN with PENDING components on the server.
    let log = StatusLog::start(&env.admin, netdev_name(0)).await;
    let sampler = SimSampler::start(&env.sim_handle, port_name(0)).await;
    let resp =
        attach(&mut env.host, SERIAL, 0, "node-1").await.unwrap_or_else(|e| panic!("{e:?}\n{}", agent.log_text()));
    let st = resp.netdev.unwrap().status.unwrap();
    assert_eq!(st.phase, "Connected", "{st:?}");
    assert_up(&st.oper_status, &st.components, "attached netdev");
    assert_eq!(st.bridge_port_name, port_name(0));
    assert_eq!(st.dpu, SERIAL);
    let att = resp.attachment.unwrap();
    assert!(att.address.starts_with("10.10.0.") && att.gateway == "10.10.0.1", "{att:?}");
    assert_eq!(st.mac_address, att.mac_address);
    let phases = eventually(Duration::from_secs(5), "Connected in the watch", || {
        let p = log.phases();
        async move { p.contains(&"Connected".to_string()).then_some(p) }
    })
    .await;
    let connecting = phases.iter().position(|p| p == "Connecting");
    let connected = phases.iter().position(|p| p == "Connected");
    assert!(connecting.is_some() && connecting < connected, "Connecting before Connected: {phases:?}");
    assert!(!phases.contains(&"Error".to_string()), "{phases:?}");
    // The port went UP before the agent reported it; the sampler, polling every 20 ms, may not
    // have seen UP yet when the attach returned. The port stays UP, so the next sample shows it.
    let samples = eventually(Duration::from_secs(5), "an UP sample", || {
        let samples = sampler.seen.lock().unwrap().clone();
        async move { samples.iter().any(|(o, _)| *o == gw::BpOperStatus::Up as i32).then_some(samples) }
    })
    .await;
    let pending = gw::CompStatus::Pending as i32;
    let first_up = samples.iter().position(|(o, _)| *o == gw::BpOperStatus::Up as i32);
    let down = samples.iter().position(|(o, c)| *o == gw::BpOperStatus::Down as i32 && c.iter().all(|s| *s == pending));
    assert!(down.is_some() && first_up.is_some() && down < first_up, "DOWN/PENDING, then UP: {samples:?}");
    drop(sampler);

    // The port as the server holds it: the MAC the broker chose, ACCESS on the bridge.
    let mut ports =
        BridgePortServiceClient::new(Channel::from_shared(env.sim_handle.endpoint()).unwrap().connect_lazy());
    let port = ports.get_bridge_port(gw::GetBridgePortRequest { name: port_name(0) }).await.unwrap().into_inner();
    let spec = port.spec.unwrap();
    let mac: Vec<String> = spec.mac_address.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(mac.join(":"), att.mac_address);
    assert_eq!(spec.ptype, gw::BridgePortType::Access as i32);
    assert_eq!(spec.logical_bridges, [format!("{NAME_PREFIX}bridges/xpu-lb-10")]);

    // Attaching again is idempotent: nothing new is written on the server.
    let writes = env.sim.writes();
    let again = attach(&mut env.host, SERIAL, 0, "node-1").await.unwrap();
    assert_eq!(again.netdev.unwrap().status.unwrap().phase, "Connected");
    assert_eq!(env.sim.writes(), writes);

    // A second Netdev with the first one's MAC: the server refuses it (MACs are unique among
    // ports). Its status is Error with the reason; the rest stays programmed, the agent runs on.
    let dup = env
        .host
        .attach_netdev(pb::AttachNetdevRequest {
            namespace: "pods".into(),
            spec: Some(pb::NetdevSpec {
                netdev_id: netdev_name(1),
                hostname: "node-1".into(),
                network: "tenant-a".into(),
                mac_address: att.mac_address.clone(),
                ..Default::default()
            }),
            timeout_ms: 15_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), tonic::Code::FailedPrecondition, "{dup:?}");
    assert!(dup.message().contains(&format!("{} is already in use", att.mac_address)), "{}", dup.message());
    let st1 = netdev_status(&mut env.admin, "pods", &netdev_name(1)).await.unwrap();
    assert_eq!(st1.phase, "Error");
    assert!(st1.message.starts_with("CreateBridgePort: "), "{}", st1.message);
    assert_eq!(netdev_status(&mut env.admin, "pods", &netdev_name(0)).await.unwrap().phase, "Connected");
    assert_eq!(env.sim.counts().bridge_ports, 1);

    // A FlowPolicy cannot be realised by the EVPN gateway API: Error, saying so.
    env.admin
        .apply(apply(pb::resource::Kind::FlowPolicy(pb::FlowPolicy {
            metadata: meta("no-ping", "pods"),
            spec: Some(pb::FlowPolicySpec { rules: vec![deny_icmp()], ..Default::default() }),
            status: None,
        })))
        .await
        .unwrap();
    let fp = eventually(Duration::from_secs(15), "the flow policy's status", || {
        let mut admin = env.admin.clone();
        async move {
            dpu_status(&mut admin, pb::Kind::FlowPolicy, "pods", "no-ping", SERIAL)
                .await
                .filter(|s| s.phase != "Pending")
        }
    })
    .await;
    assert_eq!(fp.phase, "Error", "{fp:?}");
    assert!(fp.message.contains("no flow rule service"), "{}", fp.message);

    // The agent kept running and still programs: another port comes up.
    let resp = attach(&mut env.host, SERIAL, 2, "node-1").await.unwrap();
    assert_eq!(resp.netdev.unwrap().status.unwrap().phase, "Connected");
    assert_eq!(env.sim.counts(), SimCounts { vrfs: 1, logical_bridges: 1, bridge_ports: 2, svis: 1 });
    assert!(agent.child.try_wait().unwrap().is_none(), "the agent is still running:\n{}", agent.log_text());
    env.fabric_up(&agent).await;

    // Detach: the BridgePort goes from the server; a second detach is fine.
    assert!(env.host.detach_netdev(detach(0)).await.unwrap().into_inner().existed);
    eventually(Duration::from_secs(15), "the port removed from the server", || {
        let names = env.sim.names();
        async move { (!names.contains(&port_name(0))).then_some(()) }
    })
    .await;
    assert!(!env.host.detach_netdev(detach(0)).await.unwrap().into_inner().existed, "a second detach is fine");
    for vf in [1, 2] {
        env.host.detach_netdev(detach(vf)).await.unwrap();
    }
    eventually(Duration::from_secs(15), "every port removed, tombstones acknowledged", || {
        let (pool, bridge_ports) = (pool.clone(), env.sim.counts().bridge_ports);
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM statuses s JOIN objects o USING (kind, namespace, name) WHERE o.deleted_revision IS NOT NULL",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (n == 0 && bridge_ports == 0).then_some(())
        }
    })
    .await;
    assert_eq!(
        env.sim.counts(),
        SimCounts { vrfs: 1, logical_bridges: 1, bridge_ports: 0, svis: 1 },
        "the fabric stays"
    );
    drop(agent);
    env.broker.stop().await;
}

fn deny_icmp() -> pb::FlowRule {
    pb::FlowRule { name: "deny-icmp".into(), action: "deny".into(), protocol: "icmp".into(), ..Default::default() }
}

fn detach(vf: u32) -> pb::DetachNetdevRequest {
    pb::DetachNetdevRequest { namespace: "pods".into(), name: netdev_name(vf) }
}

fn persisted_revision(dir: &std::path::Path) -> i64 {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap();
    v["revision"].as_i64().unwrap()
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn a_restarted_opi_agent_resumes_from_its_revision_and_converges(pool: PgPool) {
    let mut env = setup(pool).await;
    let mut agent = env.spawn_agent();
    env.fabric_up(&agent).await;
    for vf in 0..2 {
        attach(&mut env.host, SERIAL, vf, "node-1").await.unwrap_or_else(|e| panic!("{e:?}\n{}", agent.log_text()));
    }
    // Everything up to the broker's head is applied and persisted (bookmarks carry it), then the
    // agent is killed hard.
    let head = env.admin.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision;
    eventually(Duration::from_secs(10), "the head revision persisted", || {
        let r = persisted_revision(env.state.path());
        async move { (r >= head).then_some(()) }
    })
    .await;
    agent.kill();
    let revision = persisted_revision(env.state.path());

    // While it is down: a new bridge is desired, a port is detached, and a stray object carrying
    // our id prefix (and a foreign one) appear on the server.
    env.admin
        .apply(apply(pb::resource::Kind::LogicalBridge(pb::LogicalBridge {
            metadata: meta("lb-20", ""),
            spec: Some(pb::LogicalBridgeSpec { vlan_id: 20, vni: Some(1020), ..Default::default() }),
            status: None,
        })))
        .await
        .unwrap();
    env.host.detach_netdev(detach(1)).await.unwrap();
    let channel = Channel::from_shared(env.sim_handle.endpoint()).unwrap().connect().await.unwrap();
    let mut lbs = gw::logical_bridge_service_client::LogicalBridgeServiceClient::new(channel);
    for (id, vlan) in [("xpu-ghost", 30), ("foreign-lb", 40)] {
        let logical_bridge = Some(gw::LogicalBridge {
            spec: Some(gw::LogicalBridgeSpec { vlan_id: vlan, vni: None, vtep_ip_prefix: None }),
            ..Default::default()
        });
        lbs.create_logical_bridge(gw::CreateLogicalBridgeRequest { logical_bridge_id: id.into(), logical_bridge })
            .await
            .unwrap();
    }
    assert_eq!(env.sim.counts().bridge_ports, 2, "nothing removes the port while the agent is down");
    let before_restart = agent.log_text().len();

    let agent = env.spawn_agent();
    let lb20 = eventually(Duration::from_secs(20), "lb-20 programmed", || {
        let mut admin = env.admin.clone();
        async move {
            dpu_status(&mut admin, pb::Kind::LogicalBridge, "", "lb-20", SERIAL)
                .await
                .filter(|s| s.phase == "Programmed")
        }
    })
    .await;
    assert_up(&lb20.oper_status, &lb20.components, "lb-20");
    let bridge = |id: &str| format!("{NAME_PREFIX}bridges/{id}");
    eventually(Duration::from_secs(15), "the server to converge", || {
        let names = env.sim.names();
        async move {
            let done = names.contains(&bridge("xpu-lb-20"))
                && !names.contains(&bridge("xpu-ghost"))
                && !names.contains(&port_name(1))
                && names.contains(&port_name(0));
            done.then_some(())
        }
    })
    .await;
    let names = env.sim.names();
    assert!(names.contains(&bridge("foreign-lb")), "objects that are not ours stay: {names:?}");
    assert_eq!(env.sim.counts(), SimCounts { vrfs: 1, logical_bridges: 3, bridge_ports: 1, svis: 1 });
    assert_eq!(netdev_status(&mut env.admin, "pods", &netdev_name(0)).await.unwrap().phase, "Connected");

    let log = agent.log_text()[before_restart..].to_string();
    assert!(log.contains("resuming from the persisted state"), "{log}");
    let asked: Vec<i64> = log
        .split("since_revision=")
        .skip(1)
        .map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(asked.first(), Some(&revision), "it asks for exactly its persisted revision: {log}");
    assert!(!log.contains("sends a snapshot"), "no full resync: {log}");
    assert!(log.contains("removing an orphan") && log.contains("ghost"), "{log}");
    drop(agent);
    env.broker.stop().await;
}
