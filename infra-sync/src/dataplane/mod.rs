//! What the dpu-agent programs, independent of how: the [`Dataplane`] trait and its two real
//! backends, [`linux`] (the DPU's own kernel) and [`opi`] (an OPI EVPN gateway server).

pub mod linux;
pub mod opi;

use std::{collections::BTreeMap, fmt};

use xpu_proto::broker::v1 as pb;

/// Kinds the agent realises, in the order they are created (deleted in reverse).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum ObjKind {
    Vrf,
    LogicalBridge,
    Svi,
    Netdev,
    FlowPolicy,
}

impl ObjKind {
    pub const ALL: [ObjKind; 5] =
        [ObjKind::Vrf, ObjKind::LogicalBridge, ObjKind::Svi, ObjKind::Netdev, ObjKind::FlowPolicy];

    pub fn as_str(self) -> &'static str {
        match self {
            ObjKind::Vrf => "Vrf",
            ObjKind::LogicalBridge => "LogicalBridge",
            ObjKind::Svi => "Svi",
            ObjKind::Netdev => "Netdev",
            ObjKind::FlowPolicy => "FlowPolicy",
        }
    }

    pub fn parse(s: &str) -> Option<ObjKind> {
        ObjKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn to_proto(self) -> pb::Kind {
        match self {
            ObjKind::Vrf => pb::Kind::Vrf,
            ObjKind::LogicalBridge => pb::Kind::LogicalBridge,
            ObjKind::Svi => pb::Kind::Svi,
            ObjKind::Netdev => pb::Kind::Netdev,
            ObjKind::FlowPolicy => pb::Kind::FlowPolicy,
        }
    }

    pub fn from_proto(kind: i32) -> Option<ObjKind> {
        match pb::Kind::try_from(kind).ok()? {
            pb::Kind::Vrf => Some(ObjKind::Vrf),
            pb::Kind::LogicalBridge => Some(ObjKind::LogicalBridge),
            pb::Kind::Svi => Some(ObjKind::Svi),
            pb::Kind::Netdev => Some(ObjKind::Netdev),
            pb::Kind::FlowPolicy => Some(ObjKind::FlowPolicy),
            _ => None,
        }
    }
}

/// An object's identity on a DPU (namespace empty for cluster-scoped kinds).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct ObjKey {
    pub kind: ObjKind,
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(kind: ObjKind, namespace: impl Into<String>, name: impl Into<String>) -> ObjKey {
        ObjKey { kind, namespace: namespace.into(), name: name.into() }
    }

    pub fn to_proto(&self) -> pb::ObjectKey {
        pb::ObjectKey { kind: self.kind.to_proto() as i32, namespace: self.namespace.clone(), name: self.name.clone() }
    }
}

impl fmt::Display for ObjKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind.as_str(), self.name)
        } else {
            write!(f, "{}/{}/{}", self.kind.as_str(), self.namespace, self.name)
        }
    }
}

/// A netdev a flow policy applies to, as the dataplane needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowTarget {
    pub netdev: String,
    pub spec: pb::NetdevSpec,
}

/// An object to realise, with whatever of the objects it refers to the backend needs.
#[derive(Clone, Debug, PartialEq)]
pub enum Desired {
    Vrf {
        name: String,
        spec: pb::VrfSpec,
    },
    LogicalBridge {
        name: String,
        spec: pb::LogicalBridgeSpec,
    },
    /// `vrf` and `bridge` are the referenced objects' specs.
    Svi {
        name: String,
        spec: pb::SviSpec,
        vrf: pb::VrfSpec,
        bridge: pb::LogicalBridgeSpec,
    },
    Netdev {
        namespace: String,
        name: String,
        spec: pb::NetdevSpec,
    },
    FlowPolicy {
        namespace: String,
        name: String,
        spec: pb::FlowPolicySpec,
        targets: Vec<FlowTarget>,
    },
}

impl Desired {
    pub fn key(&self) -> ObjKey {
        match self {
            Desired::Vrf { name, .. } => ObjKey::new(ObjKind::Vrf, "", name),
            Desired::LogicalBridge { name, .. } => ObjKey::new(ObjKind::LogicalBridge, "", name),
            Desired::Svi { name, .. } => ObjKey::new(ObjKind::Svi, "", name),
            Desired::Netdev { namespace, name, .. } => ObjKey::new(ObjKind::Netdev, namespace, name),
            Desired::FlowPolicy { namespace, name, .. } => ObjKey::new(ObjKind::FlowPolicy, namespace, name),
        }
    }
}

/// What the dataplane reports about a realised object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// "UP", "DOWN" or "".
    pub oper_status: String,
    pub components: Vec<pb::Component>,
    /// Netdevs: the address and MAC the port carries, and the backend's name for the port.
    pub ip: String,
    pub mac: String,
    pub port_name: String,
    /// Flow policies: one entry per rule.
    pub rules: Vec<pb::FlowRuleStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DataplaneError {
    pub message: String,
    /// False when retrying cannot help until the desired object (or the DPU) changes.
    pub retryable: bool,
}

impl DataplaneError {
    pub fn retry(message: impl Into<String>) -> DataplaneError {
        DataplaneError { message: message.into(), retryable: true }
    }

    pub fn permanent(message: impl Into<String>) -> DataplaneError {
        DataplaneError { message: message.into(), retryable: false }
    }
}

pub type DpResult<T> = Result<T, DataplaneError>;

/// Programs one DPU. Every operation is idempotent: applying what is already there, or removing
/// what is already gone, succeeds.
#[async_trait::async_trait]
pub trait Dataplane: Send + Sync {
    /// `linux` or `opi`.
    fn name(&self) -> &'static str;

    /// What the backend found it can do (reported in the DPU's inventory).
    fn capabilities(&self) -> BTreeMap<String, bool>;

    /// Creates or updates the object and returns what it observed once done.
    async fn apply(&self, obj: &Desired) -> DpResult<Observed>;

    /// Reads the current state of an applied object (oper status, counters) without changing it.
    async fn observe(&self, obj: &Desired) -> DpResult<Observed>;

    /// Removes the object; `last` is what was applied, when known.
    async fn remove(&self, key: &ObjKey, last: Option<&Desired>) -> DpResult<()>;

    /// Objects carrying this agent's marks that the dataplane holds now (for orphan removal).
    async fn owned(&self) -> DpResult<Vec<ObjKey>>;
}

/// 32-bit FNV-1a, for short stable names derived from object names.
pub fn fnv32(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The parts of a netdev id `<serial>-pf<P>-vf<V>` / `-sf<S>`: (serial, pf, is_sf, index).
pub fn parse_netdev_id(id: &str) -> Option<(String, u32, bool, u32)> {
    fn split<'a>(s: &'a str, marker: &str) -> Option<(&'a str, u32)> {
        let pos = s.rfind(marker)?;
        let digits = &s[pos + marker.len()..];
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((&s[..pos], digits.parse().ok()?))
    }
    let (rest, index, sf) =
        split(id, "-vf").map(|(r, i)| (r, i, false)).or_else(|| split(id, "-sf").map(|(r, i)| (r, i, true)))?;
    let (serial, pf) = split(rest, "-pf")?;
    (!serial.is_empty()).then(|| (serial.to_string(), pf, sf, index))
}
