//! The leader's work: follow the broker and the cluster, feed the engine, persist the revision
//! whenever everything before it is done, and (tenant side) collect Netdevs whose pod is gone.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{DynamicObject, ListParams},
    runtime::{WatchStreamExt, watcher},
};
use tonic::transport::Channel;
use xpu_proto::broker::v1::{self as pb, sync_service_client::SyncServiceClient, watch_event::Event as E};

use super::{
    Metrics, Side, SyncConfig,
    engine::Engine,
    kinds::{self, ObjRef},
    revision::RevisionStore,
};

pub async fn sync(config: Arc<SyncConfig>, client: Client, broker: SyncServiceClient<Channel>, metrics: Arc<Metrics>) {
    let engine = Arc::new(Engine::new(Arc::clone(&config), client.clone(), broker, Arc::clone(&metrics)));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(Arc::clone(&engine).run());
    for kind in config.side.kinds() {
        tasks.spawn(cluster_watch(Arc::clone(&engine), client.clone(), kind));
    }
    tasks.spawn(broker_watch(Arc::clone(&engine), client.clone()));
    if config.side == Side::Tenant && !config.gc_interval.is_zero() {
        tasks.spawn(collect_orphans(Arc::clone(&engine), client));
    }
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "a sync task ended");
        }
    }
}

/// Every change of a kind in the cluster queues its key.
async fn cluster_watch(engine: Arc<Engine>, client: Client, kind: pb::Kind) {
    let ar = kinds::api_resource(kind);
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o) | watcher::Event::InitApply(o)) => {
                engine.enqueue(ObjRef {
                    kind,
                    namespace: o.metadata.namespace.clone().unwrap_or_default(),
                    name: o.metadata.name.clone().unwrap_or_default(),
                });
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(kind = kind.as_str_name(), error = %e, "cluster watch error; it resumes"),
        }
    }
}

/// Follows the broker from the persisted revision; persists progress when the queue is drained.
async fn broker_watch(engine: Arc<Engine>, client: Client) {
    let config = Arc::clone(&engine.config);
    let store = RevisionStore::new(client.clone(), &config.namespace, format!("{}-state", config.lease_name));
    let mut since = loop {
        match store.load().await {
            Ok(r) => break r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the persisted revision; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let kinds: Vec<i32> = config.side.kinds().into_iter().map(|k| k as i32).collect();
    let mut persisted = since;
    let mut caught_up = false;
    let mut backoff = Duration::from_millis(200);
    loop {
        tracing::info!(since_revision = since, "watching the broker");
        let stream =
            engine.broker.clone().watch(pb::WatchRequest { kinds: kinds.clone(), since_revision: since }).await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(e) => {
                tracing::warn!(error = %e.message(), "cannot watch the broker; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        let mut snapshot: Option<Vec<pb::Resource>> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                msg = stream.message() => {
                    let ev = match msg {
                        Ok(Some(ev)) => ev,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e.message(), "broker stream ended; resuming");
                            break;
                        }
                    };
                    let rev = ev.revision;
                    match ev.event {
                        Some(E::Resync(_)) => snapshot = Some(Vec::new()),
                        Some(E::Change(c)) if snapshot.is_some() => {
                            if let (Some(buf), Some(obj)) = (snapshot.as_mut(), c.object) {
                                buf.push(obj);
                            }
                        }
                        Some(E::SnapshotEnd(_)) => {
                            apply_snapshot(&engine, &client, snapshot.take().unwrap_or_default()).await;
                            since = rev;
                            caught_up = true;
                        }
                        Some(E::Change(c)) => {
                            apply_change(&engine, &c);
                            since = since.max(rev);
                        }
                        Some(E::Bookmark(_)) => {
                            since = since.max(rev);
                            caught_up = true;
                        }
                        None => {}
                    }
                    engine.metrics.revision.store(since, Ordering::Relaxed);
                }
                _ = tick.tick() => {}
            }
            let drained = engine.pending() == 0 && engine.metrics.idle.load(Ordering::Acquire);
            if drained && caught_up {
                engine.metrics.ready.store(true, Ordering::Release);
                if since > persisted {
                    crate::failpoint::hit("sync.revision.save.before");
                    match store.save(since).await {
                        Ok(()) => {
                            crate::failpoint::hit("sync.revision.save.after");
                            persisted = since;
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot persist the revision"),
                    }
                }
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

fn apply_change(engine: &Engine, change: &pb::Change) {
    let Some(obj) = change.object.as_ref().and_then(kinds::from_resource) else { return };
    let key = obj.key.clone();
    let complete = engine.cache_complete.load(Ordering::Acquire);
    // A change to an object the cache has no copy of, when the cache is not known complete:
    // what the broker wrote before it is unknown here (e.g. the status, for a syncer that
    // resumed from a persisted revision), so the object is read before it is synced.
    let unseen = || {
        if !complete {
            engine.unseen.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone());
        }
    };
    let mut cache = engine.cache.lock().unwrap_or_else(|p| p.into_inner());
    match pb::ChangeType::try_from(change.r#type) {
        Ok(pb::ChangeType::Deleted) => {
            cache.remove(&key);
            engine.tombstones.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone());
        }
        Ok(pb::ChangeType::Status) => match cache.get_mut(&key) {
            Some(cur) => cur.status = kinds::merge_status(key.kind, &cur.status, &obj.status),
            None => unseen(),
        },
        Ok(pb::ChangeType::Spec) => {
            let mut obj = obj;
            match cache.get(&key) {
                Some(c) if c.uid == obj.uid => obj.status = c.status.clone(),
                Some(_) => {}
                None => unseen(),
            }
            cache.insert(key.clone(), obj);
        }
        _ => {
            cache.insert(key.clone(), obj);
        }
    }
    drop(cache);
    engine.enqueue(key);
}

/// A snapshot replaces the cache; both sides are diffed (objects mirrored here that the broker
/// no longer has are removed).
async fn apply_snapshot(engine: &Engine, client: &Client, objects: Vec<pb::Resource>) {
    let fresh: HashMap<ObjRef, kinds::BrokerObj> =
        objects.iter().filter_map(kinds::from_resource).map(|o| (o.key.clone(), o)).collect();
    tracing::info!(objects = fresh.len(), "broker snapshot");
    let keys: Vec<ObjRef> = fresh.keys().cloned().collect();
    *engine.cache.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
    // A mirror whose object is not in the snapshot is then removed, although no tombstone for
    // it ever arrives (it was deleted while this syncer was away, or before a compaction).
    engine.cache_complete.store(true, Ordering::Release);
    for k in keys {
        engine.enqueue(k);
    }
    for kind in engine.config.side.kinds() {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &kinds::api_resource(kind));
        match api.list(&ListParams::default()).await {
            Ok(list) => {
                for o in list.items {
                    engine.enqueue(ObjRef {
                        kind,
                        namespace: o.metadata.namespace.clone().unwrap_or_default(),
                        name: o.metadata.name.clone().unwrap_or_default(),
                    });
                }
            }
            Err(e) => {
                tracing::warn!(kind = kind.as_str_name(), error = %e, "cannot list for the diff; the watch covers it")
            }
        }
    }
}

/// Deletes Netdevs whose pod is gone (a CNI DEL that never came): after a grace period, and only
/// with the Netdev's uid as a precondition.
async fn collect_orphans(engine: Arc<Engine>, client: Client) {
    let config = Arc::clone(&engine.config);
    let pods: Api<Pod> = Api::all(client);
    let mut tick = tokio::time::interval(config.gc_interval);
    loop {
        tick.tick().await;
        let live: HashSet<(String, String)> = match pods.list(&ListParams::default()).await {
            Ok(l) => l
                .items
                .into_iter()
                .map(|p| (p.metadata.namespace.unwrap_or_default(), p.metadata.name.unwrap_or_default()))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list pods; skipping this collection");
                continue;
            }
        };
        let mut token = String::new();
        loop {
            let page = engine
                .broker
                .clone()
                .list(pb::ListRequest {
                    kind: pb::Kind::Netdev as i32,
                    limit: 500,
                    continue_token: token.clone(),
                    ..Default::default()
                })
                .await;
            let Ok(page) = page.map(|p| p.into_inner()) else { break };
            for res in &page.items {
                let Some(pb::resource::Kind::Netdev(nd)) = &res.kind else { continue };
                let (Some(meta), Some(spec)) = (&nd.metadata, &nd.spec) else { continue };
                let Some(pod) = spec.pod_ref.as_ref().filter(|p| !p.name.is_empty()) else { continue };
                let age = chrono_age(&meta.creation_timestamp);
                if age < config.gc_grace || live.contains(&(pod.namespace.clone(), pod.name.clone())) {
                    continue;
                }
                let key = pb::ObjectKey {
                    kind: pb::Kind::Netdev as i32,
                    namespace: meta.namespace.clone(),
                    name: meta.name.clone(),
                };
                let req = pb::DeleteRequest { key: Some(key), uid: meta.uid.clone(), expected_generation: 0 };
                match engine.broker.clone().delete(req).await {
                    Ok(_) => {
                        tracing::info!(netdev = %meta.name, pod = %format!("{}/{}", pod.namespace, pod.name), "collected a Netdev whose pod is gone");
                        engine.metrics.collected.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(netdev = %meta.name, error = %e.message(), "cannot collect"),
                }
            }
            if page.continue_token.is_empty() {
                break;
            }
            token = page.continue_token;
        }
    }
}

/// Age of an RFC 3339 timestamp (zero when it does not parse).
fn chrono_age(ts: &str) -> Duration {
    ts.parse::<k8s_openapi::jiff::Timestamp>()
        .map(|t| {
            let secs = k8s_openapi::jiff::Timestamp::now().as_second() - t.as_second();
            Duration::from_secs(u64::try_from(secs).unwrap_or(0))
        })
        .unwrap_or_default()
}
