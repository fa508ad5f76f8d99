//! Harness shared by the end-to-end tests: the real broker (in-process, real Postgres, real
//! mTLS), real binaries of the workspace, and network namespaces standing for DPUs and pods.
//! Test code only: it panics on any setup failure, with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod cluster;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use sqlx::PgPool;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};
use xpu_broker::{
    App, Config,
    ca::{DevCa, IssueOptions},
    identity::Identity,
    tls::TlsPaths,
};
use xpu_proto::broker::v1::{
    self as pb, admin_service_client::AdminServiceClient, host_service_client::HostServiceClient,
};

/// A binary of this workspace (e.g. `dpu-agent` of `xpu-infra-sync`), built when missing: a
/// test may need binaries of another package than its own.
pub fn workspace_binary(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let bin = dir.join(name);
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo).args(["build", "-p", package, "--bin", name]).status().unwrap();
        assert!(status.success(), "building {name} failed");
    }
    assert!(bin.exists(), "{} not found", bin.display());
    bin
}

pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sh_ok(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A DPU namespace linked to the root namespace, and pod namespaces whose "VF" is one end of a
/// veth pair whose other end, in the DPU namespace, is the representor `pf0vf<N>`.
/// Everything is deleted on drop, also when a test fails.
pub struct Topology {
    pub prefix: String,
    pub dpu: String,
    pub pods: Vec<String>,
    /// Address of the root end of the DPU link (the broker is reachable there).
    pub root_ip: String,
}

impl Topology {
    pub fn new(pods: usize) -> Topology {
        assert!(sh_ok("ip netns list"), "these tests need root and iproute2 (network namespaces); run them as root");
        let n = (std::process::id() % 200) * 50 + NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("xt{n}");
        let subnet = n % 250;
        let dpu = format!("{prefix}-dpu");
        let t =
            Topology { prefix: prefix.clone(), dpu: dpu.clone(), pods: vec![], root_ip: format!("10.251.{subnet}.1") };
        t.cleanup();
        sh(&format!("ip netns add {dpu}"));
        sh(&format!("ip link add {prefix}r type veth peer name uplink netns {dpu}"));
        sh(&format!("ip addr add 10.251.{subnet}.1/30 dev {prefix}r && ip link set {prefix}r up"));
        sh(&format!(
            "ip -n {dpu} addr add 10.251.{subnet}.2/30 dev uplink && ip -n {dpu} link set uplink up && ip -n {dpu} link set lo up"
        ));
        let mut t = t;
        for i in 0..pods {
            let pod = format!("{prefix}-pod{i}");
            sh(&format!("ip netns add {pod}"));
            sh(&format!("ip link add vf{i} netns {pod} type veth peer name pf0vf{i} netns {dpu}"));
            sh(&format!("ip -n {pod} link set lo up"));
            t.pods.push(pod);
        }
        t
    }

    /// Configures pod `i`'s VF as a CNI would.
    pub fn configure_pod(&self, i: usize, address: &str, gateway: &str, mac: &str) {
        let pod = &self.pods[i];
        sh(&format!("ip -n {pod} link set vf{i} address {mac}"));
        sh(&format!("ip -n {pod} addr replace {address} dev vf{i}"));
        sh(&format!("ip -n {pod} link set vf{i} up"));
        sh(&format!("ip -n {pod} route replace default via {gateway} dev vf{i}"));
    }

    /// Whether pod `i` reaches `ip` (two pings, one second each).
    pub fn ping(&self, i: usize, ip: &str) -> bool {
        sh_ok(&format!("ip netns exec {} ping -c 2 -i 0.2 -W 1 {ip}", self.pods[i]))
    }

    pub fn in_dpu(&self, cmd: &str) -> String {
        sh(&format!("ip netns exec {} {cmd}", self.dpu))
    }

    fn cleanup(&self) {
        for i in 0..8 {
            let _ = sh_ok(&format!("ip netns del {}-pod{i}", self.prefix));
        }
        let _ = sh_ok(&format!("ip netns del {}", self.dpu));
        let _ = sh_ok(&format!("ip link del {}r", self.prefix));
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.cleanup();
    }
}

pub struct Pki {
    pub dir: TempDir,
    pub ca: DevCa,
    pub tls: TlsPaths,
}

impl Pki {
    pub fn new(server_ips: &[&str]) -> Pki {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("test CA").unwrap();
        let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
        sans.extend(server_ips.iter().map(|s| s.to_string()));
        let server = ca.issue_server(&sans, &IssueOptions::valid_for_days(1)).unwrap();
        std::fs::write(dir.path().join("server.crt"), &server.cert).unwrap();
        std::fs::write(dir.path().join("server.key"), &server.key).unwrap();
        std::fs::write(dir.path().join("ca.crt"), &ca.pem.cert).unwrap();
        let tls = TlsPaths {
            cert: dir.path().join("server.crt"),
            key: dir.path().join("server.key"),
            client_ca: dir.path().join("ca.crt"),
        };
        Pki { dir, ca, tls }
    }

    /// Writes `<name>/tls.crt`, `tls.key`, `ca.crt` for an identity and returns the directory.
    pub fn issue(&self, identity: &str) -> PathBuf {
        let id = Identity::parse(identity).unwrap();
        let pem = self.ca.issue_client(&id, &IssueOptions::valid_for_days(1)).unwrap();
        let out = self.dir.path().join(identity.replace('/', "_"));
        xpu_broker::ca::write_issued(&out, &pem, &self.ca).unwrap();
        out
    }

    pub async fn channel(&self, addr: SocketAddr, identity: &str) -> Channel {
        let id = Identity::parse(identity).unwrap();
        let pem = self.ca.issue_client(&id, &IssueOptions::valid_for_days(1)).unwrap();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca.pem.cert))
            .identity(TlsIdentity::from_pem(&pem.cert, &pem.key))
            .domain_name("localhost");
        Endpoint::from_shared(format!("https://127.0.0.1:{}", addr.port()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

pub struct Broker {
    pub grpc: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Broker {
    /// The real broker on `port` (0: any) of every address.
    pub async fn start(pool: PgPool, pki: &Pki, port: u16) -> Broker {
        let mut config = Config::new(xpu_broker::store::Location::Postgres(String::new()), pki.tls.clone());
        config.grpc_addr = SocketAddr::from(([0, 0, 0, 0], port));
        config.http_addr = "127.0.0.1:0".parse().unwrap();
        config.bookmark_interval = Duration::from_millis(300);
        config.service.heartbeat_interval = Duration::from_millis(500);
        config.service.lease_duration = Duration::from_secs(5);
        config.service.attach_timeout = Duration::from_secs(20);
        let app = App::build_with_pool(config, pool).await.unwrap();
        let grpc = app.grpc_addr();
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        Broker { grpc, stop: Some(stop), task: Some(task) }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// The real agent binary, optionally inside a network namespace; killed on drop. Its log goes
/// to `<state_dir>/agent.log`.
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

impl Agent {
    pub fn spawn(
        binary: &Path,
        netns: Option<&str>,
        broker: &str,
        certs: &Path,
        serial: &str,
        state_dir: &Path,
        extra: &[&str],
    ) -> Agent {
        Agent::spawn_with_env(binary, netns, broker, certs, serial, state_dir, extra, &[])
    }

    /// As [`Agent::spawn`], with extra environment variables (e.g. `XPU_FAILPOINTS`).
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_with_env(
        binary: &Path,
        netns: Option<&str>,
        broker: &str,
        certs: &Path,
        serial: &str,
        state_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        std::fs::create_dir_all(state_dir).unwrap();
        let log = state_dir.join("agent.log");
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        cmd.args(["--broker", broker])
            .args(["--tls-cert", certs.join("tls.crt").to_str().unwrap()])
            .args(["--tls-key", certs.join("tls.key").to_str().unwrap()])
            .args(["--ca", certs.join("ca.crt").to_str().unwrap()])
            .args(["--serial", serial])
            .args(["--state-dir", state_dir.to_str().unwrap()])
            .args(["--flow-interval", "300ms", "--max-backoff", "1s"])
            .args(extra)
            .env("XPU_LOG", "info,xpu_infra_sync=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(logf);
        Agent { child: cmd.spawn().unwrap(), log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` until it returns Some, or panics with `what` after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_explained(within, || format!("timed out waiting for {what}"), f).await
}

/// As [`eventually`], panicking with what `explain` says at the deadline (e.g. a process log).
pub async fn eventually_explained<T, F, Fut>(within: Duration, explain: impl FnOnce() -> String, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("{}", explain());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn meta(name: &str, namespace: &str) -> Option<pb::ObjectMeta> {
    Some(pb::ObjectMeta { name: name.into(), namespace: namespace.into(), ..Default::default() })
}

pub fn apply(res: pb::resource::Kind) -> pb::ApplyRequest {
    pb::ApplyRequest { object: Some(pb::Resource { kind: Some(res) }), expected_generation: 0 }
}

/// LogicalBridge lb-10 (VNI 1010), Vrf blue, Svi gw 10.10.0.1/24, XpuNetwork tenant-a.
pub async fn seed_fabric(admin: &mut AdminServiceClient<Channel>) {
    use pb::resource::Kind as R;
    admin
        .apply(apply(R::LogicalBridge(pb::LogicalBridge {
            metadata: meta("lb-10", ""),
            spec: Some(pb::LogicalBridgeSpec {
                vlan_id: 10,
                vni: Some(1010),
                vtep_ip_prefix: "10.252.0.1/32".into(),
                ..Default::default()
            }),
            status: None,
        })))
        .await
        .unwrap();
    admin
        .apply(apply(R::Vrf(pb::Vrf {
            metadata: meta("blue", ""),
            spec: Some(pb::VrfSpec {
                vni: Some(2000),
                loopback_ip_prefix: "10.255.0.1/32".into(),
                ..Default::default()
            }),
            status: None,
        })))
        .await
        .unwrap();
    admin
        .apply(apply(R::Svi(pb::Svi {
            metadata: meta("svi-10", ""),
            spec: Some(pb::SviSpec {
                vrf: "blue".into(),
                logical_bridge: "lb-10".into(),
                mac_address: "02:00:00:00:10:01".into(),
                gw_ip_prefix: vec!["10.10.0.1/24".into()],
                ..Default::default()
            }),
            status: None,
        })))
        .await
        .unwrap();
    admin
        .apply(apply(R::XpuNetwork(pb::XpuNetwork {
            metadata: meta("tenant-a", ""),
            spec: Some(pb::XpuNetworkSpec {
                logical_bridges: vec!["lb-10".into()],
                vrf: "blue".into(),
                ipam: Some(pb::IpPool {
                    cidr: "10.10.0.0/24".into(),
                    gateway: "10.10.0.1".into(),
                    ..Default::default()
                }),
                mtu: 1500,
                ..Default::default()
            }),
            status: None,
        })))
        .await
        .unwrap();
}

pub async fn attach(
    host: &mut HostServiceClient<Channel>,
    serial: &str,
    vf: u32,
    node: &str,
) -> Result<pb::AttachNetdevResponse, tonic::Status> {
    host.attach_netdev(pb::AttachNetdevRequest {
        namespace: "pods".into(),
        labels: [("app".to_string(), "web".to_string())].into(),
        spec: Some(pb::NetdevSpec {
            netdev_id: format!("{serial}-pf0-vf{vf}"),
            hostname: node.into(),
            network: "tenant-a".into(),
            ..Default::default()
        }),
        timeout_ms: 20_000,
    })
    .await
    .map(|r| r.into_inner())
}

pub async fn get(
    admin: &mut AdminServiceClient<Channel>,
    kind: pb::Kind,
    ns: &str,
    name: &str,
) -> Option<pb::Resource> {
    admin
        .get(pb::GetRequest { key: Some(pb::ObjectKey { kind: kind as i32, namespace: ns.into(), name: name.into() }) })
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// The status one DPU reported for a fabric object or flow policy.
pub async fn dpu_status(
    admin: &mut AdminServiceClient<Channel>,
    kind: pb::Kind,
    ns: &str,
    name: &str,
    dpu: &str,
) -> Option<pb::DpuObjectStatus> {
    use pb::resource::Kind as R;
    let res = get(admin, kind, ns, name).await?;
    let st = match res.kind? {
        R::LogicalBridge(o) => o.status,
        R::Vrf(o) => o.status,
        R::Svi(o) => o.status,
        R::FlowPolicy(o) => o.status,
        _ => None,
    }?;
    st.dpus.into_iter().find(|d| d.dpu == dpu)
}

pub async fn netdev_status(admin: &mut AdminServiceClient<Channel>, ns: &str, name: &str) -> Option<pb::NetdevStatus> {
    match get(admin, pb::Kind::Netdev, ns, name).await?.kind? {
        pb::resource::Kind::Netdev(n) => n.status,
        _ => None,
    }
}
