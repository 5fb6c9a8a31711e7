//! Watches: events in order, resume from a resourceVersion, bookmarks, 410 when too old.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

use crate::{TestServer, pod};

async fn next_any(
    s: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<Pod>>> + Unpin),
) -> WatchEvent<Pod> {
    tokio::time::timeout(Duration::from_secs(10), s.try_next())
        .await
        .expect("event within 10s")
        .expect("no stream error")
        .expect("stream open")
}

/// The next event that is not a bookmark.
pub async fn next(
    s: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<Pod>>> + Unpin),
) -> WatchEvent<Pod> {
    loop {
        match next_any(s).await {
            WatchEvent::Bookmark(_) => continue,
            other => return other,
        }
    }
}

/// A watch from `rv` starts with a 410 ERROR event: too old to resume.
async fn expect_expired(pods: &Api<Pod>, rv: &str) {
    let mut s = pods
        .watch(&WatchParams::default(), rv)
        .await
        .unwrap()
        .boxed();
    match next(&mut s).await {
        WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_delivers_added_modified_deleted_and_resumes() {
    let t = TestServer::start().await;
    let pods: Api<Pod> = Api::namespaced(t.admin(), "default");
    let created = pods
        .create(&PostParams::default(), &pod("w", json!({})))
        .await
        .unwrap();
    let rv = created.metadata.resource_version.clone().unwrap();
    let mut s = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    pods.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"v": "2"}}})),
    )
    .await
    .unwrap();
    let modified_rv = match next(&mut s).await {
        WatchEvent::Modified(p) => p.metadata.resource_version.unwrap(),
        other => panic!("expected MODIFIED, got {other:?}"),
    };
    drop(s);
    // While nobody watches: a delete. Resuming from the last seen version replays it.
    pods.delete("w", &DeleteParams::default()).await.unwrap();
    let mut s = pods
        .watch(&WatchParams::default(), &modified_rv)
        .await
        .unwrap()
        .boxed();
    match next(&mut s).await {
        WatchEvent::Deleted(p) => assert_eq!(p.metadata.name.as_deref(), Some("w")),
        other => panic!("expected DELETED, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_selector_watch_sees_objects_leave_the_selection() {
    let t = TestServer::start().await;
    let pods: Api<Pod> = Api::namespaced(t.admin(), "default");
    let mut s = pods
        .watch(&WatchParams::default().labels("tier=front"), "0")
        .await
        .unwrap()
        .boxed();
    pods.create(&PostParams::default(), &pod("a", json!({"tier": "front"})))
        .await
        .unwrap();
    assert!(matches!(next(&mut s).await, WatchEvent::Added(_)));
    pods.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"tier": "back"}}})),
    )
    .await
    .unwrap();
    assert!(
        matches!(next(&mut s).await, WatchEvent::Deleted(_)),
        "leaving the selection looks like a delete"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_arrive_and_too_old_versions_get_410() {
    let t = TestServer::start_with(|c| {
        c.watch_history = 5;
        c.watch_history_min_age = std::time::Duration::ZERO;
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(t.admin(), "default");
    let first = pods
        .create(&PostParams::default(), &pod("p0", json!({})))
        .await
        .unwrap();
    let old_rv = first.metadata.resource_version.unwrap();
    for i in 1..20 {
        pods.create(&PostParams::default(), &pod(&format!("p{i}"), json!({})))
            .await
            .unwrap();
    }
    expect_expired(&pods, &old_rv).await;
    let current = pods
        .list(&Default::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut s = pods
        .watch(&WatchParams::default(), &current)
        .await
        .unwrap()
        .boxed();
    match next_any(&mut s).await {
        WatchEvent::Bookmark(b) => assert_eq!(b.metadata.resource_version, current),
        other => panic!("expected a BOOKMARK, got {other:?}"),
    }
}

/// Events younger than the minimum age stay beyond the history's count (up to
/// four times it): a watcher that fell behind by more events than that resumes
/// instead of relisting; beyond four times, it gets 410 all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_events_stay_beyond_the_history_count_up_to_four_times_it() {
    let t = TestServer::start_with(|c| {
        c.watch_history = 5;
        c.watch_history_min_age = Duration::from_secs(600);
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(t.admin(), "default");
    let mut rvs = Vec::new();
    for i in 0..25 {
        let p = pods
            .create(&PostParams::default(), &pod(&format!("p{i}"), json!({})))
            .await
            .unwrap();
        rvs.push(p.metadata.resource_version.unwrap());
    }
    // 15 events behind: three times the count, resumed in order.
    let mut s = pods
        .watch(&WatchParams::default(), &rvs[9])
        .await
        .unwrap()
        .boxed();
    for i in 10..25 {
        match next(&mut s).await {
            WatchEvent::Added(p) => assert_eq!(p.metadata.name, Some(format!("p{i}"))),
            other => panic!("expected p{i} added, got {other:?}"),
        }
    }
    // 24 behind: more than four times the count.
    expect_expired(&pods, &rvs[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_runtime_watcher_follows_changes() {
    use kube::runtime::watcher;
    let t = TestServer::start().await;
    let pods: Api<Pod> = Api::namespaced(t.admin(), "default");
    pods.create(&PostParams::default(), &pod("before", json!({})))
        .await
        .unwrap();
    let mut w = watcher(pods.clone(), watcher::Config::default()).boxed();
    let mut seen = Vec::new();
    let mut created_after = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        let ev = tokio::time::timeout(Duration::from_secs(10), w.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match ev {
            watcher::Event::InitDone if !created_after => {
                created_after = true;
                pods.create(&PostParams::default(), &pod("after", json!({})))
                    .await
                    .unwrap();
            }
            watcher::Event::InitApply(p) | watcher::Event::Apply(p) => {
                seen.push(p.metadata.name.unwrap());
                if seen.contains(&"after".to_string()) {
                    break;
                }
            }
            _ => {}
        }
    }
    assert!(
        seen.contains(&"before".to_string()) && seen.contains(&"after".to_string()),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_of_a_multi_object_transaction_is_delivered() {
    let t = TestServer::start().await;
    let pods: Api<Pod> = Api::namespaced(t.admin(), "default");
    let rv = t.revision().await.to_string();
    let mut w = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    // Two pods written in one store transaction share one revision.
    let mut txn = meridian_store::Txn::new();
    for name in ["tx-a", "tx-b"] {
        let key = format!("/registry/core/pods/default/{name}");
        let v = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "uid": name},
            "spec": {"containers": [{"name": "c", "image": "i"}]}});
        txn = txn
            .when(key.clone(), 0)
            .put(key, serde_json::to_vec(&v).unwrap());
    }
    assert!(t.server.state.store.txn(txn).await.unwrap().succeeded);
    let mut names = Vec::new();
    for _ in 0..2 {
        match next(&mut w).await {
            WatchEvent::Added(p) => names.push(p.metadata.name.unwrap()),
            e => panic!("{e:?}"),
        }
    }
    names.sort();
    assert_eq!(names, ["tx-a", "tx-b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_selected_by_their_nodes_region() {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::ListParams;
    let t = TestServer::start().await;
    let nodes: Api<Node> = Api::all(t.admin());
    for (name, region) in [("n-east", "east"), ("n-west", "west")] {
        let node: Node = serde_json::from_value(
            json!({"metadata": {"name": name, "labels": {"meridian.io/region": region}}}),
        )
        .unwrap();
        nodes.create(&PostParams::default(), &node).await.unwrap();
    }
    let pods: Api<Pod> = Api::all(t.admin());
    let in_default: Api<Pod> = Api::namespaced(t.admin(), "default");
    let bound = |name: &str, node: Option<&str>| {
        let mut p = pod(name, json!({}));
        p.spec.as_mut().unwrap().node_name = node.map(str::to_owned);
        p
    };
    for (name, node) in [
        ("e1", Some("n-east")),
        ("w1", Some("n-west")),
        ("e2", Some("n-east")),
        ("free", None),
        ("ghost", Some("no-such-node")),
    ] {
        in_default
            .create(&PostParams::default(), &bound(name, node))
            .await
            .unwrap();
    }
    let east = ListParams::default().fields("meridian.io/region=east");
    let mut names: Vec<String> = pods
        .list(&east)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| p.metadata.name.unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["e1", "e2"]);
    // Watching from now: a west pod's change is not delivered, the next east
    // pod is (events arrive in order, so nothing else came between).
    let rv = t.revision().await.to_string();
    let mut w = pods
        .watch(
            &WatchParams::default().fields("meridian.io/region=east"),
            &rv,
        )
        .await
        .unwrap()
        .boxed();
    in_default
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await
        .unwrap();
    in_default
        .create(&PostParams::default(), &bound("e3", Some("n-east")))
        .await
        .unwrap();
    match next(&mut w).await {
        WatchEvent::Added(p) => assert_eq!(p.metadata.name.as_deref(), Some("e3")),
        other => panic!("expected e3 ADDED, got {other:?}"),
    }
    in_default
        .delete("e1", &DeleteParams::default())
        .await
        .unwrap();
    match next(&mut w).await {
        WatchEvent::Deleted(p) => assert_eq!(p.metadata.name.as_deref(), Some("e1")),
        other => panic!("expected e1 DELETED, got {other:?}"),
    }
    // Only pods have the derived field.
    let err = nodes
        .list(&ListParams::default().fields("meridian.io/region=east"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 400 && s.message.contains("field label not supported")),
        "{err:?}"
    );
}
