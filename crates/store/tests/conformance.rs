//! One conformance suite, run unchanged against every backend.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use meridian_store::etcd_server::EtcdServer;
use meridian_store::{
    DynStore, EmbeddedStore, EtcdStore, EventType, MemoryStore, Store, StoreError, Txn, WatchStream,
};
use tempfile::TempDir;

/// A backend under test plus whatever keeps it alive.
struct Backend {
    store: DynStore,
    _guard: Option<(TempDir, Option<EtcdServer>)>,
}

async fn memory() -> Backend {
    Backend {
        store: Arc::new(MemoryStore::new()),
        _guard: None,
    }
}

async fn embedded() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
    Backend {
        store: Arc::new(store),
        _guard: Some((dir, None)),
    }
}

async fn etcd() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let server = EtcdServer::start(dir.path())
        .await
        .expect("etcd must be installed for the conformance suite (the test command installs it)");
    let store = EtcdStore::connect(std::slice::from_ref(&server.client_url))
        .await
        .unwrap();
    Backend {
        store: Arc::new(store),
        _guard: Some((dir, Some(server))),
    }
}

async fn next(w: &mut WatchStream) -> meridian_store::Event {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("watch event within 10s")
        .expect("watch stream open")
        .expect("watch event, not error")
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn revision_grows_by_one_per_write(s: DynStore) {
    let r0 = s.current_revision().await.unwrap();
    let r1 = s.create("/c/a", b("1")).await.unwrap().unwrap();
    assert_eq!(r1, r0 + 1);
    let r2 = s.update("/c/a", b("2"), r1).await.unwrap().unwrap();
    assert_eq!(r2, r1 + 1);
    let kv = s.get("/c/a").await.unwrap().unwrap();
    assert_eq!(kv.value, b("2"));
    assert_eq!(kv.create_revision, r1);
    assert_eq!(kv.mod_revision, r2);
    assert_eq!(s.current_revision().await.unwrap(), r2);
}

async fn create_if_absent_and_cas_guards(s: DynStore) {
    let r1 = s.create("/g/x", b("1")).await.unwrap().unwrap();
    assert_eq!(
        s.create("/g/x", b("other")).await.unwrap(),
        None,
        "second create must fail"
    );
    assert_eq!(s.update("/g/x", b("stale"), r1 - 1).await.unwrap(), None);
    assert_eq!(s.delete("/g/x", r1 + 100).await.unwrap(), None);
    assert_eq!(
        s.get("/g/x").await.unwrap().unwrap().value,
        b("1"),
        "failed CAS changed nothing"
    );
    let rd = s.delete("/g/x", r1).await.unwrap().unwrap();
    assert!(rd > r1);
    assert_eq!(s.get("/g/x").await.unwrap(), None);
    assert_eq!(s.update("/g/x", b("gone"), r1).await.unwrap(), None);
    assert!(
        s.update("/g/x", b("bad"), 0).await.is_err(),
        "update with revision 0 is invalid"
    );
}

async fn range_pages_by_prefix(s: DynStore) {
    for i in 0..25 {
        s.create(&format!("/r/k{i:02}"), b(&i.to_string()))
            .await
            .unwrap()
            .unwrap();
    }
    s.create("/rz", b("outside")).await.unwrap().unwrap();
    s.create("/q", b("outside")).await.unwrap().unwrap();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = s.range("/r/", after.as_deref(), 10).await.unwrap();
        pages += 1;
        assert!(page.kvs.len() <= 10);
        seen.extend(page.kvs.iter().map(|kv| kv.key.clone()));
        after = page.kvs.last().map(|kv| kv.key.clone());
        if !page.more {
            break;
        }
        assert!(pages < 10, "paging must end");
    }
    let expected: Vec<_> = (0..25).map(|i| format!("/r/k{i:02}")).collect();
    assert_eq!(seen, expected);
    assert_eq!(pages, 3);
    let all = s.range("/r/", None, 0).await.unwrap();
    assert_eq!(all.kvs.len(), 25);
    assert!(!all.more);
    assert_eq!(all.revision, s.current_revision().await.unwrap());
}

async fn transactions_are_all_or_nothing(s: DynStore) {
    let ra = s.create("/t/a", b("a")).await.unwrap().unwrap();
    // Second compare fails: nothing of the transaction may be applied.
    let before = s.current_revision().await.unwrap();
    let r = s
        .txn(
            Txn::new()
                .when("/t/a", ra)
                .when("/t/b", 999)
                .put("/t/a", b("a2"))
                .put("/t/c", b("c")),
        )
        .await
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(s.current_revision().await.unwrap(), before);
    assert_eq!(s.get("/t/a").await.unwrap().unwrap().value, b("a"));
    assert_eq!(s.get("/t/c").await.unwrap(), None);
    // All compares hold: every operation lands at one revision.
    let r = s
        .txn(
            Txn::new()
                .when("/t/a", ra)
                .when("/t/b", 0)
                .put("/t/b", b("b"))
                .delete("/t/a"),
        )
        .await
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(r.revision, before + 1);
    assert_eq!(
        s.get("/t/b").await.unwrap().unwrap().mod_revision,
        r.revision
    );
    assert_eq!(s.get("/t/a").await.unwrap(), None);
    // Writing one key twice in a transaction is rejected.
    assert!(matches!(
        s.txn(Txn::new().put("/t/d", b("1")).put("/t/d", b("2")))
            .await,
        Err(StoreError::InvalidRequest(_))
    ));
}

async fn concurrent_cas_has_exactly_one_winner(s: DynStore) {
    let mut rev = s.create("/cas/counter", b("0")).await.unwrap().unwrap();
    for round in 0..5 {
        let mut tasks = Vec::new();
        for w in 0..16 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.update("/cas/counter", b(&format!("{round}-{w}")), rev)
                    .await
                    .unwrap()
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            if let Some(r) = t.await.unwrap() {
                winners.push(r);
            }
        }
        assert_eq!(winners.len(), 1, "exactly one writer wins round {round}");
        rev = winners[0];
        assert_eq!(
            s.get("/cas/counter").await.unwrap().unwrap().mod_revision,
            rev
        );
    }
    // Many concurrent creates of distinct keys all succeed with distinct revisions.
    let mut tasks = Vec::new();
    for i in 0..64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.create(&format!("/cas/k{i}"), b("v"))
                .await
                .unwrap()
                .unwrap()
        }));
    }
    let mut revs = HashSet::new();
    for t in tasks {
        assert!(revs.insert(t.await.unwrap()), "revisions are unique");
    }
}

async fn watch_from_revision_then_live(s: DynStore) {
    let r1 = s.create("/w/a", b("1")).await.unwrap().unwrap();
    let r2 = s.update("/w/a", b("2"), r1).await.unwrap().unwrap();
    s.create("/other/x", b("x")).await.unwrap().unwrap();
    let mut w = s.watch("/w/", r1).await.unwrap();
    let e = next(&mut w).await;
    assert_eq!(
        (e.kind, e.kv.mod_revision, e.kv.value.clone()),
        (EventType::Put, r1, b("1"))
    );
    let e = next(&mut w).await;
    assert_eq!((e.kind, e.kv.mod_revision), (EventType::Put, r2));
    assert_eq!(e.prev.unwrap().value, b("1"));
    let r3 = s.delete("/w/a", r2).await.unwrap().unwrap();
    let e = next(&mut w).await;
    assert_eq!(
        (e.kind, e.kv.mod_revision, e.kv.key.as_str()),
        (EventType::Delete, r3, "/w/a")
    );
    assert_eq!(
        e.prev.unwrap().value,
        b("2"),
        "delete events carry the last value"
    );
    // Live-only watch (from 0) sees only later writes.
    let mut live = s.watch("/w/", 0).await.unwrap();
    let r4 = s.create("/w/b", b("b")).await.unwrap().unwrap();
    assert_eq!(next(&mut live).await.kv.mod_revision, r4);
    assert_eq!(next(&mut w).await.kv.mod_revision, r4);
}

async fn watch_resumes_after_reconnect(s: DynStore) {
    let mut w = s.watch("/res/", 0).await.unwrap();
    let r1 = s.create("/res/a", b("1")).await.unwrap().unwrap();
    let seen = next(&mut w).await.revision();
    assert_eq!(seen, r1);
    drop(w); // the client goes away...
    let r2 = s.create("/res/b", b("2")).await.unwrap().unwrap();
    let r3 = s.update("/res/a", b("1b"), r1).await.unwrap().unwrap();
    // ...and resumes from the revision after the last one it saw: no gap, no repeat.
    let mut w = s.watch("/res/", seen + 1).await.unwrap();
    assert_eq!(next(&mut w).await.revision(), r2);
    assert_eq!(next(&mut w).await.revision(), r3);
}

async fn compaction_makes_old_watches_fail(s: DynStore) {
    let r1 = s.create("/cp/a", b("1")).await.unwrap().unwrap();
    let r2 = s.update("/cp/a", b("2"), r1).await.unwrap().unwrap();
    let r3 = s.update("/cp/a", b("3"), r2).await.unwrap().unwrap();
    s.compact(r3).await.unwrap();
    match s.watch("/cp/", r1).await {
        Err(StoreError::Compacted { .. }) => {}
        Err(e) => panic!("expected Compacted, got {e}"),
        Ok(_) => panic!("expected Compacted, got a watch"),
    }
    let mut w = s.watch("/cp/", r3).await.unwrap();
    assert_eq!(next(&mut w).await.revision(), r3);
    assert_eq!(
        s.get("/cp/a").await.unwrap().unwrap().value,
        b("3"),
        "compaction keeps current values"
    );
}

macro_rules! conformance {
    ($($backend:ident),*) => {$(
        mod $backend {
            use super::*;
            async fn store() -> Backend { super::$backend().await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn revision_grows_by_one_per_write() { let b = store().await; super::revision_grows_by_one_per_write(b.store.clone()).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn create_if_absent_and_cas_guards() { let b = store().await; super::create_if_absent_and_cas_guards(b.store.clone()).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn range_pages_by_prefix() { let b = store().await; super::range_pages_by_prefix(b.store.clone()).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn transactions_are_all_or_nothing() { let b = store().await; super::transactions_are_all_or_nothing(b.store.clone()).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_cas_has_exactly_one_winner() { let b = store().await; super::concurrent_cas_has_exactly_one_winner(b.store.clone()).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn watch_from_revision_then_live() { let b = store().await; super::watch_from_revision_then_live(b.store.clone()).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn watch_resumes_after_reconnect() { let b = store().await; super::watch_resumes_after_reconnect(b.store.clone()).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn compaction_makes_old_watches_fail() { let b = store().await; super::compaction_makes_old_watches_fail(b.store.clone()).await }
        }
    )*};
}

conformance!(memory, embedded, etcd);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_keeps_data_and_history_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let (r1, r2) = {
        let s = EmbeddedStore::open(&path).unwrap();
        let r1 = s.create("/p/a", b("1")).await.unwrap().unwrap();
        let r2 = s.create("/p/b", b("2")).await.unwrap().unwrap();
        (r1, r2)
    };
    let s = EmbeddedStore::open(&path).unwrap();
    assert_eq!(s.current_revision().await.unwrap(), r2);
    assert_eq!(s.get("/p/a").await.unwrap().unwrap().mod_revision, r1);
    let mut w = s.watch("/p/", r1).await.unwrap();
    assert_eq!(next(&mut w).await.revision(), r1);
    assert_eq!(next(&mut w).await.revision(), r2);
    let r3 = s.create("/p/c", b("3")).await.unwrap().unwrap();
    assert_eq!(r3, r2 + 1, "revisions continue after reopen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_lazy_writes_are_visible_at_once_and_on_disk_within_the_flush_interval() {
    use meridian_store::{LAZY_FLUSH, Txn};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let s = EmbeddedStore::open(&path).unwrap();
    let r = s
        .txn(Txn::new().put("/events/a", b("1")).lazy())
        .await
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(
        s.get("/events/a").await.unwrap().unwrap().mod_revision,
        r.revision
    );
    // No durable write follows: the writer flushes on its own. A copy of the file
    // taken then (what a crash would leave) has the write.
    tokio::time::sleep(LAZY_FLUSH * 3).await;
    let copy = dir.path().join("copy.redb");
    std::fs::copy(&path, &copy).unwrap();
    let c = EmbeddedStore::open(&copy).unwrap();
    assert_eq!(c.get("/events/a").await.unwrap().unwrap().value, b("1"));
    assert_eq!(c.current_revision().await.unwrap(), r.revision);
    // A durable write after a lazy one carries it and continues the revisions.
    s.txn(Txn::new().put("/events/b", b("2")).lazy())
        .await
        .unwrap();
    let d = s.create("/p/x", b("3")).await.unwrap().unwrap();
    assert_eq!(d, r.revision + 2);
}
