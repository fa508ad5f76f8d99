//! Watch streams: replay the log after `since_revision`, then go live from the fan-out, with
//! bookmarks when idle; a snapshot (after a typed resync) when the log no longer reaches back.

use std::{collections::HashSet, sync::Arc};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use xpu_proto::broker::v1 as pb;

use super::Context;
use crate::{
    error::{Error, Result},
    hub::{Filter, Item, StreamClass, StreamTracker, Subscription},
    identity::Identity,
    model::{
        Key, Kind, Labels,
        convert::{resource_from_event, resource_from_stored},
        event::{ChangeKind, Event},
    },
    store::LogFilter,
};

pub type EventStream = ReceiverStream<Result<pb::WatchEvent>>;

/// What one stream may see.
#[derive(Clone, Debug)]
pub enum Scope {
    /// A DPU's desired state: its Netdevs and the selector-routed objects matching its labels.
    Dpu(String),
    Kinds(Vec<Kind>),
}

/// Messages buffered towards the client; small, because the fan-out queue behind is the buffer
/// that matters (and the one whose overflow cuts a slow client off).
const OUT_BUFFER: usize = 64;
const PAGE: usize = 500;
/// Longest a snapshot waits for the client to take one message.
const SNAPSHOT_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub fn open(ctx: &Context, who: &Identity, scope: Scope, since: i64) -> EventStream {
    let (tx, rx) = mpsc::channel(OUT_BUFFER);
    let ctx = ctx.clone();
    let class = match who {
        Identity::Dpu(_) => StreamClass::Agent,
        Identity::Cluster { .. } => StreamClass::Cluster,
        Identity::Admin(_) | Identity::Host(_) => StreamClass::Admin,
    };
    let tracker = ctx.hub.track(who.to_string(), class, since.max(0));
    tokio::spawn(async move {
        let mut w = Watch { ctx, scope, tx, labels: Labels::new(), pos: since.max(0), tracker };
        if let Err(e) = w.run().await {
            let _ = w.tx.send(Err(e)).await;
        }
    });
    ReceiverStream::new(rx)
}

struct Watch {
    ctx: Context,
    scope: Scope,
    tx: mpsc::Sender<Result<pb::WatchEvent>>,
    labels: Labels,
    pos: i64,
    tracker: StreamTracker,
}

/// The client went away: stop quietly.
struct Gone;

impl From<Gone> for Error {
    fn from(_: Gone) -> Error {
        Error::internal("client gone")
    }
}

fn event(revision: i64, e: pb::watch_event::Event) -> pb::WatchEvent {
    pb::WatchEvent { revision, event: Some(e) }
}

impl Watch {
    async fn send(&self, ev: pb::WatchEvent) -> Result<(), Gone> {
        let revision = ev.revision;
        self.tx.send(Ok(ev)).await.map_err(|_| Gone)?;
        self.tracker.delivered(revision);
        Ok(())
    }

    async fn load_labels(&mut self) -> Result<()> {
        if let Scope::Dpu(serial) = &self.scope {
            self.labels = self.ctx.store.dpu_labels(serial).await?.ok_or_else(|| {
                Error::FailedPrecondition(format!("dpu {serial} is not registered; call Register first"))
            })?;
        }
        Ok(())
    }

    fn subscribe(&self) -> Subscription {
        let filter = match &self.scope {
            Scope::Dpu(serial) => Filter::Dpu { serial: serial.clone(), labels: self.labels.clone() },
            Scope::Kinds(kinds) => Filter::Kinds(kinds.iter().copied().collect::<HashSet<_>>()),
        };
        self.ctx.hub.subscribe(filter)
    }

    async fn run(&mut self) -> Result<()> {
        let turn = self.ctx.store.opening_turn().await?;
        self.load_labels().await?;
        let mut sub = self.subscribe();
        let (head, compacted) = self.ctx.store.head().await?;
        drop(turn);
        let outcome = if self.pos == 0 {
            self.snapshot(pb::resync::Reason::Initial).await
        } else if self.pos < compacted || self.pos > head {
            // Older than the horizon, or from a future this store never had (a restored
            // database): either way the client's view cannot be patched up.
            self.snapshot(pb::resync::Reason::ResyncRequired).await
        } else {
            self.replay_to(head).await
        };
        match outcome {
            Ok(()) => {}
            Err(Some(e)) => return Err(e),
            Err(None) => return Ok(()),
        }
        loop {
            tokio::select! {
                item = sub.recv() => {
                    let Some(item) = item else {
                        if sub.lagged() {
                            return Err(Error::ResourceExhausted(format!(
                                "the stream fell behind the change rate; resume from revision {}", self.pos
                            )));
                        }
                        return Err(Error::ShuttingDown(format!(
                            "the broker is shutting down; resume from revision {}", self.pos
                        )));
                    };
                    let step = match item {
                        Item::Event(ev) => self.live(&ev).await,
                        Item::Bookmark(rev) if rev > self.pos => {
                            self.pos = rev;
                            self.send(event(rev, pb::watch_event::Event::Bookmark(pb::Bookmark {}))).await.map_err(|_| None)
                        }
                        Item::Bookmark(_) => Ok(()),
                    };
                    match step {
                        Ok(()) => {}
                        Err(Some(e)) => return Err(e),
                        Err(None) => return Ok(()),
                    }
                }
                () = self.tx.closed() => return Ok(()),
            }
        }
    }

    /// `Err(None)`: the client went away.
    async fn live(&mut self, ev: &Arc<Event>) -> Result<(), Option<Error>> {
        if ev.revision <= self.pos {
            return Ok(());
        }
        if let (Scope::Dpu(serial), Kind::Dpu) = (&self.scope, ev.key.kind)
            && ev.key.name == *serial
            && ev.change == ChangeKind::Spec
            && ev.labels != self.labels
        {
            // Its labels changed: what it should hold may differ anywhere.
            self.load_labels().await.map_err(Some)?;
            return self.snapshot(pb::resync::Reason::ResyncRequired).await;
        }
        self.pos = ev.revision;
        match self.render(ev).map_err(Some)? {
            Some(out) => self.send(out).await.map_err(|_| None),
            None => Ok(()),
        }
    }

    /// Replays the log, then tells the client it is current up to `head` (read after the
    /// subscription was registered) or the last replayed change: changes after it arrive live,
    /// and those before it that this stream filters out would otherwise leave the client below
    /// the head until the next change that concerns it. The bookmark is sent even when the
    /// client resumed at the head and nothing was replayed: it is how a resumed client learns
    /// it is current.
    async fn replay_to(&mut self, head: i64) -> Result<(), Option<Error>> {
        self.replay().await?;
        self.pos = self.pos.max(head);
        self.send(event(self.pos, pb::watch_event::Event::Bookmark(pb::Bookmark {}))).await.map_err(|_| None)
    }

    async fn replay(&mut self) -> Result<(), Option<Error>> {
        let filter = match &self.scope {
            Scope::Dpu(serial) => LogFilter::Dpu { serial: serial.clone(), labels: self.labels.clone() },
            Scope::Kinds(kinds) => LogFilter::Kinds(kinds.clone()),
        };
        loop {
            let turn = self.ctx.store.opening_turn().await.map_err(Some)?;
            let (events, compacted) = self.ctx.store.read_log(self.pos, PAGE, &filter).await.map_err(Some)?;
            drop(turn);
            if compacted > self.pos {
                return self.snapshot(pb::resync::Reason::ResyncRequired).await;
            }
            if events.is_empty() {
                return Ok(());
            }
            for ev in events {
                if let (Scope::Dpu(serial), Kind::Dpu, ChangeKind::Spec) = (&self.scope, ev.key.kind, ev.change)
                    && ev.key.name == *serial
                {
                    // Its labels may have changed while it was away.
                    self.load_labels().await.map_err(Some)?;
                    return self.snapshot(pb::resync::Reason::ResyncRequired).await;
                }
                self.pos = ev.revision;
                if let Some(out) = self.render(&ev).map_err(Some)? {
                    self.send(out).await.map_err(|_| None)?;
                }
            }
        }
    }

    /// What a change means to this stream, if anything.
    fn render(&self, ev: &Event) -> Result<Option<pb::WatchEvent>> {
        let ty = match &self.scope {
            Scope::Kinds(kinds) => {
                if !kinds.contains(&ev.key.kind) {
                    return Ok(None);
                }
                match ev.change {
                    ChangeKind::Spec => pb::ChangeType::Spec,
                    ChangeKind::Status => pb::ChangeType::Status,
                    ChangeKind::Deleted => pb::ChangeType::Deleted,
                }
            }
            Scope::Dpu(serial) => {
                if ev.change == ChangeKind::Status || matches!(ev.key.kind, Kind::Dpu | Kind::XpuNetwork) {
                    return Ok(None);
                }
                let now = ev.route.reaches(serial, &self.labels);
                let before = ev.prev_route.as_ref().is_some_and(|p| p.reaches(serial, &self.labels));
                match ev.change {
                    ChangeKind::Spec if now => pb::ChangeType::Spec,
                    // Moved away from this DPU: to it, that is a delete.
                    ChangeKind::Spec if before => pb::ChangeType::Deleted,
                    ChangeKind::Deleted if now => pb::ChangeType::Deleted,
                    _ => return Ok(None),
                }
            }
        };
        let mut object = resource_from_event(ev)?;
        if ty == pb::ChangeType::Deleted {
            strip_to_metadata(&mut object, ev.revision);
        }
        let change = pb::Change { r#type: ty as i32, object: Some(object) };
        Ok(Some(event(ev.revision, pb::watch_event::Event::Change(change))))
    }

    /// Sends the whole current view, then `SnapshotEnd`; the stream continues after it.
    async fn snapshot(&mut self, reason: pb::resync::Reason) -> Result<(), Option<Error>> {
        let mut snap = self.ctx.store.snapshot().await.map_err(Some)?;
        let compacted = snap.compacted();
        let revision = snap.revision();
        let resync = pb::Resync { reason: reason as i32, compacted_revision: compacted };
        self.send(event(revision, pb::watch_event::Event::Resync(resync))).await.map_err(|_| None)?;
        let (kinds, dpu): (Vec<Kind>, Option<String>) = match &self.scope {
            Scope::Dpu(serial) => {
                let mut k = vec![Kind::Netdev];
                k.extend(Kind::SELECTOR_ROUTED);
                (k, Some(serial.clone()))
            }
            Scope::Kinds(kinds) => (kinds.clone(), None),
        };
        let mut after: Option<Key> = None;
        loop {
            let page = snap.page(&kinds, dpu.as_deref(), dpu.is_none(), after.as_ref(), PAGE).await.map_err(Some)?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            let last_page = page.len() < PAGE;
            for obj in page {
                if let Some(serial) = &dpu {
                    let route = obj.typed_spec().map_err(Some)?.route();
                    if !route.reaches(serial, &self.labels) {
                        continue;
                    }
                }
                let mut object = resource_from_stored(&obj).map_err(Some)?;
                if dpu.is_some() {
                    // A DPU needs the spec; other DPUs' statuses are none of its business.
                    strip_status(&mut object);
                }
                let change = pb::Change { r#type: pb::ChangeType::Snapshot as i32, object: Some(object) };
                // A snapshot holds a database connection: a client that stops reading gives it up.
                match tokio::time::timeout(
                    SNAPSHOT_SEND_TIMEOUT,
                    self.send(event(obj.revision, pb::watch_event::Event::Change(change))),
                )
                .await
                {
                    Ok(sent) => sent.map_err(|_| None)?,
                    Err(_) => {
                        return Err(Some(Error::ResourceExhausted(
                            "the snapshot was not read in time; reconnect to start it again".into(),
                        )));
                    }
                }
            }
            if last_page {
                break;
            }
        }
        drop(snap);
        self.pos = revision;
        self.send(event(revision, pb::watch_event::Event::SnapshotEnd(pb::SnapshotEnd {}))).await.map_err(|_| None)
    }
}

fn strip_status(res: &mut pb::Resource) {
    use pb::resource::Kind as R;
    match res.kind.as_mut() {
        Some(R::Netdev(o)) => o.status = None,
        Some(R::LogicalBridge(o)) => o.status = None,
        Some(R::Vrf(o)) => o.status = None,
        Some(R::Svi(o)) => o.status = None,
        Some(R::FlowPolicy(o)) => o.status = None,
        Some(R::Dpu(o)) => o.status = None,
        Some(R::XpuNetwork(o)) => o.status = None,
        None => {}
    }
}

/// A delete carries only the object's identity.
fn strip_to_metadata(res: &mut pb::Resource, revision: i64) {
    use pb::resource::Kind as R;
    strip_status(res);
    let meta = match res.kind.as_mut() {
        Some(R::Netdev(o)) => {
            o.spec = None;
            o.metadata.as_mut()
        }
        Some(R::LogicalBridge(o)) => {
            o.spec = None;
            o.metadata.as_mut()
        }
        Some(R::Vrf(o)) => {
            o.spec = None;
            o.metadata.as_mut()
        }
        Some(R::Svi(o)) => {
            o.spec = None;
            o.metadata.as_mut()
        }
        Some(R::FlowPolicy(o)) => {
            o.spec = None;
            o.metadata.as_mut()
        }
        Some(R::Dpu(o)) => {
            o.spec = None;
            o.metadata.as_mut()
        }
        Some(R::XpuNetwork(o)) => {
            o.spec = None;
            o.metadata.as_mut()
        }
        None => None,
    };
    if let Some(m) = meta {
        m.deletion_revision = revision;
    }
}
