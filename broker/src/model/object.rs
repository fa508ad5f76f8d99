//! Objects as the store keeps them: metadata, a typed spec, and statuses kept apart from the
//! spec, one per author.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;
use xpu_proto::broker::v1 as pb;

use super::{Key, Kind, Labels, NetdevId, Route, Selector};
use crate::error::{Error, Result};

/// A typed spec of one of the seven kinds.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    Dpu(pb::DpuSpec),
    Netdev(pb::NetdevSpec),
    LogicalBridge(pb::LogicalBridgeSpec),
    Vrf(pb::VrfSpec),
    Svi(pb::SviSpec),
    XpuNetwork(pb::XpuNetworkSpec),
    FlowPolicy(pb::FlowPolicySpec),
}

impl Spec {
    pub fn kind(&self) -> Kind {
        match self {
            Spec::Dpu(_) => Kind::Dpu,
            Spec::Netdev(_) => Kind::Netdev,
            Spec::LogicalBridge(_) => Kind::LogicalBridge,
            Spec::Vrf(_) => Kind::Vrf,
            Spec::Svi(_) => Kind::Svi,
            Spec::XpuNetwork(_) => Kind::XpuNetwork,
            Spec::FlowPolicy(_) => Kind::FlowPolicy,
        }
    }

    /// The proto3 JSON form, which is also the CRD `spec`.
    pub fn to_json(&self) -> Result<Value> {
        let v = match self {
            Spec::Dpu(s) => serde_json::to_value(s),
            Spec::Netdev(s) => serde_json::to_value(s),
            Spec::LogicalBridge(s) => serde_json::to_value(s),
            Spec::Vrf(s) => serde_json::to_value(s),
            Spec::Svi(s) => serde_json::to_value(s),
            Spec::XpuNetwork(s) => serde_json::to_value(s),
            Spec::FlowPolicy(s) => serde_json::to_value(s),
        };
        v.map_err(|e| Error::internal(format!("encoding spec: {e}")))
    }

    /// Decodes a spec from JSON. `field` names the JSON's place for error messages; the error
    /// is `InvalidArgument` (the caller decides whether stored data makes it internal).
    pub fn from_json(kind: Kind, json: Value, field: &str) -> Result<Spec> {
        fn de<T: serde::de::DeserializeOwned>(json: Value, field: &str) -> Result<T> {
            serde_json::from_value(json).map_err(|e| Error::invalid(field, e.to_string()))
        }
        Ok(match kind {
            Kind::Dpu => Spec::Dpu(de(json, field)?),
            Kind::Netdev => Spec::Netdev(de(json, field)?),
            Kind::LogicalBridge => Spec::LogicalBridge(de(json, field)?),
            Kind::Vrf => Spec::Vrf(de(json, field)?),
            Kind::Svi => Spec::Svi(de(json, field)?),
            Kind::XpuNetwork => Spec::XpuNetwork(de(json, field)?),
            Kind::FlowPolicy => Spec::FlowPolicy(de(json, field)?),
        })
    }

    /// Decodes a stored spec in place (no copy of the JSON).
    pub fn from_stored(kind: Kind, json: &Value) -> Result<Spec> {
        fn de<T: serde::de::DeserializeOwned>(json: &Value) -> std::result::Result<T, serde_json::Error> {
            T::deserialize(json)
        }
        let spec = match kind {
            Kind::Dpu => de(json).map(Spec::Dpu),
            Kind::Netdev => de(json).map(Spec::Netdev),
            Kind::LogicalBridge => de(json).map(Spec::LogicalBridge),
            Kind::Vrf => de(json).map(Spec::Vrf),
            Kind::Svi => de(json).map(Spec::Svi),
            Kind::XpuNetwork => de(json).map(Spec::XpuNetwork),
            Kind::FlowPolicy => de(json).map(Spec::FlowPolicy),
        };
        spec.map_err(|e| Error::internal(format!("stored {kind} spec does not decode: {e}")))
    }

    pub fn route(&self) -> Route {
        match self {
            Spec::Netdev(s) => NetdevId::parse(&s.netdev_id).map(|id| Route::Dpu(id.serial)).unwrap_or(Route::None),
            Spec::LogicalBridge(s) => Route::Selector(Selector::from_proto(s.dpu_selector.as_ref())),
            Spec::Vrf(s) => Route::Selector(Selector::from_proto(s.dpu_selector.as_ref())),
            Spec::Svi(s) => Route::Selector(Selector::from_proto(s.dpu_selector.as_ref())),
            Spec::FlowPolicy(s) => Route::Selector(Selector::from_proto(s.dpu_selector.as_ref())),
            Spec::Dpu(_) | Spec::XpuNetwork(_) => Route::None,
        }
    }
}

/// What a writer asks to store: key, labels and spec.
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectInput {
    pub key: Key,
    pub labels: Labels,
    pub spec: Spec,
}

#[derive(Clone, Debug)]
pub struct StoredStatus {
    /// `dpu/<serial>` or `broker`.
    pub author: String,
    pub observed_generation: i64,
    pub seq: i64,
    pub revision: i64,
    pub status: Value,
    pub updated_at: DateTime<Utc>,
    /// The author is a DPU whose lease has lapsed: this status may be out of date.
    pub stale: bool,
}

/// A DPU's lease as the broker tracks it (outside the revision log: heartbeats are not changes).
#[derive(Clone, Debug)]
pub struct Lease {
    pub ready: bool,
    pub last_heartbeat: DateTime<Utc>,
    pub lease_duration_ms: i64,
    pub applied_revision: i64,
}

#[derive(Clone, Debug)]
pub struct StoredObject {
    pub key: Key,
    pub uid: Uuid,
    pub generation: i64,
    pub revision: i64,
    pub labels: Labels,
    pub spec: Value,
    pub spec_author: String,
    pub created_at: DateTime<Utc>,
    pub deleted_revision: Option<i64>,
    pub statuses: Vec<StoredStatus>,
    /// Dpu objects: the live lease.
    pub lease: Option<Lease>,
    /// XpuNetwork objects: addresses allocated from the pool.
    pub allocated: Option<u64>,
}

impl StoredObject {
    pub fn typed_spec(&self) -> Result<Spec> {
        Spec::from_stored(self.key.kind, &self.spec)
    }

    pub fn status_of(&self, author: &str) -> Option<&StoredStatus> {
        self.statuses.iter().find(|s| s.author == author)
    }
}
