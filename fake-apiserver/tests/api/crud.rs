//! CRD registration, CRUD of a custom resource, generation and the status subresource.

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::discovery::Discovery;
use serde_json::json;

use crate::common::{Env, Widget, WidgetStatus, api_error, widget};

#[tokio::test]
async fn crd_registration_makes_the_resource_discoverable() {
    let env = Env::start().await;
    // Before the CRD exists, its endpoint does not.
    let (code, _) = api_error(env.widgets().list(&Default::default()).await.unwrap_err());
    assert_eq!(code, 404);

    env.install_widget_crd().await;
    let discovery = Discovery::new(env.client.clone()).run().await.unwrap();
    let group = discovery.get("example.com").expect("example.com is discovered");
    let (resource, caps) = group.recommended_kind("Widget").expect("Widget is served");
    assert_eq!(resource.plural, "widgets");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    assert!(caps.subresources.iter().any(|(r, _)| r.plural == "status"), "{:?}", caps.subresources);

    // Re-applying the same CRD (as installers do on every start) is a no-op the second time.
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    let pp = PatchParams::apply("installer").force();
    let first = crds.patch("widgets.example.com", &pp, &Patch::Apply(Widget::crd())).await.unwrap();
    let second = crds.patch("widgets.example.com", &pp, &Patch::Apply(Widget::crd())).await.unwrap();
    assert_eq!(first.metadata.resource_version, second.metadata.resource_version);
}

#[tokio::test]
async fn custom_resource_crud_and_generation() {
    let env = Env::with_widgets().await;
    let api = env.widgets();

    let created = api.create(&PostParams::default(), &widget("w1", "red")).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    let rv1: u64 = created.metadata.resource_version.clone().unwrap().parse().unwrap();

    let (code, reason) = api_error(api.create(&PostParams::default(), &widget("w1", "red")).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));

    // A metadata-only change does not bump the generation; a spec change does.
    let mut w = api.get("w1").await.unwrap();
    w.metadata.labels = Some([("app".to_owned(), "demo".to_owned())].into());
    let w = api.replace("w1", &PostParams::default(), &w).await.unwrap();
    assert_eq!(w.metadata.generation, Some(1));
    let rv2: u64 = w.metadata.resource_version.clone().unwrap().parse().unwrap();
    assert!(rv2 > rv1);
    let mut w2 = w.clone();
    w2.spec.color = "blue".into();
    let w2 = api.replace("w1", &PostParams::default(), &w2).await.unwrap();
    assert_eq!(w2.metadata.generation, Some(2));
    assert_eq!(w2.spec.color, "blue");

    // A no-op update writes nothing.
    let same = api.replace("w1", &PostParams::default(), &w2).await.unwrap();
    assert_eq!(same.metadata.resource_version, w2.metadata.resource_version);

    let patched = api.patch("w1", &PatchParams::default(), &Patch::Merge(json!({"spec": {"size": 7}}))).await.unwrap();
    assert_eq!((patched.spec.size, patched.metadata.generation), (Some(7), Some(3)));

    let deleted = api.delete("w1", &DeleteParams::default()).await.unwrap();
    assert!(deleted.is_left(), "a custom resource deletion returns the object");
    let (code, reason) = api_error(api.get("w1").await.unwrap_err());
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
}

#[tokio::test]
async fn status_subresource_only_changes_status() {
    let env = Env::with_widgets().await;
    let api = env.widgets();
    api.create(&PostParams::default(), &widget("w1", "red")).await.unwrap();

    // Through /status: spec changes are ignored, status is written, generation stays.
    let patch = json!({"spec": {"color": "green"}, "status": {"ready": true, "observedColor": "red"}});
    let w = api.patch_status("w1", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    assert_eq!(w.spec.color, "red");
    assert_eq!(w.status, Some(WidgetStatus { observed_color: Some("red".into()), ready: true, ..Default::default() }));
    assert_eq!(w.metadata.generation, Some(1));

    // Through the main resource: status changes are ignored.
    let patch = json!({"spec": {"color": "green"}, "status": {"ready": false}});
    let w = api.patch("w1", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    assert_eq!(w.spec.color, "green");
    assert!(w.status.as_ref().unwrap().ready);
    assert_eq!(w.metadata.generation, Some(2));

    // Server-side apply on /status.
    let status =
        json!({"apiVersion": "example.com/v1", "kind": "Widget", "status": {"ready": false, "observedColor": "green"}});
    let w = api.patch_status("w1", &PatchParams::apply("ctl").force(), &Patch::Apply(status)).await.unwrap();
    assert_eq!(w.status.as_ref().unwrap().observed_color.as_deref(), Some("green"));
    assert_eq!(w.metadata.generation, Some(2));
    let get_status = api.get_status("w1").await.unwrap();
    assert!(!get_status.status.unwrap().ready);
}

#[tokio::test]
async fn optimistic_concurrency_on_replace() {
    let env = Env::start().await;
    let api: Api<ConfigMap> = Api::namespaced(env.client.clone(), "default");
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("c".into());
    cm.data = Some([("k".to_owned(), "1".to_owned())].into());
    let stale = api.create(&PostParams::default(), &cm).await.unwrap();

    let mut first = stale.clone();
    first.data = Some([("k".to_owned(), "2".to_owned())].into());
    api.replace("c", &PostParams::default(), &first).await.unwrap();

    let mut second = stale.clone();
    second.data = Some([("k".to_owned(), "3".to_owned())].into());
    let (code, reason) = api_error(api.replace("c", &PostParams::default(), &second).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert_eq!(api.get("c").await.unwrap().data.unwrap()["k"], "2");

    // A merge patch carrying a stale resourceVersion is a precondition too.
    let stale_rv = stale.metadata.resource_version.unwrap();
    let patch = json!({"metadata": {"resourceVersion": stale_rv}, "data": {"k": "4"}});
    let (code, _) = api_error(api.patch("c", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap_err());
    assert_eq!(code, 409);
}
