//! One group commit: many write requests applied in order to an in-memory working set loaded
//! from the database inside the transaction, then flushed with a handful of bulk statements.
//!
//! This module holds the store's semantics (generations, stale-status refusal, tombstones,
//! references, IPAM, leases) and speaks no SQL: the backend behind [`WriteTx`] does. Requests in
//! one batch see each other's effects exactly as if they had been committed one by one, and a
//! request that fails leaves the working set as it found it.

mod dpu;
mod netdev;
mod speculative;

pub(crate) use self::speculative::{Ahead, Speculative};

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::IpAddr,
    sync::Arc,
};

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use self::netdev::PoolState;
use super::rows::*;
use crate::{
    error::{Error, Result},
    model::{
        Key, Kind, Labels, Route, dpu_author,
        event::{ChangeKind, Event},
        object::Spec,
        validate,
    },
};

/// Reads and writes of one transaction. Every method runs inside it; nothing is visible to
/// others until `commit`.
pub(crate) trait WriteTx: Send {
    /// Locks the revision counter (serializing all writers, across replicas) and returns it.
    fn lock_head(&mut self) -> impl Future<Output = Result<i64>> + Send;
    /// The compaction horizon `lock_head` saw, when it read one. Compactions delete tombstones
    /// without moving the head: what a writer kept from its last commit holds only while both
    /// are unchanged.
    fn compacted_seen(&self) -> Option<i64> {
        None
    }
    fn load_objects(&mut self, keys: Vec<Key>) -> impl Future<Output = Result<Vec<ObjectRow>>> + Send;
    fn load_statuses(&mut self, pairs: Vec<(Key, String)>) -> impl Future<Output = Result<Vec<StatusRow>>> + Send;
    /// Namespace of the live Netdev carrying each name, if any.
    fn live_netdev_namespaces(
        &mut self,
        names: Vec<String>,
    ) -> impl Future<Output = Result<Vec<(String, String)>>> + Send;
    fn load_dpus(&mut self, serials: Vec<String>) -> impl Future<Output = Result<Vec<DpuRow>>> + Send;
    /// At most `limit` ready DPUs whose lease lapsed by `now`, the longest lapsed first.
    fn lapsed_dpus(&mut self, now: DateTime<Utc>, limit: usize) -> impl Future<Output = Result<Vec<String>>> + Send;
    fn live_netdevs_on_dpu(&mut self, serial: String) -> impl Future<Output = Result<Vec<Key>>> + Send;
    fn count_allocations(&mut self, network: String) -> impl Future<Output = Result<i64>> + Send;
    /// `(namespace, name, network, address)` of the allocations held by these Netdevs.
    fn allocations_of(
        &mut self,
        netdevs: Vec<(String, String)>,
    ) -> impl Future<Output = Result<Vec<(String, String, String, String)>>> + Send;
    fn pool_offset(&mut self, network: String) -> impl Future<Output = Result<Option<u128>>> + Send;
    /// Which of `addresses` are allocated in `network`, and to whom.
    fn taken(
        &mut self,
        network: String,
        addresses: Vec<String>,
    ) -> impl Future<Output = Result<HashMap<String, (String, String)>>> + Send;
    /// The highest status sequence number stored for each of `authors` (0 for none), in one
    /// round trip.
    fn max_status_seqs(&mut self, authors: Vec<String>) -> impl Future<Output = Result<HashMap<String, i64>>> + Send;
    fn flush(&mut self, flush: &Flush) -> impl Future<Output = Result<Compacted>> + Send;
    fn commit(self) -> impl Future<Output = Result<()>> + Send;
}

#[derive(Debug)]
pub(crate) enum Request {
    Apply(ApplyRequest),
    Delete(DeleteRequest),
    Status { serial: String, writes: Vec<StatusWrite> },
    Register(RegisterRequest),
    Heartbeat { serial: String, applied_revision: i64 },
    SweepLeases,
    Compact { to: i64 },
    Decommission { serial: String },
}

#[derive(Debug)]
pub(crate) enum Reply {
    Apply(ApplyOutcome),
    Delete(DeleteOutcome),
    Status(Vec<StatusOutcome>),
    Register(RegisterOutcome),
    Heartbeat,
    /// Leases marked lapsed, and whether the sweep hit its slice (more may be waiting).
    Swept {
        lapsed: usize,
        more: bool,
    },
    Compacted(Compacted),
    Decommissioned {
        revision: i64,
        netdevs: u32,
    },
}

pub(crate) struct BatchContext {
    pub now: DateTime<Utc>,
    pub lease_duration_ms: i64,
}

pub(crate) struct BatchResult {
    pub replies: Vec<Result<Reply>>,
    pub events: Vec<Arc<Event>>,
    pub head: i64,
}

/// What the batch has loaded and changed so far.
struct Working<'c> {
    ctx: &'c BatchContext,
    head: i64,
    objects: HashMap<Key, Option<ObjectRow>>,
    routes: HashMap<Key, Route>,
    dirty: Vec<Key>,
    purged: HashSet<Key>,
    /// Objects loaded as absent (no row, not even a tombstone): they had no status rows then
    /// (statuses go with their object), and every status written since is in `statuses`.
    statusless: HashSet<Key>,
    statuses: HashMap<(Key, String), Option<StatusRow>>,
    status_dirty: Vec<(Key, String)>,
    netdev_namespaces: HashMap<String, Option<String>>,
    dpus: HashMap<String, Option<DpuRow>>,
    dpus_dirty: Vec<String>,
    dpus_deleted: Vec<String>,
    pools: HashMap<String, PoolState>,
    /// Final allocation of every Netdev whose allocation this batch touched.
    allocations: HashMap<(String, String), Option<(String, IpAddr)>>,
    /// Stored allocations as loaded (an address that does not parse is loaded as none).
    loaded_allocations: HashMap<(String, String), Option<(String, IpAddr)>>,
    /// Netdevs with a stored allocation row, whatever its address.
    allocation_rows: HashSet<(String, String)>,
    events: Vec<Event>,
    compact_to: Option<i64>,
    /// Highest stored status sequence number of the authors registering in this batch, as
    /// stored before it (an agent resends what came later; the broker ignores repeats).
    status_seqs: HashMap<String, i64>,
    /// How to take back every change since the batch began, newest last.
    journal: Vec<Undo>,
}

/// One change to the working set and how to take it back: the previous entry of a map slot
/// (`None`: the slot was absent).
enum Undo {
    Object(Key, Option<Option<ObjectRow>>, Option<Route>),
    Status((Key, String), Option<Option<StatusRow>>),
    Dpu(String, Option<Option<DpuRow>>),
    Purged(Key),
    NetdevNamespace(String, Option<Option<String>>),
    Allocation((String, String), Option<Option<(String, IpAddr)>>),
    PoolCreated(String),
    PoolReserved(String, IpAddr),
    PoolOffset(String, u128, bool),
}

/// What a status change keeps of its object.
struct StatusTarget {
    key: Key,
    uid: Uuid,
    generation: i64,
    labels: Labels,
}

impl StatusTarget {
    fn of(obj: &ObjectRow) -> StatusTarget {
        StatusTarget { key: obj.key.clone(), uid: obj.uid, generation: obj.generation, labels: obj.labels.clone() }
    }
}

/// Where the working set stood before a request: lengths of the append-only parts and of the
/// journal. Taking one costs nothing, whatever the batch holds.
struct Savepoint {
    head: i64,
    dirty: usize,
    status_dirty: usize,
    dpus_dirty: usize,
    dpus_deleted: usize,
    events: usize,
    journal: usize,
    compact_to: Option<i64>,
}

fn put_back<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, key: K, prev: Option<V>) {
    match prev {
        Some(v) => {
            map.insert(key, v);
        }
        None => {
            map.remove(&key);
        }
    }
}

/// What the writer knows of the store from its own last commit: the object, status and Netdev
/// name slots of the working sets it loaded and wrote, as they stood when it committed at `head`.
/// A batch starts from it only when the store's head is still `head` and its compaction horizon
/// still `compacted` (nothing else wrote since: every other change to these tables is a log
/// entry, which moves the head), and so skips the loads of those slots. Leases, allocations
/// and pools are not kept (the lease renewer writes leases outside the writer; the others are
/// cheap and rare to reload).
#[derive(Default)]
pub(crate) struct Warm {
    head: i64,
    /// The compaction horizon at that commit (another replica's compaction deletes tombstones
    /// without moving the head).
    compacted: Option<i64>,
    objects: HashMap<Key, Option<ObjectRow>>,
    routes: HashMap<Key, Route>,
    statuses: HashMap<(Key, String), Option<StatusRow>>,
    statusless: HashSet<Key>,
    netdev_namespaces: HashMap<String, Option<String>>,
}

impl Warm {
    /// Slots held.
    pub(crate) fn len(&self) -> usize {
        self.objects.len() + self.statuses.len() + self.statusless.len() + self.netdev_namespaces.len()
    }

    /// Takes back what a committed batch wrote: the store now holds exactly this.
    fn landed(mut self, flush: Flush) -> Warm {
        for (row, route) in flush.objects.into_iter().zip(flush.routes) {
            self.routes.insert(row.key.clone(), route);
            self.objects.insert(row.key.clone(), Some(row));
        }
        for row in flush.statuses {
            self.statuses.insert((row.key.clone(), row.author.clone()), Some(row));
        }
        for slot in flush.delete_statuses {
            self.statuses.insert(slot, None);
        }
        self
    }
}

/// A batch decided but not yet written: its transaction (loads done, nothing written), what to
/// write, and the replies to give once it commits.
pub(crate) struct Prepared<T> {
    pub tx: T,
    pub flush: Arc<Flush>,
    replies: Vec<Result<Reply>>,
    /// The working set's slots that `flush` does not write.
    rest: Warm,
}

/// Applies the requests, in order, to a working set loaded inside `tx`, starting from `warm`
/// when the store has not changed since it was taken.
pub(crate) async fn prepare<T: WriteTx>(
    mut tx: T,
    requests: &[&Request],
    ctx: &BatchContext,
    warm: Option<Warm>,
) -> Result<Prepared<T>> {
    let head = tx.lock_head().await?;
    let compacted = tx.compacted_seen();
    let warm = warm.filter(|w| w.head == head && w.compacted.is_some() && w.compacted == compacted);
    if warm.is_some() {
        crate::metrics::record_warm_batch();
    }
    let warm = warm.unwrap_or_default();
    let mut ws = Working {
        ctx,
        head,
        objects: warm.objects,
        routes: warm.routes,
        dirty: Vec::new(),
        purged: HashSet::new(),
        statusless: warm.statusless,
        statuses: warm.statuses,
        status_dirty: Vec::new(),
        netdev_namespaces: warm.netdev_namespaces,
        dpus: HashMap::new(),
        dpus_dirty: Vec::new(),
        dpus_deleted: Vec::new(),
        pools: HashMap::new(),
        allocations: HashMap::new(),
        loaded_allocations: HashMap::new(),
        allocation_rows: HashSet::new(),
        events: Vec::new(),
        compact_to: None,
        status_seqs: HashMap::new(),
        journal: Vec::new(),
    };
    ws.preload(&mut tx, requests).await?;
    let mut replies = Vec::with_capacity(requests.len());
    for req in requests {
        let save = ws.savepoint();
        let reply = ws.handle(&mut tx, req).await;
        if reply.is_err() {
            ws.restore(save);
        }
        if let Err(e @ (Error::Unavailable(_) | Error::Internal(_))) = reply {
            // The transaction itself may be broken: fail the batch so the writer can retry.
            return Err(e);
        }
        replies.push(reply);
    }
    let (flush, rest) = ws.into_flush(compacted);
    Ok(Prepared { tx, flush: Arc::new(flush), replies, rest })
}

/// Writes a prepared batch and commits it; also answers what the store holds now, for the next
/// batch to start from: none after a compaction (it removes tombstones the slots may hold), nor
/// when the flush is still shared (a pipelined writer, which does not keep one).
pub(crate) async fn finish<T: WriteTx>(p: Prepared<T>) -> Result<(BatchResult, Option<Warm>)> {
    let Prepared { mut tx, flush, mut replies, rest } = p;
    let compacted = tx.flush(&flush).await?;
    tx.commit().await?;
    for reply in &mut replies {
        if let Ok(Reply::Compacted(c)) = reply {
            *c = compacted;
        }
    }
    let res = BatchResult { replies, events: flush.log.clone(), head: flush.head };
    let warm = match Arc::try_unwrap(flush) {
        Ok(flush) if flush.compact_to.is_none() => Some(rest.landed(flush)),
        _ => None,
    };
    Ok((res, warm))
}

/// The `wanted` keys the working set has not loaded yet, each once, in order (one load asks
/// for all of them).
fn unknown<K: Ord + std::hash::Hash, V>(wanted: Vec<K>, loaded: &HashMap<K, V>) -> Vec<K> {
    let mut missing: Vec<K> = wanted.into_iter().filter(|k| !loaded.contains_key(k)).collect();
    missing.sort();
    missing.dedup();
    missing
}

fn decode<T: serde::de::DeserializeOwned>(json: &Value, what: &str) -> Result<T> {
    T::deserialize(json).map_err(|e| Error::internal(format!("stored {what} does not decode: {e}")))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Value> {
    serde_json::to_value(value).map_err(|e| Error::internal(format!("encoding: {e}")))
}

impl Working<'_> {
    async fn preload<T: WriteTx>(&mut self, tx: &mut T, requests: &[&Request]) -> Result<()> {
        let mut keys = Vec::new();
        let mut netdev_names = Vec::new();
        let mut serials = Vec::new();
        let mut status_slots = Vec::new();
        let mut allocations = Vec::new();
        let mut registering = Vec::new();
        for req in requests {
            match req {
                Request::Apply(a) => {
                    keys.push(a.input.key.clone());
                    match &a.input.spec {
                        Spec::Netdev(nd) => {
                            keys.push(Key::cluster(Kind::XpuNetwork, &nd.network));
                            netdev_names.push(a.input.key.name.clone());
                            allocations.push((a.input.key.namespace.clone(), a.input.key.name.clone()));
                        }
                        Spec::Svi(s) => {
                            keys.push(Key::cluster(Kind::Vrf, &s.vrf));
                            keys.push(Key::cluster(Kind::LogicalBridge, &s.logical_bridge));
                        }
                        _ => {}
                    }
                }
                Request::Delete(d) => keys.push(d.key.clone()),
                Request::Status { serial, writes } => {
                    keys.extend(writes.iter().map(|w| w.key.clone()));
                    keys.push(Key::cluster(Kind::Dpu, serial));
                    let author = dpu_author(serial);
                    status_slots.extend(writes.iter().map(|w| (w.key.clone(), author.clone())));
                }
                Request::Register(r) => {
                    let key = Key::cluster(Kind::Dpu, &r.serial);
                    status_slots.push((key.clone(), crate::model::BROKER_AUTHOR.to_string()));
                    keys.push(key);
                    serials.push(r.serial.clone());
                    registering.push(dpu_author(&r.serial));
                }
                Request::Heartbeat { serial, .. } => {
                    // A heartbeat reaches the writer when the lease lapsed: its Dpu status changes.
                    let key = Key::cluster(Kind::Dpu, serial);
                    status_slots.push((key.clone(), crate::model::BROKER_AUTHOR.to_string()));
                    keys.push(key);
                    serials.push(serial.clone());
                }
                Request::SweepLeases | Request::Compact { .. } | Request::Decommission { .. } => {}
            }
        }
        self.ensure(tx, keys).await?;
        self.ensure_netdev_names(tx, netdev_names).await?;
        self.ensure_statuses(tx, status_slots).await?;
        self.load_allocations(tx, allocations).await?;
        self.ensure_status_seqs(tx, registering).await?;
        self.ensure_dpus(tx, serials).await
    }

    pub(super) async fn ensure_status_seqs<T: WriteTx>(&mut self, tx: &mut T, authors: Vec<String>) -> Result<()> {
        let missing = unknown(authors, &self.status_seqs);
        if missing.is_empty() {
            return Ok(());
        }
        let found = tx.max_status_seqs(missing.clone()).await?;
        for author in missing {
            let seq = found.get(&author).copied().unwrap_or(0);
            self.status_seqs.insert(author, seq);
        }
        Ok(())
    }

    /// Loads the given status slots in one round trip (absent ones are remembered as absent).
    pub(super) async fn ensure_statuses<T: WriteTx>(&mut self, tx: &mut T, slots: Vec<(Key, String)>) -> Result<()> {
        let (none, missing): (Vec<_>, Vec<_>) =
            unknown(slots, &self.statuses).into_iter().partition(|(key, _)| self.statusless.contains(key));
        for slot in none {
            self.set_status(slot, None);
        }
        if missing.is_empty() {
            return Ok(());
        }
        let rows = tx.load_statuses(missing.clone()).await?;
        for slot in missing {
            self.set_status(slot, None);
        }
        for row in rows {
            let slot = (row.key.clone(), row.author.clone());
            self.set_status(slot, Some(row));
        }
        Ok(())
    }

    async fn ensure<T: WriteTx>(&mut self, tx: &mut T, keys: Vec<Key>) -> Result<()> {
        let missing = unknown(keys, &self.objects);
        if missing.is_empty() {
            return Ok(());
        }
        let rows = tx.load_objects(missing.clone()).await?;
        for k in &missing {
            self.set_object(k, None, None);
        }
        // Statuses go with their object: one without a row has none. (Kept when the request
        // fails: the object stays absent, and so do its statuses.)
        let found: HashSet<&Key> = rows.iter().map(|r| &r.key).collect();
        self.statusless.extend(missing.iter().filter(|k| !found.contains(k)).cloned());
        for row in rows {
            let route = Spec::from_stored(row.key.kind, &row.spec)?.route();
            let key = row.key.clone();
            self.set_object(&key, Some(row), Some(route));
        }
        Ok(())
    }

    async fn ensure_netdev_names<T: WriteTx>(&mut self, tx: &mut T, names: Vec<String>) -> Result<()> {
        let missing = unknown(names, &self.netdev_namespaces);
        if missing.is_empty() {
            return Ok(());
        }
        let found = tx.live_netdev_namespaces(missing.clone()).await?;
        for n in &missing {
            self.set_netdev_namespace(n, None);
        }
        for (name, ns) in found {
            self.set_netdev_namespace(&name, Some(ns));
        }
        Ok(())
    }

    async fn ensure_dpus<T: WriteTx>(&mut self, tx: &mut T, serials: Vec<String>) -> Result<()> {
        let missing = unknown(serials, &self.dpus);
        if missing.is_empty() {
            return Ok(());
        }
        let rows = tx.load_dpus(missing.clone()).await?;
        for s in &missing {
            self.set_dpu(s, None);
        }
        for row in rows {
            let serial = row.serial.clone();
            self.set_dpu(&serial, Some(row));
        }
        Ok(())
    }

    /// Loads a status slot into the working set unless it is there already.
    async fn ensure_status<T: WriteTx>(&mut self, tx: &mut T, slot: &(Key, String)) -> Result<()> {
        if !self.statuses.contains_key(slot) {
            let row = if self.purged.contains(&slot.0) || self.statusless.contains(&slot.0) {
                None
            } else {
                tx.load_statuses(vec![slot.clone()]).await?.into_iter().next()
            };
            self.set_status(slot.clone(), row);
        }
        Ok(())
    }

    async fn status_of<T: WriteTx>(&mut self, tx: &mut T, key: &Key, author: &str) -> Result<Option<StatusRow>> {
        let slot = (key.clone(), author.to_string());
        self.ensure_status(tx, &slot).await?;
        Ok(self.statuses.get(&slot).cloned().flatten())
    }

    fn live(&self, key: &Key) -> Option<&ObjectRow> {
        self.objects.get(key).and_then(|o| o.as_ref()).filter(|o| o.live())
    }

    fn next_revision(&mut self) -> i64 {
        self.head += 1;
        self.head
    }

    fn savepoint(&self) -> Savepoint {
        Savepoint {
            head: self.head,
            dirty: self.dirty.len(),
            status_dirty: self.status_dirty.len(),
            dpus_dirty: self.dpus_dirty.len(),
            dpus_deleted: self.dpus_deleted.len(),
            events: self.events.len(),
            journal: self.journal.len(),
            compact_to: self.compact_to,
        }
    }

    fn restore(&mut self, s: Savepoint) {
        self.head = s.head;
        self.dirty.truncate(s.dirty);
        self.status_dirty.truncate(s.status_dirty);
        self.dpus_dirty.truncate(s.dpus_dirty);
        self.dpus_deleted.truncate(s.dpus_deleted);
        self.events.truncate(s.events);
        self.compact_to = s.compact_to;
        while self.journal.len() > s.journal {
            let Some(undo) = self.journal.pop() else { break };
            match undo {
                Undo::Object(k, prev, route) => {
                    put_back(&mut self.routes, k.clone(), route);
                    put_back(&mut self.objects, k, prev);
                }
                Undo::Status(slot, prev) => put_back(&mut self.statuses, slot, prev),
                Undo::Dpu(serial, prev) => put_back(&mut self.dpus, serial, prev),
                Undo::Purged(k) => {
                    self.purged.remove(&k);
                }
                Undo::NetdevNamespace(name, prev) => put_back(&mut self.netdev_namespaces, name, prev),
                Undo::Allocation(slot, prev) => put_back(&mut self.allocations, slot, prev),
                Undo::PoolCreated(n) => {
                    self.pools.remove(&n);
                }
                Undo::PoolReserved(n, ip) => {
                    if let Some(p) = self.pools.get_mut(&n) {
                        p.reserved.remove(&ip);
                    }
                }
                Undo::PoolOffset(n, offset, dirty) => {
                    if let Some(p) = self.pools.get_mut(&n) {
                        p.offset = offset;
                        p.offset_dirty = dirty;
                    }
                }
            }
        }
    }

    // ---- journaled changes: every change to the working set goes through one of these ----

    /// Sets an object slot (and its route, when given).
    fn set_object(&mut self, key: &Key, row: Option<ObjectRow>, route: Option<Route>) {
        let prev = self.objects.insert(key.clone(), row);
        let prev_route = match route {
            Some(r) => self.routes.insert(key.clone(), r),
            None => self.routes.get(key).cloned(),
        };
        self.journal.push(Undo::Object(key.clone(), prev, prev_route));
    }

    fn set_status(&mut self, slot: (Key, String), row: Option<StatusRow>) {
        let prev = self.statuses.insert(slot.clone(), row);
        self.journal.push(Undo::Status(slot, prev));
    }

    fn set_dpu(&mut self, serial: &str, row: Option<DpuRow>) {
        let prev = self.dpus.insert(serial.to_string(), row);
        self.journal.push(Undo::Dpu(serial.to_string(), prev));
    }

    fn set_netdev_namespace(&mut self, name: &str, namespace: Option<String>) {
        let prev = self.netdev_namespaces.insert(name.to_string(), namespace);
        self.journal.push(Undo::NetdevNamespace(name.to_string(), prev));
    }

    fn set_allocation(&mut self, slot: (String, String), allocation: Option<(String, IpAddr)>) {
        let prev = self.allocations.insert(slot.clone(), allocation);
        self.journal.push(Undo::Allocation(slot, prev));
    }

    /// Drops every status of `key` (a new incarnation, or a purged Dpu); rare, so it scans.
    fn purge(&mut self, key: &Key) {
        if self.purged.insert(key.clone()) {
            self.journal.push(Undo::Purged(key.clone()));
        }
        let slots: Vec<(Key, String)> = self.statuses.keys().filter(|(k, _)| k == key).cloned().collect();
        for slot in slots {
            let prev = self.statuses.remove(&slot);
            self.journal.push(Undo::Status(slot, prev));
        }
    }

    async fn handle<T: WriteTx>(&mut self, tx: &mut T, req: &Request) -> Result<Reply> {
        match req {
            Request::Apply(a) => self.apply(tx, a).await.map(Reply::Apply),
            Request::Delete(d) => self.delete(tx, d).await.map(Reply::Delete),
            Request::Status { serial, writes } => self.status(tx, serial, writes).await.map(Reply::Status),
            Request::Register(r) => self.register(tx, r).await.map(Reply::Register),
            Request::Heartbeat { serial, applied_revision } => {
                self.heartbeat(tx, serial, *applied_revision).await.map(|()| Reply::Heartbeat)
            }
            Request::SweepLeases => self.sweep(tx).await.map(|(lapsed, more)| Reply::Swept { lapsed, more }),
            Request::Compact { to } => {
                let to = (*to).min(self.head);
                self.compact_to = Some(self.compact_to.map_or(to, |c| c.max(to)));
                Ok(Reply::Compacted(Compacted::default()))
            }
            Request::Decommission { serial } => self.decommission(tx, serial).await,
        }
    }

    // ---- specs ----

    async fn apply<T: WriteTx>(&mut self, tx: &mut T, req: &ApplyRequest) -> Result<ApplyOutcome> {
        let key = &req.input.key;
        self.ensure(tx, vec![key.clone()]).await?;
        let live = self.live(key).cloned();
        if req.expected_generation != 0 {
            match &live {
                None => {
                    return Err(Error::Aborted(format!(
                        "{key} does not exist (the write expected generation {})",
                        req.expected_generation
                    )));
                }
                Some(o) if o.generation != req.expected_generation => {
                    return Err(Error::Aborted(format!(
                        "{key} is at generation {}, the write was based on generation {}",
                        o.generation, req.expected_generation
                    )));
                }
                Some(_) => {}
            }
        }
        if let (Some(node), Some(o)) = (&req.node, &live) {
            check_node(o, node)?;
        }
        let mut spec = req.input.spec.clone();
        let mut network = None;
        match &mut spec {
            Spec::Netdev(nd) => network = Some(Box::new(self.prepare_netdev(tx, key, nd, live.as_ref()).await?)),
            Spec::XpuNetwork(n) => self.check_network(tx, key, n, live.as_ref()).await?,
            Spec::Svi(s) => {
                self.require(tx, Key::cluster(Kind::Vrf, &s.vrf), "spec.vrf").await?;
                self.require(tx, Key::cluster(Kind::LogicalBridge, &s.logical_bridge), "spec.logicalBridge").await?;
                if !s.mac_address.is_empty() {
                    s.mac_address = validate::mac(&s.mac_address, "spec.macAddress")?;
                }
            }
            Spec::Dpu(_) => {
                return Err(Error::invalid("kind", "Dpu objects are written by the broker from agent registration"));
            }
            _ => {}
        }
        let (row, changed) = self.put_spec(key, &req.input.labels, &spec, &req.author)?;
        Ok(ApplyOutcome { object: row.into_stored(vec![], None, None), changed, network })
    }

    /// Stores a spec and labels, bumping the generation when the spec changed; no-op when
    /// nothing changed.
    fn put_spec(&mut self, key: &Key, labels: &Labels, spec: &Spec, author: &str) -> Result<(ObjectRow, bool)> {
        let spec_json = spec.to_json()?;
        let existing = self.objects.get(key).cloned().flatten();
        let live = existing.as_ref().filter(|o| o.live());
        if let Some(o) = live
            && o.spec == spec_json
            && &o.labels == labels
        {
            return Ok((o.clone(), false));
        }
        let now = self.ctx.now;
        let spec_changed = live.is_none_or(|o| o.spec != spec_json);
        let rev = self.next_revision();
        let row = ObjectRow {
            key: key.clone(),
            uid: live.map_or_else(Uuid::new_v4, |o| o.uid),
            generation: match live {
                None => 1,
                Some(o) if spec_changed => o.generation + 1,
                Some(o) => o.generation,
            },
            revision: rev,
            labels: labels.clone(),
            spec: spec_json.clone(),
            spec_author: author.to_string(),
            created_at: live.map_or(now, |o| o.created_at),
            updated_at: now,
            deleted_revision: None,
        };
        if existing.is_some() && live.is_none() {
            // A re-created object starts afresh: statuses of the old incarnation go.
            self.purge(key);
        }
        let route = spec.route();
        let prev_route = self.routes.get(key).filter(|r| live.is_some() && **r != route).cloned();
        self.events.push(Event {
            revision: rev,
            key: key.clone(),
            uid: row.uid,
            generation: row.generation,
            change: ChangeKind::Spec,
            labels: labels.clone(),
            body: Some(spec_json),
            author: author.to_string(),
            observed_generation: 0,
            route: route.clone(),
            prev_route,
            at: now,
        });
        self.set_object(key, Some(row.clone()), Some(route));
        self.dirty.push(key.clone());
        Ok((row, true))
    }

    async fn require<T: WriteTx>(&mut self, tx: &mut T, key: Key, field: &str) -> Result<ObjectRow> {
        self.ensure(tx, vec![key.clone()]).await?;
        self.live(&key).cloned().ok_or_else(|| Error::invalid(field, format!("{} {:?} not found", key.kind, key.name)))
    }

    async fn delete<T: WriteTx>(&mut self, tx: &mut T, req: &DeleteRequest) -> Result<DeleteOutcome> {
        let key = &req.key;
        self.ensure(tx, vec![key.clone()]).await?;
        let Some(mut row) = self.live(key).cloned() else {
            return Ok(DeleteOutcome { revision: 0, existed: false });
        };
        if let Some(uid) = req.uid
            && uid != row.uid
        {
            return Err(Error::Aborted(format!("{key} has uid {}, the delete expected {uid}", row.uid)));
        }
        if req.expected_generation != 0 && req.expected_generation != row.generation {
            return Err(Error::Aborted(format!(
                "{key} is at generation {}, the delete expected generation {}",
                row.generation, req.expected_generation
            )));
        }
        if let Some(node) = &req.node {
            check_node(&row, node)?;
        }
        match key.kind {
            Kind::XpuNetwork => {
                let in_use = self.allocations_in(tx, &key.name).await?;
                if in_use > 0 {
                    return Err(Error::FailedPrecondition(format!(
                        "XpuNetwork {} is in use by {in_use} netdevs; delete them first",
                        key.name
                    )));
                }
            }
            Kind::Netdev => {
                if self.current_allocation(tx, key).await?.is_some() {
                    self.set_allocation((key.namespace.clone(), key.name.clone()), None);
                }
                self.set_netdev_namespace(&key.name, None);
            }
            Kind::Dpu => self.purge(key),
            _ => {}
        }
        let rev = self.next_revision();
        row.revision = rev;
        row.deleted_revision = Some(rev);
        row.updated_at = self.ctx.now;
        row.spec_author = req.author.clone();
        let route = self.routes.get(key).cloned().unwrap_or(Route::None);
        self.events.push(Event {
            revision: rev,
            key: key.clone(),
            uid: row.uid,
            generation: row.generation,
            change: ChangeKind::Deleted,
            labels: row.labels.clone(),
            body: None,
            author: req.author.clone(),
            observed_generation: 0,
            route,
            prev_route: None,
            at: self.ctx.now,
        });
        self.set_object(key, Some(row), None);
        self.dirty.push(key.clone());
        Ok(DeleteOutcome { revision: rev, existed: true })
    }

    // ---- statuses ----

    fn put_status(
        &mut self,
        obj: &ObjectRow,
        author: &str,
        observed_generation: i64,
        seq: i64,
        body: Option<Value>,
    ) -> i64 {
        self.put_status_for(StatusTarget::of(obj), author, observed_generation, seq, body)
    }

    fn put_status_for(
        &mut self,
        obj: StatusTarget,
        author: &str,
        observed_generation: i64,
        seq: i64,
        body: Option<Value>,
    ) -> i64 {
        let rev = self.next_revision();
        let slot = (obj.key.clone(), author.to_string());
        let row = body.clone().map(|status| StatusRow {
            key: obj.key.clone(),
            author: author.to_string(),
            observed_generation,
            seq,
            revision: rev,
            status,
            updated_at: self.ctx.now,
        });
        self.set_status(slot.clone(), row);
        self.status_dirty.push(slot);
        let route = self.routes.get(&obj.key).cloned().unwrap_or(Route::None);
        self.events.push(Event {
            revision: rev,
            key: obj.key,
            uid: obj.uid,
            generation: obj.generation,
            change: ChangeKind::Status,
            labels: obj.labels,
            body,
            author: author.to_string(),
            observed_generation,
            route,
            prev_route: None,
            at: self.ctx.now,
        });
        rev
    }

    async fn status<T: WriteTx>(
        &mut self,
        tx: &mut T,
        serial: &str,
        writes: &[StatusWrite],
    ) -> Result<Vec<StatusOutcome>> {
        let author = dpu_author(serial);
        self.ensure(tx, writes.iter().map(|w| w.key.clone()).collect()).await?;
        let dpu_key = Key::cluster(Kind::Dpu, serial);
        self.ensure(tx, vec![dpu_key.clone()]).await?;
        let dpu_labels = self.live(&dpu_key).map(|d| d.labels.clone()).unwrap_or_default();
        // Authorize the whole request before writing any of it.
        for w in writes {
            if let (Some(Some(obj)), Some(Route::Dpu(owner))) = (self.objects.get(&w.key), self.routes.get(&w.key))
                && owner != serial
            {
                return Err(Error::PermissionDenied(format!(
                    "{} belongs to dpu {owner}; dpu {serial} cannot report its status",
                    obj.key
                )));
            }
        }
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            if !matches!(self.objects.get(&w.key), Some(Some(_))) {
                out.push(StatusOutcome::NotFound);
                continue;
            }
            let slot = (w.key.clone(), author.clone());
            self.ensure_status(tx, &slot).await?;
            // Decide from borrowed state; copy only what the new status and its event keep.
            let Some(Some(obj)) = self.objects.get(&w.key) else {
                out.push(StatusOutcome::NotFound);
                continue;
            };
            let existing = self.statuses.get(&slot).and_then(Option::as_ref);
            let routed = self.routes.get(&w.key).is_some_and(|r| r.reaches(serial, &dpu_labels));
            let decision = match (&w.body, existing) {
                _ if !routed && existing.is_none() => Err(StatusOutcome::NotFound),
                (_, Some(s)) if w.seq <= s.seq => Err(StatusOutcome::Stale),
                (None, Some(_)) => Ok(None),
                (None, None) => Err(StatusOutcome::Unchanged),
                (Some(_), _) if !obj.live() => Err(StatusOutcome::NotFound),
                // A generation the object never had belongs to another incarnation of it.
                (Some(_), _) if w.observed_generation > obj.generation => Err(StatusOutcome::Stale),
                (Some(_), Some(s)) if w.observed_generation < s.observed_generation => Err(StatusOutcome::Stale),
                (Some(body), Some(s)) if &s.status == body && s.observed_generation == w.observed_generation => {
                    Err(StatusOutcome::Unchanged)
                }
                (Some(body), _) => Ok(Some(body.clone())),
            };
            out.push(match decision {
                Err(outcome) => outcome,
                Ok(body) => {
                    let target = StatusTarget::of(obj);
                    StatusOutcome::Accepted(self.put_status_for(target, &author, w.observed_generation, w.seq, body))
                }
            });
        }
        Ok(out)
    }

    // ---- DPUs and leases ----

    /// What to write, moved out of the working set (the events become the log entries), and the
    /// slots it leaves (at the compaction horizon the batch locked at).
    fn into_flush(mut self, compacted: Option<i64>) -> (Flush, Warm) {
        let mut flush = Flush { head: self.head, compact_to: self.compact_to, ..Default::default() };
        let mut seen = HashSet::new();
        for key in self.dirty {
            if seen.insert(key.clone())
                && let Some(Some(row)) = self.objects.remove(&key)
            {
                flush.routes.push(self.routes.remove(&key).unwrap_or(Route::None));
                flush.objects.push(row);
            }
        }
        flush.purge_statuses = self.purged.into_iter().collect();
        let mut seen = HashSet::new();
        for slot in self.status_dirty {
            if seen.insert(slot.clone()) {
                match self.statuses.remove(&slot) {
                    Some(Some(row)) => flush.statuses.push(row),
                    _ => flush.delete_statuses.push(slot),
                }
            }
        }
        for ((ns, name), alloc) in self.allocations {
            let slot = (ns, name);
            let row = self.allocation_rows.contains(&slot);
            let stored = self.loaded_allocations.get(&slot).cloned().flatten();
            if stored == alloc && (alloc.is_some() || !row) {
                continue;
            }
            if row {
                flush.release_allocations.push(slot.clone());
            }
            let (ns, name) = slot;
            if let Some((network, ip)) = alloc {
                flush.allocations.push(Allocation {
                    network,
                    address: ip.to_string(),
                    namespace: ns,
                    name,
                    revision: self.head,
                });
            }
        }
        for (network, state) in self.pools {
            if state.offset_dirty {
                flush.pool_offsets.push((network, state.offset));
            }
        }
        let mut seen = HashSet::new();
        for serial in self.dpus_dirty {
            if seen.insert(serial.clone())
                && let Some(Some(row)) = self.dpus.remove(&serial)
            {
                flush.dpus.push(row);
            }
        }
        flush.delete_dpus = self.dpus_deleted;
        flush.log = self.events.into_iter().map(Arc::new).collect();
        let rest = Warm {
            head: flush.head,
            compacted,
            objects: self.objects,
            routes: self.routes,
            statuses: self.statuses,
            statusless: self.statusless,
            netdev_namespaces: self.netdev_namespaces,
        };
        (flush, rest)
    }
}

fn check_node(row: &ObjectRow, node: &str) -> Result<()> {
    if row.key.kind != Kind::Netdev {
        return Err(Error::PermissionDenied(format!("host {node} may only write Netdevs")));
    }
    let hostname = row.spec.get("hostname").and_then(Value::as_str).unwrap_or_default();
    if hostname != node {
        return Err(Error::PermissionDenied(format!(
            "{} belongs to node {hostname}; host {node} cannot change it",
            row.key
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
