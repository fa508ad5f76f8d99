//! list with label / field selectors and paging.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};

use crate::common::{Env, widget};

async fn create_cm(api: &Api<ConfigMap>, name: &str, labels: &[(&str, &str)]) {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(name.into());
    cm.metadata.labels =
        Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<BTreeMap<_, _>>());
    api.create(&PostParams::default(), &cm).await.unwrap();
}

async fn names(api: &Api<ConfigMap>, lp: &ListParams) -> Vec<String> {
    api.list(lp).await.unwrap().items.iter().map(ResourceExt::name_any).collect()
}

#[tokio::test]
async fn label_and_field_selectors() {
    let env = Env::start().await;
    let api: Api<ConfigMap> = Api::namespaced(env.client.clone(), "default");
    create_cm(&api, "a", &[("app", "web"), ("tier", "front")]).await;
    create_cm(&api, "b", &[("app", "web"), ("tier", "back")]).await;
    create_cm(&api, "c", &[("app", "db")]).await;
    let other: Api<ConfigMap> = Api::namespaced(env.client.clone(), "other");
    create_cm(&other, "d", &[("app", "web")]).await;

    let sel = |s: &str| ListParams::default().labels(s);
    assert_eq!(names(&api, &sel("app=web")).await, ["a", "b"]);
    assert_eq!(names(&api, &sel("app=web,tier!=front")).await, ["b"]);
    assert_eq!(names(&api, &sel("tier in (front,back)")).await, ["a", "b"]);
    assert_eq!(names(&api, &sel("app notin (web)")).await, ["c"]);
    assert_eq!(names(&api, &sel("tier")).await, ["a", "b"]);
    assert_eq!(names(&api, &sel("!tier")).await, ["c"]);
    assert_eq!(names(&api, &ListParams::default().fields("metadata.name=b")).await, ["b"]);

    let all: Api<ConfigMap> = Api::all(env.client.clone());
    assert_eq!(names(&all, &sel("app=web")).await, ["a", "b", "d"]);
    assert_eq!(names(&all, &ListParams::default().fields("metadata.namespace=other")).await, ["d"]);
}

#[tokio::test]
async fn paging_with_limit_and_continue() {
    let env = Env::with_widgets().await;
    let api = env.widgets();
    for i in 0..5 {
        let mut w = widget(&format!("w{i}"), "red");
        if i % 2 == 0 {
            w.metadata.labels = Some([("even".to_owned(), "yes".to_owned())].into());
        }
        api.create(&PostParams::default(), &w).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut lp = ListParams::default().limit(2);
    let mut first_rv = None;
    loop {
        let page = api.list(&lp).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 2);
        let rv = page.metadata.resource_version.clone();
        assert_eq!(*first_rv.get_or_insert(rv.clone()), rv, "pages share the first page's resourceVersion");
        seen.extend(page.items.iter().map(ResourceExt::name_any));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => lp = lp.continue_token(&token),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ["w0", "w1", "w2", "w3", "w4"]);

    let page = api.list(&ListParams::default().labels("even=yes").limit(2)).await.unwrap();
    assert_eq!(page.items.len(), 2);
    assert_eq!(page.metadata.remaining_item_count, Some(1));
}
