use clap::Parser;
use xpu_tenant_sync::deviceplugin::{self, args::Args};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    xpu_tenant_sync::init_tracing(args.log_filter());
    let result = match args.into_config() {
        Ok(config) => deviceplugin::run(config, xpu_sync_common::shutdown_signal()).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
