//! The cluster controllers (`tenant-sync`, `infra-sync`): mirror `xpu.opi.dev` objects between a
//! Kubernetes cluster and the broker, in both directions, as DESIGN §5 describes.
//!
//! One replica leads (a `coordination.k8s.io` Lease) and syncs; the others wait. The leader
//! follows the broker's `Watch` from the revision it last finished (persisted in a ConfigMap, so
//! a restart resumes without relisting the broker; only a first start takes a snapshot), and the
//! cluster's objects through kube watchers. `/healthz`, `/readyz` (ready after the first sync)
//! and `/metrics` are served on `--http-addr`.

pub mod args;
pub mod engine;
mod http;
pub mod kinds;
mod lease;
mod revision;
mod watch;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use kube::Client;
use xpu_proto::broker::v1::sync_service_client::SyncServiceClient;

pub use self::kinds::Side;
use crate::TlsFiles;

#[derive(Clone, Debug)]
pub struct SyncConfig {
    pub broker: String,
    pub tls: TlsFiles,
    /// This cluster's name: the identity is `xpu://cluster/<name>/<side>`.
    pub cluster: String,
    pub side: Side,
    /// Namespace of the controller's Lease and state ConfigMap.
    pub namespace: String,
    /// Name of the Lease (and prefix of the state ConfigMap).
    pub lease_name: String,
    /// This replica's identity in the Lease.
    pub holder: String,
    pub lease_duration: Duration,
    pub http_addr: SocketAddr,
    pub kubeconfig: Option<PathBuf>,
    /// Tenant side: how often Netdevs whose pod is gone are collected (0: never).
    pub gc_interval: Duration,
    /// Tenant side: a Netdev younger than this is never collected (its pod may be starting).
    pub gc_grace: Duration,
}

/// Counters exported on `/metrics`, plus the readiness flags.
#[derive(Default)]
pub struct Metrics {
    pub leader: AtomicBool,
    pub ready: AtomicBool,
    pub idle: AtomicBool,
    pub revision: AtomicI64,
    pub mirrored: AtomicU64,
    pub carried_up: AtomicU64,
    pub conflicts: AtomicU64,
    pub collected: AtomicU64,
    pub errors_kube: AtomicU64,
    pub errors_broker: AtomicU64,
    pub errors_timeout: AtomicU64,
}

impl Metrics {
    pub fn count_error(&self, kind: &str) {
        let c = match kind {
            "kube" => &self.errors_kube,
            "broker" => &self.errors_broker,
            _ => &self.errors_timeout,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

pub async fn kube_client(config: &SyncConfig) -> anyhow::Result<Client> {
    let kc = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig =
                kube::config::Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?
        }
        None => kube::Config::infer().await.context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?,
    };
    Ok(Client::try_from(kc)?)
}

/// Runs the controller until `shutdown`.
pub async fn run(config: SyncConfig, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::default());
    let http = tokio::spawn(http::serve(config.http_addr, Arc::clone(&metrics)));
    let client = loop {
        // The API server may be down at start: wait for it, do not exit.
        match kube_client(&config).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "no Kubernetes client yet; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    let endpoint = crate::broker_endpoint(&config.broker, &config.tls)?;
    let broker = SyncServiceClient::new(endpoint.connect_lazy());
    let leading = lease::lead(Arc::clone(&config), client.clone(), Arc::clone(&metrics), move || {
        let config = Arc::clone(&config);
        let client = client.clone();
        let broker = broker.clone();
        let metrics = Arc::clone(&metrics);
        watch::sync(config, client, broker, metrics)
    });
    tokio::select! {
        () = leading => {}
        () = shutdown => tracing::info!("shutting down"),
    }
    http.abort();
    Ok(())
}
