//! Which kinds each side of the sync carries, and how a broker object becomes a Kubernetes object
//! and back. Spec JSON is the same on both sides (proto3 JSON of the broker API = CRD spec); it
//! is passed through the CRD types so integers and omitted fields are normalised.

use kube::api::{ApiResource, DynamicObject};
use serde_json::{Value, json};
use xpu_proto::broker::v1 as pb;

use crate::crd;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    Tenant,
    Infra,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Tenant => "tenant",
            Side::Infra => "infra",
        }
    }

    /// Kinds whose spec this side authors (carried up to the broker).
    pub fn up(self) -> &'static [pb::Kind] {
        match self {
            Side::Tenant => &[pb::Kind::Netdev, pb::Kind::FlowPolicy],
            Side::Infra => &[pb::Kind::LogicalBridge, pb::Kind::Vrf, pb::Kind::Svi, pb::Kind::XpuNetwork],
        }
    }

    /// Kinds mirrored from the broker into this side's cluster.
    pub fn down(self) -> &'static [pb::Kind] {
        match self {
            Side::Tenant => &[pb::Kind::Netdev, pb::Kind::FlowPolicy, pb::Kind::XpuNetwork],
            Side::Infra => &[
                pb::Kind::Dpu,
                pb::Kind::Netdev,
                pb::Kind::LogicalBridge,
                pb::Kind::Vrf,
                pb::Kind::Svi,
                pb::Kind::XpuNetwork,
                pb::Kind::FlowPolicy,
            ],
        }
    }

    /// Every kind this side watches in its cluster.
    pub fn kinds(self) -> Vec<pb::Kind> {
        let mut k: Vec<pb::Kind> = self.down().to_vec();
        for u in self.up() {
            if !k.contains(u) {
                k.push(*u);
            }
        }
        k
    }
}

pub fn api_resource(kind: pb::Kind) -> ApiResource {
    match kind {
        pb::Kind::Dpu => ApiResource::erase::<crd::Dpu>(&()),
        pb::Kind::Netdev => ApiResource::erase::<crd::Netdev>(&()),
        pb::Kind::LogicalBridge => ApiResource::erase::<crd::LogicalBridge>(&()),
        pb::Kind::Vrf => ApiResource::erase::<crd::Vrf>(&()),
        pb::Kind::Svi => ApiResource::erase::<crd::Svi>(&()),
        pb::Kind::XpuNetwork => ApiResource::erase::<crd::XpuNetwork>(&()),
        pb::Kind::FlowPolicy | pb::Kind::Unspecified => ApiResource::erase::<crd::FlowPolicy>(&()),
    }
}

/// The Kubernetes kind name (`Netdev`, `LogicalBridge`, …).
pub fn kind_name(kind: pb::Kind) -> &'static str {
    match kind {
        pb::Kind::Dpu => "Dpu",
        pb::Kind::Netdev => "Netdev",
        pb::Kind::LogicalBridge => "LogicalBridge",
        pb::Kind::Vrf => "Vrf",
        pb::Kind::Svi => "Svi",
        pb::Kind::XpuNetwork => "XpuNetwork",
        pb::Kind::FlowPolicy => "FlowPolicy",
        pb::Kind::Unspecified => "Unspecified",
    }
}

pub fn namespaced(kind: pb::Kind) -> bool {
    matches!(kind, pb::Kind::Netdev | pb::Kind::FlowPolicy)
}

/// An object's identity on both sides.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjRef {
    pub kind: pb::Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjRef {
    pub fn to_proto(&self) -> pb::ObjectKey {
        pb::ObjectKey { kind: self.kind as i32, namespace: self.namespace.clone(), name: self.name.clone() }
    }
}

impl std::fmt::Display for ObjRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind.as_str_name(), self.name)
        } else {
            write!(f, "{}/{}/{}", self.kind.as_str_name(), self.namespace, self.name)
        }
    }
}

/// The parts of a broker object the sync needs.
#[derive(Clone, Debug, PartialEq)]
pub struct BrokerObj {
    pub key: ObjRef,
    pub uid: String,
    pub generation: i64,
    pub spec_author: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Normalised spec JSON (None on a status-only view).
    pub spec: Option<Value>,
    /// Normalised status JSON, merged per DPU for kinds realised per DPU.
    pub status: Value,
}

fn normalise<T: serde::de::DeserializeOwned + serde::Serialize>(v: Value) -> Result<Value, String> {
    let t: T = serde_json::from_value(v).map_err(|e| e.to_string())?;
    serde_json::to_value(t).map_err(|e| e.to_string())
}

/// Spec JSON through the CRD type of its kind.
pub fn normalise_spec(kind: pb::Kind, spec: Value) -> Result<Value, String> {
    match kind {
        pb::Kind::Dpu => normalise::<crd::DpuSpec>(spec),
        pb::Kind::Netdev => normalise::<crd::NetdevSpec>(spec),
        pb::Kind::LogicalBridge => normalise::<crd::LogicalBridgeSpec>(spec),
        pb::Kind::Vrf => normalise::<crd::VrfSpec>(spec),
        pb::Kind::Svi => normalise::<crd::SviSpec>(spec),
        pb::Kind::XpuNetwork => normalise::<crd::XpuNetworkSpec>(spec),
        pb::Kind::FlowPolicy => normalise::<crd::FlowPolicySpec>(spec),
        pb::Kind::Unspecified => Err("no kind".into()),
    }
}

/// Status JSON through the CRD type of its kind.
pub fn normalise_status(kind: pb::Kind, status: Value) -> Result<Value, String> {
    match kind {
        pb::Kind::Dpu => normalise::<crd::DpuStatus>(status),
        pb::Kind::Netdev => normalise::<crd::NetdevStatus>(status),
        pb::Kind::XpuNetwork => normalise::<crd::XpuNetworkStatus>(status),
        _ => normalise::<crd::FabricStatus>(status),
    }
}

fn to_json<T: serde::Serialize>(v: &Option<T>) -> Option<Value> {
    v.as_ref().and_then(|v| serde_json::to_value(v).ok())
}

/// A broker resource as the sync sees it.
pub fn from_resource(res: &pb::Resource) -> Option<BrokerObj> {
    use pb::resource::Kind as R;
    let (kind, meta, spec, status) = match res.kind.as_ref()? {
        R::Dpu(o) => (pb::Kind::Dpu, o.metadata.as_ref()?, to_json(&o.spec), to_json(&o.status)),
        R::Netdev(o) => (pb::Kind::Netdev, o.metadata.as_ref()?, to_json(&o.spec), to_json(&o.status)),
        R::LogicalBridge(o) => (pb::Kind::LogicalBridge, o.metadata.as_ref()?, to_json(&o.spec), to_json(&o.status)),
        R::Vrf(o) => (pb::Kind::Vrf, o.metadata.as_ref()?, to_json(&o.spec), to_json(&o.status)),
        R::Svi(o) => (pb::Kind::Svi, o.metadata.as_ref()?, to_json(&o.spec), to_json(&o.status)),
        R::XpuNetwork(o) => (pb::Kind::XpuNetwork, o.metadata.as_ref()?, to_json(&o.spec), to_json(&o.status)),
        R::FlowPolicy(o) => (pb::Kind::FlowPolicy, o.metadata.as_ref()?, to_json(&o.spec), to_json(&o.status)),
    };
    Some(BrokerObj {
        key: ObjRef { kind, namespace: meta.namespace.clone(), name: meta.name.clone() },
        uid: meta.uid.clone(),
        generation: meta.generation,
        spec_author: meta.spec_author.clone(),
        labels: meta.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        spec: spec.and_then(|s| normalise_spec(kind, s).ok()),
        status: status.and_then(|s| normalise_status(kind, s).ok()).unwrap_or_else(|| json!({})),
    })
}

/// Merges a status change into the known status: per-DPU kinds replace the reporting DPU's
/// entry (an entry-less change removes nothing: removals come as empty entries); others replace.
pub fn merge_status(kind: pb::Kind, current: &Value, change: &Value) -> Value {
    if !matches!(kind, pb::Kind::LogicalBridge | pb::Kind::Vrf | pb::Kind::Svi | pb::Kind::FlowPolicy) {
        return change.clone();
    }
    let mut dpus: Vec<Value> = current.get("dpus").and_then(Value::as_array).cloned().unwrap_or_default();
    for entry in change.get("dpus").and_then(Value::as_array).into_iter().flatten() {
        let dpu = entry.get("dpu").cloned().unwrap_or(Value::Null);
        dpus.retain(|d| d.get("dpu") != Some(&dpu));
        if entry.get("phase").is_some_and(|p| p.as_str().is_some_and(|s| !s.is_empty())) {
            dpus.push(entry.clone());
        }
    }
    dpus.sort_by(|a, b| a.get("dpu").map(Value::to_string).cmp(&b.get("dpu").map(Value::to_string)));
    let mut out = current.clone();
    if !out.is_object() {
        out = json!({});
    }
    out["dpus"] = Value::Array(dpus);
    out
}

/// A Kubernetes object as a broker resource to apply (metadata, labels and spec).
pub fn to_resource(kind: pb::Kind, obj: &DynamicObject, drop_labels: &[&str]) -> Result<pb::Resource, String> {
    use pb::resource::Kind as R;
    let spec = obj.data.get("spec").cloned().ok_or("the object has no spec")?;
    let labels = obj
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| !drop_labels.contains(&k.as_str()))
        .collect();
    let metadata = Some(pb::ObjectMeta {
        name: obj.metadata.name.clone().unwrap_or_default(),
        namespace: obj.metadata.namespace.clone().unwrap_or_default(),
        labels,
        ..Default::default()
    });
    fn de<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, String> {
        serde_json::from_value(v).map_err(|e| format!("spec: {e}"))
    }
    let kind = match kind {
        pb::Kind::Netdev => R::Netdev(pb::Netdev { metadata, spec: Some(de(spec)?), status: None }),
        pb::Kind::FlowPolicy => R::FlowPolicy(pb::FlowPolicy { metadata, spec: Some(de(spec)?), status: None }),
        pb::Kind::LogicalBridge => {
            R::LogicalBridge(pb::LogicalBridge { metadata, spec: Some(de(spec)?), status: None })
        }
        pb::Kind::Vrf => R::Vrf(pb::Vrf { metadata, spec: Some(de(spec)?), status: None }),
        pb::Kind::Svi => R::Svi(pb::Svi { metadata, spec: Some(de(spec)?), status: None }),
        pb::Kind::XpuNetwork => R::XpuNetwork(pb::XpuNetwork { metadata, spec: Some(de(spec)?), status: None }),
        pb::Kind::Dpu => R::Dpu(pb::Dpu { metadata, spec: Some(de(spec)?), status: None }),
        pb::Kind::Unspecified => return Err("no kind".into()),
    };
    Ok(pb::Resource { kind: Some(kind) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_are_the_crd_kinds() {
        for kind in Side::Infra.kinds() {
            assert_eq!(kind_name(kind), api_resource(kind).kind);
        }
    }

    #[test]
    fn statuses_merge_per_dpu() {
        let current = json!({"dpus": [{"dpu": "a", "phase": "Programmed"}], "conditions": []});
        let change = json!({"dpus": [{"dpu": "b", "phase": "Error", "message": "x"}]});
        let merged = merge_status(pb::Kind::LogicalBridge, &current, &change);
        assert_eq!(merged["dpus"].as_array().unwrap().len(), 2);
        let removal = json!({"dpus": [{"dpu": "a"}]});
        let merged = merge_status(pb::Kind::LogicalBridge, &merged, &removal);
        assert_eq!(merged["dpus"], json!([{"dpu": "b", "phase": "Error", "message": "x"}]));
        assert_eq!(merge_status(pb::Kind::Netdev, &current, &change), change);
    }

    #[test]
    fn integers_from_the_broker_become_numbers() {
        let st = normalise_status(
            pb::Kind::Netdev,
            json!({"phase": "Connected", "observedGeneration": "3", "updatedAt": "x"}),
        )
        .unwrap();
        assert_eq!(st, json!({"phase": "Connected", "observedGeneration": 3}));
    }
}
