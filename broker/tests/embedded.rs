//! The embedded default: `xpu-broker serve` with no database and no certificates prepared
//! (`--dev`), crash safety of the SQLite store, one process per file, and moving a store from
//! SQLite to Postgres without agents noticing.

#![allow(clippy::unwrap_used)]

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sqlx::PgPool;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use xpu_proto::broker::v1::{
    self as pb, admin_service_client::AdminServiceClient, agent_service_client::AgentServiceClient,
    watch_event::Event as E,
};

const BIN: &str = env!("CARGO_BIN_EXE_xpu-broker");

struct Server {
    child: Child,
    grpc: u16,
    http: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn ready(http: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", http)) else { return false };
    let _ = write!(s, "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

/// Starts `serve` with `args` (addresses chosen here) and waits until it is ready.
async fn serve(data: &Path, args: &[&str]) -> Server {
    let (grpc, http) = (free_port(), free_port());
    let child = Command::new(BIN)
        .arg("serve")
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}"), "--http-addr", &format!("127.0.0.1:{http}")])
        .args(["--data-dir", data.to_str().unwrap()])
        .args(args)
        .env_remove("DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(data.join("broker.log")).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !ready(http) {
        assert!(started.elapsed() < Duration::from_secs(20), "not ready: {}", log(data));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Server { child, grpc, http }
}

fn log(data: &Path) -> String {
    std::fs::read_to_string(data.join("broker.log")).unwrap_or_default()
}

/// Issues a certificate from the development CA with the real CLI.
fn issue(data: &Path, identity: &str) -> std::path::PathBuf {
    let out = data.join(identity.replace('/', "_"));
    let st = Command::new(BIN)
        .args(["ca", "issue", "--dir", data.join("dev-ca").to_str().unwrap(), "--identity", identity])
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    out
}

async fn channel(grpc: u16, certs: &Path) -> Channel {
    let read = |f: &str| std::fs::read(certs.join(f)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.crt")))
        .identity(Identity::from_pem(read("tls.crt"), read("tls.key")))
        .domain_name("localhost");
    Endpoint::from_shared(format!("https://127.0.0.1:{grpc}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn lb(name: &str, vlan: u32) -> pb::ApplyRequest {
    pb::ApplyRequest {
        object: Some(pb::Resource {
            kind: Some(pb::resource::Kind::LogicalBridge(pb::LogicalBridge {
                metadata: Some(pb::ObjectMeta { name: name.into(), ..Default::default() }),
                spec: Some(pb::LogicalBridgeSpec { vlan_id: vlan, ..Default::default() }),
                status: None,
            })),
        }),
        expected_generation: 0,
    }
}

/// Revisions of every change in the log after `since`, in order (the stream's replay).
async fn replayed(admin: &mut AdminServiceClient<Channel>, since: i64, until: i64) -> Vec<i64> {
    let mut s = admin.watch(pb::WatchRequest { kinds: vec![], since_revision: since }).await.unwrap().into_inner();
    let mut revs = Vec::new();
    while revs.last().is_none_or(|r| *r < until) {
        let ev = tokio::time::timeout(Duration::from_secs(10), s.message()).await.unwrap().unwrap().unwrap();
        if let Some(E::Change(_)) = ev.event {
            revs.push(ev.revision);
        }
    }
    revs
}

#[tokio::test]
async fn dev_mode_starts_on_sqlite_and_reuses_its_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let server = serve(data, &["--dev"]).await;
    let text = log(data);
    assert!(text.contains("store=\"sqlite\"") || text.contains("store=sqlite"), "the log says which store: {text}");
    assert!(
        text.contains("ca issue --dir") && text.contains("--identity dpu/<serial>"),
        "prints how to issue certs: {text}"
    );
    let admin_certs = issue(data, "admin/me");
    let mut admin = AdminServiceClient::new(channel(server.grpc, &admin_certs).await);
    admin.apply(lb("lb-1", 1)).await.unwrap();
    // A second process on the same file is refused, clearly.
    let other = Command::new(BIN)
        .args([
            "serve",
            "--dev",
            "--data-dir",
            data.to_str().unwrap(),
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!other.status.success());
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("another broker process already uses"),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    drop(server);

    // Restarted on the same data dir: same CA, the certificate still works, the data is there.
    let server = serve(data, &["--dev"]).await;
    let mut admin = AdminServiceClient::new(channel(server.grpc, &admin_certs).await);
    let got = admin
        .get(pb::GetRequest {
            key: Some(pb::ObjectKey {
                kind: pb::Kind::LogicalBridge as i32,
                namespace: String::new(),
                name: "lb-1".into(),
            }),
        })
        .await;
    assert!(got.is_ok(), "{got:?}");
    // --dev with a production CA is refused.
    let out = Command::new(BIN)
        .args([
            "serve",
            "--dev",
            "--tls-cert",
            "a",
            "--tls-key",
            "b",
            "--client-ca",
            "c",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dev creates its own development CA"));
    let _ = server.http;
}

#[tokio::test]
async fn a_crash_during_a_write_burst_loses_no_acknowledged_write() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let mut server = serve(data, &["--dev"]).await;
    let certs = issue(data, "admin/me");
    let ch = channel(server.grpc, &certs).await;
    // Eight writers as fast as they can; each records what the broker acknowledged.
    let mut writers = Vec::new();
    for w in 0..8u32 {
        let mut admin = AdminServiceClient::new(ch.clone());
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0.. {
                let name = format!("lb-{w}-{i}");
                match admin.apply(lb(&name, 1 + i % 4000)).await {
                    Ok(r) => acked.push((name, r.into_inner().object.unwrap())),
                    Err(_) => break,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // SIGKILL: no chance to flush anything.
    let _ = server.child.kill();
    let _ = server.child.wait();
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(acked.len() > 50, "the burst wrote something: {}", acked.len());

    let server = serve(data, &["--dev"]).await;
    let mut admin = AdminServiceClient::new(channel(server.grpc, &certs).await);
    let head = admin.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision;
    let mut names = std::collections::HashSet::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list(pb::ListRequest {
                kind: pb::Kind::LogicalBridge as i32,
                limit: 1000,
                continue_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for r in page.items {
            if let Some(pb::resource::Kind::LogicalBridge(l)) = r.kind {
                names.insert(l.metadata.unwrap().name);
            }
        }
        if page.continue_token.is_empty() {
            break;
        }
        token = page.continue_token;
    }
    let lost: Vec<&String> = acked.iter().map(|(n, _)| n).filter(|n| !names.contains(*n)).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    // Revisions are continuous: 2..=head replay without a hole.
    let revs = replayed(&mut admin, 1, head).await;
    assert_eq!(revs, (2..=head).collect::<Vec<_>>());
}

#[sqlx::test(migrations = false)]
async fn a_store_moves_from_sqlite_to_postgres_and_agents_resume(pool: PgPool) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let server = serve(data, &["--dev"]).await;
    let admin_certs = issue(data, "admin/me");
    let dpu_certs = issue(data, "dpu/bf3-m");
    let mut admin = AdminServiceClient::new(channel(server.grpc, &admin_certs).await);
    let mut agent = AgentServiceClient::new(channel(server.grpc, &dpu_certs).await);
    agent.register(pb::RegisterRequest { serial: "bf3-m".into(), ..Default::default() }).await.unwrap();
    for i in 0..5 {
        admin.apply(lb(&format!("lb-{i}"), 10 + i)).await.unwrap();
    }
    let resume_at = admin.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision;
    drop(server);

    let base = std::env::var("DATABASE_URL").unwrap();
    let db = pool.connect_options().get_database().unwrap().to_string();
    let url = format!("{}/{db}", base.rsplit_once('/').unwrap().0);
    let out = Command::new(BIN)
        .args(["migrate", "--from", &format!("sqlite://{}", data.join("xpu.db").display()), "--to", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("revision {resume_at}")));
    let again = Command::new(BIN)
        .args(["migrate", "--from", &format!("sqlite://{}", data.join("xpu.db").display()), "--to", &url])
        .output()
        .unwrap();
    assert!(!again.status.success(), "a non-empty target is refused");

    let server = serve(data, &["--dev", "--database-url", &url]).await;
    assert!(log(data).contains("store=\"postgres\"") || log(data).contains("store=postgres"));
    let mut admin = AdminServiceClient::new(channel(server.grpc, &admin_certs).await);
    assert_eq!(admin.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision, resume_at);
    admin.apply(lb("lb-new", 99)).await.unwrap();
    // The agent resumes from the revision it had: only what is new, no snapshot.
    let mut agent = AgentServiceClient::new(channel(server.grpc, &dpu_certs).await);
    let mut desired = agent
        .watch_desired(pb::WatchDesiredRequest { serial: "bf3-m".into(), since_revision: resume_at })
        .await
        .unwrap()
        .into_inner();
    let ev = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let ev = desired.message().await.unwrap().unwrap();
            if !matches!(ev.event, Some(E::Bookmark(_))) {
                return ev;
            }
        }
    })
    .await
    .unwrap();
    let Some(E::Change(c)) = ev.event else { panic!("expected the new change, not {ev:?}") };
    assert_eq!(c.r#type, pb::ChangeType::Spec as i32);
    assert_eq!(ev.revision, resume_at + 1);
}
