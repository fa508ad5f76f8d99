//! HTTP handling of resource requests: query parameters, content types, status codes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::Shared;
use crate::delete::{delete, delete_collection};
use crate::discovery;
use crate::error::{ApiError, ApiResult};
use crate::format::Format;
use crate::object::parse_body;
use crate::read::{ListOpts, Target, get, list, present};
use crate::routes::{Route, parse};
use crate::selector::Selectors;
use crate::watch::{self, WatchParams};
use crate::write::{PatchType, WriteOpts, create, patch, replace};

/// The default watch timeout when the client gives none (the real server picks 30–60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

struct Request {
    method: Method,
    query: HashMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
}

impl Request {
    fn q(&self, key: &str) -> Option<&str> {
        self.query.get(key).map(String::as_str)
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.q(key), Some("true" | "1"))
    }

    fn header(&self, name: header::HeaderName) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }

    fn selectors(&self) -> ApiResult<Selectors> {
        Selectors::parse(self.q("labelSelector"), self.q("fieldSelector"))
    }

    fn list_opts(&self) -> ApiResult<ListOpts> {
        let limit = match self.q("limit") {
            Some(l) => Some(l.parse().map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?),
            None => None,
        };
        Ok(ListOpts { selectors: self.selectors()?, limit, continue_token: self.q("continue").map(str::to_owned) })
    }

    fn write_opts(&self) -> WriteOpts {
        let manager = self.q("fieldManager").map(str::to_owned).unwrap_or_else(|| {
            let ua = self.header(header::USER_AGENT);
            ua.split('/').next().filter(|s| !s.is_empty()).unwrap_or("unknown").to_owned()
        });
        WriteOpts { manager, dry_run: self.q("dryRun") == Some("All"), force: self.flag("force") }
    }

    fn format(&self) -> Format {
        Format::from_accept(self.header(header::ACCEPT), self.q("includeObject"))
    }

    fn json_body(&self) -> ApiResult<Value> {
        let content_type = self.header(header::CONTENT_TYPE);
        if content_type.contains("protobuf") || content_type.contains("cbor") {
            return Err(ApiError::unsupported_media_type(content_type));
        }
        parse_body(&self.body, content_type.contains("yaml"))
    }
}

fn json_response(code: StatusCode, v: Value) -> Response {
    (code, axum::Json(v)).into_response()
}

/// Fallback handler: every `/api/...` and `/apis/...` path.
pub async fn dispatch(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = Query::<HashMap<String, String>>::try_from_uri(&uri).map(|q| q.0).unwrap_or_default();
    let req = Request { method, query, headers, body };
    let result = handle(&shared, uri.path(), &req);
    tracing::debug!(method = %req.method, uri = %uri, ok = result.is_ok(), "request");
    result.unwrap_or_else(IntoResponse::into_response)
}

fn handle(shared: &Shared, path: &str, req: &Request) -> ApiResult<Response> {
    let route = {
        let st = shared.store.lock();
        parse(path, &st.registry)
    };
    let not_found = || ApiError::path_not_found(path);
    match route.ok_or_else(not_found)? {
        Route::ResourceList { group, version } => {
            let st = shared.store.lock();
            let list = discovery::api_resource_list(&st.registry, &group, &version).ok_or_else(not_found)?;
            Ok(json_response(StatusCode::OK, list))
        }
        Route::Group { group } => {
            let st = shared.store.lock();
            Ok(json_response(StatusCode::OK, discovery::api_group(&st.registry, &group).ok_or_else(not_found)?))
        }
        Route::Resource { group, version, watch, namespace, plural, name, subresource } => {
            let rt = shared.store.lock().registry.lookup(&group, &version, &plural).ok_or_else(not_found)?;
            let status = match subresource.as_deref() {
                None => false,
                Some("status") if rt.status_subresource => true,
                Some(_) => return Err(not_found()),
            };
            if (rt.namespaced && namespace.is_none() && name.is_some()) || (!rt.namespaced && namespace.is_some()) {
                return Err(not_found());
            }
            let target = Target { rt, namespace, name, status };
            resource(shared, target, watch || req.flag("watch"), req)
        }
    }
}

fn resource(shared: &Shared, t: Target, watching: bool, req: &Request) -> ApiResult<Response> {
    let opts = req.write_opts();
    if t.status
        && matches!(req.method, Method::PUT | Method::PATCH)
        && shared
            .status_write_failures
            .fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |n| {
                n.checked_sub(1)
            })
            .is_ok()
    {
        return Err(ApiError::new(500, "InternalError", "injected failure: the status write timed out"));
    }
    match (&req.method, t.name.is_some()) {
        (&Method::GET, _) if watching => start_watch(shared, t, req),
        (&Method::GET, true) => {
            let obj = get(&shared.store.lock(), &t)?;
            Ok(json_response(StatusCode::OK, req.format().object(&t.rt, obj)))
        }
        (&Method::GET, false) => {
            let listed = list(&shared.store.lock(), &t, &req.list_opts()?)?;
            Ok(json_response(StatusCode::OK, req.format().list(&t.rt, listed)))
        }
        (&Method::POST, false) => {
            let created = create(&mut shared.store.lock(), &t, req.json_body()?, &opts)?;
            Ok(json_response(StatusCode::CREATED, req.format().object(&t.rt, created)))
        }
        (&Method::PUT, true) => {
            let replaced = replace(&mut shared.store.lock(), &t, req.json_body()?, &opts)?;
            Ok(json_response(StatusCode::OK, req.format().object(&t.rt, replaced)))
        }
        (&Method::PATCH, true) => {
            let content_type = req.header(header::CONTENT_TYPE);
            let pt = match content_type.split(';').next().unwrap_or_default().trim() {
                "application/merge-patch+json" => PatchType::Merge,
                "application/strategic-merge-patch+json" => PatchType::Strategic,
                "application/json-patch+json" => PatchType::Json,
                "application/apply-patch+yaml" | "application/apply-patch+json" => PatchType::Apply,
                _ => return Err(ApiError::unsupported_media_type(content_type)),
            };
            let (obj, created) = patch(&mut shared.store.lock(), &t, pt, &req.body, &opts)?;
            let code = if created { StatusCode::CREATED } else { StatusCode::OK };
            Ok(json_response(code, req.format().object(&t.rt, obj)))
        }
        (&Method::DELETE, true) => {
            let delete_opts: Value = if req.body.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&req.body)
                    .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions body: {e}")))?
            };
            Ok(json_response(StatusCode::OK, delete(&mut shared.store.lock(), &t, &delete_opts, &opts)?))
        }
        (&Method::DELETE, false) if !t.status => {
            let deleted = delete_collection(&mut shared.store.lock(), &t, &req.list_opts()?, &opts)?;
            Ok(json_response(StatusCode::OK, deleted))
        }
        (method, _) => Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource: {method}"
        ))),
    }
}

fn start_watch(shared: &Shared, t: Target, req: &Request) -> ApiResult<Response> {
    // The deprecated watch of a single object (`/watch/.../<name>`) is a watch of the collection by name.
    let fields = match (&t.name, req.q("fieldSelector").filter(|f| !f.is_empty())) {
        (Some(name), Some(f)) => Some(format!("{f},metadata.name={name}")),
        (Some(name), None) => Some(format!("metadata.name={name}")),
        (None, f) => f.map(str::to_owned),
    };
    let timeout = match req.q("timeoutSeconds") {
        Some(s) => {
            Duration::from_secs(s.parse().map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {s:?}")))?)
        }
        None => DEFAULT_WATCH_TIMEOUT,
    };
    let params = WatchParams {
        resource_version: req.q("resourceVersion").map(str::to_owned),
        selectors: Selectors::parse(req.q("labelSelector"), fields.as_deref())?,
        bookmarks: req.flag("allowWatchBookmarks"),
        send_initial_events: req.flag("sendInitialEvents"),
        timeout,
        bookmark_interval: shared.bookmark_interval,
    };
    let t = Target { name: None, ..t };
    let rt = t.rt.clone();
    let format = req.format();
    let presenter: watch::Presenter = Box::new(move |v| format.object(&rt, present(&rt, v)));
    let stream = watch::start(&shared.store, shared.stop.clone(), t, params, presenter)?;
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::new(500, "InternalError", e.to_string()))
}
