//! The run's development PKI: one CA (made with `xpu_broker::ca::DevCa`), the broker's server
//! certificate, and client certificates issued on demand, in parallel, and cached for the run.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::Context as _;
use tonic::transport::{Certificate, ClientTlsConfig, Identity as TlsIdentity};
use xpu_broker::{
    ca::{DevCa, IssueOptions, Pem},
    identity::Identity,
    tls::TlsPaths,
};

pub struct Pki {
    ca: DevCa,
    pub dir: PathBuf,
    /// The server certificate (127.0.0.1, localhost) for the broker, etcd and the echo server.
    pub server: TlsPaths,
    cache: Mutex<HashMap<String, Arc<Pem>>>,
}

fn write(dir: &Path, name: &str, body: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    fs::write(&p, body).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

impl Pki {
    pub fn new(dir: &Path) -> anyhow::Result<Pki> {
        let ca = DevCa::generate("xpu-bench CA")?;
        let opts = IssueOptions::valid_for_days(2);
        let server = ca.issue_server(&["localhost".into(), "127.0.0.1".into()], &opts)?;
        let server = TlsPaths {
            cert: write(dir, "server.crt", &server.cert)?,
            key: write(dir, "server.key", &server.key)?,
            client_ca: write(dir, "ca.crt", &ca.pem.cert)?,
        };
        Ok(Pki { ca, dir: dir.to_path_buf(), server, cache: Mutex::new(HashMap::new()) })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca.pem.cert
    }

    /// Client certificates for `identities` (`dpu/<serial>`, `host/<node>`, ...), issuing the
    /// ones not cached yet on every core.
    pub fn issue(&self, identities: &[String]) -> anyhow::Result<Vec<Arc<Pem>>> {
        let missing: Vec<&String> = {
            let cache = self.cache.lock().map_err(|_| anyhow::anyhow!("certificate cache poisoned"))?;
            identities.iter().filter(|i| !cache.contains_key(*i)).collect()
        };
        if !missing.is_empty() {
            let started = Instant::now();
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).max(1);
            let chunk = missing.len().div_ceil(threads);
            let opts = IssueOptions::valid_for_days(2);
            let issued: Vec<anyhow::Result<Vec<(String, Pem)>>> = std::thread::scope(|s| {
                let handles: Vec<_> = missing
                    .chunks(chunk)
                    .map(|part| {
                        let ca = &self.ca;
                        let opts = &opts;
                        s.spawn(move || {
                            part.iter()
                                .map(|id| {
                                    let parsed = Identity::parse(id).map_err(|e| anyhow::anyhow!("{e}"))?;
                                    Ok(((*id).clone(), ca.issue_client(&parsed, opts)?))
                                })
                                .collect::<anyhow::Result<Vec<_>>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("certificate thread panicked"))))
                    .collect()
            });
            let mut cache = self.cache.lock().map_err(|_| anyhow::anyhow!("certificate cache poisoned"))?;
            for part in issued {
                for (id, pem) in part? {
                    cache.insert(id, Arc::new(pem));
                }
            }
            if missing.len() >= 100 {
                eprintln!(
                    "  issued {} client certificates in {:.2}s ({} threads)",
                    missing.len(),
                    started.elapsed().as_secs_f64(),
                    threads
                );
            }
        }
        let cache = self.cache.lock().map_err(|_| anyhow::anyhow!("certificate cache poisoned"))?;
        identities
            .iter()
            .map(|i| cache.get(i).cloned().ok_or_else(|| anyhow::anyhow!("no certificate for {i}")))
            .collect()
    }

    pub fn one(&self, identity: &str) -> anyhow::Result<Arc<Pem>> {
        self.issue(&[identity.to_string()])?.pop().ok_or_else(|| anyhow::anyhow!("no certificate for {identity}"))
    }

    /// Client TLS for the loopback servers (they present a certificate for `localhost`).
    pub fn client_tls(&self, pem: &Pem) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.ca_pem()))
            .domain_name("localhost")
            .identity(TlsIdentity::from_pem(&pem.cert, &pem.key))
    }
}
