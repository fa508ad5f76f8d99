//! watch: resuming from a resourceVersion, 410 past the history, bookmarks.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use kube::ResourceExt;
use kube::api::{Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher;
use serde_json::json;
use xpu_fake_apiserver::Options;

use crate::common::{Env, Widget, widget, within};

fn describe(e: &WatchEvent<Widget>) -> String {
    match e {
        WatchEvent::Added(w) => format!("ADDED {}", w.name_any()),
        WatchEvent::Modified(w) => format!("MODIFIED {}", w.name_any()),
        WatchEvent::Deleted(w) => format!("DELETED {}", w.name_any()),
        WatchEvent::Bookmark(_) => "BOOKMARK".into(),
        WatchEvent::Error(s) => format!("ERROR {} {}", s.code, s.reason),
    }
}

#[tokio::test]
async fn watch_resumes_from_a_resource_version() {
    let env = Env::with_widgets().await;
    let api = env.widgets();
    let a = api.create(&PostParams::default(), &widget("a", "red")).await.unwrap();
    let since = a.resource_version().unwrap();
    api.create(&PostParams::default(), &widget("b", "red")).await.unwrap();
    api.patch("a", &PatchParams::default(), &Patch::Merge(json!({"spec": {"color": "blue"}}))).await.unwrap();

    let mut stream = api.watch(&WatchParams::default().disable_bookmarks(), &since).await.unwrap().boxed();
    let mut next = async || describe(&within(stream.try_next()).await.unwrap().unwrap());
    assert_eq!(next().await, "ADDED b", "only events newer than {since} are replayed");
    assert_eq!(next().await, "MODIFIED a");
    api.create(&PostParams::default(), &widget("c", "red")).await.unwrap();
    assert_eq!(next().await, "ADDED c", "then live events follow");
    api.delete("b", &Default::default()).await.unwrap();
    assert_eq!(next().await, "DELETED b");
}

#[tokio::test]
async fn too_old_resource_version_gets_410_expired() {
    let env = Env::start_with(Options { history: 3, ..Options::default() }).await;
    env.install_widget_crd().await;
    let api = env.widgets();
    let first = api.create(&PostParams::default(), &widget("a", "red")).await.unwrap();
    for name in ["b", "c", "d", "e"] {
        api.create(&PostParams::default(), &widget(name, "red")).await.unwrap();
    }
    let mut stream = api
        .watch(&WatchParams::default().disable_bookmarks(), &first.resource_version().unwrap())
        .await
        .unwrap()
        .boxed();
    match within(stream.try_next()).await.unwrap().unwrap() {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert!(status.message.contains("too old resource version"), "{}", status.message);
        }
        other => panic!("expected a 410 error event, got {}", describe(&other)),
    }
    // Within the history it still works.
    let recent = api.get("d").await.unwrap().resource_version().unwrap();
    let mut stream = api.watch(&WatchParams::default().disable_bookmarks(), &recent).await.unwrap().boxed();
    assert_eq!(describe(&within(stream.try_next()).await.unwrap().unwrap()), "ADDED e");
}

#[tokio::test]
async fn watcher_relists_after_410() {
    let env = Env::with_widgets().await;
    let api = env.widgets();
    let mut watched = widget("a", "red");
    watched.metadata.labels = Some([("app".to_owned(), "watched".to_owned())].into());
    api.create(&PostParams::default(), &watched).await.unwrap();

    // Without bookmarks and with a selector, the watcher's resourceVersion stays put while other objects
    // change; after a compaction, its next watch (every second) is too old.
    let config = watcher::Config::default().labels("app=watched").disable_bookmarks().timeout(1);
    let mut events = watcher(api.clone(), config).boxed();
    let mut next = async || within(events.next()).await.unwrap();
    assert!(matches!(next().await, Ok(watcher::Event::Init)));
    assert!(matches!(next().await, Ok(watcher::Event::InitApply(w)) if w.name_any() == "a"));
    assert!(matches!(next().await, Ok(watcher::Event::InitDone)));

    api.create(&PostParams::default(), &widget("unwatched", "red")).await.unwrap();
    env.server.compact_history();

    match next().await {
        Err(watcher::Error::WatchError(status)) => assert_eq!(status.code, 410),
        other => panic!("expected the 410 to surface, got {other:?}"),
    }
    assert!(matches!(next().await, Ok(watcher::Event::Init)), "relist after 410");
    assert!(matches!(next().await, Ok(watcher::Event::InitApply(w)) if w.name_any() == "a"));
    assert!(matches!(next().await, Ok(watcher::Event::InitDone)));

    // And it keeps watching after the relist.
    let mut late = widget("b", "red");
    late.metadata.labels = watched.metadata.labels.clone();
    api.create(&PostParams::default(), &late).await.unwrap();
    assert!(matches!(next().await, Ok(watcher::Event::Apply(w)) if w.name_any() == "b"));
}

#[tokio::test]
async fn bookmarks_arrive_when_asked() {
    let options = Options { bookmark_interval: Duration::from_millis(200), ..Options::default() };
    let env = Env::start_with(options).await;
    env.install_widget_crd().await;
    let api = env.widgets();
    let created = api.create(&PostParams::default(), &widget("a", "red")).await.unwrap();
    let rv = created.resource_version().unwrap();

    let mut stream = api.watch(&WatchParams { bookmarks: true, ..WatchParams::default() }, &rv).await.unwrap().boxed();
    match within(stream.try_next()).await.unwrap().unwrap() {
        WatchEvent::Bookmark(b) => {
            assert_eq!(b.metadata.resource_version, rv);
            assert_eq!(b.types.kind, "Widget");
        }
        other => panic!("expected a bookmark, got {}", describe(&other)),
    }

    let mut stream = api.watch(&WatchParams::default().disable_bookmarks(), &rv).await.unwrap().boxed();
    let quiet = tokio::time::timeout(Duration::from_secs(1), stream.try_next()).await;
    assert!(quiet.is_err(), "no bookmarks unless asked for");
}

#[tokio::test]
async fn streaming_list_sends_initial_events_then_a_bookmark() {
    let env = Env::with_widgets().await;
    let api = env.widgets();
    api.create(&PostParams::default(), &widget("a", "red")).await.unwrap();
    let config = watcher::Config::default().streaming_lists();
    let mut events = watcher(api.clone(), config).boxed();
    let mut next = async || within(events.next()).await.unwrap().unwrap();
    assert!(matches!(next().await, watcher::Event::Init));
    assert!(matches!(next().await, watcher::Event::InitApply(w) if w.name_any() == "a"));
    assert!(matches!(next().await, watcher::Event::InitDone));
}
