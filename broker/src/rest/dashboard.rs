//! The dashboard: a static page and its script and style (embedded in the binary), the login
//! form that turns a bearer token into a session cookie, and the server-sent events that tell
//! open pages the revision moved.

use std::{collections::BTreeSet, convert::Infallible, time::Duration};

use axum::{
    Form, Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{
        Html, IntoResponse, Redirect, Response,
        sse::{Event as SseEvent, KeepAlive, Sse},
    },
    routing::get,
};
use chrono::Utc;
use futures::Stream;
use serde::Deserialize;
use tokio_stream::wrappers::ReceiverStream;

use super::{RestState, auth::COOKIE};
use crate::{
    hub::{Filter, Item},
    model::Kind,
};

const INDEX: &str = include_str!("../../assets/index.html");
const SCRIPT: &str = include_str!("../../assets/app.js");
const STYLE: &str = include_str!("../../assets/style.css");

/// Pages behind the access check.
pub fn router() -> Router<RestState> {
    Router::new()
        .route("/", get(|| async { page(INDEX) }))
        .route("/assets/app.js", get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }))
}

/// The login form and the style sheet (open: it is how a browser gets in; neither holds data).
pub fn login_router() -> Router<RestState> {
    Router::new()
        .route("/login", get(|| async { page(&login_page(None)) }).post(login))
        .route("/logout", get(logout))
        .route("/assets/style.css", get(|| async { asset(STYLE, "text/css; charset=utf-8") }))
}

fn page(html: &str) -> Response {
    let mut r = Html(html.to_string()).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    r
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        ],
        body,
    )
        .into_response()
}

fn login_page(error: Option<&str>) -> String {
    let error =
        error.map(|e| format!("<p class=\"login-error\" role=\"alert\">{}</p>", html_escape(e))).unwrap_or_default();
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>xpu-broker: sign in</title>\
         <link rel=\"stylesheet\" href=\"/assets/style.css\"></head><body class=\"login\">\
         <form method=\"post\" action=\"/login\" class=\"login-form\"><h1>xpu-broker</h1>\
         <p>Paste a token from <code>xpu-broker token --subject &lt;you&gt;</code>.</p>{error}\
         <input type=\"password\" name=\"token\" autocomplete=\"off\" placeholder=\"xpu1.…\" required autofocus>\
         <button type=\"submit\">Sign in</button></form></body></html>"
    )
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(state): State<RestState>, Form(form): Form<LoginForm>) -> Response {
    let token = form.token.trim();
    match state.access.verify_token(token) {
        Ok(subject) => {
            let max_age = state
                .access
                .token_key
                .as_ref()
                .and_then(|k| k.verify(token, Utc::now()).ok())
                .map_or(0, |c| (c.exp - Utc::now().timestamp()).max(0));
            tracing::info!(subject, "dashboard sign-in");
            let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}");
            let mut r = Redirect::to("/").into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(e) => (StatusCode::UNAUTHORIZED, page(&login_page(Some(&e.to_string())))).into_response(),
    }
}

async fn logout() -> Response {
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("xpu_token=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

/// Most notifications a page gets per second.
const EVENT_INTERVAL: Duration = Duration::from_millis(400);

/// `revision` events (the head and the kinds that changed), coalesced, for open dashboards.
/// Only notifications: the page reads what changed through the API.
pub async fn events(State(state): State<RestState>) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(4);
    let hub = std::sync::Arc::clone(&state.ctx.hub);
    tokio::spawn(async move {
        let all = Filter::Kinds(Kind::ALL.iter().copied().collect());
        let mut sub = hub.subscribe(all.clone());
        let hello = serde_json::json!({ "revision": hub.head(), "kinds": [] });
        if tx.send(Ok(SseEvent::default().event("revision").data(hello.to_string()))).await.is_err() {
            return;
        }
        let mut pending: BTreeSet<&'static str> = BTreeSet::new();
        let mut revision = hub.head();
        let mut tick = tokio::time::interval(EVENT_INTERVAL);
        loop {
            tokio::select! {
                item = sub.recv() => match item {
                    Some(Item::Event(ev)) => {
                        pending.insert(ev.key.kind.as_str());
                        revision = revision.max(ev.revision);
                    }
                    Some(Item::Bookmark(_)) => {}
                    None if hub.is_closed() => return,
                    // Fell behind: a notification stream loses nothing by starting over.
                    None => {
                        sub = hub.subscribe(all.clone());
                        revision = hub.head();
                        pending.extend(Kind::ALL.iter().map(|k| k.as_str()));
                    }
                },
                _ = tick.tick() => {
                    if !pending.is_empty() {
                        let data = serde_json::json!({ "revision": revision, "kinds": pending });
                        if tx.send(Ok(SseEvent::default().event("revision").data(data.to_string()))).await.is_err() {
                            return;
                        }
                        pending.clear();
                    }
                }
                () = tx.closed() => return,
            }
        }
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
