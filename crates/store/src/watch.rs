//! Joins a watch's history with the live event feed without gaps or duplicates.

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::broadcast::{self, error::RecvError};

use crate::{Event, Revision, StoreError, WatchStream};

/// Events of one commit (one or more revisions, in order), as published to live
/// watchers.
pub(crate) type Batch = Arc<Vec<Event>>;

/// `history` holds the matching events from the watch's start revision up to some
/// revision that was committed before `live` was subscribed; live events at or below
/// the last history revision are skipped.
pub(crate) fn join(
    prefix: String,
    history: Vec<Event>,
    after: Revision,
    live: broadcast::Receiver<Batch>,
) -> WatchStream {
    let last = history.last().map_or(after, Event::revision);
    let history = futures::stream::iter(history.into_iter().map(Ok));
    let live = futures::stream::unfold((live, last, false), move |(mut rx, mut last, done)| {
        let prefix = prefix.clone();
        async move {
            if done {
                return None;
            }
            loop {
                match rx.recv().await {
                    Ok(batch) => {
                        let Some(end) = batch.last().map(Event::revision) else {
                            continue;
                        };
                        if end <= last {
                            continue;
                        }
                        let after = last;
                        last = end;
                        let matching: Vec<_> = batch
                            .iter()
                            .filter(|e| e.revision() > after && e.kv.key.starts_with(&prefix))
                            .cloned()
                            .map(Ok)
                            .collect();
                        if !matching.is_empty() {
                            return Some((futures::stream::iter(matching), (rx, last, false)));
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        let err = StoreError::WatchLagged {
                            resume_from: last + 1,
                        };
                        return Some((futures::stream::iter(vec![Err(err)]), (rx, last, true)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    })
    .flatten();
    Box::pin(history.chain(live))
}
