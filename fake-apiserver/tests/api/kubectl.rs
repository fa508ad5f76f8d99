//! The real `kubectl` against the fake server.

use std::path::Path;
use std::process::Output;

use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

use crate::common::{Env, widget};

const KUBECTL: &str = "/usr/bin/kubectl";

async fn kubectl(env: &Env, dir: &Path, args: &[&str]) -> Output {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, env.server.kubeconfig_yaml()).unwrap();
    let cache = dir.join("cache");
    let output = tokio::process::Command::new(KUBECTL)
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", dir)
        .args(["--server", &env.server.url(), "--cache-dir", cache.to_str().unwrap()])
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "kubectl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    output
}

fn table(output: &Output) -> Vec<Vec<String>> {
    String::from_utf8_lossy(&output.stdout).lines().map(|l| l.split_whitespace().map(str::to_owned).collect()).collect()
}

#[tokio::test]
async fn kubectl_get_prints_printer_columns() {
    if !Path::new(KUBECTL).exists() {
        println!("skipping: {KUBECTL} is not installed");
        return;
    }
    let env = Env::with_widgets().await;
    let api = env.widgets();
    api.create(&PostParams::default(), &widget("w1", "red")).await.unwrap();
    let status = json!({"status": {"ready": true}});
    api.patch_status("w1", &PatchParams::default(), &Patch::Merge(status)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    let wide = table(&kubectl(&env, dir.path(), &["get", "widgets", "-o", "wide", "-n", "default"]).await);
    assert_eq!(wide[0], ["NAME", "COLOR", "SIZE", "READY"], "{wide:?}");
    assert_eq!(wide[1], ["w1", "red", "3", "true"], "{wide:?}");

    // Without -o wide, priority > 0 columns are hidden; the short name resolves through discovery.
    let narrow = table(&kubectl(&env, dir.path(), &["get", "wd"]).await);
    assert_eq!(narrow[0], ["NAME", "COLOR", "READY"], "{narrow:?}");
    assert_eq!(narrow[1], ["w1", "red", "true"], "{narrow:?}");

    // Built-in types work too (Name, Status, Age for namespaces).
    let namespaces = table(&kubectl(&env, dir.path(), &["get", "namespaces"]).await);
    assert_eq!(namespaces[0], ["NAME", "STATUS", "AGE"]);
    assert!(namespaces.iter().any(|row| row[0] == "default" && row[1] == "Active"), "{namespaces:?}");
}
