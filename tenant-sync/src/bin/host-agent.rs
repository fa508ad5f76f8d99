use clap::Parser;
use xpu_tenant_sync::hostagent::{self, args::Args};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    xpu_tenant_sync::init_tracing(args.log_filter());
    match hostagent::run(args.into_config(), xpu_sync_common::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
