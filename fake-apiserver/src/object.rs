//! Helpers on JSON objects: metadata, names, generation, timestamps.

use serde_json::{Value, json};

use crate::error::{ApiError, ApiResult};

/// Now, as an RFC 3339 timestamp with second precision (the Kubernetes `Time` format).
pub fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A random 5-character suffix from the alphabet the real server uses for `generateName`.
pub fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    uuid::Uuid::new_v4().as_bytes()[..5].iter().map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char).collect()
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Validate an object name: a DNS-1123 label for namespaces, a DNS-1123 subdomain otherwise.
pub fn validate_name(kind: &str, name: &str, label_only: bool) -> ApiResult<()> {
    let ok = if label_only { is_dns_label(name) } else { name.len() <= 253 && name.split('.').all(is_dns_label) };
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{kind} \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 {} must \
             consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric \
             character",
            if label_only { "label" } else { "subdomain" }
        )))
    }
}

fn without(v: &Value, keys: &[&str]) -> Value {
    let mut v = v.clone();
    if let Some(map) = v.as_object_mut() {
        for k in keys {
            map.remove(*k);
        }
    }
    v
}

/// Whether the change from `old` to `new` bumps `metadata.generation`: a change of `spec`, or for objects
/// without `spec`, a change of anything but `metadata` and `status`.
pub fn generation_changes(old: &Value, new: &Value) -> bool {
    if old.get("spec").is_some() || new.get("spec").is_some() {
        old.get("spec") != new.get("spec")
    } else {
        let ignore = ["metadata", "status", "apiVersion", "kind"];
        without(old, &ignore) != without(new, &ignore)
    }
}

pub fn generation_of(v: &Value) -> i64 {
    v.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0)
}

/// The object as compared for "did anything change": no resourceVersion, no managedFields timestamps.
pub fn normalized(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        if let Some(Value::Array(entries)) = meta.get_mut("managedFields") {
            for e in entries.iter_mut().filter_map(Value::as_object_mut) {
                e.remove("time");
            }
        }
    }
    v
}

pub fn finalizers(v: &Value) -> Vec<String> {
    v.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default()
}

pub fn is_deleting(v: &Value) -> bool {
    v.pointer("/metadata/deletionTimestamp").is_some_and(|t| !t.is_null())
}

/// Parse a request body as a JSON (or YAML) object.
pub fn parse_body(body: &[u8], yaml: bool) -> ApiResult<Value> {
    let v: Value = if yaml {
        serde_yaml_ng::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid YAML body: {e}")))?
    } else {
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?
    };
    if v.is_object() { Ok(v) } else { Err(ApiError::bad_request("the request body must be an object")) }
}

/// Check that a body's `apiVersion`/`kind` (when given) are those of the endpoint.
pub fn check_type(body: &Value, api_version: &str, kind: &str) -> ApiResult<()> {
    let given = |k: &str| body.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
    if let Some(v) = given("apiVersion").filter(|v| *v != api_version) {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({v}) does not match the expected API version ({api_version})"
        )));
    }
    if let Some(k) = given("kind").filter(|k| *k != kind) {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({k}) does not match the expected kind ({kind})"
        )));
    }
    Ok(())
}

/// Set `apiVersion` and `kind` to the endpoint's.
pub fn set_type(v: &mut Value, api_version: &str, kind: &str) {
    v["apiVersion"] = json!(api_version);
    v["kind"] = json!(kind);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_rules() {
        let a = json!({"metadata": {"labels": {"x": "1"}}, "spec": {"a": 1}, "status": {"s": 1}});
        let mut b = a.clone();
        b["metadata"]["labels"]["x"] = json!("2");
        b["status"]["s"] = json!(2);
        assert!(!generation_changes(&a, &b));
        b["spec"]["a"] = json!(2);
        assert!(generation_changes(&a, &b));
        let cm = json!({"metadata": {}, "data": {"k": "v"}});
        let mut cm2 = cm.clone();
        cm2["metadata"]["labels"] = json!({"a": "b"});
        assert!(!generation_changes(&cm, &cm2));
        cm2["data"]["k"] = json!("w");
        assert!(generation_changes(&cm, &cm2));
    }

    #[test]
    fn names() {
        assert!(validate_name("x", "a.b-c", false).is_ok());
        assert!(validate_name("x", "a.b", true).is_err());
        assert!(validate_name("x", "Abc", false).is_err());
        assert_eq!(random_suffix().len(), 5);
    }
}
