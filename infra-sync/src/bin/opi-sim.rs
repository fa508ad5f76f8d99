//! `opi-sim`: an in-memory OPI EVPN gateway server; see [`xpu_infra_sync::opisim`].

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    xpu_infra_sync::opisim::run(xpu_infra_sync::opisim::SimArgs::parse()).await
}
