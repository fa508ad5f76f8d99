//! Health, version, error bodies, generateName, metadata-only requests, namespace deletion, shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{Env, Widget, widget, within};

/// A bare HTTP/1.1 GET: (status code, body).
async fn raw_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).await.unwrap();
    let code = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (code, body)
}

#[tokio::test]
async fn health_version_and_status_errors() {
    let env = Env::start().await;
    for path in ["/healthz", "/readyz", "/livez"] {
        assert_eq!(raw_get(env.server.addr(), path).await, (200, "ok".to_owned()));
    }
    let version = env.client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");

    // The kubeconfig it hands out works for a client too.
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&env.server.kubeconfig_yaml()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
    assert_eq!(config.default_namespace, "default");
    let client = kube::Client::try_from(config).unwrap();
    let namespaces: Api<Namespace> = Api::all(client);
    assert!(namespaces.get_opt("kube-system").await.unwrap().is_some());

    let (code, body) = raw_get(env.server.addr(), "/api/v1/namespaces/default/configmaps/missing").await;
    assert_eq!(code, 404);
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["status"], "Failure");
    assert_eq!(status["reason"], "NotFound");
    assert_eq!(status["code"], 404);
    assert_eq!(status["message"], "configmaps \"missing\" not found");
}

#[tokio::test]
async fn generate_name_and_metadata_only_requests() {
    let env = Env::with_widgets().await;
    let api = env.widgets();
    let mut w = widget("", "red");
    w.metadata.name = None;
    w.metadata.generate_name = Some("gen-".into());
    let created = api.create(&PostParams::default(), &w).await.unwrap();
    let name = created.name_any();
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");

    let meta = api.get_metadata(&name).await.unwrap();
    assert_eq!(meta.types.as_ref().unwrap().kind, "PartialObjectMetadata");
    assert_eq!(meta.metadata.uid, created.metadata.uid);
    let list = api.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);

    let metadata_api: Api<PartialObjectMeta<Widget>> = Api::namespaced(env.client.clone(), "default");
    let mut events = watcher(metadata_api, watcher::Config::default()).boxed();
    assert!(matches!(within(events.next()).await.unwrap().unwrap(), watcher::Event::Init));
    match within(events.next()).await.unwrap().unwrap() {
        watcher::Event::InitApply(m) => assert_eq!(m.name_any(), name),
        other => panic!("expected the object's metadata, got {other:?}"),
    }
}

#[tokio::test]
async fn deleting_a_namespace_deletes_its_objects() {
    let env = Env::start().await;
    let namespaces: Api<Namespace> = Api::all(env.client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some("doomed".into());
    let ns = namespaces.create(&PostParams::default(), &ns).await.unwrap();
    assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Active"));
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), "doomed");
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("c".into());
    cms.create(&PostParams::default(), &cm).await.unwrap();

    namespaces.delete("doomed", &DeleteParams::default()).await.unwrap();
    assert!(namespaces.get_opt("doomed").await.unwrap().is_none());
    assert!(cms.get_opt("c").await.unwrap().is_none());
    assert!(env.server.list_objects("", "configmaps").is_empty());
}

#[tokio::test]
async fn shutdown_ends_open_watches() {
    let env = Env::with_widgets().await;
    let api = env.widgets();
    let mut stream = api.watch(&WatchParams::default().disable_bookmarks(), "0").await.unwrap().boxed();
    let addr = env.server.addr();
    tokio::time::timeout(Duration::from_secs(10), env.server.shutdown()).await.expect("shutdown completes");
    let end = within(stream.try_next()).await;
    assert!(matches!(end, Ok(None) | Err(_)), "the watch ends");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the listener is closed");
}
