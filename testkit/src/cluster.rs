//! A Kubernetes cluster for the controllers under test: the in-repo fake kube-apiserver with
//! the xpu CRDs installed and the namespaces created, and a kubeconfig pointing at it.

use std::path::{Path, PathBuf};

use k8s_openapi::{
    api::core::v1::Namespace, apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Client,
    api::{Api, PostParams},
};
use xpu_fake_apiserver::FakeApiServer;
use xpu_sync_common::crd;

pub struct FakeCluster {
    pub server: FakeApiServer,
    pub client: Client,
    /// `<dir>/<name>.kubeconfig`, for the binaries under test.
    pub kubeconfig: PathBuf,
}

/// Starts a fake cluster with every xpu CRD and the namespaces `xpu-system` and `namespaces`.
pub async fn fake_cluster(dir: &Path, name: &str, namespaces: &[&str]) -> FakeCluster {
    let server = FakeApiServer::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let client = Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for c in crd::all() {
        crds.create(&PostParams::default(), &c).await.unwrap();
    }
    let ns: Api<Namespace> = Api::all(client.clone());
    for n in std::iter::once("xpu-system").chain(namespaces.iter().copied()) {
        let body = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}});
        ns.create(&PostParams::default(), &serde_json::from_value(body).unwrap()).await.unwrap();
    }
    let kubeconfig = dir.join(format!("{name}.kubeconfig"));
    std::fs::write(&kubeconfig, server.kubeconfig_yaml()).unwrap();
    FakeCluster { server, client, kubeconfig }
}
