//! Shared harness of the broker's integration tests: a development PKI made in the test, and the
//! real `App` on port 0 over a per-test Postgres database.
#![allow(dead_code)]

use std::{path::PathBuf, time::Duration};

use sqlx::PgPool;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};
use xpu_broker::{
    App, Config,
    ca::{DevCa, IssueOptions, Pem},
    identity::Identity,
    store::{Backend, Location},
    tls::TlsPaths,
};
use xpu_proto::broker::v1::{
    self as pb, admin_service_client::AdminServiceClient, agent_service_client::AgentServiceClient,
    host_service_client::HostServiceClient, sync_service_client::SyncServiceClient,
};

pub struct Pki {
    pub dir: TempDir,
    pub ca: DevCa,
    pub tls: TlsPaths,
}

impl Pki {
    pub fn new() -> Pki {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = DevCa::generate("test CA").expect("ca");
        let server = ca
            .issue_server(&["localhost".into(), "127.0.0.1".into()], &IssueOptions::valid_for_days(1))
            .expect("server cert");
        let write = |name: &str, body: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).expect("write");
            p
        };
        let tls = TlsPaths {
            cert: write("server.crt", &server.cert),
            key: write("server.key", &server.key),
            client_ca: write("ca.crt", &ca.pem.cert),
        };
        Pki { dir, ca, tls }
    }

    pub fn client_pem(&self, identity: &str) -> Pem {
        let id = Identity::parse(identity).expect("identity");
        self.ca.issue_client(&id, &IssueOptions::valid_for_days(1)).expect("client cert")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Runs one store test against every backend: Postgres (a fresh migrated database) and the
/// embedded SQLite store (a fresh file). `config = f` builds a custom configuration.
#[macro_export]
macro_rules! conformance {
    ($name:ident) => {
        conformance!($name, config = test_config);
    };
    ($name:ident, config = $config:ident) => {
        mod $name {
            #[sqlx::test(migrations = "../migrations/postgres")]
            async fn postgres(pool: sqlx::PgPool) {
                let pki = super::Pki::new();
                let config = super::$config(&pki);
                super::$name(super::TestBroker::start_with(pool, pki, config).await).await
            }

            /// The default writer: one batch at a time, each starting from what the last left.
            #[sqlx::test(migrations = "../migrations/postgres")]
            async fn postgres_serial(pool: sqlx::PgPool) {
                let pki = super::Pki::new();
                let mut config = super::$config(&pki);
                config.store.pipeline = false;
                super::$name(super::TestBroker::start_with(pool, pki, config).await).await
            }

            #[tokio::test]
            async fn sqlite() {
                let pki = super::Pki::new();
                let config = super::$config(&pki);
                super::$name(super::TestBroker::start_sqlite(pki, config).await).await
            }
        }
    };
}

pub struct TestBroker {
    pub pki: Pki,
    /// The SQLite store's directory, kept for the test's lifetime.
    pub data: Option<TempDir>,
    /// The writer decides the next batch while the one before commits (Postgres only).
    pub pipelined: bool,
    pub grpc: std::net::SocketAddr,
    pub http: std::net::SocketAddr,
    pub ctx: xpu_broker::service::Context,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub fn test_config(pki: &Pki) -> Config {
    let mut config = Config::new(Location::Postgres(String::new()), pki.tls.clone());
    config.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.http_addr = "127.0.0.1:0".parse().unwrap();
    config.bookmark_interval = Duration::from_millis(200);
    config.service.lease_duration = Duration::from_secs(3);
    config.service.heartbeat_interval = Duration::from_secs(1);
    config.service.attach_timeout = Duration::from_secs(5);
    // Postgres runs the pipelined writer here; `conformance!` runs each test again with the
    // default serial writer (the embedded store has the serial writer only).
    config.store.pipeline = true;
    config
}

impl TestBroker {
    pub async fn start(pool: PgPool) -> TestBroker {
        let pki = Pki::new();
        let config = test_config(&pki);
        TestBroker::start_with(pool, pki, config).await
    }

    pub async fn start_with(pool: PgPool, pki: Pki, config: Config) -> TestBroker {
        let pipelined = config.store.pipeline;
        let app = App::build_with_pool(config, pool).await.expect("app builds");
        let mut b = TestBroker::run(app, pki);
        b.pipelined = pipelined;
        b
    }

    /// The broker on a fresh embedded SQLite store.
    pub async fn start_sqlite(pki: Pki, mut config: Config) -> TestBroker {
        let data = tempfile::tempdir().expect("tempdir");
        config.database = Location::Sqlite(data.path().join("xpu.db"));
        let backend = Backend::open(&config.database, 4).await.expect("sqlite store");
        let app = App::build_with_backend(config, backend).await.expect("app builds");
        let mut b = TestBroker::run(app, pki);
        b.data = Some(data);
        b
    }

    fn run(app: App, pki: Pki) -> TestBroker {
        let grpc = app.grpc_addr();
        let http = app.http_addr();
        let ctx = app.context();
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        TestBroker { pki, data: None, pipelined: false, grpc, http, ctx, stop: Some(stop), task: Some(task) }
    }

    /// Runs a statement directly on the store (to prove a database constraint).
    pub async fn execute_sql(&self, sql: &str) -> Result<u64, String> {
        match self.ctx.store.backend() {
            Backend::Postgres(p) => {
                sqlx::query(sql).execute(p).await.map(|r| r.rows_affected()).map_err(|e| e.to_string())
            }
            Backend::Sqlite(p, _) => {
                sqlx::query(sql).execute(p).await.map(|r| r.rows_affected()).map_err(|e| e.to_string())
            }
        }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }

    pub fn tls_for(&self, pem: Option<&Pem>, ca_pem: &str) -> ClientTlsConfig {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name("localhost");
        if let Some(p) = pem {
            tls = tls.identity(TlsIdentity::from_pem(&p.cert, &p.key));
        }
        tls
    }

    pub async fn channel_with(&self, tls: ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
        Endpoint::from_shared(format!("https://127.0.0.1:{}", self.grpc.port()))
            .expect("endpoint")
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
    }

    pub async fn channel(&self, identity: &str) -> Channel {
        let pem = self.pki.client_pem(identity);
        self.channel_with(self.tls_for(Some(&pem), &self.pki.ca.pem.cert)).await.expect("connect")
    }

    pub async fn agent(&self, serial: &str) -> AgentServiceClient<Channel> {
        AgentServiceClient::new(self.channel(&format!("dpu/{serial}")).await)
    }

    pub async fn host(&self, node: &str) -> HostServiceClient<Channel> {
        HostServiceClient::new(self.channel(&format!("host/{node}")).await)
    }

    pub async fn sync(&self, identity: &str) -> SyncServiceClient<Channel> {
        SyncServiceClient::new(self.channel(identity).await)
    }

    pub async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel("admin/test").await)
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

// ---- object builders ----

pub fn meta(name: &str, namespace: &str) -> Option<pb::ObjectMeta> {
    Some(pb::ObjectMeta { name: name.into(), namespace: namespace.into(), ..Default::default() })
}

pub fn mk_lb(name: &str, vlan: u32) -> pb::Resource {
    pb::Resource {
        kind: Some(pb::resource::Kind::LogicalBridge(pb::LogicalBridge {
            metadata: meta(name, ""),
            spec: Some(pb::LogicalBridgeSpec { vlan_id: vlan, vni: Some(1000 + vlan), ..Default::default() }),
            status: None,
        })),
    }
}

/// The generation of a LogicalBridge resource.
pub fn lb_generation(res: &pb::Resource) -> i64 {
    match &res.kind {
        Some(pb::resource::Kind::LogicalBridge(l)) => l.metadata.as_ref().unwrap().generation,
        other => panic!("not a logical bridge: {other:?}"),
    }
}

pub fn mk_network(name: &str, lb: &str, cidr: &str, gateway: &str) -> pb::Resource {
    pb::Resource {
        kind: Some(pb::resource::Kind::XpuNetwork(pb::XpuNetwork {
            metadata: meta(name, ""),
            spec: Some(pb::XpuNetworkSpec {
                logical_bridges: vec![lb.into()],
                port_type: "access".into(),
                ipam: Some(pb::IpPool { cidr: cidr.into(), gateway: gateway.into(), ..Default::default() }),
                mtu: 1500,
                ..Default::default()
            }),
            status: None,
        })),
    }
}

pub fn mk_netdev_spec(serial: &str, vf: u32, node: &str, network: &str) -> pb::NetdevSpec {
    pb::NetdevSpec {
        netdev_id: format!("{serial}-pf0-vf{vf}"),
        hostname: node.into(),
        network: network.into(),
        ..Default::default()
    }
}

pub fn mk_netdev(namespace: &str, serial: &str, vf: u32, node: &str, network: &str) -> pb::Resource {
    let spec = mk_netdev_spec(serial, vf, node, network);
    pb::Resource {
        kind: Some(pb::resource::Kind::Netdev(pb::Netdev {
            metadata: meta(&spec.netdev_id, namespace),
            spec: Some(spec),
            status: None,
        })),
    }
}

pub fn apply_req(res: pb::Resource) -> pb::ApplyRequest {
    pb::ApplyRequest { object: Some(res), expected_generation: 0 }
}

pub fn key(kind: pb::Kind, namespace: &str, name: &str) -> pb::ObjectKey {
    pb::ObjectKey { kind: kind as i32, namespace: namespace.into(), name: name.into() }
}

/// Creates a LogicalBridge and an XpuNetwork with a pool, through the admin service.
pub async fn seed_network(b: &TestBroker, network: &str, cidr: &str, gateway: &str) {
    let mut admin = b.admin().await;
    admin.apply(apply_req(mk_lb("lb-10", 10))).await.expect("lb");
    admin.apply(apply_req(mk_network(network, "lb-10", cidr, gateway))).await.expect("network");
}

pub async fn register(b: &TestBroker, serial: &str) {
    let mut agent = b.agent(serial).await;
    agent.register(pb::RegisterRequest { serial: serial.into(), ..Default::default() }).await.expect("register");
}

pub fn netdev_status(phase: &str, ip: &str) -> pb::NetdevStatus {
    pb::NetdevStatus { phase: phase.into(), ip: ip.into(), oper_status: "UP".into(), ..Default::default() }
}

pub fn report(key: pb::ObjectKey, generation: i64, seq: u64, status: pb::NetdevStatus) -> pb::StatusReport {
    pb::StatusReport {
        key: Some(key),
        observed_generation: generation,
        seq,
        status: Some(pb::status_report::Status::Netdev(status)),
        removed: false,
    }
}

/// Next change event (skipping bookmarks), with a timeout.
pub async fn next_change(stream: &mut tonic::Streaming<pb::WatchEvent>, within: Duration) -> Option<pb::WatchEvent> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let ev = tokio::time::timeout_at(deadline, stream.message()).await.ok()?.ok()??;
        if !matches!(ev.event, Some(pb::watch_event::Event::Bookmark(_))) {
            return Some(ev);
        }
    }
}

/// Reads a fresh stream's snapshot to its end and returns the revision it ends at. A test that
/// writes after this sees its write as a live change, never inside the snapshot.
pub async fn snapshot_end(stream: &mut tonic::Streaming<pb::WatchEvent>) -> i64 {
    loop {
        let ev = next_change(stream, Duration::from_secs(10)).await.expect("the snapshot ends");
        match ev.event {
            Some(pb::watch_event::Event::SnapshotEnd(_)) => return ev.revision,
            Some(pb::watch_event::Event::Resync(r)) => assert_eq!(r.reason, pb::resync::Reason::Initial as i32),
            Some(pb::watch_event::Event::Change(c)) => assert_eq!(c.r#type, pb::ChangeType::Snapshot as i32),
            other => panic!("not part of a snapshot: {other:?}"),
        }
    }
}

pub fn assert_invalid(status: &tonic::Status, field: &str) {
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with(&format!("invalid {field}:")),
        "expected the error to name {field}: {:?}",
        status.message()
    );
}
