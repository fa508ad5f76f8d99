//! A development certificate authority: `xpu-broker ca init` and `ca issue`.
//!
//! Client certificates carry their identity as a URI SAN (`xpu://dpu/<serial>` …) with the
//! clientAuth usage; the broker's server certificate carries DNS/IP SANs with serverAuth.

use std::{
    fs,
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use time::{Duration, OffsetDateTime};

use crate::identity::Identity;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} already exists; pass --force to replace it")]
    Exists(PathBuf),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, CaError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io { path: path.to_path_buf(), source }
}

/// A PEM certificate and its PEM private key.
#[derive(Clone, Debug)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// Validity and shape of a certificate to issue.
#[derive(Clone, Debug)]
pub struct IssueOptions {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Issue a CA certificate (only useful to test that one is refused as a client).
    pub is_ca: bool,
}

impl IssueOptions {
    pub fn valid_for_days(days: i64) -> IssueOptions {
        let now = OffsetDateTime::now_utc();
        IssueOptions { not_before: now - Duration::minutes(5), not_after: now + Duration::days(days), is_ca: false }
    }
}

pub struct DevCa {
    pub pem: Pem,
    key: KeyPair,
}

impl DevCa {
    pub fn generate(common_name: &str) -> Result<DevCa> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(DevCa { pem: Pem { cert: cert.pem(), key: key.serialize_pem() }, key })
    }

    pub fn from_pem(pem: Pem) -> Result<DevCa> {
        let key = KeyPair::from_pem(&pem.key)?;
        Ok(DevCa { pem, key })
    }

    pub fn load(dir: &Path) -> Result<DevCa> {
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        let cert = fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key = fs::read_to_string(&key_path).map_err(io(&key_path))?;
        DevCa::from_pem(Pem { cert, key })
    }

    /// Writes `ca.crt` and `ca.key` (mode 0600) into `dir`.
    pub fn init(dir: &Path, force: bool) -> Result<DevCa> {
        let cert_path = dir.join("ca.crt");
        if cert_path.exists() && !force {
            return Err(CaError::Exists(cert_path));
        }
        fs::create_dir_all(dir).map_err(io(dir))?;
        let ca = DevCa::generate("xpu-broker development CA")?;
        write_file(&dir.join("ca.key"), &ca.pem.key, true)?;
        write_file(&cert_path, &ca.pem.cert, false)?;
        Ok(ca)
    }

    fn sign(&self, params: &CertificateParams) -> Result<Pem> {
        let issuer = Issuer::from_ca_cert_pem(&self.pem.cert, &self.key)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
    }

    fn base_params(common_name: &str, opts: &IssueOptions) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.not_before = opts.not_before;
        params.not_after = opts.not_after;
        params.use_authority_key_identifier_extension = true;
        if opts.is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params
    }

    /// A client certificate for `identity`.
    pub fn issue_client(&self, identity: &Identity, opts: &IssueOptions) -> Result<Pem> {
        let mut params = Self::base_params(&identity.to_string(), opts);
        let uri = identity.uri().try_into().map_err(|_| CaError::Invalid(format!("{identity} is not a valid URI")))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(&params)
    }

    /// A client certificate with arbitrary URI SANs (or none): for tests of refusals.
    pub fn issue_client_with_uris(&self, uris: &[&str], opts: &IssueOptions) -> Result<Pem> {
        let mut params = Self::base_params("test client", opts);
        for u in uris {
            let uri = (*u).try_into().map_err(|_| CaError::Invalid(format!("{u} is not a valid URI")))?;
            params.subject_alt_names.push(SanType::URI(uri));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(&params)
    }

    /// A server certificate for the broker, valid for the given DNS names and IPs.
    pub fn issue_server(&self, sans: &[String], opts: &IssueOptions) -> Result<Pem> {
        if sans.is_empty() {
            return Err(CaError::Invalid("a server certificate needs at least one --san".into()));
        }
        let mut params = Self::base_params(&sans[0], opts);
        for san in sans {
            let entry = match san.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    san.as_str().try_into().map_err(|_| CaError::Invalid(format!("{san} is not a DNS name")))?,
                ),
            };
            params.subject_alt_names.push(entry);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(&params)
    }
}

/// Writes `tls.crt`, `tls.key` (0600) and a copy of `ca.crt` into `out`.
pub fn write_issued(out: &Path, pem: &Pem, ca: &DevCa) -> Result<()> {
    fs::create_dir_all(out).map_err(io(out))?;
    write_file(&out.join("tls.key"), &pem.key, true)?;
    write_file(&out.join("tls.crt"), &pem.cert, false)?;
    write_file(&out.join("ca.crt"), &ca.pem.cert, false)
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true).mode(if private { 0o600 } else { 0o644 });
    let mut f = opts.open(&tmp).map_err(io(&tmp))?;
    f.write_all(contents.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}
