//! Watch: replay from the history, then live events, as newline-delimited JSON `WatchEvent`s.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{ApiError, ApiResult};
use crate::read::Target;
use crate::selector::Selectors;
use crate::store::{Event, EventType, Store};

/// Watch query parameters.
#[derive(Debug, Clone)]
pub struct WatchParams {
    /// `resourceVersion`: `None`/`""`/`"0"` start with synthetic `ADDED` events for the current state.
    pub resource_version: Option<String>,
    pub selectors: Selectors,
    /// `allowWatchBookmarks=true`.
    pub bookmarks: bool,
    /// `sendInitialEvents=true`: after the initial `ADDED`s, a bookmark annotated
    /// `k8s.io/initial-events-end` (only honoured when starting from the current state).
    pub send_initial_events: bool,
    /// `timeoutSeconds` (the stream ends after it).
    pub timeout: Duration,
    pub bookmark_interval: Duration,
}

/// Turns a stored object into what the client receives (the right apiVersion, or a Table).
pub type Presenter = Box<dyn Fn(Value) -> Value + Send + Sync>;

fn line(event_type: &str, object: Value) -> Bytes {
    let mut bytes = serde_json::to_vec(&json!({"type": event_type, "object": object})).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn expired_line(message: String) -> Bytes {
    line("ERROR", ApiError::expired(message).to_status())
}

/// What a watcher with this target and selectors sees of one event, if anything.
fn visible(t: &Target, sel: &Selectors, e: &Event) -> Option<(&'static str, Value)> {
    if e.gr != t.rt.group_resource() || t.namespace.as_deref().is_some_and(|ns| ns != e.namespace) {
        return None;
    }
    let now = sel.matches(&e.object);
    let before = e.prev.as_ref().is_some_and(|p| sel.matches(p));
    let event_type = match e.event_type {
        EventType::Added if now => EventType::Added,
        EventType::Deleted if now => EventType::Deleted,
        EventType::Modified if now && before => EventType::Modified,
        EventType::Modified if now => EventType::Added,
        EventType::Modified if before => EventType::Deleted,
        _ => return None,
    };
    Some((event_type.as_str(), e.object.clone()))
}

struct Watcher {
    target: Target,
    params: WatchParams,
    present: Presenter,
    out: mpsc::Sender<Result<Bytes, Infallible>>,
    /// The newest resourceVersion this watcher has seen (of any resource): what bookmarks carry.
    last_rv: u64,
}

impl Watcher {
    async fn send(&self, bytes: Bytes) -> bool {
        self.out.send(Ok(bytes)).await.is_ok()
    }

    async fn send_event(&self, event_type: &str, object: Value) -> bool {
        self.send(line(event_type, (self.present)(object))).await
    }

    async fn bookmark(&self, initial_end: bool) -> bool {
        let mut metadata = json!({"resourceVersion": self.last_rv.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let rt = &self.target.rt;
        self.send(line("BOOKMARK", json!({"apiVersion": rt.api_version(), "kind": rt.kind, "metadata": metadata})))
            .await
    }

    async fn run(
        mut self,
        initial: Vec<(&'static str, Value)>,
        mut rx: broadcast::Receiver<Arc<Event>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let initial_end = self.params.bookmarks && self.params.send_initial_events;
        for (event_type, object) in initial {
            if !self.send_event(event_type, object).await {
                return;
            }
        }
        if initial_end && !self.bookmark(true).await {
            return;
        }
        let deadline = tokio::time::sleep(self.params.timeout);
        tokio::pin!(deadline);
        let mut ticks = tokio::time::interval(self.params.bookmark_interval.max(Duration::from_millis(10)));
        ticks.tick().await;
        loop {
            tokio::select! {
                received = rx.recv() => match received {
                    Ok(e) if e.rv > self.last_rv => {
                        self.last_rv = e.rv;
                        if let Some((event_type, object)) = visible(&self.target, &self.params.selectors, &e)
                            && !self.send_event(event_type, object).await
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = self.send(expired_line("watch fell behind the event history".into())).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = ticks.tick(), if self.params.bookmarks => {
                    if !self.bookmark(false).await {
                        return;
                    }
                }
                () = &mut deadline => return,
                _ = stop.changed() => return,
                () = self.out.closed() => return,
            }
        }
    }
}

/// Start a watch; the returned stream is the response body.
pub fn start(
    store: &Store,
    stop: watch::Receiver<bool>,
    target: Target,
    params: WatchParams,
    present: Presenter,
) -> ApiResult<ReceiverStream<Result<Bytes, Infallible>>> {
    let (out, body) = mpsc::channel(256);
    let (initial, rx, last_rv) = {
        let st = store.lock();
        let rx = st.subscribe();
        let from = params.resource_version.as_deref().filter(|rv| !rv.is_empty() && *rv != "0");
        let initial = match from {
            None => st
                .list(&target.rt.group_resource(), target.namespace.as_deref())
                .into_iter()
                .filter(|v| params.selectors.matches(v))
                .map(|v| (EventType::Added.as_str(), v.clone()))
                .collect(),
            Some(rv) => {
                let rv: u64 =
                    rv.parse().map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv:?}")))?;
                match st.events_since(rv) {
                    Some(events) => events.iter().filter_map(|e| visible(&target, &params.selectors, e)).collect(),
                    None => {
                        let message = format!("too old resource version: {rv} ({})", st.compacted_rv() + 1);
                        let _ = out.try_send(Ok(expired_line(message)));
                        return Ok(ReceiverStream::new(body));
                    }
                }
            }
        };
        (initial, rx, st.rv)
    };
    let watcher = Watcher { target, params, present, out, last_rv };
    tokio::spawn(watcher.run(initial, rx, stop));
    Ok(ReceiverStream::new(body))
}
