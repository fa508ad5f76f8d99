//! Server-side mutual TLS: a rustls config that requires a client certificate from the
//! configured CA, reloaded when the certificate, key or CA file changes.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

#[derive(Clone, Debug)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |reason: String| TlsError::File { path: path.to_path_buf(), reason };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err("holds no PEM certificate".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File { path: path.to_path_buf(), reason: e.to_string() })
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server config: TLS 1.2/1.3 with rustls' safe defaults, client certificates
/// required and verified against `client_ca`, ALPN h2 for gRPC (and http/1.1 for the status API),
/// no session resumption.
pub fn server_config(paths: &TlsPaths) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(&paths.cert)?;
    let key = read_key(&paths.key)?;
    let mut roots = RootCertStore::empty();
    for ca in read_certs(&paths.client_ca)? {
        roots.add(ca).map_err(|e| TlsError::File { path: paths.client_ca.clone(), reason: e.to_string() })?;
    }
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // No session resumption: a resumed session skips client-certificate verification, so a
    // certificate that expired since (and every session resumed from it) would still get in.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The current server config, swapped when the files change.
pub struct ReloadingConfig {
    paths: TlsPaths,
    current: ArcSwap<ServerConfig>,
    stamps: Mutex<Vec<Option<SystemTime>>>,
}

fn stamps(paths: &TlsPaths) -> Vec<Option<SystemTime>> {
    [&paths.cert, &paths.key, &paths.client_ca]
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

impl ReloadingConfig {
    pub fn load(paths: TlsPaths) -> Result<Arc<ReloadingConfig>, TlsError> {
        let config = server_config(&paths)?;
        let s = stamps(&paths);
        Ok(Arc::new(ReloadingConfig { paths, current: ArcSwap::new(config), stamps: Mutex::new(s) }))
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Reloads when a file changed; a broken new file keeps the old config (and is logged).
    pub fn reload_if_changed(&self) {
        let now = stamps(&self.paths);
        {
            let Ok(mut old) = self.stamps.lock() else {
                return;
            };
            if *old == now {
                return;
            }
            *old = now;
        }
        match server_config(&self.paths) {
            Ok(config) => {
                self.current.store(config);
                tracing::info!(cert = %self.paths.cert.display(), "reloaded TLS certificates");
            }
            Err(e) => {
                tracing::error!(error = %e, "new TLS files are unusable; keeping the previous ones")
            }
        }
    }

    pub async fn watch(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            self.reload_if_changed();
        }
    }
}
