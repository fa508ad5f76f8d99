//! The writer's warm working set: a batch skips the loads of what the last commit left, and
//! only while nothing else has written since.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};

use xpu_proto::broker::v1 as pb;

use super::*;
use crate::store::sqlite::{self, SqliteWriteTx};

/// Counts the object keys a transaction loads.
struct Counting<'a, T> {
    tx: T,
    loaded: &'a AtomicUsize,
}

impl<T: WriteTx> WriteTx for Counting<'_, T> {
    async fn lock_head(&mut self) -> Result<i64> {
        self.tx.lock_head().await
    }
    fn compacted_seen(&self) -> Option<i64> {
        self.tx.compacted_seen()
    }
    async fn load_objects(&mut self, keys: Vec<Key>) -> Result<Vec<ObjectRow>> {
        self.loaded.fetch_add(keys.len(), Ordering::Relaxed);
        self.tx.load_objects(keys).await
    }
    async fn load_statuses(&mut self, pairs: Vec<(Key, String)>) -> Result<Vec<StatusRow>> {
        self.tx.load_statuses(pairs).await
    }
    async fn live_netdev_namespaces(&mut self, names: Vec<String>) -> Result<Vec<(String, String)>> {
        self.tx.live_netdev_namespaces(names).await
    }
    async fn load_dpus(&mut self, serials: Vec<String>) -> Result<Vec<DpuRow>> {
        self.tx.load_dpus(serials).await
    }
    async fn lapsed_dpus(&mut self, now: DateTime<Utc>, limit: usize) -> Result<Vec<String>> {
        self.tx.lapsed_dpus(now, limit).await
    }
    async fn live_netdevs_on_dpu(&mut self, serial: String) -> Result<Vec<Key>> {
        self.tx.live_netdevs_on_dpu(serial).await
    }
    async fn count_allocations(&mut self, network: String) -> Result<i64> {
        self.tx.count_allocations(network).await
    }
    async fn allocations_of(
        &mut self,
        netdevs: Vec<(String, String)>,
    ) -> Result<Vec<(String, String, String, String)>> {
        self.tx.allocations_of(netdevs).await
    }
    async fn pool_offset(&mut self, network: String) -> Result<Option<u128>> {
        self.tx.pool_offset(network).await
    }
    async fn taken(&mut self, network: String, addresses: Vec<String>) -> Result<HashMap<String, (String, String)>> {
        self.tx.taken(network, addresses).await
    }
    async fn max_status_seqs(&mut self, authors: Vec<String>) -> Result<HashMap<String, i64>> {
        self.tx.max_status_seqs(authors).await
    }
    async fn flush(&mut self, flush: &Flush) -> Result<Compacted> {
        self.tx.flush(flush).await
    }
    async fn commit(self) -> Result<()> {
        self.tx.commit().await
    }
}

fn apply_lb(vlan: u32) -> Request {
    Request::Apply(ApplyRequest {
        input: crate::model::object::ObjectInput {
            key: Key::cluster(Kind::LogicalBridge, "lb-1"),
            labels: Labels::default(),
            spec: Spec::LogicalBridge(pb::LogicalBridgeSpec {
                vlan_id: vlan,
                vni: Some(1000 + vlan),
                ..Default::default()
            }),
        },
        expected_generation: 0,
        author: "admin".into(),
        node: None,
    })
}

/// Runs one request in its own batch; answers its reply, the object keys loaded and what the
/// next batch may start from.
async fn run(pool: &sqlx::SqlitePool, req: Request, warm: Option<Warm>) -> (Reply, usize, Option<Warm>) {
    let loaded = AtomicUsize::new(0);
    let ctx = BatchContext { now: Utc::now(), lease_duration_ms: 30_000 };
    let tx = Counting { tx: SqliteWriteTx::begin(pool).await.unwrap(), loaded: &loaded };
    let (res, warm) = finish(prepare(tx, &[&req], &ctx, warm).await.unwrap()).await.unwrap();
    let reply = res.replies.into_iter().next().unwrap().unwrap();
    (reply, loaded.load(Ordering::Relaxed), warm)
}

/// Applies lb-1 with `vlan`; answers the generation written, the keys loaded and what is kept.
async fn apply(pool: &sqlx::SqlitePool, vlan: u32, warm: Option<Warm>) -> (i64, usize, Option<Warm>) {
    let (reply, loaded, warm) = run(pool, apply_lb(vlan), warm).await;
    let Reply::Apply(out) = reply else { panic!("not applied") };
    (out.object.generation, loaded, warm)
}

async fn open_store() -> (tempfile::TempDir, sqlx::SqlitePool) {
    let dir = tempfile::tempdir().unwrap();
    let opened = sqlite::open(&dir.path().join("xpu.db"), 2).await.unwrap();
    sqlite::migrate(&opened.pool).await.unwrap();
    (dir, opened.pool)
}

#[tokio::test]
async fn a_batch_starts_from_the_last_commit_only_while_nothing_else_wrote() {
    let (_dir, pool) = open_store().await;
    let pool = &pool;

    let (generation, loaded, warm) = apply(pool, 10, None).await;
    assert_eq!((generation, loaded), (1, 1), "a cold batch loads the object");
    let (generation, loaded, warm) = apply(pool, 11, warm).await;
    assert_eq!((generation, loaded), (2, 0), "the next batch starts from what the first one wrote");
    let stale = warm.unwrap();

    // Another writer (a replica on the same database) moves the object on.
    let (generation, _, _) = apply(pool, 12, None).await;
    assert_eq!(generation, 3);

    // What the writer kept no longer holds: it loads the object again and builds on the other
    // write, instead of writing generation 3 a second time over it.
    let (generation, loaded, _) = apply(pool, 13, Some(stale)).await;
    assert_eq!((generation, loaded), (4, 1));
}

#[tokio::test]
async fn a_compaction_by_another_writer_makes_the_next_batch_load_again() {
    let (_dir, pool) = open_store().await;
    let pool = &pool;
    let (_, _, warm) = apply(pool, 10, None).await;
    let delete = Request::Delete(DeleteRequest {
        key: Key::cluster(Kind::LogicalBridge, "lb-1"),
        uid: None,
        expected_generation: 0,
        author: "admin".into(),
        node: None,
    });
    let (reply, _, warm) = run(pool, delete, warm).await;
    let Reply::Delete(deleted) = reply else { panic!("not deleted") };
    // The writer keeps the tombstone.
    let stale = warm.unwrap();

    // Another writer compacts the log past the delete: the tombstone goes, the head stays.
    let (reply, _, _) = run(pool, Request::Compact { to: deleted.revision }, None).await;
    let Reply::Compacted(c) = reply else { panic!("not compacted") };
    assert_eq!(c.tombstones_removed, 1);

    // The object is created anew from nothing (generation 1), not revived from the tombstone
    // the writer kept.
    let (generation, loaded, _) = apply(pool, 11, Some(stale)).await;
    assert_eq!((generation, loaded), (1, 1));
}
