//! Rows as the backends read and write them, and the requests and outcomes of writes.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;
use xpu_proto::broker::v1 as pb;

use crate::model::{
    Key, Labels, Route, Selector,
    object::{Lease, ObjectInput, StoredObject, StoredStatus},
};

#[derive(Clone, Debug)]
pub struct ObjectRow {
    pub key: Key,
    pub uid: Uuid,
    pub generation: i64,
    pub revision: i64,
    pub labels: Labels,
    pub spec: Value,
    pub spec_author: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_revision: Option<i64>,
}

impl ObjectRow {
    pub fn live(&self) -> bool {
        self.deleted_revision.is_none()
    }

    pub fn into_stored(
        self,
        statuses: Vec<StoredStatus>,
        lease: Option<Lease>,
        allocated: Option<u64>,
    ) -> StoredObject {
        StoredObject {
            key: self.key,
            uid: self.uid,
            generation: self.generation,
            revision: statuses.iter().map(|s| s.revision).fold(self.revision, i64::max),
            labels: self.labels,
            spec: self.spec,
            spec_author: self.spec_author,
            created_at: self.created_at,
            deleted_revision: self.deleted_revision,
            statuses,
            lease,
            allocated,
        }
    }
}

/// Routing columns of an object: the DPU a Netdev names, the selector of fabric kinds.
pub fn route_columns(route: &Route) -> (Option<String>, Option<Value>) {
    match route {
        Route::None => (None, None),
        Route::Dpu(d) => (Some(d.clone()), None),
        Route::Selector(s) => (None, serde_json::to_value(&s.0).ok()),
    }
}

pub fn route_from_columns(dpu: Option<String>, selector: Option<Value>) -> Route {
    match (dpu, selector) {
        (Some(d), _) => Route::Dpu(d),
        (None, Some(sel)) => Route::Selector(Selector(serde_json::from_value(sel).unwrap_or_default())),
        (None, None) => Route::None,
    }
}

#[derive(Clone, Debug)]
pub struct StatusRow {
    pub key: Key,
    pub author: String,
    pub observed_generation: i64,
    pub seq: i64,
    pub revision: i64,
    pub status: Value,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Debug)]
pub struct DpuRow {
    pub serial: String,
    pub ready: bool,
    pub last_heartbeat: DateTime<Utc>,
    pub lease_duration_ms: i64,
    pub applied_revision: i64,
    pub registered_at: DateTime<Utc>,
}

impl DpuRow {
    pub fn lease(&self) -> Lease {
        Lease {
            ready: self.ready,
            last_heartbeat: self.last_heartbeat,
            lease_duration_ms: self.lease_duration_ms,
            applied_revision: self.applied_revision,
        }
    }
}

/// Everything a batch writes, applied by the backend in one transaction.
#[derive(Debug, Default)]
pub struct Flush {
    pub objects: Vec<ObjectRow>,
    pub routes: Vec<Route>,
    /// Keys whose every status row goes (revived tombstones, deleted Dpus).
    pub purge_statuses: Vec<Key>,
    pub statuses: Vec<StatusRow>,
    pub delete_statuses: Vec<(Key, String)>,
    /// The log entries, shared with the fan-out.
    pub log: Vec<std::sync::Arc<crate::model::event::Event>>,
    /// Netdevs whose allocation changed: every row of theirs goes, then `allocations` go in.
    pub release_allocations: Vec<(String, String)>,
    pub allocations: Vec<Allocation>,
    pub pool_offsets: Vec<(String, u128)>,
    pub dpus: Vec<DpuRow>,
    pub delete_dpus: Vec<String>,
    pub head: i64,
    /// Write `head` even with no log entries (a store copy whose log was compacted).
    pub force_head: bool,
    pub compact_to: Option<i64>,
}

/// Everything a store holds, for copying it into another.
#[derive(Debug, Default)]
pub struct Dump {
    pub head: i64,
    pub compacted: i64,
    pub objects: Vec<(ObjectRow, Route)>,
    pub statuses: Vec<StatusRow>,
    pub log: Vec<crate::model::event::Event>,
    pub dpus: Vec<DpuRow>,
    pub allocations: Vec<Allocation>,
    pub pools: Vec<(String, u128)>,
}

#[derive(Clone, Debug)]
pub struct Allocation {
    pub network: String,
    pub address: String,
    pub namespace: String,
    pub name: String,
    pub revision: i64,
}

/// Results of compaction.
#[derive(Clone, Copy, Debug, Default)]
pub struct Compacted {
    pub compacted_revision: i64,
    pub log_entries_removed: u64,
    pub tombstones_removed: u64,
}

// ---- write requests and outcomes ----

#[derive(Debug)]
pub struct ApplyRequest {
    pub input: ObjectInput,
    /// Non-zero: refuse unless the stored generation equals it.
    pub expected_generation: i64,
    /// Certificate identity of the writer.
    pub author: String,
    /// A host may only write Netdevs of its own node: the node name.
    pub node: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ApplyOutcome {
    pub object: StoredObject,
    pub changed: bool,
    /// For a Netdev: its XpuNetwork's spec as the write saw it.
    pub network: Option<Box<pb::XpuNetworkSpec>>,
}

#[derive(Debug)]
pub struct DeleteRequest {
    pub key: Key,
    pub uid: Option<Uuid>,
    pub expected_generation: i64,
    pub author: String,
    pub node: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeleteOutcome {
    pub revision: i64,
    pub existed: bool,
}

#[derive(Clone, Debug)]
pub struct StatusWrite {
    pub key: Key,
    pub observed_generation: i64,
    pub seq: i64,
    /// None: the object was removed from the author's dataplane.
    pub body: Option<Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusOutcome {
    Accepted(i64),
    Stale,
    NotFound,
    Unchanged,
}

#[derive(Debug)]
pub struct RegisterRequest {
    pub serial: String,
    pub labels: Labels,
    pub spec: pb::DpuSpec,
    pub inventory: pb::DpuInventory,
}

#[derive(Clone, Debug)]
pub struct RegisterOutcome {
    pub object: StoredObject,
    pub last_status_seq: i64,
}

/// Completes object rows with their statuses (each with whether its author's lease lapsed),
/// the leases of Dpu objects and the pool usage of XpuNetworks.
pub fn assemble(
    rows: Vec<ObjectRow>,
    statuses: Vec<(StatusRow, bool)>,
    leases: &std::collections::HashMap<String, Lease>,
    allocated: &std::collections::HashMap<String, i64>,
) -> Vec<StoredObject> {
    use crate::model::Kind;
    let mut by_key: std::collections::HashMap<Key, Vec<StoredStatus>> = std::collections::HashMap::new();
    for (s, stale) in statuses {
        by_key.entry(s.key.clone()).or_default().push(StoredStatus {
            author: s.author,
            observed_generation: s.observed_generation,
            seq: s.seq,
            revision: s.revision,
            status: s.status,
            updated_at: s.updated_at,
            stale,
        });
    }
    rows.into_iter()
        .map(|row| {
            let mut st = by_key.remove(&row.key).unwrap_or_default();
            st.sort_by(|a, b| a.author.cmp(&b.author));
            let lease = (row.key.kind == Kind::Dpu).then(|| leases.get(&row.key.name).cloned()).flatten();
            let alloc = (row.key.kind == Kind::XpuNetwork)
                .then(|| allocated.get(&row.key.name).map_or(0, |n| u64::try_from(*n).unwrap_or(0)));
            row.into_stored(st, lease, alloc)
        })
        .collect()
}

/// Filters of the netdev listing; every field narrows it.
#[derive(Clone, Debug, Default)]
pub struct NetdevQuery {
    pub dpu: Option<String>,
    /// The tenant node (`spec.hostname`).
    pub node: Option<String>,
    /// The phase the DPU reported; "Pending" also matches netdevs without a report.
    pub phase: Option<String>,
    pub namespace: Option<String>,
}

/// Netdevs on one DPU: how many, and how many the DPU has not yet reported at their
/// current generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DpuNetdevCounts {
    pub total: u64,
    pub pending: u64,
}

/// How a reported error reads in a summary: `Netdev default/bf3-pf0-vf1: no such port`.
pub fn error_line(kind: &str, namespace: &str, name: &str, message: &str) -> String {
    let object = if namespace.is_empty() { name.to_string() } else { format!("{namespace}/{name}") };
    if message.is_empty() { format!("{kind} {object}: error") } else { format!("{kind} {object}: {message}") }
}
