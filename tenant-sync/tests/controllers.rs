//! tenant-sync and infra-sync end to end: the real broker (real Postgres, real mTLS), two fake
//! kube-apiservers ("tenant" and "infra") driven by the real `kube::Client`, and the real
//! controller binaries.

#![allow(clippy::unwrap_used)]

use std::{path::Path, process::Command, time::Duration};

use kube::{
    Api,
    api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use sqlx::PgPool;
use xpu_proto::broker::v1::{
    self as pb, admin_service_client::AdminServiceClient, agent_service_client::AgentServiceClient,
};
use xpu_sync_common::cluster::kinds::api_resource;
use xpu_testkit::*;

const TENANT_SYNC: &str = env!("CARGO_BIN_EXE_tenant-sync");

type Cluster = xpu_testkit::cluster::FakeCluster;

async fn cluster(dir: &Path, name: &str) -> Cluster {
    xpu_testkit::cluster::fake_cluster(dir, name, &["pods"]).await
}

fn api(c: &Cluster, kind: pb::Kind, ns: Option<&str>) -> Api<DynamicObject> {
    let ar = api_resource(kind);
    match ns {
        Some(ns) => Api::namespaced_with(c.client.clone(), ns, &ar),
        None => Api::all_with(c.client.clone(), &ar),
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_sync(
    bin: &Path,
    side: &str,
    cluster: &Cluster,
    pki: &Pki,
    broker: &str,
    http: u16,
    holder: &str,
    log: &Path,
) -> Agent {
    let certs = pki.issue(&format!("cluster/east/{side}"));
    let mut cmd = Command::new(bin);
    cmd.args(["--broker", broker])
        .args(["--tls-cert", certs.join("tls.crt").to_str().unwrap()])
        .args(["--tls-key", certs.join("tls.key").to_str().unwrap()])
        .args(["--ca", certs.join("ca.crt").to_str().unwrap()])
        .args(["--cluster", "east", "--namespace", "xpu-system", "--holder", holder])
        .args(["--kubeconfig", cluster.kubeconfig.to_str().unwrap()])
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .args(["--lease-duration", "3s", "--gc-interval", "1s", "--gc-grace", "1s"])
        .env("XPU_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap());
    Agent { child: cmd.spawn().unwrap(), log: log.to_path_buf() }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

async fn wait_obj(api: &Api<DynamicObject>, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    eventually(Duration::from_secs(20), what, || {
        let api = api.clone();
        let name = name.to_string();
        let check = &check;
        async move {
            let o = api.get_opt(&name).await.ok().flatten()?;
            let v = serde_json::to_value(&o).ok()?;
            check(&v).then_some(v)
        }
    })
    .await
}

fn persisted_revision(c: &Cluster, name: &str) -> i64 {
    c.server
        .get_object("", "configmaps", "xpu-system", name)
        .and_then(|cm| cm["data"]["revision"].as_str().and_then(|r| r.parse().ok()))
        .unwrap_or(0)
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn objects_flow_between_the_clusters_and_the_broker(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&[]);
    let broker = Broker::start(pool, &pki, 0).await;
    let url = format!("https://127.0.0.1:{}", broker.grpc.port());
    let admin = AdminServiceClient::new(pki.channel(broker.grpc, "admin/test").await);
    let tenant = cluster(dir.path(), "tenant").await;
    let infra = cluster(dir.path(), "infra").await;
    let infra_bin = workspace_binary("infra-sync", "xpu-infra-sync");
    let tenant_bin = std::path::PathBuf::from(TENANT_SYNC);
    let (t_http, i_http) = (free_port(), free_port());
    let mut tsync =
        spawn_sync(&tenant_bin, "tenant", &tenant, &pki, &url, t_http, "t-1", &dir.path().join("tenant-sync.log"));
    let _isync = spawn_sync(&infra_bin, "infra", &infra, &pki, &url, i_http, "i-1", &dir.path().join("infra-sync.log"));

    // The infra cluster authors the fabric: it reaches the broker.
    let lb = json!({"apiVersion": "xpu.opi.dev/v1alpha1", "kind": "LogicalBridge", "metadata": {"name": "lb-10"},
        "spec": {"vlanId": 10, "vni": 1010}});
    let net = json!({"apiVersion": "xpu.opi.dev/v1alpha1", "kind": "XpuNetwork", "metadata": {"name": "tenant-a"},
        "spec": {"logicalBridges": ["lb-10"], "ipam": {"cidr": "10.30.0.0/24", "gateway": "10.30.0.1"}}});
    api(&infra, pb::Kind::LogicalBridge, None)
        .create(&PostParams::default(), &serde_json::from_value(lb).unwrap())
        .await
        .unwrap();
    api(&infra, pb::Kind::XpuNetwork, None)
        .create(&PostParams::default(), &serde_json::from_value(net).unwrap())
        .await
        .unwrap();
    let network_in_broker = |name: &'static str| {
        let admin = admin.clone();
        let isync = &_isync;
        eventually_explained(
            Duration::from_secs(20),
            move || format!("network {name} never reached the broker; infra-sync:\n{}", isync.log_text()),
            move || {
                let mut admin = admin.clone();
                async move { get(&mut admin, pb::Kind::XpuNetwork, "", name).await }
            },
        )
    };
    network_in_broker("tenant-a").await;
    // A network created before the bridge it names is refused at first, and carried up once the
    // bridge reaches the broker.
    let early = json!({"apiVersion": "xpu.opi.dev/v1alpha1", "kind": "XpuNetwork", "metadata": {"name": "tenant-b"},
        "spec": {"logicalBridges": ["lb-20"], "ipam": {"cidr": "10.31.0.0/24", "gateway": "10.31.0.1"}}});
    api(&infra, pb::Kind::XpuNetwork, None)
        .create(&PostParams::default(), &serde_json::from_value(early).unwrap())
        .await
        .unwrap();
    wait_obj(&api(&infra, pb::Kind::XpuNetwork, None), "tenant-b", "the refusal on tenant-b", |v| {
        v["status"]["conditions"][0]["reason"] == "Refused"
    })
    .await;
    let lb20 = json!({"apiVersion": "xpu.opi.dev/v1alpha1", "kind": "LogicalBridge", "metadata": {"name": "lb-20"},
        "spec": {"vlanId": 20, "vni": 1020}});
    api(&infra, pb::Kind::LogicalBridge, None)
        .create(&PostParams::default(), &serde_json::from_value(lb20).unwrap())
        .await
        .unwrap();
    network_in_broker("tenant-b").await;
    // ...and the tenant cluster gets a read-only mirror of the network.
    wait_obj(&api(&tenant, pb::Kind::XpuNetwork, None), "tenant-a", "the network mirrored to the tenant", |v| {
        v["metadata"]["labels"]["xpu.opi.dev/mirror"] == "true" && v["spec"]["ipam"]["cidr"] == "10.30.0.0/24"
    })
    .await;

    // A DPU registers: it is mirrored into the infra cluster; its LogicalBridge status comes back.
    let mut agent = AgentServiceClient::new(pki.channel(broker.grpc, "dpu/bf3-1").await);
    agent.register(pb::RegisterRequest { serial: "bf3-1".into(), ..Default::default() }).await.unwrap();
    wait_obj(&api(&infra, pb::Kind::Dpu, None), "bf3-1", "the Dpu in the infra cluster", |v| {
        v["status"]["leaseState"] == "Ready"
    })
    .await;
    let lb_status = pb::DpuObjectStatus { phase: "Programmed".into(), oper_status: "UP".into(), ..Default::default() };
    agent
        .report_status(pb::ReportStatusRequest {
            serial: "bf3-1".into(),
            reports: vec![pb::StatusReport {
                key: Some(pb::ObjectKey {
                    kind: pb::Kind::LogicalBridge as i32,
                    namespace: String::new(),
                    name: "lb-10".into(),
                }),
                observed_generation: 1,
                seq: 1,
                status: Some(pb::status_report::Status::Object(lb_status)),
                removed: false,
            }],
        })
        .await
        .unwrap();
    wait_obj(&api(&infra, pb::Kind::LogicalBridge, None), "lb-10", "per-DPU status in the infra cluster", |v| {
        v["status"]["dpus"][0]["dpu"] == "bf3-1" && v["status"]["dpus"][0]["phase"] == "Programmed"
    })
    .await;

    // A Netdev created in the tenant cluster: broker, infra mirror with its DPU, status back.
    let nd = json!({"apiVersion": "xpu.opi.dev/v1alpha1", "kind": "Netdev",
        "metadata": {"name": "bf3-1-pf0-vf2", "namespace": "pods", "labels": {"app": "web"}},
        "spec": {"netdevId": "bf3-1-pf0-vf2", "hostname": "node-1", "network": "tenant-a"}});
    let tenant_nd = api(&tenant, pb::Kind::Netdev, Some("pods"));
    tenant_nd.create(&PostParams::default(), &serde_json::from_value(nd).unwrap()).await.unwrap();
    let in_broker = eventually(Duration::from_secs(20), "the netdev in the broker", || {
        let mut admin = admin.clone();
        async move { get(&mut admin, pb::Kind::Netdev, "pods", "bf3-1-pf0-vf2").await }
    })
    .await;
    let Some(pb::resource::Kind::Netdev(b_nd)) = in_broker.kind else { panic!() };
    let meta = b_nd.metadata.unwrap();
    assert_eq!(meta.spec_author, "cluster/east/tenant");
    let address = b_nd.spec.unwrap().ipam.unwrap().address;
    wait_obj(&api(&infra, pb::Kind::Netdev, Some("pods")), "bf3-1-pf0-vf2", "the infra mirror", |v| {
        v["metadata"]["labels"]["xpu.opi.dev/mirror"] == "true" && v["spec"]["netdevId"] == "bf3-1-pf0-vf2"
    })
    .await;
    agent
        .report_status(pb::ReportStatusRequest {
            serial: "bf3-1".into(),
            reports: vec![pb::StatusReport {
                key: Some(pb::ObjectKey {
                    kind: pb::Kind::Netdev as i32,
                    namespace: "pods".into(),
                    name: "bf3-1-pf0-vf2".into(),
                }),
                observed_generation: meta.generation,
                seq: 2,
                status: Some(pb::status_report::Status::Netdev(pb::NetdevStatus {
                    phase: "Connected".into(),
                    ip: address.clone(),
                    ..Default::default()
                })),
                removed: false,
            }],
        })
        .await
        .unwrap();
    let v = wait_obj(&tenant_nd, "bf3-1-pf0-vf2", "Connected in the tenant cluster", |v| {
        v["status"]["phase"] == "Connected"
    })
    .await;
    wait_obj(
        &api(&infra, pb::Kind::Netdev, Some("pods")),
        "bf3-1-pf0-vf2",
        "the infra mirror's status with its DPU",
        |v| v["status"]["dpu"] == "bf3-1" && v["status"]["phase"] == "Connected",
    )
    .await;
    assert_eq!(v["status"]["ip"], json!(address));
    assert!(v["metadata"]["finalizers"].as_array().unwrap().iter().any(|f| f == "xpu.opi.dev/broker"));

    // kubectl against the fake shows the printer columns (off the runtime thread that serves it).
    let server_url = tenant.server.url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("kubectl").args(["--server", &server_url, "get", "netdevs", "-n", "pods", "-o", "wide"]).output()
    })
    .await
    .unwrap();
    if let Ok(out) = out {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("PHASE") && text.contains("IP") && text.contains("DPU") && text.contains("NODE"),
            "{text}"
        );
        assert!(text.contains("Connected") && text.contains("node-1") && text.contains("bf3-1"), "{text}");
    } else {
        eprintln!("kubectl not found: skipping the printer-column check");
    }

    // Restart tenant-sync: it resumes from its persisted revision; changes made while it was
    // away (a Netdev attached through the broker) arrive, once.
    let persisted_before = persisted_revision(&tenant, "xpu-tenant-sync-east-state");
    assert!(persisted_before > 0);
    let log_len = std::fs::read_to_string(&tsync.log).unwrap().len();
    tsync.kill();
    let persisted = persisted_revision(&tenant, "xpu-tenant-sync-east-state");
    let mut host = xpu_proto::broker::v1::host_service_client::HostServiceClient::new(
        pki.channel(broker.grpc, "host/node-1").await,
    );
    let err = attach(&mut host, "bf3-1", 5, "node-1").await.map(|_| ()).unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "no agent answers; the netdev stays");
    let tsync =
        spawn_sync(&tenant_bin, "tenant", &tenant, &pki, &url, t_http, "t-1", &dir.path().join("tenant-sync.log"));
    let mirror = wait_obj(&tenant_nd, "bf3-1-pf0-vf5", "the broker-made netdev mirrored", |v| {
        v["metadata"]["labels"]["xpu.opi.dev/mirror"] == "true"
    })
    .await;
    assert_eq!(mirror["spec"]["hostname"], "node-1");
    let log = std::fs::read_to_string(&tsync.log).unwrap()[log_len..].to_string();
    assert!(log.contains(&format!("since_revision={persisted}")), "resumes from {persisted}: {log}");

    // A hand edit of a mirror is put back.
    let edit = json!({"spec": {"hostname": "node-9"}});
    tenant_nd.patch("bf3-1-pf0-vf5", &PatchParams::default(), &Patch::Merge(&edit)).await.unwrap();
    wait_obj(&tenant_nd, "bf3-1-pf0-vf5", "the edit put back", |v| v["spec"]["hostname"] == "node-1").await;
    // A writer that keeps changing it is reported, not fought in a loop.
    for i in 0..2 {
        let edit = json!({"spec": {"hostname": format!("node-x{i}")}});
        tenant_nd.patch("bf3-1-pf0-vf5", &PatchParams::default(), &Patch::Merge(&edit)).await.unwrap();
        wait_obj(&tenant_nd, "bf3-1-pf0-vf5", "put back again", |v| v["spec"]["hostname"] == "node-1").await;
    }
    let edit = json!({"spec": {"hostname": "node-x9"}});
    tenant_nd.patch("bf3-1-pf0-vf5", &PatchParams::default(), &Patch::Merge(&edit)).await.unwrap();
    let v = wait_obj(&tenant_nd, "bf3-1-pf0-vf5", "the conflict reported", |v| {
        v["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["reason"] == "ConflictingFieldManager"))
    })
    .await;
    assert_eq!(v["spec"]["hostname"], "node-x9", "not fought");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v = serde_json::to_value(tenant_nd.get("bf3-1-pf0-vf5").await.unwrap()).unwrap();
    assert_eq!(v["spec"]["hostname"], "node-x9", "still not fought");

    // Delete in the tenant cluster: gone everywhere; the finalizer went only after the tombstone.
    tenant_nd.delete("bf3-1-pf0-vf2", &DeleteParams::default()).await.unwrap();
    eventually(Duration::from_secs(20), "deleted everywhere", || {
        let tenant_nd = tenant_nd.clone();
        let infra_nd = api(&infra, pb::Kind::Netdev, Some("pods"));
        let mut admin = admin.clone();
        async move {
            let t = tenant_nd.get_opt("bf3-1-pf0-vf2").await.ok()?;
            let i = infra_nd.get_opt("bf3-1-pf0-vf2").await.ok()?;
            let b = get(&mut admin, pb::Kind::Netdev, "pods", "bf3-1-pf0-vf2").await;
            (t.is_none() && i.is_none() && b.is_none()).then_some(())
        }
    })
    .await;
    assert!(http_get(t_http, "/metrics").contains("xpu_sync_leader 1"));
    drop(tsync);
    broker.stop().await;
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn only_the_leader_writes_and_a_standby_takes_over(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&[]);
    let broker = Broker::start(pool.clone(), &pki, 0).await;
    let url = format!("https://127.0.0.1:{}", broker.grpc.port());
    let mut admin = AdminServiceClient::new(pki.channel(broker.grpc, "admin/test").await);
    seed_fabric(&mut admin).await;
    let tenant = cluster(dir.path(), "tenant").await;
    let bin = std::path::PathBuf::from(TENANT_SYNC);
    let (a_http, b_http) = (free_port(), free_port());
    let mut a = spawn_sync(&bin, "tenant", &tenant, &pki, &url, a_http, "a", &dir.path().join("a.log"));
    let mut b = spawn_sync(&bin, "tenant", &tenant, &pki, &url, b_http, "b", &dir.path().join("b.log"));
    let leader = eventually(Duration::from_secs(20), "one leader", || {
        let (ma, mb) = (http_get(a_http, "/metrics"), http_get(b_http, "/metrics"));
        async move {
            match (ma.contains("xpu_sync_leader 1"), mb.contains("xpu_sync_leader 1")) {
                (true, false) => Some('a'),
                (false, true) => Some('b'),
                _ => None,
            }
        }
    })
    .await;
    // The mirror of a broker object is written by the leader only.
    let mut host = xpu_proto::broker::v1::host_service_client::HostServiceClient::new(
        pki.channel(broker.grpc, "host/node-1").await,
    );
    let _ = attach(&mut host, "bf3-9", 1, "node-1").await;
    wait_obj(&api(&tenant, pb::Kind::Netdev, Some("pods")), "bf3-9-pf0-vf1", "the mirror", |_| true).await;
    let standby_log = if leader == 'a' { b.log_text() } else { a.log_text() };
    assert!(!standby_log.contains("leading"), "the standby never led: {standby_log}");
    let holder =
        tenant.server.get_object("coordination.k8s.io", "leases", "xpu-system", "xpu-tenant-sync-east").unwrap();
    assert_eq!(holder["spec"]["holderIdentity"], leader.to_string());

    // The leader dies: the standby takes the lease once it lapses and carries on.
    let (dead, standby_port) = if leader == 'a' { (&mut a, b_http) } else { (&mut b, a_http) };
    dead.kill();
    eventually(Duration::from_secs(20), "the standby leading", || {
        let m = http_get(standby_port, "/metrics");
        async move { m.contains("xpu_sync_leader 1").then_some(()) }
    })
    .await;
    let _ = attach(&mut host, "bf3-9", 2, "node-1").await;
    wait_obj(&api(&tenant, pb::Kind::Netdev, Some("pods")), "bf3-9-pf0-vf2", "a mirror by the new leader", |_| true)
        .await;

    // The broker is down for a while: a Netdev created meanwhile in the cluster gets there after.
    let port = broker.grpc.port();
    broker.stop().await;
    let nd = json!({"apiVersion": "xpu.opi.dev/v1alpha1", "kind": "Netdev",
        "metadata": {"name": "bf3-9-pf0-vf7", "namespace": "pods"},
        "spec": {"netdevId": "bf3-9-pf0-vf7", "hostname": "node-1", "network": "tenant-a"}});
    api(&tenant, pb::Kind::Netdev, Some("pods"))
        .create(&PostParams::default(), &serde_json::from_value(nd).unwrap())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let broker = Broker::start(pool, &pki, port).await;
    let mut admin = AdminServiceClient::new(pki.channel(broker.grpc, "admin/test").await);
    eventually(Duration::from_secs(30), "the netdev in the broker after the outage", || {
        let mut admin = admin.clone();
        async move { get(&mut admin, pb::Kind::Netdev, "pods", "bf3-9-pf0-vf7").await }
    })
    .await;
    let _ = get(&mut admin, pb::Kind::Netdev, "pods", "bf3-9-pf0-vf7").await;
    broker.stop().await;
}
