//! Command-line interface of the `xpu-broker` binary. Every flag can also come from the
//! environment.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::{
    app::{App, Config},
    ca::{self, DevCa, IssueOptions},
    ctl,
    identity::Identity,
    store::{Backend, Location},
    tls::TlsPaths,
    token::TokenKey,
};

#[derive(Debug, Parser)]
#[command(
    name = "xpu-broker",
    version,
    about = "The xpu-broker control plane: store, sync and status of DPU networking"
)]
pub struct Args {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `xpu_broker=debug`.
    #[arg(long, env = "XPU_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker.
    Serve(Box<ServeArgs>),
    /// Apply the database migrations and exit; with --from/--to, copy a whole store (e.g. from
    /// the embedded SQLite file to Postgres) into an empty one.
    Migrate {
        /// Store to migrate in place (ignored when --from/--to are given).
        #[arg(long, env = "DATABASE_URL", required_unless_present = "from")]
        database_url: Option<String>,
        /// Source store: sqlite://<path> or postgres://…
        #[arg(long, requires = "to")]
        from: Option<String>,
        /// Target store (must be empty): postgres://… or sqlite://<path>
        #[arg(long, requires = "from")]
        to: Option<String>,
    },
    /// Development certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Operator CLI (kubectl-like) over gRPC with an admin certificate.
    Ctl(ctl::CtlArgs),
    /// Print the status API's OpenAPI document (generated from the handlers).
    Openapi,
    /// Issue a bearer token for the status API and dashboard (signed with the broker's token key).
    Token {
        /// Who the token is for (shows up in the broker's log).
        #[arg(long)]
        subject: String,
        /// How long it is valid, e.g. 12h, 30d.
        #[arg(long, default_value = "30d", value_parser = parse_long_duration)]
        ttl: Duration,
        /// The broker's token key file (--token-key of serve).
        #[arg(long, env = "XPU_TOKEN_KEY", conflicts_with = "data_dir")]
        key: Option<PathBuf>,
        /// The broker's data dir, whose token.key is used.
        #[arg(long, default_value = "./xpu-data")]
        data_dir: PathBuf,
    },
}

/// Like [`parse_duration`], plus days (`30d`).
fn parse_long_duration(s: &str) -> Result<Duration, String> {
    match s.trim().strip_suffix('d') {
        Some(days) => {
            let n: u64 = days.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 12h, 30d)"))?;
            if n == 0 {
                return Err(format!("{s:?} must be positive"));
            }
            Ok(Duration::from_secs(n * 86_400))
        }
        None => parse_duration(s),
    }
}

/// Parses `250ms`, `30s`, `5m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 30s, 5m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("{s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    #[arg(long, env = "XPU_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    grpc_addr: SocketAddr,
    /// Health, readiness and metrics (plain HTTP).
    #[arg(long, env = "XPU_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// postgres://user@host:port/db (production, replicas). Without it the store is an embedded
    /// SQLite file in --data-dir (one process only).
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Where the embedded store and the development CA live.
    #[arg(long, env = "XPU_DATA_DIR", default_value = "./xpu-data")]
    data_dir: PathBuf,
    /// Development mode: without TLS files, create (once) a development CA and server
    /// certificate in the data dir.
    #[arg(long, env = "XPU_DEV")]
    dev: bool,
    /// Postgres connections for reads and snapshots; the writer and the lease renewer have
    /// three more of their own. Snapshots use at most a quarter of them, streams reading their
    /// start at most half; the rest stays free for requests.
    #[arg(long, env = "XPU_DB_MAX_CONNECTIONS", default_value_t = 16)]
    db_max_connections: u32,
    /// Longest a request waits for the database before it is refused as UNAVAILABLE (retry).
    #[arg(long, env = "XPU_DB_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    db_timeout: Duration,
    /// Decide the next group commit while the previous one commits (Postgres): about a fifth
    /// more status writes per second, at the cost of more CPU; on a small machine shared with
    /// Postgres it does not shorten the attach round trip (BENCHMARKS.md, "writer pipeline").
    #[arg(long, env = "XPU_WRITER_PIPELINE", default_value_t = false, action = clap::ArgAction::Set)]
    writer_pipeline: bool,
    /// Rows (objects, statuses, Netdev names) the writer keeps from its last commit, so that
    /// the next one need not load them again while no other replica has written; 0 keeps none.
    /// Past the limit it starts over (about 1–2 KiB of memory per row).
    #[arg(long, env = "XPU_WRITER_CACHE_SLOTS", default_value_t = 50_000)]
    writer_cache_slots: usize,
    /// Server certificate (PEM), reloaded when it changes.
    #[arg(long, env = "XPU_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "XPU_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// CA that issues client certificates (PEM).
    #[arg(long, env = "XPU_CLIENT_CA")]
    client_ca: Option<PathBuf>,
    #[arg(long, env = "XPU_LEASE_DURATION", default_value = "30s", value_parser = parse_duration)]
    lease_duration: Duration,
    #[arg(long, env = "XPU_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    #[arg(long, env = "XPU_BOOKMARK_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    bookmark_interval: Duration,
    #[arg(long, env = "XPU_ATTACH_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    attach_timeout: Duration,
    #[arg(long, env = "XPU_MAX_ATTACH_TIMEOUT", default_value = "300s", value_parser = parse_duration)]
    max_attach_timeout: Duration,
    /// Revisions the log keeps; older entries and tombstones are compacted.
    #[arg(long, env = "XPU_LOG_RETENTION", default_value_t = 1_000_000)]
    log_retention: i64,
    #[arg(long, env = "XPU_COMPACTION_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    compaction_interval: Duration,
    /// Most write requests committed in one transaction.
    #[arg(long, env = "XPU_MAX_BATCH", default_value_t = 1024)]
    max_batch: usize,
    /// Changes queued per watch stream before a slow stream is cut off.
    #[arg(long, env = "XPU_STREAM_BUFFER", default_value_t = 4096)]
    stream_buffer: usize,
    /// Largest spec or status accepted (bytes of JSON).
    #[arg(long, env = "XPU_MAX_OBJECT_BYTES", default_value_t = 64 * 1024)]
    max_object_bytes: usize,
    /// HTTP/2 keepalive pings to clients; a client that does not answer within
    /// --keepalive-timeout is dropped (a half-open connection).
    #[arg(long, env = "XPU_KEEPALIVE_INTERVAL", default_value = "20s", value_parser = parse_duration)]
    keepalive_interval: Duration,
    #[arg(long, env = "XPU_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    keepalive_timeout: Duration,
    /// Largest gRPC message accepted.
    #[arg(long, env = "XPU_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    max_message_bytes: usize,
    /// Name of this replica (defaults to a random id).
    #[arg(long, env = "XPU_REPLICA")]
    replica: Option<String>,
    /// Key that signs and verifies status API tokens (`xpu-broker token`); shared by replicas.
    /// Default: `<data-dir>/token.key`, created when missing.
    #[arg(long, env = "XPU_TOKEN_KEY")]
    token_key: Option<PathBuf>,
    /// Let anyone read the status API and dashboard without credentials (trusted networks only).
    #[arg(long, env = "XPU_ANONYMOUS_READ")]
    anonymous_read: bool,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a development CA (`DIR/ca.crt`, `DIR/ca.key`).
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate: a client identity, or with --server the broker's own.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// dpu/<serial>, host/<node>, cluster/<name>/tenant, cluster/<name>/infra, admin/<name>
        #[arg(long, required_unless_present = "server")]
        identity: Option<String>,
        #[arg(long)]
        server: bool,
        /// DNS names and IPs of the server certificate.
        #[arg(long = "san")]
        sans: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
}

impl Args {
    pub fn log_filter(&self) -> &str {
        &self.log
    }

    pub fn is_ctl(&self) -> bool {
        matches!(self.command, Command::Ctl(_))
    }

    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let Self { log: _, command } = self;
        match command {
            Command::Serve(args) => serve(*args).await.map(|()| ExitCode::SUCCESS),
            Command::Migrate { database_url, from, to } => {
                match (database_url, from, to) {
                    (_, Some(from), Some(to)) => {
                        let source = Backend::open(&Location::parse(&from)?, 2).await.context("opening --from")?;
                        let target = Backend::open(&Location::parse(&to)?, 2).await.context("opening --to")?;
                        let copied = crate::store::copy::copy(&source, &target).await.context("copying the store")?;
                        println!("{copied}");
                    }
                    (Some(url), None, None) => {
                        Backend::open(&Location::parse(&url)?, 2).await.context("migrating")?;
                        println!("migrations applied");
                    }
                    _ => anyhow::bail!("give --database-url, or --from and --to"),
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Ca(cmd) => ca_command(cmd).map(|()| ExitCode::SUCCESS),
            Command::Ctl(args) => Ok(ctl::run(args).await),
            Command::Openapi => {
                println!("{}", serde_json::to_string_pretty(&crate::rest::openapi())?);
                Ok(ExitCode::SUCCESS)
            }
            Command::Token { subject, ttl, key, data_dir } => {
                anyhow::ensure!(!subject.trim().is_empty(), "--subject must not be empty");
                let path = key.unwrap_or_else(|| data_dir.join("token.key"));
                let key = TokenKey::load(&path, false)
                    .with_context(|| "the broker creates its token key on first start; give --key or --data-dir")?;
                println!("{}", key.issue(subject.trim(), ttl, chrono::Utc::now()));
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

fn ca_command(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init { dir, force } => {
            DevCa::init(&dir, force)?;
            println!("wrote {0}/ca.crt and {0}/ca.key", dir.display());
        }
        CaCommand::Issue { dir, identity, server, sans, out, days } => {
            let ca = DevCa::load(&dir)?;
            let opts = IssueOptions::valid_for_days(days);
            let pem = if server {
                ca.issue_server(&sans, &opts)?
            } else {
                let id = identity.ok_or_else(|| anyhow::anyhow!("--identity is required"))?;
                let id = Identity::parse(&id).map_err(|e| anyhow::anyhow!("{e}"))?;
                ca.issue_client(&id, &opts)?
            };
            ca::write_issued(&out, &pem, &ca)?;
            println!("wrote {0}/tls.crt, {0}/tls.key and {0}/ca.crt", out.display());
        }
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let ServeArgs {
        grpc_addr,
        http_addr,
        database_url,
        data_dir,
        dev,
        db_max_connections,
        db_timeout,
        writer_pipeline,
        writer_cache_slots,
        tls_cert,
        tls_key,
        client_ca,
        lease_duration,
        heartbeat_interval,
        bookmark_interval,
        attach_timeout,
        max_attach_timeout,
        log_retention,
        compaction_interval,
        max_batch,
        stream_buffer,
        max_object_bytes,
        max_message_bytes,
        keepalive_interval,
        keepalive_timeout,
        replica,
        token_key,
        anonymous_read,
    } = args;
    anyhow::ensure!(heartbeat_interval < lease_duration, "--heartbeat-interval must be shorter than --lease-duration");
    anyhow::ensure!(max_batch > 0 && stream_buffer > 0, "--max-batch and --stream-buffer must be positive");
    anyhow::ensure!(log_retention >= 0, "--log-retention must not be negative");
    let database = match database_url {
        Some(url) => Location::parse(&url)?,
        None => Location::Sqlite(data_dir.join("xpu.db")),
    };
    let tls = match (tls_cert, tls_key, client_ca) {
        (Some(cert), Some(key), Some(client_ca)) => {
            anyhow::ensure!(
                !dev,
                "--dev creates its own development CA; it cannot be combined with --client-ca and a certificate"
            );
            TlsPaths { cert, key, client_ca }
        }
        (None, None, None) if dev => dev_tls(&data_dir)?,
        (None, None, None) => anyhow::bail!(
            "TLS is required: give --tls-cert, --tls-key and --client-ca (see `xpu-broker ca`), or --dev for a development CA"
        ),
        _ => anyhow::bail!("give all of --tls-cert, --tls-key and --client-ca, or none of them with --dev"),
    };
    let mut config = Config::new(database, tls);
    config.grpc_addr = grpc_addr;
    config.http_addr = http_addr;
    config.max_db_connections = db_max_connections;
    config.store.op_timeout = db_timeout;
    config.store.pipeline = writer_pipeline;
    config.store.warm_slots = writer_cache_slots;
    config.service.lease_duration = lease_duration;
    config.service.heartbeat_interval = heartbeat_interval;
    config.service.attach_timeout = attach_timeout;
    config.service.max_attach_timeout = max_attach_timeout;
    config.service.log_retention = log_retention;
    config.service.limits.max_object_bytes = max_object_bytes;
    config.bookmark_interval = bookmark_interval;
    config.compaction_interval = compaction_interval;
    config.store.max_batch = max_batch;
    config.stream_buffer = stream_buffer;
    config.max_message_bytes = max_message_bytes;
    config.keepalive_interval = keepalive_interval;
    config.keepalive_timeout = keepalive_timeout;
    if let Some(r) = replica {
        config.store.replica = r;
    }
    // An explicit key must exist (replicas share it); the default one is made on first start.
    let (key_path, create) = match token_key {
        Some(p) => (p, false),
        None => (data_dir.join("token.key"), true),
    };
    config.access.token_key = Some(TokenKey::load(&key_path, create)?);
    config.access.anonymous_read = anonymous_read;
    if anonymous_read {
        tracing::warn!("anonymous read: anyone who reaches the HTTP port can read the status API and dashboard");
    }
    let app = App::build(config).await?;
    app.run_until_stopped(shutdown_signal()).await
}

/// The development CA and the server certificate in `<data_dir>/dev-ca`, created on first use
/// and reused afterwards (certificates issued from it keep working).
fn dev_tls(data_dir: &std::path::Path) -> anyhow::Result<TlsPaths> {
    let dir = data_dir.join("dev-ca");
    let server = dir.join("server");
    let ca = if dir.join("ca.crt").exists() { DevCa::load(&dir)? } else { DevCa::init(&dir, false)? };
    if !server.join("tls.crt").exists() {
        let sans = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
        let pem = ca.issue_server(&sans, &IssueOptions::valid_for_days(825))?;
        ca::write_issued(&server, &pem, &ca)?;
    }
    let exe = std::env::args().next().unwrap_or_else(|| "xpu-broker".into());
    tracing::warn!(dir = %dir.display(), "development mode: self-made CA; not for production");
    eprintln!(
        "development CA in {0}; certificates for agents and operators:\n  {exe} ca issue --dir {0} --identity dpu/<serial> --out <dir>\n  {exe} ca issue --dir {0} --identity admin/<name> --out <dir>",
        dir.display()
    );
    Ok(TlsPaths { cert: server.join("tls.crt"), key: server.join("tls.key"), client_ca: dir.join("ca.crt") })
}

/// SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("0s").is_err());
    }
}
