//! The service layer: every RPC as a function of the caller's verified identity and the request.
//! Transports (gRPC here) are thin adapters over it.

pub mod admin;
pub mod agent;
pub mod host;
pub mod objects;
pub mod status;
pub mod watch;

use std::{sync::Arc, time::Duration};

use crate::{
    error::{Error, Result},
    hub::Hub,
    identity::{Identity, Side},
    model::{Kind, validate::Limits},
    store::Store,
};

#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub limits: Limits,
    pub heartbeat_interval: Duration,
    pub lease_duration: Duration,
    /// How long `AttachNetdev` waits when the caller does not say.
    pub attach_timeout: Duration,
    /// The longest wait a caller may ask for.
    pub max_attach_timeout: Duration,
    /// Revisions kept in the log by compaction.
    pub log_retention: i64,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            limits: Limits::default(),
            heartbeat_interval: Duration::from_secs(10),
            lease_duration: Duration::from_secs(30),
            attach_timeout: Duration::from_secs(30),
            max_attach_timeout: Duration::from_secs(300),
            log_retention: 1_000_000,
        }
    }
}

#[derive(Clone)]
pub struct Context {
    pub store: Store,
    pub hub: Arc<Hub>,
    pub config: Arc<ServiceConfig>,
    pub fleet_cache: Arc<status::FleetCache>,
}

const TENANT_WRITES: &[Kind] = &[Kind::Netdev, Kind::FlowPolicy];
const INFRA_WRITES: &[Kind] = &[Kind::LogicalBridge, Kind::Vrf, Kind::Svi, Kind::XpuNetwork];
const ADMIN_WRITES: &[Kind] =
    &[Kind::Netdev, Kind::LogicalBridge, Kind::Vrf, Kind::Svi, Kind::XpuNetwork, Kind::FlowPolicy];
const TENANT_READS: &[Kind] = &[Kind::Netdev, Kind::FlowPolicy, Kind::XpuNetwork];

/// Kinds whose spec the identity may write through SyncService/AdminService.
pub fn writable_kinds(id: &Identity) -> &'static [Kind] {
    match id {
        Identity::Cluster { side: Side::Tenant, .. } => TENANT_WRITES,
        Identity::Cluster { side: Side::Infra, .. } => INFRA_WRITES,
        Identity::Admin(_) => ADMIN_WRITES,
        Identity::Dpu(_) | Identity::Host(_) => &[],
    }
}

/// Kinds the identity may list and watch.
pub fn readable_kinds(id: &Identity) -> &'static [Kind] {
    match id {
        Identity::Cluster { side: Side::Tenant, .. } => TENANT_READS,
        Identity::Cluster { side: Side::Infra, .. } | Identity::Admin(_) => &Kind::ALL,
        Identity::Dpu(_) | Identity::Host(_) => &[],
    }
}

fn names(kinds: &[Kind]) -> String {
    kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
}

pub fn check_write(id: &Identity, kind: Kind) -> Result<()> {
    let allowed = writable_kinds(id);
    if allowed.contains(&kind) {
        return Ok(());
    }
    Err(Error::PermissionDenied(if allowed.is_empty() {
        format!("{id} may not write objects through this service")
    } else {
        format!("{id} may not write {kind} objects; it owns {}", names(allowed))
    }))
}

pub fn check_read(id: &Identity, kind: Kind) -> Result<()> {
    let allowed = readable_kinds(id);
    if allowed.contains(&kind) {
        return Ok(());
    }
    Err(Error::PermissionDenied(format!("{id} may not read {kind} objects; it may read {}", names(allowed))))
}

pub fn require_cluster(id: &Identity) -> Result<()> {
    match id {
        Identity::Cluster { .. } => Ok(()),
        other => Err(Error::PermissionDenied(format!(
            "{other} may not call SyncService; it is for cluster identities (xpu://cluster/<name>/tenant|infra)"
        ))),
    }
}

pub fn require_admin(id: &Identity) -> Result<()> {
    match id {
        Identity::Admin(_) => Ok(()),
        other => Err(Error::PermissionDenied(format!(
            "{other} may not call AdminService; it is for operators (xpu://admin/<name>)"
        ))),
    }
}
