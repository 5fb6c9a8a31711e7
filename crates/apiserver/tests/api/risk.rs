//! Risk control: RiskPolicies stop accidental and runaway deletion on every path —
//! user deletes, namespace deletion, scale-downs, rolling updates and node-loss
//! evictions — with budgets counted in the store, so concurrent deleters never
//! overspend them (two server processes on one etcd: `crates/meridian/tests/cli.rs`).
//! Time is a manual clock.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use meridian_apiserver::auth::SystemRole;
use meridian_risk::Clock;
use serde_json::{Value, json};

use crate::TestServer;

fn at(s: &str) -> jiff::Timestamp {
    s.parse().unwrap()
}

fn policies(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("meridian.io", "v1alpha1", "RiskPolicy"),
        "riskpolicies",
    );
    Api::namespaced_with(client.clone(), ns, &ar)
}

async fn create_policy(client: &kube::Client, ns: &str, name: &str, spec: Value) {
    let p: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "meridian.io/v1alpha1", "kind": "RiskPolicy",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap();
    policies(client, ns)
        .create(&PostParams::default(), &p)
        .await
        .unwrap();
}

/// A clock-driven server; the manual clock starts at `start`.
async fn server_at(start: &str) -> (TestServer, Clock) {
    let clock = Clock::manual(at(start));
    let c = clock.clone();
    let s = TestServer::start_with(move |cfg| cfg.clock = c).await;
    (s, clock)
}

/// A Deployment `name` with one ReplicaSet and `n` pods owned through it, written
/// directly (no controllers): the shape the garbage collector and policies see.
async fn deployment_with_pods(client: &kube::Client, name: &str, n: usize) -> Vec<String> {
    let labels = json!({"app": name});
    let template = json!({"metadata": {"labels": labels},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]}});
    let d: Deployment = serde_json::from_value(json!({"metadata": {"name": name},
        "spec": {"replicas": n, "selector": {"matchLabels": labels}, "template": template}}))
    .unwrap();
    let d = Api::<Deployment>::default_namespaced(client.clone())
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
    let owner = |kind: &str, name: &str, uid: &str| json!([{"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": uid, "controller": true}]);
    let rs: ReplicaSet = serde_json::from_value(json!({"metadata": {"name": format!("{name}-1"),
            "ownerReferences": owner("Deployment", name, d.metadata.uid.as_deref().unwrap())},
        "spec": {"replicas": n, "selector": {"matchLabels": labels}, "template": template}}))
    .unwrap();
    let rs = Api::<ReplicaSet>::default_namespaced(client.clone())
        .create(&PostParams::default(), &rs)
        .await
        .unwrap();
    let pods = Api::<Pod>::default_namespaced(client.clone());
    let rs_uid = rs.metadata.uid.clone().unwrap();
    let names: Vec<String> = (0..n).map(|i| format!("{name}-1-{i:04}")).collect();
    futures::stream::iter(names.clone())
        .for_each_concurrent(32, |pname| {
            let pods = pods.clone();
            let owners = owner("ReplicaSet", &format!("{name}-1"), &rs_uid);
            let labels = labels.clone();
            async move {
                let p: Pod = serde_json::from_value(json!({"metadata": {"name": pname,
                        "labels": labels, "ownerReferences": owners},
                    "spec": {"containers": [{"name": "main", "image": "busybox"}]}}))
                .unwrap();
                pods.create(&PostParams::default(), &p).await.unwrap();
            }
        })
        .await;
    names
}

/// Sends DELETEs for `names` (each `per_name` times) all at once, spread over the
/// servers; returns the HTTP codes and the bodies of the refusals.
async fn concurrent_deletes(
    servers: &[&TestServer],
    names: &[String],
    per_name: usize,
) -> (Vec<u16>, Vec<Value>) {
    let clients: Vec<(reqwest::Client, String, String)> = servers
        .iter()
        .map(|s| (s.raw(), s.server.url.clone(), s.server.admin_token.clone()))
        .collect();
    let mut reqs = Vec::new();
    for round in 0..per_name {
        for (i, n) in names.iter().enumerate() {
            let (c, url, token) = &clients[(i + round) % clients.len()];
            reqs.push(
                c.delete(format!("{url}/api/v1/namespaces/default/pods/{n}"))
                    .bearer_auth(token)
                    .send(),
            );
        }
    }
    let results = futures::future::join_all(reqs).await;
    let mut codes = Vec::new();
    let mut refusals = Vec::new();
    for r in results {
        let r = r.unwrap();
        let code = r.status().as_u16();
        codes.push(code);
        if code == 429 {
            refusals.push(r.json::<Value>().await.unwrap());
        }
    }
    (codes, refusals)
}

fn count(codes: &[u16], code: u16) -> usize {
    codes.iter().filter(|c| **c == code).count()
}

const ONE_PER_30M: &str = r#"{"selector": {"kinds": ["Deployment"], "names": ["web"]},
    "rules": {"maxDeletions": [{"count": 1, "period": "30m"}]}}"#;

#[tokio::test]
async fn a_thousand_concurrent_deletes_against_one_per_30_minutes_let_exactly_one_through() {
    let (s, clock) = server_at("2026-11-27T12:00:00Z").await;
    let admin = s.admin();
    let names = deployment_with_pods(&admin, "web", 100).await;
    create_policy(
        &admin,
        "default",
        "web-safety",
        serde_json::from_str(ONE_PER_30M).unwrap(),
    )
    .await;
    let (codes, refusals) = concurrent_deletes(&[&s], &names, 10).await;
    assert_eq!(codes.len(), 1000);
    assert_eq!(count(&codes, 200), 1, "codes: {codes:?}");
    // The other 999: refused, or (same pod, after it went) not found.
    assert_eq!(count(&codes, 429) + count(&codes, 404), 999, "{codes:?}");
    assert!(count(&codes, 429) >= 990);
    let r = &refusals[0];
    assert_eq!(r["reason"], "TooManyRequests");
    let msg = r["message"].as_str().unwrap();
    assert!(msg.contains("RiskPolicy default/web-safety"), "{msg}");
    assert!(msg.contains("maxDeletions[0]"), "{msg}");
    assert!(
        msg.contains("2026-11-27T12:30:00Z"),
        "says when it frees up: {msg}"
    );
    assert_eq!(
        r["details"]["causes"][0]["field"],
        "spec.rules.maxDeletions[0]"
    );
    assert_eq!(r["details"]["retryAfterSeconds"], 1800);
    let pods = Api::<Pod>::default_namespaced(admin.clone());
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        99
    );

    // Half an hour later the budget has room for one more, and only one.
    clock.advance(jiff::SignedDuration::from_mins(30));
    let left: Vec<String> = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    let (codes, _) = concurrent_deletes(&[&s], &left[..20], 5).await;
    assert_eq!(count(&codes, 200), 1, "{codes:?}");
    // Each allowed deletion is in an Event on the policy that let it through.
    let events = Api::<k8s_openapi::api::core::v1::Event>::default_namespaced(admin.clone());
    crate::eventually("RiskAllowed events on the policy", || async {
        let allowed: u64 = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|e| {
                e.reason.as_deref() == Some("RiskAllowed")
                    && e.involved_object.kind.as_deref() == Some("RiskPolicy")
                    && e.involved_object.name.as_deref() == Some("web-safety")
                    && e.message
                        .as_deref()
                        .is_some_and(|m| m.contains("Pod default/"))
            })
            .map(|e| e.count.unwrap_or(0) as u64)
            .sum();
        allowed == 2
    })
    .await;
}

/// Fridays 18:00 to Mondays 06:00, Paris time.
const WEEKEND_FREEZE: &str = r#"{"selector": {"kinds": ["Deployment"], "names": ["web"]},
    "rules": {"denyWindows": [{"schedule": "0 18 * * fri", "duration": "60h", "timeZone": "Europe/Paris"}]}}"#;

fn forbidden(e: kube::Error) -> String {
    match e {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 403, "{s:?}");
            assert_eq!(s.reason, "Forbidden");
            assert_eq!(s.details.unwrap().causes[0].reason, "RiskPolicy");
            s.message
        }
        e => panic!("expected 403, got {e}"),
    }
}

#[tokio::test]
async fn a_deny_window_blocks_deletes_scale_downs_and_evictions_inside_and_allows_them_outside() {
    // Saturday noon in Paris: inside the window.
    let (s, clock) = server_at("2026-11-28T11:00:00Z").await;
    let admin = s.admin();
    let names = deployment_with_pods(&admin, "web", 4).await;
    create_policy(
        &admin,
        "default",
        "weekend-freeze",
        serde_json::from_str(WEEKEND_FREEZE).unwrap(),
    )
    .await;
    let pods = Api::<Pod>::default_namespaced(admin.clone());
    let deployments = Api::<Deployment>::default_namespaced(admin.clone());
    let region = s.client(&s.server.system_token(SystemRole::Region).await.unwrap());
    let region_pods = Api::<Pod>::default_namespaced(region);
    let lost = json!({"status": {"phase": "Failed", "reason": "NodeLost",
        "message": "node paris-1 unreachable"}});

    let msg = forbidden(
        pods.delete(&names[0], &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert!(msg.contains("RiskPolicy default/weekend-freeze"), "{msg}");
    assert!(msg.contains("denyWindows[0]"), "{msg}");
    assert!(
        msg.contains("2026-11-30T05:00:00Z"),
        "says when the window closes: {msg}"
    );
    let scale = json!({"spec": {"replicas": 2}});
    forbidden(
        deployments
            .patch_scale("web", &PatchParams::default(), &Patch::Merge(&scale))
            .await
            .unwrap_err(),
    );
    forbidden(
        deployments
            .patch("web", &PatchParams::default(), &Patch::Merge(&scale))
            .await
            .unwrap_err(),
    );
    forbidden(
        region_pods
            .patch_status(&names[1], &PatchParams::default(), &Patch::Merge(&lost))
            .await
            .unwrap_err(),
    );
    // Nothing changed.
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        4
    );
    let d = deployments.get("web").await.unwrap();
    assert_eq!(d.spec.unwrap().replicas, Some(4));
    let p = pods.get(&names[1]).await.unwrap();
    assert_ne!(p.status.and_then(|s| s.reason).as_deref(), Some("NodeLost"));
    // Scaling up is no removal.
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();

    // Tuesday: outside the window, all three go through.
    clock.set(at("2026-12-01T09:00:00Z"));
    pods.delete(&names[0], &DeleteParams::default())
        .await
        .unwrap();
    deployments
        .patch_scale("web", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .unwrap();
    let p = region_pods
        .patch_status(&names[1], &PatchParams::default(), &Patch::Merge(&lost))
        .await
        .unwrap();
    assert_eq!(p.status.unwrap().reason.as_deref(), Some("NodeLost"));
}

#[tokio::test]
async fn deleting_a_namespace_holding_a_protected_object_is_refused_and_deletes_nothing() {
    let (s, clock) = server_at("2026-11-27T12:00:00Z").await;
    let admin = s.admin();
    crate::create_namespace(&admin, "shop").await;
    let cms = Api::<ConfigMap>::namespaced(admin.clone(), "shop");
    for name in ["prices", "banner", "menu"] {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": name}, "data": {"k": "v"}}))
                .unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    create_policy(
        &admin,
        "shop",
        "keep-prices",
        json!({"selector": {"kinds": ["ConfigMap"], "names": ["prices"]}, "rules": {"protect": true}}),
    )
    .await;
    let nss = Api::<Namespace>::all(admin.clone());
    let msg = forbidden(
        nss.delete("shop", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert!(
        msg.contains("ConfigMap shop/prices"),
        "names the protected object: {msg}"
    );
    assert!(
        msg.contains("risk.meridian.io/unlock-until"),
        "says how to unlock: {msg}"
    );
    let ns = nss.get("shop").await.unwrap();
    assert!(
        ns.metadata.deletion_timestamp.is_none(),
        "the namespace is not terminating"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await; // a lifecycle pass
    assert_eq!(
        cms.list(&ListParams::default()).await.unwrap().items.len(),
        3
    );
    // A plain delete of the object is refused too.
    forbidden(
        cms.delete("prices", &DeleteParams::default())
            .await
            .unwrap_err(),
    );

    // An unlock too far ahead does not count; a short one does.
    let unlock =
        |t: &str| json!({"metadata": {"annotations": {"risk.meridian.io/unlock-until": t}}});
    cms.patch(
        "prices",
        &PatchParams::default(),
        &Patch::Merge(unlock("2026-11-30T12:00:00Z")),
    )
    .await
    .unwrap();
    let msg = forbidden(
        nss.delete("shop", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert!(msg.contains("more than 24h ahead"), "{msg}");
    cms.patch(
        "prices",
        &PatchParams::default(),
        &Patch::Merge(unlock("2026-11-27T13:00:00Z")),
    )
    .await
    .unwrap();
    // ... until it expires.
    clock.advance(jiff::SignedDuration::from_hours(2));
    let msg = forbidden(
        nss.delete("shop", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert!(msg.contains("expired"), "{msg}");
    clock.advance(jiff::SignedDuration::from_hours(-2));
    nss.delete("shop", &DeleteParams::default()).await.unwrap();
    crate::eventually("namespace shop gone", || async {
        nss.get_opt("shop").await.unwrap().is_none()
    })
    .await;
}

#[tokio::test]
async fn audit_mode_allows_everything_and_records_each_would_be_denial() {
    let (s, _clock) = server_at("2026-11-27T12:00:00Z").await;
    let admin = s.admin();
    let names = deployment_with_pods(&admin, "web", 3).await;
    create_policy(
        &admin,
        "default",
        "try-it",
        json!({"mode": "Audit", "selector": {"kinds": ["Deployment"], "names": ["web"]},
               "rules": {"maxDeletions": [{"count": 1, "period": "30m"}]}}),
    )
    .await;
    let pods = Api::<Pod>::default_namespaced(admin.clone());
    for n in &names {
        pods.delete(n, &DeleteParams::default()).await.unwrap();
    }
    assert!(
        pods.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let log = s.server.state.config.data_dir.join("audit.log");
    crate::eventually("two would-be denials in the audit log", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains("\"outcome\":\"would-deny\""))
            .count()
            == 2
            && text
                .lines()
                .filter(|l| l.contains("\"outcome\":\"allowed\""))
                .count()
                == 1
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    let line: Value =
        serde_json::from_str(text.lines().find(|l| l.contains("would-deny")).unwrap()).unwrap();
    assert_eq!(line["user"], "admin");
    assert_eq!(line["rule"], "maxDeletions[0]");
    assert_eq!(line["kind"], "Pod");
    assert_eq!(line["policy"], "RiskPolicy default/try-it");
    // Events, and the policy's status, say the same.
    let events = Api::<k8s_openapi::api::core::v1::Event>::default_namespaced(admin.clone());
    crate::eventually("RiskWouldDeny events", || async {
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some("RiskWouldDeny"))
            .count()
            == 2
    })
    .await;
    crate::eventually("status lists the would-be denials", || async {
        let p = policies(&admin, "default").get("try-it").await.unwrap();
        let last = p.data["status"]["lastDenials"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        last.len() == 2
            && last.iter().all(|d| d["auditOnly"] == true)
            && p.data["status"]["budgets"][0]["used"] == 1
    })
    .await;
}

#[tokio::test]
async fn bad_risk_policies_are_refused_with_the_offending_field() {
    let s = TestServer::start().await;
    let api = policies(&s.admin(), "default");
    for (spec, field) in [
        (json!({"rules": {}}), "spec.rules"),
        (
            json!({"mode": "Maybe", "rules": {"protect": true}}),
            "spec.mode",
        ),
        (
            json!({"selector": {"kinds": ["Pods"]}, "rules": {"protect": true}}),
            "spec.selector.kinds[0]",
        ),
        (
            json!({"selector": {"kinds": ["Node"]}, "rules": {"protect": true}}),
            "spec.selector.kinds[0]",
        ),
        (
            json!({"selector": {"namespaces": ["x"]}, "rules": {"protect": true}}),
            "spec.selector.namespaces",
        ),
        (
            json!({"rules": {"denyWindows": [{"schedule": "0 25 * * *", "duration": "1h"}]}}),
            "spec.rules.denyWindows[0].schedule",
        ),
        (
            json!({"rules": {"denyWindows": [{"schedule": "0 1 * * *", "duration": "1h", "timeZone": "Moon/Base"}]}}),
            "spec.rules.denyWindows[0].timeZone",
        ),
        (
            json!({"rules": {"denyWindows": [{"start": "2026-12-02T00:00:00Z", "end": "2026-12-01T00:00:00Z"}]}}),
            "spec.rules.denyWindows[0].end",
        ),
        (
            json!({"rules": {"maxDeletions": [{"period": "30m"}]}}),
            "spec.rules.maxDeletions[0].count",
        ),
        (
            json!({"rules": {"maxDeletions": [{"count": 1, "period": "soon"}]}}),
            "spec.rules.maxDeletions[0].period",
        ),
        (
            json!({"rules": {"maxDeletions": [{"count": 1, "period": "1h", "per": "Galaxy"}]}}),
            "spec.rules.maxDeletions[0].per",
        ),
    ] {
        let p: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "meridian.io/v1alpha1", "kind": "RiskPolicy",
            "metadata": {"name": "bad"}, "spec": spec,
        }))
        .unwrap();
        match api.create(&PostParams::default(), &p).await {
            Err(kube::Error::Api(st)) => {
                assert_eq!(st.code, 422, "{spec}: {st:?}");
                let causes = st.details.unwrap().causes;
                assert!(
                    causes.iter().any(|c| c.field == field),
                    "{spec}: {causes:?}"
                );
            }
            r => panic!("{spec}: expected 422, got {r:?}"),
        }
    }
    assert!(
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

/// Stands in for the kubelets: every pod is Running and Ready.
async fn kubelet(pods: Api<Pod>) {
    let ready = json!({"status": {"phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}]}});
    loop {
        for p in pods
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
        {
            let is_ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if !is_ready && p.metadata.deletion_timestamp.is_none() {
                let _ = pods
                    .patch_status(
                        p.metadata.name.as_deref().unwrap(),
                        &PatchParams::default(),
                        &Patch::Merge(&ready),
                    )
                    .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_rolling_update_under_two_per_10_minutes_proceeds_at_that_pace_and_completes() {
    let (s, clock) = server_at("2026-11-27T12:00:00Z").await;
    let admin = s.admin();
    let controllers = tokio::spawn(meridian_controllers::run(admin.clone()));
    let pods = Api::<Pod>::default_namespaced(admin.clone());
    let kubelet = tokio::spawn(kubelet(pods.clone()));
    let deployments = Api::<Deployment>::default_namespaced(admin.clone());
    let d: Deployment = serde_json::from_value(json!({"metadata": {"name": "web"},
        "spec": {"replicas": 4, "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "main", "image": "busybox", "env": [{"name": "V", "value": "1"}]}]}}}}))
    .unwrap();
    deployments
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
    let available = |want: i32| {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get("web").await.unwrap();
            let st = d.status.unwrap_or_default();
            st.updated_replicas == Some(want)
                && st.available_replicas == Some(want)
                && st.replicas == Some(want)
        }
    };
    crate::eventually("4 replicas available", || available(4)).await;
    let names = |items: Vec<Pod>| -> Vec<String> {
        items
            .into_iter()
            .map(|p| p.metadata.name.unwrap())
            .collect()
    };
    let old = names(pods.list(&ListParams::default()).await.unwrap().items);
    create_policy(
        &admin,
        "default",
        "slow-rollouts",
        json!({"selector": {"kinds": ["Deployment"], "names": ["web"]},
               "rules": {"maxDeletions": [{"count": 2, "period": "10m"}]}}),
    )
    .await;
    let gone = || {
        let pods = pods.clone();
        let old = old.clone();
        async move {
            let now = names(pods.list(&ListParams::default()).await.unwrap().items);
            old.iter().filter(|n| !now.contains(n)).count()
        }
    };
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"spec": {"containers": [
                {"name": "main", "image": "busybox", "env": [{"name": "V", "value": "2"}]}]}}}})),
        )
        .await
        .unwrap();
    crate::eventually("two old pods replaced", || async { gone().await == 2 }).await;
    // The third removal is refused: the old ReplicaSet says so, and waits.
    let replicasets = Api::<ReplicaSet>::default_namespaced(admin.clone());
    crate::eventually("the old ReplicaSet reports the refusal", || async {
        replicasets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|r| {
                r.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| {
                        c.iter().any(|c| {
                            c.type_ == "ReplicaFailure"
                                && c.message
                                    .as_deref()
                                    .is_some_and(|m| m.contains("slow-rollouts"))
                        })
                    })
            })
    })
    .await;
    let replica_failure = || {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get("web").await.unwrap();
            d.status.and_then(|s| s.conditions).is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "ReplicaFailure" && c.status == "True")
            })
        }
    };
    crate::eventually("the Deployment reports it too", replica_failure).await;
    let events = Api::<k8s_openapi::api::core::v1::Event>::default_namespaced(admin.clone());
    let refusals = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("FailedDelete"))
        .count();
    assert!(refusals >= 1, "a FailedDelete event on the ReplicaSet");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(gone().await, 2, "no third removal inside the 10 minutes");

    // Ten minutes later: two more, and the rollout completes.
    clock.advance(jiff::SignedDuration::from_mins(10));
    crate::eventually("all old pods replaced", || async { gone().await == 4 }).await;
    crate::eventually("rollout complete", || available(4)).await;
    crate::eventually("no refusal left to report", || async {
        !replica_failure().await
    })
    .await;
    controllers.abort();
    kubelet.abort();
}

#[tokio::test]
async fn deleting_a_tenant_or_a_node_that_a_policy_protects_is_refused() {
    let (s, _clock) = server_at("2026-11-27T12:00:00Z").await;
    let admin = s.admin();
    // A tenant protects one of its ConfigMaps; the admin deleting the whole tenant
    // would delete it too: refused, the tenant and its namespaces stay.
    let acme = s.tenant("acme").await;
    let cms = Api::<ConfigMap>::default_namespaced(acme.clone());
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "keys"}, "data": {"k": "v"}})).unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    create_policy(
        &acme,
        "default",
        "keep-keys",
        json!({"selector": {"kinds": ["ConfigMap"]}, "rules": {"protect": true}}),
    )
    .await;
    let tenants = crate::tenants(admin.clone());
    let msg = forbidden(
        tenants
            .delete("acme", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert!(msg.contains("ConfigMap acme.default/keys"), "{msg}");
    assert!(
        tenants
            .get("acme")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_none()
    );
    assert_eq!(
        cms.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    // The tenant sees its own names in refusals.
    let msg = forbidden(
        cms.delete("keys", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert!(msg.contains("RiskPolicy default/keep-keys"), "{msg}");

    // An admin's ClusterRiskPolicy guards nodes.
    let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(admin.clone());
    let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(
        json!({"metadata": {"name": "paris-1", "labels": {"tier": "core"}}}),
    )
    .unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let crp: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "meridian.io/v1alpha1", "kind": "ClusterRiskPolicy",
        "metadata": {"name": "core-nodes"},
        "spec": {"selector": {"kinds": ["Node"], "labelSelector": {"matchLabels": {"tier": "core"}}},
                 "rules": {"protect": true}}}))
    .unwrap();
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("meridian.io", "v1alpha1", "ClusterRiskPolicy"),
        "clusterriskpolicies",
    );
    Api::<DynamicObject>::all_with(admin.clone(), &ar)
        .create(&PostParams::default(), &crp)
        .await
        .unwrap();
    let msg = forbidden(
        nodes
            .delete("paris-1", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert!(msg.contains("ClusterRiskPolicy core-nodes"), "{msg}");
    assert!(nodes.get_opt("paris-1").await.unwrap().is_some());
}

#[tokio::test]
async fn deletecollection_stops_at_the_first_refusal_and_says_how_far_it_got() {
    let (s, _clock) = server_at("2026-11-27T12:00:00Z").await;
    let admin = s.admin();
    deployment_with_pods(&admin, "web", 3).await;
    create_policy(
        &admin,
        "default",
        "web-safety",
        serde_json::from_str(ONE_PER_30M).unwrap(),
    )
    .await;
    let r = s
        .raw()
        .delete(format!(
            "{}/api/v1/namespaces/default/pods?labelSelector=app%3Dweb",
            s.server.url
        ))
        .bearer_auth(&s.server.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let body: Value = r.json().await.unwrap();
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains("(1 of 3 deleted before this refusal)"),
        "{msg}"
    );
    let pods = Api::<Pod>::default_namespaced(admin);
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        2
    );
}
