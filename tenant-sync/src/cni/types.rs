//! CNI wire types (spec 1.0.0): the plugin configuration on stdin, results and errors.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const CNI_VERSION: &str = "1.0.0";
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// Well-known error codes of the spec, and this plugin's own (100+).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    /// The device was not allocated to this node's pods by the device plugin.
    pub const NOT_ALLOCATED: u32 = 100;
    /// The DPU refused to program the port.
    pub const DPU_REFUSED: u32 = 101;
    /// The interface in the pod is not what ADD configured (CHECK).
    pub const CHECK_FAILED: u32 = 102;
    /// The broker refused this node's identity for the request (misconfigured node or certificate).
    pub const PERMISSION_DENIED: u32 = 103;
    pub const INTERNAL: u32 = 999;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError { code, msg: msg.into(), details: String::new() }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    pub fn to_json(&self, version: &str) -> String {
        let mut v = serde_json::json!({"cniVersion": version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v.to_string()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    #[serde(rename = "deviceID")]
    pub device_id: Option<String>,
}

/// The execution config the runtime writes to stdin (unknown keys pass through unused).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: Option<String>,
    pub host_agent_socket: Option<String>,
    /// As Multus passes it for single configs.
    #[serde(rename = "deviceID")]
    pub device_id: Option<String>,
    pub runtime_config: Option<RuntimeConfig>,
    /// The XpuNetwork to attach to; defaults to `name`.
    pub xpu_network: Option<String>,
    pub resource_name: Option<String>,
    pub cache_dir: Option<String>,
    pub timeout_ms: Option<u32>,
    pub prev_result: Option<Value>,
}

impl NetConf {
    pub fn device_id(&self) -> Option<&str> {
        self.device_id
            .as_deref()
            .or_else(|| self.runtime_config.as_ref().and_then(|r| r.device_id.as_deref()))
            .filter(|s| !s.is_empty())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IpConfig {
    pub address: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gw: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CniResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Value,
}

/// What ADD saved to undo itself on DEL: the VF's host-side identity and settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Cache {
    pub netdev_id: String,
    pub device_id: String,
    pub host_name: String,
    pub host_mac: String,
    pub host_mtu: u32,
    pub ifname: String,
    pub netns: String,
}
