//! The sync engine: one work queue of object keys fed by the broker's watch and the cluster's
//! watches; each key is reconciled by comparing the two sides.
//!
//! - Objects this cluster authors (no mirror label) are carried up to the broker, with a
//!   finalizer so a delete is final only once the broker has the tombstone; their status comes
//!   back from the broker.
//! - Objects authored elsewhere are mirrored down (spec by server-side apply under one field
//!   manager, labelled as mirrors); a mirror edited by hand is put back, but a manager that keeps
//!   changing it is reported (condition `Synced=False`, reason `ConflictingFieldManager`) instead
//!   of fought in a loop.
//! - `status.syncedGeneration` records which `metadata.generation` is in sync, so a restarted
//!   syncer needs no broker reads for objects that did not change while it was away.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
    core::ObjectMeta,
};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tonic::transport::Channel;
use xpu_proto::broker::v1::{self as pb, sync_service_client::SyncServiceClient};

use super::{
    Metrics, SyncConfig,
    kinds::{self, BrokerObj, ObjRef},
};
use crate::failpoint;

pub const FIELD_MANAGER: &str = "xpu-sync";
pub const FINALIZER: &str = "xpu.opi.dev/broker";
/// Set on objects mirrored down from the broker (they are never carried back up).
pub const MIRROR_LABEL: &str = "xpu.opi.dev/mirror";
/// How often a hand-edited mirror is put back before the edit is reported instead.
const PUT_BACK_LIMIT: usize = 3;
const PUT_BACK_WINDOW: Duration = Duration::from_secs(300);
const API_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Engine {
    pub config: Arc<SyncConfig>,
    pub client: Client,
    pub broker: SyncServiceClient<Channel>,
    /// The broker's objects as last seen (complete after a snapshot; filled lazily otherwise).
    pub cache: Mutex<HashMap<ObjRef, BrokerObj>>,
    /// Set by a snapshot: from then on the cache holds every object the broker has of this
    /// side's kinds (the changes that follow keep it so), and a key it lacks is one the broker
    /// does not have — even without a tombstone, which a snapshot does not carry.
    pub cache_complete: AtomicBool,
    /// Keys the broker has tombstoned since they were cached.
    pub tombstones: Mutex<BTreeSet<ObjRef>>,
    /// Keys the broker changed while the cache held no copy of them and was not complete (the
    /// syncer resumed from a revision: what the broker wrote before it, e.g. an earlier status,
    /// is not in the cache). They are read once from the broker before they are synced.
    pub unseen: Mutex<BTreeSet<ObjRef>>,
    queue: Mutex<BTreeSet<ObjRef>>,
    /// Keys whose sync failed, waiting out the delay before they are queued again.
    backing_off: AtomicUsize,
    wake: Notify,
    put_backs: Mutex<HashMap<ObjRef, Vec<Instant>>>,
    /// Objects the broker refused (e.g. a reference to an object it does not hold yet). Each
    /// time the broker accepts another object they are tried once more: the accepted one may be
    /// what they were missing.
    refused: Mutex<BTreeSet<ObjRef>>,
    /// Refused objects due for that one more try.
    retry: Mutex<BTreeSet<ObjRef>>,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("broker: {0}")]
    Broker(#[from] tonic::Status),
    #[error("timed out talking to the kubernetes API")]
    Timeout,
}

impl SyncError {
    fn kind(&self) -> &'static str {
        match self {
            SyncError::Kube(_) => "kube",
            SyncError::Broker(_) => "broker",
            SyncError::Timeout => "timeout",
        }
    }
}

async fn timed<T>(fut: impl std::future::Future<Output = Result<T, kube::Error>>) -> Result<T, SyncError> {
    match tokio::time::timeout(API_TIMEOUT, fut).await {
        Ok(r) => r.map_err(SyncError::from),
        Err(_) => Err(SyncError::Timeout),
    }
}

fn is_mirror(obj: &DynamicObject) -> bool {
    obj.metadata.labels.as_ref().is_some_and(|l| l.get(MIRROR_LABEL).is_some_and(|v| v == "true"))
}

fn synced_generation(obj: &DynamicObject) -> Option<i64> {
    obj.data.pointer("/status/syncedGeneration").and_then(Value::as_i64)
}

fn condition(status: &str, reason: &str, message: &str, generation: Option<i64>) -> Value {
    let mut c = json!({"type": "Synced", "status": status, "reason": reason, "message": message});
    if let Some(g) = generation {
        c["observedGeneration"] = json!(g);
    }
    c
}

impl Engine {
    pub fn new(
        config: Arc<SyncConfig>,
        client: Client,
        broker: SyncServiceClient<Channel>,
        metrics: Arc<Metrics>,
    ) -> Engine {
        Engine {
            config,
            client,
            broker,
            cache: Mutex::default(),
            cache_complete: AtomicBool::new(false),
            tombstones: Mutex::default(),
            unseen: Mutex::default(),
            queue: Mutex::default(),
            backing_off: AtomicUsize::new(0),
            wake: Notify::new(),
            put_backs: Mutex::default(),
            refused: Mutex::default(),
            retry: Mutex::default(),
            metrics,
        }
    }

    pub fn enqueue(&self, key: ObjRef) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
        self.wake.notify_one();
    }

    /// After `accepted` reached the broker: every other refused object gets one more try.
    fn retry_refused(&self, accepted: &ObjRef) {
        let due: Vec<ObjRef> = {
            let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
            refused.remove(accepted);
            std::mem::take(&mut *refused).into_iter().collect()
        };
        if due.is_empty() {
            return;
        }
        self.retry.lock().unwrap_or_else(|p| p.into_inner()).extend(due.iter().cloned());
        for key in due {
            self.enqueue(key);
        }
    }

    /// Keys waiting to be synced: queued, or waiting to be tried again after a failure. The
    /// revision is saved only when this is zero, so a change whose sync failed is not skipped
    /// by a restart.
    pub fn pending(&self) -> usize {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).len() + self.backing_off.load(Ordering::Acquire)
    }

    fn api(&self, kind: pb::Kind, namespace: &str) -> Api<DynamicObject> {
        let ar = kinds::api_resource(kind);
        if kinds::namespaced(kind) {
            Api::namespaced_with(self.client.clone(), namespace, &ar)
        } else {
            Api::all_with(self.client.clone(), &ar)
        }
    }

    fn own_author(&self) -> String {
        format!("cluster/{}/{}", self.config.cluster, self.config.side.as_str())
    }

    /// Works the queue forever; failing keys are retried after a delay.
    pub async fn run(self: Arc<Self>) {
        loop {
            let next = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                q.pop_first()
            };
            let Some(key) = next else {
                self.metrics.idle.store(true, Ordering::Release);
                self.wake.notified().await;
                continue;
            };
            self.metrics.idle.store(false, Ordering::Release);
            if let Err(e) = self.reconcile(&key).await {
                self.metrics.count_error(e.kind());
                tracing::warn!(object = %key, error = %e, "sync failed; retrying");
                let engine = Arc::clone(&self);
                self.backing_off.fetch_add(1, Ordering::AcqRel);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    // Queued before it stops counting as backing off: never neither.
                    engine.enqueue(key);
                    engine.backing_off.fetch_sub(1, Ordering::AcqRel);
                });
            }
        }
    }

    fn is_unseen(&self, key: &ObjRef) -> bool {
        self.unseen.lock().unwrap_or_else(|p| p.into_inner()).contains(key)
    }

    /// The broker's view of a key: cached, or read once (and always read when it is unseen).
    async fn broker_obj(&self, key: &ObjRef) -> Result<Option<BrokerObj>, SyncError> {
        // Taken off before the read: a change that arrives during it puts the key back, and
        // the next reconcile reads again.
        let unseen = self.unseen.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
        if !unseen && let Some(b) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned() {
            return Ok(Some(b));
        }
        let read = self.broker.clone().get(pb::GetRequest { key: Some(key.to_proto()) }).await;
        let obj = match read {
            Ok(r) => kinds::from_resource(&r.into_inner()),
            Err(s) if s.code() == tonic::Code::NotFound => None,
            Err(s) => {
                if unseen {
                    self.unseen.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone());
                }
                return Err(s.into());
            }
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match &obj {
            Some(o) => {
                cache.insert(key.clone(), o.clone());
            }
            None => {
                cache.remove(key);
            }
        }
        Ok(obj)
    }

    async fn reconcile(&self, key: &ObjRef) -> Result<(), SyncError> {
        let api = self.api(key.kind, &key.namespace);
        let current = timed(api.get_opt(&key.name)).await?;
        let side = self.config.side;
        match current {
            Some(obj) if !is_mirror(&obj) => {
                if side.up().contains(&key.kind) {
                    self.carry_up(key, &api, obj).await
                } else {
                    Ok(())
                }
            }
            Some(obj) => {
                let cached = self.cache.lock().unwrap_or_else(|p| p.into_inner()).contains_key(key);
                let tombstoned = self.tombstones.lock().unwrap_or_else(|p| p.into_inner()).contains(key);
                let complete = self.cache_complete.load(Ordering::Acquire);
                let unseen = self.is_unseen(key);
                if !cached && !tombstoned && !complete && !unseen && synced_generation(&obj) == obj.metadata.generation
                {
                    // As we left it, and no broker change since: nothing to read or write.
                    return Ok(());
                }
                let b = self.broker_obj(key).await?;
                match b {
                    Some(b) if side.down().contains(&key.kind) => self.mirror(key, &api, Some(obj), &b).await,
                    _ => {
                        tracing::info!(object = %key, "removing a mirror of an object the broker no longer has");
                        failpoint::hit_for("sync.mirror.remove.before", kinds::kind_name(key.kind));
                        let _ = timed(api.delete(&key.name, &DeleteParams::default())).await?;
                        failpoint::hit_for("sync.mirror.remove.after", kinds::kind_name(key.kind));
                        Ok(())
                    }
                }
            }
            None => {
                let cached = if self.is_unseen(key) {
                    self.broker_obj(key).await?
                } else {
                    self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
                };
                let Some(b) = cached else { return Ok(()) };
                if b.spec_author == self.own_author() {
                    // Authored here, gone here without our finalizer running: the cluster is
                    // this object's origin, so the broker follows.
                    tracing::info!(object = %key, "deleted in the cluster; deleting in the broker");
                    self.broker
                        .clone()
                        .delete(pb::DeleteRequest {
                            key: Some(key.to_proto()),
                            uid: b.uid.clone(),
                            expected_generation: 0,
                        })
                        .await?;
                    self.cache.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
                    Ok(())
                } else if side.down().contains(&key.kind) {
                    self.mirror(key, &api, None, &b).await
                } else {
                    Ok(())
                }
            }
        }
    }

    async fn set_finalizers(
        &self,
        api: &Api<DynamicObject>,
        obj: &DynamicObject,
        finalizers: Vec<String>,
    ) -> Result<(), SyncError> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        // A replace carries the resourceVersion: it never drops someone else's concurrent change
        // (a conflict is retried with a fresh read).
        let mut updated = obj.clone();
        updated.metadata.finalizers = Some(finalizers);
        timed(api.replace(&name, &PostParams::default(), &updated)).await?;
        Ok(())
    }

    async fn patch_status(&self, api: &Api<DynamicObject>, key: &ObjRef, status: Value) -> Result<(), SyncError> {
        let ar = kinds::api_resource(key.kind);
        let body = json!({"apiVersion": ar.api_version, "kind": ar.kind, "status": status});
        timed(api.patch_status(&key.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(body))).await?;
        Ok(())
    }

    /// An object authored in this cluster: to the broker, and its status back.
    async fn carry_up(&self, key: &ObjRef, api: &Api<DynamicObject>, obj: DynamicObject) -> Result<(), SyncError> {
        let mut finalizers = obj.metadata.finalizers.clone().unwrap_or_default();
        if obj.metadata.deletion_timestamp.is_some() {
            if !finalizers.iter().any(|f| f == FINALIZER) {
                return Ok(());
            }
            // Final only once the broker holds the tombstone.
            failpoint::hit_for("sync.carry.delete.before", kinds::kind_name(key.kind));
            let resp = self
                .broker
                .clone()
                .delete(pb::DeleteRequest { key: Some(key.to_proto()), uid: String::new(), expected_generation: 0 })
                .await?
                .into_inner();
            tracing::info!(object = %key, tombstone = resp.revision, existed = resp.existed, "deleted in the broker");
            failpoint::hit_for("sync.carry.delete.after", kinds::kind_name(key.kind));
            self.cache.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
            finalizers.retain(|f| f != FINALIZER);
            return self.set_finalizers(api, &obj, finalizers).await;
        }
        if !finalizers.iter().any(|f| f == FINALIZER) {
            finalizers.push(FINALIZER.into());
            return self.set_finalizers(api, &obj, finalizers).await;
        }
        let generation = obj.metadata.generation;
        let b = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned();
        let retrying = self.retry.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
        let in_sync = !retrying
            && synced_generation(&obj) == generation
            && b.as_ref().is_none_or(|b| b.spec_author == self.own_author());
        if !in_sync {
            let res = match kinds::to_resource(key.kind, &obj, &[]) {
                Ok(r) => r,
                Err(e) => {
                    return self
                        .patch_status(api, key, json!({"conditions": [condition("False", "Invalid", &e, generation)]}))
                        .await;
                }
            };
            failpoint::hit_for("sync.carry.apply.before", kinds::kind_name(key.kind));
            match self.broker.clone().apply(pb::ApplyRequest { object: Some(res), expected_generation: 0 }).await {
                Ok(resp) => {
                    failpoint::hit_for("sync.carry.apply.after", kinds::kind_name(key.kind));
                    let applied = resp.into_inner().object.as_ref().and_then(kinds::from_resource);
                    if let Some(mut a) = applied {
                        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                        match cache.get(key) {
                            Some(prev) => a.status = prev.status.clone(),
                            // The answer carries no status: one written before is read back.
                            None if !self.cache_complete.load(Ordering::Acquire) => {
                                self.unseen.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone());
                            }
                            None => {}
                        }
                        cache.insert(key.clone(), a);
                    }
                    self.metrics.carried_up.fetch_add(1, Ordering::Relaxed);
                    self.retry_refused(key);
                }
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::InvalidArgument
                            | tonic::Code::PermissionDenied
                            | tonic::Code::AlreadyExists
                            | tonic::Code::FailedPrecondition
                    ) =>
                {
                    // The broker refused it for what it is: say so, and wait for the next edit.
                    tracing::warn!(object = %key, error = %s.message(), "the broker refused the object");
                    self.refused.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone());
                    let cond = condition("False", "Refused", s.message(), generation);
                    return self
                        .patch_status(api, key, json!({"syncedGeneration": generation, "conditions": [cond]}))
                        .await;
                }
                Err(s) => return Err(s.into()),
            }
        }
        let cached = self.cache.lock().unwrap_or_else(|p| p.into_inner()).contains_key(key);
        if in_sync && !cached && !self.is_unseen(key) {
            // Unchanged on both sides since the last sync: status changes arrive as events.
            return Ok(());
        }
        let b = self.broker_obj(key).await?;
        let mut status = b.map(|b| b.status).unwrap_or_else(|| json!({}));
        status["syncedGeneration"] = json!(generation);
        push_synced(&mut status, generation);
        if obj.data.get("status") == Some(&status) {
            return Ok(());
        }
        failpoint::hit_for("sync.carry.status.before", kinds::kind_name(key.kind));
        self.patch_status(api, key, status).await?;
        failpoint::hit_for("sync.carry.status.after", kinds::kind_name(key.kind));
        Ok(())
    }

    /// An object authored elsewhere: the broker's copy is the truth.
    async fn mirror(
        &self,
        key: &ObjRef,
        api: &Api<DynamicObject>,
        current: Option<DynamicObject>,
        b: &BrokerObj,
    ) -> Result<(), SyncError> {
        let Some(spec) = b.spec.clone() else { return Ok(()) };
        let mut labels = b.labels.clone();
        labels.insert(MIRROR_LABEL.into(), "true".into());
        let spec_matches = current.as_ref().is_some_and(|c| {
            c.data.get("spec") == Some(&spec)
                && c.metadata.labels.as_ref().is_some_and(|l| {
                    l.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<std::collections::BTreeMap<_, _>>()
                        == labels
                })
        });
        let mut generation = current.as_ref().and_then(|c| c.metadata.generation);
        if !spec_matches {
            if let Some(c) = &current {
                // Edited in the cluster since our last apply (not a broker change): put back,
                // unless it keeps happening.
                if synced_generation(c) != c.metadata.generation {
                    if self.too_many_put_backs(key) {
                        let reported =
                            c.data.pointer("/status/conditions").and_then(Value::as_array).is_some_and(|cs| {
                                cs.iter()
                                    .any(|x| x.get("reason").and_then(Value::as_str) == Some("ConflictingFieldManager"))
                            });
                        if reported {
                            return Ok(());
                        }
                        let managers = managers(c);
                        let msg = format!("spec changed by {managers} again and again; the broker owns this object");
                        tracing::warn!(object = %key, managers = %managers, "conflicting field manager; not fighting it");
                        self.metrics.conflicts.fetch_add(1, Ordering::Relaxed);
                        let mut status = b.status.clone();
                        push_condition(
                            &mut status,
                            condition("False", "ConflictingFieldManager", &msg, c.metadata.generation),
                        );
                        status["syncedGeneration"] = json!(synced_generation(c));
                        return self.patch_status(api, key, status).await;
                    }
                    tracing::info!(object = %key, "mirror edited in the cluster; putting the broker's spec back");
                }
            } else if kinds::namespaced(key.kind) {
                self.ensure_namespace(&key.namespace).await?;
            }
            let ar = kinds::api_resource(key.kind);
            let meta = ObjectMeta {
                name: Some(key.name.clone()),
                namespace: (!key.namespace.is_empty()).then(|| key.namespace.clone()),
                labels: Some(labels.into_iter().collect()),
                ..Default::default()
            };
            let body = json!({"apiVersion": ar.api_version, "kind": ar.kind, "metadata": meta, "spec": spec});
            failpoint::hit_for("sync.mirror.apply.before", kinds::kind_name(key.kind));
            let applied =
                timed(api.patch(&key.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(body))).await?;
            failpoint::hit_for("sync.mirror.apply.after", kinds::kind_name(key.kind));
            generation = applied.metadata.generation;
            self.metrics.mirrored.fetch_add(1, Ordering::Relaxed);
        }
        let mut status = b.status.clone();
        status["syncedGeneration"] = json!(generation);
        push_synced(&mut status, generation);
        if current.as_ref().is_some_and(|c| spec_matches && c.data.get("status") == Some(&status)) {
            return Ok(());
        }
        failpoint::hit_for("sync.mirror.status.before", kinds::kind_name(key.kind));
        self.patch_status(api, key, status).await?;
        failpoint::hit_for("sync.mirror.status.after", kinds::kind_name(key.kind));
        Ok(())
    }

    fn too_many_put_backs(&self, key: &ObjRef) -> bool {
        let mut pb = self.put_backs.lock().unwrap_or_else(|p| p.into_inner());
        let list = pb.entry(key.clone()).or_default();
        let now = Instant::now();
        list.retain(|t| now.duration_since(*t) < PUT_BACK_WINDOW);
        if list.len() >= PUT_BACK_LIMIT {
            return true;
        }
        list.push(now);
        false
    }

    async fn ensure_namespace(&self, ns: &str) -> Result<(), SyncError> {
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
        if timed(api.get_opt(ns)).await?.is_some() {
            return Ok(());
        }
        let namespace = k8s_openapi::api::core::v1::Namespace {
            metadata: ObjectMeta {
                name: Some(ns.to_string()),
                labels: Some([("app.kubernetes.io/managed-by".to_string(), "xpu-sync".to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        match timed(api.create(&PostParams::default(), &namespace)).await {
            Ok(_) => Ok(()),
            Err(SyncError::Kube(kube::Error::Api(e))) if e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn push_synced(status: &mut Value, generation: Option<i64>) {
    push_condition(status, condition("True", "Synced", "in sync with the broker", generation));
}

fn push_condition(status: &mut Value, cond: Value) {
    let mut conds: Vec<Value> = status.get("conditions").and_then(Value::as_array).cloned().unwrap_or_default();
    conds.retain(|c| c.get("type") != cond.get("type"));
    conds.push(cond);
    status["conditions"] = Value::Array(conds);
}

/// Field managers other than ours that own part of the object.
fn managers(obj: &DynamicObject) -> String {
    let names: Vec<String> = obj
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .filter(|m| m != FIELD_MANAGER)
        .collect();
    if names.is_empty() { "another writer".into() } else { names.join(", ") }
}
