//! Status reporting: the latest status of every object, sent to the broker in batches with a
//! monotonic per-agent sequence number, and sent again after every reconnect.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Mutex,
    time::Duration,
};

use tokio::sync::Notify;
use tonic::transport::Channel;
use xpu_proto::broker::v1::{self as pb, agent_service_client::AgentServiceClient};

use crate::dataplane::ObjKey;

/// Most reports in one ReportStatus call.
const BATCH: usize = 500;

#[derive(Clone, Debug, PartialEq)]
pub enum Body {
    Netdev(pb::NetdevStatus),
    Object(pb::DpuObjectStatus),
    /// Gone from the dataplane (acknowledges a delete).
    Removed,
}

#[derive(Clone, Debug, PartialEq)]
struct Entry {
    generation: i64,
    body: Body,
}

#[derive(Default)]
struct Book {
    latest: BTreeMap<ObjKey, Entry>,
    pending: BTreeSet<ObjKey>,
    last_seq: u64,
}

#[derive(Default)]
pub struct StatusBook {
    book: Mutex<Book>,
    notify: Notify,
}

impl StatusBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the latest status of an object; queues it when it changed.
    pub fn set(&self, key: &ObjKey, generation: i64, body: Body) {
        let entry = Entry { generation, body };
        let mut b = self.lock();
        if b.latest.get(key) == Some(&entry) {
            return;
        }
        b.latest.insert(key.clone(), entry);
        b.pending.insert(key.clone());
        drop(b);
        self.notify.notify_one();
    }

    pub fn get(&self, key: &ObjKey) -> Option<(i64, Body)> {
        self.lock().latest.get(key).map(|e| (e.generation, e.body.clone()))
    }

    /// After a (re)connect: the broker may have missed anything, so everything goes again, with
    /// sequence numbers above what it holds.
    pub fn resend_all(&self, floor: u64) {
        let mut b = self.lock();
        b.last_seq = b.last_seq.max(floor);
        let keys: Vec<ObjKey> = b.latest.keys().cloned().collect();
        b.pending.extend(keys);
        drop(b);
        self.notify.notify_one();
    }

    fn take(&self) -> Vec<(ObjKey, pb::StatusReport)> {
        let mut b = self.lock();
        let keys: Vec<ObjKey> = b.pending.iter().take(BATCH).cloned().collect();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            b.pending.remove(&key);
            let Some(entry) = b.latest.get(&key).cloned() else { continue };
            b.last_seq += 1;
            let seq = b.last_seq;
            let (status, removed) = match entry.body {
                Body::Netdev(s) => (Some(pb::status_report::Status::Netdev(s)), false),
                Body::Object(s) => (Some(pb::status_report::Status::Object(s)), false),
                Body::Removed => (None, true),
            };
            let report = pb::StatusReport {
                key: Some(key.to_proto()),
                observed_generation: entry.generation,
                seq,
                status,
                removed,
            };
            out.push((key, report));
        }
        out
    }

    fn requeue(&self, keys: impl IntoIterator<Item = ObjKey>) {
        let mut b = self.lock();
        for k in keys {
            if b.latest.contains_key(&k) {
                b.pending.insert(k);
            }
        }
    }

    /// Forgets acknowledged removals and objects the broker no longer has.
    fn settle(&self, sent: &[(ObjKey, pb::StatusReport)], results: &[pb::StatusResult]) {
        let mut b = self.lock();
        for ((key, report), result) in sent.iter().zip(results) {
            let gone = result.outcome == pb::ReportOutcome::NotFound as i32;
            if (report.removed || gone)
                && !b.pending.contains(key)
                && b.latest.get(key).is_some_and(|e| e.body == Body::Removed || gone)
            {
                b.latest.remove(key);
            }
        }
    }

    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }
}

/// Sends queued statuses until the connection fails (the session then reconnects).
pub async fn flush_loop(
    book: &StatusBook,
    mut client: AgentServiceClient<Channel>,
    serial: &str,
) -> anyhow::Result<()> {
    loop {
        let batch = book.take();
        if batch.is_empty() {
            // A report goes out at once; reports that come in while a call is in flight are
            // batched into the next call.
            tokio::select! {
                () = book.notify.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        let reports = batch.iter().map(|(_, r)| r.clone()).collect();
        let netdevs = batch.iter().any(|(k, _)| k.kind == crate::dataplane::ObjKind::Netdev);
        if netdevs {
            xpu_sync_common::failpoint::hit("netdev.report.before");
        }
        match client.report_status(super::unary(pb::ReportStatusRequest { serial: serial.to_string(), reports })).await
        {
            Ok(resp) => {
                tracing::debug!(reports = batch.len(), "statuses reported");
                if netdevs {
                    xpu_sync_common::failpoint::hit("netdev.report.after");
                }
                book.settle(&batch, &resp.into_inner().results);
            }
            Err(e) => {
                book.requeue(batch.into_iter().map(|(k, _)| k));
                return Err(anyhow::anyhow!("ReportStatus failed: {}: {}", e.code(), e.message()));
            }
        }
    }
}
