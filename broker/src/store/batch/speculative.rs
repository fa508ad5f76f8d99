//! Deciding a batch while the one before it commits.
//!
//! The writer decides batch N+1 (its loads and its requests) while batch N is being written and
//! committed on another connection. Until N commits, the database does not show N's writes; a
//! [`Speculative`] transaction answers the keyed loads of what N wrote from N's flush (the
//! [`Ahead`]), asks the database for everything else — which N did not touch, so the database
//! is already right about it — and makes every query that is not keyed (lease sweeps,
//! sequence numbers, counts) wait until N has committed. N+1 writes nothing until N has
//! committed, and then only after [`Speculative::confirm`] found the revision where N left it;
//! if N failed, or another replica wrote in between, the writer decides N+1 again from scratch.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::WriteTx;
use crate::{
    error::{Error, Result},
    model::{Key, Kind},
    store::rows::{Compacted, DpuRow, Flush, ObjectRow, StatusRow},
};

/// What a batch still in flight writes, indexed by key.
pub(crate) struct Ahead {
    flush: Arc<Flush>,
    /// The compaction horizon the batch ahead locked at (it does not compact itself).
    compacted: Option<i64>,
    objects: HashMap<Key, usize>,
    statuses: HashMap<(Key, String), Option<usize>>,
    purged: HashSet<Key>,
    /// Netdev name → namespace of its live Netdev after the batch (`None`: no live one).
    netdev_names: HashMap<String, Option<String>>,
    /// Netdevs whose allocation the batch replaced → their `(network, address)` after it.
    allocations: HashMap<(String, String), Option<(String, String)>>,
    /// `(network, address)` → holder, for the addresses the batch allocated.
    allocated: HashMap<(String, String), (String, String)>,
    pool_offsets: HashMap<String, u128>,
}

impl Ahead {
    pub(crate) fn of(flush: Arc<Flush>, compacted: Option<i64>) -> Ahead {
        let objects = flush.objects.iter().enumerate().map(|(i, o)| (o.key.clone(), i)).collect();
        let mut statuses: HashMap<(Key, String), Option<usize>> =
            flush.delete_statuses.iter().map(|slot| (slot.clone(), None)).collect();
        for (i, s) in flush.statuses.iter().enumerate() {
            statuses.insert((s.key.clone(), s.author.clone()), Some(i));
        }
        let purged = flush.purge_statuses.iter().cloned().collect();
        let mut netdev_names: HashMap<String, Option<String>> = HashMap::new();
        for o in flush.objects.iter().filter(|o| o.key.kind == Kind::Netdev) {
            let slot = netdev_names.entry(o.key.name.clone()).or_default();
            if o.live() {
                *slot = Some(o.key.namespace.clone());
            }
        }
        let mut allocations: HashMap<(String, String), Option<(String, String)>> =
            flush.release_allocations.iter().map(|slot| (slot.clone(), None)).collect();
        let mut allocated = HashMap::new();
        for a in &flush.allocations {
            let holder = (a.namespace.clone(), a.name.clone());
            allocations.insert(holder.clone(), Some((a.network.clone(), a.address.clone())));
            allocated.insert((a.network.clone(), a.address.clone()), holder);
        }
        let pool_offsets = flush.pool_offsets.iter().cloned().collect();
        Ahead { flush, compacted, objects, statuses, purged, netdev_names, allocations, allocated, pool_offsets }
    }

    /// The revision the batch leaves.
    pub(crate) fn head(&self) -> i64 {
        self.flush.head
    }

    fn object(&self, key: &Key) -> Option<&ObjectRow> {
        self.objects.get(key).map(|&i| &self.flush.objects[i])
    }

    /// `Some(row or none)` when the batch decided this status slot.
    fn status(&self, slot: &(Key, String)) -> Option<Option<&StatusRow>> {
        match self.statuses.get(slot) {
            Some(i) => Some(i.map(|i| &self.flush.statuses[i])),
            None if self.purged.contains(&slot.0) => Some(None),
            None => None,
        }
    }
}

/// A write transaction that reads past a batch still committing.
pub(crate) struct Speculative<T> {
    inner: T,
    ahead: Arc<Ahead>,
    /// `Some(true)` once the batch ahead committed, `Some(false)` if it failed.
    outcome: watch::Receiver<Option<bool>>,
    settled: bool,
    confirmed: bool,
}

impl<T: WriteTx> Speculative<T> {
    pub(crate) fn new(inner: T, ahead: Arc<Ahead>, outcome: watch::Receiver<Option<bool>>) -> Speculative<T> {
        Speculative { inner, ahead, outcome, settled: false, confirmed: false }
    }

    /// Waits until the batch ahead committed; an error when it did not.
    async fn settle(&mut self) -> Result<()> {
        if self.settled {
            return Ok(());
        }
        let committed = match self.outcome.wait_for(Option::is_some).await {
            Ok(v) => *v == Some(true),
            Err(_) => false,
        };
        if !committed {
            return Err(Error::Unavailable("the batch ahead did not commit".into()));
        }
        self.settled = true;
        Ok(())
    }

    /// After the batch ahead committed: takes the revision lock and checks that nothing else
    /// was committed since, nor compacted (a compaction deletes tombstones without moving the
    /// head). `false`: this batch must be decided again.
    pub(crate) async fn confirm(&mut self) -> Result<bool> {
        self.settle().await?;
        let head = self.inner.lock_head().await?;
        self.confirmed = head == self.ahead.head()
            && self.ahead.compacted.is_some()
            && self.inner.compacted_seen() == self.ahead.compacted;
        Ok(self.confirmed)
    }
}

impl<T: WriteTx> WriteTx for Speculative<T> {
    async fn lock_head(&mut self) -> Result<i64> {
        Ok(self.ahead.head())
    }

    fn compacted_seen(&self) -> Option<i64> {
        // Known once `confirm` has taken the lock.
        self.inner.compacted_seen()
    }

    async fn load_objects(&mut self, keys: Vec<Key>) -> Result<Vec<ObjectRow>> {
        let (known, rest): (Vec<Key>, Vec<Key>) = keys.into_iter().partition(|k| self.ahead.objects.contains_key(k));
        let mut rows = if rest.is_empty() { Vec::new() } else { self.inner.load_objects(rest).await? };
        rows.extend(known.iter().filter_map(|k| self.ahead.object(k).cloned()));
        Ok(rows)
    }

    async fn load_statuses(&mut self, pairs: Vec<(Key, String)>) -> Result<Vec<StatusRow>> {
        let mut rows = Vec::new();
        let mut rest = Vec::new();
        for slot in pairs {
            match self.ahead.status(&slot) {
                Some(row) => rows.extend(row.cloned()),
                None => rest.push(slot),
            }
        }
        if !rest.is_empty() {
            rows.extend(self.inner.load_statuses(rest).await?);
        }
        Ok(rows)
    }

    async fn live_netdev_namespaces(&mut self, names: Vec<String>) -> Result<Vec<(String, String)>> {
        let mut found = Vec::new();
        let mut rest = Vec::new();
        for name in names {
            match self.ahead.netdev_names.get(&name) {
                Some(ns) => found.extend(ns.clone().map(|ns| (name, ns))),
                None => rest.push(name),
            }
        }
        if !rest.is_empty() {
            found.extend(self.inner.live_netdev_namespaces(rest).await?);
        }
        Ok(found)
    }

    async fn load_dpus(&mut self, serials: Vec<String>) -> Result<Vec<DpuRow>> {
        // Leases are renewed beside the writer: read them as committed.
        self.settle().await?;
        self.inner.load_dpus(serials).await
    }

    async fn lapsed_dpus(&mut self, now: DateTime<Utc>, limit: usize) -> Result<Vec<String>> {
        self.settle().await?;
        self.inner.lapsed_dpus(now, limit).await
    }

    async fn live_netdevs_on_dpu(&mut self, serial: String) -> Result<Vec<Key>> {
        self.settle().await?;
        self.inner.live_netdevs_on_dpu(serial).await
    }

    async fn count_allocations(&mut self, network: String) -> Result<i64> {
        self.settle().await?;
        self.inner.count_allocations(network).await
    }

    async fn allocations_of(
        &mut self,
        netdevs: Vec<(String, String)>,
    ) -> Result<Vec<(String, String, String, String)>> {
        let mut found = Vec::new();
        let mut rest = Vec::new();
        for slot in netdevs {
            match self.ahead.allocations.get(&slot) {
                Some(Some((network, address))) => found.push((slot.0, slot.1, network.clone(), address.clone())),
                Some(None) => {}
                None => rest.push(slot),
            }
        }
        if !rest.is_empty() {
            found.extend(self.inner.allocations_of(rest).await?);
        }
        Ok(found)
    }

    async fn pool_offset(&mut self, network: String) -> Result<Option<u128>> {
        match self.ahead.pool_offsets.get(&network) {
            Some(offset) => Ok(Some(*offset)),
            None => self.inner.pool_offset(network).await,
        }
    }

    async fn taken(&mut self, network: String, addresses: Vec<String>) -> Result<HashMap<String, (String, String)>> {
        let mut taken = self.inner.taken(network.clone(), addresses.clone()).await?;
        // Holders whose allocation the batch ahead replaced no longer hold what the database
        // still shows; what it allocated is held.
        taken.retain(|address, holder| match self.ahead.allocations.get(holder) {
            Some(now) => now.as_ref().is_some_and(|(n, a)| *n == network && a == address),
            None => true,
        });
        for address in addresses {
            if let Some(holder) = self.ahead.allocated.get(&(network.clone(), address.clone())) {
                taken.insert(address, holder.clone());
            }
        }
        Ok(taken)
    }

    async fn max_status_seqs(&mut self, authors: Vec<String>) -> Result<HashMap<String, i64>> {
        self.settle().await?;
        self.inner.max_status_seqs(authors).await
    }

    async fn flush(&mut self, flush: &Flush) -> Result<Compacted> {
        if !self.confirmed {
            return Err(Error::internal("a speculative batch was written before it was confirmed"));
        }
        self.inner.flush(flush).await
    }

    async fn commit(self) -> Result<()> {
        self.inner.commit().await
    }
}
