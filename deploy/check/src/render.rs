//! Rendering every kustomization under `deploy/` with `kubectl kustomize`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

use crate::{deploy_dir, parse_yaml_stream, rel, walk};

/// The kustomize features the manifests use (components, replacements with delimiters, `labels`)
/// need kustomize v5, which kubectl embeds since 1.27.
const MIN_KUSTOMIZE_MAJOR: u64 = 5;

/// One rendered kustomization.
#[derive(Clone, Debug)]
pub struct Rendered {
    /// Its directory relative to `deploy/`, e.g. `management/overlays/production`.
    pub dir: String,
    pub objects: Vec<Value>,
}

impl Rendered {
    /// An overlay (deployable as is), as opposed to a base or the examples.
    pub fn is_overlay(&self) -> bool {
        self.dir.contains("/overlays/")
    }

    /// `management`, `tenant` or `infra`.
    pub fn area(&self) -> &str {
        self.dir.split('/').next().unwrap_or_default()
    }
}

/// Every directory under `deploy/` holding a `kustomization.yaml` that is a Kustomization (not a
/// Component, which only renders as part of one).
pub fn kustomizations() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    walk(&deploy_dir(), &mut |p| {
        if p.file_name().is_some_and(|n| n == "kustomization.yaml" || n == "kustomization.yml") {
            let component = std::fs::read_to_string(p).is_ok_and(|t| t.lines().any(|l| l.trim() == "kind: Component"));
            if !component && let Some(d) = p.parent() {
                dirs.push(d.to_path_buf());
            }
        }
    });
    dirs.sort();
    dirs
}

/// The kubectl to use: `$XPU_KUBECTL`, else `kubectl` on PATH or in /usr/bin, else the one
/// Debian's `kubernetes-client` package installs (installed here when we may). Checks that its
/// built-in kustomize is recent enough.
pub fn kubectl() -> Result<PathBuf, String> {
    let found = std::env::var_os("XPU_KUBECTL").map(PathBuf::from).or_else(find_kubectl);
    let path = match found {
        Some(p) => p,
        None => {
            install_kubectl()?;
            find_kubectl().ok_or("kubernetes-client was installed but no kubectl is on PATH")?
        }
    };
    let out = Command::new(&path)
        .args(["version", "--client", "-o", "json"])
        .output()
        .map_err(|e| format!("running {} version: {e}", path.display()))?;
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!("{} version --client -o json: {e}: {}", path.display(), String::from_utf8_lossy(&out.stderr))
    })?;
    let kustomize = v["kustomizeVersion"].as_str().unwrap_or("");
    let major: u64 = kustomize.trim_start_matches('v').split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
    if major < MIN_KUSTOMIZE_MAJOR {
        return Err(format!(
            "{} embeds kustomize {kustomize:?}; the manifests need kustomize v{MIN_KUSTOMIZE_MAJOR} (kubectl 1.27 or \
             newer). Debian 12's kubernetes-client is 1.20: install a newer kubectl (https://pkgs.k8s.io) and point \
             XPU_KUBECTL at it",
            path.display()
        ));
    }
    Ok(path)
}

fn find_kubectl() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join("kubectl"))
        .find(|p| p.is_file())
}

fn install_kubectl() -> Result<(), String> {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let run = |args: &[&str]| -> Result<(), String> {
        let (prog, rest): (&str, Vec<&str>) =
            if root { (args[0], args[1..].to_vec()) } else { ("sudo", [&["-n"], args].concat()) };
        let status = Command::new(prog)
            .args(&rest)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|e| format!("running {prog}: {e}"))?;
        if status.success() { Ok(()) } else { Err(format!("`{}` failed ({status})", args.join(" "))) }
    };
    eprintln!("deploy-check: no kubectl found; installing Debian's kubernetes-client");
    run(&["apt-get", "update", "-qq"])
        .and_then(|()| run(&["apt-get", "install", "-y", "-qq", "kubernetes-client"]))
        .map_err(|e| {
            format!(
                "no kubectl, and installing Debian's kubernetes-client failed ({e}). Install kubectl 1.27 or newer \
                 (it has kustomize built in) or set XPU_KUBECTL to one"
            )
        })
}

/// `kubectl kustomize <dir>`, parsed.
pub fn render(kubectl: &Path, dir: &Path) -> Result<Vec<Value>, String> {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .map_err(|e| format!("running {} kustomize: {e}", kubectl.display()))?;
    if !out.status.success() {
        return Err(format!("kubectl kustomize {}: {}", rel(dir), String::from_utf8_lossy(&out.stderr).trim()));
    }
    let text = String::from_utf8(out.stdout).map_err(|e| format!("kubectl kustomize {}: {e}", rel(dir)))?;
    parse_yaml_stream(&text).map_err(|e| format!("kubectl kustomize {}: output is not YAML: {e}", rel(dir)))
}

/// Renders every kustomization; the errors of those that fail.
pub fn render_all(kubectl: &Path) -> (Vec<Rendered>, Vec<String>) {
    let dirs = kustomizations();
    let results: Vec<(String, Result<Vec<Value>, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = dirs.iter().map(|d| (rel(d), s.spawn(move || render(kubectl, d)))).collect::<Vec<_>>();
        handles
            .into_iter()
            .map(|(dir, h)| (dir, h.join().unwrap_or_else(|_| Err("the render thread panicked".into()))))
            .collect()
    });
    let mut rendered = Vec::new();
    let mut errors = Vec::new();
    for (dir, r) in results {
        match r {
            Ok(objects) if objects.is_empty() => errors.push(format!("{dir}: renders no object")),
            Ok(objects) => rendered.push(Rendered { dir, objects }),
            Err(e) => errors.push(e),
        }
    }
    (rendered, errors)
}
