//! Syncer and host-agent crashes at every step of the attach flow.
//!
//! The real `tenant-sync` and `infra-sync` run against two in-repo fake kube-apiservers (the
//! tenant and the infra cluster) and the real broker; the real dpu-agent programs an OPI
//! simulator; the real host agent serves its node socket. A process aborts at the failpoint of
//! one step (`XPU_FAILPOINTS`), is started again without it, and the end state is checked:
//!
//! - every object reached the broker exactly once (one spec write in the log, generation 1, no
//!   delete while it lives, the expected author), and a deleted one was deleted exactly once;
//! - its status reached the clusters (`Connected` with its DPU and address, per-DPU
//!   `Programmed` for a bridge; `syncedGeneration` at the object's generation, `Synced=True`);
//! - nothing is stuck: no Netdev short of `Connected`, no finalizer left on a deleted object,
//!   both syncers ready with their revision persisted up to the broker's head;
//! - nothing leaked or doubled: each object was created once in each cluster (a watch records
//!   every creation and deletion), no mirror of a deleted object is left, the clusters and the
//!   broker hold exactly the live objects, and the dataplane one port per live Netdev.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use futures::StreamExt;
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, PostParams, WatchEvent, WatchParams},
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tonic::transport::Channel;
use xpu_fake_apiserver::FakeApiServer;
use xpu_fault::{broker::BrokerProcess, report};
use xpu_proto::{
    broker::v1::{self as pb, admin_service_client::AdminServiceClient, host_service_client::HostServiceClient},
    host::v1::{self as hv, host_agent_client::HostAgentClient},
};
use xpu_sync_common::cluster::{
    engine::{FINALIZER, MIRROR_LABEL},
    kinds::api_resource,
};
use xpu_testkit::Pki;

const SCENARIO: &str = "syncer-crash";
const SERIAL: &str = "bf3-sc";
const NODE: &str = "node-sc";
const NS: &str = "pods";
/// The bridge `seed_fabric` writes through the broker (mirrored into the infra cluster).
const SEEDED_BRIDGE: &str = "lb-10";
const SETTLE: Duration = Duration::from_secs(60);

fn netdev_name(vf: u32) -> String {
    format!("{SERIAL}-pf0-vf{vf}")
}

// ---- clusters -------------------------------------------------------------------------------

/// Creations and deletions seen in a cluster, per (kind, name).
#[derive(Default)]
struct Events {
    created: BTreeMap<(String, String), u32>,
    deleted: BTreeMap<(String, String), u32>,
}

/// A fake kube-apiserver standing for one cluster, with the CRDs installed and a watch that
/// records every Netdev and LogicalBridge created and deleted in it.
struct Kube {
    server: FakeApiServer,
    client: Client,
    kubeconfig: PathBuf,
    events: Arc<Mutex<Events>>,
}

impl Kube {
    async fn start(dir: &Path, name: &str) -> Kube {
        let xpu_testkit::cluster::FakeCluster { server, client, kubeconfig } =
            xpu_testkit::cluster::fake_cluster(dir, name, &[NS]).await;
        let events = Arc::new(Mutex::new(Events::default()));
        let from = server.resource_version().to_string();
        for kind in [pb::Kind::Netdev, pb::Kind::LogicalBridge] {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &api_resource(kind));
            tokio::spawn(record(api, api_resource(kind).kind, from.clone(), Arc::clone(&events)));
        }
        Kube { server, client, kubeconfig, events }
    }

    fn api(&self, kind: pb::Kind) -> Api<DynamicObject> {
        let ar = api_resource(kind);
        if kind == pb::Kind::Netdev {
            Api::namespaced_with(self.client.clone(), NS, &ar)
        } else {
            Api::all_with(self.client.clone(), &ar)
        }
    }

    async fn get(&self, kind: pb::Kind, name: &str) -> Option<Value> {
        let o = self.api(kind).get_opt(name).await.ok().flatten()?;
        serde_json::to_value(o).ok()
    }

    /// Names of the objects of `kind` (every namespace).
    fn names(&self, kind: pb::Kind) -> BTreeSet<String> {
        let ar = api_resource(kind);
        self.server
            .list_objects(&ar.group, &ar.plural)
            .iter()
            .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_string))
            .collect()
    }

    /// (created, deleted) counts of one object.
    fn seen(&self, kind: pb::Kind, name: &str) -> (u32, u32) {
        let key = (api_resource(kind).kind, name.to_string());
        let ev = self.events.lock().unwrap();
        (ev.created.get(&key).copied().unwrap_or(0), ev.deleted.get(&key).copied().unwrap_or(0))
    }

    /// The revision a syncer persisted in this cluster.
    fn persisted(&self, state: &str) -> i64 {
        self.server
            .get_object("", "configmaps", "xpu-system", state)
            .and_then(|cm| cm["data"]["revision"].as_str().and_then(|r| r.parse().ok()))
            .unwrap_or(0)
    }
}

/// Follows one kind from `from`, resuming after every end of the stream.
async fn record(api: Api<DynamicObject>, kind: String, from: String, events: Arc<Mutex<Events>>) {
    let mut rv = from;
    loop {
        let stream = match api.watch(&WatchParams::default().timeout(290), &rv).await {
            Ok(s) => s.boxed(),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut stream = stream;
        while let Some(Ok(ev)) = stream.next().await {
            let (obj, created, deleted) = match ev {
                WatchEvent::Added(o) => (o, 1, 0),
                WatchEvent::Modified(o) => (o, 0, 0),
                WatchEvent::Deleted(o) => (o, 0, 1),
                WatchEvent::Bookmark(b) => {
                    rv = b.metadata.resource_version;
                    continue;
                }
                WatchEvent::Error(_) => break,
            };
            rv = obj.metadata.resource_version.clone().unwrap_or(rv);
            let key = (kind.clone(), obj.metadata.name.clone().unwrap_or_default());
            let mut ev = events.lock().unwrap();
            *ev.created.entry(key.clone()).or_default() += created;
            *ev.deleted.entry(key).or_default() += deleted;
        }
    }
}

// ---- processes --------------------------------------------------------------------------------

/// A long-running binary of the workspace that can abort at a failpoint and be started again;
/// its log (all starts) goes to one file. Killed on drop.
struct Proc {
    name: &'static str,
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Proc {
    fn new(name: &'static str, package: &str, args: Vec<String>, log: PathBuf) -> Proc {
        Proc { name, bin: xpu_testkit::workspace_binary(name, package), args, log, child: None, starts: 0 }
    }

    /// (Re)starts the process with `failpoints` armed.
    fn start(&mut self, failpoints: &[String]) {
        self.kill();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args).env("XPU_LOG", "info").stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        if !failpoints.is_empty() {
            cmd.env("XPU_FAILPOINTS", failpoints.join(","));
        }
        self.child = Some(cmd.spawn().unwrap());
        self.starts += 1;
    }

    /// SIGKILL.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_len(&self) -> usize {
        std::fs::metadata(&self.log).map(|m| m.len() as usize).unwrap_or(0)
    }

    /// Waits for the process to abort at `failpoint` (its log after `mark` says so); panics if it
    /// does not within 30 s.
    async fn crashed_at(&mut self, failpoint: &str, mark: usize) {
        let child = self.child.as_mut().unwrap();
        let mut status = None;
        for _ in 0..300 {
            if let Some(s) = child.try_wait().unwrap() {
                status = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let name = self.name;
        let Some(status) = status else {
            panic!("{name} never reached {failpoint}:\n{}", self.log_text());
        };
        self.child = None;
        assert!(!status.success(), "{name} at {failpoint}: it aborted ({status})");
        let log = self.log_text();
        assert!(
            log.get(mark..).unwrap_or_default().contains(&format!("failpoint {failpoint} reached")),
            "{name} stopped, but not at {failpoint}:\n{log}"
        );
    }
}

/// A cluster controller (`tenant-sync` or `infra-sync`) against its fake cluster.
struct Syncer {
    proc: Proc,
    http: SocketAddr,
    /// Name of the ConfigMap holding its persisted revision.
    state: &'static str,
}

impl Syncer {
    fn new(side: &'static str, pki: &Pki, kube: &Kube, broker: &str, work: &Path) -> Syncer {
        let certs = pki.issue(&format!("cluster/east/{side}"));
        let http: SocketAddr = format!("127.0.0.1:{}", xpu_fault::free_port()).parse().unwrap();
        let path = |f: &str| certs.join(f).display().to_string();
        let args: Vec<String> = [
            "--broker",
            broker,
            "--tls-cert",
            &path("tls.crt"),
            "--tls-key",
            &path("tls.key"),
            "--ca",
            &path("ca.crt"),
            "--cluster",
            "east",
            "--namespace",
            "xpu-system",
            // One holder across restarts: the restarted process takes its own lease at once.
            "--holder",
            &format!("{side}-1"),
            "--kubeconfig",
            &kube.kubeconfig.display().to_string(),
            "--http-addr",
            &http.to_string(),
            "--lease-duration",
            "3s",
            "--gc-interval",
            "1h",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (name, package, state) = match side {
            "tenant" => ("tenant-sync", "xpu-tenant-sync", "xpu-tenant-sync-east-state"),
            _ => ("infra-sync", "xpu-infra-sync", "xpu-infra-sync-east-state"),
        };
        Syncer { proc: Proc::new(name, package, args, work.join(format!("{name}.log"))), http, state }
    }

    /// Leading, and done with its first sync.
    async fn ready(&self) -> bool {
        matches!(xpu_fault::http::get(self.http, "/readyz").await, Some((200, body)) if body == "ready\n")
    }

    async fn wait_ready(&self) {
        let ok = xpu_fault::wait_for(SETTLE, || async { self.ready().await.then_some(()) }).await;
        assert!(ok.is_some(), "{} is not ready:\n{}", self.proc.name, self.proc.log_text());
    }

    /// (Re)starts it with one failpoint armed, and waits until it is ready: the step is then
    /// reached by what the test does next, not by the start.
    async fn arm(&mut self, failpoint: &str) {
        self.proc.start(&[failpoint.to_string()]);
        self.wait_ready().await;
    }
}

/// The host agent of the node, serving its socket.
struct HostAgent {
    proc: Proc,
    socket: PathBuf,
    state_file: PathBuf,
}

impl HostAgent {
    fn new(pki: &Pki, broker: &str, work: &Path) -> HostAgent {
        let certs = pki.issue(&format!("host/{NODE}"));
        let dir = work.join("node");
        let socket = dir.join("run/host-agent.sock");
        let state = dir.join("host-agent");
        let p = |p: PathBuf| p.display().to_string();
        let args: Vec<String> = vec![
            "--broker".into(),
            broker.into(),
            "--tls-cert".into(),
            p(certs.join("tls.crt")),
            "--tls-key".into(),
            p(certs.join("tls.key")),
            "--ca".into(),
            p(certs.join("ca.crt")),
            "--node".into(),
            NODE.into(),
            "--dpu-serial".into(),
            SERIAL.into(),
            "--socket".into(),
            p(socket.clone()),
            "--kubelet-dir".into(),
            p(dir.join("kubelet")),
            "--state-dir".into(),
            p(state.clone()),
            "--attach-timeout".into(),
            "20s".into(),
        ];
        let proc = Proc::new("host-agent", "xpu-tenant-sync", args, work.join("host-agent.log"));
        HostAgent { proc, socket, state_file: state.join("host-agent-state.json") }
    }

    /// (Re)starts it and waits until its socket answers.
    async fn start(&mut self, failpoints: &[String]) {
        let mark = self.proc.log_len();
        self.proc.start(failpoints);
        let up = xpu_fault::wait_for(Duration::from_secs(30), || {
            let serving = self.proc.log_text().get(mark..).is_some_and(|l| l.contains("host agent serving"));
            async move { serving.then_some(()) }
        })
        .await;
        assert!(up.is_some(), "the host agent does not serve:\n{}", self.proc.log_text());
    }

    /// A client as the CNI and the device plugin have: a fresh connection to the socket.
    /// Starts it with `step` armed, makes `call` (the ADD or DEL that runs into the step; it must
    /// fail), waits for the crash, and starts it again unarmed. Returns when the restart began.
    async fn crash_at<T, F, Fut>(&mut self, step: &str, what: &str, call: F) -> Instant
    where
        T: std::fmt::Debug,
        F: FnOnce(HostAgentClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mark = self.proc.log_len();
        self.start(&[step.to_string()]).await;
        let r = call(self.client().await.unwrap()).await;
        assert!(r.is_err(), "{step}: the {what} fails with the host agent: {r:?}");
        self.proc.crashed_at(step, mark).await;
        let started = Instant::now();
        self.start(&[]).await;
        started
    }

    async fn client(&self) -> Result<HostAgentClient<Channel>, String> {
        xpu_sync_common::unix_channel(&self.socket).await.map(HostAgentClient::new).map_err(|e| format!("{e:#}"))
    }

    fn state(&self) -> Value {
        std::fs::read_to_string(&self.state_file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_else(|| json!({}))
    }
}

// ---- the broker's side ------------------------------------------------------------------------

/// Per object (kind, namespace, name): (spec writes, deletes) in the broker's whole log.
async fn log_history(admin: &mut AdminServiceClient<Channel>) -> BTreeMap<(i32, String, String), (u32, u32)> {
    let head = head(admin).await;
    let req =
        pb::WatchRequest { kinds: vec![pb::Kind::Netdev as i32, pb::Kind::LogicalBridge as i32], since_revision: 1 };
    let mut stream = admin.watch(req).await.unwrap().into_inner();
    let mut out: BTreeMap<(i32, String, String), (u32, u32)> = BTreeMap::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the log replays")
            .unwrap()
            .expect("the watch stays open");
        if let Some(pb::watch_event::Event::Change(c)) = &ev.event
            && let Some((kind, m)) = c.object.as_ref().and_then(meta_of)
        {
            let entry = out.entry((kind, m.namespace.clone(), m.name.clone())).or_default();
            match pb::ChangeType::try_from(c.r#type) {
                Ok(pb::ChangeType::Spec) => entry.0 += 1,
                Ok(pb::ChangeType::Deleted) => entry.1 += 1,
                _ => {}
            }
        }
        if ev.revision >= head {
            return out;
        }
    }
}

async fn names_in_broker(admin: &mut AdminServiceClient<Channel>, kind: pb::Kind) -> BTreeSet<String> {
    let req = pb::ListRequest { kind: kind as i32, limit: 1000, ..Default::default() };
    let page = admin.list(req).await.unwrap().into_inner();
    page.items.iter().filter_map(meta_of).map(|(_, m)| m.name.clone()).collect()
}

// ---- the environment and its checks ---------------------------------------------------------

/// The objects checked, their spec writes and deletes in the broker's log, and their creations
/// and deletions in the clusters.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    objects: u32,
    spec_writes: u32,
    deletes: u32,
    created: u32,
    deleted: u32,
}

/// Who wrote a Netdev: the host agent (the fast path), or a user in the tenant cluster (the
/// CRD path, carried up by tenant-sync).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Origin {
    Host,
    Tenant,
}

struct Env {
    tsync: Syncer,
    isync: Syncer,
    dpu: Dpu,
    _broker: BrokerProcess,
    admin: AdminServiceClient<Channel>,
    host: HostServiceClient<Channel>,
    url: String,
    tenant: Kube,
    infra: Kube,
    /// Live Netdevs (VF index) and who wrote them; Netdevs deleted.
    netdevs: BTreeMap<u32, Origin>,
    gone_netdevs: BTreeSet<u32>,
    /// LogicalBridges written in the infra cluster: live ones and deleted ones.
    bridges: BTreeSet<String>,
    gone_bridges: BTreeSet<String>,
    next_vf: u32,
    next_bridge: u32,
    crashes: u32,
    worst: Duration,
    /// What the last check counted.
    tally: Tally,
    _pki: Pki,
    _work: tempfile::TempDir,
}

impl Env {
    /// The broker, the seeded fabric, the DPU with its agent, both clusters; the syncers are
    /// built but not started.
    async fn new(pool: &PgPool) -> Env {
        let work = tempfile::tempdir().unwrap();
        let pki = Pki::new(&[]);
        let Seeded { broker, url, admin } = seeded_broker(pool, &pki, work.path(), &[]).await;
        let dpu = Dpu::start(&pki, &url, SERIAL, &[]).await;
        let host = host(&pki, &broker, NODE).await;
        let tenant = Kube::start(work.path(), "tenant").await;
        let infra = Kube::start(work.path(), "infra").await;
        let tsync = Syncer::new("tenant", &pki, &tenant, &url, work.path());
        let isync = Syncer::new("infra", &pki, &infra, &url, work.path());
        Env {
            tsync,
            isync,
            dpu,
            _broker: broker,
            admin,
            host,
            url,
            tenant,
            infra,
            netdevs: BTreeMap::new(),
            gone_netdevs: BTreeSet::new(),
            bridges: BTreeSet::new(),
            gone_bridges: BTreeSet::new(),
            next_vf: 0,
            next_bridge: 0,
            crashes: 0,
            worst: Duration::ZERO,
            tally: Tally::default(),
            _pki: pki,
            _work: work,
        }
    }

    fn syncer(&mut self, side: &str) -> &mut Syncer {
        if side == "tenant" { &mut self.tsync } else { &mut self.isync }
    }

    fn logs(&self) -> String {
        format!(
            "--- tenant-sync:\n{}\n--- infra-sync:\n{}\n--- dpu-agent:\n{}",
            self.tsync.proc.log_text(),
            self.isync.proc.log_text(),
            self.dpu.agent.log_text()
        )
    }

    fn vf(&mut self) -> u32 {
        self.next_vf += 1;
        self.next_vf - 1
    }

    /// Attaches a new VF through the broker as the host agent does; returns the pending call
    /// (it completes once the DPU reports Connected).
    fn attach(&mut self) -> (u32, tokio::task::JoinHandle<Result<pb::AttachNetdevResponse, tonic::Status>>) {
        let vf = self.vf();
        self.netdevs.insert(vf, Origin::Host);
        let mut host = self.host.clone();
        (vf, tokio::spawn(async move { xpu_testkit::attach(&mut host, SERIAL, vf, NODE).await }))
    }

    /// Waits for a pending attach; one that timed out waiting for the DPU is retried, as the
    /// host agent's caller would.
    async fn attached(&self, vf: u32, call: tokio::task::JoinHandle<Result<pb::AttachNetdevResponse, tonic::Status>>) {
        let mut r = call.await.unwrap();
        if r.as_ref().is_err_and(|s| s.code() == tonic::Code::DeadlineExceeded) {
            r = xpu_testkit::attach(&mut self.host.clone(), SERIAL, vf, NODE).await;
        }
        assert!(r.is_ok(), "the attach of vf{vf}: {r:?}\n{}", self.logs());
    }

    async fn detach(&mut self, vf: u32) {
        let req = pb::DetachNetdevRequest { namespace: NS.into(), name: netdev_name(vf) };
        self.host.clone().detach_netdev(req).await.unwrap();
        self.netdevs.remove(&vf);
        self.gone_netdevs.insert(vf);
    }

    /// A Netdev created by a user in the tenant cluster (the CRD path).
    async fn create_netdev(&mut self) -> u32 {
        let vf = self.vf();
        let name = netdev_name(vf);
        let nd = json!({"apiVersion": "xpu.opi.dev/v1alpha1", "kind": "Netdev",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"netdevId": name, "hostname": NODE, "network": "tenant-a"}});
        let obj: DynamicObject = serde_json::from_value(nd).unwrap();
        self.tenant.api(pb::Kind::Netdev).create(&PostParams::default(), &obj).await.unwrap();
        self.netdevs.insert(vf, Origin::Tenant);
        vf
    }

    async fn delete_netdev(&mut self, vf: u32) {
        self.tenant.api(pb::Kind::Netdev).delete(&netdev_name(vf), &DeleteParams::default()).await.unwrap();
        self.netdevs.remove(&vf);
        self.gone_netdevs.insert(vf);
    }

    /// A LogicalBridge created by an operator in the infra cluster.
    async fn create_bridge(&mut self) -> String {
        let n = self.next_bridge;
        self.next_bridge += 1;
        let name = format!("lb-{}", 20 + n);
        let lb = json!({"apiVersion": "xpu.opi.dev/v1alpha1", "kind": "LogicalBridge", "metadata": {"name": name},
            "spec": {"vlanId": 20 + n, "vni": 1020 + n}});
        let obj: DynamicObject = serde_json::from_value(lb).unwrap();
        self.infra.api(pb::Kind::LogicalBridge).create(&PostParams::default(), &obj).await.unwrap();
        self.bridges.insert(name.clone());
        name
    }

    async fn delete_bridge(&mut self, name: &str) {
        self.infra.api(pb::Kind::LogicalBridge).delete(name, &DeleteParams::default()).await.unwrap();
        self.bridges.remove(name);
        self.gone_bridges.insert(name.to_string());
    }

    /// Kills the dpu-agent: the DPU is slow to answer (its dataplane keeps everything).
    fn stop_agent(&mut self) {
        self.dpu.agent.kill();
    }

    fn start_agent(&mut self) {
        let url = self.url.clone();
        self.dpu.restart_agent(&url, &[]);
    }

    /// Both syncers ready and their persisted revisions at the broker's head: nothing in flight.
    async fn settled(&self) -> Result<(), String> {
        let head = head(&mut self.admin.clone()).await;
        for (s, kube) in [(&self.tsync, &self.tenant), (&self.isync, &self.infra)] {
            if !s.ready().await {
                return Err(format!("{} is not ready", s.proc.name));
            }
            let persisted = kube.persisted(s.state);
            if persisted < head {
                return Err(format!("{} persisted revision {persisted}, the head is {head}", s.proc.name));
            }
        }
        Ok(())
    }

    async fn wait_settled(&self) {
        let last = RefCell::new(String::new());
        let ok =
            xpu_fault::wait_for(SETTLE, || async { self.settled().await.map_err(|e| *last.borrow_mut() = e).ok() })
                .await;
        assert!(ok.is_some(), "not settled: {}\n{}", last.borrow(), self.logs());
    }

    /// Everything that must hold of a live Netdev once the syncers have caught up.
    async fn live_netdev(&self, vf: u32, origin: Origin) -> Result<(), String> {
        let name = netdev_name(vf);
        let Some(pb::resource::Kind::Netdev(nd)) =
            xpu_testkit::get(&mut self.admin.clone(), pb::Kind::Netdev, NS, &name).await.and_then(|r| r.kind)
        else {
            return Err(format!("{name} is not in the broker"));
        };
        let meta = nd.metadata.unwrap_or_default();
        let author = match origin {
            Origin::Host => format!("host/{NODE}"),
            Origin::Tenant => "cluster/east/tenant".to_string(),
        };
        if meta.generation != 1 || meta.spec_author != author {
            return Err(format!("{name} in the broker: generation {} by {}", meta.generation, meta.spec_author));
        }
        let st = nd.status.unwrap_or_default();
        if st.phase != "Connected" || st.ip.is_empty() {
            return Err(format!("{name} in the broker: {st:?}"));
        }
        let t = self.tenant.get(pb::Kind::Netdev, &name).await.ok_or(format!("{name} not in the tenant cluster"))?;
        synced(&t, &format!("{name} in the tenant cluster"))?;
        if t["status"]["phase"] != "Connected" || t["status"]["ip"] != st.ip.as_str() {
            return Err(format!("{name} in the tenant cluster: status {}", t["status"]));
        }
        let mirror = t["metadata"]["labels"][MIRROR_LABEL] == "true";
        let finalized =
            t["metadata"]["finalizers"].as_array().is_some_and(|f| f.iter().any(|f| f.as_str() == Some(FINALIZER)));
        match origin {
            Origin::Host if !mirror => return Err(format!("{name} in the tenant cluster is not a mirror")),
            Origin::Tenant if mirror || !finalized => {
                return Err(format!("{name} in the tenant cluster: metadata {}", t["metadata"]));
            }
            _ => {}
        }
        let i = self.infra.get(pb::Kind::Netdev, &name).await.ok_or(format!("{name} not in the infra cluster"))?;
        synced(&i, &format!("{name} in the infra cluster"))?;
        if i["metadata"]["labels"][MIRROR_LABEL] != "true"
            || i["status"]["phase"] != "Connected"
            || i["status"]["dpu"] != SERIAL
        {
            return Err(format!("{name} in the infra cluster: {i}"));
        }
        Ok(())
    }

    /// Everything that must hold of a live LogicalBridge written in the infra cluster.
    async fn live_bridge(&self, name: &str) -> Result<(), String> {
        let Some(pb::resource::Kind::LogicalBridge(lb)) =
            xpu_testkit::get(&mut self.admin.clone(), pb::Kind::LogicalBridge, "", name).await.and_then(|r| r.kind)
        else {
            return Err(format!("{name} is not in the broker"));
        };
        let meta = lb.metadata.unwrap_or_default();
        if meta.generation != 1 || meta.spec_author != "cluster/east/infra" {
            return Err(format!("{name} in the broker: generation {} by {}", meta.generation, meta.spec_author));
        }
        let programmed = |dpus: &Value| {
            dpus.as_array().is_some_and(|d| d.iter().any(|d| d["dpu"] == SERIAL && d["phase"] == "Programmed"))
        };
        let i =
            self.infra.get(pb::Kind::LogicalBridge, name).await.ok_or(format!("{name} not in the infra cluster"))?;
        synced(&i, &format!("{name} in the infra cluster"))?;
        let finalized =
            i["metadata"]["finalizers"].as_array().is_some_and(|f| f.iter().any(|f| f.as_str() == Some(FINALIZER)));
        if !programmed(&i["status"]["dpus"]) || !finalized || i["metadata"]["labels"][MIRROR_LABEL] == "true" {
            return Err(format!("{name} in the infra cluster: {i}"));
        }
        Ok(())
    }

    /// The whole end state: each object as it must be, and nothing else anywhere.
    async fn consistent(&self) -> Result<(), String> {
        for (vf, origin) in &self.netdevs {
            self.live_netdev(*vf, *origin).await?;
        }
        for name in &self.bridges {
            self.live_bridge(name).await?;
        }
        let mut admin = self.admin.clone();
        let live: BTreeSet<String> = self.netdevs.keys().map(|vf| netdev_name(*vf)).collect();
        let mut bridges: BTreeSet<String> = self.bridges.clone();
        bridges.insert(SEEDED_BRIDGE.into());
        let places = [
            ("broker", names_in_broker(&mut admin, pb::Kind::Netdev).await, pb::Kind::Netdev),
            ("tenant cluster", self.tenant.names(pb::Kind::Netdev), pb::Kind::Netdev),
            ("infra cluster", self.infra.names(pb::Kind::Netdev), pb::Kind::Netdev),
            ("broker", names_in_broker(&mut admin, pb::Kind::LogicalBridge).await, pb::Kind::LogicalBridge),
            ("infra cluster", self.infra.names(pb::Kind::LogicalBridge), pb::Kind::LogicalBridge),
        ];
        for (place, names, kind) in places {
            let expected = if kind == pb::Kind::Netdev { &live } else { &bridges };
            if &names != expected {
                return Err(format!("{kind:?} in the {place}: {names:?}, expected {expected:?}"));
            }
        }
        let counts = self.dpu.sim.counts();
        if counts.bridge_ports != live.len() || counts.logical_bridges != bridges.len() {
            return Err(format!("dataplane: {counts:?} for {} netdevs and {} bridges", live.len(), bridges.len()));
        }
        self.settled().await
    }

    /// Waits for [`Env::consistent`]; panics with the last difference.
    async fn wait_consistent(&self, what: &str) -> Duration {
        let started = Instant::now();
        let last = RefCell::new(String::new());
        let ok =
            xpu_fault::wait_for(SETTLE, || async { self.consistent().await.map_err(|e| *last.borrow_mut() = e).ok() })
                .await;
        assert!(ok.is_some(), "{what}: not consistent: {}\n{}", last.borrow(), self.logs());
        started.elapsed()
    }

    /// Exactly once: one spec write per object in the broker's log (a delete only for deleted
    /// ones), and one creation per object in each cluster it belongs in (a deletion only for
    /// deleted ones).
    async fn exactly_once(&mut self, what: &str) {
        let history = log_history(&mut self.admin.clone()).await;
        let mut objects: Vec<(pb::Kind, String, bool)> = Vec::new();
        for vf in self.netdevs.keys() {
            objects.push((pb::Kind::Netdev, netdev_name(*vf), false));
        }
        for vf in &self.gone_netdevs {
            objects.push((pb::Kind::Netdev, netdev_name(*vf), true));
        }
        for b in &self.bridges {
            objects.push((pb::Kind::LogicalBridge, b.clone(), false));
        }
        for b in &self.gone_bridges {
            objects.push((pb::Kind::LogicalBridge, b.clone(), true));
        }
        let mut tally = Tally { objects: objects.len() as u32, ..Tally::default() };
        for (kind, name, gone) in &objects {
            let ns = if *kind == pb::Kind::Netdev { NS } else { "" };
            let (specs, deletes) =
                history.get(&(*kind as i32, ns.to_string(), name.clone())).copied().unwrap_or((0, 0));
            assert_eq!(
                (specs, deletes),
                (1, u32::from(*gone)),
                "{what}: {kind:?} {name} in the broker's log: {specs} spec writes, {deletes} deletes"
            );
            tally.spec_writes += specs;
            tally.deletes += deletes;
        }
        // Netdevs are in both clusters, LogicalBridges only in the infra cluster. The clusters'
        // watches may be a moment behind.
        let clusters = |kind: pb::Kind| -> Vec<(&Kube, &str)> {
            if kind == pb::Kind::Netdev {
                vec![(&self.tenant, "tenant"), (&self.infra, "infra")]
            } else {
                vec![(&self.infra, "infra")]
            }
        };
        let mut last = String::new();
        let ok = xpu_fault::wait_for(Duration::from_secs(10), || {
            let mut wrong = None;
            for (kind, name, gone) in &objects {
                for (kube, cluster) in clusters(*kind) {
                    let want = (1, u32::from(*gone));
                    let seen = kube.seen(*kind, name);
                    if seen != want {
                        wrong = Some(format!(
                            "{kind:?} {name} in the {cluster} cluster: created {} and deleted {} times",
                            seen.0, seen.1
                        ));
                    }
                }
            }
            if let Some(w) = &wrong {
                last.clone_from(w);
            }
            async move { wrong.is_none().then_some(()) }
        })
        .await;
        assert!(ok.is_some(), "{what}: {last}");
        for (kind, name, _) in &objects {
            for (kube, _) in clusters(*kind) {
                let (created, deleted) = kube.seen(*kind, name);
                tally.created += created;
                tally.deleted += deleted;
            }
        }
        self.tally = tally;
    }

    /// After a crash: `syncer` is started again without failpoints; the end state is checked.
    async fn recover(&mut self, side: &str, what: &str) {
        self.crashes += 1;
        self.syncer(side).proc.start(&[]);
        let took = self.wait_consistent(what).await;
        self.exactly_once(what).await;
        self.worst = self.worst.max(took);
        println!("{what}: consistent {} ms after the restart", took.as_millis());
    }
}

/// Synced as the syncers leave an object: at its generation, condition `Synced=True`, not being
/// deleted.
fn synced(v: &Value, what: &str) -> Result<(), String> {
    let generation = &v["metadata"]["generation"];
    if &v["status"]["syncedGeneration"] != generation {
        return Err(format!("{what}: syncedGeneration {} at generation {generation}", v["status"]["syncedGeneration"]));
    }
    let conditions = v["status"]["conditions"].as_array();
    if !conditions.is_some_and(|cs| cs.iter().any(|c| c["type"] == "Synced" && c["status"] == "True")) {
        return Err(format!("{what}: conditions {}", v["status"]["conditions"]));
    }
    if !v["metadata"]["deletionTimestamp"].is_null() {
        return Err(format!("{what}: being deleted: {}", v["metadata"]));
    }
    Ok(())
}

fn armed(failpoint: &str, kind: &str) -> String {
    format!("{failpoint}@{kind}")
}

// ---- the syncers ------------------------------------------------------------------------------

const FIRST_START: &str = "sync.revision.save.before";
const MIRROR_STEPS: [&str; 2] = ["sync.mirror.apply.before", "sync.mirror.apply.after"];
const MIRROR_STATUS_STEPS: [&str; 2] = ["sync.mirror.status.before", "sync.mirror.status.after"];
const CARRY_STEPS: [&str; 2] = ["sync.carry.apply.before", "sync.carry.apply.after"];
const CARRY_STATUS_STEPS: [&str; 2] = ["sync.carry.status.before", "sync.carry.status.after"];
const REVISION_STEPS: [&str; 2] = ["sync.revision.save.before", "sync.revision.save.after"];
const REMOVE_STEPS: [&str; 2] = ["sync.mirror.remove.before", "sync.mirror.remove.after"];
const DELETE_STEPS: [&str; 2] = ["sync.carry.delete.before", "sync.carry.delete.after"];

/// Every step of one syncer (`side`), while the other one runs undisturbed.
async fn crash_the_syncer_at_every_step(pool: PgPool, side: &'static str) {
    let scenario = format!("{SCENARIO}-{side}");
    let mut env = Env::new(&pool).await;
    let other = if side == "tenant" { "infra" } else { "tenant" };
    // The object this side carries up (the tenant: a Netdev, the CRD path; the infra side: a
    // LogicalBridge).
    let carried = if side == "tenant" { "Netdev" } else { "LogicalBridge" };

    // First start: the syncer takes a snapshot, mirrors a Netdev that exists already, and
    // crashes before it ever persisted a revision. While it is away the Netdev is detached and
    // another attached; started again, it takes a snapshot again: the mirror of the detached
    // Netdev must go, the new one must come.
    let (early, attach) = env.attach();
    env.attached(early, attach).await;
    env.syncer(other).proc.start(&[]);
    let mark = env.syncer(side).proc.log_len();
    env.syncer(side).proc.start(&[FIRST_START.to_string()]);
    env.syncer(side).proc.crashed_at(FIRST_START, mark).await;
    assert_eq!(
        if side == "tenant" { env.tenant.persisted(env.tsync.state) } else { env.infra.persisted(env.isync.state) },
        0,
        "no revision persisted"
    );
    let mirrored = if side == "tenant" { &env.tenant } else { &env.infra };
    assert!(mirrored.get(pb::Kind::Netdev, &netdev_name(early)).await.is_some(), "mirrored before the crash");
    env.detach(early).await;
    let (vf, attach) = env.attach();
    env.attached(vf, attach).await;
    env.recover(side, &format!("{side}-sync at its first {FIRST_START}")).await;

    // The fast path: a Netdev attached through the broker is mirrored down.
    for step in MIRROR_STEPS {
        let mark = env.syncer(side).proc.log_len();
        env.syncer(side).arm(&armed(step, "Netdev")).await;
        let (vf, attach) = env.attach();
        env.syncer(side).proc.crashed_at(step, mark).await;
        env.attached(vf, attach).await;
        env.recover(side, step).await;
    }
    // Its status (the DPU's Connected) is written back while the syncer crashes: the DPU is
    // slow, so the mirror is written first and the status comes later.
    for step in MIRROR_STATUS_STEPS {
        env.stop_agent();
        let (vf, attach) = env.attach();
        let spec_mirrored = xpu_fault::wait_for(SETTLE, || async {
            let kube = if side == "tenant" { &env.tenant } else { &env.infra };
            let m = kube.get(pb::Kind::Netdev, &netdev_name(vf)).await?;
            (m["status"]["syncedGeneration"] == 1).then_some(())
        })
        .await;
        assert!(spec_mirrored.is_some(), "{step}: the mirror is written:\n{}", env.logs());
        env.wait_settled().await;
        let mark = env.syncer(side).proc.log_len();
        env.syncer(side).arm(&armed(step, "Netdev")).await;
        env.start_agent();
        env.syncer(side).proc.crashed_at(step, mark).await;
        env.attached(vf, attach).await;
        env.recover(side, step).await;
    }

    // The CRD path: an object written in this side's cluster is carried up to the broker.
    for step in CARRY_STEPS {
        let mark = env.syncer(side).proc.log_len();
        env.syncer(side).arm(&armed(step, carried)).await;
        if side == "tenant" {
            env.create_netdev().await;
        } else {
            env.create_bridge().await;
        }
        env.syncer(side).proc.crashed_at(step, mark).await;
        env.recover(side, step).await;
    }
    // ...and the DPU's status comes back to it.
    for step in CARRY_STATUS_STEPS {
        env.stop_agent();
        let name = if side == "tenant" { netdev_name(env.create_netdev().await) } else { env.create_bridge().await };
        let kind = if side == "tenant" { pb::Kind::Netdev } else { pb::Kind::LogicalBridge };
        let carried_up = xpu_fault::wait_for(SETTLE, || async {
            let kube = if side == "tenant" { &env.tenant } else { &env.infra };
            let o = kube.get(kind, &name).await?;
            (o["status"]["syncedGeneration"] == 1).then_some(())
        })
        .await;
        assert!(carried_up.is_some(), "{step}: carried up:\n{}", env.logs());
        env.wait_settled().await;
        let mark = env.syncer(side).proc.log_len();
        env.syncer(side).arm(&armed(step, carried)).await;
        env.start_agent();
        env.syncer(side).proc.crashed_at(step, mark).await;
        env.recover(side, step).await;
    }

    // The revision is persisted (or not yet) when the syncer crashes.
    for step in REVISION_STEPS {
        env.wait_settled().await;
        let mark = env.syncer(side).proc.log_len();
        env.syncer(side).arm(step).await;
        let (vf, attach) = env.attach();
        env.syncer(side).proc.crashed_at(step, mark).await;
        env.attached(vf, attach).await;
        env.recover(side, step).await;
    }

    // Detach: the mirror of a Netdev the broker deleted is removed.
    let fast: Vec<u32> = env.netdevs.iter().filter(|(_, o)| **o == Origin::Host).map(|(vf, _)| *vf).collect();
    for (step, vf) in REMOVE_STEPS.into_iter().zip(fast) {
        let mark = env.syncer(side).proc.log_len();
        env.syncer(side).arm(&armed(step, "Netdev")).await;
        env.detach(vf).await;
        env.syncer(side).proc.crashed_at(step, mark).await;
        env.recover(side, step).await;
    }
    // Delete in the cluster: the broker gets the tombstone, then the finalizer goes.
    let ours: Vec<String> = if side == "tenant" {
        env.netdevs.iter().filter(|(_, o)| **o == Origin::Tenant).map(|(vf, _)| netdev_name(*vf)).collect()
    } else {
        env.bridges.iter().cloned().collect()
    };
    for (step, name) in DELETE_STEPS.into_iter().zip(ours) {
        let mark = env.syncer(side).proc.log_len();
        env.syncer(side).arm(&armed(step, carried)).await;
        if side == "tenant" {
            let vf = env.netdevs.keys().copied().find(|vf| netdev_name(*vf) == name).unwrap();
            env.delete_netdev(vf).await;
        } else {
            env.delete_bridge(&name).await;
        }
        env.syncer(side).proc.crashed_at(step, mark).await;
        env.recover(side, step).await;
    }

    let failpoints = 1
        + MIRROR_STEPS.len()
        + MIRROR_STATUS_STEPS.len()
        + CARRY_STEPS.len()
        + CARRY_STATUS_STEPS.len()
        + REVISION_STEPS.len()
        + REMOVE_STEPS.len()
        + DELETE_STEPS.len();
    assert_eq!(env.crashes as usize, failpoints);
    // The other syncer never crashed.
    assert_eq!(env.syncer(other).proc.starts, 1);
    report(&scenario, "failpoints", failpoints - 1);
    report(&scenario, "crashes", env.crashes);
    report(&scenario, "netdevs_live_deleted", format!("{}/{}", env.netdevs.len(), env.gone_netdevs.len()));
    report(&scenario, "bridges_live_deleted", format!("{}/{}", env.bridges.len(), env.gone_bridges.len()));
    let t = env.tally;
    report(
        &scenario,
        "broker_spec_writes_deletes",
        format!("{}/{} for {} objects", t.spec_writes, t.deletes, t.objects),
    );
    report(&scenario, "cluster_creations_deletions", format!("{}/{}", t.created, t.deleted));
    report(&scenario, "leaked_or_stuck", 0);
    report(&scenario, "worst_restart_to_consistent_ms", env.worst.as_millis());
}

#[sqlx::test(migrations = false)]
async fn tenant_sync_crashes_at_every_step(pool: PgPool) {
    crash_the_syncer_at_every_step(pool, "tenant").await;
}

#[sqlx::test(migrations = false)]
async fn infra_sync_crashes_at_every_step(pool: PgPool) {
    crash_the_syncer_at_every_step(pool, "infra").await;
}

/// A status the cluster refused is tried again after a delay. While it waits, the controller
/// must not persist the revision it came with: a crash in that window would otherwise lose the
/// status for good (after the restart the object looks in sync and no change brings it again).
#[sqlx::test(migrations = false)]
async fn a_status_the_cluster_refused_survives_a_crash_while_it_waits(pool: PgPool) {
    let mut env = Env::new(&pool).await;
    env.tsync.proc.start(&[]);
    env.isync.proc.start(&[]);
    env.wait_settled().await;
    // A Netdev created in the tenant cluster reaches the broker while the DPU is not answering.
    env.stop_agent();
    let vf = env.create_netdev().await;
    let name = netdev_name(vf);
    let carried = xpu_fault::wait_for(SETTLE, || {
        let mut admin = env.admin.clone();
        let name = name.clone();
        async move { xpu_testkit::get(&mut admin, pb::Kind::Netdev, NS, &name).await.map(|_| ()) }
    })
    .await;
    assert!(carried.is_some(), "{name} reaches the broker:\n{}", env.logs());
    env.wait_settled().await;

    // The tenant cluster refuses every status write; the DPU comes back and reports Connected.
    env.tenant.server.fail_status_writes(usize::MAX);
    let mark = env.tsync.proc.log_len();
    env.start_agent();
    let failing = xpu_fault::wait_for(SETTLE, || {
        let log = env.tsync.proc.log_text();
        let seen = log.get(mark..).is_some_and(|l| l.contains("sync failed; retrying") && l.contains(&name));
        async move { seen.then_some(()) }
    })
    .await;
    assert!(failing.is_some(), "the status write of {name} fails:\n{}", env.logs());
    // Several of the controller's persist ticks (250 ms) pass while the write keeps failing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let head = head(&mut env.admin.clone()).await;
    let persisted = env.tenant.persisted(env.tsync.state);
    assert!(persisted < head, "the revision {persisted} was persisted past the refused status (head {head})");

    // A crash now, then the cluster accepts writes again: the status arrives.
    env.tsync.proc.kill();
    env.tenant.server.fail_status_writes(0);
    env.tsync.proc.start(&[]);
    let last = RefCell::new(String::new());
    let arrived = xpu_fault::wait_for(SETTLE, || async {
        env.live_netdev(vf, Origin::Tenant).await.map_err(|e| *last.borrow_mut() = e).ok()
    })
    .await;
    assert!(arrived.is_some(), "after the restart: {}\n{}", last.borrow(), env.logs());
    env.wait_settled().await;
    report(&format!("{SCENARIO}-refused-status"), "persisted_below_head", 1);
}

// ---- the host agent ---------------------------------------------------------------------------

fn device_id(vf: u32) -> String {
    format!("0000:03:00.{}", vf + 1)
}

fn attach_request(vf: u32) -> hv::AttachRequest {
    hv::AttachRequest {
        device_id: device_id(vf),
        pod: Some(hv::PodIdentity { namespace: NS.into(), name: format!("pod-{vf}"), uid: format!("uid-{vf}") }),
        network: "tenant-a".into(),
        interface: "net1".into(),
        container_id: format!("c-{vf}"),
        resource_name: String::new(),
        timeout_ms: 20_000,
    }
}

fn detach_request(vf: u32) -> hv::DetachRequest {
    hv::DetachRequest {
        container_id: format!("c-{vf}"),
        interface: "net1".into(),
        netdev_id: netdev_name(vf),
        pod: Some(hv::PodIdentity { namespace: NS.into(), name: format!("pod-{vf}"), uid: format!("uid-{vf}") }),
    }
}

/// The kubelet retrying CNI ADD (or DEL) until the host agent answers.
async fn retried<T, F, Fut>(agent: &HostAgent, what: &str, call: F) -> T
where
    F: Fn(HostAgentClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut last = String::new();
    for _ in 0..30 {
        match agent.client().await {
            Ok(c) => match call(c).await {
                Ok(r) => return r.into_inner(),
                Err(s) => last = format!("{:?}: {}", s.code(), s.message()),
            },
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{what}: never answered: {last}\n{}", agent.proc.log_text());
}

#[sqlx::test(migrations = false)]
async fn host_agent_crashes_at_every_step(pool: PgPool) {
    const SCENARIO_HOST: &str = "syncer-crash-host-agent";
    let work = tempfile::tempdir().unwrap();
    let pki = Pki::new(&[]);
    let Seeded { broker, url, mut admin } = seeded_broker(&pool, &pki, work.path(), &[]).await;
    let dpu = Dpu::start(&pki, &url, SERIAL, &[]).await;
    let mut agent = HostAgent::new(&pki, &url, work.path());
    agent.start(&[]).await;

    // The device plugin's Allocate: VFs 0..5 reserved.
    let devices: Vec<hv::Device> = (0..5)
        .map(|vf| hv::Device { id: device_id(vf), pf: 0, index: vf, sf: false, interface: format!("vf{vf}") })
        .collect();
    let req = hv::ReserveRequest { resource_name: "xpu.opi.dev/vf".into(), devices };
    agent.client().await.unwrap().reserve(req).await.unwrap();

    let mut live: BTreeSet<u32> = BTreeSet::new();
    let mut gone: BTreeSet<u32> = BTreeSet::new();
    let mut crashes = 0;
    let mut worst = Duration::ZERO;

    // ADD runs into the crash; the runtime retries it (same container and interface).
    for (vf, step) in [(0u32, "hostagent.attach.before"), (1, "hostagent.attach.after")] {
        let started = agent.crash_at(step, "ADD", |mut c| async move { c.attach(attach_request(vf)).await }).await;
        crashes += 1;
        let resp = retried(&agent, step, |mut c| async move { c.attach(attach_request(vf)).await }).await;
        worst = worst.max(started.elapsed());
        let st = xpu_testkit::netdev_status(&mut admin, NS, &netdev_name(vf)).await.unwrap();
        assert_eq!(st.phase, "Connected", "{step}");
        assert_eq!(resp.address, st.ip, "{step}: the address the DPU reports");
        assert_eq!(resp.vf_interface, format!("vf{vf}"), "{step}");
        live.insert(vf);
    }
    // ADD runs into the crash after the broker answered, and the pod is deleted meanwhile: DEL
    // instead of the retry.
    {
        let (vf, step) = (2u32, "hostagent.attach.after");
        let started = agent.crash_at(step, "ADD", |mut c| async move { c.attach(attach_request(vf)).await }).await;
        crashes += 1;
        let resp = retried(&agent, step, |mut c| async move { c.detach(detach_request(vf)).await }).await;
        assert!(resp.existed, "{step}: the attachment was recorded before the broker call");
        worst = worst.max(started.elapsed());
        gone.insert(vf);
    }
    // DEL runs into the crash; the runtime retries it.
    for (vf, step) in [(0u32, "hostagent.detach.before"), (1, "hostagent.detach.after")] {
        let started = agent.crash_at(step, "DEL", |mut c| async move { c.detach(detach_request(vf)).await }).await;
        crashes += 1;
        let resp = retried(&agent, step, |mut c| async move { c.detach(detach_request(vf)).await }).await;
        assert!(resp.existed, "{step}: the attachment was still recorded");
        worst = worst.max(started.elapsed());
        live.remove(&vf);
        gone.insert(vf);
    }
    // One more attach and detach with the restarted agent: it works as before.
    let resp = retried(&agent, "a last ADD", |mut c| async move { c.attach(attach_request(3)).await }).await;
    assert!(!resp.address.is_empty());
    live.insert(3);

    // The end state: the broker has exactly the live Netdevs, each written once, Connected;
    // the deleted ones deleted once; one port per live Netdev; the host agent's state holds
    // exactly the live attachments and owes the broker nothing.
    let consistent = xpu_fault::wait_for(SETTLE, || {
        let mut admin = admin.clone();
        let ports = dpu.sim.counts().bridge_ports;
        let state = agent.state();
        let live = live.clone();
        async move {
            let names = names_in_broker(&mut admin, pb::Kind::Netdev).await;
            let expected: BTreeSet<String> = live.iter().map(|vf| netdev_name(*vf)).collect();
            let attachments: BTreeSet<String> = state["attachments"]
                .as_object()
                .map(|a| a.values().filter_map(|v| v["netdev_id"].as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            let pending = state["pending_detaches"].as_array().map_or(0, Vec::len);
            (names == expected && ports == live.len() && attachments == expected && pending == 0).then_some(())
        }
    })
    .await;
    assert!(
        consistent.is_some(),
        "not consistent: broker {:?}, ports {:?}, host agent state {}\n{}",
        names_in_broker(&mut admin, pb::Kind::Netdev).await,
        dpu.sim.names(),
        agent.state(),
        agent.proc.log_text()
    );
    for vf in &live {
        let st = xpu_testkit::netdev_status(&mut admin, NS, &netdev_name(*vf)).await.unwrap();
        assert_eq!(st.phase, "Connected", "vf{vf}");
    }
    let history = log_history(&mut admin).await;
    for (vf, deleted) in live.iter().map(|v| (v, 0)).chain(gone.iter().map(|v| (v, 1))) {
        let key = (pb::Kind::Netdev as i32, NS.to_string(), netdev_name(*vf));
        assert_eq!(history.get(&key).copied(), Some((1, deleted)), "vf{vf}: spec writes and deletes in the log");
    }
    // Devices of deleted pods are released; the live ones stay reserved.
    let state = agent.state();
    for vf in &gone {
        assert!(state["devices"].get(device_id(*vf)).is_none(), "vf{vf}'s device released: {state}");
    }

    report(SCENARIO_HOST, "failpoints", 4);
    report(SCENARIO_HOST, "crashes", crashes);
    let (writes, deletes) = history
        .iter()
        .filter(|((kind, _, _), _)| *kind == pb::Kind::Netdev as i32)
        .fold((0, 0), |(w, d), (_, (sw, sd))| (w + sw, d + sd));
    report(
        SCENARIO_HOST,
        "broker_spec_writes_deletes",
        format!("{writes}/{deletes} for {} netdevs", live.len() + gone.len()),
    );
    report(SCENARIO_HOST, "leaked_ports_or_attachments", 0);
    report(SCENARIO_HOST, "worst_restart_to_answer_ms", worst.as_millis());
    drop(broker);
}
