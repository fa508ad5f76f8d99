//! Who may read the status API: an operator certificate (on the mutual-TLS listener), a bearer
//! token from `xpu-broker token` (header or the dashboard's cookie), or anyone when anonymous
//! read is switched on for a trusted network.

use axum::{
    extract::{Request, State},
    http::{Method, header},
    middleware::Next,
    response::{IntoResponse, Redirect, Response},
};
use chrono::Utc;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::{RestState, api::ApiError};
use crate::{error::Error, identity::Identity, token::TokenKey};

/// Name of the dashboard's session cookie (it holds the bearer token).
pub const COOKIE: &str = "xpu_token";

#[derive(Clone, Debug, Default)]
pub struct Access {
    /// Verifies bearer tokens; without it only certificates (and anonymous read) get in.
    pub token_key: Option<TokenKey>,
    /// Anyone may read (a trusted network); off by default.
    pub anonymous_read: bool,
}

/// The verified identity of a caller's client certificate.
#[derive(Clone, Debug)]
pub struct PeerIdentity(pub Identity);

/// Who is reading, for the log.
#[derive(Clone, Debug)]
pub enum Reader {
    Certificate(Identity),
    Token(String),
    Anonymous,
}

impl Reader {
    pub fn describe(&self) -> String {
        match self {
            Reader::Certificate(id) => id.to_string(),
            Reader::Token(subject) => format!("token:{subject}"),
            Reader::Anonymous => "anonymous".into(),
        }
    }
}

impl Access {
    pub fn verify_token(&self, token: &str) -> Result<String, Error> {
        let key = self
            .token_key
            .as_ref()
            .ok_or_else(|| Error::Unauthenticated("this broker accepts no bearer tokens (no token key)".into()))?;
        key.verify(token, Utc::now()).map(|c| c.sub).map_err(|e| Error::Unauthenticated(e.to_string()))
    }

    fn authenticate(&self, req: &Request) -> Result<Reader, Error> {
        if let Some(PeerIdentity(id)) = req.extensions().get::<PeerIdentity>() {
            return match id {
                Identity::Admin(_) => Ok(Reader::Certificate(id.clone())),
                other => Err(Error::PermissionDenied(format!(
                    "{other} may not read the status API; it is for operators (xpu://admin/<name>)"
                ))),
            };
        }
        if let Some(value) = req.headers().get(header::AUTHORIZATION) {
            let value = value.to_str().unwrap_or("");
            let token = value
                .strip_prefix("Bearer ")
                .ok_or_else(|| Error::Unauthenticated("the Authorization header must be `Bearer <token>`".into()))?;
            return self.verify_token(token).map(Reader::Token);
        }
        if let Some(token) = cookie(req, COOKIE) {
            return self.verify_token(&token).map(Reader::Token);
        }
        if self.anonymous_read {
            return Ok(Reader::Anonymous);
        }
        Err(Error::Unauthenticated("a client certificate or a bearer token is required".into()))
    }
}

fn cookie(req: &Request, name: &str) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Admits readers; a browser without credentials is sent to the login page.
pub async fn require(State(state): State<RestState>, mut req: Request, next: Next) -> Response {
    match state.access.authenticate(&req) {
        Ok(reader) => {
            tracing::debug!(reader = %reader.describe(), path = %req.uri().path(), "status API read");
            req.extensions_mut().insert(reader);
            next.run(req).await
        }
        Err(e) => {
            let page = req.method() == Method::GET && !req.uri().path().starts_with("/api/");
            if page && matches!(e, Error::Unauthenticated(_)) {
                return Redirect::to("/login").into_response();
            }
            tracing::debug!(path = %req.uri().path(), error = %e, "status API refused");
            ApiError(e).into_response()
        }
    }
}

/// On the mutual-TLS listener: turns the connection's verified certificate into a
/// [`PeerIdentity`] (a certificate without a valid identity is refused).
pub async fn peer_identity(mut req: Request, next: Next) -> Response {
    let leaf = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()));
    match leaf.map(|der| Identity::from_certificate(&der)) {
        Some(Ok(id)) => {
            req.extensions_mut().insert(PeerIdentity(id));
            next.run(req).await
        }
        Some(Err(e)) => ApiError(e).into_response(),
        None => ApiError(Error::Unauthenticated("a client certificate is required".into())).into_response(),
    }
}
