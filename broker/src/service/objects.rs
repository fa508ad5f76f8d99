//! Object reads and writes shared by SyncService and AdminService.

use xpu_proto::broker::v1 as pb;

use super::{Context, check_read, check_write, readable_kinds, watch};
use crate::{
    error::{Error, Result},
    identity::Identity,
    model::{
        Key, Kind, Labels,
        convert::{input_from_resource, resource_from_stored},
        validate,
    },
    store::rows::{ApplyRequest, DeleteRequest},
};

const DEFAULT_LIST_LIMIT: usize = 500;

pub async fn apply(ctx: &Context, id: &Identity, req: pb::ApplyRequest) -> Result<pb::ApplyResponse> {
    let res = req.object.ok_or_else(|| Error::invalid("object", "is required"))?;
    let input = input_from_resource(&res, &ctx.config.limits)?;
    check_write(id, input.key.kind)?;
    if req.expected_generation < 0 {
        return Err(Error::invalid("expectedGeneration", "must not be negative"));
    }
    let outcome = ctx
        .store
        .apply(ApplyRequest { input, expected_generation: req.expected_generation, author: id.to_string(), node: None })
        .await?;
    Ok(pb::ApplyResponse { object: Some(resource_from_stored(&outcome.object)?), changed: outcome.changed })
}

pub async fn delete(ctx: &Context, id: &Identity, req: pb::DeleteRequest) -> Result<pb::DeleteResponse> {
    let key = Key::from_proto(req.key.as_ref(), "key")?;
    check_write(id, key.kind)?;
    let uid = if req.uid.is_empty() {
        None
    } else {
        Some(req.uid.parse().map_err(|_| Error::invalid("uid", format!("{:?} is not a UUID", req.uid)))?)
    };
    if req.expected_generation < 0 {
        return Err(Error::invalid("expectedGeneration", "must not be negative"));
    }
    let outcome = ctx
        .store
        .delete(DeleteRequest {
            key,
            uid,
            expected_generation: req.expected_generation,
            author: id.to_string(),
            node: None,
        })
        .await?;
    Ok(pb::DeleteResponse { revision: outcome.revision, existed: outcome.existed })
}

pub async fn get(ctx: &Context, id: &Identity, key: Option<&pb::ObjectKey>) -> Result<pb::Resource> {
    let key = Key::from_proto(key, "key")?;
    check_read(id, key.kind)?;
    let obj = ctx.store.get(&key).await?.ok_or_else(|| Error::NotFound(key.to_string()))?;
    resource_from_stored(&obj)
}

/// `<revision>/<namespace>/<name>`, hex-encoded so it is opaque and URL-safe.
fn encode_token(revision: i64, ns: &str, name: &str) -> String {
    hex::encode(format!("{revision}/{ns}/{name}"))
}

fn decode_token(token: &str) -> Result<(i64, String, String)> {
    let bad = || Error::invalid("continueToken", "is not a token this broker issued");
    let raw = String::from_utf8(hex::decode(token).map_err(|_| bad())?).map_err(|_| bad())?;
    // No name holds a NUL, and the store could not even look one up.
    if raw.contains('\0') {
        return Err(bad());
    }
    let mut parts = raw.splitn(3, '/');
    let rev = parts.next().and_then(|r| r.parse().ok()).ok_or_else(bad)?;
    let ns = parts.next().ok_or_else(bad)?.to_string();
    let name = parts.next().ok_or_else(bad)?.to_string();
    Ok((rev, ns, name))
}

pub async fn list(ctx: &Context, id: &Identity, req: pb::ListRequest) -> Result<pb::ListResponse> {
    let kind = Kind::from_proto(req.kind, "kind")?;
    check_read(id, kind)?;
    let max = ctx.config.limits.max_list_items;
    let limit = match usize::try_from(req.limit).unwrap_or(usize::MAX) {
        0 => DEFAULT_LIST_LIMIT.min(max),
        n if n > max => {
            return Err(Error::invalid("limit", format!("{n} exceeds the maximum of {max}")));
        }
        n => n,
    };
    let namespace = if req.namespace.is_empty() {
        None
    } else {
        if !kind.namespaced() {
            return Err(Error::invalid("namespace", format!("{kind} is cluster-scoped")));
        }
        validate::dns_label(&req.namespace, "namespace")?;
        Some(req.namespace.as_str())
    };
    let selector: Labels = req.label_selector.map(|s| s.match_labels.into_iter().collect()).unwrap_or_default();
    validate::labels(&selector, "labelSelector.matchLabels", &ctx.config.limits)?;
    let (revision, after) = if req.continue_token.is_empty() {
        (ctx.store.head().await?.0, None)
    } else {
        let (rev, ns, name) = decode_token(&req.continue_token)?;
        (rev, Some((ns, name)))
    };
    // One more than asked tells whether another page follows.
    let mut objects = ctx.store.list(kind, namespace, &selector, after, limit + 1).await?;
    let more = objects.len() > limit;
    objects.truncate(limit);
    let continue_token = match (more, objects.last()) {
        (true, Some(last)) => encode_token(revision, &last.key.namespace, &last.key.name),
        _ => String::new(),
    };
    let items = objects.iter().map(resource_from_stored).collect::<Result<Vec<_>>>()?;
    Ok(pb::ListResponse { items, revision, continue_token })
}

pub fn watch(ctx: &Context, id: &Identity, req: pb::WatchRequest) -> Result<watch::EventStream> {
    let kinds = if req.kinds.is_empty() {
        readable_kinds(id).to_vec()
    } else {
        let mut kinds = Vec::new();
        for (i, k) in req.kinds.iter().enumerate() {
            let kind = Kind::from_proto(*k, &format!("kinds[{i}]"))?;
            check_read(id, kind)?;
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        kinds
    };
    if kinds.is_empty() {
        return Err(Error::PermissionDenied(format!("{id} may not watch objects")));
    }
    if req.since_revision < 0 {
        return Err(Error::invalid("sinceRevision", "must not be negative"));
    }
    Ok(watch::open(ctx, id, watch::Scope::Kinds(kinds), req.since_revision))
}
