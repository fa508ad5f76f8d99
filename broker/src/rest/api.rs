//! `/api/v1`: the read-only status API as JSON, a thin adapter over [`service::status`]. The
//! OpenAPI document is generated from these handlers and the view types.

use axum::{
    Json,
    extract::{
        Path, Query, State,
        rejection::{PathRejection, QueryRejection},
    },
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::RestState;
use crate::{
    error::Error,
    service::status::{self, PageArgs},
};

/// An error as the API returns it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code: invalid_argument, not_found, unauthenticated, permission_denied,
    /// unavailable, internal, …
    pub code: String,
    pub message: String,
}

/// The broker's error as an HTTP response (status and JSON body from the one mapping).
pub struct ApiError(pub Error);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.0.http_status();
        let body =
            ErrorBody { error: ErrorDetail { code: self.0.code_str().into(), message: self.0.client_message() } };
        (status, Json(body)).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        ApiError(e)
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Query strings that do not parse are the caller's mistake, reported like any other.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v).map_err(|e| ApiError(Error::invalid("query", e.body_text())))
}

/// So are path segments that do not decode (percent-escapes of bytes that are not UTF-8).
fn path(p: Result<Path<String>, PathRejection>, field: &str) -> Result<String, ApiError> {
    p.map(|Path(v)| v).map_err(|e| ApiError(Error::invalid(field, e.body_text())))
}

#[derive(OpenApi)]
#[openapi(
    info(title = "xpu-broker status API", description = "Read-only view of the fleet: DPUs, cluster syncers, \
        netdevs with history, fabric objects, flow policies and the sync SLIs."),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&Security),
    security(("bearer" = []))
)]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The API's routes and their OpenAPI document, built together so they cannot disagree.
pub fn router() -> (axum::Router<RestState>, utoipa::openapi::OpenApi) {
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(fleet))
        .routes(routes!(dpus))
        .routes(routes!(dpu))
        .routes(routes!(clusters))
        .routes(routes!(netdevs))
        .routes(routes!(netdev))
        .routes(routes!(fabric))
        .routes(routes!(flow_policies))
        .routes(routes!(sli))
        .split_for_parts();
    let served = doc.clone();
    let router = router
        .route("/api/v1/openapi.json", axum::routing::get(move || async move { Json(served) }))
        .route("/api/v1/events", axum::routing::get(super::dashboard::events))
        .route("/api/v1", axum::routing::get(index))
        .fallback(not_found);
    (router, doc)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError(Error::NotFound(format!("route {}", uri.path())))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page, 1..=1000 (default 100).
    limit: Option<usize>,
    /// The `continue` of the previous page.
    #[serde(rename = "continue")]
    #[param(rename = "continue")]
    continue_token: Option<String>,
}

impl PageQuery {
    fn args(self) -> PageArgs {
        PageArgs { limit: self.limit, continue_token: self.continue_token }
    }
}

/// Fleet summary: DPUs, netdevs by phase, revision, rates, streams.
#[utoipa::path(get, path = "/api/v1/fleet", tag = "fleet",
    responses((status = 200, body = status::Fleet), (status = 401, body = ErrorBody)))]
async fn fleet(State(s): State<RestState>) -> ApiResult<status::Fleet> {
    Ok(Json(status::fleet(&s.ctx).await?))
}

/// DPUs in serial order.
#[utoipa::path(get, path = "/api/v1/dpus", tag = "dpus", params(PageQuery),
    responses((status = 200, body = status::DpuPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn dpus(State(s): State<RestState>, q: Result<Query<PageQuery>, QueryRejection>) -> ApiResult<status::DpuPage> {
    Ok(Json(status::dpus(&s.ctx, &query(q)?.args()).await?))
}

/// One DPU.
#[utoipa::path(get, path = "/api/v1/dpus/{serial}", tag = "dpus", params(("serial" = String, Path)),
    responses((status = 200, body = status::Dpu), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn dpu(State(s): State<RestState>, serial: Result<Path<String>, PathRejection>) -> ApiResult<status::Dpu> {
    Ok(Json(status::dpu(&s.ctx, &path(serial, "serial")?).await?))
}

/// Cluster syncers streaming from the replica that answers.
#[utoipa::path(get, path = "/api/v1/clusters", tag = "clusters",
    responses((status = 200, body = status::ClusterList), (status = 401, body = ErrorBody)))]
async fn clusters(State(s): State<RestState>) -> Json<status::ClusterList> {
    Json(status::clusters(&s.ctx))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NetdevFilter {
    /// DPU serial.
    dpu: Option<String>,
    /// Tenant node.
    node: Option<String>,
    /// Pending, Connecting, Connected, Disconnected or Error.
    phase: Option<String>,
    namespace: Option<String>,
    /// Items per page, 1..=1000 (default 100).
    limit: Option<usize>,
    /// The `continue` of the previous page.
    #[serde(rename = "continue")]
    #[param(rename = "continue")]
    continue_token: Option<String>,
}

/// Netdevs in (namespace, name) order, filtered.
#[utoipa::path(get, path = "/api/v1/netdevs", tag = "netdevs", params(NetdevFilter),
    responses((status = 200, body = status::NetdevPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn netdevs(
    State(s): State<RestState>,
    q: Result<Query<NetdevFilter>, QueryRejection>,
) -> ApiResult<status::NetdevPage> {
    let f = query(q)?;
    let filter = status::netdev_query(f.dpu, f.node, f.phase, f.namespace)?;
    let page = PageArgs { limit: f.limit, continue_token: f.continue_token };
    Ok(Json(status::netdevs(&s.ctx, &filter, &page).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Log entries to return, newest first, 1..=1000 (default 100).
    history_limit: Option<usize>,
}

/// One netdev and the log entries that touched it.
#[utoipa::path(get, path = "/api/v1/netdevs/{id}", tag = "netdevs", params(("id" = String, Path), HistoryQuery),
    responses((status = 200, body = status::NetdevDetail), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 401, body = ErrorBody)))]
async fn netdev(
    State(s): State<RestState>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<HistoryQuery>, QueryRejection>,
) -> ApiResult<status::NetdevDetail> {
    Ok(Json(status::netdev(&s.ctx, &path(id, "id")?, query(q)?.history_limit).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FabricQuery {
    /// LogicalBridge, Vrf, Svi or XpuNetwork; all four when absent.
    kind: Option<String>,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    #[param(rename = "continue")]
    continue_token: Option<String>,
}

/// Fabric objects with how each DPU realised them.
#[utoipa::path(get, path = "/api/v1/fabric", tag = "fabric", params(FabricQuery),
    responses((status = 200, body = status::FabricPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn fabric(
    State(s): State<RestState>,
    q: Result<Query<FabricQuery>, QueryRejection>,
) -> ApiResult<status::FabricPage> {
    let f = query(q)?;
    let kind = status::fabric_kind(f.kind.as_deref())?;
    let page = PageArgs { limit: f.limit, continue_token: f.continue_token };
    Ok(Json(status::fabric(&s.ctx, kind, &page).await?))
}

/// Flow policies with per-DPU, per-rule counters.
#[utoipa::path(get, path = "/api/v1/flowpolicies", tag = "fabric", params(PageQuery),
    responses((status = 200, body = status::FlowPolicyPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn flow_policies(
    State(s): State<RestState>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<status::FlowPolicyPage> {
    Ok(Json(status::flow_policies(&s.ctx, &query(q)?.args()).await?))
}

/// The sync SLIs over the last minutes (attach latency, writes/s, status/s, streams).
#[utoipa::path(get, path = "/api/v1/sli", tag = "fleet",
    responses((status = 200, body = status::Sli), (status = 401, body = ErrorBody)))]
async fn sli() -> Json<status::Sli> {
    Json(status::sli())
}

/// Where the document is.
async fn index() -> impl IntoResponse {
    (StatusCode::OK, Json(serde_json::json!({ "openapi": "/api/v1/openapi.json" })))
}
