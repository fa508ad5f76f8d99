//! `/healthz`, `/readyz` and `/metrics` of a syncer.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use axum::{Router, extract::State, http::StatusCode, routing::get};

use super::Metrics;

async fn ready(State(m): State<Arc<Metrics>>) -> (StatusCode, &'static str) {
    if !m.leader.load(Ordering::Acquire) {
        return (StatusCode::OK, "standby\n");
    }
    if m.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "syncing\n")
    }
}

async fn render_metrics(State(m): State<Arc<Metrics>>) -> String {
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let b = |a: &std::sync::atomic::AtomicBool| u8::from(a.load(Ordering::Relaxed));
    format!(
        "# TYPE xpu_sync_leader gauge\nxpu_sync_leader {}\n\
         # TYPE xpu_sync_ready gauge\nxpu_sync_ready {}\n\
         # TYPE xpu_sync_revision gauge\nxpu_sync_revision {}\n\
         # TYPE xpu_sync_mirrored_total counter\nxpu_sync_mirrored_total {}\n\
         # TYPE xpu_sync_carried_up_total counter\nxpu_sync_carried_up_total {}\n\
         # TYPE xpu_sync_conflicts_total counter\nxpu_sync_conflicts_total {}\n\
         # TYPE xpu_sync_collected_total counter\nxpu_sync_collected_total {}\n\
         # TYPE xpu_sync_errors_total counter\n\
         xpu_sync_errors_total{{kind=\"kube\"}} {}\nxpu_sync_errors_total{{kind=\"broker\"}} {}\nxpu_sync_errors_total{{kind=\"timeout\"}} {}\n",
        b(&m.leader),
        b(&m.ready),
        m.revision.load(Ordering::Relaxed),
        g(&m.mirrored),
        g(&m.carried_up),
        g(&m.conflicts),
        g(&m.collected),
        g(&m.errors_kube),
        g(&m.errors_broker),
        g(&m.errors_timeout),
    )
}

pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render_metrics))
        .with_state(metrics);
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => {
            if let Err(e) = axum::serve(l, app).await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        }
        Err(e) => tracing::error!(error = %e, %addr, "cannot bind the HTTP address"),
    }
}
