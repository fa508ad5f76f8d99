//! A skeletal OpenAPI v3 (`/openapi/v3` and `/openapi/v3/<api|apis/group>/<version>`): paths and operations
//! with their `x-kubernetes-group-version-kind` and query parameters, no schemas. Enough for `kubectl`'s
//! check that the server does field validation itself (so `kubectl apply/create` work without
//! `--validate=false`); `kubectl explain` finds nothing.

use std::hash::{DefaultHasher, Hash, Hasher};

use serde_json::{Map, Value, json};

use crate::discovery::MINOR_VERSION;
use crate::resource::{Registry, ResourceType};

/// Every group/version served, as `(group, version)`, core first.
fn group_versions(registry: &Registry) -> Vec<(String, String)> {
    let core = std::iter::once((String::new(), "v1".to_owned()));
    core.chain(registry.groups().into_iter().flat_map(|(g, vs)| vs.into_iter().map(move |v| (g.clone(), v)))).collect()
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() { format!("api/{version}") } else { format!("apis/{group}/{version}") }
}

const WRITE_PARAMS: &[&str] = &["dryRun", "fieldManager", "fieldValidation", "force", "pretty"];

fn operation(t: &ResourceType, action: &str, params: &[&str]) -> Value {
    let parameters: Vec<Value> = params
        .iter()
        .map(|p| json!({"name": p, "in": "query", "schema": {"type": "string", "uniqueItems": true}}))
        .collect();
    json!({
        "operationId": format!("{action}{}", t.kind),
        "parameters": parameters,
        "responses": {"200": {"description": "OK"}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": t.group, "version": t.version, "kind": t.kind},
    })
}

fn paths_of(t: &ResourceType, paths: &mut Map<String, Value>) {
    let prefix = format!("/{}", gv_path(&t.group, &t.version));
    let collection = if t.namespaced {
        format!("{prefix}/namespaces/{{namespace}}/{}", t.plural)
    } else {
        format!("{prefix}/{}", t.plural)
    };
    let list_params = &["labelSelector", "fieldSelector", "limit", "continue", "resourceVersion", "watch"];
    paths.insert(
        collection.clone(),
        json!({"get": operation(t, "list", list_params), "post": operation(t, "post", WRITE_PARAMS)}),
    );
    let item = json!({
        "get": operation(t, "get", &["pretty"]),
        "put": operation(t, "put", WRITE_PARAMS),
        "patch": operation(t, "patch", WRITE_PARAMS),
        "delete": operation(t, "delete", &["dryRun", "gracePeriodSeconds", "propagationPolicy"]),
    });
    paths.insert(format!("{collection}/{{name}}"), item);
    if t.status_subresource {
        let status = json!({
            "get": operation(t, "get", &["pretty"]),
            "put": operation(t, "put", WRITE_PARAMS),
            "patch": operation(t, "patch", WRITE_PARAMS),
        });
        paths.insert(format!("{collection}/{{name}}/status"), status);
    }
}

/// The document of one group/version, if served (`path` is `api/v1` or `apis/<group>/<version>`).
pub fn gv_document(registry: &Registry, path: &str) -> Option<Value> {
    let (group, version) = group_versions(registry).into_iter().find(|(g, v)| gv_path(g, v) == path)?;
    let mut paths = Map::new();
    for t in registry.resources_in(&group, &version) {
        paths_of(&t, &mut paths);
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": format!("v1.{MINOR_VERSION}.0-fake")},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

/// `/openapi/v3`: the per-group/version documents with content hashes.
pub fn root(registry: &Registry) -> Value {
    let mut paths = Map::new();
    for (group, version) in group_versions(registry) {
        let path = gv_path(&group, &version);
        let mut hasher = DefaultHasher::new();
        gv_document(registry, &path).unwrap_or_default().to_string().hash(&mut hasher);
        let url = format!("/openapi/v3/{path}?hash={:016X}", hasher.finish());
        paths.insert(path, json!({"serverRelativeURL": url}));
    }
    json!({"paths": paths})
}
