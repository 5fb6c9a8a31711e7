//! Watch streams: newline-delimited JSON events, served from the watch cache.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{StatusCode, header};
use meridian_api::{ApiError, Reason, Resource};
use meridian_store::Revision;
use serde_json::json;
use tokio::sync::{broadcast::error::RecvError, mpsc};

use crate::cache::{CacheError, CacheEvent, CachedObject, WatchKind};
use crate::handlers::{Ctx, Filter};
use crate::tenancy::View;

struct Watcher {
    resource: &'static Resource,
    tenant: Option<String>,
    prefix: String,
    filter: Filter,
    /// `kubectl get -w`: each object as a one-row Table (the cache is for cells
    /// that look at other objects, such as a pod's node's city).
    table: Option<Arc<crate::cache::Cache>>,
}

impl Watcher {
    fn visible(&self, o: &CachedObject) -> bool {
        o.key.starts_with(&self.prefix) && self.filter.matches(o)
    }

    fn line(&self, kind: &str, o: &CachedObject) -> Bytes {
        let view = View {
            tenant: self.tenant.as_deref(),
        };
        let mut json = view.render(self.resource, &o.json);
        if let Some(cache) = &self.table
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&json)
        {
            let md = json!({"resourceVersion": v["metadata"]["resourceVersion"]});
            let t = crate::table::render(self.resource.kind, &[v], &cache.snapshot(), md);
            json = Bytes::from(t.to_string());
        }
        let mut out = Vec::with_capacity(json.len() + 32);
        out.extend_from_slice(b"{\"type\":\"");
        out.extend_from_slice(kind.as_bytes());
        out.extend_from_slice(b"\",\"object\":");
        out.extend_from_slice(&json);
        out.extend_from_slice(b"}\n");
        Bytes::from(out)
    }

    /// The line for a change, as seen through this watch's filter: an object that
    /// starts matching is ADDED, one that stops matching is DELETED.
    fn event(&self, e: &CacheEvent) -> Option<Bytes> {
        let now = self.visible(&e.object);
        let before = e.prev.as_deref().is_some_and(|p| self.visible(p));
        let kind = match (e.kind, before, now) {
            (WatchKind::Deleted, true, _) | (WatchKind::Deleted, _, true) => WatchKind::Deleted,
            (WatchKind::Deleted, false, false) => return None,
            (_, false, true) => WatchKind::Added,
            (_, true, true) => WatchKind::Modified,
            (_, true, false) => WatchKind::Deleted,
            (_, false, false) => return None,
        };
        Some(self.line(kind.as_str(), &e.object))
    }

    fn bookmark(&self, rv: Revision) -> Bytes {
        let obj = json!({"type": "BOOKMARK", "object": {
            "kind": self.resource.kind, "apiVersion": self.resource.api_version(),
            "metadata": {"resourceVersion": rv.to_string()}}});
        Bytes::from(format!("{obj}\n"))
    }
}

fn stream_response(rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Response {
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(body)
        .unwrap_or_default()
}

pub async fn serve(cx: &Ctx<'_>) -> Result<Response, ApiError> {
    let r = cx.target.resource;
    let watcher = Watcher {
        resource: r,
        tenant: cx.who.tenant().map(str::to_owned),
        prefix: cx.view().prefix(r, cx.target.namespace.as_deref()),
        filter: Filter::from_query(cx)?,
        table: crate::table::wanted(&cx.headers).then(|| cx.state.cache.clone()),
    };
    if let Some(name) = &cx.target.name {
        // Watching one object by name is expressed as a field selector by clients.
        return Err(ApiError::bad_request(format!(
            "watch by name ({name}) is not supported; use fieldSelector=metadata.name={name}"
        )));
    }
    let bookmarks = cx.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = match cx.query.get("timeoutSeconds") {
        None => Duration::from_secs(1800),
        Some(s) => Duration::from_secs(
            s.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {s:?}")))?
                .min(3600),
        ),
    };
    let after: Option<Revision> = match cx.query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(rv) => Some(
            rv.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
        ),
    };
    let cache = cx.state.cache.clone();
    if let Some(rv) = after {
        cache
            .wait_for(rv, Duration::from_secs(3))
            .await
            .map_err(|_| {
                ApiError::new(
                    Reason::Timeout,
                    format!(
                        "Too large resource version: {rv}, current: {}",
                        cache.revision()
                    ),
                )
            })?;
    }
    let (tx, rx) = mpsc::channel(256);
    let sub = match cache.subscribe(after) {
        Ok(s) => s,
        Err(e @ CacheError::TooOld { .. }) => {
            // Like kube-apiserver: 200 and one ERROR event carrying 410 Expired.
            let status = ApiError::gone(e.to_string()).to_status();
            let line = Bytes::from(format!("{}\n", json!({"type": "ERROR", "object": status})));
            let _ = tx.try_send(Ok(line));
            return Ok(stream_response(rx));
        }
        Err(e) => return Err(e.into()),
    };
    let state = cx.state.clone();
    let interval = state.config.bookmark_interval;
    tokio::spawn(async move {
        state.metrics.watchers.inc();
        let crate::cache::Subscription {
            snapshot,
            mut history,
            mut live,
        } = sub;
        let mut progress = after.unwrap_or(snapshot.revision);
        // Live events up to here are already covered by the snapshot and history.
        // (Several events can share one revision: a transaction writing several
        // objects; all of them are sent.)
        let mut covered = progress;
        let mut snapshot = Some(snapshot);
        let send = |b: Bytes| tx.send(Ok(b));
        let run = async {
            // The snapshot and the history are let go once replayed: held for the
            // watch's life (30 minutes), each watch kept the versions of every
            // object as they were when it began (a copy of the tree's nodes and
            // every since-changed object: with a million pods, gigabytes).
            if let Some(snap) = snapshot.take()
                && after.is_none()
            {
                for o in snap.range(&watcher.prefix, None) {
                    if watcher.filter.matches(o) && send(watcher.line("ADDED", o)).await.is_err() {
                        return;
                    }
                }
            }
            for e in std::mem::take(&mut history) {
                progress = e.revision;
                covered = e.revision;
                if let Some(line) = watcher.event(&e)
                    && send(line).await.is_err()
                {
                    return;
                }
            }
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut ticker = tokio::time::interval(interval);
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = state.shutdown.cancelled() => return,
                    _ = &mut deadline => return,
                    _ = tx.closed() => return,
                    _ = ticker.tick(), if bookmarks => {
                        if send(watcher.bookmark(progress)).await.is_err() {
                            return;
                        }
                    }
                    e = live.recv() => match e {
                        Ok(e) => {
                            if e.revision <= covered {
                                continue;
                            }
                            progress = e.revision;
                            if let Some(line) = watcher.event(&e)
                                && send(line).await.is_err() {
                                    return;
                                }
                        }
                        // Too slow to keep up: end the watch; the client resumes from
                        // the last resourceVersion it saw. A bookmark first, so that is
                        // the last event looked at, not the last one that matched (a
                        // selective watch's last match can be far behind, out of the
                        // event window: a relist instead of a resume).
                        Err(RecvError::Lagged(_)) => {
                            if bookmarks {
                                let _ = send(watcher.bookmark(progress)).await;
                            }
                            return;
                        }
                        Err(RecvError::Closed) => return,
                    }
                }
            }
        };
        run.await;
        state.metrics.watchers.dec();
    });
    Ok(stream_response(rx))
}

#[allow(dead_code)]
fn _assert_send(w: Watcher) -> impl Send {
    Arc::new(w)
}
