//! In-memory objects, the global resourceVersion counter and the bounded event history.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::resource::{GroupResource, Registry};

/// The type of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One committed change (an etcd revision).
#[derive(Debug, Clone)]
pub struct Event {
    pub rv: u64,
    pub gr: GroupResource,
    /// `""` for cluster-scoped objects.
    pub namespace: String,
    pub event_type: EventType,
    /// The object after the change (for deletions: its last state, with the deletion's resourceVersion).
    pub object: Value,
    /// The object before the change (for `MODIFIED`), used to turn selector transitions into ADDED/DELETED.
    pub prev: Option<Value>,
}

/// `(namespace, name)`; namespace `""` for cluster-scoped objects.
pub type ObjKey = (String, String);

/// Everything the server holds, behind one lock.
#[derive(Debug)]
pub struct State {
    /// The last resourceVersion handed out.
    pub rv: u64,
    pub registry: Registry,
    pub objects: HashMap<GroupResource, BTreeMap<ObjKey, Value>>,
    history: VecDeque<Arc<Event>>,
    history_cap: usize,
    /// Every event with `rv <= compacted_rv` has been dropped from the history.
    compacted_rv: u64,
    tx: broadcast::Sender<Arc<Event>>,
}

/// Shared handle on the [`State`].
#[derive(Debug, Clone)]
pub struct Store(Arc<Mutex<State>>);

impl Store {
    pub fn new(history_cap: usize) -> Self {
        let (tx, _) = broadcast::channel(history_cap.clamp(1024, 65_536));
        Self(Arc::new(Mutex::new(State {
            rv: 0,
            registry: Registry::with_builtins(),
            objects: HashMap::new(),
            history: VecDeque::new(),
            history_cap: history_cap.max(1),
            compacted_rv: 0,
            tx,
        })))
    }

    /// Lock the state (a panic while locked cannot leave it half-written in a way we care about).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub fn name_of(v: &Value) -> &str {
    v.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default()
}

pub fn namespace_of(v: &Value) -> &str {
    v.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default()
}

pub fn rv_of(v: &Value) -> Option<&str> {
    v.pointer("/metadata/resourceVersion").and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// Set `metadata.<key>` (creating `metadata` if needed).
pub fn set_meta(v: &mut Value, key: &str, value: Value) {
    if !v.get("metadata").is_some_and(Value::is_object) {
        v["metadata"] = json!({});
    }
    v["metadata"][key] = value;
}

impl State {
    pub fn get(&self, gr: &GroupResource, namespace: &str, name: &str) -> Option<&Value> {
        self.objects.get(gr)?.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// Snapshot of the objects of a group/resource, optionally of one namespace, in key order.
    pub fn list(&self, gr: &GroupResource, namespace: Option<&str>) -> Vec<&Value> {
        self.objects
            .get(gr)
            .map(|m| m.iter().filter(|((ns, _), _)| namespace.is_none_or(|n| n == ns)).map(|(_, v)| v).collect())
            .unwrap_or_default()
    }

    /// Hand out the next resourceVersion.
    pub fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    pub fn compacted_rv(&self) -> u64 {
        self.compacted_rv
    }

    /// Store `object` (whose `metadata.resourceVersion` is already `rv`) and publish the event.
    pub fn commit(&mut self, rv: u64, gr: &GroupResource, event_type: EventType, object: Value, prev: Option<Value>) {
        let key = (namespace_of(&object).to_owned(), name_of(&object).to_owned());
        let objects = self.objects.entry(gr.clone()).or_default();
        if event_type == EventType::Deleted {
            objects.remove(&key);
        } else {
            objects.insert(key.clone(), object.clone());
        }
        let event = Arc::new(Event { rv, gr: gr.clone(), namespace: key.0, event_type, object, prev });
        self.history.push_back(event.clone());
        while self.history.len() > self.history_cap {
            if let Some(old) = self.history.pop_front() {
                self.compacted_rv = old.rv;
            }
        }
        // No receivers is fine.
        let _ = self.tx.send(event);
    }

    /// Events newer than `rv`, or `None` if some of them have been compacted away.
    pub fn events_since(&self, rv: u64) -> Option<Vec<Arc<Event>>> {
        if rv < self.compacted_rv {
            return None;
        }
        let start = self.history.partition_point(|e| e.rv <= rv);
        Some(self.history.range(start..).cloned().collect())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    /// Drop the whole event history: any watch from an older resourceVersion then gets `410 Expired`.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted_rv = self.rv;
    }
}
