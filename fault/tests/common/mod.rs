//! Shared pieces of the fault scenarios: the environment (a database, the PKI, the real broker
//! process, real dpu-agents on OPI simulators), watchers that keep a replica of the store from
//! a watch stream, and the checks every scenario ends with.
#![allow(dead_code, clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sqlx::PgPool;
use tonic::transport::Channel;
use xpu_fault::broker::BrokerProcess;
use xpu_infra_sync::opisim::{OpiSim, SimHandle};
use xpu_proto::broker::v1::{
    self as pb, admin_service_client::AdminServiceClient, host_service_client::HostServiceClient,
};
use xpu_testkit::{Agent, Pki};

/// The URL of the test's own database (the one `#[sqlx::test]` made for `pool`).
pub fn database_url(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let db = pool.connect_options().get_database().unwrap().to_string();
    format!("{}/{db}", base.rsplit_once('/').unwrap().0)
}

pub fn agent_binary() -> PathBuf {
    xpu_testkit::workspace_binary("dpu-agent", "xpu-infra-sync")
}

/// One DPU: an OPI simulator (its dataplane, which outlives agent crashes) and the real agent.
pub struct Dpu {
    pub serial: String,
    pub sim: OpiSim,
    pub sim_handle: SimHandle,
    pub agent: Agent,
    pub state: tempfile::TempDir,
    pub certs: PathBuf,
}

impl Dpu {
    pub async fn start(pki: &Pki, broker_url: &str, serial: &str, extra: &[&str]) -> Dpu {
        let sim = OpiSim::new(Duration::from_millis(50));
        let sim_handle = sim.clone().start("127.0.0.1:0").await.unwrap();
        let certs = pki.issue(&format!("dpu/{serial}"));
        let state = tempfile::tempdir().unwrap();
        let agent = spawn_agent(&certs, broker_url, serial, &sim_handle, &state, extra);
        Dpu { serial: serial.into(), sim, sim_handle, agent, state, certs }
    }

    /// Kills the agent (SIGKILL) and starts it again on the same state directory.
    pub fn restart_agent(&mut self, broker_url: &str, extra: &[&str]) {
        self.restart_agent_with_env(broker_url, extra, &[]);
    }

    pub fn restart_agent_with_env(&mut self, broker_url: &str, extra: &[&str], env: &[(&str, &str)]) {
        self.agent.kill();
        self.agent =
            spawn_agent_with_env(&self.certs, broker_url, &self.serial, &self.sim_handle, &self.state, extra, env);
    }
}

pub fn spawn_agent(
    certs: &std::path::Path,
    broker_url: &str,
    serial: &str,
    sim: &SimHandle,
    state: &tempfile::TempDir,
    extra: &[&str],
) -> Agent {
    spawn_agent_with_env(certs, broker_url, serial, sim, state, extra, &[])
}

pub fn spawn_agent_with_env(
    certs: &std::path::Path,
    broker_url: &str,
    serial: &str,
    sim: &SimHandle,
    state: &tempfile::TempDir,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Agent {
    let opi = sim.addr.to_string();
    let mut args = vec!["--dataplane", "opi", "--opi-endpoint", opi.as_str()];
    args.extend_from_slice(extra);
    Agent::spawn_with_env(&agent_binary(), None, broker_url, certs, serial, state.path(), &args, env)
}

/// The identifying part of any resource.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Id {
    pub kind: i32,
    pub namespace: String,
    pub name: String,
}

/// What a replica must agree on: the object's incarnation and spec generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub uid: String,
    pub generation: i64,
}

pub fn meta_of(res: &pb::Resource) -> Option<(i32, &pb::ObjectMeta)> {
    use pb::resource::Kind as R;
    let (kind, meta) = match res.kind.as_ref()? {
        R::Dpu(o) => (pb::Kind::Dpu, o.metadata.as_ref()),
        R::Netdev(o) => (pb::Kind::Netdev, o.metadata.as_ref()),
        R::LogicalBridge(o) => (pb::Kind::LogicalBridge, o.metadata.as_ref()),
        R::Vrf(o) => (pb::Kind::Vrf, o.metadata.as_ref()),
        R::Svi(o) => (pb::Kind::Svi, o.metadata.as_ref()),
        R::XpuNetwork(o) => (pb::Kind::XpuNetwork, o.metadata.as_ref()),
        R::FlowPolicy(o) => (pb::Kind::FlowPolicy, o.metadata.as_ref()),
    };
    Some((kind as i32, meta?))
}

pub const ALL_KINDS: [pb::Kind; 7] = [
    pb::Kind::Dpu,
    pb::Kind::Netdev,
    pb::Kind::LogicalBridge,
    pb::Kind::Vrf,
    pb::Kind::Svi,
    pb::Kind::XpuNetwork,
    pb::Kind::FlowPolicy,
];

/// The store's current objects, read directly (List, page by page).
pub async fn store_state(admin: &mut AdminServiceClient<Channel>) -> BTreeMap<Id, Version> {
    let mut out = BTreeMap::new();
    for kind in ALL_KINDS {
        let mut token = String::new();
        loop {
            let page = admin
                .list(pb::ListRequest {
                    kind: kind as i32,
                    limit: 1000,
                    continue_token: token.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            for r in &page.items {
                let (k, m) = meta_of(r).unwrap();
                out.insert(
                    Id { kind: k, namespace: m.namespace.clone(), name: m.name.clone() },
                    Version { uid: m.uid.clone(), generation: m.generation },
                );
            }
            if page.continue_token.is_empty() {
                break;
            }
            token = page.continue_token;
        }
    }
    out
}

/// A client that keeps a replica of the whole store from an admin watch stream, resuming from
/// its last revision whenever the stream breaks, and checks the stream's promises as it goes.
#[derive(Default)]
pub struct Replica {
    pub objects: BTreeMap<Id, Version>,
    /// Last revision applied.
    pub revision: i64,
    pub reconnects: u32,
    /// Snapshots after the first (each a full resync instead of a resume).
    pub resyncs: u32,
    /// Revisions that did not increase (reorders or duplicates).
    pub violations: Vec<String>,
    in_snapshot: bool,
    first_snapshot_done: bool,
}

impl Replica {
    fn apply(&mut self, ev: pb::WatchEvent) {
        use pb::watch_event::Event as E;
        match ev.event {
            Some(E::Resync(_)) => {
                if self.first_snapshot_done {
                    self.resyncs += 1;
                }
                self.in_snapshot = true;
                self.objects.clear();
            }
            Some(E::SnapshotEnd(_)) => {
                self.in_snapshot = false;
                self.first_snapshot_done = true;
                self.revision = ev.revision;
            }
            Some(E::Bookmark(_)) => {
                if ev.revision < self.revision {
                    self.violations.push(format!("bookmark {} after {}", ev.revision, self.revision));
                }
                self.revision = self.revision.max(ev.revision);
            }
            Some(E::Change(c)) => {
                let Some(obj) = c.object else { return };
                let Some((kind, m)) = meta_of(&obj) else { return };
                let id = Id { kind, namespace: m.namespace.clone(), name: m.name.clone() };
                let version = Version { uid: m.uid.clone(), generation: m.generation };
                if c.r#type == pb::ChangeType::Snapshot as i32 {
                    self.objects.insert(id, version);
                    return;
                }
                if ev.revision <= self.revision {
                    self.violations.push(format!("change at {} after {}", ev.revision, self.revision));
                }
                self.revision = ev.revision;
                if c.r#type == pb::ChangeType::Deleted as i32 {
                    self.objects.remove(&id);
                } else if c.r#type == pb::ChangeType::Status as i32 {
                    // A status never creates an object (e.g. a DPU acknowledging the removal
                    // of a deleted one).
                    if let Some(v) = self.objects.get_mut(&id) {
                        *v = version;
                    }
                } else {
                    self.objects.insert(id, version);
                }
            }
            None => {}
        }
    }
}

/// Runs a replica until `stop`; returns it.
pub fn spawn_replica(channel: Channel, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Replica> {
    tokio::spawn(async move {
        let replica = Arc::new(Mutex::new(Replica::default()));
        let mut admin = AdminServiceClient::new(channel);
        while !stop.load(Ordering::Relaxed) {
            let since = replica.lock().unwrap().revision;
            let stream = admin.watch(pb::WatchRequest { since_revision: since, ..Default::default() }).await;
            let Ok(stream) = stream else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let mut stream = stream.into_inner();
            loop {
                let next = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
                match next {
                    Ok(Ok(Some(ev))) => replica.lock().unwrap().apply(ev),
                    Ok(_) => break,
                    Err(_) if stop.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
            replica.lock().unwrap().reconnects += 1;
        }
        std::mem::take(&mut *replica.lock().unwrap())
    })
}

/// Waits until a replica has caught up with `head`, then compares it with the store.
pub async fn replica_matches(replica: &Replica, store: &BTreeMap<Id, Version>) -> Result<(), String> {
    if !replica.violations.is_empty() {
        return Err(format!("ordering violations: {:?}", replica.violations));
    }
    if &replica.objects != store {
        let missing: Vec<&Id> = store.keys().filter(|k| !replica.objects.contains_key(*k)).take(5).collect();
        let extra: Vec<&Id> = replica.objects.keys().filter(|k| !store.contains_key(*k)).take(5).collect();
        let differ: Vec<&Id> = store
            .iter()
            .filter(|(k, v)| replica.objects.get(*k).is_some_and(|r| r != *v))
            .map(|(k, _)| k)
            .take(5)
            .collect();
        return Err(format!("replica differs: missing {missing:?}, extra {extra:?}, differing {differ:?}"));
    }
    Ok(())
}

/// Every revision the log holds after `after`, through an admin watch (replay).
pub async fn replayed(admin: &mut AdminServiceClient<Channel>, after: i64, head: i64) -> Vec<i64> {
    let mut stream =
        admin.watch(pb::WatchRequest { since_revision: after, ..Default::default() }).await.unwrap().into_inner();
    let mut revs = Vec::new();
    while revs.last().copied().unwrap_or(after) < head {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
        if let Some(pb::watch_event::Event::Change(_)) = ev.event {
            revs.push(ev.revision);
        }
    }
    revs
}

pub async fn head(admin: &mut AdminServiceClient<Channel>) -> i64 {
    admin.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision
}

pub fn broker_url(b: &BrokerProcess) -> String {
    format!("https://127.0.0.1:{}", b.grpc.port())
}

/// A broker process on the test's database with the fabric seeded.
pub struct Seeded {
    pub broker: BrokerProcess,
    pub url: String,
    pub admin: AdminServiceClient<Channel>,
}

/// Starts the broker (`args` added to `serve`) and seeds the fabric through an admin client.
pub async fn seeded_broker(pool: &PgPool, pki: &Pki, work: &std::path::Path, args: &[&str]) -> Seeded {
    let broker = BrokerProcess::start(&database_url(pool), pki, work, args).await;
    let url = broker_url(&broker);
    let mut admin = admin(pki, &broker).await;
    xpu_testkit::seed_fabric(&mut admin).await;
    Seeded { broker, url, admin }
}

pub async fn admin(pki: &Pki, b: &BrokerProcess) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(pki.channel(b.grpc, "admin/fault").await)
}

pub async fn host(pki: &Pki, b: &BrokerProcess, node: &str) -> HostServiceClient<Channel> {
    HostServiceClient::new(pki.channel(b.grpc, &format!("host/{node}")).await)
}

/// The revision a DPU's agent last reported as applied.
pub async fn applied_revision(admin: &mut AdminServiceClient<Channel>, serial: &str) -> Option<i64> {
    match xpu_testkit::get(admin, pb::Kind::Dpu, "", serial).await?.kind? {
        pb::resource::Kind::Dpu(d) => d.status.map(|s| s.applied_revision),
        _ => None,
    }
}
