//! An in-memory OPI EVPN gateway server (`opi_api.network.evpn_gw.v1alpha1`) that behaves as OPI's
//! reference bridge (`opi-evpn-bridge`) does, for tests and demos. Binary: `opi-sim`.
//!
//! It serves all four services — `LogicalBridgeService`, `BridgePortService`, `VrfService` and
//! `SviService`, every RPC — over plaintext gRPC, as OPI servers do on a DPU (default port 50151).
//!
//! Behaviour, following the reference implementation:
//! - **Names** are `//network.opiproject.org/{bridges,ports,vrfs,svis}/<id>`; requests address
//!   objects by that full name, and the same names go into `BridgePortSpec.logical_bridges`,
//!   `SviSpec.vrf` and `SviSpec.logical_bridge`.
//! - **Create** generates a UUID id when `*_id` is empty; a given id must be a valid AIP-122
//!   user-settable id (4–63 characters of `[a-z0-9-]`, starting with a letter, not ending with a
//!   hyphen), else `INVALID_ARGUMENT` naming the field. Creating an existing id returns the stored
//!   object unchanged, whatever spec was sent.
//! - **Validation** (`INVALID_ARGUMENT` unless said otherwise): REQUIRED fields
//!   (`missing required field: <path>`); `vlan_id` 1..=4095; `vni` (when set) 1..=16777215 and not
//!   used by another bridge or VRF (`ALREADY_EXISTS`); IP prefixes whose family matches their
//!   address; MACs of exactly 6 bytes; an ACCESS port needs exactly one logical bridge, a TRUNK port
//!   at least one; referenced bridges and VRFs must exist (`NOT_FOUND`); port MACs are unique among
//!   ports (`ALREADY_EXISTS`); a logical bridge has at most one SVI (`FAILED_PRECONDITION`).
//! - **Status is asynchronous**: a created or changed object is DOWN with its components (`frr`,
//!   `linux`, `vendor`, as apply to the kind) PENDING; after `up_delay` (default 200 ms) every
//!   component is SUCCESS and the object UP. Delete marks the object TO_BE_DELETED (components
//!   PENDING) and removes it after `delete_delay`. A bridge or VRF still referenced by ports or SVIs
//!   cannot be deleted (`FAILED_PRECONDITION`; the reference returns an untyped error there).
//! - **Get/Delete/Update** of a missing name give `NOT_FOUND`; Delete with `allow_missing` returns
//!   Ok, Update with `allow_missing` creates the object (ignoring the mask). Update applies
//!   `update_mask` (`spec` or `spec.<field>`; no paths or `*` replace the whole spec), returns the
//!   object unchanged when nothing changes, and refuses objects in TO_BE_DELETED state
//!   (`FAILED_PRECONDITION`).
//! - **List** pages in name order with `page_size` (0 = 50, at most 1000) and opaque
//!   `page_token`s. Unlike the reference, listing a kind that never had an object returns an empty
//!   list rather than `NOT_FOUND`.

mod kinds;
mod service;
mod store;
mod validate;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration, time::Instant};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;
use tracing::info;
use xpu_proto::opi::evpn_gw::{
    bridge_port_service_server::BridgePortServiceServer, logical_bridge_service_server::LogicalBridgeServiceServer,
    svi_service_server::SviServiceServer, vrf_service_server::VrfServiceServer,
};

pub use store::NAME_PREFIX;

use self::{
    service::SimService,
    store::{Failure, Store},
};

/// How long components take to report by default.
pub const DEFAULT_UP_DELAY: Duration = Duration::from_millis(200);

/// The port OPI servers listen on.
pub const DEFAULT_PORT: u16 = 50151;

/// How many objects of each kind the server holds (including those being deleted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimCounts {
    pub vrfs: usize,
    pub logical_bridges: usize,
    pub bridge_ports: usize,
    pub svis: usize,
}

/// The simulated OPI EVPN gateway. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct OpiSim {
    store: Arc<Store>,
}

impl OpiSim {
    /// A server whose objects come UP `up_delay` after each change and are gone `up_delay` after
    /// their deletion.
    pub fn new(up_delay: Duration) -> OpiSim {
        OpiSim::with_delays(up_delay, up_delay)
    }

    /// As [`OpiSim::new`], with a separate delay for deletions (zero removes objects at once).
    pub fn with_delays(up_delay: Duration, delete_delay: Duration) -> OpiSim {
        OpiSim { store: Arc::new(Store::new(up_delay, delete_delay)) }
    }

    /// The four services, to serve with any tonic server.
    pub fn routes(&self) -> Routes {
        let svc = Arc::new(SimService { store: self.store.clone() });
        Routes::new(LogicalBridgeServiceServer::from_arc(svc.clone()))
            .add_service(BridgePortServiceServer::from_arc(svc.clone()))
            .add_service(VrfServiceServer::from_arc(svc.clone()))
            .add_service(SviServiceServer::from_arc(svc))
    }

    /// Serves plaintext gRPC on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .add_routes(self.routes())
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await
    }

    /// Binds `addr` (e.g. "127.0.0.1:0") and serves in a background task.
    pub async fn start(self, addr: &str) -> std::io::Result<SimHandle> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(self.serve(listener, async {
            let _ = rx.await;
        }));
        Ok(SimHandle { addr, shutdown: Some(tx), task })
    }

    pub fn counts(&self) -> SimCounts {
        let st = self.store.lock(Instant::now());
        SimCounts {
            vrfs: st.vrfs.len(),
            logical_bridges: st.bridges.len(),
            bridge_ports: st.ports.len(),
            svis: st.svis.len(),
        }
    }

    /// Names of every object held, sorted.
    pub fn names(&self) -> Vec<String> {
        let st = self.store.lock(Instant::now());
        let mut names: Vec<String> =
            st.vrfs.keys().chain(st.bridges.keys()).chain(st.ports.keys()).chain(st.svis.keys()).cloned().collect();
        names.sort();
        names
    }

    /// How many changes the server has accepted (creates, updates that changed something,
    /// deletes); idempotent no-op requests leave it unchanged.
    pub fn writes(&self) -> u64 {
        self.store.lock(Instant::now()).writes
    }

    /// How many Create, Update and Delete requests the server received, whatever their outcome
    /// (an idempotent client sends none when nothing changed).
    pub fn change_requests(&self) -> u64 {
        self.store.change_requests()
    }

    /// Makes `component` report ERROR with `details` for every object of a kind it serves that is
    /// (or becomes) pending, so those objects stay DOWN until [`OpiSim::clear_failure`].
    pub fn fail_component(&self, component: &str, details: &str) {
        self.store.set_failure(Some(Failure { component: component.to_string(), details: details.to_string() }));
    }

    pub fn clear_failure(&self) {
        self.store.set_failure(None);
    }
}

/// A simulator serving in a background task.
pub struct SimHandle {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl SimHandle {
    /// `http://<addr>`, for clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and waits for the server task to end.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await??;
        Ok(())
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if self.shutdown.is_some() {
            self.task.abort();
        }
    }
}

/// Command line of `opi-sim`.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "opi-sim",
    version,
    about = "An in-memory OPI EVPN gateway server that behaves as OPI's reference bridge"
)]
pub struct SimArgs {
    /// Address to serve plaintext gRPC on (HOST:PORT).
    #[arg(long, env = "XPU_OPI_LISTEN", default_value = "127.0.0.1:50151")]
    pub listen: String,
    /// How long components take to report SUCCESS after a change (e.g. 200ms, 1s, 0).
    #[arg(long, env = "XPU_OPI_UP_DELAY", default_value = "200ms", value_parser = parse_duration)]
    pub up_delay: Duration,
    /// How long a deleted object stays TO_BE_DELETED; defaults to --up-delay.
    #[arg(long, env = "XPU_OPI_DELETE_DELAY", value_parser = parse_duration)]
    pub delete_delay: Option<Duration>,
}

/// Runs `opi-sim` until SIGTERM or Ctrl-C.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let listener =
        TcpListener::bind(&args.listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let delete_delay = args.delete_delay.unwrap_or(args.up_delay);
    info!(addr = %listener.local_addr()?, up_delay = ?args.up_delay, ?delete_delay, "OPI EVPN gateway simulator serving");
    OpiSim::with_delays(args.up_delay, delete_delay).serve(listener, shutdown_signal()).await?;
    info!("stopped");
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C (SIGINT).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("Ctrl-C received, shutting down"),
        () = term => info!("SIGTERM received, shutting down"),
    }
}

/// Parses "200ms", "1.5s", "2m", "0" or a bare number of milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("invalid duration {s:?} (expected e.g. 200ms, 1s)"))?;
    let secs = match unit.trim() {
        "" | "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "us" | "µs" => value / 1_000_000.0,
        other => return Err(format!("invalid duration unit {other:?} in {s:?} (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5h").is_err());
    }
}
