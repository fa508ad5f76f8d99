//! The Kubernetes custom resources of `xpu.opi.dev/v1alpha1`, one per kind of DESIGN §3.
//!
//! The JSON of each `spec` is exactly the broker API's (proto3 JSON of `xpu.broker.v1` specs), so
//! objects move between a cluster and the broker without field mapping. Statuses carry the
//! broker's status plus what the syncer adds: `syncedGeneration` (the `metadata.generation` the
//! broker — or, for mirrors, the broker's copy — is known to hold) and `conditions`.

// kube's `printcolumn(...)` attributes repeat keys by design.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "xpu.opi.dev";
pub const VERSION: &str = "v1alpha1";

/// Integers that the broker's JSON (proto3 mapping) writes as strings are read either way.
pub mod int {
    use serde::{Deserialize, Deserializer};

    pub fn de<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum IntOrString {
            Int(i64),
            Str(String),
        }
        Ok(match Option::<IntOrString>::deserialize(d)? {
            None => None,
            Some(IntOrString::Int(i)) => Some(i),
            Some(IntOrString::Str(s)) => s.parse().ok(),
        })
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "int::de")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_transition_time: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Component {
    pub name: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// Fields every status carries on the cluster side.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncStatus {
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "int::de")]
    pub synced_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

// ---- Netdev ----

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetdevIpam {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mode: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub interface: String,
}

/// One pod interface (a VF or SF) realised as a bridge port on its DPU.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "xpu.opi.dev",
    version = "v1alpha1",
    kind = "Netdev",
    namespaced,
    status = "NetdevStatus",
    shortname = "nd",
    category = "xpu",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "IP", type_ = "string", json_path = ".status.ip"),
    printcolumn(name = "DPU", type_ = "string", json_path = ".status.dpu"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.hostname", priority = "1"),
    printcolumn(name = "Network", type_ = "string", json_path = ".spec.network", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct NetdevSpec {
    pub netdev_id: String,
    pub hostname: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backend: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac_address: String,
    pub network: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub port_type: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logical_bridges: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<NetdevIpam>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_ref: Option<PodRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetdevStatus {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub phase: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ip: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac_address: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dpu: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub oper_status: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<Component>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "int::de")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bridge_port_name: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stale: bool,
    #[serde(flatten)]
    pub sync: SyncStatus,
}

// ---- fabric ----

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowRuleStatus {
    pub name: String,
    #[serde(default)]
    pub programmed: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub offload: String,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "int::de")]
    pub packets: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "int::de")]
    pub bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// How one DPU realised a fabric object or flow policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DpuObjectStatus {
    pub dpu: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub phase: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub oper_status: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<Component>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "int::de")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<FlowRuleStatus>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stale: bool,
}

/// Per-DPU status plus an aggregate `Ready` condition.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FabricStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dpus: Vec<DpuObjectStatus>,
    #[serde(flatten)]
    pub sync: SyncStatus,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "xpu.opi.dev",
    version = "v1alpha1",
    kind = "LogicalBridge",
    status = "FabricStatus",
    shortname = "lb",
    category = "xpu",
    printcolumn(name = "VLAN", type_ = "integer", json_path = ".spec.vlanId"),
    printcolumn(name = "VNI", type_ = "integer", json_path = ".spec.vni"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct LogicalBridgeSpec {
    pub vlan_id: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vtep_ip_prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpu_selector: Option<LabelSelector>,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "xpu.opi.dev",
    version = "v1alpha1",
    kind = "Vrf",
    status = "FabricStatus",
    category = "xpu",
    printcolumn(name = "VNI", type_ = "integer", json_path = ".spec.vni"),
    printcolumn(name = "Loopback", type_ = "string", json_path = ".spec.loopbackIpPrefix"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct VrfSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    pub loopback_ip_prefix: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vtep_ip_prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpu_selector: Option<LabelSelector>,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "xpu.opi.dev",
    version = "v1alpha1",
    kind = "Svi",
    status = "FabricStatus",
    category = "xpu",
    printcolumn(name = "VRF", type_ = "string", json_path = ".spec.vrf"),
    printcolumn(name = "Bridge", type_ = "string", json_path = ".spec.logicalBridge"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct SviSpec {
    pub vrf: String,
    pub logical_bridge: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac_address: String,
    pub gw_ip_prefix: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub enable_bgp: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_as: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpu_selector: Option<LabelSelector>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gw: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IpPool {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub range_start: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub range_end: String,
}

/// Maps a tenant network name to logical bridges, a VRF and an address pool.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "xpu.opi.dev",
    version = "v1alpha1",
    kind = "XpuNetwork",
    status = "XpuNetworkStatus",
    shortname = "xnet",
    category = "xpu",
    printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.ipam.cidr"),
    printcolumn(name = "Allocated", type_ = "integer", json_path = ".status.allocated"),
    printcolumn(name = "Capacity", type_ = "integer", json_path = ".status.capacity"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct XpuNetworkSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logical_bridges: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vrf: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub port_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<IpPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct XpuNetworkStatus {
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "int::de")]
    pub allocated: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "int::de")]
    pub capacity: Option<i64>,
    #[serde(flatten)]
    pub sync: SyncStatus,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortRange {
    pub from: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowRule {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    pub action: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub src_prefix: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dst_prefix: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dst_ports: Vec<PortRange>,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "xpu.opi.dev",
    version = "v1alpha1",
    kind = "FlowPolicy",
    namespaced,
    status = "FabricStatus",
    shortname = "fp",
    category = "xpu",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct FlowPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netdev_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpu_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<FlowRule>,
}

// ---- Dpu ----

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DpuInventory {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub product: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pf_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vf_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sf_count: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dataplane: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub capabilities: BTreeMap<String, bool>,
}

/// A DPU as its agent registered it, with its lease.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "xpu.opi.dev",
    version = "v1alpha1",
    kind = "Dpu",
    status = "DpuStatus",
    category = "xpu",
    printcolumn(name = "Lease", type_ = "string", json_path = ".status.leaseState"),
    printcolumn(name = "Product", type_ = "string", json_path = ".spec.product"),
    printcolumn(name = "Agent", type_ = "string", json_path = ".status.inventory.agentVersion", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct DpuSpec {
    pub serial: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub product: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub infra_node_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant_node_name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DpuStatus {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub lease_state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_heartbeat: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_duration_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory: Option<DpuInventory>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "int::de")]
    pub applied_revision: Option<i64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub registered_at: String,
    #[serde(flatten)]
    pub sync: SyncStatus,
}

/// Every CRD, in a stable order.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![Dpu::crd(), Netdev::crd(), LogicalBridge::crd(), Vrf::crd(), Svi::crd(), XpuNetwork::crd(), FlowPolicy::crd()]
}

/// The CRDs as the YAML files `deploy/crds/` holds: `(file name, content)`.
pub fn yaml_files() -> Result<Vec<(String, String)>, serde_yaml_ng::Error> {
    all()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let body = serde_yaml_ng::to_string(&crd)?;
            Ok((
                format!("{name}.yaml"),
                format!("# Generated by `cargo run -p xpu-sync-common --bin crdgen`; do not edit.\n{body}"),
            ))
        })
        .collect()
}
