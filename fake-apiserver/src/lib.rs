//! An in-memory fake Kubernetes API server over plain HTTP, for tests and local demos.
//!
//! The real `kube::Client` (with `Api`, `watcher`, `Controller`, server-side apply, `finalizer`) and the
//! real `kubectl` talk to it as to a cluster. What it implements, and where it is simpler than a real
//! kube-apiserver, is listed in this crate's `README.md`.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let server = xpu_fake_apiserver::FakeApiServer::start("127.0.0.1:0".parse()?).await?;
//! let config = kube::Config::new(server.url().parse()?);
//! # let _ = config;
//! server.shutdown().await;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::sync::watch as signal;
use tokio::task::JoinHandle;

mod builtins;
mod crd;
mod delete;
mod discovery;
mod error;
mod format;
mod handlers;
mod object;
mod openapi;
mod patch;
mod read;
mod resource;
mod routes;
mod selector;
mod ssa;
mod store;
mod table;
mod watch;
mod write;

pub use error::ApiError;
pub use resource::GroupResource;

use read::Target;
use store::Store;
use write::WriteOpts;

/// Server options.
#[derive(Debug, Clone)]
pub struct Options {
    /// How many events the watch history keeps; a watch from an older resourceVersion gets `410 Expired`.
    pub history: usize,
    /// How often a watch with `allowWatchBookmarks=true` gets a `BOOKMARK` (a real server: about a minute).
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self { history: 10_000, bookmark_interval: Duration::from_secs(1) }
    }
}

/// State shared by the handlers.
pub(crate) struct Shared {
    pub store: Store,
    pub bookmark_interval: Duration,
    pub stop: signal::Receiver<bool>,
    /// `host:port`, for `/api`'s `serverAddressByClientCIDRs`.
    pub address: String,
    /// Writes to a `status` subresource still to be refused (see [`FakeApiServer::fail_status_writes`]).
    pub status_write_failures: std::sync::atomic::AtomicUsize,
}

/// A running fake API server.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: signal::Sender<bool>,
    task: JoinHandle<()>,
}

/// Namespaces a fresh cluster has.
const INITIAL_NAMESPACES: &[&str] = &["default", "kube-node-lease", "kube-public", "kube-system"];

impl FakeApiServer {
    /// Start on `addr` (port 0 picks a free port) with default [`Options`].
    pub async fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with(addr, Options::default()).await
    }

    /// Start on `addr` with `options`.
    pub async fn start_with(addr: SocketAddr, options: Options) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        let addr = listener.local_addr()?;
        let store = Store::new(options.history);
        {
            let mut st = store.lock();
            let t = Target { rt: namespaces_type(&st)?, namespace: None, name: None, status: false };
            let o = WriteOpts { manager: "kube-apiserver".into(), ..WriteOpts::default() };
            for ns in INITIAL_NAMESPACES {
                write::create(&mut st, &t, json!({"metadata": {"name": ns}}), &o)?;
            }
        }
        let (stop, stop_rx) = signal::channel(false);
        let shared = Arc::new(Shared {
            store,
            bookmark_interval: options.bookmark_interval,
            stop: stop_rx.clone(),
            address: addr.to_string(),
            status_write_failures: std::sync::atomic::AtomicUsize::new(0),
        });
        let app = routes::router(shared.clone());
        let mut shutdown_rx = stop_rx;
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = shutdown_rx.wait_for(|stopped| *stopped).await;
            };
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                tracing::error!(error = %e, "fake apiserver stopped");
            }
        });
        tracing::info!(%addr, "fake apiserver listening");
        Ok(Self { addr, shared, stop, task })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig (context `fake`, namespace `default`, no credentials) for `KUBECONFIG`.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\npreferences: {{}}\n",
            self.url()
        )
    }

    /// The current (last handed out) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().rv
    }

    /// An object as stored (`namespace` `""` for cluster-scoped), bypassing the HTTP API.
    pub fn get_object(&self, group: &str, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.shared.store.lock().get(&GroupResource::new(group, resource), namespace, name).cloned()
    }

    /// All stored objects of a group/resource (every namespace), in namespace/name order.
    pub fn list_objects(&self, group: &str, resource: &str) -> Vec<Value> {
        self.shared.store.lock().list(&GroupResource::new(group, resource), None).into_iter().cloned().collect()
    }

    /// Drop the watch event history (as an etcd compaction would): any watch from a resourceVersion
    /// before now gets `410 Expired`, so watchers must relist.
    pub fn compact_history(&self) {
        self.shared.store.lock().compact();
    }

    /// Refuse the next `n` writes (`PUT`, `PATCH`) to a `status` subresource with `500
    /// InternalError`, as a server whose storage times out does; `0` stops refusing. Other
    /// requests are served as usual.
    pub fn fail_status_writes(&self, n: usize) {
        self.shared.status_write_failures.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stop serving: open watches end, then the listener closes.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task).await.is_err() {
            task.abort();
        }
    }
}

fn namespaces_type(st: &store::State) -> anyhow::Result<Arc<resource::ResourceType>> {
    st.registry.lookup("", "v1", "namespaces").context("namespaces are built in")
}
