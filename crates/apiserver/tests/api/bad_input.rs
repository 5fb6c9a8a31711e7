//! Bad input gets a Kubernetes Status with the right code and reason, and writes nothing.

use serde_json::{Value, json};

use crate::TestServer;

struct Case {
    what: &'static str,
    method: reqwest::Method,
    path: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    code: u16,
    reason: &'static str,
    field: Option<&'static str>,
}

fn case(
    what: &'static str,
    method: reqwest::Method,
    path: &'static str,
    body: impl Into<Vec<u8>>,
    code: u16,
    reason: &'static str,
) -> Case {
    Case {
        what,
        method,
        path,
        content_type: "application/json",
        body: body.into(),
        code,
        reason,
        field: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_status_objects_and_change_nothing() {
    use reqwest::Method;
    let t = TestServer::start().await;
    let http = t.raw();
    let pods = "/api/v1/namespaces/default/pods";
    let valid_pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ok"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
    // One object exists, so updates, patches and deletes have a target.
    let r = http
        .post(format!("{}{pods}", t.server.url))
        .bearer_auth(&t.server.admin_token)
        .json(&valid_pod)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let with = |mut c: Case, ct: &'static str| {
        c.content_type = ct;
        c
    };
    let field = |mut c: Case, f: &'static str| {
        c.field = Some(f);
        c
    };
    let cases = vec![
        case("malformed JSON", Method::POST, pods, "{\"metadata\": {", 400, "BadRequest"),
        with(case("malformed YAML", Method::POST, pods, "metadata: [unclosed", 400, "BadRequest"), "application/yaml"),
        case("empty body", Method::POST, pods, "", 400, "BadRequest"),
        with(case("protobuf body", Method::POST, pods, "k8s\u{0}\n", 415, "UnsupportedMediaType"), "application/vnd.kubernetes.protobuf"),
        case("not an object", Method::POST, pods, "[1,2,3]", 400, "BadRequest"),
        case("wrong kind", Method::POST, pods, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}}).to_string(), 400, "BadRequest"),
        case("wrong type", Method::POST, pods, json!({"metadata": {"name": "x"}, "spec": {"containers": "nope"}}).to_string(), 400, "BadRequest"),
        field(case("invalid name", Method::POST, pods, json!({"metadata": {"name": "Bad_Name"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}).to_string(), 422, "Invalid"), "metadata.name"),
        field(case("missing name", Method::POST, pods, json!({"metadata": {}, "spec": {"containers": [{"name": "c", "image": "i"}]}}).to_string(), 422, "Invalid"), "metadata.name"),
        field(case("missing containers", Method::POST, pods, json!({"metadata": {"name": "x"}, "spec": {"containers": []}}).to_string(), 422, "Invalid"), "spec.containers"),
        field(case("bad quantity", Method::POST, pods, json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "c", "image": "i", "resources": {"requests": {"cpu": "lots"}}}]}}).to_string(), 422, "Invalid"), "spec.containers[0].resources.requests.cpu"),
        field(case("bad label", Method::POST, pods, json!({"metadata": {"name": "x", "labels": {"a": "has space"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}).to_string(), 422, "Invalid"), "metadata.labels.a"),
        case("namespace mismatch", Method::POST, pods, json!({"metadata": {"name": "x", "namespace": "other"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}).to_string(), 400, "BadRequest"),
        case("missing namespace", Method::POST, "/api/v1/namespaces/nope/pods", valid_pod.to_string(), 404, "NotFound"),
        case("oversized body", Method::POST, pods, format!("{{\"metadata\":{{\"name\":\"big\",\"annotations\":{{\"a\":\"{}\"}}}}}}", "x".repeat(4 * 1024 * 1024)), 413, "RequestEntityTooLarge"),
        case("name mismatch on update", Method::PUT, "/api/v1/namespaces/default/pods/ok", json!({"metadata": {"name": "other"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}).to_string(), 400, "BadRequest"),
        case("update of a missing object", Method::PUT, "/api/v1/namespaces/default/pods/missing", valid_pod.to_string(), 404, "NotFound"),
        with(case("unsupported patch type", Method::PATCH, "/api/v1/namespaces/default/pods/ok", "{}", 415, "UnsupportedMediaType"), "text/plain"),
        with(case("malformed patch", Method::PATCH, "/api/v1/namespaces/default/pods/ok", "{nope", 400, "BadRequest"), "application/merge-patch+json"),
        with(case("patch that invalidates", Method::PATCH, "/api/v1/namespaces/default/pods/ok", json!({"spec": {"containers": null}}).to_string(), 422, "Invalid"), "application/merge-patch+json"),
        with(case("failing JSON patch test", Method::PATCH, "/api/v1/namespaces/default/pods/ok", json!([{"op": "test", "path": "/metadata/name", "value": "zzz"}]).to_string(), 422, "Invalid"), "application/json-patch+json"),
        case("unknown resource", Method::GET, "/api/v1/widgets", "", 404, "NotFound"),
        case("bad label selector", Method::GET, "/api/v1/pods?labelSelector=a%20in%20(", "", 400, "BadRequest"),
        case("bad resourceVersion", Method::GET, "/api/v1/pods?resourceVersion=abc", "", 400, "BadRequest"),
        case("bad continue token", Method::GET, "/api/v1/pods?limit=1&continue=%%%", "", 400, "BadRequest"),
        case("bad delete options", Method::DELETE, "/api/v1/namespaces/default/pods/ok", "{\"propagationPolicy\": \"Sideways\"}", 400, "BadRequest"),
        case("method not allowed", Method::POST, "/api/v1/namespaces/default/pods/ok", valid_pod.to_string(), 405, "MethodNotAllowed"),
    ];
    for c in cases {
        let before = t.revision().await;
        let mut req = http
            .request(c.method.clone(), format!("{}{}", t.server.url, c.path))
            .bearer_auth(&t.server.admin_token)
            .header("content-type", c.content_type);
        if !c.body.is_empty() {
            req = req.body(c.body.clone());
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e:?}", c.what));
        let code = resp.status().as_u16();
        let status: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(code, c.code, "{}: {status}", c.what);
        assert_eq!(status["kind"], "Status", "{}", c.what);
        assert_eq!(status["reason"], c.reason, "{}: {status}", c.what);
        assert_eq!(status["code"], c.code, "{}", c.what);
        if let Some(f) = c.field {
            let causes = status["details"]["causes"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            assert!(
                causes.iter().any(|x| x["field"] == f),
                "{}: no cause for {f} in {status}",
                c.what
            );
        }
        assert_eq!(
            t.revision().await,
            before,
            "{}: nothing may be written",
            c.what
        );
    }
    // The one good object is untouched.
    let r = http
        .get(format!("{}{pods}/ok", t.server.url))
        .bearer_auth(&t.server.admin_token)
        .send()
        .await
        .unwrap();
    let got: Value = r.json().await.unwrap();
    assert_eq!(got["spec"]["containers"][0]["image"], "busybox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_discovery_answer() {
    let t = TestServer::start().await;
    let http = t.raw();
    for p in ["/healthz", "/readyz", "/livez"] {
        assert_eq!(
            http.get(format!("{}{p}", t.server.url))
                .send()
                .await
                .unwrap()
                .status(),
            200,
            "{p}"
        );
    }
    let _ = http
        .get(format!("{}/api/v1/pods", t.server.url))
        .bearer_auth(&t.server.admin_token)
        .send()
        .await
        .unwrap();
    let metrics = http
        .get(format!("{}/metrics", t.server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "meridian_apiserver_requests_total{verb=\"list\",resource=\"pods\",code=\"200\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("meridian_apiserver_request_duration_seconds_bucket"));
    let groups: Value = http
        .get(format!("{}/apis", t.server.url))
        .bearer_auth(&t.server.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    for g in ["apps", "batch", "coordination.k8s.io", "meridian.io"] {
        assert!(names.contains(&g), "{g} missing from {names:?}");
    }
}
