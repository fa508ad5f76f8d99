//! The real `xpu-broker` binary end to end: `ca init`/`ca issue`, `migrate`, `serve` (health,
//! readiness, SIGTERM), and `ctl apply/get/delete/watch/status` with an admin certificate.

#![allow(clippy::unwrap_used)]

use sqlx::PgPool;
use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_xpu-broker");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run xpu-broker")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The URL of the test's own database (same server as DATABASE_URL).
fn database_url(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let db = pool.connect_options().get_database().expect("database name").to_string();
    let (prefix, _) = base.rsplit_once('/').expect("url with a database");
    format!("{prefix}/{db}")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let code = body.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body))
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ctl(dir: &Path, port: u16, args: &[&str]) -> Output {
    let admin = dir.join("admin");
    Command::new(BIN)
        .arg("ctl")
        .args(["--broker", &format!("https://127.0.0.1:{port}")])
        .args(["--tls-cert", admin.join("tls.crt").to_str().unwrap()])
        .args(["--tls-key", admin.join("tls.key").to_str().unwrap()])
        .args(["--ca", admin.join("ca.crt").to_str().unwrap()])
        .args(args)
        .output()
        .expect("run ctl")
}

fn ctl_ok(dir: &Path, port: u16, args: &[&str]) -> String {
    let out = ctl(dir, port, args);
    assert!(out.status.success(), "ctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const MANIFEST: &str = r#"
apiVersion: xpu.opi.dev/v1alpha1
kind: LogicalBridge
metadata: {name: lb-10}
spec: {vlanId: 10, vni: 1010}
---
apiVersion: xpu.opi.dev/v1alpha1
kind: XpuNetwork
metadata: {name: tenant-a}
spec:
  logicalBridges: [lb-10]
  ipam: {cidr: 10.20.0.0/24, gateway: 10.20.0.1}
---
apiVersion: xpu.opi.dev/v1alpha1
kind: Netdev
metadata: {name: bf3-1-pf0-vf3, namespace: pods, labels: {app: web}}
spec: {netdevId: bf3-1-pf0-vf3, hostname: node-1, network: tenant-a}
"#;

#[sqlx::test(migrations = false)]
async fn the_binary_serves_and_ctl_drives_it(pool: PgPool) {
    let url = database_url(&pool);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = dir.join("ca");
    let ca_s = ca.to_str().unwrap();

    ok(&["ca", "init", "--dir", ca_s]);
    assert!(!run(&["ca", "init", "--dir", ca_s]).status.success(), "init refuses to overwrite");
    ok(&[
        "ca",
        "issue",
        "--dir",
        ca_s,
        "--server",
        "--san",
        "localhost",
        "--san",
        "127.0.0.1",
        "--out",
        dir.join("server").to_str().unwrap(),
    ]);
    ok(&["ca", "issue", "--dir", ca_s, "--identity", "admin/ops", "--out", dir.join("admin").to_str().unwrap()]);
    let bad = run(&["ca", "issue", "--dir", ca_s, "--identity", "root/x", "--out", dir.join("x").to_str().unwrap()]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("identity"), "names the problem");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("admin/tls.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "private keys are not world-readable");

    ok(&["migrate", "--database-url", &url]);

    let (grpc, http) = (free_port(), free_port());
    let server = dir.join("server");
    let mut child = Command::new(BIN)
        .args(["serve", "--grpc-addr", &format!("127.0.0.1:{grpc}"), "--http-addr", &format!("127.0.0.1:{http}")])
        .env("DATABASE_URL", &url)
        .env("XPU_TLS_CERT", server.join("tls.crt"))
        .env("XPU_TLS_KEY", server.join("tls.key"))
        .env("XPU_CLIENT_CA", server.join("ca.crt"))
        .env("XPU_BOOKMARK_INTERVAL", "200ms")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let server_proc = Server(child);
    let started = Instant::now();
    loop {
        if let Some((200, _)) = http_get(http, "/readyz") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "broker did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(http_get(http, "/healthz").unwrap().0, 200);
    let (code, metrics) = http_get(http, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("xpu_attach_duration_seconds_count"));

    // apply (from stdin too), get, wide, yaml, delete.
    let manifest = dir.join("objects.yaml");
    std::fs::write(&manifest, MANIFEST).unwrap();
    let out = ctl_ok(dir, grpc, &["apply", "-f", manifest.to_str().unwrap()]);
    assert_eq!(
        out,
        "logicalbridge/lb-10 configured\nxpunetwork/tenant-a configured\nnetdev/pods/bf3-1-pf0-vf3 configured\n"
    );
    let again = ctl_ok(dir, grpc, &["apply", "-f", manifest.to_str().unwrap()]);
    assert!(again.contains("netdev/pods/bf3-1-pf0-vf3 unchanged"), "{again}");

    let table = ctl_ok(dir, grpc, &["get", "netdevs", "-o", "wide"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAMESPACE") && lines[0].contains("GENERATION") && lines[0].contains("OBSERVED"),
        "{table}"
    );
    assert!(
        lines[1].contains("bf3-1-pf0-vf3") && lines[1].contains("Pending") && lines[1].contains("10.20.0.2/24"),
        "{table}"
    );
    assert!(lines[1].contains("bf3-1") && lines[1].contains("node-1"), "{table}");
    let yaml = ctl_ok(dir, grpc, &["get", "netdev", "bf3-1-pf0-vf3", "-n", "pods", "-o", "yaml"]);
    assert!(yaml.contains("kind: Netdev") && yaml.contains("address: 10.20.0.2/24"), "{yaml}");
    let json = ctl_ok(dir, grpc, &["get", "xpunetworks", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    // 64-bit integers follow the proto3 JSON mapping (strings).
    assert_eq!(v["status"]["allocated"], "1");
    assert_eq!(v["spec"]["ipam"]["cidr"], "10.20.0.0/24");

    // A validation error prints the field and exits non-zero, writing nothing.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: xpu.opi.dev/v1alpha1\nkind: LogicalBridge\nmetadata: {name: lb-bad}\nspec: {vlanId: 5000}\n",
    )
    .unwrap();
    let out = ctl(dir, grpc, &["apply", "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("INVALID_ARGUMENT") && err.contains("invalid spec.vlanId: 5000 is outside 1..4094"), "{err}");
    let out = ctl(dir, grpc, &["get", "pods"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown kind"));
    let out = ctl(dir, grpc, &["get", "lb", "lb-bad"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT_FOUND"));

    // watch from revision 0: the snapshot holds the three objects.
    let mut watch = Command::new(BIN)
        .arg("ctl")
        .args(["--broker", &format!("https://127.0.0.1:{grpc}")])
        .args(["--tls-cert", dir.join("admin/tls.crt").to_str().unwrap()])
        .args(["--tls-key", dir.join("admin/tls.key").to_str().unwrap()])
        .args(["--ca", dir.join("admin/ca.crt").to_str().unwrap()])
        .args(["watch", "--since", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let end = line.contains("SNAPSHOT-END");
        seen.push(line);
        if end {
            break;
        }
    }
    assert!(seen[0].contains("RESYNC"), "{seen:?}");
    assert_eq!(seen.iter().filter(|l| l.contains("SNAPSHOT ")).count(), 3, "{seen:?}");
    let out = ctl_ok(dir, grpc, &["delete", "netdev", "bf3-1-pf0-vf3", "-n", "pods"]);
    assert!(out.contains("deleted"), "{out}");
    let next = lines.next().unwrap().unwrap();
    assert!(next.contains("DELETED") && next.contains("pods/bf3-1-pf0-vf3"), "{next}");
    let _ = watch.kill();
    let _ = watch.wait();
    let out = ctl_ok(dir, grpc, &["delete", "netdev", "bf3-1-pf0-vf3", "-n", "pods"]);
    assert!(out.contains("not found"), "a second delete is harmless: {out}");

    let status = ctl_ok(dir, grpc, &["status"]);
    assert!(status.contains("revision:") && status.contains("LogicalBridge=1"), "{status}");

    // SIGTERM: a graceful exit with status 0.
    let pid = server_proc.0.id();
    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    let mut server_proc = server_proc;
    let started = Instant::now();
    let status = loop {
        if let Some(s) = server_proc.0.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "broker did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
    let log: Vec<String> = BufReader::new(stderr).lines().map_while(Result::ok).collect();
    assert!(log.iter().any(|l| l.contains("shutting down")), "{log:?}");
}

#[sqlx::test(migrations = false)]
async fn migrations_run_once_when_replicas_start_together(pool: PgPool) {
    let url = database_url(&pool);
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || run(&["migrate", "--database-url", &url]))
        })
        .collect();
    for r in runs {
        let out = r.join().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations").fetch_one(&pool).await.unwrap();
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations/postgres")).unwrap().count();
    assert_eq!(applied as usize, files);
    let out = run(&[
        "serve",
        "--database-url",
        "postgres://nobody@127.0.0.1:1/x",
        "--tls-cert",
        "/nonexistent",
        "--tls-key",
        "/x",
        "--client-ca",
        "/x",
    ]);
    assert!(!out.status.success(), "a broker that cannot reach its store exits non-zero");
    assert!(String::from_utf8_lossy(&out.stderr).contains("error:"), "{}", String::from_utf8_lossy(&out.stderr));
}
