//! Command line shared by `tenant-sync` and `infra-sync`; every flag also reads from the
//! environment.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;

use super::{Side, SyncConfig};
use crate::TlsFiles;

#[derive(Debug, Parser)]
pub struct Args {
    /// Broker address, e.g. https://broker.example:50051
    #[arg(long, env = "XPU_BROKER")]
    broker: String,
    /// Client certificate with the identity xpu://cluster/<name>/<side>.
    #[arg(long, env = "XPU_TLS_CERT")]
    tls_cert: PathBuf,
    #[arg(long, env = "XPU_TLS_KEY")]
    tls_key: PathBuf,
    #[arg(long, env = "XPU_CA")]
    ca: PathBuf,
    /// This cluster's name (as in its certificate identity).
    #[arg(long, env = "XPU_CLUSTER")]
    cluster: String,
    /// Kubeconfig to use instead of the in-cluster configuration or KUBECONFIG.
    #[arg(long, env = "XPU_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the Lease and the state ConfigMap.
    #[arg(long, env = "POD_NAMESPACE", default_value = "xpu-system")]
    namespace: String,
    #[arg(long, env = "XPU_LEASE_NAME")]
    lease_name: Option<String>,
    /// This replica's name in the Lease (defaults to the pod name or a random id).
    #[arg(long, env = "POD_NAME")]
    holder: Option<String>,
    #[arg(long, env = "XPU_LEASE_DURATION", default_value = "15s", value_parser = crate::parse_duration)]
    lease_duration: Duration,
    #[arg(long, env = "XPU_HTTP_ADDR", default_value = "0.0.0.0:8081")]
    http_addr: SocketAddr,
    /// Tenant side: how often Netdevs whose pod is gone are collected.
    #[arg(long, env = "XPU_GC_INTERVAL", default_value = "60s", value_parser = crate::parse_duration)]
    gc_interval: Duration,
    #[arg(long, env = "XPU_GC_GRACE", default_value = "120s", value_parser = crate::parse_duration)]
    gc_grace: Duration,
    #[arg(long, env = "XPU_LOG", default_value = "info")]
    log: String,
}

impl Args {
    pub fn log_filter(&self) -> &str {
        &self.log
    }

    pub fn into_config(self, side: Side) -> SyncConfig {
        let Self {
            broker,
            tls_cert,
            tls_key,
            ca,
            cluster,
            kubeconfig,
            namespace,
            lease_name,
            holder,
            lease_duration,
            http_addr,
            gc_interval,
            gc_grace,
            log: _,
        } = self;
        let holder = holder.unwrap_or_else(|| format!("{}-{:08x}", side.as_str(), rand::random::<u32>()));
        SyncConfig {
            broker,
            tls: TlsFiles { cert: tls_cert, key: tls_key, ca },
            lease_name: lease_name.unwrap_or_else(|| format!("xpu-{}-sync-{cluster}", side.as_str())),
            cluster,
            side,
            namespace,
            holder,
            lease_duration,
            http_addr,
            kubeconfig,
            gc_interval,
            gc_grace,
        }
    }
}
