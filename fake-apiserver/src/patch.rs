//! JSON merge patch (RFC 7386) and JSON patch (RFC 6902).

use serde_json::Value;

use crate::error::{ApiError, ApiResult};

/// Apply an RFC 7386 merge patch to `target` in place (`null` removes a key; lists are replaced).
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(target_map) = target {
        for (k, v) in patch_map {
            if v.is_null() {
                target_map.remove(k);
            } else {
                merge_patch(target_map.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// Split a JSON pointer into its parent pointer and unescaped last token.
fn split_pointer(path: &str) -> ApiResult<(&str, String)> {
    if path.is_empty() {
        return Err(ApiError::invalid("json patch: the root path is not supported"));
    }
    let idx = path.rfind('/').ok_or_else(|| ApiError::invalid(format!("json patch: invalid path {path:?}")))?;
    Ok((&path[..idx], unescape(&path[idx + 1..])))
}

fn missing(path: &str) -> ApiError {
    ApiError::invalid(format!("json patch: path {path:?} does not exist"))
}

fn add(doc: &mut Value, path: &str, value: Value) -> ApiResult<()> {
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent).ok_or_else(|| missing(parent))? {
        Value::Object(map) => {
            map.insert(last, value);
        }
        Value::Array(list) => {
            let idx = if last == "-" { list.len() } else { last.parse::<usize>().map_err(|_| missing(path))? };
            if idx > list.len() {
                return Err(missing(path));
            }
            list.insert(idx, value);
        }
        _ => return Err(missing(path)),
    }
    Ok(())
}

fn remove(doc: &mut Value, path: &str) -> ApiResult<Value> {
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent).ok_or_else(|| missing(parent))? {
        Value::Object(map) => map.remove(&last).ok_or_else(|| missing(path)),
        Value::Array(list) => {
            let idx = last.parse::<usize>().map_err(|_| missing(path))?;
            if idx >= list.len() {
                return Err(missing(path));
            }
            Ok(list.remove(idx))
        }
        _ => Err(missing(path)),
    }
}

fn field<'a>(op: &'a Value, name: &str) -> ApiResult<&'a Value> {
    op.get(name).ok_or_else(|| ApiError::invalid(format!("json patch: operation is missing {name:?}: {op}")))
}

fn str_field<'a>(op: &'a Value, name: &str) -> ApiResult<&'a str> {
    field(op, name)?.as_str().ok_or_else(|| ApiError::invalid(format!("json patch: {name:?} must be a string")))
}

/// Apply an RFC 6902 JSON patch (`add`, `remove`, `replace`, `move`, `copy`, `test`) to `doc`.
///
/// As in the real apiserver, `test` of a missing path against `null` succeeds.
pub fn json_patch(doc: &mut Value, patch: &Value) -> ApiResult<()> {
    let ops = patch.as_array().ok_or_else(|| ApiError::bad_request("json patch must be a JSON array"))?;
    for op in ops {
        let path = str_field(op, "path")?;
        match str_field(op, "op")? {
            "add" => add(doc, path, field(op, "value")?.clone())?,
            "remove" => {
                remove(doc, path)?;
            }
            "replace" => {
                remove(doc, path)?;
                add(doc, path, field(op, "value")?.clone())?;
            }
            "move" => {
                let value = remove(doc, str_field(op, "from")?)?;
                add(doc, path, value)?;
            }
            "copy" => {
                let from = str_field(op, "from")?;
                let value = doc.pointer(from).cloned().ok_or_else(|| missing(from))?;
                add(doc, path, value)?;
            }
            "test" => {
                let expected = field(op, "value")?;
                let actual = doc.pointer(path).unwrap_or(&Value::Null);
                if actual != expected {
                    return Err(ApiError::invalid(format!(
                        "the server rejected our request due to an error in our request: \
                         json patch test operation failed at {path:?}"
                    )));
                }
            }
            other => return Err(ApiError::invalid(format!("json patch: unsupported operation {other:?}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "l": [1, 2], "x": 1});
        merge_patch(&mut t, &json!({"a": {"b": null, "d": 3}, "l": [3], "x": {"y": 1}}));
        assert_eq!(t, json!({"a": {"c": 2, "d": 3}, "l": [3], "x": {"y": 1}}));
    }

    #[test]
    fn json_ops() {
        let mut d = json!({"metadata": {"name": "a"}});
        let p = json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["x"]},
            {"op": "add", "path": "/metadata/finalizers/-", "value": "y"},
            {"op": "copy", "from": "/metadata/name", "path": "/spec"},
            {"op": "replace", "path": "/metadata/name", "value": "b"},
        ]);
        json_patch(&mut d, &p).unwrap();
        assert_eq!(d, json!({"metadata": {"name": "b", "finalizers": ["x", "y"]}, "spec": "a"}));
        let p = json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": "x"},
            {"op": "remove", "path": "/metadata/finalizers/0"},
            {"op": "move", "from": "/spec", "path": "/status"},
        ]);
        json_patch(&mut d, &p).unwrap();
        assert_eq!(d, json!({"metadata": {"name": "b", "finalizers": ["y"]}, "status": "a"}));
        let bad = json!([{"op": "test", "path": "/metadata/finalizers/0", "value": "x"}]);
        assert_eq!(json_patch(&mut d, &bad).unwrap_err().code, 422);
        assert!(json_patch(&mut d, &json!([{"op": "remove", "path": "/nope"}])).is_err());
    }
}
