//! The HTTP side of the broker: health, readiness and metrics (open), and the read-only status
//! API under `/api/v1` with the dashboard at `/` (a client certificate, a bearer token or,
//! when configured, anonymous read on a trusted network).
//!
//! The same router is served twice: on the plain HTTP port (tokens, cookies, anonymous) and
//! behind the mutual-TLS listener next to gRPC, where the client certificate is the credential.

mod api;
mod auth;
mod dashboard;

use std::{sync::Arc, time::Duration};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

pub use self::auth::{Access, PeerIdentity};
use crate::{metrics, service::Context};

#[derive(Clone)]
pub struct RestState {
    pub ctx: Context,
    pub access: Arc<Access>,
}

/// The router of the plain HTTP port.
pub fn router(state: RestState) -> Router {
    let (api, _) = api::router();
    Router::new()
        .merge(api.merge(dashboard::router()).layer(axum::middleware::from_fn_with_state(state.clone(), auth::require)))
        .merge(dashboard::login_router())
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

/// The status API and dashboard as served behind the mutual-TLS listener: the caller is the
/// identity of its certificate (put into the request by the listener as [`PeerIdentity`]).
pub fn mtls_router(state: RestState) -> Router {
    let (api, _) = api::router();
    api.merge(dashboard::router())
        .merge(dashboard::login_router())
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require))
        .layer(axum::middleware::from_fn(auth::peer_identity))
        .with_state(state)
}

/// The OpenAPI document of `/api/v1`, generated from the handlers.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api::router().1
}

/// Ready once the store answers (it was migrated before the listener opened).
async fn readyz(State(state): State<RestState>) -> impl IntoResponse {
    match tokio::time::timeout(Duration::from_secs(2), state.ctx.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".to_string()),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("store unavailable: {}\n", e.code_str())),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store did not answer within 2s\n".to_string()),
    }
}

async fn metrics_text(State(state): State<RestState>) -> impl IntoResponse {
    let gauges = metrics::Gauges {
        streams: state.ctx.hub.streams(),
        streams_lagged: state.ctx.hub.lagged_total(),
        revision: state.ctx.hub.head(),
    };
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics::render(&gauges))
}
