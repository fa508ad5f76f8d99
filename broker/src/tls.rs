//! Server-side mutual TLS: a rustls config that requires a client certificate from the
//! configured CA, reloaded when the certificate, key or CA file changes.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject};

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
    let provider = provider();
    let verifier = PathLenVerifier::new(&paths.client_ca, read_certs(&paths.client_ca)?, &provider)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // No session resumption: a resumed session skips client-certificate verification, so a
    // certificate that expired since (and every session resumed from it) would still get in.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Verifies client certificates against the client CAs, and holds a CA whose
/// `pathLenConstraint` is 0 to it: a certificate under such a CA must be issued by it directly
/// (webpki keeps only a trust anchor's subject, key and name constraints, so on its own it would
/// accept a chain through a CA certificate that the root issued against its own constraint).
#[derive(Debug)]
struct PathLenVerifier {
    /// The CAs that allow no intermediate: verified with the presented intermediates dropped.
    direct: Option<Arc<dyn ClientCertVerifier>>,
    /// The other CAs, with the intermediates the client presents.
    chained: Option<Arc<dyn ClientCertVerifier>>,
    /// Every CA, for the hints sent to clients and the handshake signatures.
    all: Arc<dyn ClientCertVerifier>,
}

impl PathLenVerifier {
    fn new(
        path: &Path,
        cas: Vec<CertificateDer<'static>>,
        provider: &Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<PathLenVerifier, TlsError> {
        let file_err = |reason: String| TlsError::File { path: path.to_path_buf(), reason };
        let (mut direct, mut chained, mut all) =
            (RootCertStore::empty(), RootCertStore::empty(), RootCertStore::empty());
        for ca in cas {
            let (_, parsed) = x509_parser::parse_x509_certificate(&ca).map_err(|e| file_err(e.to_string()))?;
            let no_intermediates = parsed
                .basic_constraints()
                .map_err(|e| file_err(e.to_string()))?
                .is_some_and(|bc| bc.value.path_len_constraint == Some(0));
            let store = if no_intermediates { &mut direct } else { &mut chained };
            store.add(ca.clone()).map_err(|e| file_err(e.to_string()))?;
            all.add(ca).map_err(|e| file_err(e.to_string()))?;
        }
        let build = |roots: RootCertStore| -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))
        };
        let direct = if direct.is_empty() { None } else { Some(build(direct)?) };
        let chained = if chained.is_empty() { None } else { Some(build(chained)?) };
        Ok(PathLenVerifier { direct, chained, all: build(all)? })
    }
}

impl ClientCertVerifier for PathLenVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.all.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let mut refusal = None;
        if let Some(direct) = &self.direct {
            match direct.verify_client_cert(end_entity, &[], now) {
                Ok(v) => return Ok(v),
                Err(e) => refusal = Some(e),
            }
        }
        if let Some(chained) = &self.chained {
            match chained.verify_client_cert(end_entity, intermediates, now) {
                Ok(v) => return Ok(v),
                // "Unknown issuer" from one group says less than the other group's reason.
                Err(e) if refusal.is_none() || !is_unknown_issuer(&e) => refusal = Some(e),
                Err(_) => {}
            }
        }
        Err(refusal.unwrap_or(rustls::Error::General("no client CA is configured".into())))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.all.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.all.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.all.supported_verify_schemes()
    }
}

fn is_unknown_issuer(e: &rustls::Error) -> bool {
    matches!(e, rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };

    use super::*;

    struct Ca {
        der: CertificateDer<'static>,
        pem: String,
        key: KeyPair,
    }

    fn ca_params(name: &str, constraint: BasicConstraints) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(constraint);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        p
    }

    fn root(name: &str, constraint: BasicConstraints) -> Ca {
        let key = KeyPair::generate().unwrap();
        let cert = ca_params(name, constraint).self_signed(&key).unwrap();
        Ca { der: cert.der().clone(), pem: cert.pem(), key }
    }

    fn issued(params: &CertificateParams, by: &Ca) -> (CertificateDer<'static>, String, KeyPair) {
        let issuer = Issuer::from_ca_cert_pem(&by.pem, &by.key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.der().clone(), cert.pem(), key)
    }

    fn sub_ca(name: &str, by: &Ca) -> Ca {
        let (der, pem, key) = issued(&ca_params(name, BasicConstraints::Constrained(0)), by);
        Ca { der, pem, key }
    }

    fn client(by: &Ca) -> CertificateDer<'static> {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "admin/x");
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        issued(&p, by).0
    }

    fn verifier(cas: &[&Ca]) -> PathLenVerifier {
        let ders = cas.iter().map(|c| c.der.clone()).collect();
        PathLenVerifier::new(Path::new("ca.crt"), ders, &provider()).unwrap()
    }

    fn verify(
        v: &PathLenVerifier,
        leaf: &CertificateDer<'_>,
        chain: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        v.verify_client_cert(leaf, chain, UnixTime::now()).map(|_| ())
    }

    #[test]
    fn a_ca_without_intermediates_must_issue_directly_others_may_chain() {
        let flat = root("flat CA", BasicConstraints::Constrained(0));
        let flat_sub = sub_ca("under flat", &flat);
        let deep = root("deep CA", BasicConstraints::Unconstrained);
        let deep_sub = sub_ca("under deep", &deep);
        let unknown = || Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer));

        let only_flat = verifier(&[&flat]);
        assert_eq!(verify(&only_flat, &client(&flat), &[]), Ok(()));
        assert_eq!(verify(&only_flat, &client(&flat_sub), std::slice::from_ref(&flat_sub.der)), unknown());

        let only_deep = verifier(&[&deep]);
        assert_eq!(verify(&only_deep, &client(&deep), &[]), Ok(()));
        assert_eq!(verify(&only_deep, &client(&deep_sub), std::slice::from_ref(&deep_sub.der)), Ok(()));

        // Both in one file: each keeps its own rule.
        let both = verifier(&[&flat, &deep]);
        assert_eq!(verify(&both, &client(&flat), &[]), Ok(()));
        assert_eq!(verify(&both, &client(&deep_sub), std::slice::from_ref(&deep_sub.der)), Ok(()));
        assert_eq!(verify(&both, &client(&flat_sub), std::slice::from_ref(&flat_sub.der)), unknown());
        // A chain through the other CA's sub-CA does not help either.
        assert_eq!(verify(&both, &client(&flat_sub), &[flat_sub.der.clone(), deep_sub.der.clone()]), unknown());
        assert_eq!(both.root_hint_subjects().len(), 2);
    }
}
