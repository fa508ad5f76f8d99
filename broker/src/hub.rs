//! The fan-out: one dispatcher delivers every committed change, in revision order, to the
//! streams that want it.
//!
//! Streams are indexed by DPU serial, by kind and by object key, so delivering a change costs in
//! proportion to the streams interested in it (a Netdev reaches only its DPU's streams). Each
//! stream has a bounded queue; a stream whose queue is full is cut off (it resumes from its last
//! revision) instead of slowing the dispatcher and everyone behind it.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;

use crate::{
    model::{
        Key, Kind, Labels, Route,
        event::{ChangeKind, Event},
    },
    store::{Committed, LogFilter, Store},
};

#[derive(Clone, Debug)]
pub enum Filter {
    /// A DPU's desired-state stream.
    Dpu {
        serial: String,
        labels: Labels,
    },
    Kinds(HashSet<Kind>),
    Key(Key),
}

#[derive(Debug)]
pub enum Item {
    Event(Arc<Event>),
    /// Every change up to this revision has been offered to the stream.
    Bookmark(i64),
}

#[derive(Default)]
struct SubState {
    lagged: AtomicBool,
    /// Last revision enqueued (event or bookmark).
    last: AtomicI64,
}

#[derive(Clone)]
struct Sub {
    tx: mpsc::Sender<Item>,
    state: Arc<SubState>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    filters: HashMap<u64, (Filter, Sub)>,
    by_dpu: HashMap<String, HashMap<u64, (Labels, Sub)>>,
    by_kind: HashMap<Kind, HashMap<u64, Sub>>,
    by_key: HashMap<Key, HashMap<u64, Sub>>,
}

impl Registry {
    fn remove(&mut self, id: u64) {
        let Some((filter, _)) = self.filters.remove(&id) else {
            return;
        };
        match filter {
            Filter::Dpu { serial, .. } => {
                if let Some(m) = self.by_dpu.get_mut(&serial) {
                    m.remove(&id);
                    if m.is_empty() {
                        self.by_dpu.remove(&serial);
                    }
                }
            }
            Filter::Kinds(kinds) => {
                for k in kinds {
                    if let Some(m) = self.by_kind.get_mut(&k) {
                        m.remove(&id);
                    }
                }
            }
            Filter::Key(key) => {
                if let Some(m) = self.by_key.get_mut(&key) {
                    m.remove(&id);
                    if m.is_empty() {
                        self.by_key.remove(&key);
                    }
                }
            }
        }
    }
}

/// What kind of client holds a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamClass {
    Agent,
    Cluster,
    Admin,
}

impl StreamClass {
    pub const ALL: [StreamClass; 3] = [StreamClass::Agent, StreamClass::Cluster, StreamClass::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            StreamClass::Agent => "agent",
            StreamClass::Cluster => "cluster",
            StreamClass::Admin => "admin",
        }
    }
}

/// One open watch stream as the status API shows it.
#[derive(Clone, Debug)]
pub struct StreamInfo {
    pub identity: String,
    pub class: StreamClass,
    pub connected_since: chrono::DateTime<chrono::Utc>,
    /// The revision the client asked to resume from (0: it started from a snapshot).
    pub resumed_from: i64,
    /// The last revision sent to the client.
    pub delivered: i64,
}

struct Tracked {
    identity: String,
    class: StreamClass,
    connected_since: chrono::DateTime<chrono::Utc>,
    resumed_from: i64,
    delivered: Arc<AtomicI64>,
}

/// A stream's entry in the list of open streams; removed on drop.
pub struct StreamTracker {
    id: u64,
    delivered: Arc<AtomicI64>,
    hub: Arc<Hub>,
}

impl StreamTracker {
    pub fn delivered(&self, revision: i64) {
        self.delivered.fetch_max(revision, Ordering::Relaxed);
    }
}

impl Drop for StreamTracker {
    fn drop(&mut self) {
        if let Ok(mut t) = self.hub.tracked.lock() {
            t.remove(&self.id);
        }
    }
}

pub struct Hub {
    registry: Mutex<Registry>,
    tracked: Mutex<HashMap<u64, Tracked>>,
    next_tracked: AtomicU64,
    /// Last revision dispatched.
    head: AtomicI64,
    queue_capacity: usize,
    lagged_total: AtomicU64,
    closed: AtomicBool,
}

/// A stream's end of the fan-out; unregisters on drop.
pub struct Subscription {
    id: u64,
    rx: mpsc::Receiver<Item>,
    state: Arc<SubState>,
    hub: Arc<Hub>,
}

impl Subscription {
    pub async fn recv(&mut self) -> Option<Item> {
        self.rx.recv().await
    }

    /// The queue overflowed and the hub dropped this stream.
    pub fn lagged(&self) -> bool {
        self.state.lagged.load(Ordering::Acquire)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Ok(mut reg) = self.hub.registry.lock() {
            reg.remove(self.id);
        }
    }
}

enum Offer {
    Sent,
    Dropped,
}

fn offer(sub: &Sub, item: Item, revision: i64) -> Offer {
    match sub.tx.try_send(item) {
        Ok(()) => {
            sub.state.last.store(revision, Ordering::Release);
            Offer::Sent
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            sub.state.lagged.store(true, Ordering::Release);
            Offer::Dropped
        }
        Err(mpsc::error::TrySendError::Closed(_)) => Offer::Dropped,
    }
}

impl Hub {
    pub fn new(head: i64, queue_capacity: usize) -> Arc<Hub> {
        Arc::new(Hub {
            registry: Mutex::new(Registry::default()),
            tracked: Mutex::new(HashMap::new()),
            next_tracked: AtomicU64::new(0),
            head: AtomicI64::new(head),
            queue_capacity,
            lagged_total: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        })
    }

    pub fn head(&self) -> i64 {
        self.head.load(Ordering::Acquire)
    }

    pub fn stream_count(&self) -> usize {
        self.registry.lock().map(|r| r.filters.len()).unwrap_or(0)
    }

    /// Lists a client's stream among the open streams until the tracker is dropped.
    pub fn track(self: &Arc<Self>, identity: String, class: StreamClass, resumed_from: i64) -> StreamTracker {
        let id = self.next_tracked.fetch_add(1, Ordering::Relaxed);
        let delivered = Arc::new(AtomicI64::new(resumed_from));
        let entry = Tracked {
            identity,
            class,
            connected_since: chrono::Utc::now(),
            resumed_from,
            delivered: Arc::clone(&delivered),
        };
        self.tracked.lock().unwrap_or_else(|p| p.into_inner()).insert(id, entry);
        StreamTracker { id, delivered, hub: Arc::clone(self) }
    }

    /// The open streams of this process, oldest first.
    pub fn streams(&self) -> Vec<StreamInfo> {
        let t = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<StreamInfo> = t
            .values()
            .map(|s| StreamInfo {
                identity: s.identity.clone(),
                class: s.class,
                connected_since: s.connected_since,
                resumed_from: s.resumed_from,
                delivered: s.delivered.load(Ordering::Relaxed),
            })
            .collect();
        out.sort_by(|a, b| a.connected_since.cmp(&b.connected_since).then_with(|| a.identity.cmp(&b.identity)));
        out
    }

    pub fn lagged_total(&self) -> u64 {
        self.lagged_total.load(Ordering::Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Ends every stream (the process is stopping); new subscriptions end at once.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let mut reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        *reg = Registry { next_id: reg.next_id, ..Registry::default() };
    }

    /// Registers a stream. Register before reading the log: changes committed from now on
    /// arrive here, older ones are in the log (a change may come both ways; skip by revision).
    pub fn subscribe(self: &Arc<Self>, filter: Filter) -> Subscription {
        let (tx, rx) = mpsc::channel(self.queue_capacity);
        let state = Arc::new(SubState::default());
        state.last.store(self.head(), Ordering::Release);
        let sub = Sub { tx, state: Arc::clone(&state) };
        let mut reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let id = reg.next_id;
        reg.next_id += 1;
        if self.is_closed() {
            // The sender is dropped with `sub`: the stream ends at its first receive.
            drop(reg);
            return Subscription { id, rx, state, hub: Arc::clone(self) };
        }
        match &filter {
            Filter::Dpu { serial, labels } => {
                reg.by_dpu.entry(serial.clone()).or_default().insert(id, (labels.clone(), sub.clone()));
            }
            Filter::Kinds(kinds) => {
                for k in kinds {
                    reg.by_kind.entry(*k).or_default().insert(id, sub.clone());
                }
            }
            Filter::Key(key) => {
                reg.by_key.entry(key.clone()).or_default().insert(id, sub.clone());
            }
        }
        reg.filters.insert(id, (filter, sub));
        drop(reg);
        Subscription { id, rx, state, hub: Arc::clone(self) }
    }

    /// Delivers changes (in revision order, none at or below the dispatched head).
    fn dispatch(&self, events: &[Arc<Event>]) {
        let mut reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let mut dropped: Vec<u64> = Vec::new();
        for ev in events {
            let rev = ev.revision;
            crate::metrics::observe_event(ev);
            if let Some(subs) = reg.by_kind.get(&ev.key.kind) {
                for (id, sub) in subs {
                    if let Offer::Dropped = offer(sub, Item::Event(Arc::clone(ev)), rev) {
                        dropped.push(*id);
                    }
                }
            }
            if let Some(subs) = reg.by_key.get(&ev.key) {
                for (id, sub) in subs {
                    if let Offer::Dropped = offer(sub, Item::Event(Arc::clone(ev)), rev) {
                        dropped.push(*id);
                    }
                }
            }
            if ev.change != ChangeKind::Status {
                match (&ev.route, ev.key.kind) {
                    (Route::Dpu(serial), _) => {
                        if let Some(subs) = reg.by_dpu.get(serial) {
                            for (id, (_, sub)) in subs {
                                if let Offer::Dropped = offer(sub, Item::Event(Arc::clone(ev)), rev) {
                                    dropped.push(*id);
                                }
                            }
                        }
                    }
                    (Route::Selector(_), _) => {
                        for subs in reg.by_dpu.values() {
                            for (id, (labels, sub)) in subs {
                                let reaches = ev.route.reaches("", labels)
                                    || ev.prev_route.as_ref().is_some_and(|p| p.reaches("", labels));
                                if reaches && let Offer::Dropped = offer(sub, Item::Event(Arc::clone(ev)), rev) {
                                    dropped.push(*id);
                                }
                            }
                        }
                    }
                    (Route::None, Kind::Dpu) => {
                        // A DPU's own record changed (labels decide what it is sent).
                        if let Some(subs) = reg.by_dpu.get_mut(&ev.key.name) {
                            for (id, (labels, sub)) in subs.iter_mut() {
                                *labels = ev.labels.clone();
                                if let Offer::Dropped = offer(sub, Item::Event(Arc::clone(ev)), rev) {
                                    dropped.push(*id);
                                }
                            }
                        }
                    }
                    (Route::None, _) => {}
                }
            }
            self.head.store(rev, Ordering::Release);
        }
        for id in dropped {
            self.lagged_total.fetch_add(1, Ordering::Relaxed);
            reg.remove(id);
        }
    }

    /// Tells every stream that has not heard of `head` yet that it is current up to it.
    fn bookmark(&self, head: i64) {
        let mut reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let mut dropped = Vec::new();
        for (id, (_, sub)) in &reg.filters {
            if sub.state.last.load(Ordering::Acquire) < head
                && let Offer::Dropped = offer(sub, Item::Bookmark(head), head)
            {
                dropped.push(*id);
            }
        }
        for id in dropped {
            self.lagged_total.fetch_add(1, Ordering::Relaxed);
            reg.remove(id);
        }
    }

    /// Drops every stream (they resume from their revisions), e.g. when the log the dispatcher
    /// needs has been compacted away.
    fn drop_all(&self) {
        let mut reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        for (_, (_, sub)) in reg.filters.iter() {
            sub.state.lagged.store(true, Ordering::Release);
        }
        *reg = Registry { next_id: reg.next_id, ..Registry::default() };
    }
}

/// Signals from other broker replicas (or a lost LISTEN connection) that the log may hold
/// changes this process has not dispatched: `Some(revision)`, or `None` when unknown.
pub type Wakeup = Option<i64>;

/// Feeds the hub in revision order with no gaps: local commits arrive directly; anything
/// committed by other replicas is read from the log first.
pub async fn run_dispatcher(
    hub: Arc<Hub>,
    store: Store,
    mut committed: mpsc::Receiver<Committed>,
    mut wakeups: mpsc::Receiver<Wakeup>,
    bookmark_interval: Duration,
) {
    let mut tick = tokio::time::interval(bookmark_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut want: i64 = hub.head();
    loop {
        tokio::select! {
            c = committed.recv() => {
                let Some(c) = c else { break };
                let Some(first) = c.events.first().map(|e| e.revision) else { continue };
                if first > hub.head() + 1 {
                    want = want.max(first - 1);
                    catch_up(&hub, &store, want).await;
                }
                if first == hub.head() + 1 {
                    hub.dispatch(&c.events);
                } else {
                    let newer: Vec<Arc<Event>> = c.events.iter().filter(|e| e.revision > hub.head()).cloned().collect();
                    if newer.first().is_some_and(|e| e.revision == hub.head() + 1) {
                        hub.dispatch(&newer);
                    }
                }
                want = want.max(c.head);
            }
            w = wakeups.recv() => {
                match w {
                    Some(Some(rev)) => want = want.max(rev),
                    Some(None) => {
                        if let Ok((rev, _)) = store.head().await {
                            want = want.max(rev);
                        }
                    }
                    None => {}
                }
                if want > hub.head() {
                    catch_up(&hub, &store, want).await;
                }
            }
            _ = tick.tick() => {
                if want > hub.head() {
                    catch_up(&hub, &store, want).await;
                }
                hub.bookmark(hub.head());
            }
        }
    }
    tracing::debug!("dispatcher stopped");
}

/// Dispatches log entries up to `target` read from the store.
async fn catch_up(hub: &Hub, store: &Store, target: i64) {
    const PAGE: usize = 1000;
    while hub.head() < target {
        match store.read_log(hub.head(), PAGE, &LogFilter::All).await {
            Ok((events, compacted)) => {
                if compacted > hub.head() {
                    tracing::warn!(head = hub.head(), compacted, "log compacted past the dispatcher; streams resume");
                    hub.drop_all();
                    hub.head.store(compacted.max(target), Ordering::Release);
                    return;
                }
                if events.is_empty() {
                    return;
                }
                let events: Vec<Arc<Event>> =
                    events.into_iter().filter(|e| e.revision <= target).map(Arc::new).collect();
                if events.is_empty() {
                    return;
                }
                hub.dispatch(&events);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the log; will retry");
                return;
            }
        }
    }
}
