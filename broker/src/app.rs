//! Startup and shutdown of the broker: `App::build` connects and migrates the store, binds the
//! listeners (port 0 works, for tests) and starts the background tasks; `run_until_stopped`
//! serves until the shutdown future resolves.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use sqlx::PgPool;
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};

use crate::{
    grpc::{self, GrpcOptions},
    hub::{self, Hub},
    rest,
    service::{Context, ServiceConfig},
    store::{Backend, Location, Store, StoreConfig, postgres},
    tls::{ReloadingConfig, TlsPaths},
};

#[derive(Clone, Debug)]
pub struct Config {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub database: Location,
    pub max_db_connections: u32,
    pub tls: TlsPaths,
    pub tls_reload_interval: Duration,
    pub service: ServiceConfig,
    pub store: StoreConfig,
    /// Idle streams hear the current revision this often.
    pub bookmark_interval: Duration,
    /// Changes queued per stream before it is cut off as too slow.
    pub stream_buffer: usize,
    pub compaction_interval: Duration,
    pub max_message_bytes: usize,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Who may read the status API and dashboard.
    pub access: rest::Access,
}

impl Config {
    /// Defaults for everything but the addresses, database and certificates.
    pub fn new(database: Location, tls: TlsPaths) -> Config {
        Config {
            grpc_addr: ([0, 0, 0, 0], 50051).into(),
            http_addr: ([0, 0, 0, 0], 8080).into(),
            database,
            max_db_connections: 16,
            tls,
            tls_reload_interval: Duration::from_secs(10),
            service: ServiceConfig::default(),
            store: StoreConfig::default(),
            bookmark_interval: Duration::from_secs(5),
            stream_buffer: 4096,
            compaction_interval: Duration::from_secs(300),
            max_message_bytes: 4 * 1024 * 1024,
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            access: rest::Access::default(),
        }
    }
}

/// Aborts the background tasks when the app goes away.
struct Background(Vec<JoinHandle<()>>);

impl Drop for Background {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

pub struct App {
    grpc: TcpListener,
    http: TcpListener,
    ctx: Context,
    tls: Arc<ReloadingConfig>,
    config: Config,
    background: Background,
}

impl App {
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let backend = Backend::open(&config.database, config.max_db_connections).await.context("opening the store")?;
        match &config.database {
            Location::Postgres(_) => tracing::info!(store = "postgres", "store ready"),
            Location::Sqlite(path) => {
                tracing::info!(store = "sqlite", path = %path.display(), "store ready (embedded SQLite)")
            }
        }
        App::build_with_backend(config, backend).await
    }

    /// Starts on an existing, migrated Postgres pool (tests use one database per test).
    pub async fn build_with_pool(config: Config, pool: PgPool) -> anyhow::Result<App> {
        App::build_with_backend(config, Backend::Postgres(pool)).await
    }

    /// Starts on an opened, migrated store.
    pub async fn build_with_backend(config: Config, backend: Backend) -> anyhow::Result<App> {
        let tls = ReloadingConfig::load(config.tls.clone()).context("loading TLS certificates")?;
        let mut store_config = config.store.clone();
        store_config.lease_duration = config.service.lease_duration;
        // Snapshots take at most a quarter of the readers' connections and streams reading
        // their start at most half: the rest stays free for requests and the fan-out.
        store_config.max_snapshots = (config.max_db_connections as usize / 4).max(1);
        store_config.max_stream_openings = (config.max_db_connections as usize / 2).max(1);
        // Commits waiting for the fan-out; the writer waits when it is full.
        let (committed_tx, committed_rx) = mpsc::channel(1024);
        let store = Store::start(backend.clone(), store_config, committed_tx);
        let (head, _) = store.head().await.context("reading the revision")?;
        let hub = Hub::new(head, config.stream_buffer);
        let (wake_tx, wake_rx) = mpsc::channel(64);
        let mut tasks = Vec::new();
        if let Backend::Postgres(pool) = &backend {
            // Other replicas' commits; a SQLite store has one process, so nothing to hear.
            tasks.push(tokio::spawn(postgres::listen(pool.clone(), store.replica().to_string(), wake_tx)));
        }
        tasks.extend([
            tokio::spawn(hub::run_dispatcher(
                Arc::clone(&hub),
                store.clone(),
                committed_rx,
                wake_rx,
                config.bookmark_interval,
            )),
            tokio::spawn(Arc::clone(&tls).watch(config.tls_reload_interval)),
        ]);
        tasks.push(tokio::spawn(crate::service::status::run_sampler(Arc::clone(&hub))));
        tasks.push(tokio::spawn(sweep_leases(store.clone(), config.service.lease_duration)));
        tasks.push(tokio::spawn(compact(store.clone(), config.service.log_retention, config.compaction_interval)));
        let grpc =
            TcpListener::bind(config.grpc_addr).await.with_context(|| format!("binding {}", config.grpc_addr))?;
        let http =
            TcpListener::bind(config.http_addr).await.with_context(|| format!("binding {}", config.http_addr))?;
        let ctx = Context { store, hub, config: Arc::new(config.service.clone()), fleet_cache: Arc::default() };
        Ok(App { grpc, http, ctx, tls, config, background: Background(tasks) })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().unwrap_or(self.config.grpc_addr)
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr().unwrap_or(self.config.http_addr)
    }

    pub fn context(&self) -> Context {
        self.ctx.clone()
    }

    /// Serves until `shutdown` resolves, then closes every stream and drains requests.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let App { grpc, http, ctx, tls, config, background } = self;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let hub = Arc::clone(&ctx.hub);
        let signal = tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down");
            // Watch streams never end by themselves: end them so the servers can drain.
            hub.close();
            let _ = stop_tx.send(true);
        });
        let opts = GrpcOptions {
            max_message_bytes: config.max_message_bytes,
            keepalive_interval: config.keepalive_interval,
            keepalive_timeout: config.keepalive_timeout,
        };
        let rest_state = rest::RestState { ctx: ctx.clone(), access: Arc::new(config.access.clone()) };
        let mtls_rest = rest::mtls_router(rest_state.clone());
        let grpc_server = grpc::serve(grpc, tls, ctx, opts, mtls_rest, stopped(stop_rx.clone()));
        tracing::info!(
            addr = %http.local_addr()?,
            tokens = config.access.token_key.is_some(),
            anonymous_read = config.access.anonymous_read,
            "HTTP (dashboard, status API, health, metrics) listening"
        );
        let http_server = axum::serve(http, rest::router(rest_state)).with_graceful_shutdown(stopped(stop_rx));
        let result = tokio::select! {
            r = grpc_server => r.context("gRPC server"),
            r = http_server => r.context("HTTP server"),
        };
        signal.abort();
        drop(background);
        result
    }
}

async fn sweep_leases(store: Store, lease: Duration) {
    let mut tick = tokio::time::interval((lease / 4).max(Duration::from_millis(250)));
    loop {
        tick.tick().await;
        if let Err(e) = store.sweep_leases().await {
            tracing::warn!(error = %e, "lease sweep failed");
        }
    }
}

/// Keeps the log to the configured retention, in slices so writers are never held up long.
async fn compact(store: Store, retention: i64, every: Duration) {
    const SLICE: i64 = 10_000;
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let Ok((head, compacted)) = store.head().await else {
            continue;
        };
        let target = head - retention;
        let mut at = compacted;
        while at < target {
            at = (at + SLICE).min(target);
            match store.compact(at).await {
                Ok(c) => {
                    tracing::debug!(compacted = c.compacted_revision, removed = c.log_entries_removed, "compacted")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "compaction failed");
                    break;
                }
            }
        }
    }
}
