//! A `kube::runtime::Controller` with the `finalizer` helper, end to end.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::watcher;
use kube::{ResourceExt, runtime::finalizer::Event as FinalizerEvent};
use serde_json::json;

use crate::common::{Env, Widget, widget, within};

const FINALIZER: &str = "example.com/cleanup";

struct Ctx {
    api: Api<Widget>,
    cleaned_up: Mutex<Vec<String>>,
}

type Error = finalizer::Error<kube::Error>;

async fn reconcile(w: Arc<Widget>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    finalizer(&ctx.api, FINALIZER, w, |event| async {
        match event {
            FinalizerEvent::Apply(w) => {
                let status = json!({"status": {
                    "observedColor": w.spec.color,
                    "observedGeneration": w.metadata.generation,
                    "ready": true,
                }});
                ctx.api.patch_status(&w.name_any(), &PatchParams::default(), &Patch::Merge(status)).await?;
                Ok(Action::await_change())
            }
            FinalizerEvent::Cleanup(w) => {
                ctx.cleaned_up.lock().unwrap().push(w.name_any());
                Ok(Action::await_change())
            }
        }
    })
    .await
}

fn error_policy(_: Arc<Widget>, _: &Error, _: Arc<Ctx>) -> Action {
    Action::requeue(Duration::from_millis(100))
}

/// Poll until `check` holds for the widget (or it is gone, `None`).
async fn eventually(api: &Api<Widget>, name: &str, check: impl Fn(Option<&Widget>) -> bool) {
    within(async {
        loop {
            let current = api.get_opt(name).await.unwrap();
            if check(current.as_ref()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

fn observed(w: Option<&Widget>) -> Option<(String, i64)> {
    let status = w?.status.as_ref()?;
    Some((status.observed_color.clone()?, status.observed_generation?))
}

#[tokio::test]
async fn controller_reconciles_status_and_cleans_up() {
    let env = Env::with_widgets().await;
    let api = env.widgets();
    let ctx = Arc::new(Ctx { api: api.clone(), cleaned_up: Mutex::new(Vec::new()) });
    let controller = tokio::spawn(
        Controller::new(api.clone(), watcher::Config::default())
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|_| async {}),
    );

    api.create(&PostParams::default(), &widget("w", "red")).await.unwrap();
    eventually(&api, "w", |w| observed(w) == Some(("red".into(), 1))).await;
    let w = api.get("w").await.unwrap();
    assert_eq!(w.finalizers(), [FINALIZER]);
    assert!(w.status.unwrap().ready);

    api.patch("w", &PatchParams::default(), &Patch::Merge(json!({"spec": {"color": "blue"}}))).await.unwrap();
    eventually(&api, "w", |w| observed(w) == Some(("blue".into(), 2))).await;

    api.delete("w", &DeleteParams::default()).await.unwrap();
    eventually(&api, "w", |w| w.is_none()).await;
    assert_eq!(*ctx.cleaned_up.lock().unwrap(), ["w"]);
    controller.abort();
}
