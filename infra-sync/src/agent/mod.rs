//! The per-DPU agent: registers with the broker, follows the desired state of its DPU from the
//! revision it last applied, programs the dataplane and reports what it observed.
//!
//! It keeps working without the broker: the dataplane stays as it is, the persisted desired state
//! is re-applied at start, and the broker connection is retried with jittered backoff.

pub mod args;
mod reconcile;
pub mod report;
pub mod state;

use std::{
    collections::BTreeMap,
    future::Future,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use futures::StreamExt;
use rand::Rng;
use tokio::sync::Notify;
use tonic::transport::{Channel, Endpoint};
use xpu_proto::broker::v1::{self as pb, agent_service_client::AgentServiceClient, watch_event::Event as E};
pub use xpu_sync_common::TlsFiles;

use self::{
    reconcile::Reconciler,
    report::StatusBook,
    state::{DesiredState, StateFile, identify},
};
use crate::dataplane::Dataplane;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// `https://host:port`
    pub broker: String,
    pub tls: TlsFiles,
    pub serial: String,
    pub state_dir: PathBuf,
    pub labels: BTreeMap<String, String>,
    pub product: String,
    pub vf_count: u32,
    pub infra_node_name: String,
    pub tenant_node_name: String,
    /// How often flow counters are re-read (changes are reported).
    pub flow_interval: Duration,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
}

struct Shared {
    config: AgentConfig,
    dataplane: Arc<dyn Dataplane>,
    state: Arc<Mutex<DesiredState>>,
    file: StateFile,
    book: Arc<StatusBook>,
    wake: Arc<Notify>,
    sweeps: Arc<Notify>,
    endpoint: Endpoint,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, DesiredState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self) {
        let mut s = self.lock();
        if !s.dirty {
            return;
        }
        match self.file.save(&self.config.serial, &s) {
            Ok(()) => s.dirty = false,
            Err(e) => {
                tracing::error!(error = %e, path = %self.file.path().display(), "cannot persist the desired state")
            }
        }
    }
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    config: AgentConfig,
    dataplane: Arc<dyn Dataplane>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let file =
        StateFile::new(&config.state_dir).with_context(|| format!("state directory {}", config.state_dir.display()))?;
    let state = match file.load(&config.serial)? {
        Some(s) => {
            tracing::info!(revision = s.revision, objects = s.objects.len(), "resuming from the persisted state");
            s
        }
        None => {
            tracing::info!("no persisted state: waiting for a snapshot from the broker");
            DesiredState::default()
        }
    };
    let endpoint = xpu_sync_common::broker_endpoint(&config.broker, &config.tls)?;
    let shared = Arc::new(Shared {
        config,
        dataplane: Arc::clone(&dataplane),
        state: Arc::new(Mutex::new(state)),
        file,
        book: Arc::new(StatusBook::default()),
        wake: Arc::new(Notify::new()),
        sweeps: Arc::new(Notify::new()),
        endpoint,
    });
    let reconciler = Reconciler::new(
        dataplane,
        Arc::clone(&shared.state),
        Arc::clone(&shared.book),
        Arc::clone(&shared.wake),
        shared.config.flow_interval,
    );
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(reconciler.run(Arc::clone(&shared.sweeps)));
    shared.wake.notify_one();
    {
        let shared = Arc::clone(&shared);
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                shared.persist();
            }
        });
    }
    {
        let shared = Arc::clone(&shared);
        tasks.spawn(async move { broker_loop(shared).await });
    }
    shutdown.await;
    tracing::info!("stopping; the dataplane is left as it is");
    tasks.abort_all();
    shared.persist();
    Ok(())
}

/// Keeps a session with the broker, reconnecting with jittered exponential backoff.
async fn broker_loop(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let started = tokio::time::Instant::now();
        match session(&shared).await {
            Ok(()) => tracing::info!("the broker ended the session"),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "broker session failed"),
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(250);
        }
        let jitter = rand::rng().random_range(0.5..1.5);
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(shared.config.max_backoff);
    }
}

fn inventory(shared: &Shared) -> pb::DpuInventory {
    pb::DpuInventory {
        product: shared.config.product.clone(),
        pf_count: 1,
        vf_count: shared.config.vf_count,
        sf_count: 0,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        dataplane: shared.dataplane.name().into(),
        capabilities: shared.dataplane.capabilities().into_iter().collect(),
    }
}

/// Unary calls to the broker must not hang on a stalled connection: the session is then
/// restarted.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

pub(crate) fn unary<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(CALL_TIMEOUT);
    req
}

async fn session(shared: &Arc<Shared>) -> anyhow::Result<()> {
    let channel: Channel = shared.endpoint.connect().await.context("connecting to the broker")?;
    let mut client = AgentServiceClient::new(channel);
    let serial = shared.config.serial.clone();
    let reg = client
        .register(unary(pb::RegisterRequest {
            serial: serial.clone(),
            inventory: Some(inventory(shared)),
            labels: shared.config.labels.clone().into_iter().collect(),
            infra_node_name: shared.config.infra_node_name.clone(),
            tenant_node_name: shared.config.tenant_node_name.clone(),
        }))
        .await
        .context("Register")?
        .into_inner();
    tracing::info!(revision = reg.current_revision, "registered with the broker");
    shared.book.resend_all(reg.last_status_seq);
    {
        let mut s = shared.lock();
        if !s.current {
            s.catch_up_to = reg.current_revision;
            if s.check_current() {
                drop(s);
                caught_up(shared);
            }
        }
    }

    let heartbeat = {
        let mut client = client.clone();
        let shared = Arc::clone(shared);
        let every = Duration::from_millis(u64::from(reg.heartbeat_interval_ms.max(200)));
        async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let applied = shared.lock().revision;
                let req = pb::HeartbeatRequest { serial: shared.config.serial.clone(), applied_revision: applied };
                client.heartbeat(unary(req)).await.map_err(|e| anyhow::anyhow!("Heartbeat: {e}"))?;
            }
        }
    };
    let flush = report::flush_loop(&shared.book, client.clone(), &serial);
    let since = shared.lock().revision;
    tracing::info!(since_revision = since, "watching the desired state");
    let mut stream = client
        .watch_desired(pb::WatchDesiredRequest { serial: serial.clone(), since_revision: since })
        .await
        .context("WatchDesired")?
        .into_inner();
    let watch = async {
        let mut snapshot: Option<Vec<pb::Resource>> = None;
        while let Some(ev) = stream.next().await {
            let ev = ev.map_err(|e| anyhow::anyhow!("desired-state stream: {}: {}", e.code(), e.message()))?;
            handle_event(shared, ev, &mut snapshot);
        }
        anyhow::Ok(())
    };
    tokio::select! {
        r = heartbeat => r,
        r = flush => r,
        r = watch => r,
    }
}

/// The replay reached the broker's current state: reconcile, and look for orphans.
fn caught_up(shared: &Shared) {
    let revision = shared.lock().revision;
    tracing::info!(revision, "caught up with the broker: reconciling the dataplane");
    shared.sweeps.notify_one();
    shared.wake.notify_one();
}

fn handle_event(shared: &Shared, ev: pb::WatchEvent, snapshot: &mut Option<Vec<pb::Resource>>) {
    let revision = ev.revision;
    match ev.event {
        Some(E::Resync(r)) => {
            tracing::info!(revision, reason = r.reason, "the broker sends a snapshot");
            *snapshot = Some(Vec::new());
        }
        Some(E::Change(c)) if snapshot.is_some() => {
            if let (Some(buf), Some(obj)) = (snapshot.as_mut(), c.object) {
                buf.push(obj);
            }
        }
        Some(E::SnapshotEnd(_)) => {
            let objects = snapshot.take().unwrap_or_default();
            let mut s = shared.lock();
            s.objects = objects.iter().filter_map(identify).collect();
            s.revision = revision;
            s.known = true;
            s.current = true;
            s.dirty = true;
            drop(s);
            tracing::info!(revision, "snapshot applied to the desired state");
            shared.sweeps.notify_one();
            shared.wake.notify_one();
        }
        Some(E::Change(c)) => {
            let deleted = c.r#type == pb::ChangeType::Deleted as i32;
            let mut s = shared.lock();
            if let Some((key, obj)) = c.object.as_ref().and_then(identify) {
                if deleted {
                    s.objects.remove(&key);
                } else {
                    s.objects.insert(key, obj);
                }
            }
            s.revision = s.revision.max(revision);
            s.dirty = true;
            let now_current = s.check_current();
            drop(s);
            if now_current {
                caught_up(shared);
            }
            shared.wake.notify_one();
        }
        Some(E::Bookmark(_)) => {
            let mut s = shared.lock();
            if revision > s.revision {
                s.revision = revision;
                s.dirty = true;
            }
            let now_current = s.check_current();
            drop(s);
            if now_current {
                caught_up(shared);
            }
        }
        None => {}
    }
}
