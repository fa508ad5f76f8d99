//! `CustomResourceDefinition` handling: validation of what serving needs, and the status the
//! real apiextensions controllers would set (`Established`, `NamesAccepted`, `acceptedNames`).

use serde_json::{Value, json};

use crate::error::{ApiError, ApiResult};
use crate::resource::{GroupResource, Registry};

fn s<'a>(v: &'a Value, ptr: &str) -> Option<&'a str> {
    v.pointer(ptr).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// Check the parts of a CRD that serving relies on (the real server validates much more).
pub fn validate(crd: &Value, registry: &Registry) -> ApiResult<()> {
    let name = s(crd, "/metadata/name").unwrap_or_default();
    let invalid = |msg: String| {
        ApiError::invalid(format!("CustomResourceDefinition.apiextensions.k8s.io \"{name}\" is invalid: {msg}"))
    };
    let group = s(crd, "/spec/group").ok_or_else(|| invalid("spec.group: Required value".into()))?;
    let plural = s(crd, "/spec/names/plural").ok_or_else(|| invalid("spec.names.plural: Required value".into()))?;
    s(crd, "/spec/names/kind").ok_or_else(|| invalid("spec.names.kind: Required value".into()))?;
    if name != format!("{plural}.{group}") {
        return Err(invalid(format!(
            "metadata.name: Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"
        )));
    }
    match s(crd, "/spec/scope") {
        Some("Namespaced" | "Cluster") => {}
        other => {
            return Err(invalid(format!(
                "spec.scope: Unsupported value: {other:?}: supported values: \"Cluster\", \"Namespaced\""
            )));
        }
    }
    let versions = crd.pointer("/spec/versions").and_then(Value::as_array).cloned().unwrap_or_default();
    if versions.is_empty() {
        return Err(invalid(
            "spec.versions: Invalid value: must have exactly one version marked as storage version".into(),
        ));
    }
    if versions.iter().filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true)).count() != 1 {
        return Err(invalid(
            "spec.versions: Invalid value: must have exactly one version marked as storage version".into(),
        ));
    }
    if versions.iter().any(|v| s(v, "/name").is_none()) {
        return Err(invalid("spec.versions[].name: Required value".into()));
    }
    let builtin_clash = registry.any_version(&GroupResource::new(group, plural)).is_some_and(|t| t.builtin);
    if builtin_clash {
        return Err(invalid(format!(
            "spec.names.plural: Invalid value: \"{plural}\": is served by a built-in resource"
        )));
    }
    Ok(())
}

/// Set the status a real cluster converges to right after creation.
pub fn set_status(crd: &mut Value, now: &str) {
    let names = crd.pointer("/spec/names").cloned().unwrap_or_else(|| json!({}));
    let stored: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .map(|vs| {
            vs.iter()
                .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .filter_map(|v| v.get("name").cloned())
                .collect()
        })
        .unwrap_or_default();
    let condition = |type_: &str, reason: &str, message: &str| json!({"type": type_, "status": "True", "lastTransitionTime": now, "reason": reason, "message": message});
    crd["status"] = json!({
        "acceptedNames": names,
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "storedVersions": stored,
    });
}
