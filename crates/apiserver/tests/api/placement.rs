//! PlacementPolicy admission: bad policies are refused with the offending field,
//! and exact per-location counts must agree with the workloads they name, both
//! when the policy is written and when the workload is scaled.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

use crate::TestServer;

fn policies(client: &kube::Client) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("meridian.io", "v1alpha1", "PlacementPolicy"),
        "placementpolicies",
    );
    Api::namespaced_with(client.clone(), "default", &ar)
}

fn policy(name: &str, spec: serde_json::Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "meridian.io/v1alpha1", "kind": "PlacementPolicy",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap()
}

/// The (field, message) of a 422's first cause.
fn invalid(e: kube::Error) -> (String, String) {
    match e {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 422, "{s:?}");
            assert_eq!(s.reason, "Invalid");
            let c = &s.details.unwrap().causes[0];
            (c.field.clone(), c.message.clone())
        }
        e => panic!("expected 422, got {e}"),
    }
}

#[tokio::test]
async fn bad_policies_are_refused_with_the_offending_field() {
    let s = TestServer::start().await;
    let api = policies(&s.admin());
    let pp = PostParams::default();
    for (spec, field) in [
        (json!({"spread": {"maxSkew": 1}}), "spec.workloads"),
        (
            json!({"workloads": [{"kind": "Pod", "name": "x"}]}),
            "spec.workloads[0].kind",
        ),
        (
            json!({"workloads": [{"kind": "DaemonSet", "name": "x"}]}),
            "spec.workloads[0].kind",
        ),
        (
            json!({"workloads": [{"kind": "Deployment", "name": "x"}],
                   "latency": {"maxRttMs": 10, "areas": [{"city": "Atlantis"}]}}),
            "spec.latency.areas[0]",
        ),
        (
            json!({"workloads": [{"kind": "Deployment", "name": "x"}],
                   "latency": {"maxRttMs": -1, "areas": [{"city": "Paris"}]}}),
            "spec.latency.maxRttMs",
        ),
        (
            json!({"workloads": [{"kind": "Deployment", "name": "x"}],
                   "distribution": {"counts": [{"city": "Paris", "region": "eu-west", "replicas": 1}]}}),
            "spec.distribution.counts[0]",
        ),
        (
            json!({"workloads": [{"kind": "Deployment", "name": "x"}],
                   "distribution": {"counts": [{"city": "Paris", "replicas": 1}], "byCapacity": "topology.kubernetes.io/region"}}),
            "spec.distribution",
        ),
        (
            json!({"workloads": [{"kind": "Deployment", "name": "x"}],
                   "spread": {"minGroups": 5, "maxGroups": 2}}),
            "spec.spread.minGroups",
        ),
        (
            json!({"workloads": [{"kind": "Deployment", "name": "x"}],
                   "failover": {"afterSeconds": 60, "pin": true}}),
            "spec.failover",
        ),
    ] {
        let e = api
            .create(&pp, &policy("bad", spec.clone()))
            .await
            .unwrap_err();
        assert_eq!(invalid(e).0, field, "{spec}");
    }
    assert!(api.get_opt("bad").await.unwrap().is_none());
}

#[tokio::test]
async fn exact_counts_must_agree_with_the_workload_both_ways() {
    let s = TestServer::start().await;
    let client = s.admin();
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();
    let d = json!({"metadata": {"name": "game"}, "spec": {"replicas": 4,
        "selector": {"matchLabels": {"app": "game"}},
        "template": {"metadata": {"labels": {"app": "game"}},
                     "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
    deploys
        .create(&pp, &serde_json::from_value(d).unwrap())
        .await
        .unwrap();
    let api = policies(&client);
    let spec = |a: i32, b: i32| {
        json!({"workloads": [{"kind": "Deployment", "name": "game"}],
               "distribution": {"counts": [{"city": "Shanghai", "replicas": a}, {"city": "Frankfurt", "replicas": b}]}})
    };
    let (field, msg) = invalid(
        api.create(&pp, &policy("cities", spec(3, 2)))
            .await
            .unwrap_err(),
    );
    assert_eq!(field, "spec.distribution.counts");
    assert!(
        msg.contains("add up to 5 replicas but Deployment game wants 4"),
        "{msg}"
    );
    api.create(&pp, &policy("cities", spec(2, 2)))
        .await
        .unwrap();
    // Scaling the workload away from the counts is refused, and changes nothing.
    let e = deploys
        .patch_scale(
            "game",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap_err();
    let (field, msg) = invalid(e);
    assert_eq!(field, "spec.replicas");
    assert!(
        msg.contains("PlacementPolicy cities places exactly 4 replicas (Shanghai 2, Frankfurt 2)"),
        "{msg}"
    );
    let now = deploys.get("game").await.unwrap();
    assert_eq!(now.spec.unwrap().replicas, Some(4));
    // Updating a workload without touching its replicas is fine.
    deploys
        .patch(
            "game",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"tier": "game"}}})),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn binding_annotations_are_copied_to_the_pod() {
    let s = TestServer::start().await;
    let pods: Api<Pod> = Api::namespaced(s.admin(), "default");
    let p =
        json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
    pods.create(&PostParams::default(), &serde_json::from_value(p).unwrap())
        .await
        .unwrap();
    let binding = json!({"apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": "p", "annotations": {"meridian.io/reschedule-grace": "never"}},
        "target": {"kind": "Node", "name": "n1"}});
    pods.create_subresource::<serde_json::Value, serde_json::Value>(
        "binding",
        "p",
        &PostParams::default(),
        &binding,
    )
    .await
    .unwrap();
    let p = pods.get("p").await.unwrap();
    assert_eq!(p.spec.unwrap().node_name.as_deref(), Some("n1"));
    assert_eq!(
        p.metadata.annotations.unwrap()["meridian.io/reschedule-grace"],
        "never"
    );
}

/// POSTs a JSON body with a bearer token: (HTTP status, answer).
async fn post_json(
    s: &TestServer,
    url: &str,
    token: String,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = s
        .raw()
        .post(url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    (
        r.status().as_u16(),
        r.json::<serde_json::Value>().await.unwrap(),
    )
}

/// (status, reason) of each item of a bulk answer.
fn outcomes(r: &serde_json::Value) -> Vec<(&str, &str)> {
    r["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["status"].as_str().unwrap(),
                i["reason"].as_str().unwrap_or(""),
            )
        })
        .collect()
}

#[tokio::test]
async fn bulk_bindings_bind_many_pods_and_report_each_one() {
    let s = TestServer::start().await;
    let pods: Api<Pod> = Api::namespaced(s.admin(), "default");
    for name in ["a", "b", "c"] {
        let p = json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
        pods.create(&PostParams::default(), &serde_json::from_value(p).unwrap())
            .await
            .unwrap();
    }
    let http = s.raw();
    let url = format!("{}/apis/meridian.io/v1alpha1/bulkbindings", s.server.url);
    let body = json!({"items": [
        {"namespace": "default", "name": "a", "node": "n1"},
        {"namespace": "default", "name": "b", "node": "n2",
         "metadata": {"annotations": {"meridian.io/reschedule-grace": "never"}}},
        {"namespace": "default", "name": "a", "node": "n3"},
        {"namespace": "default", "name": "ghost", "node": "n1"},
        {"namespace": "default", "name": "c", "node": ""},
    ]});
    let r: serde_json::Value = http
        .post(&url)
        .bearer_auth(&s.server.admin_token)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let st = outcomes(&r);
    assert_eq!(
        st,
        vec![
            ("Success", ""),
            ("Success", ""),
            ("Failure", "Invalid"),
            ("Failure", "NotFound"),
            ("Failure", "Invalid"),
        ],
        "{r}"
    );
    let node = |p: Pod| p.spec.unwrap().node_name;
    assert_eq!(node(pods.get("a").await.unwrap()).as_deref(), Some("n1"));
    let b = pods.get("b").await.unwrap();
    assert_eq!(
        b.metadata.annotations.as_ref().unwrap()["meridian.io/reschedule-grace"],
        "never"
    );
    assert_eq!(node(b).as_deref(), Some("n2"));
    assert_eq!(node(pods.get("c").await.unwrap()), None);
    // Binding again is a conflict per item; a tenant may not use the endpoint.
    let again: serde_json::Value = http
        .post(&url)
        .bearer_auth(&s.server.admin_token)
        .json(&json!({"items": [{"namespace": "default", "name": "a", "node": "n9"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["items"][0]["reason"], "Conflict", "{again}");
    assert_eq!(node(pods.get("a").await.unwrap()).as_deref(), Some("n1"));
    let tenant = s.tenant("acme").await;
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("meridian.io", "v1alpha1", "BulkBinding"),
        "bulkbindings",
    );
    let api: Api<DynamicObject> = Api::all_with(tenant, &ar);
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "meridian.io/v1alpha1", "kind": "BulkBinding", "metadata": {"name": "x"},
        "items": [{"namespace": "default", "name": "c", "node": "n1"}]}))
    .unwrap();
    match api.create(&PostParams::default(), &obj).await {
        Err(kube::Error::Api(e)) => assert!(e.code == 403 || e.code == 404, "{e:?}"),
        other => panic!("a tenant used bulk bindings: {other:?}"),
    }
    assert_eq!(node(pods.get("c").await.unwrap()), None);
}

#[tokio::test]
async fn bulk_pods_are_created_each_as_one_post_would_and_reported_in_order() {
    let s = TestServer::start().await;
    let pods: Api<Pod> = Api::namespaced(s.admin(), "default");
    let pod = |ns: Option<&str>, name: &str| {
        json!({"metadata": {"name": name, "namespace": ns, "labels": {"app": "w"}},
               "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
    };
    let url = format!("{}/apis/meridian.io/v1alpha1/bulkpods", s.server.url);
    let post = |token: String, body: serde_json::Value| post_json(&s, &url, token, body);
    let mut no_containers = pod(Some("default"), "e");
    no_containers["spec"]["containers"] = json!([]);
    let (code, r) = post(
        s.server.admin_token.clone(),
        json!({"items": [
            pod(Some("default"), "a"),
            pod(Some("default"), "b"),
            pod(Some("default"), "a"),
            pod(None, "d"),
            no_containers,
            pod(Some("nowhere"), "f"),
        ]}),
    )
    .await;
    assert_eq!(code, 200, "{r}");
    let st = outcomes(&r);
    assert_eq!(
        st,
        vec![
            ("Success", ""),
            ("Success", ""),
            ("Failure", "AlreadyExists"),
            ("Failure", "Invalid"),
            ("Failure", "Invalid"),
            ("Failure", "NotFound"),
        ],
        "{r}"
    );
    // Stored as a POST stores them: uid, version, defaults, Pending.
    let a = pods.get("a").await.unwrap();
    assert_eq!(a.metadata.uid.as_deref(), r["items"][0]["uid"].as_str());
    // The version is what the ReplicaSet controller waits for its watch to pass.
    assert_eq!(
        a.metadata.resource_version.as_deref(),
        r["items"][0]["resourceVersion"].as_str(),
        "{r}"
    );
    assert_eq!(a.status.unwrap().phase.as_deref(), Some("Pending"));
    assert_eq!(
        a.spec.unwrap().scheduler_name.as_deref(),
        Some("default-scheduler")
    );
    let names: Vec<String> = pods
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert_eq!(names, ["a", "b"]);
    // Too many items, or no list at all: refused whole.
    let many: Vec<_> = (0..1001)
        .map(|i| pod(Some("default"), &format!("m{i}")))
        .collect();
    let (code, r) = post(s.server.admin_token.clone(), json!({ "items": many })).await;
    assert_eq!(
        (code, r["reason"].as_str()),
        (400, Some("BadRequest")),
        "{r}"
    );
    let (code, _) = post(s.server.admin_token.clone(), json!({"pods": []})).await;
    assert_eq!(code, 400);
    // The scheduler and tenants may not create pods this way.
    let sched = s
        .server
        .system_token(meridian_apiserver::auth::SystemRole::Scheduler)
        .await
        .unwrap();
    let (code, _) = post(sched, json!({"items": [pod(Some("default"), "x")]})).await;
    assert_eq!(code, 403);
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("meridian.io", "v1alpha1", "BulkPod"),
        "bulkpods",
    );
    let api: Api<DynamicObject> = Api::all_with(s.tenant("acme").await, &ar);
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "meridian.io/v1alpha1", "kind": "BulkPod", "metadata": {"name": "x"},
        "items": [pod(Some("default"), "y")]}))
    .unwrap();
    match api.create(&PostParams::default(), &obj).await {
        Err(kube::Error::Api(e)) => assert!(e.code == 403 || e.code == 404, "{e:?}"),
        other => panic!("a tenant used bulk pods: {other:?}"),
    }
    assert_eq!(pods.list(&Default::default()).await.unwrap().items.len(), 2);
}

#[tokio::test]
async fn bulk_pod_statuses_patch_each_pods_status_and_report_each_one() {
    use meridian_apiserver::auth::SystemRole;
    let s = TestServer::start().await;
    let pods: Api<Pod> = Api::namespaced(s.admin(), "default");
    for name in ["a", "b"] {
        let p = json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
        pods.create(&PostParams::default(), &serde_json::from_value(p).unwrap())
            .await
            .unwrap();
    }
    let url = format!("{}/apis/meridian.io/v1alpha1/bulkpodstatuses", s.server.url);
    let post = |token: String, body: serde_json::Value| post_json(&s, &url, token, body);
    let region = s.server.system_token(SystemRole::Region).await.unwrap();
    let running = json!({"phase": "Running", "podIP": "10.0.0.7"});
    let (code, r) = post(
        region.clone(),
        json!({"items": [
            {"namespace": "default", "name": "a", "status": running},
            {"namespace": "default", "name": "ghost", "status": running},
            {"namespace": "default", "name": "b"},
            {"namespace": "default", "name": "b", "status": {"phase": 7}},
        ]}),
    )
    .await;
    assert_eq!(code, 200, "{r}");
    let st = outcomes(&r);
    assert_eq!(st[0], ("Success", ""), "{r}");
    assert_eq!(st[1], ("Failure", "NotFound"), "{r}");
    assert_eq!(st[2], ("Failure", "BadRequest"), "{r}");
    assert_eq!(st[3].0, "Failure", "{r}");
    assert_eq!(r["items"][1]["code"], 404, "{r}");
    // The good item is written, merged into the status; the bad ones change nothing.
    let a = pods.get("a").await.unwrap().status.unwrap();
    assert_eq!(a.phase.as_deref(), Some("Running"));
    assert_eq!(a.pod_ip.as_deref(), Some("10.0.0.7"));
    let b = pods.get("b").await.unwrap().status.unwrap();
    assert_eq!(b.phase.as_deref(), Some("Pending"));
    // More than the limit is refused whole; a tenant may not use the endpoint, and
    // neither may the scheduler (it writes bindings, not statuses).
    let many: Vec<_> = (0..1001)
        .map(|_| json!({"namespace": "default", "name": "b", "status": running}))
        .collect();
    let (code, r) = post(region, json!({ "items": many })).await;
    assert_eq!(code, 400, "{r}");
    let scheduler = s.server.system_token(SystemRole::Scheduler).await.unwrap();
    let one = json!({"items": [{"namespace": "default", "name": "b", "status": running}]});
    let (code, _) = post(scheduler, one.clone()).await;
    assert_eq!(code, 403);
    let (code, _) = post("not-a-token".into(), one).await;
    assert_eq!(code, 401);
    let b = pods.get("b").await.unwrap().status.unwrap();
    assert_eq!(b.phase.as_deref(), Some("Pending"));
}

#[tokio::test]
async fn bulk_node_statuses_patch_each_nodes_status_and_report_each_one() {
    use k8s_openapi::api::core::v1::Node;
    use meridian_apiserver::auth::SystemRole;
    let s = TestServer::start().await;
    let nodes: Api<Node> = Api::all(s.admin());
    for name in ["n1", "n2"] {
        let n = json!({"metadata": {"name": name, "labels": {"meridian.io/city": "paris"}}});
        nodes
            .create(&PostParams::default(), &serde_json::from_value(n).unwrap())
            .await
            .unwrap();
    }
    let url = format!(
        "{}/apis/meridian.io/v1alpha1/bulknodestatuses",
        s.server.url
    );
    let post = |token: String, body: serde_json::Value| post_json(&s, &url, token, body);
    let region = s.server.system_token(SystemRole::Region).await.unwrap();
    let ready = json!({"conditions": [{"type": "Ready", "status": "True",
        "lastHeartbeatTime": "2026-11-29T10:00:00Z", "reason": "RegionLease"}]});
    let (code, r) = post(
        region.clone(),
        json!({"items": [
            {"name": "n1", "status": ready},
            {"name": "ghost", "status": ready},
            {"name": "n2"},
            {"namespace": "default", "name": "n2", "status": ready},
        ]}),
    )
    .await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["kind"], "BulkNodeStatusResult", "{r}");
    let st = outcomes(&r);
    assert_eq!(st[0], ("Success", ""), "{r}");
    assert_eq!(st[1], ("Failure", "NotFound"), "{r}");
    assert_eq!(st[2], ("Failure", "BadRequest"), "{r}");
    assert_eq!(st[3], ("Failure", "BadRequest"), "{r}");
    // The good item is written into the status, labels untouched; the bad ones
    // change nothing.
    let n1 = nodes.get("n1").await.unwrap();
    let c = &n1.status.unwrap().conditions.unwrap()[0];
    assert_eq!((c.type_.as_str(), c.status.as_str()), ("Ready", "True"));
    assert_eq!(n1.metadata.labels.unwrap()["meridian.io/city"], "paris");
    let n2 = nodes.get("n2").await.unwrap();
    assert!(n2.status.and_then(|s| s.conditions).is_none());
    // A summary may carry annotations: merged in the same write as its status
    // (null removes one); anything but an object of strings, or annotations on
    // a pod status, is refused and changes nothing.
    let (code, r) = post(
        region.clone(),
        json!({"items": [
            {"name": "n2", "status": ready, "annotations": {"meridian.io/usage": "cpu=100m"}},
            {"name": "n1", "status": ready, "annotations": {"meridian.io/usage": 5}},
            {"name": "n1", "status": ready, "annotations": ["meridian.io/usage"]},
        ]}),
    )
    .await;
    assert_eq!(code, 200, "{r}");
    let st = outcomes(&r);
    assert_eq!(st[0], ("Success", ""), "{r}");
    assert_eq!(st[1], ("Failure", "BadRequest"), "{r}");
    assert_eq!(st[2], ("Failure", "BadRequest"), "{r}");
    let n2 = nodes.get("n2").await.unwrap();
    let rv = n2.metadata.resource_version.clone();
    assert_eq!(
        n2.metadata.annotations.as_ref().unwrap()["meridian.io/usage"],
        "cpu=100m"
    );
    assert_eq!(
        n2.metadata.labels.as_ref().unwrap()["meridian.io/city"],
        "paris"
    );
    assert!(n2.status.and_then(|s| s.conditions).is_some());
    let n1 = nodes.get("n1").await.unwrap();
    assert!(n1.metadata.annotations.unwrap_or_default().is_empty());
    let (code, r) = post(
        region.clone(),
        json!({"items": [
            {"name": "n2", "status": ready, "annotations": {"meridian.io/usage": null, "other": "x"}},
        ]}),
    )
    .await;
    assert_eq!((code, outcomes(&r)[0]), (200, ("Success", "")), "{r}");
    let n2 = nodes.get("n2").await.unwrap();
    assert_ne!(n2.metadata.resource_version, rv);
    let a = n2.metadata.annotations.unwrap();
    assert_eq!(
        (a.get("meridian.io/usage"), a["other"].as_str()),
        (None, "x")
    );
    let pods_url = format!("{}/apis/meridian.io/v1alpha1/bulkpodstatuses", s.server.url);
    let (code, r) = post_json(
        &s,
        &pods_url,
        region.clone(),
        json!({"items": [{"namespace": "default", "name": "p", "status": {"phase": "Running"},
            "annotations": {"a": "b"}}]}),
    )
    .await;
    assert_eq!(
        (code, outcomes(&r)[0]),
        (200, ("Failure", "BadRequest")),
        "{r}"
    );
    // Neither the scheduler nor a stranger may use it.
    let one = json!({"items": [{"name": "n2", "status": ready}]});
    let scheduler = s.server.system_token(SystemRole::Scheduler).await.unwrap();
    let (code, _) = post(scheduler, one.clone()).await;
    assert_eq!(code, 403);
    let (code, _) = post("not-a-token".into(), one).await;
    assert_eq!(code, 401);
}
