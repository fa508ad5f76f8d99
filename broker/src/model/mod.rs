//! Domain types shared by the store, the fan-out and the services: resource kinds, object keys,
//! selectors and the routing of objects to DPUs.

pub mod convert;
pub mod event;
pub mod ipam;
pub mod object;
pub mod validate;

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Serialize};
use xpu_proto::broker::v1 as pb;

use crate::error::{Error, Result};

/// Labels as stored: ordered so that equal label sets serialize identically.
pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Dpu,
    Netdev,
    LogicalBridge,
    Vrf,
    Svi,
    XpuNetwork,
    FlowPolicy,
}

impl Kind {
    pub const ALL: [Kind; 7] =
        [Kind::Dpu, Kind::Netdev, Kind::LogicalBridge, Kind::Vrf, Kind::Svi, Kind::XpuNetwork, Kind::FlowPolicy];

    /// Kinds realised on DPUs chosen by a `dpuSelector`, with one status per DPU.
    pub const SELECTOR_ROUTED: [Kind; 4] = [Kind::LogicalBridge, Kind::Vrf, Kind::Svi, Kind::FlowPolicy];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Dpu => "Dpu",
            Kind::Netdev => "Netdev",
            Kind::LogicalBridge => "LogicalBridge",
            Kind::Vrf => "Vrf",
            Kind::Svi => "Svi",
            Kind::XpuNetwork => "XpuNetwork",
            Kind::FlowPolicy => "FlowPolicy",
        }
    }

    pub fn parse_stored(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Parses what an operator types: `Netdev`, `netdev`, `netdevs`, `lb`, `logicalbridges`, ...
    pub fn parse_cli(s: &str) -> Option<Kind> {
        let lower = s.to_ascii_lowercase();
        let found = match lower.as_str() {
            "dpu" | "dpus" => Kind::Dpu,
            "netdev" | "netdevs" | "nd" => Kind::Netdev,
            "logicalbridge" | "logicalbridges" | "lb" => Kind::LogicalBridge,
            "vrf" | "vrfs" => Kind::Vrf,
            "svi" | "svis" => Kind::Svi,
            "xpunetwork" | "xpunetworks" | "net" | "network" | "networks" => Kind::XpuNetwork,
            "flowpolicy" | "flowpolicies" | "fp" => Kind::FlowPolicy,
            _ => return None,
        };
        Some(found)
    }

    pub fn from_proto(value: i32, field: &str) -> Result<Kind> {
        let kind = match pb::Kind::try_from(value) {
            Ok(pb::Kind::Dpu) => Kind::Dpu,
            Ok(pb::Kind::Netdev) => Kind::Netdev,
            Ok(pb::Kind::LogicalBridge) => Kind::LogicalBridge,
            Ok(pb::Kind::Vrf) => Kind::Vrf,
            Ok(pb::Kind::Svi) => Kind::Svi,
            Ok(pb::Kind::XpuNetwork) => Kind::XpuNetwork,
            Ok(pb::Kind::FlowPolicy) => Kind::FlowPolicy,
            Ok(pb::Kind::Unspecified) => {
                return Err(Error::invalid(field, "kind is required"));
            }
            Err(_) => return Err(Error::invalid(field, format!("unknown kind {value}"))),
        };
        Ok(kind)
    }

    pub fn to_proto(self) -> pb::Kind {
        match self {
            Kind::Dpu => pb::Kind::Dpu,
            Kind::Netdev => pb::Kind::Netdev,
            Kind::LogicalBridge => pb::Kind::LogicalBridge,
            Kind::Vrf => pb::Kind::Vrf,
            Kind::Svi => pb::Kind::Svi,
            Kind::XpuNetwork => pb::Kind::XpuNetwork,
            Kind::FlowPolicy => pb::Kind::FlowPolicy,
        }
    }

    pub fn namespaced(self) -> bool {
        matches!(self, Kind::Netdev | Kind::FlowPolicy)
    }

    /// Realised per DPU, with one status entry per DPU.
    pub fn selector_routed(self) -> bool {
        Kind::SELECTOR_ROUTED.contains(&self)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Key {
        Key { kind, namespace: namespace.into(), name: name.into() }
    }

    pub fn cluster(kind: Kind, name: impl Into<String>) -> Key {
        Key::new(kind, "", name)
    }

    /// Validates a key from a request: kind known, name valid, namespace present exactly when
    /// the kind is namespaced.
    pub fn from_proto(key: Option<&pb::ObjectKey>, field: &str) -> Result<Key> {
        let key = key.ok_or_else(|| Error::invalid(field, "is required"))?;
        let kind = Kind::from_proto(key.kind, &format!("{field}.kind"))?;
        let parsed = Key::new(kind, key.namespace.clone(), key.name.clone());
        validate::key(&parsed, field)?;
        Ok(parsed)
    }

    pub fn to_proto(&self) -> pb::ObjectKey {
        pb::ObjectKey { kind: self.kind.to_proto() as i32, namespace: self.namespace.clone(), name: self.name.clone() }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Equality label selector; empty matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector(pub Labels);

impl Selector {
    pub fn from_proto(sel: Option<&pb::LabelSelector>) -> Selector {
        Selector(sel.map(|s| s.match_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default())
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// Where an object is realised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Not realised on any DPU (Dpu, XpuNetwork).
    None,
    /// One DPU, named by the object (a Netdev's `netdevId`).
    Dpu(String),
    /// Every DPU whose labels the selector matches.
    Selector(Selector),
}

impl Route {
    pub fn reaches(&self, serial: &str, labels: &Labels) -> bool {
        match self {
            Route::None => false,
            Route::Dpu(d) => d == serial,
            Route::Selector(s) => s.matches(labels),
        }
    }
}

/// The parts of a `netdevId` (`<serial>-pf<P>-vf<V>` or `-sf<S>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetdevId {
    pub serial: String,
    pub pf: u32,
    pub backend: Backend,
    pub index: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Vf,
    Sf,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Vf => "vf",
            Backend::Sf => "sf",
        }
    }
}

impl NetdevId {
    pub fn parse(id: &str) -> Option<NetdevId> {
        let (rest, index, backend) = split_suffix(id, "-vf")
            .map(|(r, i)| (r, i, Backend::Vf))
            .or_else(|| split_suffix(id, "-sf").map(|(r, i)| (r, i, Backend::Sf)))?;
        let (serial, pf) = split_suffix(rest, "-pf")?;
        if serial.is_empty() {
            return None;
        }
        Some(NetdevId { serial: serial.to_string(), pf, backend, index })
    }

    pub fn format(&self) -> String {
        format!("{}-pf{}-{}{}", self.serial, self.pf, self.backend.as_str(), self.index)
    }
}

/// Splits `"<rest><marker><digits>"` into `rest` and the number.
fn split_suffix<'a>(s: &'a str, marker: &str) -> Option<(&'a str, u32)> {
    let pos = s.rfind(marker)?;
    let digits = &s[pos + marker.len()..];
    if digits.is_empty() || digits.len() > 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Leading zeros would make two ids name the same VF.
    if digits.len() > 1 && digits.starts_with('0') {
        return None;
    }
    Some((&s[..pos], digits.parse().ok()?))
}

/// Certificate identity of a DPU agent as a status author.
pub fn dpu_author(serial: &str) -> String {
    format!("dpu/{serial}")
}

/// Status author of broker-computed statuses (Dpu leases).
pub const BROKER_AUTHOR: &str = "broker";

pub fn serial_of_author(author: &str) -> Option<&str> {
    author.strip_prefix("dpu/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netdev_id_round_trips_and_rejects_garbage() {
        let id = NetdevId::parse("bf3-a-0001-pf0-vf12").unwrap();
        assert_eq!(id.serial, "bf3-a-0001");
        assert_eq!(id.pf, 0);
        assert_eq!(id.backend, Backend::Vf);
        assert_eq!(id.index, 12);
        assert_eq!(id.format(), "bf3-a-0001-pf0-vf12");
        assert_eq!(NetdevId::parse("x-pf1-sf3").unwrap().backend, Backend::Sf);
        for bad in ["pf0-vf1", "-pf0-vf1", "a-pf-vf1", "a-pf0-vf", "a-pf0-vf01", "a-vf1", "a-pf0-xf1"] {
            assert!(NetdevId::parse(bad).is_none(), "{bad} should not parse");
        }
    }

    #[test]
    fn selector_matches_subsets() {
        let labels: Labels = [("rack".into(), "r1".into()), ("zone".into(), "a".into())].into();
        assert!(Selector::default().matches(&labels));
        assert!(Selector([("rack".into(), "r1".into())].into()).matches(&labels));
        assert!(!Selector([("rack".into(), "r2".into())].into()).matches(&labels));
        assert!(!Selector([("pod".into(), "x".into())].into()).matches(&Labels::new()));
    }

    #[test]
    fn kinds_parse_from_cli_words() {
        assert_eq!(Kind::parse_cli("netdevs"), Some(Kind::Netdev));
        assert_eq!(Kind::parse_cli("LB"), Some(Kind::LogicalBridge));
        assert_eq!(Kind::parse_cli("pods"), None);
        for k in Kind::ALL {
            assert_eq!(Kind::parse_stored(k.as_str()), Some(k));
            assert_eq!(Kind::parse_cli(k.as_str()), Some(k));
        }
    }
}
