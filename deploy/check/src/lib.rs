//! Offline checks of `deploy/` (a dev-only crate; the tests in `tests/` drive it):
//!
//! - [`render`]: every kustomization under `deploy/` renders with `kubectl kustomize` (kubectl is
//!   found, or installed from Debian's `kubernetes-client`, or the check fails saying what to do);
//! - [`schema`]: every rendered object validates against the Kubernetes OpenAPI schemas (PyPI
//!   `kubernetes-validate`, in a venv under the target directory) or its CRD's own schema;
//! - [`policy`]: the security and operability policy (non-root, no privilege, resources, probes,
//!   pinned images, no RBAC wildcards, Pod Security levels, references that resolve), with
//!   exceptions only where a `# policy: allow …` comment in the manifest says why
//!   ([`exceptions`]).

pub mod exceptions;
pub mod policy;
pub mod render;
pub mod schema;

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap_or_else(|_| {
        // Only reachable if the crate moved; the paths below then fail with a clear error.
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    })
}

/// `deploy/`.
pub fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

/// A path relative to `deploy/`, for messages.
pub fn rel(path: &Path) -> String {
    path.strip_prefix(deploy_dir()).unwrap_or(path).display().to_string()
}

/// Every YAML file under `deploy/` that is a manifest we write (not the generated CRDs, not the
/// check's own schemas).
pub fn manifest_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(&deploy_dir(), &mut |p| {
        let r = rel(p);
        let yaml = p.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if yaml && !r.starts_with("crds/") && !r.starts_with("check/") {
            out.push(p.to_path_buf());
        }
    });
    out.sort();
    out
}

/// Calls `f` for every file under `dir`, recursively, skipping hidden entries.
pub fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
            continue;
        }
        if p.is_dir() {
            walk(&p, f);
        } else {
            f(&p);
        }
    }
}

/// Parses a multi-document YAML stream into JSON values (empty documents dropped).
pub fn parse_yaml_stream(text: &str) -> Result<Vec<serde_json::Value>, String> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc).map_err(|e| e.to_string())?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// `Kind/namespace/name` of an object, for messages.
pub fn ident(o: &serde_json::Value) -> String {
    let kind = o["kind"].as_str().unwrap_or("?");
    let name = o["metadata"]["name"].as_str().unwrap_or("?");
    match o["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind}/{ns}/{name}"),
        None => format!("{kind}/{name}"),
    }
}
