//! The HTTP side of the broker: health, readiness and metrics (plain HTTP; no object data).

use std::{sync::Arc, time::Duration};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use crate::{hub::Hub, metrics, store::Store};

#[derive(Clone)]
pub struct RestState {
    pub store: Store,
    pub hub: Arc<Hub>,
}

pub fn router(state: RestState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

/// Ready once the store answers (it was migrated before the listener opened).
async fn readyz(State(state): State<RestState>) -> impl IntoResponse {
    match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".to_string()),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("store unavailable: {}\n", e.code_str())),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store did not answer within 2s\n".to_string()),
    }
}

async fn metrics_text(State(state): State<RestState>) -> impl IntoResponse {
    let gauges = metrics::Gauges {
        streams: state.hub.stream_count(),
        streams_lagged: state.hub.lagged_total(),
        revision: state.hub.head(),
    };
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics::render(&gauges))
}
