//! AdminService: operators' access to every object, fleet status and maintenance.

use xpu_proto::broker::v1 as pb;

use super::{Context, objects, require_admin, watch};
use crate::{
    error::{Error, Result},
    identity::Identity,
    model::validate,
};

pub async fn get(ctx: &Context, id: &Identity, req: pb::GetRequest) -> Result<pb::Resource> {
    require_admin(id)?;
    objects::get(ctx, id, req.key.as_ref()).await
}

pub async fn list(ctx: &Context, id: &Identity, req: pb::ListRequest) -> Result<pb::ListResponse> {
    require_admin(id)?;
    objects::list(ctx, id, req).await
}

pub async fn apply(ctx: &Context, id: &Identity, req: pb::ApplyRequest) -> Result<pb::ApplyResponse> {
    require_admin(id)?;
    objects::apply(ctx, id, req).await
}

pub async fn delete(ctx: &Context, id: &Identity, req: pb::DeleteRequest) -> Result<pb::DeleteResponse> {
    require_admin(id)?;
    objects::delete(ctx, id, req).await
}

pub fn watch(ctx: &Context, id: &Identity, req: pb::WatchRequest) -> Result<watch::EventStream> {
    require_admin(id)?;
    objects::watch(ctx, id, req)
}

pub async fn fleet_status(ctx: &Context, id: &Identity) -> Result<pb::FleetStatusResponse> {
    require_admin(id)?;
    let (revision, compacted_revision) = ctx.store.head().await?;
    let counts = ctx.store.fleet_counts().await?;
    Ok(pb::FleetStatusResponse {
        revision,
        compacted_revision,
        dpus_ready: counts.dpus_ready,
        dpus_unknown: counts.dpus_unknown,
        netdevs_by_phase: counts.netdevs_by_phase.into_iter().collect(),
        objects_by_kind: counts.objects_by_kind.into_iter().collect(),
        active_streams: u32::try_from(ctx.hub.stream_count()).unwrap_or(u32::MAX),
    })
}

pub async fn compact(ctx: &Context, id: &Identity, req: pb::CompactRequest) -> Result<pb::CompactResponse> {
    require_admin(id)?;
    if req.revision < 0 {
        return Err(Error::invalid("revision", "must not be negative"));
    }
    let to = if req.revision == 0 {
        let (head, _) = ctx.store.head().await?;
        head - ctx.config.log_retention
    } else {
        req.revision
    };
    let c = ctx.store.compact(to.max(0)).await?;
    Ok(pb::CompactResponse {
        compacted_revision: c.compacted_revision,
        log_entries_removed: c.log_entries_removed,
        tombstones_removed: c.tombstones_removed,
    })
}

pub async fn decommission(
    ctx: &Context,
    id: &Identity,
    req: pb::DecommissionDpuRequest,
) -> Result<pb::DecommissionDpuResponse> {
    require_admin(id)?;
    validate::dns_label(&req.serial, "serial")?;
    let (revision, netdevs_deleted) = ctx.store.decommission(&req.serial).await?;
    tracing::info!(dpu = %req.serial, netdevs_deleted, admin = %id, "dpu decommissioned");
    Ok(pb::DecommissionDpuResponse { revision, netdevs_deleted })
}
