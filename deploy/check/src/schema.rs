//! Validation of rendered objects against the Kubernetes OpenAPI schemas and the CRDs' schemas,
//! by `deploy/check/validate.py` in a Python venv that has the PyPI package `kubernetes-validate`.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};

use crate::{deploy_dir, render::Rendered};

/// What the venv gets: pinned, so a run is reproducible; the schemas of Kubernetes 1.25–1.37 ship
/// inside the package (no network access when validating).
pub const REQUIREMENTS: &[&str] = &["kubernetes-validate==1.37.0"];

/// The Kubernetes versions validated against: the oldest the manifests support (1.30: the
/// `preStop.sleep` action) and the one the code's k8s-openapi targets.
pub const VERSIONS: &[&str] = &["1.30", "1.33"];

/// A Python interpreter with `kubernetes-validate`: `$XPU_DEPLOY_CHECK_PYTHON`, or a venv in
/// `<cache_dir>/venv`, created (and the requirements pip-installed) when missing.
pub fn python(cache_dir: &Path) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("XPU_DEPLOY_CHECK_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let venv = cache_dir.join("venv");
    let py = venv.join("bin/python");
    let marker = venv.join(".xpu-deploy-check-ready");
    let wanted = REQUIREMENTS.join("\n");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == wanted) && py.exists() {
        return Ok(py);
    }
    // Build in a private directory and rename, so concurrent runs never see half a venv.
    std::fs::create_dir_all(cache_dir).map_err(|e| format!("{}: {e}", cache_dir.display()))?;
    let tmp = cache_dir.join(format!("venv.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let python3 = std::env::var("PYTHON3").unwrap_or_else(|_| "python3".into());
    eprintln!("deploy-check: creating a Python venv in {} for kubernetes-validate", venv.display());
    let status = Command::new(&python3)
        .args(["-m", "venv"])
        .arg(&tmp)
        .status()
        .map_err(|e| format!("running {python3} -m venv: {e} (install python3 and python3-venv)"))?;
    if !status.success() {
        return Err(format!("{python3} -m venv failed ({status}); on Debian install python3-venv"));
    }
    let out = Command::new(tmp.join("bin/python"))
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input"])
        .args(REQUIREMENTS)
        .output()
        .map_err(|e| format!("running pip: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(format!(
            "pip install {} failed (PyPI must be reachable the first time): {}",
            REQUIREMENTS.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    std::fs::write(tmp.join(".xpu-deploy-check-ready"), &wanted).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&venv);
    if std::fs::rename(&tmp, &venv).is_err() {
        // Another run finished first; use its venv.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    if py.exists() { Ok(py) } else { Err(format!("no interpreter at {} after creating the venv", py.display())) }
}

/// One validation failure.
#[derive(Clone, Debug)]
pub struct SchemaError {
    pub source: String,
    pub object: String,
    pub version: String,
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for SchemaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} (Kubernetes {}) {}: {}", self.source, self.object, self.version, self.path, self.message)
    }
}

/// The CRD files kinds are validated against: ours and the third-party subsets.
pub fn crd_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in [deploy_dir().join("crds"), deploy_dir().join("check/schemas")] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            files.extend(
                entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "yaml")),
            );
        }
    }
    files.sort();
    files
}

/// Validates `(source, object)` pairs; returns how many objects were checked and the errors.
pub fn validate(
    python: &Path,
    objects: &[(String, Value)],
    versions: &[&str],
) -> Result<(u64, Vec<SchemaError>), String> {
    let request = json!({
        "versions": versions,
        "crd_files": crd_files(),
        "objects": objects.iter().map(|(s, o)| json!({"source": s, "object": o})).collect::<Vec<_>>(),
    });
    let script = deploy_dir().join("check/validate.py");
    let mut child = Command::new(python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {} {}: {e}", python.display(), script.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(request.to_string().as_bytes()).map_err(|e| format!("writing to validate.py: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("validate.py: {e}"))?;
    if !out.status.success() {
        return Err(format!("validate.py failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("validate.py output: {e}"))?;
    let s = |e: &Value, k: &str| e[k].as_str().unwrap_or_default().to_string();
    let errors = v["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| SchemaError {
                    source: s(e, "source"),
                    object: s(e, "object"),
                    version: s(e, "version"),
                    path: s(e, "path"),
                    message: s(e, "message"),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((v["checked"].as_u64().unwrap_or(0), errors))
}

/// Every rendered object with its kustomization as source.
pub fn objects_of(rendered: &[Rendered]) -> Vec<(String, Value)> {
    rendered.iter().flat_map(|r| r.objects.iter().map(|o| (r.dir.clone(), o.clone()))).collect()
}
