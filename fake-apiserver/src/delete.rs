//! delete and deletecollection, with finalizers and the namespace / CRD cascades.

use serde_json::{Value, json};

use crate::error::{ApiError, ApiResult};
use crate::object::{finalizers, generation_of, is_deleting, now};
use crate::read::{ListOpts, Target, list, present};
use crate::resource::{GroupResource, ResourceType};
use crate::store::{EventType, State, name_of, rv_of, set_meta};
use crate::write::{WriteOpts, persist};

/// Remove `obj` now (`DELETED`), cascading for namespaces and CRDs. Returns the deleted object.
pub(crate) fn remove(st: &mut State, rt: &ResourceType, obj: Value, dry_run: bool) -> Value {
    let deleted = persist(st, &rt.group_resource(), EventType::Deleted, obj, None, dry_run);
    if dry_run {
        return deleted;
    }
    if rt.is_namespace() {
        let ns = name_of(&deleted).to_owned();
        let contained: Vec<(GroupResource, Value)> = st
            .objects
            .iter()
            .flat_map(|(gr, objs)| {
                objs.iter().filter(|((o_ns, _), _)| *o_ns == ns).map(|(_, v)| (gr.clone(), v.clone()))
            })
            .collect();
        for (gr, obj) in contained {
            if finalizers(&obj).is_empty() {
                persist(st, &gr, EventType::Deleted, obj, None, false);
            } else if !is_deleting(&obj) {
                persist(st, &gr, EventType::Modified, mark_deleting(&obj), Some(obj), false);
            }
        }
    }
    if rt.is_crd() {
        let group = deleted.pointer("/spec/group").and_then(Value::as_str).unwrap_or_default();
        let plural = deleted.pointer("/spec/names/plural").and_then(Value::as_str).unwrap_or_default();
        let gr = GroupResource::new(group, plural);
        let all: Vec<Value> = st.objects.get(&gr).map(|m| m.values().cloned().collect()).unwrap_or_default();
        for obj in all {
            persist(st, &gr, EventType::Deleted, obj, None, false);
        }
        st.registry.unregister(&gr);
    }
    deleted
}

/// The object with `deletionTimestamp` set (which, as in a real cluster, bumps `generation`).
fn mark_deleting(obj: &Value) -> Value {
    let mut new = obj.clone();
    set_meta(&mut new, "deletionTimestamp", json!(now()));
    set_meta(&mut new, "deletionGracePeriodSeconds", json!(0));
    set_meta(&mut new, "generation", json!(generation_of(obj) + 1));
    new
}

fn check_preconditions(rt: &ResourceType, obj: &Value, opts: &Value) -> ApiResult<()> {
    let want = |k: &str| opts.pointer(&format!("/preconditions/{k}")).and_then(Value::as_str);
    let has_uid = obj.pointer("/metadata/uid").and_then(Value::as_str);
    if let Some(uid) = want("uid").filter(|u| Some(*u) != has_uid) {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{}\": Precondition failed: UID in precondition: {uid}, \
                 UID in object meta: {}",
                rt.qualified(),
                name_of(obj),
                has_uid.unwrap_or_default()
            ),
        ));
    }
    if want("resourceVersion").is_some_and(|rv| Some(rv) != rv_of(obj)) {
        return Err(ApiError::conflict(&rt.qualified(), name_of(obj)));
    }
    Ok(())
}

/// The response of a completed deletion: CRs return the object, built-ins a `Status`.
fn deleted_response(rt: &ResourceType, obj: Value) -> Value {
    if rt.builtin {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {
                "name": name_of(&obj),
                "group": rt.group,
                "kind": rt.plural,
                "uid": obj.pointer("/metadata/uid").cloned().unwrap_or(Value::Null),
            },
        })
    } else {
        present(rt, obj)
    }
}

/// DELETE of one object. `opts` is the (possibly empty) `DeleteOptions` body: `preconditions` are honoured;
/// `propagationPolicy` and `gracePeriodSeconds` are ignored (no garbage collector, no kubelet).
pub fn delete(st: &mut State, t: &Target, opts: &Value, o: &WriteOpts) -> ApiResult<Value> {
    let name = t.name()?;
    let rt = &t.rt;
    let obj = st.get(&rt.group_resource(), t.ns(), name).cloned().ok_or_else(|| t.not_found(name))?;
    check_preconditions(rt, &obj, opts)?;
    if finalizers(&obj).is_empty() {
        let deleted = remove(st, rt, obj, o.dry_run);
        return Ok(deleted_response(rt, deleted));
    }
    if is_deleting(&obj) {
        return Ok(present(rt, obj));
    }
    let marked = persist(st, &rt.group_resource(), EventType::Modified, mark_deleting(&obj), Some(obj), o.dry_run);
    Ok(present(rt, marked))
}

/// DELETE of a collection (honouring selectors); returns the list of the objects as they were deleted
/// (or marked for deletion).
pub fn delete_collection(st: &mut State, t: &Target, opts: &ListOpts, o: &WriteOpts) -> ApiResult<Value> {
    let mut listed = list(st, t, &ListOpts { limit: None, continue_token: None, ..opts.clone() })?;
    let items = listed.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut results = Vec::new();
    for item in items {
        let target = Target {
            namespace: Some(item.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default().to_owned())
                .filter(|ns| !ns.is_empty()),
            name: Some(name_of(&item).to_owned()),
            ..t.clone()
        };
        let res = delete(st, &target, &Value::Null, o)?;
        results.push(if res.get("kind") == Some(&json!("Status")) { item } else { res });
    }
    listed["items"] = Value::Array(results);
    listed["metadata"]["resourceVersion"] = json!(st.rv.to_string());
    Ok(listed)
}
