//! Conversions between the wire messages and the stored forms.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use xpu_proto::broker::v1 as pb;

use super::{
    Key, Kind, Labels,
    event::{ChangeKind, Event},
    ipam::Pool,
    object::{ObjectInput, Spec, StoredObject, StoredStatus},
    serial_of_author,
    validate::{self, Limits},
};
use crate::error::{Error, Result};

pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Splits a `Resource` into metadata and spec and validates both syntactically.
pub fn input_from_resource(res: &pb::Resource, limits: &Limits) -> Result<ObjectInput> {
    use pb::resource::Kind as R;
    let (meta, spec) = match res.kind.as_ref() {
        None => {
            return Err(Error::invalid("object", "is required (one of the resource kinds)"));
        }
        Some(R::Dpu(o)) => (o.metadata.as_ref(), o.spec.clone().map(Spec::Dpu)),
        Some(R::Netdev(o)) => (o.metadata.as_ref(), o.spec.clone().map(Spec::Netdev)),
        Some(R::LogicalBridge(o)) => (o.metadata.as_ref(), o.spec.clone().map(Spec::LogicalBridge)),
        Some(R::Vrf(o)) => (o.metadata.as_ref(), o.spec.clone().map(Spec::Vrf)),
        Some(R::Svi(o)) => (o.metadata.as_ref(), o.spec.clone().map(Spec::Svi)),
        Some(R::XpuNetwork(o)) => (o.metadata.as_ref(), o.spec.clone().map(Spec::XpuNetwork)),
        Some(R::FlowPolicy(o)) => (o.metadata.as_ref(), o.spec.clone().map(Spec::FlowPolicy)),
    };
    let meta = meta.ok_or_else(|| Error::invalid("metadata", "is required"))?;
    let spec = spec.ok_or_else(|| Error::invalid("spec", "is required"))?;
    let labels: Labels = meta.labels.clone().into_iter().collect();
    input(Key::new(spec.kind(), meta.namespace.clone(), meta.name.clone()), labels, spec, limits)
}

/// Validates an object about to be written.
pub fn input(key: Key, labels: Labels, spec: Spec, limits: &Limits) -> Result<ObjectInput> {
    validate::key(&key, "metadata")?;
    validate::labels(&labels, "metadata.labels", limits)?;
    match &spec {
        Spec::Dpu(s) => validate::dns_label(&s.serial, "spec.serial")?,
        Spec::Netdev(s) => {
            validate::netdev_spec(&key.name, s, limits)?;
        }
        Spec::LogicalBridge(s) => validate::logical_bridge_spec(s, limits)?,
        Spec::Vrf(s) => validate::vrf_spec(s, limits)?,
        Spec::Svi(s) => validate::svi_spec(s, limits)?,
        Spec::XpuNetwork(s) => validate::xpu_network_spec(s, limits)?,
        Spec::FlowPolicy(s) => validate::flow_policy_spec(s, limits)?,
    }
    let json = spec.to_json()?;
    validate::json_text(&json, "spec")?;
    let json_len = serde_json::to_vec(&json).map(|v| v.len()).unwrap_or(usize::MAX);
    validate::size(json_len, "spec", limits)?;
    Ok(ObjectInput { key, labels, spec })
}

fn meta_of(obj: &StoredObject) -> pb::ObjectMeta {
    pb::ObjectMeta {
        name: obj.key.name.clone(),
        namespace: obj.key.namespace.clone(),
        uid: obj.uid.to_string(),
        generation: obj.generation,
        revision: obj.revision,
        labels: obj.labels.clone().into_iter().collect(),
        creation_timestamp: timestamp(obj.created_at),
        deletion_revision: obj.deleted_revision.unwrap_or(0),
        spec_author: obj.spec_author.clone(),
    }
}

fn decode_status<T: serde::de::DeserializeOwned>(json: &Value, kind: Kind) -> Result<T> {
    serde_json::from_value(json.clone())
        .map_err(|e| Error::internal(format!("stored {kind} status does not decode: {e}")))
}

fn netdev_status(s: &StoredStatus) -> Result<pb::NetdevStatus> {
    let mut st: pb::NetdevStatus = decode_status(&s.status, Kind::Netdev)?;
    st.observed_generation = s.observed_generation;
    st.dpu = serial_of_author(&s.author).unwrap_or_default().to_string();
    st.stale = s.stale;
    st.updated_at = timestamp(s.updated_at);
    Ok(st)
}

fn object_status(s: &StoredStatus, kind: Kind) -> Result<pb::DpuObjectStatus> {
    let mut st: pb::DpuObjectStatus = decode_status(&s.status, kind)?;
    st.observed_generation = s.observed_generation;
    st.dpu = serial_of_author(&s.author).unwrap_or_default().to_string();
    st.stale = s.stale;
    st.updated_at = timestamp(s.updated_at);
    Ok(st)
}

fn ready_condition(generation: i64, dpus: &[pb::DpuObjectStatus]) -> pb::Condition {
    let (status, reason, message) = if dpus.is_empty() {
        ("Unknown", "NoDpuReported", "no DPU has reported this object yet".to_string())
    } else if let Some(e) = dpus.iter().find(|d| d.phase == "Error") {
        ("False", "Error", format!("dpu {}: {}", e.dpu, e.message))
    } else if let Some(s) = dpus.iter().find(|d| d.stale) {
        ("Unknown", "Stale", format!("the lease of dpu {} lapsed", s.dpu))
    } else if let Some(p) = dpus.iter().find(|d| d.phase != "Programmed" || d.observed_generation < generation) {
        ("False", "Pending", format!("dpu {} has not programmed generation {generation}", p.dpu))
    } else {
        ("True", "Programmed", format!("programmed on {} DPUs", dpus.len()))
    };
    pb::Condition {
        r#type: "Ready".into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: String::new(),
    }
}

fn fabric_status(obj: &StoredObject) -> Result<pb::FabricStatus> {
    let dpus = obj.statuses.iter().map(|s| object_status(s, obj.key.kind)).collect::<Result<Vec<_>>>()?;
    let conditions = vec![ready_condition(obj.generation, &dpus)];
    Ok(pb::FabricStatus { dpus, conditions })
}

fn dpu_status(obj: &StoredObject) -> Result<pb::DpuStatus> {
    let mut st: pb::DpuStatus = match obj.statuses.first() {
        Some(s) => decode_status(&s.status, Kind::Dpu)?,
        None => pb::DpuStatus::default(),
    };
    if let Some(lease) = &obj.lease {
        st.lease_state = if lease.ready { "Ready" } else { "Unknown" }.into();
        st.last_heartbeat = timestamp(lease.last_heartbeat);
        st.lease_duration_seconds = u32::try_from(lease.lease_duration_ms / 1000).unwrap_or(u32::MAX);
        st.applied_revision = lease.applied_revision;
        st.conditions = vec![pb::Condition {
            r#type: "Ready".into(),
            status: if lease.ready { "True" } else { "Unknown" }.into(),
            reason: if lease.ready { "LeaseCurrent" } else { "LeaseLapsed" }.into(),
            message: format!("last heartbeat {}", timestamp(lease.last_heartbeat)),
            observed_generation: obj.generation,
            last_transition_time: String::new(),
        }];
    }
    Ok(st)
}

/// The whole object: spec and every status.
pub fn resource_from_stored(obj: &StoredObject) -> Result<pb::Resource> {
    use pb::resource::Kind as R;
    let metadata = Some(meta_of(obj));
    let kind = match obj.typed_spec()? {
        Spec::Dpu(spec) => R::Dpu(pb::Dpu { metadata, spec: Some(spec), status: Some(dpu_status(obj)?) }),
        Spec::Netdev(spec) => {
            let status = match obj.statuses.first() {
                Some(s) => netdev_status(s)?,
                None => pb::NetdevStatus {
                    phase: "Pending".into(),
                    dpu: super::NetdevId::parse(&spec.netdev_id).map(|i| i.serial).unwrap_or_default(),
                    ..Default::default()
                },
            };
            R::Netdev(pb::Netdev { metadata, spec: Some(spec), status: Some(status) })
        }
        Spec::LogicalBridge(spec) => {
            R::LogicalBridge(pb::LogicalBridge { metadata, spec: Some(spec), status: Some(fabric_status(obj)?) })
        }
        Spec::Vrf(spec) => R::Vrf(pb::Vrf { metadata, spec: Some(spec), status: Some(fabric_status(obj)?) }),
        Spec::Svi(spec) => R::Svi(pb::Svi { metadata, spec: Some(spec), status: Some(fabric_status(obj)?) }),
        Spec::FlowPolicy(spec) => {
            R::FlowPolicy(pb::FlowPolicy { metadata, spec: Some(spec), status: Some(fabric_status(obj)?) })
        }
        Spec::XpuNetwork(spec) => {
            let capacity = spec
                .ipam
                .as_ref()
                .and_then(|p| Pool::from_spec(p).ok())
                .map(|p| u64::try_from(p.capacity()).unwrap_or(u64::MAX))
                .unwrap_or(0);
            let status = pb::XpuNetworkStatus { allocated: obj.allocated.unwrap_or(0), capacity };
            R::XpuNetwork(pb::XpuNetwork { metadata, spec: Some(spec), status: Some(status) })
        }
    };
    Ok(pb::Resource { kind: Some(kind) })
}

/// The object as one change carries it: metadata plus the spec or status that changed.
pub fn resource_from_event(ev: &Event) -> Result<pb::Resource> {
    use pb::resource::Kind as R;
    let metadata = Some(pb::ObjectMeta {
        name: ev.key.name.clone(),
        namespace: ev.key.namespace.clone(),
        uid: ev.uid.to_string(),
        generation: ev.generation,
        revision: ev.revision,
        labels: ev.labels.clone().into_iter().collect(),
        creation_timestamp: String::new(),
        deletion_revision: if ev.change == ChangeKind::Deleted { ev.revision } else { 0 },
        spec_author: if ev.change == ChangeKind::Status { String::new() } else { ev.author.clone() },
    });
    let spec = match (ev.change, &ev.body) {
        (ChangeKind::Spec, Some(body)) => Some(Spec::from_stored(ev.key.kind, body)?),
        _ => None,
    };
    let status = match (ev.change, &ev.body) {
        (ChangeKind::Status, body) => Some(StoredStatus {
            author: ev.author.clone(),
            observed_generation: ev.observed_generation,
            seq: 0,
            revision: ev.revision,
            // A removal acknowledgement carries no body: it reads as an empty status.
            status: body.clone().unwrap_or(Value::Object(Default::default())),
            updated_at: ev.at,
            stale: false,
        }),
        _ => None,
    };
    let kind = match ev.key.kind {
        Kind::Dpu => {
            let spec = spec.and_then(|s| if let Spec::Dpu(s) = s { Some(s) } else { None });
            let status = status.map(|s| decode_status::<pb::DpuStatus>(&s.status, Kind::Dpu)).transpose()?;
            R::Dpu(pb::Dpu { metadata, spec, status })
        }
        Kind::Netdev => {
            let spec = spec.and_then(|s| if let Spec::Netdev(s) = s { Some(s) } else { None });
            let status = status.as_ref().map(netdev_status).transpose()?;
            R::Netdev(pb::Netdev { metadata, spec, status })
        }
        Kind::XpuNetwork => {
            let spec = spec.and_then(|s| if let Spec::XpuNetwork(s) = s { Some(s) } else { None });
            R::XpuNetwork(pb::XpuNetwork { metadata, spec, status: None })
        }
        kind => {
            let status = status
                .as_ref()
                .map(|s| -> Result<pb::FabricStatus> {
                    Ok(pb::FabricStatus { dpus: vec![object_status(s, kind)?], conditions: vec![] })
                })
                .transpose()?;
            match spec {
                Some(Spec::LogicalBridge(s)) => R::LogicalBridge(pb::LogicalBridge { metadata, spec: Some(s), status }),
                Some(Spec::Vrf(s)) => R::Vrf(pb::Vrf { metadata, spec: Some(s), status }),
                Some(Spec::Svi(s)) => R::Svi(pb::Svi { metadata, spec: Some(s), status }),
                Some(Spec::FlowPolicy(s)) => R::FlowPolicy(pb::FlowPolicy { metadata, spec: Some(s), status }),
                _ => match kind {
                    Kind::LogicalBridge => R::LogicalBridge(pb::LogicalBridge { metadata, spec: None, status }),
                    Kind::Vrf => R::Vrf(pb::Vrf { metadata, spec: None, status }),
                    Kind::Svi => R::Svi(pb::Svi { metadata, spec: None, status }),
                    _ => R::FlowPolicy(pb::FlowPolicy { metadata, spec: None, status }),
                },
            }
        }
    };
    Ok(pb::Resource { kind: Some(kind) })
}

/// Metadata of any resource.
pub fn resource_meta(res: &pb::Resource) -> Option<&pb::ObjectMeta> {
    use pb::resource::Kind as R;
    match res.kind.as_ref()? {
        R::Dpu(o) => o.metadata.as_ref(),
        R::Netdev(o) => o.metadata.as_ref(),
        R::LogicalBridge(o) => o.metadata.as_ref(),
        R::Vrf(o) => o.metadata.as_ref(),
        R::Svi(o) => o.metadata.as_ref(),
        R::XpuNetwork(o) => o.metadata.as_ref(),
        R::FlowPolicy(o) => o.metadata.as_ref(),
    }
}

pub fn resource_kind(res: &pb::Resource) -> Option<Kind> {
    use pb::resource::Kind as R;
    Some(match res.kind.as_ref()? {
        R::Dpu(_) => Kind::Dpu,
        R::Netdev(_) => Kind::Netdev,
        R::LogicalBridge(_) => Kind::LogicalBridge,
        R::Vrf(_) => Kind::Vrf,
        R::Svi(_) => Kind::Svi,
        R::XpuNetwork(_) => Kind::XpuNetwork,
        R::FlowPolicy(_) => Kind::FlowPolicy,
    })
}

/// The key a resource names.
pub fn resource_key(res: &pb::Resource) -> Option<Key> {
    let meta = resource_meta(res)?;
    Some(Key::new(resource_kind(res)?, meta.namespace.clone(), meta.name.clone()))
}
