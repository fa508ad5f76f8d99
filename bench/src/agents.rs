//! Simulated agents on the real gRPC API: each DPU agent has its own certificate identity
//! (`dpu/<serial>`), its own mTLS connection and its own `WatchDesired` stream; host agents
//! (`host/<node>`) call `HostService`. Deliveries are timed against the moment the write was
//! sent through a [`Probe`].

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use arc_swap::ArcSwapOption;
use futures::StreamExt as _;
use tokio::{sync::mpsc, task::JoinHandle};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use xpu_broker::ca::Pem;
use xpu_proto::broker::v1::{
    self as pb, admin_service_client::AdminServiceClient, agent_service_client::AgentServiceClient,
    host_service_client::HostServiceClient, sync_service_client::SyncServiceClient, watch_event::Event as Ev,
};

use crate::{
    fixtures,
    pki::Pki,
    stats::{Latency, SharedLatency},
};

/// One mTLS HTTP/2 connection.
pub async fn connect(addr: SocketAddr, tls: ClientTlsConfig) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(20))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect()
        .await?)
}

/// A connection, retried with backoff (storms of handshakes may time out); returns the retries.
pub async fn connect_retrying(addr: SocketAddr, tls: ClientTlsConfig, attempts: u32) -> anyhow::Result<(Channel, u32)> {
    let mut delay = Duration::from_millis(50);
    let mut tries = 0;
    loop {
        match connect(addr, tls.clone()).await {
            Ok(c) => return Ok((c, tries)),
            Err(e) if tries + 1 >= attempts => return Err(e),
            Err(_) => {
                tries += 1;
                tokio::time::sleep(delay + Duration::from_millis(rand::random_range(0..50))).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

pub async fn channels(addr: SocketAddr, pki: &Pki, identity: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let pem = pki.one(identity)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        out.push(connect(addr, pki.client_tls(&pem)).await?);
    }
    Ok(out)
}

pub async fn admins(addr: SocketAddr, pki: &Pki, n: usize) -> anyhow::Result<Vec<AdminServiceClient<Channel>>> {
    Ok(channels(addr, pki, "admin/bench", n).await?.into_iter().map(AdminServiceClient::new).collect())
}

/// SyncService clients, one connection and one infra-cluster identity each.
pub async fn syncers(addr: SocketAddr, pki: &Pki, n: usize) -> anyhow::Result<Vec<SyncServiceClient<Channel>>> {
    let mut out = Vec::new();
    for i in 0..n.max(1) {
        out.extend(
            channels(addr, pki, &format!("cluster/bench{i}/infra"), 1).await?.into_iter().map(SyncServiceClient::new),
        );
    }
    Ok(out)
}

/// When each tracked write was sent and when its copies arrived, by sequence number.
pub struct Probe {
    epoch: Instant,
    sent_ns: Vec<AtomicU64>,
    arrivals: Vec<AtomicU32>,
    last_ns: Vec<AtomicU64>,
    deliveries: SharedLatency,
    unknown: AtomicU64,
}

impl Probe {
    pub fn new(capacity: usize) -> Arc<Probe> {
        Arc::new(Probe {
            epoch: Instant::now(),
            sent_ns: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
            arrivals: (0..capacity).map(|_| AtomicU32::new(0)).collect(),
            last_ns: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
            deliveries: SharedLatency::default(),
            unknown: AtomicU64::new(0),
        })
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1)
    }

    /// Marks `seq` as sent at `at` (the scheduled time, for open-loop load).
    pub fn sent_at(&self, seq: u64, at: Instant) {
        if let Some(s) = usize::try_from(seq).ok().and_then(|i| self.sent_ns.get(i)) {
            let ns = u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX).max(1);
            s.store(ns, Ordering::Release);
        }
    }

    pub fn arrived(&self, seq: u64) {
        let Some(i) = usize::try_from(seq).ok().filter(|i| *i < self.sent_ns.len()) else {
            self.unknown.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let sent = self.sent_ns[i].load(Ordering::Acquire);
        if sent == 0 {
            self.unknown.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = self.now_ns();
        self.arrivals[i].fetch_add(1, Ordering::AcqRel);
        self.last_ns[i].fetch_max(now, Ordering::AcqRel);
        self.deliveries.record(Duration::from_nanos(now.saturating_sub(sent)));
    }

    pub fn delivered(&self) -> u64 {
        self.deliveries.count()
    }

    pub fn deliveries(&self) -> Option<crate::stats::Summary> {
        self.deliveries.summary()
    }

    /// Per write: the time until its `expected`-th copy arrived. Returns the histogram, how many
    /// writes reached every stream, and how many sent writes did not.
    pub fn completion(&self, expected: u32) -> (Latency, u64, u64) {
        let mut h = Latency::new();
        let (mut complete, mut incomplete) = (0, 0);
        for i in 0..self.sent_ns.len() {
            let sent = self.sent_ns[i].load(Ordering::Acquire);
            if sent == 0 {
                continue;
            }
            if self.arrivals[i].load(Ordering::Acquire) >= expected {
                complete += 1;
                h.record(Duration::from_nanos(self.last_ns[i].load(Ordering::Acquire).saturating_sub(sent)));
            } else {
                incomplete += 1;
            }
        }
        (h, complete, incomplete)
    }

    /// Waits until `sent` writes each reached `expected` streams, or `timeout`.
    pub async fn wait_complete(&self, sent: u64, expected: u32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let n = usize::try_from(sent).unwrap_or(usize::MAX).min(self.sent_ns.len());
        loop {
            if (0..n).all(|i| {
                self.sent_ns[i].load(Ordering::Acquire) == 0 || self.arrivals[i].load(Ordering::Acquire) >= expected
            }) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What every agent of a fleet shares: the current probe, behaviour switches and counters.
pub struct Fleet {
    pub probe: ArcSwapOption<Probe>,
    /// Report `Connected` for every Netdev that arrives (the attach flow).
    pub auto_report: AtomicBool,
    pub flush_interval: Duration,
    pub resync_required: AtomicU64,
    pub resync_initial: AtomicU64,
    pub snapshots_done: AtomicU64,
    pub stream_errors: AtomicU64,
    /// Streams re-opened after the broker ended them.
    pub stream_retries: AtomicU64,
    pub first_error: Mutex<Option<String>>,
    pub report_calls: AtomicU64,
    pub reports_accepted: AtomicU64,
    pub report_errors: AtomicU64,
    pub events: AtomicU64,
    pub heartbeats: AtomicU64,
    pub heartbeat_errors: AtomicU64,
}

impl Fleet {
    pub fn new(flush_interval: Duration) -> Arc<Fleet> {
        Arc::new(Fleet {
            probe: ArcSwapOption::empty(),
            auto_report: AtomicBool::new(false),
            flush_interval,
            resync_required: AtomicU64::new(0),
            resync_initial: AtomicU64::new(0),
            snapshots_done: AtomicU64::new(0),
            stream_errors: AtomicU64::new(0),
            stream_retries: AtomicU64::new(0),
            first_error: Mutex::new(None),
            report_calls: AtomicU64::new(0),
            reports_accepted: AtomicU64::new(0),
            report_errors: AtomicU64::new(0),
            events: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            heartbeat_errors: AtomicU64::new(0),
        })
    }

    fn error(&self, e: String) {
        if let Ok(mut f) = self.first_error.lock()
            && f.is_none()
        {
            *f = Some(e);
        }
    }

    pub fn first_error(&self) -> Option<String> {
        self.first_error.lock().ok().and_then(|f| f.clone())
    }
}

/// Where one agent's stream stands.
#[derive(Default)]
pub struct AgentState {
    /// The last revision the stream delivered.
    pub revision: AtomicI64,
    /// The revision the stream was first opened from.
    pub start: AtomicI64,
    /// Next status sequence number.
    pub seq: AtomicU64,
    /// When `revision` first reached `target` (ns since `epoch`), for convergence timing.
    pub target: AtomicI64,
    pub reached_ns: AtomicU64,
    /// From the broker's Register answer.
    pub heartbeat_ms: AtomicU64,
}

pub struct DpuAgent {
    pub serial: String,
    pem: Arc<Pem>,
    client: Option<AgentServiceClient<Channel>>,
    pub state: Arc<AgentState>,
    tasks: Vec<JoinHandle<()>>,
}

impl DpuAgent {
    pub fn new(serial: String, pem: Arc<Pem>) -> DpuAgent {
        DpuAgent { serial, pem, client: None, state: Arc::new(AgentState::default()), tasks: Vec::new() }
    }

    /// Opens the agent's own mTLS connection; returns the retries it took.
    pub async fn connect(&mut self, addr: SocketAddr, pki: &Pki, attempts: u32) -> anyhow::Result<u32> {
        let (ch, retries) = connect_retrying(addr, pki.client_tls(&self.pem), attempts).await?;
        self.client = Some(AgentServiceClient::new(ch));
        Ok(retries)
    }

    fn client(&self) -> anyhow::Result<AgentServiceClient<Channel>> {
        self.client.clone().context("the agent is not connected")
    }

    /// Registers; returns the broker's current revision.
    pub async fn register(&mut self) -> anyhow::Result<i64> {
        let mut c = self.client()?;
        let resp = c
            .register(pb::RegisterRequest {
                serial: self.serial.clone(),
                inventory: Some(pb::DpuInventory {
                    product: "bench-dpu".into(),
                    pf_count: 1,
                    vf_count: 64,
                    agent_version: "xpu-bench".into(),
                    dataplane: "linux".into(),
                    ..Default::default()
                }),
                labels: [("bench".to_string(), "yes".to_string())].into(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("registering {}", self.serial))?
            .into_inner();
        self.state.seq.store(resp.last_status_seq + 1, Ordering::Release);
        self.state.heartbeat_ms.store(u64::from(resp.heartbeat_interval_ms), Ordering::Release);
        Ok(resp.current_revision)
    }

    /// Opens `WatchDesired` from `since` and follows it in a task (re-opening it from the last
    /// revision applied, with backoff, when the broker ends it, as a real agent does); also starts
    /// the status reporter, which sends at most one `ReportStatus` per flush interval, and the
    /// heartbeats.
    pub async fn watch(&mut self, since: i64, fleet: &Arc<Fleet>, epoch: Instant) -> anyhow::Result<()> {
        let mut c = self.client()?;
        // Where the stream resumes if the broker ends it before it delivered anything: `since`
        // covers all this agent holds, so resuming from 0 (a full snapshot) would be wasted.
        // (`revision` stays what the stream delivered: the bench waits on it.)
        self.state.start.fetch_max(since, Ordering::AcqRel);
        let first = open_watch(&mut c, &self.serial, since).await?;
        let (tx, rx) = mpsc::unbounded_channel::<pb::StatusReport>();
        let reporter = tokio::spawn(report_loop(c.clone(), self.serial.clone(), rx, Arc::clone(fleet)));
        let heartbeats =
            tokio::spawn(heartbeat_loop(c.clone(), self.serial.clone(), Arc::clone(&self.state), Arc::clone(fleet)));
        let state = Arc::clone(&self.state);
        let fleet = Arc::clone(fleet);
        let serial = self.serial.clone();
        let reader = tokio::spawn(async move {
            let mut stream = first;
            loop {
                loop {
                    match stream.message().await {
                        Ok(Some(ev)) => on_event(ev, &state, &fleet, &tx, epoch),
                        Ok(None) => break,
                        Err(status) => {
                            fleet.stream_errors.fetch_add(1, Ordering::Relaxed);
                            fleet.error(format!("WatchDesired: {}: {}", status.code(), status.message()));
                            break;
                        }
                    }
                }
                let mut backoff = Duration::from_millis(100);
                stream = loop {
                    tokio::time::sleep(backoff + Duration::from_millis(rand::random_range(0..100))).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    let since = state.revision.load(Ordering::Acquire).max(state.start.load(Ordering::Acquire));
                    match open_watch(&mut c, &serial, since).await {
                        Ok(s) => {
                            fleet.stream_retries.fetch_add(1, Ordering::Relaxed);
                            break s;
                        }
                        Err(e) => fleet.error(format!("re-opening WatchDesired: {e:#}")),
                    }
                };
            }
        });
        self.tasks = vec![reader, reporter, heartbeats];
        Ok(())
    }

    /// Drops the stream and the connection (as a crashed or partitioned agent would).
    pub fn disconnect(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.client = None;
    }

    pub fn revision(&self) -> i64 {
        self.state.revision.load(Ordering::Acquire)
    }

    pub fn status_client(&self) -> anyhow::Result<AgentServiceClient<Channel>> {
        self.client()
    }
}

impl Drop for DpuAgent {
    fn drop(&mut self) {
        self.disconnect();
    }
}

async fn open_watch(
    c: &mut AgentServiceClient<Channel>,
    serial: &str,
    since: i64,
) -> anyhow::Result<tonic::Streaming<pb::WatchEvent>> {
    Ok(c.watch_desired(pb::WatchDesiredRequest { serial: serial.to_string(), since_revision: since })
        .await
        .with_context(|| format!("WatchDesired of {serial}"))?
        .into_inner())
}

fn on_event(
    ev: pb::WatchEvent,
    state: &AgentState,
    fleet: &Fleet,
    reports: &mpsc::UnboundedSender<pb::StatusReport>,
    epoch: Instant,
) {
    fleet.events.fetch_add(1, Ordering::Relaxed);
    let rev = ev.revision;
    let advance = |rev: i64| {
        let prev = state.revision.fetch_max(rev, Ordering::AcqRel);
        let target = state.target.load(Ordering::Acquire);
        if target > 0 && prev.max(rev) >= target && state.reached_ns.load(Ordering::Acquire) == 0 {
            let ns = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1);
            let _ = state.reached_ns.compare_exchange(0, ns, Ordering::AcqRel, Ordering::Acquire);
        }
    };
    match ev.event {
        Some(Ev::Change(change)) => {
            let ty = change.r#type;
            let Some(obj) = change.object else { return };
            if ty == pb::ChangeType::Snapshot as i32 {
                return;
            }
            if let Some(seq) = fixtures::meta_of(&obj).and_then(|m| fixtures::seq_of(&m.labels))
                && let Some(probe) = fleet.probe.load().as_ref()
            {
                probe.arrived(seq);
            }
            if ty == pb::ChangeType::Spec as i32
                && fleet.auto_report.load(Ordering::Relaxed)
                && let Some(pb::resource::Kind::Netdev(nd)) = obj.kind
            {
                let meta = nd.metadata.unwrap_or_default();
                let spec = nd.spec.unwrap_or_default();
                let ip = spec.ipam.map(|i| i.address).unwrap_or_default();
                let status = fixtures::netdev_status("Connected", &ip, &spec.mac_address, "programmed");
                let _ = reports.send(pb::StatusReport {
                    key: Some(fixtures::netdev_key(&meta.name)),
                    observed_generation: meta.generation,
                    seq: state.seq.fetch_add(1, Ordering::AcqRel),
                    status: Some(pb::status_report::Status::Netdev(status)),
                    removed: false,
                });
            }
            advance(rev);
        }
        Some(Ev::Bookmark(_)) => advance(rev),
        Some(Ev::Resync(r)) => {
            if r.reason == pb::resync::Reason::Initial as i32 {
                fleet.resync_initial.fetch_add(1, Ordering::Relaxed);
            } else {
                fleet.resync_required.fetch_add(1, Ordering::Relaxed);
            }
        }
        Some(Ev::SnapshotEnd(_)) => {
            fleet.snapshots_done.fetch_add(1, Ordering::Relaxed);
            advance(rev);
        }
        None => {}
    }
}

/// Heartbeats at the interval the broker asked for (first one at a random point of it), with
/// the revision applied, as a real agent does: at 10,000 agents that is 1,000 writes/s.
async fn heartbeat_loop(
    mut client: AgentServiceClient<Channel>,
    serial: String,
    state: Arc<AgentState>,
    fleet: Arc<Fleet>,
) {
    let every = Duration::from_millis(state.heartbeat_ms.load(Ordering::Acquire).max(1000));
    let first = Duration::from_millis(rand::random_range(0..u64::try_from(every.as_millis()).unwrap_or(10_000)));
    tokio::time::sleep(first).await;
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let applied = state.revision.load(Ordering::Acquire);
        if let Err(e) =
            client.heartbeat(pb::HeartbeatRequest { serial: serial.clone(), applied_revision: applied }).await
        {
            fleet.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
            fleet.error(format!("Heartbeat: {}: {}", e.code(), e.message()));
        } else {
            fleet.heartbeats.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends queued reports: at once when the last call is older than the flush interval, else at
/// the end of the interval with everything that queued meanwhile (one call in flight at most).
async fn report_loop(
    mut client: AgentServiceClient<Channel>,
    serial: String,
    mut rx: mpsc::UnboundedReceiver<pb::StatusReport>,
    fleet: Arc<Fleet>,
) {
    let interval = fleet.flush_interval;
    let mut last: Option<tokio::time::Instant> = None;
    while let Some(first) = rx.recv().await {
        if let Some(l) = last {
            tokio::time::sleep_until(l + interval).await;
        }
        let mut reports = vec![first];
        while reports.len() < 1000
            && let Ok(r) = rx.try_recv()
        {
            reports.push(r);
        }
        last = Some(tokio::time::Instant::now());
        fleet.report_calls.fetch_add(1, Ordering::Relaxed);
        match client.report_status(pb::ReportStatusRequest { serial: serial.clone(), reports }).await {
            Ok(resp) => {
                let ok = resp
                    .into_inner()
                    .results
                    .iter()
                    .filter(|r| r.outcome == pb::ReportOutcome::Accepted as i32)
                    .count();
                fleet.reports_accepted.fetch_add(ok as u64, Ordering::Relaxed);
            }
            Err(e) => {
                fleet.report_errors.fetch_add(1, Ordering::Relaxed);
                fleet.error(format!("ReportStatus: {}: {}", e.code(), e.message()));
            }
        }
    }
}

/// Connects, registers and (optionally) starts watching `serials`, `concurrency` at a time.
pub struct FleetSetup {
    pub agents: Vec<DpuAgent>,
    pub connect_secs: f64,
    pub register_secs: f64,
    pub watch_secs: f64,
}

pub async fn start_fleet(
    addr: SocketAddr,
    pki: &Pki,
    fleet: &Arc<Fleet>,
    serials: Vec<String>,
    watch_from_zero: bool,
    epoch: Instant,
) -> anyhow::Result<FleetSetup> {
    const CONCURRENCY: usize = 64;
    let ids: Vec<String> = serials.iter().map(|s| format!("dpu/{s}")).collect();
    let pems = pki.issue(&ids)?;
    let t = Instant::now();
    let agents: Vec<anyhow::Result<DpuAgent>> =
        futures::stream::iter(serials.into_iter().zip(pems).map(|(s, pem)| async move {
            let mut a = DpuAgent::new(s, pem);
            a.connect(addr, pki, 5).await?;
            Ok(a)
        }))
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut agents = agents.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let connect_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let revs: Vec<anyhow::Result<i64>> = futures::stream::iter(agents.iter_mut().map(|a| a.register()))
        .buffer_unordered(CONCURRENCY * 4)
        .collect()
        .await;
    let revs = revs.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let since = if watch_from_zero { 0 } else { revs.iter().copied().max().unwrap_or(0) };
    let register_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let watched: Vec<anyhow::Result<()>> =
        futures::stream::iter(agents.iter_mut().map(|a| a.watch(since, fleet, epoch)))
            .buffer_unordered(CONCURRENCY * 4)
            .collect()
            .await;
    watched.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    Ok(FleetSetup { agents, connect_secs, register_secs, watch_secs: t.elapsed().as_secs_f64() })
}

/// Waits until every agent's stream stands at `revision` or later.
pub async fn wait_revision(agents: &[DpuAgent], revision: i64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if agents.iter().all(|a| a.revision() >= revision) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every agent's stream stands at the broker's current head (the broker ends each
/// replay with a bookmark), at most 300 s; says how long that took, for the report's notes.
pub async fn wait_at_head(admin: &mut AdminServiceClient<Channel>, agents: &[DpuAgent]) -> anyhow::Result<String> {
    let head = admin.fleet_status(pb::FleetStatusRequest {}).await?.into_inner().revision;
    let t = Instant::now();
    let current = wait_revision(agents, head, Duration::from_secs(300)).await;
    Ok(format!(
        "every stream at revision {head} after {:.1}s{}",
        t.elapsed().as_secs_f64(),
        if current { "" } else { " (NOT all: timed out after 300 s)" }
    ))
}

pub struct HostAgent {
    pub node: String,
    pub client: HostServiceClient<Channel>,
}

pub async fn start_hosts(addr: SocketAddr, pki: &Pki, nodes: Vec<String>) -> anyhow::Result<Vec<HostAgent>> {
    let ids: Vec<String> = nodes.iter().map(|n| format!("host/{n}")).collect();
    let pems = pki.issue(&ids)?;
    let hosts: Vec<anyhow::Result<HostAgent>> =
        futures::stream::iter(nodes.into_iter().zip(pems).map(|(node, pem)| async move {
            let (ch, _) = connect_retrying(addr, pki.client_tls(&pem), 5).await?;
            Ok(HostAgent { node, client: HostServiceClient::new(ch) })
        }))
        .buffer_unordered(64)
        .collect()
        .await;
    hosts.into_iter().collect()
}
