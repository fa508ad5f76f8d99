//! `xpu-cni`: a CNI 1.0 plugin. `ADD` asks the host agent to attach the VF (the broker round
//! trip: the Netdev is Connected on the DPU when it returns), then moves the VF into the pod's
//! namespace, renames it and sets MAC, MTU, address and routes; `DEL` undoes that (restoring the
//! VF's host name and settings saved at ADD) and detaches, succeeding when things are already
//! gone; `CHECK` verifies the interface really is as ADD left it.
//!
//! Errors are CNI error JSON on stdout with the spec's codes: 11 ("try again") when the host
//! agent or broker is unreachable or the DPU is slow — the kubelet retries ADD — and this
//! plugin's 100+ codes for a device the device plugin never allocated or a port the DPU refused.

mod link;
pub mod types;

use std::{collections::HashMap, path::PathBuf};

use xpu_proto::host::v1::{self as hv, host_agent_client::HostAgentClient};

use self::types::{Cache, CniError, CniResult, Interface, IpConfig, NetConf, Route, code};

pub const DEFAULT_SOCKET: &str = "/run/xpu/host-agent.sock";
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/cni/xpu";
pub const DEFAULT_RESOURCE: &str = "xpu.opi.dev/vf";

/// What the plugin prints and how it exits.
pub struct Outcome {
    pub stdout: String,
    pub success: bool,
}

struct Invocation<'a> {
    env: &'a HashMap<String, String>,
}

impl Invocation<'_> {
    fn var(&self, name: &str) -> Option<&str> {
        self.env.get(name).map(String::as_str).filter(|s| !s.is_empty())
    }

    /// The variables must be set; the container id and interface name must also be well formed
    /// (spec 1.0.0), since they name the plugin's cache file.
    fn require(&self, names: &[&str]) -> Result<(), CniError> {
        let missing: Vec<&str> = names.iter().copied().filter(|n| self.var(n).is_none()).collect();
        if !missing.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("required env variables [{}] missing", missing.join(" ")),
            ));
        }
        if let Some(id) = self.var("CNI_CONTAINERID")
            && !valid_container_id(id)
        {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_CONTAINERID {id:?} is not a valid container id"),
            )
            .with_details("it must start with a letter or digit and hold only letters, digits, '_', '.' and '-'"));
        }
        if let Some(name) = self.var("CNI_IFNAME")
            && !valid_ifname(name)
        {
            return Err(CniError::new(code::INVALID_ENV, format!("CNI_IFNAME {name:?} is not a valid interface name"))
                .with_details("it must be 1-15 bytes, not '.' or '..', without '/', ':' or whitespace"));
        }
        Ok(())
    }

    /// `K=V;K2=V2`.
    fn cni_args(&self) -> HashMap<String, String> {
        self.var("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect()
    }
}

/// Runs one CNI command as the runtime invoked it.
pub fn run(env: &HashMap<String, String>, stdin: &str) -> Outcome {
    let inv = Invocation { env };
    let version = serde_json::from_str::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(|s| s.as_str()).map(String::from))
        .unwrap_or_else(|| types::CNI_VERSION.to_string());
    match dispatch(&inv, stdin) {
        Ok(stdout) => Outcome { stdout, success: true },
        Err(e) => Outcome { stdout: e.to_json(&version), success: false },
    }
}

fn dispatch(inv: &Invocation<'_>, stdin: &str) -> Result<String, CniError> {
    let command = inv
        .var("CNI_COMMAND")
        .ok_or_else(|| CniError::new(code::INVALID_ENV, "required env variables [CNI_COMMAND] missing"))?;
    if command == "VERSION" {
        return Ok(
            serde_json::json!({"cniVersion": types::CNI_VERSION, "supportedVersions": types::SUPPORTED_VERSIONS})
                .to_string(),
        );
    }
    let conf: NetConf = serde_json::from_str(stdin).map_err(|e| {
        CniError::new(code::DECODE, "failed to decode the network configuration").with_details(e.to_string())
    })?;
    if !types::SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(code::INCOMPATIBLE_VERSION, "incompatible CNI versions").with_details(format!(
            "config is {:?}, plugin supports {:?}",
            conf.cni_version,
            types::SUPPORTED_VERSIONS
        )));
    }
    if conf.name.is_empty() {
        return Err(CniError::new(code::INVALID_CONFIG, "the network configuration needs a name"));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(code::INTERNAL, format!("cannot start a runtime: {e}")))?;
    match command {
        "ADD" => {
            inv.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])?;
            runtime.block_on(add(inv, &conf))
        }
        "DEL" => {
            inv.require(&["CNI_CONTAINERID", "CNI_IFNAME"])?;
            runtime.block_on(del(inv, &conf)).map(|()| String::new())
        }
        "CHECK" => {
            inv.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])?;
            check(inv, &conf).map(|()| String::new())
        }
        other => Err(CniError::new(code::INVALID_ENV, format!("unknown CNI_COMMAND: {other}"))),
    }
}

/// A container id as the CNI spec allows it: `[A-Za-z0-9][A-Za-z0-9_.-]*`.
pub fn valid_container_id(id: &str) -> bool {
    let mut bytes = id.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// An interface name as the CNI spec allows it: 1-15 bytes, not `.` or `..`, no `/`, `:` or
/// whitespace.
pub fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

fn cache_path(conf: &NetConf, container: &str, ifname: &str) -> PathBuf {
    PathBuf::from(conf.cache_dir.as_deref().unwrap_or(DEFAULT_CACHE_DIR)).join(format!("{container}-{ifname}.json"))
}

async fn host_agent(conf: &NetConf) -> Result<HostAgentClient<tonic::transport::Channel>, CniError> {
    let socket = conf.host_agent_socket.as_deref().unwrap_or(DEFAULT_SOCKET);
    let channel = xpu_sync_common::unix_channel(socket).await.map_err(|e| {
        CniError::new(code::TRY_AGAIN, format!("the host agent is unreachable at {socket}"))
            .with_details(format!("{e:#}"))
    })?;
    Ok(HostAgentClient::new(channel))
}

fn from_status(op: &str, s: tonic::Status) -> CniError {
    let c = match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => code::TRY_AGAIN,
        tonic::Code::InvalidArgument => code::INVALID_CONFIG,
        tonic::Code::PermissionDenied => code::PERMISSION_DENIED,
        tonic::Code::FailedPrecondition if s.message().contains("not allocated") => code::NOT_ALLOCATED,
        tonic::Code::FailedPrecondition if s.message().contains("could not program") => code::DPU_REFUSED,
        _ => code::INTERNAL,
    };
    CniError::new(c, format!("{op}: {}", s.message()))
}

async fn add(inv: &Invocation<'_>, conf: &NetConf) -> Result<String, CniError> {
    let container = inv.var("CNI_CONTAINERID").unwrap_or_default();
    let netns = inv.var("CNI_NETNS").unwrap_or_default();
    let ifname = inv.var("CNI_IFNAME").unwrap_or_default();
    if !link::netns_exists(netns) {
        return Err(CniError::new(8, format!("the network namespace {netns} does not exist")));
    }
    let args = inv.cni_args();
    let (Some(pod_ns), Some(pod_name)) = (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")) else {
        return Err(CniError::new(code::INVALID_ENV, "CNI_ARGS must carry K8S_POD_NAMESPACE and K8S_POD_NAME"));
    };
    let mut client = host_agent(conf).await?;
    let resp = client
        .attach(hv::AttachRequest {
            device_id: conf.device_id().unwrap_or_default().to_string(),
            pod: Some(hv::PodIdentity {
                namespace: pod_ns.clone(),
                name: pod_name.clone(),
                uid: args.get("K8S_POD_UID").cloned().unwrap_or_default(),
            }),
            network: conf.xpu_network.clone().unwrap_or_else(|| conf.name.clone()),
            interface: ifname.to_string(),
            container_id: container.to_string(),
            resource_name: conf.resource_name.clone().unwrap_or_else(|| DEFAULT_RESOURCE.to_string()),
            timeout_ms: conf.timeout_ms.unwrap_or(0),
        })
        .await
        .map_err(|s| from_status("attach", s))?
        .into_inner();

    let cache_file = cache_path(conf, container, ifname);
    // A repeated ADD finds the VF already configured in the pod.
    let configured = link::link(Some(netns), ifname)?.is_some_and(|l| link::field(&l, "address") == resp.mac_address);
    if !configured {
        let host = link::link(None, &resp.vf_interface)?.ok_or_else(|| {
            CniError::new(code::INTERNAL, format!("VF interface {} is not in the host namespace", resp.vf_interface))
        })?;
        let cache = Cache {
            netdev_id: resp.netdev_id.clone(),
            device_id: resp.device_id.clone(),
            host_name: resp.vf_interface.clone(),
            host_mac: link::field(&host, "address"),
            host_mtu: link::field(&host, "mtu").parse().unwrap_or(1500),
            ifname: ifname.to_string(),
            netns: netns.to_string(),
        };
        if let Some(dir) = cache_file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| CniError::new(code::IO, format!("{}: {e}", dir.display())))?;
        }
        let bytes = serde_json::to_vec(&cache).map_err(|e| CniError::new(code::INTERNAL, e.to_string()))?;
        std::fs::write(&cache_file, bytes)
            .map_err(|e| CniError::new(code::IO, format!("{}: {e}", cache_file.display())))?;
        configure(netns, ifname, &resp)?;
    }

    let mut result: CniResult = match &conf.prev_result {
        Some(prev) => serde_json::from_value(prev.clone())
            .map_err(|e| CniError::new(code::DECODE, "cannot decode prevResult").with_details(e.to_string()))?,
        None => CniResult::default(),
    };
    result.cni_version = conf.cni_version.clone();
    result.interfaces.push(Interface {
        name: ifname.to_string(),
        mac: resp.mac_address.clone(),
        sandbox: netns.to_string(),
    });
    result.ips.push(IpConfig {
        address: resp.address.clone(),
        gateway: resp.gateway.clone(),
        interface: Some(result.interfaces.len() - 1),
    });
    for r in &resp.routes {
        result.routes.push(Route { dst: r.dst.clone(), gw: r.gw.clone() });
    }
    if result.dns.is_null() {
        result.dns = serde_json::json!({});
    }
    serde_json::to_string(&result).map_err(|e| CniError::new(code::INTERNAL, e.to_string()))
}

/// Moves the VF into the pod and configures it as the attachment says.
fn configure(netns: &str, ifname: &str, resp: &hv::AttachResponse) -> Result<(), CniError> {
    let vf = resp.vf_interface.as_str();
    link::ip(None, &["link", "set", "dev", vf, "down"])?;
    link::ip(None, &["link", "set", "dev", vf, "netns", netns])?;
    let ns = Some(netns);
    link::ip(ns, &["link", "set", "dev", vf, "name", ifname])?;
    if !resp.mac_address.is_empty() {
        link::ip(ns, &["link", "set", "dev", ifname, "address", &resp.mac_address])?;
    }
    if resp.mtu != 0 {
        link::ip(ns, &["link", "set", "dev", ifname, "mtu", &resp.mtu.to_string()])?;
    }
    if !resp.address.is_empty() {
        link::ip(ns, &["addr", "replace", &resp.address, "dev", ifname])?;
    }
    link::ip(ns, &["link", "set", "dev", ifname, "up"])?;
    for r in &resp.routes {
        let gw = if r.gw.is_empty() { resp.gateway.as_str() } else { r.gw.as_str() };
        link::ip(ns, &["route", "replace", &r.dst, "via", gw, "dev", ifname])?;
    }
    Ok(())
}

async fn del(inv: &Invocation<'_>, conf: &NetConf) -> Result<(), CniError> {
    let container = inv.var("CNI_CONTAINERID").unwrap_or_default();
    let ifname = inv.var("CNI_IFNAME").unwrap_or_default();
    let netns = inv.var("CNI_NETNS").unwrap_or_default();
    let cache_file = cache_path(conf, container, ifname);
    let cache: Option<Cache> = std::fs::read(&cache_file).ok().and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(c) = &cache {
        let ns_path = if link::netns_exists(netns) { netns } else { c.netns.as_str() };
        if link::netns_exists(ns_path) && link::link(Some(ns_path), ifname)?.is_some() {
            // Back to the host namespace under its own name, with its own settings.
            let host_ns = format!("/proc/{}/ns/net", std::process::id());
            link::ip(Some(ns_path), &["link", "set", "dev", ifname, "down"])?;
            link::ip(Some(ns_path), &["link", "set", "dev", ifname, "name", &c.host_name])?;
            link::ip(Some(ns_path), &["link", "set", "dev", &c.host_name, "netns", &host_ns])?;
        }
        if link::link(None, &c.host_name)?.is_some() {
            link::ip(None, &["link", "set", "dev", &c.host_name, "address", &c.host_mac])?;
            link::ip(None, &["link", "set", "dev", &c.host_name, "mtu", &c.host_mtu.to_string()])?;
        }
    }
    let mut client = host_agent(conf).await?;
    let args = inv.cni_args();
    client
        .detach(hv::DetachRequest {
            container_id: container.to_string(),
            interface: ifname.to_string(),
            netdev_id: cache.as_ref().map(|c| c.netdev_id.clone()).unwrap_or_default(),
            pod: Some(hv::PodIdentity {
                namespace: args.get("K8S_POD_NAMESPACE").cloned().unwrap_or_default(),
                name: args.get("K8S_POD_NAME").cloned().unwrap_or_default(),
                uid: args.get("K8S_POD_UID").cloned().unwrap_or_default(),
            }),
        })
        .await
        .map_err(|s| from_status("detach", s))?;
    match std::fs::remove_file(&cache_file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(CniError::new(code::IO, format!("{}: {e}", cache_file.display())))
        }
        _ => Ok(()),
    }
}

fn check(inv: &Invocation<'_>, conf: &NetConf) -> Result<(), CniError> {
    let netns = inv.var("CNI_NETNS").unwrap_or_default();
    let ifname = inv.var("CNI_IFNAME").unwrap_or_default();
    let prev: CniResult = conf
        .prev_result
        .clone()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "CHECK needs prevResult"))
        .and_then(|p| {
            serde_json::from_value(p)
                .map_err(|e| CniError::new(code::DECODE, "cannot decode prevResult").with_details(e.to_string()))
        })?;
    if !link::netns_exists(netns) {
        return Err(CniError::new(code::UNKNOWN_CONTAINER, format!("the network namespace {netns} does not exist")));
    }
    let Some((index, expected)) =
        prev.interfaces.iter().enumerate().find(|(_, i)| i.name == ifname && i.sandbox == netns)
    else {
        return Err(CniError::new(code::CHECK_FAILED, format!("prevResult has no interface {ifname} in {netns}")));
    };
    let l = link::link(Some(netns), ifname)?
        .ok_or_else(|| CniError::new(code::CHECK_FAILED, format!("interface {ifname} is missing in the pod")))?;
    let mac = link::field(&l, "address");
    if !expected.mac.is_empty() && !mac.eq_ignore_ascii_case(&expected.mac) {
        return Err(CniError::new(
            code::CHECK_FAILED,
            format!("interface {ifname} has MAC {mac}, expected {}", expected.mac),
        ));
    }
    let have = link::addresses(Some(netns), ifname)?;
    for ipc in prev.ips.iter().filter(|i| i.interface == Some(index)) {
        if !have.contains(&ipc.address) {
            return Err(CniError::new(code::CHECK_FAILED, format!("interface {ifname} lacks address {}", ipc.address)));
        }
    }
    Ok(())
}
