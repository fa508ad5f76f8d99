//! Command line of `host-agent`; every flag also reads from the environment.

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use xpu_sync_common::TlsFiles;

use super::HostAgentConfig;

#[derive(Debug, Parser)]
#[command(
    name = "host-agent",
    version,
    about = "Per-node agent of xpu-broker: serves the device plugin and the CNI, talks to the broker"
)]
pub struct Args {
    /// Broker address, e.g. https://broker.example:50051
    #[arg(long, env = "XPU_BROKER")]
    broker: String,
    /// Client certificate with the identity xpu://host/<node>.
    #[arg(long, env = "XPU_TLS_CERT")]
    tls_cert: PathBuf,
    #[arg(long, env = "XPU_TLS_KEY")]
    tls_key: PathBuf,
    #[arg(long, env = "XPU_CA")]
    ca: PathBuf,
    /// This node's name.
    #[arg(long, env = "XPU_NODE")]
    node: String,
    #[arg(long, env = "XPU_HOST_AGENT_SOCKET", default_value = "/run/xpu/host-agent.sock")]
    socket: PathBuf,
    #[arg(long, env = "XPU_KUBELET_DIR", default_value = "/var/lib/kubelet")]
    kubelet_dir: PathBuf,
    #[arg(long, env = "XPU_STATE_DIR", default_value = "/var/lib/xpu/host-agent")]
    state_dir: PathBuf,
    /// Serial of the DPU that owns this node's VFs.
    #[arg(long, env = "XPU_DPU_SERIAL")]
    dpu_serial: String,
    #[arg(long, env = "XPU_RESOURCE_NAME", default_value = "xpu.opi.dev/vf")]
    resource_name: String,
    #[arg(long, env = "XPU_ATTACH_TIMEOUT", default_value = "30s", value_parser = xpu_sync_common::parse_duration)]
    attach_timeout: Duration,
    #[arg(long, env = "XPU_LOG", default_value = "info")]
    log: String,
}

impl Args {
    pub fn log_filter(&self) -> &str {
        &self.log
    }

    pub fn into_config(self) -> HostAgentConfig {
        let Self {
            broker,
            tls_cert,
            tls_key,
            ca,
            node,
            socket,
            kubelet_dir,
            state_dir,
            dpu_serial,
            resource_name,
            attach_timeout,
            log: _,
        } = self;
        HostAgentConfig {
            broker,
            tls: TlsFiles { cert: tls_cert, key: tls_key, ca },
            node,
            socket,
            kubelet_dir,
            state_dir,
            dpu_serial,
            resource_name,
            attach_timeout,
        }
    }
}
