//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! Simpler than the real structured-merge-diff: a field is a path of map keys; a leaf is anything that is
//! not a non-empty map (scalars, `null`-free lists, empty maps). Lists are therefore owned and replaced
//! atomically (no `x-kubernetes-list-type: map/set` merging, so also `metadata.finalizers` and
//! `ownerReferences` are atomic lists).

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use crate::error::{ApiError, ApiResult};

/// A field path (map keys from the object root).
pub type Path = Vec<String>;
/// A set of owned leaf fields.
pub type FieldSet = BTreeSet<Path>;

/// One `metadata.managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedEntry {
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    pub api_version: String,
    pub time: String,
    /// `""` or `status`.
    pub subresource: String,
    pub fields: FieldSet,
}

const IGNORED_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
    "generateName",
];

fn ignored(path: &[String]) -> bool {
    match path {
        [top] => top == "apiVersion" || top == "kind",
        [meta, field] => meta == "metadata" && IGNORED_METADATA.contains(&field.as_str()),
        _ => false,
    }
}

fn collect_leaves(v: &Value, path: &mut Path, out: &mut FieldSet) {
    if ignored(path) {
        return;
    }
    match v {
        Value::Null => {}
        Value::Object(map) if !map.is_empty() => {
            for (k, child) in map {
                path.push(k.clone());
                collect_leaves(child, path, out);
                path.pop();
            }
        }
        _ if !path.is_empty() => {
            out.insert(path.clone());
        }
        _ => {}
    }
}

/// The tracked leaf fields of an object.
pub fn leaves(v: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    collect_leaves(v, &mut Vec::new(), &mut out);
    out
}

pub fn get<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

/// Remove a field, then any parent maps it leaves empty (below the top level).
pub fn remove_path(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else { return };
    if let Some(Value::Object(parent)) = parents.iter().try_fold(&mut *v, |v, k| v.get_mut(k)) {
        parent.remove(last);
        if parent.is_empty() && parents.len() > 1 {
            remove_path(v, parents);
        }
    }
}

/// Whether one path is a prefix of (or equal to) the other.
fn overlaps(a: &[String], b: &[String]) -> bool {
    a.iter().zip(b).all(|(x, y)| x == y)
}

/// Encode a field set as `fieldsV1` (`{"f:spec":{"f:replicas":{}}}`; `.` marks an owned node with children).
pub fn to_fields_v1(set: &FieldSet) -> Value {
    fn node<'m>(root: &'m mut Map<String, Value>, path: &[String]) -> &'m mut Map<String, Value> {
        path.iter().fold(root, |node, k| {
            let entry = node.entry(format!("f:{k}")).or_insert_with(|| json!({}));
            if !entry.is_object() {
                *entry = json!({});
            }
            match entry {
                Value::Object(next) => next,
                _ => unreachable!("just made an object"),
            }
        })
    }
    let mut root = Map::new();
    for path in set {
        node(&mut root, path);
    }
    for path in set {
        let n = node(&mut root, path);
        if n.keys().any(|k| k != ".") {
            n.insert(".".into(), json!({}));
        }
    }
    Value::Object(root)
}

fn decode(v: &Value, path: &mut Path, out: &mut FieldSet) {
    let Some(map) = v.as_object() else { return };
    if map.is_empty() && !path.is_empty() {
        out.insert(path.clone());
        return;
    }
    for (k, child) in map {
        if let Some(name) = k.strip_prefix("f:") {
            path.push(name.to_owned());
            decode(child, path, out);
            path.pop();
        } else if !path.is_empty() {
            // `.` (the node itself) or list keys `k:`/`v:`/`i:`: owned as one atomic leaf here.
            out.insert(path.clone());
        }
    }
}

/// Decode `fieldsV1`.
pub fn from_fields_v1(v: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    decode(v, &mut Vec::new(), &mut out);
    out
}

/// The `metadata.managedFields` of an object.
pub fn read_managed(obj: &Value) -> Vec<ManagedEntry> {
    let Some(list) = obj.pointer("/metadata/managedFields").and_then(Value::as_array) else { return Vec::new() };
    let s = |e: &Value, k: &str| e.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    list.iter()
        .map(|e| ManagedEntry {
            manager: s(e, "manager"),
            operation: s(e, "operation"),
            api_version: s(e, "apiVersion"),
            time: s(e, "time"),
            subresource: s(e, "subresource"),
            fields: e.get("fieldsV1").map(from_fields_v1).unwrap_or_default(),
        })
        .collect()
}

/// Store entries (dropping empty ones) as `metadata.managedFields`.
pub fn write_managed(obj: &mut Value, entries: &[ManagedEntry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.fields),
            });
            if !e.subresource.is_empty() {
                v["subresource"] = json!(e.subresource);
            }
            v
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// Who is writing and how.
#[derive(Debug, Clone)]
pub struct Writer<'a> {
    pub manager: &'a str,
    pub subresource: &'a str,
    pub api_version: &'a str,
    pub now: &'a str,
}

fn entry_mut<'e>(entries: &'e mut Vec<ManagedEntry>, w: &Writer<'_>, operation: &str) -> &'e mut ManagedEntry {
    let pos = entries
        .iter()
        .position(|e| e.manager == w.manager && e.operation == operation && e.subresource == w.subresource);
    let idx = pos.unwrap_or_else(|| {
        entries.push(ManagedEntry {
            manager: w.manager.to_owned(),
            operation: operation.to_owned(),
            api_version: w.api_version.to_owned(),
            time: w.now.to_owned(),
            subresource: w.subresource.to_owned(),
            fields: FieldSet::new(),
        });
        entries.len() - 1
    });
    &mut entries[idx]
}

fn prune(entries: &mut [ManagedEntry], obj: &Value) {
    for e in entries {
        e.fields.retain(|p| get(obj, p).is_some_and(|v| !v.is_null()));
    }
}

/// Record a non-apply write (`operation: Update`): `writer` takes every changed field from the others.
pub fn record_update(old: Option<&Value>, new: &mut Value, w: &Writer<'_>) {
    let mut entries = old.map(read_managed).unwrap_or_default();
    let changed: FieldSet = leaves(new).into_iter().filter(|p| old.and_then(|o| get(o, p)) != get(new, p)).collect();
    if !changed.is_empty() {
        for e in entries.iter_mut() {
            e.fields.retain(|q| !changed.iter().any(|p| overlaps(p, q)));
        }
        let mine = entry_mut(&mut entries, w, "Update");
        mine.fields.extend(changed);
        mine.time = w.now.to_owned();
        mine.api_version = w.api_version.to_owned();
    }
    prune(&mut entries, new);
    write_managed(new, &entries);
}

fn dotted(path: &[String]) -> String {
    path.iter().map(|k| format!(".{k}")).collect()
}

fn conflict_error(conflicts: &[(String, String, Path)]) -> ApiError {
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|(manager, api_version, path)| {
            json!({
                "reason": "FieldManagerConflict",
                "message": format!("conflict with \"{manager}\" using {api_version}"),
                "field": dotted(path),
            })
        })
        .collect();
    let lines: Vec<String> =
        conflicts.iter().map(|(m, v, p)| format!("conflict with \"{m}\" using {v}: {}", dotted(p))).collect();
    let n = conflicts.len();
    let message = if n == 1 {
        format!("Apply failed with 1 conflict: {}", lines.join(""))
    } else {
        format!("Apply failed with {n} conflicts: {}", lines.join("\n"))
    };
    ApiError::new(409, "Conflict", message).with_details(json!({"causes": causes}))
}

/// Recursively merge an apply configuration into `target`: maps merge, everything else replaces,
/// `null` removes.
fn deep_merge(target: &mut Value, config: &Value) {
    match (target, config) {
        (Value::Object(t), Value::Object(c)) => {
            for (k, v) in c {
                if v.is_null() {
                    t.remove(k);
                } else if let Some(existing) = t.get_mut(k).filter(|e| e.is_object() && v.is_object()) {
                    deep_merge(existing, v);
                } else {
                    t.insert(k.clone(), v.clone());
                }
            }
        }
        (t, c) => *t = c.clone(),
    }
}

/// Server-side apply `config` (already stripped of what this endpoint ignores) onto `current`
/// (`json!({})`-like skeleton when creating). Returns the merged object with updated `managedFields`.
pub fn apply(current: &Value, config: &Value, w: &Writer<'_>, force: bool) -> ApiResult<Value> {
    let mut entries = read_managed(current);
    let mut config = config.clone();
    if let Some(meta) = config.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    let applied = leaves(&config);

    // A field owned by another manager conflicts when applying would change its value (an owned empty
    // map only when it would stop being a map).
    let mut tentative = current.clone();
    deep_merge(&mut tentative, &config);
    let changes = |q: &Path| {
        let (before, after) = (get(current, q), get(&tentative, q));
        let still_map =
            before.is_some_and(|b| b.as_object().is_some_and(Map::is_empty)) && after.is_some_and(Value::is_object);
        before != after && !still_map
    };
    let mut conflicts: Vec<(String, String, Path)> = Vec::new();
    let mut forced: Vec<(usize, Path)> = Vec::new();
    for (i, e) in entries.iter().enumerate().filter(|(_, e)| e.manager != w.manager) {
        for q in e.fields.iter().filter(|q| applied.iter().any(|p| overlaps(p, q))) {
            if changes(q) {
                conflicts.push((e.manager.clone(), e.api_version.clone(), q.clone()));
                forced.push((i, q.clone()));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflict_error(&conflicts));
    }
    for (i, q) in forced {
        entries[i].fields.remove(&q);
    }

    let mut merged = current.clone();
    let previous = entries
        .iter()
        .find(|e| e.manager == w.manager && e.operation == "Apply" && e.subresource == w.subresource)
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    for r in previous.difference(&applied) {
        let kept_by_other = entries
            .iter()
            .filter(|e| !(e.manager == w.manager && e.operation == "Apply" && e.subresource == w.subresource))
            .any(|e| e.fields.iter().any(|q| overlaps(q, r)));
        if !kept_by_other && !applied.iter().any(|p| p.len() >= r.len() && overlaps(p, r)) {
            remove_path(&mut merged, r);
        }
    }
    deep_merge(&mut merged, &config);

    let mine = entry_mut(&mut entries, w, "Apply");
    mine.fields = applied;
    mine.time = w.now.to_owned();
    mine.api_version = w.api_version.to_owned();
    prune(&mut entries, &merged);
    write_managed(&mut merged, &entries);
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(manager: &str) -> Writer<'_> {
        Writer { manager, subresource: "", api_version: "example.com/v1", now: "2024-01-01T00:00:00Z" }
    }

    fn p(s: &str) -> Path {
        s.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn fields_v1_roundtrip() {
        let set: FieldSet = [p("spec.a"), p("spec.b.c"), p("metadata.labels.x")].into_iter().collect();
        let v = to_fields_v1(&set);
        assert_eq!(v, json!({"f:spec": {"f:a": {}, "f:b": {"f:c": {}}}, "f:metadata": {"f:labels": {"f:x": {}}}}));
        assert_eq!(from_fields_v1(&v), set);
        let both: FieldSet = [p("spec"), p("spec.a")].into_iter().collect();
        assert_eq!(from_fields_v1(&to_fields_v1(&both)), both);
    }

    #[test]
    fn apply_conflicts_and_force() {
        let base = json!({"metadata": {"name": "a"}});
        let a = apply(&base, &json!({"metadata": {"name": "a"}, "spec": {"x": 1, "y": 1}}), &w("a"), false).unwrap();
        // Same value: shared ownership, no conflict.
        let b = apply(&a, &json!({"spec": {"x": 1}}), &w("b"), false).unwrap();
        let err = apply(&b, &json!({"spec": {"y": 2}}), &w("b"), false).unwrap_err();
        assert_eq!(err.code, 409);
        assert!(err.message.contains("conflict with \"a\""), "{}", err.message);
        assert_eq!(err.details.unwrap()["causes"][0]["field"], ".spec.y");
        let forced = apply(&b, &json!({"spec": {"y": 2}}), &w("b"), true).unwrap();
        assert_eq!(forced["spec"], json!({"x": 1, "y": 2}));
        let entries = read_managed(&forced);
        let a_fields = &entries.iter().find(|e| e.manager == "a").unwrap().fields;
        assert!(a_fields.contains(&p("spec.x")) && !a_fields.contains(&p("spec.y")));
        // b dropped spec.x from its config: still owned by a, so it stays.
        assert_eq!(forced["spec"]["x"], 1);
        // a drops spec.x: nobody owns it anymore, so it is removed.
        let a2 = apply(&forced, &json!({"spec": {}}), &w("a"), false).unwrap();
        assert_eq!(a2["spec"], json!({"y": 2}));
    }

    #[test]
    fn update_takes_ownership() {
        let base = json!({"metadata": {"name": "a"}});
        let applied = apply(&base, &json!({"spec": {"x": 1}}), &w("a"), false).unwrap();
        let mut new = applied.clone();
        new["spec"]["x"] = json!(2);
        record_update(Some(&applied), &mut new, &w("editor"));
        let entries = read_managed(&new);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].manager, "editor");
        assert_eq!(entries[0].operation, "Update");
    }
}
