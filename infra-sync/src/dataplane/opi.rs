//! The OPI dataplane: programs a DPU through an OPI EVPN gateway server
//! (`opi_api.network.evpn_gw.v1alpha1`: `VrfService`, `LogicalBridgeService`, `SviService`,
//! `BridgePortService`) over plaintext gRPC.
//!
//! - **Ids.** Every object this agent creates has the id [`opi_id`]: `xpu-` followed by the object
//!   name (`xpu-<namespace>-<name>` for namespaced kinds), lowercased, characters outside
//!   `[a-z0-9-]` replaced by `-`; an id that would be longer than 63 characters (or end with `-`,
//!   which AIP-122 ids may not) is cut to 54 characters and suffixed with `-<8 hex digits of
//!   fnv32 of the unmodified "xpu-..." string>` so that it stays unique. Create is idempotent by
//!   id, so applying twice is harmless.
//! - **Names.** The server's names (`//network.opiproject.org/vrfs/<id>`, ...) are treated as
//!   opaque: the agent keeps the name returned by Create for each [`ObjKey`] and persists that map
//!   atomically (temporary file + rename) as `<state_dir>/opi-names.json`, so a restarted agent can
//!   address what it created. Objects missing from the map are looked up by id with `List*`.
//! - **Status is asynchronous** on OPI servers: after a create or update, apply polls `Get*` until
//!   the oper status is UP (every [`OpiOptions::poll_interval`], up to
//!   [`OpiOptions::ready_timeout`]; on timeout a retryable error carries the components' state).
//!   Likewise, remove waits until the object is gone, because the server first marks it
//!   TO_BE_DELETED and still holds its references (a bridge cannot be deleted while a port being
//!   deleted still uses it).
//! - **Updates.** When the server holds an object whose spec differs from the desired one, the
//!   whole spec is replaced with `Update*` (update mask `spec`). Optional VTEP prefixes left unset
//!   in the desired spec are not compared, because servers may fill in a default VTEP.
//! - **Errors.** `INVALID_ARGUMENT`, `ALREADY_EXISTS`, `FAILED_PRECONDITION` (and `OUT_OF_RANGE`,
//!   `UNIMPLEMENTED`, `PERMISSION_DENIED`, `UNAUTHENTICATED`) are permanent: retrying cannot help
//!   until the desired object changes; the message is the server's, prefixed by the RPC name.
//!   `NOT_FOUND` (a referenced object not there yet), `UNAVAILABLE` and other transport errors are
//!   retryable. On delete, `FAILED_PRECONDITION` ("still referenced") is retryable too, since the
//!   referring objects are normally being removed first.
//! - **Flow policies** cannot be realised: the EVPN gateway API has no flow-rule service, so
//!   applying a FlowPolicy fails permanently with a message saying so (removing one succeeds,
//!   there being nothing to remove).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::{io::AsyncWriteExt, sync::Mutex};
use tonic::{
    Code, Status,
    transport::{Channel, Endpoint},
};
use tracing::{debug, info, warn};
use xpu_proto::{
    broker::v1 as pb,
    opi::{
        evpn_gw::{
            self as gw, bridge_port_service_client::BridgePortServiceClient,
            logical_bridge_service_client::LogicalBridgeServiceClient, svi_service_client::SviServiceClient,
            vrf_service_client::VrfServiceClient,
        },
        opinetcommon::{self as common, ip_address::V4OrV6},
    },
};

use super::{Dataplane, DataplaneError, Desired, DpResult, ObjKey, ObjKind, Observed, fnv32};

/// File in the state directory that maps object keys to the names the OPI server returned.
pub const STATE_FILE: &str = "opi-names.json";

/// Prefix of every id this agent creates.
pub const ID_PREFIX: &str = "xpu-";

const MAX_ID_LEN: usize = 63;

const NO_FLOW_RULES: &str =
    "the OPI EVPN gateway API has no flow rule service; FlowPolicy cannot be realised on the opi dataplane";

/// Timing of the OPI dataplane.
#[derive(Clone, Debug)]
pub struct OpiOptions {
    /// How often `Get*` is polled while waiting for an object to come UP or to disappear.
    pub poll_interval: Duration,
    /// How long apply waits for UP, and remove for the object to be gone.
    pub ready_timeout: Duration,
    /// Deadline of each RPC.
    pub request_timeout: Duration,
    /// Deadline of establishing the connection.
    pub connect_timeout: Duration,
}

impl Default for OpiOptions {
    fn default() -> OpiOptions {
        OpiOptions {
            poll_interval: Duration::from_millis(50),
            ready_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// A [`Dataplane`] that is a client of an OPI EVPN gateway server.
pub struct OpiDataplane {
    channel: Channel,
    endpoint: String,
    state_path: PathBuf,
    /// ObjKey → the OPI name Create returned; persisted at `state_path` on every change.
    names: Mutex<BTreeMap<ObjKey, String>>,
    options: OpiOptions,
}

impl OpiDataplane {
    /// Prepares a client of the OPI server at `endpoint` ("host:port" or "http://host:port"). The
    /// connection is made lazily: an unreachable server shows as retryable errors of
    /// apply/observe/remove/owned, not here. Loads `<state_dir>/opi-names.json` if present.
    pub async fn connect(endpoint: &str, state_dir: &Path) -> DpResult<OpiDataplane> {
        OpiDataplane::connect_with(endpoint, state_dir, OpiOptions::default()).await
    }

    /// As [`OpiDataplane::connect`], with explicit timing.
    pub async fn connect_with(endpoint: &str, state_dir: &Path, options: OpiOptions) -> DpResult<OpiDataplane> {
        let endpoint = endpoint.trim();
        let uri = if endpoint.starts_with("http://") {
            endpoint.to_string()
        } else if endpoint.contains("://") {
            return Err(DataplaneError::permanent(format!(
                "OPI endpoint {endpoint:?}: OPI servers serve plaintext gRPC; give host:port or http://host:port"
            )));
        } else {
            format!("http://{endpoint}")
        };
        let channel = Endpoint::from_shared(uri.clone())
            .map_err(|e| DataplaneError::permanent(format!("invalid OPI endpoint {endpoint:?}: {e}")))?
            .connect_timeout(options.connect_timeout)
            .timeout(options.request_timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        tokio::fs::create_dir_all(state_dir).await.map_err(|e| {
            DataplaneError::permanent(format!("cannot create state directory {}: {e}", state_dir.display()))
        })?;
        let state_path = state_dir.join(STATE_FILE);
        let names = load_names(&state_path).await?;
        info!(endpoint = %uri, known = names.len(), "OPI dataplane ready");
        Ok(OpiDataplane { channel, endpoint: uri, state_path, names: Mutex::new(names), options })
    }

    /// The server's URI.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The OPI name recorded for `key`, if this agent created it.
    pub async fn opi_name(&self, key: &ObjKey) -> Option<String> {
        self.names.lock().await.get(key).cloned()
    }
}

/// The id this agent gives the OPI object for `key` (see the module documentation).
pub fn opi_id(key: &ObjKey) -> String {
    let original = if key.namespace.is_empty() {
        format!("{ID_PREFIX}{}", key.name)
    } else {
        format!("{ID_PREFIX}{}-{}", key.namespace, key.name)
    };
    let mut id: String = original
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' { c } else { '-' })
        .collect();
    if id.len() > MAX_ID_LEN || id.ends_with('-') {
        // Only ASCII is left, so byte lengths are character counts.
        id.truncate(MAX_ID_LEN - 9);
        id.push_str(&format!("-{:08x}", fnv32(&original)));
    }
    id
}

/// Converts CIDR notation ("10.0.0.1/24", "fd00::1/64"; a bare address is a host prefix) to an
/// OPI `IPPrefix`: IPv4 as the big-endian value in `v4_addr` with `IP_AF_INET`, IPv6 as 16 bytes in
/// `v6_addr` with `IP_AF_INET6`.
pub fn ip_prefix(cidr: &str) -> Result<common::IpPrefix, String> {
    let s = cidr.trim();
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: IpAddr = addr.parse().map_err(|_| format!("{s:?} is not an IP address in CIDR notation"))?;
    let max: u8 = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => {
            l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| format!("{s:?} has an invalid prefix length"))?
        }
    };
    let addr = match ip {
        IpAddr::V4(a) => {
            common::IpAddress { af: common::IpAf::Inet as i32, v4_or_v6: Some(V4OrV6::V4Addr(u32::from(a))) }
        }
        IpAddr::V6(a) => {
            common::IpAddress { af: common::IpAf::Inet6 as i32, v4_or_v6: Some(V4OrV6::V6Addr(a.octets().to_vec())) }
        }
    };
    Ok(common::IpPrefix { addr: Some(addr), len: i32::from(len) })
}

/// "aa:bb:cc:dd:ee:ff" (or with '-') → 6 bytes.
pub fn parse_mac(s: &str) -> Option<Vec<u8>> {
    let parts: Vec<&str> = s.trim().split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    parts.iter().map(|p| if p.len() == 2 { u8::from_str_radix(p, 16).ok() } else { None }).collect()
}

fn fmt_mac(mac: &[u8]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The OPI service that holds a kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Svc {
    Vrf,
    Bridge,
    Svi,
    Port,
}

impl Svc {
    const ALL: [Svc; 4] = [Svc::Vrf, Svc::Bridge, Svc::Svi, Svc::Port];

    fn of(kind: ObjKind) -> Option<Svc> {
        match kind {
            ObjKind::Vrf => Some(Svc::Vrf),
            ObjKind::LogicalBridge => Some(Svc::Bridge),
            ObjKind::Svi => Some(Svc::Svi),
            ObjKind::Netdev => Some(Svc::Port),
            ObjKind::FlowPolicy => None,
        }
    }

    fn kind(self) -> ObjKind {
        match self {
            Svc::Vrf => ObjKind::Vrf,
            Svc::Bridge => ObjKind::LogicalBridge,
            Svc::Svi => ObjKind::Svi,
            Svc::Port => ObjKind::Netdev,
        }
    }

    /// The resource name in RPC names: CreateVrf, ListLogicalBridges, ...
    fn resource(self) -> &'static str {
        match self {
            Svc::Vrf => "Vrf",
            Svc::Bridge => "LogicalBridge",
            Svc::Svi => "Svi",
            Svc::Port => "BridgePort",
        }
    }

    fn op(self, verb: &str) -> String {
        if verb == "List" { format!("List{}s", self.resource()) } else { format!("{verb}{}", self.resource()) }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Spec {
    Vrf(gw::VrfSpec),
    Bridge(gw::LogicalBridgeSpec),
    Svi(gw::SviSpec),
    Port(gw::BridgePortSpec),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Oper {
    Unspecified,
    Up,
    Down,
    ToBeDeleted,
}

impl Oper {
    /// The four `*OperStatus` enums share their numbers.
    fn from_i32(v: i32) -> Oper {
        match v {
            1 => Oper::Up,
            2 => Oper::Down,
            3 => Oper::ToBeDeleted,
            _ => Oper::Unspecified,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Oper::Unspecified => "",
            Oper::Up => "UP",
            Oper::Down => "DOWN",
            Oper::ToBeDeleted => "TO_BE_DELETED",
        }
    }
}

/// An OPI object, whatever its kind.
#[derive(Clone, Debug)]
struct View {
    name: String,
    spec: Option<Spec>,
    oper: Oper,
    components: Vec<gw::Component>,
}

impl View {
    fn new(name: String, spec: Option<Spec>, status: Option<(i32, Vec<gw::Component>)>) -> View {
        let (oper, components) = status.unwrap_or_default();
        View { name, spec, oper: Oper::from_i32(oper), components }
    }

    fn components_text(&self) -> String {
        if self.components.is_empty() {
            return "none reported".into();
        }
        self.components
            .iter()
            .map(|c| {
                let status = comp_status(c.status);
                if c.details.is_empty() {
                    format!("{}={status}", c.name)
                } else {
                    format!("{}={status} ({})", c.name, c.details)
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl From<gw::Vrf> for View {
    fn from(o: gw::Vrf) -> View {
        View::new(o.name, o.spec.map(Spec::Vrf), o.status.map(|s| (s.oper_status, s.components)))
    }
}
impl From<gw::LogicalBridge> for View {
    fn from(o: gw::LogicalBridge) -> View {
        View::new(o.name, o.spec.map(Spec::Bridge), o.status.map(|s| (s.oper_status, s.components)))
    }
}
impl From<gw::Svi> for View {
    fn from(o: gw::Svi) -> View {
        View::new(o.name, o.spec.map(Spec::Svi), o.status.map(|s| (s.oper_status, s.components)))
    }
}
impl From<gw::BridgePort> for View {
    fn from(o: gw::BridgePort) -> View {
        View::new(o.name, o.spec.map(Spec::Port), o.status.map(|s| (s.oper_status, s.components)))
    }
}

fn comp_status(v: i32) -> &'static str {
    match gw::CompStatus::try_from(v) {
        Ok(gw::CompStatus::Pending) => "PENDING",
        Ok(gw::CompStatus::Success) => "SUCCESS",
        Ok(gw::CompStatus::Error) => "ERROR",
        _ => "UNSPECIFIED",
    }
}

/// Classifies a gRPC error of `op` (see the module documentation).
fn grpc_error(op: &str, st: &Status) -> DataplaneError {
    let message = if st.message().is_empty() { st.code().description().to_string() } else { st.message().to_string() };
    match st.code() {
        Code::InvalidArgument
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::PermissionDenied
        | Code::Unauthenticated => DataplaneError::permanent(format!("{op}: {message}")),
        code => DataplaneError::retry(format!("{op}: {message} ({code:?})")),
    }
}

/// Whether the programmed spec is the desired one. VTEP prefixes the desired spec leaves unset are
/// not compared (servers may fill in a default); bridge lists are compared as sets.
fn spec_matches(want: &Spec, have: Option<&Spec>) -> bool {
    match (want, have) {
        (Spec::Vrf(w), Some(Spec::Vrf(h))) => {
            w.vni == h.vni
                && w.loopback_ip_prefix == h.loopback_ip_prefix
                && (w.vtep_ip_prefix.is_none() || w.vtep_ip_prefix == h.vtep_ip_prefix)
        }
        (Spec::Bridge(w), Some(Spec::Bridge(h))) => {
            w.vlan_id == h.vlan_id
                && w.vni == h.vni
                && (w.vtep_ip_prefix.is_none() || w.vtep_ip_prefix == h.vtep_ip_prefix)
        }
        (Spec::Port(w), Some(Spec::Port(h))) => {
            let mut a = w.logical_bridges.clone();
            let mut b = h.logical_bridges.clone();
            a.sort();
            b.sort();
            w.mac_address == h.mac_address && w.ptype == h.ptype && a == b
        }
        (Spec::Svi(w), Some(Spec::Svi(h))) => w == h,
        _ => false,
    }
}

fn last_segment(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

fn observed(view: &View, netdev: Option<&pb::NetdevSpec>) -> Observed {
    let mut o = Observed {
        oper_status: view.oper.as_str().to_string(),
        components: view
            .components
            .iter()
            .map(|c| pb::Component {
                name: c.name.clone(),
                status: comp_status(c.status).into(),
                details: c.details.clone(),
            })
            .collect(),
        ..Observed::default()
    };
    if let Some(spec) = netdev {
        o.mac = match &view.spec {
            Some(Spec::Port(p)) if p.mac_address.len() == 6 => fmt_mac(&p.mac_address),
            _ => spec.mac_address.trim().to_ascii_lowercase(),
        };
        o.ip = spec.ipam.as_ref().map(|i| i.address.clone()).unwrap_or_default();
        o.port_name = view.name.clone();
    }
    o
}

fn netdev_spec(obj: &Desired) -> Option<&pb::NetdevSpec> {
    match obj {
        Desired::Netdev { spec, .. } => Some(spec),
        _ => None,
    }
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct NamesFile {
    #[serde(default)]
    objects: Vec<NameEntry>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct NameEntry {
    kind: ObjKind,
    #[serde(default)]
    namespace: String,
    name: String,
    opi_name: String,
}

async fn load_names(path: &Path) -> DpResult<BTreeMap<ObjKey, String>> {
    let bytes = match tokio::fs::read(path).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(DataplaneError::permanent(format!("cannot read {}: {e}", path.display()))),
    };
    match serde_json::from_slice::<NamesFile>(&bytes) {
        Ok(file) => Ok(file
            .objects
            .into_iter()
            .map(|e| (ObjKey { kind: e.kind, namespace: e.namespace, name: e.name }, e.opi_name))
            .collect()),
        Err(e) => {
            // Ids are derived from keys, so everything can still be found by listing.
            warn!(path = %path.display(), error = %e, "ignoring an unreadable OPI name map; objects will be found by id");
            Ok(BTreeMap::new())
        }
    }
}

async fn persist_names(path: &Path, names: &BTreeMap<ObjKey, String>) -> DpResult<()> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        DataplaneError::retry(format!("cannot persist the OPI name map {}: {what}: {e}", path.display()))
    };
    let file = NamesFile {
        objects: names
            .iter()
            .map(|(k, n)| NameEntry {
                kind: k.kind,
                namespace: k.namespace.clone(),
                name: k.name.clone(),
                opi_name: n.clone(),
            })
            .collect(),
    };
    let json = serde_json::to_vec_pretty(&file).map_err(|e| fail("encode", &e))?;
    let tmp = path.with_extension("json.tmp");
    let mut f = tokio::fs::File::create(&tmp).await.map_err(|e| fail("create", &e))?;
    f.write_all(&json).await.map_err(|e| fail("write", &e))?;
    f.sync_all().await.map_err(|e| fail("sync", &e))?;
    drop(f);
    tokio::fs::rename(&tmp, path).await.map_err(|e| fail("rename", &e))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = tokio::fs::File::open(dir).await
    {
        // Makes the rename itself durable; not every platform allows syncing a directory.
        let _ = d.sync_all().await;
    }
    Ok(())
}

// The RPCs, one match arm per service.
impl OpiDataplane {
    fn vrfs(&self) -> VrfServiceClient<Channel> {
        VrfServiceClient::new(self.channel.clone())
    }
    fn bridges(&self) -> LogicalBridgeServiceClient<Channel> {
        LogicalBridgeServiceClient::new(self.channel.clone())
    }
    fn svis(&self) -> SviServiceClient<Channel> {
        SviServiceClient::new(self.channel.clone())
    }
    fn ports(&self) -> BridgePortServiceClient<Channel> {
        BridgePortServiceClient::new(self.channel.clone())
    }

    async fn rpc_create(&self, id: &str, spec: Spec) -> Result<View, Status> {
        let id = id.to_string();
        Ok(match spec {
            Spec::Vrf(spec) => {
                let vrf = Some(gw::Vrf { spec: Some(spec), ..Default::default() });
                self.vrfs().create_vrf(gw::CreateVrfRequest { vrf_id: id, vrf }).await?.into_inner().into()
            }
            Spec::Bridge(spec) => {
                let logical_bridge = Some(gw::LogicalBridge { spec: Some(spec), ..Default::default() });
                let req = gw::CreateLogicalBridgeRequest { logical_bridge_id: id, logical_bridge };
                self.bridges().create_logical_bridge(req).await?.into_inner().into()
            }
            Spec::Svi(spec) => {
                let svi = Some(gw::Svi { spec: Some(spec), ..Default::default() });
                self.svis().create_svi(gw::CreateSviRequest { svi_id: id, svi }).await?.into_inner().into()
            }
            Spec::Port(spec) => {
                let bridge_port = Some(gw::BridgePort { spec: Some(spec), ..Default::default() });
                let req = gw::CreateBridgePortRequest { bridge_port_id: id, bridge_port };
                self.ports().create_bridge_port(req).await?.into_inner().into()
            }
        })
    }

    /// Replaces the whole spec of `name`.
    async fn rpc_update(&self, name: &str, spec: Spec) -> Result<View, Status> {
        let name = name.to_string();
        let update_mask = Some(prost_types::FieldMask { paths: vec!["spec".into()] });
        Ok(match spec {
            Spec::Vrf(spec) => {
                let vrf = Some(gw::Vrf { name, spec: Some(spec), status: None });
                let req = gw::UpdateVrfRequest { vrf, update_mask, allow_missing: false };
                self.vrfs().update_vrf(req).await?.into_inner().into()
            }
            Spec::Bridge(spec) => {
                let logical_bridge = Some(gw::LogicalBridge { name, spec: Some(spec), status: None });
                let req = gw::UpdateLogicalBridgeRequest { logical_bridge, update_mask, allow_missing: false };
                self.bridges().update_logical_bridge(req).await?.into_inner().into()
            }
            Spec::Svi(spec) => {
                let svi = Some(gw::Svi { name, spec: Some(spec), status: None });
                let req = gw::UpdateSviRequest { svi, update_mask, allow_missing: false };
                self.svis().update_svi(req).await?.into_inner().into()
            }
            Spec::Port(spec) => {
                let bridge_port = Some(gw::BridgePort { name, spec: Some(spec), status: None });
                let req = gw::UpdateBridgePortRequest { bridge_port, update_mask, allow_missing: false };
                self.ports().update_bridge_port(req).await?.into_inner().into()
            }
        })
    }

    async fn rpc_get(&self, svc: Svc, name: &str) -> Result<View, Status> {
        let name = name.to_string();
        Ok(match svc {
            Svc::Vrf => self.vrfs().get_vrf(gw::GetVrfRequest { name }).await?.into_inner().into(),
            Svc::Bridge => {
                self.bridges().get_logical_bridge(gw::GetLogicalBridgeRequest { name }).await?.into_inner().into()
            }
            Svc::Svi => self.svis().get_svi(gw::GetSviRequest { name }).await?.into_inner().into(),
            Svc::Port => self.ports().get_bridge_port(gw::GetBridgePortRequest { name }).await?.into_inner().into(),
        })
    }

    async fn rpc_delete(&self, svc: Svc, name: &str) -> Result<(), Status> {
        let name = name.to_string();
        let allow_missing = true;
        match svc {
            Svc::Vrf => self.vrfs().delete_vrf(gw::DeleteVrfRequest { name, allow_missing }).await?,
            Svc::Bridge => {
                let req = gw::DeleteLogicalBridgeRequest { name, allow_missing };
                self.bridges().delete_logical_bridge(req).await?
            }
            Svc::Svi => self.svis().delete_svi(gw::DeleteSviRequest { name, allow_missing }).await?,
            Svc::Port => self.ports().delete_bridge_port(gw::DeleteBridgePortRequest { name, allow_missing }).await?,
        };
        Ok(())
    }

    async fn rpc_list(&self, svc: Svc, page_token: String) -> Result<(Vec<View>, String), Status> {
        let page_size = 100;
        Ok(match svc {
            Svc::Vrf => {
                let r = self.vrfs().list_vrfs(gw::ListVrfsRequest { page_size, page_token }).await?.into_inner();
                (r.vrfs.into_iter().map(View::from).collect(), r.next_page_token)
            }
            Svc::Bridge => {
                let req = gw::ListLogicalBridgesRequest { page_size, page_token };
                let r = self.bridges().list_logical_bridges(req).await?.into_inner();
                (r.logical_bridges.into_iter().map(View::from).collect(), r.next_page_token)
            }
            Svc::Svi => {
                let r = self.svis().list_svis(gw::ListSvisRequest { page_size, page_token }).await?.into_inner();
                (r.svis.into_iter().map(View::from).collect(), r.next_page_token)
            }
            Svc::Port => {
                let req = gw::ListBridgePortsRequest { page_size, page_token };
                let r = self.ports().list_bridge_ports(req).await?.into_inner();
                (r.bridge_ports.into_iter().map(View::from).collect(), r.next_page_token)
            }
        })
    }
}

// The logic on top of the RPCs.
impl OpiDataplane {
    /// Every object of a service, following pages. The reference server answers NOT_FOUND when a
    /// kind never had any object; that counts as empty.
    async fn list_all(&self, svc: Svc) -> DpResult<Vec<View>> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let (items, next) = match self.rpc_list(svc, token.clone()).await {
                Ok(page) => page,
                Err(s) if s.code() == Code::NotFound => return Ok(out),
                Err(s) => return Err(grpc_error(&svc.op("List"), &s)),
            };
            out.extend(items);
            if next.is_empty() || next == token {
                return Ok(out);
            }
            token = next;
        }
    }

    async fn find_by_id(&self, svc: Svc, id: &str) -> DpResult<Option<String>> {
        Ok(self.list_all(svc).await?.into_iter().map(|v| v.name).find(|n| last_segment(n) == id))
    }

    /// The OPI name of `key`: from the map, else found on the server by id.
    async fn lookup(&self, key: &ObjKey, svc: Svc) -> DpResult<Option<String>> {
        if let Some(name) = self.names.lock().await.get(key) {
            return Ok(Some(name.clone()));
        }
        self.find_by_id(svc, &opi_id(key)).await
    }

    /// The OPI name of a referenced Vrf or LogicalBridge, which must have been programmed first.
    async fn reference(&self, kind: ObjKind, name: &str, what: &str) -> DpResult<String> {
        let key = ObjKey::new(kind, "", name);
        let svc = Svc::of(kind).ok_or_else(|| DataplaneError::permanent(format!("{kind:?} cannot be referenced")))?;
        match self.lookup(&key, svc).await? {
            Some(n) => Ok(n),
            None => Err(DataplaneError::retry(format!("{what} {name} is not programmed yet"))),
        }
    }

    async fn remember(&self, key: &ObjKey, name: &str) -> DpResult<()> {
        let mut names = self.names.lock().await;
        if names.get(key).map(String::as_str) == Some(name) {
            return Ok(());
        }
        names.insert(key.clone(), name.to_string());
        persist_names(&self.state_path, &names).await
    }

    async fn forget(&self, key: &ObjKey) -> DpResult<()> {
        let mut names = self.names.lock().await;
        if names.remove(key).is_none() {
            return Ok(());
        }
        persist_names(&self.state_path, &names).await
    }

    /// The OPI spec for a desired object.
    async fn want(&self, obj: &Desired) -> DpResult<Spec> {
        let key = obj.key();
        let prefix = |field: &str, value: &str| -> DpResult<Option<common::IpPrefix>> {
            if value.trim().is_empty() {
                return Ok(None);
            }
            ip_prefix(value).map(Some).map_err(|e| DataplaneError::permanent(format!("{key}: {field}: {e}")))
        };
        let mac = |value: &str| -> DpResult<Vec<u8>> {
            if value.trim().is_empty() {
                return Err(DataplaneError::permanent(format!("{key}: mac_address is empty")));
            }
            parse_mac(value).ok_or_else(|| {
                DataplaneError::permanent(format!(
                    "{key}: mac_address {value:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"
                ))
            })
        };
        Ok(match obj {
            Desired::Vrf { spec, .. } => Spec::Vrf(gw::VrfSpec {
                vni: spec.vni,
                loopback_ip_prefix: prefix("loopback_ip_prefix", &spec.loopback_ip_prefix)?,
                vtep_ip_prefix: prefix("vtep_ip_prefix", &spec.vtep_ip_prefix)?,
            }),
            Desired::LogicalBridge { spec, .. } => Spec::Bridge(gw::LogicalBridgeSpec {
                vlan_id: spec.vlan_id,
                vni: spec.vni,
                vtep_ip_prefix: prefix("vtep_ip_prefix", &spec.vtep_ip_prefix)?,
            }),
            Desired::Svi { spec, .. } => Spec::Svi(gw::SviSpec {
                vrf: self.reference(ObjKind::Vrf, &spec.vrf, "vrf").await?,
                logical_bridge: self.reference(ObjKind::LogicalBridge, &spec.logical_bridge, "logical bridge").await?,
                mac_address: mac(&spec.mac_address)?,
                gw_ip_prefix: spec
                    .gw_ip_prefix
                    .iter()
                    .map(|p| ip_prefix(p).map_err(|e| DataplaneError::permanent(format!("{key}: gw_ip_prefix: {e}"))))
                    .collect::<DpResult<_>>()?,
                enable_bgp: spec.enable_bgp,
                remote_as: spec.remote_as,
            }),
            Desired::Netdev { spec, .. } => {
                let ptype = match spec.port_type.trim().to_ascii_lowercase().as_str() {
                    "access" => gw::BridgePortType::Access,
                    "trunk" => gw::BridgePortType::Trunk,
                    "" if spec.logical_bridges.len() == 1 => gw::BridgePortType::Access,
                    "" => gw::BridgePortType::Trunk,
                    other => {
                        return Err(DataplaneError::permanent(format!(
                            "{key}: port_type {other:?} is neither \"access\" nor \"trunk\""
                        )));
                    }
                };
                let mut logical_bridges = Vec::with_capacity(spec.logical_bridges.len());
                for lb in &spec.logical_bridges {
                    logical_bridges.push(self.reference(ObjKind::LogicalBridge, lb, "logical bridge").await?);
                }
                Spec::Port(gw::BridgePortSpec {
                    mac_address: mac(&spec.mac_address)?,
                    ptype: ptype as i32,
                    logical_bridges,
                })
            }
            Desired::FlowPolicy { .. } => return Err(DataplaneError::permanent(NO_FLOW_RULES)),
        })
    }

    async fn create_remembered(&self, key: &ObjKey, svc: Svc, want: &Spec) -> DpResult<View> {
        let view = self.rpc_create(&opi_id(key), want.clone()).await.map_err(|s| grpc_error(&svc.op("Create"), &s))?;
        self.remember(key, &view.name).await?;
        Ok(view)
    }

    /// Creates or updates the object so that the server holds `want`, then waits for UP.
    async fn ensure(&self, key: &ObjKey, svc: Svc, want: Spec) -> DpResult<View> {
        let known = self.names.lock().await.get(key).cloned();
        let mut current = None;
        if let Some(name) = &known {
            match self.rpc_get(svc, name).await {
                Ok(v) => current = Some(v),
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(grpc_error(&svc.op("Get"), &s)),
            }
        }
        let mut view = match current {
            Some(v) => v,
            None => self.create_remembered(key, svc, &want).await?,
        };
        if view.oper == Oper::ToBeDeleted {
            // An earlier incarnation is still being deleted: wait for it to go, then create anew.
            debug!(object = %key, name = %view.name, "waiting for a deletion to finish before creating");
            self.wait_gone(svc, &view.name).await?;
            view = self.create_remembered(key, svc, &want).await?;
        }
        let mut op = svc.op("Create");
        if !spec_matches(&want, view.spec.as_ref()) {
            op = svc.op("Update");
            info!(object = %key, name = %view.name, "the programmed spec differs; updating");
            view = self.rpc_update(&view.name, want).await.map_err(|s| grpc_error(&op, &s))?;
        }
        if view.oper == Oper::Up {
            return Ok(view);
        }
        self.wait_up(svc, &view.name, &op).await
    }

    /// Polls until `name` is UP.
    async fn wait_up(&self, svc: Svc, name: &str, op: &str) -> DpResult<View> {
        let deadline = Instant::now() + self.options.ready_timeout;
        loop {
            let view = self.rpc_get(svc, name).await.map_err(|s| grpc_error(&svc.op("Get"), &s))?;
            match view.oper {
                Oper::Up => return Ok(view),
                Oper::ToBeDeleted => {
                    return Err(DataplaneError::retry(format!("{op}: {name} is being deleted (TO_BE_DELETED)")));
                }
                Oper::Down | Oper::Unspecified => {}
            }
            if Instant::now() >= deadline {
                return Err(DataplaneError::retry(format!(
                    "{op}: {name} is not UP after {:?}: oper status {}, components: {}",
                    self.options.ready_timeout,
                    if view.oper == Oper::Down { "DOWN" } else { "UNSPECIFIED" },
                    view.components_text()
                )));
            }
            tokio::time::sleep(self.options.poll_interval).await;
        }
    }

    /// Polls until `name` no longer exists.
    async fn wait_gone(&self, svc: Svc, name: &str) -> DpResult<()> {
        let deadline = Instant::now() + self.options.ready_timeout;
        loop {
            let view = match self.rpc_get(svc, name).await {
                Err(s) if s.code() == Code::NotFound => return Ok(()),
                Err(s) => return Err(grpc_error(&svc.op("Get"), &s)),
                Ok(v) => v,
            };
            if Instant::now() >= deadline {
                return Err(DataplaneError::retry(format!(
                    "{}: {name} is still present after {:?}: oper status {}, components: {}",
                    svc.op("Delete"),
                    self.options.ready_timeout,
                    view.oper.as_str(),
                    view.components_text()
                )));
            }
            tokio::time::sleep(self.options.poll_interval).await;
        }
    }
}

#[async_trait::async_trait]
impl Dataplane for OpiDataplane {
    fn name(&self) -> &'static str {
        "opi"
    }

    fn capabilities(&self) -> BTreeMap<String, bool> {
        BTreeMap::from([("opi-evpn-gw".to_string(), true), ("flow-rules".to_string(), false)])
    }

    /// FlowPolicy: refused permanently, as the EVPN gateway API has no flow-rule service.
    async fn apply(&self, obj: &Desired) -> DpResult<Observed> {
        let key = obj.key();
        let Some(svc) = Svc::of(key.kind) else {
            return Err(DataplaneError::permanent(NO_FLOW_RULES));
        };
        let want = self.want(obj).await?;
        let view = self.ensure(&key, svc, want).await?;
        debug!(object = %key, name = %view.name, "programmed and UP");
        Ok(observed(&view, netdev_spec(obj)))
    }

    async fn observe(&self, obj: &Desired) -> DpResult<Observed> {
        let key = obj.key();
        let Some(svc) = Svc::of(key.kind) else {
            return Err(DataplaneError::permanent(NO_FLOW_RULES));
        };
        let Some(name) = self.lookup(&key, svc).await? else {
            return Err(DataplaneError::retry(format!("{key} is not programmed on the OPI server")));
        };
        let view = self.rpc_get(svc, &name).await.map_err(|s| grpc_error(&svc.op("Get"), &s))?;
        Ok(observed(&view, netdev_spec(obj)))
    }

    /// Deletes with `allow_missing` (NOT_FOUND counts as done too) and waits until the server no
    /// longer holds the object. An object missing from the name map is found by its id.
    async fn remove(&self, key: &ObjKey, _last: Option<&Desired>) -> DpResult<()> {
        let Some(svc) = Svc::of(key.kind) else {
            // Flow policies are never programmed on this backend.
            return Ok(());
        };
        if let Some(name) = self.lookup(key, svc).await? {
            let op = svc.op("Delete");
            match self.rpc_delete(svc, &name).await {
                Ok(()) => {}
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) if s.code() == Code::FailedPrecondition => {
                    return Err(DataplaneError::retry(format!("{op}: {}", s.message())));
                }
                Err(s) => return Err(grpc_error(&op, &s)),
            }
            self.wait_gone(svc, &name).await?;
            info!(object = %key, %name, "removed from the OPI server");
        }
        self.forget(key).await
    }

    /// Every object on the server whose id starts with `xpu-`. Objects the name map knows are
    /// reported under their key. For others (e.g. after the map was lost) the key is derived from
    /// the id: kind from the service, name = the id without `xpu-`, namespace empty. That key is
    /// exact for cluster-scoped objects whose names needed no rewriting; for the rest it is still a
    /// key whose [`opi_id`] is the same id, so [`Dataplane::remove`] removes the object.
    async fn owned(&self) -> DpResult<Vec<ObjKey>> {
        let by_name: HashMap<String, ObjKey> =
            self.names.lock().await.iter().map(|(k, n)| (n.clone(), k.clone())).collect();
        let mut out = Vec::new();
        for svc in Svc::ALL {
            for view in self.list_all(svc).await? {
                let Some(rest) = last_segment(&view.name).strip_prefix(ID_PREFIX) else { continue };
                match by_name.get(&view.name) {
                    Some(key) => out.push(key.clone()),
                    None if !rest.is_empty() => out.push(ObjKey::new(svc.kind(), "", rest)),
                    None => {}
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert_eq!(opi_id(&ObjKey::new(ObjKind::Vrf, "", "blue")), "xpu-blue");
        assert_eq!(opi_id(&ObjKey::new(ObjKind::Netdev, "default", "DPU1-pf0-vf2")), "xpu-default-dpu1-pf0-vf2");
        assert_eq!(opi_id(&ObjKey::new(ObjKind::LogicalBridge, "", "a.b_c")), "xpu-a-b-c");
        let long = "n".repeat(80);
        let id = opi_id(&ObjKey::new(ObjKind::Netdev, "ns", &long));
        assert_eq!(id.len(), 63);
        assert!(id.starts_with("xpu-ns-nnnn"));
        assert!(id.ends_with(&format!("-{:08x}", fnv32(&format!("xpu-ns-{long}")))));
        let other = opi_id(&ObjKey::new(ObjKind::Netdev, "ns", format!("{long}x")));
        assert_ne!(id, other);
        // A derived key maps back to the same id.
        let derived = ObjKey::new(ObjKind::Netdev, "", id.strip_prefix(ID_PREFIX).unwrap());
        assert_eq!(opi_id(&derived), id);
        assert!(!opi_id(&ObjKey::new(ObjKind::Vrf, "", "x.")).ends_with('-'));
    }

    #[test]
    fn prefixes() {
        let p = ip_prefix("10.0.0.2/24").unwrap();
        assert_eq!(p.len, 24);
        let a = p.addr.unwrap();
        assert_eq!(a.af, common::IpAf::Inet as i32);
        assert_eq!(a.v4_or_v6, Some(V4OrV6::V4Addr(167_772_162)));
        let p6 = ip_prefix("fd00::1/64").unwrap();
        assert_eq!(p6.len, 64);
        let a6 = p6.addr.unwrap();
        assert_eq!(a6.af, common::IpAf::Inet6 as i32);
        let bytes = vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(a6.v4_or_v6, Some(V4OrV6::V6Addr(bytes)));
        assert_eq!(ip_prefix("10.0.0.1").unwrap().len, 32);
        assert!(ip_prefix("10.0.0.1/33").is_err());
        assert!(ip_prefix("nonsense/8").is_err());
    }

    #[test]
    fn macs() {
        assert_eq!(parse_mac("aa:bb:cc:00:00:01"), Some(vec![0xaa, 0xbb, 0xcc, 0, 0, 1]));
        assert_eq!(parse_mac("AA-BB-CC-00-00-01"), Some(vec![0xaa, 0xbb, 0xcc, 0, 0, 1]));
        assert_eq!(parse_mac("aa:bb:cc:00:00"), None);
        assert_eq!(parse_mac("aa:bb:cc:00:00:zz"), None);
        assert_eq!(fmt_mac(&[0xaa, 0xbb, 0xcc, 0, 0, 1]), "aa:bb:cc:00:00:01");
    }

    #[test]
    fn classification() {
        assert!(!grpc_error("CreateBridgePort", &Status::already_exists("dup")).retryable);
        assert!(!grpc_error("CreateBridgePort", &Status::invalid_argument("bad")).retryable);
        assert!(!grpc_error("CreateBridgePort", &Status::failed_precondition("no")).retryable);
        assert!(grpc_error("CreateBridgePort", &Status::not_found("lb")).retryable);
        assert!(grpc_error("CreateBridgePort", &Status::unavailable("down")).retryable);
        assert_eq!(grpc_error("CreateBridgePort", &Status::already_exists("dup")).message, "CreateBridgePort: dup");
    }
}
