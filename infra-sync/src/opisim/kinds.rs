//! The rules of each resource kind, as the reference bridge (`opi-evpn-bridge`) applies them:
//! required fields, value ranges, references between objects, uniqueness (VNIs, port MACs, one SVI
//! per logical bridge) and what keeps an object from being deleted.

use std::collections::BTreeMap;

use tonic::Status;
use xpu_proto::opi::evpn_gw as gw;

use super::{
    store::{Entry, Kind, Oper, State},
    validate::{check_mac, check_prefix, fmt_mac},
};

const MAX_VNI: u32 = 16_777_215;

pub(crate) struct VrfKind;
pub(crate) struct BridgeKind;
pub(crate) struct PortKind;
pub(crate) struct SviKind;

fn check_vni(field: &str, vni: Option<u32>) -> Result<(), Status> {
    match vni {
        Some(v) if !(1..=MAX_VNI).contains(&v) => {
            Err(Status::invalid_argument(format!("{field} must be between 1 and {MAX_VNI}, got {v}")))
        }
        _ => Ok(()),
    }
}

/// VNIs are unique across logical bridges and VRFs (the reference keeps one `vpns` map for both).
fn check_vni_free(st: &State, name: &str, vni: Option<u32>) -> Result<(), Status> {
    let Some(vni) = vni else { return Ok(()) };
    let by_bridge = st.bridges.iter().find(|(n, e)| n.as_str() != name && e.spec.vni == Some(vni));
    let by_vrf = st.vrfs.iter().find(|(n, e)| n.as_str() != name && e.spec.vni == Some(vni));
    match by_bridge.map(|(n, _)| n).or(by_vrf.map(|(n, _)| n)) {
        Some(owner) => Err(Status::already_exists(format!("vni {vni} is already in use by {owner}"))),
        None => Ok(()),
    }
}

fn referring<'a, S>(
    table: &'a BTreeMap<String, Entry<S>>,
    refers: impl Fn(&S) -> bool + 'a,
) -> impl Iterator<Item = String> + 'a {
    table.iter().filter(move |(_, e)| refers(&e.spec)).map(|(n, _)| n.clone())
}

impl Kind for VrfKind {
    type Spec = gw::VrfSpec;
    type Msg = gw::Vrf;
    const COLLECTION: &'static str = "vrfs";
    const FIELD: &'static str = "vrf";
    const ID_FIELD: &'static str = "vrf_id";
    const NOUN: &'static str = "VRF";
    const COMPONENTS: &'static [&'static str] = &["frr", "linux", "vendor"];

    fn table(s: &State) -> &BTreeMap<String, Entry<Self::Spec>> {
        &s.vrfs
    }
    fn table_mut(s: &mut State) -> &mut BTreeMap<String, Entry<Self::Spec>> {
        &mut s.vrfs
    }
    fn into_parts(msg: Self::Msg) -> (String, Option<Self::Spec>) {
        (msg.name, msg.spec)
    }
    fn from_parts(name: String, spec: Self::Spec, oper: Oper, components: Vec<gw::Component>) -> Self::Msg {
        let oper_status = match oper {
            Oper::Up => gw::VrfOperStatus::Up,
            Oper::Down => gw::VrfOperStatus::Down,
            Oper::ToBeDeleted => gw::VrfOperStatus::ToBeDeleted,
        } as i32;
        gw::Vrf { name, spec: Some(spec), status: Some(gw::VrfStatus { oper_status, components }) }
    }
    fn first_missing(spec: &Self::Spec) -> Option<&'static str> {
        spec.loopback_ip_prefix.is_none().then_some("loopback_ip_prefix")
    }
    fn validate(st: &State, name: &str, spec: &Self::Spec) -> Result<(), Status> {
        check_vni("vrf.spec.vni", spec.vni)?;
        if let Some(p) = &spec.loopback_ip_prefix {
            check_prefix("vrf.spec.loopback_ip_prefix", p)?;
        }
        if let Some(p) = &spec.vtep_ip_prefix {
            check_prefix("vrf.spec.vtep_ip_prefix", p)?;
        }
        check_vni_free(st, name, spec.vni)
    }
    fn copy_field(dst: &mut Self::Spec, src: &Self::Spec, field: &str) -> bool {
        match field {
            "vni" => dst.vni = src.vni,
            "loopback_ip_prefix" => dst.loopback_ip_prefix = src.loopback_ip_prefix.clone(),
            "vtep_ip_prefix" => dst.vtep_ip_prefix = src.vtep_ip_prefix.clone(),
            _ => return false,
        }
        true
    }
    fn referrers(st: &State, name: &str) -> Vec<String> {
        referring(&st.svis, |s| s.vrf == name).collect()
    }
}

impl Kind for BridgeKind {
    type Spec = gw::LogicalBridgeSpec;
    type Msg = gw::LogicalBridge;
    const COLLECTION: &'static str = "bridges";
    const FIELD: &'static str = "logical_bridge";
    const ID_FIELD: &'static str = "logical_bridge_id";
    const NOUN: &'static str = "logical bridge";
    const COMPONENTS: &'static [&'static str] = &["linux", "vendor"];

    fn table(s: &State) -> &BTreeMap<String, Entry<Self::Spec>> {
        &s.bridges
    }
    fn table_mut(s: &mut State) -> &mut BTreeMap<String, Entry<Self::Spec>> {
        &mut s.bridges
    }
    fn into_parts(msg: Self::Msg) -> (String, Option<Self::Spec>) {
        (msg.name, msg.spec)
    }
    fn from_parts(name: String, spec: Self::Spec, oper: Oper, components: Vec<gw::Component>) -> Self::Msg {
        let oper_status = match oper {
            Oper::Up => gw::LbOperStatus::Up,
            Oper::Down => gw::LbOperStatus::Down,
            Oper::ToBeDeleted => gw::LbOperStatus::ToBeDeleted,
        } as i32;
        gw::LogicalBridge { name, spec: Some(spec), status: Some(gw::LogicalBridgeStatus { oper_status, components }) }
    }
    fn first_missing(spec: &Self::Spec) -> Option<&'static str> {
        (spec.vlan_id == 0).then_some("vlan_id")
    }
    fn validate(st: &State, name: &str, spec: &Self::Spec) -> Result<(), Status> {
        if !(1..=4095).contains(&spec.vlan_id) {
            return Err(Status::invalid_argument(format!(
                "logical_bridge.spec.vlan_id must be between 1 and 4095, got {}",
                spec.vlan_id
            )));
        }
        check_vni("logical_bridge.spec.vni", spec.vni)?;
        if let Some(p) = &spec.vtep_ip_prefix {
            check_prefix("logical_bridge.spec.vtep_ip_prefix", p)?;
        }
        check_vni_free(st, name, spec.vni)
    }
    fn copy_field(dst: &mut Self::Spec, src: &Self::Spec, field: &str) -> bool {
        match field {
            "vlan_id" => dst.vlan_id = src.vlan_id,
            "vni" => dst.vni = src.vni,
            "vtep_ip_prefix" => dst.vtep_ip_prefix = src.vtep_ip_prefix.clone(),
            _ => return false,
        }
        true
    }
    fn referrers(st: &State, name: &str) -> Vec<String> {
        referring(&st.ports, |p| p.logical_bridges.iter().any(|b| b == name))
            .chain(referring(&st.svis, |s| s.logical_bridge == name))
            .collect()
    }
}

impl Kind for PortKind {
    type Spec = gw::BridgePortSpec;
    type Msg = gw::BridgePort;
    const COLLECTION: &'static str = "ports";
    const FIELD: &'static str = "bridge_port";
    const ID_FIELD: &'static str = "bridge_port_id";
    const NOUN: &'static str = "bridge port";
    const COMPONENTS: &'static [&'static str] = &["linux", "vendor"];

    fn table(s: &State) -> &BTreeMap<String, Entry<Self::Spec>> {
        &s.ports
    }
    fn table_mut(s: &mut State) -> &mut BTreeMap<String, Entry<Self::Spec>> {
        &mut s.ports
    }
    fn into_parts(msg: Self::Msg) -> (String, Option<Self::Spec>) {
        (msg.name, msg.spec)
    }
    fn from_parts(name: String, spec: Self::Spec, oper: Oper, components: Vec<gw::Component>) -> Self::Msg {
        let oper_status = match oper {
            Oper::Up => gw::BpOperStatus::Up,
            Oper::Down => gw::BpOperStatus::Down,
            Oper::ToBeDeleted => gw::BpOperStatus::ToBeDeleted,
        } as i32;
        gw::BridgePort { name, spec: Some(spec), status: Some(gw::BridgePortStatus { oper_status, components }) }
    }
    fn first_missing(spec: &Self::Spec) -> Option<&'static str> {
        if spec.mac_address.is_empty() {
            Some("mac_address")
        } else if spec.ptype == 0 {
            Some("ptype")
        } else {
            None
        }
    }
    fn validate(st: &State, name: &str, spec: &Self::Spec) -> Result<(), Status> {
        check_mac("bridge_port.spec.mac_address", &spec.mac_address)?;
        let n = spec.logical_bridges.len();
        match gw::BridgePortType::try_from(spec.ptype) {
            Ok(gw::BridgePortType::Access) if n != 1 => {
                return Err(Status::invalid_argument(format!(
                    "an ACCESS bridge port needs exactly one logical bridge in bridge_port.spec.logical_bridges, got {n}"
                )));
            }
            Ok(gw::BridgePortType::Trunk) if n == 0 => {
                return Err(Status::invalid_argument(
                    "a TRUNK bridge port needs at least one logical bridge in bridge_port.spec.logical_bridges",
                ));
            }
            Ok(gw::BridgePortType::Access | gw::BridgePortType::Trunk) => {}
            _ => {
                return Err(Status::invalid_argument(format!(
                    "bridge_port.spec.ptype {} is not ACCESS (1) or TRUNK (2)",
                    spec.ptype
                )));
            }
        }
        for (i, lb) in spec.logical_bridges.iter().enumerate() {
            if spec.logical_bridges[..i].contains(lb) {
                return Err(Status::invalid_argument(format!(
                    "logical bridge {lb} appears twice in bridge_port.spec.logical_bridges"
                )));
            }
            if !st.bridges.contains_key(lb) {
                return Err(Status::not_found(format!("the referenced logical bridge {lb} has not been found")));
            }
        }
        if let Some((other, _)) =
            st.ports.iter().find(|(n, e)| n.as_str() != name && e.spec.mac_address == spec.mac_address)
        {
            return Err(Status::already_exists(format!(
                "MAC address {} is already in use by bridge port {other}",
                fmt_mac(&spec.mac_address)
            )));
        }
        Ok(())
    }
    fn copy_field(dst: &mut Self::Spec, src: &Self::Spec, field: &str) -> bool {
        match field {
            "mac_address" => dst.mac_address = src.mac_address.clone(),
            "ptype" => dst.ptype = src.ptype,
            "logical_bridges" => dst.logical_bridges = src.logical_bridges.clone(),
            _ => return false,
        }
        true
    }
}

impl Kind for SviKind {
    type Spec = gw::SviSpec;
    type Msg = gw::Svi;
    const COLLECTION: &'static str = "svis";
    const FIELD: &'static str = "svi";
    const ID_FIELD: &'static str = "svi_id";
    const NOUN: &'static str = "SVI";
    const COMPONENTS: &'static [&'static str] = &["frr", "linux", "vendor"];

    fn table(s: &State) -> &BTreeMap<String, Entry<Self::Spec>> {
        &s.svis
    }
    fn table_mut(s: &mut State) -> &mut BTreeMap<String, Entry<Self::Spec>> {
        &mut s.svis
    }
    fn into_parts(msg: Self::Msg) -> (String, Option<Self::Spec>) {
        (msg.name, msg.spec)
    }
    fn from_parts(name: String, spec: Self::Spec, oper: Oper, components: Vec<gw::Component>) -> Self::Msg {
        let oper_status = match oper {
            Oper::Up => gw::SviOperStatus::Up,
            Oper::Down => gw::SviOperStatus::Down,
            Oper::ToBeDeleted => gw::SviOperStatus::ToBeDeleted,
        } as i32;
        gw::Svi { name, spec: Some(spec), status: Some(gw::SviStatus { oper_status, components }) }
    }
    fn first_missing(spec: &Self::Spec) -> Option<&'static str> {
        if spec.vrf.is_empty() {
            Some("vrf")
        } else if spec.logical_bridge.is_empty() {
            Some("logical_bridge")
        } else if spec.mac_address.is_empty() {
            Some("mac_address")
        } else if spec.gw_ip_prefix.is_empty() {
            Some("gw_ip_prefix")
        } else {
            None
        }
    }
    fn validate(st: &State, name: &str, spec: &Self::Spec) -> Result<(), Status> {
        if !st.vrfs.contains_key(&spec.vrf) {
            return Err(Status::not_found(format!("the referenced VRF {} has not been found", spec.vrf)));
        }
        if !st.bridges.contains_key(&spec.logical_bridge) {
            return Err(Status::not_found(format!(
                "the referenced logical bridge {} has not been found",
                spec.logical_bridge
            )));
        }
        check_mac("svi.spec.mac_address", &spec.mac_address)?;
        for (i, p) in spec.gw_ip_prefix.iter().enumerate() {
            check_prefix(&format!("svi.spec.gw_ip_prefix[{i}]"), p)?;
        }
        if let Some((other, _)) =
            st.svis.iter().find(|(n, e)| n.as_str() != name && e.spec.logical_bridge == spec.logical_bridge)
        {
            return Err(Status::failed_precondition(format!(
                "logical bridge {} is already associated with SVI {other}",
                spec.logical_bridge
            )));
        }
        Ok(())
    }
    fn copy_field(dst: &mut Self::Spec, src: &Self::Spec, field: &str) -> bool {
        match field {
            "vrf" => dst.vrf = src.vrf.clone(),
            "logical_bridge" => dst.logical_bridge = src.logical_bridge.clone(),
            "mac_address" => dst.mac_address = src.mac_address.clone(),
            "gw_ip_prefix" => dst.gw_ip_prefix = src.gw_ip_prefix.clone(),
            "enable_bgp" => dst.enable_bgp = src.enable_bgp,
            "remote_as" => dst.remote_as = src.remote_as,
            _ => return false,
        }
        true
    }
}
