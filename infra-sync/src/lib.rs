//! The infrastructure side of xpu-broker.
//!
//! - [`agent`]: the per-DPU agent (`dpu-agent`): registers with the broker, pulls the desired
//!   state of its DPU, programs it through a [`dataplane`] backend and reports what it observed;
//! - [`dataplane`]: the backends: `linux` (the DPU's own kernel) and `opi` (an OPI EVPN gateway);
//! - [`opisim`]: an OPI EVPN gateway server that behaves as OPI's reference bridge does, for tests
//!   and demos (`opi-sim`).

pub mod agent;
pub mod dataplane;
pub mod opisim;

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
