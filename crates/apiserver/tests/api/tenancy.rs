//! Tenants are virtual clusters: nothing of another tenant is visible by any path.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use serde_json::json;

use crate::{TestServer, create_namespace, pod, tenants};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_share_names_but_never_see_each_other() {
    let t = TestServer::start().await;
    let acme = t.tenant("acme").await;
    let globex = t.tenant("globex").await;
    let acme_pods: Api<Pod> = Api::namespaced(acme.clone(), "default");
    let globex_pods: Api<Pod> = Api::namespaced(globex.clone(), "default");

    // Both can have default/web.
    let a = acme_pods
        .create(
            &PostParams::default(),
            &pod("web", json!({"app": "web", "owner": "acme"})),
        )
        .await
        .unwrap();
    let g = globex_pods
        .create(
            &PostParams::default(),
            &pod("web", json!({"app": "web", "owner": "globex"})),
        )
        .await
        .unwrap();
    assert_ne!(a.metadata.uid, g.metadata.uid);
    assert_eq!(
        a.metadata.namespace.as_deref(),
        Some("default"),
        "tenants see plain namespaces"
    );

    // get / list / selectors / all-namespaces list only show their own.
    assert_eq!(
        acme_pods.get("web").await.unwrap().metadata.labels.unwrap()["owner"],
        "acme"
    );
    let all: Api<Pod> = Api::all(acme.clone());
    let listed = all.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(
        listed.items[0].metadata.labels.as_ref().unwrap()["owner"],
        "acme"
    );
    let by_label = all
        .list(&ListParams::default().labels("owner=globex"))
        .await
        .unwrap();
    assert!(by_label.items.is_empty());
    let by_field = all
        .list(&ListParams::default().fields("metadata.namespace=default"))
        .await
        .unwrap();
    assert_eq!(by_field.items.len(), 1);

    // Namespaces: each tenant sees its own only.
    create_namespace(&acme, "staging").await;
    let acme_ns: Vec<String> = Api::<Namespace>::all(acme.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|n| n.metadata.name.unwrap())
        .collect();
    assert_eq!(acme_ns, vec!["default".to_string(), "staging".to_string()]);
    let globex_ns = Api::<Namespace>::all(globex.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(globex_ns.items.len(), 1);
    let err = Api::<Pod>::namespaced(globex.clone(), "staging")
        .list(&ListParams::default())
        .await;
    assert!(
        err.unwrap().items.is_empty(),
        "globex's view has no staging namespace content"
    );
    let err = Api::<Pod>::namespaced(globex.clone(), "staging")
        .create(&PostParams::default(), &pod("x", json!({})))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(s) if s.code == 404),
        "cannot write into another tenant's namespace"
    );

    // update / patch / delete only touch their own object.
    globex_pods
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await
        .unwrap();
    assert!(
        !acme_pods
            .get("web")
            .await
            .unwrap()
            .metadata
            .labels
            .unwrap()
            .contains_key("touched")
    );
    globex_pods
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        acme_pods.get("web").await.is_ok(),
        "acme's web survives globex's delete"
    );

    // The admin's global view sees both, under tenant-qualified namespaces.
    let admin_all: Api<Pod> = Api::all(t.admin());
    let names: Vec<String> = admin_all
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| p.metadata.namespace.unwrap())
        .collect();
    assert_eq!(names, vec!["acme.default".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_only_carry_the_tenants_own_events() {
    let t = TestServer::start().await;
    let acme = t.tenant("acme").await;
    let globex = t.tenant("globex").await;
    let watch_all: Api<Pod> = Api::all(acme.clone());
    let mut stream = watch_all
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    Api::<Pod>::namespaced(globex.clone(), "default")
        .create(&PostParams::default(), &pod("secret-plan", json!({})))
        .await
        .unwrap();
    Api::<Pod>::namespaced(acme.clone(), "default")
        .create(&PostParams::default(), &pod("mine", json!({})))
        .await
        .unwrap();
    let first = crate::watch::next(&mut stream).await;
    match first {
        WatchEvent::Added(p) => {
            assert_eq!(p.metadata.name.as_deref(), Some("mine"));
            assert_eq!(p.metadata.namespace.as_deref(), Some("default"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_read_nodes_but_cannot_write_them_or_see_tenants() {
    let t = TestServer::start().await;
    let admin_nodes: Api<Node> = Api::all(t.admin());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "edge-sha-1", "labels": {"topology.meridian.io/city": "Shanghai"}}})).unwrap();
    admin_nodes
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
    let acme = t.tenant("acme").await;
    let nodes: Api<Node> = Api::all(acme.clone());
    assert_eq!(
        nodes
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    assert!(nodes.get("edge-sha-1").await.is_ok());
    let err = nodes
        .delete("edge-sha-1", &DeleteParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403 && s.reason == "Forbidden"),
        "{err:?}"
    );
    let err = nodes
        .patch(
            "edge-sha-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 403));
    let err = tenants(acme.clone())
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 403));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tokens_get_401_and_deleted_tenants_lose_access() {
    let t = TestServer::start().await;
    let stranger = t.client("not-a-real-token");
    let err = Api::<Pod>::namespaced(stranger, "default")
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 401),
        "{err:?}"
    );
    let resp = t
        .raw()
        .get(format!("{}/api/v1/pods", t.server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    let acme = t.tenant("acme").await;
    let pods: Api<Pod> = Api::namespaced(acme.clone(), "default");
    pods.create(&PostParams::default(), &pod("web", json!({})))
        .await
        .unwrap();
    tenants(t.admin())
        .delete("acme", &DeleteParams::default())
        .await
        .unwrap();
    let err = pods.list(&ListParams::default()).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 401),
        "{err:?}"
    );
    // Its namespaces and objects are cleaned up.
    let admin_pods: Api<Pod> = Api::namespaced(t.admin(), "acme.default");
    let mut cleaned = false;
    for _ in 0..100 {
        if admin_pods.get_opt("web").await.unwrap().is_none() {
            cleaned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cleaned);
}
