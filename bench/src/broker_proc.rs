//! The broker under test as a separate process: a fresh database, `xpu-broker serve` on loopback
//! ports with the run's certificates, readiness, `/metrics`, memory, and a clean stop.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use sqlx::{Connection, PgConnection};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    process::{Child, Command},
};

use crate::{cpu, pki::Pki};

/// Replaces the database of a `postgres://` URL.
pub fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let start = base.find("://").context("the database URL must look like postgres://user@host:port/db")? + 3;
    let rest = &base[start..];
    let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
    let mut out = format!("{}{authority}/{db}", &base[..start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

/// Drops (if left over) and creates `db` on the server of `admin_url`; returns its URL.
pub async fn create_database(admin_url: &str, db: &str) -> anyhow::Result<String> {
    let mut conn = PgConnection::connect(admin_url).await.with_context(|| format!("connecting to {admin_url}"))?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).execute(&mut conn).await?;
    sqlx::query(&format!("CREATE DATABASE {db}")).execute(&mut conn).await?;
    conn.close().await?;
    with_database(admin_url, db)
}

pub async fn drop_database(admin_url: &str, db: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(admin_url).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).execute(&mut conn).await?;
    conn.close().await?;
    Ok(())
}

pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A plain HTTP/1.1 GET on loopback: status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((code, body.to_string()))
}

/// The broker's Prometheus text, as `name{labels}` → value.
#[derive(Clone, Debug, Default)]
pub struct Metrics(pub HashMap<String, f64>);

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut m = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some((k, v)) = line.rsplit_once(' ')
                && let Ok(v) = v.parse::<f64>()
            {
                m.insert(k.to_string(), v);
            }
        }
        Metrics(m)
    }

    pub fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(0.0)
    }

    /// A metric summed over its labels (`name` and `name{...}`).
    pub fn sum(&self, name: &str) -> f64 {
        let labelled = format!("{name}{{");
        self.0.iter().filter(|(k, _)| *k == name || k.starts_with(&labelled)).map(|(_, v)| v).sum()
    }
}

/// Refreshes the planner statistics of the database.
pub async fn analyze(db_url: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(db_url).await?;
    sqlx::query("ANALYZE").execute(&mut conn).await?;
    let _ = conn.close().await;
    Ok(())
}

/// Cumulative counters of the database (pg_stat_database): transactions, rows scanned, rows
/// fetched by index, rows written.
pub async fn pg_counters(db_url: &str) -> Option<[f64; 4]> {
    let mut conn = PgConnection::connect(db_url).await.ok()?;
    let row: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT xact_commit, tup_returned, tup_fetched, tup_inserted + tup_updated + tup_deleted \
         FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&mut conn)
    .await
    .ok()?;
    let _ = conn.close().await;
    Some([row.0 as f64, row.1 as f64, row.2 as f64, row.3 as f64])
}

/// Tables of the database with the most rows read by sequential scans (a missing index shows
/// here), as `table: seq scans / rows read by them / index scans`.
pub async fn seq_scans(db_url: &str) -> Vec<String> {
    let Ok(mut conn) = PgConnection::connect(db_url).await else { return vec![] };
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT relname::text, seq_scan, seq_tup_read, COALESCE(idx_scan, 0) FROM pg_stat_user_tables \
         WHERE seq_tup_read > 0 ORDER BY seq_tup_read DESC LIMIT 5",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap_or_default();
    let mut out: Vec<String> =
        rows.into_iter().map(|(t, s, r, i)| format!("{t}: {s} seq scans reading {r} rows, {i} index scans")).collect();
    let idx: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT indexrelname::text, idx_scan, idx_tup_read FROM pg_stat_user_indexes \
         WHERE idx_tup_read > 0 ORDER BY idx_tup_read DESC LIMIT 3",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap_or_default();
    out.extend(idx.into_iter().map(|(i, s, r)| format!("index {i}: {s} scans reading {r} entries")));
    let _ = conn.close().await;
    out
}

pub struct BrokerProc {
    child: Option<Child>,
    pub pid: u32,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub db: String,
    pub db_url: String,
    admin_url: String,
    pub log: PathBuf,
    _analyzer: Analyzer,
}

/// Refreshes the planner statistics of the broker's database every few seconds while the broker
/// runs, as autovacuum does on a production server (the local server may run without it; a table
/// that grew from empty would otherwise be planned as if it were still empty).
struct Analyzer(tokio::task::JoinHandle<()>);

impl Analyzer {
    const EVERY: Duration = Duration::from_secs(15);

    fn start(db_url: String) -> Analyzer {
        Analyzer(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Self::EVERY).await;
                if let Err(e) = analyze(&db_url).await {
                    eprintln!("  periodic ANALYZE failed: {e}");
                }
            }
        }))
    }
}

impl Drop for Analyzer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl BrokerProc {
    pub async fn start(
        bin: &Path,
        pki: &Pki,
        admin_url: &str,
        db: &str,
        log_filter: &str,
        extra: &[&str],
    ) -> anyhow::Result<BrokerProc> {
        let db_url = create_database(admin_url, db).await?;
        let grpc: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let http: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let log = pki.dir.join(format!("broker-{db}-{}.log", grpc.port()));
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .args(["--grpc-addr", &grpc.to_string(), "--http-addr", &http.to_string()])
            .args(["--database-url", &db_url])
            .arg("--tls-cert")
            .arg(&pki.server.cert)
            .arg("--tls-key")
            .arg(&pki.server.key)
            .arg("--client-ca")
            .arg(&pki.server.client_ca)
            .args(extra)
            .env("XPU_LOG", log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file.try_clone()?))
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().context("the broker exited at once")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait()? {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                anyhow::bail!("the broker exited with {status} while starting; its log:\n{tail}");
            }
            if let Ok((200, _)) = http_get(http, "/readyz").await {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("the broker did not become ready within 60s (log: {})", log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(BrokerProc {
            child: Some(child),
            pid,
            grpc,
            http,
            db: db.to_string(),
            _analyzer: Analyzer::start(db_url.clone()),
            db_url,
            admin_url: admin_url.into(),
            log,
        })
    }

    pub async fn metrics(&self) -> Metrics {
        match http_get(self.http, "/metrics").await {
            Ok((200, body)) => Metrics::parse(&body),
            _ => Metrics::default(),
        }
    }

    pub fn memory(&self) -> Option<cpu::Memory> {
        cpu::memory(self.pid)
    }

    /// SIGTERM, then SIGKILL after 10 s; drops the database. With `keep`, leaves both running.
    pub async fn stop(mut self, keep: bool) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        if keep {
            eprintln!(
                "  --keep: broker pid {} left running: gRPC (mTLS) {}, HTTP http://{}, database {}, log {}",
                self.pid,
                self.grpc,
                self.http,
                self.db,
                self.log.display()
            );
            // Not killed on drop: forgetting the handle leaves the process running.
            std::mem::forget(child);
            return Ok(());
        }
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
            eprintln!("  the broker did not stop within 10s of SIGTERM; killing it");
            let _ = child.kill().await;
        }
        drop_database(&self.admin_url, &self.db).await
    }
}
