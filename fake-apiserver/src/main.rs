//! `fake-apiserver --listen 127.0.0.1:6443 [--history N] [--kubeconfig PATH]`: serve until Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use xpu_fake_apiserver::{FakeApiServer, Options};

/// In-memory fake Kubernetes API server (plain HTTP, no auth) for tests and local demos.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Watch events kept for resuming watches (older resourceVersions get 410 Expired).
    #[arg(long, default_value_t = 10_000)]
    history: usize,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 1)]
    bookmark_interval: u64,
    /// Write a kubeconfig pointing at the server to this path.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let options = Options { history: args.history, bookmark_interval: Duration::from_secs(args.bookmark_interval) };
    let server = FakeApiServer::start_with(args.listen, options).await?;
    if let Some(path) = &args.kubeconfig {
        std::fs::write(path, server.kubeconfig_yaml())?;
        tracing::info!(path = %path.display(), "kubeconfig written");
    }
    tracing::info!(url = %server.url(), "serving; Ctrl-C to stop");
    tokio::signal::ctrl_c().await?;
    server.shutdown().await;
    Ok(())
}
