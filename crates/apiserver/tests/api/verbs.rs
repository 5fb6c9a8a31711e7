//! The verbs, through the kube crate, on Namespaces, Pods and Deployments.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::json;

use crate::{TestServer, create_namespace, pod};

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "main", "image": "busybox"}]}}}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_get_list_update_patch_delete_pods() {
    let t = TestServer::start().await;
    let client = t.admin();
    create_namespace(&client, "shop").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let created = pods
        .create(&PostParams::default(), &pod("web", json!({"app": "web"})))
        .await
        .unwrap();
    let meta = &created.metadata;
    assert!(meta.uid.is_some() && meta.creation_timestamp.is_some());
    let rv1: i64 = meta.resource_version.as_deref().unwrap().parse().unwrap();
    assert_eq!(created.status.unwrap().phase.as_deref(), Some("Pending"));

    let got = pods.get("web").await.unwrap();
    assert_eq!(got.metadata.uid, meta.uid);

    // generateName.
    let mut gen_pod = pod("", json!({"app": "worker"}));
    gen_pod.metadata.name = None;
    gen_pod.metadata.generate_name = Some("worker-".into());
    let g = pods.create(&PostParams::default(), &gen_pod).await.unwrap();
    let gname = g.metadata.name.unwrap();
    assert!(
        gname.starts_with("worker-") && gname.len() == "worker-".len() + 5,
        "{gname}"
    );

    let list = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1);
    assert!(list.metadata.resource_version.is_some());

    // Update with the current resourceVersion succeeds and bumps it.
    let mut edited = got.clone();
    edited
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("tier".into(), "front".into());
    let updated = pods
        .replace("web", &PostParams::default(), &edited)
        .await
        .unwrap();
    let rv2: i64 = updated
        .metadata
        .resource_version
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rv2 > rv1);

    // Merge patch and JSON patch.
    let p = pods
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"a": "1"}}})),
        )
        .await
        .unwrap();
    assert_eq!(p.metadata.annotations.unwrap()["a"], "1");
    let jp: json_patch::Patch = serde_json::from_value(
        json!([{"op": "add", "path": "/metadata/labels/patched", "value": "yes"}]),
    )
    .unwrap();
    let p = pods
        .patch("web", &PatchParams::default(), &Patch::Json::<()>(jp))
        .await
        .unwrap();
    assert_eq!(p.metadata.labels.unwrap()["patched"], "yes");

    // Status subresource changes status only; the main resource ignores status.
    let s = pods
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"phase": "Running"}, "metadata": {"labels": {"ignored": "x"}}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(s.status.as_ref().unwrap().phase.as_deref(), Some("Running"));
    assert!(!s.metadata.labels.as_ref().unwrap().contains_key("ignored"));
    let m = pods
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Failed"}})),
        )
        .await
        .unwrap();
    assert_eq!(m.status.unwrap().phase.as_deref(), Some("Running"));

    pods.delete("web", &DeleteParams::default()).await.unwrap();
    let err = pods.get("web").await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_updates_and_duplicate_creates_conflict() {
    let t = TestServer::start().await;
    let pods: Api<Pod> = Api::namespaced(t.admin(), "default");
    pods.create(&PostParams::default(), &pod("a", json!({})))
        .await
        .unwrap();
    let err = pods
        .create(&PostParams::default(), &pod("a", json!({})))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{err:?}"
    );

    let v1 = pods.get("a").await.unwrap();
    let mut first = v1.clone();
    first.metadata.labels = Some([("x".to_string(), "1".to_string())].into());
    pods.replace("a", &PostParams::default(), &first)
        .await
        .unwrap();
    let mut stale = v1.clone();
    stale.metadata.labels = Some([("x".to_string(), "2".to_string())].into());
    let err = pods
        .replace("a", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"),
        "{err:?}"
    );
    assert_eq!(
        pods.get("a").await.unwrap().metadata.labels.unwrap()["x"],
        "1",
        "the stale write changed nothing"
    );

    // Delete preconditions.
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some("wrong".into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    let err = pods.delete("a", &dp).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409),
        "{err:?}"
    );
    assert!(pods.get("a").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_scale_and_track_generation() {
    let t = TestServer::start().await;
    let deploys: Api<Deployment> = Api::namespaced(t.admin(), "default");
    let d = deploys
        .create(&PostParams::default(), &deployment("web", 2))
        .await
        .unwrap();
    assert_eq!(d.metadata.generation, Some(1));
    let scale = deploys.get_scale("web").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(2));
    let scaled = deploys
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    assert_eq!(scaled.spec.unwrap().replicas, Some(5));
    let d = deploys.get("web").await.unwrap();
    assert_eq!(d.spec.unwrap().replicas, Some(5));
    assert_eq!(
        d.metadata.generation,
        Some(2),
        "a spec change bumps generation"
    );
    // A metadata-only change does not.
    let d = deploys
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": "a"}}})),
        )
        .await
        .unwrap();
    assert_eq!(d.metadata.generation, Some(2));
    // A no-op write does not bump the resourceVersion.
    let again = deploys
        .replace("web", &PostParams::default(), &d)
        .await
        .unwrap();
    assert_eq!(again.metadata.resource_version, d.metadata.resource_version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalizers_hold_deletion_until_removed() {
    let t = TestServer::start().await;
    let pods: Api<Pod> = Api::namespaced(t.admin(), "default");
    let mut p = pod("held", json!({}));
    p.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    pods.create(&PostParams::default(), &p).await.unwrap();
    pods.delete("held", &DeleteParams::default()).await.unwrap();
    let held = pods.get("held").await.unwrap();
    assert!(
        held.metadata.deletion_timestamp.is_some(),
        "deletion is pending"
    );
    pods.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    let err = pods.get("held").await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_with_limit_and_continue_and_filter_by_fields() {
    let t = TestServer::start().await;
    let pods: Api<Pod> = Api::namespaced(t.admin(), "default");
    for i in 0..25 {
        let mut p = pod(
            &format!("p{i:02}"),
            json!({"batch": if i % 2 == 0 { "even" } else { "odd" }}),
        );
        if i < 3 {
            p.spec.as_mut().unwrap().node_name = Some("node-a".into());
        }
        pods.create(&PostParams::default(), &p).await.unwrap();
    }
    let mut names = Vec::new();
    let mut lp = ListParams::default().limit(10);
    let mut pages = 0;
    loop {
        let page = pods.list(&lp).await.unwrap();
        pages += 1;
        names.extend(page.items.iter().map(|p| p.metadata.name.clone().unwrap()));
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => break,
        }
        assert_eq!(t.server.state.cache.open_lists(), 1, "page {pages}");
    }
    assert_eq!(pages, 3);
    // The last page read, its snapshot is no longer held for the list.
    assert_eq!(t.server.state.cache.open_lists(), 0);
    assert_eq!(
        names,
        (0..25).map(|i| format!("p{i:02}")).collect::<Vec<_>>()
    );
    let odd = pods
        .list(&ListParams::default().labels("batch=odd"))
        .await
        .unwrap();
    assert_eq!(odd.items.len(), 12);
    let on_a = pods
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await
        .unwrap();
    assert_eq!(on_a.items.len(), 3);
    let unbound = pods
        .list(&ListParams::default().fields("spec.nodeName="))
        .await
        .unwrap();
    assert_eq!(unbound.items.len(), 22);
    let err = pods
        .list(&ListParams::default().fields("spec.bogus=x"))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaged_list_bigger_than_a_chunk_is_whole_in_order_and_filtered() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let t = TestServer::start().await;
    let cms: Api<ConfigMap> = Api::namespaced(t.admin(), "default");
    // 400 objects of ~2 KB: the body is streamed in several chunks of 256 KiB.
    let filler = "x".repeat(2000);
    for i in 0..400 {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": format!("cm{i:03}"),
                "labels": {"half": if i % 2 == 0 { "a" } else { "b" }}},
            "data": {"filler": filler, "i": i.to_string()}
        }))
        .unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    let all = cms.list(&ListParams::default()).await.unwrap();
    let names: Vec<String> = all
        .items
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        (0..400).map(|i| format!("cm{i:03}")).collect::<Vec<_>>()
    );
    assert!(
        all.items
            .iter()
            .all(|c| c.data.as_ref().unwrap()["filler"] == filler),
        "every item whole"
    );
    let rv: u64 = all.metadata.resource_version.unwrap().parse().unwrap();
    let newest: u64 = all
        .items
        .iter()
        .map(|c| {
            c.metadata
                .resource_version
                .clone()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .max()
        .unwrap();
    assert!(
        rv >= newest,
        "the list's version ({rv}) covers its items ({newest})"
    );
    let b = cms
        .list(&ListParams::default().labels("half=b"))
        .await
        .unwrap();
    assert_eq!(b.items.len(), 200);
    assert!(
        b.items
            .iter()
            .all(|c| c.data.as_ref().unwrap()["i"].parse::<u32>().unwrap() % 2 == 1)
    );
    let none = cms
        .list(&ListParams::default().labels("half=c"))
        .await
        .unwrap();
    assert!(none.items.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_delete_their_content_and_block_new_objects() {
    let t = TestServer::start().await;
    let client = t.admin();
    create_namespace(&client, "temp").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "temp");
    pods.create(&PostParams::default(), &pod("x", json!({})))
        .await
        .unwrap();
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.delete("temp", &DeleteParams::default()).await.unwrap();
    let mut gone = false;
    for _ in 0..100 {
        if nss.get_opt("temp").await.unwrap().is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(gone, "the namespace goes away");
    assert!(
        pods.get_opt("x").await.unwrap().is_none(),
        "and takes its pods with it"
    );
    let err = pods
        .create(&PostParams::default(), &pod("y", json!({})))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(s) if s.code == 404),
        "no objects in a missing namespace"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_of_a_list_is_from_its_first_pages_revision_and_a_watch_from_there_sees_the_rest()
 {
    use futures::{StreamExt, TryStreamExt};
    use kube::api::{WatchEvent, WatchParams};
    let t = TestServer::start().await;
    let pods: Api<Pod> = Api::namespaced(t.admin(), "default");
    for name in ["a", "b", "c", "d"] {
        pods.create(&PostParams::default(), &pod(name, json!({"v": "1"})))
            .await
            .unwrap();
    }
    let first = pods.list(&ListParams::default().limit(2)).await.unwrap();
    let rv = first.metadata.resource_version.clone().unwrap();
    let token = first.metadata.continue_.clone().unwrap();
    // Changes between the pages: c relabelled, d deleted, e created.
    pods.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"v": "2"}}})),
    )
    .await
    .unwrap();
    pods.delete("d", &DeleteParams::default()).await.unwrap();
    pods.create(&PostParams::default(), &pod("e", json!({"v": "1"})))
        .await
        .unwrap();
    let second = pods
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    // The list as of the first page: c unchanged, d still there, no e.
    let seen: Vec<(String, String)> = second
        .items
        .iter()
        .map(|p| {
            let labels = p.metadata.labels.clone().unwrap_or_default();
            (p.metadata.name.clone().unwrap(), labels["v"].clone())
        })
        .collect();
    assert_eq!(seen, [("c".into(), "1".into()), ("d".into(), "1".into())]);
    assert_eq!(
        second.metadata.resource_version.as_deref(),
        Some(rv.as_str())
    );
    // A watch from the list's revision brings exactly the three changes.
    let mut events = pods
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .unwrap()
        .boxed();
    let mut changes = Vec::new();
    while changes.len() < 3 {
        match events.try_next().await.unwrap() {
            Some(WatchEvent::Modified(p)) => {
                changes.push(format!("M {}", p.metadata.name.unwrap()))
            }
            Some(WatchEvent::Deleted(p)) => changes.push(format!("D {}", p.metadata.name.unwrap())),
            Some(WatchEvent::Added(p)) => changes.push(format!("A {}", p.metadata.name.unwrap())),
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(changes, ["M c", "D d", "A e"]);
    // A token whose revision is neither kept nor current: 410, list again.
    let stale = base64_url(&format!(
        r#"{{"rv":1,"start":"{}"}}"#,
        "/registry/core/pods/default/a"
    ));
    let err = pods
        .list(&ListParams::default().limit(2).continue_token(&stale))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 410),
        "{err:?}"
    );
}

fn base64_url(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}
