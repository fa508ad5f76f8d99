//! The tenant side of xpu-broker: the per-node pieces of the pod-attach flow (DESIGN §5).
//!
//! - [`hostagent`]: `host-agent`, one per node: the broker's `HostService` client (identity
//!   `xpu://host/<node>`) and a gRPC server on a unix socket for the device plugin and the CNI;
//! - [`deviceplugin`]: `xpu-device-plugin`, the kubelet device plugin advertising VFs/SFs; its
//!   `Allocate` only reserves devices with the host agent (fast, local, no broker);
//! - [`cni`]: `xpu-cni`, the CNI 1.0 plugin: `ADD` runs the broker round trip through the host
//!   agent, then moves the VF into the pod and configures it.

pub mod cni;
pub mod deviceplugin;
pub mod hostagent;

/// Logs to stderr, colour only on a terminal.
pub fn init_tracing(filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
