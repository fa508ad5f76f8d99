//! HostService: the host agents' attach round trip (DESIGN §5 steps 3–5) and detach.

use std::time::Duration;

use tokio::time::Instant;
use xpu_proto::broker::v1 as pb;

use super::Context;
use crate::{
    error::{Error, Result},
    hub::{Filter, Item},
    identity::Identity,
    model::{
        Key, Kind, Labels,
        convert::{input, resource_from_stored, timestamp},
        event::ChangeKind,
        object::{Spec, StoredObject},
        serial_of_author, validate,
    },
    store::rows::{ApplyRequest, DeleteRequest},
};

fn own_node(id: &Identity) -> Result<&str> {
    match id {
        Identity::Host(node) => Ok(node),
        other => Err(Error::PermissionDenied(format!(
            "{other} may not call HostService; it is for host agents (xpu://host/<node>)"
        ))),
    }
}

fn netdev_of(obj: &StoredObject) -> Result<pb::Netdev> {
    match resource_from_stored(obj)?.kind {
        Some(pb::resource::Kind::Netdev(n)) => Ok(n),
        _ => Err(Error::internal(format!("{} is not a Netdev", obj.key))),
    }
}

fn check_owner(nd: &pb::Netdev, node: &str, key: &Key) -> Result<()> {
    let hostname = nd.spec.as_ref().map(|s| s.hostname.as_str()).unwrap_or_default();
    if hostname != node {
        return Err(Error::PermissionDenied(format!("{key} belongs to node {hostname}; host {node} cannot use it")));
    }
    Ok(())
}

/// Where an attach stands for a given generation.
enum Progress {
    Connected,
    Failed(String),
    Waiting(String),
}

fn progress(nd: &pb::Netdev, generation: i64) -> Progress {
    let Some(st) = nd.status.as_ref().filter(|s| s.observed_generation >= generation) else {
        let phase = nd.status.as_ref().map_or("Pending", |s| s.phase.as_str());
        return Progress::Waiting(phase.to_string());
    };
    match st.phase.as_str() {
        "Connected" => Progress::Connected,
        "Error" => Progress::Failed(st.message.clone()),
        phase => Progress::Waiting(phase.to_string()),
    }
}

pub async fn attach(ctx: &Context, id: &Identity, req: pb::AttachNetdevRequest) -> Result<pb::AttachNetdevResponse> {
    let node = own_node(id)?.to_string();
    validate::dns_label(&req.namespace, "namespace")?;
    let mut spec = req.spec.ok_or_else(|| Error::invalid("spec", "is required"))?;
    if spec.hostname.is_empty() {
        spec.hostname = node.clone();
    } else if spec.hostname != node {
        return Err(Error::PermissionDenied(format!("host {node} cannot attach netdevs of node {}", spec.hostname)));
    }
    validate::dns_subdomain(&spec.netdev_id, "spec.netdevId")?;
    let labels: Labels = req.labels.into_iter().collect();
    let key = Key::new(Kind::Netdev, req.namespace.clone(), spec.netdev_id.clone());
    let input = input(key.clone(), labels, Spec::Netdev(spec), &ctx.config.limits).map_err(|e| match e {
        Error::InvalidArgument { field, reason }
            if field == "metadata.labels" || field.starts_with("metadata.labels[") =>
        {
            Error::InvalidArgument { field: field.replacen("metadata.", "", 1), reason }
        }
        other => other,
    })?;
    let timeout = match req.timeout_ms {
        0 => ctx.config.attach_timeout,
        ms => Duration::from_millis(u64::from(ms)).min(ctx.config.max_attach_timeout),
    };
    let deadline = Instant::now() + timeout;

    // Subscribe before writing so that a status reported right after the write is not missed.
    let mut waiter = ctx.hub.subscribe(Filter::Key(key.clone()));
    let outcome = ctx
        .store
        .apply(ApplyRequest { input, expected_generation: 0, author: id.to_string(), node: Some(node.clone()) })
        .await?;
    let generation = outcome.object.generation;
    let routes = outcome
        .network
        .as_ref()
        .map(|n| n.routes.clone())
        .ok_or_else(|| Error::internal("a Netdev write came back without its network"))?;
    // A changed spec has no status at its generation yet; an unchanged one may be done already.
    let mut nd = if outcome.changed { netdev_of(&outcome.object)? } else { current(ctx, &key).await? };
    loop {
        let phase = match progress(&nd, generation) {
            Progress::Connected => return Ok(respond(nd, routes)),
            Progress::Failed(msg) => {
                let dpu = nd.status.as_ref().map(|s| s.dpu.clone()).unwrap_or_default();
                return Err(Error::FailedPrecondition(format!("dpu {dpu} could not program {key}: {msg}")));
            }
            Progress::Waiting(phase) => phase,
        };
        // Sleep until a change to this netdev, then look again.
        loop {
            match tokio::time::timeout_at(deadline, waiter.recv()).await {
                Err(_) => {
                    return Err(Error::DeadlineExceeded(format!(
                        "{key} did not become Connected within {:.1}s (phase {phase}); it stays and keeps \
                         converging, retry to wait again",
                        timeout.as_secs_f64()
                    )));
                }
                Ok(Some(Item::Event(ev))) if ev.change == ChangeKind::Deleted => {
                    return Err(Error::Aborted(format!("{key} was deleted while attaching")));
                }
                Ok(Some(Item::Event(ev)))
                    if ev.change == ChangeKind::Status && ev.observed_generation >= generation =>
                {
                    // The DPU's report carries the status: no need to read it back.
                    match (ev.body.as_ref(), serial_of_author(&ev.author)) {
                        (Some(body), Some(serial)) => {
                            let mut st: pb::NetdevStatus = serde_json::from_value(body.clone())
                                .map_err(|e| Error::internal(format!("a Netdev status does not decode: {e}")))?;
                            st.observed_generation = ev.observed_generation;
                            st.dpu = serial.to_string();
                            st.updated_at = timestamp(ev.at);
                            nd.status = Some(st);
                        }
                        _ => nd = current(ctx, &key).await?,
                    }
                    break;
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    if ctx.hub.is_closed() {
                        return Err(Error::ShuttingDown(format!(
                            "the broker is shutting down; {key} stays and keeps converging, retry to wait again"
                        )));
                    }
                    // Dropped by the fan-out (one key cannot fall behind, but be safe).
                    waiter = ctx.hub.subscribe(Filter::Key(key.clone()));
                    nd = current(ctx, &key).await?;
                    break;
                }
            }
        }
    }
}

/// The netdev as stored now.
async fn current(ctx: &Context, key: &Key) -> Result<pb::Netdev> {
    let obj = ctx.store.get(key).await?.ok_or_else(|| Error::Aborted(format!("{key} was deleted while attaching")))?;
    netdev_of(&obj)
}

/// The attach result: the netdev and how the pod's interface is set up (`routes` are the
/// network's as the Netdev's write saw them).
fn respond(nd: pb::Netdev, routes: Vec<pb::Route>) -> pb::AttachNetdevResponse {
    let spec = nd.spec.clone().unwrap_or_default();
    let status = nd.status.clone().unwrap_or_default();
    let ipam = spec.ipam.unwrap_or_default();
    let attachment = pb::NetworkAttachment {
        address: if status.ip.is_empty() { ipam.address } else { status.ip },
        gateway: ipam.gateway,
        mac_address: if status.mac_address.is_empty() { spec.mac_address } else { status.mac_address },
        mtu: spec.mtu,
        routes,
    };
    pb::AttachNetdevResponse { netdev: Some(nd), attachment: Some(attachment) }
}

pub async fn get(ctx: &Context, id: &Identity, req: pb::GetNetdevRequest) -> Result<pb::Netdev> {
    let node = own_node(id)?;
    let key = Key::new(Kind::Netdev, req.namespace, req.name);
    validate::key(&key, "")?;
    let obj = ctx.store.get(&key).await?.ok_or_else(|| Error::NotFound(key.to_string()))?;
    let nd = netdev_of(&obj)?;
    check_owner(&nd, node, &key)?;
    Ok(nd)
}

pub async fn detach(ctx: &Context, id: &Identity, req: pb::DetachNetdevRequest) -> Result<pb::DetachNetdevResponse> {
    let node = own_node(id)?.to_string();
    let key = Key::new(Kind::Netdev, req.namespace, req.name);
    validate::key(&key, "")?;
    let outcome = ctx
        .store
        .delete(DeleteRequest { key, uid: None, expected_generation: 0, author: id.to_string(), node: Some(node) })
        .await?;
    Ok(pb::DetachNetdevResponse { revision: outcome.revision, existed: outcome.existed })
}
