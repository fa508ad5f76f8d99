//! Deletion with finalizers.

use futures::{StreamExt, TryStreamExt};
use kube::ResourceExt;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

use crate::common::{Env, api_error, widget, within};

#[tokio::test]
async fn delete_with_finalizer_marks_then_removing_it_deletes() {
    let env = Env::with_widgets().await;
    let api = env.widgets();
    let mut w = widget("w", "red");
    w.metadata.finalizers = Some(vec!["example.com/cleanup".into()]);
    let created = api.create(&PostParams::default(), &w).await.unwrap();
    let mut events = api
        .watch(&WatchParams::default().disable_bookmarks(), &created.resource_version().unwrap())
        .await
        .unwrap()
        .boxed();

    let pending = api.delete("w", &DeleteParams::default()).await.unwrap().left().expect("the object is returned");
    assert!(pending.metadata.deletion_timestamp.is_some());
    let still = api.get("w").await.unwrap();
    assert!(still.metadata.deletion_timestamp.is_some(), "kept while a finalizer remains");
    assert_eq!(still.finalizers(), ["example.com/cleanup"]);

    // Deleting again changes nothing.
    api.delete("w", &DeleteParams::default()).await.unwrap();
    assert_eq!(api.get("w").await.unwrap().resource_version(), still.resource_version());

    api.patch("w", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}}))).await.unwrap();
    let (code, _) = api_error(api.get("w").await.unwrap_err());
    assert_eq!(code, 404, "removing the last finalizer deletes the object");

    let mut next = async || within(events.try_next()).await.unwrap().unwrap();
    match next().await {
        WatchEvent::Modified(w) => assert!(w.metadata.deletion_timestamp.is_some()),
        other => panic!("expected MODIFIED, got {other:?}"),
    }
    match next().await {
        WatchEvent::Deleted(w) => assert_eq!(w.name_any(), "w"),
        other => panic!("expected DELETED, got {other:?}"),
    }
}
