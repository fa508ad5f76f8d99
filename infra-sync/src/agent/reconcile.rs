//! Makes the dataplane match the desired state: creates in dependency order (Vrf → LogicalBridge
//! → Svi → Netdev → FlowPolicy), removes in reverse, retries each failing object on its own
//! backoff (one failing object never blocks the others), and turns every outcome into a status.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};
use xpu_proto::broker::v1 as pb;

use super::{
    report::{Body, StatusBook},
    state::{DesiredObject, DesiredState},
};
use crate::dataplane::{Dataplane, DataplaneError, Desired, FlowTarget, ObjKey, ObjKind, Observed};

const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

struct Applied {
    uid: String,
    generation: i64,
    /// What was last handed to the dataplane (None when the object could not even be built).
    desired: Option<Desired>,
    ok: bool,
    attempts: u32,
    next_retry: Instant,
}

pub struct Reconciler {
    dataplane: Arc<dyn Dataplane>,
    state: Arc<Mutex<DesiredState>>,
    book: Arc<StatusBook>,
    wake: Arc<Notify>,
    applied: HashMap<ObjKey, Applied>,
    flow_interval: Duration,
    /// Orphan removal is due (after a start or a snapshot).
    sweep_orphans: bool,
}

fn spec_of<T: Clone + Default>(s: &Option<T>) -> T {
    s.clone().unwrap_or_default()
}

/// The dataplane's view of one desired object, with the objects it refers to resolved.
fn to_desired(
    key: &ObjKey,
    obj: &DesiredObject,
    all: &BTreeMap<ObjKey, DesiredObject>,
) -> Result<Desired, DataplaneError> {
    use pb::resource::Kind as R;
    let find = |kind: ObjKind, name: &str| all.get(&ObjKey::new(kind, "", name)).and_then(|o| o.resource.kind.clone());
    Ok(match obj.resource.kind.as_ref() {
        Some(R::Vrf(o)) => Desired::Vrf { name: key.name.clone(), spec: spec_of(&o.spec) },
        Some(R::LogicalBridge(o)) => Desired::LogicalBridge { name: key.name.clone(), spec: spec_of(&o.spec) },
        Some(R::Svi(o)) => {
            let spec = spec_of(&o.spec);
            let Some(R::Vrf(vrf)) = find(ObjKind::Vrf, &spec.vrf) else {
                return Err(DataplaneError::retry(format!("vrf {} is not desired on this DPU", spec.vrf)));
            };
            let Some(R::LogicalBridge(lb)) = find(ObjKind::LogicalBridge, &spec.logical_bridge) else {
                return Err(DataplaneError::retry(format!(
                    "logical bridge {} is not desired on this DPU",
                    spec.logical_bridge
                )));
            };
            Desired::Svi { name: key.name.clone(), spec, vrf: spec_of(&vrf.spec), bridge: spec_of(&lb.spec) }
        }
        Some(R::Netdev(o)) => {
            Desired::Netdev { namespace: key.namespace.clone(), name: key.name.clone(), spec: spec_of(&o.spec) }
        }
        Some(R::FlowPolicy(o)) => {
            let spec = spec_of(&o.spec);
            let selector = spec.netdev_selector.clone().unwrap_or_default().match_labels;
            let targets = all
                .iter()
                .filter(|(k, nd)| {
                    k.kind == ObjKind::Netdev
                        && k.namespace == key.namespace
                        && selector.iter().all(|(lk, lv)| nd.labels.get(lk) == Some(lv))
                })
                .filter_map(|(k, nd)| match nd.resource.kind.as_ref() {
                    Some(R::Netdev(n)) => Some(FlowTarget { netdev: k.name.clone(), spec: spec_of(&n.spec) }),
                    _ => None,
                })
                .collect();
            Desired::FlowPolicy { namespace: key.namespace.clone(), name: key.name.clone(), spec, targets }
        }
        Some(R::Dpu(_)) | Some(R::XpuNetwork(_)) | None => {
            return Err(DataplaneError::permanent("not an object a DPU realises"));
        }
    })
}

fn status_of(key: &ObjKey, result: &Result<Observed, DataplaneError>) -> Body {
    match (key.kind, result) {
        (ObjKind::Netdev, Ok(o)) => Body::Netdev(pb::NetdevStatus {
            phase: "Connected".into(),
            ip: o.ip.clone(),
            mac_address: o.mac.clone(),
            oper_status: o.oper_status.clone(),
            components: o.components.clone(),
            bridge_port_name: o.port_name.clone(),
            ..Default::default()
        }),
        (ObjKind::Netdev, Err(e)) => {
            Body::Netdev(pb::NetdevStatus { phase: "Error".into(), message: e.message.clone(), ..Default::default() })
        }
        (_, Ok(o)) => Body::Object(pb::DpuObjectStatus {
            phase: "Programmed".into(),
            oper_status: o.oper_status.clone(),
            components: o.components.clone(),
            rules: o.rules.clone(),
            ..Default::default()
        }),
        (_, Err(e)) => Body::Object(pb::DpuObjectStatus {
            phase: "Error".into(),
            message: e.message.clone(),
            ..Default::default()
        }),
    }
}

impl Reconciler {
    pub fn new(
        dataplane: Arc<dyn Dataplane>,
        state: Arc<Mutex<DesiredState>>,
        book: Arc<StatusBook>,
        wake: Arc<Notify>,
        flow_interval: Duration,
    ) -> Reconciler {
        Reconciler { dataplane, state, book, wake, applied: HashMap::new(), flow_interval, sweep_orphans: true }
    }

    pub async fn run(mut self, orphan_sweeps: Arc<Notify>) {
        let mut flows = tokio::time::interval(self.flow_interval);
        flows.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_retry = self.applied.values().filter(|a| !a.ok).map(|a| a.next_retry).min();
            let retry = async {
                match next_retry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.wake.notified() => {}
                () = orphan_sweeps.notified() => self.sweep_orphans = true,
                () = retry => {}
                _ = flows.tick() => {
                    self.refresh_flows().await;
                    continue;
                }
            }
            self.pass().await;
        }
    }

    /// One reconcile pass over a snapshot of the desired state.
    pub async fn pass(&mut self) {
        let (objects, known, current) = {
            let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            (s.objects.clone(), s.known, s.current)
        };
        if !current {
            // Not caught up with the broker yet: the dataplane stays as it is.
            tracing::debug!("waiting for the broker's current state before touching the dataplane");
            return;
        }
        // Removals first, in reverse dependency order; a uid change is a delete and a create.
        let mut gone: Vec<ObjKey> = self
            .applied
            .iter()
            .filter(|(k, a)| objects.get(*k).is_none_or(|o| o.uid != a.uid))
            .map(|(k, _)| k.clone())
            .collect();
        gone.sort_by_key(|k| std::cmp::Reverse(k.kind));
        for key in gone {
            let last = self.applied.get(&key).and_then(|a| a.desired.clone());
            self.remove(&key, last.as_ref(), !objects.contains_key(&key)).await;
        }
        if self.sweep_orphans && known {
            self.sweep_orphans = false;
            match self.dataplane.owned().await {
                Ok(mut owned) => {
                    owned.retain(|k| !objects.contains_key(k) && !self.applied.contains_key(k));
                    owned.sort_by_key(|k| std::cmp::Reverse(k.kind));
                    for key in owned {
                        tracing::info!(object = %key, "removing an orphan");
                        self.remove(&key, None, false).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list what the dataplane holds; will retry");
                    self.sweep_orphans = true;
                }
            }
        }
        let mut keys: Vec<&ObjKey> = objects.keys().collect();
        keys.sort_by_key(|k| k.kind);
        let now = Instant::now();
        for key in keys {
            let Some(obj) = objects.get(key) else { continue };
            let desired = to_desired(key, obj, &objects);
            let current = self.applied.get(key);
            let due = match (&desired, current) {
                (_, None) => true,
                (Ok(d), Some(a)) => {
                    a.uid != obj.uid
                        || a.generation != obj.generation
                        || a.desired.as_ref() != Some(d)
                        || (!a.ok && now >= a.next_retry)
                }
                (Err(_), Some(a)) => a.ok || now >= a.next_retry,
            };
            if !due {
                continue;
            }
            if key.kind == ObjKind::Netdev && current.is_none_or(|a| a.generation != obj.generation) {
                // Programming may take a while (OPI status is asynchronous): say it started.
                let connecting = pb::NetdevStatus { phase: "Connecting".into(), ..Default::default() };
                self.book.set(key, obj.generation, Body::Netdev(connecting));
            }
            let netdev = key.kind == ObjKind::Netdev;
            if netdev {
                xpu_sync_common::failpoint::hit("netdev.program.before");
            }
            let result = match &desired {
                Ok(d) => self.dataplane.apply(d).await,
                Err(e) => Err(e.clone()),
            };
            if netdev {
                xpu_sync_common::failpoint::hit("netdev.program.after");
            }
            let attempts = current.filter(|a| !a.ok && a.generation == obj.generation).map_or(0, |a| a.attempts) + 1;
            let ok = result.is_ok();
            match &result {
                Ok(_) => tracing::info!(object = %key, generation = obj.generation, "programmed"),
                Err(e) => {
                    tracing::warn!(object = %key, generation = obj.generation, attempts, error = %e, "programming failed")
                }
            }
            let backoff = RETRY_MIN.saturating_mul(1 << attempts.min(8)).min(RETRY_MAX);
            let backoff = if result.as_ref().is_err_and(|e| !e.retryable) { RETRY_MAX } else { backoff };
            self.book.set(key, obj.generation, status_of(key, &result));
            let applied_desired = match desired {
                Ok(d) => Some(d),
                Err(_) => current.and_then(|a| a.desired.clone()),
            };
            self.applied.insert(
                key.clone(),
                Applied {
                    uid: obj.uid.clone(),
                    generation: obj.generation,
                    desired: applied_desired,
                    ok,
                    attempts: if ok { 0 } else { attempts },
                    next_retry: Instant::now() + backoff,
                },
            );
        }
    }

    async fn remove(&mut self, key: &ObjKey, last: Option<&Desired>, ack: bool) {
        let netdev = key.kind == ObjKind::Netdev;
        if netdev {
            xpu_sync_common::failpoint::hit("netdev.remove.before");
        }
        let removed = self.dataplane.remove(key, last).await;
        if netdev {
            xpu_sync_common::failpoint::hit("netdev.remove.after");
        }
        match removed {
            Ok(()) => {
                tracing::info!(object = %key, "removed");
                self.applied.remove(key);
                if ack {
                    self.book.set(key, 0, Body::Removed);
                }
            }
            Err(e) => {
                tracing::warn!(object = %key, error = %e, "removal failed; will retry");
                if let Some(a) = self.applied.get_mut(key) {
                    a.ok = false;
                    a.next_retry = Instant::now() + RETRY_MIN;
                }
            }
        }
    }

    /// Re-reads flow counters (and oper status) of programmed flow policies; changes are reported.
    async fn refresh_flows(&mut self) {
        let flows: Vec<(ObjKey, i64, Desired)> = self
            .applied
            .iter()
            .filter(|(k, a)| k.kind == ObjKind::FlowPolicy && a.ok)
            .filter_map(|(k, a)| Some((k.clone(), a.generation, a.desired.clone()?)))
            .collect();
        for (key, generation, desired) in flows {
            let result = self.dataplane.observe(&desired).await;
            if result.is_ok() {
                self.book.set(&key, generation, status_of(&key, &result));
            }
        }
    }
}
