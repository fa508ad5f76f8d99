//! create, replace (PUT), patch (merge / strategic-as-merge / JSON patch) and server-side apply.

use serde_json::{Value, json};

use crate::crd;
use crate::delete::remove;
use crate::error::{ApiError, ApiResult};
use crate::object::{
    check_type, finalizers, generation_changes, generation_of, is_deleting, normalized, now, parse_body, random_suffix,
    set_type, validate_name,
};
use crate::patch::{json_patch, merge_patch};
use crate::read::{Target, present};
use crate::resource::{GroupResource, ResourceType};
use crate::ssa::{self, Writer};
use crate::store::{EventType, State, name_of, rv_of, set_meta};

/// Who writes, and how.
#[derive(Debug, Clone, Default)]
pub struct WriteOpts {
    /// `fieldManager` (for non-apply writes defaulted from the User-Agent by the HTTP layer).
    pub manager: String,
    /// `dryRun=All`: validate and compute, persist nothing.
    pub dry_run: bool,
    /// `force=true` for apply.
    pub force: bool,
}

/// The patch content types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/strategic-merge-patch+json`, treated as a merge patch (`$`-directives dropped).
    Strategic,
    /// `application/json-patch+json`.
    Json,
    /// `application/apply-patch+yaml`.
    Apply,
}

/// Assign a resourceVersion and commit (unless dry-run). Returns the stored object.
pub(crate) fn persist(
    st: &mut State,
    gr: &GroupResource,
    event_type: EventType,
    mut obj: Value,
    prev: Option<Value>,
    dry_run: bool,
) -> Value {
    if !dry_run {
        let rv = st.next_rv();
        set_meta(&mut obj, "resourceVersion", json!(rv.to_string()));
        st.commit(rv, gr, event_type, obj.clone(), prev);
    }
    obj
}

fn writer<'a>(t: &'a Target, o: &'a WriteOpts, api_version: &'a str, now: &'a str) -> Writer<'a> {
    Writer { manager: &o.manager, subresource: t.subresource(), api_version, now }
}

/// Fill in namespace (from the URL) and name (or `generateName`) of an object to create.
fn place(t: &Target, obj: &mut Value) -> ApiResult<()> {
    let rt = &t.rt;
    if rt.namespaced {
        let ns = t.namespace.clone().ok_or_else(|| ApiError::method_not_allowed("create requires a namespace"))?;
        match obj.pointer("/metadata/namespace").and_then(Value::as_str) {
            Some(given) if !given.is_empty() && given != ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => set_meta(obj, "namespace", json!(ns)),
        }
    } else if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("namespace");
    }
    if name_of(obj).is_empty() {
        let prefix = obj.pointer("/metadata/generateName").and_then(Value::as_str).unwrap_or_default().to_owned();
        if prefix.is_empty() {
            return Err(ApiError::invalid(format!(
                "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                rt.kind
            )));
        }
        set_meta(obj, "name", json!(format!("{prefix}{}", random_suffix())));
    }
    Ok(())
}

/// The status a real server's create strategy gives namespaces (`Active`) and pods (`Pending`).
fn initial_status(rt: &ResourceType, obj: &mut Value) {
    let phase = match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "namespaces") => "Active",
        ("", "pods") => "Pending",
        _ => return,
    };
    if obj.pointer("/status/phase").is_none() {
        if !obj.get("status").is_some_and(Value::is_object) {
            obj["status"] = json!({});
        }
        obj["status"]["phase"] = json!(phase);
    }
}

/// Store a new object: system metadata, CRD registration, `ADDED`.
fn insert_new(st: &mut State, t: &Target, mut obj: Value, dry_run: bool) -> ApiResult<Value> {
    let rt = &t.rt;
    let name = name_of(&obj).to_owned();
    validate_name(&rt.kind, &name, rt.is_namespace())?;
    if rv_of(&obj).is_some() {
        return Err(ApiError::new(500, "InternalError", "resourceVersion should not be set on objects to be created"));
    }
    if st.get(&rt.group_resource(), t.ns(), &name).is_some() {
        return Err(ApiError::already_exists(&rt.qualified(), &name));
    }
    let now = now();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in ["deletionTimestamp", "deletionGracePeriodSeconds", "uid", "selfLink"] {
            meta.remove(k);
        }
    }
    set_meta(&mut obj, "uid", json!(uuid::Uuid::new_v4().to_string()));
    set_meta(&mut obj, "creationTimestamp", json!(now));
    set_meta(&mut obj, "generation", json!(1));
    set_type(&mut obj, &rt.api_version(), &rt.kind);
    if rt.is_crd() {
        crd::validate(&obj, &st.registry)?;
        crd::set_status(&mut obj, &now);
    }
    let stored = persist(st, &rt.group_resource(), EventType::Added, obj, None, dry_run);
    if rt.is_crd() && !dry_run {
        st.registry.register_crd(&stored);
    }
    Ok(present(rt, stored))
}

/// POST.
pub fn create(st: &mut State, t: &Target, body: Value, o: &WriteOpts) -> ApiResult<Value> {
    let rt = &t.rt;
    check_type(&body, &rt.api_version(), &rt.kind)?;
    let mut obj = body;
    place(t, &mut obj)?;
    if rt.status_subresource
        && !rt.builtin
        && let Some(map) = obj.as_object_mut()
    {
        map.remove("status");
    }
    let now = now();
    let api_version = rt.api_version();
    ssa::record_update(None, &mut obj, &writer(t, o, &api_version, &now));
    // Set by the server, owned by nobody (as fields set by a real create strategy).
    initial_status(rt, &mut obj);
    insert_new(st, t, obj, o.dry_run)
}

const SYSTEM_METADATA: &[&str] =
    &["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "name", "namespace", "generation"];

/// What an update may change: only `.status` on `/status`; everything but `.status` on the main resource
/// of a type with a status subresource; never the system metadata.
fn restrict(t: &Target, old: &Value, new: Value) -> Value {
    let mut out = if t.status {
        let mut out = old.clone();
        match new.get("status") {
            Some(s) => out["status"] = s.clone(),
            None => {
                if let Some(m) = out.as_object_mut() {
                    m.remove("status");
                }
            }
        }
        if let Some(mf) = new.pointer("/metadata/managedFields") {
            set_meta(&mut out, "managedFields", mf.clone());
        }
        out
    } else {
        let mut out = new;
        if t.rt.status_subresource
            && let Some(m) = out.as_object_mut()
        {
            match old.get("status") {
                Some(s) => m.insert("status".into(), s.clone()),
                None => m.remove("status"),
            };
        }
        out
    };
    for key in SYSTEM_METADATA {
        match old.pointer(&format!("/metadata/{key}")) {
            Some(v) => set_meta(&mut out, key, v.clone()),
            None => {
                if let Some(meta) = out.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.remove(*key);
                }
            }
        }
    }
    set_type(&mut out, &t.rt.api_version(), &t.rt.kind);
    out
}

/// Write `new` over `old`: precondition, restriction, field ownership (unless `apply` computed it),
/// no-op detection, generation, finalizer-driven deletion, `MODIFIED`.
fn update_existing(
    st: &mut State,
    t: &Target,
    old: &Value,
    new: Value,
    o: &WriteOpts,
    applied: bool,
) -> ApiResult<Value> {
    let rt: &ResourceType = &t.rt;
    if rv_of(&new).is_some_and(|rv| Some(rv) != rv_of(old)) {
        return Err(ApiError::conflict(&rt.qualified(), name_of(old)));
    }
    let mut new = restrict(t, old, new);
    if !applied {
        let now = now();
        let api_version = rt.api_version();
        ssa::record_update(Some(old), &mut new, &writer(t, o, &api_version, &now));
    }
    if rt.is_crd() {
        crd::validate(&new, &st.registry)?;
        let since = old.pointer("/status/conditions/0/lastTransitionTime").and_then(Value::as_str);
        crd::set_status(&mut new, &since.map_or_else(now, str::to_owned));
    }
    if normalized(&new) == normalized(old) {
        return Ok(present(rt, old.clone()));
    }
    if generation_changes(old, &new) {
        set_meta(&mut new, "generation", json!(generation_of(old) + 1));
    }
    if is_deleting(&new) && finalizers(&new).is_empty() {
        return Ok(present(rt, remove(st, rt, new, o.dry_run)));
    }
    let stored = persist(st, &rt.group_resource(), EventType::Modified, new, Some(old.clone()), o.dry_run);
    if rt.is_crd() && !o.dry_run {
        st.registry.register_crd(&stored);
    }
    Ok(present(rt, stored))
}

fn existing(st: &State, t: &Target) -> ApiResult<Value> {
    let name = t.name()?;
    st.get(&t.rt.group_resource(), t.ns(), name).cloned().ok_or_else(|| t.not_found(name))
}

/// PUT (on the resource or its `/status`). CRs require `metadata.resourceVersion`, as in a real cluster.
pub fn replace(st: &mut State, t: &Target, body: Value, o: &WriteOpts) -> ApiResult<Value> {
    let rt = &t.rt;
    check_type(&body, &rt.api_version(), &rt.kind)?;
    let name = t.name()?;
    if !name_of(&body).is_empty() && name_of(&body) != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            name_of(&body)
        )));
    }
    if !rt.builtin && rv_of(&body).is_none() {
        return Err(ApiError::invalid(format!(
            "{} \"{name}\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
            rt.kind
        )));
    }
    let old = existing(st, t)?;
    update_existing(st, t, &old, body, o, false)
}

fn strip_directives(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.retain(|k, _| !k.starts_with('$'));
            map.values_mut().for_each(strip_directives);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

/// PATCH. Returns the object and whether it was created (only apply creates).
pub fn patch(st: &mut State, t: &Target, pt: PatchType, body: &[u8], o: &WriteOpts) -> ApiResult<(Value, bool)> {
    if pt == PatchType::Apply {
        return apply(st, t, body, o);
    }
    let old = existing(st, t)?;
    let patch: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid patch body: {e}")))?;
    let mut doc = old.clone();
    match pt {
        PatchType::Json => json_patch(&mut doc, &patch)?,
        _ => {
            let mut patch = patch;
            if !patch.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            if pt == PatchType::Strategic {
                strip_directives(&mut patch);
            }
            merge_patch(&mut doc, &patch);
        }
    }
    update_existing(st, t, &old, doc, o, false).map(|v| (v, false))
}

/// Server-side apply.
fn apply(st: &mut State, t: &Target, body: &[u8], o: &WriteOpts) -> ApiResult<(Value, bool)> {
    let rt = &t.rt;
    if o.manager.is_empty() {
        return Err(ApiError::bad_request("fieldManager is required for apply requests"));
    }
    let name = t.name()?.to_owned();
    let mut config = parse_body(body, true)?;
    if config.get("apiVersion").is_none() || config.get("kind").is_none() {
        return Err(ApiError::bad_request("invalid object: apiVersion and kind must be set in an apply configuration"));
    }
    check_type(&config, &rt.api_version(), &rt.kind)?;
    if !name_of(&config).is_empty() && name_of(&config) != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            name_of(&config)
        )));
    }
    let given_ns = config.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default();
    if rt.namespaced && !given_ns.is_empty() && given_ns != t.ns() {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    if let Some(map) = config.as_object_mut() {
        if t.status {
            map.retain(|k, _| ["apiVersion", "kind", "status"].contains(&k.as_str()));
        } else if rt.status_subresource {
            map.remove("status");
        }
    }
    let now = now();
    let api_version = rt.api_version();
    let w = writer(t, o, &api_version, &now);
    match st.get(&rt.group_resource(), t.ns(), &name).cloned() {
        Some(old) => {
            let merged = ssa::apply(&old, &config, &w, o.force)?;
            update_existing(st, t, &old, merged, o, true).map(|v| (v, false))
        }
        None if t.status => Err(t.not_found(&name)),
        None if rv_of(&config).is_some() => Err(ApiError::conflict(&rt.qualified(), &name)),
        None => {
            let mut skeleton = json!({"apiVersion": api_version, "kind": rt.kind, "metadata": {"name": name}});
            place(t, &mut skeleton)?;
            let mut merged = ssa::apply(&skeleton, &config, &w, o.force)?;
            place(t, &mut merged)?;
            initial_status(rt, &mut merged);
            insert_new(st, t, merged, o.dry_run).map(|v| (v, true))
        }
    }
}
