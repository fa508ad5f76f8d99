//! The axum router and the parsing of Kubernetes API paths.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::Value;

use crate::Shared;
use crate::discovery;
use crate::error::ApiError;
use crate::handlers::dispatch;
use crate::openapi;
use crate::resource::Registry;

/// What an API path addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/api/v1` or `/apis/<group>/<version>`.
    ResourceList { group: String, version: String },
    /// `/apis/<group>`.
    Group { group: String },
    /// A resource collection, object or subresource.
    Resource {
        group: String,
        version: String,
        watch: bool,
        namespace: Option<String>,
        plural: String,
        name: Option<String>,
        subresource: Option<String>,
    },
}

/// Parse `/api/v1/...` and `/apis/<group>/<version>/...` paths (`/watch/` prefix included).
pub fn parse(path: &str, registry: &Registry) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, mut rest) = match segs.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group] => return Some(Route::Group { group: (*group).to_owned() }),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    if rest.is_empty() {
        return Some(Route::ResourceList { group: group.to_owned(), version: version.to_owned() });
    }
    let watch = rest.first() == Some(&"watch");
    if watch {
        rest = &rest[1..];
    }
    let mut namespace = None;
    if let ["namespaces", ns, plural, ..] = rest
        && registry.lookup(group, version, plural).is_some_and(|t| t.namespaced)
    {
        namespace = Some((*ns).to_owned());
        rest = &rest[2..];
    }
    let (plural, name, subresource) = match rest {
        [plural] => (plural, None, None),
        [plural, name] => (plural, Some(*name), None),
        [plural, name, sub] => (plural, Some(*name), Some(*sub)),
        _ => return None,
    };
    Some(Route::Resource {
        group: group.to_owned(),
        version: version.to_owned(),
        watch,
        namespace,
        plural: (*plural).to_owned(),
        name: name.map(str::to_owned),
        subresource: subresource.map(str::to_owned),
    })
}

async fn ok() -> &'static str {
    "ok"
}

async fn version() -> Json<Value> {
    Json(discovery::version())
}

async fn api(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(discovery::api_versions(&shared.address))
}

async fn apis(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(discovery::api_group_list(&shared.store.lock().registry))
}

async fn openapi_root(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(openapi::root(&shared.store.lock().registry))
}

async fn openapi_gv(State(shared): State<Arc<Shared>>, Path(path): Path<String>) -> Response {
    match openapi::gv_document(&shared.store.lock().registry, &path) {
        Some(doc) => Json(doc).into_response(),
        None => ApiError::path_not_found(&format!("/openapi/v3/{path}")).into_response(),
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(ok))
        .route("/readyz", get(ok))
        .route("/livez", get(ok))
        .route("/version", get(version))
        .route("/api", get(api))
        .route("/apis", get(apis))
        .route("/openapi/v3", get(openapi_root))
        .route("/openapi/v3/{*path}", get(openapi_gv))
        .fallback(dispatch)
        .with_state(shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(ns: Option<&str>, plural: &str, name: Option<&str>, sub: Option<&str>, watch: bool) -> Route {
        Route::Resource {
            group: String::new(),
            version: "v1".into(),
            watch,
            namespace: ns.map(str::to_owned),
            plural: plural.into(),
            name: name.map(str::to_owned),
            subresource: sub.map(str::to_owned),
        }
    }

    #[test]
    fn paths() {
        let r = Registry::with_builtins();
        assert_eq!(parse("/api/v1/namespaces/a/configmaps", &r), Some(res(Some("a"), "configmaps", None, None, false)));
        assert_eq!(parse("/api/v1/watch/namespaces/a/pods/p", &r), Some(res(Some("a"), "pods", Some("p"), None, true)));
        assert_eq!(
            parse("/api/v1/namespaces/a/pods/p/status", &r),
            Some(res(Some("a"), "pods", Some("p"), Some("status"), false))
        );
        assert_eq!(parse("/api/v1/namespaces/a", &r), Some(res(None, "namespaces", Some("a"), None, false)));
        assert_eq!(
            parse("/api/v1/namespaces/a/status", &r),
            Some(res(None, "namespaces", Some("a"), Some("status"), false))
        );
        assert_eq!(parse("/api/v1/pods", &r), Some(res(None, "pods", None, None, false)));
        assert_eq!(parse("/apis/x.io", &r), Some(Route::Group { group: "x.io".into() }));
        assert_eq!(parse("/api/v1", &r), Some(Route::ResourceList { group: String::new(), version: "v1".into() }));
        assert_eq!(parse("/openapi/v2", &r), None);
    }
}
