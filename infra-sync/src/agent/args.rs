//! Command line of `dpu-agent`; every flag also reads from the environment.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};

use super::{AgentConfig, TlsFiles};
use crate::dataplane::{
    Dataplane,
    linux::{LinuxConfig, LinuxDataplane},
    opi::OpiDataplane,
};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DataplaneKind {
    /// The DPU's own kernel (bridges, VXLAN, policy routing, nftables).
    Linux,
    /// An OPI EVPN gateway server (`--opi-endpoint`).
    Opi,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not key=value"))
}

#[derive(Debug, Parser)]
#[command(
    name = "dpu-agent",
    version,
    about = "Per-DPU agent of xpu-broker: pulls desired state, programs the dataplane, reports status"
)]
pub struct Args {
    /// Broker address, e.g. https://broker.example:50051
    #[arg(long, env = "XPU_BROKER")]
    broker: String,
    /// Client certificate with the identity xpu://dpu/<serial>.
    #[arg(long, env = "XPU_TLS_CERT")]
    tls_cert: PathBuf,
    #[arg(long, env = "XPU_TLS_KEY")]
    tls_key: PathBuf,
    /// CA of the broker's certificate.
    #[arg(long, env = "XPU_CA")]
    ca: PathBuf,
    /// This DPU's serial (lowercase DNS label); netdev ids start with it.
    #[arg(long, env = "XPU_SERIAL")]
    serial: String,
    #[arg(long, env = "XPU_DATAPLANE", value_enum, default_value = "linux")]
    dataplane: DataplaneKind,
    /// host:port of the OPI EVPN gateway (with --dataplane opi).
    #[arg(long, env = "XPU_OPI_ENDPOINT", default_value = "127.0.0.1:50151")]
    opi_endpoint: String,
    /// Where the desired state and the revision it reflects are kept across restarts.
    #[arg(long, env = "XPU_STATE_DIR")]
    state_dir: PathBuf,
    /// Labels of this DPU (fabric objects select DPUs by label): key=value, repeatable.
    #[arg(long = "label", env = "XPU_LABELS", value_delimiter = ',', value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Representor name of a VF (linux dataplane).
    #[arg(long, env = "XPU_VF_REPRESENTOR", default_value = "pf{pf}vf{vf}")]
    vf_representor: String,
    /// Representor name of an SF (linux dataplane).
    #[arg(long, env = "XPU_SF_REPRESENTOR", default_value = "pf{pf}sf{sf}")]
    sf_representor: String,
    #[arg(long, env = "XPU_PRODUCT", default_value = "")]
    product: String,
    #[arg(long, env = "XPU_VF_COUNT", default_value_t = 0)]
    vf_count: u32,
    #[arg(long, env = "XPU_INFRA_NODE", default_value = "")]
    infra_node_name: String,
    #[arg(long, env = "XPU_TENANT_NODE", default_value = "")]
    tenant_node_name: String,
    /// How often flow counters are read.
    #[arg(long, env = "XPU_FLOW_INTERVAL", default_value = "2s", value_parser = xpu_sync_common::parse_duration)]
    flow_interval: Duration,
    #[arg(long, env = "XPU_MAX_BACKOFF", default_value = "30s", value_parser = xpu_sync_common::parse_duration)]
    max_backoff: Duration,
    #[arg(long, env = "XPU_LOG", default_value = "info")]
    log: String,
}

impl Args {
    pub fn log_filter(&self) -> &str {
        &self.log
    }

    /// Builds the dataplane and runs the agent until `shutdown`.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let Self {
            broker,
            tls_cert,
            tls_key,
            ca,
            serial,
            dataplane,
            opi_endpoint,
            state_dir,
            labels,
            vf_representor,
            sf_representor,
            product,
            vf_count,
            infra_node_name,
            tenant_node_name,
            flow_interval,
            max_backoff,
            log: _,
        } = self;
        let dp: Arc<dyn Dataplane> = match dataplane {
            DataplaneKind::Linux => Arc::new(LinuxDataplane::new(LinuxConfig { vf_representor, sf_representor }).await),
            DataplaneKind::Opi => Arc::new(
                OpiDataplane::connect(&opi_endpoint, &state_dir)
                    .await
                    .with_context(|| format!("OPI endpoint {opi_endpoint}"))?,
            ),
        };
        let config = AgentConfig {
            broker,
            tls: TlsFiles { cert: tls_cert, key: tls_key, ca },
            serial,
            state_dir,
            labels: labels.into_iter().collect(),
            product,
            vf_count,
            infra_node_name,
            tenant_node_name,
            flow_interval,
            max_backoff,
        };
        super::run(config, dp, shutdown).await
    }
}
