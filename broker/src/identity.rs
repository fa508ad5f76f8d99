//! Caller identities, carried in the client certificate's URI SAN as `xpu://<kind>/<name>…`.

use std::fmt;

use x509_parser::{extensions::GeneralName, prelude::*};

use crate::{
    error::{Error, Result},
    model::validate,
};

pub const SCHEME: &str = "xpu://";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Tenant,
    Infra,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    Dpu(String),
    Host(String),
    Cluster { name: String, side: Side },
    Admin(String),
}

impl Identity {
    /// Parses `dpu/<serial>`, `host/<node>`, `cluster/<name>/tenant|infra`, `admin/<name>`.
    pub fn parse(s: &str) -> Result<Identity> {
        let bad = |reason: &str| Error::invalid("identity", format!("{s:?}: {reason}"));
        let mut parts = s.split('/');
        let kind = parts.next().unwrap_or_default();
        let name = parts.next().ok_or_else(|| bad("expected <kind>/<name>"))?;
        let rest: Vec<&str> = parts.collect();
        let id = match (kind, rest.as_slice()) {
            ("dpu", []) => {
                validate::dns_label(name, "identity").map_err(|_| bad("a DPU serial must be a DNS-1123 label"))?;
                Identity::Dpu(name.to_string())
            }
            ("host", []) => {
                validate::dns_subdomain(name, "identity")
                    .map_err(|_| bad("a node name must be a DNS-1123 subdomain"))?;
                Identity::Host(name.to_string())
            }
            ("admin", []) => {
                validate::dns_label(name, "identity").map_err(|_| bad("an admin name must be a DNS-1123 label"))?;
                Identity::Admin(name.to_string())
            }
            ("cluster", [side]) => {
                validate::dns_label(name, "identity").map_err(|_| bad("a cluster name must be a DNS-1123 label"))?;
                let side = match *side {
                    "tenant" => Side::Tenant,
                    "infra" => Side::Infra,
                    _ => return Err(bad("a cluster identity ends in /tenant or /infra")),
                };
                Identity::Cluster { name: name.to_string(), side }
            }
            _ => {
                return Err(bad("expected dpu/<serial>, host/<node>, cluster/<name>/tenant|infra or admin/<name>"));
            }
        };
        Ok(id)
    }

    pub fn uri(&self) -> String {
        format!("{SCHEME}{self}")
    }

    /// The identity in a verified client certificate (DER). Exactly one `xpu://` URI SAN.
    pub fn from_certificate(der: &[u8]) -> Result<Identity> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|_| Error::Unauthenticated("the client certificate does not parse".into()))?;
        if cert.is_ca() {
            return Err(Error::Unauthenticated("a CA certificate cannot be used as a client identity".into()));
        }
        let san = cert
            .subject_alternative_name()
            .map_err(|_| Error::Unauthenticated("the client certificate has a malformed SAN extension".into()))?
            .ok_or_else(|| {
                Error::Unauthenticated("the client certificate has no SAN with an xpu:// identity".into())
            })?;
        let mut found = san.value.general_names.iter().filter_map(|n| match n {
            GeneralName::URI(u) => u.strip_prefix(SCHEME),
            _ => None,
        });
        let first = found
            .next()
            .ok_or_else(|| Error::Unauthenticated("the client certificate has no xpu:// URI SAN".into()))?;
        if found.next().is_some() {
            return Err(Error::Unauthenticated("the client certificate carries more than one xpu:// identity".into()));
        }
        Identity::parse(first).map_err(|e| Error::Unauthenticated(format!("bad identity in client certificate: {e}")))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Dpu(s) => write!(f, "dpu/{s}"),
            Identity::Host(n) => write!(f, "host/{n}"),
            Identity::Cluster { name, side: Side::Tenant } => write!(f, "cluster/{name}/tenant"),
            Identity::Cluster { name, side: Side::Infra } => write!(f, "cluster/{name}/infra"),
            Identity::Admin(n) => write!(f, "admin/{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_identity_kind() {
        for s in ["dpu/bf3-1", "host/node-1.example", "cluster/east/tenant", "cluster/east/infra", "admin/ops"] {
            assert_eq!(Identity::parse(s).unwrap().to_string(), s);
        }
        for bad in ["dpu", "dpu/BF3", "cluster/east", "cluster/east/other", "root/x", "host/a/b", "admin/"] {
            assert!(Identity::parse(bad).is_err(), "{bad}");
        }
    }
}
