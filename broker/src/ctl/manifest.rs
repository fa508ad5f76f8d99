//! Manifests in the CRD shape (`apiVersion`, `kind`, `metadata`, `spec`), YAML or JSON, one or
//! many documents (or a `kind: List`), to and from wire resources.

use serde::Deserialize;
use serde_json::{Map, Value, json};
use xpu_proto::broker::v1 as pb;

use crate::model::{
    Kind,
    convert::{resource_kind, resource_meta},
    object::Spec,
};

pub const API_VERSION: &str = "xpu.opi.dev/v1alpha1";

#[derive(Debug, thiserror::Error)]
#[error("document {doc}: {message}")]
pub struct ManifestError {
    pub doc: usize,
    pub message: String,
}

/// Deepest flow nesting (`[`, `{`) a manifest may have; the YAML parser's own recursion limit
/// (128) applies to block nesting.
const MAX_FLOW_DEPTH: usize = 128;

/// Refuses flow nesting deeper than [`MAX_FLOW_DEPTH`] in one linear pass, before the YAML
/// scanner (whose work grows with the square of the flow depth) sees it. Quoted scalars and
/// comments are skipped; a bracket inside a plain scalar counts, which can only make a
/// pathological document fail sooner.
fn check_flow_depth(text: &str) -> Result<(), ManifestError> {
    let (mut depth, mut doc) = (0usize, 1usize);
    let mut quote: Option<char> = None;
    let mut comment = false;
    let mut line_start = true;
    let mut prev = '\n';
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\n' {
            comment = false;
            line_start = true;
            prev = c;
            continue;
        }
        if line_start && quote.is_none() && depth == 0 && c == '-' && text_starts_marker(&mut chars) {
            doc += 1;
        }
        line_start = false;
        match quote {
            Some('\'') if c == '\'' => quote = None,
            Some('"') if c == '\\' => {
                chars.next();
            }
            Some('"') if c == '"' => quote = None,
            Some(_) => {}
            None if comment => {}
            None => match c {
                '#' if prev.is_whitespace() => comment = true,
                '\'' | '"' => quote = Some(c),
                '[' | '{' => {
                    depth += 1;
                    if depth > MAX_FLOW_DEPTH {
                        return Err(ManifestError {
                            doc,
                            message: format!("recursion limit exceeded: flow nesting deeper than {MAX_FLOW_DEPTH}"),
                        });
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
        prev = c;
    }
    Ok(())
}

/// After a `-` at the start of a line: whether the line is a document marker (`---`).
fn text_starts_marker(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> bool {
    let rest: String = chars.clone().take(3).collect();
    rest.starts_with("--") && rest.chars().nth(2).is_none_or(char::is_whitespace)
}

pub fn parse(text: &str) -> Result<Vec<pb::Resource>, ManifestError> {
    check_flow_depth(text)?;
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let doc_no = i + 1;
        let value = Value::deserialize(doc).map_err(|e| ManifestError { doc: doc_no, message: e.to_string() })?;
        if value.is_null() {
            continue;
        }
        if value.get("kind").and_then(Value::as_str) == Some("List") {
            let items = value.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
            for (j, item) in items.into_iter().enumerate() {
                out.push(
                    resource(item).map_err(|m| ManifestError { doc: doc_no, message: format!("items[{j}]: {m}") })?,
                );
            }
        } else {
            out.push(resource(value).map_err(|message| ManifestError { doc: doc_no, message })?);
        }
    }
    Ok(out)
}

fn resource(v: Value) -> Result<pb::Resource, String> {
    let Value::Object(mut obj) = v else {
        return Err("is not an object".into());
    };
    let api = obj.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    if api != API_VERSION {
        return Err(format!("apiVersion must be {API_VERSION}, got {api:?}"));
    }
    let kind_name = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
    let kind = Kind::parse_stored(kind_name).ok_or_else(|| {
        format!(
            "unknown kind {kind_name:?} (one of {})",
            Kind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
        )
    })?;
    let meta = obj.remove("metadata").unwrap_or(Value::Null);
    let name = meta.get("name").and_then(Value::as_str).ok_or("metadata.name is required")?.to_string();
    let namespace = meta.get("namespace").and_then(Value::as_str).unwrap_or_default().to_string();
    let mut labels = std::collections::HashMap::new();
    if let Some(l) = meta.get("labels") {
        let Value::Object(l) = l else {
            return Err("metadata.labels must be a map".into());
        };
        for (k, v) in l {
            let v = v.as_str().ok_or_else(|| format!("metadata.labels[{k:?}] must be a string"))?;
            labels.insert(k.clone(), v.to_string());
        }
    }
    let spec = obj.remove("spec").ok_or("spec is required")?;
    let spec = Spec::from_json(kind, spec, "spec").map_err(|e| e.to_string())?;
    let metadata = Some(pb::ObjectMeta { name, namespace, labels, ..Default::default() });
    use pb::resource::Kind as R;
    let kind = match spec {
        Spec::Dpu(s) => R::Dpu(pb::Dpu { metadata, spec: Some(s), status: None }),
        Spec::Netdev(s) => R::Netdev(pb::Netdev { metadata, spec: Some(s), status: None }),
        Spec::LogicalBridge(s) => R::LogicalBridge(pb::LogicalBridge { metadata, spec: Some(s), status: None }),
        Spec::Vrf(s) => R::Vrf(pb::Vrf { metadata, spec: Some(s), status: None }),
        Spec::Svi(s) => R::Svi(pb::Svi { metadata, spec: Some(s), status: None }),
        Spec::XpuNetwork(s) => R::XpuNetwork(pb::XpuNetwork { metadata, spec: Some(s), status: None }),
        Spec::FlowPolicy(s) => R::FlowPolicy(pb::FlowPolicy { metadata, spec: Some(s), status: None }),
    };
    Ok(pb::Resource { kind: Some(kind) })
}

/// A resource as a CRD-shaped manifest, with metadata, spec and status.
pub fn to_manifest(res: &pb::Resource) -> Value {
    use pb::resource::Kind as R;
    let (spec, status) = match res.kind.as_ref() {
        Some(R::Dpu(o)) => (to_json(&o.spec), to_json(&o.status)),
        Some(R::Netdev(o)) => (to_json(&o.spec), to_json(&o.status)),
        Some(R::LogicalBridge(o)) => (to_json(&o.spec), to_json(&o.status)),
        Some(R::Vrf(o)) => (to_json(&o.spec), to_json(&o.status)),
        Some(R::Svi(o)) => (to_json(&o.spec), to_json(&o.status)),
        Some(R::XpuNetwork(o)) => (to_json(&o.spec), to_json(&o.status)),
        Some(R::FlowPolicy(o)) => (to_json(&o.spec), to_json(&o.status)),
        None => (Value::Null, Value::Null),
    };
    let mut meta = Map::new();
    if let Some(m) = resource_meta(res) {
        meta.insert("name".into(), json!(m.name));
        if !m.namespace.is_empty() {
            meta.insert("namespace".into(), json!(m.namespace));
        }
        if !m.uid.is_empty() {
            meta.insert("uid".into(), json!(m.uid));
        }
        meta.insert("generation".into(), json!(m.generation));
        meta.insert("resourceVersion".into(), json!(m.revision.to_string()));
        if !m.creation_timestamp.is_empty() {
            meta.insert("creationTimestamp".into(), json!(m.creation_timestamp));
        }
        if !m.labels.is_empty() {
            let labels: std::collections::BTreeMap<_, _> = m.labels.iter().collect();
            meta.insert("labels".into(), json!(labels));
        }
        if m.deletion_revision != 0 {
            meta.insert("deletionRevision".into(), json!(m.deletion_revision));
        }
    }
    let mut out = Map::new();
    out.insert("apiVersion".into(), json!(API_VERSION));
    out.insert("kind".into(), json!(resource_kind(res).map(Kind::as_str).unwrap_or_default()));
    out.insert("metadata".into(), Value::Object(meta));
    if !spec.is_null() {
        out.insert("spec".into(), spec);
    }
    if !status.is_null() {
        out.insert("status".into(), status);
    }
    Value::Object(out)
}

fn to_json<T: serde::Serialize>(v: &Option<T>) -> Value {
    v.as_ref().and_then(|v| serde_json::to_value(v).ok()).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_many_documents_and_lists() {
        let text = r#"
apiVersion: xpu.opi.dev/v1alpha1
kind: LogicalBridge
metadata: {name: lb-10}
spec: {vlanId: 10, vni: 1010}
---
{"apiVersion": "xpu.opi.dev/v1alpha1", "kind": "List", "items": [
  {"apiVersion": "xpu.opi.dev/v1alpha1", "kind": "Vrf", "metadata": {"name": "blue"},
   "spec": {"loopbackIpPrefix": "10.255.0.1/32"}}]}
"#;
        let res = parse(text).unwrap();
        assert_eq!(res.len(), 2);
        let Some(pb::resource::Kind::LogicalBridge(lb)) = &res[0].kind else { panic!() };
        assert_eq!(lb.spec.as_ref().unwrap().vni, Some(1010));
        assert_eq!(resource_kind(&res[1]), Some(Kind::Vrf));
    }

    #[test]
    fn errors_name_the_document_and_field() {
        let err = parse("apiVersion: v1\nkind: Vrf\nmetadata: {name: a}\nspec: {}\n").unwrap_err();
        assert_eq!(err.doc, 1);
        assert!(err.message.contains("apiVersion"), "{err}");
        let err = parse("---\napiVersion: xpu.opi.dev/v1alpha1\nkind: Vrf\nmetadata: {name: a}\nspec: {bogus: 1}\n")
            .unwrap_err();
        assert!(err.message.contains("bogus"), "{err}");
        let err = parse("apiVersion: xpu.opi.dev/v1alpha1\nkind: Pod\nmetadata: {name: a}\nspec: {}\n").unwrap_err();
        assert!(err.message.contains("unknown kind"), "{err}");
    }
}
