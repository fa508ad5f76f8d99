//! The status API's reads, as views for operators: the fleet summary, DPUs, cluster syncers,
//! netdevs with their history, fabric objects and flow policies with per-DPU status, and the
//! sync SLIs. Transport-neutral; `rest` serves them as JSON.
//!
//! Every read is bounded: lists are pages of at most [`MAX_LIMIT`] in key order (keyset
//! pagination, no offsets), a history at most [`MAX_HISTORY`] log entries, and the fleet
//! summary (which counts the whole fleet) is recomputed at most once per [`FLEET_TTL`] however
//! many dashboards poll it.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::Mutex;
use utoipa::ToSchema;
use xpu_proto::broker::v1 as pb;

use super::Context;
use crate::{
    error::{Error, Result},
    hub::StreamClass,
    identity::{Identity, Side},
    metrics,
    model::{
        Key, Kind, Labels,
        convert::{resource_from_stored, timestamp},
        event::{ChangeKind, Event},
        object::StoredObject,
        validate,
    },
    store::rows::NetdevQuery,
};

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;
pub const DEFAULT_HISTORY: usize = 100;
pub const MAX_HISTORY: usize = 1000;
pub const FLEET_TTL: Duration = Duration::from_secs(2);

/// Netdev phases a filter may name.
pub const NETDEV_PHASES: [&str; 5] = ["Pending", "Connecting", "Connected", "Disconnected", "Error"];

/// A page request: how many, and where the previous page ended.
#[derive(Clone, Debug, Default)]
pub struct PageArgs {
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
}

impl PageArgs {
    fn limit(&self) -> Result<usize> {
        match self.limit {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(n) => Err(Error::invalid("limit", format!("{n} is out of range 1..={MAX_LIMIT}"))),
        }
    }

    /// The (namespace, name) after which the page starts.
    fn after(&self) -> Result<Option<(String, String)>> {
        let Some(token) = self.continue_token.as_deref().filter(|t| !t.is_empty()) else { return Ok(None) };
        let bad = || Error::invalid("continue", "not a token this API returned");
        let bytes = B64.decode(token).map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let (ns, name) = text.split_once('\0').ok_or_else(bad)?;
        Ok(Some((ns.to_string(), name.to_string())))
    }

    /// [`after`](Self::after) for a page of one kind: no part may hold a NUL (only the
    /// all-kinds fabric token nests one more), which no name has and the store cannot look up.
    fn after_key(&self) -> Result<Option<(String, String)>> {
        let after = self.after()?;
        if after.as_ref().is_some_and(|(_, name)| name.contains('\0')) {
            return Err(Error::invalid("continue", "not a token this API returned"));
        }
        Ok(after)
    }
}

fn continue_token(items: &[StoredObject], limit: usize) -> Option<String> {
    if items.len() < limit {
        return None;
    }
    items.last().map(|o| B64.encode(format!("{}\0{}", o.key.namespace, o.key.name)))
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

// ---- views ----

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct DpuCounts {
    pub total: u64,
    pub ready: u64,
    pub unknown: u64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct NetdevCounts {
    pub total: u64,
    /// Netdevs on DPUs whose lease lapsed: their status may be out of date.
    pub stale: u64,
    pub by_phase: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct StreamCounts {
    pub total: u64,
    /// By client class: agent, cluster, admin.
    pub by_kind: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Rates {
    /// Spec changes and deletes per second over the last minute.
    pub writes_per_second: f64,
    /// Status changes per second over the last minute.
    pub statuses_per_second: f64,
}

/// The fleet at a glance.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Fleet {
    pub revision: i64,
    pub compacted_revision: i64,
    /// "postgres" or "sqlite".
    pub store: String,
    pub dpus: DpuCounts,
    pub netdevs: NetdevCounts,
    pub objects: BTreeMap<String, u64>,
    pub streams: StreamCounts,
    pub rates: Rates,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Inventory {
    pub product: String,
    pub pf_count: u32,
    pub vf_count: u32,
    pub sf_count: u32,
    pub capabilities: BTreeMap<String, bool>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: Option<String>,
}

/// One DPU: its lease, its agent, and how far it is behind.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Dpu {
    pub serial: String,
    pub product: String,
    pub infra_node: String,
    pub tenant_node: String,
    pub labels: BTreeMap<String, String>,
    /// "Ready" while the lease is current, "Unknown" once it lapsed.
    pub lease_state: String,
    /// The lease lapsed: what this DPU last reported may be out of date.
    pub stale: bool,
    pub last_heartbeat: Option<String>,
    /// Seconds since the last heartbeat.
    pub lease_age_seconds: Option<f64>,
    pub lease_duration_seconds: u32,
    pub agent_version: String,
    /// "linux", "opi" or "" before the agent registered.
    pub dataplane: String,
    pub inventory: Option<Inventory>,
    /// Last revision the agent reported as applied.
    pub applied_revision: i64,
    /// Revisions between the store's head and `applied_revision`.
    pub revision_lag: i64,
    pub netdevs: u64,
    /// Netdevs the DPU has not yet reported at their current generation.
    pub pending: u64,
    pub last_error: Option<String>,
    pub registered_at: Option<String>,
    /// Its desired-state stream is open on the replica that answered.
    pub connected: bool,
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct DpuPage {
    pub items: Vec<Dpu>,
    /// Pass as `continue` for the next page; absent on the last page.
    #[serde(rename = "continue")]
    pub continue_token: Option<String>,
    pub revision: i64,
}

/// A cluster syncer's watch stream on the replica that answered.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ClusterSync {
    pub identity: String,
    pub cluster: String,
    /// "tenant" or "infra".
    pub side: String,
    pub connected_since: String,
    /// The revision the syncer resumed from (the last one it had persisted; 0: a full list).
    pub resumed_from: i64,
    /// The last revision sent to it.
    pub delivered_revision: i64,
    pub lag: i64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ClusterList {
    pub items: Vec<ClusterSync>,
}

/// A pod interface and where it stands.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Netdev {
    /// The netdev id (also the object's name).
    pub id: String,
    pub namespace: String,
    pub name: String,
    pub dpu: String,
    /// The tenant node that owns the VF.
    pub node: String,
    /// "namespace/name" of the pod, once attached.
    pub pod: Option<String>,
    pub interface: Option<String>,
    pub network: String,
    /// Pending, Connecting, Connected, Disconnected or Error.
    pub phase: String,
    pub ip: Option<String>,
    pub mac: Option<String>,
    pub generation: i64,
    pub observed_generation: i64,
    /// The DPU's lease lapsed: this status may be out of date.
    pub stale: bool,
    pub message: Option<String>,
    pub updated_at: Option<String>,
    pub revision: i64,
    /// Set when the netdev was deleted (the view is its tombstone).
    pub deleted_revision: Option<i64>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct NetdevPage {
    pub items: Vec<Netdev>,
    #[serde(rename = "continue")]
    pub continue_token: Option<String>,
    pub revision: i64,
}

/// One revision-log entry that touched an object.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct HistoryEntry {
    pub revision: i64,
    pub at: String,
    /// "spec", "status" or "deleted".
    pub change: String,
    pub author: String,
    pub generation: i64,
    pub observed_generation: i64,
    pub summary: String,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct NetdevDetail {
    pub netdev: Netdev,
    /// Newest first. Entries older than the log's compaction horizon are gone.
    pub history: Vec<HistoryEntry>,
    pub compacted_revision: i64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct RuleCounters {
    pub name: String,
    pub programmed: bool,
    /// "hardware", "software" or "none".
    pub offload: String,
    pub packets: u64,
    pub bytes: u64,
}

/// How one DPU realised a fabric object or flow policy.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct DpuRealisation {
    pub serial: String,
    /// "Pending", "Programmed" or "Error".
    pub phase: String,
    pub observed_generation: i64,
    pub message: Option<String>,
    pub stale: bool,
    pub rules: Vec<RuleCounters>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct FabricObject {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    /// DPUs that programmed the current generation.
    pub ready: u64,
    /// DPUs that reported on it.
    pub total: u64,
    pub dpus: Vec<DpuRealisation>,
    /// XpuNetwork only: addresses allocated and the pool's size.
    pub allocated: Option<u64>,
    pub capacity: Option<u64>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct FabricPage {
    pub items: Vec<FabricObject>,
    #[serde(rename = "continue")]
    pub continue_token: Option<String>,
    pub revision: i64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct FlowPolicy {
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    pub rules: u64,
    pub dpus: Vec<DpuRealisation>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct FlowPolicyPage {
    pub items: Vec<FlowPolicy>,
    #[serde(rename = "continue")]
    pub continue_token: Option<String>,
    pub revision: i64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct SliSample {
    pub at: String,
    /// Attach round trip over the trailing minute; absent when there was no attach.
    pub attach_p50_ms: Option<f64>,
    pub attach_p99_ms: Option<f64>,
    /// Attaches in the trailing minute.
    pub attaches: u64,
    pub writes_per_second: f64,
    pub statuses_per_second: f64,
    pub streams: u64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Sli {
    pub interval_seconds: u64,
    /// Oldest first.
    pub samples: Vec<SliSample>,
}

// ---- reads ----

/// The last fleet summary and when it was computed.
#[derive(Default)]
pub struct FleetCache(Mutex<Option<(Instant, Fleet)>>);

pub async fn fleet(ctx: &Context) -> Result<Fleet> {
    // One computation at a time; callers within the TTL share its result.
    let mut cached = ctx.fleet_cache.0.lock().await;
    if let Some((at, f)) = cached.as_ref()
        && at.elapsed() < FLEET_TTL
    {
        return Ok(f.clone());
    }
    let (revision, compacted_revision) = ctx.store.head().await?;
    let counts = ctx.store.fleet_counts().await?;
    let streams = ctx.hub.streams();
    let mut by_kind: BTreeMap<String, u64> = StreamClass::ALL.iter().map(|c| (c.as_str().to_string(), 0)).collect();
    for s in &streams {
        *by_kind.entry(s.class.as_str().to_string()).or_default() += 1;
    }
    let (writes, statuses) = metrics::recent_rates();
    let by_phase: BTreeMap<String, u64> = counts.netdevs_by_phase.into_iter().collect();
    let f = Fleet {
        revision,
        compacted_revision,
        store: ctx.store.backend().name().to_string(),
        dpus: DpuCounts {
            total: u64::from(counts.dpus_ready) + u64::from(counts.dpus_unknown),
            ready: counts.dpus_ready.into(),
            unknown: counts.dpus_unknown.into(),
        },
        netdevs: NetdevCounts { total: by_phase.values().sum(), stale: counts.netdevs_stale, by_phase },
        objects: counts.objects_by_kind.into_iter().collect(),
        streams: StreamCounts { total: streams.len() as u64, by_kind },
        rates: Rates { writes_per_second: writes, statuses_per_second: statuses },
    };
    *cached = Some((Instant::now(), f.clone()));
    Ok(f)
}

pub async fn dpus(ctx: &Context, page: &PageArgs) -> Result<DpuPage> {
    let limit = page.limit()?;
    let (head, _) = ctx.store.head().await?;
    let objects = ctx.store.list(Kind::Dpu, None, &Labels::new(), page.after_key()?, limit).await?;
    let continue_token = continue_token(&objects, limit);
    let items = dpu_views(ctx, &objects, head).await?;
    Ok(DpuPage { items, continue_token, revision: head })
}

pub async fn dpu(ctx: &Context, serial: &str) -> Result<Dpu> {
    validate::text(serial, "serial")?;
    let (head, _) = ctx.store.head().await?;
    let obj = ctx
        .store
        .get(&Key::new(Kind::Dpu, "", serial))
        .await?
        .ok_or_else(|| Error::NotFound(format!("dpu {serial}")))?;
    dpu_views(ctx, std::slice::from_ref(&obj), head)
        .await?
        .pop()
        .ok_or_else(|| Error::NotFound(format!("dpu {serial}")))
}

async fn dpu_views(ctx: &Context, objects: &[StoredObject], head: i64) -> Result<Vec<Dpu>> {
    let serials: Vec<String> = objects.iter().map(|o| o.key.name.clone()).collect();
    let counts = ctx.store.dpu_netdev_counts(&serials).await?;
    let errors = ctx.store.dpu_last_errors(&serials).await?;
    let connected: std::collections::HashSet<String> = ctx
        .hub
        .streams()
        .into_iter()
        .filter(|s| s.class == StreamClass::Agent)
        .filter_map(|s| s.identity.strip_prefix("dpu/").map(str::to_string))
        .collect();
    let now = Utc::now();
    let mut out = Vec::with_capacity(objects.len());
    for obj in objects {
        let Some(pb::resource::Kind::Dpu(d)) = resource_from_stored(obj)?.kind else { continue };
        let spec = d.spec.unwrap_or_default();
        let st = d.status.unwrap_or_default();
        let meta = d.metadata.unwrap_or_default();
        let serial = obj.key.name.clone();
        let c = counts.get(&serial).copied().unwrap_or_default();
        let inv = st.inventory.clone();
        let lease_age = DateTime::parse_from_rfc3339(&st.last_heartbeat)
            .ok()
            .map(|t| (now - t.with_timezone(&Utc)).num_milliseconds().max(0) as f64 / 1000.0);
        let registered = !st.registered_at.is_empty() || !st.lease_state.is_empty();
        out.push(Dpu {
            product: if spec.product.is_empty() {
                inv.as_ref().map(|i| i.product.clone()).unwrap_or_default()
            } else {
                spec.product.clone()
            },
            infra_node: spec.infra_node_name,
            tenant_node: spec.tenant_node_name,
            labels: meta.labels.into_iter().collect(),
            stale: st.lease_state != "Ready",
            lease_state: if st.lease_state.is_empty() { "Unknown".into() } else { st.lease_state.clone() },
            last_heartbeat: opt(&st.last_heartbeat),
            lease_age_seconds: lease_age,
            lease_duration_seconds: st.lease_duration_seconds,
            agent_version: inv.as_ref().map(|i| i.agent_version.clone()).unwrap_or_default(),
            dataplane: inv.as_ref().map(|i| i.dataplane.clone()).unwrap_or_default(),
            inventory: inv.map(|i| Inventory {
                product: i.product,
                pf_count: i.pf_count,
                vf_count: i.vf_count,
                sf_count: i.sf_count,
                capabilities: i.capabilities.into_iter().collect(),
            }),
            applied_revision: st.applied_revision,
            revision_lag: if registered { (head - st.applied_revision).max(0) } else { 0 },
            netdevs: c.total,
            pending: c.pending,
            last_error: errors.get(&serial).cloned(),
            registered_at: opt(&st.registered_at),
            connected: connected.contains(&serial),
            conditions: st.conditions.into_iter().map(condition).collect(),
            serial,
        });
    }
    Ok(out)
}

fn condition(c: pb::Condition) -> Condition {
    Condition {
        type_: c.r#type,
        status: c.status,
        reason: c.reason,
        message: c.message,
        last_transition_time: opt(&c.last_transition_time),
    }
}

pub fn clusters(ctx: &Context) -> ClusterList {
    let head = ctx.hub.head();
    let items = ctx
        .hub
        .streams()
        .into_iter()
        .filter(|s| s.class == StreamClass::Cluster)
        .map(|s| {
            let (cluster, side) = match Identity::parse(&s.identity) {
                Ok(Identity::Cluster { name, side }) => {
                    (name, if side == Side::Tenant { "tenant" } else { "infra" }.to_string())
                }
                _ => (String::new(), String::new()),
            };
            ClusterSync {
                cluster,
                side,
                connected_since: timestamp(s.connected_since),
                resumed_from: s.resumed_from,
                delivered_revision: s.delivered,
                lag: (head - s.delivered).max(0),
                identity: s.identity,
            }
        })
        .collect();
    ClusterList { items }
}

/// Validated netdev filters.
pub fn netdev_query(
    dpu: Option<String>,
    node: Option<String>,
    phase: Option<String>,
    namespace: Option<String>,
) -> Result<NetdevQuery> {
    let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
    for (value, field) in [(&dpu, "dpu"), (&node, "node"), (&namespace, "namespace")] {
        validate::text(value.as_deref().unwrap_or_default(), field)?;
    }
    let phase = nonempty(phase);
    if let Some(p) = &phase
        && !NETDEV_PHASES.contains(&p.as_str())
    {
        return Err(Error::invalid("phase", format!("{p:?} is not one of {}", NETDEV_PHASES.join(", "))));
    }
    Ok(NetdevQuery { dpu: nonempty(dpu), node: nonempty(node), phase, namespace: nonempty(namespace) })
}

pub async fn netdevs(ctx: &Context, q: &NetdevQuery, page: &PageArgs) -> Result<NetdevPage> {
    let limit = page.limit()?;
    let (head, _) = ctx.store.head().await?;
    let objects = ctx.store.list_netdevs(q, page.after_key()?, limit).await?;
    let continue_token = continue_token(&objects, limit);
    let items = objects.iter().map(netdev_view).collect::<Result<Vec<_>>>()?;
    Ok(NetdevPage { items, continue_token, revision: head })
}

pub async fn netdev(ctx: &Context, id: &str, history_limit: Option<usize>) -> Result<NetdevDetail> {
    validate::text(id, "id")?;
    let limit = match history_limit {
        None => DEFAULT_HISTORY,
        Some(n) if (1..=MAX_HISTORY).contains(&n) => n,
        Some(n) => return Err(Error::invalid("history_limit", format!("{n} is out of range 1..={MAX_HISTORY}"))),
    };
    let obj = ctx.store.netdev_by_id(id).await?.ok_or_else(|| Error::NotFound(format!("netdev {id}")))?;
    let events = ctx.store.history(&obj.key, limit).await?;
    let (_, compacted_revision) = ctx.store.head().await?;
    // A re-created netdev shares the key: show only this incarnation's entries.
    let history = events.iter().filter(|e| e.uid == obj.uid).map(history_entry).collect();
    Ok(NetdevDetail { netdev: netdev_view(&obj)?, history, compacted_revision })
}

fn netdev_view(obj: &StoredObject) -> Result<Netdev> {
    let Some(pb::resource::Kind::Netdev(n)) = resource_from_stored(obj)?.kind else {
        return Err(Error::internal(format!("{} is not a Netdev", obj.key)));
    };
    let spec = n.spec.unwrap_or_default();
    let st = n.status.unwrap_or_default();
    let pod = spec.pod_ref.as_ref().filter(|p| !p.name.is_empty());
    Ok(Netdev {
        id: if spec.netdev_id.is_empty() { obj.key.name.clone() } else { spec.netdev_id.clone() },
        namespace: obj.key.namespace.clone(),
        name: obj.key.name.clone(),
        dpu: st.dpu.clone(),
        node: spec.hostname.clone(),
        pod: pod.map(|p| format!("{}/{}", p.namespace, p.name)),
        interface: pod.and_then(|p| opt(&p.interface)),
        network: spec.network.clone(),
        phase: if st.phase.is_empty() { "Pending".into() } else { st.phase.clone() },
        ip: opt(&st.ip).or_else(|| spec.ipam.as_ref().and_then(|i| opt(&i.address))),
        mac: opt(&st.mac_address).or_else(|| opt(&spec.mac_address)),
        generation: obj.generation,
        observed_generation: st.observed_generation,
        stale: st.stale,
        message: opt(&st.message),
        updated_at: opt(&st.updated_at),
        revision: obj.revision,
        deleted_revision: obj.deleted_revision,
    })
}

fn history_entry(e: &Event) -> HistoryEntry {
    let change = match e.change {
        ChangeKind::Spec => "spec",
        ChangeKind::Status => "status",
        ChangeKind::Deleted => "deleted",
    };
    HistoryEntry {
        revision: e.revision,
        at: timestamp(e.at),
        change: change.into(),
        author: e.author.clone(),
        generation: e.generation,
        observed_generation: e.observed_generation,
        summary: summary(e),
    }
}

/// One line on what a log entry changed.
fn summary(e: &Event) -> String {
    let field = |k: &str| e.body.as_ref().and_then(|b| b.get(k)).and_then(|v| v.as_str()).unwrap_or("").to_string();
    match e.change {
        ChangeKind::Deleted => "deleted".into(),
        ChangeKind::Status if e.body.is_none() => format!("{} removed its status", e.author),
        ChangeKind::Status => {
            let mut parts = vec![format!("phase {}", or_dash(&field("phase")))];
            for (k, label) in [("ip", "ip"), ("operStatus", "oper"), ("message", "message")] {
                let v = field(k);
                if !v.is_empty() {
                    parts.push(format!("{label} {v}"));
                }
            }
            parts.join(", ")
        }
        ChangeKind::Spec => {
            let mut parts = vec![format!("generation {}", e.generation)];
            for (k, label) in [("network", "network"), ("hostname", "node"), ("macAddress", "mac")] {
                let v = field(k);
                if !v.is_empty() {
                    parts.push(format!("{label} {v}"));
                }
            }
            if let Some(pod) = e.body.as_ref().and_then(|b| b.get("podRef")) {
                let s = |k: &str| pod.get(k).and_then(|v| v.as_str()).unwrap_or("");
                if !s("name").is_empty() {
                    parts.push(format!("pod {}/{}", s("namespace"), s("name")));
                }
            }
            parts.join(", ")
        }
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

fn realisations(status: Option<pb::FabricStatus>) -> Vec<DpuRealisation> {
    status
        .map(|s| s.dpus)
        .unwrap_or_default()
        .into_iter()
        .map(|d| DpuRealisation {
            serial: d.dpu,
            phase: d.phase,
            observed_generation: d.observed_generation,
            message: opt(&d.message),
            stale: d.stale,
            rules: d
                .rules
                .into_iter()
                .map(|r| RuleCounters {
                    name: r.name,
                    programmed: r.programmed,
                    offload: r.offload,
                    packets: r.packets,
                    bytes: r.bytes,
                })
                .collect(),
        })
        .collect()
}

pub const FABRIC_KINDS: [Kind; 4] = [Kind::LogicalBridge, Kind::Vrf, Kind::Svi, Kind::XpuNetwork];

pub fn fabric_kind(kind: Option<&str>) -> Result<Option<Kind>> {
    let Some(k) = kind.filter(|k| !k.is_empty()) else { return Ok(None) };
    FABRIC_KINDS.iter().copied().find(|f| f.as_str() == k).map(Some).ok_or_else(|| {
        let names: Vec<&str> = FABRIC_KINDS.iter().map(|k| k.as_str()).collect();
        Error::invalid("kind", format!("{k:?} is not one of {}", names.join(", ")))
    })
}

/// Fabric objects of one kind, or of all four (kind by kind; the token names the kind).
pub async fn fabric(ctx: &Context, kind: Option<Kind>, page: &PageArgs) -> Result<FabricPage> {
    let limit = page.limit()?;
    let (head, _) = ctx.store.head().await?;
    // Without a kind the token is "<Kind>\0<namespace>\0<name>" across the four kinds.
    let (mut kinds, mut after): (Vec<Kind>, Option<(String, String)>) = match kind {
        Some(k) => (vec![k], page.after_key()?),
        None => match page.after()? {
            None => (FABRIC_KINDS.to_vec(), None),
            Some((k, rest)) => {
                let at = FABRIC_KINDS
                    .iter()
                    .position(|f| f.as_str() == k)
                    .ok_or_else(|| Error::invalid("continue", "not a token this API returned"))?;
                let (ns, name) = rest
                    .split_once('\0')
                    .filter(|(_, name)| !name.contains('\0'))
                    .ok_or_else(|| Error::invalid("continue", "not a token this API returned"))?;
                (FABRIC_KINDS[at..].to_vec(), Some((ns.to_string(), name.to_string())))
            }
        },
    };
    let mut items = Vec::new();
    let mut last: Option<StoredObject> = None;
    kinds.reverse();
    while let Some(k) = kinds.pop() {
        let want = limit - items.len();
        let objects = ctx.store.list(k, None, &Labels::new(), after.take(), want).await?;
        for obj in &objects {
            items.push(fabric_view(obj)?);
        }
        if objects.len() == want {
            last = objects.into_iter().last();
            break;
        }
    }
    let continue_token = last.map(|o| match kind {
        Some(_) => B64.encode(format!("{}\0{}", o.key.namespace, o.key.name)),
        None => B64.encode(format!("{}\0{}\0{}", o.key.kind.as_str(), o.key.namespace, o.key.name)),
    });
    Ok(FabricPage { items, continue_token, revision: head })
}

fn fabric_view(obj: &StoredObject) -> Result<FabricObject> {
    use pb::resource::Kind as R;
    let generation = obj.generation;
    let (dpus, allocated, capacity) = match resource_from_stored(obj)?.kind {
        Some(R::LogicalBridge(o)) => (realisations(o.status), None, None),
        Some(R::Vrf(o)) => (realisations(o.status), None, None),
        Some(R::Svi(o)) => (realisations(o.status), None, None),
        Some(R::XpuNetwork(o)) => {
            let st = o.status.unwrap_or_default();
            (Vec::new(), Some(st.allocated), Some(st.capacity))
        }
        _ => return Err(Error::internal(format!("{} is not a fabric object", obj.key))),
    };
    let ready =
        dpus.iter().filter(|d| d.phase == "Programmed" && d.observed_generation >= generation && !d.stale).count();
    Ok(FabricObject {
        kind: obj.key.kind.as_str().to_string(),
        namespace: obj.key.namespace.clone(),
        name: obj.key.name.clone(),
        generation,
        ready: ready as u64,
        total: dpus.len() as u64,
        dpus,
        allocated,
        capacity,
    })
}

pub async fn flow_policies(ctx: &Context, page: &PageArgs) -> Result<FlowPolicyPage> {
    let limit = page.limit()?;
    let (head, _) = ctx.store.head().await?;
    let objects = ctx.store.list(Kind::FlowPolicy, None, &Labels::new(), page.after_key()?, limit).await?;
    let continue_token = continue_token(&objects, limit);
    let mut items = Vec::with_capacity(objects.len());
    for obj in &objects {
        let Some(pb::resource::Kind::FlowPolicy(p)) = resource_from_stored(obj)?.kind else { continue };
        items.push(FlowPolicy {
            namespace: obj.key.namespace.clone(),
            name: obj.key.name.clone(),
            generation: obj.generation,
            rules: p.spec.map_or(0, |s| s.rules.len() as u64),
            dpus: realisations(p.status),
        });
    }
    Ok(FlowPolicyPage { items, continue_token, revision: head })
}

pub fn sli() -> Sli {
    let ms = |s: Option<f64>| s.map(|v| (v * 1e5).round() / 100.0);
    Sli {
        interval_seconds: metrics::SAMPLE_INTERVAL.as_secs(),
        samples: metrics::sli_series()
            .into_iter()
            .map(|p| SliSample {
                at: timestamp(p.at),
                attach_p50_ms: ms(p.attach_p50),
                attach_p99_ms: ms(p.attach_p99),
                attaches: p.attaches,
                writes_per_second: p.writes_per_second,
                statuses_per_second: p.statuses_per_second,
                streams: p.streams as u64,
            })
            .collect(),
    }
}

/// Samples the SLIs every [`metrics::SAMPLE_INTERVAL`] for the dashboard's charts.
pub async fn run_sampler(ctx: Arc<crate::hub::Hub>) {
    let mut tick = tokio::time::interval(metrics::SAMPLE_INTERVAL);
    loop {
        tick.tick().await;
        metrics::take_sample(ctx.stream_count());
    }
}
