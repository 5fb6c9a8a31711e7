//! Real containers end to end: agents with `--runtime containerd`, each on a
//! private containerd, images from a loopback registry pulled through the
//! region's image cache.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncBufReadExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, LogParams, PostParams};
use serde_json::json;

#[path = "../runtime/fixtures.rs"]
mod fixtures;

use crate::harness::*;
use fixtures::{Containerd, Registry};

fn containerd_args(c: &Containerd) -> Vec<String> {
    c.inner.agent_args()
}

/// A world with a registry holding `demo/busybox:1` and one agent, `paris-1`, on a
/// private containerd.
async fn containerd_world() -> (World, Registry, Containerd, String) {
    let mut w = World::start(RegionOpts::default()).await;
    let registry = Registry::start(&w.path("registry"));
    let image = registry.push("demo/busybox:1", &fixtures::busybox()).await;
    let containerd = Containerd::start(&w.path("containerd"), &registry).await;
    let args = containerd_args(&containerd);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    w.add_agent_with("paris-1", "Paris", &args).await;
    (w, registry, containerd, image)
}

fn container_state(p: &Pod) -> (Option<String>, Option<String>, i32) {
    let c = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first());
    let waiting = c
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.waiting.as_ref())
        .and_then(|w| w.reason.clone());
    let terminated = c
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
        .and_then(|t| t.reason.clone());
    (waiting, terminated, c.map(|c| c.restart_count).unwrap_or(0))
}

fn container_id(p: &Pod) -> Option<String> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .container_id
        .clone()
}

async fn http_get(port: u16) -> Option<String> {
    reqwest::get(format!("http://127.0.0.1:{port}/index.html"))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pods_serve_log_restart_get_oom_killed_and_survive_an_agent_restart() {
    let (mut w, registry, _containerd, image) = containerd_world().await;

    // A Deployment serving on a host port.
    let port = free_port();
    let deploy: Api<Deployment> = Api::namespaced(w.client.clone(), "edge");
    let d = json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{
                        "name": "web", "image": image,
                        "command": ["sh", "-c", format!(
                            "echo hello-edge > /www/index.html; echo serving on {port}; exec httpd -f -v -p {port} -h /www")],
                        "ports": [{"containerPort": port, "hostPort": port}],
                        "readinessProbe": {"httpGet": {"path": "/index.html", "port": port}, "periodSeconds": 1},
                    }],
                },
            },
        },
    });
    deploy
        .create(&PostParams::default(), &serde_json::from_value(d).unwrap())
        .await
        .unwrap();
    let web = || async {
        w.pods()
            .list(&ListParams::default().labels("app=web"))
            .await
            .unwrap()
            .items
            .into_iter()
            .next()
    };
    eventually(
        "the web pod is Running and Ready",
        Duration::from_secs(90),
        || async { web().await.is_some_and(|p| is_running_ready(&p)) },
    )
    .await;
    assert_eq!(http_get(port).await.as_deref(), Some("hello-edge\n"));
    let pod = web().await.unwrap();
    let name = pod.metadata.name.clone().unwrap();
    let id = container_id(&pod).unwrap();
    assert!(id.starts_with("containerd://"), "{id}");

    // Its logs stream through the global API.
    let logs = w.pods().logs(&name, &LogParams::default()).await.unwrap();
    assert!(logs.contains(&format!("serving on {port}")), "{logs:?}");
    let follow = w
        .pods()
        .log_stream(
            &name,
            &LogParams {
                follow: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    http_get(port).await;
    let mut lines = follow.lines();
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(line)) = lines.try_next().await {
            let done = line.contains("response:200");
            seen.push(line);
            if done {
                break;
            }
        }
    })
    .await;
    assert!(
        seen.iter().any(|l| l.contains("response:200")),
        "followed logs: {seen:?}"
    );

    // The pull was announced as Events.
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(w.client.clone(), "edge");
    eventually(
        "Pulling and Pulled events",
        Duration::from_secs(20),
        || async {
            let list = events.list(&ListParams::default()).await.unwrap().items;
            let has = |reason: &str| {
                list.iter().any(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.message.as_deref().is_some_and(|m| m.contains(&image))
                })
            };
            has("Pulling") && has("Pulled")
        },
    )
    .await;
    // The image came through the region's cache.
    let fetched = w
        .region_metric("meridian_region_image_upstream_fetches")
        .await
        .unwrap_or(0.0);
    assert!(
        fetched >= 3.0,
        "manifest, config and layer from upstream: {fetched}"
    );

    // A crashing container is restarted with back-off.
    w.create_pod(json!({
        "metadata": {"name": "crasher"},
        "spec": {"nodeName": "paris-1", "containers": [{
            "name": "c", "image": image, "command": ["sh", "-c", "echo boom; exit 1"]}]},
    }))
    .await;
    eventually(
        "crasher restarts and backs off",
        Duration::from_secs(60),
        || async {
            let p = w.pod("crasher").await;
            let (waiting, _, restarts) = container_state(&p);
            restarts >= 2 && waiting.as_deref() == Some("CrashLoopBackOff")
        },
    )
    .await;

    // A memory limit kills an allocating container: OOMKilled.
    w.create_pod(json!({
        "metadata": {"name": "hog"},
        "spec": {"nodeName": "paris-1", "restartPolicy": "Never", "containers": [{
            "name": "c", "image": image,
            "command": ["sh", "-c", "x=0123456789abcdef; while true; do x=$x$x; done"],
            "resources": {"limits": {"memory": "32Mi"}}}]},
    }))
    .await;
    eventually("hog is OOMKilled", Duration::from_secs(60), || async {
        let p = w.pod("hog").await;
        container_state(&p).1.as_deref() == Some("OOMKilled")
            && p.status.and_then(|s| s.phase).as_deref() == Some("Failed")
    })
    .await;

    // A missing image: a clear reason, and the node keeps serving the others.
    w.create_pod(json!({
        "metadata": {"name": "missing"},
        "spec": {"nodeName": "paris-1", "containers": [{
            "name": "c", "image": format!("{}/demo/nothing-here:1", registry.addr)}]},
    }))
    .await;
    eventually(
        "missing reports the pull failure",
        Duration::from_secs(60),
        || async {
            let p = w.pod("missing").await;
            matches!(
                container_state(&p).0.as_deref(),
                Some("ErrImagePull" | "ImagePullBackOff")
            ) && p.status.and_then(|s| s.phase).as_deref() == Some("Pending")
        },
    )
    .await;
    w.create_pod(json!({
        "metadata": {"name": "bad-name"},
        "spec": {"nodeName": "paris-1", "containers": [{"name": "c", "image": "Bad Image Name"}]},
    }))
    .await;
    eventually(
        "bad-name reports InvalidImageName",
        Duration::from_secs(30),
        || async {
            container_state(&w.pod("bad-name").await).0.as_deref() == Some("InvalidImageName")
        },
    )
    .await;
    assert_eq!(http_get(port).await.as_deref(), Some("hello-edge\n"));

    // Agent SIGKILL: the container keeps serving; the restarted agent adopts it.
    let i = w.agent("paris-1");
    w.agents[i].1.as_mut().unwrap().kill9();
    assert_eq!(http_get(port).await.as_deref(), Some("hello-edge\n"));
    w.start_agent(i);
    w.wait_node("paris-1", "True").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pod = w.pod(&name).await;
    assert!(is_running_ready(&pod));
    assert_eq!(
        container_id(&pod).as_deref(),
        Some(id.as_str()),
        "same container"
    );
    assert_eq!(restart_count(&pod), 0);
    assert_eq!(http_get(port).await.as_deref(), Some("hello-edge\n"));

    // Deleting the Deployment stops the container and frees the port.
    deploy.delete("web", &Default::default()).await.unwrap();
    eventually(
        "the web server is gone",
        Duration::from_secs(60),
        || async { http_get(port).await.is_none() },
    )
    .await;
}

type Counts = Arc<Mutex<HashMap<String, usize>>>;

/// An HTTP proxy in front of the upstream registry that counts the requests.
async fn counting_proxy(target: String) -> (SocketAddr, Counts) {
    use axum::extract::{Request, State};
    let counts: Counts = Default::default();
    let client = reqwest::Client::new();
    let app = axum::Router::new()
        .fallback(
            |State((counts, client, target)): State<(Counts, reqwest::Client, String)>,
             req: Request| async move {
                let path = req.uri().path().to_owned();
                *counts
                    .lock()
                    .unwrap()
                    .entry(format!("{} {path}", req.method()))
                    .or_default() += 1;
                let mut fwd =
                    client.request(req.method().clone(), format!("http://{target}{path}"));
                if let Some(a) = req.headers().get("accept") {
                    fwd = fwd.header("accept", a);
                }
                let resp = fwd.send().await.unwrap();
                let status = resp.status();
                let ct = resp
                    .headers()
                    .get("content-type")
                    .cloned()
                    .unwrap_or_else(|| "application/octet-stream".parse().unwrap());
                let digest = resp.headers().get("docker-content-digest").cloned();
                let body = resp.bytes().await.unwrap();
                let mut b = axum::response::Response::builder()
                    .status(status.as_u16())
                    .header("content-type", ct);
                if let Some(d) = digest {
                    b = b.header("docker-content-digest", d);
                }
                b.body(axum::body::Body::from(body)).unwrap()
            },
        )
        .with_state((counts.clone(), client, target));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_agents_pulling_one_image_cause_one_upstream_pull() {
    const N: usize = 10;
    // Every tag lookup checks upstream again (a HEAD): the manifest still crosses once.
    let mut w = World::start(RegionOpts {
        image_tag_ttl: "0s",
        ..Default::default()
    })
    .await;
    let registry = Registry::start(&w.path("registry"));
    let img = fixtures::busybox();
    registry.push("demo/app:1", &img).await;
    let (proxy, counts) = counting_proxy(registry.addr.clone()).await;
    let image = format!("{proxy}/demo/app:1");
    let mut containerds = Vec::new();
    for i in 0..N {
        containerds.push(Containerd::start(&w.path(&format!("containerd-{i}")), &registry).await);
    }
    for (i, c) in containerds.iter().enumerate() {
        let args = containerd_args(c);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        w.add_agent_with(&format!("node-{i}"), "Paris", &args).await;
    }
    let deploy: Api<Deployment> = Api::namespaced(w.client.clone(), "edge");
    let d = json!({
        "metadata": {"name": "app"},
        "spec": {
            "replicas": N,
            "selector": {"matchLabels": {"app": "app"}},
            "template": {
                "metadata": {"labels": {"app": "app"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
                        "labelSelector": {"matchLabels": {"app": "app"}},
                        "topologyKey": "kubernetes.io/hostname"}]}},
                    "containers": [{"name": "app", "image": image,
                        "command": ["sh", "-c", "while true; do sleep 1; done"]}],
                },
            },
        },
    });
    deploy
        .create(&PostParams::default(), &serde_json::from_value(d).unwrap())
        .await
        .unwrap();
    eventually(
        "all replicas Running on ten nodes",
        Duration::from_secs(120),
        || async {
            let pods = w
                .pods()
                .list(&ListParams::default().labels("app=app"))
                .await
                .unwrap()
                .items;
            let running = pods
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
                .collect::<std::collections::HashSet<_>>();
            running.len() == N
        },
    )
    .await;
    // A later pull (Always) of the same tag: the region asks upstream with a HEAD
    // whether the tag moved, and serves its copy.
    w.create_pod(json!({
        "metadata": {"name": "again"},
        "spec": {"nodeName": "node-0", "terminationGracePeriodSeconds": 1, "containers": [{
            "name": "c", "image": image, "imagePullPolicy": "Always",
            "command": ["sh", "-c", "sleep 3600"]}]},
    }))
    .await;
    eventually("the second pull ran", Duration::from_secs(60), || async {
        w.phase("again").await.as_deref() == Some("Running")
    })
    .await;
    let counts = counts.lock().unwrap().clone();
    let m = img.parsed_manifest().unwrap();
    for digest in [&m.config.digest, &m.layers[0].digest] {
        let key = format!("GET /v2/demo/app/blobs/{digest}");
        assert_eq!(counts.get(&key), Some(&1), "{key}: {counts:?}");
    }
    // (A HEAD may revalidate the tag for the later pull: no manifest crosses again.)
    let manifest_gets: usize = counts
        .iter()
        .filter(|(k, _)| k.starts_with("GET ") && k.contains("/manifests/"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(manifest_gets, 1, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmaps_and_secrets_reach_containers_as_files_and_env() {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    let (w, _registry, _containerd, image) = containerd_world().await;
    let secrets: Api<Secret> = Api::namespaced(w.client.clone(), "edge");
    let secret = json!({"metadata": {"name": "creds"}, "stringData": {"token": "t0k3n"}});
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(secret).unwrap(),
        )
        .await
        .unwrap();
    // The ConfigMap does not exist yet: the pod waits with a clear reason.
    w.create_pod(json!({
        "metadata": {"name": "configured"},
        "spec": {
            "nodeName": "paris-1",
            "terminationGracePeriodSeconds": 1,
            "volumes": [
                {"name": "cfg", "configMap": {"name": "settings"}},
                {"name": "sec", "secret": {"secretName": "creds", "items": [{"key": "token", "path": "api/token"}]}},
            ],
            "containers": [{
                "name": "c", "image": image,
                "command": ["sh", "-c", "echo \"mode=$MODE token=$(cat /etc/sec/api/token) conf=$(cat /etc/cfg/app.conf) all=$FROM_ALL\"; sleep 3600"],
                "env": [
                    {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                ],
                "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "FROM_"}],
                "volumeMounts": [
                    {"name": "cfg", "mountPath": "/etc/cfg"},
                    {"name": "sec", "mountPath": "/etc/sec"},
                ],
            }],
        },
    }))
    .await;
    eventually("the pod waits for its ConfigMap", Duration::from_secs(30), || async {
        let p = w.pod("configured").await;
        let waiting = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.waiting.as_ref())
            .map(|w| (w.reason.clone().unwrap_or_default(), w.message.clone().unwrap_or_default()));
        matches!(waiting, Some((r, m)) if r == "CreateContainerConfigError" && m.contains("configmap \"settings\" not found"))
    })
    .await;
    let maps: Api<ConfigMap> = Api::namespaced(w.client.clone(), "edge");
    let cm = json!({"metadata": {"name": "settings"},
        "data": {"mode": "edge", "app.conf": "threads=4", "ALL": "yes"}});
    maps.create(&PostParams::default(), &serde_json::from_value(cm).unwrap())
        .await
        .unwrap();
    eventually(
        "the pod starts once the ConfigMap exists",
        Duration::from_secs(90),
        || async { w.phase("configured").await.as_deref() == Some("Running") },
    )
    .await;
    let want = "mode=edge token=t0k3n conf=threads=4 all=yes";
    eventually(
        "the container saw its files and env",
        Duration::from_secs(30),
        || async {
            w.pods()
                .logs("configured", &LogParams::default())
                .await
                .is_ok_and(|l| l.contains(want))
        },
    )
    .await;
    assert_eq!(restart_count(&w.pod("configured").await), 0);

    // imagePullSecrets: the region ships the Secret, containerd gets the credentials.
    let private = Registry::start_with_auth(&w.path("private"), "bob", "s3cret");
    let private_image = private
        .push_as("team/app:1", &fixtures::busybox(), Some(("bob", "s3cret")))
        .await;
    let auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode("bob:s3cret")
    };
    let cfg = json!({"auths": {private.addr.clone(): {"auth": auth}}}).to_string();
    let pull = json!({"metadata": {"name": "pull"}, "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": cfg}});
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(pull).unwrap(),
        )
        .await
        .unwrap();
    for (name, secrets) in [
        ("with-secret", json!([{"name": "pull"}])),
        ("without", json!([])),
    ] {
        w.create_pod(json!({
            "metadata": {"name": name},
            // Always: an image already on the node is not proof of access (as in
            // Kubernetes, where only a pull checks credentials).
            "spec": {"nodeName": "paris-1", "imagePullSecrets": secrets, "containers": [{
                "name": "c", "image": private_image, "imagePullPolicy": "Always",
                "command": ["sh", "-c", "sleep 3600"]}]},
        }))
        .await;
    }
    eventually(
        "the pod with the pull secret runs",
        Duration::from_secs(60),
        || async { w.phase("with-secret").await.as_deref() == Some("Running") },
    )
    .await;
    eventually(
        "the pod without it cannot pull",
        Duration::from_secs(60),
        || async {
            matches!(
                container_state(&w.pod("without").await).0.as_deref(),
                Some("ErrImagePull" | "ImagePullBackOff")
            )
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_prepull_warms_the_selected_nodes_and_reports_per_region() {
    let (mut w, registry, _paris, image) = containerd_world().await;
    let nice = Containerd::start(&w.path("containerd-nice"), &registry).await;
    let args = containerd_args(&nice);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    w.add_agent_with("nice-1", "Nice", &args).await;
    let ar = kube::api::ApiResource {
        group: "meridian.io".into(),
        version: "v1alpha1".into(),
        api_version: "meridian.io/v1alpha1".into(),
        kind: "ImagePrePull".into(),
        plural: "imageprepulls".into(),
    };
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(w.client.clone(), "edge", &ar);
    let missing = format!("{}/demo/not-there:1", registry.addr);
    for (name, images) in [("warm", vec![image.clone()]), ("broken", vec![missing])] {
        let obj = json!({
            "apiVersion": "meridian.io/v1alpha1", "kind": "ImagePrePull",
            "metadata": {"name": name},
            "spec": {"images": images, "nodeSelector": {"topology.meridian.io/city": "Paris"}},
        });
        api.create(
            &PostParams::default(),
            &serde_json::from_value(obj).unwrap(),
        )
        .await
        .unwrap();
    }
    let region = |name: &'static str| {
        let api = api.clone();
        async move {
            let o = api.get(name).await.ok()?;
            Some(o.data["status"]["regions"]["test-region"].clone())
        }
    };
    eventually(
        "the pre-pull reports paris-1 warm",
        Duration::from_secs(60),
        || async {
            region("warm")
                .await
                .is_some_and(|r| r["nodes"] == 1 && r["pulled"] == 1)
        },
    )
    .await;
    eventually(
        "the broken pre-pull reports its failure",
        Duration::from_secs(60),
        || async {
            region("broken").await.is_some_and(|r| {
                r["failed"] == 1
                    && r["failures"][0]
                        .as_str()
                        .is_some_and(|f| f.starts_with("paris-1: ") && f.contains("not-there"))
            })
        },
    )
    .await;
    // A node that joins later in Paris gets the warm image too.
    let paris2 = Containerd::start(&w.path("containerd-paris-2"), &registry).await;
    let args = containerd_args(&paris2);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    w.add_agent_with("paris-2", "Paris", &args).await;
    eventually(
        "the late joiner is warmed as well",
        Duration::from_secs(60),
        || async {
            region("warm")
                .await
                .is_some_and(|r| r["nodes"] == 2 && r["pulled"] == 2)
        },
    )
    .await;
    // The image is on paris-1 (a pod that may not pull starts), not on nice-1.
    for node in ["paris-1", "nice-1"] {
        w.create_pod(json!({
            "metadata": {"name": format!("never-{node}")},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1, "containers": [{
                "name": "c", "image": image, "imagePullPolicy": "Never",
                "command": ["sh", "-c", "sleep 3600"]}]},
        }))
        .await;
    }
    eventually(
        "never-paris-1 runs from the warmed image",
        Duration::from_secs(60),
        || async { w.phase("never-paris-1").await.as_deref() == Some("Running") },
    )
    .await;
    eventually(
        "never-nice-1 has no image",
        Duration::from_secs(30),
        || async {
            container_state(&w.pod("never-nice-1").await).0.as_deref() == Some("ErrImageNeverPull")
        },
    )
    .await;
    // Invalid objects are refused with the field.
    let bad = json!({"apiVersion": "meridian.io/v1alpha1", "kind": "ImagePrePull",
        "metadata": {"name": "bad"}, "spec": {"images": ["has space"]}});
    let err = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(bad).unwrap(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("spec.images[0]"), "{err}");
}
