//! Command line of `xpu-device-plugin`; every flag also reads from the environment.

use std::{path::PathBuf, time::Duration};

use clap::Parser;

use super::{PluginConfig, discover::SfSpec};

#[derive(Debug, Parser)]
#[command(name = "xpu-device-plugin", version, about = "Kubelet device plugin advertising the node's DPU VFs/SFs")]
pub struct Args {
    #[arg(long, env = "XPU_HOST_AGENT_SOCKET", default_value = "/run/xpu/host-agent.sock")]
    host_agent_socket: PathBuf,
    #[arg(long, env = "XPU_KUBELET_DIR", default_value = "/var/lib/kubelet")]
    kubelet_dir: PathBuf,
    /// PF netdevs whose VFs are advertised, in PF-index order (repeatable).
    #[arg(long = "pf", env = "XPU_PFS", value_delimiter = ',', required = true)]
    pfs: Vec<String>,
    /// Statically configured SFs: <id>:<pf index>:<sf index>:<netdev> (repeatable).
    #[arg(long = "sf", env = "XPU_SFS", value_delimiter = ',')]
    sfs: Vec<SfSpec>,
    #[arg(long, env = "XPU_SYSFS_ROOT", default_value = "/sys")]
    sysfs_root: PathBuf,
    #[arg(long, env = "XPU_RESOURCE_NAME", default_value = "xpu.opi.dev/vf")]
    resource_name: String,
    #[arg(long, env = "XPU_RESCAN_INTERVAL", default_value = "5s", value_parser = xpu_sync_common::parse_duration)]
    rescan_interval: Duration,
    #[arg(long, env = "XPU_DEVINFO_DIR", default_value = "/var/run/k8s.cni.cncf.io/devinfo/dp")]
    devinfo_dir: PathBuf,
    #[arg(long, env = "XPU_LOG", default_value = "info")]
    log: String,
}

impl Args {
    pub fn log_filter(&self) -> &str {
        &self.log
    }

    pub fn into_config(self) -> anyhow::Result<PluginConfig> {
        let Self {
            host_agent_socket,
            kubelet_dir,
            pfs,
            sfs,
            sysfs_root,
            resource_name,
            rescan_interval,
            devinfo_dir,
            log: _,
        } = self;
        let (domain, name) = resource_name.split_once('/').unwrap_or_default();
        anyhow::ensure!(
            domain.contains('.') && !name.is_empty(),
            "--resource-name {resource_name:?} must be an extended resource name like vendor.example/name"
        );
        Ok(PluginConfig {
            host_agent_socket,
            kubelet_dir,
            pfs,
            sfs,
            sysfs_root,
            resource_name,
            rescan_interval,
            devinfo_dir,
        })
    }
}
