//! `meta.k8s.io/v1` `Table` rendering (what `kubectl get` asks for), from printer columns.

use serde_json::{Value, json};

use crate::resource::{PrinterColumn, ResourceType};

/// `includeObject` of a Table request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IncludeObject {
    None,
    #[default]
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("None") => Self::None,
            Some("Object") => Self::Object,
            _ => Self::Metadata,
        }
    }
}

#[derive(Debug, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

fn parse_path(path: &str) -> Option<Vec<Step>> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let mut steps = Vec::new();
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            if end > 0 {
                steps.push(Step::Key(r[..end].to_owned()));
            }
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let inner = r[..end].trim();
            match inner.parse::<usize>() {
                Ok(i) => steps.push(Step::Index(i)),
                Err(_) => steps.push(Step::Key(inner.trim_matches(|c| c == '\'' || c == '"').to_owned())),
            }
            rest = &r[end + 1..];
        } else {
            return None;
        }
    }
    Some(steps)
}

/// Evaluate a simple JSONPath (`.a.b`, `.a[0].b`, `.a['x.y']`).
pub fn jsonpath<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    parse_path(path)?.iter().try_fold(obj, |v, step| match step {
        Step::Key(k) => v.get(k),
        Step::Index(i) => v.get(i),
    })
}

/// `k8s.io/apimachinery/pkg/util/duration.HumanDuration`.
pub fn human_duration(secs: i64) -> String {
    let (m, h) = (secs / 60, secs / 3600);
    let (d, y) = (h / 24, h / (24 * 365));
    let with = |a: i64, ua: &str, b: i64, ub: &str| if b == 0 { format!("{a}{ua}") } else { format!("{a}{ua}{b}{ub}") };
    match () {
        () if secs < -1 => "<invalid>".to_owned(),
        () if secs < 0 => "0s".to_owned(),
        () if secs < 120 => format!("{secs}s"),
        () if m < 10 => with(m, "m", secs % 60, "s"),
        () if m < 180 => format!("{m}m"),
        () if h < 8 => with(h, "h", m % 60, "m"),
        () if h < 48 => format!("{h}h"),
        () if h < 24 * 8 => with(d, "d", h % 24, "h"),
        () if h < 24 * 365 * 2 => format!("{d}d"),
        () if h < 24 * 365 * 8 => with(y, "y", d % 365, "d"),
        () => format!("{y}y"),
    }
}

fn age(ts: &str) -> Option<String> {
    let t = chrono::DateTime::parse_from_rfc3339(ts).ok()?;
    Some(human_duration((chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds()))
}

fn cell(col: &PrinterColumn, obj: &Value) -> Value {
    if let Some(path) = col.json_path.strip_prefix("#len ") {
        return match jsonpath(obj, path) {
            Some(Value::Object(m)) => json!(m.len()),
            Some(Value::Array(a)) => json!(a.len()),
            _ => json!(0),
        };
    }
    let Some(v) = jsonpath(obj, &col.json_path).filter(|v| !v.is_null()) else { return Value::Null };
    match (col.type_.as_str(), v) {
        ("date", Value::String(ts)) => age(ts).map_or_else(|| v.clone(), Value::String),
        ("string", Value::String(_)) => v.clone(),
        ("string", Value::Array(items)) => json!(
            items.iter().map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned)).collect::<Vec<_>>().join(",")
        ),
        ("string", other) => json!(other.to_string()),
        _ => v.clone(),
    }
}

fn name_column() -> Value {
    json!({
        "name": "Name",
        "type": "string",
        "format": "name",
        "description": "Name must be unique within a namespace. Is required when creating resources, although some \
                        resources may allow a client to request the generation of an appropriate name automatically.",
        "priority": 0,
    })
}

pub fn column_definitions(rt: &ResourceType) -> Vec<Value> {
    std::iter::once(name_column())
        .chain(rt.columns.iter().map(|c| {
            json!({"name": c.name, "type": c.type_, "format": c.format, "description": c.description, "priority": c.priority})
        }))
        .collect()
}

pub fn row(rt: &ResourceType, obj: &Value, include: IncludeObject) -> Value {
    let name = obj.pointer("/metadata/name").cloned().unwrap_or(Value::Null);
    let cells: Vec<Value> = std::iter::once(name).chain(rt.columns.iter().map(|c| cell(c, obj))).collect();
    let object = match include {
        IncludeObject::None => Value::Null,
        IncludeObject::Object => obj.clone(),
        IncludeObject::Metadata => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
        }),
    };
    json!({"cells": cells, "object": object})
}

/// A Table of objects; `list_metadata` is the list's `metadata` (resourceVersion, continue).
pub fn table(rt: &ResourceType, objs: &[Value], list_metadata: Value, include: IncludeObject) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_metadata,
        "columnDefinitions": column_definitions(rt),
        "rows": objs.iter().map(|o| row(rt, o, include)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let o = json!({"spec": {"a": [{"b": 1}], "x.y": "z"}});
        assert_eq!(jsonpath(&o, ".spec.a[0].b"), Some(&json!(1)));
        assert_eq!(jsonpath(&o, "{.spec['x.y']}"), Some(&json!("z")));
        assert_eq!(jsonpath(&o, ".spec.missing"), None);
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(125), "2m5s");
        assert_eq!(human_duration(3600 * 5 + 60), "5h1m");
        assert_eq!(human_duration(3600 * 24 * 3), "3d");
    }
}
