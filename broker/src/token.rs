//! Bearer tokens for the read-only status API and dashboard.
//!
//! A token is `xpu1.<payload>.<mac>`: the payload (base64url JSON: subject, issued-at, expiry)
//! signed with HMAC-SHA256 under a key file shared by the broker replicas. Nothing is stored:
//! rotating the key file revokes every token issued under the old key.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use chrono::{DateTime, Utc};
use ring::hmac;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "xpu1";
const KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature does not match this broker's key")]
    BadSignature,
    #[error("the token expired at {0}")]
    Expired(DateTime<Utc>),
    #[error("token key {path}: {message}")]
    Key { path: PathBuf, message: String },
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Who the token was issued to (shows up in the broker's logs).
    pub sub: String,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Expires at, seconds since the epoch.
    pub exp: i64,
}

/// The signing key; `Debug` never shows it.
#[derive(Clone)]
pub struct TokenKey(hmac::Key);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    pub fn from_bytes(bytes: &[u8]) -> TokenKey {
        TokenKey(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// Reads a key file (hex), creating it with a fresh random key (mode 0600) when `create`
    /// is set and the file does not exist.
    pub fn load(path: &Path, create: bool) -> Result<TokenKey, TokenError> {
        let err = |message: String| TokenError::Key { path: path.to_path_buf(), message };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim()).map_err(|e| err(format!("not hex: {e}")))?;
                if bytes.len() < KEY_BYTES {
                    return Err(err(format!("{} bytes; at least {KEY_BYTES} are required", bytes.len())));
                }
                Ok(TokenKey::from_bytes(&bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let bytes: [u8; KEY_BYTES] = rand::random();
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
                }
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let mut f = opts.open(path).map_err(|e| err(e.to_string()))?;
                f.write_all(format!("{}\n", hex::encode(bytes)).as_bytes()).map_err(|e| err(e.to_string()))?;
                Ok(TokenKey::from_bytes(&bytes))
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    pub fn issue(&self, subject: &str, ttl: std::time::Duration, now: DateTime<Utc>) -> String {
        let exp = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::days(3650));
        let claims = Claims { sub: subject.to_string(), iat: now.timestamp(), exp: exp.timestamp() };
        let payload = B64.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signed = format!("{PREFIX}.{payload}");
        let mac = hmac::sign(&self.0, signed.as_bytes());
        format!("{signed}.{}", B64.encode(mac.as_ref()))
    }

    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Result<Claims, TokenError> {
        let (signed, mac) = token.trim().rsplit_once('.').ok_or(TokenError::Malformed)?;
        let (prefix, payload) = signed.split_once('.').ok_or(TokenError::Malformed)?;
        if prefix != PREFIX {
            return Err(TokenError::Malformed);
        }
        let mac = B64.decode(mac).map_err(|_| TokenError::Malformed)?;
        hmac::verify(&self.0, signed.as_bytes(), &mac).map_err(|_| TokenError::BadSignature)?;
        let claims: Claims =
            B64.decode(payload).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or(TokenError::Malformed)?;
        if claims.exp <= now.timestamp() {
            return Err(TokenError::Expired(DateTime::from_timestamp(claims.exp, 0).unwrap_or(now)));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_token_verifies_under_its_key_only_and_until_it_expires() {
        let key = TokenKey::from_bytes(&[7; 32]);
        let now = Utc::now();
        let t = key.issue("ops", Duration::from_secs(60), now);
        assert_eq!(key.verify(&t, now).unwrap().sub, "ops");
        let other = TokenKey::from_bytes(&[8; 32]);
        assert!(matches!(other.verify(&t, now), Err(TokenError::BadSignature)));
        assert!(matches!(key.verify(&t, now + chrono::Duration::seconds(61)), Err(TokenError::Expired(_))));
        assert!(matches!(key.verify("xpu1.abc", now), Err(TokenError::Malformed)));
        assert!(matches!(key.verify("nope", now), Err(TokenError::Malformed)));
        // A payload changed after signing fails the signature.
        let (signed, mac) = t.rsplit_once('.').unwrap();
        let forged = format!("{}x.{mac}", signed);
        assert!(matches!(key.verify(&forged, now), Err(TokenError::BadSignature)));
    }

    #[test]
    fn a_key_file_is_created_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k/token.key");
        assert!(TokenKey::load(&path, false).is_err());
        let a = TokenKey::load(&path, true).unwrap();
        let b = TokenKey::load(&path, true).unwrap();
        let now = Utc::now();
        assert!(b.verify(&a.issue("x", Duration::from_secs(5), now), now).is_ok());
        std::fs::write(&path, "abcd").unwrap();
        assert!(matches!(TokenKey::load(&path, true), Err(TokenError::Key { .. })));
    }
}
