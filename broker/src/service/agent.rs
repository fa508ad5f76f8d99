//! AgentService: registration, heartbeats, desired state and status reports of DPU agents.

use xpu_proto::broker::v1 as pb;

use super::{Context, watch};
use crate::{
    error::{Error, Result},
    identity::Identity,
    model::{Key, Kind, Labels, convert::resource_from_stored, validate},
    store::rows::{RegisterRequest, StatusOutcome, StatusWrite},
};

/// The caller's serial; a request naming another DPU is refused.
fn own_serial(id: &Identity, requested: &str) -> Result<String> {
    let Identity::Dpu(serial) = id else {
        return Err(Error::PermissionDenied(format!(
            "{id} may not call AgentService; it is for DPU agents (xpu://dpu/<serial>)"
        )));
    };
    if !requested.is_empty() && requested != serial {
        return Err(Error::PermissionDenied(format!("dpu {serial} cannot act for dpu {requested}")));
    }
    Ok(serial.clone())
}

fn millis(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

fn short_text(value: &str, field: &str) -> Result<()> {
    if value.len() > 256 {
        return Err(Error::invalid(field, "is longer than 256 characters"));
    }
    validate::text(value, field)
}

pub async fn register(ctx: &Context, id: &Identity, req: pb::RegisterRequest) -> Result<pb::RegisterResponse> {
    let serial = own_serial(id, &req.serial)?;
    let labels: Labels = req.labels.into_iter().collect();
    validate::labels(&labels, "labels", &ctx.config.limits)?;
    for (value, field) in [(&req.infra_node_name, "infraNodeName"), (&req.tenant_node_name, "tenantNodeName")] {
        if !value.is_empty() {
            validate::dns_subdomain(value, field)?;
        }
    }
    let inventory = req.inventory.unwrap_or_default();
    short_text(&inventory.product, "inventory.product")?;
    short_text(&inventory.agent_version, "inventory.agentVersion")?;
    short_text(&inventory.dataplane, "inventory.dataplane")?;
    if inventory.capabilities.len() > ctx.config.limits.max_labels {
        return Err(Error::invalid(
            "inventory.capabilities",
            format!("{} entries exceed the limit of {}", inventory.capabilities.len(), ctx.config.limits.max_labels),
        ));
    }
    for name in inventory.capabilities.keys() {
        short_text(name, "inventory.capabilities")?;
    }
    let spec = pb::DpuSpec {
        serial: serial.clone(),
        product: inventory.product.clone(),
        infra_node_name: req.infra_node_name,
        tenant_node_name: req.tenant_node_name,
    };
    let outcome = ctx.store.register(RegisterRequest { serial: serial.clone(), labels, spec, inventory }).await?;
    // The fan-out's head can still stand below the registration's own commit: an agent watching
    // from that head would replay its own registration, which (labels may have changed) costs
    // it a full resync.
    let current_revision = ctx.hub.head().max(outcome.object.revision);
    let dpu = ctx.store.get(&Key::cluster(Kind::Dpu, &serial)).await?.unwrap_or(outcome.object);
    let dpu = match resource_from_stored(&dpu)?.kind {
        Some(pb::resource::Kind::Dpu(d)) => Some(d),
        _ => None,
    };
    tracing::info!(dpu = %serial, "dpu registered");
    Ok(pb::RegisterResponse {
        dpu,
        heartbeat_interval_ms: millis(ctx.config.heartbeat_interval),
        lease_duration_ms: millis(ctx.config.lease_duration),
        current_revision,
        last_status_seq: u64::try_from(outcome.last_status_seq).unwrap_or(0),
    })
}

pub async fn heartbeat(ctx: &Context, id: &Identity, req: pb::HeartbeatRequest) -> Result<pb::HeartbeatResponse> {
    let serial = own_serial(id, &req.serial)?;
    if req.applied_revision < 0 {
        return Err(Error::invalid("appliedRevision", "must not be negative"));
    }
    ctx.store.heartbeat(&serial, req.applied_revision).await?;
    Ok(pb::HeartbeatResponse {
        heartbeat_interval_ms: millis(ctx.config.heartbeat_interval),
        current_revision: ctx.hub.head(),
    })
}

pub fn watch_desired(ctx: &Context, id: &Identity, req: pb::WatchDesiredRequest) -> Result<watch::EventStream> {
    let serial = own_serial(id, &req.serial)?;
    if req.since_revision < 0 {
        return Err(Error::invalid("sinceRevision", "must not be negative"));
    }
    Ok(watch::open(ctx, id, watch::Scope::Dpu(serial), req.since_revision))
}

/// Encodes a reported status without the fields the broker owns (set from the report and the
/// caller on read).
fn status_body(report: &pb::StatusReport, kind: Kind, field: &str) -> Result<Option<serde_json::Value>> {
    use pb::status_report::Status;
    if report.removed {
        return Ok(None);
    }
    let encode =
        |v: serde_json::Result<serde_json::Value>| v.map_err(|e| Error::internal(format!("encoding status: {e}")));
    match (kind, report.status.as_ref()) {
        (Kind::Netdev, Some(Status::Netdev(s))) => {
            validate::netdev_status(s).map_err(|e| prefix(e, field))?;
            let mut s = s.clone();
            s.dpu.clear();
            s.observed_generation = 0;
            s.stale = false;
            s.updated_at.clear();
            Ok(Some(encode(serde_json::to_value(&s))?))
        }
        (Kind::Netdev, _) => Err(Error::invalid(format!("{field}.netdev"), "a Netdev report carries a netdev status")),
        (_, Some(Status::Object(s))) => {
            validate::object_status(s, kind).map_err(|e| prefix(e, field))?;
            let mut s = s.clone();
            s.dpu.clear();
            s.observed_generation = 0;
            s.stale = false;
            s.updated_at.clear();
            Ok(Some(encode(serde_json::to_value(&s))?))
        }
        (_, _) => Err(Error::invalid(format!("{field}.object"), format!("a {kind} report carries an object status"))),
    }
}

fn prefix(err: Error, field: &str) -> Error {
    match err {
        Error::InvalidArgument { field: f, reason } => {
            Error::InvalidArgument { field: format!("{field}.{}", f.trim_start_matches("status.")), reason }
        }
        other => other,
    }
}

pub async fn report_status(
    ctx: &Context,
    id: &Identity,
    req: pb::ReportStatusRequest,
) -> Result<pb::ReportStatusResponse> {
    let serial = own_serial(id, &req.serial)?;
    let limits = &ctx.config.limits;
    if req.reports.len() > limits.max_reports_per_call {
        return Err(Error::invalid(
            "reports",
            format!("{} reports exceed the limit of {} per call", req.reports.len(), limits.max_reports_per_call),
        ));
    }
    let mut writes = Vec::with_capacity(req.reports.len());
    for (i, r) in req.reports.iter().enumerate() {
        let field = format!("reports[{i}]");
        let key = Key::from_proto(r.key.as_ref(), &format!("{field}.key"))?;
        if !(key.kind == Kind::Netdev || key.kind.selector_routed()) {
            return Err(Error::invalid(
                format!("{field}.key.kind"),
                format!("the status of {} objects is written by the broker", key.kind),
            ));
        }
        let seq = i64::try_from(r.seq)
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| Error::invalid(format!("{field}.seq"), "must be a positive 63-bit sequence number"))?;
        if r.observed_generation < 0 {
            return Err(Error::invalid(format!("{field}.observedGeneration"), "must not be negative"));
        }
        let body = status_body(r, key.kind, &format!("{field}.status"))?;
        if let Some(b) = &body {
            validate::json_text(b, &format!("{field}.status"))?;
            let len = serde_json::to_vec(b).map(|v| v.len()).unwrap_or(usize::MAX);
            validate::size(len, &format!("{field}.status"), limits)?;
        }
        writes.push(StatusWrite { key, observed_generation: r.observed_generation, seq, body });
    }
    let keys: Vec<pb::ObjectKey> = writes.iter().map(|w| w.key.to_proto()).collect();
    let outcomes = ctx.store.report_status(&serial, writes).await?;
    let results = keys
        .into_iter()
        .zip(outcomes)
        .map(|(key, o)| {
            let (outcome, revision) = match o {
                StatusOutcome::Accepted(rev) => (pb::ReportOutcome::Accepted, rev),
                StatusOutcome::Stale => (pb::ReportOutcome::Stale, 0),
                StatusOutcome::NotFound => (pb::ReportOutcome::NotFound, 0),
                StatusOutcome::Unchanged => (pb::ReportOutcome::Unchanged, 0),
            };
            pb::StatusResult { key: Some(key), outcome: outcome as i32, revision }
        })
        .collect();
    Ok(pb::ReportStatusResponse { results })
}
